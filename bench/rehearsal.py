"""The full-size rehearsal: the README's three command lines on a synthetic Zeshel (toy_world.py
--zeshel_scale F) with a tiny BERT, on the CPU, measuring every stage.

    python bench/rehearsal.py --scale 0.05 --work /tmp/rehearsal/f0.05 --out bench/scale_0.05.json

Builds the world (unless WORK/data exists), then runs main_retriever.py, save_candidates.py and
main_reranker.py one after the other with the README's flags, changed only where CPU compute
forces it (see CHANGES and bench/SCALE.md). For each script it records its wall time, its peak
resident memory (the process tree, sampled every 0.2 s: the data loader's workers included) and
the bytes it left on disk; for each stage the scripts' own `stage NAME: ...` log lines
(utils.StageClock: wall time, peak RSS of the process, bytes written). Prints a Markdown table and
writes the figures as JSON to --out.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # recipe.py

# (flag, value in the README's line, value here, why): what CPU compute forces.
CHANGES = [
    ("--pretrained", "bert-base-uncased", "WORK/bert",
     "the tiny BERT of the synthetic world (2 layers, hidden 64): a CPU cannot run bert-base "
     "over 492,321 entities"),
    ("--max_len", "128", "16", "retriever windows of 16 tokens: an eighth of the tokens"),
    ("--num_mention_vecs / --num_entity_vecs", "128", "1",
     "sum-of-max over 1 x 1 vectors (the same code path): the score work is m x n per pair, and "
     "mining scores 49,275 x 332,632 pairs"),
    ("--num_cands (retriever)", "64", "8", "4 random + 4 hard negatives per mention"),
    ("--epochs (retriever)", "4", "1", "one epoch shows every stage once"),
    ("--num_cands (save_candidates)", "64", "16", "16 candidates per mention"),
    ("--L", "256", "32", "reranker pairs of 32 tokens"),
    ("--C / --C_eval", "64", "4", "4 candidates per mention in the reranker"),
    ("--epochs (reranker)", "3", "1", "one epoch"),
    ("--quiet", "", "on", "no progress bars in the captured output"),
]


def commands(work, python=sys.executable):
    """The three command lines, as the README has them (recipe.py, with the original's --gpus and
    entity-vector flags) but for CHANGES."""
    from recipe import CANDIDATES, RERANKER, RETRIEVER, SCORERS, merge
    data, bert = os.path.join(work, "data"), os.path.join(work, "bert")
    hidden = ["--store_en_hiddens", "--en_hidden_path", os.path.join(work, "en_hidden")]
    tiny = ["--pretrained", bert, "--quiet"]
    retriever = merge(RETRIEVER + SCORERS["sum_max"] + ["--gpus", "3,4,5,7"] + hidden,
                      ["--epochs", "1", "--num_cands", "8", "--num_mention_vecs", "1",
                       "--num_entity_vecs", "1", "--max_len", "16"] + tiny)
    candidates = merge(CANDIDATES + hidden + ["--gpus", "0"],
                       ["--num_mention_vecs", "1", "--num_entity_vecs", "1", "--num_cands", "16",
                        "--cands_dir", os.path.join(work, "cands")] + tiny)
    reranker = merge(RERANKER + ["--gpus", "5"],
                     ["--epochs", "1", "--cands_dir", os.path.join(work, "cands"), "--L", "32",
                      "--C", "4", "--C_eval", "4"] + tiny)
    return {"main_retriever": [python, "main_retriever.py", "--model", os.path.join(work, "ret.pt"),
                               "--data_dir", data] + retriever,
            "save_candidates": [python, "save_candidates.py", "--model",
                                os.path.join(work, "ret.pt"), "--data_dir", data] + candidates,
            "main_reranker": [python, "main_reranker.py", "--model", os.path.join(work, "rr.pt"),
                              "--data", data] + reranker}


def _tree_rss_kb(root_pid):
    """Resident memory of a process and all its descendants, in kB (Linux /proc)."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, changed = {root_pid}, True
    while changed:
        new = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= new
        changed = bool(new)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            pass
    return total


def disk_bytes(path):
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total


def run_measured(cmd, log_path, env):
    """Run `cmd` from the repository root: (status, wall seconds, peak tree RSS MB, peak RSS of the
    process itself MB and its CPU seconds from wait4, its output)."""
    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
                done.wait(0.2)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        thread.join()
    wall = time.perf_counter() - start
    with open(log_path) as f:
        text = f.read()
    cpu = usage.ru_utime + usage.ru_stime
    return proc.returncode, wall, peak[0] / 1024, usage.ru_maxrss / 1024, cpu, text


STAGE = re.compile(r"stage (.+?): ([\d.]+) s, peak RSS (\d+) MB(?:, wrote ([\d.]+) MB)?"
                   r"(?:, cpu ([\d.]+) s)?")


def stages(text):
    """The `stage NAME: ...` lines of utils.StageClock in a script's output."""
    def number(x):
        return float(x) if x else None
    return [{"stage": m.group(1), "seconds": float(m.group(2)), "peak_rss_mb": int(m.group(3)),
             "wrote_mb": number(m.group(4)), "cpu_s": number(m.group(5))}
            for m in STAGE.finditer(text)]


def table(result):
    lines = [f"F = {result['scale']}: {result['counts']}", "",
             "| script / stage | wall s | cpu s | peak RSS MB | written MB |",
             "|---|---:|---:|---:|---:|"]
    g = result["generate"]
    lines.append(f"| toy_world.py --zeshel_scale | {g['seconds']:.1f} | | {g['peak_rss_mb']:.0f} | "
                 f"{g['disk_mb']:.1f} on disk |")
    for name, r in result["scripts"].items():
        lines.append(f"| **{name}** (whole run; tree RSS) | {r['seconds']:.1f} | "
                     f"{r['cpu_s']:.1f} | {r['peak_tree_rss_mb']:.0f} | "
                     f"{r['disk_mb']:.1f} on disk |")
        for s in r["stages"]:
            cells = ["" if s[k] is None else f"{s[k]:.1f}" for k in ("cpu_s", "wrote_mb")]
            lines.append(f"| {s['stage']} | {s['seconds']:.1f} | {cells[0]} | {s['peak_rss_mb']} | "
                         f"{cells[1]} |")
    return "\n".join(lines)


def compare(paths):
    """Markdown tables of several rehearsals' JSON files (--out), one column per scale: per stage
    wall / CPU seconds, peak RSS and bytes written; then CPU time and its growth between scales."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    runs.sort(key=lambda r: r["scale"])
    rows = {}  # (script, stage) -> {scale: figures}, in the order first seen
    for r in runs:
        for name, script in r["scripts"].items():
            for s in script["stages"]:
                rows.setdefault((name, s["stage"]), {})[r["scale"]] = s
    scales = [r["scale"] for r in runs]
    head = " | ".join(f"F = {f:g}" for f in scales)
    lines = ["Per stage: wall / CPU seconds, peak RSS of the process (MB), written (MB); whole "
             "runs: wall / CPU seconds, peak RSS of the process tree, what the run left on disk.",
             "", f"| script: stage | {head} |", "|---|" + "---|" * len(runs)]
    gen = " | ".join(f"{r['generate']['seconds']:.0f} / {r['generate'].get('cpu_s', 0):.0f} s, "
                     f"{r['generate']['peak_rss_mb']:.0f} MB, {r['generate']['disk_mb']:.0f} MB "
                     f"on disk" for r in runs)
    lines.append(f"| toy_world.py --zeshel_scale F | {gen} |")
    for name in commands("WORK"):
        whole = [r["scripts"].get(name) for r in runs]
        lines.append(f"| **{name}** (whole run) | " + " | ".join(
            "—" if w is None else f"**{w['seconds']:.0f} / {w['cpu_s']:.0f} s, tree "
            f"{w['peak_tree_rss_mb']:.0f} MB, {w['disk_mb']:.1f} MB on disk**" for w in whole) + " |")
        for (script, stage), by_scale in rows.items():
            if script == name:
                lines.append(f"| {name}: {stage} | " + " | ".join(
                    "—" if f not in by_scale else
                    f"{by_scale[f]['seconds']:.1f} / {by_scale[f]['cpu_s']:.1f}, "
                    f"{by_scale[f]['peak_rss_mb']}, {by_scale[f]['wrote_mb']:.1f}"
                    for f in scales) + " |")
    steps = list(zip(scales, scales[1:]))
    lines += ["", "| script: stage | CPU s at " + " / ".join(f"{f:g}" for f in scales) + " | " +
              " | ".join(f"growth {a:g} -> {b:g} (x{b / a:g} items)" for a, b in steps) + " |",
              "|---|---|" + "---:|" * len(steps)]
    for (name, stage), by_scale in rows.items():
        cpu = [by_scale[f]["cpu_s"] if f in by_scale else None for f in scales]
        growth = [f"{y / x:.1f}x" if x is not None and y is not None and x >= 0.5 else "—"
                  for x, y in zip(cpu, cpu[1:])]
        lines.append(f"| {name}: {stage} | " + " / ".join("—" if c is None else f"{c:.1f}"
                                                          for c in cpu) + " | " +
                     " | ".join(growth) + " |")
    return "\n".join(lines)


def report(work, scale):
    """The stage table of the script outputs found in `work`, finished or not."""
    with open(os.path.join(work, "generate.json")) as f:
        result = {"scale": scale, "generate": json.load(f), "scripts": {}}
    with open(os.path.join(work, "generate.log")) as f:
        result["counts"] = " ".join(line.strip() + ";" for line in f if "worlds" in line)
    for name in commands(work):
        path = os.path.join(work, f"{name}.out")
        if os.path.isfile(path):
            with open(path) as f:
                found = stages(f.read())
            result["scripts"][name] = {"seconds": sum(s["seconds"] for s in found),
                                       "cpu_s": sum(s["cpu_s"] or 0 for s in found),
                                       "peak_tree_rss_mb": max([s["peak_rss_mb"] for s in found]
                                                               or [0]),
                                       "disk_mb": float("nan"), "stages": found}
    return table(result)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, help="F of toy_world.py --zeshel_scale (required)")
    p.add_argument("--work", help="scratch folder (world, checkpoints, logs) (required)")
    p.add_argument("--out", help="JSON file for the figures")
    p.add_argument("--threads", type=int, default=1, help="torch threads per script")
    p.add_argument("--only", default="", help="comma-separated scripts to run (default: all)")
    p.add_argument("--report", action="store_true",
                   help="run nothing: tabulate the stage lines already in WORK (a cut run too)")
    p.add_argument("--compare", nargs="+", metavar="JSON",
                   help="run nothing: the tables of bench/SCALE.md from these --out files")
    args = p.parse_args(argv)
    if args.compare:
        print(compare(args.compare))
        return
    if args.scale is None or args.work is None:
        p.error("--scale and --work are required (unless --compare)")
    if args.report:
        print(report(args.work, args.scale))
        return
    os.makedirs(args.work, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads),
               PYTHONHASHSEED="0")
    result = {"scale": args.scale, "threads": args.threads, "changes": CHANGES, "scripts": {}}
    data = os.path.join(args.work, "data")
    if not os.path.isdir(data):
        rc, wall, tree, own, cpu, text = run_measured(
            [sys.executable, "toy_world.py", args.work, "--zeshel_scale", str(args.scale)],
            os.path.join(args.work, "generate.log"), env)
        if rc:
            sys.exit(f"toy_world.py failed:\n{text}")
        result["generate"] = {"seconds": wall, "peak_rss_mb": own, "cpu_s": cpu,
                              "disk_mb": disk_bytes(args.work) / 1e6}
    else:
        with open(os.path.join(args.work, "generate.json")) as f:
            result["generate"] = json.load(f)
    with open(os.path.join(args.work, "generate.json"), "w") as f:
        json.dump(result["generate"], f)
    with open(os.path.join(args.work, "generate.log")) as f:
        result["counts"] = " ".join(line.strip() + ";" for line in f if "worlds" in line)
    only = [s for s in args.only.split(",") if s]
    for name, cmd in commands(args.work).items():
        if only and name not in only:
            continue
        before = disk_bytes(args.work)
        out = os.path.join(args.work, f"{name}.out")
        rc, wall, tree, own, cpu, text = run_measured(cmd, out, env)
        if rc:
            sys.exit(f"{name} failed with status {rc}:\n{text[-3000:]}")
        result["scripts"][name] = {"command": " ".join(cmd[1:]), "seconds": wall, "cpu_s": cpu,
                                   "peak_tree_rss_mb": tree, "peak_rss_mb": own,
                                   "disk_mb": (disk_bytes(args.work) - before) / 1e6,
                                   "stages": stages(text)}
        print(f"{name}: {wall:.1f} s, peak tree RSS {tree:.0f} MB", flush=True)
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""The 2021 code's retriever and ours, side by side on the same unseen data: test recall@8 per seed.

    python bench/side_by_side.py --reference REFERENCE_DIR \\
        --python2021 VENV2021/bin/python --out OUT --seeds 1 2 3 4 5 6 \\
        --modes 2021 default fresh

Modes: `2021` runs the authors' main_retriever.py (through bench/reference_runner.py, with
--python2021: transformers 4.57); `default` runs our main_retriever.py (the one beside this
folder) as it comes; any other mode X runs ours with `--random_negatives X`. Every run gets the
same flags (FLAGS, plus --seed; ours also --pretrained and --quiet), one process at a time, one
torch thread, PYTHONHASHSEED=0 (the 2021 code orders its entities by iterating a set of world
names, so the hash seed decides which entity an index is).

The data (unless --data and --bert are given) is written to OUT/data and OUT/bert by
`make_world_for_comparison`, from the toy world's builders with its own seed, world names and sizes.
Each run keeps its folder OUT/runs/MODE-sSEED (log, checkpoint, result.json); a run whose
result.json exists is not repeated (--rerun repeats it). The table covers every mode and seed
asked for: per seed, mean, standard error (sample standard deviation / sqrt(n)), then each of
our modes minus the 2021 code with the standard error of that difference of independent means.
The seeds are not paired across codes (the same seed gives other draws in the other code).
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = ["--max_len", "32", "--B", "8", "--k", "8", "--num_cands", "8", "--cands_ratio", "0.5",
         "--type_cands", "mixed_negative", "--type_model", "sum_max", "--num_mention_vecs", "32",
         "--num_entity_vecs", "32", "--mention_bsz", "64", "--entity_bsz", "64", "--lr", "5e-4",
         "--epochs", "3", "--gpus", ""]
K = 8
ENV = {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# world name -> (entities, names borne by two entities, mentions kept: None for all).
# Small train worlds, large val and test worlds: 180 train mentions, 160 val, 160 test.
WORLDS = {"train": {"opal_reach": (30, 10, None), "lichen_steppe": (30, 10, None),
                    "harrow_dunes": (30, 10, None)},
          "val": {"mire_hollow": (300, 100, 80), "tallow_crag": (300, 100, 80)},
          "test": {"nettle_isle": (300, 100, 80), "quill_moor": (300, 100, 80)}}
DATA_SEED = 2107


def make_world_for_comparison(out_dir, seed=DATA_SEED):
    """Write out_dir/data (Zeshel layout) and out_dir/bert (a tiny random BERT, hidden 64, two
    layers, a word-level vocabulary of every word and the markers); returns both paths. Each
    world is toy_world.make_world's (two mentions in each document); a world with a mention
    count keeps only its first mentions, so that its many entities do not make many mentions."""
    from toy_world import (FILLER, SPECIAL, make_world, pseudo_words, world_outputs,
                           write_tiny_bert, write_worlds)
    rng = random.Random(seed)
    names = pseudo_words(rng, 500, 3)
    topics = [w for w in pseudo_words(rng, 2000, 2) if w not in names]
    sizes = {w: s for split in WORLDS.values() for w, s in split.items()}

    def make(world):
        n, shared, keep = sizes[world]
        docs, mentions = make_world(rng, world, names, topics, n_entities=n, n_shared=shared)
        return docs, mentions[:keep]

    data, bert = os.path.join(out_dir, "data"), os.path.join(out_dir, "bert")
    outputs = world_outputs(out_dir, list(sizes))
    write_worlds(outputs, data, {split: list(ws) for split, ws in WORLDS.items()}, make)
    write_tiny_bert(bert, SPECIAL + FILLER + names + topics, seed, outputs=outputs)
    return data, bert


def comparison_world(out_dir):
    """out_dir/data and out_dir/bert, written by make_world_for_comparison unless already there."""
    data, bert = os.path.join(out_dir, "data"), os.path.join(out_dir, "bert")
    if not os.path.isdir(data):
        make_world_for_comparison(out_dir)
    return data, bert


def reference_command(args):
    """The 2021 code's main_retriever.py (args.reference), run by args.python2021 on current
    libraries through bench/reference_runner.py; its BERT is the env's ORIG_BERT."""
    return [args.python2021, os.path.join(ROOT, "bench", "reference_runner.py"), args.reference,
            "main_retriever.py"]


def our_commit():
    """The last commit of our checkout that changed anything outside bench/ (what ran), marked
    `+changes` when tracked files outside bench/ differ from it."""
    git = ["git", "-C", ROOT]
    outside = ["--", ".", ":!bench"]
    head = subprocess.run(git + ["log", "-1", "--format=%h", *outside], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", *outside],
                           capture_output=True, text=True).stdout.strip()
    return head + ("+changes" if dirty else "")


def run_one(mode, seed, args, data, bert):
    """Run one mode and seed in its own folder: its result dict (recall@8 in percent)."""
    folder = os.path.join(args.out, "runs", f"{mode}-s{seed}")
    done = os.path.join(folder, "result.json")
    if os.path.exists(done) and not args.rerun:
        with open(done) as f:
            return json.load(f)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    model = os.path.join(folder, "model.pt")
    common = ["--model", model, "--data_dir", data, *FLAGS, "--seed", str(seed)]
    env = {**os.environ, **ENV}
    if mode == "2021":
        cmd = [*reference_command(args), *common]
        env["ORIG_BERT"] = bert
        code = "2021"
    else:
        cmd = [sys.executable, os.path.join(ROOT, "main_retriever.py"), *common,
               "--pretrained", bert, "--quiet"]
        cmd += [] if mode == "default" else ["--random_negatives", mode]
        code = our_commit()
    start = time.time()
    with open(os.path.join(folder, "output.txt"), "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder)
    wall = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"{mode} seed {seed} failed (status {proc.returncode}): see {folder}/output.txt")
    if mode == "2021":  # its log line " test recall@8 :   0.8187| ..." holds a fraction to 4
        with open(os.path.join(folder, "output.txt")) as f:  # places: a count of hits again
            # (exact for fewer than 5,000 test mentions)
            found = re.findall(rf"test recall@{K} :\s*([0-9.]+)", f.read())
        with open(os.path.join(data, "mentions", "test.json")) as f:
            n = sum(1 for line in f if line.strip())
        recall = 100 * round(float(found[-1]) * n) / n
    else:
        with open(model + ".results.json") as f:
            recall = json.load(f)["test"][f"recall@{K}"]
    result = {"mode": mode, "seed": seed, f"recall@{K}": recall, "wall_s": round(wall, 1),
              "code": code, "command": cmd, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(done, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{mode} seed {seed}: recall@{K} {recall:.2f} ({wall:.0f} s)", flush=True)
    return result


def mean_se(values):
    """(mean, standard error of the mean).

    >>> mean_se([1.0, 2.0, 3.0])
    (2.0, 0.5773502691896257)
    """
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return mean, math.sqrt(var / n)


def table(results, modes, seeds):
    """The Markdown tables: recall@8 per seed and mode, then each of ours minus the 2021 code."""
    r = {(x["mode"], x["seed"]): x for x in results}
    lines = ["| seed | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(f"{r[m, s][f'recall@{K}']:.2f}" for m in modes)
                     + " |")
    stats = {m: mean_se([r[m, s][f"recall@{K}"] for s in seeds]) for m in modes}
    lines.append("| **mean** | " + " | ".join(f"**{stats[m][0]:.2f}**" for m in modes) + " |")
    lines.append("| standard error | " + " | ".join(f"{stats[m][1]:.2f}" for m in modes) + " |")
    lines.append("| wall s per run (mean) | " + " | ".join(
        f"{mean_se([r[m, s]['wall_s'] for s in seeds])[0]:.1f}" for m in modes) + " |")
    lines.append("| code | " + " | ".join(
        ", ".join(sorted({r[m, s]["code"] for s in seeds})) for m in modes) + " |")
    if "2021" in modes and len(modes) > 1:
        m0, se0 = stats["2021"]
        lines += ["", "| ours − 2021 | difference | standard error | |d| / SE(d) | "
                      "|d| / SE(2021) |", "|---|---:|---:|---:|---:|"]
        for m in modes:
            if m != "2021":
                d, se = stats[m][0] - m0, math.hypot(stats[m][1], se0)
                lines.append(f"| {m} | {d:+.2f} | {se:.2f} | {abs(d) / se:.2f} | "
                             f"{abs(d) / se0:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", help="the 2021 code's folder (mode 2021)")
    p.add_argument("--python2021", help="python of a venv with transformers 4.57 (mode 2021)")
    p.add_argument("--out", required=True, help="folder for the data and the runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    p.add_argument("--modes", nargs="+", default=["2021", "default"])
    p.add_argument("--data", help="a Zeshel folder to use instead of writing one")
    p.add_argument("--bert", help="the BERT folder to use with --data")
    p.add_argument("--rerun", action="store_true", help="repeat runs that have a result.json")
    args = p.parse_args(argv)
    if "2021" in args.modes and not (args.reference and args.python2021):
        p.error("mode 2021 needs --reference and --python2021")
    if bool(args.data) != bool(args.bert):
        p.error("give --data and --bert together")
    args.out = os.path.abspath(args.out)
    data, bert = (args.data, args.bert) if args.data else comparison_world(args.out)
    data, bert = os.path.abspath(data), os.path.abspath(bert)
    results = [run_one(m, s, args, data, bert) for m in args.modes for s in args.seeds]
    print(table(results, args.modes, args.seeds))


if __name__ == "__main__":
    main()

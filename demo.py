"""`make demo`: the whole pipeline on the bundled toy world, offline, on a CPU, in a few minutes.

1. build the toy world (Zeshel layout) and its tiny BERT;
2. the untrained sum-of-max retriever on val and test (the zero-shot baseline, `--epochs 0`);
3. train it with mixed random and hard negatives;
4. dump each mention's top candidates within its world;
5. train the cross-encoder reranker on them (six short epochs);
6. print the paper-style table: per test world and averaged, the baseline's and the trained
   retriever's recall@k, and the reranker's unnormalized and normalized accuracy.

Each stage runs the real script with its command line printed, as a user would run it.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from toy_world import make_toy_world
from utils import cli_main, die

ROOT = os.path.dirname(os.path.abspath(__file__))
K = 8  # recall@k: the toy worlds have 72 entities each
RETRIEVER = ["--type_model", "sum_max", "--num_mention_vecs", "8", "--num_entity_vecs", "8",
             "--max_len", "16", "--k", str(K), "--num_cands", "8", "--type_cands", "mixed_negative",
             "--cands_ratio", "0.5", "--B", "8", "--lr", "1e-3"]
# A cross-encoder from a random tiny BERT must first learn to relate its two segments: short
# pairs and six epochs (a pretrained BERT learns the toy world in one).
RERANKER = ["--type_model", "full", "--L", "16", "--C", str(K), "--C_eval", str(K), "--B", "4",
            "--lr", "1e-3", "--epochs", "6", "--inputmark", "--eval_method", "macro"]


def run(script, *args, quiet=False):
    cmd = [sys.executable, os.path.join(ROOT, script), *args] + (["--quiet"] if quiet else [])
    print(f"\n$ python {script} " + " ".join(shlex.quote(a) for a in args), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if subprocess.run(cmd, env=env).returncode != 0:
        die(f"the demo stopped: {script} failed (its log is in the run folder)")


def load(path):
    with open(path) as f:
        return json.load(f)


def table(baseline, trained, reranker):
    key = f"recall@{K}"
    worlds = list(trained["test"]["per_world"])
    rows = []
    for w in worlds:
        rows.append([w, baseline["test"]["per_world"][w][key], trained["test"]["per_world"][w][key],
                     reranker["test"]["per_world"][w]["acc_unorm"],
                     reranker["test"]["per_world"][w]["acc_norm"]])
    rows.append(["macro average", baseline["test"][f"macro_{key}"], trained["test"][f"macro_{key}"],
                 reranker["test"]["macro"]["acc_unorm"], reranker["test"]["macro"]["acc_norm"]])
    rows.append(["micro average", baseline["test"][f"micro_{key}"], trained["test"][f"micro_{key}"],
                 reranker["test"]["micro"]["acc_unorm"], reranker["test"]["micro"]["acc_norm"]])
    header = ["test world", f"untrained R@{K}", f"trained R@{K}", "reranker U.Acc", "reranker N.Acc"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r[0]} | " + " | ".join(f"{x:.2f}" for x in r[1:]) + " |" for r in rows]
    return "\n".join(lines)


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder for the toy world and the runs")
    parser.add_argument("--retriever_epochs", default="2")
    parser.add_argument("--pretrained", default=None,
                        help="encoder for both models (default: the toy world's tiny random BERT)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    start = time.time()
    out = os.path.abspath(args.out)
    data, bert = make_toy_world(os.path.join(out, "toy"))
    bert = args.pretrained or bert
    print(f"toy world: {data}\ntiny BERT: {bert}")
    run("data_loader.py", "--data_dir", data)
    ret_base, ret, cands, rr = (os.path.join(out, n) for n in
                                ("retriever_untrained.pt", "retriever.pt", "cands", "reranker.pt"))
    for path in (ret_base, ret, rr):  # a fresh demo each time: never resume or mix old results
        for suffix in ("", ".last", ".results.json"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
    common = ["--data_dir", data, "--pretrained", bert]
    run("main_retriever.py", "--model", ret_base, *common, *RETRIEVER, "--epochs", "0", quiet=args.quiet)
    run("main_retriever.py", "--model", ret, *common, *RETRIEVER, "--epochs", args.retriever_epochs,
        quiet=args.quiet)
    run("save_candidates.py", "--model", ret, *common, "--num_cands", str(K), "--cands_dir", cands,
        "--overwrite", quiet=args.quiet)  # the demo's own folder: replace the last demo's
    run("main_reranker.py", "--model", rr, "--data", data, "--cands_dir", cands, "--pretrained", bert,
        *RERANKER, quiet=args.quiet)
    print("\n" + table(load(ret_base + ".results.json"), load(ret + ".results.json"),
                       load(rr + ".results.json")))
    print(f"\nR@{K}: recall@{K} of each mention's gold among its world's 72 entities; U.Acc: "
          f"linked correctly / all mentions; N.Acc: / mentions whose gold is among the {K} "
          f"candidates. All runs, logs and results are in {out} (python report.py {out}). "
          f"Wall time {time.time() - start:.0f} s.")


if __name__ == "__main__":
    sys.exit(main())

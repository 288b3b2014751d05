"""Tables like the paper's, in Markdown, from the files the runs write.

    python report.py RUN_OR_FOLDER [...]          # results files and folders, searched recursively

Reads `<model>.results.json` of `main_retriever.py` (retrieval recall@k) and of
`main_reranker.py` (linking accuracy), and the `recall.json` of `save_candidates.py`, and prints
one table per kind, one row per run, so a sweep over flags compares without code.
"""
import argparse
import glob
import json
import os
import sys

from utils import cli_main, die


def find_files(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "**", "*.results.json"), recursive=True))
            files += sorted(glob.glob(os.path.join(path, "**", "recall.json"), recursive=True))
        elif os.path.isfile(path):
            files.append(path)
        else:
            die(f"{path}: no such file or folder")
    return files


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        die(f"{path}: not a readable JSON file ({e})")


def kind(obj):
    if isinstance(obj, dict) and "eval_method" in obj:
        return "linking"
    if isinstance(obj, dict) and "k" in obj and ("val" in obj or "test" in obj):
        return "retrieval"
    if isinstance(obj, dict) and any(s in obj for s in ("train", "val", "test")):
        return "candidates"
    return None


def fmt(x):
    return "–" if x is None else f"{x:.2f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_name(path):
    name = os.path.basename(path)
    for suffix in (".results.json", ".json"):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return f"{folder}/{name}" if folder else name


def _best(entries, key):
    if not isinstance(entries, list) or not entries:
        return None
    return max(entries, key=lambda e: e.get(key, float("-inf")))


def retrieval_rows(runs):
    """One row per retriever run: best val and test recall@k (pooled, as the original), their
    per-world macro averages, and test accuracy."""
    rows, worlds = [], []
    for name, obj in runs:
        key = f"recall@{obj['k']}"
        val, test = _best(obj.get("val"), key), obj.get("test")
        per = (test or {}).get("per_world", {})
        worlds += [w for w in per if w not in worlds]
        rows.append((name, key, val, test, per))
    header = ["run", "k", "val R@k", "test R@k", "test macro R@k", "test micro R@k", "test acc"]
    header += [f"test {w}" for w in worlds]
    out = []
    for name, key, val, test, per in rows:
        g = lambda e, f: None if not e else e.get(f)
        out.append([name, key.split("@")[1], fmt(g(val, key)), fmt(g(test, key)),
                    fmt(g(test, f"macro_{key}")), fmt(g(test, f"micro_{key}")),
                    fmt(g(test, "accuracy"))] + [fmt(per.get(w, {}).get(key)) for w in worlds])
    return header, out


def linking_rows(runs):
    """One row per reranker run: val (best epoch) and test unnormalized / normalized accuracy,
    macro and micro, and per-world test unnormalized accuracy."""
    worlds = []
    for _, obj in runs:
        worlds += [w for w in (obj.get("test") or {}).get("per_world", {}) if w not in worlds]
    header = ["run", "eval", "val U.Acc", "val N.Acc", "test U.Acc (macro)", "test N.Acc (macro)",
              "test U.Acc (micro)", "test N.Acc (micro)"] + [f"test {w} U.Acc" for w in worlds]
    out = []
    for name, obj in runs:
        val, test = _best(obj.get("val"), "acc_unorm"), obj.get("test") or {}
        per = test.get("per_world", {})
        out.append([name, obj.get("eval_method"), fmt((val or {}).get("acc_unorm")),
                    fmt((val or {}).get("acc_norm")),
                    fmt(test.get("macro", {}).get("acc_unorm")), fmt(test.get("macro", {}).get("acc_norm")),
                    fmt(test.get("micro", {}).get("acc_unorm")), fmt(test.get("micro", {}).get("acc_norm"))]
                   + [fmt(per.get(w, {}).get("acc_unorm")) for w in worlds])
    return header, out


def candidate_rows(runs):
    """One row per (candidates run, split): recall@k of the dumped candidates, macro over worlds
    (micro in brackets)."""
    ks = []
    for _, obj in runs:
        for split in ("train", "val", "test"):
            for key in (obj.get(split, {}).get("macro") or {}):
                if key not in ks:
                    ks.append(key)
    ks.sort(key=lambda s: int(s.split("@")[1]))
    header = ["candidates", "split"] + [f"{k} macro (micro)" for k in ks]
    out = []
    for name, obj in runs:
        for split in ("train", "val", "test"):
            if split in obj:
                macro, micro = obj[split].get("macro", {}), obj[split].get("micro", {})
                out.append([name, split] + [f"{fmt(macro.get(k))} ({fmt(micro.get(k))})" for k in ks])
    return header, out


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="results files, recall.json files, or folders")
    args = parser.parse_args(argv)
    groups = {"retrieval": [], "candidates": [], "linking": []}
    for path in find_files(args.paths):
        obj = load(path)
        k = kind(obj)
        if k:
            groups[k].append((run_name(path), obj))
    if not any(groups.values()):
        die(f"no *.results.json or recall.json found in {' '.join(args.paths)}")
    titles = {"retrieval": "Retrieval (recall@k over the split's entities, %)",
              "candidates": "Candidates (recall@k within each world, %)",
              "linking": "Linking accuracy (%)"}
    makers = {"retrieval": retrieval_rows, "candidates": candidate_rows, "linking": linking_rows}
    blocks = []
    for k, runs in groups.items():
        if runs:
            header, rows = makers[k](runs)
            blocks.append(f"### {titles[k]}\n\n{table(header, rows)}")
    print("\n\n".join(blocks))


if __name__ == "__main__":
    sys.exit(main())

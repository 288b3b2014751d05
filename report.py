"""Tables like the paper's, in Markdown, from the files the runs write.

    python report.py RUN_OR_FOLDER [...]          # results files and folders, searched recursively
    python report.py runs/ --paper                # the paper's tables, this project's runs beside
    python report.py runs/ --plot runs/figures    # PNG figures (needs matplotlib)
    python report.py runs/demo --plot runs/figures  # also the demo's figure, demo.png

Reads `<model>.results.json` of `main_retriever.py` (retrieval recall@k) and of
`main_reranker.py` (linking accuracy), and the `recall.json` of `save_candidates.py`, and prints
one table per kind, one row per run, so a sweep over flags compares without code. A run's val
numbers are those of the epoch it kept: the epoch its test entry reports, or, for a run that has
not reached test, the best by its `--eval_criterion`.

`--paper` places each run in the paper's tables by the arguments in its checkpoint (`<model>`,
else `<model>.last`; only the "args" entry is read): the main table's test recall@64 (sum-of-max,
mixed negatives, p = 50%), the appendix's val recall@64 by scorer and share p of hard negatives,
and the linking accuracy beside BLINK's cross-encoder. `--plot DIR` draws val per epoch, the
training loss per logging step (from `<model>.last`) and test per world, and, for each folder
holding a `summary.json` of demo.py, the demo's figure (random against mixed negatives per seed,
the pipeline per test world).
"""
import glob
import json
import os
import sys

from recipe import (HARD_SHARES, PAPER_TEST_RECALL, PAPER_VAL_RECALL, PEER_ACCURACY,
                    PEER_RECALL, SCORERS, split_flags)
from cli import ArgumentParser, die
from run_safety import Outputs, check_output_dir, main as cli_main

FIGURES = Outputs("report", flag="--plot")  # the PNGs of --plot (a minimal stand-in)


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


def run_args(path, obj):
    """The arguments of the run that wrote the results file `path`: results["args"] when the file
    holds them, else the "args" of its checkpoint (`<model>`, else `<model>.last`, read lazily with
    mmap: the weights are not loaded), else None."""
    if isinstance(obj.get("args"), dict):
        return obj["args"]
    if path not in _ARGS:
        _ARGS[path] = None
        model = path[:-len(".results.json")] if path.endswith(".results.json") else None
        for ckpt in ([model, model + ".last"] if model else []):
            if os.path.isfile(ckpt):
                import torch
                try:
                    state = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True)
                except Exception:  # a foreign or truncated file: the run stays unidentified
                    continue
                if isinstance(state, dict) and isinstance(state.get("args"), dict):
                    _ARGS[path] = state["args"]
                    break
    return _ARGS[path]


_ARGS = {}


def best_val(obj, key, criterion=None):
    """The val entry of the epoch the run kept: the one whose epoch the test entry reports (the
    checkpoint the run tested), or, before the run reached test, the best by `criterion`
    ("accuracy" or a recall/accuracy key; default `key`)."""
    entries = obj.get("val")
    if not isinstance(entries, list) or not entries:
        return None
    epoch = (obj.get("test") or {}).get("epoch")
    kept = [e for e in entries if epoch is not None and e.get("epoch") == epoch]
    if kept:
        return kept[-1]
    by = criterion or key
    return max(entries, key=lambda e: e.get(by, float("-inf")))


def retrieval_criterion(path, obj):
    """The val key the retriever run chose its best epoch by (--eval_criterion)."""
    criterion = obj.get("eval_criterion") or (run_args(path, obj) or {}).get("eval_criterion")
    return "accuracy" if criterion == "accuracy" else f"recall@{obj['k']}"


def retrieval_rows(runs):
    """One row per retriever run: best val and test recall@k (pooled, as the original), their
    per-world macro averages, and test accuracy."""
    rows, worlds = [], []
    for name, path, obj in runs:
        key = f"recall@{obj['k']}"
        val, test = best_val(obj, key, retrieval_criterion(path, obj)), obj.get("test")
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
    for _, _, obj in runs:
        worlds += [w for w in (obj.get("test") or {}).get("per_world", {}) if w not in worlds]
    header = ["run", "eval", "val U.Acc", "val N.Acc", "test U.Acc (macro)", "test N.Acc (macro)",
              "test U.Acc (micro)", "test N.Acc (micro)"] + [f"test {w} U.Acc" for w in worlds]
    out = []
    for name, _, obj in runs:
        val, test = best_val(obj, "acc_unorm"), obj.get("test") or {}
        per = test.get("per_world", {})
        out.append([name, obj.get("eval_method"), fmt((val or {}).get("acc_unorm")),
                    fmt((val or {}).get("acc_norm")),
                    fmt(test.get("macro", {}).get("acc_unorm")),
                    fmt(test.get("macro", {}).get("acc_norm")),
                    fmt(test.get("micro", {}).get("acc_unorm")),
                    fmt(test.get("micro", {}).get("acc_norm"))]
                   + [fmt(per.get(w, {}).get("acc_unorm")) for w in worlds])
    return header, out


def candidate_rows(runs):
    """One row per (candidates run, split): recall@k of the dumped candidates, macro over worlds
    (micro in brackets)."""
    ks = []
    for _, _, obj in runs:
        for split in ("train", "val", "test"):
            for key in (obj.get(split, {}).get("macro") or {}):
                if key not in ks:
                    ks.append(key)
    ks.sort(key=lambda s: int(s.split("@")[1]))
    header = ["candidates", "split"] + [f"{k} macro (micro)" for k in ks]
    out = []
    for name, _, obj in runs:
        for split in ("train", "val", "test"):
            if split in obj:
                macro, micro = obj[split].get("macro", {}), obj[split].get("micro", {})
                out.append([name, split]
                           + [f"{fmt(macro.get(k))} ({fmt(micro.get(k))})" for k in ks])
    return header, out


# ----------------------------------------------------------------------------------------------
# The paper's tables: this project's runs beside the published numbers

SCORER_NAMES = {"dual": "dual", "multi_vector": "multi-vector (8)", "sum_max": "sum-of-max"}
# The vector counts of the paper's runs (recipe.SCORERS; a count of 1 is the scorer's own)
PAPER_SETTING = {scorer: {g[0][2:]: int(g[1]) for g in split_flags(flags)[1:] if g[1] != "1"}
                 for scorer, flags in SCORERS.items()}


def hard_share(args):
    """p (percent of hard negatives) of a retriever run's arguments; None outside the sweep."""
    if args.get("type_cands") == "random_negative":
        return 0
    if args.get("type_cands") == "mixed_negative" and args.get("cands_ratio") is not None:
        return round(100 * (1 - float(args["cands_ratio"])))
    return None


def diff(ours, paper):
    return "–" if ours is None or paper is None else f"{ours - paper:+.2f}"


class Cell:
    """The runs that fill one cell of a paper table: their mean value, and what differs from the
    paper's setting (listed under the table)."""

    def __init__(self):
        self.values, self.names, self.notes, self.comparable = [], [], [], True

    def add(self, name, value, notes, comparable=True):
        if value is not None:
            self.values.append(value)
            self.names.append(name)
            self.notes += [n for n in notes if n not in self.notes]
            self.comparable = self.comparable and comparable

    def value(self):
        return sum(self.values) / len(self.values) if self.values else None

    def diff(self, paper):
        """this project - paper, "–" when missing or another metric (e.g. recall@8)."""
        return diff(self.value(), paper) if self.comparable else "–"

    def text(self, marks):
        if not self.values:
            return "–"
        mark = ""
        if self.notes or len(self.values) > 1:
            marks.append(f"{', '.join(self.names)}" + (f": {'; '.join(self.notes)}"
                                                       if self.notes else "")
                         + (f" (mean of {len(self.values)} runs)" if len(self.values) > 1 else ""))
            mark = f" [{len(marks)}]"
        return f"{self.value():.2f}{mark}"


def retriever_notes(obj, args):
    """How a retriever run's setting differs from the paper's (k, vector counts)."""
    notes = [] if obj["k"] == 64 else [f"recall@{obj['k']}, not @64"]
    for flag, value in PAPER_SETTING.get(args.get("type_model"), {}).items():
        if args.get(flag) != value:
            notes.append(f"--{flag} {args.get(flag)}, not {value}")
    return notes


def paper_tables(groups):
    """The paper's three tables (Markdown) from the runs of `groups` (see main)."""
    main_test, main_val = Cell(), Cell()
    grid = {(s, p): Cell() for s in PAPER_VAL_RECALL for p in HARD_SHARES}
    linking = {size: Cell() for size in PEER_ACCURACY}
    unplaced = []
    for name, path, obj in groups["retrieval"]:
        args = run_args(path, obj)
        p = hard_share(args or {})
        if args is None or p not in HARD_SHARES or args.get("type_model") not in PAPER_VAL_RECALL:
            unplaced.append(name)
            continue
        key = f"recall@{obj['k']}"
        notes = retriever_notes(obj, args)
        val = best_val(obj, key, retrieval_criterion(path, obj))
        same_metric = obj["k"] == 64
        grid[args["type_model"], p].add(name, (val or {}).get(key), notes, same_metric)
        if args["type_model"] == "sum_max" and p == 50:
            main_test.add(name, (obj.get("test") or {}).get(key), notes, same_metric)
            main_val.add(name, (val or {}).get(key), notes, same_metric)
    for name, path, obj in groups["linking"]:
        args = run_args(path, obj)
        if args is None or args.get("type_model") != "full" or args.get("type_bert") not in linking:
            unplaced.append(name)
            continue
        notes = [f"encoder {args['pretrained']}"] if args.get("pretrained") else []
        test = (obj.get("test") or {}).get("macro") or {}
        linking[args["type_bert"]].add(name, test.get("acc_unorm"), notes)

    blocks, marks = [], []
    rows = [["sum-of-max retriever, mixed negatives (p = 50%): test recall@64", "89.62",
             main_test.text(marks), main_test.diff(PAPER_TEST_RECALL)],
            ["the same, val recall@64 (kept epoch)", f"{PAPER_VAL_RECALL['sum_max'][2]:.2f}",
             main_val.text(marks), main_val.diff(PAPER_VAL_RECALL["sum_max"][2])]]
    rows += [[f"{peer} (peer): test recall@64", f"{v:.2f}", "", ""] for peer, v in PEER_RECALL]
    blocks.append(section("Main table: retrieval on Zeshel test (%)",
                          ["", "paper", "this project", "difference"], rows, marks))

    marks = []
    rows = []
    for scorer, paper in PAPER_VAL_RECALL.items():
        row = [SCORER_NAMES[scorer]]
        for p, ref in zip(HARD_SHARES, paper):
            cell = grid[scorer, p]
            row.append(f"{cell.text(marks)} / {ref:.2f} ({cell.diff(ref)})")
        rows.append(row)
    blocks.append(section("Appendix: val recall@64 by share p of hard negatives "
                          "(this project / paper (difference), %)",
                          ["model"] + [f"p = {p}%" for p in HARD_SHARES], rows, marks))

    marks = []
    rows = [[f"cross-encoder, bert-{size}: test unnormalized accuracy (macro)",
             f"{ref:.2f} (BLINK cross-encoder)", linking[size].text(marks),
             linking[size].diff(ref)] for size, ref in PEER_ACCURACY.items()]
    blocks.append(section("Linking accuracy on Zeshel test (%)",
                          ["reranker", "reference", "this project", "difference"], rows, marks))
    if unplaced:
        blocks.append("Runs outside the paper's tables: " + ", ".join(unplaced))
    return "\n\n".join(blocks)


def section(title, header, rows, marks):
    notes = "".join(f"\n[{i}] {m}" for i, m in enumerate(marks, 1))
    return f"### {title}\n\n{table(header, rows)}" + (f"\n{notes}" if notes else "")


# ----------------------------------------------------------------------------------------------
# Figures

def training_losses(path, obj):
    """The mean training loss of every --logging_steps optimizer steps: results["losses"] when the
    results file holds them, else the "losses" of `<model>.last` (None when neither has them)."""
    if isinstance(obj.get("losses"), list):
        return obj["losses"]
    last = path[:-len(".results.json")] + ".last" if path.endswith(".results.json") else None
    if last and os.path.isfile(last):
        import torch
        try:
            state = torch.load(last, map_location="cpu", mmap=True, weights_only=True)
        except Exception:  # a foreign or truncated file: no curve for this run
            return None
        losses = state.get("losses") if isinstance(state, dict) else None
        return [float(x) for x in losses] if isinstance(losses, list) else None
    return None


def pyplot():
    """matplotlib.pyplot (file output only), or a one-line error when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        die("--plot needs matplotlib (pip install matplotlib); the tables need nothing more")
    return plt


def plot(groups, folder):
    """PNG figures in `folder`: val metric per epoch, training loss per logging step, and test
    accuracy per world, one line (or bar group) per run. Returns the paths written."""
    plt = pyplot()
    os.makedirs(folder, exist_ok=True)
    runs = groups["retrieval"] + groups["linking"]
    written = []

    def save(fig, name):
        path = os.path.join(folder, name)
        fig.tight_layout()
        FIGURES.write(path, lambda f: fig.savefig(f, format="png", dpi=120))
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, _, obj in groups["retrieval"]:
        key = f"recall@{obj['k']}"
        val = obj.get("val") or []
        axes[0].plot([e["epoch"] for e in val], [e.get(key) for e in val], marker="o",
                     label=f"{name} ({key})")
    for name, _, obj in groups["linking"]:
        val = obj.get("val") or []
        axes[1].plot([e["epoch"] for e in val], [e.get("acc_unorm") for e in val], marker="o",
                     label=name)
    titles = ("retrievers: val recall@k", "rerankers: val unnormalized accuracy")
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="epoch", ylabel="%")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    save(fig, "val_per_epoch.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, path, obj in runs:
        losses = training_losses(path, obj)
        if losses:
            ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set(title="training loss (mean over each --logging_steps steps)", xlabel="logging step",
           ylabel="loss")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    save(fig, "training_loss.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, group, title in ((axes[0], groups["retrieval"], "retrievers: test recall@k per world"),
                             (axes[1], groups["linking"],
                              "rerankers: test unnormalized accuracy per world")):
        worlds = []
        for _, _, obj in group:
            worlds += [w for w in (obj.get("test") or {}).get("per_world", {}) if w not in worlds]
        width = 0.8 / max(1, len(group))
        for i, (name, _, obj) in enumerate(group):
            per = (obj.get("test") or {}).get("per_world", {})
            metric = f"recall@{obj['k']}" if "k" in obj else "acc_unorm"
            ax.bar([j + i * width for j in range(len(worlds))],
                   [per.get(w, {}).get(metric) or 0 for w in worlds], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(worlds))], worlds, rotation=30,
                      ha="right", fontsize=7)
        ax.set(title=title, ylabel="%")
        if group:
            ax.legend(fontsize=7)
    save(fig, "test_per_world.png")
    return written


def demo_summaries(paths):
    """The summary.json files of demo.py under the folders among `paths`: [(path, summary)]."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(glob.glob(os.path.join(path, "**", "summary.json"),
                                         recursive=True)):
                obj = load(name)
                if isinstance(obj, dict) and "comparison" in obj and "pipeline" in obj:
                    found.append((name, obj))
    return found


def plot_demos(paths, folder):
    """The demo's figure for each demo summary found: `folder`/demo.png (demo_2.png, ... for
    more). Returns the paths written."""
    import demo
    written = []
    for i, (_, summary) in enumerate(demo_summaries(paths)):
        os.makedirs(folder, exist_ok=True)
        name = "demo.png" if i == 0 else f"demo_{i + 1}.png"
        written.append(demo.plot(summary, os.path.join(folder, name), FIGURES))
    return written


@cli_main
def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="results files, recall.json files, or folders")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's tables: this project's values beside the paper's")
    parser.add_argument("--plot", metavar="DIR",
                        help="also write PNG figures (val per epoch, training loss, per world)")
    args = parser.parse_args(argv)
    if args.plot:
        check_output_dir(args.plot, "--plot")  # a file there: one line, before any output
        pyplot()  # before any output: stop at once when matplotlib is absent
    groups = {"retrieval": [], "candidates": [], "linking": []}
    makers = {"retrieval": retrieval_rows, "candidates": candidate_rows, "linking": linking_rows}
    for path in find_files(args.paths):
        obj = load(path)
        k = kind(obj)
        if k:
            run = (run_name(path), path, obj)
            try:  # a file of the expected name but another structure: one line naming it
                makers[k]([run])
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                die(f"{path}: not a {k} file of this project ({type(e).__name__}: {e}); remove "
                    f"it or pass other paths")
            groups[k].append(run)
    if not any(groups.values()) and not args.paper:
        die(f"no *.results.json or recall.json found in {' '.join(args.paths)}")
    if args.paper:
        print(paper_tables(groups))
    else:
        titles = {"retrieval": "Retrieval (recall@k over the split's entities, %)",
                  "candidates": "Candidates (recall@k within each world, %)",
                  "linking": "Linking accuracy (%)"}
        blocks = []
        for k, runs in groups.items():
            if runs:
                header, rows = makers[k](runs)
                blocks.append(f"### {titles[k]}\n\n{table(header, rows)}")
        print("\n\n".join(blocks))
    if args.plot:
        for path in plot(groups, args.plot) + plot_demos(args.paths, args.plot):
            print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

"""Tables like the paper's, in Markdown, from the files the runs write.

    python report.py RUN_OR_FOLDER [...]          # results files and folders, searched recursively
    python report.py runs/ --paper                # the paper's tables, this project's runs beside
    python report.py runs/ --plot runs/figures    # PNG figures (needs matplotlib)
    python report.py runs/demo --plot runs/figures  # also the demo's figure, demo.png

Reads `<model>.results.json` of `main_retriever.py` (retrieval recall@k) and of
`main_reranker.py` (linking accuracy), and the `recall.json` of `save_candidates.py`, and prints
one table per kind, one row per run, so a sweep over flags compares without code. Runs that differ
only by their seed, in folders `seed<S>` of one sweep (`sweep.py --seeds`), are one row: each
cell the mean ± the standard deviation over the seeds (n - 1 in its denominator), and n. A run's
val numbers are those of the epoch it kept: the epoch its test entry reports, or, for a run that
has not reached test, the best by its `--eval_criterion`.

`--paper` places each run in the paper's tables by the flags recorded in the run itself (the
results file's "args", else its folder's record, run_safety): the main table's test recall@64
(sum-of-max, mixed negatives, p = 50%) and BLINK's bi-encoder beside it (the `blink` recipe), the
appendix's val recall@64 by scorer and share p of hard negatives, and the linking accuracy beside
BLINK's cross-encoder. Each cell is mean ± sd (n = runs), its runs pooled over seeds, and a note
lists every way a run differs from the paper's setting: each defining flag against the recipe's
command line (recipe.py, read by the script's own parser; flags the run's mode ignores left out),
and the encoder against the recipe's (bert-base-uncased: bert, 768 hidden, 12 layers, 30522
pieces). `--plot DIR` draws val per epoch (the mean over seeds, the standard deviation as error
bars), the training loss per logging step (one line per seed) and test per world, and, for each
folder holding a `summary.json` of demo.py, the demo's figure. Every input is read and checked
before anything is printed or written; a figure replaces only a file an earlier report wrote
(run_safety.Outputs), unless --overwrite.
"""
import argparse
import glob
import json
import os
import re
import statistics
import sys

from recipe import (BLINK, ENCODERS, HARD_SHARES, PAPER_TEST_RECALL, PAPER_VAL_RECALL,
                    PEER_ACCURACY, PEER_RECALL, RERANKER, merge, retriever_flags)
from cli import ArgumentParser, die
from run_safety import Outputs, main as cli_main, read_hashed, recorded

SCRIPTS = {"retrieval": "main_retriever", "linking": "main_reranker",
           "candidates": "save_candidates"}
SEED_FOLDER = re.compile(r"seed(-?\d+)")


# ----------------------------------------------------------------------------------------------
# Reading: every results file read once, checked whole, before any output

class Result:
    """One results file: its `kind` (retrieval, linking, candidates), content `obj`, the flags
    that define its run (`flags`: its "args", else its folder's record; None when neither says),
    and its `encoder` (results.json's "encoder")."""

    def __init__(self, path, kind, obj, flags):
        self.path, self.kind, self.obj, self.flags = path, kind, obj, flags
        self.name, self.encoder = run_name(path), obj.get("encoder")


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
    """(the JSON value of `path`, the sha256 of the bytes read): one read, UTF-8 only."""
    data, sha = read_hashed(path, path)
    try:
        return json.loads(data.decode("utf-8")), sha
    except UnicodeDecodeError:
        die(f"{path}: not UTF-8 text; this project writes its results as UTF-8 JSON")
    except ValueError as e:
        die(f"{path}: not a readable JSON file ({e})")


def kind(obj):
    if isinstance(obj, dict) and "eval_method" in obj:
        return "linking"
    if isinstance(obj, dict) and "k" in obj and ("val" in obj or "test" in obj):
        return "retrieval"
    if isinstance(obj, dict) and any(s in obj for s in ("train", "val", "test")):
        return "candidates"
    return None


def numbers(x, where):
    """Where in the object `x` a value is neither a number, None nor an object of the same; None
    when nowhere."""
    if not isinstance(x, dict):
        return f"{where} is not an object"
    for key, value in x.items():
        if isinstance(value, dict):
            bad = numbers(value, f"{where}.{key}")
            if bad:
                return bad
        elif value is not None and (isinstance(value, bool) or
                                    not isinstance(value, (int, float))):
            return f"{where}.{key} is not a number"
    return None


def averages(entry, where):
    """What is wrong with the averages and worlds of an evaluation (`macro`, `micro`: objects;
    `per_world`: an object of objects), or None."""
    for key in ("macro", "micro"):
        if key in entry and not isinstance(entry[key], dict):
            return f"{where}.{key} is not an object"
    worlds = entry.get("per_world", {})
    if not isinstance(worlds, dict) or not all(isinstance(w, dict) for w in worlds.values()):
        return f"{where}.per_world is not an object of worlds"
    return numbers(entry, where)


def evaluation(entry, where):
    """What is wrong with an evaluation entry (numbers, an integer epoch, averages), or None."""
    if not isinstance(entry, dict):
        return f"{where} is not an object"
    epoch = entry.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return f"{where} has no epoch number"
    return averages(entry, where)


def problem(k, obj):
    """What in `obj` is not as this project's `k` file holds it (the parts the tables and
    figures read), or None."""
    if k == "candidates":
        for split in ("train", "val", "test"):
            if split in obj:
                bad = (numbers(obj[split], split) or averages(obj[split], split)
                       or next((f"{split}.{part} is missing" for part in ("macro", "micro")
                                if part not in obj[split]), None))
                if bad:
                    return bad
        return None
    if k == "retrieval" and (not isinstance(obj["k"], int) or isinstance(obj["k"], bool)
                             or obj["k"] < 1):
        return "k is not a positive integer"
    if k == "linking" and not isinstance(obj["eval_method"], str):
        return "eval_method is not a name"
    val = obj.get("val", [])
    if not isinstance(val, list):
        return "val is not a list of evaluations"
    for i, entry in enumerate(val):
        bad = evaluation(entry, f"val[{i}]")
        if bad:
            return bad
    if obj.get("test") is not None:
        bad = evaluation(obj["test"], "test")
        if bad:
            return bad
    losses = obj.get("losses", [])
    if not isinstance(losses, list) or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                           for x in losses):
        return "losses is not a list of numbers"
    for key, what in (("args", "object"), ("encoder", "object"), ("eval_criterion", "name")):
        if obj.get(key) is not None and not isinstance(obj[key], dict if what == "object"
                                                       else str):
            return f"{key} is not an {what}"
    return None


def read_results(paths):
    """The results files under `paths` (Result), each read once and checked: one line naming
    the file and what is wrong with it, before any output. A JSON file of no known kind is
    left out."""
    results = []
    for path in find_files(paths):
        obj, sha = load(path)
        k = kind(obj)
        if k is None:
            continue
        bad = problem(k, obj)
        if bad:
            die(f"{path}: not a {k} file of this project ({bad}); remove it or pass other paths")
        flags = obj.get("args")
        if flags is None:
            got = recorded(path, sha)
            flags = ((got or (None, None))[1] or {}).get("flags")
        results.append(Result(path, k, obj, flags))
    return results


def run_name(path):
    name = os.path.basename(path)
    for suffix in (".results.json", ".json"):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return f"{folder}/{name}" if folder else name


def group_seeds(results):
    """[(name, [Result])]: the runs that differ only by their seed, in folders seed<S> of one
    sweep, as one group (named `<folder>/<run> (seeds S1, S2, ...)`); every other run alone."""
    groups = {}
    for r in results:
        parts = os.path.abspath(r.path).split(os.sep)
        seeds = [i for i, part in enumerate(parts) if SEED_FOLDER.fullmatch(part)]
        if r.flags is None or not seeds:
            groups[r.path] = (r.name, [r])
            continue
        where = seeds[-1]
        others = {k: v for k, v in r.flags.items() if k != "seed"}
        key = (r.kind, os.sep.join(parts[:where] + parts[where + 1:]),
               json.dumps(others, sort_keys=True), json.dumps(r.encoder, sort_keys=True))
        groups.setdefault(key, (None, []))[1].append(r)
    named = []
    for key, (name, runs) in groups.items():
        if name is None:
            if len(runs) == 1:
                name = runs[0].name
            else:
                seeds = sorted(int(SEED_FOLDER.fullmatch(os.path.basename(os.path.dirname(
                    os.path.abspath(r.path)))).group(1)) for r in runs)
                name = f"{run_name(key[1])} (seeds {', '.join(map(str, seeds))})"
        named.append((name, runs))
    return named


# ----------------------------------------------------------------------------------------------
# Numbers: the mean, standard deviation and count of a cell

def fmt(x):
    return "–" if x is None else f"{x:.2f}"


def mean_sd(values):
    """(mean, sample standard deviation (None for one value), n) of the values that are not
    None; (None, None, 0) when none is."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None,
            len(values))


def fmt_stat(values, of=None):
    """"mean ± sd" of `values` ("–" when none; the value itself for one), with "(n = k)" when
    `of` is None (every cell says its n) or k is fewer than `of` (the row's runs)."""
    mean, sd, n = mean_sd(values)
    if n == 0:
        return "–"
    text = f"{mean:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")
    return text + (f" (n = {n})" if of is None or n < of else "")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


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
    return max(entries, key=lambda e: e.get(by) if e.get(by) is not None else float("-inf"))


def retrieval_key(r):
    return f"recall@{r.obj['k']}"


def kept_val(r):
    """The val entry a retriever or reranker run kept (its --eval_criterion for a retriever)."""
    if r.kind == "linking":
        return best_val(r.obj, "acc_unorm")
    criterion = r.obj.get("eval_criterion") or (r.flags or {}).get("eval_criterion")
    return best_val(r.obj, retrieval_key(r), "accuracy" if criterion == "accuracy" else None)


def worlds_of(runs, entry):
    worlds = []
    for r in runs:
        worlds += [w for w in (entry(r) or {}).get("per_world", {}) if w not in worlds]
    return worlds


def retrieval_rows(groups):
    """One row per retriever run (or seeds of one): best val and test recall@k (pooled, as the
    original), their per-world macro and micro averages, test accuracy and test per world."""
    runs = [r for _, rs in groups for r in rs]
    worlds = worlds_of(runs, lambda r: r.obj.get("test"))
    header = ["run", "n", "k", "val R@k", "test R@k", "test macro R@k", "test micro R@k",
              "test acc"] + [f"test {w}" for w in worlds]
    out = []
    for name, rs in groups:
        key, n = retrieval_key(rs[0]), len(rs)

        def cell(entry, field, rs=rs, n=n):
            return fmt_stat([((entry(r) or {}).get(field)) for r in rs], n)

        def test(r):
            return r.obj.get("test")
        out.append([name, n, key.split("@")[1], cell(kept_val, key), cell(test, key),
                    cell(test, f"macro_{key}"), cell(test, f"micro_{key}"), cell(test, "accuracy")]
                   + [cell(lambda r, w=w: (test(r) or {}).get("per_world", {}).get(w), key)
                      for w in worlds])
    return header, out


def linking_rows(groups):
    """One row per reranker run (or seeds of one): val (best epoch) and test unnormalized /
    normalized accuracy, macro and micro, and per-world test unnormalized accuracy."""
    runs = [r for _, rs in groups for r in rs]
    worlds = worlds_of(runs, lambda r: r.obj.get("test"))
    header = ["run", "n", "eval", "val U.Acc", "val N.Acc", "test U.Acc (macro)",
              "test N.Acc (macro)", "test U.Acc (micro)", "test N.Acc (micro)"] + [
        f"test {w} U.Acc" for w in worlds]
    out = []
    for name, rs in groups:
        n = len(rs)

        def cell(entry, field, rs=rs, n=n):
            return fmt_stat([(entry(r) or {}).get(field) for r in rs], n)

        def test(r, part=None):
            t = r.obj.get("test") or {}
            return t.get(part) if part else t
        out.append([name, n, rs[0].obj.get("eval_method"), cell(kept_val, "acc_unorm"),
                    cell(kept_val, "acc_norm"),
                    cell(lambda r: test(r, "macro"), "acc_unorm"),
                    cell(lambda r: test(r, "macro"), "acc_norm"),
                    cell(lambda r: test(r, "micro"), "acc_unorm"),
                    cell(lambda r: test(r, "micro"), "acc_norm")]
                   + [cell(lambda r, w=w: test(r).get("per_world", {}).get(w), "acc_unorm")
                      for w in worlds])
    return header, out


def candidate_rows(groups):
    """One row per (candidates run or seeds of one, split): recall@k of the dumped candidates,
    macro over worlds (micro in brackets)."""
    ks = []
    for _, rs in groups:
        for r in rs:
            for split in ("train", "val", "test"):
                ks += [k for k in r.obj.get(split, {}).get("macro", {}) if k not in ks]
    ks.sort(key=lambda s: int(s.split("@")[1]) if s.split("@")[-1].isdigit() else 0)
    header = ["candidates", "n", "split"] + [f"{k} macro (micro)" for k in ks]
    out = []
    for name, rs in groups:
        for split in ("train", "val", "test"):
            have = [r for r in rs if split in r.obj]
            if have:
                out.append([name, len(rs), split] + [
                    f"{fmt_stat([r.obj[split]['macro'].get(k) for r in have], len(rs))} "
                    f"({fmt_stat([r.obj[split]['micro'].get(k) for r in have], len(rs))})"
                    for k in ks])
    return header, out


# ----------------------------------------------------------------------------------------------
# The paper's tables: this project's runs beside the published numbers

SCORER_NAMES = {"dual": "dual", "multi_vector": "multi-vector (8)", "sum_max": "sum-of-max"}


def hard_share(flags):
    """p (percent of hard negatives) of a retriever run's flags; None outside the sweep."""
    if flags.get("type_cands") == "random_negative":
        return 0
    if flags.get("type_cands", "mixed_negative") == "mixed_negative":
        return round(100 * (1 - float(flags.get("cands_ratio", 1.0))))
    return None


def diff(ours, paper):
    return "–" if ours is None or paper is None else f"{ours - paper:+.2f}"


def shown_value(value):
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


def setting_notes(r, script, reference):
    """Every way the run `r` differs from the paper's setting `reference` (the recipe's command
    line of `script`, read by its own parser): each defining flag but --seed (the cells pool
    seeds) whose value differs, leaving out those the run's mode ignores (the script's
    IGNORED_BY_MODE), and the encoder against the recipe's."""
    import importlib
    module = importlib.import_module(script)
    parser = module.build_parser()
    ref_args = parser.parse_args(reference)
    ref = parser.defining(ref_args)
    defaults = parser.defaults()
    run_args = argparse.Namespace(**{**defaults, **r.flags})
    ignored = {name for name, is_ignored, _ in getattr(module, "IGNORED_BY_MODE", ())
               if is_ignored(run_args)}
    notes = []
    for flag in sorted(set(ref) | set(r.flags)):
        ours, paper = r.flags.get(flag, defaults.get(flag)), ref.get(flag, defaults.get(flag))
        if flag != "seed" and flag not in ignored and ours != paper:
            notes.append(f"--{flag} {shown_value(ours)}, not {shown_value(paper)}")
    from data_loader import pretrained_name
    which = "--pre_model" if hasattr(ref_args, "pre_model") else "--type_bert"
    name = pretrained_name(which, getattr(ref_args, which[2:]), ref_args.pretrained)
    note = encoder_note(r.encoder, name)
    return notes + ([note] if note else [])


def shape(encoder):
    return (f"{encoder.get('model_type')}, {encoder.get('hidden_size')} hidden, "
            f"{encoder.get('num_hidden_layers')} layers, {encoder.get('vocab_size')} pieces")


def encoder_note(encoder, name):
    """How a run's encoder (results.json's "encoder") differs from the recipe's `name`
    (recipe.ENCODERS), or None."""
    want = ENCODERS[name]
    if not isinstance(encoder, dict):
        return f"encoder not recorded (the paper's: {name})"
    have = {k: encoder.get(k) for k in want}
    if have != want:
        return f"encoder {encoder.get('name')} ({shape(have)}), not {name} ({shape(want)})"
    if os.path.basename(str(encoder.get("name")).rstrip("/")) != name:
        return f"encoder {encoder.get('name')} (of {name}'s shape)"
    return None


class Cell:
    """The runs that fill one cell of a paper table: their values (one per run), and what
    differs from the paper's setting (listed under the table)."""

    def __init__(self):
        self.values, self.names, self.notes, self.comparable = [], [], [], True

    def add(self, name, values, notes, comparable=True):
        values = [v for v in values if v is not None]
        if values:
            self.values += values
            self.names.append(name)
            self.notes += [n for n in notes if n not in self.notes]
            self.comparable = self.comparable and comparable

    def value(self):
        return mean_sd(self.values)[0]

    def diff(self, paper):
        """this project - paper, "–" when missing or another metric (e.g. recall@8)."""
        return diff(self.value(), paper) if self.comparable else "–"

    def text(self, marks):
        """mean ± sd (n = runs), with a mark to the notes under the table when the runs differ
        from the paper's setting or come from several runs (not only seeds of one)."""
        if not self.values:
            return "–"
        mark = ""
        if self.notes or len(self.names) > 1:
            marks.append(", ".join(self.names) + (f": {'; '.join(self.notes)}" if self.notes
                                                  else ""))
            mark = f" [{len(marks)}]"
        return fmt_stat(self.values) + mark


def paper_tables(groups):
    """The paper's three tables (Markdown) from the runs of `groups` ({kind: [(name, [Result])]})."""
    main_test, main_val, blink = Cell(), Cell(), Cell()
    grid = {(s, p): Cell() for s in PAPER_VAL_RECALL for p in HARD_SHARES}
    linking = {size: Cell() for size in PEER_ACCURACY}
    unplaced = []
    for name, runs in groups["retrieval"]:
        flags = runs[0].flags
        if flags is None:
            unplaced.append(f"{name} (its flags are not recorded)")
            continue
        key = retrieval_key(runs[0])
        same_metric = runs[0].obj["k"] == 64
        test = [(r.obj.get("test") or {}).get(key) for r in runs]
        val = [(kept_val(r) or {}).get(key) for r in runs]
        scorer, p = flags.get("type_model"), hard_share(flags)
        if scorer == "dual" and flags.get("type_cands") == "in_batch":
            blink.add(name, test, setting_notes(runs[0], "main_retriever", BLINK), same_metric)
            continue
        if p not in HARD_SHARES or scorer not in PAPER_VAL_RECALL:
            unplaced.append(name)
            continue
        notes = setting_notes(runs[0], "main_retriever", retriever_flags(scorer, p))
        grid[scorer, p].add(name, val, notes, same_metric)
        if scorer == "sum_max" and p == 50:
            main_test.add(name, test, notes, same_metric)
            main_val.add(name, val, notes, same_metric)
    for name, runs in groups["linking"]:
        flags = runs[0].flags
        if flags is None or flags.get("type_model", "full") != "full":
            unplaced.append(name + (" (its flags are not recorded)" if flags is None else ""))
            continue
        size = "large" if encoder_note(runs[0].encoder, "bert-large-uncased") is None else "base"
        notes = setting_notes(runs[0], "main_reranker",
                              merge(RERANKER, ["--type_bert", size]))
        linking[size].add(name, [((r.obj.get("test") or {}).get("macro") or {}).get("acc_unorm")
                                 for r in runs], notes)

    blocks, marks = [], []
    (blink_name, blink_ref), others = PEER_RECALL[0], PEER_RECALL[1:]
    rows = [["sum-of-max retriever, mixed negatives (p = 50%): test recall@64",
             f"{PAPER_TEST_RECALL:.2f}", main_test.text(marks), main_test.diff(PAPER_TEST_RECALL)],
            ["the same, val recall@64 (kept epoch)", f"{PAPER_VAL_RECALL['sum_max'][2]:.2f}",
             main_val.text(marks), main_val.diff(PAPER_VAL_RECALL["sum_max"][2])],
            [f"{blink_name} (peer; recipe blink): test recall@64", f"{blink_ref:.2f}",
             blink.text(marks), blink.diff(blink_ref)]]
    rows += [[f"{peer} (peer): test recall@64", f"{v:.2f}", "", ""] for peer, v in others]
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

FIGURES = ("val_per_epoch.png", "training_loss.png", "test_per_world.png")


def pyplot():
    """matplotlib.pyplot (file output only), or a one-line error when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        die("--plot needs matplotlib (pip install matplotlib); the tables need nothing more")
    return plt


def per_epoch(runs, field):
    """(epochs, means, sds) of a val `field` over the runs of a group, per epoch (sd 0 for an
    epoch one run reports)."""
    values = {}
    for r in runs:
        for e in r.obj.get("val") or []:
            if e.get(field) is not None:
                values.setdefault(e["epoch"], []).append(e[field])
    epochs = sorted(values)
    stats = [mean_sd(values[e]) for e in epochs]
    return epochs, [s[0] for s in stats], [s[1] or 0.0 for s in stats]


def plot(groups, folder, outputs):
    """PNG figures (FIGURES) in `folder` through `outputs`: val metric per epoch (mean over
    seeds, sd as error bars), training loss per logging step (one line per seed, one colour per
    group) and test per world (mean bars, sd as error bars). Returns the paths written."""
    plt = pyplot()
    written = []

    def save(fig, name):
        path = os.path.join(folder, name)
        fig.tight_layout()
        outputs.write(path, lambda f: fig.savefig(f, format="png", dpi=120))
        plt.close(fig)
        written.append(path)

    def label(name, runs):
        return name + (f" (n = {len(runs)})" if len(runs) > 1 else "")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, k in zip(axes, ("retrieval", "linking")):
        for name, runs in groups[k]:
            field = retrieval_key(runs[0]) if k == "retrieval" else "acc_unorm"
            epochs, means, sds = per_epoch(runs, field)
            ax.errorbar(epochs, means, yerr=sds, marker="o", capsize=3,
                        label=label(name, runs) + (f" ({field})" if k == "retrieval" else ""))
    titles = ("retrievers: val recall@k", "rerankers: val unnormalized accuracy")
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="epoch", ylabel="%")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    save(fig, FIGURES[0])

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, runs) in enumerate(groups["retrieval"] + groups["linking"]):
        color = f"C{i % 10}"
        for j, r in enumerate(x for x in runs if x.obj.get("losses")):
            losses = r.obj["losses"]
            ax.plot(range(1, len(losses) + 1), losses, color=color, alpha=0.8 if j == 0 else 0.5,
                    label=label(name, runs) if j == 0 else None)
    ax.set(title="training loss (mean over each --logging_steps steps; a line per seed)",
           xlabel="logging step", ylabel="loss")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    save(fig, FIGURES[1])

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, k, title in ((axes[0], "retrieval", "retrievers: test recall@k per world"),
                         (axes[1], "linking", "rerankers: test unnormalized accuracy per world")):
        runs_of = groups[k]
        worlds = worlds_of([r for _, rs in runs_of for r in rs], lambda r: r.obj.get("test"))
        width = 0.8 / max(1, len(runs_of))
        for i, (name, runs) in enumerate(runs_of):
            field = retrieval_key(runs[0]) if k == "retrieval" else "acc_unorm"
            stats = [mean_sd([(r.obj.get("test") or {}).get("per_world", {}).get(w, {})
                              .get(field) for r in runs]) for w in worlds]
            ax.bar([j + i * width for j in range(len(worlds))], [s[0] or 0 for s in stats],
                   width, yerr=[s[1] or 0 for s in stats], capsize=2, label=label(name, runs))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(worlds))], worlds, rotation=30,
                      ha="right", fontsize=7)
        ax.set(title=title, ylabel="%")
        if runs_of:
            ax.legend(fontsize=7)
    save(fig, FIGURES[2])
    return written


def demo_summaries(paths):
    """The summary.json files of demo.py under the folders among `paths`: [(path, summary)],
    each checked whole (demo.summary_problem); a summary.json that is not a demo's (not a UTF-8
    JSON object with "comparison" and "pipeline") is left out."""
    import demo
    found = []
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(glob.glob(os.path.join(path, "**", "summary.json"),
                                         recursive=True)):
                data, _ = read_hashed(name, name)
                try:
                    obj = json.loads(data.decode("utf-8"))
                except ValueError:  # UnicodeDecodeError included: someone else's file
                    continue
                if not (isinstance(obj, dict) and "comparison" in obj and "pipeline" in obj):
                    continue
                bad = demo.summary_problem(obj)
                if bad:
                    die(f"{name}: not a summary of demo.py ({bad}); remove it or pass other "
                        f"paths")
                found.append((name, obj))
    return found


@cli_main
def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="results files, recall.json files, or folders")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's tables: this project's values beside the paper's")
    parser.add_argument("--plot", metavar="DIR",
                        help="also write PNG figures (val per epoch, training loss, per world)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files in the --plot folder that an earlier report did not "
                             "write")
    args = parser.parse_args(argv)
    results = read_results(args.paths)
    groups = {k: group_seeds([r for r in results if r.kind == k])
              for k in ("retrieval", "candidates", "linking")}
    if not results and not args.paper:
        die(f"no *.results.json or recall.json found in {' '.join(args.paths)}")
    if args.paper:
        text = paper_tables(groups)
    else:
        titles = {"retrieval": "Retrieval (recall@k over the split's entities, %)",
                  "candidates": "Candidates (recall@k within each world, %)",
                  "linking": "Linking accuracy (%)"}
        makers = {"retrieval": retrieval_rows, "candidates": candidate_rows,
                  "linking": linking_rows}
        text = "\n\n".join(f"### {titles[k]}\n\n{table(*makers[k](g))}"
                           for k, g in groups.items() if g)
    figures = None
    if args.plot:
        summaries = demo_summaries(args.paths)
        figures = Outputs("report", args.overwrite, flag="--plot")
        names = list(FIGURES) + ["demo.png" if i == 0 else f"demo_{i + 1}.png"
                                 for i in range(len(summaries))]
        for name in names:
            figures.add(os.path.join(args.plot, name))
        figures.claim({"tool": "report"})  # earlier reports' figures are replaced, none else
        pyplot()  # matplotlib absent: one line, before any output
    print(text)
    if figures is not None:
        import demo
        figures.start()
        written = plot(groups, args.plot, figures)
        written += [demo.plot(summary, os.path.join(args.plot, name), figures)
                    for (_, summary), name in zip(summaries, names[len(FIGURES):])]
        for path in written:
            print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

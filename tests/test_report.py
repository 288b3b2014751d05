"""report.py on results files written as the scripts write them: the kept epoch, the paper's tables
and every way a run differs from the paper's setting, seeds as mean ± sd and n, the figures, and
the mistakes refused before any output."""
import json
import os
import statistics
import sys

import pytest

import main_reranker
import main_retriever
import report
from conftest import assert_refused, run_in_process, tree
from recipe import RERANKER, merge, retriever_flags
from run_safety import Outputs

BERT_BASE = {"name": "bert-base-uncased", "model_type": "bert", "hidden_size": 768,
             "num_hidden_layers": 12, "vocab_size": 30522}
TINY_BERT = {"name": "/runs/toy/bert", "model_type": "bert", "hidden_size": 64,
             "num_hidden_layers": 2, "vocab_size": 1201}


def entry(epoch, recall, accuracy, k=64):
    key = f"recall@{k}"
    return {"epoch": epoch, key: recall, "accuracy": accuracy, f"macro_{key}": recall,
            f"micro_{key}": recall,
            "per_world": {"lego": {key: recall, "accuracy": accuracy, "mentions": 10}}}


def defining(module, argv):
    """The flags a run of `module` with the command line `argv` records (its "args")."""
    parser = module.build_parser()
    return parser.defining(parser.parse_args(argv))


def retriever_run(folder, name, flags, val, test_epoch=None, k=64, losses=None,
                  encoder=BERT_BASE, base=None):
    """`<name>.pt.results.json` as main_retriever.py writes it: the evaluations, its defining
    flags (`base`, by default the paper's sum-of-max line, with `flags` on top), the encoder,
    the losses."""
    os.makedirs(folder, exist_ok=True)
    model = os.path.join(folder, name + ".pt")
    test = None
    if test_epoch is not None:
        test = entry(test_epoch, val[test_epoch - 1][0] - 4, val[test_epoch - 1][1] - 4, k)
    argv = merge((base or retriever_flags("sum_max", 50)) + ["--k", str(k)], list(flags))
    results = {"k": k, "val": [entry(i + 1, r, a, k) for i, (r, a) in enumerate(val)],
               "test": test, "script": "main_retriever",
               "args": defining(main_retriever, argv), "encoder": encoder,
               "losses": losses or []}
    with open(model + ".results.json", "w") as f:
        json.dump(results, f)
    return model


def reranker_run(folder, name, flags, macro_test, encoder=BERT_BASE):
    os.makedirs(folder, exist_ok=True)
    model = os.path.join(folder, name + ".pt")
    acc = {"acc_unorm": macro_test, "acc_norm": macro_test + 10}
    test = {"epoch": 1, **acc, "macro": acc, "micro": acc,
            "per_world": {"lego": {**acc, "correct": 5, "kept": 8, "mentions": 10}}}
    with open(model + ".results.json", "w") as f:
        json.dump({"eval_method": "macro", "val": [{**test}], "test": test,
                   "script": "main_reranker",
                   "args": defining(main_reranker, merge(RERANKER, list(flags))),
                   "encoder": encoder}, f)
    return model


def table_rows(out):
    return {line.split(" | ")[0][2:]: line.split(" | ")
            for line in out.splitlines() if line.startswith("| ")}


def test_the_kept_epoch_follows_the_runs_eval_criterion(tmp_path, capsys):
    # epoch 1 is best by recall, epoch 2 by accuracy; the run chose by accuracy
    val = [(95.0, 50.0), (93.0, 60.0)]
    retriever_run(str(tmp_path), "by_accuracy", ["--eval_criterion", "accuracy"], val,
                  test_epoch=2)
    retriever_run(str(tmp_path), "by_recall", [], val, test_epoch=1)
    # interrupted before test: the criterion comes from the run's recorded flags
    retriever_run(str(tmp_path), "by_accuracy_unfinished", ["--eval_criterion", "accuracy"], val)
    report.main([str(tmp_path)])
    rows = table_rows(capsys.readouterr().out)
    name = os.path.basename(str(tmp_path))
    assert rows[f"{name}/by_accuracy.pt"][1:4] == ["1", "64", "93.00"]  # n, k, val of epoch 2
    assert rows[f"{name}/by_recall.pt"][3] == "95.00"
    assert rows[f"{name}/by_accuracy_unfinished.pt"][3] == "93.00"


def test_paper_tables_put_each_run_beside_the_paper(tmp_path, capsys):
    folder = str(tmp_path)
    retriever_run(folder, "main", [], [(93.0, 60.0), (94.0, 61.0)], test_epoch=2)  # test 90.00
    retriever_run(folder, "dual_p100", retriever_flags("dual", 100), [(92.5, 55.0)],
                  test_epoch=1)
    retriever_run(folder, "multi_small", retriever_flags("multi_vector", 0)
                  + ["--num_entity_vecs", "4"], [(90.0, 50.0)], test_epoch=1, k=8)
    retriever_run(folder, "hard_sampled", ["--type_cands", "hard_negative"], [(90.0, 50.0)],
                  test_epoch=1)
    reranker_run(folder, "reranker", [], 60.0)
    report.main([folder, "--paper"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    main = next(line for line in lines if "test recall@64" in line and "sum-of-max" in line)
    assert main.split(" | ")[1:] == ["89.62", "90.00 (n = 1)", "+0.38 |"]
    val_main = next(line for line in lines if line.startswith("| the same, val recall@64"))
    assert "| 94.66 | 94.00 (n = 1) | -0.66 |" in val_main
    dual = next(line for line in lines if line.startswith("| dual |"))
    cells = dual.split(" | ")
    assert cells[1:5] == [f"– / {p:.2f} (–)" for p in (91.08, 92.18, 91.75, 92.24)]
    assert cells[5] == "92.50 (n = 1) / 92.05 (+0.45) |"
    multi = next(line for line in lines if line.startswith("| multi-vector (8) |"))
    assert multi.split(" | ")[1] == "90.00 (n = 1) [1] / 91.13 (–)"  # another k: no difference
    assert "--k 8, not 64" in out and "--num_entity_vecs 4, not 8" in out
    sum_max = next(line for line in lines if line.startswith("| sum-of-max |"))
    assert sum_max.split(" | ")[3] == "94.00 (n = 1) / 94.66 (-0.66)"
    base = next(line for line in lines if "bert-base" in line)
    assert base.split(" | ")[1:] == ["61.34 (BLINK cross-encoder)", "60.00 (n = 1)", "-1.34 |"]
    large = next(line for line in lines if "bert-large" in line)
    assert large.split(" | ")[2:] == ["–", "– |"]
    assert "Runs outside the paper's tables:" in out and "hard_sampled" in out
    assert "[" not in main + val_main + base  # the paper's setting exactly: no note


def notes_of(out):
    return [line for line in out.splitlines() if line.startswith("[")]


def test_paper_notes_every_way_a_run_differs_from_the_papers_setting(tmp_path, capsys):
    """A tiny-BERT reranker is never filed as bert-base without a note; L, C, epochs,
    --simpleoptim and any other defining flag are noted against the recipe's command line, the
    encoder against bert-base-uncased; flags the run's mode ignores and the seed are not."""
    folder = str(tmp_path)
    reranker_run(folder, "tiny", ["--L", "32", "--C", "4", "--epochs", "1", "--simpleoptim",
                                  "--weight_decay", "0.5"], 40.0, encoder=TINY_BERT)
    retriever_run(folder, "main", ["--epochs", "1", "--seed", "3", "--lr", "1e-3"],
                  [(50.0, 20.0)], test_epoch=1, encoder=dict(BERT_BASE, name="/models/bert"))
    retriever_run(folder, "dual_p0", retriever_flags("dual", 0), [(50.0, 20.0)], test_epoch=1,
                  encoder=None)
    report.main([folder, "--paper"])
    out = capsys.readouterr().out
    base = next(line for line in out.splitlines() if line.startswith("| cross-encoder, bert-base"))
    assert base.split(" | ")[2] == "40.00 (n = 1) [1]"
    linking_note = notes_of(out.split("### Linking")[1])[0]
    for note in ("--L 32, not 256", "--C 4, not 64", "--epochs 1, not 3", "--simpleoptim on, not off",
                 "encoder /runs/toy/bert (bert, 64 hidden, 2 layers, 1201 pieces), not "
                 "bert-base-uncased (bert, 768 hidden, 12 layers, 30522 pieces)"):
        assert note in linking_note, linking_note
    assert "--weight_decay" not in linking_note  # --simpleoptim ignores it (and says so)
    main_note = notes_of(out.split("### Main")[1].split("###")[0])[0]
    assert "--epochs 1, not 4" in main_note and "--lr 0.001, not 1e-05" in main_note
    assert "encoder /models/bert (of bert-base-uncased's shape)" in main_note
    assert "--seed" not in out
    appendix = out.split("### Appendix")[1].split("###")[0]
    dual_note = notes_of(appendix)[0]
    assert dual_note.endswith("dual_p0.pt: encoder not recorded (the paper's: bert-base-uncased)")


def test_seeds_are_one_row_with_mean_sd_and_n(tmp_path, capsys):
    """The runs of seed1/, seed2/, seed3/ of one sweep that differ only by --seed are one row:
    every cell the mean ± the sample standard deviation, and n; in --paper every cell says n."""
    sweep = tmp_path / "sweep"
    tests, vals = [90.0, 91.0, 95.0], [93.0, 94.0, 97.0]
    for seed, (v, t) in enumerate(zip(vals, tests), 1):
        retriever_run(str(sweep / f"seed{seed}"), "dual_p0",
                      retriever_flags("dual", 0) + ["--seed", str(seed)], [(v, 50.0 + seed)],
                      test_epoch=1)
        # the same setting at one seed elsewhere: its own row
    retriever_run(str(tmp_path / "alone"), "dual_p0", retriever_flags("dual", 0), [(80.0, 40.0)],
                  test_epoch=1)
    # another flag than --seed: not pooled with the seeds
    retriever_run(str(sweep / "seed4"), "dual_p0", retriever_flags("dual", 0)
                  + ["--seed", "4", "--lr", "1e-3"], [(10.0, 5.0)], test_epoch=1)
    report.main([str(tmp_path)])
    rows = table_rows(capsys.readouterr().out)
    mean, sd = statistics.fmean(vals), statistics.stdev(vals)
    row = rows["sweep/dual_p0.pt (seeds 1, 2, 3)"]
    assert row[1] == "3" and row[3] == f"{mean:.2f} ± {sd:.2f}"
    tested = [t - 4 for t in vals]  # the test entry: val - 4
    assert row[4] == f"{statistics.fmean(tested):.2f} ± {statistics.stdev(tested):.2f}"
    assert rows["alone/dual_p0.pt"][1:4] == ["1", "64", "80.00"]
    assert rows["seed4/dual_p0.pt"][3] == "10.00"

    report.main([str(sweep / f"seed{s}") for s in (1, 2, 3)] + [str(tmp_path / "alone"),
                                                                 "--paper"])
    out = capsys.readouterr().out
    dual = next(line for line in out.splitlines() if line.startswith("| dual |"))
    everything = vals + [80.0]  # the cell pools every run of its setting
    assert dual.split(" | ")[1] == (f"{statistics.fmean(everything):.2f} ± "
                                    f"{statistics.stdev(everything):.2f} (n = 4) [1] / 91.08 "
                                    f"({statistics.fmean(everything) - 91.08:+.2f})")
    assert "[1] sweep/dual_p0.pt (seeds 1, 2, 3), alone/dual_p0.pt" in out


def test_flags_come_from_the_record_when_the_results_lack_them(tmp_path, capsys):
    """A results file without "args" is placed by the flags its folder's record holds for it
    (what run_safety recorded when the run wrote it); one that neither says is left out of the
    paper's tables, and the report says why."""
    model = retriever_run(str(tmp_path / "recorded"), "main", [], [(93.0, 60.0)], test_epoch=1)
    with open(model + ".results.json") as f:
        results = json.load(f)
    flags = results.pop("args")
    outputs = Outputs("main_retriever", overwrite=True)
    outputs.add(model + ".results.json", "--model", "results")
    outputs.claim({"tool": "main_retriever", "flags": flags, "inputs": {}})
    outputs.write_json(results, model + ".results.json")
    bare = retriever_run(str(tmp_path / "bare"), "main", [], [(50.0, 10.0)], test_epoch=1)
    with open(bare + ".results.json") as f:
        results = json.load(f)
    results.pop("args")
    with open(bare + ".results.json", "w") as f:
        json.dump(results, f)
    report.main([str(tmp_path), "--paper"])
    out = capsys.readouterr().out
    main = next(line for line in out.splitlines() if "test recall@64" in line and "sum-of-max"
                in line)
    assert main.split(" | ")[2] == "89.00 (n = 1)"
    assert "Runs outside the paper's tables: bare/main.pt (its flags are not recorded)" in out


@pytest.mark.skipif("in_batch" not in main_retriever.build_parser()._option_string_actions[
    "--type_cands"].choices, reason="--type_cands in_batch is not in main_retriever.py yet")
def test_blink_recipe_runs_sit_beside_blinks_number(tmp_path, capsys):
    from recipe import BLINK
    retriever_run(str(tmp_path), "blink", [], [(85.0, 40.0)], test_epoch=1, base=BLINK,
                  encoder=dict(BERT_BASE, name="bert-large-uncased", hidden_size=1024,
                               num_hidden_layers=24))
    report.main([str(tmp_path), "--paper"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "BLINK bi-encoder" in line)
    assert row.split(" | ")[1:] == ["82.06", "81.00 (n = 1)", "-1.06 |"]


@pytest.mark.parametrize("seeds", [1, 3])
def test_plot_writes_the_figures_with_the_spread(tmp_path, capsys, seeds):
    pytest.importorskip("matplotlib")
    runs = tmp_path / "runs"
    for seed in range(1, seeds + 1):
        folder = runs / (f"seed{seed}" if seeds > 1 else "")
        retriever_run(str(folder), "main", ["--seed", str(seed)],
                      [(93.0 + seed, 60.0), (94.0, 61.0)], test_epoch=2,
                      losses=[2.0, 1.5, 1.2 + seed / 10])
        reranker_run(str(folder), "reranker", ["--seed", str(seed)], 60.0 + seed)
    figures = tmp_path / "figures"
    report.main([str(runs), "--plot", str(figures)])
    names = sorted(os.listdir(figures))
    assert names == [".hard-nce-el.record", "test_per_world.png", "training_loss.png",
                     "val_per_epoch.png"]
    for name in names[1:]:
        with open(figures / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report.main([str(runs), "--plot", str(figures)])  # an earlier report's figures: replaced


def test_per_epoch_is_the_mean_and_sd_over_seeds():
    class R:
        def __init__(self, val):
            self.obj = {"val": [{"epoch": e, "x": v} for e, v in val]}
    epochs, means, sds = report.per_epoch([R([(1, 1.0), (2, 4.0)]), R([(1, 3.0)])], "x")
    assert epochs == [1, 2] and means == [2.0, 4.0]
    assert sds == pytest.approx([statistics.stdev([1.0, 3.0]), 0.0])


def test_plot_without_matplotlib_is_one_line(tmp_path, capfd, monkeypatch):
    retriever_run(str(tmp_path / "runs"), "main", [], [(93.0, 60.0)], test_epoch=1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    before = tree(tmp_path)
    code, lines, out = run_in_process("report.py", [str(tmp_path / "runs"), "--plot",
                                                    str(tmp_path / "figures")], capfd)
    assert_refused(code, lines, ["matplotlib"], [tmp_path], [before])
    assert out == ""


def utf16(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-16") as f:
        f.write(text)


def edit(key, value):
    """A change to a results file: results[key] = value (None: removed)."""
    def change(path):
        with open(path) as f:
            obj = json.load(f)
        if value is None:
            obj.pop(key)
        else:
            obj[key] = value
        with open(path, "w") as f:
            json.dump(obj, f)
    return change


def no_epoch(path):
    with open(path) as f:
        obj = json.load(f)
    for e in obj["val"]:
        e.pop("epoch")
    with open(path, "w") as f:
        json.dump(obj, f)


def write(name, content):
    """A file `name` beside the results, with `content` (bytes or a JSON value)."""
    def make(path):
        target = os.path.join(os.path.dirname(path), name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(content if isinstance(content, bytes) else json.dumps(content).encode())
    return make


DEMO_SUMMARY = {"comparison": {"seeds": 2, "mean_gain": 10.0, "gain_interval_95": [-2.7, 22.7],
                               "arms": {
    "random": {"recall@1_per_seed": [50.0, 52.0], "recall@1": 51.0},
    "mixed": {"recall@1_per_seed": [60.0, 62.0], "recall@1": 61.0}}},
    "pipeline": {"rows": [["w", 90.0, 60.0, 70.0, 80.0]]}, "reranker_encoder_kind": "MiniLM"}

# A mistake in the inputs (a change to a retriever's results file, or a file beside it), the
# flags after the folder, and the words of the one line. Nothing is printed or written before it.
REFUSED = [
    (utf16, [], ["main.pt.results.json", "UTF-8"]),
    (no_epoch, [], ["main.pt.results.json", "val[0] has no epoch"]),
    (no_epoch, ["--plot", "{tmp}/figures"], ["val[0] has no epoch"]),
    (edit("val", {"epoch": 1}), [], ["val is not a list"]),
    (edit("k", "64"), [], ["k is not a positive integer"]),
    (edit("k", 0), [], ["k is not a positive integer"]),
    (edit("test", 90.0), [], ["test is not an object"]),
    (edit("test", {"epoch": 1, "recall@64": "high"}), [], ["test.recall@64 is not a number"]),
    (edit("test", {"epoch": 1, "per_world": [1, 2]}), [], ["test.per_world"]),
    (edit("test", {"epoch": 1, "per_world": {"lego": 5}}), [], ["test.per_world"]),
    (edit("losses", ["1.0"]), ["--plot", "{tmp}/figures"], ["losses is not a list of numbers"]),
    (edit("encoder", ["bert"]), ["--paper"], ["encoder is not an object"]),
    (edit("args", "--lr 1"), ["--paper"], ["args is not an object"]),
    (write("x.results.json", b'{"k": 64, "val": ['), [], ["x.results.json", "not a readable JSON"]),
    (write("recall.json", {"test": {"macro": [1], "micro": {}}}), [],
     ["recall.json", "not a candidates file", "test.macro"]),
    (write("recall.json", {"val": {"micro": {}}}), [], ["recall.json", "val.macro is missing"]),
    (write("r.results.json", {"eval_method": 3, "val": []}), [], ["not a linking file"]),
    (write("summary.json", dict(DEMO_SUMMARY, pipeline={"rows": [["w", 1.0]]})),
     ["--plot", "{tmp}/figures"], ["summary.json", "pipeline.rows"]),
    (write("summary.json", dict(DEMO_SUMMARY, comparison={"seeds": 2})),
     ["--plot", "{tmp}/figures"], ["summary.json", "not a summary of demo.py"]),
    (write("../figures", b"a file, not a folder"), ["--plot", "{tmp}/figures"],
     ["--plot", "is a file"]),
    (write("../figures/training_loss.png", b"\x89PNG the user's own"),
     ["--plot", "{tmp}/figures"], ["--plot", "training_loss.png", "--overwrite"]),
    (write("../figures/demo.png", b"\x89PNG the user's own"),
     ["--plot", "{tmp}/figures"], ["--plot", "demo.png", "--overwrite"]),
    (lambda path: None, ["--plot", "{tmp}/figures", "--no_such_flag"], ["--no_such_flag"]),
]


@pytest.mark.parametrize("change, flags, words", REFUSED,
                         ids=[f"{i}-{' '.join(r[2])}" for i, r in enumerate(REFUSED)])
def test_mistakes_are_refused_before_any_output(change, flags, words, tmp_path, capfd):
    runs = tmp_path / "runs"
    model = retriever_run(str(runs), "main", [], [(93.0, 60.0)], test_epoch=1, losses=[1.0])
    with open(runs / "summary.json", "w") as f:  # the demo's, good: its figure is planned
        json.dump(DEMO_SUMMARY, f)
    change(model + ".results.json")
    before = tree(tmp_path)
    code, lines, out = run_in_process(
        "report.py", [str(runs)] + [f.format(tmp=tmp_path) for f in flags], capfd)
    assert_refused(code, lines, words, [tmp_path], [before])
    assert out == ""


def test_a_users_png_is_replaced_only_with_overwrite(tmp_path, capfd):
    pytest.importorskip("matplotlib")
    runs, figures = tmp_path / "runs", tmp_path / "figures"
    retriever_run(str(runs), "main", [], [(93.0, 60.0)], test_epoch=1)
    figures.mkdir()
    (figures / "val_per_epoch.png").write_bytes(b"the user's own")
    (figures / "notes.txt").write_text("kept")
    before = tree(tmp_path)
    code, lines, _ = run_in_process("report.py", [str(runs), "--plot", str(figures)], capfd)
    assert_refused(code, lines, ["val_per_epoch.png", "--overwrite"], [tmp_path], [before])
    code, _, _ = run_in_process("report.py", [str(runs), "--plot", str(figures), "--overwrite"],
                                capfd)
    assert code == 0 and (figures / "val_per_epoch.png").read_bytes()[:4] == b"\x89PNG"
    assert (figures / "notes.txt").read_text() == "kept"


def test_files_of_no_known_kind_and_foreign_summaries_are_left_out(tmp_path, capsys):
    """A JSON file of another structure named recall.json, and a summary.json that is not the
    demo's (no comparison, or not even UTF-8 JSON), are not this project's results: left out."""
    runs = tmp_path / "runs"
    retriever_run(str(runs), "main", [], [(93.0, 60.0)], test_epoch=1)
    (runs / "recall.json").write_text(json.dumps(["a", "list"]))
    (runs / "summary.json").write_bytes("{'not': 'json'}".encode("utf-16"))
    (runs / "other").mkdir()
    (runs / "other" / "summary.json").write_text(json.dumps({"loss": 1.0}))
    report.main([str(runs)])
    assert "runs/main.pt" in capsys.readouterr().out
    assert report.demo_summaries([str(runs)]) == []

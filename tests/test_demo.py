"""The demo: its world of confusable siblings, its summary's paired gain and interval, its figure,
its user errors, and (slow) the whole `demo.py` run showing mixed hard negatives ahead."""
import filecmp
import json
import os
import signal
import statistics
from collections import Counter, defaultdict

import pytest

import demo
from conftest import (assert_refused, leftovers, run_in_process, run_script, start_script, tree,
                      wait_for)
from run_safety import Outputs
from data_loader import Zeshel
from toy_world import DEMO_WORLDS, make_demo_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_world")
    data, bert = make_demo_world(str(out))
    return data, bert, Zeshel(data)


def test_every_name_has_four_bearers_of_different_kinds(world):
    data, _, z = world
    for split, worlds in DEMO_WORLDS.items():
        for w in worlds:
            docs = z.documents[w]
            assert len(docs) == 128
            names = Counter(d["title"].split(" (")[0] for d in docs.values())
            assert set(names.values()) == {4}
            kinds = defaultdict(set)
            for d in docs.values():
                name, kind = d["title"][:-1].split(" (")
                kinds[name].add(kind)
            assert all(len(k) == 4 for k in kinds.values())


def test_a_mention_names_its_kind_and_two_siblings_kinds(world):
    """Right before the name the gold's kind; further left the kinds of two of its siblings, so
    the words a mention shares with an entity do not single out the gold."""
    _, _, z = world
    mentions = z.mentions["test"]
    assert len(mentions) == 768
    for m in mentions:
        docs = z.documents[m["corpus"]]
        gold = docs[m["label_document_id"]]
        name, kind = gold["title"][:-1].split(" (")
        words = z.context_tokens(m)
        s = m["start_index"]
        assert words[s] == m["text"] == name
        assert words[s - 1] == kind
        sibling_kinds = {d["title"][:-1].split(" (")[1] for d in docs.values()
                         if d["title"].startswith(name + " (") and d is not gold}
        assert {words[s - 5], words[s - 3]} < sibling_kinds


def test_random_negatives_are_rarely_siblings(world):
    """Of a train mention's 255 wrong entities 3 share its name (its siblings): a random negative
    is a sibling about 1 time in 85, while the top-scoring wrong ones (hard negatives) are them."""
    _, _, z = world
    assert len(z.entities("train")) == 256
    names = Counter((w, d["title"].split(" (")[0]) for w in DEMO_WORLDS["train"]
                    for d in z.documents[w].values())
    assert len(names) == 64 and set(names.values()) == {4}
    for m in z.mentions["train"]:
        assert names[m["corpus"], m["text"]] == 4


def test_the_demo_world_is_deterministic(world, tmp_path):
    data, _, _ = world
    again, _ = make_demo_world(str(tmp_path))
    for sub in ("documents", "mentions"):
        a, b = os.path.join(data, sub), os.path.join(again, sub)
        files = sorted(n for n in os.listdir(a) if n.endswith(".json"))
        assert files == sorted(n for n in os.listdir(b) if n.endswith(".json"))
        match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
        assert mismatch == [] and errors == []


def results(r1s, rks):
    return [{"test": {"accuracy": a, f"recall@{demo.K}": k}} for a, k in zip(r1s, rks)]


def test_comparison_paired_gain_and_its_interval():
    c = demo.comparison({"random": results([74.0, 79.5, 74.25], [99, 99, 99]),
                         "mixed": results([91.25, 88.75, 89.0], [100, 100, 100])})
    gains = [17.25, 9.25, 14.75]
    assert c["difference_per_seed"] == pytest.approx(gains)
    assert c["mean_gain"] == pytest.approx(41.25 / 3)
    sd = (sum((g - 41.25 / 3) ** 2 for g in gains) / 2) ** 0.5        # brute force, n - 1
    assert c["gain_sd"] == pytest.approx(sd)
    half = 4.303 * sd / 3 ** 0.5                                     # t(0.975, 2 df)
    assert c["gain_interval_95"] == pytest.approx([41.25 / 3 - half, 41.25 / 3 + half])
    assert c["seeds_mixed_ahead"] == 3 and c["mixed_ahead"]            # 13.75 - 10.20 > 0
    table = demo.comparison_table(c)
    assert "| 2 | 79.50 | 88.75 | +9.25 |" in table
    assert f"| mean ± sd | 75.92 ± {statistics.stdev([74.0, 79.5, 74.25]):.2f} |" in table
    assert "over 3 seeds; ahead at 3 of 3 seeds" in demo.verdict(c)


def test_comparison_says_when_mixed_is_not_ahead():
    c = demo.comparison({"random": results([80.0, 70.0], [99, 99]),
                         "mixed": results([85.0, 69.0], [99, 99])})
    assert c["seeds_mixed_ahead"] == 1 and not c["mixed_ahead"]
    # ahead at every seed, but the gain moves too much for 3 seeds to place it above zero
    c = demo.comparison({"random": results([80.0, 70.0, 75.0], [99, 99, 99]),
                         "mixed": results([81.0, 90.0, 76.0], [99, 99, 99])})
    assert c["seeds_mixed_ahead"] == 3 and not c["mixed_ahead"]
    assert c["gain_interval_95"][0] < 0 < c["mean_gain"]
    assert demo.verdict(c).startswith("NOT ahead beyond seed noise: mean gain +7.33 points")
    with pytest.raises(ValueError):
        demo.comparison({"random": results([80.0], [99]), "mixed": results([85.0], [99])})


def test_figure(tmp_path):
    pytest.importorskip("matplotlib")
    c = demo.comparison({"random": results([74.0, 79.5, 74.25], [99, 99, 99]),
                         "mixed": results([91.25, 88.75, 89.0], [100, 100, 100])})
    rows = [["w1", 99.0, 90.0, 98.0, 99.0], ["w2", 100.0, 94.0, 97.0, 97.0],
            ["macro average", 99.5, 92.0, 97.5, 98.0]]
    summary = {"comparison": c, "pipeline": {"rows": rows}, "reranker_encoder_kind": "MiniLM"}
    assert demo.summary_problem(summary) is None
    outputs = Outputs("demo", flag="--out")
    outputs.add(str(tmp_path / "demo.png"))
    path = demo.plot(summary, str(tmp_path / "demo.png"), outputs)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--pretrained", "/no/such/folder"], "error: --pretrained: /no/such/folder is not a folder (a "
                                         "local encoder folder: BERT, RoBERTa, ...)"),
    (["--seeds", "3"], "error: unrecognized arguments: --seeds 3"),
])
def test_user_errors_are_one_line(tmp_path, args, message, capfd):
    code, lines, _ = run_in_process("demo.py", ["--out", str(tmp_path / "d"), *args], capfd)
    assert assert_refused(code, lines, [], [tmp_path], [{}]) == message


def tiny_model(folder, kind):
    """A tiny random model of `kind` saved in `folder` (its weights and config, no tokenizer
    files), as a user's --pretrained folder might hold one."""
    import transformers
    configs = {"gpt2": transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64),
               "t5": transformers.T5Config(num_layers=1, d_model=16, d_ff=32, num_heads=2,
                                           d_kv=8, vocab_size=64),
               "bert": transformers.BertConfig(num_hidden_layers=1, hidden_size=16,
                                               num_attention_heads=2, intermediate_size=32,
                                               vocab_size=64)}
    model = transformers.AutoModel.from_config(configs[kind])
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, words", [
    ("gpt2", ["--pretrained", "gpt2", "decoder"]),
    ("t5", ["--pretrained", "t5", "encoder-decoder"]),
    ("bert", ["--pretrained", "tokenizer"]),  # no tokenizer files: cannot serve
])
def test_a_pretrained_that_cannot_serve_is_refused_before_any_work(kind, words, tmp_path, capfd):
    """demo.py --pretrained naming a decoder, an encoder-decoder or a folder the reranker could
    not load stops in one line before the demo makes anything (its world, its runs)."""
    folder = tiny_model(str(tmp_path / "model"), kind)
    before = tree(tmp_path)
    code, lines, _ = run_in_process("demo.py", ["--out", str(tmp_path / "d"), "--pretrained",
                                                folder], capfd)
    assert_refused(code, lines, words, [tmp_path], [before])


def test_an_encoder_that_serves_passes_the_check(world):
    _, bert, _ = world
    demo.check_reranker_encoder(bert)  # no error: the demo world's tiny BERT serves


def test_files_in_out_that_the_demo_did_not_write_are_refused_before_any_work(tmp_path, capfd):
    out = tmp_path / "d"
    for name in ("summary.json", "demo.png", "compare/mixed_seed2.pt.results.json",
                 "world/data/mentions/train.json"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("the user's own")
        before = tree(tmp_path)
        code, lines, _ = run_in_process("demo.py", ["--out", str(out)], capfd)
        assert_refused(code, lines, [os.path.basename(name), "--overwrite"], [tmp_path],
                       [before])
        (out / name).unlink()


@pytest.mark.slow
def test_demo_shows_mixed_hard_negatives_ahead(tmp_path):
    """The whole demo (about 3 minutes on 2 cores): mixed ahead of random over 10 seeds, the 95%
    interval of the mean paired gain above zero; the pipeline's reranker above the retriever's
    top-1."""
    out = run_script("demo.py", "--out", tmp_path / "demo", "--quiet", timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / "demo" / "summary.json") as f:
        s = json.load(f)
    c = s["comparison"]
    assert c["seeds"] == demo.SEEDS == 10 and len(c["difference_per_seed"]) == 10
    assert s["mixed_ahead"] and s["gain_interval_95"][0] > 0 and s["mean_gain"] > 5
    assert s["reranker_acc_unorm"] > s["retriever_top1"]
    assert "mixed - random" in out.stdout and "$ python main_retriever.py" in out.stdout
    assert "ahead: mean gain +" in out.stdout


def test_report_plot_draws_the_demos_figure(tmp_path):
    """`report.py DEMO_DIR --plot FIG` draws the demo's figure from its summary.json beside the
    usual ones."""
    pytest.importorskip("matplotlib")
    import report
    c = demo.comparison({"random": results([74.0, 79.5, 74.25], [99, 99, 99]),
                         "mixed": results([91.25, 88.75, 89.0], [100, 100, 100])})
    rows = [["w1", 99.0, 90.0, 98.0, 99.0], ["macro average", 99.0, 90.0, 98.0, 99.0]]
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    with open(run_dir / "summary.json", "w") as f:
        json.dump({"comparison": c, "pipeline": {"rows": rows},
                   "reranker_encoder_kind": "MiniLM"}, f)
    with open(run_dir / "m.pt.results.json", "w") as f:  # a retriever run, for the usual figures
        json.dump({"k": 4, "val": [{"epoch": 1, "recall@4": 99.0, "accuracy": 90.0}],
                   "test": {"epoch": 1, "recall@4": 99.0, "accuracy": 90.0,
                            "per_world": {}}}, f)
    report.main([str(run_dir), "--plot", str(tmp_path / "fig")])
    assert "demo.png" in os.listdir(tmp_path / "fig")
    with open(tmp_path / "fig" / "demo.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def children(pid):
    """The process ids of `pid`'s children (Linux /proc)."""
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_to_the_demo_stops_its_runs_and_leaves_nothing_training(tmp_path, signum):
    """SIGTERM (a scheduler) or SIGHUP (a closed terminal) to demo.py alone, while its two
    retrievers train: both are passed the signal and stop after the file they are writing; the
    demo waits for them and ends in one line, status 128 + the signal; no process is left, no
    lock and no temporary file."""
    out = tmp_path / "demo"
    proc = start_script("demo.py", "--out", out, "--quiet")
    logs = [out / "compare" / f"{arm}_seed1.pt.log" for arm in demo.NEGATIVES]
    wait_for(proc, lambda: all(p.exists() for p in logs), "the two runs of seed 1", timeout=600)
    running = children(proc.pid)
    assert len(running) == 2, running
    proc.send_signal(signum)
    err = proc.communicate(timeout=600)[1]
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"stopped by {name}: the demo's runs were stopped "
                                           f"after the files they were writing; run the demo "
                                           f"again for a fresh one")
    assert "Traceback" not in err and err.count(f"stopped by {name}") == 3  # the runs' and its
    for pid in running:
        assert not os.path.exists(f"/proc/{pid}"), f"run {pid} is still there"
    assert not leftovers(out), leftovers(out)

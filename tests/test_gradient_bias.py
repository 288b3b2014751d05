"""The synthetic gradient-bias experiment (docs/DESIGN.md#gradient-bias): vectorised NCE vs the
per-label loop, the paper's finding on a small configuration, the command line and the figures."""
import json
import pickle
import sys

import pytest
import torch

from conftest import assert_refused, run_in_process, run_script, tree
from gradient_bias import (LogitScorer, MLPScorer, draw_negatives, entropy, gradient, main,
                           nce_loss, nce_loss_loop, outputs, parse_args, plot, population, run)

SMALL = ["--num_labels", "100", "--dim", "64", "--lr", "0.01", "--seed", "2", "--quiet"]


def test_distinct_negatives_exclude_the_gold():
    torch.manual_seed(0)
    gold = torch.tensor([0, 3, 5])
    negatives = draw_negatives(torch.rand(6), gold, 5, 50, replacement=False)
    assert negatives.shape == (3, 50, 5)
    assert not (negatives == gold.view(3, 1, 1)).any()
    # 5 distinct negatives out of 5 non-gold labels: all of them
    assert (negatives.sort(-1).values == torch.tensor([[1, 2, 3, 4, 5], [0, 1, 2, 4, 5],
                                                       [0, 1, 2, 3, 4]]).unsqueeze(1)).all()


@pytest.mark.parametrize("replacement", [False, True])
def test_draw_negatives_follow_the_weights(replacement):
    """Without replacement the gold's weight is zeroed (one negative: drawn from the others in
    proportion); with replacement, as the original, q itself is sampled, the gold included."""
    torch.manual_seed(0)
    weights = torch.tensor([1.0, 0.0, 3.0, 6.0])
    negatives = draw_negatives(weights, torch.tensor([0]), 1, 20000, replacement=replacement)
    share = torch.bincount(negatives.view(-1), minlength=4).float() / 20000
    expected = torch.tensor([0.1, 0.0, 0.3, 0.6]) if replacement else torch.tensor([0, 0, 1, 2]) / 3
    assert share[1] == 0 and (share[0] == 0) is not replacement
    torch.testing.assert_close(share, expected, atol=0.015, rtol=0)


def test_a_negative_that_is_the_gold_is_masked():
    """--replacement (the original's sampling): negatives drawn as the gold drop out of the NCE
    softmax, so a draw of nothing but the gold costs nothing and one with a single other label
    is the two-way softmax; the per-label loop agrees."""
    logits = torch.tensor([2.0, 0.5, -1.0], requires_grad=True)
    p, gold = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0])
    only_gold = torch.zeros(1, 1, 3, dtype=torch.long)
    assert nce_loss(logits, p, gold, only_gold).item() == 0.0
    one_other = torch.tensor([[[0, 2, 0]]])
    two_way = -torch.log_softmax(torch.tensor([2.0, -1.0]), 0)[0]
    torch.testing.assert_close(nce_loss(logits, p, gold, one_other), two_way)
    torch.testing.assert_close(nce_loss_loop(logits, p, gold, one_other), two_way)
    assert torch.isfinite(gradient(nce_loss(logits, p, gold, only_gold), [logits])).all()


@pytest.mark.parametrize("replacement", [False, True])
def test_vectorised_nce_equals_the_per_label_loop(replacement):
    torch.manual_seed(0)
    p = population(30, 20, 0.2)
    gold = p.nonzero().view(-1)
    model = MLPScorer(30, 16)
    params = list(model.parameters())
    logits = model()
    for weights in [torch.ones(30), logits.detach().softmax(0)]:  # random and hard negatives
        negatives = draw_negatives(weights, gold, 4, 7, replacement)
        fast, slow = nce_loss(logits, p, gold, negatives), nce_loss_loop(logits, p, gold, negatives)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gradient(fast, params), gradient(slow, params),
                                   rtol=1e-4, atol=1e-6)


def test_labels_outside_the_support_add_nothing():
    torch.manual_seed(0)
    p = population(30, 5, 0.5)
    assert p.nonzero().view(-1).tolist() == [0, 1, 2, 3, 4]  # the first 5, as the original
    logits = torch.randn(30)
    everyone, support = torch.arange(30), p.nonzero().view(-1)
    negatives = draw_negatives(torch.ones(30), everyone, 3, 4, replacement=False)
    torch.testing.assert_close(nce_loss(logits, p, everyone, negatives),
                               nce_loss(logits, p, support, negatives[support]))


def test_reference_loop_agrees_during_a_run():
    result = run(parse_args(SMALL + ["--steps", "3", "--reference_loop"]))  # asserts agreement
    assert result["seconds"]["speedup"] > 1


def test_small_run_shows_the_papers_finding():
    result = run(parse_args(SMALL))
    assert result["entropy"] > 0.3  # a population that is not a single label
    last, first = result["records"][-1], result["records"][0]
    assert last["xent"] < first["xent"] - 2  # the model learned
    assert last["diff_hard"] < 0.01 * last["diff_rand"]
    assert last["diff_rand"] > 1
    assert abs(last["hard"] - last["xent"]) < 0.05 < abs(last["rand"] - last["xent"])


def test_main_writes_json_pickle_and_table(tmp_path, capsys):
    out, pickled = tmp_path / "bias.json", tmp_path / "bias.pkl"
    main([a for a in SMALL if a != "--quiet"] + ["--steps", "2", "--out", str(out),
                                                  "--pickle", str(pickled)])
    result = json.loads(out.read_text())
    assert len(result["records"]) == 2
    assert list(result["records"][0]) == ["loss_avg", "xent", "rand", "hard", "diff_rand",
                                          "diff_hard"]
    assert result["entropy"] == pytest.approx(entropy(population_of(result)))
    with open(pickled, "rb") as f:  # --pickle: the original's layout, the same numbers
        assert pickle.load(f) == (result["entropy"], result["records"])
    printed = capsys.readouterr().out
    assert "diff_hard" in printed and "entropy" in printed
    # no temporary file; the record of --out (the pickle is known by its content)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hard-nce-el.record", "bias.json",
                                                          "bias.pkl"]


def test_loss_avg_is_the_steps_loss(monkeypatch):
    """As the original, each record's loss_avg is that step's training batch loss."""
    import gradient_bias
    losses, cross_entropy = [], gradient_bias.F.cross_entropy

    def spy(*args, **kwargs):
        losses.append(cross_entropy(*args, **kwargs).item())
        return cross_entropy(*args, **kwargs)
    monkeypatch.setattr(gradient_bias.F, "cross_entropy", spy)
    result = run(parse_args(SMALL + ["--steps", "3"]))
    assert [r["loss_avg"] for r in result["records"]] == losses and len(set(losses)) == 3


def test_dim_minus_one_trains_free_logits_from_a_standard_normal():
    torch.manual_seed(0)
    z = LogitScorer(20000)().detach()
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03
    result = run(parse_args(SMALL + ["--dim", "-1", "--steps", "2"]))
    assert result["records"][0]["xent"] > 1  # a random logit vector, not the MLP
    assert {type(m) for m in [gradient_bias_model(["--dim", "-1"]), gradient_bias_model([])]} \
        == {LogitScorer, MLPScorer}


def gradient_bias_model(flags):
    from gradient_bias import make_model
    args = parse_args(flags)
    return make_model(args.num_labels, args.dim)


def population_of(result):
    torch.manual_seed(result["args"]["seed"])
    return population(result["args"]["num_labels"], result["args"]["support"],
                      result["args"]["temp"])


# A user's mistake in the flags: each row (argv, words of the one line). The run is refused
# before any work, in one line, with nothing written (the default --pickle included).
REFUSED = [
    (["--num_negatives", "-1"], ["--num_negatives"]),
    (["--num_labels", "10", "--num_negatives", "10"], ["--num_negatives"]),
    (["--support", "0"], ["--support"]),
    (["--support", "1001"], ["--support"]),
    (["--temp", "0"], ["--temp"]),
    (["--lr", "nan"], ["--lr"]),
    (["--monte_carlo", "0"], ["--monte_carlo"]),
    (["--dim", "0"], ["--dim"]),
    (["--dim", "-2"], ["--dim"]),
    (["--num_labels", "2e10"], ["--num_labels"]),
    # numeric ranges: torch's limits, float32's, the machine's
    (["--num_labels", str(2 ** 24 + 1)], ["--num_labels", "torch.multinomial"]),
    (["--num_labels", "20000000000"], ["--num_labels", "at most"]),
    (["--temp", "1e-300"], ["--temp", "float32"]),
    (["--temp", "1e39"], ["--temp", "float32"]),
    (["--lr", "1e300"], ["--lr", "float32"]),
    (["--lr", "-1e-3"], ["--lr"]),
    (["--threads", "100000000"], ["--threads", "cores"]),
    (["--seed", str(2 ** 64)], ["--seed"]),
    (["--steps", "0"], ["--steps"]),
    (["--batch_size", "0"], ["--batch_size"]),
    (["--num_labels", str(2 ** 24), "--dim", "100000"], ["--num_labels", "GiB"]),
    (["--num_labels", "100000", "--batch_size", "100000000"], ["--num_labels", "GiB"]),
    # a model that diverges: found at its first measurement, nothing written
    (["--lr", "1e30", "--steps", "2", "--out", "bias.json"], ["--lr", "diverged"]),
    # outputs: folders that cannot be made, one file named twice
    (["--out", "/dev/null/x.json"], ["--out", "/dev/null"]),
    (["--pickle", "/dev/null/x.pkl"], ["--pickle", "/dev/null"]),
    (["--plot", "/dev/null/figures"], ["--plot", "/dev/null"]),
    (["--out", "same", "--pickle", "same"], ["--pickle", "same", "--out"]),
    (["--out", "figs/gradient_bias_loss.png", "--plot", "figs"], ["--plot", "--out"]),
    (["--pickle", "bias.json", "--out", "./bias.json"], ["--pickle", "--out"]),
]


@pytest.mark.parametrize("argv, words", REFUSED, ids=[" ".join(r[0]) for r in REFUSED])
def test_mistakes_are_refused_in_one_line_with_nothing_written(argv, words, tmp_path,
                                                               monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # the default --pickle, cukes.p, would go here
    (tmp_path / "keep.txt").write_text("a user's file\n")
    before = tree(tmp_path)
    code, lines, _ = run_in_process("gradient_bias.py", SMALL + argv, capfd)
    assert_refused(code, lines, words, [tmp_path], [before])


@pytest.mark.parametrize("flag, name", [("--out", "bias.json"), ("--plot", "gradient_bias_loss.png")])
def test_a_file_this_script_did_not_write_is_not_replaced(flag, name, tmp_path, monkeypatch,
                                                        capfd):
    """A user's file where an output goes (--out, a figure of --plot) is refused unless
    --overwrite; an earlier run's file is replaced."""
    if flag == "--plot":
        pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    value = "." if flag == "--plot" else name
    (tmp_path / name).write_bytes(b"the user's own\n")
    before = tree(tmp_path)
    argv = SMALL + ["--steps", "1", "--pickle", "", flag, value]
    code, lines, _ = run_in_process("gradient_bias.py", argv, capfd)
    assert_refused(code, lines, [flag, name, "--overwrite"], [tmp_path], [before])
    assert run_in_process("gradient_bias.py", argv + ["--overwrite"], capfd)[0] == 0
    replaced = (tmp_path / name).read_bytes()
    assert replaced != b"the user's own\n"
    assert run_in_process("gradient_bias.py", argv[:-2] + ["--seed", "5", flag, value],
                          capfd)[0] == 0  # this script's file: replaced by another run
    assert (tmp_path / name).read_bytes() != replaced


def test_replacement_allows_many_negatives():
    args = parse_args(["--num_labels", "10", "--num_negatives", "20", "--replacement"])
    assert args.num_negatives == 20


@pytest.mark.parametrize("flags, replacement", [([], False), (["--replacement"], True)])
def test_replacement_flag_draws_with_replacement(flags, replacement, monkeypatch):
    """Without the flag every draw is without replacement (the published curves); with it, with."""
    import gradient_bias
    seen, draw = [], gradient_bias.draw_negatives

    def spy(*args):
        seen.append(args[-1])
        return draw(*args)
    monkeypatch.setattr(gradient_bias, "draw_negatives", spy)
    assert parse_args(flags).replacement is replacement
    run(parse_args(SMALL + ["--steps", "2"] + flags))
    assert seen and set(seen) == {replacement}


def test_quiet_prints_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --pickle, cukes.p, goes to the current folder
    main(SMALL + ["--steps", "1", "--out", str(tmp_path / "bias.json")])
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hard-nce-el.record", "bias.json",
                                                          "cukes.p"]


# The record keys the original's plot.py reads from the pickle (loss and bias figures)
PLOT_KEYS = {"xent", "hard", "rand", "diff_hard", "diff_rand"}


def test_default_pickle_has_the_originals_layout(tmp_path, monkeypatch):
    """As the original's main.py: with no --pickle, cukes.p in the current folder holds the
    pickled tuple (entropy of p, records), a float and a list of one dict per step with the keys
    its plot.py reads; the numbers are the JSON result's."""
    monkeypatch.chdir(tmp_path)
    main(SMALL + ["--steps", "3", "--out", "bias.json"])
    with open(tmp_path / "cukes.p", "rb") as f:
        loaded = pickle.load(f)
    result = json.loads((tmp_path / "bias.json").read_text())
    assert isinstance(loaded, tuple) and len(loaded) == 2
    entropy_pop, records = loaded
    assert isinstance(entropy_pop, float) and entropy_pop == result["entropy"]
    assert isinstance(records, list) and len(records) == 3
    assert all(isinstance(r, dict) and PLOT_KEYS <= set(r) for r in records)
    assert records == result["records"]


def test_pickle_never_replaces_a_file_of_something_else(tmp_path, monkeypatch, capfd):
    """An existing --pickle file that is not a pickle of this experiment (a user's file, a
    pickle of anything else) stops the run in one line before any work, and stays as it was; a
    pickle of an earlier run (or of the original's main.py: the same layout) is replaced, and no
    record is written beside it; --pickle '' writes none."""
    monkeypatch.chdir(tmp_path)
    for content in (b"my notes\n", pickle.dumps({"some": "dict"}), pickle.dumps(torch.zeros(2))):
        (tmp_path / "cukes.p").write_bytes(content)
        before = tree(tmp_path)
        code, lines, _ = run_in_process("gradient_bias.py", SMALL + ["--steps", "1"], capfd)
        assert_refused(code, lines, ["--pickle", "cukes.p exists", "--overwrite"], [tmp_path],
                       [before])
    (tmp_path / "cukes.p").unlink()
    main(SMALL + ["--steps", "1"])
    first = (tmp_path / "cukes.p").read_bytes()
    main(SMALL + ["--steps", "2"])  # a pickle of this experiment: replaced
    assert (tmp_path / "cukes.p").read_bytes() != first
    original = pickle.dumps((1.5, [{"loss_avg": 1.0, "xent": 1.0, "rand": 1.0, "hard": 1.0,
                                    "diff_rand": 1.0, "diff_hard": 1.0}]))  # the original's
    (tmp_path / "cukes.p").write_bytes(original)
    main(SMALL + ["--steps", "1"])
    assert (tmp_path / "cukes.p").read_bytes() != original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cukes.p"]  # no record beside it
    (tmp_path / "cukes.p").unlink()
    main(SMALL + ["--steps", "1", "--pickle", ""])
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_is_one_line_and_exit_2(tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    monkeypatch.chdir(tmp_path)
    code, lines, _ = run_in_process("gradient_bias.py", SMALL + ["--plot", "figs"], capfd)
    assert_refused(code, lines, ["--plot", "matplotlib"], [tmp_path], [{}])


@pytest.mark.slow
def test_command_line_error_has_no_traceback():
    r = run_script("gradient_bias.py", "--num_negatives", "-3")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--num_negatives" in r.stderr


def test_plot_draws_both_figures(tmp_path):
    pytest.importorskip("matplotlib")
    args = parse_args(SMALL + ["--steps", "3", "--plot", str(tmp_path), "--pickle", ""])
    paths = plot(run(args), str(tmp_path), outputs(args))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hard-nce-el.record",
                                                          "gradient_bias_bias.png",
                                                          "gradient_bias_loss.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_doctests():
    import doctest

    import gradient_bias
    assert doctest.testmod(gradient_bias).failed == 0

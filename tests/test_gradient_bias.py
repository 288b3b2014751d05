"""The synthetic gradient-bias experiment (docs/DESIGN.md#gradient-bias): vectorised NCE vs the
per-label loop, the paper's finding on a small configuration, the command line and the figures."""
import json
import sys

import pytest
import torch

from conftest import run_script
from gradient_bias import (MLPScorer, draw_negatives, entropy, gradient, main, nce_loss,
                           nce_loss_loop, parse_args, plot, population, run)

SMALL = ["--num_labels", "100", "--dim", "64", "--lr", "0.01", "--seed", "2", "--quiet"]


@pytest.mark.parametrize("replacement", [False, True])
def test_draw_negatives_exclude_the_gold(replacement):
    torch.manual_seed(0)
    gold, k = torch.tensor([0, 3, 5]), 8 if replacement else 5
    negatives = draw_negatives(torch.rand(6), gold, k, 50, replacement)
    assert negatives.shape == (3, 50, k)
    assert not (negatives == gold.view(3, 1, 1)).any()
    if not replacement:  # 5 distinct negatives out of 5 non-gold labels: all of them
        assert (negatives.sort(-1).values == torch.tensor([[1, 2, 3, 4, 5], [0, 1, 2, 4, 5],
                                                           [0, 1, 2, 3, 4]]).unsqueeze(1)).all()


def test_draw_negatives_follow_the_weights():
    torch.manual_seed(0)
    weights = torch.tensor([1.0, 0.0, 3.0, 6.0])
    negatives = draw_negatives(weights, torch.tensor([0]), 1, 20000, replacement=True)
    share = torch.bincount(negatives.view(-1), minlength=4).float() / 20000
    assert share[0] == 0 and share[1] == 0  # the gold and a zero weight are never drawn
    assert abs(share[2] - 1 / 3) < 0.02 and abs(share[3] - 2 / 3) < 0.02


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
    assert (p > 0).sum() == 5
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


def test_main_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "bias.json"
    main([a for a in SMALL if a != "--quiet"] + ["--steps", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert len(result["records"]) == 2
    assert list(result["records"][0]) == ["loss_avg", "xent", "rand", "hard", "diff_rand",
                                          "diff_hard"]
    assert result["entropy"] == pytest.approx(entropy(population_of(result)))
    printed = capsys.readouterr().out
    assert "diff_hard" in printed and "entropy" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["bias.json"]  # no temporary file left


def population_of(result):
    torch.manual_seed(result["args"]["seed"])
    return population(result["args"]["num_labels"], result["args"]["support"],
                      result["args"]["temp"])


@pytest.mark.parametrize("argv, flag", [
    (["--num_negatives", "-1"], "--num_negatives"),
    (["--num_labels", "10", "--num_negatives", "10"], "--num_negatives"),
    (["--support", "0"], "--support"),
    (["--temp", "0"], "--temp"),
    (["--lr", "nan"], "--lr"),
    (["--monte_carlo", "0"], "--monte_carlo"),
    (["--out", "/no/such/folder/x.json"], "--out"),
    (["--plot", "/dev/null/figures"], "--plot"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err


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


def test_quiet_prints_nothing(tmp_path, capsys):
    main(SMALL + ["--steps", "1", "--out", str(tmp_path / "bias.json")])
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert (tmp_path / "bias.json").is_file()


def test_plot_without_matplotlib_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--plot", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err


def test_command_line_error_has_no_traceback():
    r = run_script("gradient_bias.py", "--num_negatives", "-3")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--num_negatives" in r.stderr


def test_plot_draws_both_figures(tmp_path):
    pytest.importorskip("matplotlib")
    result = run(parse_args(SMALL + ["--steps", "3"]))
    paths = plot(result, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gradient_bias_bias.png",
                                                          "gradient_bias_loss.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

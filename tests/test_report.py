"""report.py on results files written by hand: the kept epoch, the paper's tables, the figures."""
import json
import os
import sys

import pytest
import torch

import report


def entry(epoch, recall, accuracy, k=64):
    key = f"recall@{k}"
    return {"epoch": epoch, key: recall, "accuracy": accuracy, f"macro_{key}": recall,
            f"micro_{key}": recall,
            "per_world": {"lego": {key: recall, "accuracy": accuracy, "mentions": 10}}}


def retriever_run(folder, name, args, val, test_epoch=None, k=64, losses=None):
    """`<name>.pt.results.json` as main_retriever.py writes it, and the checkpoint `<name>.pt`
    with the run's arguments (no weights: the report reads only "args")."""
    model = os.path.join(folder, name + ".pt")
    test = None
    if test_epoch is not None:
        test = entry(test_epoch, val[test_epoch - 1][0] - 4, val[test_epoch - 1][1] - 4, k)
    results = {"k": k, "val": [entry(i + 1, r, a, k) for i, (r, a) in enumerate(val)],
               "test": test}
    with open(model + ".results.json", "w") as f:
        json.dump(results, f)
    full = {"eval_criterion": "recall", "type_cands": "mixed_negative", "cands_ratio": 0.5,
            "type_model": "sum_max", "num_mention_vecs": 128, "num_entity_vecs": 128, **args}
    torch.save({"args": full, "model": {}}, model)
    if losses is not None:
        torch.save({"args": full, "losses": losses}, model + ".last")
    return model


def reranker_run(folder, name, args, macro_test):
    model = os.path.join(folder, name + ".pt")
    acc = {"acc_unorm": macro_test, "acc_norm": macro_test + 10}
    test = {"epoch": 1, **acc, "macro": acc, "micro": acc,
            "per_world": {"lego": {**acc, "correct": 5, "kept": 8, "mentions": 10}}}
    with open(model + ".results.json", "w") as f:
        json.dump({"eval_method": "macro", "val": [{**test}], "test": test}, f)
    torch.save({"args": {"type_model": "full", "type_bert": "base", "pretrained": None, **args},
                "model": {}}, model)
    return model


def test_the_kept_epoch_follows_the_runs_eval_criterion(tmp_path, capsys):
    # epoch 1 is best by recall, epoch 2 by accuracy; the run chose by accuracy
    val = [(95.0, 50.0), (93.0, 60.0)]
    retriever_run(str(tmp_path), "by_accuracy", {"eval_criterion": "accuracy"}, val, test_epoch=2)
    retriever_run(str(tmp_path), "by_recall", {}, val, test_epoch=1)
    # interrupted before test: the criterion comes from the checkpoint's arguments
    retriever_run(str(tmp_path), "by_accuracy_unfinished", {"eval_criterion": "accuracy"}, val)
    report.main([str(tmp_path)])
    rows = {line.split(" | ")[0][2:]: line.split(" | ")
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    name = os.path.basename(str(tmp_path))
    assert rows[f"{name}/by_accuracy.pt"][2] == "93.00"  # val R@k of epoch 2
    assert rows[f"{name}/by_recall.pt"][2] == "95.00"
    assert rows[f"{name}/by_accuracy_unfinished.pt"][2] == "93.00"


def test_paper_tables_put_each_run_beside_the_paper(tmp_path, capsys):
    folder = str(tmp_path)
    retriever_run(folder, "main", {}, [(93.0, 60.0), (94.0, 61.0)], test_epoch=2)  # test 90.00
    retriever_run(folder, "dual_p100", {"type_model": "dual", "cands_ratio": 0.0,
                                        "num_mention_vecs": 1, "num_entity_vecs": 1},
                  [(92.5, 55.0)], test_epoch=1)
    retriever_run(folder, "multi_small", {"type_model": "multi_vector", "cands_ratio": 1.0,
                                          "num_entity_vecs": 4}, [(90.0, 50.0)], test_epoch=1,
                  k=8)
    retriever_run(folder, "hard_sampled", {"type_cands": "hard_negative"}, [(90.0, 50.0)],
                  test_epoch=1)
    reranker_run(folder, "reranker", {}, 60.0)
    report.main([folder, "--paper"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    main = next(line for line in lines if "test recall@64" in line and "sum-of-max" in line)
    assert main.split(" | ")[1:] == ["89.62", "90.00", "+0.38 |"]
    val_main = next(line for line in lines if line.startswith("| the same, val recall@64"))
    assert "| 94.66 | 94.00 | -0.66 |" in val_main
    dual = next(line for line in lines if line.startswith("| dual |"))
    cells = dual.split(" | ")
    assert cells[1:5] == [f"– / {p:.2f} (–)" for p in (91.08, 92.18, 91.75, 92.24)]
    assert cells[5] == "92.50 / 92.05 (+0.45) |"
    multi = next(line for line in lines if line.startswith("| multi-vector (8) |"))
    assert multi.split(" | ")[1] == "90.00 [1] / 91.13 (–)"  # another k: no difference
    assert "recall@8, not @64" in out and "--num_entity_vecs 4, not 8" in out
    sum_max = next(line for line in lines if line.startswith("| sum-of-max |"))
    assert sum_max.split(" | ")[3] == "94.00 / 94.66 (-0.66)"
    base = next(line for line in lines if "bert-base" in line)
    assert base.split(" | ")[1:] == ["61.34 (BLINK cross-encoder)", "60.00", "-1.34 |"]
    large = next(line for line in lines if "bert-large" in line)
    assert large.split(" | ")[2:] == ["–", "– |"]
    assert "Runs outside the paper's tables:" in out and "hard_sampled" in out


def test_plot_writes_the_three_figures_with_the_loss_from_the_last_state(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = tmp_path / "runs"
    runs.mkdir()
    model = retriever_run(str(runs), "main", {}, [(93.0, 60.0), (94.0, 61.0)], test_epoch=2,
                          losses=[2.0, 1.5, 1.2])
    reranker_run(str(runs), "reranker", {}, 60.0)
    obj = json.load(open(model + ".results.json"))
    assert report.training_losses(model + ".results.json", obj) == [2.0, 1.5, 1.2]
    figures = tmp_path / "figures"
    report.main([str(runs), "--plot", str(figures)])
    names = sorted(os.listdir(figures))
    assert names == ["test_per_world.png", "training_loss.png", "val_per_epoch.png"]
    for name in names:
        with open(figures / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    retriever_run(str(tmp_path), "main", {}, [(93.0, 60.0)], test_epoch=1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path), "--plot", str(tmp_path / "figures")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "matplotlib" in err
    assert not (tmp_path / "figures").exists()

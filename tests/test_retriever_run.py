"""End to end on the toy world: training beats the zero-shot baseline, a resumed run ends where an
uninterrupted one does, candidates agree with scoring by hand."""
import json

import pytest
import torch

from conftest import read_results, run_main, run_script

# Small windows (16 tokens: the mention and its nearest words fall among the first 8 states),
# 8 negatives of which half mined; k = 8 of the 144 entities of val.
TRAIN = ["--max_len", "16", "--num_cands", "8", "--k", "8", "--type_model", "sum_max",
         "--num_mention_vecs", "8", "--num_entity_vecs", "8", "--type_cands", "mixed_negative",
         "--cands_ratio", "0.5", "--B", "8", "--lr", "1e-3", "--quiet"]


def train(toy, model, *extra):
    data_dir, bert_dir = toy
    run_main("main_retriever.py", "--model", model, "--data_dir", data_dir, "--pretrained",
             bert_dir, *TRAIN, *extra)


@pytest.fixture(scope="module")
def runs(toy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("retriever")
    baseline, trained = folder / "baseline.pt", folder / "trained.pt"
    train(toy, baseline, "--epochs", "0")
    train(toy, trained, "--epochs", "2")
    return {"folder": folder, "baseline": baseline, "trained": trained}


def check_entry(entry, k, worlds, mentions):
    key = f"recall@{k}"
    assert set(entry) == {"epoch", key, "accuracy", "per_world", f"macro_{key}", f"micro_{key}"}
    assert set(entry["per_world"]) == set(worlds)
    assert sum(r["mentions"] for r in entry["per_world"].values()) == mentions
    values = [entry[key], entry["accuracy"], entry[f"macro_{key}"], entry[f"micro_{key}"]]
    values += [r[x] for r in entry["per_world"].values() for x in (key, "accuracy")]
    assert all(0.0 <= x <= 100.0 for x in values)
    assert entry["accuracy"] <= entry[key]


def test_two_epochs_raise_val_recall_well_above_the_untrained_baseline(runs):
    base, trained = read_results(runs["baseline"]), read_results(runs["trained"])
    assert base["k"] == trained["k"] == 8
    assert [e["epoch"] for e in base["val"]] == [0] and base["test"]["epoch"] == 0
    assert [e["epoch"] for e in trained["val"]] == [1, 2] and trained["test"]["epoch"] in (1, 2)
    for r in (base, trained):
        for e in r["val"]:
            check_entry(e, 8, ["dusk_forest", "ember_peaks"], 288)
        check_entry(r["test"], 8, ["frost_fjord", "granite_bay"], 288)
    before, after = base["val"][0]["recall@8"], trained["val"][-1]["recall@8"]
    print(f"val recall@8: baseline {before:.2f}, after two epochs {after:.2f}")
    assert after >= before + 30
    assert trained["test"]["recall@8"] >= base["test"]["recall@8"] + 30
    state = torch.load(runs["trained"], weights_only=True)
    assert state["args"]["type_model"] == "sum_max" and state["epoch"] == trained["test"]["epoch"]
    # one checkpoint schema for both trainers, naming the script that wrote it
    from training import CHECKPOINT_KEYS, TRAINING_STATE_KEYS
    last = torch.load(str(runs["trained"]) + ".last", weights_only=True)
    assert set(state) == set(CHECKPOINT_KEYS) and set(last) == set(TRAINING_STATE_KEYS)
    assert state["script"] == last["script"] == "main_retriever" and last["epoch"] == 2


@pytest.mark.slow
def test_save_candidates_ranks_each_world_as_scoring_by_hand(toy, runs):
    from data_loader import Zeshel
    from retriever import all_pairs_interactions, encode_retriever_split, load_retriever
    data_dir, bert_dir = toy
    cands_dir = runs["folder"] / "cands"
    r = run_script("save_candidates.py", "--model", runs["trained"], "--data_dir", data_dir,
                   "--cands_dir", cands_dir, "--num_cands", "8", "--entity_bsz", "20",
                   "--mention_bsz", "50", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "micro" in r.stdout and "R@8" in r.stdout
    zeshel = Zeshel(data_dir, ("train", "val", "test"))
    with open(cands_dir / "recall.json") as f:
        recall = json.load(f)
    for split in ("train", "val", "test"):
        with open(cands_dir / f"candidates_{split}.json") as f:
            rows = [json.loads(line) for line in f]
        mentions = zeshel.mentions[split]
        assert [row["mention_id"] for row in rows] == [m["mention_id"] for m in mentions]
        for row, m in zip(rows, mentions):
            assert len(set(row["candidates"])) == 8
            assert all(c in zeshel.documents[m["corpus"]] for c in row["candidates"])
        assert set(recall[split]["micro"]) == {f"recall@{k}" for k in (1, 2, 4, 8)}

    state = torch.load(runs["trained"], weights_only=True)
    tokenizer, model = load_retriever(bert_dir, "sum_max", 8, 8)
    model.load_state_dict(state["model"])
    model.eval()
    data = encode_retriever_split(tokenizer, zeshel, "val", 16)
    with open(cands_dir / "candidates_val.json") as f:
        listed = [json.loads(line)["candidates"] for line in f]
    with torch.no_grad():
        u = model.mention_vectors(data.mention_ids, data.mention_mask)
        v = model.entity_vectors(data.entity_ids, data.entity_mask)
        scores = model.scorer(all_pairs_interactions(u, v))      # (M, E), everything at once
    hits = {w: [] for w in data.entities.worlds}
    for i, m in enumerate(zeshel.mentions["val"]):
        start, end = data.entities.world_ranges[m["corpus"]]
        best = (scores[i, start:end].argsort(descending=True)[:8] + start).tolist()
        assert listed[i] == [data.entities.doc_ids[j] for j in best]
        gold = data.golds[i].item()
        hits[m["corpus"]].append([gold in best[:k] for k in (1, 2, 4, 8)])
    for w, h in hits.items():
        expected = torch.tensor(h, dtype=torch.float).mean(0) * 100
        got = [recall["val"]["per_world"][w][f"recall@{k}"] for k in (1, 2, 4, 8)]
        assert torch.allclose(torch.tensor(got), expected, atol=1e-4)
        assert recall["val"]["per_world"][w]["mentions"] == len(h)
    assert recall["val"]["macro"]["recall@8"] == pytest.approx(
        sum(recall["val"]["per_world"][w]["recall@8"] for w in hits) / len(hits))

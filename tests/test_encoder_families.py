"""Any encoder-only model (docs/DESIGN.md#run-safety): a tiny random model of each family, with a
tokenizer of that family's class and special tokens over the toy world, loads, keeps each marker
one token, frames every window with the tokenizer's own [CLS]-like and [SEP]-like ids, and runs
the retriever's and the cross-encoder's forward passes (in process, fast); the three scripts run
end to end on each (slow). Decoders and encoder-decoders are refused in one line."""
import glob
import json
import os

import pytest
import torch

from conftest import fails_with, run_script

BERT_TOKENS = dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                   mask_token="[MASK]")
ROBERTA_TOKENS = dict(cls_token="<s>", sep_token="</s>", pad_token="<pad>", unk_token="<unk>",
                      mask_token="<mask>", bos_token="<s>", eos_token="</s>")
# family: (tokenizer model, tokenizer class, its special tokens, config class, config entries).
# Word pieces: every word of the world is one token (no [unused*] in the vocabulary: the markers
# are added); BPE and unigram (SentencePiece's model) vocabularies are learned from the world.
FAMILIES = {
    "bert": ("wordpiece", "BertTokenizerFast", BERT_TOKENS, "BertConfig", {}),
    "distilbert": ("wordpiece", "DistilBertTokenizerFast", BERT_TOKENS, "DistilBertConfig",
                   {"dim": 32, "hidden_dim": 64, "n_layers": 1, "n_heads": 2}),
    "electra": ("wordpiece", "ElectraTokenizerFast", BERT_TOKENS, "ElectraConfig",
                {"embedding_size": 16}),
    "mpnet": ("wordpiece", "MPNetTokenizerFast", {**ROBERTA_TOKENS, "unk_token": "[UNK]"},
              "MPNetConfig", {}),
    "roberta": ("bpe", "RobertaTokenizerFast", ROBERTA_TOKENS, "RobertaConfig", {}),
    "xlm-roberta": ("unigram", "XLMRobertaTokenizerFast", ROBERTA_TOKENS, "XLMRobertaConfig", {}),
    "albert": ("unigram", "AlbertTokenizerFast",
               {**BERT_TOKENS, "pad_token": "<pad>", "unk_token": "<unk>"}, "AlbertConfig",
               {"embedding_size": 16}),
    "deberta-v2": ("unigram", "DebertaV2TokenizerFast", BERT_TOKENS, "DebertaV2Config",
                   {"relative_attention": True, "position_buckets": 8,
                    "pos_att_type": ["p2c", "c2p"]}),
    "modernbert": ("bpe", "PreTrainedTokenizerFast", BERT_TOKENS, "ModernBertConfig",
                   {"global_attn_every_n_layers": 1, "local_attention": 16,
                    "reference_compile": False}),
}
LAYERS = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 64}
POSITIONS = 64  # windows of 16 (retriever) and 32 (reranker) tokens
# RoBERTa's positions start after the padding id: two more for the same windows
OFFSET_POSITIONS = ("RobertaConfig", "XLMRobertaConfig", "MPNetConfig")


def missing_family(family):
    """Why this transformers cannot build `family`, or None."""
    import transformers
    config = FAMILIES[family][3]
    if not hasattr(transformers, config):
        return f"transformers {transformers.__version__} has no {config} ({family})"
    return None


def world_texts(data_dir):
    """The titles and texts of the world's documents (what BPE and unigram vocabularies learn
    from)."""
    texts = []
    for path in sorted(glob.glob(os.path.join(data_dir, "documents", "*.json"))):
        with open(path) as f:
            for line in f:
                doc = json.loads(line)
                texts += [doc["title"], doc["text"]]
    return texts


def build_tokenizer(kind, special, texts, words):
    """A `tokenizers` tokenizer of this kind whose special tokens are `special`'s, with the
    family's [CLS] A [SEP] template."""
    from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                            trainers)
    specials = list(dict.fromkeys(special.values()))
    if kind == "wordpiece":
        vocab = {w: i for i, w in enumerate(specials + words)}
        tok = Tokenizer(models.WordPiece(vocab, unk_token=special["unk_token"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=1000, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(texts, trainers.UnigramTrainer(
            vocab_size=1000, special_tokens=specials, unk_token=special["unk_token"],
            show_progress=False))
    cls, sep = special["cls_token"], special["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(t, tok.token_to_id(t)) for t in (cls, sep)])
    return tok


def write_family(family, folder, texts, words):
    """A tiny random model of `family` with its tokenizer, saved in `folder`."""
    import transformers
    from transformers import AutoModel, PreTrainedTokenizerFast
    kind, tokenizer_class, special, config_class, entries = FAMILIES[family]
    tok = build_tokenizer(kind, special, texts, words)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=POSITIONS, **special)
    fast.save_pretrained(folder)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, "tokenizer_class": tokenizer_class}, f)
    # the config's special ids are the tokenizer's (RoBERTa counts positions from padding)
    ids = {f"{t}_token_id": tok.token_to_id(special[f"{t}_token"])
           for t in ("pad", "bos", "eos") + ("cls", "sep") * (family == "modernbert")
           if f"{t}_token" in special}
    layers = {} if family == "distilbert" else LAYERS
    positions = POSITIONS + 2 * (config_class in OFFSET_POSITIONS)
    config = getattr(transformers, config_class)(
        vocab_size=tok.get_vocab_size(), max_position_embeddings=positions, **ids, **layers,
        **entries)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


def family_ids():
    return [pytest.param(f, marks=pytest.mark.skipif(missing_family(f) is not None,
                                                     reason=missing_family(f) or ""))
            for f in FAMILIES]


@pytest.fixture(scope="module")
def families(toy, tmp_path_factory):
    """{family: folder} of every family this transformers has."""
    from utils import quiet_transformers
    quiet_transformers()
    data, bert = toy
    with open(os.path.join(bert, "vocab.txt")) as f:
        words = [w for w in f.read().split() if not w.startswith("[")]
    texts = world_texts(data)
    root = tmp_path_factory.mktemp("families")
    return {f: write_family(f, str(root / f), texts, words)
            for f in FAMILIES if missing_family(f) is None}


def window_ends(ids, mask):
    """(first, last real, padding) ids of each window: (M,), (M,), the padding ids."""
    last = mask.long().sum(1) - 1
    return ids[:, 0], ids[torch.arange(len(ids)), last], ids[mask == 0]


def test_every_family_encodes_its_windows_and_scores(toy, families):
    """For each family: the markers are one token each; every retriever window opens with the
    tokenizer's own [CLS]-like id, closes with its [SEP]-like id and is padded with its padding
    id (those its own template puts around a text); the retriever scores candidates and the
    cross-encoder scores pairs (finite, the same in a batch as alone)."""
    from data_loader import (MARKERS, Zeshel, check_positions, load_encoder, marker_ids,
                             reranker_pair)
    from reranker import FullRanker
    from retriever import encode_retriever_split, load_retriever
    zeshel = Zeshel(toy[0], ("val",))
    assert len(families) >= 8, sorted(families)
    for family, folder in families.items():
        tokenizer, model = load_retriever(folder, "sum_max", 2, 2)
        model.eval()
        ids = marker_ids(tokenizer)
        for marker, i in zip(MARKERS, ids):
            assert tokenizer(marker, add_special_tokens=False)["input_ids"] == [i], family
        assert tokenizer.unk_token_id not in ids and len(set(ids)) == 3
        own = tokenizer("the")["input_ids"]                 # its own template around a text
        cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        assert (own[0], own[-1]) == (cls, sep) and len({cls, sep, pad}) == 3, family
        check_positions(model.mention_encoder, 16, "--max_len")
        data = encode_retriever_split(tokenizer, zeshel, "val", 16)
        for window, mask in ((data.mention_ids, data.mention_mask),
                             (data.entity_ids, data.entity_mask)):
            first, last, padding = window_ends(window, mask)
            assert (first == cls).all() and (last == sep).all(), family
            assert (padding == pad).all(), family
        assert ((data.mention_ids == ids[0]).sum(1) == 1).all(), family   # each mention marked
        assert ((data.entity_ids == ids[2]).sum(1) == 1).all(), family    # title end
        index = torch.tensor([[0, 3, 5], [1, 0, -1]])                     # (2, 3) rows
        with torch.no_grad():
            scores = model(data.mention_ids[:2], data.mention_mask[:2], data.entity_ids[:6],
                           data.entity_mask[:6], index)
            alone = model(data.mention_ids[1:2], data.mention_mask[1:2], data.entity_ids[:2],
                          data.entity_mask[:2], torch.tensor([[1, 0]]))
        assert scores[:, :2].isfinite().all() and scores[1, 2] == float("-inf"), family
        assert torch.allclose(scores[1, :2], alone[0], atol=1e-4), family
        ranker = FullRanker(load_encoder(folder, tokenizer)).eval()
        check_positions(ranker.encoder, 32, "--L")
        windows = [data.mention_ids[i][data.mention_mask[i] > 0].tolist()[1:-1] for i in (0, 1)]
        pairs = [reranker_pair(windows[0], data.entity_ids[e][:8].tolist()[1:], 32, cls, sep, pad)
                 for e in (0, 1)]
        ids_, types, mask = (torch.tensor([[p[k] for p in pairs]]) for k in range(3))  # (1, 2, 32)
        with torch.no_grad():
            pair_scores = ranker(ids_, types, mask)
            first = ranker(ids_[:, :1], types[:, :1], mask[:, :1])
        assert pair_scores.shape == (1, 2) and pair_scores.isfinite().all(), family
        assert torch.allclose(pair_scores[:, :1], first, atol=1e-4), family


def write_config(folder, config):
    config.save_pretrained(folder)
    return folder


REFUSED = {"gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 1, "n_head": 2}, "a decoder"),
           "t5": ("T5Config", {"d_model": 32, "num_layers": 1}, "an encoder-decoder"),
           "bart": ("BartConfig", {"d_model": 32}, "an encoder-decoder"),
           "bert_decoder": ("BertConfig", {"is_decoder": True}, "a decoder")}


@pytest.mark.parametrize("family", list(REFUSED))
def test_decoders_and_encoder_decoders_are_refused_in_one_line(toy, tmp_path, capsys, family):
    import transformers
    import main_retriever
    config_class, entries, why = REFUSED[family]
    folder = write_config(str(tmp_path / family), getattr(transformers, config_class)(**entries))
    argv = ["--model", tmp_path / "m.pt", "--data_dir", toy[0], "--pretrained", folder, "--quiet"]
    line = fails_with(main_retriever.main, capsys, argv, "--pretrained", folder, why,
                      "this code needs an encoder-only model")
    assert not os.path.exists(tmp_path / "m.pt.log"), line


@pytest.mark.slow
@pytest.mark.parametrize("family", family_ids())
def test_the_three_scripts_run_on_every_family(toy, families, tmp_path, family):
    """One epoch of the retriever (mined and random negatives), its candidates, one step of the
    cross-encoder (a batch larger than the training set)."""
    data, folder = toy[0], families[family]
    model, cands, reranker = (str(tmp_path / n) for n in ("ret.pt", "cands", "rr.pt"))
    runs = [("main_retriever.py", "--model", model, "--data_dir", data, "--pretrained", folder,
             "--max_len", 16, "--k", 8, "--num_cands", 4, "--type_cands", "mixed_negative",
             "--cands_ratio", 0.5, "--type_model", "sum_max", "--num_mention_vecs", 4,
             "--num_entity_vecs", 4, "--B", 16, "--lr", 1e-3, "--epochs", 1, "--quiet"),
            ("save_candidates.py", "--model", model, "--data_dir", data, "--cands_dir", cands,
             "--num_cands", 4, "--quiet"),
            ("main_reranker.py", "--model", reranker, "--data", data, "--cands_dir", cands,
             "--pretrained", folder, "--C", 4, "--C_eval", 4, "--L", 32, "--B", 512,
             "--epochs", 1, "--inputmark", "--quiet")]
    for script, *argv in runs:
        r = run_script(script, *argv)
        assert r.returncode == 0, (family, script, r.stderr[-3000:])
    with open(model + ".results.json") as f:
        assert json.load(f)["test"]["recall@8"] > 0
    with open(os.path.join(cands, "candidates_test.json")) as f:
        assert len(json.loads(f.readline())["candidates"]) == 4
    with open(reranker + ".results.json") as f:
        results = json.load(f)
    assert results["test"] is not None and len(results["losses"]) <= 1

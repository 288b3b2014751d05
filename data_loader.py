"""Reading and checking Zeshel, the token windows, and the encodings all three scripts share.

Zeshel layout (docs/DESIGN.md#data): `DATA/documents/<world>.json` and
`DATA/mentions/<split>.json`, JSON lines.
The window functions are pure functions of token lists (no tokenizer, no model), so a test can
call them with hand-made lists; `encode_*` turn mentions and entities into padded id tensors.
"""
import gc
import hashlib
import json
import math
import os
from collections import OrderedDict

import numpy as np
import torch

from cli import die
from run_safety import notice
from utils import quiet_transformers

MENTION_START, MENTION_END, TITLE_END = "[unused0]", "[unused1]", "[unused2]"
MARKERS = (MENTION_START, MENTION_END, TITLE_END)
SPLITS = ("train", "heldout_train_seen", "heldout_train_unseen", "val", "test")
MENTION_FIELDS = {"mention_id": "id", "context_document_id": "id", "label_document_id": "id",
                  "start_index": int, "end_index": int, "text": str, "corpus": "id"}
DOCUMENT_FIELDS = {"document_id": "id", "title": str, "text": str}
CANDIDATE_FIELDS = {"mention_id": "id", "candidates": list}


# ----------------------------------------------------------------------------------------------
# Reading and checking

def _short(value):
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_type(value, kind):
    """Whether a JSON value is of `kind`: int (not a bool, nor 14.0), str, list, or "id" (a
    non-empty string)."""
    if kind == "id":
        return isinstance(value, str) and value != ""
    if kind is int:
        return type(value) is int
    return isinstance(value, kind)


KIND_NAMES = {int: "an integer", str: "a string", list: "a list", "id": "a non-empty string"}


def check_fields(row, fields, where):
    """Stop, naming `where` (file:line), unless the JSON object `row` has each field of `fields`
    ({name: kind}, see _check_type) with a value of its kind."""
    missing = [k for k in fields if k not in row]
    if missing:
        die(f"{where}: missing field {missing[0]!r}")
    for k, kind in fields.items():
        if not _check_type(row[k], kind):
            die(f"{where}: {k} must be {KIND_NAMES[kind]}, not {_short(row[k])}")


def read_jsonl(path, fields, flag, key=None, digest=None):
    """Rows of a JSON-lines file. `fields`: {name: kind} (see _check_type); `key`: a field whose
    values must be unique; `digest`: a hashlib object fed the file's bytes. A line that is not
    UTF-8 or not JSON, a missing field, a value of another type, a repeated `key` or an empty
    file stops the run naming file and line; a file that is one JSON document over several lines
    (a pretty-printed array) says that JSON lines are expected. A byte order mark at the start
    (an editor's "UTF-8 with BOM") is read past."""
    if not os.path.isfile(path):
        die(f"{flag}: missing file {path}")
    rows, seen = [], {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if digest is not None:
                digest.update(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte order mark (an editor's UTF-8 with BOM): read past it
            if not rows and raw.strip() in (b"[", b"{"):
                die(f"{path}:{lineno}: a JSON document over several lines (a pretty-printed "
                    f"array or object?); expected JSON lines, one object per line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                die(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                    f"{e.start + 1})")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                die(f"{path}:{lineno}: malformed JSON ({e.msg})")
            if isinstance(row, list) and not rows:
                die(f"{path}:{lineno}: a JSON array; expected JSON lines, one object per line")
            if not isinstance(row, dict):
                die(f"{path}:{lineno}: expected a JSON object, not {_short(row)}")
            if b"\\ud" in raw or b"\\uD" in raw:  # an escaped surrogate: paired, or not text
                for k, v in row.items():
                    try:
                        json.dumps(v, ensure_ascii=False).encode("utf-8")
                    except UnicodeEncodeError:
                        die(f"{path}:{lineno}: {k} holds a lone surrogate (an escape \\ud800 to "
                            f"\\udfff without its pair): not Unicode text")
            check_fields(row, fields, f"{path}:{lineno}")
            if key is not None:
                if row[key] in seen:
                    die(f"{path}:{lineno}: duplicate {key} {row[key]!r} (also on line "
                        f"{seen[row[key]]})")
                seen[row[key]] = lineno
            row["_line"] = lineno
            rows.append(row)
    if not rows:
        die(f"{path}: empty file (no JSON lines)")
    return rows


def read_documents(path, flag):
    """A world's document file: ({document_id: {"title", "text"}} in file order, the sha256 of
    the bytes read)."""
    docs, digest = OrderedDict(), hashlib.sha256()
    for row in read_jsonl(path, DOCUMENT_FIELDS, flag, key="document_id", digest=digest):
        docs[row["document_id"]] = {"title": row["title"], "text": row["text"]}
    return docs, digest.hexdigest()


def freeze_objects():
    """Take the objects alive now out of the cyclic garbage collector's sight (gc.freeze), after
    collecting what is garbage. The loaded documents, mentions and entity index (and, when
    tokenization starts, the model and tokenizer) live as long as the run, yet every full
    collection walked them: at full size those walks took a fifth of the tokenization's CPU time
    (`bench/SCALE.md`)."""
    gc.collect()
    gc.freeze()


class EntitySet:
    """The entities of a split: every document of every world occurring in its mentions.

    Worlds are sorted by name and documents kept in file order, so an entity's index (its position
    here) is the same on every run. `world_ranges[w] = (start, end)`: world w's entities are the
    indices start..end-1.
    """

    def __init__(self, worlds, documents):
        self.worlds = sorted(worlds)
        self.doc_ids, self.titles, self.texts, self.world_ids = [], [], [], []
        self.world_ranges = OrderedDict()
        for w_i, world in enumerate(self.worlds):
            start = len(self.doc_ids)
            for doc_id, doc in documents[world].items():
                self.doc_ids.append(doc_id)
                self.titles.append(doc["title"])
                self.texts.append(doc["text"])
                self.world_ids.append(w_i)
            self.world_ranges[world] = (start, len(self.doc_ids))
        self.index = {(self.worlds[w], d): i for i, (w, d) in enumerate(zip(self.world_ids, self.doc_ids))}
        self.world_ids = np.asarray(self.world_ids, dtype=np.int64)

    def __len__(self):
        return len(self.doc_ids)

    def gold_indices(self, mentions):
        """Entity index of each mention's label document, (M,) int64."""
        return np.asarray([self.index[(m["corpus"], m["label_document_id"])] for m in mentions],
                          dtype=np.int64)


class Zeshel:
    """A Zeshel folder: the mentions of the requested splits and the documents of their worlds.

    Every mention is checked: its world's document file exists, its context and label documents
    are in that world, and 0 <= start_index <= end_index < number of whitespace tokens of the
    context text. Errors name the file and line and end the run with status 2.
    """

    def __init__(self, data_dir, splits=("train", "val", "test"), flag="--data_dir"):
        if not data_dir:
            die(f"{flag}: no Zeshel folder given")
        if not os.path.isdir(data_dir):
            die(f"{flag}: {data_dir} is not a folder")
        self.data_dir = data_dir
        for sub in ("documents", "mentions"):
            if not os.path.isdir(os.path.join(data_dir, sub)):
                die(f"{flag}: {data_dir} has no {sub}/ folder (expected the Zeshel layout)")
        for split in splits:
            if split not in SPLITS:
                die(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
        self.mentions, self.digests = {}, {}  # digests: {file: sha256 of its bytes}
        for split in splits:
            path = os.path.join(data_dir, "mentions", f"{split}.json")
            digest = hashlib.sha256()
            self.mentions[split] = read_jsonl(path, MENTION_FIELDS, flag, key="mention_id",
                                              digest=digest)
            self.digests[path] = digest.hexdigest()
            for m in self.mentions[split]:
                m["_file"] = path
        worlds = sorted({m["corpus"] for ms in self.mentions.values() for m in ms})
        self.documents = {}
        for world in worlds:
            path = os.path.join(data_dir, "documents", f"{world}.json")
            if not os.path.isfile(path):
                first = next(m for ms in self.mentions.values() for m in ms if m["corpus"] == world)
                die(f"{first['_file']}:{first['_line']}: world {world!r} has no document file {path}")
            self.documents[world], self.digests[path] = read_documents(path, flag)
        self._ntokens = {}
        for ms in self.mentions.values():
            for m in ms:
                self._check_mention(m)
        self._entities = {}
        freeze_objects()

    def _check_mention(self, m):
        where = f"{m['_file']}:{m['_line']}"
        docs = self.documents[m["corpus"]]
        for key in ("context_document_id", "label_document_id"):
            if m[key] not in docs:
                die(f"{where}: {key} {m[key]!r} is not a document of world {m['corpus']!r}")
        if m["end_index"] < m["start_index"]:
            die(f"{where}: mention tokens {m['start_index']}..{m['end_index']} start after they "
                f"end (end_index before start_index)")
        key = (m["corpus"], m["context_document_id"])
        if key not in self._ntokens:
            self._ntokens[key] = len(docs[m["context_document_id"]]["text"].split())
        n = self._ntokens[key]
        if not 0 <= m["start_index"] <= m["end_index"] < n:
            die(f"{where}: mention tokens {m['start_index']}..{m['end_index']} are outside its "
                f"context document ({n} tokens) or start after they end")

    def fingerprint(self):
        """What the loaded splits hold, by content (docs/DESIGN.md#run-safety): per split its
        mention and entity counts and one sha256 over its mention file and the document files of
        its worlds. Paths play no part: the same data in another folder has the same one."""
        out = {}
        for split, mentions in self.mentions.items():
            worlds = sorted({m["corpus"] for m in mentions})
            files = [os.path.join(self.data_dir, "mentions", f"{split}.json")] + [
                os.path.join(self.data_dir, "documents", f"{w}.json") for w in worlds]
            digest = hashlib.sha256(" ".join(self.digests[f] for f in files).encode())
            out[split] = {"mentions": len(mentions), "entities": len(self.entities(split)),
                          "sha256": digest.hexdigest()}
        return out

    def context_tokens(self, m):
        """Whitespace tokens of a mention's context document."""
        return self.documents[m["corpus"]][m["context_document_id"]]["text"].split()

    def entities(self, split):
        """The EntitySet of a split (built once, then reused)."""
        if split not in self._entities:
            worlds = {m["corpus"] for m in self.mentions[split]}
            self._entities[split] = EntitySet(worlds, self.documents)
        return self._entities[split]


def read_candidates(cands_dir, split, mentions, flag="--cands_dir", documents=None, C=None,
                    C_flag="--C"):
    """`CANDS_DIR/candidates_<split>.json` as ({mention_id: [document ids, best first]}, the sha256
    of the bytes read); stops when
    the file or one of the split's mentions is missing, a mention has two lines, a list repeats a
    document or (given `documents`, {world: {document_id: ...}}) names one that is not in the
    mention's world. Given `C`: stops when `C` (the flag `C_flag`) is more than the longest list,
    and says how many mentions have fewer."""
    path = os.path.join(cands_dir, f"candidates_{split}.json")
    digest = hashlib.sha256()
    rows = read_jsonl(path, CANDIDATE_FIELDS, flag, key="mention_id", digest=digest)
    worlds = {m["mention_id"]: m["corpus"] for m in mentions}
    cands = {}
    for row in rows:
        where, mention_id = f"{path}:{row['_line']}", row["mention_id"]
        seen = set()
        for c in row["candidates"]:
            if not _check_type(c, "id"):
                die(f"{where}: candidates must be document ids (non-empty strings), not "
                    f"{_short(c)}")
            if c in seen:
                die(f"{where}: candidate {c!r} appears twice in the list of mention {mention_id}")
            seen.add(c)
            world = worlds.get(mention_id)
            if documents is not None and world is not None and c not in documents[world]:
                die(f"{where}: candidate {c!r} of mention {mention_id} is not a document of its "
                    f"world {world!r}")
        cands[mention_id] = row["candidates"]
    for m in mentions:
        if m["mention_id"] not in cands:
            die(f"{path}: no candidates for mention {m['mention_id']} "
                f"({m['_file']}:{m['_line']})")
    if C is not None:
        lengths = [len(cands[m["mention_id"]]) for m in mentions]
        if C > max(lengths):
            die(f"{C_flag}: {C} candidates asked for but the lists of {path} hold at most "
                f"{max(lengths)}")
        short = sum(n < C for n in lengths)
        if short:
            notice(f"{path}: {short} of {len(lengths)} mentions have fewer than {C_flag} {C} "
                   f"candidates (the shortest list holds {min(lengths)})")
    return cands, digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Token windows: pure functions of token (word-piece) lists

def retriever_mention_window(left, mention, right, max_len, start=MENTION_START, end=MENTION_END):
    """The retriever's mention window (docs/DESIGN.md#windows), without [CLS]/[SEP]. The pieces
    may be strings or ids; `start` and `end` are the markers, in the same kind.

    >>> retriever_mention_window(list("abcdef"), ["M"], list("xyz"), 8)
    ['f', '[unused0]', 'M', '[unused1]', 'x', 'y']
    """
    b = max_len - 2
    if len(mention) > b - 2:
        return list(mention[:b])
    rest = b - len(mention) - 2
    half = rest // 2
    if len(left) > half:
        n = half if len(right) > half else rest - len(right)
        left = left[max(0, len(left) - n):]  # n = 0 keeps nothing (the original's left[-0:]
        #                                      kept all); n > len(left) keeps all
    window = list(left) + [start] + list(mention) + [end] + list(right)
    return window[:b]


def retriever_entity_window(title, text, max_len, title_end=TITLE_END):
    """Title pieces + [unused2] + text pieces, cut to max_len - 2 (docs/DESIGN.md#windows)."""
    return (list(title) + [title_end] + list(text))[:max_len - 2]


def reranker_mention_budget(L):
    return (L - 3) // 2


def reranker_mention_window(left, mention, right, budget, inputmark=False, start=MENTION_START,
                            end=MENTION_END):
    """The reranker's mention window (docs/DESIGN.md#windows), `budget` = (L - 3) // 2 pieces
    at most.

    >>> reranker_mention_window(list("abcd"), ["M"], list("xy"), 5)
    ['c', 'd', 'M', 'x', 'y']
    """
    if inputmark:
        mention = [start] + list(mention) + [end]
    if len(mention) >= budget:
        return list(mention[:budget])
    rest = budget - len(mention)
    half = int(math.ceil(rest / 2))
    if len(left) >= half:
        n = half if len(right) >= half else rest - len(right)
        left = left[max(0, len(left) - n):]
    return (list(left) + list(mention) + list(right))[:budget]


def reranker_pair(mention_ids, entity_ids, L, cls_id, sep_id, pad_id):
    """`[CLS] mention [SEP] entity [SEP]` padded to L: (ids, token_type_ids, attention_mask),
    token types 0 up to the first [SEP], 1 after. The entity part is cut to L - 3 - budget."""
    budget = reranker_mention_budget(L)
    mention_ids = list(mention_ids[:budget])
    entity_ids = list(entity_ids[:L - 3 - budget])
    first = [cls_id] + mention_ids + [sep_id]
    second = entity_ids + [sep_id]
    ids = first + second
    types = [0] * len(first) + [1] * len(second)
    mask = [1] * len(ids)
    pad = L - len(ids)
    return ids + [pad_id] * pad, types + [0] * pad, mask + [0] * pad


# ----------------------------------------------------------------------------------------------
# The pretrained tokenizer and encoder, and tokenizing (batched, fast tokenizer)

# The pretrained encoder each value of --pre_model (retriever) and --type_bert (reranker) stands
# for; --pretrained (a folder or hub name) overrides them.
PRETRAINED = {"--pre_model": {"Bert": "bert-base-uncased", "Roberta": "roberta-base"},
              "--type_bert": {"base": "bert-base-uncased", "large": "bert-large-uncased"}}


def pretrained_name(flag, value, pretrained=None):
    """`--pretrained` when given, else the model `flag` (--pre_model, --type_bert) = `value`
    stands for (PRETRAINED)."""
    return pretrained or PRETRAINED[flag][value]


def model_path_hint(name):
    """Why a pretrained folder or hub name `name` could not be loaded, for a one-line error."""
    if os.path.isdir(name):
        return f"{name} is a folder but holds no loadable model/tokenizer"
    return (f"{name} is not a folder and could not be loaded from the Hugging Face hub or its "
            f"local cache (offline? pass a local model folder with --pretrained)")


def causal_only_model_types():
    """The model types that transformers' auto mappings know as causal language models but not
    as masked ones: decoders (gpt2, llama, ...; bert and roberta, which have both heads, are
    not among them)."""
    from transformers.models.auto import modeling_auto
    return (set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
            - set(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES))


def encoder_refusal(config):
    """Why a model of this config is not an encoder this code can run, or None
    (docs/DESIGN.md#run-safety): an encoder-decoder (`is_encoder_decoder`: T5, BART), a decoder
    (`is_decoder`, or a model type transformers knows only as a causal language model: GPT-2,
    Llama, ...). Every other model is accepted here; load_encoder then checks that it encodes.

    >>> from transformers import BertConfig, GPT2Config, T5Config
    >>> encoder_refusal(BertConfig()) is None
    True
    >>> encoder_refusal(GPT2Config()), encoder_refusal(T5Config())
    ('a decoder: transformers knows it only as a causal language model', 'an encoder-decoder')
    >>> encoder_refusal(BertConfig(is_decoder=True))
    'a decoder: its config sets is_decoder'
    """
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder"
    if getattr(config, "is_decoder", False):
        return "a decoder: its config sets is_decoder"
    if getattr(config, "model_type", None) in causal_only_model_types():
        return "a decoder: transformers knows it only as a causal language model"
    return None


def check_encoder(name, flag="--pretrained", loadable=True):
    """Stop with one line, before any work, when `name` (a folder or hub name) holds no encoder
    (its config says so: encoder_refusal); returns the config. `loadable=False`: a config that
    cannot be loaded is left for load_encoder to report (None)."""
    from transformers import AutoConfig
    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception:
        if not loadable:
            return None
        die(f"{flag}: {model_path_hint(name)}")
    why = encoder_refusal(config)
    if why is not None:
        kind = getattr(config, "model_type", None) or type(config).__name__
        die(f"{flag}: {name} is a {kind} model ({why}); this code needs an encoder-only model "
            f"(BERT, RoBERTa, DeBERTa, ELECTRA, ModernBERT, ...)")
    return config


def load_tokenizer(name, flag="--pretrained"):
    """The fast tokenizer of `name` (a folder or hub name) with the three marker tokens registered
    as special tokens, so that they stay single tokens (added to the vocabulary where missing)."""
    from transformers import AutoTokenizer
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception:
        die(f"{flag}: {model_path_hint(name)}")
    missing = [t for t in ("cls_token", "sep_token", "pad_token")
               if getattr(tokenizer, f"{t}_id", None) is None]
    if missing:
        die(f"{flag}: the tokenizer of {name} has no {missing[0]} (an encoder's tokenizer has "
            f"[CLS], [SEP] and [PAD] or their like: <s>, </s>, <pad>)")
    tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    for marker, i in zip(MARKERS, marker_ids(tokenizer)):
        if tokenizer(marker, add_special_tokens=False)["input_ids"] != [i] \
                or i == tokenizer.unk_token_id:
            die(f"{flag}: the tokenizer of {name} does not keep the marker {marker} as one token")
    return tokenizer


PROBE = "The house of the king is in the city and was built by the people of the north."


def check_tokenizer_fits(tokenizer, config, name, flag="--pretrained"):
    """Stop unless the tokenizer of `name` fits its encoder (`config`: the encoder's config): its
    vocabulary neither much smaller than the encoder's embeddings (transformers builds an empty
    one from a folder without tokenizer files) nor larger than them plus the marker tokens, and
    a sentence of common words not all unknown pieces."""
    n, size = len(tokenizer), getattr(config, "vocab_size", None)
    if size and not size // 2 <= n <= size + len(MARKERS):
        die(f"{flag}: the tokenizer of {name} has {n} tokens but its encoder {size} embeddings "
            f"(no tokenizer files in the folder? another model's?)")
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        die(f"{flag}: the tokenizer of {name} reads every word of a plain English sentence as "
            f"unknown (no tokenizer files in the folder?)")


# Config entries that say where or how a model was loaded, not what it is.
VOLATILE_CONFIG = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash",
                   "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
                   "torch_dtype", "dtype", "architectures", "output_hidden_states",
                   "output_attentions", "return_dict")


def _sha256_json(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def encoder_fingerprint(tokenizer, model):
    """What a pretrained encoder is, by content: sha256s of its config (but where it was loaded
    from), of its tokenizer (vocabulary and normalization, the marker tokens included) and of its
    weights as loaded. A checkpoint records it; a rerun, a resumed run or save_candidates.py
    compares it (run_safety.check_inputs)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in VOLATILE_CONFIG}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(
        tokenizer.get_vocab().items()))
    weights = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        weights.update(key.encode())
        weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return {"config": _sha256_json(config),
            "vocabulary": hashlib.sha256(vocab.encode()).hexdigest(),
            "weights": weights.hexdigest()}


def load_encoder(name, tokenizer, flag="--pretrained"):
    """The pretrained transformer `name` (AutoModel, SDPA attention where available), its
    embeddings resized when the tokenizer had to add the marker tokens. `model.fingerprint` is
    its encoder_fingerprint as loaded (before the resize). A weight of the encoder that its
    checkpoint does not hold (it would start at random: a renamed or truncated checkpoint) stops
    the run; a checkpoint without pooler weights loads without the pooler (a score then reads
    the [CLS] state, with a notice)."""
    from transformers import AutoModel
    quiet_transformers()
    check_encoder(name, flag)
    # weights of another shape than the config's are listed (mismatched_keys), not raised
    common = dict(output_loading_info=True, ignore_mismatched_sizes=True)
    try:
        model, info = AutoModel.from_pretrained(name, add_pooling_layer=True,
                                                attn_implementation="sdpa", **common)
    except Exception:
        try:
            model, info = AutoModel.from_pretrained(name, **common)
        except Exception:
            die(f"{flag}: {model_path_hint(name)}")
    missing = sorted(k for k in info["missing_keys"] if not k.split(".")[0] == "pooler")
    wrong = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info["mismatched_keys"])
    if missing or wrong:
        bad = missing or wrong
        die(f"{flag}: {len(bad)} weights of the {model.config.model_type} encoder are "
            f"{'not in' if missing else 'of another shape in'} the checkpoint of {name} (e.g. "
            f"{bad[0]}); they would start at random (a renamed or partial checkpoint?)")
    if info["missing_keys"] and getattr(model, "pooler", None) is not None:
        model.pooler = None
        notice(f"{name} has no pooler weights: the encoder is used without its pooler")
    check_tokenizer_fits(tokenizer, model.config, name, flag)
    fingerprint = encoder_fingerprint(tokenizer, model)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    check_encodes(model, tokenizer, name, flag)
    model.fingerprint = fingerprint
    return model


def check_encodes(model, tokenizer, name, flag="--pretrained"):
    """Stop unless the model loaded from `name` encodes as this code takes it: a window of token
    ids and its attention mask in, one state of the config's hidden size per token out
    (`last_hidden_state`)."""
    ids = torch.tensor([[tokenizer.cls_token_id, tokenizer.sep_token_id]])   # (1, 2)
    try:
        with torch.no_grad():
            hidden = getattr(model(input_ids=ids, attention_mask=torch.ones_like(ids)),
                             "last_hidden_state", None)
    except Exception:
        hidden = None
    size = getattr(model.config, "hidden_size", None)
    if hidden is None or tuple(hidden.shape) != (1, 2, size):
        die(f"{flag}: {name} does not load as an encoder ({type(model).__name__} does not give "
            f"one state of {size} numbers per token of a window)")


def check_positions(encoder, length, flag):
    """Stop unless windows of `length` tokens go through the encoder: one forward pass of a
    window of that length with every position used, before any work (RoBERTa and XLM-R take two
    positions fewer than their max_position_embeddings)."""
    import torch
    positions = getattr(encoder.config, "max_position_embeddings", None)
    token = 1 if getattr(encoder.config, "pad_token_id", None) == 0 else 0  # not padding
    ids = torch.full((1, length), token, dtype=torch.long)
    try:
        with torch.no_grad():
            encoder(input_ids=ids, attention_mask=torch.ones_like(ids))
    except (IndexError, RuntimeError, ValueError) as e:
        die(f"{flag}: windows of {length} tokens do not fit the encoder (max_position_embeddings"
            f" {positions}: {str(e).splitlines()[0][:80]})")


def _ids(tokenizer, texts, batch_size=4096):
    """Word-piece ids of each text (no special tokens), tokenized in batches by the fast
    tokenizer."""
    out = []
    for i in range(0, len(texts), batch_size):
        out.extend(tokenizer(texts[i:i + batch_size], add_special_tokens=False,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"])
    return out


def prefix_ids(tokenizer, texts, n_pieces, batch_size=4096):
    """The first `n_pieces` word-piece ids of each text, identical to tokenizing the whole text
    and cutting: only a prefix of whitespace words is tokenized, and it is widened for the few
    texts whose prefix gives too few pieces (words that tokenize to nothing)."""
    out = [None] * len(texts)
    todo = list(range(len(texts)))
    width = max(1, n_pieces)
    while todo:
        words = [texts[i].split(None, width) for i in todo]  # the first `width` words, + the rest
        pieces = _ids(tokenizer, [" ".join(w[:width]) for w in words], batch_size)
        again = []
        for i, w, p in zip(todo, words, pieces):
            if len(p) >= n_pieces or len(w) <= width:
                out[i] = p[:n_pieces]
            else:
                again.append(i)
        todo, width = again, width * 2
    return out


def marker_ids(tokenizer):
    """Ids of [unused0], [unused1], [unused2]."""
    return tokenizer.convert_tokens_to_ids([MENTION_START, MENTION_END, TITLE_END])


WINDOW_CHUNK = 8192  # windows made at a time: a whole split's Python id lists never exist at once


def in_chunks(n, rows_of, chunk=WINDOW_CHUNK):
    """The rows of rows_of(start, end) over consecutive chunks of range(n), one chunk's lists
    alive at a time (a whole split's took several times the memory of the padded tensors)."""
    for s in range(0, n, chunk):
        yield from rows_of(s, min(n, s + chunk))


def pad_rows(rows, max_len, pad_id, n=None):
    """Id lists as padded (N, max_len) int32 ids and their uint8 attention mask (1 for tokens):
    5 bytes a token where int64 took 16 (a process holds every window of the three splits, pinned
    on a GPU); the models take them as int64 (Retriever._vectors, reranker.collate). `rows` may
    be a generator (such as in_chunks'), `n` then the number it yields."""
    n = len(rows) if n is None else n
    ids = np.full((n, max_len), pad_id, dtype=np.int32)   # (N, L)
    mask = np.zeros((n, max_len), dtype=np.uint8)          # (N, L)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def mention_contexts(zeshel, mentions, width):
    """(left, mention, right) whitespace strings of each mention, `width` words each side."""
    out = []
    for m in mentions:
        tokens = zeshel.context_tokens(m)
        s, e = m["start_index"], m["end_index"]
        out.append((" ".join(tokens[max(0, s - width):s]), " ".join(tokens[s:e + 1]),
                    " ".join(tokens[e + 1:e + 1 + width])))
    return out


def _context_ids(tokenizer, zeshel, mentions, width):
    ctx = mention_contexts(zeshel, mentions, width)
    return (_ids(tokenizer, [c[i] for c in ctx]) for i in range(3))


def encode_mentions(tokenizer, zeshel, mentions, max_len):
    """Retriever mention windows as `[CLS] window [SEP]` padded ids and masks, (M, max_len) each."""
    start, end, _ = marker_ids(tokenizer)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id

    def rows(a, b):
        left, mention, right = _context_ids(tokenizer, zeshel, mentions[a:b], max_len - 1)
        return [[cls] + retriever_mention_window(l, m, r, max_len, start, end) + [sep]
                for l, m, r in zip(left, mention, right)]
    return pad_rows(in_chunks(len(mentions), rows), max_len, tokenizer.pad_token_id,
                    n=len(mentions))


def encode_entities(tokenizer, entities, max_len):
    """Retriever entity windows `[CLS] title [unused2] text [SEP]` padded, (E, max_len) each."""
    title_end = marker_ids(tokenizer)[2]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id

    def rows(a, b):
        titles = _ids(tokenizer, list(entities.titles[a:b]))
        texts = prefix_ids(tokenizer, list(entities.texts[a:b]), max_len - 2)
        return [[cls] + retriever_entity_window(t, x, max_len, title_end) + [sep]
                for t, x in zip(titles, texts)]
    return pad_rows(in_chunks(len(entities.titles), rows), max_len, tokenizer.pad_token_id,
                    n=len(entities.titles))


def reranker_mention_ids(tokenizer, zeshel, mentions, L, inputmark=False):
    """Each mention's reranker window as a list of ids (no special tokens)."""
    start, end, _ = marker_ids(tokenizer)
    budget = reranker_mention_budget(L)
    left, mention, right = _context_ids(tokenizer, zeshel, mentions, budget)
    return [reranker_mention_window(l, m, r, budget, inputmark, start, end)
            for l, m, r in zip(left, mention, right)]


def reranker_entity_ids(tokenizer, texts, L):
    """Each entity's reranker prefix as a list of ids: the first words of its text (not the
    title), word-piece tokenized, cut to the entity budget L - 3 - (L - 3) // 2."""
    n = L - 3 - reranker_mention_budget(L)
    return [p[:n] for p in _ids(tokenizer, [" ".join(t.split(None, n)[:n]) for t in texts])]


# ----------------------------------------------------------------------------------------------
# `python data_loader.py --data_dir DATA`: check a Zeshel folder and print what it holds.

def summary_lines(zeshel):
    lines = [f"{'split':<22}{'worlds':>7}{'entities':>10}{'mentions':>10}"]
    for split, mentions in zeshel.mentions.items():
        entities = zeshel.entities(split)
        lines.append(f"{split:<22}{len(entities.worlds):>7}{len(entities):>10}{len(mentions):>10}")
    return lines


def main(argv=None):
    import argparse
    from run_safety import main as cli_main

    @cli_main
    def run():
        parser = argparse.ArgumentParser(description="Check a Zeshel folder and summarise it.")
        parser.add_argument("--data_dir", required=True, help="Zeshel folder (documents/, mentions/)")
        parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits")
        args = parser.parse_args(argv)
        zeshel = Zeshel(args.data_dir, [s for s in args.splits.split(",") if s])
        print("\n".join(summary_lines(zeshel)))
        print(f"{args.data_dir}: all mentions check out")
    run()


if __name__ == "__main__":
    main()

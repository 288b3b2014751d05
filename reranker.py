"""The reranker (docs/DESIGN.md#reranker): candidate preparation, a mention's (C, L) inputs built
on the fly, the full cross-encoder (and the retriever scorers over the same candidates), and the
linking accuracies.

- candidates: `prepare_candidates` (pure), `candidate_indices`;
- inputs, one builder each: `encode_pair_windows` and `PairDataset` for the cross-encoder,
  `encode_retriever_windows` and `WindowDataset` for the retriever scorers (windows of the
  entities the candidates use, kept as `PackedIds`; one mention's inputs per item), `collate`;
- models: `FullRanker` (`--type_model full`), `RetrieverRanker` (dual, multi_vector, poly,
  sum_max: retriever.Retriever's encoders and scorer), `build_ranker`, `gold_on_top`; both return
  scores (B, C), gold first, for `retriever.nce_loss`;
- metrics: `linking_accuracy` (per world, macro and micro; pure), `results_entry`.

`main_reranker.py` holds the run itself.
"""
import inspect
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from data_loader import (encode_entities, encode_mentions, freeze_objects, pad_rows,
                         reranker_entity_ids, reranker_mention_ids, reranker_pair)
from retriever import TYPE_MODELS as RETRIEVER_SCORERS, Retriever
from cli import die
from utils import encode_in_shares, gather_shares

# --type_model: the cross-encoder, or a retriever scorer over the same candidates
TYPE_MODELS = ("full",) + RETRIEVER_SCORERS
# Dropout on the pooled [CLS] output before the score layer, as the original
SCORE_DROPOUT = 0.1


# ----------------------------------------------------------------------------------------------
# Candidates

def prepare_candidates(candidates, gold, C, training):
    """One mention's candidates, gold first: the first `C` of `candidates` (best first) with the
    gold moved to index 0. Training: a gold missing from them is put in front and the list keeps
    C candidates in all (the C-th drops out), as the original. Evaluation: None when the gold is
    missing (the mention leaves the normalized set). See docs/DESIGN.md#reranker.

    >>> prepare_candidates(["a", "b", "g", "c"], "g", 3, training=False)
    ['g', 'a', 'b']
    >>> prepare_candidates(["a", "b", "c", "g"], "g", 3, training=True)
    ['g', 'a', 'b']
    >>> prepare_candidates(["a", "b", "c", "g"], "g", 3, training=False) is None
    True
    """
    first = list(candidates[:C])
    if gold not in first:
        if not training:
            return None
        first = first[:C - 1]
    return [gold] + [c for c in first if c != gold]


def candidate_indices(entities, mentions, cands, C, training, path):
    """Entity indices of each mention's prepared candidates, gold at 0.

    entities: the split's EntitySet; cands: {mention_id: [document ids]}
    (data_loader.read_candidates); path: the candidates file, named in errors.
    Returns (rows, kept): rows[i] is an int64 array of mention i's candidate indices (None where
    the mention is dropped in evaluation), kept (M,) bool: the gold is among the first C
    candidates.
    """
    rows, kept = [], np.zeros(len(mentions), dtype=bool)
    for i, m in enumerate(mentions):
        world = m["corpus"]
        for doc in cands[m["mention_id"]][:C]:
            if (world, doc) not in entities.index:
                die(f"{path}: candidate {doc!r} of mention {m['mention_id']} is not a document "
                    f"of its world {world!r}")
        docs = prepare_candidates(cands[m["mention_id"]], m["label_document_id"], C, training)
        kept[i] = m["label_document_id"] in cands[m["mention_id"]][:C]
        rows.append(None if docs is None else
                    np.asarray([entities.index[(world, d)] for d in docs], dtype=np.int64))
    return rows, kept


# ----------------------------------------------------------------------------------------------
# Token ids, kept compactly (49,275 mention windows and the entity prefixes of the full train split
# as Python lists would take gigabytes, and be copied into every loader worker)

class PackedIds:
    """Variable-length id rows in one flat int32 array with offsets; `ids[i]` is row i as a list."""

    def __init__(self, rows):
        rows = list(rows)
        self.offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum([len(r) for r in rows])
        self.flat = np.fromiter((t for r in rows for t in r), dtype=np.int32,
                                count=int(self.offsets[-1]))

    @classmethod
    def join(cls, parts):
        """One PackedIds of the rows of `parts` (PackedIds) one after the other."""
        out = cls([])
        if parts:
            shifts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
            out.offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts)])
            out.flat = np.concatenate([p.flat for p in parts])
        return out

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.flat[self.offsets[i]:self.offsets[i + 1]].tolist()

    def gathered(self, bounds, rt):
        """Under torchrun, where process r holds rows bounds[r] = (start, end) as this
        PackedIds: all of them, in every process (utils.gather_shares)."""
        if rt is None or not rt.distributed:
            return self
        lengths = gather_shares(torch.from_numpy(np.diff(self.offsets)), bounds, rt)
        out = PackedIds([])
        out.offsets = np.concatenate([[0], np.cumsum(lengths.numpy())])
        flat_bounds = [(int(out.offsets[a]), int(out.offsets[b])) for a, b in bounds]
        out.flat = gather_shares(torch.from_numpy(self.flat), flat_bounds, rt).numpy()
        return out


def _unpadded(ids, mask):
    """Rows of a padded (N, L) id tensor without their padding."""
    return [row[:n].tolist() for row, n in zip(ids, mask.sum(1).tolist())]


def _pack_split(zeshel, split, rows, mention_windows, entity_windows, chunk, rt):
    """(mention windows, entity windows, rows) of a split: `mention_windows(mentions)` and
    `entity_windows(entity indices)` give id lists, for the entities the candidates `rows` use
    only; the returned rows index the entity windows instead of the EntitySet. Windows are packed
    `chunk` at a time (the Python id lists of a whole split took about ten times the packed
    arrays' memory); under torchrun each process tokenizes a share and every process gets them
    all."""
    mentions, entities = zeshel.mentions[split], zeshel.entities(split)
    freeze_objects()  # the model and tokenizer too: the collector need not walk them meanwhile
    used = np.unique(np.concatenate([r for r in rows if r is not None] or [np.zeros(0, np.int64)]))
    position = np.full(len(entities), -1, dtype=np.int64)
    position[used] = np.arange(len(used))

    def packed(items, windows):
        def share(start, end):
            return [PackedIds.join([PackedIds(windows(items[s:min(s + chunk, end)]))
                                    for s in range(start, end, chunk)])]
        return encode_in_shares(len(items), share, rt, PackedIds.gathered)[0]
    return (packed(mentions, mention_windows), packed(used, entity_windows),
            [None if r is None else position[r] for r in rows])


def encode_pair_windows(tokenizer, zeshel, split, rows, L, inputmark=False, chunk=4096, rt=None):
    """The cross-encoder's inputs (`--type_model full`), to be joined into pairs by PairDataset:
    each mention's reranker window and each candidate entity's text prefix
    (docs/DESIGN.md#reranker). Returns (mention_ids, entity_ids, rows) (_pack_split)."""
    entities = zeshel.entities(split)
    return _pack_split(
        zeshel, split, rows,
        lambda part: reranker_mention_ids(tokenizer, zeshel, part, L, inputmark),
        lambda part: reranker_entity_ids(tokenizer, [entities.texts[i] for i in part], L),
        chunk, rt)


def encode_retriever_windows(tokenizer, zeshel, split, rows, L, chunk=4096, rt=None):
    """The retriever scorers' inputs (dual, multi_vector, poly, sum_max), for WindowDataset: the
    retriever's `[CLS] window [SEP]` mention and entity windows of L tokens
    (docs/DESIGN.md#windows). Returns (mention_ids, entity_ids, rows) (_pack_split)."""
    entities = zeshel.entities(split)

    def entity_windows(part):
        subset = SimpleNamespace(titles=[entities.titles[i] for i in part],
                                 texts=[entities.texts[i] for i in part])
        return _unpadded(*encode_entities(tokenizer, subset, L))
    return _pack_split(zeshel, split, rows,
                       lambda part: _unpadded(*encode_mentions(tokenizer, zeshel, part, L)),
                       entity_windows, chunk, rt)


# ----------------------------------------------------------------------------------------------
# A mention's inputs, built when asked for: only the windows are kept, never the inputs of a
# whole split (49,275 x 64 x 256 ids for Zeshel train)

class CandidateDataset(Dataset):
    """One mention and its candidates (gold first) per item; `mentions` index rows and
    mention_ids (the windows of encode_pair_windows or encode_retriever_windows)."""

    def __init__(self, mentions, rows, mention_ids, entity_ids, L, tokenizer):
        self.mentions = [int(i) for i in mentions]
        self.rows, self.mention_ids, self.entity_ids = rows, mention_ids, entity_ids
        self.L = L
        self.special = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)

    def __len__(self):
        return len(self.mentions)

    def windows(self, i):
        """(mention index, its window, its candidates' windows)."""
        m = self.mentions[i]
        return m, self.mention_ids[m], [self.entity_ids[e] for e in self.rows[m]]


class PairDataset(CandidateDataset):
    """`full`: item i is (mention index, ids, token types, mask), each (C_i, L_i): the
    `[CLS] mention [SEP] entity [SEP]` pairs (data_loader.reranker_pair), cut to the longest."""

    def __getitem__(self, i):
        m, window, entities = self.windows(i)
        pairs = [reranker_pair(window, e, self.L, *self.special) for e in entities]
        ids, types, mask = (torch.tensor([p[k] for p in pairs], dtype=torch.long) for k in range(3))
        width = int(mask.sum(1).max())
        return m, ids[:, :width], types[:, :width], mask[:, :width]  # (C_i, L_i) each


class WindowDataset(CandidateDataset):
    """The retriever scorers: item i is (mention index, mention ids, mention mask (1, L),
    candidate ids, candidate mask (C_i, L)), padded to L as the retriever's windows: without codes
    the first token states are the vectors, padding included, so a batch must not change them."""

    def __getitem__(self, i):
        m, window, entities = self.windows(i)
        pad = self.special[2]
        return (m, *pad_rows([window], self.L, pad), *pad_rows(entities, self.L, pad))


def collate(items):
    """Stack CandidateDataset items: (mention indices (B,), *tensors (B, C, L)), each tensor
    zero-padded to the batch's most candidates and longest row (a missing candidate's row is all
    zero, its mask too)."""
    out = []
    for k in range(1, len(items[0])):
        parts = [it[k] for it in items]
        C, L = (max(p.shape[d] for p in parts) for d in (0, 1))
        t = torch.zeros((len(parts), C, L), dtype=torch.long)  # (B, C, L)
        for b, p in enumerate(parts):
            t[b, :p.shape[0], :p.shape[1]] = p
        out.append(t)
    return (torch.tensor([it[0] for it in items], dtype=torch.long), *out)


# ----------------------------------------------------------------------------------------------
# The full cross-encoder

class FullRanker(nn.Module):
    """BERT over each pair, pooled [CLS] output -> dropout (SCORE_DROPOUT) -> linear score.

    The score layer is initialized normal with std `init` when init > 0, else the encoder's
    initializer_range, bias 0; it runs in float32 outside autocast so that near scores stay
    distinct under bfloat16.
    """

    def __init__(self, encoder, init=0.0):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(SCORE_DROPOUT)
        self.score = nn.Linear(encoder.config.hidden_size, 1)
        std = init if init > 0 else encoder.config.initializer_range
        nn.init.normal_(self.score.weight, std=std)
        nn.init.zeros_(self.score.bias)
        # Segment ids only for encoders that have segment embeddings (BERT, ELECTRA, ALBERT):
        # RoBERTa has one type, DistilBERT none.
        self.use_types = (getattr(encoder.config, "type_vocab_size", 0) or 0) >= 2 and \
            "token_type_ids" in inspect.signature(encoder.forward).parameters

    def forward(self, ids, types, mask):
        """ids, types, mask (B, C, L) -> scores (B, C), float32. A row whose mask is all zero (a
        missing candidate) is not encoded and scores -inf."""
        B, C, L = ids.shape
        present = mask[:, :, 0].reshape(-1).bool()  # (B*C,) a real pair attends to its [CLS]
        segments = {"token_type_ids": types.view(B * C, L)[present]} if self.use_types else {}
        out = self.encoder(input_ids=ids.view(B * C, L)[present],
                           attention_mask=mask.view(B * C, L)[present], **segments)
        pooled = getattr(out, "pooler_output", None)
        pooled = pooled if pooled is not None else out.last_hidden_state[:, 0]
        with torch.autocast(device_type=ids.device.type, enabled=False):
            s = self.score(self.dropout(pooled.float())).squeeze(-1)  # (P,)
        scores = torch.full((B * C,), float("-inf"), dtype=s.dtype, device=s.device)
        scores = scores.index_put((present.nonzero().squeeze(-1),), s)
        return scores.view(B, C)


class RetrieverRanker(nn.Module):
    """`--type_model dual / multi_vector / poly / sum_max`: the retriever's two encoders and scorer
    (retriever.Retriever, docs/DESIGN.md#scorers) over each mention's candidates, trained as the
    cross-encoder."""

    def __init__(self, retriever):
        super().__init__()
        self.retriever = retriever

    def forward(self, mention_ids, mention_mask, cand_ids, cand_mask):
        """mention_ids, mention_mask (B, 1, L); cand_ids, cand_mask (B, C, L) -> scores (B, C).
        A missing candidate (a mask all zero: a mention with fewer than C) is not encoded and
        scores -inf (Retriever.forward, index -1)."""
        B, C, L = cand_ids.shape
        present = cand_mask[:, :, 0].reshape(-1).bool()          # (B*C,) a window's first token
        index = (present.cumsum(0) - 1).masked_fill(~present, -1).view(B, C)    # (B, C) rows
        return self.retriever(mention_ids[:, 0], mention_mask[:, 0],
                              cand_ids.view(B * C, L)[present], cand_mask.view(B * C, L)[present],
                              index)


def build_ranker(type_model, encoder, init=0.0, num_mention_vecs=8, num_entity_vecs=8,
                 mention_use_codes=False, entity_use_codes=False):
    """The model `--type_model` names, around a pretrained encoder: FullRanker for `full`, else
    the retriever scorer (whose entity encoder starts as a copy of the mention encoder)."""
    if type_model == "full":
        return FullRanker(encoder, init)
    return RetrieverRanker(Retriever(encoder, type_model, num_mention_vecs, num_entity_vecs,
                                     mention_use_codes, entity_use_codes))


def gold_on_top(scores):
    """(B,) bool: the gold (index 0) scores strictly above every other candidate (a tie counts as
    wrong, so a constant model cannot score 100%)."""
    if scores.shape[1] == 1:
        return torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    return scores[:, 0] > scores[:, 1:].max(dim=1).values


# ----------------------------------------------------------------------------------------------
# Linking accuracy (percent)

def linking_accuracy(worlds, kept, correct):
    """Accuracies of one split, in percent.

    worlds: the world of every mention of the split (M,); kept (M,) bool: the gold is among the
    candidates; correct (M,) bool: the gold was ranked first (False where not kept).
    Normalized = correct / kept, unnormalized = correct / mentions, per world; `macro` is the
    mean over every world (a world at 0 counts too), `micro` pools the mentions.

    >>> r = linking_accuracy(["a", "a", "b", "b"], [1, 1, 1, 0], [1, 0, 0, 0])
    >>> r["macro"], r["micro"]
    ({'acc_unorm': 25.0, 'acc_norm': 25.0}, {'acc_unorm': 25.0, 'acc_norm': 33.333333333333336})
    """
    worlds = np.asarray(worlds)
    kept, correct = np.asarray(kept, dtype=bool), np.asarray(correct, dtype=bool)
    if (correct & ~kept).any():
        raise ValueError("a mention counted correct whose gold is not among its candidates")

    def acc(num, den):
        return 100.0 * num / den if den else 0.0

    per_world = {}
    for w in sorted(set(worlds.tolist())):
        sel = worlds == w
        c, k, n = int(correct[sel].sum()), int(kept[sel].sum()), int(sel.sum())
        per_world[w] = {"acc_unorm": acc(c, n), "acc_norm": acc(c, k), "correct": c, "kept": k,
                        "mentions": n}
    macro = {key: float(np.mean([v[key] for v in per_world.values()])) if per_world else 0.0
             for key in ("acc_unorm", "acc_norm")}
    c, k, n = int(correct.sum()), int(kept.sum()), len(worlds)
    micro = {"acc_unorm": acc(c, n), "acc_norm": acc(c, k)}
    return {"macro": macro, "micro": micro, "per_world": per_world}


def results_entry(report, eval_method, epoch=None):
    """A results.json entry: the accuracies `eval_method` (macro or micro) asks for on top."""
    return {"epoch": epoch, **report[eval_method], **report}

"""The retriever (docs/DESIGN.md#scorers, #negatives, #candidates): the scorer registry, the
two encoders with optional learned codes, the NCE loss, the negatives, and streaming top-k scoring
of mentions against a whole entity set.

Everything that `main_retriever.py`, `save_candidates.py` and the reranker's retriever scorers
share lives here, once:

- scorers: `SCORERS`, one table of the four (`dual`, `multi_vector`, `poly`, `sum_max`): each a
  pure function of the dot products g[..., i, j] = <u_i, v_j> between a mention's vectors u and an
  entity's vectors v, over any leading dimensions, and how many vectors each side gives.
  `paired_interactions` gives g for each mention's own candidates (training),
  `all_pairs_interactions` for every mention against every entity by one matrix product
  (evaluation, mining, candidates); both feed the same scorer. A new scorer is one function and
  one row of `SCORERS`; every script's `--type_model` choices come from it.
- `Retriever`: mention encoder + entity encoder (a copy of the first at the start),
  `CodeAttention`; it encodes a batch's distinct entities once and returns the scores of each
  mention's candidates, given as rows of those entity vectors, gold first (`batch_scores`; under
  torchrun the shared golds of in-batch negatives are gathered with their gradients,
  `gather_rows`).
- `nce_loss`: the loss of both trainers over such scores (with the `hard_adjusted_negative`
  correction `adjust_negative_scores`).
- negatives: `epoch_negatives` (one call per epoch: what `--type_cands` asks for, mined with the
  current model) and its `EpochNegatives.batch` (a process's share of a batch as
  `BatchCandidates`: the entities to encode and each mention's candidates as rows of them);
  underneath `candidate_counts`, `sample_random_negatives`, `training_candidates`,
  `in_batch_candidates`, `distinct`, `mine_hard_negatives` (top-k, or a sample from
  softmax(smoothing * scores) through `GumbelTopK`). A new sampler is a change of
  `EpochNegatives.batch`: the model takes any index.
- `stream_scores`: entities are encoded chunk by chunk, scored against every mention, folded into
  running top-k lists (`TopK`, `GumbelTopK`) and dropped. The vectors of a whole entity set are
  never held; a stored entity index (entity_index.py: the original's `--store_en_hiddens`) can
  give each chunk's vectors instead.
- `encode_retriever_split`, `rank_split`, `recall_table`, `ranking_entry`: a split's tensors,
  its rankings and metrics.
"""
import contextlib
import copy
import math
import random
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data_loader import (encode_entities, encode_mentions, freeze_objects, load_encoder,
                         load_tokenizer)
from cli import check_flag, check_positive
from utils import autocast, encode_in_shares, progress

TYPE_CANDS = ("mixed_negative", "hard_negative", "hard_adjusted_negative", "random_negative",
              "in_batch", "in_batch_hard")
# The --type_cands whose negatives include the other golds of the batch
IN_BATCH = ("in_batch", "in_batch_hard")
# Dot products per block of mentions in `stream_scores` (M_b x m x E_c x n float32 elements):
# 2 GB on a GPU, 64 MB on a CPU.
SCORE_BLOCK_ELEMENTS = {"cuda": 2 ** 29, "cpu": 2 ** 24}


# ----------------------------------------------------------------------------------------------
# Scorers: pure functions of the dot products g = <u_i, v_j>, shape (..., m, n) -> (...) float32.
# Scores are computed and ranked in float32 under every precision (docs/DESIGN.md#precision):
# under --bf16 / --fp16 the vectors are kept in that dtype, but g is accumulated and returned in
# float32 (all_pairs_interactions), so that close scores never merge into ties.

def paired_interactions(u, v):
    """Dot products of each mention's vectors with those of its own candidates.

    u: (B, m, d) mention vectors, v: (B, C, n, d) candidate vectors -> (B, C, m, n).
    """
    return torch.einsum("bmd,bcnd->bcmn", u, v)


def all_pairs_interactions(u, v):
    """Dot products of every mention vector with every entity vector, as one matrix product.

    u: (M, m, d), v: (E, n, d) -> (M, E, m, n) float32, a view of an (M, m, E, n) product:
    M * m * E * n elements, so callers pass blocks sized to a memory budget (see stream_scores).
    Half-precision vectors are multiplied with float32 accumulation and a float32 result.

    >>> all_pairs_interactions(torch.ones(2, 3, 4), torch.ones(5, 6, 4)).shape
    torch.Size([2, 5, 3, 6])
    """
    M, m, d = u.shape
    E, n, _ = v.shape
    g = float32_product(u.reshape(M * m, d), v.reshape(E * n, d).T)
    return g.view(M, m, E, n).transpose(1, 2)


def float32_product(a, b):
    """a @ b, (R, d) x (d, C) -> (R, C) float32 whatever the inputs' dtype: on a GPU one
    half-precision tensor-core product with a float32 output where torch offers it
    (torch.mm's out_dtype), else the product of the float32 inputs (the same values, to the
    order of summation).

    >>> float32_product(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3, 1)).dtype
    torch.float32
    """
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        with contextlib.suppress(RuntimeError, TypeError):
            return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def dual_scores(g):
    """`dual`: s = <u_1, v_1>.  g: (..., m, n) -> (...) float32.

    >>> dual_scores(torch.tensor([[[2., 5.], [7., 1.]]]))
    tensor([2.])
    """
    return g[..., 0, 0].float()


def multi_vector_scores(g):
    """`multi_vector`: s = max_j <u_1, v_j>.  g: (..., m, n) -> (...) float32.

    >>> multi_vector_scores(torch.tensor([[[2., 5.], [7., 1.]]]))
    tensor([5.])
    """
    return g[..., 0, :].amax(-1).float()


def sum_of_max_scores(g):
    """`sum_max`: s = sum_i max_j <u_i, v_j>.  g: (..., m, n) -> (...) float32.

    >>> sum_of_max_scores(torch.tensor([[[2., 5.], [7., 1.]]]))
    tensor([12.])
    """
    return g.amax(-1).float().sum(-1)


def poly_scores(g):
    """`poly`: each entity vector v_j attends over the mention vectors, a_j = sum_i
    softmax_i(<v_j, u_i>) u_i, and s = sum_j <a_j, v_j> = sum_j sum_i softmax_i(g_ij) g_ij.
    g: (..., m, n) -> (...) float32 (three float32 copies of g in memory).

    >>> poly_scores(torch.tensor([[[1., 0.], [1., 0.]]]))
    tensor([1.])
    """
    g = g.float()
    return (g.softmax(-2) * g).sum((-2, -1))


@dataclass(frozen=True)
class Scorer:
    """A row of the scorer registry: the score function of the dot products g (..., m, n) ->
    (...) float32, and whether the mention (entity) side takes all its --num_*_vecs vectors or
    only the first. Calling it scores: `SCORERS["sum_max"](g)`."""
    score: object
    all_mention_vecs: bool
    all_entity_vecs: bool

    def __call__(self, g):
        return self.score(g)


# The scorer registry (docs/DESIGN.md#scorers): a new scorer is a function above and a row here.
SCORERS = {"dual": Scorer(dual_scores, False, False),
           "multi_vector": Scorer(multi_vector_scores, False, True),
           "poly": Scorer(poly_scores, True, True),
           "sum_max": Scorer(sum_of_max_scores, True, True)}
TYPE_MODELS = tuple(SCORERS)


def vector_counts(type_model, num_mention_vecs, num_entity_vecs):
    """(m, n): how many vectors the mention and entity sides give for a scorer of SCORERS.

    >>> vector_counts("multi_vector", 8, 16)
    (1, 16)
    """
    scorer = SCORERS[type_model]
    return (num_mention_vecs if scorer.all_mention_vecs else 1,
            num_entity_vecs if scorer.all_entity_vecs else 1)


def add_scorer_args(parser, type_models=TYPE_MODELS, default="dual", vecs=8, note=""):
    """--type_model (choices from the registry) and the vector flags of a retriever scorer, with
    the original's defaults (save_candidates: None, read from the checkpoint; `note` says so)."""
    parser.add_argument("--type_model", default=default, choices=type_models, help=note or None)
    for side in ("mention", "entity"):
        parser.add_argument(f"--num_{side}_vecs", type=int, default=vecs,
                            help=f"{side} vectors of multi-vector scorers{note and '; ' + note}")
    for side in ("mention", "entity"):
        parser.add_argument(f"--{side}_use_codes", action="store_true",
                            default=None if vecs is None else False,
                            help=f"{side} vectors from learned codes attending over the tokens")


def check_scorer_args(args, length, length_flag):
    """--num_*_vecs positive and, without codes, the vectors the scorer takes of a side
    (vector_counts) no more than the `length` token states of a window (`length_flag`)."""
    check_positive(args, "num_mention_vecs", "num_entity_vecs")
    used = vector_counts(args.type_model, args.num_mention_vecs, args.num_entity_vecs)
    for side, n in zip(("mention", "entity"), used):  # dual takes one vector: no --num_*_vecs
        check_flag(getattr(args, f"{side}_use_codes") or n <= length, f"--num_{side}_vecs",
                   f"{n} token states asked for but {length_flag} is {length} (lower "
                   f"--num_{side}_vecs or raise {length_flag})")


# ----------------------------------------------------------------------------------------------
# The model

class CodeAttention(nn.Module):
    """Learned code vectors (hidden size, init normal with std `initializer_range`), each attending
    over a sequence's token states with padding masked, giving one vector per code."""

    def __init__(self, num_codes, hidden_size, initializer_range):
        super().__init__()
        self.codes = nn.Parameter(torch.empty(num_codes, hidden_size))  # (k, d)
        nn.init.normal_(self.codes, std=initializer_range)

    def forward(self, hidden, mask):
        """hidden: (B, L, d) token states, mask: (B, L) 1 for tokens -> (B, k, d) float32 (in
        float32 under autocast too)."""
        with torch.autocast(hidden.device.type, enabled=False):
            hidden = hidden.float()
            logits = torch.einsum("kd,bld->bkl", self.codes.float(), hidden)  # (B, k, L)
            logits = logits.masked_fill(mask[:, None, :] == 0, float("-inf"))
            return torch.einsum("bkl,bld->bkd", logits.softmax(-1), hidden)


def adjust_negative_scores(scores, log_q):
    """`hard_adjusted_negative` (docs/DESIGN.md#negatives): subtract log(K q) from each
    negative's score, K the number of negatives; the gold (column 0) is left as it is.
    scores: (B, 1 + K), log_q: (B, K) log-probabilities of the sampled negatives -> (B, 1 + K).

    >>> adjust_negative_scores(torch.tensor([[1., 2., 3.]]), torch.log(torch.tensor([[.5, .25]])))
    tensor([[1.0000, 2.0000, 3.6931]])
    """
    K = log_q.shape[1]
    return torch.cat([scores[:, :1], scores[:, 1:] - (math.log(K) + log_q)], 1)


def nce_loss(scores, log_q=None):
    """The NCE loss of both trainers (docs/DESIGN.md#training): the cross-entropy of each
    mention's candidate scores with the gold at index 0, meaned over the batch, in float32.

    scores: (B, 1 + K), gold first (-inf for a missing candidate: it takes no part); log_q: (B, K)
    log-probabilities of sampled negatives (`hard_adjusted_negative`: log(K q) is subtracted from
    each negative's score first, see adjust_negative_scores) or None -> () float32.

    >>> round(nce_loss(torch.tensor([[2., 0., float("-inf")]])).item(), 4)
    0.1269
    """
    scores = scores.float()
    if log_q is not None:
        scores = adjust_negative_scores(scores, log_q.float())
    return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long,
                                               device=scores.device))


class Retriever(nn.Module):
    """Two encoders of one pretrained model; the entity encoder starts as a copy of the mention
    encoder. Without codes a side's vectors are the first m (n) token states, padding included
    (as the original); with codes, `CodeAttention` over all tokens. The encoders' pooler is
    dropped: it is never used, and an unused parameter would stall DistributedDataParallel."""

    def __init__(self, encoder, type_model, num_mention_vecs, num_entity_vecs,
                 mention_use_codes=False, entity_use_codes=False):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        self.mention_encoder = encoder
        self.entity_encoder = copy.deepcopy(encoder)
        self.type_model = type_model
        self.scorer = SCORERS[type_model]
        self.m, self.n = vector_counts(type_model, num_mention_vecs, num_entity_vecs)
        d, std = encoder.config.hidden_size, encoder.config.initializer_range
        self.mention_codes = CodeAttention(self.m, d, std) if mention_use_codes else None
        self.entity_codes = CodeAttention(self.n, d, std) if entity_use_codes else None
        # GPUs a training forward splits each encoder's windows over (one process with several
        # GPUs, as the original's DataParallel; a DataParallel of the whole forward would split
        # the entity windows apart from the index into them), or None
        self.replicas = None

    def _vectors(self, encoder, codes, count, ids, mask):
        inputs = {"input_ids": ids.long(), "attention_mask": mask.long()}  # kept int32 / uint8
        if self.replicas and self.training:  # one process, several GPUs: the windows split
            out = nn.parallel.data_parallel(encoder, (), self.replicas, module_kwargs=inputs)
        else:
            out = encoder(**inputs)
        hidden = out.last_hidden_state                                               # (B, L, d)
        mask = inputs["attention_mask"]
        return codes(hidden, mask) if codes is not None else hidden[:, :count].float()

    def mention_vectors(self, ids, mask):
        """ids, mask: (B, L) -> (B, m, d) float32."""
        return self._vectors(self.mention_encoder, self.mention_codes, self.m, ids, mask)

    def entity_vectors(self, ids, mask):
        """ids, mask: (B, L) -> (B, n, d) float32."""
        return self._vectors(self.entity_encoder, self.entity_codes, self.n, ids, mask)

    def forward(self, mention_ids, mention_mask, entity_ids, entity_mask, index, shared=None):
        """The scores of each mention's candidates (gold first, for `nce_loss`), the candidates
        given as rows of the batch's entity vectors, each entity encoded once
        (docs/DESIGN.md#negatives; EpochNegatives.batch makes these inputs).

        mention_ids, mention_mask: (b, L); entity_ids, entity_mask: (N, L) the entities this
        process encodes, all in one forward; index: (b, C) each mention's candidates as rows of
        the batch's entity vectors, -1 for a missing one (it scores -inf); shared: None, or the
        number of entities each process shares, `shared[r]` the first of process r's (the golds
        under in-batch negatives): the batch's entity vectors are then every process's shared
        ones in rank order, gathered with their gradients (gather_rows), followed by this
        process's others. -> (b, C) float32.
        """
        u = self.mention_vectors(mention_ids, mention_mask)                          # (b, m, d)
        v = self.entity_vectors(entity_ids, entity_mask)                             # (N, n, d)
        if shared is not None:
            mine = shared[torch.distributed.get_rank() if len(shared) > 1 else 0]
            v = torch.cat([gather_rows(v[:mine], shared), v[mine:]])  # (S + N - mine, n, d)
        with torch.autocast(u.device.type, enabled=False):  # scores in float32 (see Scorers)
            return batch_scores(self.scorer, u, v, index)                           # (b, C)


def batch_scores(scorer, u, v, index):
    """The scores of each mention's candidates, given as rows of the batch's entity vectors: one
    scorer call on their dot products (paired_interactions).

    u: (b, m, d) mention vectors, v: (N, n, d) entity vectors, index: (b, C) rows of v, -1 for a
    missing candidate -> (b, C) float32, -inf where missing.

    >>> v = torch.tensor([[[1., 0.]], [[2., 2.]]])  # two entities, one vector each
    >>> batch_scores(SCORERS["dual"], torch.ones(1, 1, 2), v, torch.tensor([[1, 0, -1]]))
    tensor([[4., 1., -inf]])
    """
    g = paired_interactions(u, v[index.clamp(min=0)])                               # (b, C, m, n)
    return scorer(g).masked_fill(index < 0, float("-inf"))


def gather_rows(rows, counts):
    """The rows every process holds, `counts[r]` of them on process r, concatenated in rank order
    in every process, with their gradients: torch.distributed.nn.functional.all_gather, whose
    backward sums over the processes the gradient of each process's rows (so DDP's mean over
    processes is the gradient of the whole batch's mean loss). In one process: `rows`.
    rows: (counts[rank], ...) -> (sum(counts), ...)."""
    if len(counts) == 1:
        return rows
    from torch.distributed.nn.functional import all_gather
    pad = rows.new_zeros((max(counts) - rows.shape[0], *rows.shape[1:]))  # all_gather: one shape
    parts = all_gather(torch.cat([rows, pad]))
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


# ----------------------------------------------------------------------------------------------
# The retriever of a pretrained encoder

def check_same_model(args, trained, path):
    """Stop unless a checkpoint trained with the arguments `trained` holds the model that these
    flags build: the same --type_model and, for a retriever scorer, the same codes and vector
    counts (the state dicts of dual, multi_vector and sum_max have one shape: loading cannot
    tell them apart)."""
    flags = ("type_model", "mention_use_codes", "entity_use_codes")
    for flag in flags if args.type_model in SCORERS else flags[:1]:
        check_flag(trained.get(flag) == getattr(args, flag), f"--{flag}",
                   f"{path} was trained with --{flag} {trained.get(flag)}, "
                   f"not {getattr(args, flag)}")
    if args.type_model not in SCORERS:
        return
    mine = vector_counts(args.type_model, args.num_mention_vecs, args.num_entity_vecs)
    theirs = vector_counts(trained["type_model"], trained.get("num_mention_vecs"),
                           trained.get("num_entity_vecs"))
    for side, a, b in zip(("mention", "entity"), mine, theirs):
        check_flag(a == b, f"--num_{side}_vecs",
                   f"{path} was trained with {b} {side} vectors, not {a}")


def load_retriever(pretrained, type_model, num_mention_vecs, num_entity_vecs,
                   mention_use_codes=False, entity_use_codes=False, flag="--pretrained"):
    """(tokenizer, Retriever) built from a pretrained folder or hub name (`flag`: what named it,
    in errors)."""
    tokenizer = load_tokenizer(pretrained, flag)
    encoder = load_encoder(pretrained, tokenizer, flag)
    return tokenizer, Retriever(encoder, type_model, num_mention_vecs, num_entity_vecs,
                                mention_use_codes, entity_use_codes)


# ----------------------------------------------------------------------------------------------
# Negatives

def candidate_counts(type_cands, num_cands, cands_ratio):
    """(num_rands, num_hards) per mention besides the in-batch ones (docs/DESIGN.md#negatives):
    mixed_negative and in_batch_hard draw int(C r) at random and mine the rest; hard_negative /
    hard_adjusted_negative sample all C; random_negative none; in_batch draws and mines nothing.

    >>> candidate_counts("mixed_negative", 64, 0.5), candidate_counts("hard_negative", 64, 0.5)
    ((32, 32), (0, 64))
    >>> candidate_counts("in_batch", 64, 0.5), candidate_counts("in_batch_hard", 64, 0.0)
    ((0, 0), (0, 64))
    """
    if type_cands in ("mixed_negative", "in_batch_hard"):
        num_rands = int(num_cands * cands_ratio)
        return num_rands, num_cands - num_rands
    if type_cands == "random_negative":
        return num_cands, 0
    if type_cands == "in_batch":
        return 0, 0
    return 0, num_cands


# --entity_windows: a training batch encodes a window per candidate (the original's), or each
# distinct entity once (faster where candidates repeat; other dropout draws). In-batch negatives
# always share the batch's golds.
ENTITY_WINDOWS = ("per_candidate", "distinct")
# --random_negatives: where an epoch's random negatives come from (docs/DESIGN.md#negatives)
RANDOM_NEGATIVES = ("original", "fresh")
# The original's dataset re-seeded Python's `random` with 42 whenever it was built, once per epoch
ORIGINAL_STREAM_SEED = 42


def random_negative_stream(kind, epoch_generator):
    """The stream an epoch's random negatives are drawn from, dealt to the mentions in the order
    they are visited: `original` (the default), Python's `random` seeded with 42 at the start of
    every epoch whatever --seed says, so that every epoch deals the same draws, position by
    position, as the original's dataset did; `fresh`, `epoch_generator` (a torch.Generator seeded
    by --seed and the epoch), so that every epoch draws anew."""
    return random.Random(ORIGINAL_STREAM_SEED) if kind == "original" else epoch_generator


def sample_random_negatives(golds, num_entities, num, stream=None):
    """For each gold, `num` entities drawn uniformly without replacement from all but the gold.

    golds: (B,) int64 -> (B, num) int64. Draws from the E - 1 other indices and shifts those at or
    above the gold by one. `stream` a random.Random (random_negative_stream's `original`): one
    `sample` of range(E - 1) per gold in turn, the very draws of the original's
    `random.sample(all entities but the gold, num)`. Else a torch.Generator (or None): rows with
    a repeat are redrawn whole, which keeps the draw uniform over distinct tuples; when repeats
    would be common (num^2 > E - 1) a random permutation is cut.

    >>> sample_random_negatives(torch.tensor([0, 5]), 10, 3, random.Random(42)).tolist()
    [[2, 1, 6], [4, 3, 1]]
    >>> rng = random.Random(42)  # the original's draws: a sample of the list without the gold
    >>> [rng.sample([e for e in range(10) if e != gold], 3) for gold in (0, 5)]
    [[2, 1, 6], [4, 3, 1]]
    """
    B, others = golds.shape[0], num_entities - 1
    if num == 0:
        return torch.empty(B, 0, dtype=torch.long)
    if isinstance(stream, random.Random):
        draws = torch.tensor([stream.sample(range(others), num) for _ in range(B)],
                             dtype=torch.long)
    elif num * num > others:
        draws = torch.rand(B, others, generator=stream).argsort(1)[:, :num]
    else:
        draws = torch.randint(others, (B, num), generator=stream)
        while True:
            ordered = draws.sort(1).values
            repeat = (ordered[:, 1:] == ordered[:, :-1]).any(1)
            if not repeat.any():
                break
            draws[repeat] = torch.randint(others, (int(repeat.sum()), num), generator=stream)
    return draws + (draws >= golds[:, None]).long()


def training_candidates(golds, num_entities, num_rands, hard=None, stream=None):
    """Candidates of a batch (docs/DESIGN.md#negatives): [gold] + random negatives drawn from
    `stream` (random_negative_stream) + mined ones.

    golds: (B,), hard: (B, H) or None -> (B, 1 + num_rands + H) entity indices, gold at 0.
    """
    parts = [golds[:, None], sample_random_negatives(golds, num_entities, num_rands, stream)]
    if hard is not None:
        parts.append(hard)
    return torch.cat(parts, 1)


def distinct(values):
    """The distinct values of a 1-d tensor in the order they first occur, and where each value
    is among them. values: (n,) -> (distinct (N,), rows (n,)), distinct[rows] == values.

    >>> distinct(torch.tensor([7, 3, 7, 5, 3]))
    (tensor([7, 3, 5]), tensor([0, 1, 0, 2, 1]))
    """
    ordered, rows = torch.unique(values, return_inverse=True)              # (N,) sorted, (n,)
    first = torch.full_like(ordered, len(values)).scatter_reduce(
        0, rows, torch.arange(len(values)), "amin")                      # (N,) first position
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return ordered[order], rank[rows]


def in_batch_candidates(cands):
    """Each mention's candidates with the golds of the batch's other mentions (in batch order)
    put after its own gold: cands (B, 1 + K), gold first -> (B, B + K). The caller masks, among
    columns 1..B-1, the repeats of a mention's own gold.

    >>> in_batch_candidates(torch.tensor([[5, 50], [6, 60], [5, 70]])).tolist()
    [[5, 6, 5, 50], [6, 5, 5, 60], [5, 5, 6, 70]]
    """
    B = cands.shape[0]
    others = torch.arange(B).repeat(B, 1)[~torch.eye(B, dtype=torch.bool)].view(B, B - 1)
    return torch.cat([cands[:, :1], cands[others, 0], cands[:, 1:]], 1)


@dataclass
class BatchCandidates:
    """One process's share of a training batch, each candidate a row of the batch's entity
    vectors (docs/DESIGN.md#negatives), so that an entity several mentions share is encoded
    once. The batch's entity vectors, as Retriever.forward builds them: the shared entities (the
    batch's golds under in-batch negatives), `shared[r]` of them encoded by process r, gathered
    in rank order; then the others this process encodes."""
    mentions: torch.Tensor      # (b,) this process's mentions
    entities: torch.Tensor      # (N,) the entities it encodes: its shared ones first
    index: torch.Tensor         # (b, 1 + C) gold and negatives as rows of those vectors, -1: none
    shared: list = None         # [S_r] shared entities per process (in-batch negatives), or None
    log_q: torch.Tensor = None  # (b, C) log q of the negatives (hard_adjusted_negative), or None


def share_bounds(n, world_size):
    """[(start, end)] of each process's share of a batch of n mentions (tensor_split's).

    >>> share_bounds(5, 2)
    [(0, 3), (3, 5)]
    """
    sizes = [len(part) for part in torch.arange(n).tensor_split(world_size)]
    ends = np.cumsum(sizes).tolist()
    return [(end - size, end) for size, end in zip(sizes, ends)]


# ----------------------------------------------------------------------------------------------
# Running top-k over streamed score chunks

def _gather_cat(tensor, rt):
    """Each process's (M, k) tensor, concatenated along dim 1 over processes: (M, P k)."""
    parts = [torch.empty_like(tensor) for _ in range(rt.world_size)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, 1)


def best_first(values, k):
    """The k largest of each row, best first, ties kept in column order (a stable sort, where
    topk breaks ties arbitrarily): entities are fed in index order, so equal scores always rank
    the lower entity index first, in one process or merged from several.
    values: (R, c) -> (values, columns), each (R, min(k, c)).

    For k much smaller than c only k columns per row are sorted: those above the row's k-th
    largest value t, then those equal to t in column order while places are left. The result is
    the stable sort's; sorting whole rows of an entity chunk (c log c each) was the largest cost
    of mining and ranking.

    >>> best_first(torch.tensor([[1., 3., 3., 2.]]), 2)
    (tensor([[3., 3.]]), tensor([[1, 2]]))
    >>> best_first(torch.tensor([[0., 5., 1., 5., 5., 0., 2., 1., 0., 4.]]), 2)
    (tensor([[5., 5.]]), tensor([[1, 3]]))
    """
    R, c = values.shape
    if 4 * k < c and R > 0:
        t = values.topk(k, dim=1).values[:, -1:]                        # (R, 1) k-th largest
        above, tied = values > t, values == t                           # (R, c) each
        take = above | tied
        count = take.sum(1)
        crowded = count > k                                             # more ties than places
        if crowded.any():
            need = k - above[crowded].sum(1, keepdim=True)
            ties = tied[crowded]
            take[crowded] = above[crowded] | (ties & (ties.cumsum(1) <= need))
            count = take.sum(1)
        if bool((count == k).all()):  # not so with NaN scores: the full sort below
            columns = take.nonzero()[:, 1].view(R, k)                   # (R, k) column order
            v, order = values.gather(1, columns).sort(dim=1, descending=True, stable=True)
            return v, columns.gather(1, order)
    v, i = values.sort(dim=1, descending=True, stable=True)
    return v[:, :k], i[:, :k]


class TopK:
    """The running top-k entities of each of M mentions, fed chunk by chunk.

    `values` (M, k) float32 best first, `indices` (M, k) int64 entity indices, and an optional
    `payload` (M, k) carried along with the values. With `mention_worlds` (M,) a mention takes only
    the scores of entities of its own world (how candidates rank); without it, all (the pooled
    ranking over a split, as the original's recall).
    """

    def __init__(self, num_mentions, k, mention_worlds=None, device="cpu", payload=False):
        self.k = k
        self.mention_worlds = None if mention_worlds is None else mention_worlds.to(device)
        self.values = torch.full((num_mentions, k), float("-inf"), device=device)
        self.indices = torch.full((num_mentions, k), -1, dtype=torch.long, device=device)
        self.payload = torch.zeros(num_mentions, k, device=device) if payload else None

    def update(self, rows, scores, first, world=None, payload=None):
        """rows: (R,) mention indices, scores: (R, c) float32 against entities first..first+c-1."""
        if self.mention_worlds is not None:
            keep = self.mention_worlds[rows] == world
            if not keep.all():
                rows, scores = rows[keep], scores[keep]
                payload = None if payload is None else payload[keep]
        top_values, top_indices = best_first(scores, self.k)
        values = torch.cat([self.values[rows], top_values], 1)
        indices = torch.cat([self.indices[rows], top_indices + first], 1)
        payloads = None if self.payload is None else torch.cat(
            [self.payload[rows], payload.gather(1, top_indices)], 1)
        self._keep(rows, values, indices, payloads)

    def _keep(self, rows, values, indices, payloads):
        best_values, best = best_first(values, self.k)
        self.values[rows] = best_values
        self.indices[rows] = indices.gather(1, best)
        if payloads is not None:
            self.payload[rows] = payloads.gather(1, best)

    def merge(self, rt):
        """Under torchrun: merge the processes' lists (their shards of the entities)."""
        if rt is None or not rt.distributed:
            return
        rows = torch.arange(self.values.shape[0], device=self.values.device)
        self._keep(rows, _gather_cat(self.values, rt), _gather_cat(self.indices, rt),
                   None if self.payload is None else _gather_cat(self.payload, rt))


class GumbelTopK:
    """A sample of k entities per mention from softmax(smoothing * scores), streamed.

    The top k of smoothing * s + Gumbel noise is an exact sample without replacement from
    softmax(smoothing * s); a running logsumexp gives each pick's log-probability log q. A mention
    with fewer than k non-zero probabilities (float32, as softmax gives them) is sampled with
    replacement instead, from its raw top k, which hold all its non-zero probabilities.
    """

    def __init__(self, num_mentions, k, smoothing, generator, device="cpu"):
        self.k, self.smoothing, self.generator = k, smoothing, generator
        self.perturbed = TopK(num_mentions, k, device=device, payload=True)  # payload: smoothing*s
        self.raw = TopK(num_mentions, k, device=device)
        self.lse = torch.full((num_mentions,), float("-inf"), device=device)

    def update(self, rows, scores, first, world=None):
        t = torch.where(scores.isneginf(), scores, self.smoothing * scores)  # (R, c), 0 * -inf
        # Gumbel noise -log(Exp(1)), drawn in float64 so that an exponential draw of exactly 0
        # (an infinite key) is practically impossible even over 10^10 draws.
        gumbel = -torch.empty(t.shape, dtype=torch.float64, device=t.device).exponential_(
            generator=self.generator).log().float()
        self.perturbed.update(rows, t + gumbel, first, payload=t)
        self.raw.update(rows, t, first)
        self.lse[rows] = torch.logaddexp(self.lse[rows], t.logsumexp(1))

    def merge(self, rt):
        self.perturbed.merge(rt)
        self.raw.merge(rt)
        if rt is not None and rt.distributed:
            self.lse = _gather_cat(self.lse[:, None], rt).logsumexp(1)

    def sample(self):
        """(indices, log_q), each (M, k)."""
        indices = self.perturbed.indices.clone()
        log_q = self.perturbed.payload - self.lse[:, None]
        raw_log_q = self.raw.values - self.lse[:, None]                   # (M, k)
        few = (raw_log_q.exp() > 0).sum(1) < self.k
        if few.any():
            pick = torch.multinomial(raw_log_q[few].exp(), self.k, replacement=True,
                                     generator=self.generator)
            indices[few] = self.raw.indices[few].gather(1, pick)
            log_q[few] = raw_log_q[few].gather(1, pick)
        return indices, log_q


# ----------------------------------------------------------------------------------------------
# Encoding and streaming

@torch.no_grad()
def encode_vectors(fn, ids, mask, batch_size, device, dtype=None, quiet=True, desc=None):
    """fn(ids, mask) over batches, run under autocast to `dtype` -> (N, count, d) on `device`,
    kept in `dtype` (None: float32; scored in float32 all the same, all_pairs_interactions).
    The caller puts the model in eval mode."""
    out = []
    starts = range(0, ids.shape[0], batch_size)
    for s in progress(starts, desc=desc, disable=quiet or desc is None):
        with autocast(device, dtype):
            vecs = fn(ids[s:s + batch_size].to(device, non_blocking=True),
                      mask[s:s + batch_size].to(device, non_blocking=True))
        out.append(vecs.to(dtype or torch.float32))
    return torch.cat(out)


def entity_chunks(world_ranges, chunk_size, rank=0, world_size=1):
    """[(start, end, world)] chunks of at most `chunk_size` entities, never straddling a world;
    under torchrun, process `rank` takes a contiguous share of the same chunks a single process
    would encode, so every entity is encoded in the same batch and scores bit for bit alike.

    >>> entity_chunks([(0, 5), (5, 8)], 2)
    [(0, 2, 0), (2, 4, 0), (4, 5, 0), (5, 7, 1), (7, 8, 1)]
    >>> entity_chunks([(0, 5), (5, 8)], 2, rank=0, world_size=2)
    [(0, 2, 0), (2, 4, 0)]
    """
    chunks = [(s, min(s + chunk_size, end), world)
              for world, (start, end) in enumerate(world_ranges)
              for s in range(start, end, chunk_size)]
    n = len(chunks)
    return chunks[n * rank // world_size:n * (rank + 1) // world_size]


@torch.no_grad()
def stream_scores(model, mention_vecs, entity_ids, entity_mask, world_ranges, consumers, *,
                  entity_bsz, device, dtype=None, exclude=None, rt=None, budget=None,
                  quiet=True, desc="scoring", vectors=None):
    """Score mentions against a whole entity set without holding its vectors.

    mention_vecs: (M, m, d) on `device`; entity_ids, entity_mask: (E, L) on the CPU (pinned for
    speed on a GPU), ordered by world, `world_ranges` [(start, end)] per world. Entities are encoded
    `entity_bsz` at a time with `model.entity_vectors` under autocast to `dtype` (chunks never
    straddle a world), scored in float32 with `model.scorer` in blocks of mentions of at most
    `budget` (default SCORE_BLOCK_ELEMENTS) dot products (M_b x m x E_c x n), folded into
    each consumer (`TopK`, `GumbelTopK`: `update(rows, scores, first, world)`) and dropped.
    When every consumer ranks per world, a chunk is scored against its own world's mentions
    only. `exclude` (M,): an entity per mention whose score is set to -inf (`--exclude_golds`).
    Under torchrun each process scores its contiguous share of the entities and the consumers are
    merged at the end. `vectors(start, end)`: the chunk's entity vectors (c, n, d) float32 on
    `device` instead of encoding them (a stored entity index; entity_ids, entity_mask unused).
    """
    world_size, rank = (rt.world_size, rt.rank) if rt is not None else (1, 0)
    if budget is None:
        budget = SCORE_BLOCK_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    M, m = mention_vecs.shape[:2]
    all_rows = torch.arange(M, device=device)
    per_world = all(getattr(c, "mention_worlds", None) is not None for c in consumers)
    if exclude is not None:
        exclude = exclude.to(device)
    for start, end, world in progress(entity_chunks(world_ranges, entity_bsz, rank, world_size),
                                      desc=desc, disable=quiet):
        v = (vectors(start, end) if vectors is not None else
             encode_vectors(model.entity_vectors, entity_ids[start:end], entity_mask[start:end],
                            end - start, device, dtype))                # (c, n, d)
        rows = all_rows[consumers[0].mention_worlds == world] if per_world else all_rows
        block = max(1, budget // ((end - start) * m * v.shape[1]))
        for r in rows.split(block):
            scores = model.scorer(all_pairs_interactions(mention_vecs[r], v))  # (R, c) float32
            if exclude is not None:
                col = exclude[r] - start
                hit = (col >= 0) & (col < end - start)
                scores[hit.nonzero()[:, 0], col[hit]] = float("-inf")
            for consumer in consumers:
                consumer.update(r, scores, start, world)
    for consumer in consumers:
        consumer.merge(rt)
    return consumers


def mine_hard_negatives(model, mention_ids, mention_mask, entity_ids, entity_mask, golds, num, *,
                        sample=False, smoothing_value=1.0, exclude_golds=False, generator=None,
                        mention_bsz=512, entity_bsz=512, device, dtype=None, rt=None, quiet=True):
    """Hard negatives of every mention against all entities of its split (pooled,
    docs/DESIGN.md#negatives).

    Returns (hard (M, num) int64 on the CPU, log_q (M, num) float32 or None): the `num` top-scoring
    entities (`mixed_negative`), or with `sample` a draw from softmax(smoothing_value * scores)
    without replacement (with replacement where fewer than `num` probabilities are non-zero) and
    each draw's log-probability. `exclude_golds`: the gold's score is -inf first. `generator`:
    a torch.Generator on `device` for the Gumbel noise.
    """
    model.eval()
    u = encode_vectors(model.mention_vectors, mention_ids, mention_mask, mention_bsz, device,
                       dtype, quiet, "mentions")
    M = u.shape[0]
    consumer = (GumbelTopK(M, num, smoothing_value, generator, device) if sample
                else TopK(M, num, device=device))
    stream_scores(model, u, entity_ids, entity_mask, [(0, entity_ids.shape[0])], [consumer],
                  entity_bsz=entity_bsz, device=device, dtype=dtype,
                  exclude=golds if exclude_golds else None, rt=rt, quiet=quiet, desc="mining")
    if sample:
        hard, log_q = consumer.sample()
        return hard.cpu(), log_q.cpu()
    return consumer.indices.cpu(), None


@dataclass
class EpochNegatives:
    """The negatives of one training epoch (see epoch_negatives)."""
    golds: torch.Tensor         # (M,) entity index of each mention's gold
    num_entities: int
    num_rands: int              # random negatives per mention and visit
    hard: torch.Tensor = None   # (M, H) the mined negatives of every mention, or None
    log_q: torch.Tensor = None  # (M, H) their log-probabilities (hard_adjusted_negative), or None
    in_batch: bool = False      # the other golds of the batch are negatives too (IN_BATCH)
    distinct: bool = False      # an entity several candidates share encoded once (--entity_windows)

    def batch(self, mentions, stream, rank=0, world_size=1):
        """This process's share of a batch of mention indices (B,), b = B / P of them, as
        BatchCandidates: each mention's candidates [gold] (+ the batch's other golds, in-batch)
        + random + mined negatives, as rows of the batch's entity vectors. The random negatives
        of the whole batch are drawn from `stream` (random_negative_stream), in the batch's
        order, so that every process draws alike; under in-batch negatives every process knows
        every process's shared golds, so nothing but the vectors is communicated."""
        golds = self.golds[mentions]                                              # (B,)
        cands = training_candidates(golds, self.num_entities, self.num_rands,
                                    None if self.hard is None else self.hard[mentions],
                                    stream)                                       # (B, 1 + K)
        start, end = share_bounds(len(mentions), world_size)[rank]
        own = slice(start, end)
        log_q = None if self.log_q is None else self.log_q[mentions[own]]
        if not self.in_batch:  # a window per candidate, as the original; or each entity once
            flat = cands[own].reshape(-1)
            entities, rows = distinct(flat) if self.distinct else (flat, torch.arange(len(flat)))
            return BatchCandidates(mentions[own], entities, rows.view(end - start, -1),
                                   None, log_q)
        # The batch's distinct golds are shared, rows 0..S-1 of the batch's entity vectors: each
        # encoded by the process whose share holds it first, gathered by all. seen[j]: distinct
        # golds among the first j (their rows count in order of first occurrence).
        shared, gold_rows = distinct(golds)                                       # (S,), (B,)
        seen = [0] + (gold_rows.cummax(0).values + 1).tolist()                    # (B + 1,)
        counts = [seen[z] - seen[a] for a, z in share_bounds(len(mentions), world_size)]
        cands = in_batch_candidates(cands)[own]                                   # (b, B + K)
        entities, rows = distinct(torch.cat([shared, cands.reshape(-1)]))
        index = rows[len(shared):].view(end - start, -1)                          # (b, B + K)
        B = len(golds)  # a repeat of a mention's own gold is not its negative: masked, -inf
        index[:, 1:B][cands[:, 1:B] == cands[:, :1]] = -1
        return BatchCandidates(mentions[own], torch.cat([shared[seen[start]:seen[end]],
                                                         entities[len(shared):]]),
                               index, counts, log_q)


def epoch_negatives(model, data, type_cands, num_cands, cands_ratio, *, smoothing_value=1.0,
                    exclude_golds=False, generator=None, mention_bsz=512, entity_bsz=512, device,
                    dtype=None, rt=None, quiet=True, entity_windows="per_candidate"):
    """The negatives of one training epoch as `--type_cands` asks (docs/DESIGN.md#negatives):
    the hard ones mined with the current `model` over all entities of the split `data`
    (SplitData) when the type needs them (the top-scoring for mixed_negative and in_batch_hard, a
    sample for hard_negative and hard_adjusted_negative, drawn with `generator` on `device`),
    the counts from `num_cands` and `cands_ratio`, log q kept for hard_adjusted_negative,
    whether the batch's other golds are negatives (in_batch, in_batch_hard), and whether a batch
    encodes a window per candidate (`entity_windows` per_candidate, the original's: an entity two
    candidates share gets two dropout draws) or each distinct entity once (distinct). ->
    EpochNegatives."""
    num_rands, num_hards = candidate_counts(type_cands, num_cands, cands_ratio)
    hard = log_q = None
    if num_hards > 0:
        hard, log_q = mine_hard_negatives(
            model, data.mention_ids, data.mention_mask, data.entity_ids, data.entity_mask,
            data.golds, num_hards, sample=type_cands in ("hard_negative", "hard_adjusted_negative"),
            smoothing_value=smoothing_value, exclude_golds=exclude_golds, generator=generator,
            mention_bsz=mention_bsz, entity_bsz=entity_bsz, device=device, dtype=dtype, rt=rt,
            quiet=quiet)
    return EpochNegatives(data.golds, len(data.entities), num_rands, hard,
                          log_q if type_cands == "hard_adjusted_negative" else None,
                          type_cands in IN_BATCH, entity_windows == "distinct")


# ----------------------------------------------------------------------------------------------
# A split's tensors, its rankings and metrics

@dataclass
class SplitData:
    """A split encoded for the retriever: token ids (CPU) and entity bookkeeping."""
    entities: object           # data_loader.EntitySet
    mention_ids: torch.Tensor  # (M, L)
    mention_mask: torch.Tensor  # (M, L)
    entity_ids: torch.Tensor   # (E, L)
    entity_mask: torch.Tensor  # (E, L)
    golds: torch.Tensor        # (M,) entity index of each mention's label document
    mention_worlds: torch.Tensor  # (M,) index into entities.worlds

    @property
    def world_ranges(self):
        return list(self.entities.world_ranges.values())


def check_worlds_hold(zeshel, splits, n, flag):
    """Stop with a one-line error naming `flag` unless every world of these splits has at least
    `n` entities (rankings within a world, of length n)."""
    for split in splits:
        for world, (start, end) in zeshel.entities(split).world_ranges.items():
            check_flag(n <= end - start, flag,
                       f"{n} is more than the {end - start} entities of {split} world {world}")


def encode_retriever_split(tokenizer, zeshel, split, max_len, pin=False, rt=None):
    """A split's mention and entity windows of `max_len` tokens and its entity bookkeeping, as
    SplitData (`pin`: in pinned memory, for fast copies to a GPU). Under torchrun each process
    tokenizes a share of the windows and every process gets them all."""
    mentions = zeshel.mentions[split]
    entities = zeshel.entities(split)
    freeze_objects()  # the model and tokenizer too: the collector need not walk them meanwhile
    world_index = {w: i for i, w in enumerate(entities.worlds)}
    tensors = [*encode_in_shares(len(mentions), lambda a, b: encode_mentions(
                   tokenizer, zeshel, mentions[a:b], max_len), rt),
               *encode_in_shares(len(entities), lambda a, b: encode_entities(
                   tokenizer, SimpleNamespace(titles=entities.titles[a:b],
                                              texts=entities.texts[a:b]), max_len), rt)]
    if pin:
        tensors = [t.pin_memory() for t in tensors]
    return SplitData(entities, *tensors, torch.from_numpy(entities.gold_indices(mentions)),
                     torch.tensor([world_index[m["corpus"]] for m in mentions], dtype=torch.long))


@torch.no_grad()
def rank_split(model, data, k, *, pooled=True, per_world=True, mention_bsz=512, entity_bsz=512,
               device, dtype=None, rt=None, quiet=True, vectors=None):
    """Top-k entity indices of every mention of a split, (M, k) each: pooled over all the split's
    entities (or None) and within the mention's own world (or None), from one streaming pass
    (`vectors`: stored entity vectors, as stream_scores takes them)."""
    model.eval()
    u = encode_vectors(model.mention_vectors, data.mention_ids, data.mention_mask, mention_bsz,
                       device, dtype, quiet, "mentions")
    M = u.shape[0]
    consumers = {}
    if pooled:
        consumers["pooled"] = TopK(M, k, device=device)
    if per_world:
        consumers["per_world"] = TopK(M, k, data.mention_worlds, device=device)
    stream_scores(model, u, data.entity_ids, data.entity_mask, data.world_ranges,
                  list(consumers.values()), entity_bsz=entity_bsz, device=device, dtype=dtype,
                  rt=rt, quiet=quiet, desc="entities", vectors=vectors)
    return (consumers["pooled"].indices.cpu() if pooled else None,
            consumers["per_world"].indices.cpu() if per_world else None)


def hits(ranked, golds, k):
    """(M,) bool: the gold among the first k of each ranking. ranked: (M, >=k), golds: (M,)."""
    return (ranked[:, :k] == golds[:, None]).any(1)


def percent(x):
    return 100.0 * float(x.double().mean()) if x.numel() else 0.0


def recall_table(ranked, golds, mention_worlds, worlds, ks):
    """Recall@k (percent) per world, their macro average (every world counts) and micro average
    (pooled over mentions). ranked: (M, >= max ks) per-world rankings."""
    per_world = {}
    for w, world in enumerate(worlds):
        sel = mention_worlds == w
        recalls = {f"recall@{k}": percent(hits(ranked[sel], golds[sel], k)) for k in ks}
        per_world[world] = {"mentions": int(sel.sum()), **recalls}
    macro = {f"recall@{k}": float(np.mean([r[f"recall@{k}"] for r in per_world.values()]))
             for k in ks}
    micro = {f"recall@{k}": percent(hits(ranked, golds, k)) for k in ks}
    return {"per_world": per_world, "macro": macro, "micro": micro}


def recall_ks(n):
    """The k of a candidates recall table: 1, 2, 4, ... up to n, and n itself.

    >>> recall_ks(8), recall_ks(100)
    ([1, 2, 4, 8], [1, 2, 4, 8, 16, 32, 64, 100])
    """
    ks = [2 ** i for i in range(n.bit_length()) if 2 ** i <= n]
    return ks if ks[-1] == n else ks + [n]


def ranking_entry(pooled, per_world, data, k, epoch):
    """A results entry: recall@k and top-1 accuracy pooled over the split's entities (the
    original's numbers), and per world, with macro and micro averages of the per-world recall."""
    table = recall_table(per_world, data.golds, data.mention_worlds, data.entities.worlds, (1, k))
    key = f"recall@{k}"
    return {"epoch": epoch, key: percent(hits(pooled, data.golds, k)),
            "accuracy": percent(hits(pooled, data.golds, 1)),
            "per_world": {w: {key: r[key], "accuracy": r["recall@1"], "mentions": r["mentions"]}
                          for w, r in table["per_world"].items()},
            f"macro_{key}": table["macro"][key], f"micro_{key}": table["micro"][key]}

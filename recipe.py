"""The paper's recipe and its published numbers, in one place: the original's three command lines
(without paths), the appendix's scorers and shares of hard negatives, Zeshel's sizes, and the
reference numbers (docs/deviations.md says where ours may differ), and BLINK's bi-encoder as
these scripts' flags (the peer the paper compares with). `sweep.py` runs them,
`report.py` compares runs with them, `bench.py` and `bench/rehearsal.py` size them."""
from cli import check_flag

# The README's command lines (the original's), without paths, without --gpus (the machine's
# choice) and without --store_en_hiddens / --en_hidden_path (training streams entity vectors; in
# save_candidates.py they store a full-Zeshel entity index of about 194 GB: docs/linking.md).
RETRIEVER = ["--B", "16", "--gradient_accumulation_steps", "2", "--logging_steps", "1000",
             "--k", "64", "--epochs", "4", "--lr", "0.00001", "--num_cands", "64",
             "--type_cands", "mixed_negative", "--cands_ratio", "0.5", "--entity_bsz", "4096",
             "--mention_bsz", "200"]
CANDIDATES = ["--pre_model", "Bert", "--type_model", "sum_max", "--num_mention_vecs", "128",
              "--num_entity_vecs", "128", "--entity_bsz", "1024", "--mention_bsz", "200",
              "--num_cands", "64"]
RERANKER = ["--B", "2", "--gradient_accumulation_steps", "2", "--num_workers", "2",
            "--warmup_proportion", "0.2", "--epochs", "3", "--lr", "2e-5", "--eval_method", "macro",
            "--type_model", "full", "--type_bert", "base", "--inputmark"]
# The appendix: each scorer at p = 0, 25, 50, 75, 100% hard negatives among --num_cands
# (--cands_ratio is the share of random ones, 1 - p), the other values as the main retriever's.
SCORERS = {"dual": ["--type_model", "dual", "--num_mention_vecs", "1", "--num_entity_vecs", "1"],
           "multi_vector": ["--type_model", "multi_vector", "--num_mention_vecs", "1",
                            "--num_entity_vecs", "8"],
           "sum_max": ["--type_model", "sum_max", "--num_mention_vecs", "128",
                       "--num_entity_vecs", "128"]}
HARD_SHARES = (0, 25, 50, 75, 100)  # p: share of hard negatives among --num_cands, %

# BLINK's Zeshel bi-encoder (Wu et al. 2020), its published example (examples/zeshel in BLINK:
# train_biencoder.py --learning_rate 1e-05 --num_train_epochs 5 --max_context_length 128
# --max_cand_length 128 --train_batch_size 128 --eval_batch_size 64 --bert_model
# bert-large-uncased --type_optimization all_encoder_layers) as main_retriever.py flags: a dual
# encoder (one [CLS]-position vector each side), each mention's negatives the other golds of its
# batch of 128, one optimizer step per batch; warm-up 0.1, decay 0.01, clipping 1.0 and epsilon
# 1e-6 are BLINK's defaults as well as ours, given here so that the line says them.
# docs/DESIGN.md#negatives says which parts map exactly and which do not.
BLINK = ["--type_model", "dual", "--num_mention_vecs", "1", "--num_entity_vecs", "1",
         "--type_cands", "in_batch", "--B", "128", "--gradient_accumulation_steps", "1",
         "--lr", "1e-5", "--epochs", "5", "--max_len", "128", "--pretrained", "bert-large-uncased",
         "--warmup_proportion", "0.1", "--weight_decay", "0.01", "--clip", "1.0",
         "--adam_epsilon", "1e-6", "--k", "64", "--logging_steps", "1000", "--entity_bsz", "4096",
         "--mention_bsz", "200"]

# The encoders of the recipes, as results.json records an encoder (report.py notes a run whose
# encoder is another)
ENCODERS = {"bert-base-uncased": {"model_type": "bert", "hidden_size": 768,
                                  "num_hidden_layers": 12, "vocab_size": 30522},
            "bert-large-uncased": {"model_type": "bert", "hidden_size": 1024,
                                   "num_hidden_layers": 24, "vocab_size": 30522}}

# The full Zeshel set (docs/DESIGN.md#data)
ZESHEL = {"train_mentions": 49275, "train_entities": 332632, "train_worlds": 8,
          "val_mentions": 10000, "val_entities": 89549, "val_worlds": 4,
          "test_mentions": 10000, "test_entities": 70140, "test_worlds": 4}

# The published numbers
PAPER_TEST_RECALL = 89.62  # sum-of-max, mixed negatives (p = 50%): Zeshel test recall@64
PAPER_VAL_RECALL = {  # the appendix: val recall@64 by scorer and p (HARD_SHARES)
    "dual": (91.08, 92.18, 91.75, 92.24, 92.05),
    "multi_vector": (91.13, 92.74, 92.76, 93.41, 93.27),
    "sum_max": (92.51, 94.13, 94.66, 94.37, 94.54)}
PEER_RECALL = [("BLINK bi-encoder", 82.06), ("MuVER", 89.69)]
PEER_ACCURACY = {"base": 61.34, "large": 63.03}  # BLINK cross-encoder, unnormalized macro


def retriever_flags(scorer, p):
    """The retriever's command line of the appendix's cell (scorer, p% hard negatives); the
    main table's retriever is retriever_flags("sum_max", 50).

    >>> flags = retriever_flags("dual", 25)
    >>> value(flags, "--cands_ratio"), value(flags, "--type_model"), flags.count("--cands_ratio")
    ('0.75', 'dual', 1)
    """
    return merge(RETRIEVER, SCORERS[scorer] + ["--cands_ratio", f"{(100 - p) / 100:g}"])


def split_flags(tokens):
    """["--a", "1", "--b", "--c", "x"] -> [["--a", "1"], ["--b"], ["--c", "x"]]."""
    groups = []
    for token in tokens:
        if token.startswith("--") or not groups:
            check_flag(token.startswith("--"), token,
                       "extra arguments must be flags (--name value)")
            groups.append([token.split("=", 1)[0]] + token.split("=", 1)[1:])
        else:
            groups[-1].append(token)
    return groups


def merge(args, flags):
    """`args` with each flag of `flags` set: its value replaced where `args` has it, else appended.

    >>> merge(["--a", "1", "--b"], ["--a", "2", "--c"])
    ['--a', '2', '--b', '--c']
    """
    groups = split_flags(args)
    for group in split_flags(flags):
        names = [g[0] for g in groups]
        if group[0] in names:
            groups[names.index(group[0])] = group
        else:
            groups.append(group)
    return [token for group in groups for token in group]


def value(args, flag, kind=str):
    """The value of `flag` in a command line `args`.

    >>> value(RETRIEVER, "--num_cands", int), value(SCORERS["sum_max"], "--num_entity_vecs", int)
    (64, 128)
    """
    return kind(args[args.index(flag) + 1])

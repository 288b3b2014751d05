"""The paper's recipe and its published numbers, in one place: the original's three command lines
(without paths), the appendix's scorers and shares of hard negatives, Zeshel's sizes, and the
reference numbers (docs/deviations.md says where ours may differ). `sweep.py` runs them,
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

"""Write each mention's top retrieved candidates, ranked within its own world (SPEC 5).

    python save_candidates.py --model runs/ret.pt --data_dir DATA --cands_dir runs/cands \\
        --num_cands 64 [--pretrained FOLDER] [--bf16]

For train, val and test, and each world separately, the world's entities are streamed through the
entity encoder and scored against the world's mentions; `CANDS_DIR/candidates_<split>.json` gets one
JSON line per mention, `{"mention_id": ..., "candidates": [document ids, best first]}`, and
`CANDS_DIR/recall.json` the recall at 1, 2, 4, ... up to `--num_cands` per split and world, with
macro and micro averages (also printed as a table). The model's shape (`--type_model`,
`--num_*_vecs`, `--*_use_codes`, `--pre_model`) comes from the checkpoint when the flags do not give
it; a flag that contradicts the checkpoint stops the run. `--store_en_hiddens` and
`--en_hidden_path` are accepted for the original's command line: entity vectors are streamed, never
stored.
"""
import argparse
import os

import torch

from data_loader import Zeshel
from retriever import (PRE_MODELS, TYPE_MODELS, check_worlds_hold, encode_split, load_retriever,
                       pretrained_name, rank_split, recall_table, vector_counts)
from utils import (add_precision_args, amp_dtype, check_flag, check_positive, cleanup_runtime,
                   cli_main, die, get_logger, load_checkpoint, setup_runtime, StageClock,
                   write_json, write_jsonl)

SPLITS = ("train", "val", "test")
SHAPE_FLAGS = ("pre_model", "type_model", "num_mention_vecs", "num_entity_vecs",
               "mention_use_codes", "entity_use_codes")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="retriever checkpoint (required)")
    p.add_argument("--data_dir", help="Zeshel folder (required)")
    p.add_argument("--cands_dir",
                   help="folder for candidates_<split>.json and recall.json (required)")
    p.add_argument("--num_cands", type=int, default=64, help="candidates per mention")
    p.add_argument("--pre_model", default=None, choices=list(PRE_MODELS),
                   help="default: the checkpoint's")
    p.add_argument("--type_model", default=None, choices=TYPE_MODELS,
                   help="default: the checkpoint's")
    p.add_argument("--num_mention_vecs", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--num_entity_vecs", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--mention_use_codes", action="store_true", default=None)
    p.add_argument("--entity_use_codes", action="store_true", default=None)
    p.add_argument("--max_len", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--entity_bsz", type=int, default=512, help="entities per streamed chunk")
    p.add_argument("--mention_bsz", type=int, default=512, help="mentions per encoder batch")
    p.add_argument("--store_en_hiddens", action="store_true", help="accepted; vectors are streamed")
    p.add_argument("--en_hidden_path", help="accepted; vectors are streamed")
    p.add_argument("--gpus", default="", help="visible GPUs (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--pretrained", default=None,
                   help="model folder or hub name (default: the checkpoint's, else --pre_model's)")
    add_precision_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def retriever_args(state, path):
    """The training arguments of a main_retriever.py checkpoint; stop on any other file."""
    trained = state.get("args") if isinstance(state, dict) and "model" in state else None
    check_flag(isinstance(trained, dict), "--model",
               f"{path} is not a checkpoint written by main_retriever.py")
    check_flag(trained.get("type_model") in TYPE_MODELS, "--model",
               f"{path} holds a --type_model {trained.get('type_model')} model, not a retriever "
               f"({', '.join(TYPE_MODELS)})")
    return trained


def resolve_shape(args, trained):
    """Fill the shape flags left unset from the checkpoint's arguments `trained`; stop when a flag
    that was given would build another model than the checkpoint holds."""
    for flag in SHAPE_FLAGS + ("max_len",):
        if getattr(args, flag) is None:
            setattr(args, flag, trained.get(flag, False if flag.endswith("codes") else None))
    for flag in ("pre_model", "type_model", "mention_use_codes", "entity_use_codes"):
        check_flag(getattr(args, flag) == trained.get(flag, getattr(args, flag)), f"--{flag}",
                   f"the checkpoint {args.model} was trained with {trained.get(flag)}, "
                   f"not {getattr(args, flag)}")
    mine = vector_counts(args.type_model, args.num_mention_vecs, args.num_entity_vecs)
    theirs = vector_counts(trained["type_model"], trained["num_mention_vecs"],
                           trained["num_entity_vecs"])
    for side, a, b in zip(("mention", "entity"), mine, theirs):
        check_flag(a == b, f"--num_{side}_vecs",
                   f"the checkpoint {args.model} uses {b} {side} vectors, not {a}")
    if args.pretrained is None:
        args.pretrained = trained.get("pretrained")


def format_table(recalls, ks):
    lines = [f"{'split':<6} {'world':<24} {'mentions':>8} "
             + " ".join(f"{'R@' + str(k):>7}" for k in ks)]
    for split, table in recalls.items():
        rows = [(w, r["mentions"], r) for w, r in table["per_world"].items()]
        n = sum(r["mentions"] for r in table["per_world"].values())
        rows += [("macro", n, table["macro"]), ("micro", n, table["micro"])]
        for name, count, r in rows:
            lines.append(f"{split:<6} {name:<24} {count:>8} "
                         + " ".join(f"{r[f'recall@{k}']:>7.2f}" for k in ks))
    return "\n".join(lines)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    check_flag(args.model, "--model", "a checkpoint path is required")
    check_flag(args.data_dir, "--data_dir", "the Zeshel folder is required")
    check_flag(args.cands_dir, "--cands_dir", "an output folder is required")
    check_positive(args, "num_cands", "entity_bsz", "mention_bsz")
    state = load_checkpoint(args.model)
    resolve_shape(args, retriever_args(state, args.model))
    rt = setup_runtime(args.gpus)
    torch.backends.cuda.matmul.allow_tf32 = True
    log = get_logger(args.model, rt.is_main)
    clock = StageClock(log)
    quiet = args.quiet or not rt.is_main
    if args.store_en_hiddens or args.en_hidden_path:
        log.info("note: entity vectors are streamed chunk by chunk; nothing is written to "
                 "--en_hidden_path")
    device, dtype = rt.device, amp_dtype(args.fp16, args.bf16, rt.device, log, args.fp32)
    zeshel = Zeshel(args.data_dir, SPLITS)
    check_worlds_hold(zeshel, SPLITS, args.num_cands, "--num_cands")
    clock.lap("loading and checking")
    tokenizer, model = load_retriever(pretrained_name(args.pre_model, args.pretrained),
                                      args.type_model, args.num_mention_vecs, args.num_entity_vecs,
                                      args.mention_use_codes, args.entity_use_codes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        die(f"--model: {args.model} does not fit a {args.type_model} retriever of "
            f"{args.pretrained or args.pre_model} (another encoder?)")
    model.to(device)
    clock.lap("model")
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= args.num_cands]
    recalls = {}
    for split in SPLITS:
        data = encode_split(tokenizer, zeshel, split, args.max_len, pin=device.type == "cuda")
        clock.lap(f"tokenization, {split}")
        _, ranked = rank_split(model, data, args.num_cands, pooled=False,
                               mention_bsz=args.mention_bsz, entity_bsz=args.entity_bsz,
                               device=device, dtype=dtype, rt=rt, quiet=quiet)
        clock.lap(f"ranking, {split}")
        recalls[split] = recall_table(ranked, data.golds, data.mention_worlds,
                                      data.entities.worlds, ks)
        if rt.is_main:
            doc_ids = data.entities.doc_ids
            write_jsonl(({"mention_id": m["mention_id"], "candidates": [doc_ids[i] for i in row]}
                         for m, row in zip(zeshel.mentions[split], ranked.tolist())),
                        os.path.join(args.cands_dir, f"candidates_{split}.json"))
        log.info("%s: %d mentions, recall@%d micro %.2f", split, len(data.golds), ks[-1],
                 recalls[split]["micro"][f"recall@{ks[-1]}"])
        clock.lap(f"writing candidates, {split}")
    if rt.is_main:
        write_json(recalls, os.path.join(args.cands_dir, "recall.json"))
    log.info("recall (percent), each mention ranked within its own world:\n%s",
             format_table(recalls, ks))
    cleanup_runtime(rt)


if __name__ == "__main__":
    main()

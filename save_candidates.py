"""Write each mention's top retrieved candidates, ranked within its own world
(docs/DESIGN.md#candidates).

    python save_candidates.py --model runs/ret.pt --data_dir DATA --cands_dir runs/cands \\
        --num_cands 64 [--pretrained FOLDER] [--bf16]

For train, val and test, and each world separately, the world's entities are streamed through the
entity encoder and scored against the world's mentions; `CANDS_DIR/candidates_<split>.json` gets one
JSON line per mention, `{"mention_id": ..., "candidates": [document ids, best first]}`, and
`CANDS_DIR/recall.json` the recall at 1, 2, 4, ... up to `--num_cands` per split and world, with
macro and micro averages (also printed as a table). The model's shape (`--type_model`,
`--num_*_vecs`, `--*_use_codes`, `--pre_model`, `--max_len`) comes from the checkpoint when the
flags do not give it; a flag that contradicts the checkpoint stops the run. Float32 by default,
`--bf16` / `--fp16` for mixed precision. `--store_en_hiddens --en_hidden_path DIR` stores every
entity's vectors in DIR, an entity index (entity_index.py, the one link.py uses: all the worlds of
DATA/documents, memory-mapped, its size said and checked against the free space first), and ranks
from them: the same candidates (float32 vectors, encoded in the same chunks) without encoding the
entities again when a matching index is there; `--index_dtype float16` halves the disk, and its
rounding may move candidates (recorded among the flags).
The log is `CANDS_DIR/save_candidates.log` (`.log.1`, ... beside an earlier one), created once
every check passed. The encoder (`--pretrained`, by default the absolute path the checkpoint
records) must be the one the retriever was trained from: its config and vocabulary are checked.
The folder's record (run_safety) holds each file's digest and what made it: the checkpoint (by
the digest of its bytes), the data (by content) and the flags; the reranker checks it.
"""
import os

from cli import (ArgumentParser, add_compatibility_args, add_data_arg, add_precision_args,
                 check_flag, check_positive, die, notices)
from data_loader import PRETRAINED, Zeshel, check_encoder, check_positions, pretrained_name
from retriever import (TYPE_MODELS, add_scorer_args, check_same_model, check_worlds_hold,
                       encode_retriever_split, load_retriever, rank_split, recall_ks, recall_table)
from entity_index import INDEX_DTYPES, Wanted, build_index, plan_index, read_entities
from run_safety import (Outputs, deferred_signals, load_checkpoint, main as cli_main, notice,
                        on_stop)
from training import absolute, load_weights
from utils import StageClock, amp_dtype, get_logger, open_log_file, with_runtime

SPLITS = ("train", "val", "test")
# Read from the checkpoint when not given
SHAPE_FLAGS = ("pre_model", "type_model", "num_mention_vecs", "num_entity_vecs",
               "mention_use_codes", "entity_use_codes", "max_len")


def build_parser():
    """The flags; `free=True`: may differ in a rerun over the same folder, `path=True`: an input
    compared by content (cli.py)."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", path=True,
                   help="retriever checkpoint of main_retriever.py (required)")
    add_data_arg(p, "--data_dir")
    p.add_argument("--cands_dir", free=True,
                   help="folder for candidates_<split>.json, recall.json and the log "
                        "save_candidates.log (required)")
    p.add_argument("--num_cands", type=int, default=64, help="candidates per mention")
    p.add_argument("--pre_model", default=None, choices=list(PRETRAINED["--pre_model"]),
                   path=True, help="default: the checkpoint's")
    add_scorer_args(p, default=None, vecs=None, note="default: the checkpoint's")
    p.add_argument("--max_len", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--entity_bsz", type=int, default=512, free=True,
                   help="entities per streamed chunk")
    p.add_argument("--mention_bsz", type=int, default=128, free=True,
                   help="mentions per encoder batch")
    p.add_argument("--gpus", default="", free=True,
                   help="visible GPUs (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--pretrained", default=None, path=True,
                   help="model folder or hub name (default: the checkpoint's, else --pre_model's)")
    add_precision_args(p)
    p.add_argument("--quiet", action="store_true", free=True, help="no progress bars")
    p.add_argument("--store_en_hiddens", action="store_true", free=True,
                   help="store every entity's vectors in --en_hidden_path (an entity index, as "
                        "link.py's) and rank from them; a matching index there is reused")
    p.add_argument("--en_hidden_path", free=True,
                   help="the entity index folder of --store_en_hiddens")
    p.add_argument("--index_dtype", choices=INDEX_DTYPES, default=None,
                   help="--store_en_hiddens: the stored vectors' dtype (default: the checkpoint's, "
                        "float32, or an existing index's); float16 halves the disk")
    add_compatibility_args(p, "seed", "num_workers")
    p.add_argument("--overwrite", action="store_true", free=True,
                   help="replace files in --cands_dir that another run (or no run of this "
                        "project) wrote")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def resolve_shape(args, trained):
    """Fill the shape flags left unset from the checkpoint's arguments `trained`; stop when a flag
    that was given would build another model than the checkpoint holds."""
    for flag in SHAPE_FLAGS:
        given = getattr(args, flag)
        if given is None:
            setattr(args, flag, trained.get(flag, False if flag.endswith("codes") else None))
        elif flag in ("pre_model", "max_len") and trained.get(flag) not in (None, given):
            die(f"--{flag}: {args.model} was trained with --{flag} {trained[flag]}, not {given}")
    check_flag(args.type_model in TYPE_MODELS, "--model", f"{args.model} holds a --type_model "
               f"{args.type_model} model, not a retriever ({', '.join(TYPE_MODELS)})")
    check_same_model(args, trained, args.model)
    if args.pretrained is None:
        args.pretrained = trained.get("pretrained") or pretrained_name("--pre_model",
                                                                       args.pre_model)
        return f"--pretrained (from the checkpoint {args.model})"
    return "--pretrained"


def check_trained_encoder(state, fingerprint, name, flag):
    """Stop unless the encoder loaded from `name` is the one the retriever checkpoint `state` was
    trained from (its config and vocabulary; its weights are the checkpoint's). `flag` says where
    `name` came from."""
    old = (state.get("inputs") or {}).get("pretrained")
    if old is None:
        return
    parts = [k for k in ("config", "vocabulary") if old.get(k) != fingerprint.get(k)]
    if parts:
        die(f"{flag}: {name} is not the encoder the checkpoint was trained with (its "
            f"{' and '.join(parts)} differ); pass --pretrained with that encoder")


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
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flag(args.model, "--model", "a checkpoint path is required")
    check_flag(args.data_dir, "--data_dir", "the Zeshel folder is required")
    check_flag(args.cands_dir, "--cands_dir", "an output folder is required")
    check_positive(args, "num_cands", "entity_bsz", "mention_bsz")
    check_flag(args.en_hidden_path or not args.store_en_hiddens, "--store_en_hiddens",
               "give the entity index folder with --en_hidden_path")
    check_flag(args.store_en_hiddens or not args.en_hidden_path, "--en_hidden_path",
               "given without --store_en_hiddens; pass both to store the entity index there")
    outputs = Outputs("save_candidates", args.overwrite,
                      lock=os.path.join(args.cands_dir, "candidates.lock"), flag="--cands_dir")
    for name in [f"candidates_{s}.json" for s in SPLITS] + ["recall.json"]:
        outputs.add(os.path.join(args.cands_dir, name))
    outputs.start()  # the folder and its lock
    with_runtime(args, lambda args, rt: save_candidates(args, rt, parser, outputs))


def save_candidates(args, rt, parser, outputs):
    log = get_logger(os.path.join(args.cands_dir, "save_candidates"), rt.is_main, deferred=True)
    log.info("args: %s", " ".join(f"--{k} {v}" for k, v in parser.recorded(args).items()))
    written, building = [], []
    on_stop(lambda name: f"stopped by {name} " + (
        f"with the candidates in {args.cands_dir} written whole" if "recall" in written else
        f"with the candidates in {args.cands_dir} incomplete ({', '.join(written)} written): run "
        f"save_candidates.py again" if written else
        f"while building the entity index in {args.en_hidden_path} (left incomplete: the next "
        f"run builds it anew), before it changed the candidates in {args.cands_dir}"
        if any(building) else f"before it changed the candidates in {args.cands_dir}"))
    clock = StageClock(log)  # one log line per stage: time, peak memory, bytes written
    quiet = args.quiet or not rt.is_main
    state, sha = load_checkpoint(args.model, "--model", "main_retriever", ("args", "model"))
    pretrained_flag = resolve_shape(args, state["args"])
    device, dtype = rt.device, amp_dtype(args.fp16, args.bf16, rt.device, log, args.fp32)
    check_encoder(args.pretrained, pretrained_flag, loadable=False)
    zeshel = Zeshel(args.data_dir, SPLITS)
    check_worlds_hold(zeshel, SPLITS, args.num_cands, "--num_cands")
    clock.lap("loading and checking")
    tokenizer, model = load_retriever(args.pretrained, args.type_model, args.num_mention_vecs,
                                      args.num_entity_vecs, args.mention_use_codes,
                                      args.entity_use_codes, flag=pretrained_flag)
    fingerprint = model.mention_encoder.fingerprint
    check_trained_encoder(state, fingerprint, args.pretrained, pretrained_flag)
    load_weights(model, state["model"], args.model, "--model")
    check_positions(model.mention_encoder, args.max_len, "--max_len")
    plan = index = None
    if args.store_en_hiddens:
        plan = plan_entity_index(args, zeshel, model, sha, dtype, rt)
    for line in notices(args, parser, [("index_dtype", lambda a: not a.store_en_hiddens,
                                        lambda a: "no --store_en_hiddens: nothing is stored")]):
        log.info("notice: %s", line)
    description = {"tool": "save_candidates", "flags": parser.defining(args), "inputs": {
        "model": {"path": absolute(args.model), "content": {"sha256": sha}},
        "data_dir": {"path": absolute(args.data_dir), "content": zeshel.fingerprint()},
        "pretrained": {"path": absolute(args.pretrained),
                       "content": {k: fingerprint[k] for k in ("config", "vocabulary")}}}}
    if outputs.claim(description, defaults=parser.defaults()):
        notice(f"{args.cands_dir} holds the candidates of this checkpoint and these flags "
               f"already; writing them again")
    open_log_file(log)  # every check passed
    model.to(device)
    clock.lap("model")
    if plan is not None:
        building.append(not plan.reuse)
        index = build_index(plan, model, tokenizer, device, dtype, quiet)
        building.clear()
        clock.lap("entity index" + (" (reused)" if plan.reuse else ""))
    ks, recalls = recall_ks(args.num_cands), {}
    for split in SPLITS:
        data = encode_retriever_split(tokenizer, zeshel, split, args.max_len,
                                      pin=device.type == "cuda", rt=rt)
        clock.lap(f"tokenization, {split}")
        _, ranked = rank_split(model, data, args.num_cands, pooled=False,
                               mention_bsz=args.mention_bsz, entity_bsz=args.entity_bsz,
                               device=device, dtype=dtype, rt=rt, quiet=quiet,
                               vectors=index and index.vectors_for(data.entities, device))
        clock.lap(f"ranking, {split}")
        recalls[split] = recall_table(ranked, data.golds, data.mention_worlds,
                                      data.entities.worlds, ks)
        if rt.is_main:
            doc_ids = data.entities.doc_ids
            with deferred_signals():  # a stop in the write comes after `written` says it
                outputs.write_lines(({"mention_id": m["mention_id"],
                                      "candidates": [doc_ids[i] for i in row]}
                                     for m, row in zip(zeshel.mentions[split], ranked.tolist())),
                                    os.path.join(args.cands_dir, f"candidates_{split}.json"))
                written.append(split)
        log.info("%s: %d mentions, recall@%d micro %.2f", split, len(data.golds), ks[-1],
                 recalls[split]["micro"][f"recall@{ks[-1]}"])
        clock.lap(f"writing candidates, {split}")
    if rt.is_main:
        with deferred_signals():
            outputs.write_json(recalls, os.path.join(args.cands_dir, "recall.json"))
            written.append("recall")
    log.info("recall (percent), each mention ranked within its own world:\n%s",
             format_table(recalls, ks))


def plan_entity_index(args, zeshel, model, sha, precision, rt):
    """--store_en_hiddens: the entity index of every world of DATA/documents in
    --en_hidden_path, checked before any work (entity_index.plan_index: reused, refused, or built
    with its size checked). Sets --index_dtype to the dtype ranked from when it is not float32
    (the run's record says so; float32 ranks as streaming does)."""
    folder = os.path.join(args.data_dir, "documents")
    read = {}  # the splits' worlds, read by Zeshel: only the other worlds' files are read here
    for world, docs in zeshel.documents.items():
        path = os.path.join(folder, f"{world}.json")
        read[path] = (docs, zeshel.digests[path])
    entities = read_entities(folder, "--data_dir", known=read)
    wanted = Wanted({"path": absolute(args.model), "sha256": sha}, entities, args.type_model,
                    model.n, model.mention_encoder.config.hidden_size, args.max_len, precision,
                    args.index_dtype, "float32", args.entity_bsz,
                    {"index": "--en_hidden_path", "retriever": "--model", "entities": "--data_dir",
                     "index_dtype": "--index_dtype", "max_len": "--max_len"})
    plan = plan_index(args.en_hidden_path, wanted, args.overwrite, rt.distributed)
    used = plan.manifest["dtype"] if plan.reuse else plan.dtype
    args.index_dtype = None if used == "float32" else used
    return plan


if __name__ == "__main__":
    main()

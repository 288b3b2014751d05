"""Train the reranker on retrieved candidates and report linking accuracy (SPEC 6).

    python main_reranker.py --model runs/reranker.pt --data ZESHEL --cands_dir CANDS \\
        --B 2 --gradient_accumulation_steps 2 --num_workers 2 --warmup_proportion 0.2 \\
        --epochs 3 --lr 2e-5 --eval_method macro --type_model full --type_bert base --inputmark \\
        [--fp16] [--pretrained FOLDER]

Each mention is trained on the first --C of its candidates (CANDS/candidates_<split>.json, from
save_candidates.py) with the gold at index 0, added where the list missed it. After each epoch val
is ranked: normalized accuracy over the mentions whose gold is among the first --C_eval candidates,
unnormalized over all mentions, per world, and averaged as --eval_method says (macro: the mean
over worlds; micro: pooled). The best epoch by unnormalized val accuracy is kept in `<model>`, the
full state of the last one in `<model>.last` (`--resume_training` continues from it); after the
last epoch the best is reported on test. `<model>.results.json` holds every evaluation,
`<model>.log` the log. `--epochs 0` reports the untrained model.

`--type_model full` is the cross-encoder; dual, multi_vector, poly and sum_max train the
retriever's scorer (retriever.py) over the same candidates, with the retriever's windows of --L
tokens. Under torchrun each process takes B / processes mentions of every batch
(DistributedDataParallel); in one process with several GPUs DataParallel splits the batch. Mixed
precision: --fp16 (float16 autocast and a gradient scaler; bfloat16 on a CPU), --bf16; on a GPU
bfloat16 autocast is the default where supported, --fp32 turns it off. The
environment variable HARD_NCE_STOP_AFTER_EPOCH=N ends the run after epoch N is saved (the tests
use it to check that a resumed run ends where an uninterrupted one does).
"""
import argparse
import os

import torch
from torch.utils.data import DataLoader, DistributedSampler

import reranker
from data_loader import Zeshel, read_candidates
from utils import (add_precision_args, amp_dtype, autocast, barrier, build_optimizer,
                   build_scheduler, check_flag, check_positive, cleanup_runtime, cli_main,
                   describe_runtime, die, get_logger, grad_scaler, gradient_sync,
                   load_checkpoint, load_encoder, load_tokenizer, num_training_steps,
                   optimizer_step, progress, rng_state, RunningMean, save_checkpoint,
                   set_rng_state, set_seed, setup_runtime, StageClock, unwrap, update_step,
                   write_json)


SHAPE_FLAGS = ("type_model", "num_mention_vecs", "num_entity_vecs", "mention_use_codes",
               "entity_use_codes")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint path to write (required); also <model>.last, "
                                    ".log, .results.json")
    p.add_argument("--data", help="Zeshel folder (required)")
    p.add_argument("--cands_dir", help="folder of candidates_<split>.json (required)")
    p.add_argument("--L", type=int, default=256, help="tokens of a mention-entity pair")
    p.add_argument("--C", type=int, default=64, help="candidates per mention in training")
    p.add_argument("--C_eval", type=int, default=64, help="candidates per mention in evaluation")
    p.add_argument("--B", type=int, default=16, help="mentions per batch (all processes together)")
    p.add_argument("--eval_batchsize", type=int, default=None,
                   help="mentions per evaluation batch (default: --B)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup_proportion", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--adam_epsilon", type=float, default=1e-6)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--logging_steps", type=int, default=1000)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: none)")
    p.add_argument("--init", type=float, default=0.0,
                   help="std of the score layer's init (0: the encoder's initializer_range)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--gpus", default="", help="visible GPUs, e.g. 0,1")
    p.add_argument("--simpleoptim", action="store_true", help="plain Adam, constant rate")
    p.add_argument("--eval_method", default="macro", choices=["micro", "macro"])
    p.add_argument("--type_model", default="full",
                   choices=["dual", "multi_vector", "poly", "sum_max", "full"])
    p.add_argument("--type_bert", default="base", choices=["base", "large"])
    p.add_argument("--pretrained", default=None,
                   help="model folder or name (default: bert-base/large-uncased by --type_bert)")
    p.add_argument("--num_mention_vecs", type=int, default=8)
    p.add_argument("--num_entity_vecs", type=int, default=8)
    p.add_argument("--mention_use_codes", action="store_true")
    p.add_argument("--entity_use_codes", action="store_true")
    p.add_argument("--inputmark", action="store_true", help="wrap mentions in [unused0]/[unused1]")
    add_precision_args(p)  # --fp16, --bf16, --fp32
    p.add_argument("--fp16_opt_level", default="O1", help="accepted for compatibility (no apex)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--resume_training", action="store_true", help="continue from <model>.last")
    args = p.parse_args(argv)

    check_flag(args.model, "--model", "give the path of the checkpoint to write")
    check_flag(args.data, "--data", "give the Zeshel folder")
    check_flag(args.cands_dir, "--cands_dir", "give the folder of the candidates files")
    check_flag(os.path.isdir(args.cands_dir), "--cands_dir", f"{args.cands_dir} is not a folder")
    check_flag(args.L >= 16, "--L", f"must be at least 16 (got {args.L})")
    if args.eval_batchsize is None:
        args.eval_batchsize = args.B
    check_positive(args, "C", "C_eval", "B", "eval_batchsize", "gradient_accumulation_steps",
                   "logging_steps", "num_mention_vecs", "num_entity_vecs", "lr", "adam_epsilon")
    check_flag(args.epochs >= 0, "--epochs", f"must be 0 or more (got {args.epochs})")
    check_flag(0 <= args.warmup_proportion <= 1, "--warmup_proportion",
               f"{args.warmup_proportion} is not in [0, 1]")
    check_flag(args.weight_decay >= 0, "--weight_decay", "must be 0 or more")
    check_flag(args.num_workers >= 0, "--num_workers", "must be 0 or more")
    check_flag(args.clip >= 0, "--clip", "must be 0 (no clipping) or more")
    check_flag(args.init >= 0, "--init", "must be 0 (the encoder's initializer_range) or more")
    if args.type_model != "full":
        for side in ("mention", "entity"):
            n = getattr(args, f"num_{side}_vecs")
            check_flag(getattr(args, f"{side}_use_codes") or n <= args.L, f"--num_{side}_vecs",
                       f"{n} token states asked for but --L is {args.L}")
    if args.resume_training:
        check_flag(os.path.isfile(args.model + ".last"), "--resume_training",
                   f"no checkpoint {args.model}.last to resume from")
    return args


# ----------------------------------------------------------------------------------------------
# Data

def load_split(args, zeshel, tokenizer, split, training):
    """A split's CandidateDataset (in evaluation only the mentions whose gold is among the first
    --C_eval candidates) and kept (M,) bool."""
    mentions = zeshel.mentions[split]
    cands = read_candidates(args.cands_dir, split, mentions)
    path = os.path.join(args.cands_dir, f"candidates_{split}.json")
    rows, kept = reranker.candidate_indices(zeshel.entities(split), mentions, cands,
                                            args.C if training else args.C_eval, training, path)
    pairs = args.type_model == "full"
    mention_ids, entity_ids, rows = reranker.encode_split(tokenizer, zeshel, split, rows, args.L,
                                                          args.inputmark, pairs)
    indices = range(len(mentions)) if training else kept.nonzero()[0]
    return reranker.CandidateDataset(indices, rows, mention_ids, entity_ids, args.L, tokenizer,
                                     pairs), kept


def loader(dataset, batch_size, args, rt, shuffle, epoch=0):
    """Batches of (mention indices (B,), *inputs (B, C, L)). The training order depends on --seed
    and the epoch only (so a resumed run repeats it); under torchrun each process takes its share
    of every batch (training) or every W-th mention (evaluation)."""
    common = dict(batch_size=batch_size, collate_fn=reranker.collate, num_workers=args.num_workers,
                  pin_memory=rt.device.type == "cuda",
                  generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
    if rt.distributed and shuffle:
        sampler = DistributedSampler(dataset, rt.world_size, rt.rank, shuffle=True, seed=args.seed)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, sampler=sampler, **common)
    if rt.distributed:
        dataset = torch.utils.data.Subset(dataset, range(rt.rank, len(dataset), rt.world_size))
    return DataLoader(dataset, shuffle=shuffle, **common)


# ----------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, data, args, rt, dtype, epoch):
    """Rank the candidates of every kept mention of a split: its results.json entry.
    data: (CandidateDataset of the kept mentions, kept (M,) bool, world of each mention (M,))."""
    dataset, kept, worlds = data
    model.eval()
    correct = torch.zeros(len(kept), dtype=torch.long, device=rt.device)  # (M,)
    batches = loader(dataset, args.eval_batchsize, args, rt, shuffle=False)
    quiet = args.quiet or not rt.is_main
    for index, *inputs in progress(batches, desc="evaluation", disable=quiet):
        with autocast(rt.device, dtype):
            scores = model(*(t.to(rt.device, non_blocking=True) for t in inputs))  # (B, C)
        correct[index.to(rt.device)] = reranker.gold_on_top(scores).long()
    if rt.distributed:
        torch.distributed.all_reduce(correct)
    report = reranker.linking_accuracy(worlds, kept, correct.cpu().numpy() > 0)
    return reranker.results_entry(report, args.eval_method, epoch)


def describe(entry, eval_method):
    other = "micro" if eval_method == "macro" else "macro"
    return (f"acc_unorm {entry['acc_unorm']:.2f} acc_norm {entry['acc_norm']:.2f} ({eval_method}); "
            f"{other} {entry[other]['acc_unorm']:.2f} / {entry[other]['acc_norm']:.2f}")


# ----------------------------------------------------------------------------------------------
# The run

def load_weights(model, state, path, flag):
    try:
        unwrap(model).load_state_dict(state)
    except RuntimeError:
        die(f"{flag}: {path} holds a model of another shape than these flags build")


@cli_main
def main(argv=None):
    args = parse_args(argv)
    rt = setup_runtime(args.gpus)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        run(args, rt)
    finally:
        cleanup_runtime(rt)


def run(args, rt):
    log = get_logger(args.model, rt.is_main)
    clock = StageClock(log)
    quiet = args.quiet or not rt.is_main
    check_flag(args.B % rt.world_size == 0, "--B",
               f"{args.B} mentions do not split evenly over {rt.world_size} processes")
    log.info("args: %s", " ".join(f"--{k} {v}" for k, v in vars(args).items()))
    log.info(describe_runtime(rt, args.B, args.gradient_accumulation_steps))
    dtype = amp_dtype(args.fp16, args.bf16, rt.device, log, args.fp32)
    set_seed(args.seed)
    paths = {"best": args.model, "last": args.model + ".last",
             "results": args.model + ".results.json"}

    state = None
    if args.resume_training:
        state = load_checkpoint(paths["last"], flag="--resume_training")
        keys = ("args", "model", "optimizer", "scheduler", "scaler", "epoch", "step", "losses",
                "best_score", "rng", "results")
        missing = [k for k in keys if not isinstance(state, dict) or k not in state]
        check_flag(not missing, "--resume_training",
                   f"{paths['last']} is not a reranker's training state (no {missing[:1]})")
        # dual, multi_vector, poly and sum_max have state dicts of one shape: compare the flags
        for flag in SHAPE_FLAGS[:1 if args.type_model == "full" else None]:
            saved, now = state.get("args", {}).get(flag), getattr(args, flag)
            check_flag(saved == now, f"--{flag}",
                       f"{paths['last']} was trained with --{flag} {saved}, not {now}")

    zeshel = Zeshel(args.data, ("train", "val", "test"), flag="--data")
    clock.lap("loading and checking")
    name = args.pretrained or reranker.MODEL_NAMES[args.type_bert]
    tokenizer = load_tokenizer(name)
    encoder = load_encoder(name, tokenizer)
    positions = getattr(encoder.config, "max_position_embeddings", args.L)
    check_flag(args.L <= positions, "--L", f"{args.L} is longer than the {positions} positions "
               f"of {name}")
    train, _ = load_split(args, zeshel, tokenizer, "train", training=True)
    log.info(f"train: {len(train)} mentions, the first {args.C} candidates each, the gold first "
             f"(added where missing)")
    evals = {}
    for split in ("val", "test"):
        dataset, kept = load_split(args, zeshel, tokenizer, split, training=False)
        evals[split] = (dataset, kept, [m["corpus"] for m in zeshel.mentions[split]])
        log.info(f"{split}: {len(kept)} mentions, {int(kept.sum())} with the gold among the first "
                 f"{args.C_eval} candidates ({100.0 * kept.mean():.2f}%)")
    clock.lap("reranker preparation (candidates and tokenization)")

    model = reranker.build_ranker(args.type_model, encoder, args.init, args.num_mention_vecs,
                                  args.num_entity_vecs, args.mention_use_codes,
                                  args.entity_use_codes).to(rt.device)
    optimizer = build_optimizer(model, args.lr, args.weight_decay, args.adam_epsilon,
                                args.simpleoptim)
    total = num_training_steps(len(train), args.B, args.gradient_accumulation_steps, args.epochs)
    scheduler = build_scheduler(optimizer, total, args.warmup_proportion, args.simpleoptim)
    scaler = grad_scaler(rt.device, dtype)

    start_epoch, step, losses, best = 0, 0, [], float("-inf")
    results = {"eval_method": args.eval_method, "val": [], "test": None}
    if state is not None:
        load_weights(model, state["model"], paths["last"], "--resume_training")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the run began without a float16 scaler
            scaler.load_state_dict(state["scaler"])
        start_epoch, step, losses = state["epoch"], state["step"], list(state["losses"])
        best, results = state["best_score"], state["results"]
        set_rng_state(state["rng"])
        log.info(f"resumed from {paths['last']} after epoch {start_epoch} (step {step})")

    if rt.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    elif rt.n_gpu > 1:
        train_model = torch.nn.DataParallel(model)
    else:
        train_model = model
    eval_model = train_model if isinstance(train_model, torch.nn.DataParallel) else model
    accum = args.gradient_accumulation_steps

    def save(epoch):
        """After an epoch's validation: the best checkpoint when it improved, the full state."""
        nonlocal best
        entry = results["val"][-1]
        improved = entry["acc_unorm"] > best
        best = max(best, entry["acc_unorm"])
        if rt.is_main:
            common = {"args": vars(args), "model": model.state_dict(), "epoch": epoch,
                      "step": step, "best_score": best}
            if improved:
                save_checkpoint(common, paths["best"])
                log.info(f"new best val acc_unorm {best:.2f}: saved {paths['best']}")
            save_checkpoint({**common, "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                             "losses": losses, "rng": rng_state(), "results": results},
                            paths["last"])
            write_json(results, paths["results"])
        barrier(rt)

    if args.epochs == 0:  # the untrained model, saved as the best so that test reads it back
        results["val"] = [evaluate(eval_model, evals["val"], args, rt, dtype, 0)]
        log.info(f"untrained val: {describe(results['val'][-1], args.eval_method)}")
        save(0)

    for epoch in range(start_epoch, args.epochs):
        train_model.train()
        batches = loader(train, args.B // rt.world_size, args, rt, shuffle=True, epoch=epoch)
        running = RunningMean(rt.device)
        bar = progress(batches, desc=f"epoch {epoch + 1}", disable=quiet)
        for i, (_, *inputs) in enumerate(bar):
            update = update_step(i, len(batches), accum)
            with gradient_sync(train_model, rt, update):
                with autocast(rt.device, dtype):
                    scores = train_model(*(t.to(rt.device, non_blocking=True) for t in inputs))
                loss = reranker.ranking_loss(scores)  # scores (B, C), the gold at 0
                scaler.scale(loss / accum).backward()
            running.add(loss)
            if not update:
                continue
            optimizer_step(model, optimizer, scheduler, scaler, args.clip)
            step += 1
            if step % args.logging_steps == 0:
                losses.append(running.pop())
                log.info(f"epoch {epoch + 1} step {step}/{total}: loss {losses[-1]:.4f} "
                         f"lr {scheduler.get_last_lr()[0]:.3g}")

        clock.lap(f"reranker training, epoch {epoch + 1}")
        results["val"].append(evaluate(eval_model, evals["val"], args, rt, dtype, epoch + 1))
        log.info(f"epoch {epoch + 1} val: {describe(results['val'][-1], args.eval_method)}")
        clock.lap(f"val evaluation, epoch {epoch + 1}")
        save(epoch + 1)
        clock.lap(f"checkpoints, epoch {epoch + 1}")
        if os.environ.get("HARD_NCE_STOP_AFTER_EPOCH") == str(epoch + 1):
            log.info(f"HARD_NCE_STOP_AFTER_EPOCH={epoch + 1}: stopping")
            return

    state = load_checkpoint(paths["best"])
    load_weights(model, state["model"], paths["best"], "--model")
    log.info(f"loaded the best checkpoint {paths['best']} (epoch {state['epoch']}, val acc_unorm "
             f"{state['best_score']:.2f})")
    results["test"] = evaluate(eval_model, evals["test"], args, rt, dtype, state["epoch"])
    clock.lap("test evaluation")
    log.info(f"test: {describe(results['test'], args.eval_method)}")
    for world, acc in results["test"]["per_world"].items():
        log.info(f"  {world}: acc_unorm {acc['acc_unorm']:.2f} acc_norm {acc['acc_norm']:.2f} "
                 f"({acc['correct']} correct / {acc['kept']} kept / {acc['mentions']} mentions)")
    if rt.is_main:
        write_json(results, paths["results"])
        log.info(f"wrote {paths['results']}")


if __name__ == "__main__":
    main()

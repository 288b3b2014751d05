"""Train the retriever with random, hard or mixed negatives and report recall@k (SPEC 4).

    python main_retriever.py --model runs/ret.pt --data_dir DATA --B 16 \\
        --gradient_accumulation_steps 2 --k 64 --epochs 4 --lr 1e-5 --num_cands 64 \\
        --type_cands mixed_negative --cands_ratio 0.5 --type_model sum_max \\
        --num_mention_vecs 128 --num_entity_vecs 128 [--pretrained FOLDER] [--bf16]

At the start of every epoch (the first included) the hard negatives are mined with the current
model; each mention is trained on [gold] + negatives with label 0. After each epoch val is ranked
(recall@k and top-1 accuracy, pooled over the split's entities as the original, and per world);
the best epoch by `--eval_criterion` is kept in `<model>`, the full state of the last one in
`<model>.last` (`--resume_training` continues from it), and after the last epoch the best is
reported on test. `<model>.results.json` holds every evaluation. `--epochs 0` reports the untrained
model (the zero-shot baseline) on val and test.

Entity vectors are streamed (encode a chunk, score it, drop it), so `--store_en_hiddens` and
`--en_hidden_path` are accepted for the original's command lines but nothing is written to disk.
`--num_hards` and `--num_workers` are accepted too: the counts come from `--num_cands` and
`--cands_ratio`, and batches are assembled by tensor indexing in the main process.

Under torchrun each process trains on B / processes mentions of every batch
(DistributedDataParallel) and scores its share of the entities; in one process with several GPUs,
DataParallel splits the batch. The environment variable HARD_NCE_STOP_AFTER_EPOCH=N ends the run
after epoch N is saved (the tests use it to check that a resumed run ends where an uninterrupted
one does).
"""
import argparse
import os

import torch

from data_loader import Zeshel
from retriever import (PRE_MODELS, TYPE_CANDS, TYPE_MODELS, candidate_counts, check_worlds_hold,
                       encode_split, load_retriever, mine_hard_negatives, pretrained_name,
                       rank_split, ranking_entry, training_candidates, vector_counts)
from utils import (add_precision_args, amp_dtype, autocast, barrier, build_optimizer,
                   build_scheduler, check_flag, check_positive, cleanup_runtime, cli_main,
                   describe_runtime, die, get_logger, grad_scaler, gradient_sync, load_checkpoint,
                   num_training_steps, optimizer_step, progress, rng_state, RunningMean,
                   save_checkpoint, set_rng_state, set_seed, setup_runtime, StageClock, unwrap,
                   update_step, write_json)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model",
                   help="checkpoint path (required); also <model>.last, .log, .results.json")
    p.add_argument("--resume_training", action="store_true", help="continue from <model>.last")
    p.add_argument("--max_len", type=int, default=128, help="tokens of a mention or entity window")
    p.add_argument("--num_hards", type=int, default=10, help="accepted for compatibility; "
                   "the counts come from --num_cands and --cands_ratio")
    p.add_argument("--type_cands", default="mixed_negative", choices=TYPE_CANDS)
    p.add_argument("--data_dir", help="Zeshel folder (required)")
    p.add_argument("--B", type=int, default=4, help="mentions per batch")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--epochs", type=int, default=4, help="0: evaluate the untrained model")
    p.add_argument("--k", type=int, default=64, help="recall@k")
    p.add_argument("--warmup_proportion", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--adam_epsilon", type=float, default=1e-6)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num_workers", type=int, default=0, help="accepted for compatibility")
    p.add_argument("--simpleoptim", action="store_true", help="plain Adam, constant rate")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--logging_steps", type=int, default=1000)
    p.add_argument("--gpus", default="", help="visible GPUs, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--eval_criterion", default="recall", choices=["recall", "accuracy"])
    p.add_argument("--pre_model", default="Bert", choices=list(PRE_MODELS))
    p.add_argument("--cands_ratio", type=float, default=1.0,
                   help="mixed_negative: share of random negatives")
    p.add_argument("--num_cands", type=int, default=128, help="negatives per mention")
    p.add_argument("--smoothing_value", type=float, default=1.0,
                   help="hard_negative: sample from softmax(smoothing_value * scores)")
    p.add_argument("--eval_batchsize", type=int, default=512,
                   help="mentions per encoder batch in evaluation")
    p.add_argument("--mention_bsz", type=int, default=512,
                   help="mentions per encoder batch in mining")
    p.add_argument("--entity_bsz", type=int, default=512, help="entities per streamed chunk")
    p.add_argument("--exclude_golds", action="store_true", help="never mine the gold as a negative")
    p.add_argument("--type_model", default="dual", choices=TYPE_MODELS)
    p.add_argument("--num_mention_vecs", type=int, default=8)
    p.add_argument("--num_entity_vecs", type=int, default=8)
    p.add_argument("--mention_use_codes", action="store_true")
    p.add_argument("--entity_use_codes", action="store_true")
    p.add_argument("--en_hidden_path", help="accepted for compatibility (vectors are streamed)")
    p.add_argument("--store_en_hiddens", action="store_true",
                   help="accepted for compatibility (vectors are streamed)")
    p.add_argument("--pretrained", help="model folder or hub name (default: from --pre_model)")
    add_precision_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def check_args(args):
    check_flag(args.model, "--model", "a checkpoint path is required")
    check_flag(args.data_dir, "--data_dir", "the Zeshel folder is required")
    check_flag(0.0 <= args.cands_ratio <= 1.0, "--cands_ratio",
               f"{args.cands_ratio} is not in [0, 1]")
    check_positive(args, "B", "k", "num_cands", "gradient_accumulation_steps", "logging_steps",
                   "eval_batchsize", "mention_bsz", "entity_bsz", "num_mention_vecs",
                   "num_entity_vecs", "lr", "adam_epsilon", "clip")
    check_flag(args.epochs >= 0, "--epochs", f"must be 0 or more (got {args.epochs})")
    check_flag(args.max_len >= 4, "--max_len", f"{args.max_len} is too short for a window")
    check_flag(0.0 <= args.warmup_proportion <= 1.0, "--warmup_proportion",
               f"{args.warmup_proportion} is not in [0, 1]")
    check_flag(args.weight_decay >= 0, "--weight_decay",
               f"must be 0 or more (got {args.weight_decay})")
    check_flag(args.smoothing_value >= 0, "--smoothing_value",
               f"must be 0 or more (got {args.smoothing_value})")
    for side in ("mention", "entity"):
        if not getattr(args, f"{side}_use_codes"):
            n = getattr(args, f"num_{side}_vecs")
            check_flag(n <= args.max_len, f"--num_{side}_vecs",
                       f"{n} token states asked for but --max_len is {args.max_len}")


def check_sizes(args, zeshel):
    """--k and --num_cands against the entity sets they are used on."""
    check_worlds_hold(zeshel, ("val", "test"), args.k, "--k")
    if args.epochs > 0:
        n = len(zeshel.entities("train"))
        check_flag(args.num_cands <= n - 1, "--num_cands", f"{args.num_cands} negatives asked for "
                   f"but train has {n} entities (gold included)")


def check_same_model(args, state, path):
    """Stop unless the checkpoint at `path` was trained with the scorer these flags ask for (the
    state dicts of dual, multi_vector and sum_max have the same shapes: loading cannot tell)."""
    trained = state.get("args") if isinstance(state, dict) else None
    trained = trained if isinstance(trained, dict) else {}
    for flag in ("type_model", "mention_use_codes", "entity_use_codes"):
        check_flag(trained.get(flag) == getattr(args, flag), f"--{flag}",
                   f"{path} was trained with {trained.get(flag)}, not {getattr(args, flag)}")
    for side, a, b in zip(("mention", "entity"),
                          vector_counts(args.type_model, args.num_mention_vecs,
                                        args.num_entity_vecs),
                          vector_counts(args.type_model, trained.get("num_mention_vecs"),
                                        trained.get("num_entity_vecs"))):
        check_flag(a == b, f"--num_{side}_vecs",
                   f"{path} was trained with {b} {side} vectors, not {a}")


def checkpoint(args, model, epoch, step, best_score, results, **full):
    return {"args": vars(args), "model": unwrap(model).state_dict(), "epoch": epoch, "step": step,
            "best_score": best_score, "results": results,
            "config": unwrap(model).mention_encoder.config.to_dict(), **full}


@cli_main
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    rt = setup_runtime(args.gpus)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log = get_logger(args.model, rt.is_main)
    clock = StageClock(log)
    quiet = args.quiet or not rt.is_main
    log.info("args: %s", " ".join(f"--{k} {v}" for k, v in vars(args).items()))
    if args.store_en_hiddens or args.en_hidden_path:
        log.info("note: entity vectors are streamed chunk by chunk; --store_en_hiddens and "
                 "--en_hidden_path are not needed and nothing is written there")
    check_flag(args.B % rt.world_size == 0, "--B",
               f"{args.B} mentions do not split evenly over {rt.world_size} processes")
    log.info(describe_runtime(rt, args.B, args.gradient_accumulation_steps))
    last_path = args.model + ".last"
    state = None
    if args.resume_training:
        check_flag(os.path.isfile(last_path), "--resume_training",
                   f"no checkpoint {last_path} to resume from")
        state = load_checkpoint(last_path, flag="--resume_training")
        check_same_model(args, state, last_path)

    set_seed(args.seed)
    device, dtype = rt.device, amp_dtype(args.fp16, args.bf16, rt.device, log, args.fp32)
    zeshel = Zeshel(args.data_dir, ("train", "val", "test"))
    check_sizes(args, zeshel)
    clock.lap("loading and checking")
    tokenizer, model = load_retriever(pretrained_name(args.pre_model, args.pretrained),
                                      args.type_model, args.num_mention_vecs, args.num_entity_vecs,
                                      args.mention_use_codes, args.entity_use_codes)
    positions = getattr(model.mention_encoder.config, "max_position_embeddings", args.max_len)
    check_flag(args.max_len <= positions, "--max_len",
               f"{args.max_len} is longer than the encoder's {positions} positions")
    pin = device.type == "cuda"
    splits = ("train", "val", "test") if args.epochs > 0 else ("val", "test")  # 0: no training
    data = {split: encode_split(tokenizer, zeshel, split, args.max_len, pin) for split in splits}
    clock.lap("model and tokenization")
    train = data.get("train")
    N, E = len(zeshel.mentions["train"]), len(zeshel.entities("train"))
    log.info("train %d mentions / %d entities, val %d / %d, test %d / %d", N, E,
             *[x for s in ("val", "test") for x in (len(data[s].golds), len(data[s].entities))])

    model.to(device)
    optimizer = build_optimizer(model, args.lr, args.weight_decay, args.adam_epsilon,
                                args.simpleoptim)
    total_steps = num_training_steps(N, args.B, args.gradient_accumulation_steps, args.epochs)
    scheduler = build_scheduler(optimizer, total_steps, args.warmup_proportion, args.simpleoptim)
    scaler = grad_scaler(device, dtype)
    start_epoch, step, best_score, losses = 0, 0, float("-inf"), []
    results = {"k": args.k, "val": [], "test": None}
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:
            die(f"--resume_training: {last_path} holds a model of another shape than these "
                f"flags ask for")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the run began without a float16 scaler
            scaler.load_state_dict(state["scaler"])
        start_epoch, step, best_score = state["epoch"], state["step"], state["best_score"]
        losses, results = state["losses"], state["results"]
        set_rng_state(state["rng"])
        log.info("resuming after epoch %d (step %d)", start_epoch, step)

    if rt.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    elif rt.n_gpu > 1:
        train_model = torch.nn.DataParallel(model)
    else:
        train_model = model
    num_rands, num_hards = candidate_counts(args.type_cands, args.num_cands, args.cands_ratio)
    sampled = args.type_cands in ("hard_negative", "hard_adjusted_negative")
    adjusted = args.type_cands == "hard_adjusted_negative"
    accum, key = args.gradient_accumulation_steps, f"recall@{args.k}"
    eval_kw = dict(mention_bsz=args.eval_batchsize, entity_bsz=args.entity_bsz, device=device,
                   dtype=dtype, rt=rt, quiet=quiet)

    def evaluate(split, epoch):
        pooled, per_world = rank_split(unwrap(model), data[split], args.k, **eval_kw)
        entry = ranking_entry(pooled, per_world, data[split], args.k, epoch)
        worlds = " ".join(f"{w} {r[key]:.2f}" for w, r in entry["per_world"].items())
        log.info("%s epoch %d: %s %.2f accuracy %.2f (per world: macro %.2f micro %.2f) %s", split,
                 epoch, key, entry[key], entry["accuracy"], entry[f"macro_{key}"],
                 entry[f"micro_{key}"], worlds)
        return entry

    def save_results():
        if rt.is_main:
            write_json(results, args.model + ".results.json")

    for epoch in range(start_epoch, args.epochs):
        # Per-epoch randomness from (seed, epoch) alone, so a resumed epoch repeats exactly.
        generator = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        hard = log_q = None
        if num_hards > 0:
            noise = torch.Generator(device).manual_seed(args.seed * 100003 + epoch + rt.rank * 7919)
            hard, log_q = mine_hard_negatives(
                unwrap(model), train.mention_ids, train.mention_mask, train.entity_ids,
                train.entity_mask, train.golds, num_hards, sample=sampled,
                smoothing_value=args.smoothing_value, exclude_golds=args.exclude_golds,
                generator=noise, mention_bsz=args.mention_bsz, entity_bsz=args.entity_bsz,
                device=device, dtype=dtype, rt=rt, quiet=quiet)
            clock.lap(f"mining, epoch {epoch + 1}")
        model.train()
        optimizer.zero_grad(set_to_none=True)
        batches = [b for b in torch.randperm(N, generator=generator).split(args.B)
                   if len(b) >= rt.world_size]
        running, epoch_loss = RunningMean(device), RunningMean(device)
        for i, batch in enumerate(progress(batches, desc=f"epoch {epoch + 1}", disable=quiet)):
            cands = training_candidates(train.golds[batch], E, num_rands, None if hard is None
                                        else hard[batch], generator)     # (B, 1 + C)
            own = batch.tensor_split(rt.world_size)[rt.rank]          # this process's mentions
            cands = cands.tensor_split(rt.world_size)[rt.rank]
            b, c = cands.shape
            to = dict(device=device, non_blocking=True)
            inputs = (train.mention_ids[own].to(**to), train.mention_mask[own].to(**to),
                      train.entity_ids[cands.view(-1)].view(b, c, -1).to(**to),
                      train.entity_mask[cands.view(-1)].view(b, c, -1).to(**to),
                      log_q[own].to(**to) if adjusted else None)
            sync = update_step(i, len(batches), accum)
            with gradient_sync(train_model, rt, sync):
                with autocast(device, dtype):
                    loss = train_model(*inputs).mean()
                scaler.scale(loss / accum).backward()
            running.add(loss)
            epoch_loss.add(loss)
            if not sync:
                continue
            optimizer_step(model, optimizer, scheduler, scaler, args.clip)
            step += 1
            if step % args.logging_steps == 0:
                losses.append(running.pop())
                log.info("epoch %d step %d/%d: loss %.4f lr %.3g", epoch + 1, step, total_steps,
                         losses[-1], scheduler.get_last_lr()[0])

        log.info("epoch %d: mean loss %.4f over %d batches", epoch + 1, epoch_loss.pop(),
                 len(batches))
        clock.lap(f"training, epoch {epoch + 1}")
        entry = evaluate("val", epoch + 1)
        clock.lap(f"val ranking, epoch {epoch + 1}")
        results["val"].append(entry)
        score = entry[key] if args.eval_criterion == "recall" else entry["accuracy"]
        improved = score > best_score
        best_score = max(best_score, score)
        if rt.is_main:
            if improved:
                save_checkpoint(checkpoint(args, model, epoch + 1, step, best_score, results),
                                args.model)
                log.info("new best val %s %.2f: saved %s", args.eval_criterion, score, args.model)
            save_checkpoint(checkpoint(args, model, epoch + 1, step, best_score, results,
                                       optimizer=optimizer.state_dict(),
                                       scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                                       losses=losses, rng=rng_state()), last_path)
        save_results()
        barrier(rt)
        clock.lap(f"checkpoints, epoch {epoch + 1}")
        if os.environ.get("HARD_NCE_STOP_AFTER_EPOCH") == str(epoch + 1):
            log.info("HARD_NCE_STOP_AFTER_EPOCH=%d: stopping", epoch + 1)
            cleanup_runtime(rt)
            return

    if args.epochs == 0:  # the zero-shot baseline, saved so that candidates can be dumped from it
        results["val"] = [evaluate("val", 0)]
        best_epoch = 0
        if rt.is_main:
            save_checkpoint(checkpoint(args, model, 0, 0, None, results), args.model)
    else:
        best = load_checkpoint(args.model)
        model.load_state_dict(best["model"])
        best_epoch = best["epoch"]
    results["test"] = evaluate("test", best_epoch)
    save_results()
    clock.lap("test ranking")
    log.info("test %s %.2f accuracy %.2f", key, results["test"][key], results["test"]["accuracy"])
    cleanup_runtime(rt)


if __name__ == "__main__":
    main()

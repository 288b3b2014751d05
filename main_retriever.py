"""Train the retriever with random, hard, mixed or in-batch negatives and report recall@k
(docs/DESIGN.md#training).

    python main_retriever.py --model runs/ret.pt --data_dir DATA --B 16 \\
        --gradient_accumulation_steps 2 --k 64 --epochs 4 --lr 1e-5 --num_cands 64 \\
        --type_cands mixed_negative --cands_ratio 0.5 --type_model sum_max \\
        --num_mention_vecs 128 --num_entity_vecs 128 [--pretrained FOLDER] [--bf16]

At the start of every epoch (the first included) the epoch's negatives are drawn and the hard ones
mined with the current model (retriever.epoch_negatives); each mention is trained on [gold] +
negatives with the NCE loss (retriever.nce_loss), every entity of a batch encoded once.
`--type_cands in_batch`: a mention's negatives are the golds of the batch's other mentions
(BLINK's); `in_batch_hard`: those and the negatives mixed_negative gives (`--num_cands`,
`--cands_ratio`: int(C r) random, the rest mined; `--cands_ratio 0`: in-batch + hard). After each
epoch val is ranked (recall@k and top-1 accuracy, pooled over the split's entities as the
original, and per world); the best epoch by `--eval_criterion` is kept in `<model>` (a later epoch
replaces an equal one, as the original), the full state of the last one in `<model>.last`
(`--resume_training` continues from it), and after the last epoch the best is reported on test.
`<model>.results.json` holds every evaluation. `--epochs 0` reports the untrained model (the
zero-shot baseline) on val and test.

Float32 by default (TF32 matrix multiplies on a GPU), as the original; `--bf16` or `--fp16` for
mixed precision. Under torchrun each process trains on B / processes mentions of every batch
(DistributedDataParallel; in-batch golds gathered with their gradients, so that the negatives are
the whole batch's) and scores its share of the entities; in one process with several GPUs, the
encoders split each batch's windows over them (DataParallel). `--num_hards`, `--num_workers`,
`--store_en_hiddens`, `--en_hidden_path` and `--eval_batchsize` (val and test are ranked in
batches of `--mention_bsz`, as the original) are accepted for the original's command line and do
nothing here (a notice says so): training streams the entity vectors; `save_candidates.py
--store_en_hiddens` stores them.
"""
import torch

from cli import (ArgumentParser, add_compatibility_args, add_data_arg, check_flag,
                 check_positive, notices)
from data_loader import PRETRAINED, Zeshel, check_encoder, check_positions, pretrained_name
from retriever import (ENTITY_WINDOWS, IN_BATCH, RANDOM_NEGATIVES, TYPE_CANDS, add_scorer_args,
                       candidate_counts, check_scorer_args, check_worlds_hold,
                       encode_retriever_split, epoch_negatives, load_retriever, nce_loss,
                       random_negative_stream, rank_split, ranking_entry, vector_counts)
from run_safety import main as cli_main
from training import (IGNORED_BY_OPTIMIZER, LossLog, Optimization, TrainingRun,
                      add_training_args, check_training_args, ends_accumulation, gradient_sync,
                      wrap_for_training)
from utils import amp_dtype, autocast, epoch_generator, progress, set_seed, unwrap, with_runtime

SCRIPT = "main_retriever"


def build_parser():
    """The flags, the original's and ours; `free=True`: may differ when resuming, `path=True`: an
    input compared by content (cli.py)."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arg(p, "--data_dir")
    add_training_args(p, batch=128)
    p.add_argument("--max_len", type=int, default=128, help="tokens of a mention or entity window")
    p.add_argument("--pre_model", default="Bert", choices=list(PRETRAINED["--pre_model"]),
                   path=True)
    p.add_argument("--pretrained", path=True,
                   help="model folder or hub name (default: from --pre_model)")
    add_scorer_args(p)
    p.add_argument("--type_cands", default="mixed_negative", choices=TYPE_CANDS)
    p.add_argument("--num_cands", type=int, default=128,
                   help="negatives per mention (in_batch_hard: besides the in-batch ones)")
    p.add_argument("--cands_ratio", type=float, default=1.0,
                   help="mixed_negative, in_batch_hard: share of random negatives")
    p.add_argument("--smoothing_value", type=float, default=1.0,
                   help="hard_negative: sample from softmax(smoothing_value * scores)")
    p.add_argument("--exclude_golds", action="store_true", help="never mine the gold as a negative")
    p.add_argument("--random_negatives", default="original", choices=RANDOM_NEGATIVES,
                   help="original: every epoch deals the same draws, whatever --seed, as the "
                        "original; fresh: drawn anew every epoch (docs/DESIGN.md#negatives)")
    p.add_argument("--entity_windows", default="per_candidate", choices=ENTITY_WINDOWS,
                   help="per_candidate: a window per candidate, as the original (an entity two "
                        "candidates of a batch share: two dropout draws); distinct: each entity "
                        "of a batch encoded once, faster where candidates repeat (in-batch "
                        "negatives always share the golds)")
    p.add_argument("--k", type=int, default=64, help="recall@k")
    p.add_argument("--eval_criterion", default="recall", choices=["recall", "accuracy"])
    p.add_argument("--mention_bsz", type=int, default=512, free=True,
                   help="mentions per encoder batch in mining and in ranking val and test")
    p.add_argument("--entity_bsz", type=int, default=512, free=True,
                   help="entities per streamed chunk")
    add_compatibility_args(p, "num_hards", "num_workers", "store_en_hiddens", "en_hidden_path",
                           "eval_batchsize")
    return p


def parse_args(argv=None):
    return check_args(build_parser().parse_args(argv))


# Flags the chosen --type_cands or --type_model ignores: a value given is said to do nothing.
IGNORED_BY_MODE = (
    ("cands_ratio", lambda a: a.type_cands not in ("mixed_negative", "in_batch_hard"),
     lambda a: f"only --type_cands mixed_negative and in_batch_hard mix random negatives in "
               f"(--type_cands {a.type_cands})"),
    ("num_cands", lambda a: a.type_cands == "in_batch",
     lambda a: "--type_cands in_batch takes its negatives from the batch (--B)"),
    ("entity_windows", lambda a: a.type_cands in IN_BATCH,
     lambda a: f"--type_cands {a.type_cands} encodes each entity of a batch once"),
    ("smoothing_value", lambda a: a.type_cands not in ("hard_negative", "hard_adjusted_negative"),
     lambda a: f"only hard_negative and hard_adjusted_negative sample (--type_cands "
               f"{a.type_cands})"),
    ("exclude_golds", lambda a: a.type_cands in ("random_negative", "in_batch"),
     lambda a: f"--type_cands {a.type_cands} mines nothing (random and in-batch negatives never "
               f"hold the gold)"),
    ("num_mention_vecs", lambda a: vector_counts(a.type_model, 2, 2)[0] == 1,
     lambda a: f"--type_model {a.type_model} takes one mention vector"),
    ("num_entity_vecs", lambda a: vector_counts(a.type_model, 2, 2)[1] == 1,
     lambda a: f"--type_model {a.type_model} takes one entity vector"),
    ("random_negatives", lambda a: candidate_counts(a.type_cands, a.num_cands,
                                                    a.cands_ratio)[0] == 0,
     lambda a: "no random negatives are drawn"),
) + IGNORED_BY_OPTIMIZER


def check_args(args):
    """The flags' values, checked: stop with one line naming the first that is out of range."""
    check_flag(args.data_dir, "--data_dir", "the Zeshel folder is required")
    check_training_args(args)
    check_positive(args, "k", "num_cands", "mention_bsz", "entity_bsz")
    check_flag(0.0 <= args.cands_ratio <= 1.0, "--cands_ratio",
               f"{args.cands_ratio} is not in [0, 1]")
    check_flag(args.max_len >= 4, "--max_len", f"{args.max_len} is too short for a window")
    check_flag(args.smoothing_value >= 0, "--smoothing_value",
               f"must be 0 or more (got {args.smoothing_value})")
    check_flag(args.B >= 2 or args.type_cands not in IN_BATCH, "--B",
               f"--type_cands {args.type_cands} takes the other golds of a batch as negatives: "
               f"a batch needs 2 mentions at least (got {args.B})")
    check_scorer_args(args, args.max_len, "--max_len")
    args.pretrained = pretrained_name("--pre_model", args.pre_model, args.pretrained)
    return args


def load_data_and_model(args, run, rt):
    """(the tokenized splits the run needs (train only when it trains), the retriever), after
    checking --k and --num_cands against the entity sets, --max_len against the encoder, and the
    data and encoder against the files at --model or the run resumed (run.start)."""
    log, clock = run.log, run.clock
    check_encoder(args.pretrained, loadable=False)
    zeshel = Zeshel(args.data_dir, ("train", "val", "test"))
    check_worlds_hold(zeshel, ("val", "test"), args.k, "--k")
    if args.epochs > 0 and args.type_cands != "in_batch":
        n = len(zeshel.entities("train"))
        check_flag(args.num_cands <= n - 1, "--num_cands", f"{args.num_cands} negatives asked for "
                   f"but train has {n} entities (gold included)")
    clock.lap("loading and checking")
    tokenizer, model = load_retriever(args.pretrained, args.type_model, args.num_mention_vecs,
                                      args.num_entity_vecs, args.mention_use_codes,
                                      args.entity_use_codes)
    check_positions(model.mention_encoder, args.max_len, "--max_len")
    state = run.start(model, {"data_dir": zeshel.fingerprint(),
                              "pretrained": model.mention_encoder.fingerprint})
    splits = ("train", "val", "test") if args.epochs > 0 else ("val", "test")
    pin = rt.device.type == "cuda"
    data = {s: encode_retriever_split(tokenizer, zeshel, s, args.max_len, pin, rt) for s in splits}
    log.info("train %d mentions / %d entities, val %d / %d, test %d / %d",
             *[x for s in ("train", "val", "test")
               for x in (len(zeshel.mentions[s]), len(zeshel.entities(s)))])
    clock.lap("model and tokenization")
    return data, model, state


@cli_main
def main(argv=None):
    parser = build_parser()
    args = check_args(parser.parse_args(argv))
    with_runtime(args, lambda args, rt: train_retriever(args, rt, parser))


@torch.no_grad()
def evaluate(model, data, args, stream, epoch):
    """Rank a split's mentions against all its entities (in batches of --mention_bsz mentions,
    as the original): its results.json entry."""
    pooled, per_world = rank_split(unwrap(model), data, args.k, mention_bsz=args.mention_bsz,
                                   **stream)
    return ranking_entry(pooled, per_world, data, args.k, epoch)


def batch_mean(loss, rt):
    """The loss of the whole batch (the mean over processes of each one's mean over its share,
    for the log), whatever the number of processes."""
    loss = loss.detach()
    if rt.distributed:
        torch.distributed.all_reduce(loss)
        loss = loss / rt.world_size
    return loss


def describe(entry, k):
    key = f"recall@{k}"
    return (f"{key} {entry[key]:.2f} accuracy {entry['accuracy']:.2f} (per world: macro "
            f"{entry[f'macro_{key}']:.2f} micro {entry[f'micro_{key}']:.2f}) "
            + " ".join(f"{w} {r[key]:.2f}" for w, r in entry["per_world"].items()))


def train_retriever(args, rt, parser):
    """Set up, then per epoch: the negatives, the training loop and val; test at the end."""
    run = TrainingRun(SCRIPT, args, parser, rt, {"k": args.k, "val": [], "test": None},
                      criterion=args.eval_criterion, ties_replace=True)
    log, clock = run.log, run.clock
    for line in notices(args, parser, IGNORED_BY_MODE):
        log.info("notice: %s", line)
    set_seed(args.seed)
    device, dtype = rt.device, amp_dtype(args.fp16, args.bf16, rt.device, log, args.fp32)
    data, model, state = load_data_and_model(args, run, rt)
    train = data.get("train")
    model.to(device)
    opt = Optimization(model, args, len(train.golds) if train else 0, dtype, device, state)
    train_model = wrap_for_training(model, rt) if rt.distributed else model
    if rt.n_gpu > 1 and not rt.distributed:  # one process: its GPUs split the encoders' windows
        model.replicas = list(range(rt.n_gpu))
    stream = dict(entity_bsz=args.entity_bsz, device=device, dtype=dtype, rt=rt, quiet=run.quiet)

    def validate(epoch):
        entry = evaluate(model, data["val"], args, stream, epoch)
        clock.lap(f"val ranking, epoch {epoch}")
        run.results["val"].append(entry)
        log.info("val epoch %d: %s", epoch, describe(entry, args.k))
        return entry[f"recall@{args.k}" if args.eval_criterion == "recall" else "accuracy"]

    if args.epochs == 0:  # the zero-shot baseline, saved so that candidates can be dumped from it
        run.end_epoch(0, validate(0), opt)
    for epoch in range(run.epoch, args.epochs):
        negatives = epoch_negatives(
            unwrap(model), train, args.type_cands, args.num_cands, args.cands_ratio,
            smoothing_value=args.smoothing_value, exclude_golds=args.exclude_golds,
            generator=epoch_generator(args.seed, epoch, rt.rank, device),
            mention_bsz=args.mention_bsz, entity_windows=args.entity_windows, **stream)
        clock.lap(f"negatives, epoch {epoch + 1}")
        generator = epoch_generator(args.seed, epoch)  # the batches (and fresh random negatives)
        batches = [b for b in torch.randperm(len(train.golds), generator=generator).split(args.B)
                   if len(b) >= rt.world_size]
        draws = random_negative_stream(args.random_negatives, generator)
        losses, windows = LossLog(device), torch.zeros(2, dtype=torch.long)
        train_model.train()
        for i, batch in enumerate(progress(batches, desc=f"epoch {epoch + 1}", disable=run.quiet)):
            # this process's mentions (b,), the entities it encodes (N,), each mention's
            # candidates as rows of the batch's entity vectors (b, 1 + C), log q (b, C) or None
            cands = negatives.batch(batch, draws, rt.rank, rt.world_size)
            to = dict(device=device, non_blocking=True)
            inputs = (train.mention_ids[cands.mentions].to(**to),
                      train.mention_mask[cands.mentions].to(**to),
                      train.entity_ids[cands.entities].to(**to),
                      train.entity_mask[cands.entities].to(**to), cands.index.to(**to))
            log_q = None if cands.log_q is None else cands.log_q.to(**to)
            update = ends_accumulation(i, len(batches), args.gradient_accumulation_steps)
            with gradient_sync(train_model, update):
                with autocast(device, dtype):  # scores (b, 1 + C), gold first
                    loss = nce_loss(train_model(*inputs, shared=cands.shared), log_q)
                opt.backward(loss)
            losses.add(batch_mean(loss, rt), opt.steps)
            windows += torch.tensor([len(cands.entities), (cands.index >= 0).sum()])
            if update and opt.step() % args.logging_steps == 0:
                run.log_losses(losses, epoch + 1, opt)  # a non-finite loss stops the run
        log.info("epoch %d: %.1f entity windows encoded per batch for %.1f candidates (this "
                 "process)", epoch + 1, *(windows / max(1, len(batches))).tolist())
        clock.lap(f"training, epoch {epoch + 1}")
        run.end_epoch(epoch + 1, validate(epoch + 1), opt, losses)  # checks the losses first

    run.results["test"] = evaluate(model, data["test"], args, stream, run.load_best())
    clock.lap("test ranking")
    run.save_results()
    log.info("test: %s", describe(run.results["test"], args.k))


if __name__ == "__main__":
    main()

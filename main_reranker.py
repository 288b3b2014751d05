"""Train the reranker on retrieved candidates and report linking accuracy
(docs/DESIGN.md#reranker).

    python main_reranker.py --model runs/reranker.pt --data ZESHEL --cands_dir CANDS \\
        --B 2 --gradient_accumulation_steps 2 --num_workers 2 --warmup_proportion 0.2 \\
        --epochs 3 --lr 2e-5 --eval_method macro --type_model full --type_bert base --inputmark \\
        [--fp16] [--pretrained FOLDER]

Each mention is trained on the first --C of its candidates (CANDS/candidates_<split>.json, from
save_candidates.py) with the gold at index 0 (put in front where the list missed it, the C-th
dropping out), with the NCE loss (retriever.nce_loss). After each epoch val is ranked: normalized
accuracy over the mentions whose gold is among the first --C_eval candidates, unnormalized over all
mentions, per world, and averaged as --eval_method says (macro: the mean over worlds; micro:
pooled). The best epoch by unnormalized val accuracy is kept in `<model>` (an equal later epoch
does not replace it, as the original), the full state of the last one in `<model>.last`
(`--resume_training` continues from it); after the last epoch the best is reported on test.
`<model>.results.json` holds every evaluation, `<model>.log` the log. `--epochs 0` reports the
untrained model.

`--type_model full` is the cross-encoder; dual, multi_vector, poly and sum_max train the
retriever's scorer (retriever.py) over the same candidates, with the retriever's windows of --L
tokens. Under torchrun each process takes B / processes mentions of every batch
(DistributedDataParallel); in one process with several GPUs DataParallel splits the batch. Float32
by default (TF32 matrix multiplies on a GPU), as the original; mixed precision on request: --fp16
(float16 autocast and a gradient scaler; bfloat16 on a CPU) or --bf16. `--fp16_opt_level` is
accepted for the original's command line and does nothing.
"""
import os

import torch
from torch.utils.data import DataLoader, DistributedSampler

import reranker
from cli import (ArgumentParser, add_compatibility_args, add_data_arg, check_flag,
                 check_positive, notices)
from data_loader import (PRETRAINED, Zeshel, check_encoder, check_positions, load_encoder,
                         load_tokenizer, pretrained_name, read_candidates)
from retriever import add_scorer_args, check_scorer_args, nce_loss
from run_safety import detach_worker, main as cli_main, notice, recorded, recorded_anywhere
from training import (IGNORED_BY_OPTIMIZER, LossLog, Optimization, TrainingRun,
                      add_training_args, check_training_args, ends_accumulation, gradient_sync,
                      wrap_for_training)
from utils import amp_dtype, autocast, epoch_generator, progress, set_seed, with_runtime

SCRIPT = "main_reranker"
SPLITS = ("train", "val", "test")


def build_parser():
    """The flags, the original's and ours; `free=True`: may differ when resuming, `path=True`: an
    input compared by content (cli.py)."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arg(p, "--data")
    p.add_argument("--cands_dir", path=True, help="folder of candidates_<split>.json (required)")
    add_training_args(p, batch=8)
    p.add_argument("--L", type=int, default=256, help="tokens of a mention-entity pair")
    p.add_argument("--C", type=int, default=64, help="candidates per mention in training")
    p.add_argument("--C_eval", type=int, default=64, help="candidates per mention in evaluation")
    p.add_argument("--eval_batchsize", type=int, default=None, free=True,
                   help="mentions per evaluation batch (default: --B)")
    p.add_argument("--init", type=float, default=0.0,
                   help="std of the score layer's init (0: the encoder's initializer_range)")
    p.add_argument("--num_workers", type=int, default=1, free=True,
                   help="data loader worker processes (0: batches built in the main process)")
    p.add_argument("--eval_method", default="macro", choices=["micro", "macro"])
    add_scorer_args(p, reranker.TYPE_MODELS, default="full")
    p.add_argument("--type_bert", default="base", choices=list(PRETRAINED["--type_bert"]),
                   path=True)
    p.add_argument("--pretrained", default=None, path=True,
                   help="model folder or name (default: bert-base/large-uncased by --type_bert)")
    p.add_argument("--inputmark", action="store_true", help="wrap mentions in [unused0]/[unused1]")
    add_compatibility_args(p, "fp16_opt_level")
    return p


def parse_args(argv=None):
    return check_args(build_parser().parse_args(argv))


def _full(args):
    return args.type_model == "full"


# Flags the chosen --type_model ignores: a value given is said to do nothing.
IGNORED_BY_MODE = tuple(
    (name, _full, lambda a: "--type_model full scores [CLS] of the pair, no retriever vectors")
    for name in ("num_mention_vecs", "num_entity_vecs", "mention_use_codes", "entity_use_codes")
) + (("inputmark", lambda a: not _full(a),
      lambda a: f"--type_model {a.type_model} uses the retriever's windows, marked always"),
     ("init", lambda a: not _full(a),
      lambda a: f"--type_model {a.type_model} has no score layer to initialise")
     ) + IGNORED_BY_OPTIMIZER


def check_args(args):
    """The flags' values, checked: stop with one line naming the first that is out of range."""
    check_flag(args.data_dir, "--data", "give the Zeshel folder")
    check_flag(args.cands_dir, "--cands_dir", "give the folder of the candidates files")
    check_flag(os.path.isdir(args.cands_dir), "--cands_dir", f"{args.cands_dir} is not a folder")
    check_training_args(args)
    check_flag(args.L >= 16, "--L", f"must be at least 16 (got {args.L})")
    if args.eval_batchsize is None:
        args.eval_batchsize = args.B
    check_positive(args, "C", "C_eval", "eval_batchsize")
    check_flag(args.num_workers >= 0, "--num_workers", "must be 0 or more")
    check_flag(args.init >= 0, "--init", "must be 0 (the encoder's initializer_range) or more")
    if args.type_model != "full":
        check_scorer_args(args, args.L, "--L")
    args.pretrained = pretrained_name("--type_bert", args.type_bert, args.pretrained)
    return args


# ----------------------------------------------------------------------------------------------
# Data

def split_candidates(args, zeshel, split, training):
    """A split's candidates, read once and checked: ((rows, kept (M,) bool) as
    reranker.candidate_indices gives them, the sha256 of the file read)."""
    mentions = zeshel.mentions[split]
    cands, sha = read_candidates(args.cands_dir, split, mentions, documents=zeshel.documents,
                                 C=args.C if training else args.C_eval,
                                 C_flag="--C" if training else "--C_eval")
    path = os.path.join(args.cands_dir, f"candidates_{split}.json")
    return reranker.candidate_indices(zeshel.entities(split), mentions, cands,
                                      args.C if training else args.C_eval, training, path), sha


def check_candidates(cands_dir, digests, zeshel):
    """Stop unless the candidates files read ({split: sha256 of what was read}) are those
    save_candidates.py wrote in `cands_dir` (its record), all of one run, from the data of
    `zeshel`; files its record does not know (the original code's) are a notice."""
    paths = {s: os.path.join(cands_dir, f"candidates_{s}.json") for s in digests}
    if not any(recorded_anywhere(p) for p in paths.values()):
        notice(f"{cands_dir}: candidates not written by this project's save_candidates.py: "
               f"used unchecked")
        return
    runs, now = set(), zeshel.fingerprint()
    for split, path in paths.items():
        got = recorded(path, digests[split])
        check_flag(got is not None and got[0].get("tool") == "save_candidates", "--cands_dir",
                   f"{path} is not the file save_candidates.py wrote (changed since, or never "
                   f"written by it); run save_candidates.py again")
        runs.add(got[0]["run"])
        made = (got[1] or {}).get("inputs", {}).get("data_dir", {}).get("content") or {}
        for s in digests:
            check_flag(made.get(s) in (None, now.get(s)), "--cands_dir",
                       f"{cands_dir} holds candidates made from other data (its {s} split "
                       f"differs from --data {zeshel.data_dir}); run save_candidates.py on it")
    check_flag(len(runs) == 1, "--cands_dir", f"the candidates files of {cands_dir} come from "
               f"different runs of save_candidates.py (one stopped half-way?); run it again")


def load_split(args, zeshel, tokenizer, split, training, rows, kept, rt=None):
    """A split's CandidateDataset of its `rows` and `kept` (split_candidates; in evaluation only
    the mentions whose gold is among the first --C_eval candidates) and kept."""
    mentions = zeshel.mentions[split]
    if args.type_model == "full":
        mention_ids, entity_ids, rows = reranker.encode_pair_windows(
            tokenizer, zeshel, split, rows, args.L, args.inputmark, rt=rt)
        dataset = reranker.PairDataset
    else:
        mention_ids, entity_ids, rows = reranker.encode_retriever_windows(
            tokenizer, zeshel, split, rows, args.L, rt=rt)
        dataset = reranker.WindowDataset
    indices = range(len(mentions)) if training else kept.nonzero()[0]
    return dataset(indices, rows, mention_ids, entity_ids, args.L, tokenizer), kept


def loader(dataset, batch_size, args, rt, shuffle, epoch=0):
    """Batches of (mention indices (B,), *inputs (B, C, L)). The training order depends on --seed
    and the epoch only, not on --num_workers (so a resumed run repeats it); under torchrun each
    process takes its share of every batch (training) or every W-th mention (evaluation)."""
    common = dict(batch_size=batch_size, collate_fn=reranker.collate, num_workers=args.num_workers,
                  pin_memory=rt.device.type == "cuda", worker_init_fn=detach_worker,
                  generator=epoch_generator(args.seed, epoch))
    if rt.distributed and shuffle:
        sampler = DistributedSampler(dataset, rt.world_size, rt.rank, shuffle=True, seed=args.seed)
        sampler.set_epoch(epoch)
        return Batches(DataLoader(dataset, sampler=sampler, **common))
    if rt.distributed:
        dataset = torch.utils.data.Subset(dataset, range(rt.rank, len(dataset), rt.world_size))
    if shuffle:  # a DataLoader with workers draws its order from the generator otherwise
        order = shuffled_order(len(dataset), common["generator"])
        return Batches(DataLoader(dataset, sampler=order, **common))
    return Batches(DataLoader(dataset, shuffle=False, **common))


def shuffled_order(n, generator):
    """An epoch's order of n mentions, drawn from `generator`: the order this script has trained
    in from the start, that of a shuffling DataLoader without workers looped over through
    utils.progress (whose tqdm takes an iterator of it first, one draw), whatever --num_workers."""
    indices = DataLoader(range(n), batch_size=max(1, n), shuffle=True, generator=generator)
    return [i for batch in progress(indices, disable=True) for i in batch.tolist()]


class Batches:
    """A DataLoader that starts (with its workers) only when looped over: tqdm (utils.progress)
    takes an iterator of what it is given at once, which for a bare DataLoader with workers
    started a second set of worker processes that did nothing."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        yield from self.loader


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
    for index, *inputs in progress(batches, desc="evaluation",
                                   disable=args.quiet or not rt.is_main):
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

@cli_main
def main(argv=None):
    parser = build_parser()
    args = check_args(parser.parse_args(argv))
    with_runtime(args, lambda args, rt: train_reranker(args, rt, parser))


def load_data_and_model(args, run, rt):
    """(the train CandidateDataset, val and test as evaluate takes them, the model, the resumed
    state), after checking the candidates, --L against the encoder, and the data, encoder and
    candidates against the files at --model or the run resumed (run.start)."""
    log, clock = run.log, run.clock
    check_encoder(args.pretrained, loadable=False)
    zeshel = Zeshel(args.data_dir, ("train", "val", "test"), flag="--data")
    candidates, cands = {}, {}
    for s in SPLITS:  # each file read once: its rows and the digest of what was read
        candidates[s], cands[s] = split_candidates(args, zeshel, s, s == "train")
    check_candidates(args.cands_dir, cands, zeshel)
    clock.lap("loading and checking")
    tokenizer = load_tokenizer(args.pretrained)
    encoder = load_encoder(args.pretrained, tokenizer)
    check_positions(encoder, args.L, "--L")
    model = reranker.build_ranker(args.type_model, encoder, args.init, args.num_mention_vecs,
                                  args.num_entity_vecs, args.mention_use_codes,
                                  args.entity_use_codes)
    state = run.start(model, {"data_dir": zeshel.fingerprint(), "pretrained": encoder.fingerprint,
                              "cands_dir": cands})
    train, _ = load_split(args, zeshel, tokenizer, "train", True, *candidates["train"], rt)
    log.info("train: %d mentions, %d candidates each, the gold first", len(train), args.C)
    evals = {}
    for split in ("val", "test"):
        dataset, kept = load_split(args, zeshel, tokenizer, split, False, *candidates[split], rt)
        evals[split] = (dataset, kept, [m["corpus"] for m in zeshel.mentions[split]])
        log.info("%s: %d mentions, %d with the gold among the first %d candidates (%.2f%%)", split,
                 len(kept), int(kept.sum()), args.C_eval, 100.0 * kept.mean())
    clock.lap("reranker preparation (candidates and tokenization)")
    return train, evals, model, state


def train_reranker(args, rt, parser):
    """Set up, then per epoch: the training loop and val; test at the end."""
    run = TrainingRun(SCRIPT, args, parser, rt, {"eval_method": args.eval_method, "val": [],
                                                 "test": None},
                      criterion="acc_unorm", ties_replace=False)
    log, clock = run.log, run.clock
    for line in notices(args, parser, IGNORED_BY_MODE):
        log.info("notice: %s", line)
    dtype = amp_dtype(args.fp16, args.bf16, rt.device, log, args.fp32)
    set_seed(args.seed)
    train, evals, model, state = load_data_and_model(args, run, rt)
    model.to(rt.device)
    opt = Optimization(model, args, len(train), dtype, rt.device, state)
    train_model = wrap_for_training(model, rt)
    eval_model = train_model if isinstance(train_model, torch.nn.DataParallel) else model

    def validate(epoch):
        entry = evaluate(eval_model, evals["val"], args, rt, dtype, epoch)
        clock.lap(f"val evaluation, epoch {epoch}")
        run.results["val"].append(entry)
        log.info("val epoch %d: %s", epoch, describe(entry, args.eval_method))
        return entry["acc_unorm"]

    if args.epochs == 0:  # the untrained model, saved as the best so that test reads it back
        run.end_epoch(0, validate(0), opt)
    for epoch in range(run.epoch, args.epochs):
        batches = loader(train, args.B // rt.world_size, args, rt, shuffle=True, epoch=epoch)
        losses = LossLog(rt.device)
        train_model.train()
        for i, (_, *inputs) in enumerate(progress(batches, desc=f"epoch {epoch + 1}",
                                                  disable=run.quiet)):
            update = ends_accumulation(i, len(batches), args.gradient_accumulation_steps)
            with gradient_sync(train_model, update):
                with autocast(rt.device, dtype):
                    scores = train_model(*(t.to(rt.device, non_blocking=True) for t in inputs))
                loss = nce_loss(scores)  # scores (B, C), the gold at 0
                opt.backward(loss)
            losses.add(loss, opt.steps)
            if update and opt.step() % args.logging_steps == 0:
                run.log_losses(losses, epoch + 1, opt)  # a non-finite loss stops the run
        clock.lap(f"training, epoch {epoch + 1}")
        run.end_epoch(epoch + 1, validate(epoch + 1), opt, losses)  # checks the losses first

    run.results["test"] = evaluate(eval_model, evals["test"], args, rt, dtype, run.load_best())
    clock.lap("test evaluation")
    log.info("test: %s", describe(run.results["test"], args.eval_method))
    for world, acc in run.results["test"]["per_world"].items():
        log.info("  %s: acc_unorm %.2f acc_norm %.2f (%d correct / %d kept / %d mentions)", world,
                 acc["acc_unorm"], acc["acc_norm"], acc["correct"], acc["kept"], acc["mentions"])
    run.save_results()


if __name__ == "__main__":
    main()

"""The machinery of the two training scripts around their loops (docs/DESIGN.md#training): the
shared training flags, the optimizer (the original's AdamW) and schedule, and `TrainingRun`, which
owns the optimizer, scheduler and gradient scaler, the accumulation and update step, the loss
bookkeeping and its non-finite check, and the best and last checkpoints."""
import contextlib
import importlib
import math
import os

import torch

from data_loader import check_encoder
from run_safety import (MAY_DIFFER, MAY_MOVE, check_finite_flags, check_inputs,
                        check_output_file, check_overwrite, check_resume_flags, checkpoint_args,
                        load_run_checkpoint, load_weights, start_run)
from utils import (StageClock, add_precision_args, barrier, check_flag, check_positive,
                   deferred_signals, die, describe_runtime, get_logger, grad_scaler, log_args,
                   open_log_file, progress, recorded_args, rng_state, save_checkpoint,
                   set_rng_state, unwrap, write_json)


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule

class OriginalAdamW(torch.optim.Optimizer):
    """The AdamW of transformers 3.1, which the original code trained with (docs/DESIGN.md#optimizer).

    Per step t, for a parameter p with gradient g (m, v start at 0):
        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        p = p - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
        p = p - lr * weight_decay * p          (after the update, from the updated p)
    It differs from torch.optim.AdamW in two places: epsilon is added to the square root of the
    uncorrected second moment (torch: of the bias-corrected one), and the decay comes after the
    update (torch: before). With the paper's eps = 1e-6 the first updates of parameters with small
    gradients differ by several times.

    >>> p = torch.nn.Parameter(torch.tensor([1.0])); p.grad = torch.tensor([0.5])
    >>> OriginalAdamW([p], lr=0.1, eps=0.0).step(); round(p.item(), 6)
    0.9
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = (group["lr"], group["betas"], group["eps"],
                                              group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]
                m.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                step_size = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                p.addcdiv_(m, v.sqrt().add_(eps), value=-step_size)
                if decay > 0.0:
                    p.add_(p, alpha=-lr * decay)
        return loss


# --optimizer: the original's algorithm by default; torch's AdamW (and its fused GPU kernel) on
# request. --simpleoptim (plain Adam, constant rate) overrides it, as in the original.
OPTIMIZERS = ("original", "torch", "torch_fused")


def build_optimizer(model, lr, weight_decay=0.0, adam_epsilon=1e-8, simpleoptim=False,
                    optimizer="original"):
    """AdamW with no weight decay for biases and LayerNorm weights (`optimizer`: one of
    OPTIMIZERS); `simpleoptim`: plain Adam over every parameter."""
    if simpleoptim:
        return torch.optim.Adam(model.parameters(), lr=lr)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (rest if any(nd in name for nd in no_decay) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if optimizer == "original":
        return OriginalAdamW(groups, lr=lr, eps=adam_epsilon)
    fused = optimizer == "torch_fused"
    if fused:
        check_fused(decay + rest)
    return torch.optim.AdamW(groups, lr=lr, eps=adam_epsilon, fused=fused)


def check_fused(params):
    """Stop with one line, before any training, when torch's fused AdamW kernel cannot update
    these parameters (a device or dtype it does not support); torch itself would raise only at
    the first step."""
    check = getattr(importlib.import_module("torch.optim.optimizer"),
                    "_device_dtype_check_for_fused", None)
    if check is None:  # a torch without the check: its own error at the first step
        return
    try:
        for p in params:
            check(p)
    except RuntimeError as e:
        die(f"--optimizer torch_fused: torch's fused AdamW kernel cannot run here "
            f"({str(e).splitlines()[0]}); use --optimizer torch or original")


def build_scheduler(optimizer, num_training_steps, warmup_proportion=0.1, simpleoptim=False):
    """Linear warm-up for `warmup_proportion` of the steps, then linear decay to 0
    (`simpleoptim`: constant rate)."""
    if simpleoptim:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    num_training_steps = max(1, int(num_training_steps))
    warmup = int(warmup_proportion * num_training_steps)

    def factor(step):
        if step < warmup:
            return float(step) / float(max(1, warmup))
        return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def num_training_steps(num_examples, batch_size, accumulation, epochs):
    """As the original: int(N / B / accum * epochs)."""
    return int(num_examples / batch_size / accumulation * epochs)


# ----------------------------------------------------------------------------------------------
# The flags the two training scripts share

def add_training_args(parser, batch):
    """The flags the two training scripts share, with the original's defaults (`batch`: --B)."""
    p = parser
    p.add_argument("--resume_training", action="store_true", help="continue from <model>.last")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of another run at --model (a checkpoint of another "
                        "script or other flags)")
    p.add_argument("--B", type=int, default=batch,
                   help="mentions per batch (all processes together)")
    p.add_argument("--epochs", type=int, default=3, help="0: evaluate the untrained model")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup_proportion", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--adam_epsilon", type=float, default=1e-6)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: none)")
    p.add_argument("--simpleoptim", action="store_true", help="plain Adam, constant rate")
    p.add_argument("--optimizer", default="original", choices=OPTIMIZERS,
                   help="AdamW as the original (transformers 3.1's), torch.optim.AdamW, or its "
                        "fused GPU kernel (docs/DESIGN.md#optimizer)")
    p.add_argument("--logging_steps", type=int, default=1000,
                   help="log the mean loss every this many optimizer steps")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gpus", default="", help="visible GPUs, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES)")
    add_precision_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def check_training_args(args):
    """Stop with one line on the first shared training flag out of its range."""
    check_positive(args, "B", "gradient_accumulation_steps", "logging_steps", "lr",
                   "adam_epsilon")
    check_flag(args.epochs >= 0, "--epochs", f"must be 0 or more (got {args.epochs})")
    check_flag(0.0 <= args.warmup_proportion <= 1.0, "--warmup_proportion",
               f"{args.warmup_proportion} is not in [0, 1]")
    check_flag(args.weight_decay >= 0, "--weight_decay",
               f"must be 0 or more (got {args.weight_decay})")
    check_flag(args.clip >= 0, "--clip", f"must be 0 (no clipping) or more (got {args.clip})")


# ----------------------------------------------------------------------------------------------
# The loss and the step

class RunningMean:
    """The mean of scalar loss tensors, summed on their device (no synchronization per step);
    `pop()` returns it as a float and starts over."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.total, self.count = torch.zeros((), device=self.device), 0

    def add(self, value):
        self.total += value.detach()
        self.count += 1

    def pop(self):
        mean = float(self.total) / max(1, self.count)
        self.reset()
        return mean


class LossCheck:
    """Stops the run at the first non-finite training loss, before anything of the epoch is
    saved. `watch(loss, epoch, step)` after each backward pass checks the loss of the batch
    before (so that the check never waits for the device); `flush()` at the end of the epoch
    checks the last one."""

    def __init__(self, args):
        self.args, self.pending = args, None

    def watch(self, loss, epoch, step):
        self.flush()
        self.pending = (torch.isfinite(loss.detach()).all(), loss.detach(), epoch, step)

    def flush(self):
        if self.pending is None:
            return
        finite, loss, epoch, step = self.pending
        self.pending = None
        if not bool(finite):
            a = self.args
            likely = [f"--lr {a.lr} too high?"]
            if getattr(a, "fp16", False):
                likely.append("--fp16 overflowing (try --bf16)?")
            if getattr(a, "clip", 1.0) == 0:
                likely.append("no gradient clipping (--clip 0)?")
            die(f"epoch {epoch} step {step}: the training loss is {float(loss)}; stopped, with "
                f"nothing of this epoch saved ({' '.join(likely)})")


def improved(score, best, ties_replace):
    """Whether an epoch's val `score` replaces the `best` so far: on a tie the later epoch wins
    when `ties_replace` (the retriever, as the original's >=), else the earlier one stays (the
    reranker, as the original's >) (docs/DESIGN.md#training).

    >>> improved(80.0, 80.0, ties_replace=True), improved(80.0, 80.0, ties_replace=False)
    (True, False)
    """
    return score >= best if ties_replace else score > best


# ----------------------------------------------------------------------------------------------
# A training run

def start_training(args, script, encoder):
    """Before any work (run_safety): refuse an `encoder` (folder or hub name) that cannot serve,
    non-finite flags and a --model that cannot be written, take `<model>.lock`, turn SIGTERM and
    SIGINT into a clean stop, and refuse to write over the files of another run
    (check_overwrite)."""
    check_encoder(encoder, loadable=False)
    check_finite_flags(args)
    check_output_file(args.model, "--model")
    start_run(args.model + ".lock", "--model", last=args.model + ".last", best=args.model)
    check_overwrite(args, script)


def wrap_for_training(model, rt):
    """The model as the training loop calls it: DistributedDataParallel under torchrun,
    DataParallel over the GPUs of one process, else the model itself."""
    if rt.distributed:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if rt.n_gpu > 1:
        return torch.nn.DataParallel(model)
    return model


class TrainingRun:
    """A training script's run around its loop. It keeps the run's log (`<model>.log`, created by
    `inputs_checked` once every check passed, with the lines logged before), owns the
    optimizer, schedule and gradient scaler it builds (`start`), and keeps where the run stands
    (`epoch`, `step`, `best_score`, `losses`, `results`). The loop reads:

        model = run.start(model, num_examples, dtype, run.resume_state())
        for epoch in run.remaining_epochs():
            for batch in run.batches(batches, epoch):
                with run.sync():                 # gradients all-reduced on the update only
                    loss = ...
                    run.backward(loss)           # a non-finite loss stops the run
                run.step()                       # the update, when an accumulation group ends
            run.end_training(epoch)
            run.end_epoch(epoch + 1, val_score)  # best `<model>`, `<model>.last`, results

    On a tie of val scores the later epoch replaces the best when `ties_replace` (the retriever,
    as the original), else the earlier one stays (the reranker). Only the main process writes."""

    def __init__(self, script, args, rt, results, criterion, ties_replace):
        self.script, self.args, self.rt = script, args, rt
        self.criterion, self.ties_replace = criterion, ties_replace
        self.log = get_logger(args.model, rt.is_main, deferred=True)
        log_args(args, self.log)
        check_flag(args.B % rt.world_size == 0, "--B",
                   f"{args.B} mentions do not split evenly over {rt.world_size} processes")
        self.log.info(describe_runtime(rt, args.B, args.gradient_accumulation_steps))
        self.paths = {"best": args.model, "last": args.model + ".last",
                      "results": args.model + ".results.json"}
        self.epoch, self.steps, self.best_score, self.losses = 0, 0, float("-inf"), []
        self.results = results
        self.quiet = args.quiet or not rt.is_main
        self.clock = StageClock(self.log)  # one log line per stage: time, peak memory, bytes
        self.loss_check = LossCheck(args)
        self.running, self.epoch_loss = RunningMean(rt.device), RunningMean(rt.device)
        self.num_batches, self.update = 0, False
        self.inputs, self.resumed = {}, None

    def inputs_checked(self, **inputs):
        """After the run's inputs are loaded and checked (`inputs`: {"data" | "encoder" | "cands":
        fingerprint}), before any work: stop when the run it resumes or the files it replaces
        used other inputs (run_safety.check_inputs); then create the log file. The checkpoints
        record `inputs`."""
        self.inputs = inputs
        check_inputs(self.args, inputs, self.resumed)
        open_log_file(self.log)

    def resume_state(self):
        """`<model>.last` with --resume_training (checked: a training state of this script,
        written with the flags of this run), else None."""
        if not self.args.resume_training:
            return None
        last = self.paths["last"]
        check_flag(os.path.isfile(last), "--resume_training",
                   f"no checkpoint {last} to resume from")
        state = load_run_checkpoint(last, self.script, "--resume_training", training_state=True)
        check_resume_flags(self.args, state, last, self.script)  # what is trained or measured
        self.resumed = (last, state["args"], state.get("inputs"))  # its inputs: inputs_checked
        return state

    def start(self, model, num_examples, dtype, state=None):
        """Build the optimizer, schedule and scaler for `model` (on its device) and `num_examples`
        mentions an epoch, continue from `state` (resume_state) when given, and return the model
        as the loop calls it (wrap_for_training)."""
        args = self.args
        self.model = model
        self.optimizer = build_optimizer(model, args.lr, args.weight_decay, args.adam_epsilon,
                                         args.simpleoptim, args.optimizer)
        self.total_steps = num_training_steps(num_examples, args.B,
                                              args.gradient_accumulation_steps, args.epochs)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps,
                                         args.warmup_proportion, args.simpleoptim)
        self.scaler = grad_scaler(self.rt.device, dtype)
        if state is not None:
            load_weights(model, state["model"], self.paths["last"], "--resume_training")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state["scaler"]:  # empty when the run began without a float16 scaler
                self.scaler.load_state_dict(state["scaler"])
            self.epoch, self.steps = state["epoch"], state["step"]
            self.best_score, self.results = state["best_score"], state["results"]
            self.losses = list(state["losses"])
            set_rng_state(state["rng"])
            self.log.info("resumed from %s after epoch %d (step %d)", self.paths["last"],
                          self.epoch, self.steps)
        self.train_model = wrap_for_training(model, self.rt)
        return self.train_model

    def remaining_epochs(self):
        """The epochs still to train (from 0; after a resume, from the one after the saved)."""
        return range(self.epoch, self.args.epochs)

    def batches(self, batches, epoch):
        """`batches` with a progress bar, the model in training mode; each batch sets whether
        it ends an accumulation group (every --gradient_accumulation_steps batches, and the last
        batch of the epoch, so that no computed gradient is thrown away)."""
        self.train_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.epoch_now, n = epoch, len(batches)
        accumulation = self.args.gradient_accumulation_steps
        for i, batch in enumerate(progress(batches, desc=f"epoch {epoch + 1}",
                                           disable=self.quiet)):
            self.update = (i + 1) % accumulation == 0 or i + 1 == n
            yield batch

    def sync(self):
        """The context of a batch's forward and backward passes: under DistributedDataParallel,
        gradients are all-reduced only on the batch that updates the weights."""
        if self.rt.distributed and not self.update:
            return self.train_model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss):
        """The backward pass of a batch's loss (scaled for float16, divided over the
        accumulation); the loss is checked (a non-finite loss stops the run, LossCheck) and
        averaged for the log."""
        self.scaler.scale(loss / self.args.gradient_accumulation_steps).backward()
        self.loss_check.watch(loss, self.epoch_now + 1, self.steps)
        self.running.add(loss)
        self.epoch_loss.add(loss)
        self.num_batches += 1

    def step(self):
        """When the batch ends an accumulation group: unscale, clip the gradient norm to --clip
        (when > 0), step the optimizer through the scaler and the schedule, zero the gradients;
        every --logging_steps updates, keep and log the mean loss since the last."""
        if not self.update:
            return
        if self.args.clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.steps % self.args.logging_steps == 0:
            self.losses.append(self.running.pop())
            self.log.info("epoch %d step %d/%d: loss %.4f lr %.3g", self.epoch_now + 1, self.steps,
                          self.total_steps, self.losses[-1], self.scheduler.get_last_lr()[0])

    def end_training(self, epoch):
        """After an epoch's last batch, before anything of it is saved: check its last loss, log
        the epoch's mean loss and the stage line."""
        self.loss_check.flush()
        self.log.info("epoch %d: mean loss %.4f over %d batches", epoch + 1, self.epoch_loss.pop(),
                      self.num_batches)
        self.num_batches = 0
        self.running.reset()  # a logging window ends with its epoch (a resumed run starts anew)
        self.clock.lap(f"training, epoch {epoch + 1}")

    def checkpoint(self, epoch, **training_state):
        return {"script": self.script, "args": checkpoint_args(self.args),
                "inputs": self.inputs, "model": unwrap(self.model).state_dict(), "epoch": epoch,
                "step": self.steps, "best_score": self.best_score, "results": self.results,
                **training_state}

    def end_epoch(self, epoch, score):
        """After epoch `epoch` (1, 2, ...; 0: the untrained model) and its val `score`: save the
        best checkpoint when it improved, the full state and the results."""
        better = improved(score, self.best_score, self.ties_replace)
        self.best_score = max(self.best_score, score)
        with deferred_signals():  # a signal stops the run after the three files, not between
            if self.rt.is_main:
                if better:
                    save_checkpoint(self.checkpoint(epoch), self.paths["best"])
                    self.log.info("new best val %s %.2f: saved %s", self.criterion, score,
                                  self.paths["best"])
                state = self.checkpoint(epoch, optimizer=self.optimizer.state_dict(),
                                        scheduler=self.scheduler.state_dict(),
                                        scaler=self.scaler.state_dict(), losses=self.losses,
                                        rng=rng_state())
                save_checkpoint(state, self.paths["last"])
            self.save_results()
        barrier(self.rt)
        self.clock.lap(f"checkpoints, epoch {epoch}")

    def load_best(self):
        """Load the best checkpoint's weights into the model; returns its epoch."""
        state = load_run_checkpoint(self.paths["best"], self.script)
        load_weights(self.model, state["model"], self.paths["best"], "--model")
        self.log.info("loaded the best checkpoint %s (epoch %d, val %s %.2f)", self.paths["best"],
                      state["epoch"], self.criterion, state["best_score"])
        return state["epoch"]

    def save_results(self):
        """`<model>.results.json`: the evaluations, with the flags that define the run (not those
        that may differ on resuming, nor paths) and its loss per logging step (report.py tabulates
        and plots them)."""
        if self.rt.is_main:
            defining = {k: v for k, v in recorded_args(self.args).items()
                        if k not in MAY_DIFFER | MAY_MOVE}  # the flags that make the run
            write_json({**self.results, "script": self.script, "args": defining,
                        "losses": self.losses}, self.paths["results"])

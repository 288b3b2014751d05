"""The machinery of the two training scripts around their loops (docs/DESIGN.md#training): the
shared training flags, the optimizer (the original's AdamW) and schedule, `Optimization` (the
update step), `LossLog` (the loss, checked finite on its device) and `TrainingRun` (the run's
files: checks before any work, the best and last checkpoints, the results). The loop itself is
written out in each script:

    run = TrainingRun(SCRIPT, args, parser, rt, results)     # outputs checked, lock taken
    state = run.start(model, inputs)                         # inputs checked; resumed state
    opt = Optimization(model, args, num_examples, dtype, rt.device, state)
    for epoch in range(run.epoch, args.epochs):
        losses = LossLog(rt.device)
        for i, batch in enumerate(batches):
            update = ends_accumulation(i, len(batches), args.gradient_accumulation_steps)
            with gradient_sync(train_model, update):
                loss = ...
                opt.backward(loss)
            losses.add(loss, opt.steps)
            if update and opt.step() % args.logging_steps == 0:
                run.log_losses(losses, epoch + 1, opt)
        run.end_epoch(epoch + 1, val_score, opt, losses)  # stops first if a loss was not finite
"""
import contextlib
import importlib
import math
import os
import random

import numpy as np
import torch

from cli import add_precision_args, check_flag, check_positive, die
from run_safety import (Outputs, compare_runs, deferred_signals, load_checkpoint, notice, on_stop,
                        refuse)
from utils import (StageClock, barrier, describe_runtime, get_logger, grad_scaler, open_log_file,
                   unwrap)


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
        for group in self.param_groups:  # one multi-tensor pass per group
            lr, (beta1, beta2), eps, decay = (group["lr"], group["betas"], group["eps"],
                                              group["weight_decay"])
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, grads, alpha=1.0 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, eps)
            for t in sorted({s["step"] for s in states}):  # one step count, but after a resume
                at = [i for i, s in enumerate(states) if s["step"] == t]
                step_size = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                torch._foreach_addcdiv_([params[i] for i in at], [m[i] for i in at],
                                        [denom[i] for i in at], value=-step_size)
            if decay > 0.0:
                torch._foreach_add_(params, params, alpha=-lr * decay)
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
    """The flags the two training scripts share, with the original's defaults (`batch`: --B).
    `free`: may differ between a run and its resumption (cli.py)."""
    p = parser
    p.add_argument("--model", free=True,
                   help="checkpoint path (required); also <model>.last, .log, .results.json")
    p.add_argument("--resume_training", action="store_true", free=True,
                   help="continue from <model>.last")
    p.add_argument("--overwrite", action="store_true", free=True,
                   help="replace files at --model that another run (or no run of this project) "
                        "wrote")
    p.add_argument("--B", type=int, default=batch,
                   help="mentions per batch (all processes together)")
    p.add_argument("--epochs", type=int, default=3, help="0: evaluate the untrained model")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup_proportion", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--adam_epsilon", type=float, default=1e-6)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: none)")
    p.add_argument("--simpleoptim", action="store_true",
                   help="plain Adam, constant rate (--optimizer and --weight_decay then ignored)")
    p.add_argument("--optimizer", default="original", choices=OPTIMIZERS,
                   help="AdamW as the original (transformers 3.1's), torch.optim.AdamW, or its "
                        "fused GPU kernel (docs/DESIGN.md#optimizer)")
    p.add_argument("--logging_steps", type=int, default=1000, free=True,
                   help="log the mean loss every this many optimizer steps")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gpus", default="", free=True,
                   help="visible GPUs, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES)")
    add_precision_args(p)
    p.add_argument("--quiet", action="store_true", free=True, help="no progress bars")


# Flags the optimizer settings ignore: a value given is said to do nothing (cli.notices).
IGNORED_BY_OPTIMIZER = tuple(
    (name, lambda a: a.simpleoptim, lambda a: "--simpleoptim is plain Adam at a constant rate")
    for name in ("optimizer", "weight_decay", "adam_epsilon", "warmup_proportion"))


def check_training_args(args):
    """Stop with one line on the first shared training flag out of its range."""
    check = check_flag
    check(args.model, "--model", "a checkpoint path is required")
    check_positive(args, "B", "gradient_accumulation_steps", "logging_steps", "lr",
                   "adam_epsilon")
    check(args.epochs >= 0, "--epochs", f"must be 0 or more (got {args.epochs})")
    check(0.0 <= args.warmup_proportion <= 1.0, "--warmup_proportion",
          f"{args.warmup_proportion} is not in [0, 1]")
    check(args.weight_decay >= 0, "--weight_decay", f"must be 0 or more (got {args.weight_decay})")
    check(args.clip >= 0, "--clip", f"must be 0 (no clipping) or more (got {args.clip})")


# ----------------------------------------------------------------------------------------------
# The update step and the loss

def ends_accumulation(i, num_batches, accumulation):
    """Whether batch i (from 0) of an epoch's `num_batches` ends an accumulation group: every
    `accumulation` batches, and the epoch's last, so that no computed gradient is thrown away.

    >>> [ends_accumulation(i, 5, 2) for i in range(5)]
    [False, True, False, True, True]
    """
    return (i + 1) % accumulation == 0 or i + 1 == num_batches


def gradient_sync(model, update):
    """The context of a batch's forward and backward passes: under DistributedDataParallel the
    gradients are all-reduced only on a batch that updates the weights."""
    if not update and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


class Optimization:
    """A run's optimizer, schedule and gradient scaler (float16 only), continued from a resumed
    `state` when given; `backward(loss)` and `step()` are the update."""

    def __init__(self, model, args, num_examples, dtype, device, state=None):
        self.model, self.args = model, args
        self.optimizer = build_optimizer(model, args.lr, args.weight_decay, args.adam_epsilon,
                                         args.simpleoptim, args.optimizer)
        self.total_steps = num_training_steps(num_examples, args.B,
                                              args.gradient_accumulation_steps, args.epochs)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps,
                                         args.warmup_proportion, args.simpleoptim)
        self.scaler = grad_scaler(device, dtype)
        self.steps = 0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state["scaler"]:  # empty when the run began without a float16 scaler
                self.scaler.load_state_dict(state["scaler"])
            self.steps = state["step"]

    def backward(self, loss):
        """The backward pass of a batch's loss, scaled for float16 and divided over the
        accumulation."""
        self.scaler.scale(loss / self.args.gradient_accumulation_steps).backward()

    def step(self):
        """Unscale, clip the gradient norm to --clip (when > 0), step the optimizer through the
        scaler and the schedule, zero the gradients; returns the number of updates so far."""
        if self.args.clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return self.steps

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}


class LossLog:
    """An epoch's training losses, summed on their device, and the first that was not finite:
    nothing waits for the device until `check` or `pop` (at logging steps and at the epoch's
    end) reads them."""

    def __init__(self, device):
        zero = torch.zeros((), device=device)
        self.window, self.total, self.n_window, self.n_total = zero.clone(), zero.clone(), 0, 0
        self.bad = torch.full((2,), -1.0, dtype=torch.float64, device=device)  # (step, loss)

    def add(self, loss, step):
        loss = loss.detach().float()
        self.window += loss
        self.total += loss
        self.n_window, self.n_total = self.n_window + 1, self.n_total + 1
        first = (self.bad[0] < 0) & ~torch.isfinite(loss)
        self.bad = torch.where(first, torch.stack([torch.tensor(float(step), device=loss.device,
                                                                dtype=torch.float64),
                                                   loss.double()]), self.bad)

    def check(self, args, epoch):
        """Stop the run when a loss was not finite, before anything of the epoch is saved."""
        step, loss = self.bad.tolist()
        if step >= 0:
            likely = [f"--lr {args.lr} too high?"]
            if getattr(args, "fp16", False):
                likely.append("--fp16 overflowing (try --bf16)?")
            if getattr(args, "clip", 1.0) == 0:
                likely.append("no gradient clipping (--clip 0)?")
            die(f"epoch {epoch} step {int(step)}: the training loss is {loss}; stopped, with "
                f"nothing of this epoch saved ({' '.join(likely)})")

    def pop(self):
        """The mean loss since the last pop."""
        mean = float(self.window) / max(1, self.n_window)
        self.window.zero_()
        self.n_window = 0
        return mean

    def mean(self):
        return float(self.total) / max(1, self.n_total)


def improved(score, best, ties_replace):
    """Whether an epoch's val `score` replaces the `best` so far: on a tie the later epoch wins
    when `ties_replace` (the retriever, as the original's >=), else the earlier one stays (the
    reranker, as the original's >) (docs/DESIGN.md#training).

    >>> improved(80.0, 80.0, ties_replace=True), improved(80.0, 80.0, ties_replace=False)
    (True, False)
    """
    return score >= best if ties_replace else score > best


def wrap_for_training(model, rt):
    """The model as the training loop calls it: DistributedDataParallel under torchrun,
    DataParallel over the GPUs of one process, else the model itself."""
    if rt.distributed:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if rt.n_gpu > 1:
        return torch.nn.DataParallel(model)
    return model


# ----------------------------------------------------------------------------------------------
# A training run's files

# A checkpoint's entries (its "inputs" absent from those written before they were recorded)
CHECKPOINT_KEYS = ("script", "args", "inputs", "model", "epoch", "step", "best_score", "results")
TRAINING_STATE_KEYS = CHECKPOINT_KEYS + ("optimizer", "scheduler", "scaler", "losses", "rng")
REQUIRED = {"best": [k for k in CHECKPOINT_KEYS if k != "inputs"],
            "last": [k for k in TRAINING_STATE_KEYS if k != "inputs"]}


def absolute(value):
    """`value` made an absolute path when it names an existing file or folder, else as it is."""
    return os.path.abspath(value) if isinstance(value, str) and os.path.exists(value) else value


def load_weights(model, weights, path, flag):
    try:
        unwrap(model).load_state_dict(weights)
    except RuntimeError:
        die(f"{flag}: {path} holds a model of another shape than these flags build")


class TrainingRun:
    """A training script's files and where the run stands. Made before any work: `<model>`
    (the best epoch), `<model>.last` (the full state of the last epoch) and
    `<model>.results.json` are checked writable and the lock `<model>.lock` taken; `start`
    checks the run's inputs against the files it would replace or the run it resumes and opens
    the log `<model>.log` (run_safety.Outputs). Only the main process writes."""

    def __init__(self, script, args, parser, rt, results, criterion, ties_replace):
        self.script, self.args, self.parser, self.rt = script, args, parser, rt
        self.criterion, self.ties_replace = criterion, ties_replace
        self.log = get_logger(args.model, rt.is_main, deferred=True)
        self.log.info("args: %s", " ".join(f"--{k} {v}" for k, v in parser.recorded(args).items()))
        check_flag(args.B % rt.world_size == 0, "--B",
                   f"{args.B} mentions do not split evenly over {rt.world_size} processes")
        self.log.info(describe_runtime(rt, args.B, args.gradient_accumulation_steps))
        self.paths = {"best": args.model, "last": args.model + ".last",
                      "results": args.model + ".results.json"}
        self.state = self.sha = None
        if args.resume_training:  # its flags checked at once (its inputs: start)
            last = self.paths["last"]
            check_flag(os.path.isfile(last), "--resume_training",
                       f"no checkpoint {last} to resume from")
            self.state, self.sha = load_checkpoint(last, "--resume_training", script,
                                                   REQUIRED["last"])
            refuse(*compare_runs(self.described(self.state), self.describe({}),
                                 self.parser.defaults(), True), last, resume=True)
        self.outputs = Outputs(script, args.overwrite, lock=args.model + ".lock", resumable=True)
        for role, path in self.paths.items():
            self.outputs.add(path, "--model", role)
        self.outputs.start()
        on_stop(self.stop_message)
        self.epoch, self.saved, self.best_score, self.losses = 0, None, float("-inf"), []
        self.results, self.inputs = results, {}
        self.quiet = args.quiet or not rt.is_main
        self.clock = StageClock(self.log)  # one log line per stage: time, peak memory, bytes

    def describe(self, inputs):
        """This run: its script, the flags that define it and its inputs ({flag: what the input
        holds}, the flag's value its path)."""
        return {"tool": self.script, "flags": self.parser.defining(self.args),
                "inputs": {k: {"path": absolute(getattr(self.args, k)), "content": v}
                           for k, v in inputs.items()}}

    def described(self, state):
        """The run a checkpoint holds, as `describe` gives it (inputs without a recorded content
        are compared by path)."""
        saved = state.get("args") or {}
        return {"tool": state.get("script"),
                "flags": {k: saved[k] for k in self.parser.defining(self.args) if k in saved},
                "inputs": {k: {"path": saved.get(k), "content": v}
                           for k, v in (state.get("inputs") or {}).items()}
                or {k: {"path": saved.get(k)} for k in self.parser.paths if k in saved}}

    def start(self, model, inputs):
        """Before any work, with the run's inputs loaded and checked (`inputs`: {flag: what
        the input holds}): stop when the run resumed was trained on other inputs, or the files
        at --model are another run's (run_safety.Outputs.claim); then open the log, and load the
        resumed state into `model`. Returns that state, or None."""
        last, state = self.paths["last"], self.state
        self.inputs = inputs
        if state is None:
            if self.outputs.claim(self.describe(inputs), defaults=self.parser.defaults()):
                notice(f"{self.paths['best']} holds a run with these flags and inputs; this run "
                       f"starts it again and replaces its files (--resume_training continues it)")
        else:  # a resumed run loads every weight from .last, none from the pretrained encoder
            now = self.describe({k: {p: v for p, v in fp.items() if p != "weights"}
                                 for k, fp in inputs.items()})
            refuse(*compare_runs(self.described(state), now, self.parser.defaults(), True), last,
                   resume=True)
            self.outputs.claim(now, last, self.parser.defaults(), {last: self.sha})
        open_log_file(self.log)
        if state is not None:
            load_weights(model, state["model"], last, "--resume_training")
            self.epoch = self.saved = state["epoch"]
            self.best_score, self.results = state["best_score"], state["results"]
            self.losses = list(state["losses"])
            set_rng_state(state["rng"])
            self.log.info("resumed from %s after epoch %d (step %d)", last, self.epoch,
                          state["step"])
        self.model = model
        return state

    def log_losses(self, losses, epoch, opt):
        """At a logging step: check the losses finite, keep and log their mean since the last."""
        losses.check(self.args, epoch)
        self.losses.append(losses.pop())
        self.log.info("epoch %d step %d/%d: loss %.4f lr %.3g", epoch, opt.steps, opt.total_steps,
                      self.losses[-1], opt.scheduler.get_last_lr()[0])

    def checkpoint(self, epoch, step, **training_state):
        return {"script": self.script, "args": {k: absolute(v) if k in self.parser.paths else v
                                                for k, v in self.parser.recorded(self.args).items()},
                "inputs": self.inputs, "model": unwrap(self.model).state_dict(), "epoch": epoch,
                "step": step, "best_score": self.best_score, "results": self.results,
                **training_state}

    def end_epoch(self, epoch, score, opt, losses=None):
        """After epoch `epoch` (1, 2, ...; 0: the untrained model) and its val `score`: stop if
        a training loss was not finite; else save the best checkpoint when it improved, the
        full state and the results, all three before a stop signal is taken."""
        if losses is not None:
            losses.check(self.args, epoch)
            self.log.info("epoch %d: mean loss %.4f over %d batches", epoch, losses.mean(),
                          losses.n_total)
        better = improved(score, self.best_score, self.ties_replace)
        self.best_score = max(self.best_score, score)
        with deferred_signals():
            if self.rt.is_main:
                if better:
                    self.outputs.save(self.checkpoint(epoch, opt.steps), self.paths["best"])
                    self.log.info("new best val %s %.2f: saved %s", self.criterion, score,
                                  self.paths["best"])
                self.outputs.save(self.checkpoint(epoch, opt.steps, losses=self.losses,
                                                  rng=rng_state(), **opt.state_dict()),
                                  self.paths["last"])
                self.save_results()
            self.saved = epoch
        barrier(self.rt)
        self.clock.lap(f"checkpoints, epoch {epoch}")

    def load_best(self):
        """Load the best checkpoint's weights into the model; returns its epoch."""
        state, _ = load_checkpoint(self.paths["best"], "--model", self.script, REQUIRED["best"])
        load_weights(self.model, state["model"], self.paths["best"], "--model")
        self.log.info("loaded the best checkpoint %s (epoch %d, val %s %.2f)", self.paths["best"],
                      state["epoch"], self.criterion, state["best_score"])
        return state["epoch"]

    def save_results(self, **extra):
        """`<model>.results.json`: the evaluations, the flags that define the run, the encoder
        (name and size), its loss per logging step (report.py tabulates and plots them)."""
        if self.rt.is_main:
            config = next(m.config for m in unwrap(self.model).modules() if hasattr(m, "config"))
            encoder = {"name": self.args.pretrained, **{k: getattr(config, k, None) for k in (
                "model_type", "hidden_size", "num_hidden_layers", "vocab_size")}}
            self.outputs.write_json({**self.results, "script": self.script,
                                     "args": self.parser.defining(self.args), "encoder": encoder,
                                     "losses": self.losses, **extra}, self.paths["results"])

    def stop_message(self, name):
        """The one line of a run stopped by signal `name`: where its last complete state is."""
        if self.saved is None:
            return f"stopped by {name} before the first epoch ended; nothing was saved"
        return (f"stopped by {name} after epoch {self.saved}; continue with --resume_training "
                f"(the state of epoch {self.saved} is in {self.paths['last']})")


def rng_state():
    """Python, numpy and torch random states as plain types, for exact resumption."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



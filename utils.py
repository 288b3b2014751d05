"""What every script needs: user errors and the shared command-line flags, seeds, devices and
distributed runs, mixed precision, the optimizer and schedule, logging, progress bars, atomic files
and checkpoints, and the run scaffolding the two training scripts share (`TrainingRun`)."""
import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------
# User errors: one plain line, exit status 2, no traceback.

class UserError(Exception):
    """A mistake of the user's (path, flag, input row), reported as one line with exit status 2."""


def die(message):
    raise UserError(message)


def cli_main(fn):
    """Decorate a script's main(): a UserError ends the run with one line on stderr and status 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            log_to_file(f"error: {e}")
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                os._exit(2)  # the other ranks may be waiting in a collective
            sys.exit(2)
        except (Stopped, KeyboardInterrupt) as e:  # Run safety: SIGTERM / SIGINT, a clean stop
            stopped(e)
        finally:
            end_run()  # Run safety: the lock and the signal handlers
    return wrapper


def log_to_file(line):
    """Write `line` to the run's log file too, when one is open (stderr has it already), so that
    a log ends with the reason its run stopped."""
    log = logging.getLogger(f"hard-nce-el.{os.getpid()}")
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None))


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors (an unknown flag, a bad value, two exclusive flags) are one
    plain line on stderr naming the flag, exit status 2, instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def check_flag(condition, flag, message):
    if not condition:
        die(f"{flag}: {message}")


def check_positive(args, *flags):
    """Stop with a one-line error on the first of these argparse flags whose value is not > 0."""
    for flag in flags:
        value = getattr(args, flag)
        check_flag(value > 0, f"--{flag}", f"must be positive (got {value})")


# ----------------------------------------------------------------------------------------------
# Flags more than one script takes, each registered here once

def add_data_arg(parser, flag):
    """The Zeshel folder, `args.data_dir`, as `--data_dir` or `--data` in every script; `flag` is
    the one the original script used, named in errors."""
    other = "--data" if flag == "--data_dir" else "--data_dir"
    parser.add_argument(flag, other, dest="data_dir",
                        help="Zeshel folder with documents/ and mentions/ (required)")


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
    # the tests stop a run after an epoch, to resume it (not for users: hidden)
    p.add_argument("--stop_after_epoch", type=int, default=None, help=argparse.SUPPRESS)


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


# Flags of the original's command lines that have nothing to do here: accepted so that those
# command lines run unchanged, never recorded as if they acted, one notice when given.
COMPATIBILITY_FLAGS = {
    "num_hards": ({"type": int}, "the numbers of negatives come from --num_cands and "
                  "--cands_ratio"),
    "num_workers": ({"type": int}, "batches are assembled by tensor indexing in the main process"),
    "store_en_hiddens": ({"action": "store_true"}, "entity vectors are streamed chunk by chunk, "
                         "never stored"),
    "en_hidden_path": ({}, "entity vectors are streamed chunk by chunk, never stored"),
    "fp16_opt_level": ({}, "mixed precision is torch.amp's (--fp16, --bf16), not apex's"),
}


def add_compatibility_args(parser, *names):
    for name in names:
        kwargs, why = COMPATIBILITY_FLAGS[name]
        parser.add_argument(f"--{name}", default=None, **kwargs,
                            help=f"accepted for the original's command lines, no effect: {why}")
    parser.set_defaults(ignored_flags=list(names))  # which of them this script ignores


def compatibility_notice(args, log):
    """One log line naming the compatibility flags given, if any, and why they do nothing."""
    given = [name for name in getattr(args, "ignored_flags", [])
             if getattr(args, name, None) is not None]
    if given:
        log.info("notice: %s accepted for the original's command line and ignored (%s)",
                 ", ".join(f"--{name}" for name in given),
                 "; ".join(dict.fromkeys(COMPATIBILITY_FLAGS[name][1] for name in given)))


def recorded_args(args):
    """The arguments as a run's log and checkpoints record them: without the compatibility
    flags, which do nothing."""
    ignored = set(getattr(args, "ignored_flags", [])) | {"ignored_flags"}
    return {k: v for k, v in vars(args).items() if k not in ignored}


def log_args(args, log):
    log.info("args: %s", " ".join(f"--{k} {v}" for k, v in recorded_args(args).items()))
    compatibility_notice(args, log)


# ----------------------------------------------------------------------------------------------
# Seeds

# Per-epoch random streams are seeded from (seed, epoch, process) alone, so that a resumed epoch
# repeats exactly: seed * EPOCH_SEED_STRIDE + epoch + rank * RANK_SEED_STRIDE (two primes, so
# that neighbouring seeds, epochs and ranks never share a stream in practice).
EPOCH_SEED_STRIDE = 100003
RANK_SEED_STRIDE = 7919


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def epoch_generator(seed, epoch, rank=0, device="cpu"):
    """A torch.Generator on `device` for one epoch of one process (see EPOCH_SEED_STRIDE)."""
    return torch.Generator(device).manual_seed(seed * EPOCH_SEED_STRIDE + epoch
                                               + rank * RANK_SEED_STRIDE)


# ----------------------------------------------------------------------------------------------
# Devices and distributed runs (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    n_gpu: int = 0          # GPUs this process drives (>1 only for single-process DataParallel)

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def usable_gpus(gpus):
    """The ids of `--gpus` that exist on this machine, as a CUDA_VISIBLE_DEVICES string, or None
    to leave the visible devices as they are. The released command lines name the original
    authors' GPUs (`--gpus 3,4,5,7`): on a machine with fewer, ids that do not exist are dropped
    with a notice, and when none exists every GPU of the machine is used (rather than none)."""
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    try:  # GPUs on the machine whatever CUDA_VISIBLE_DEVICES says, without starting CUDA
        count = torch.cuda._raw_device_count_nvml()
    except Exception:
        count = -1
    if count < 0:  # unknown (no NVIDIA driver): do as asked
        return ",".join(ids)
    keep = [g for g in ids if g.isdigit() and int(g) < count]
    if keep != ids and os.environ.get("RANK", "0") == "0":
        use = ",".join(keep) if keep else (f"all {count}" if count else "the CPU")
        print(f"notice: --gpus {gpus}: this machine has {count} GPU(s) (ids 0 to {count - 1}); "
              f"using {use}", file=sys.stderr, flush=True)
    return ",".join(keep) if keep else None


def setup_runtime(gpus=None):
    """Pick the device(s). `gpus` is the `--gpus` string ("0,1,2"): it sets CUDA_VISIBLE_DEVICES
    (before CUDA starts). Under torchrun each process takes GPU LOCAL_RANK and the process group is
    started with NCCL on GPUs, Gloo on CPU. Without torchrun, several visible GPUs are driven by
    one process through DataParallel (n_gpu > 1). Float32 matrix multiplies may use TF32 on GPUs
    that have it."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if gpus:
        usable = usable_gpus(gpus)
        if usable:
            os.environ["CUDA_VISIBLE_DEVICES"] = usable
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if world_size > 1:
        if cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
        return Runtime(device, rank, local_rank, world_size, n_gpu=1 if cuda else 0)
    if cuda:
        return Runtime(torch.device("cuda"), n_gpu=torch.cuda.device_count())
    return Runtime(torch.device("cpu"))


def with_runtime(args, fn):
    """fn(args, rt) on the devices of `args.gpus` (setup_runtime), the process group shut down
    after, however fn ends."""
    rt = setup_runtime(args.gpus)
    try:
        return fn(args, rt)
    finally:
        cleanup_runtime(rt)


def describe_runtime(rt, batch=None, accumulation=1):
    """One log line: the device, how many processes, and how a batch of `batch` mentions is
    split (per process, accumulation, mentions per optimizer step)."""
    how = ("torchrun" if rt.distributed else
           f"DataParallel over {rt.n_gpu} GPUs" if rt.n_gpu > 1 else "one process")
    line = f"device {rt.device}, {rt.world_size} process{'es' if rt.world_size > 1 else ''} ({how})"
    if batch is not None:
        line += (f"; batch {batch} mentions = {batch // rt.world_size} per process x "
                 f"{rt.world_size}, {accumulation} accumulation step(s): "
                 f"{batch * accumulation} mentions per optimizer step")
    return line


def gradient_sync(train_model, rt, update):
    """The context for one accumulated backward pass: under DistributedDataParallel, gradients
    are all-reduced only on the step that updates the weights (`update`), not on every batch."""
    if rt.distributed and not update:
        return train_model.no_sync()
    return contextlib.nullcontext()


def update_step(i, num_batches, accumulation):
    """Whether batch i (from 0) ends an accumulation group: every `accumulation` batches, and the
    last batch of the epoch, so that no computed gradient is thrown away."""
    return (i + 1) % accumulation == 0 or i + 1 == num_batches


def barrier(rt):
    if rt.distributed:
        torch.distributed.barrier()


def shares(n, rt):
    """[(start, end)] per process: contiguous shares of range(n) that differ by at most one
    (one share of everything without torchrun)."""
    p = rt.world_size if rt is not None else 1
    return [(n * r // p, n * (r + 1) // p) for r in range(p)]


GATHER_ROWS = 1 << 16  # rows of each share per all_gather call (bounds the device memory used)


def gather_shares(part, bounds, rt):
    """The CPU tensor whose rows bounds[r] = (start, end) process r holds as its `part`, gathered
    by every process (through the process's device, as NCCL needs). Without torchrun: `part`."""
    if rt is None or not rt.distributed:
        return part
    rows = GATHER_ROWS
    out = part.new_empty((bounds[-1][1] - bounds[0][0], *part.shape[1:]))
    longest = max(end - start for start, end in bounds)
    for offset in range(0, longest, rows):
        size = min(rows, longest - offset)
        mine = part.new_zeros((size, *part.shape[1:]))   # equal sizes for all_gather
        own = part[offset:offset + size]
        mine[:len(own)] = own
        got = [torch.empty_like(mine, device=rt.device) for _ in bounds]
        torch.distributed.all_gather(got, mine.to(rt.device))
        for (start, end), g in zip(bounds, got):
            k = max(0, min(size, end - start - offset))
            out[start + offset:start + offset + k] = g[:k].cpu()
    return out


def encode_in_shares(n, encode, rt, gather=gather_shares):
    """What encode(start, end) gives for rows start..end-1 of n (a list of tensors, or of what
    `gather(part, bounds, rt)` takes), for all n rows: under torchrun each process encodes its
    share (`shares`) and the shares are gathered, so that tokenizing a split takes 1 / processes
    of the time (docs/DESIGN.md#training)."""
    bounds = shares(n, rt)
    start, end = bounds[rt.rank if rt is not None else 0]
    return [gather(part, bounds, rt) for part in encode(start, end)]


def cleanup_runtime(rt):
    if rt.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Mixed precision through torch.amp (docs/DESIGN.md#precision)

def add_precision_args(parser):
    """--fp16 / --bf16 / --fp32, at most one of them: the autocast dtype (see amp_dtype)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fp16", action="store_true",
                       help="float16 autocast with a gradient scaler (bfloat16 on a CPU)")
    group.add_argument("--bf16", action="store_true",
                       help="bfloat16 autocast (about twice as fast as float32 on a recent GPU)")
    group.add_argument("--fp32", action="store_true",
                       help="full precision, the default (TF32 matrix multiplies on a GPU)")


def amp_dtype(fp16=False, bf16=False, device=None, log=None, fp32=False):
    """The autocast dtype, or None for full precision (the default, as the original).

    `--fp16`: float16 (needs CUDA: on a CPU it runs as bfloat16, with a one-line notice);
    `--bf16`: bfloat16 (stops on a GPU without it); `--fp32` or none of them: None. On a GPU full
    precision uses TF32 matrix multiplies (set by `setup_runtime`), as the original's PyTorch did.
    """
    cuda = device is not None and device.type == "cuda"
    if fp16:
        if not cuda:
            if log is not None:
                log.info("notice: --fp16 on a CPU runs as bfloat16 autocast")
            return torch.bfloat16
        return torch.float16
    if bf16:
        check_flag(not cuda or torch.cuda.is_bf16_supported(), "--bf16",
                   "this GPU does not support bfloat16 (use --fp16, or no flag for float32)")
        return torch.bfloat16
    return None


def autocast(device, dtype):
    """One autocast context for the whole forward pass (a no-op for None or float32)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device, dtype):
    """A gradient scaler, active only for float16 on CUDA (bfloat16 needs none)."""
    return torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16 and device.type == "cuda"))


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
    return torch.optim.AdamW(groups, lr=lr, eps=adam_epsilon, fused=optimizer == "torch_fused")


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


def optimizer_step(model, optimizer, scheduler, scaler, clip=0.0):
    """One update after the accumulated backward passes: unscale, clip the gradient norm to
    `clip` (when > 0), step the optimizer through the scaler and the schedule, zero the grads."""
    if clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


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


# ----------------------------------------------------------------------------------------------
# Logging and progress bars

def free_log_path(model_path):
    """`<model>.log`, or `<model>.log.1`, `.2`, ... so that an earlier log is never overwritten."""
    path = model_path + ".log"
    n = 0
    while os.path.exists(path):
        n += 1
        path = f"{model_path}.log.{n}"
    return path


def get_logger(model_path=None, is_main=True, name="hard-nce-el"):
    """A logger printing to stdout and to a new `<model>.log` (main process only; others log
    nothing but warnings)."""
    logger = logging.getLogger(f"{name}.{os.getpid()}")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    sh = logging.StreamHandler(sys.stdout)
    sh.setFormatter(fmt)
    logger.addHandler(sh)
    if is_main and model_path:
        folder = os.path.dirname(os.path.abspath(model_path))
        os.makedirs(folder, exist_ok=True)
        fh = logging.FileHandler(free_log_path(model_path))
        fh.setFormatter(fmt)
        logger.addHandler(fh)
        logger.log_path = fh.baseFilename
    return logger


def quiet_transformers():
    """No weight-loading progress bars or advisory warnings from transformers: our own bars and
    log say what is happening."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _proc_field(path, key):
    """An integer field `key` of a /proc file (Linux), or None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb():
    """This process's peak resident memory in MB: since the last `reset_peak_rss()` on Linux,
    since the start elsewhere."""
    kb = _proc_field("/proc/self/status", "VmHWM")
    if kb is None:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kb = kb // 1024 if sys.platform == "darwin" else kb  # bytes on macOS
    return kb / 1024


def reset_peak_rss():
    """Start a new peak of resident memory (Linux; elsewhere nothing happens)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class StageClock:
    """Time, peak memory and bytes written of a run's stages, one log line per stage:
    `stage NAME: 12.3 s, peak RSS 456 MB, wrote 7.8 MB, cpu 11.9 s[, peak GPU 1234 MB]`.
    `lap(name)` ends the stage begun at the previous lap (or at creation). Peaks are per stage
    where the system allows (Linux; elsewhere since the start); "wrote" counts every byte the
    process wrote (files, checkpoints, the log); "cpu" is the process's CPU time (all threads; on
    a busy machine a steadier figure than the wall time); the GPU peak is torch's allocated
    memory on this process's GPU."""

    def __init__(self, log):
        self.log = log
        self._start()

    def _start(self):
        self.time, self.cpu = time.perf_counter(), time.process_time()
        self.written = _proc_field("/proc/self/io", "wchar")
        reset_peak_rss()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def lap(self, name):
        seconds = time.perf_counter() - self.time
        written = _proc_field("/proc/self/io", "wchar")
        line = f"stage {name}: {seconds:.1f} s, peak RSS {peak_rss_mb():.0f} MB"
        if written is not None and self.written is not None:
            line += f", wrote {(written - self.written) / 1e6:.1f} MB"
        line += f", cpu {time.process_time() - self.cpu:.1f} s"
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            line += f", peak GPU {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB"
        self.log.info(line)
        self._start()


def progress(iterable=None, desc=None, total=None, disable=False, **kw):
    """A tqdm bar on stderr; `disable` (from `--quiet` or a non-main process) silences it, and so
    does a stderr that is not a terminal (a log file gets no carriage-return redraws)."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, disable=True if disable else None,
                dynamic_ncols=True, leave=False, **kw)


# ----------------------------------------------------------------------------------------------
# Atomic files and checkpoints

@contextlib.contextmanager
def atomic_open(path, mode="w", **kw):
    """Write to a temporary file beside `path`, then rename: `path` appears whole or not at all."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:  # from here on, any exit (an error, a signal turned into Stopped) removes `tmp`
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(obj, path, indent=2):
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def write_jsonl(rows, path):
    with atomic_open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def save_checkpoint(state, path):
    """`state` is a plain dict (arguments as a dict, state dicts, numbers, lists), loadable with
    torch.load(weights_only=True)."""
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path, map_location="cpu", flag="--model"):
    if not os.path.isfile(path):
        die(f"{flag}: no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        die(f"{flag}: {path} is not a readable checkpoint ({type(e).__name__})")


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


def unwrap(model):
    """The module inside DataParallel / DistributedDataParallel / torch.compile."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


# ----------------------------------------------------------------------------------------------
# Training runs: what the two training scripts share around their loops (docs/DESIGN.md#training)

def wrap_for_training(model, rt):
    """The model as the training loop calls it: DistributedDataParallel under torchrun,
    DataParallel over the GPUs of one process, else the model itself."""
    if rt.distributed:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if rt.n_gpu > 1:
        return torch.nn.DataParallel(model)
    return model


def training_log(args, rt):
    """The logger of a training run (`<model>.log`), with the arguments, a notice for the
    compatibility flags given and how the batch splits over the processes."""
    log = get_logger(args.model, rt.is_main)
    log_args(args, log)
    check_flag(args.B % rt.world_size == 0, "--B",
               f"{args.B} mentions do not split evenly over {rt.world_size} processes")
    log.info(describe_runtime(rt, args.B, args.gradient_accumulation_steps))
    return log


def improved(score, best, ties_replace):
    """Whether an epoch's val `score` replaces the `best` so far: on a tie the later epoch wins
    when `ties_replace` (the retriever, as the original's >=), else the earlier one stays (the
    reranker, as the original's >) (docs/DESIGN.md#training).

    >>> improved(80.0, 80.0, ties_replace=True), improved(80.0, 80.0, ties_replace=False)
    (True, False)
    """
    return score >= best if ties_replace else score > best


# One checkpoint schema for both trainers: `<model>` holds CHECKPOINT_KEYS, `<model>.last` these
# and TRAINING_STATE_KEYS. "script" names the script that wrote it ("main_retriever").
CHECKPOINT_KEYS = ("script", "args", "model", "epoch", "step", "best_score", "results")
TRAINING_STATE_KEYS = CHECKPOINT_KEYS + ("optimizer", "scheduler", "scaler", "losses", "rng")


def load_run_checkpoint(path, script, flag="--model", training_state=False):
    """The checkpoint at `path`, written by `script`; stop with one line naming `flag` when it is
    missing, unreadable, another script's, or lacks an entry."""
    state = load_checkpoint(path, flag=flag)
    writer = checkpoint_script(state)  # also for checkpoints written before the "script" entry
    check_flag(writer == script, flag, f"{path} was written by "
               f"{writer + '.py' if writer else 'another program'}, not by {script}.py")
    keys, what = ((TRAINING_STATE_KEYS, "training state") if training_state
                  else (CHECKPOINT_KEYS, "checkpoint"))
    missing = [k for k in keys if k not in state]
    check_flag(not missing, flag, f"{path} is not a whole {what} of {script}.py "
               f"(no {missing[:1]})")
    return state


def load_weights(model, weights, path, flag):
    try:
        unwrap(model).load_state_dict(weights)
    except RuntimeError:
        die(f"{flag}: {path} holds a model of another shape than these flags build")


class TrainingRun:
    """The bookkeeping of a training script around its loop: where it stands (`epoch`, `step`,
    `best_score`, `losses`, `results`), resuming from `<model>.last` (--resume_training), the best
    checkpoint `<model>` (by the val score; on a tie the later epoch replaces it when
    `ties_replace`), the full state `<model>.last` and `<model>.results.json` after every epoch,
    and the hidden --stop_after_epoch. Only the main process writes."""

    def __init__(self, script, args, rt, log, results, criterion, ties_replace):
        self.script, self.args, self.rt, self.log = script, args, rt, log
        self.criterion, self.ties_replace = criterion, ties_replace
        self.paths = {"best": args.model, "last": args.model + ".last",
                      "results": args.model + ".results.json"}
        self.epoch, self.step, self.best_score, self.losses = 0, 0, float("-inf"), []
        self.results = results
        self.quiet = args.quiet or not rt.is_main
        self.total_steps = 0
        self.clock = StageClock(log)  # one log line per stage: time, peak memory, bytes written
        self.loss_check = LossCheck(args)
        self.running, self.epoch_loss = RunningMean(rt.device), RunningMean(rt.device)
        self.batches = 0

    def optimizers(self, model, num_examples, dtype):
        """(optimizer, scheduler, gradient scaler) for `num_examples` mentions an epoch, from the
        shared training flags; `model` is on its device."""
        args = self.args
        optimizer = build_optimizer(model, args.lr, args.weight_decay, args.adam_epsilon,
                                    args.simpleoptim, args.optimizer)
        self.total_steps = num_training_steps(num_examples, args.B,
                                              args.gradient_accumulation_steps, args.epochs)
        scheduler = build_scheduler(optimizer, self.total_steps, args.warmup_proportion,
                                    args.simpleoptim)
        return optimizer, scheduler, grad_scaler(self.rt.device, dtype)

    def resume_state(self):
        """`<model>.last` with --resume_training (checked: a training state of this script),
        else None."""
        if not self.args.resume_training:
            return None
        last = self.paths["last"]
        check_flag(os.path.isfile(last), "--resume_training",
                   f"no checkpoint {last} to resume from")
        state = load_run_checkpoint(last, self.script, "--resume_training", training_state=True)
        check_resume_flags(self.args, state, last, self.script)  # what is trained or measured
        return state

    def restore(self, state, model, optimizer, scheduler, scaler):
        """Continue where `state` (resume_state) left off; nothing when it is None."""
        if state is None:
            return
        load_weights(model, state["model"], self.paths["last"], "--resume_training")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the run began without a float16 scaler
            scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.best_score = state["epoch"], state["step"], state["best_score"]
        self.losses, self.results = list(state["losses"]), state["results"]
        set_rng_state(state["rng"])
        self.log.info("resumed from %s after epoch %d (step %d)", self.paths["last"], self.epoch,
                      self.step)

    def batch_loss(self, loss, epoch):
        """After a batch's backward pass: its loss is checked (a non-finite loss stops the run,
        see LossCheck) and averaged for the log."""
        self.loss_check.watch(loss, epoch + 1, self.step)
        self.running.add(loss)
        self.epoch_loss.add(loss)
        self.batches += 1

    def optimizer_step(self, model, optimizer, scheduler, scaler, epoch):
        """The update of an accumulation group (optimizer_step: unscale, clip, step, schedule,
        zero), counted; every --logging_steps steps keep and log the mean loss since the last."""
        optimizer_step(model, optimizer, scheduler, scaler, self.args.clip)
        self.step += 1
        if self.step % self.args.logging_steps == 0:
            self.losses.append(self.running.pop())
            self.log.info("epoch %d step %d/%d: loss %.4f lr %.3g", epoch + 1, self.step,
                          self.total_steps, self.losses[-1], scheduler.get_last_lr()[0])

    def end_training(self, epoch):
        """After an epoch's last batch, before anything of it is saved: check its last loss, log
        the epoch's mean loss and the stage line."""
        self.loss_check.flush()
        self.log.info("epoch %d: mean loss %.4f over %d batches", epoch + 1, self.epoch_loss.pop(),
                      self.batches)
        self.batches = 0
        self.running.reset()  # a logging window ends with its epoch (a resumed run starts anew)
        self.clock.lap(f"training, epoch {epoch + 1}")

    def checkpoint(self, model, epoch, **training_state):
        return {"script": self.script, "args": recorded_args(self.args),
                "model": unwrap(model).state_dict(), "epoch": epoch, "step": self.step,
                "best_score": self.best_score, "results": self.results, **training_state}

    def end_epoch(self, epoch, score, model, optimizer, scheduler, scaler):
        """After epoch `epoch` (1, 2, ...; 0: the untrained model) and its val `score`: save the
        best checkpoint when it improved, the full state and the results. Returns True when
        --stop_after_epoch asks the run to stop here."""
        better = improved(score, self.best_score, self.ties_replace)
        self.best_score = max(self.best_score, score)
        if self.rt.is_main:
            if better:
                save_checkpoint(self.checkpoint(model, epoch), self.paths["best"])
                self.log.info("new best val %s %.2f: saved %s", self.criterion, score,
                              self.paths["best"])
            state = self.checkpoint(model, epoch, optimizer=optimizer.state_dict(),
                                    scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                                    losses=self.losses, rng=rng_state())
            save_checkpoint(state, self.paths["last"])
        self.save_results()
        barrier(self.rt)
        if self.args.stop_after_epoch == epoch:
            self.log.info("--stop_after_epoch %d: stopping", epoch)
            return True
        return False

    def load_best(self, model):
        """Load the best checkpoint's weights into `model`; returns its epoch."""
        state = load_run_checkpoint(self.paths["best"], self.script)
        load_weights(model, state["model"], self.paths["best"], "--model")
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


# ----------------------------------------------------------------------------------------------
# Run safety (docs/DESIGN.md#run-safety): no silent garbage, no lost work, one line per mistake.
# Every check here runs before training; the scripts call each with one line.

# Flags that may differ between a run and the run it resumes (or a rerun over its files): they
# change neither what is trained nor what is measured. Every other flag must match.
MAY_DIFFER = frozenset({
    "quiet", "gpus", "resume_training", "overwrite", "stop_after_epoch",
    "fp16", "bf16", "fp32", "fp16_opt_level",                     # precision (resumable)
    "eval_batchsize", "mention_bsz", "entity_bsz", "num_workers",  # batching of encoding
    "logging_steps", "store_en_hiddens", "en_hidden_path",         # logging, ignored flags
    "num_hards", "ignored_flags"})
# Paths that may move between a run and its resumption (same files, another place): a notice.
MAY_MOVE = frozenset({"model", "data_dir", "data", "cands_dir", "pretrained"})


def notice(message):
    """One line `notice: ...` in the run's log (stdout and `<model>.log`), or on stderr when the
    log is not open yet."""
    log = logging.getLogger(f"hard-nce-el.{os.getpid()}")
    if log.handlers:
        log.info("notice: %s", message)
    else:
        print(f"notice: {message}", file=sys.stderr, flush=True)


def check_finite_flags(args):
    """Stop on a float flag given as nan or inf (`--lr nan`, `--clip inf`): argparse takes them."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            die(f"--{name}: {value} is not a finite number")


def check_output_file(path, flag):
    """Stop unless `path` can be written as a file: not a folder (nor a name ending in /), and its
    folder exists and is writable or can be created."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        die(f"{flag}: {path} is a folder; give the path of a file in it, e.g. "
            f"{os.path.join(path, 'model.pt')}")
    _check_writable_folder(os.path.dirname(os.path.abspath(path)), flag, path)


def check_output_dir(path, flag):
    """Stop unless `path` is a writable folder or one that can be created."""
    if os.path.exists(path) and not os.path.isdir(path):
        die(f"{flag}: {path} is a file, not a folder")
    _check_writable_folder(os.path.abspath(path), flag, path)


def _check_writable_folder(folder, flag, given):
    existing = folder
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        die(f"{flag}: cannot make the folder of {given}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        die(f"{flag}: cannot write {given}: the folder {existing} is not writable")


def checkpoint_script(state):
    """The script that wrote a checkpoint ("main_retriever", "main_reranker"): its `script`
    entry, or for checkpoints without one, inferred from its arguments; None for other files."""
    if not isinstance(state, dict):
        return None
    if state.get("script"):
        return state["script"]
    saved = state.get("args")
    if not isinstance(saved, dict):
        return None
    if "cands_dir" in saved or "C" in saved:
        return "main_reranker"
    if "num_cands" in saved:
        return "main_retriever"
    return None


def differing_flags(args, saved, may_differ=MAY_DIFFER | MAY_MOVE):
    """[(flag, saved value, value now)] for each flag of `args` (a Namespace) that `saved` (the
    arguments dict of a checkpoint) holds with another value, but those of `may_differ`."""
    now = vars(args)
    return [(k, saved[k], v) for k, v in now.items()
            if k in saved and k not in may_differ and saved[k] != v]


def peek_checkpoint(path, flag="--model"):
    """A checkpoint's dict, memory-mapped (its arguments are read without reading its tensors)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # the old serialization cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            die(f"{flag}: {path} is not a readable checkpoint ({type(e).__name__}); pass "
                f"--overwrite to replace it, or choose another {flag}")


def check_resume_flags(args, state, path, script):
    """Stop unless the training state at `path` was written by `script` with the flags of this run
    (but MAY_DIFFER); a moved path (MAY_MOVE) is a notice."""
    writer = checkpoint_script(state)
    saved = state.get("args") if isinstance(state, dict) else None
    if not isinstance(saved, dict) or writer not in (None, script):
        die(f"--resume_training: {path} was written by {writer or 'another program'}"
            f"{'.py' if writer else ''}, not {script}.py")
    for flag, old, new in differing_flags(args, saved):
        die(f"--{flag}: {path} was trained with --{flag} {old}; resuming with {new} would change "
            f"what is trained or measured (resume with --{flag} {old}, or start a new --model)")
    for flag, old, new in differing_flags(args, saved, MAY_DIFFER):
        notice(f"--{flag} was {old} in the run of {path}, now {new}")


def check_overwrite(args, script, flag="--model"):
    """Stop before any work when `<model>`, `<model>.last` or `<model>.results.json` exist and
    were written by another script or with other flags (but MAY_DIFFER and MAY_MOVE): they are
    replaced only by a rerun of the same run, `--resume_training`, or with `--overwrite`."""
    if getattr(args, "overwrite", False) or getattr(args, "resume_training", False):
        return
    paths = [args.model + ".last", args.model]
    results = args.model + ".results.json"
    found = [p for p in paths if os.path.isfile(p)]
    if not found and os.path.exists(results):
        die(f"{flag}: {results} exists (the results of an earlier run); pass --overwrite to "
            f"replace it, or choose another {flag}")
    for path in found:
        state = peek_checkpoint(path, flag)
        writer = checkpoint_script(state)
        if writer != script:
            die(f"{flag}: {path} was written by {writer or 'another program'}"
                f"{'.py' if writer else ''}, not {script}.py; pass --overwrite to replace it, or "
                f"choose another {flag}")
        for name, old, new in differing_flags(args, state["args"]):
            die(f"{flag}: {path} holds a run with --{name} {old} (now {new}); pass --overwrite to "
                f"replace it, --resume_training to continue it, or choose another {flag}")


# The run lock and the signals: `start_run` takes both, `end_run` (called by cli_main) gives
# them back.

_RUN = {}


class Stopped(BaseException):
    """SIGTERM or SIGINT: the run ends like a clean stop (a BaseException, as KeyboardInterrupt,
    so that no `except Exception` swallows it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


def _on_signal(signum, frame):
    if os.getpid() != _RUN.get("pid"):  # a forked data loader worker: the main process stops
        os._exit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGINT):  # a second signal must not break the cleanup
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


def take_lock(path, flag):
    """Hold `path` (fcntl.flock, pid and host written in it) until `release_lock`; stop with one
    line naming the other process when another run holds it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError):  # a file system without locks
                notice(f"{path}: cannot lock ({e.strerror}); running without the lock")
                break
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            die(f"{flag}: another run is writing there ({holder} holds {path}); wait for it to "
                f"end, or choose another {flag}")
        try:  # the previous holder may have removed the file between our open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def release_lock(path, fd):
    with contextlib.suppress(OSError):
        os.unlink(path)  # while still held: a waiting run then locks a fresh file
    with contextlib.suppress(OSError):
        os.close(fd)


def start_run(args, script):
    """Before any work, for `script` ("main_retriever", "main_reranker", "save_candidates"):
    refuse non-finite float flags and an output path that cannot be written; take the run's lock
    (`<model>.lock`, or `CANDS_DIR/candidates.lock`; main process only); turn SIGTERM and SIGINT
    into a clean stop; refuse to write over the files of another run (check_overwrite)."""
    check_finite_flags(args)
    if script == "save_candidates":
        check_output_dir(args.cands_dir, "--cands_dir")
        lock, flag, last = os.path.join(args.cands_dir, "candidates.lock"), "--cands_dir", None
    else:
        check_output_file(args.model, "--model")
        lock, flag, last = args.model + ".lock", "--model", args.model + ".last"
    end_run()  # a previous run in this process (tests call main() several times)
    _RUN.update(pid=os.getpid(), last=last, flag=flag, dir=getattr(args, "cands_dir", None))
    if os.environ.get("RANK", "0") == "0":
        _RUN["lock"] = (lock, take_lock(lock, flag))
    with contextlib.suppress(ValueError):  # not the main thread: leave the signals alone
        _RUN["handlers"] = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM,
                                                                       signal.SIGINT)}
    if script != "save_candidates":
        check_overwrite(args, script)


def end_run():
    """Release the lock and give the signals back their handlers (idempotent)."""
    if "lock" in _RUN:
        release_lock(*_RUN.pop("lock"))
    for s, handler in _RUN.pop("handlers", {}).items():
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(s, handler)


def stop_message(name):
    """The one line of a run stopped by signal `name`: where its last complete state is."""
    last, folder = _RUN.get("last"), _RUN.get("dir")
    if last is None and folder:
        try:
            with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
                complete = json.load(f).get("complete")
        except (OSError, ValueError, AttributeError):
            complete = None
        if complete is False:
            return (f"stopped by {name}; the candidates in {folder} are incomplete: run "
                    f"save_candidates.py again")
        return f"stopped by {name} before it changed the candidates in {folder}"
    if last is None:
        return f"stopped by {name}"
    if os.path.isfile(last):
        with contextlib.suppress(BaseException):
            epoch = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["epoch"]
            return (f"stopped by {name} after epoch {epoch}; continue with --resume_training "
                    f"(the state of epoch {epoch} is in {last})")
    return f"stopped by {name} before the first epoch ended; nothing was saved"


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


# Candidate folders: save_candidates.py writes CANDS_DIR/manifest.json LAST (its producer and each
# file's size and sha256), after marking the folder incomplete FIRST; the reranker checks it.

MANIFEST = "manifest.json"


def file_digest(path):
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"bytes": size, "sha256": h.hexdigest()}


def candidates_producer(args, state):
    """What makes a candidates folder: the checkpoint (path, epoch, size) and the flags of
    save_candidates.py but those of MAY_DIFFER, paths made absolute."""
    flags = {k: (os.path.abspath(v) if k in MAY_MOVE and isinstance(v, str) and os.path.exists(v)
                 else v)
             for k, v in vars(args).items() if k not in MAY_DIFFER and k != "cands_dir"}
    return {"script": "save_candidates", "args": flags,
            "checkpoint": {"epoch": state.get("epoch"), "bytes": os.path.getsize(args.model)}}


def _read_manifest(path, flag):
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError
        return manifest
    except (OSError, ValueError):
        die(f"{flag}: {path} is not a manifest written by save_candidates.py")


def check_candidates_overwrite(cands_dir, producer, overwrite):
    """Stop before any work when `cands_dir` holds candidates of another checkpoint or other flags
    (or of unknown origin: no manifest), unless --overwrite."""
    if overwrite or not os.path.isdir(cands_dir):
        return
    path = os.path.join(cands_dir, MANIFEST)
    if os.path.exists(path):
        old = _read_manifest(path, "--cands_dir").get("producer") or {}
        for part in ("checkpoint", "args"):
            theirs, mine = old.get(part) or {}, producer[part]
            for key in sorted(set(theirs) | set(mine)):
                if theirs.get(key) != mine.get(key):
                    what = f"--{key}" if part == "args" else f"the checkpoint's {key}"
                    die(f"--cands_dir: {cands_dir} holds candidates made with {what} "
                        f"{theirs.get(key)} (now {mine.get(key)}); pass --overwrite to replace "
                        f"them, or choose another --cands_dir")
    elif any(n.startswith("candidates_") for n in os.listdir(cands_dir)):
        die(f"--cands_dir: {cands_dir} holds candidates files of unknown origin (no {MANIFEST}); "
            f"pass --overwrite to replace them, or choose another --cands_dir")


def begin_candidates(cands_dir, producer):
    """Mark `cands_dir` incomplete before its first file is replaced."""
    write_json({"complete": False, "producer": producer, "files": {}},
               os.path.join(cands_dir, MANIFEST))


def finish_candidates(cands_dir, producer, names):
    """Write the manifest, last: the producer, and the size and sha256 of each file of `names`."""
    write_json({"complete": True, "producer": producer,
                "files": {n: file_digest(os.path.join(cands_dir, n)) for n in names}},
               os.path.join(cands_dir, MANIFEST))


def check_candidates_manifest(cands_dir, names, flag="--cands_dir"):
    """Stop unless the files `names` of `cands_dir` are those its manifest lists (size and
    sha256); a folder without a manifest (candidates of the original code) is a notice."""
    path = os.path.join(cands_dir, MANIFEST)
    if not os.path.exists(path):
        notice(f"{cands_dir} has no {MANIFEST} (candidates not written by this save_candidates.py):"
               f" the files are used unchecked")
        return
    manifest = _read_manifest(path, flag)
    if not manifest.get("complete"):
        die(f"{flag}: {path} says save_candidates.py did not finish writing {cands_dir}; run it "
            f"again")
    for name in names:
        file = os.path.join(cands_dir, name)
        if name not in manifest["files"]:
            die(f"{flag}: {path} does not list {name}")
        if not os.path.isfile(file):
            die(f"{flag}: missing file {file} (listed in {path})")
        if file_digest(file) != manifest["files"][name]:
            die(f"{flag}: {file} is not the file save_candidates.py wrote (its size or sha256 "
                f"differs from {path}); run save_candidates.py again")


def stopped(e):
    """End a run stopped by SIGTERM or SIGINT (`e`: Stopped or KeyboardInterrupt): one line on
    stderr (main process), exit status 128 + the signal's number, as a shell reports it."""
    signum = getattr(e, "signum", signal.SIGINT)
    if os.environ.get("RANK", "0") == "0":
        print(stop_message(signal.Signals(signum).name), file=sys.stderr, flush=True)
        log_to_file(stop_message(signal.Signals(signum).name))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        end_run()
        os._exit(128 + signum)
    sys.exit(128 + signum)

"""What every script needs: user errors and the shared command-line flags, seeds, devices and
distributed runs, mixed precision, the optimizer and schedule, logging, progress bars, atomic files
and checkpoints, and the run scaffolding the two training scripts share (`TrainingRun`)."""
import argparse
import contextlib
import functools
import json
import logging
import os
import random
import sys
import tempfile
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
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                os._exit(2)  # the other ranks may be waiting in a collective
            sys.exit(2)
    return wrapper


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


def compatibility_notice(args, log):
    """One log line naming the compatibility flags given, if any, and why they do nothing."""
    given = [name for name in COMPATIBILITY_FLAGS if getattr(args, name, None) is not None]
    if given:
        log.info("notice: %s accepted for the original's command line and ignored (%s)",
                 ", ".join(f"--{name}" for name in given),
                 "; ".join(dict.fromkeys(COMPATIBILITY_FLAGS[name][1] for name in given)))


def recorded_args(args):
    """The arguments as a run's log and checkpoints record them: without the compatibility
    flags, which do nothing."""
    return {k: v for k, v in vars(args).items() if k not in COMPATIBILITY_FLAGS}


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

def build_optimizer(model, lr, weight_decay=0.0, adam_epsilon=1e-8, simpleoptim=False):
    """AdamW with no weight decay for biases and LayerNorm weights; `simpleoptim`: plain Adam."""
    if simpleoptim:
        return torch.optim.Adam(model.parameters(), lr=lr)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (rest if any(nd in name for nd in no_decay) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, eps=adam_epsilon)


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


def progress(iterable=None, desc=None, total=None, disable=False, **kw):
    """A tqdm bar on stderr; `disable` (from `--quiet` or a non-main process) silences it."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True,
                leave=False, **kw)


# ----------------------------------------------------------------------------------------------
# Atomic files and checkpoints

@contextlib.contextmanager
def atomic_open(path, mode="w", **kw):
    """Write to a temporary file beside `path`, then rename: `path` appears whole or not at all."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
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
    check_flag(isinstance(state, dict) and state.get("script") == script, flag,
               f"{path} is not a checkpoint written by {script}.py")
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

    def optimizers(self, model, num_examples, dtype):
        """(optimizer, scheduler, gradient scaler) for `num_examples` mentions an epoch, from the
        shared training flags; `model` is on its device."""
        args = self.args
        optimizer = build_optimizer(model, args.lr, args.weight_decay, args.adam_epsilon,
                                    args.simpleoptim)
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
        return load_run_checkpoint(last, self.script, "--resume_training", training_state=True)

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

    def count_step(self, epoch, running, scheduler):
        """After an optimizer step: count it; every --logging_steps steps keep and log the mean
        loss since the last (`running`, a RunningMean)."""
        self.step += 1
        if self.step % self.args.logging_steps == 0:
            self.losses.append(running.pop())
            self.log.info("epoch %d step %d/%d: loss %.4f lr %.3g", epoch + 1, self.step,
                          self.total_steps, self.losses[-1], scheduler.get_last_lr()[0])

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
        if self.rt.is_main:
            write_json(self.results, self.paths["results"])

"""What every script needs: user errors, seeds, devices and distributed runs, mixed precision,
the optimizer and schedule, logging, progress bars, atomic files and checkpoints."""
import contextlib
import functools
import json
import logging
import math
import os
import random
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
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                os._exit(2)  # the other ranks may be waiting in a collective
            sys.exit(2)
    return wrapper


def check_flag(condition, flag, message):
    if not condition:
        die(f"{flag}: {message}")


def check_positive(args, *flags):
    """Stop with a one-line error on the first of these argparse flags whose value is not > 0."""
    for flag in flags:
        value = getattr(args, flag)
        check_flag(value > 0, f"--{flag}", f"must be positive (got {value})")


# ----------------------------------------------------------------------------------------------
# Seeds

def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


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
    one process through DataParallel (n_gpu > 1)."""
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
# Mixed precision through torch.amp

def add_precision_args(parser):
    """--fp16 / --bf16 / --fp32: the autocast dtype (see amp_dtype)."""
    parser.add_argument("--fp16", action="store_true",
                        help="float16 autocast with a gradient scaler (bfloat16 on a CPU)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--fp32", action="store_true",
                        help="full precision (TF32 matrix multiplies) on a GPU; the default there "
                             "is bfloat16 autocast where the GPU supports it")


def amp_dtype(fp16=False, bf16=False, device=None, log=None, fp32=False):
    """The autocast dtype, or None for full precision.

    `--fp16`: float16 (needs CUDA: on a CPU it runs as bfloat16, with a one-line notice);
    `--bf16`: bfloat16; `--fp32`: None. With none of them: bfloat16 on a GPU that supports it
    (Ampere and later: the paper recipe fits in hours, not days), full precision elsewhere.
    """
    cuda = device is not None and device.type == "cuda"
    if fp16 or bf16:
        if not cuda:
            if fp16 and log is not None:
                log.info("notice: --fp16 on a CPU runs as bfloat16 autocast")
            return torch.bfloat16
        return torch.bfloat16 if bf16 else torch.float16
    if cuda and not fp32 and torch.cuda.is_bf16_supported():
        if log is not None:
            log.info("notice: bfloat16 autocast on this GPU (the default; --fp32 for full precision)")
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
# Pretrained encoders and tokenizers

MENTION_START, MENTION_END, TITLE_END = "[unused0]", "[unused1]", "[unused2]"
MARKERS = (MENTION_START, MENTION_END, TITLE_END)


def _offline_hint(name):
    if os.path.isdir(name):
        return f"{name} is a folder but holds no loadable model/tokenizer"
    return (f"{name} is not a folder and could not be loaded from the Hugging Face hub or its "
            f"local cache (offline? pass a local model folder with --pretrained)")


def quiet_transformers():
    """No weight-loading progress bars or advisory warnings from transformers: our own bars and
    log say what is happening."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_tokenizer(name, flag="--pretrained"):
    """The fast tokenizer of `name` (a folder or hub name) with the three marker tokens registered
    as special tokens, so that they stay single tokens (added to the vocabulary where missing)."""
    from transformers import AutoTokenizer
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception:
        die(f"{flag}: {_offline_hint(name)}")
    tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    return tokenizer


def load_encoder(name, tokenizer, flag="--pretrained"):
    """The pretrained transformer `name` (AutoModel, SDPA attention where available), its
    embeddings resized when the tokenizer had to add the marker tokens."""
    from transformers import AutoModel
    quiet_transformers()
    try:
        model = AutoModel.from_pretrained(name, add_pooling_layer=True, attn_implementation="sdpa")
    except Exception:
        try:
            model = AutoModel.from_pretrained(name)
        except Exception:
            die(f"{flag}: {_offline_hint(name)}")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model

"""What every script needs: user errors and the command line, seeds, devices and distributed runs,
mixed precision, logs and progress bars, atomic files and checkpoints. The training scripts' own
machinery is in training.py, the checks that keep runs from losing or overwriting work in
run_safety.py."""
import argparse
import contextlib
import errno
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------
# User errors: one plain line, exit status 2, no traceback (run_safety.cli_main prints it).

class UserError(Exception):
    """A mistake of the user's (path, flag, input row), reported as one line with exit status 2."""


def die(message):
    raise UserError(message)


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


# Flags of the original's command lines that have nothing to do here: accepted so that those
# command lines run unchanged, never recorded as if they acted, one notice when given.
COMPATIBILITY_FLAGS = {
    "num_hards": ({"type": int}, "the numbers of negatives come from --num_cands and "
                  "--cands_ratio"),
    "num_workers": ({"type": int}, "batches are assembled by tensor indexing in the main process"),
    "eval_batchsize": ({"type": int}, "val and test are ranked in batches of --mention_bsz, as "
                       "the original ranked them"),
    "store_en_hiddens": ({"action": "store_true"}, "entity vectors are streamed chunk by chunk, "
                         "never stored"),
    "en_hidden_path": ({}, "entity vectors are streamed chunk by chunk, never stored"),
    "fp16_opt_level": ({}, "mixed precision is torch.amp's (--fp16, --bf16), not apex's"),
    "seed": ({"type": int}, "ranking the candidates draws nothing at random"),
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
        if not torch.cuda.is_available() and os.environ.get("RANK", "0") == "0":
            print(f"notice: --gpus {gpus}: no usable GPU on this machine; running on the CPU",
                  file=sys.stderr, flush=True)
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


def cleanup_runtime(rt):
    if rt.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
# Logs and progress bars

def free_log_path(model_path):
    """`<model>.log`, or `<model>.log.1`, `.2`, ... so that an earlier log is never overwritten."""
    path = model_path + ".log"
    n = 0
    while os.path.exists(path):
        n += 1
        path = f"{model_path}.log.{n}"
    return path


class _LogFile(logging.FileHandler):
    """A log file that, when a line cannot be written (a full disk), says so in one line on
    stderr and stops writing, instead of logging's traceback per line; stdout keeps the log."""

    def handleError(self, record):
        error = sys.exc_info()[1]
        if self.stream is not None:
            print(f"notice: cannot write the log {self.baseFilename}: "
                  f"{getattr(error, 'strerror', None) or error}; the log goes on on stdout only",
                  file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                self.stream.close()
        self.stream = None
        self.emit = lambda record: None


class DeferredFileHandler(logging.Handler):
    """A log file opened only once the run's checks have passed (`open_log_file`): until then the
    records wait in memory, so that a refused run leaves no `<model>.log`
    (docs/DESIGN.md#run-safety); a run that never opens it (a mistake found by a check) writes no
    file."""

    def __init__(self, model_path, fmt):
        super().__init__()
        self.model_path, self.pending, self.file = model_path, [], None
        self.setFormatter(fmt)

    def emit(self, record):
        if self.file is None:
            self.pending.append(record)
        else:
            self.file.emit(record)

    def open(self):
        """Create the log file (`free_log_path`) and write the records kept so far; returns its
        path. An OSError is one line naming the file (output_error)."""
        if self.file is None:
            path = free_log_path(self.model_path)
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                self.file = _LogFile(path)
            except OSError as e:
                raise output_error(path, e) from None
            self.file.setFormatter(self.formatter)
            for record in self.pending:
                self.file.emit(record)
            self.pending = []
        return self.file.baseFilename

    def close(self):
        if self.file is not None:
            self.file.close()
        super().close()


def get_logger(model_path=None, is_main=True, deferred=False):
    """A logger printing to stdout and to a new `<model>.log` (main process only; others log
    nothing but warnings). `deferred`: the file is created by `open_log_file`, after the run's
    checks, and holds every line logged before."""
    logger = logging.getLogger(f"hard-nce-el.{os.getpid()}")
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    sh = logging.StreamHandler(sys.stdout)
    sh.setFormatter(fmt)
    logger.addHandler(sh)
    if is_main and model_path:
        fh = DeferredFileHandler(model_path, fmt)
        logger.addHandler(fh)
        if not deferred:
            open_log_file(logger)
    return logger


def open_log_file(logger):
    """Create the deferred log file of `logger` (get_logger), once the run's checks passed."""
    for handler in logger.handlers:
        if isinstance(handler, DeferredFileHandler):
            logger.log_path = handler.open()


def log_to_file(line):
    """Write `line` to the run's log file too, when one is open (stderr has it already), so that
    a log ends with the reason its run stopped."""
    log = logging.getLogger(f"hard-nce-el.{os.getpid()}")
    for handler in log.handlers:
        if isinstance(handler, DeferredFileHandler) and handler.file is not None:
            handler.emit(log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None))


def notice(message):
    """One line `notice: ...` in the run's log (stdout and `<model>.log`), or on stderr when the
    log is not open yet."""
    log = logging.getLogger(f"hard-nce-el.{os.getpid()}")
    if log.handlers:
        log.info("notice: %s", message)
    else:
        print(f"notice: {message}", file=sys.stderr, flush=True)


def quiet_transformers():
    """No weight-loading progress bars or advisory warnings from transformers: our own bars and
    log say what is happening."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # transformers 4.x passes huggingface_hub a deprecated argument on every hub lookup
    warnings.filterwarnings("ignore", message=".*resume_download.*", category=FutureWarning)


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

class Stopped(BaseException):
    """SIGTERM or SIGINT: the run ends like a clean stop (a BaseException, as KeyboardInterrupt,
    so that no `except Exception` swallows it). Raised by run_safety's signal handler, or at the
    end of a write the signal arrived in (`deferred_signals`)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


# Writes in progress (`deferred_signals`) and the signal that arrived meanwhile, if any.
_WRITES = {"depth": 0, "pending": None}


def signal_deferred(signum):
    """For run_safety's signal handler: True when a write is in progress, the signal then kept
    until it ends (`deferred_signals`)."""
    if _WRITES["depth"] == 0:
        return False
    _WRITES["pending"] = _WRITES["pending"] or signum
    return True


@contextlib.contextmanager
def deferred_signals():
    """SIGTERM and SIGINT wait until the block ends (a write, or the group of checkpoints of an
    epoch), then stop the run (Stopped): a signal never interrupts a file half-way, and the stop
    message sees every file of the block written."""
    _WRITES["depth"] += 1
    try:
        yield
    finally:
        _WRITES["depth"] -= 1
        if _WRITES["depth"] == 0 and _WRITES["pending"]:
            signum, _WRITES["pending"] = _WRITES["pending"], None
            raise Stopped(signum)


def output_error(path, error, written=None, needed=None):
    """The UserError of an OSError writing `path`: one line naming the file and the cause (a full
    disk says how much was needed and how much is free)."""
    why = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        parts = []
        if needed:
            parts.append(f"needed about {needed / 1e6:.1f} MB")
        elif written is not None:
            parts.append(f"needed more than the {written / 1e6:.1f} MB written")
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            parts.append(f"{free / 1e6:.1f} MB free")
        if parts:
            why += f" ({', '.join(parts)})"
    return UserError(f"cannot write {path}: {why}")


def _os_error_in(error):
    """The OSError `error` is, or was raised while handling (torch.save reports a failed write
    as a RuntimeError raised during the OSError), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def atomic_open(path, mode="w", needed=None, **kw):
    """Write to a temporary file beside `path`, then rename: `path` appears whole or not at all.
    SIGTERM / SIGINT wait for the end of the write (deferred_signals); an OSError (a full disk, a
    read-only folder) removes the temporary file and stops the run with one line naming `path`
    (`needed`: the bytes the file takes, when known, for that line)."""
    folder = os.path.dirname(os.path.abspath(path))
    with deferred_signals():
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                                       suffix=".tmp")
        except OSError as e:
            raise output_error(path, e) from None
        try:  # from here on, any exit (an error, a stop) removes `tmp`
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual rights
            with os.fdopen(fd, mode, **kw) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except Exception as e:
            cause = _os_error_in(e)  # torch.save turns a failed write into a RuntimeError
            if cause is None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            written = None
            with contextlib.suppress(OSError):
                written = os.path.getsize(tmp)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise output_error(path, cause, written, needed) from None
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
    needed = sum(t.nbytes for t in _tensors(state))
    with atomic_open(path, "wb", needed=needed or None) as f:
        torch.save(state, f)


def _tensors(obj):
    """The tensors of a checkpoint's nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


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

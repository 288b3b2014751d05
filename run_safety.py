"""Run safety (docs/DESIGN.md#run-safety): no silent garbage, no lost work, one line per mistake.
Every check here runs before any work: the flags and output paths, who wrote the files a run would
replace and with which flags, the candidate folders' manifests, the run's lock, and SIGTERM / SIGINT
turned into a clean stop that says where the last complete state is."""
import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import signal
import socket
import sys

import torch

from utils import UserError, check_flag, die, load_checkpoint, log_to_file, notice, unwrap, write_json


# ----------------------------------------------------------------------------------------------
# Flags and output paths

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


# ----------------------------------------------------------------------------------------------
# The checkpoints of a run: who wrote them, with which flags

# Flags that may differ between a run and the run it resumes (or a rerun over its files): they
# change neither what is trained nor what is measured. Every other flag must match.
MAY_DIFFER = frozenset({
    "quiet", "gpus", "resume_training", "overwrite",
    "fp16", "bf16", "fp32", "fp16_opt_level",                     # precision (resumable)
    "eval_batchsize", "mention_bsz", "entity_bsz", "num_workers",  # batching of encoding
    "logging_steps", "store_en_hiddens", "en_hidden_path",         # logging, ignored flags
    "num_hards", "ignored_flags"})


# Paths that may move between a run and its resumption (same files, another place): a notice.
MAY_MOVE = frozenset({"model", "data_dir", "data", "cands_dir", "pretrained"})


# One checkpoint schema for both trainers: `<model>` holds CHECKPOINT_KEYS, `<model>.last` these
# and TRAINING_STATE_KEYS. "script" names the script that wrote it ("main_retriever").
CHECKPOINT_KEYS = ("script", "args", "model", "epoch", "step", "best_score", "results")


TRAINING_STATE_KEYS = CHECKPOINT_KEYS + ("optimizer", "scheduler", "scaler", "losses", "rng")


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


# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
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


def start_run(lock, flag, last=None, folder=None):
    """Before any work: take the run's lock file `lock` (main process only; `flag` names the
    output in the error when another run holds it) and turn SIGTERM and SIGINT into a clean stop
    whose message says where the last complete state is: the training state `last`, or the
    candidate folder `folder`."""
    end_run()  # a previous run in this process (tests call main() several times)
    _RUN.update(pid=os.getpid(), last=last, flag=flag, dir=folder)
    if os.environ.get("RANK", "0") == "0":
        _RUN["lock"] = (lock, take_lock(lock, flag))
    with contextlib.suppress(ValueError):  # not the main thread: leave the signals alone
        _RUN["handlers"] = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM,
                                                                       signal.SIGINT)}


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

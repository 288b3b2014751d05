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

from utils import (Stopped, UserError, check_flag, die, load_checkpoint, log_to_file, notice,
                   output_error, recorded_args, signal_deferred, unwrap, write_json)


# ----------------------------------------------------------------------------------------------
# Flags and output paths

def check_finite_flags(args):
    """Stop on a float flag given as nan or inf (`--lr nan`, `--clip inf`): argparse takes them."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            die(f"--{name}: {value} is not a finite number")


def ignored_flag_notices(args, parser, rules, log):
    """One log notice per flag given a value other than its default that the chosen mode
    ignores. `rules`: [(flag name, ignored(args) -> bool, why(args) -> str)]."""
    for name, ignored, why in rules:
        value = getattr(args, name)
        if value != parser.get_default(name) and ignored(args):
            log.info("notice: --%s %s has no effect: %s", name, value, why(args))


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
# and TRAINING_STATE_KEYS. "script" names the script that wrote it ("main_retriever"), "inputs"
# what its data and encoder (and candidates) held (check_inputs; absent from checkpoints written
# before it was recorded, which are still read: OPTIONAL_KEYS).
CHECKPOINT_KEYS = ("script", "args", "inputs", "model", "epoch", "step", "best_score", "results")
OPTIONAL_KEYS = ("inputs",)


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
    missing = [k for k in keys if k not in state and k not in OPTIONAL_KEYS]
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
    (but MAY_DIFFER and the paths of MAY_MOVE, whose content check_inputs compares)."""
    writer = checkpoint_script(state)
    saved = state.get("args") if isinstance(state, dict) else None
    if not isinstance(saved, dict) or writer not in (None, script):
        die(f"--resume_training: {path} was written by {writer or 'another program'}"
            f"{'.py' if writer else ''}, not {script}.py")
    for flag, old, new in differing_flags(args, saved):
        die(f"--{flag}: {path} was trained with --{flag} {old}; resuming with {new} would change "
            f"what is trained or measured (resume with --{flag} {old}, or start a new --model)")


def check_overwrite(args, script, flag="--model"):
    """Stop before any work when `<model>`, `<model>.last` or `<model>.results.json` exist and
    were written by another script or with other flags (but MAY_DIFFER and MAY_MOVE): they are
    replaced only by a rerun of the same run, `--resume_training`, or with `--overwrite`. The
    checkpoints found are kept for check_inputs, which compares what their paths hold."""
    _RUN["replaces"] = []
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
        _RUN["replaces"].append((path, state["args"], state.get("inputs"), state.get("epoch")))


# ----------------------------------------------------------------------------------------------
# What a run's paths hold: a checkpoint records its inputs by content ("inputs": {name:
# fingerprint}, data_loader.Zeshel.fingerprint and encoder_fingerprint), so that a path may move
# (MAY_MOVE) only when what it points to is the same.

INPUT_FLAGS = {"data": "data_dir", "encoder": "pretrained", "cands": "cands_dir"}
OTHER = {"data": "other data", "encoder": "another encoder", "cands": "other candidates"}


def absolute(value):
    """`value` made an absolute path when it names an existing file or folder (a relative path
    would name other files from another folder); any other value as it is."""
    return os.path.abspath(value) if isinstance(value, str) and os.path.exists(value) else value


def checkpoint_args(args):
    """The arguments a checkpoint records: recorded_args, with the paths of its inputs absolute."""
    return {k: absolute(v) if k in INPUT_FLAGS.values() else v
            for k, v in recorded_args(args).items()}


def _same_path(a, b):
    return absolute(a) == absolute(b)


def _what_differs(name, old, new):
    if name == "data":
        def said(fp):
            return ("none" if fp is None else f"{fp['mentions']} mentions, {fp['entities']} "
                    f"entities, sha256 {fp['sha256'][:12]}")
        split = next(s for s in sorted(set(old) | set(new)) if old.get(s) != new.get(s))
        return f"{split}: {said(old.get(split))}, now {said(new.get(split))}"
    parts = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f"its {' and '.join(parts)} differ"


def input_differences(saved_args, saved_inputs, args, inputs):
    """[(flag, old path, new path, why)] for each input of `inputs` ({name: fingerprint}) that is
    not what the checkpoint of `saved_args` / `saved_inputs` used: another content, or, for a
    checkpoint without fingerprints, another path. And [(flag, old, new)] of those moved with the
    same content."""
    differ, moved = [], []
    for name, fingerprint in inputs.items():
        key = INPUT_FLAGS[name]
        old_path, new_path = saved_args.get(key), getattr(args, key, None)
        old = (saved_inputs or {}).get(name)
        if old is None:
            if not _same_path(old_path, new_path):
                differ.append((key, old_path, new_path, "it does not record what that held"))
        elif old != fingerprint:
            differ.append((key, old_path, new_path, _what_differs(name, old, fingerprint)))
        elif not _same_path(old_path, new_path):
            moved.append((key, old_path, new_path))
    return differ, moved


def check_inputs(args, inputs, resumed=None):
    """After the inputs are loaded, before anything is written: stop when the run resumed
    (`resumed`: (path, its args, its inputs)) or the files it would replace (check_overwrite)
    used other data, another encoder or other candidates than `inputs` (by content, whatever
    the paths), naming the flag, the old and the new path. A path moved with the same content is
    a notice; so is a rerun of a finished run with the same flags and inputs."""
    checked = [resumed] if resumed else [r[:3] for r in _RUN.get("replaces", [])]
    for path, saved_args, saved_inputs in checked:
        differ, moved = input_differences(saved_args, saved_inputs, args, inputs)
        for key, old, new, why in differ:
            if resumed:
                die(f"--{key}: {path} was trained with --{key} {old}, and --{key} {new} is not "
                    f"the same ({why}); resume with what it was trained on, or start a new "
                    f"--model")
            die(f"--{key}: {path} holds a run with --{key} {old}, and --{key} {new} is not the "
                f"same ({why}); pass --overwrite to replace it, or choose another --model")
        for key, old, new in moved:
            notice(f"--{key} was {old} in the run of {path}, now {new}: the same content")
    if not resumed and _RUN.get("replaces"):
        path, _, _, epoch = _RUN["replaces"][0]
        notice(f"{path} holds a run with these flags (epoch {epoch}); this run starts it again "
               f"and replaces its files (--resume_training continues it instead)")


def check_trained_encoder(state, fingerprint, name, flag):
    """save_candidates.py: stop unless the encoder loaded from `name` is the one the retriever
    checkpoint `state` was trained from (its config and vocabulary; its weights are the
    checkpoint's). `flag` says where `name` came from."""
    old = (state.get("inputs") or {}).get("encoder")
    if old is None:
        return
    parts = [k for k in ("config", "vocabulary") if old.get(k) != fingerprint.get(k)]
    if parts:
        die(f"{flag}: {name} is not the encoder the checkpoint was trained with (its "
            f"{' and '.join(parts)} differ); pass --pretrained with that encoder")


# ----------------------------------------------------------------------------------------------
# A tool's own output folder (toy_world.py OUT, demo.py --out DIR): it replaces only what its
# record says it wrote there.

def claim_outputs(folder, tool, names, overwrite=False, flag="--out"):
    """Before `tool` writes the entries `names` (files or folders, relative to `folder`): stop
    with one line naming the first that exists but is not in the tool's record
    `folder/.<tool>.outputs.json` (a user's file, or another program's), unless `overwrite`; then
    record them, before writing, so that a tool stopped half-way still owns what it began."""
    check_output_dir(folder, flag)
    record = os.path.join(folder, f".{tool}.outputs.json")
    owned = set()
    if os.path.isfile(record):
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            with open(record, encoding="utf-8") as f:
                owned = set(json.load(f).get("outputs", []))
    if not overwrite:
        for name in names:
            path = os.path.join(folder, name)
            if os.path.lexists(path) and name not in owned:
                die(f"{flag}: {path} exists and was not written by {tool}; pass --overwrite to "
                    f"replace it, or choose another {flag}")
    write_json({"tool": tool, "outputs": sorted(owned | set(names))}, record)


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
    flags = {k: absolute(v) if k in MAY_MOVE else v
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
    (or of unknown origin: no manifest), unless --overwrite. Returns whether it holds the
    complete candidates of this checkpoint and these flags (a rerun, which save_candidates.py
    says)."""
    if overwrite or not os.path.isdir(cands_dir):
        return False
    path = os.path.join(cands_dir, MANIFEST)
    if os.path.exists(path):
        manifest = _read_manifest(path, "--cands_dir")
        old = manifest.get("producer") or {}
        for part in ("checkpoint", "args"):
            theirs, mine = old.get(part) or {}, producer[part]
            for key in sorted(set(theirs) | set(mine)):
                if theirs.get(key) != mine.get(key):
                    what = f"--{key}" if part == "args" else f"the checkpoint's {key}"
                    die(f"--cands_dir: {cands_dir} holds candidates made with {what} "
                        f"{theirs.get(key)} (now {mine.get(key)}); pass --overwrite to replace "
                        f"them, or choose another --cands_dir")
        return bool(manifest.get("complete"))
    if any(n.startswith("candidates_") for n in os.listdir(cands_dir)):
        die(f"--cands_dir: {cands_dir} holds candidates files of unknown origin (no {MANIFEST}); "
            f"pass --overwrite to replace them, or choose another --cands_dir")
    return False


def begin_candidates(cands_dir, producer):
    """Mark `cands_dir` incomplete before its first file is replaced."""
    write_json({"complete": False, "producer": producer, "files": {}},
               os.path.join(cands_dir, MANIFEST))


def finish_candidates(cands_dir, producer, names):
    """Write the manifest, last: the producer, and the size and sha256 of each file of `names`."""
    write_json({"complete": True, "producer": producer,
                "files": {n: file_digest(os.path.join(cands_dir, n)) for n in names}},
               os.path.join(cands_dir, MANIFEST))


def check_candidates_manifest(cands_dir, splits, flag="--cands_dir"):
    """Stop unless the candidates files of `splits` in `cands_dir` are those its manifest lists
    (size and sha256); a folder without a manifest (candidates of the original code) is a notice.
    Returns the files by content, {split: sha256, or None for a missing file, which reading it
    reports}, for check_inputs: each file is read once."""
    path = os.path.join(cands_dir, MANIFEST)
    files = {s: os.path.join(cands_dir, f"candidates_{s}.json") for s in splits}
    digests = {s: file_digest(f) if os.path.isfile(f) else None for s, f in files.items()}
    if not os.path.exists(path):
        notice(f"{cands_dir} has no {MANIFEST} (candidates not written by this save_candidates.py):"
               f" the files are used unchecked")
        return {s: d and d["sha256"] for s, d in digests.items()}
    manifest = _read_manifest(path, flag)
    if not manifest.get("complete"):
        die(f"{flag}: {path} says save_candidates.py did not finish writing {cands_dir}; run it "
            f"again")
    for split, file in files.items():
        name = os.path.basename(file)
        if name not in manifest["files"]:
            die(f"{flag}: {path} does not list {name}")
        if digests[split] is None:
            die(f"{flag}: missing file {file} (listed in {path})")
        if digests[split] != manifest["files"][name]:
            die(f"{flag}: {file} is not the file save_candidates.py wrote (its size or sha256 "
                f"differs from {path}); run save_candidates.py again")
    return {s: d["sha256"] for s, d in digests.items()}


# ----------------------------------------------------------------------------------------------
# The run lock and the signals: `start_run` takes both, `end_run` (called by cli_main) gives
# them back.

_RUN = {}


def _on_signal(signum, frame):
    if os.getpid() != _RUN.get("pid"):  # a forked data loader worker: the main process stops
        os._exit(128 + signum)
    if signal_deferred(signum):  # a file is being written: the stop comes when it is whole
        return
    for s in (signal.SIGTERM, signal.SIGINT):  # a second signal must not break the cleanup
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


def take_lock(path, flag):
    """Hold `path` (fcntl.flock, pid and host written in it) until `release_lock`; stop with one
    line naming the other process when another run holds it. The folders it makes are removed
    again by `release_lock` when the run left them empty (a refused run creates nothing)."""
    made = make_folders(os.path.dirname(os.path.abspath(path)), flag)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            remove_empty_folders(made)
            raise output_error(path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError):  # a file system without locks
                notice(f"{path}: cannot lock ({e.strerror}); running without the lock")
                break
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            remove_empty_folders(made)
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
    _MADE[path] = made
    return fd


_MADE = {}  # lock path -> the folders take_lock made for it, deepest first


def make_folders(folder, flag):
    """Make `folder` and its missing parents; returns those made, deepest first."""
    made, f = [], os.path.abspath(folder)
    while not os.path.exists(f):
        made.append(f)
        f = os.path.dirname(f)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise output_error(folder, e) from None
    return made


def remove_empty_folders(folders):
    for f in folders:
        with contextlib.suppress(OSError):
            os.rmdir(f)  # only when empty


def release_lock(path, fd):
    with contextlib.suppress(OSError):
        os.unlink(path)  # while still held: a waiting run then locks a fresh file
    with contextlib.suppress(OSError):
        os.close(fd)
    remove_empty_folders(_MADE.pop(path, []))


def start_run(lock, flag, last=None, folder=None, best=None):
    """Before any work: take the run's lock file `lock` (main process only; `flag` names the
    output in the error when another run holds it) and turn SIGTERM and SIGINT into a clean stop
    whose message says where the last complete state is: the training state `last` (and the
    best checkpoint `best`), or the candidate folder `folder`."""
    end_run()  # a previous run in this process (tests call main() several times)
    _RUN.clear()
    _RUN.update(pid=os.getpid(), last=last, flag=flag, dir=folder, best=best)
    if os.environ.get("RANK", "0") == "0":
        _RUN["lock"] = (lock, take_lock(lock, flag))
    with contextlib.suppress(ValueError):  # not the main thread: leave the signals alone
        _RUN["handlers"] = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM,
                                                                       signal.SIGINT)}


def detach_worker(worker_id=None):
    """In a process forked from a run, a DataLoader worker (its `worker_init_fn`): close its copy
    of the run's lock, so that the lock ends with the main process (a worker outlives a killed
    main process by seconds, and a resumed run found the lock still held), and end quietly on
    SIGINT and SIGTERM (a Ctrl-C reaches the whole process group), which the main process turns
    into the run's one-line stop; a worker's non-zero exit added a traceback to it."""
    lock = _RUN.pop("lock", None)
    if lock is not None:
        with contextlib.suppress(OSError):
            os.close(lock[1])
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: os._exit(0))


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
    best = _RUN.get("best")
    if best and os.path.isfile(best):
        return (f"stopped by {name} before a training state was saved: {best} holds a model "
                f"but there is no {last} to resume from; run again to train it")
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

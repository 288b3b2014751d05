"""Run safety (docs/DESIGN.md#run-safety). What a run reads is known by the digest of what it read
(read once), what it writes by the digest of what it wrote: every file a tool writes goes through
`Outputs`, which checks it before any work, writes it whole and records it, with the run that
wrote it, in its folder's record. SIGINT, SIGTERM and SIGHUP wait for the write in progress, then
end the run in one line (cli.main); the next run clears what a killed one left."""
import contextlib
import errno
import fcntl
import functools
import glob
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import torch

from cli import UserError, check_flag, die

RECORD = ".hard-nce-el.record"  # JSON; not *.json, which tools list as data
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


# ----------------------------------------------------------------------------------------------
# Signals: a stop waits for the write in progress

class Stopped(BaseException):
    """SIGINT, SIGTERM or SIGHUP: the run ends like a clean stop (a BaseException, as
    KeyboardInterrupt, so that no `except Exception` swallows it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name


_PROCESS = {"writing": 0, "pending": None, "stop_message": None, "locks": {}, "handlers": {},
            "said": set()}


def _on_signal(signum, frame):
    if _PROCESS["writing"]:  # a file is being written: the stop comes when it is whole
        _PROCESS["pending"] = _PROCESS["pending"] or signum
        return
    for s in STOP_SIGNALS:  # a second signal must not break the cleanup
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


def check_stop():
    """Between the pieces of a long write: a stop signal received meanwhile ends the run now."""
    if _PROCESS["pending"]:
        signum, _PROCESS["pending"] = _PROCESS["pending"], None
        raise Stopped(signum)


def detach_worker(*_):
    """A DataLoader worker's worker_init_fn: it leaves stop signals to the main process (which
    ends its workers) and closes its copy of the run's lock (a worker outliving a killed run
    would hold it)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    for fd, _ in _PROCESS["locks"].values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _PROCESS["locks"].clear()
    sys.excepthook = _quiet_when_main_is_gone


def _quiet_when_main_is_gone(kind, value, tb, _print=sys.excepthook):
    """In a worker only multiprocessing's resource sharer (the thread that hands tensors' file
    descriptors to the main process) reports through sys.excepthook; a broken connection there
    means the main process is stopping, which says so itself."""
    if not issubclass(kind, (EOFError, ConnectionError)):
        _print(kind, value, tb)


@contextlib.contextmanager
def deferred_signals():
    """A stop signal waits until the block ends (a write, or the files of an epoch), then stops
    the run (Stopped)."""
    _PROCESS["writing"] += 1
    try:
        yield
    finally:
        _PROCESS["writing"] -= 1
        if not _PROCESS["writing"] and _PROCESS["pending"]:
            signum, _PROCESS["pending"] = _PROCESS["pending"], None
            raise Stopped(signum)


def run_children(procs):
    """Wait for child processes (Popen): their exit codes. A stop signal is passed on to them, and
    this process stops once they have ended, their files whole."""
    try:
        return [p.wait() for p in procs]
    except Stopped as e:
        for p in procs:
            with contextlib.suppress(OSError):
                p.send_signal(e.signum)
        for p in procs:
            p.wait()
        raise


def run_child(argv, **kwargs):
    return run_children([subprocess.Popen(argv, **kwargs)])[0]


# ----------------------------------------------------------------------------------------------
# Files written whole, their digests, and the record of a folder

def output_error(path, error, needed=None):
    """The UserError of an OSError writing `path`: one line naming the file and the cause (a full
    disk says how much was needed and how much is free)."""
    why = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        parts = [f"needed about {needed / 1e6:.1f} MB"] if needed else []
        with contextlib.suppress(OSError):
            parts.append(f"{shutil.disk_usage(os.path.dirname(path)).free / 1e6:.1f} MB free")
        why += f" ({', '.join(parts)})" if parts else ""
    return UserError(f"cannot write {path}: {why}")


class _Hashing(io.RawIOBase):
    """A binary file that hashes what is written through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


def atomic_write(path, write, needed=None):
    """Write `path` through write(f) (a binary file) into a temporary file beside it, then rename:
    whole or not at all; an OSError is one line naming `path`. -> {"sha256", "bytes",
    "mtime_ns"} of what was written."""
    folder, name = os.path.split(os.path.abspath(path))
    with deferred_signals():
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the usual rights
            with os.fdopen(fd, "wb") as f:
                hashing = _Hashing(f)
                write(hashing)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return {"sha256": hashing.sha.hexdigest(), "bytes": hashing.size,
                    "mtime_ns": os.stat(path).st_mtime_ns}
        except BaseException as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            cause = e
            while cause is not None and not isinstance(cause, OSError):  # torch.save wraps it
                cause = cause.__cause__ or cause.__context__
            if cause is None or not isinstance(e, Exception):
                raise
            raise output_error(path, cause, needed) from None


def read_record(folder):
    """{"files": {name: entry}, "runs": {key: description}} of `folder`; empty when unreadable."""
    try:
        with open(os.path.join(folder, RECORD), encoding="utf-8") as f:
            record = json.load(f)
        if isinstance(record.get("files"), dict) and isinstance(record.get("runs"), dict):
            return record
    except (OSError, ValueError, AttributeError):
        pass
    return {"files": {}, "runs": {}}


@contextlib.contextmanager
def _folder_locked(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: one writer assumed
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record_file(path, written, tool, description=None, role=None):
    """Record `path` (atomic_write's result) in its folder's record, written by `tool` for the run
    `description`, under the folder's lock."""
    folder, name = os.path.split(os.path.abspath(path))
    key = run_key(description) if description is not None else None
    with _folder_locked(folder):
        record = read_record(folder)
        record["files"][name] = {**written, "tool": tool, "role": role, "run": key}
        if key is not None:
            record["runs"][key] = description
        used = {e.get("run") for e in record["files"].values()}
        record["runs"] = {k: v for k, v in record["runs"].items() if k in used}
        text = json.dumps(record, indent=1, sort_keys=True).encode()
        atomic_write(os.path.join(folder, RECORD), lambda f: f.write(text))


def run_key(description):
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def recorded(path, sha256=None):
    """(entry, run description) of `path` when this project wrote it and it is unchanged since (its
    size and mtime, else its digest, or `sha256` the caller read, as recorded); else None."""
    folder, name = os.path.split(os.path.abspath(path))
    record = read_record(folder)
    entry = record["files"].get(name)
    if entry is None or not os.path.isfile(path):
        return None
    stat = os.stat(path)
    same = (sha256 == entry.get("sha256") if sha256 else
            (stat.st_size, stat.st_mtime_ns) == (entry.get("bytes"), entry.get("mtime_ns"))
            or _file_sha256(path) == entry.get("sha256"))
    return (entry, record["runs"].get(entry.get("run"))) if same else None


def _file_sha256(path):
    """The sha256 of a file, read in blocks: an entity index's vectors are up to 194 GB, more
    than read_hashed (which keeps what it read) could hold."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    except OSError as e:
        die(f"{path}: cannot read {path} ({e.strerror})")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# A run's outputs: checked before any work, written whole, recorded

def _check_writable(path, flag):
    """Stop unless `path` can be written: not a folder, its folder writable or makeable, its
    temporary name within the file system's limit."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        die(f"{flag}: {path} is a folder; give the path of a file in it, e.g. "
            f"{os.path.join(path, 'model.pt')}")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        die(f"{flag}: cannot make the folder of {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        die(f"{flag}: cannot write {path}: the folder {existing} is not writable")
    longest = len(f".{os.path.basename(path)}.12345678.tmp".encode())
    with contextlib.suppress(OSError, ValueError):
        limit = os.pathconf(existing, "PC_NAME_MAX")
        check_flag(longest <= limit, flag, f"the name {os.path.basename(path)!r} is too long for "
                   f"its file system ({longest} of at most {limit} bytes with the temporary "
                   f"suffix); choose a shorter name")


class Outputs:
    """The files one run of `tool` writes: `add` names each (checked writable at once), `start`
    makes the folders, takes the `lock` and clears a killed run's temporary files, `claim`
    checks the files in the way, `write` writes whole and records."""

    def __init__(self, tool, overwrite=False, lock=None, flag="--model", resumable=False):
        self.tool, self.overwrite, self.lock, self.flag = tool, overwrite, lock, flag
        self.resumable = resumable
        self.files, self.made, self.description, self.owned = {}, [], None, {}

    def add(self, path, flag=None, role=None, own=None):
        """Plan `path` (named by `flag`); two outputs naming one file stop the run. `own(path)`:
        for a format that says whose it is (the original's pickle), whether a file there is this
        tool's; it is written without a record."""
        flag = flag or self.flag
        _check_writable(path, flag)
        record = os.path.join(os.path.dirname(os.path.abspath(path)), RECORD)
        check_flag(not os.path.isdir(record), flag, f"{record} is a folder, where the record of "
                   f"the files written beside it belongs; move it away or choose another {flag}")
        key = os.path.abspath(path)
        if key in self.files:
            die(f"{flag}: {path} is also the run's {self.files[key][0]} file; give each output "
                f"its own path")
        self.files[key] = (flag, role)
        if own is not None:
            self.owned[key] = own
        return path

    def start(self):
        folders = {os.path.dirname(p) for p in list(self.files) + [self.lock or ""] if p}
        for folder in sorted(folders):
            missing = folder
            while not os.path.isdir(missing):
                self.made.insert(0, missing)
                missing = os.path.dirname(missing)
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise output_error(folder, e) from None
        if self.lock and os.environ.get("RANK", "0") == "0":
            take_lock(self.lock, self.flag, self.made)
            for path in self.files:  # a dead run's temporary files (we hold the lock)
                _remove_temporary(path)
            for folder in folders:  # and of its folders' records (their writers hold this lock)
                with _folder_locked(folder):
                    _remove_temporary(os.path.join(folder, RECORD))
        return self

    def claim(self, description, resume=None, defaults=None, read=None):
        """Stop, naming the flag and what differs, unless each output in the way is this project's,
        unchanged, in the same role, of a run with `description` (`resume`: the state continued;
        `read`: {path: sha256} the caller read), or --overwrite. -> the run found, or None."""
        found = None
        foreign = (f"--resume_training: {resume} is not a run's state this project wrote (or it "
                   f"changed since); pass --overwrite with --resume_training to continue it anyway")
        for path, (flag, role) in self.files.items():
            if not os.path.lexists(path) or self.overwrite:
                continue
            if path in self.owned:
                check_flag(self.owned[path](path), flag, f"{path} exists and is not a file of "
                           f"{self.tool}; pass --overwrite to replace it, or choose another {flag}")
                continue
            got = recorded(path, (read or {}).get(path))
            if got is None and resume is not None and path == os.path.abspath(resume):
                die(foreign)
            if got is None or got[0].get("role") != role or got[0].get("tool") != self.tool:
                what = ("was not written by this project" if got is None else
                        f"is a file of another run ({got[0].get('tool')}, "
                        f"{got[0].get('role') or 'output'})")
                if got is None and recorded_anywhere(path):
                    what = "changed since it was written"
                die(f"{flag}: {path} {what}; pass --overwrite to replace it, or choose another "
                    f"{flag}")
            refuse(*compare_runs(got[1] or {}, description, defaults or {}, resume is not None),
                   path, flag, resume is not None, self.resumable)
            found = got[1]
        if resume is not None and found is None and not self.overwrite:
            die(foreign)
        self.description = found if resume is not None and found is not None else description
        return found

    def write(self, path, write, needed=None, role=None):
        """Write `path` through write(f), whole, and record it (a stop signal waits for both)."""
        role = self.files.get(os.path.abspath(path), (None, role))[1]
        with deferred_signals():
            written = atomic_write(path, write, needed)
            if os.path.abspath(path) not in self.owned:
                record_file(path, written, self.tool, self.description, role)
        return written

    def write_json(self, obj, path):
        text = (json.dumps(obj, indent=2) + "\n").encode()
        return self.write(path, lambda f: f.write(text))

    def write_lines(self, rows, path):
        return self.write(path, lambda f: [f.write((json.dumps(r) + "\n").encode())
                                           for r in rows])

    def save(self, state, path):
        """A checkpoint: a plain dict, loadable with torch.load(weights_only=True)."""
        needed = sum(t.nbytes for t in _tensors(state)) or None
        return self.write(path, lambda f: torch.save(state, f), needed)


def refuse(differ, moved, path, flag="--model", resume=False, resumable=False):
    """One line on compare_runs' first difference with the run at `path`; a notice per move."""
    for name, old, new, why in differ:
        verb = "was trained with" if resume else "holds a run with"
        advice = ("resume with what it was trained on, or start a new --model" if resume else
                  "pass --overwrite to replace it, " + ("--resume_training to continue it, "
                                                       if resumable else "")
                  + f"or choose another {flag}")
        now = (f" (now {new})" if why is None else f", which holds other content now ({why})"
               if old == new else f", and --{name} {new} is not the same ({why})")
        die(f"--{name}: {path} {verb} --{name} {old}{now}; {advice}")
    for name, old, new, same in moved:
        notice(f"--{name} is {new} now, {old} in the run recorded: the same {same}"
               + ("; a resumed run takes every weight from its state"
                  if resume and same != "content" else ""))


def recorded_anywhere(path):
    folder, name = os.path.split(os.path.abspath(path))
    return name in read_record(folder)["files"]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (dict, list, tuple)):
        for v in (obj.values() if isinstance(obj, dict) else obj):
            yield from _tensors(v)


def compare_runs(old, new, defaults, resume=False):
    """([(flag, old, new, why)], [(flag, old path, new path, compared)] of inputs moved) between
    two runs {"tool", "flags", "inputs"}: a flag a run lacks counts as its default; inputs by
    content (the parts both record: a resumed run reads no initial weights), else by path."""
    differ, moved = [], []
    flags_old, flags_new = old.get("flags", {}), new.get("flags", {})
    for k in sorted(set(flags_old) | set(flags_new)):
        a, b = flags_old.get(k, defaults.get(k)), flags_new.get(k, defaults.get(k))
        if a != b:
            differ.append((k, a, b, None))
    for k, now in sorted(new.get("inputs", {}).items()):
        was = old.get("inputs", {}).get(k) or {"path": (old.get("paths") or {}).get(k)}
        a, b = was.get("content"), now.get("content")
        if a is None or b is None:
            if was.get("path") != now.get("path"):
                differ.append((k, was.get("path"), now.get("path"),
                               "it does not record what that held"))
            continue
        parts = sorted(p for p in set(a) & set(b) if a[p] != b[p])
        if parts:
            differ.append((k, was.get("path"), now.get("path"),
                           f"what it holds differs: {', '.join(parts)}"))
        elif was.get("path") != now.get("path"):
            moved.append((k, was.get("path"), now.get("path"), "content" if set(a) == set(b)
                          else ", ".join(sorted(set(a) & set(b)))))
    return differ, moved


# ----------------------------------------------------------------------------------------------
# Inputs read once

def read_hashed(path, flag):
    """The bytes of `path` and their sha256: one read, so what is hashed is what is used."""
    if not os.path.isfile(path):
        die(f"{flag}: no file {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        die(f"{flag}: cannot read {path} ({e.strerror})")
    return data, hashlib.sha256(data).hexdigest()


def load_checkpoint(path, flag="--model", script=None, keys=()):
    """(state, sha256) of a checkpoint read once; one line naming `flag` when it is missing,
    unreadable, another script's or lacks one of `keys`."""
    data, sha = read_hashed(path, flag)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        die(f"{flag}: {path} is not a readable checkpoint ({type(e).__name__})")
    writer = state.get("script") if isinstance(state, dict) else None
    if script is not None and writer != script:
        die(f"{flag}: {path} was written by {writer + '.py' if writer else 'another program'}, "
            f"not by {script}.py")
    missing = [k for k in keys if k not in state]
    what = "training state" if "optimizer" in keys else "checkpoint"
    check_flag(not missing, flag, f"{path} is not a whole {what} of {script}.py (no {missing[0]!r})"
               if missing else "")
    return state, sha


# ----------------------------------------------------------------------------------------------
# The run's lock, and main()

def take_lock(path, flag, made=()):
    """Hold `path` (flock; pid and host in it) until the run ends; one line naming the holder when
    another run holds it. A killed run's lock is taken over; a user's file there is refused."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise output_error(path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            _remove_empty(made)
            die(f"{flag}: another run is writing there ({holder} holds {path}); wait for it to "
                f"end, or choose another {flag}")
        except OSError as e:  # a file system without locks
            notice(f"{path}: cannot lock ({e.strerror}); running without the lock")
        try:  # the holder before us may have removed the file between our open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    held = os.read(fd, 200)
    if held and not (held.startswith(b"pid ") and b" on " in held):
        os.close(fd)
        _remove_empty(made)
        die(f"{flag}: {path} is in the way of the run's lock (a file this project did not make); "
            f"move it away, or choose another {flag}")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _PROCESS["locks"][path] = (fd, list(made))


def _remove_temporary(path):
    """Remove the temporary files atomic_write makes beside `path` (a killed run's)."""
    folder, name = os.path.split(path)
    for tmp in glob.glob(glob.escape(os.path.join(folder, f".{name}.")) + "*.tmp"):
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _remove_empty(folders):
    for f in reversed(list(folders)):
        with contextlib.suppress(OSError):
            os.rmdir(f)  # only when empty


def release_lock(path):
    """Give back the lock `path` (a stage that writes inside a longer run)."""
    fd, made = _PROCESS["locks"].pop(path, (None, ()))
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)  # while still held: a waiting run then locks a fresh file
    with contextlib.suppress(OSError):
        os.close(fd)
    _remove_empty(made)


def _end():
    for path in list(_PROCESS["locks"]):
        release_lock(path)
    for s, handler in _PROCESS["handlers"].items():
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(s, handler)
    _PROCESS["handlers"].clear()


def on_stop(message):
    """message(signal name) -> the one line a run stopped by a signal ends with (what it saved)."""
    _PROCESS["stop_message"] = message


def notice(message):
    """One line `notice: ...` in the run's log (stdout and its file), or on stderr before it;
    once a run (the checks of several files find the same)."""
    from utils import log_line
    if message not in _PROCESS["said"]:
        _PROCESS["said"].add(message)
        log_line(f"notice: {message}")


def _say(line):
    """The last line of a run, on stderr and in its log; a closed terminal (SIGHUP) is no error."""
    from utils import log_to_file
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)
    log_to_file(line)


def main(fn):
    """Decorate a script's main(): stop signals become a clean stop (Stopped) that ends in one
    line and exit status 128 + the signal; a UserError ends in one line `error: ...` and exit
    status 2; the lock is released and the handlers given back however it ends."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _end()  # a previous run in this process (tests call main() several times)
        _PROCESS.update(writing=0, pending=None, stop_message=None, said=set())
        with contextlib.suppress(ValueError):  # not the main thread: leave the signals alone
            _PROCESS["handlers"] = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if os.environ.get("RANK", "0") == "0":
                _say(f"error: {e}")
            code = 2
        except (Stopped, KeyboardInterrupt) as e:
            signum = getattr(e, "signum", signal.SIGINT)
            name = signal.Signals(signum).name
            if os.environ.get("RANK", "0") == "0":
                message = _PROCESS["stop_message"]
                _say(message(name) if message else f"stopped by {name}")
            code = 128 + signum
        finally:
            _end()
        if distributed():
            os._exit(code)  # the other ranks may be waiting in a collective
        sys.exit(code)
    return wrapper

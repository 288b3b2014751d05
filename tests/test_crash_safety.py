"""Signals, kills and faults of real processes (docs/DESIGN.md#run-safety), all slow: SIGINT,
SIGTERM and SIGHUP during a checkpoint write, during training, and to the process group of a
reranker with DataLoader workers, end the run in one line (exit status 128 + the signal) with
whole files and no temporary file or lock, and the next run resumes; a run killed with SIGKILL
leaves whole files, and its lock and temporary files are cleared by the next run, which resumes
to the results of an uninterrupted run; save_candidates.py killed half-way over another run's
candidates leaves a folder the reranker refuses; a full disk, a file size limit or a read-only
folder is one line naming the file; a refusal of a real process is one line on its stderr."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import (BASE, DATA_FLAG, ROOT, SCRIPT_ENV, SCRIPTS, assert_refused, flags_argv,
                      leftovers, log_says, read_json, run_in_process, run_script, start_script,
                      table_argv, tree, wait_for)

pytestmark = pytest.mark.slow

ENV = {**os.environ, **SCRIPT_ENV}
# Two epochs of 18 batches, a loss line every 5 steps: "epoch 2 step" in the log means that
# epoch 1 is saved and epoch 2 is training.
LONG = {"--epochs": 2, "--B": 24, "--logging_steps": 5, "--lr": 1e-3}


def stderr_lines(text):
    return [line for line in text.splitlines() if line.strip()]


def run_with_fault(script, argv, signum, nth, cwd=ROOT):
    """Run `script` in a real process whose `nth` os.fsync (the end of its nth file written:
    each file is followed by its folder's record) first sends the process `signum`."""
    code = (f"import os, sys; sys.argv = [{script!r}] + {list(argv)!r}; sys.path.insert(0, "
            f"{ROOT!r}); real = os.fsync; calls = [0]\n"
            f"def fsync(fd):\n"
            f"    calls[0] += 1\n"
            f"    if calls[0] == {nth}: os.kill(os.getpid(), {int(signum)})\n"
            f"    return real(fd)\n"
            f"os.fsync = fsync\n"
            f"import runpy; runpy.run_path({os.path.join(ROOT, script)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=600)


# The writes of the end of an epoch, in order (each followed by the record of its folder):
# <model> (fsync 1), <model>.last (3), <model>.results.json (5)
SIGNAL_IN_A_WRITE = [
    pytest.param(signal.SIGHUP, 1, id="SIGHUP-in-the-best-checkpoint"),
    pytest.param(signal.SIGINT, 3, id="SIGINT-in-the-training-state"),
    pytest.param(signal.SIGTERM, 5, id="SIGTERM-in-the-results"),
]


@pytest.mark.parametrize("signum,nth", SIGNAL_IN_A_WRITE)
def test_a_signal_during_a_checkpoint_write(paths, tmp_path, capfd, signum, nth):
    """The signal waits for the epoch's files: all whole and recorded, one line saying where the
    state is, exit status 128 + the signal, no temporary file or lock; --resume_training then
    continues to the end."""
    model = str(tmp_path / "m.pt")
    argv = flags_argv({**BASE["R"], **LONG, "--model": model}, {**paths, "out": str(tmp_path)})
    r = run_with_fault(SCRIPTS["R"], argv, signum, nth)
    assert r.returncode == 128 + signum, r.stderr[-3000:]
    assert stderr_lines(r.stderr) == [
        f"stopped by {signal.Signals(signum).name} after epoch 1; continue with "
        f"--resume_training (the state of epoch 1 is in {model}.last)"], r.stderr
    assert torch.load(model, weights_only=True)["epoch"] == 1
    assert torch.load(model + ".last", weights_only=True)["epoch"] == 1
    assert [e["epoch"] for e in read_json(model + ".results.json")["val"]] == [1]
    assert not leftovers(str(tmp_path)), leftovers(str(tmp_path))

    code, lines, _ = run_in_process(SCRIPTS["R"], argv + ["--resume_training"], capfd)
    assert code == 0, lines
    results = read_json(model + ".results.json")
    assert [e["epoch"] for e in results["val"]] == [1, 2] and results["test"] is not None
    assert not leftovers(str(tmp_path))


def test_a_signal_during_a_candidates_write(paths, retriever, tmp_path, capfd):
    """SIGTERM while save_candidates.py writes the train candidates: the file is written whole
    and recorded, the line says which files are written and that the folder is incomplete; the
    reranker refuses the folder until save_candidates.py runs again. SIGINT in the last file
    (recall.json, fsync 7): the line says the folder is whole."""
    cands = str(tmp_path / "cands")
    root = {**paths, "out": str(tmp_path), "ckpt": retriever}
    argv = flags_argv({**BASE["S"], "--num_cands": 4}, root)
    r = run_with_fault(SCRIPTS["S"], argv + ["--cands_dir", f"{tmp_path}/whole"], signal.SIGINT,
                       7)
    assert r.returncode == 128 + signal.SIGINT, r.stderr[-3000:]
    assert stderr_lines(r.stderr) == [f"stopped by SIGINT with the candidates in {tmp_path}/whole "
                                      f"written whole"], r.stderr
    assert "recall.json" in os.listdir(tmp_path / "whole")
    r = run_with_fault(SCRIPTS["S"], argv, signal.SIGTERM, 1)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    assert stderr_lines(r.stderr) == [
        f"stopped by SIGTERM with the candidates in {cands} incomplete (train written): run "
        f"save_candidates.py again"], r.stderr
    assert sorted(n for n in os.listdir(cands) if ".log" not in n) == [
        ".hard-nce-el.record", "candidates_train.json"]
    reranker = table_argv("K", {"--model": "{out}/rr.pt", "--cands_dir": cands, "--epochs": 0},
                          root)
    code, lines, _ = run_in_process(SCRIPTS["K"], reranker, capfd)
    assert_refused(code, lines, [f"{cands}/candidates_val.json"])
    code, lines, _ = run_in_process(SCRIPTS["S"], argv, capfd)
    assert code == 0, lines
    code, lines, _ = run_in_process(SCRIPTS["K"], reranker, capfd)
    assert code == 0, lines


def test_sighup_with_the_terminal_gone(paths, tmp_path):
    """An ssh disconnect: SIGHUP with stderr closed. The run still stops cleanly (whole files, no
    temporary file or lock, exit status 129), and its log ends with the line it could not
    print."""
    model = str(tmp_path / "m.pt")
    argv = flags_argv({**BASE["R"], **LONG, "--model": model}, {**paths, "out": str(tmp_path)})
    proc = start_script(SCRIPTS["R"], *argv)
    try:
        wait_for(proc, log_says(model, "epoch 2 step"), "epoch 2 training")
        proc.stderr.close()  # the terminal is gone
        proc.send_signal(signal.SIGHUP)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGHUP
    with open(model + ".log") as f:
        assert f.read().splitlines()[-1].endswith(
            f"stopped by SIGHUP after epoch 1; continue with --resume_training (the state of "
            f"epoch 1 is in {model}.last)")
    assert not leftovers(str(tmp_path)), leftovers(str(tmp_path))
    assert torch.load(model + ".last", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("script,sig", [pytest.param("R", signal.SIGTERM, id="R-SIGTERM"),
                                        pytest.param("K", signal.SIGINT, id="K-SIGINT")])
def test_a_signal_in_training_stops_cleanly_and_resume_continues(paths, tmp_path, capfd, script,
                                                                 sig):
    """A signal in epoch 2: one line, the state of epoch 1 intact; meanwhile a second run on the
    same --model stops at the lock, naming it and its holder."""
    model = str(tmp_path / "m.pt")
    argv = flags_argv({**BASE[script], **LONG, "--model": model}, {**paths, "out": str(tmp_path)})
    proc = start_script(SCRIPTS[script], *argv)
    try:
        wait_for(proc, log_says(model, "epoch 2 step"), "epoch 2 training")
        code, lines, stdout = run_in_process(SCRIPTS[script], argv, capfd)
        assert_refused(code, lines, [f"{model}.lock", f"pid {proc.pid}"], stdout=stdout)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, err
    assert stderr_lines(err) == [f"stopped by {name} after epoch 1; continue with "
                                 f"--resume_training (the state of epoch 1 is in {model}.last)"]
    assert not leftovers(str(tmp_path)), leftovers(str(tmp_path))
    assert torch.load(model + ".last", weights_only=True)["epoch"] == 1
    assert [e["epoch"] for e in read_json(model + ".results.json")["val"]] == [1]

    r = run_script(SCRIPTS[script], *argv, "--resume_training")
    assert r.returncode == 0, r.stderr[-3000:]
    results = read_json(model + ".results.json")
    assert [e["epoch"] for e in results["val"]] == [1, 2] and results["test"] is not None
    assert not leftovers(str(tmp_path))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_of_a_reranker_with_workers(paths, tmp_path, sig):
    """Ctrl-C (SIGINT to the terminal's process group) or a scheduler's SIGTERM to the group of
    the README's reranker line (--num_workers 2): its DataLoader workers leave the stop to the
    main process, which ends in one line, no worker's traceback."""
    model = str(tmp_path / "m.pt")
    argv = flags_argv({**BASE["K"], **LONG, "--model": model, "--num_workers": 2},
                      {**paths, "out": str(tmp_path)})
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, SCRIPTS["K"]), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=ROOT, start_new_session=True)
    try:
        wait_for(proc, log_says(model, "epoch 1 step 5"), "epoch 1 training")
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, err
    assert stderr_lines(err) == [f"stopped by {signal.Signals(sig).name} before the first epoch "
                                 f"ended; nothing was saved"], err
    assert not leftovers(str(tmp_path)) and not os.path.exists(model + ".last")


def test_a_killed_runs_lock_and_temporary_file_are_cleared_by_the_next_run(paths, tmp_path,
                                                                           capfd):
    """SIGKILL in the middle of the results file of epoch 1: its temporary file and the lock
    stay, the checkpoint and state are whole; --resume_training clears both and continues."""
    model = str(tmp_path / "m.pt")
    argv = flags_argv({**BASE["R"], **LONG, "--model": model}, {**paths, "out": str(tmp_path)})
    r = run_with_fault(SCRIPTS["R"], argv, signal.SIGKILL, 5)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    left = sorted(os.path.basename(p) for p in leftovers(str(tmp_path)))
    assert len(left) == 2 and left[0].startswith(".m.pt.results.json.") and left[1] == "m.pt.lock"
    assert torch.load(model + ".last", weights_only=True)["epoch"] == 1

    code, lines, _ = run_in_process(SCRIPTS["R"], argv + ["--resume_training"], capfd)
    assert code == 0, lines
    assert not leftovers(str(tmp_path)), leftovers(str(tmp_path))
    assert [e["epoch"] for e in read_json(model + ".results.json")["val"]] == [1, 2]


# Tiny runs of two epochs of 54 batches; a loss line every 10 steps tells when epoch 2 trains.
RUNS = {
    "retriever": ("main_retriever.py", [
        "--data_dir", "{data}", "--pretrained", "{bert}", "--max_len", 16, "--k", 8,
        "--num_cands", 4, "--type_cands", "mixed_negative", "--cands_ratio", 0.5,
        "--type_model", "sum_max", "--num_mention_vecs", 4, "--num_entity_vecs", 4, "--B", 8,
        "--lr", 1e-3, "--epochs", 2, "--logging_steps", 10, "--quiet"]),
    "reranker": ("main_reranker.py", [
        "--data", "{data}", "--cands_dir", "{cands}", "--pretrained", "{bert}", "--C", 4,
        "--C_eval", 4, "--L", 32, "--B", 8, "--lr", 1e-3, "--epochs", 2, "--logging_steps", 10,
        "--inputmark", "--quiet"]),
}


def run_argv(which, model, paths):
    return ["--model", model, *(str(f).format(**paths) for f in RUNS[which][1])]


@pytest.mark.parametrize("which", ["retriever", "reranker"])
def test_a_killed_run_resumes_to_the_uninterrupted_results(paths, tmp_path, which):
    """SIGKILL in the middle of epoch 2 leaves only whole files (checkpoints load, results
    parse, no temporary file); --resume_training then ends with the results, losses and weights
    of an uninterrupted run with the same seed."""
    whole, cut = str(tmp_path / "whole" / "m.pt"), str(tmp_path / "cut" / "m.pt")
    os.makedirs(os.path.dirname(whole))
    os.makedirs(os.path.dirname(cut))
    script = RUNS[which][0]
    reference = start_script(script, *run_argv(which, whole, paths))  # uninterrupted, alongside
    proc = start_script(script, *run_argv(which, cut, paths))
    try:
        wait_for(proc, lambda: os.path.exists(cut + ".last") and log_says(cut, "epoch 2 step")(),
                 "epoch 2 training", timeout=240)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
        folder = os.path.dirname(cut)
        assert not [n for n in os.listdir(folder) if n.endswith(".tmp")], os.listdir(folder)
        assert torch.load(cut + ".last", weights_only=True)["epoch"] == 1
        assert torch.load(cut, weights_only=True)["epoch"] == 1
        halfway = read_json(cut + ".results.json")
        assert [e["epoch"] for e in halfway["val"]] == [1] and halfway["test"] is None

        out = run_script(script, *run_argv(which, cut, paths), "--resume_training")
        assert out.returncode == 0, out.stderr[-3000:]
    finally:
        if proc.poll() is None:  # the test failed before the kill
            proc.kill()
        _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    assert read_json(cut + ".results.json") == read_json(whole + ".results.json")
    a, b = (torch.load(p + ".last", weights_only=True) for p in (cut, whole))
    assert a["step"] == b["step"] and a["losses"] == b["losses"] and len(a["losses"]) >= 10
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert not leftovers(str(tmp_path))


def test_save_candidates_killed_over_another_runs_candidates(paths, retriever, tmp_path,
                                                             capfd):
    """save_candidates.py --overwrite with another checkpoint, killed once it has replaced the
    train candidates: the reranker refuses the folder (files of two runs) in one line; the same
    command again completes it (clearing the killed run's leftovers), and the reranker takes
    it."""
    root = {**paths, "out": str(tmp_path)}
    # b.pt: untrained as `retriever` (seed 42), the seed alone differs
    code, lines, _ = run_in_process(SCRIPTS["R"], flags_argv(
        {**BASE["R"], "--model": f"{tmp_path}/b.pt", "--epochs": 0, "--seed": 43}, root), capfd)
    assert code == 0, lines
    cands = str(tmp_path / "cands")
    code, lines, _ = run_in_process(SCRIPTS["S"], flags_argv(
        {**BASE["S"], "--model": retriever, "--num_cands": 4}, root), capfd)
    assert code == 0, lines
    argv = flags_argv({**BASE["S"], "--model": f"{tmp_path}/b.pt", "--num_cands": 4,
                       "--overwrite": True}, root)
    r = run_with_fault(SCRIPTS["S"], argv, signal.SIGKILL, 3)  # in the val file
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert len(leftovers(cands)) == 2, leftovers(cands)  # a temporary file and the lock
    reranker = table_argv("K", {"--model": "{out}/rr.pt", "--cands_dir": cands, "--epochs": 0},
                          root)
    before = tree(str(tmp_path))
    code, lines, stdout = run_in_process(SCRIPTS["K"], reranker, capfd)
    assert_refused(code, lines, ["different runs of save_candidates.py", cands],
                   [str(tmp_path)], [before], stdout)

    code, lines, _ = run_in_process(SCRIPTS["S"], argv, capfd)
    assert code == 0, lines
    assert not leftovers(cands)
    code, lines, _ = run_in_process(SCRIPTS["K"], reranker, capfd)
    assert code == 0, lines


@pytest.fixture(scope="module")
def retriever(paths, tmp_path_factory):
    """An untrained retriever's checkpoint (--epochs 0)."""
    model = str(tmp_path_factory.mktemp("ret") / "m.pt")
    r = run_script(SCRIPTS["R"], *flags_argv({**BASE["R"], "--model": model, "--epochs": 0},
                                             paths))
    assert r.returncode == 0, r.stderr[-3000:]
    return model


@pytest.mark.parametrize("script", "RSK")
def test_a_refusal_in_a_real_process(paths, retriever, tmp_path, script):
    """A real process's refusal: exit status 2, one line on stderr (no warning printed at import,
    no traceback), nothing written."""
    bad = tmp_path / "bad"
    shutil.copytree(paths["data"], bad)
    test = bad / "mentions" / "test.json"
    lines = test.read_text().splitlines(keepends=True)
    test.write_text("".join(lines[:2] + [lines[2][:-6] + "\n"] + lines[3:]))  # cut in a string
    out = tmp_path / "out"
    root = {**paths, "out": str(out), "ckpt": retriever}
    r = run_script(SCRIPTS[script], *flags_argv({**BASE[script], DATA_FLAG[script]: str(bad)},
                                                root))
    lines = stderr_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {test}:3: malformed JSON"), lines
    assert not out.exists()
    assert not leftovers(os.path.dirname(retriever))


# ----------------------------------------------------------------------------------------------
# Faults of the file system: one line naming the file and the cause

@contextlib.contextmanager
def small_disk(path, size="300k", readonly=False, files=()):
    """A tmpfs of `size` at `path` holding copies of `files` (root only: skipped elsewhere),
    read-only when asked."""
    os.makedirs(path, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        for f in files:
            shutil.copy(f, path)
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", path], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


def file_size_limit(limit):
    def preexec():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


OUTPUT_FAULTS = [  # (id, script, size of the disk at {out} ("": none; "ro": read-only), words)
    ("disk-full", "R", "300k", ["error: cannot write {out}/m.pt: No space left on device",
                                "needed about", "MB free"]),
    ("file-size-limit", "R", "", ["error: cannot write {out}/m.pt: File too large",
                                  "needed about"]),
    ("read-only-folder", "R", "ro", ["error: --model: cannot write {out}/m.pt", "not writable"]),
    ("candidates-disk-full", "S", "64k", ["error: cannot write {out}/cands/candidates_",
                                          "No space left on device", "MB free"]),
    ("candidates-checkpoint-read-only", "S", "ro-ckpt", None),
]


@pytest.mark.parametrize("case,script,disk,words", OUTPUT_FAULTS, ids=[f[0] for f in OUTPUT_FAULTS])
def test_an_output_fault_is_one_line_naming_the_file(paths, retriever, tmp_path, case, script,
                                                     disk, words):
    """A full disk, a file size limit, a read-only folder: one line naming the file and the
    cause (with the size needed where it is about space), status 2, no temporary file, nothing
    half-written; a checkpoint in a read-only folder is read, its folder left alone."""
    out = str(tmp_path / "disk")
    root = {**paths, "out": out, "ckpt": retriever}
    argv = flags_argv({**BASE[script], **({"--epochs": 0} if script == "R" else {})}, root)
    preexec = None
    with contextlib.ExitStack() as stack:
        if disk == "":
            os.makedirs(out)
            preexec = file_size_limit(200_000)
        elif disk == "ro-ckpt":  # the checkpoint on a read-only disk, the candidates elsewhere
            ro = str(tmp_path / "ro")
            stack.enter_context(small_disk(ro, "20m", readonly=True, files=[retriever]))
            argv = flags_argv({**BASE[script], "--model": f"{ro}/m.pt"}, root)
        else:
            stack.enter_context(small_disk(out, disk if disk != "ro" else "1m",
                                           readonly=disk == "ro"))
        r = subprocess.run([sys.executable, os.path.join(ROOT, SCRIPTS[script]), *argv],
                           capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300,
                           preexec_fn=preexec)
        lines = stderr_lines(r.stderr)
        if words is None:
            assert r.returncode == 0, r.stderr[-3000:]
            assert os.listdir(ro) == ["m.pt"]
            return
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
        for word in words:
            assert word.format(**root) in lines[0], lines[0]
        left = [os.path.join(d, n) for d, _, ns in os.walk(out) for n in ns]
        assert not leftovers(out), left
        for name in left:  # what is there is whole
            if name.endswith((".pt", ".last")):
                torch.load(name, weights_only=True)
            elif name.endswith((".json", ".record")):
                with open(name) as f:
                    text = f.read()
                try:
                    json.loads(text)
                except ValueError:
                    [json.loads(x) for x in text.splitlines()]

"""Run safety with real processes and signals: SIGTERM and SIGINT end a run like a clean stop
(one line, exit status 128 + the signal, no temporary file, the last complete state intact, the
lock given back) and --resume_training continues it; a second run on the same --model stops at
the lock; save_candidates.py killed between its files leaves a folder the reranker refuses; a
non-finite loss stops the run with nothing of the epoch saved."""
import json
import os
import signal

import pytest
import torch

import run_safety
import training
import utils
from conftest import (BASE, SCRIPTS, flags_argv, log_says, run_in_process, run_script,
                      start_script, wait_for)

# Two epochs of 18 batches, a loss line every 5 steps: "epoch 2 step" in the log means that
# epoch 1 is saved and epoch 2 is training.
LONG = {"--epochs": 2, "--B": 24, "--logging_steps": 5, "--lr": 1e-3}


def leftovers(folder):
    return [os.path.join(d, n) for d, _, ns in os.walk(folder) for n in ns
            if n.endswith((".tmp", ".lock"))]


@pytest.mark.slow
@pytest.mark.parametrize("script,sig", [("R", signal.SIGTERM), ("K", signal.SIGINT)])
def test_signal_stops_cleanly_and_resume_continues(paths, tmp_path, capfd, script, sig):
    model = str(tmp_path / "m.pt")
    argv = flags_argv({**BASE[script], **LONG, "--model": model}, {**paths, "out": str(tmp_path)})
    proc = start_script(SCRIPTS[script], *argv)
    try:
        wait_for(proc, log_says(model, "epoch 2 step"), "epoch 2 training")

        # Meanwhile a second run on the same --model stops at the lock, naming it and the holder.
        code, lines, _ = run_in_process(SCRIPTS[script], argv, capfd)
        assert code == 2 and len(lines) == 1, lines
        assert f"{model}.lock" in lines[0] and f"pid {proc.pid}" in lines[0], lines[0]

        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    name = signal.Signals(sig).name
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 128 + sig, err
    assert lines == [f"stopped by {name} after epoch 1; continue with --resume_training (the "
                     f"state of epoch 1 is in {model}.last)"], err
    assert not leftovers(str(tmp_path)), leftovers(str(tmp_path))
    assert torch.load(model + ".last", weights_only=True)["epoch"] == 1
    with open(model + ".results.json") as f:
        assert [e["epoch"] for e in json.load(f)["val"]] == [1]

    r = run_script(SCRIPTS[script], *argv, "--resume_training")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(model + ".results.json") as f:
        results = json.load(f)
    assert [e["epoch"] for e in results["val"]] == [1, 2] and results["test"] is not None
    assert not leftovers(str(tmp_path))


@pytest.mark.slow
def test_killed_save_candidates_leaves_a_folder_the_reranker_refuses(paths, tmp_path, capfd):
    """SIGKILL after the folder is marked incomplete: the reranker stops naming the manifest; the
    same command again completes the folder, and the reranker takes it."""
    root = {**paths, "out": str(tmp_path)}
    model = str(tmp_path / "ret.pt")
    r = run_script("main_retriever.py", *flags_argv({**BASE["R"], "--model": model,
                                                     "--epochs": 0}, root))  # untrained
    assert r.returncode == 0, r.stderr[-3000:]
    cands = tmp_path / "cands"
    argv = flags_argv({**BASE["S"], "--model": model, "--num_cands": 4}, root)
    r = run_script("save_candidates.py", *argv)
    assert r.returncode == 0, r.stderr[-3000:]

    def incomplete():
        try:
            with open(cands / "manifest.json") as f:
                return json.load(f)["complete"] is False
        except (OSError, ValueError):
            return False
    proc = start_script(SCRIPTS["S"], *argv)  # the same command again: it rewrites the folder
    try:
        wait_for(proc, incomplete, "the manifest marked incomplete")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    reranker = flags_argv({**BASE["K"], "--model": "{out}/rr.pt", "--cands_dir": str(cands),
                           "--epochs": 0}, root)
    code, lines, _ = run_in_process(SCRIPTS["K"], reranker, capfd)
    assert code == 2 and len(lines) == 1, lines
    assert f"{cands}/manifest.json" in lines[0] and "did not finish" in lines[0], lines[0]

    r = run_script("save_candidates.py", *argv)
    assert r.returncode == 0, r.stderr[-3000:]
    code, lines, _ = run_in_process(SCRIPTS["K"], reranker, capfd)
    assert code == 0, lines


def test_save_candidates_stops_at_the_lock_of_its_folder(paths, tmp_path, capfd):
    cands = tmp_path / "cands"
    lock = str(cands / "candidates.lock")
    fd = run_safety.take_lock(lock, "--cands_dir")  # another run holds the folder
    try:
        r = run_script("save_candidates.py", "--model", str(tmp_path / "any.pt"), "--data_dir",
                       paths["data"], "--cands_dir", str(cands))
    finally:
        run_safety.release_lock(lock, fd)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lock in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert not os.path.exists(lock)


def test_a_signal_while_writing_waits_for_the_end_of_the_write(tmp_path, monkeypatch):
    """SIGTERM half-way through utils.write_jsonl: the write ends (the new file whole, no
    temporary file), then Stopped is raised."""
    path = str(tmp_path / "candidates_val.json")
    utils.write_jsonl([{"mention_id": "a", "candidates": ["x"]}], path)
    monkeypatch.setitem(run_safety._RUN, "pid", os.getpid())
    previous = signal.signal(signal.SIGTERM, run_safety._on_signal)
    try:
        def rows():
            for i in range(1000):
                if i == 500:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield {"mention_id": str(i), "candidates": ["y"] * 10}
        with pytest.raises(run_safety.Stopped) as e:
            utils.write_jsonl(rows(), path)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert e.value.name == "SIGTERM"
    with open(path) as f:
        assert len(f.readlines()) == 1000
    assert os.listdir(tmp_path) == ["candidates_val.json"]


def test_loss_check_stops_at_the_first_non_finite_loss_naming_the_step_and_flags():
    class Args:
        lr, fp16, clip = 2e5, True, 0.0
    check = training.LossCheck(Args)
    check.watch(torch.tensor(1.5), 1, 0)
    check.watch(torch.tensor(float("nan")), 1, 1)  # checked at the next watch, or flush
    with pytest.raises(utils.UserError) as e:
        check.flush()
    message = str(e.value)
    assert message.startswith("epoch 1 step 1: the training loss is nan")
    for flag in ("--lr 200000.0", "--fp16", "--clip 0"):
        assert flag in message, message
    check.flush()  # nothing pending


@pytest.mark.parametrize("script", ["R", "K"])
def test_a_diverging_run_stops_with_nothing_saved(paths, tmp_path, capfd, script):
    """--lr 2e5 makes the loss non-finite within the first epoch: exit 2, one line naming the
    epoch, the step and --lr, and no checkpoint, state or results."""
    root = {**paths, "out": str(tmp_path)}
    argv = flags_argv({**BASE[script], "--lr": 2e5, "--epochs": 2}, root)
    code, lines, _ = run_in_process(SCRIPTS[script], argv, capfd)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: epoch 1 step ") and "--lr 200000.0" in lines[0], lines
    assert sorted(n for n in os.listdir(tmp_path) if ".log" not in n) == []


@pytest.mark.slow
def test_a_loss_gone_non_finite_after_a_saved_epoch_leaves_it_intact(paths, tmp_path, capfd):
    """Resuming a state whose weights hold an inf (as a diverging epoch 2 would): the run stops
    in epoch 2 and the checkpoint, state and results of epoch 1 are those on disk before."""
    root = {**paths, "out": str(tmp_path)}
    model = str(tmp_path / "m.pt")
    r = run_script("main_retriever.py", *flags_argv({**BASE["R"], "--B": 24}, root))  # 1 epoch
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(model + ".last", weights_only=True)
    name = next(k for k in state["model"] if k.endswith("LayerNorm.weight"))
    state["model"][name][0] = float("inf")
    state["args"]["epochs"] = 2  # as if it were the first of two epochs
    torch.save(state, model + ".last")
    argv = flags_argv({**BASE["R"], "--B": 24, "--epochs": 2}, root)
    before = {p: open(p, "rb").read() for p in (model, model + ".last", model + ".results.json")}
    code, lines, _ = run_in_process(SCRIPTS["R"], argv + ["--resume_training"], capfd)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: epoch 2 step "), lines
    assert {p: open(p, "rb").read() for p in before} == before
    assert not leftovers(str(tmp_path))

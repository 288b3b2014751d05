"""Crash safety (docs/DESIGN.md#run-safety): a run killed with SIGKILL in the middle of training
leaves only whole files (checkpoints load, results parse, no temporary file) and, restarted with
--resume_training, ends with the same results as an uninterrupted run with the same seed; for the
retriever and the reranker. And the writers behind every output file (utils.write_json,
write_jsonl, save_checkpoint) never show a partial file, even when the writing fails half-way."""
import os
import signal

import pytest
import torch

from conftest import ROOT, log_says, read_json, run_script, start_script, wait_for

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


def argv(which, model, paths):
    return ["--model", model, *(str(f).format(**paths) for f in RUNS[which][1])]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["retriever", "reranker"])
def test_killed_run_resumes_to_the_uninterrupted_results(paths, tmp_path, which):
    whole, cut = str(tmp_path / "whole" / "m.pt"), str(tmp_path / "cut" / "m.pt")
    os.makedirs(os.path.dirname(whole))
    os.makedirs(os.path.dirname(cut))
    script = RUNS[which][0]
    reference = start_script(script, *argv(which, whole, paths))  # uninterrupted, alongside
    proc = start_script(script, *argv(which, cut, paths))
    try:
        # epoch 1's checkpoint saved, and a loss of epoch 2 in the log
        wait_for(proc, lambda: os.path.exists(cut + ".last") and log_says(cut, "epoch 2 step")(),
                 "epoch 2 training", timeout=240)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"

        # Only whole files: both checkpoints load, the results parse and stop after epoch 1.
        folder = os.path.dirname(cut)
        assert not [n for n in os.listdir(folder) if n.endswith(".tmp")], os.listdir(folder)
        last = torch.load(cut + ".last", weights_only=True)
        best = torch.load(cut, weights_only=True)
        assert last["epoch"] == 1 and best["epoch"] == 1
        halfway = read_json(cut + ".results.json")
        assert [e["epoch"] for e in halfway["val"]] == [1] and halfway["test"] is None

        out = run_script(script, *argv(which, cut, paths), "--resume_training")
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


class Boom(Exception):
    pass


class Unpicklable:
    def __reduce__(self):
        raise Boom("fails half-way through the checkpoint")


def test_writers_never_show_a_partial_file(tmp_path):
    """Each writer, failing half-way over an existing file, leaves the old file as it was (and no
    temporary file); while it writes, the path still holds the old file."""
    from utils import load_checkpoint, save_checkpoint, write_json, write_jsonl
    jsonl, js, ckpt = (str(tmp_path / n) for n in ("cands.json", "results.json", "m.pt"))
    write_jsonl([{"mention_id": "a", "candidates": ["x"]}], jsonl)
    write_json({"val": [1]}, js)
    save_checkpoint({"epoch": 1, "model": {"w": torch.ones(3)}}, ckpt)
    old = {p: open(p, "rb").read() for p in (jsonl, js, ckpt)}

    def rows():
        for i in range(1000):
            if i == 500:
                assert open(jsonl, "rb").read() == old[jsonl]  # mid-write: still the old file
                raise Boom("fails half-way through the candidates")
            yield {"mention_id": str(i), "candidates": ["y"] * 10}

    with pytest.raises(Boom):
        write_jsonl(rows(), jsonl)
    with pytest.raises(Boom):
        save_checkpoint({"epoch": 2, "model": {"w": torch.zeros(10 ** 5)}, "x": Unpicklable()},
                        ckpt)
    with pytest.raises(TypeError):
        write_json({"val": [2] * 1000, "bad": object()}, js)
    assert {p: open(p, "rb").read() for p in (jsonl, js, ckpt)} == old
    assert sorted(os.listdir(tmp_path)) == ["cands.json", "m.pt", "results.json"]
    assert load_checkpoint(ckpt)["epoch"] == 1


def test_scripts_write_only_through_the_atomic_writers():
    """No output is written past utils.atomic_open: no direct torch.save, json.dump, numpy save or
    open(..., "w"/"a") in the scripts and shared modules (logs go through logging)."""
    import re
    direct = re.compile(r"torch\.save\(|json\.dump\(|np\.save|\bopen\([^)]*[\"'][wax]b?\+?[\"']")
    for name in ("main_retriever.py", "save_candidates.py", "main_reranker.py", "retriever.py",
                 "reranker.py", "data_loader.py"):
        with open(os.path.join(ROOT, name)) as f:
            hits = [f"{name}:{i}: {line.strip()}" for i, line in enumerate(f, 1)
                    if direct.search(line)]
        assert not hits, hits

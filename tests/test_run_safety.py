"""Run safety (docs/DESIGN.md#run-safety), what must work: the runs a user's mistake must not be
confused with, and what they say (tests/test_errors.py: what is refused); what is read is what
is hashed (read once); every file a tool writes is recorded with the digest of what was written;
files appear whole or not at all, and a stop signal waits for the write; a killed run's lock and
temporary files are cleared by the next run; a loss gone non-finite stops the run with nothing
of the epoch saved. Every run is a script's main() in this process; real processes and signals
are tests/test_crash_safety.py's."""
import builtins
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import run_safety
import training
from cli import UserError
from conftest import (ROOT, TABLE_SCRIPTS, Text, assert_refused, leftovers, read_json,
                      run_in_process, run_table_row, table_argv, table_row as row, tree)
from run_safety import RECORD


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def world(safety_world, tmp_path_factory):
    """conftest.safety_world and a copy of the data whose val file begins with a byte order mark
    ({bom_data})."""
    p = dict(safety_world)
    p["bom_data"] = str(tmp_path_factory.mktemp("bom") / "data")
    shutil.copytree(p["data"], p["bom_data"])
    path = os.path.join(p["bom_data"], "mentions", "val.json")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write("\ufeff" + text)
    return p


# ----------------------------------------------------------------------------------------------
# Accepted, and said: each row must run (exit status 0) and its log hold each notice of `words`
# once; CHECKS[id](out, paths, stdout) then checks what it did.

RET_RUN, RR_RUN = {"": "{ret}"}, {"": "{rr}"}
SAVED = {"cands": "{saved_cands}"}
UNTRAINED = {"--epochs": 0}
UNCHECKED = "{cands}: candidates not written by this project's save_candidates.py: used unchecked"

ACCEPTED = [
    # a rerun of the same run: said, its files replaced; flags free to differ may differ
    row("R-rerun-of-the-same-run", "R", {}, ["this run starts it again"], RET_RUN),
    row("R-rerun-free-flags-differ", "R", {"--logging_steps": 5, "--quiet": False,
                                           "--mention_bsz": 64, "--entity_bsz": 32},
        ["this run starts it again"], RET_RUN),
    row("S-rerun-of-the-same-candidates", "S", {"--mention_bsz": 64},
        ["holds the candidates of this checkpoint and these flags already; writing them again"],
        SAVED),
    # compatibility flags never block a rerun
    row("R-rerun-with-compatibility-flags", "R", {"--num_workers": 2, "--eval_batchsize": 64,
                                                  "--num_hards": 3},
        ["--eval_batchsize, --num_hards, --num_workers accepted for the original's command line "
         "and ignored", "this run starts it again"], RET_RUN),
    row("S-rerun-with-a-compatibility-seed", "S", {"--seed": 5},
        ["--seed accepted for the original's command line and ignored", "writing them again"],
        SAVED),
    # inputs known by content: a byte-identical copy is the same input
    row("R-rerun-on-a-byte-identical-copy-of-the-data", "R", {"--data_dir": "{same_data}"},
        ["--data_dir is {same_data} now, {data} in the run recorded: the same content",
         "this run starts it again"], RET_RUN),
    row("S-rerun-on-a-byte-identical-copy-of-the-data", "S", {"--data_dir": "{same_data}"},
        ["--data_dir is {same_data} now, {data} in the run recorded: the same content",
         "writing them again"], SAVED),
    row("K-candidates-of-a-byte-identical-copy-of-the-data", "K",
        {"--data": "{same_data}", "--cands_dir": "{saved_cands}", **UNTRAINED}, []),
    # resuming: every weight comes from the state, so the pretrained file's weights may differ
    row("R-resume-with-other-weights-of-the-same-encoder", "R",
        {"--resume_training": True, "--pretrained": "{bert_weights}"},
        ["--pretrained is {bert_weights} now, {bert} in the run recorded: the same config, "
         "vocabulary; a resumed run takes every weight from its state"], RET_RUN),
    row("K-resume-the-run", "K", {"--resume_training": True}, [UNCHECKED], RR_RUN),
    # --fp32 names the default precision: the same run as none given
    row("R-resume-with---fp32-the-default", "R", {"--resume_training": True, "--fp32": True}, [],
        RET_RUN),
    row("S-rerun-with---fp32-the-default", "S", {"--fp32": True}, ["writing them again"], SAVED),
    # flags that the chosen mode ignores are said, never silently dropped
    row("R-simpleoptim-ignores-the-optimizer-flags", "R",
        {"--simpleoptim": True, "--optimizer": "torch", "--weight_decay": 0.1, **UNTRAINED},
        ["--optimizer torch has no effect: --simpleoptim is plain Adam at a constant rate",
         "--weight_decay 0.1 has no effect: --simpleoptim"]),
    row("K-simpleoptim-ignores-the-schedule", "K",
        {"--simpleoptim": True, "--warmup_proportion": 0.3, **UNTRAINED},
        ["--warmup_proportion 0.3 has no effect: --simpleoptim", UNCHECKED]),
    row("R-flags-the-mode-ignores", "R",
        {"--type_model": "dual", "--max_len": 7, "--type_cands": "hard_negative",
         "--cands_ratio": 0.5, "--num_mention_vecs": 16, **UNTRAINED},
        ["--cands_ratio 0.5 has no effect: only --type_cands mixed_negative",
         "--num_mention_vecs 16 has no effect: --type_model dual",
         "--num_entity_vecs 4 has no effect: --type_model dual"]),
    row("K-flags-the-mode-ignores", "K",
        {"--num_entity_vecs": 16, "--mention_use_codes": True, **UNTRAINED},
        ["--num_entity_vecs 16 has no effect", "--mention_use_codes True has no effect",
         UNCHECKED]),
    # an encoder checkpoint without pooler weights loads, without the pooler
    row("R-encoder-without-pooler-weights", "R", {"--pretrained": "{no_pooler}", **UNTRAINED},
        ["{no_pooler} has no pooler weights: the encoder is used without its pooler"]),
    row("K-encoder-without-pooler-weights", "K", {"--pretrained": "{no_pooler}", **UNTRAINED},
        ["{no_pooler} has no pooler weights", UNCHECKED]),
    # the weights of a pre-training checkpoint (under "bert.", with its head) all load
    row("R-encoder-of-a-pre-training-checkpoint", "R", {"--pretrained": "{pretraining}",
                                                        **UNTRAINED}, []),
    # candidates: save_candidates.py's checked against its record, others used with a notice
    row("K-candidates-of-save_candidates", "K", {"--cands_dir": "{saved_cands}", **UNTRAINED},
        []),
    row("K-candidates-of-unknown-origin", "K", UNTRAINED, [UNCHECKED]),
    # --overwrite replaces another run's files
    row("K-overwrite-a-retrievers-files", "K", {"--overwrite": True, **UNTRAINED}, [UNCHECKED],
        RET_RUN),
    row("S-overwrite-candidates-of-other-flags", "S", {"--overwrite": True, "--num_cands": 4},
        [], SAVED),
    # the encoder a checkpoint records as a relative path, from the folder holding it
    row("S-recorded-relative-path-same-encoder", "S",
        {"--model": "{stored}/relative.pt", "--num_cands": 4}, [], {"here/bert": "{bert}"},
        cwd="{out}/here"),
    # toy_world.py replaces what it wrote, and with --overwrite what anyone wrote; it leaves the
    # files it does not write
    row("toy-twice", "T", {}, [], {"": "{toyrun}"}),
    row("toy-overwrite-a-users-bert", "T", {"--overwrite": True}, [],
        {"bert/vocab.txt": Text("mine")}),
    row("toy-keeps-a-users-other-file", "T", {}, [], {"": "{toyrun}",
                                                     "data/notes.txt": Text("mine")}),
    # a GPU the machine lacks: the run goes on where it can
    pytest.param("R", {"--gpus": "0", **UNTRAINED}, {}, ["--gpus 0: no usable GPU on this "
                                                         "machine; running on the CPU"], None,
                 id="R-gpus-this-machine-lacks",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
    # a byte order mark (an editor's "UTF-8 with BOM") is read past
    row("D-byte-order-mark", "D", {"--data_dir": "{bom_data}"}, []),
]


def _logs(out, paths, stdout):
    names = sorted(n for n in os.listdir(os.path.join(out, "cands")) if ".log" in n)
    assert names == ["save_candidates.log", "save_candidates.log.1"], names  # none replaced


def _weights_from_the_state(out, paths, stdout):
    """Nothing was trained and nothing taken from the other weights: the best checkpoint is the
    one before, and test was ranked with it as before."""
    assert sha256(os.path.join(out, "m.pt")) == sha256(paths["ckpt"])
    assert (read_json(os.path.join(out, "m.pt.results.json"))["test"]
            == read_json(paths["ckpt"] + ".results.json")["test"])


def _read_once_digests(out, paths, stdout):
    """The reranker's checkpoint records, for each candidates file, the digest of the file."""
    inputs = torch.load(os.path.join(out, "m.pt"), weights_only=True)["inputs"]["cands_dir"]
    assert inputs == {s: sha256(os.path.join(paths["saved_cands"], f"candidates_{s}.json"))
                      for s in ("train", "val", "test")}


def _now_a_reranker(out, paths, stdout):
    assert torch.load(os.path.join(out, "m.pt"), weights_only=True)["script"] == "main_reranker"
    assert read_json(os.path.join(out, RECORD))["files"]["m.pt"]["tool"] == "main_reranker"


def _candidates_of_4(out, paths, stdout):
    with open(os.path.join(out, "cands", "candidates_val.json")) as f:
        assert {len(json.loads(line)["candidates"]) for line in f} == {4}


def _users_bert_replaced(out, paths, stdout):
    with open(os.path.join(out, "bert", "vocab.txt")) as f:
        assert f.read() != "mine"


def _users_file_kept(out, paths, stdout):
    with open(os.path.join(out, "data", "notes.txt")) as f:
        assert f.read() == "mine"


def _bom_read_past(out, paths, stdout):
    assert "all mentions check out" in stdout


def _no_smoothing_notice(out, paths, stdout):
    assert not [line for line in stdout.splitlines()  # at its default: nothing to say
                if "notice: " in line and "--smoothing_value" in line]


def _all_weights_loaded(out, paths, stdout):
    """The encoder's weights as loaded are the toy BERT's, every one."""
    def weights(path):
        return torch.load(path, weights_only=True)["inputs"]["pretrained"]["weights"]
    assert weights(os.path.join(out, "m.pt")) == weights(paths["ckpt"])


CHECKS = {"S-rerun-of-the-same-candidates": _logs,
          "R-encoder-of-a-pre-training-checkpoint": _all_weights_loaded,
          "R-resume-with-other-weights-of-the-same-encoder": _weights_from_the_state,
          "K-candidates-of-save_candidates": _read_once_digests,
          "K-overwrite-a-retrievers-files": _now_a_reranker,
          "S-overwrite-candidates-of-other-flags": _candidates_of_4,
          "toy-overwrite-a-users-bert": _users_bert_replaced,
          "toy-keeps-a-users-other-file": _users_file_kept,
          "D-byte-order-mark": _bom_read_past,
          "R-flags-the-mode-ignores": _no_smoothing_notice}


@pytest.mark.parametrize("script,flags,files,words,cwd", ACCEPTED)
def test_accepted(world, tmp_path, capfd, monkeypatch, request, script, flags, files, words,
                  cwd):
    paths, code, lines, stdout, _, _ = run_table_row(world, tmp_path, capfd, monkeypatch,
                                                     script, flags, files, cwd)
    out = paths["out"]
    assert code == 0, lines
    said = [line.split("notice: ", 1)[1] for line in stdout.splitlines() + lines
            if line.startswith("notice: ") or " notice: " in line]
    assert len(said) == len(set(said)), f"a notice said twice: {said}"
    for word in words:
        assert len([n for n in said if word.format(**paths) in n]) == 1, (word, said)
    assert len(said) == len(words), said  # nothing else to say
    check = CHECKS.get(request.node.callspec.id)
    if check:
        check(out, paths, stdout)
    assert not leftovers(out)


# ----------------------------------------------------------------------------------------------
# What is read is what is hashed; what is written is recorded

def test_the_reranker_reads_each_candidates_file_once(world, tmp_path, capfd, monkeypatch):
    """Each candidates file is opened once: the rows trained on are those hashed and checked
    against save_candidates.py's record. A file changed right after that read changes nothing:
    the run records the digest of what it read, not of what is there now."""
    opened, real_open = [], builtins.open
    cands = tmp_path / "cands"
    shutil.copytree(world["saved_cands"], cands)
    val = str(cands / "candidates_val.json")
    before = sha256(val)

    def counting_open(file, *args, **kwargs):
        if isinstance(file, str) and os.path.basename(file).startswith("candidates_"):
            opened.append(os.path.basename(file))
            if file == val and opened.count("candidates_val.json") == 1:
                f = real_open(file, *args, **kwargs)
                data = f.read()
                f.close()
                with real_open(file, "wb") as g:  # changed as soon as it was read
                    g.write(data.replace(b'"candidates"', b'"candidates" ', 1))
                return io.BytesIO(data)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    paths = {**world, "out": str(tmp_path)}
    code, lines, _ = run_in_process("main_reranker.py", table_argv(
        "K", {"--cands_dir": str(cands), **UNTRAINED}, paths), capfd)
    monkeypatch.setattr(builtins, "open", real_open)
    assert code == 0, lines
    assert sorted(opened) == ["candidates_test.json", "candidates_train.json",
                              "candidates_val.json"]
    recorded = torch.load(tmp_path / "m.pt", weights_only=True)["inputs"]["cands_dir"]
    assert recorded["val"] == before != sha256(val)


def test_every_file_a_tool_writes_is_recorded_with_its_digest(world):
    """In each folder the pipeline and toy_world.py wrote, every file but the logs is in the
    folder's record with the sha256 and size of its bytes, the tool and the run that wrote it;
    a training run's description holds its defining flags and its inputs by content."""
    for key in ("ret", "rr", "saved_cands", "toyrun"):
        for folder, _, names in os.walk(world[key]):
            files = sorted(n for n in names if ".log" not in n and n != RECORD)
            if not files:
                continue
            record = read_json(os.path.join(folder, RECORD))
            assert sorted(record["files"]) == files, folder
            for name in files:
                entry = record["files"][name]
                path = os.path.join(folder, name)
                assert (entry["sha256"], entry["bytes"]) == (sha256(path), os.path.getsize(path))
                assert record["runs"][entry["run"]]["tool"] == entry["tool"]
    record = read_json(os.path.join(world["ret"], RECORD))
    entry = record["files"]["m.pt"]
    run = record["runs"][entry["run"]]
    assert entry["tool"] == "main_retriever" and entry["role"] == "best"
    assert run["flags"]["k"] == 8 and "model" not in run["flags"] and "quiet" not in run["flags"]
    assert run["inputs"]["data_dir"]["path"] == os.path.abspath(world["data"])
    assert set(run["inputs"]["data_dir"]["content"]) == {"train", "val", "test"}
    assert set(run["inputs"]["pretrained"]["content"]) == {"config", "vocabulary", "weights"}
    state = torch.load(world["ckpt"], weights_only=True)
    assert state["inputs"] == {k: v["content"] for k, v in run["inputs"].items()}
    assert os.path.isabs(state["args"]["data_dir"]) and os.path.isabs(state["args"]["pretrained"])
    cands = read_json(os.path.join(world["saved_cands"], RECORD))
    made = cands["runs"][cands["files"]["candidates_val.json"]["run"]]
    assert made["inputs"]["model"]["content"] == {"sha256": sha256(world["ckpt"])}


# ----------------------------------------------------------------------------------------------
# Files whole or not at all; a stop signal waits for the write

class Boom(Exception):
    pass


def test_a_failed_write_leaves_the_old_file(tmp_path):
    """A write failing half-way (here in the middle of the rows) leaves the file as it was and
    no temporary file; while it writes, the path still holds the old file; what the record says
    is unchanged."""
    outputs = run_safety.Outputs("test", lock=str(tmp_path / "x.lock"))
    path = outputs.add(str(tmp_path / "cands.json"))
    outputs.start()
    outputs.claim({"tool": "test"})
    outputs.write_lines([{"a": 1}], path)
    old, record = open(path, "rb").read(), open(tmp_path / RECORD, "rb").read()

    def rows():
        for i in range(1000):
            if i == 500:
                assert open(path, "rb").read() == old  # mid-write: still the old file
                raise Boom("half-way")
            yield {"a": i}

    with pytest.raises(Boom):
        outputs.write_lines(rows(), path)
    with pytest.raises(TypeError):
        outputs.write_json({"bad": object()}, path)
    assert open(path, "rb").read() == old and open(tmp_path / RECORD, "rb").read() == record
    assert sorted(os.listdir(tmp_path)) == sorted([RECORD, "cands.json", "x.lock"])
    run_safety._end()
    assert sorted(os.listdir(tmp_path)) == sorted([RECORD, "cands.json"])  # the lock given back


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_waits_for_the_write_in_progress(tmp_path, signum):
    """A stop signal half-way through a write: the file is written whole and recorded, then the
    run stops (Stopped, named after the signal)."""
    outputs = run_safety.Outputs("test")
    path = outputs.add(str(tmp_path / "candidates_val.json"))
    outputs.start()
    outputs.claim({"tool": "test"})
    saved = {s: signal.getsignal(s) for s in run_safety.STOP_SIGNALS}
    signal.signal(signum, run_safety._on_signal)
    try:
        def rows():
            for i in range(1000):
                if i == 500:
                    os.kill(os.getpid(), signum)
                yield {"mention_id": str(i)}
        with pytest.raises(run_safety.Stopped) as e:
            outputs.write_lines(rows(), path)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert e.value.name == signal.Signals(signum).name
    with open(path) as f:
        assert len(f.readlines()) == 1000
    assert sorted(os.listdir(tmp_path)) == sorted([RECORD, "candidates_val.json"])
    assert run_safety.recorded(path) is not None


def test_a_data_loader_worker_leaves_the_stop_to_the_main_process():
    """In a worker (detach_worker, in a child process here): stop signals are ignored, and the
    broken connections of multiprocessing's resource sharer while the main process stops
    (EOFError, BrokenPipeError, ConnectionResetError, seen in tests/test_crash_safety.py's
    process-group test) print nothing; any other error reported there still prints."""
    code = ("import signal, sys, run_safety\n"
            "run_safety.detach_worker(0)\n"
            "assert all(signal.getsignal(s) == signal.SIG_IGN for s in run_safety.STOP_SIGNALS)\n"
            "for e in (EOFError(), BrokenPipeError(32, 'x'), ConnectionResetError(104, 'x'),\n"
            "          ValueError('other')):\n"
            "    sys.excepthook(type(e), e, None)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == ["ValueError: other"], r.stderr


def test_a_killed_runs_lock_and_temporary_files_are_cleared(world, tmp_path, capfd):
    """What a run killed with SIGKILL leaves (its lock, a half-written temporary file beside a
    checkpoint) is cleared by the next run, which takes the lock over and resumes; a lock held
    by a live run stops the next one, naming the holder."""
    out = tmp_path / "out"
    shutil.copytree(world["ret"], out)
    (out / "m.pt.lock").write_text("pid 999999 on elsewhere\n")  # no process holds it
    (out / ".m.pt.last.k1ll3d00.tmp").write_bytes(b"half a checkpoint")
    (out / "..hard-nce-el.record.k1ll3d00.tmp").write_bytes(b"half a record")
    paths = {**world, "out": str(out)}
    argv = table_argv("R", {"--resume_training": True}, paths)
    code, lines, _ = run_in_process("main_retriever.py", argv, capfd)
    assert code == 0, lines
    assert not leftovers(out), os.listdir(out)

    with held_lock(out / "m.pt.lock", b"pid 4242 on elsewhere\n"):  # a live run holds it
        before = tree(str(out))
        code, lines, stdout = run_in_process("main_retriever.py", argv, capfd)
        assert_refused(code, lines, ["--model", f"{out}/m.pt.lock", "pid 4242 on elsewhere",
                                     "another run is writing there"], [str(out)], [before],
                       stdout)
    cands = tmp_path / "cands"  # save_candidates.py: the lock of its folder
    shutil.copytree(world["saved_cands"], cands)
    with held_lock(cands / "candidates.lock", b"pid 4343 on elsewhere\n"):
        before = tree(str(cands))
        code, lines, stdout = run_in_process("save_candidates.py", table_argv(
            "S", {"--cands_dir": str(cands)}, paths), capfd)
        assert_refused(code, lines, ["--cands_dir", f"{cands}/candidates.lock", "pid 4343"],
                       [str(cands)], [before], stdout)


@contextlib.contextmanager
def held_lock(path, holder):
    """A live run's lock at `path`: held (flock), `holder` written in it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, holder)
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# A loss that is not finite stops the run, with nothing of the epoch saved

def test_the_loss_log_names_the_first_non_finite_loss_and_the_likely_flags():
    class Args:
        lr, fp16, clip = 2e5, True, 0.0
    losses = training.LossLog(torch.device("cpu"))
    losses.add(torch.tensor(1.5), 1)
    losses.add(torch.tensor(float("nan")), 2)
    losses.add(torch.tensor(float("inf")), 3)
    with pytest.raises(UserError) as e:
        losses.check(Args, 1)
    message = str(e.value)
    assert message.startswith("epoch 1 step 2: the training loss is nan")
    for flag in ("--lr 200000.0", "--fp16", "--clip 0"):
        assert flag in message, message


@pytest.mark.parametrize("script", ["R", "K"])
def test_a_diverging_run_stops_with_nothing_saved(world, tmp_path, capfd, script):
    """--lr 2e5 makes the loss non-finite within the first epoch: one line naming the epoch, the
    step and --lr, and no checkpoint, state or results (the log says why it stopped)."""
    paths = {**world, "out": str(tmp_path)}
    argv = table_argv(script, {"--lr": 2e5, "--epochs": 2}, paths)
    code, lines, _ = run_in_process(TABLE_SCRIPTS[script], argv, capfd)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: epoch 1 step ") and "--lr 200000.0" in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["m.pt.log"]
    with open(tmp_path / "m.pt.log") as f:
        assert f.read().rstrip().endswith(lines[0])


def test_a_loss_gone_non_finite_after_a_saved_epoch_leaves_it_intact(world, tmp_path, capfd):
    """Resuming a state whose weights hold an inf (as a diverging epoch 2 would): the run stops
    in epoch 2, and the checkpoint, state, results and record of epoch 1 are those on disk
    before."""
    out = tmp_path / "out"
    shutil.copytree(world["ret"], out)
    paths = {**world, "out": str(out)}
    model = str(out / "m.pt")
    state = torch.load(model + ".last", weights_only=True)
    name = next(k for k in state["model"] if k.endswith("LayerNorm.weight"))
    state["model"][name][0] = float("inf")
    state["args"]["epochs"] = 2  # as if it were the first of two epochs
    torch.save(state, model + ".last")
    argv = table_argv("R", {"--epochs": 2, "--resume_training": True, "--overwrite": True},
                      paths)
    before = {n: open(out / n, "rb").read() for n in os.listdir(out) if ".log" not in n}
    code, lines, _ = run_in_process("main_retriever.py", argv, capfd)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: epoch 2 step "), lines
    assert {n: open(out / n, "rb").read() for n in os.listdir(out) if ".log" not in n} == before

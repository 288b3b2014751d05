"""Faults and misuse, one table per class (docs/DESIGN.md#run-safety), each trying several members
through the scripts' command lines: a rerun over another run's inputs, paths stored in a
checkpoint, encoders that cannot serve, tools that would destroy files, signals and faults during
a write, a refused run that would still write, tracebacks, unclear words. Every refusal is one line
`error: ...` naming the flag or file, exit status 2, and leaves the files as they were."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import (BASE, ROOT, SCRIPT_ENV, SCRIPTS, flags_argv, run_in_process, snapshot,
                      write_candidates)

ENV = {**os.environ, **SCRIPT_ENV}
UNTRAINED = {"--epochs": 0}  # runs that save their files in seconds


def write_encoder(kind, bert, out):
    """A tiny randomly initialised encoder of family `kind` in `out`, with the toy BERT's
    word-level tokenizer files (its vocabulary is every word of the toy world)."""
    import transformers as t
    from utils import quiet_transformers
    quiet_transformers()
    os.makedirs(out, exist_ok=True)
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(bert, name), out)
    with open(os.path.join(bert, "vocab.txt")) as f:
        v = sum(1 for _ in f)
    layer = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config, model = {
        "distilbert": (t.DistilBertConfig(vocab_size=v, dim=32, hidden_dim=64, n_layers=1,
                                          n_heads=2, pad_token_id=0), t.DistilBertModel),
        "roberta": (t.RobertaConfig(vocab_size=v, hidden_size=32, pad_token_id=0,
                                    max_position_embeddings=520, **layer), t.RobertaModel),
        "bert": (t.BertConfig(vocab_size=v, hidden_size=32, **layer), t.BertModel),
        "bert_decoder": (t.BertConfig(vocab_size=v, hidden_size=32, is_decoder=True, **layer),
                         t.BertModel),
        "gpt2": (t.GPT2Config(vocab_size=v, n_embd=32, n_layer=1, n_head=2), t.GPT2Model),
        "t5": (t.T5Config(vocab_size=v, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16),
               t.T5Model),
    }[kind]
    torch.manual_seed(1)
    model(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(toy, tmp_path_factory):
    """The toy data and BERT; copies of the data (the same, and one with another mention); a
    BERT of other weights and one of another vocabulary; an untrained retriever's files and a
    reranker's (--epochs 0) to rerun over; candidates."""
    data, bert = toy
    root = tmp_path_factory.mktemp("faults")
    paths = {"data": data, "bert": bert, "root": str(root),
             "cands": write_candidates(data, str(root / "cands"), 4),
             "cands2": write_candidates(data, str(root / "cands2"), 4, seed=1)}
    shutil.copytree(data, root / "same_data")
    shutil.copytree(data, root / "other_data")
    path = root / "other_data" / "mentions" / "val.json"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[1:] + lines[:1]))  # the same mentions in another order
    paths.update(same_data=str(root / "same_data"), other_data=str(root / "other_data"))
    other_bert = write_encoder("bert", bert, str(root / "other_bert"))  # other weights
    other_vocab = str(root / "other_vocab")  # the same weights, another vocabulary
    shutil.copytree(bert, other_vocab)
    with open(os.path.join(other_vocab, "vocab.txt")) as f:
        words = f.read().splitlines()
    with open(os.path.join(other_vocab, "vocab.txt"), "w") as f:
        f.write("\n".join(words[:20] + words[21:] + words[20:21]) + "\n")  # two words moved
    paths.update(other_bert=other_bert, other_vocab=other_vocab)
    for script, name in (("R", "ret"), ("K", "rr")):
        folder = root / name
        code, lines, _ = run_in_process(SCRIPTS[script], flags_argv(
            {**BASE[script], **UNTRAINED, "--model": f"{folder}/m.pt"}, paths), _NoCapture())
        assert code == 0, lines
        paths[name] = str(folder)
    return paths


class _NoCapture:
    """run_in_process's capfd where the fixture has none (its output goes to the terminal)."""

    @staticmethod
    def readouterr():
        return "", ""


def copy_run(world, name, out):
    """The files of the fixture's run `name` (ret, rr) copied into `out`."""
    for f in os.listdir(world[name]):
        if f.startswith("m.pt") and not f.endswith((".log", ".lock")):
            shutil.copy(os.path.join(world[name], f), out / f)


def refused(capfd, script, argv, out, *words):
    """Run `script`: it must stop with one line holding `words` and leave `out` unchanged."""
    before = snapshot(out)
    code, lines, _ = run_in_process(SCRIPTS[script], argv, capfd)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    for word in words:
        assert word in lines[0], lines[0]
    assert snapshot(out) == before, "the refused run changed files"
    assert not [n for n in os.listdir(out) if n.endswith((".log", ".lock", ".tmp"))]
    return lines[0]


# ----------------------------------------------------------------------------------------------
# 1. A rerun (or a resumed run) over another run's files: decided by what the paths hold

RERUNS = [
    # (id, script, changed flags, extra flags of the saved run, words of the error; None: allowed)
    ("R-other-data", "R", {"--data_dir": "{other_data}"}, {}, ["--data_dir", "{other_data}"]),
    ("R-other-encoder-weights", "R", {"--pretrained": "{other_bert}"}, {},
     ["--pretrained", "{other_bert}", "weights"]),
    ("R-other-vocabulary", "R", {"--pretrained": "{other_vocab}"}, {},
     ["--pretrained", "vocabulary"]),
    ("R-resume-other-data", "R", {"--data_dir": "{other_data}", "--resume_training": True}, {},
     ["--data_dir", "{other_data}", "resume"]),
    ("K-other-data", "K", {"--data": "{other_data}"}, {}, ["--data_dir", "{other_data}"]),
    ("K-other-candidates", "K", {"--cands_dir": "{cands2}"}, {}, ["--cands_dir", "{cands2}"]),
    ("K-resume-other-encoder", "K", {"--pretrained": "{other_bert}", "--resume_training": True},
     {}, ["--pretrained", "{other_bert}"]),
    ("R-old-checkpoint-other-path", "R", {"--data_dir": "{same_data}"}, {"old": True},
     ["--data_dir", "{same_data}", "does not record"]),
    ("R-same-data-moved", "R", {"--data_dir": "{same_data}"}, {}, None),
    pytest.param("K-old-checkpoint-same-paths", "K", {}, {"old": True}, None,
                 marks=pytest.mark.slow, id="K-old-checkpoint-same-paths"),  # 13 s: a whole run
]


@pytest.mark.parametrize("case,script,changes,saved,words", [
    r if hasattr(r, "marks") else pytest.param(*r, id=r[0]) for r in RERUNS])
def test_rerun_over_other_inputs(world, tmp_path, capfd, case, script, changes, saved, words):
    out = tmp_path / "out"
    out.mkdir()
    copy_run(world, "ret" if script == "R" else "rr", out)
    if saved.get("old"):  # as written before checkpoints recorded their inputs
        for name in ("m.pt", "m.pt.last"):
            state = torch.load(out / name, weights_only=True)
            del state["inputs"]
            torch.save(state, out / name)
    paths = {**world, "out": str(out)}
    argv = flags_argv({**BASE[script], **UNTRAINED, **changes}, paths)
    if words is not None:
        refused(capfd, script, argv, out, *[w.format(**paths) for w in words])
        return
    code, lines, stdout = run_in_process(SCRIPTS[script], argv, capfd)
    assert code == 0, lines
    assert "this run starts it again" in stdout  # a rerun is said, not silent
    if case == "R-same-data-moved":
        assert f"--data_dir was {world['data']}" in stdout and "the same content" in stdout


def test_checkpoints_record_absolute_paths_and_their_inputs(world):
    state = torch.load(os.path.join(world["ret"], "m.pt"), weights_only=True)
    assert os.path.isabs(state["args"]["data_dir"]) and os.path.isabs(state["args"]["pretrained"])
    assert set(state["inputs"]) == {"data", "encoder"}
    assert set(state["inputs"]["data"]) == {"train", "val", "test"}
    assert set(state["inputs"]["encoder"]) == {"config", "vocabulary", "weights"}
    with open(os.path.join(world["ret"], "m.pt.results.json")) as f:
        results = json.load(f)
    assert "inputs" not in results and "data_dir" not in results["args"]


# ----------------------------------------------------------------------------------------------
# 2. Paths stored in a checkpoint: save_candidates.py from another folder

def relative_checkpoint(world, out, pretrained):
    """The fixture's retriever with `pretrained` recorded as given (as older versions did)."""
    state = torch.load(os.path.join(world["ret"], "m.pt"), weights_only=True)
    state["args"]["pretrained"] = pretrained
    torch.save(state, out / "ret.pt")
    return str(out / "ret.pt")


STORED = [
    # (id, what the folder `bert` of the working folder is, --pretrained recorded, flags, words)
    ("relative-path-other-vocabulary", "other_vocab", "bert", {},
     ["--pretrained (from the checkpoint", "vocabulary"]),
    ("relative-path-missing", None, "bert", {},
     ["--pretrained (from the checkpoint", "bert is not a folder"]),
    ("absolute-path-missing", None, "/nonexistent/bert", {},
     ["--pretrained (from the checkpoint", "/nonexistent/bert"]),
    ("given-other-vocabulary", None, "{bert}", {"--pretrained": "{other_vocab}"},
     ["--pretrained", "{other_vocab}", "vocabulary"]),
    ("relative-path-same-encoder", "bert", "bert", {}, None),
]


@pytest.mark.parametrize("case,here,recorded,changes,words", STORED, ids=[r[0] for r in STORED])
def test_save_candidates_checks_the_encoder_the_checkpoint_names(world, tmp_path, capfd,
                                                                 monkeypatch, case, here,
                                                                 recorded, changes, words):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    if here:
        shutil.copytree(world[here], cwd / "bert")
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    out.mkdir()
    paths = {**world, "out": str(out)}
    model = relative_checkpoint(world, out, recorded.format(**paths))
    argv = flags_argv({**BASE["S"], "--model": model, "--num_cands": 4, **changes}, paths)
    if words is None:
        code, lines, _ = run_in_process(SCRIPTS["S"], argv, capfd)
        assert code == 0, lines
        assert os.path.isfile(out / "cands" / "save_candidates.log")
        return
    refused(capfd, "S", argv, out, *[w.format(**paths) for w in words])
    assert not os.path.exists(out / "cands")


# ----------------------------------------------------------------------------------------------
# 3. Encoders that cannot serve are refused in one line before any work; the others run

FAMILIES = [("gpt2", "a decoder"), ("t5", "an encoder-decoder"), ("bert_decoder", "a decoder"),
            ("distilbert", None), ("roberta", None)]


@pytest.fixture(scope="module")
def encoders(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {kind: write_encoder(kind, world["bert"], str(root / kind)) for kind, _ in FAMILIES}


@pytest.mark.parametrize("kind,why", FAMILIES, ids=[f[0] for f in FAMILIES])
@pytest.mark.parametrize("script", ["R", "K"])
def test_encoder_families(world, encoders, tmp_path, capfd, script, kind, why):
    out = tmp_path / "out"
    out.mkdir()
    paths = {**world, "out": str(out)}
    argv = flags_argv({**BASE[script], **UNTRAINED, "--pretrained": encoders[kind]}, paths)
    if why:
        line = refused(capfd, script, argv, out, "--pretrained", encoders[kind], why)
        assert "this code needs an encoder" in line
        return
    code, lines, stdout = run_in_process(SCRIPTS[script], argv, capfd)
    assert code == 0, lines
    with open(out / "m.pt.results.json") as f:
        assert json.load(f)["test"] is not None


# ----------------------------------------------------------------------------------------------
# 5. Signals and faults during a write (real processes)

def start_with_fault(argv, script, fault, cwd=ROOT, preexec=None):
    """Start `script` in a real process whose Nth os.fsync (the end of its Nth file) first sends
    the process a signal: `fault` = (signal number, N)."""
    signum, nth = fault
    code = (f"import os, sys; sys.argv = [{script!r}] + {list(argv)!r}; sys.path.insert(0, "
            f"{ROOT!r}); real = os.fsync; calls = [0]\n"
            f"def fsync(fd):\n"
            f"    calls[0] += 1\n"
            f"    if calls[0] == {nth}: os.kill(os.getpid(), {int(signum)})\n"
            f"    return real(fd)\n"
            f"os.fsync = fsync\n"
            f"import runpy; runpy.run_path({os.path.join(ROOT, script)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300, preexec_fn=preexec)


SIGNALS = [  # the retriever's files in order: m.pt (1), m.pt.last (2), m.pt.results.json (3)
    ("SIGTERM-in-best", signal.SIGTERM, 1), ("SIGINT-in-last", signal.SIGINT, 2),
    ("SIGTERM-in-results", signal.SIGTERM, 3)]


@pytest.mark.parametrize("case,signum,nth", SIGNALS, ids=[s[0] for s in SIGNALS])
def test_a_signal_during_a_write_stops_after_it(world, tmp_path, case, signum, nth):
    """The signal waits for the epoch's files: they are all whole, the one line says where the
    state is, exit status 128 + the signal, no temporary file or lock left."""
    paths = {**world, "out": str(tmp_path)}
    argv = flags_argv({**BASE["R"], **UNTRAINED}, paths)
    r = start_with_fault(argv, "main_retriever.py", (signum, nth))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 128 + signum, r.stderr[-3000:]
    model = str(tmp_path / "m.pt")
    assert lines == [f"stopped by {signal.Signals(signum).name} after epoch 0; continue with "
                     f"--resume_training (the state of epoch 0 is in {model}.last)"], lines
    assert torch.load(model, weights_only=True)["epoch"] == 0
    assert torch.load(model + ".last", weights_only=True)["epoch"] == 0
    with open(model + ".results.json") as f:
        assert [e["epoch"] for e in json.load(f)["val"]] == [0]
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".tmp", ".lock"))]


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
def test_an_output_fault_is_one_line_naming_the_file(world, tmp_path, case, script, disk, words):
    """A full disk, a file size limit, a read-only folder: one line naming the file and the
    cause (with the size needed where it is about space), status 2, no temporary file, nothing
    half-written; a checkpoint in a read-only folder is read, its folder left alone."""
    out = str(tmp_path / "disk")
    paths = {**world, "out": out, "ckpt": os.path.join(world["ret"], "m.pt")}
    argv = flags_argv({**BASE[script], **(UNTRAINED if script == "R" else {})}, paths)
    preexec = None
    with contextlib.ExitStack() as stack:
        if disk == "":
            os.makedirs(out)
            preexec = file_size_limit(200_000)
        elif disk == "ro-ckpt":  # the checkpoint on a read-only disk, the candidates elsewhere
            ro = str(tmp_path / "ro")
            stack.enter_context(small_disk(ro, "20m", readonly=True, files=[paths["ckpt"]]))
            argv = flags_argv({**BASE[script], "--model": f"{ro}/m.pt"}, paths)
        else:
            stack.enter_context(small_disk(out, disk if disk != "ro" else "1m",
                                           readonly=disk == "ro"))
        r = subprocess.run([sys.executable, os.path.join(ROOT, SCRIPTS[script]), *argv],
                           capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300,
                           preexec_fn=preexec)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        if words is None:
            assert r.returncode == 0, r.stderr[-3000:]
            assert os.listdir(ro) == ["m.pt"]
            return
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
        for word in words:
            assert word.format(**paths) in lines[0], lines[0]
        left = [os.path.join(d, n) for d, _, ns in os.walk(out) for n in ns]
        assert not [n for n in left if n.endswith((".tmp", ".lock"))], left
        for name in left:  # what is there is whole
            if name.endswith((".pt", ".last")):
                torch.load(name, weights_only=True)
            elif name.endswith(".json"):
                with open(name) as f:
                    text = f.read()
                try:
                    json.loads(text)
                except ValueError:
                    [json.loads(x) for x in text.splitlines()]


# ----------------------------------------------------------------------------------------------
# 6. A refused run writes nothing: no log, no lock, no folder

REFUSED = [
    ("R-k-too-large", "R", {"--k": 100000, "--model": "{out}/new/m.pt"}, ["--k"]),
    ("R-bad-pretrained", "R", {"--pretrained": "{out}/none", "--model": "{out}/new/m.pt"},
     ["--pretrained"]),
    ("R-bad-data", "R", {"--data_dir": "{out}/none", "--model": "{out}/new/m.pt"},
     ["--data_dir"]),
    ("K-C-too-large", "K", {"--C": 1000, "--model": "{out}/new/m.pt"}, ["--C"]),
    ("S-num_cands-too-large", "S", {"--num_cands": 100000, "--cands_dir": "{out}/new/cands"},
     ["--num_cands"]),
    ("S-bad-data", "S", {"--data_dir": "{out}/none", "--cands_dir": "{out}/new/cands"},
     ["--data_dir"]),
]


@pytest.mark.parametrize("case,script,changes,words", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_refused_run_creates_nothing(world, tmp_path, capfd, case, script, changes, words):
    out = tmp_path / "out"
    out.mkdir()
    ckpt = tmp_path / "ret"
    shutil.copytree(world["ret"], ckpt)
    paths = {**world, "out": str(out), "ckpt": str(ckpt / "m.pt")}
    before = snapshot(ckpt), sorted(os.listdir(ckpt))
    untrained = UNTRAINED if script != "S" else {}
    refused(capfd, script, flags_argv({**BASE[script], **untrained, **changes}, paths), out,
            *words)
    assert os.listdir(out) == [], os.listdir(out)  # not even the folder of --model
    assert (snapshot(ckpt), sorted(os.listdir(ckpt))) == before  # no MODEL.log.N beside it


# ----------------------------------------------------------------------------------------------
# 4. Tools that would destroy files: toy_world.py and demo.py replace only what they wrote

TOOLS = [
    # (id, command line (OUT: the folder), files there before ("": the user's), words; None: ok)
    ("toy-user-bert", ["toy_world.py", "{OUT}"], {"bert/vocab.txt": "mine"},
     ["OUT_DIR", "{OUT}/bert", "not written by toy_world", "--overwrite"]),
    ("toy-user-data", ["toy_world.py", "{OUT}"], {"data/mentions/train.json": "mine"},
     ["{OUT}/data", "not written by toy_world"]),
    ("toy-scale-user-data", ["toy_world.py", "{OUT}", "--zeshel_scale", "0.001"],
     {"data/documents/x.json": "mine"}, ["{OUT}/data"]),
    ("demo-user-reranker", ["demo.py", "--out", "{OUT}"],
     {"reranker.pt": "mine", "reranker.pt.last": "mine"},
     ["--out", "{OUT}/reranker.pt", "not written by demo", "--overwrite"]),
    ("demo-user-world", ["demo.py", "--out", "{OUT}"], {"world/data/mentions/val.json": "mine"},
     ["{OUT}/world"]),
    ("demo-user-runs", ["demo.py", "--out", "{OUT}"], {"compare/mixed_seed1.pt": "mine"},
     ["{OUT}/compare"]),
    ("demo-user-summary", ["demo.py", "--out", "{OUT}"], {"summary.json": "mine"},
     ["{OUT}/summary.json"]),
    ("demo-user-cands", ["demo.py", "--out", "{OUT}"], {"cands/candidates_val.json": "mine"},
     ["{OUT}/cands"]),
    ("toy-twice", ["toy_world.py", "{OUT}"], "toy", None),
    ("toy-overwrite", ["toy_world.py", "{OUT}", "--overwrite"], {"bert/vocab.txt": "mine"}, None),
]


@pytest.mark.parametrize("case,argv,files,words", TOOLS, ids=[t[0] for t in TOOLS])
def test_tools_replace_only_their_own_files(tmp_path, case, argv, files, words):
    out = tmp_path / "out"
    if files == "toy":  # an earlier toy world there: its own files, replaced
        from toy_world import make_toy_world
        make_toy_world(str(out))
        files = {}
    for name, text in files.items():
        os.makedirs((out / name).parent, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    cmd = [a.format(OUT=out) for a in argv]
    r = subprocess.run([sys.executable, os.path.join(ROOT, cmd[0]), *cmd[1:]],
                       capture_output=True, text=True, env=ENV, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    if words is None:
        assert r.returncode == 0, r.stderr[-2000:]
        assert (out / "bert" / "vocab.txt").read_text() != "mine"
        return
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for word in words:
        assert word.format(OUT=out) in lines[0], lines[0]
    assert snapshot(out) == before and sorted(os.listdir(out)) == sorted(
        {n.split("/")[0] for n in files})  # nothing replaced, nothing added


# ----------------------------------------------------------------------------------------------
# 7. No tracebacks: one line, before the work where the output is the problem

def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


ONE_LINERS = [
    # (id, script and arguments ({tmp}: a fresh folder), files to write first, words)
    ("report-recall-json-a-list", ["report.py", "{tmp}/c/recall.json"],
     {"c/recall.json": '{"val": [1, 2]}'}, ["{tmp}/c/recall.json", "not a candidates file"]),
    ("report-recall-json-bad-key", ["report.py", "{tmp}/c"],
     {"c/recall.json": '{"test": {"macro": {"recall@one": 1}}}'}, ["{tmp}/c/recall.json"]),
    ("report-recall-json-text-value", ["report.py", "{tmp}/c"],
     {"c/recall.json": '{"val": {"macro": {"recall@1": "high"}}}'}, ["{tmp}/c/recall.json"]),
    ("report-results-bad-val", ["report.py", "{tmp}/r/m.results.json"],
     {"r/m.results.json": '{"k": 8, "val": [{"epoch": "one"}], "test": 3}'},
     ["{tmp}/r/m.results.json", "not a retrieval file"]),
    ("report-plot-onto-a-file", ["report.py", "{tmp}/r", "--plot", "{tmp}/fig.png"],
     {"fig.png": "an image", "r/m.results.json": '{"k": 8, "val": [], "test": null}'},
     ["--plot", "{tmp}/fig.png", "is a file"]),
    ("demo-out-a-file", ["demo.py", "--out", "{tmp}/notes.txt"], {"notes.txt": "mine"},
     ["--out", "{tmp}/notes.txt", "is a file"]),
    ("gradient-bias-out-a-folder", ["gradient_bias.py", "--out", "{tmp}/folder", "--steps",
                                    "100000"], {"folder/keep": ""},
     ["--out", "{tmp}/folder", "is a folder"]),
]


@pytest.mark.parametrize("case,argv,files,words", ONE_LINERS, ids=[o[0] for o in ONE_LINERS])
def test_one_line_instead_of_a_traceback(tmp_path, case, argv, files, words):
    for name, text in files.items():
        write(str(tmp_path / name), text)
    before = snapshot(tmp_path)
    cmd = [a.format(tmp=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, os.path.join(ROOT, cmd[0]), *cmd[1:]],
                       capture_output=True, text=True, env=ENV, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for word in words:
        assert word.format(tmp=tmp_path) in lines[0], lines[0]
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# 8. Clear words: the flag to blame, a rerun said, a GPU that is not there, an ignored flag,
# the input formats

def test_the_words_of_a_run(world, tmp_path, capfd):
    """In one real process: --gpus 0 on a machine without it, and flags the mode ignores, each
    get a notice; --type_model dual with --max_len 7 runs (it takes one vector per side)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    paths = {**world, "out": str(tmp_path)}
    argv = flags_argv({**BASE["R"], **UNTRAINED, "--gpus": "0", "--type_model": "dual",
                       "--max_len": 7, "--type_cands": "hard_negative", "--cands_ratio": 0.5,
                       "--num_mention_vecs": 16, "--quiet": False}, paths)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "main_retriever.py"), *argv],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "notice: --gpus 0: no usable GPU on this machine; running on the CPU" in r.stderr
    assert "notice: --cands_ratio 0.5 has no effect: only --type_cands mixed_negative" in r.stdout
    assert "notice: --num_mention_vecs 16 has no effect: --type_model dual" in r.stdout
    assert "notice: --smoothing_value" not in r.stdout  # at its default: nothing to say


WORDS = [
    # (id, changed flags, words of the error)
    ("sum_max-vectors-above-max_len", {"--type_model": "sum_max", "--num_mention_vecs": 8,
                                       "--max_len": 7}, ["--num_mention_vecs", "--max_len is 7"]),
    ("multi_vector-entity-vectors", {"--type_model": "multi_vector", "--num_entity_vecs": 9,
                                     "--max_len": 8}, ["--num_entity_vecs", "--max_len is 8"]),
]


@pytest.mark.parametrize("case,changes,words", WORDS, ids=[w[0] for w in WORDS])
def test_the_flag_to_blame(world, tmp_path, capfd, case, changes, words):
    paths = {**world, "out": str(tmp_path)}
    refused(capfd, "R", flags_argv({**BASE["R"], **UNTRAINED, **changes}, paths), tmp_path,
            *words)


FORMATS = [
    # (id, how the mentions file of val is rewritten, error words; None: read as the original)
    ("bom", lambda text: "\ufeff" + text, None),
    ("pretty-printed-array", lambda text: json.dumps(
        [json.loads(x) for x in text.splitlines()], indent=2), ["val.json:1", "JSON lines"]),
    ("one-line-array", lambda text: json.dumps([json.loads(x) for x in text.splitlines()]),
     ["val.json:1", "JSON array", "JSON lines"]),
    ("pretty-printed-objects", lambda text: "\n".join(
        json.dumps(json.loads(x), indent=1) for x in text.splitlines()), ["val.json:1",
                                                                          "JSON lines"]),
]


@pytest.mark.parametrize("case,edit,words", FORMATS, ids=[f[0] for f in FORMATS])
def test_input_formats(world, tmp_path, capfd, case, edit, words):
    import data_loader
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    path = data / "mentions" / "val.json"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(edit(text))
    if words is None:
        zeshel = data_loader.Zeshel(str(data), ("val",))
        assert [m["mention_id"] for m in zeshel.mentions["val"]] == [
            json.loads(x)["mention_id"] for x in text.splitlines()]
        return
    with pytest.raises(SystemExit) as e:
        data_loader.main(["--data_dir", str(data)])
    lines = capfd.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]


def test_a_rerun_of_save_candidates_is_said(world, tmp_path, capfd):
    paths = {**world, "out": str(tmp_path), "ckpt": os.path.join(world["ret"], "m.pt")}
    argv = flags_argv({**BASE["S"], "--num_cands": 4}, paths)
    said = []
    for _ in range(2):
        code, lines, stdout = run_in_process(SCRIPTS["S"], argv, capfd)
        assert code == 0, lines
        said.append("writing them again" in stdout)
    assert said == [False, True]
    assert sorted(n for n in os.listdir(tmp_path / "cands") if ".log" in n) == [
        "save_candidates.log", "save_candidates.log.1"]


IGNORED = [
    # (id, changed reranker flags, notices the log must hold)
    ("full-with-vectors", {"--num_entity_vecs": 16, "--mention_use_codes": True},
     ["--num_entity_vecs 16 has no effect", "--mention_use_codes True has no effect"]),
    pytest.param("dual-with-inputmark-and-init", {"--type_model": "dual", "--inputmark": True,
                                                  "--init": 0.05},
                 ["--inputmark True has no effect", "--init 0.05 has no effect"],
                 marks=pytest.mark.slow, id="dual-with-inputmark-and-init"),  # 14 s
]


@pytest.mark.parametrize("case,changes,notices", [
    i if hasattr(i, "marks") else pytest.param(*i, id=i[0]) for i in IGNORED])
def test_flags_the_reranker_mode_ignores_are_said(world, tmp_path, capfd, case, changes,
                                                  notices):
    paths = {**world, "out": str(tmp_path)}
    code, lines, stdout = run_in_process(SCRIPTS["K"], flags_argv(
        {**BASE["K"], **UNTRAINED, **changes}, paths), capfd)
    assert code == 0, lines
    for words in notices:
        assert f"notice: {words}" in stdout, stdout[-2000:]
    assert stdout.count("has no effect") == len(notices)

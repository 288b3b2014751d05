"""What several test files share: the toy world, running the scripts (in a subprocess, in the
background, or their main() in this process), the flags of a run that works, and the checks of
one-line errors. No test file imports another."""
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import time
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# One torch thread per run: on a shared 2-core machine, spinning threads made runs 3x slower.
SCRIPT_ENV = {"PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

SCRIPTS = {"R": "main_retriever.py", "S": "save_candidates.py", "K": "main_reranker.py"}
# Flags of a run that would work, with "{name}" for paths (flags_argv fills them in). Tiny sizes:
# one epoch of the retriever on random negatives trains in a few seconds.
BASE = {
    "R": {"--model": "{out}/m.pt", "--data_dir": "{data}", "--pretrained": "{bert}",
          "--max_len": 16, "--k": 8, "--num_cands": 4, "--type_cands": "random_negative",
          "--type_model": "sum_max", "--num_mention_vecs": 4, "--num_entity_vecs": 4, "--B": 8,
          "--epochs": 1, "--quiet": True},
    "S": {"--model": "{ckpt}", "--data_dir": "{data}", "--cands_dir": "{out}/cands",
          "--num_cands": 8, "--quiet": True},
    "K": {"--model": "{out}/m.pt", "--data": "{data}", "--cands_dir": "{cands}",
          "--pretrained": "{bert}", "--C": 4, "--C_eval": 4, "--L": 32, "--B": 8, "--epochs": 1,
          "--quiet": True},
}
DATA_FLAG = {"R": "--data_dir", "S": "--data_dir", "K": "--data"}


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The bundled toy world, built once per test session: (data_dir, bert_dir)."""
    from toy_world import make_toy_world
    return make_toy_world(str(tmp_path_factory.mktemp("toy")))


@pytest.fixture(scope="module")
def paths(toy, tmp_path_factory):
    """The toy world's paths for flags_argv: data, bert, and cands (4 candidates a mention)."""
    data, bert = toy
    return {"data": data, "bert": bert,
            "cands": write_candidates(data, str(tmp_path_factory.mktemp("cands")), 4)}


def script_command(script, args):
    return [sys.executable, os.path.join(ROOT, script), *map(str, args)]


def run_script(script, *args, env=None, cwd=ROOT, timeout=600):
    """Run one of the repository's scripts in a subprocess: CompletedProcess with text output."""
    return subprocess.run(script_command(script, args), capture_output=True, text=True,
                          env={**os.environ, **SCRIPT_ENV, **(env or {})}, cwd=cwd,
                          timeout=timeout)


def start_script(script, *args):
    """The same, in the background: a Popen with stdout dropped and stderr piped as text."""
    return subprocess.Popen(script_command(script, args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **SCRIPT_ENV}, cwd=ROOT)


def wait_for(proc, condition, what, timeout=300):
    """Poll `condition()` until it holds; fail naming `what` if `proc` ends or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} never happened (exit {proc.poll()}): "
                         f"{proc.stderr.read()[-3000:] if proc.poll() is not None else ''}")


def log_says(model, words):
    """A condition for wait_for: the run's log `model`.log holds `words`."""
    def check():
        if not os.path.exists(model + ".log"):
            return False
        with open(model + ".log") as f:
            return words in f.read()
    return check


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_results(model):
    """The results file a training run writes beside its checkpoint `model`."""
    return read_json(str(model) + ".results.json")


def flags_argv(flags, paths):
    """argv from {flag: value}: None or False leaves the flag out, True writes it alone, any other
    value follows it with "{name}" filled in from `paths`."""
    argv = []
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        argv.append(flag)
        if value is not True:
            argv.append(str(value).format(**paths))
    return argv


def snapshot(folder):
    """{relative path: sha256} of every file under `folder` but logs."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if re.search(r"\.log(\.\d+)?$", name):
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return files


def run_in_process(script, argv, capfd):
    """(exit status, stderr lines, stdout) of `script`'s main(argv). Warnings a plain `python`
    run would print count as stderr lines."""
    module = importlib.import_module(script[:-len(".py")])
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            module.main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    lines += [f"warning: {w.message}" for w in caught if not issubclass(w.category, hidden)]
    return code, lines, out


def tree(folder):
    """{relative path: sha256} of every file and folder under `folder`, hidden files, logs, locks
    and records included (a folder maps to None); {} when it does not exist."""
    files = {}
    for dirpath, dirs, names in os.walk(folder):
        for name in dirs:
            files[os.path.relpath(os.path.join(dirpath, name), folder)] = None
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return files


def assert_refused(code, lines, words=(), folders=(), before=None):
    """The error contract of a user's mistake (docs/DESIGN.md#run-safety), asserted in this one
    place: exit status 2, one line on stderr `error: ...` holding each of `words`, no traceback,
    and every folder of `folders` exactly as `before` (tree of each, taken before the run):
    nothing created, changed or removed, no log, lock, record or temporary file. Returns the
    line."""
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    for word in words:
        assert str(word) in lines[0], lines[0]
    for folder, was in zip(folders, before or [{} for _ in folders]):
        assert tree(folder) == was, f"the refused run changed {folder}"
    return lines[0]


def fails_with(main, capsys, argv, *words):
    """main(argv) exits with status 2 and one stderr line, "error: ..." holding each of `words`:
    that line."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("error: "), err
    for w in words:
        assert w in err, err
    return err


def write_candidates(data_dir, cands_dir, C, seed=0):
    """`cands_dir/candidates_<split>.json` for train, val and test, as save_candidates.py writes
    them: for each mention, C document ids of its world in a fixed pseudo-random order, the gold
    among them for about three mentions in four. Returns `cands_dir`."""
    import random
    os.makedirs(cands_dir, exist_ok=True)
    docs = {}
    for name in sorted(n for n in os.listdir(os.path.join(data_dir, "documents"))
                       if n.endswith(".json")):
        with open(os.path.join(data_dir, "documents", name)) as f:
            docs[name[:-len(".json")]] = [json.loads(line)["document_id"] for line in f]
    for split in ("train", "val", "test"):
        rng = random.Random(f"{seed}-{split}")
        with open(os.path.join(data_dir, "mentions", f"{split}.json")) as f:
            mentions = [json.loads(line) for line in f]
        with open(os.path.join(cands_dir, f"candidates_{split}.json"), "w") as f:
            for m in mentions:
                gold = m["label_document_id"]
                cands = rng.sample([d for d in docs[m["corpus"]] if d != gold], C)
                if rng.random() < 0.75:
                    cands[rng.randrange(C)] = gold
                f.write(json.dumps({"mention_id": m["mention_id"], "candidates": cands}) + "\n")
    return str(cands_dir)

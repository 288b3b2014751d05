"""What several test files share: the toy world, running the scripts (in a subprocess, in the
background, or their main() in this process), the flags of a run that works, and the checks of
one-line errors. No test file imports another."""
import hashlib
import importlib
import json
import os
import re
import shutil
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


def read_jsonl(path):
    """The rows of a JSON-lines file."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_results(model):
    """The results file a training run writes beside its checkpoint `model`."""
    return read_json(str(model) + ".results.json")


def flags_argv(flags, paths):
    """argv from {flag: value}: None or False leaves the flag out, True writes it alone, any other
    value follows it; "{name}"s in both filled in from `paths` (a flag "{out}": a positional
    argument)."""
    argv = []
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        argv.append(flag.format(**paths))
        if value is not True:
            argv.append(str(value).format(**paths))
    return argv


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


def run_main(script, *args):
    """`script`'s main(args) in this process (no process started, no seconds of imports): it
    must end well."""
    module = importlib.import_module(script[:-len(".py")])
    try:
        module.main([str(a) for a in args])
    except SystemExit as e:
        raise AssertionError(f"{script} {' '.join(map(str, args))} ended with status "
                             f"{e.code}") from None


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


def leftovers(folder):
    """The temporary files and locks under `folder` (a run's, when it did not end cleanly)."""
    return [os.path.join(d, n) for d, _, ns in os.walk(folder) for n in ns
            if n.endswith((".tmp", ".lock"))]


# A line of a run's log that only work past the checks writes: an epoch, a loss, or the end of
# any stage but the first (a run's checks end with "stage loading and checking", or before it).
WORK = re.compile(r"\bepoch \d|\bloss\b|stage (?!loading and checking)")


def assert_refused(code, lines, words=(), folders=(), before=None, stdout=None):
    """The error contract of a user's mistake (docs/DESIGN.md#run-safety), asserted in this one
    place: exit status 2, one line on stderr `error: ...` holding each of `words`, no traceback,
    and every folder of `folders` exactly as `before` (tree of each, taken before the run):
    nothing created, changed or removed, no log, lock, record or temporary file. `stdout`: what
    the run printed, which must show no work (WORK): the refusal came before any. Returns the
    line."""
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    for word in words:
        assert str(word) in lines[0], lines[0]
    for folder, was in zip(folders, before or [{} for _ in folders]):
        assert tree(folder) == was, f"the refused run changed {folder}"
    if stdout is not None:
        work = [line for line in stdout.splitlines() if WORK.search(line)]
        assert not work, f"work began before the refusal: {work}"
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


# ----------------------------------------------------------------------------------------------
# Run safety's tables (tests/test_errors.py: refused; tests/test_run_safety.py: accepted)

TABLE_SCRIPTS = {**SCRIPTS, "T": "toy_world.py", "D": "data_loader.py"}
# Each script's flags in a table row; the reranker without DataLoader workers (no process
# started: a row's run is in this process)
TABLE_BASE = {**BASE, "K": {**BASE["K"], "--num_workers": 0}, "T": {"{out}": True},
              "D": {"--data_dir": "{data}"}}


class Text(str):
    """The text of a file a row puts in place (a user's file)."""


def table_row(row_id, script, flags, words=(), files=None, cwd=None):
    """A table row: `script` (R, S, K, T toy_world, D data_loader) run with TABLE_BASE[script]
    changed by `flags` (None leaves a flag out; a flag may be a "{name}" too: a positional
    argument), after `put_files(files)` in the output folder {out}, in the working folder `cwd`;
    `words`: what its error line, or its notices, must hold. Paths are "{name}"s of the
    fixtures."""
    return pytest.param(script, flags, files or {}, words, cwd, id=row_id)


def table_argv(script, flags, paths):
    return flags_argv({**TABLE_BASE[script], **flags}, paths)


def put_files(out, files, paths):
    """Put {name under `out`: source} in place: None makes a folder, a Text is the file's text,
    else the file or folder "{name}" is copied ("" names `out` itself)."""
    for name, source in files.items():
        target = os.path.join(out, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if source is None:
            os.makedirs(target)
        elif isinstance(source, Text):
            with open(target, "w") as f:
                f.write(source)
        elif os.path.isdir(source.format(**paths)):
            shutil.copytree(source.format(**paths), target, dirs_exist_ok=True)
        else:
            shutil.copy(source.format(**paths), target)


def run_table_row(world, tmp_path, capfd, monkeypatch, script, flags, files, cwd, watch=()):
    """Run a row (table_row) in this process, in a fresh output folder {out}: (paths, exit status,
    stderr lines, stdout, the folders {out} and `watch` with their trees from before the run)."""
    out = tmp_path / "out"
    out.mkdir()
    paths = {**world, "out": str(out)}
    put_files(str(out), files, paths)
    if cwd:
        monkeypatch.chdir(cwd.format(**paths))
    folders = [str(out)] + [f.format(**paths) for f in watch]
    before = [tree(f) for f in folders]
    code, lines, stdout = run_in_process(TABLE_SCRIPTS[script], table_argv(script, flags, paths),
                                         capfd)
    return paths, code, lines, stdout, folders, before


def run_ok(script, flags, paths):
    """`script`'s main() in this process with TABLE_BASE changed by `flags`: it must work."""
    run_main(TABLE_SCRIPTS[script], *table_argv(script, flags, paths))


def write_encoder(kind, bert, out, seed=1):
    """A tiny randomly initialised encoder in `out` with the toy BERT's word-level tokenizer
    files: "bert" (another config than the toy BERT's), "bert_weights" (the toy BERT's config,
    other weights), "roberta" (34 positions: windows of at most 32 tokens)."""
    import torch
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
        "bert": (t.BertConfig(vocab_size=v, hidden_size=32, **layer), t.BertModel),
        "bert_weights": (t.BertConfig.from_pretrained(bert), t.BertModel),
        "roberta": (t.RobertaConfig(vocab_size=v, hidden_size=32, pad_token_id=0,
                                    max_position_embeddings=34, **layer), t.RobertaModel),
    }[kind]
    torch.manual_seed(seed)
    model(config).save_pretrained(out)
    return out


def edit_weights(bert, out, edit):
    """A copy of the encoder folder `bert` whose weights file holds edit({name: tensor})."""
    from safetensors.torch import load_file, save_file
    from run_safety import RECORD
    shutil.copytree(bert, out, ignore=shutil.ignore_patterns(RECORD))
    weights = load_file(os.path.join(bert, "model.safetensors"))
    save_file(edit(weights), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


def swap_lines(path, i=0, j=1):
    """Swap two lines of a file in place: the same rows, other bytes."""
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    lines[i], lines[j] = lines[j], lines[i]
    with open(path, "w") as f:
        f.write("".join(lines))


@pytest.fixture(scope="session")
def safety_world(toy, tmp_path_factory):
    """The paths run safety's tables share ("{name}"s): the toy data ({data}) and BERT ({bert});
    a byte-identical copy of the data ({same_data}), one with the val mentions in another order
    ({other_data}); candidates not written by save_candidates.py ({cands}, {cands2}); a
    retriever and a reranker trained one epoch ({ret}: {ckpt} = {ret}/m.pt, {rr}); candidates
    saved from the first ({saved_cands}, and {saved_cands4} with --num_cands 4); a retriever
    retrained with another seed at the same path ({reseeded}) after its candidates were saved
    ({reseeded_cands}); a retriever trained on data that changed in place since ({inplace},
    {inplace_data}), a reranker on candidates that did ({inplace_rr}, {inplace_cands}); encoders: another config ({other_bert}), other weights of the same config
    and vocabulary ({bert_weights}), another vocabulary ({other_vocab}), a RoBERTa of 34
    positions ({roberta}), the weights renamed with a prefix ({prefixed}), without a layer
    ({no_layer}), without the pooler ({no_pooler}), one of another shape ({shape}), under
    "bert." with a pre-training head as BertForPreTraining saves them ({pretraining}); retriever checkpoints recording the encoder
    as a relative path "bert" and as an absent one ({stored}/relative.pt, absent.pt); a toy
    world as toy_world.py wrote it ({toyrun})."""
    import torch
    from run_safety import RECORD
    from toy_world import make_toy_world
    data, bert = toy
    root = tmp_path_factory.mktemp("safety")
    p = {"data": data, "bert": bert, "root": str(root),
         "cands": write_candidates(data, str(root / "cands"), 4),
         "cands2": write_candidates(data, str(root / "cands2"), 4, seed=1)}
    for name in ("same_data", "other_data", "inplace_data"):
        shutil.copytree(data, root / name)
        p[name] = str(root / name)
    swap_lines(os.path.join(p["other_data"], "mentions", "val.json"))

    enc = root / "encoders"
    p["other_bert"] = write_encoder("bert", bert, str(enc / "other_bert"))
    p["bert_weights"] = write_encoder("bert_weights", bert, str(enc / "bert_weights"), seed=7)
    p["roberta"] = write_encoder("roberta", bert, str(enc / "roberta"))
    p["other_vocab"] = str(enc / "other_vocab")  # the same weights, another vocabulary
    shutil.copytree(bert, p["other_vocab"], ignore=shutil.ignore_patterns(RECORD))
    with open(os.path.join(p["other_vocab"], "vocab.txt")) as f:
        words = f.read().splitlines()
    with open(os.path.join(p["other_vocab"], "vocab.txt"), "w") as f:
        f.write("\n".join(words[:20] + words[21:] + words[20:21]) + "\n")  # a word moved
    p["prefixed"] = edit_weights(bert, str(enc / "prefixed"),
                                 lambda w: {"module." + k: v for k, v in w.items()})
    p["no_layer"] = edit_weights(bert, str(enc / "no_layer"), lambda w: {
        k: v for k, v in w.items() if not k.startswith("encoder.layer.1.")})
    p["no_pooler"] = edit_weights(bert, str(enc / "no_pooler"), lambda w: {
        k: v for k, v in w.items() if not k.startswith("pooler.")})
    p["shape"] = edit_weights(bert, str(enc / "shape"), lambda w: {  # one more word embedding
        k: torch.cat([v, v[:1]]) if k == "embeddings.word_embeddings.weight" else v
        for k, v in w.items()})
    p["pretraining"] = edit_weights(bert, str(enc / "pretraining"), lambda w: {  # with a head
        **{"bert." + k: v for k, v in w.items()}, "cls.predictions.bias": torch.zeros(8)})

    p.update(ret=str(root / "ret"), ckpt=str(root / "ret" / "m.pt"), rr=str(root / "rr"),
             saved_cands=str(root / "saved_cands"), saved_cands4=str(root / "saved_cands4"))
    run_ok("R", {"--model": p["ckpt"]}, p)
    run_ok("K", {"--model": f"{p['rr']}/m.pt"}, p)
    run_ok("S", {"--cands_dir": p["saved_cands"]}, p)
    run_ok("S", {"--cands_dir": p["saved_cands4"], "--num_cands": 4}, p)
    p["reseeded"], p["reseeded_cands"] = str(root / "reseeded" / "m.pt"), str(root / "rcands")
    run_ok("R", {"--model": p["reseeded"], "--epochs": 0}, p)
    run_ok("S", {"--model": p["reseeded"], "--cands_dir": p["reseeded_cands"]}, p)
    run_ok("R", {"--model": p["reseeded"], "--epochs": 0, "--seed": 43, "--overwrite": True}, p)
    p["inplace"] = str(root / "inplace")
    run_ok("R", {"--model": f"{p['inplace']}/m.pt", "--epochs": 0,
                 "--data_dir": p["inplace_data"]}, p)
    swap_lines(os.path.join(p["inplace_data"], "mentions", "val.json"))
    p["inplace_cands"] = write_candidates(data, str(root / "inplace_cands"), 4)
    p["inplace_rr"] = str(root / "inplace_rr")
    run_ok("K", {"--model": f"{p['inplace_rr']}/m.pt", "--epochs": 0,
                 "--cands_dir": p["inplace_cands"]}, p)
    swap_lines(os.path.join(p["inplace_cands"], "candidates_val.json"))
    p["stored"] = str(root / "stored")
    os.makedirs(p["stored"])
    for name, pretrained in (("relative", "bert"), ("absent", "/nonexistent/bert")):
        state = torch.load(p["ckpt"], weights_only=True)  # as older versions recorded it
        state["args"]["pretrained"] = pretrained
        torch.save(state, os.path.join(p["stored"], f"{name}.pt"))
    make_toy_world(str(root / "toyrun"))
    p["toyrun"] = str(root / "toyrun")
    return p

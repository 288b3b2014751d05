"""Bad input (docs/DESIGN.md#run-safety): every user mistake ends with exit status 2 and one line
on stderr naming the flag or file, no traceback, before any training, and leaves no output file
behind (no checkpoint, results or candidates file, no temporary file; a log of the failed run is
allowed).

The table runs each script's main() in this process (a subprocess costs seconds of imports per
row); `test_real_processes` checks the same contract on three rows run as real processes."""
import json
import os
import re
import shutil

import pytest
import torch

from conftest import (BASE, DATA_FLAG, SCRIPTS, flags_argv, run_in_process, run_script, snapshot,
                      write_candidates)


def rows():
    """(id, script, changed flags, files copied into the output folder first, words the error
    line must hold)."""
    table = []
    for s in "RSK":
        data = DATA_FLAG[s]
        table += [
            (f"{s}-no-data-flag", s, {data: None}, {}, [data]),
            (f"{s}-no-mentions-folder", s, {data: "{bad}/no_mentions"}, {},
             [data, "{bad}/no_mentions"]),
            (f"{s}-malformed-line", s, {data: "{bad}/malformed"}, {},
             ["{bad}/malformed/mentions/test.json:3"]),
            (f"{s}-unknown-document", s, {data: "{bad}/unknown_doc"}, {},
             ["{bad}/unknown_doc/mentions/test.json:5", "NO_SUCH_DOC"]),
            (f"{s}-pretrained-missing", s, {"--pretrained": "{out}/no_such_bert"}, {},
             ["--pretrained", "{out}/no_such_bert"]),
        ]
    table += [
        ("K-cands-file-missing", "K", {"--cands_dir": "{bad}/cands_no_test"}, {},
         ["--cands_dir", "{bad}/cands_no_test/candidates_test.json"]),
        ("K-cands-mention-missing", "K", {"--cands_dir": "{bad}/cands_gap"}, {},
         ["{bad}/cands_gap/candidates_val.json", "{dropped}"]),
        ("R-k-above-entities", "R", {"--k": 145}, {}, ["--k"]),
        ("R-num_cands-above-entities", "R", {"--num_cands": 216}, {}, ["--num_cands"]),
        ("S-num_cands-above-world", "S", {"--num_cands": 73}, {}, ["--num_cands"]),
        ("R-cands_ratio-negative", "R", {"--cands_ratio": -0.1}, {}, ["--cands_ratio"]),
        ("R-cands_ratio-above-1", "R", {"--cands_ratio": 1.01}, {}, ["--cands_ratio"]),
        ("S-flag-other-type_model", "S", {"--type_model": "poly"}, {}, ["--type_model"]),
        ("S-reranker-checkpoint", "S", {"--model": "{bad}/reranker.pt"}, {},
         ["--model", "{bad}/reranker.pt"]),
        ("S-truncated-checkpoint", "S", {"--model": "{bad}/truncated.pt"}, {},
         ["--model", "{bad}/truncated.pt"]),
        ("R-resume-without-checkpoint", "R", {"--resume_training": True}, {},
         ["--resume_training", "{out}/m.pt.last"]),
        ("K-resume-without-checkpoint", "K", {"--resume_training": True}, {},
         ["--resume_training", "{out}/m.pt.last"]),
        ("R-resume-other-type_model", "R",
         {"--resume_training": True, "--type_model": "multi_vector"},
         {"m.pt": "{ckpt}", "m.pt.last": "{ckpt}.last", "m.pt.results.json": "{ckpt}.results.json"},
         ["--type_model", "{out}/m.pt.last"]),
    ]
    return table


@pytest.fixture(scope="module")
def world(toy, tmp_path_factory):
    """Paths for the rows: the toy data, broken copies, candidates, a retriever checkpoint."""
    data, bert = toy
    root = tmp_path_factory.mktemp("user_errors")
    bad = root / "bad"
    paths = {"data": data, "bert": bert, "bad": str(bad), "ckpt": str(root / "ret" / "m.pt"),
             "cands": write_candidates(data, str(root / "cands"), 4)}

    os.makedirs(bad / "no_mentions")
    shutil.copytree(os.path.join(data, "documents"), bad / "no_mentions" / "documents")
    for name, line, edit in [("malformed", 2, lambda s: s[:-5]),  # cut inside the last string
                             ("unknown_doc", 4, lambda s: json.dumps(
                                 {**json.loads(s), "label_document_id": "NO_SUCH_DOC"}))]:
        shutil.copytree(data, bad / name)
        path = bad / name / "mentions" / "test.json"
        lines = path.read_text().splitlines()
        lines[line] = edit(lines[line])
        path.write_text("\n".join(lines) + "\n")

    shutil.copytree(paths["cands"], bad / "cands_no_test")
    os.remove(bad / "cands_no_test" / "candidates_test.json")
    shutil.copytree(paths["cands"], bad / "cands_gap")
    gap = bad / "cands_gap" / "candidates_val.json"
    lines = gap.read_text().splitlines(keepends=True)
    paths["dropped"] = json.loads(lines[10])["mention_id"]
    gap.write_text("".join(lines[:10] + lines[11:]))

    argv = flags_argv({**BASE["R"], "--model": paths["ckpt"]}, paths)
    r = run_script("main_retriever.py", *argv)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(paths["ckpt"], "rb") as f:
        (bad / "truncated.pt").write_bytes(f.read()[:5000])
    # What main_reranker.py saves as its best checkpoint: a cross-encoder, no retriever shape.
    torch.save({"args": {"type_model": "full", "type_bert": "base", "L": 32, "C": 4,
                         "pretrained": bert},
                "model": {"score.weight": torch.zeros(1, 64), "score.bias": torch.zeros(1)},
                "epoch": 1, "best_score": 0.0}, bad / "reranker.pt")
    return paths


@pytest.mark.parametrize("case,script,changes,copies,words", rows(), ids=[r[0] for r in rows()])
def test_user_error(world, tmp_path, capfd, case, script, changes, copies, words):
    out = tmp_path / "out"
    out.mkdir()
    paths = {**world, "out": str(out)}
    for name, source in copies.items():
        shutil.copy(source.format(**paths), out / name)
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

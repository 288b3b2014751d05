"""sweep.py: the recipes' command lines, flags passed through, and a tiny sweep on the toy world
that runs, skips a finished run and resumes an interrupted one."""
import functools
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, fails_with, read_json

import main_retriever
import sweep

fails = functools.partial(fails_with, sweep.main)  # fails(capsys, argv, *words)


def dry_run(capsys, *argv):
    assert sweep.main([argv[0], "--dry_run", *argv[1:]]) == 0
    return capsys.readouterr().out.strip().split("\n")


def test_dry_run_prints_the_15_appendix_runs(capsys, tmp_path):
    lines = dry_run(capsys, "appendix", "--data_dir", "zeshel", "--out", str(tmp_path))
    assert len(lines) == 15
    seen = set()
    for line in lines:
        words = shlex.split(line)
        assert words[:2] == ["python", "main_retriever.py"]
        args = main_retriever.parse_args(words[2:])  # every line parses as the script's own
        name = os.path.basename(args.model)[:-len(".pt")]
        scorer, p = name.rsplit("_p", 1)
        assert args.type_model == scorer and args.type_cands == "mixed_negative"
        assert args.cands_ratio == pytest.approx(1 - int(p) / 100)
        assert (args.num_mention_vecs, args.num_entity_vecs) == \
            {"dual": (1, 1), "multi_vector": (1, 8), "sum_max": (128, 128)}[scorer]
        assert (args.k, args.num_cands, args.B, args.gradient_accumulation_steps, args.epochs,
                args.lr) == (64, 64, 16, 2, 4, 1e-5)
        assert args.data_dir == os.path.abspath("zeshel")
        assert words.count("--cands_ratio") == 1
        seen.add((scorer, int(p)))
    assert seen == {(s, p) for s in ("dual", "multi_vector", "sum_max")
                    for p in (0, 25, 50, 75, 100)}


def test_paper_recipe_chains_the_three_scripts_and_passes_flags_to_those_that_take_them(capsys,
                                                                                    tmp_path):
    lines = dry_run(capsys, "paper", "--data_dir", "zeshel", "--out", str(tmp_path),
                    "--pretrained", "enc", "--nproc_per_node", "4", "--", "--epochs", "1", "--fp16")
    assert len(lines) == 3
    words = [shlex.split(line) for line in lines]
    head = ["torchrun", "--standalone", "--nproc_per_node", "4"]
    assert [w[:5] for w in words] == [head + [s] for s in ("main_retriever.py",
                                                        "save_candidates.py", "main_reranker.py")]

    def value(w, flag):
        return w[w.index(flag) + 1] if flag in w else None

    retriever, candidates, reranker = words
    assert value(candidates, "--model") == value(retriever, "--model")
    assert value(reranker, "--model") not in (value(retriever, "--model"), None)
    assert value(reranker, "--cands_dir") == value(candidates, "--cands_dir")
    assert value(reranker, "--data") == value(retriever, "--data_dir")
    for w in words:
        assert value(w, "--pretrained") == "enc" and "--fp16" in w
    # --epochs replaces the recipe's value where the script takes it; save_candidates has none
    assert value(retriever, "--epochs") == value(reranker, "--epochs") == "1"
    assert retriever.count("--epochs") == 1 and "--epochs" not in candidates
    assert value(reranker, "--eval_method") == "macro" and value(reranker, "--type_bert") == "base"


def test_user_mistakes_are_one_line(capsys, tmp_path):
    out = str(tmp_path)
    fails(capsys, ["paper", "--data_dir", "z", "--out", out, "--dry_run", "--no_such", "1"],
          "--no_such")
    fails(capsys, ["appendix", "--data_dir", "z", "--out", out, "--only", "dual_p10"],
          "--only", "dual_p10")
    fails(capsys, ["appendix", "--out", out], "--data_dir")
    fails(capsys, ["appendix", "--data_dir", str(tmp_path / "none"), "--out", out],
          "--data_dir", "not a folder")


# Two runs of the appendix recipe on the toy world, with tiny windows and few candidates.
TINY = ["--max_len", "16", "--num_cands", "4", "--k", "4", "--B", "16", "--lr", "1e-3",
        "--epochs", "2", "--mention_bsz", "64", "--quiet"]


def sweep_argv(toy, out):
    data_dir, bert_dir = toy
    return ["appendix", "--data_dir", data_dir, "--out", str(out), "--pretrained", bert_dir,
            "--only", "dual_p0", "dual_p100", "--", *TINY]


@pytest.mark.slow
def test_tiny_sweep_runs_skips_finished_and_resumes_interrupted(toy, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per run on a shared machine
    out = tmp_path / "sweep"
    saved = out / "dual_p100.pt.results.json"  # written after the epoch's checkpoint and .last
    # First pass: dual_p0 finishes; dual_p100 is killed (the whole sweep, as a lost machine or a
    # Ctrl-C would) as soon as its first epoch is saved.
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sweep.py"),
                             *sweep_argv(toy, out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while not saved.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    first = proc.communicate()[0].decode()
    assert saved.exists() and (out / "dual_p100.pt.last").exists(), first[-3000:]
    assert read_json(out / "dual_p0.pt.results.json")["test"] is not None
    interrupted = read_json(out / "dual_p100.pt.results.json")
    assert interrupted["test"] is None, "the run finished before it could be interrupted"
    assert [e["epoch"] for e in interrupted["val"]] == [1]

    # Second pass: the finished run is skipped, the interrupted one continues from its epoch 1.
    assert sweep.main(sweep_argv(toy, out)) == 0
    second = capsys.readouterr().out
    assert "dual_p0: finished already, skipped" in second
    assert "dual_p100 (resumed)" in second and "--resume_training" in second
    done = read_json(out / "dual_p100.pt.results.json")
    assert [e["epoch"] for e in done["val"]] == [1, 2] and done["test"] is not None
    # the table of report.py --paper closes the sweep: the paper's dual row beside the runs'
    assert "91.08" in second and "92.05" in second
    for name in ("dual_p0", "dual_p100"):
        val = read_json(out / f"{name}.pt.results.json")["val"]
        assert f"{max(e['recall@4'] for e in val):.2f} [" in second

    # Third pass: nothing left to do; other flags for runs already on disk are refused.
    assert sweep.main(sweep_argv(toy, out)) == 0
    assert capsys.readouterr().out.count("finished already, skipped") == 2
    fails(capsys, sweep_argv(toy, out) + ["--lr", "1e-2"], "dual_p0", "other flags")

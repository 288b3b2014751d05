"""sweep.py: the recipes' command lines, flags passed through, and a tiny sweep on the toy world
that runs, skips a finished run and resumes an interrupted one."""
import fcntl
import functools
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

from conftest import (ROOT, assert_refused, fails_with, leftovers, read_json, run_in_process,
                      start_script, tree, wait_for)

import main_retriever
import sweep
from recipe import merge
from run_safety import Outputs

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


def test_blink_recipe_is_blinks_zeshel_bi_encoder(capsys, tmp_path):
    """BLINK's published Zeshel example as main_retriever.py flags: a dual encoder (one vector a
    side) with in-batch negatives, lr 1e-5, 5 epochs, windows of 128, batches of 128 in one
    optimizer step, bert-large-uncased."""
    lines = dry_run(capsys, "blink", "--data_dir", "zeshel", "--out", str(tmp_path))
    assert len(lines) == 1
    words = shlex.split(lines[0])
    assert words[:2] == ["python", "main_retriever.py"]
    flags = dict(zip(words[2::2], words[3::2]))
    assert {f: flags[f] for f in ("--type_model", "--num_mention_vecs", "--num_entity_vecs",
                                  "--type_cands", "--lr", "--epochs", "--max_len", "--B",
                                  "--gradient_accumulation_steps", "--pretrained", "--k")} == {
        "--type_model": "dual", "--num_mention_vecs": "1", "--num_entity_vecs": "1",
        "--type_cands": "in_batch", "--lr": "1e-5", "--epochs": "5", "--max_len": "128",
        "--B": "128", "--gradient_accumulation_steps": "1", "--pretrained": "bert-large-uncased",
        "--k": "64"}
    assert flags["--model"] == str(tmp_path / "blink.pt")
    assert all(words.count(f) == 1 for f in flags)
    # --pretrained of the sweep replaces the recipe's encoder
    words = shlex.split(dry_run(capsys, "blink", "--data_dir", "z", "--out", str(tmp_path),
                                "--pretrained", "enc")[0])
    assert words[words.index("--pretrained") + 1] == "enc" and words.count("--pretrained") == 1


def test_seeds_run_every_run_once_per_seed_in_its_own_folder(capsys, tmp_path):
    lines = dry_run(capsys, "paper", "--data_dir", "z", "--out", str(tmp_path), "--seeds", "1",
                    "7")
    assert len(lines) == 6
    for line, (seed, script) in zip(lines, [(s, sc) for s in (1, 7) for sc in (
            "main_retriever.py", "save_candidates.py", "main_reranker.py")]):
        words = shlex.split(line)
        assert words[1] == script
        paths = [w for w in words if w.startswith(str(tmp_path))]
        assert paths and all(p.startswith(str(tmp_path / f"seed{seed}") + os.sep)
                             for p in paths), line
        # --seed for the scripts whose runs it defines; save_candidates draws nothing at random
        assert (words[words.index("--seed") + 1] if "--seed" in words else None) == \
            (None if script == "save_candidates.py" else str(seed))


def sweep_refused(capfd, argv, words, folders=(), before=None):
    code, lines, _ = run_in_process("sweep.py", [str(a) for a in argv], capfd)
    return assert_refused(code, lines, words, folders, before)


@pytest.mark.parametrize("argv, words", [
    (["paper", "--data_dir", "z", "--out", "{out}", "--dry_run", "--no_such", "1"],
     ["--no_such"]),
    (["appendix", "--data_dir", "z", "--out", "{out}", "--only", "dual_p10"],
     ["--only", "dual_p10"]),
    (["appendix", "--out", "{out}"], ["--data_dir"]),
    (["appendix", "--data_dir", "{out}/none", "--out", "{out}"], ["--data_dir", "not a folder"]),
    (["appendix", "--data_dir", "z", "--out", "{out}", "--seeds", "1", "2", "1"],
     ["--seeds", "twice"]),
    (["appendix", "--data_dir", "z", "--out", "{out}", "--seeds", "x"], ["--seeds"]),
    (["appendix", "--data_dir", "z", "--out", "{out}", "--nproc_per_node", "0"],
     ["--nproc_per_node"]),
    (["appendix", "--data_dir", "z", "--out", "{out}", "--", "--no_such_flag"],
     ["--no_such_flag", "no script"]),
])
def test_user_mistakes_are_one_line(argv, words, capfd, tmp_path):
    before = tree(tmp_path)
    sweep_refused(capfd, [a.format(out=tmp_path) for a in argv], words, [tmp_path], [before])


# Two runs of the appendix recipe on the toy world, with tiny windows and few candidates.
TINY = ["--max_len", "16", "--num_cands", "4", "--k", "4", "--B", "16", "--lr", "1e-3",
        "--epochs", "2", "--mention_bsz", "64", "--quiet"]


def sweep_argv(toy, out, only=("dual_p0", "dual_p100"), extra=()):
    data_dir, bert_dir = toy
    return ["appendix", "--data_dir", data_dir, "--out", str(out), "--pretrained", bert_dir,
            "--only", *only, *extra, "--", *TINY]


def finished_run(toy, out, name, flags=(), tool="main_retriever", test=True):
    """A finished retriever run of the tiny sweep as main_retriever.py records it (its results
    file and its folder's record), written in this process: the flags the sweep would give
    (`flags` on top)."""
    argv = [a for a in sweep_argv(toy, out, (name,))]
    run = next(r for r in sweep.expand(sweep.parse_args(argv)))
    run.args = merge(run.args, list(flags))
    parser = main_retriever.build_parser()
    description = {"tool": tool, "flags": parser.defining(parser.parse_args(run.args)),
                   "inputs": {"data_dir": {"path": toy[0], "content": {"train": "x"}},
                              "pretrained": {"path": toy[1], "content": {"config": "x"}}}}
    outputs = Outputs(tool, overwrite=True)
    outputs.add(run.done_file, "--model", "results")
    outputs.claim(description)
    entry = {"epoch": 1, "recall@4": 50.0, "accuracy": 20.0}
    outputs.write_json({"k": 4, "val": [entry], "test": entry if test else None,
                        "script": tool, "args": description["flags"]}, run.done_file)
    return run.done_file


def test_a_sweep_knows_its_runs_by_the_flags_they_recorded(toy, tmp_path, capfd):
    """Finished runs recorded with the flags the sweep gives are skipped (no process starts);
    one recorded with another flag, a results file this project did not write, or another
    sweep holding --out stop the sweep in one line naming the run and the flag, with nothing
    changed; a stray sweep.json (the former sweep's record, even a list) plays no part."""
    out = tmp_path / "sweep"
    for name in ("dual_p0", "dual_p100"):
        finished_run(toy, out, name)
    (out / "sweep.json").write_text("[1, 2]")
    code, lines, printed = run_in_process("sweep.py", sweep_argv(toy, out), capfd)
    assert code == 0 and lines == [], lines
    assert printed.count("finished already, skipped") == 2 and "| dual |" in printed
    assert sorted(os.listdir(out)) == [".hard-nce-el.record", "dual_p0.pt.results.json",
                                       "dual_p100.pt.results.json", "sweep.json"]  # no lock left

    before = tree(out)
    sweep_refused(capfd, sweep_argv(toy, out) + ["--lr", "1e-2"],
                  ["dual_p0", "--lr 0.001", "--lr 0.01"], [out], [before])
    sweep_refused(capfd, sweep_argv(toy, out, extra=["--pretrained", toy[0]]),
                  ["dual_p0", "--pretrained", toy[0], toy[1]], [out], [before])
    sweep_refused(capfd, sweep_argv(toy, out, extra=["--data_dir", toy[1]]),
                  ["dual_p0", "--data_dir", toy[0], toy[1]], [out], [before])
    finished_run(toy, out, "dual_p100", ["--epochs", "3"])
    before = tree(out)
    sweep_refused(capfd, sweep_argv(toy, out), ["dual_p100", "--epochs 3", "--epochs 2"], [out],
                  [before])
    finished_run(toy, out, "dual_p100", tool="main_reranker")  # another script's file
    (out / "dual_p0.pt.results.json").write_text('{"k": 4, "val": [], "test": null}')
    before = tree(out)
    sweep_refused(capfd, sweep_argv(toy, out), ["dual_p0", "dual_p0.pt.results.json",
                                                "not written by a run of main_retriever.py"],
                  [out], [before])
    (out / "dual_p0.pt.results.json").unlink()
    before = tree(out)
    sweep_refused(capfd, sweep_argv(toy, out), ["dual_p100", "main_retriever.py"], [out],
                  [before])

    # a second sweep into the same --out is refused at once
    with open(out / "sweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = tree(out)
        sweep_refused(capfd, sweep_argv(toy, out), ["--out", "another run", "sweep.lock"], [out],
                      [before])


@pytest.mark.slow
def test_tiny_sweep_runs_skips_finished_and_resumes_interrupted(toy, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per run on a shared machine
    out = tmp_path / "sweep"
    saved = out / "dual_p100.pt.results.json"  # written after the epoch's checkpoint and .last
    # First pass: dual_p0 finishes; dual_p100 is killed (the whole sweep, as a lost machine
    # would) as soon as its first epoch is saved.
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

    # Second pass: the finished run is skipped, the interrupted one continues from its epoch 1
    # (the killed sweep's lock and the run's are taken over).
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
        assert f"{max(e['recall@4'] for e in val):.2f} (n = 1) [" in second

    # Third pass: nothing left to do; other flags for runs already on disk are refused.
    assert sweep.main(sweep_argv(toy, out)) == 0
    assert capsys.readouterr().out.count("finished already, skipped") == 2
    fails(capsys, sweep_argv(toy, out) + ["--lr", "1e-2"], "dual_p0", "--lr")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_to_the_sweep_stops_its_run_whole_and_the_sweep_continues_it(
        toy, tmp_path, capsys, monkeypatch, signum):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler) to sweep.py alone is passed on to its run, which
    stops after the file it is writing; the sweep waits for it and ends in one line, status 128 +
    the signal: the run's files whole, no temporary file, no lock; the same sweep again
    continues the run from its last saved epoch."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    argv = sweep_argv(toy, out, ("dual_p50",)) + ["--epochs", "4"]
    proc = start_script("sweep.py", *argv)
    results = out / "dual_p50.pt.results.json"
    wait_for(proc, results.exists, "epoch 1 of dual_p50 saved", timeout=600)
    proc.send_signal(signum)  # to the sweep alone, while its run trains epoch 2
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 128 + signum, err[-3000:]
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1] == (f"stopped by {name}: dual_p50 was stopped after the "
                                           f"file it was writing; running the same sweep again "
                                           f"continues it")
    assert "Traceback" not in err and f"stopped by {name} after epoch" in err
    assert not leftovers(out), leftovers(out)
    stopped = read_json(results)
    assert stopped["test"] is None and [e["epoch"] for e in stopped["val"]][0] == 1
    state = torch.load(out / "dual_p50.pt.last", weights_only=True)
    assert state["epoch"] == stopped["val"][-1]["epoch"]

    assert sweep.main(argv) == 0
    assert "dual_p50 (resumed)" in capsys.readouterr().out
    done = read_json(results)
    assert [e["epoch"] for e in done["val"]] == [1, 2, 3, 4] and done["test"] is not None


@pytest.mark.slow
def test_a_three_seed_sweep_shows_mean_and_sd_in_the_papers_tables(toy, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    assert sweep.main(sweep_argv(toy, out, ("dual_p0",), ["--seeds", "1", "2", "3"])
                      + ["--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    vals = [max(e["recall@4"] for e in read_json(out / f"seed{s}" / "dual_p0.pt.results.json")
                ["val"]) for s in (1, 2, 3)]
    assert len(set(vals)) > 1, "the seeds gave the same numbers"
    dual = next(line for line in printed.splitlines() if line.startswith("| dual |"))
    assert dual.split(" | ")[1].startswith(
        f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f} (n = 3) [1] / 91.08")
    assert "sweep/dual_p0.pt (seeds 1, 2, 3)" in printed
    for s in (1, 2, 3):
        args = read_json(out / f"seed{s}" / "dual_p0.pt.results.json")["args"]
        assert args["seed"] == s

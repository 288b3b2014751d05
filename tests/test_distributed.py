"""torchrun on the CPU (Gloo): two processes on one node, and two nodes on this machine.

Entity scoring is sharded over processes and the top-k lists merged, so the candidates of a
distributed run must be identical to a single-process run's; training splits each batch over the
processes, so its metrics must be close to a single-process run with the same total batch.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, SCRIPT_ENV, run_script

pytestmark = pytest.mark.slow  # real torchrun processes

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, nproc=2, nnodes=1, timeout=600):
    """Run `script` under torchrun: `nproc` processes on one node, or `nnodes` nodes of one
    process each, all on 127.0.0.1. Returns the CompletedProcess of node 0 (all must succeed)."""
    env = {**os.environ, **SCRIPT_ENV}
    base = [sys.executable, "-m", "torch.distributed.run"]
    script_args = [os.path.join(ROOT, script), *map(str, args)]
    if nnodes == 1:
        cmd = base + ["--standalone", f"--nproc_per_node={nproc}"] + script_args
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    port = free_port()
    procs = [subprocess.Popen(base + [f"--nnodes={nnodes}", f"--node_rank={r}", "--nproc_per_node=1",
                                      "--master_addr=127.0.0.1", f"--master_port={port}"] + script_args,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=ROOT) for r in range(nnodes)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(procs[0].args, 0, outs[0][0], outs[0][1])


def ok(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


RETRIEVER = ["--max_len", 32, "--type_model", "sum_max", "--num_mention_vecs", 4,
             "--num_entity_vecs", 4, "--k", 16, "--entity_bsz", 40, "--mention_bsz", 64, "--quiet"]


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """A retriever trained one epoch in one process: the checkpoint and its results."""
    data_dir, bert_dir = toy
    out = tmp_path_factory.mktemp("dist_single")
    model = str(out / "ret.pt")
    ok(run_script("main_retriever.py", "--model", model, "--data_dir", data_dir, "--pretrained",
                  bert_dir, "--epochs", 1, "--B", 8, "--lr", 1e-3, "--num_cands", 8,
                  "--cands_ratio", 0.5, *RETRIEVER))
    with open(model + ".results.json") as f:
        return model, json.load(f)


def read_candidates_dir(folder):
    out = {}
    for split in ("train", "val", "test"):
        with open(os.path.join(folder, f"candidates_{split}.json")) as f:
            out[split] = f.read()
    return out


def candidates_args(toy, model, folder):
    return ["--model", model, "--data_dir", toy[0], "--pretrained", toy[1], "--num_cands", 16,
            "--cands_dir", folder, "--entity_bsz", 40, "--mention_bsz", 64, "--quiet"]


@pytest.fixture(scope="module")
def single_candidates(toy, trained, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("cands_single"))
    ok(run_script("save_candidates.py", *candidates_args(toy, trained[0], folder)))
    return read_candidates_dir(folder)


def test_candidates_two_processes_identical(toy, trained, single_candidates, tmp_path):
    folder = str(tmp_path / "cands")
    ok(torchrun("save_candidates.py", *candidates_args(toy, trained[0], folder), nproc=2))
    assert read_candidates_dir(folder) == single_candidates
    assert sorted(os.listdir(folder)) == [".hard-nce-el.record", "candidates_test.json",
                                          "candidates_train.json", "candidates_val.json",
                                          "recall.json", "save_candidates.log"]


def test_candidates_two_nodes_identical(toy, trained, single_candidates, tmp_path):
    folder = str(tmp_path / "cands")
    ok(torchrun("save_candidates.py", *candidates_args(toy, trained[0], folder), nnodes=2))
    assert read_candidates_dir(folder) == single_candidates


@pytest.mark.parametrize("nodes", [1, 2])
def test_retriever_distributed_close_to_single(toy, trained, tmp_path, nodes):
    data_dir, bert_dir = toy
    model = str(tmp_path / "ret.pt")
    r = ok(torchrun("main_retriever.py", "--model", model, "--data_dir", data_dir, "--pretrained",
                    bert_dir, "--epochs", 1, "--B", 8, "--lr", 1e-3, "--num_cands", 8,
                    "--cands_ratio", 0.5, *RETRIEVER, nproc=2 if nodes == 1 else 1, nnodes=nodes))
    with open(model + ".results.json") as f:
        dist = json.load(f)
    single = trained[1]
    for split in ("val", "test"):
        a = dist[split][-1] if split == "val" else dist[split]
        b = single[split][-1] if split == "val" else single[split]
        assert abs(a["recall@16"] - b["recall@16"]) <= 5.0, (split, a["recall@16"], b["recall@16"])
    # one process writes: one log, one results file, the checkpoints
    assert sorted(os.listdir(tmp_path)) == [".hard-nce-el.record", "ret.pt", "ret.pt.last",
                                            "ret.pt.log", "ret.pt.results.json"]
    assert "2 processes" in open(model + ".log").read()


def test_reranker_two_processes_close_to_single(toy, trained, single_candidates, tmp_path):
    data_dir, bert_dir = toy
    cands = str(tmp_path / "cands")
    ok(run_script("save_candidates.py", *candidates_args(toy, trained[0], cands)))
    common = ["--data", data_dir, "--cands_dir", cands, "--pretrained", bert_dir, "--L", 48,
              "--C", 8, "--C_eval", 8, "--B", 4, "--lr", 1e-3, "--epochs", 1, "--quiet"]
    single, dist = str(tmp_path / "single.pt"), str(tmp_path / "dist.pt")
    ok(run_script("main_reranker.py", "--model", single, *common))
    ok(torchrun("main_reranker.py", "--model", dist, *common, nproc=2))
    with open(single + ".results.json") as f:
        a = json.load(f)
    with open(dist + ".results.json") as f:
        b = json.load(f)
    for split in ("val", "test"):
        ea = a[split][-1] if split == "val" else a[split]
        eb = b[split][-1] if split == "val" else b[split]
        assert abs(ea["acc_unorm"] - eb["acc_unorm"]) <= 6.0, (split, ea["acc_unorm"], eb["acc_unorm"])
    assert "2 processes" in open(dist + ".log").read()


@pytest.fixture(scope="module")
def bert_without_dropout(toy, tmp_path_factory):
    """The toy BERT with its dropout off: with dropout each process draws its own masks, so only
    a run without it can be the same in 1 and 2 processes to the last digit."""
    import shutil
    folder = str(tmp_path_factory.mktemp("bert") / "bert")
    shutil.copytree(toy[1], folder)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


@pytest.mark.parametrize("type_cands", ["in_batch", "in_batch_hard"])
def test_in_batch_negatives_the_same_in_one_and_two_processes(toy, bert_without_dropout,
                                                              tmp_path, type_cands):
    """--type_cands in_batch: the golds of the whole batch are every mention's negatives in any
    number of processes (each process's golds gathered with their gradients), so 2 processes
    log the losses of 1 and end with its recall; and training beats the untrained retriever.
    in_batch_hard: the same with 2 random and 2 mined negatives on top."""
    common = ["--data_dir", toy[0], "--pretrained", bert_without_dropout, "--B", 8, "--lr", 1e-3,
              "--type_cands", type_cands, "--num_cands", 4, "--cands_ratio", 0.5,
              "--logging_steps", 6, "--max_len", 16, "--k", 8,
              "--type_model", "sum_max", "--num_mention_vecs", 8, "--num_entity_vecs", 8,
              "--quiet"]
    runs = {}
    for name, epochs, nproc in (("untrained", 0, 1), ("one", 1, 1), ("two", 1, 2)):
        model = str(tmp_path / f"{name}.pt")
        argv = ["--model", model, "--epochs", epochs, *common]
        ok(run_script("main_retriever.py", *argv) if nproc == 1 else
           torchrun("main_retriever.py", *argv, nproc=nproc))
        with open(model + ".results.json") as f:
            runs[name] = json.load(f)
    one, two = runs["one"], runs["two"]
    assert len(one["losses"]) == 9 and one["losses"] == pytest.approx(two["losses"], abs=1e-4)
    for key in ("recall@8", "accuracy"):
        assert one["test"][key] == two["test"][key], (key, one["test"], two["test"])
        assert one["val"][-1][key] == two["val"][-1][key]
    assert one["test"]["recall@8"] >= runs["untrained"]["test"]["recall@8"] + 30

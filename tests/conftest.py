import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# The long end-to-end checks (each 10 s or more on 2 cores): marked slow, so that `make test`
# stays within minutes; `make test-slow` runs them, and CI runs both.
SLOW = (
    "test_reranker_run.py::test_one_epoch_of_a_real_bert_beats_chance",
    "test_reranker_run.py::test_resume_ends_as_uninterrupted",
    "test_reranker_run.py::test_fp16_runs_on_cpu",
    "test_reranker_run.py::test_retriever_scorer_runs_over_the_candidates",
    "test_retriever_run.py::test_resumed_run_ends_where_the_uninterrupted_one_does",
    "test_retriever_run.py::test_save_candidates_ranks_each_world_as_scoring_by_hand",
    "test_distributed.py::",
    "test_crash_safety.py::test_killed_run_resumes_to_the_uninterrupted_results",
    "test_run_safety.py::test_killed_save_candidates_leaves_a_folder_the_reranker_refuses",
    "test_run_safety.py::test_signal_stops_cleanly_and_resume_continues",
    "test_run_safety.py::test_a_loss_gone_non_finite_after_a_saved_epoch_leaves_it_intact",
    "test_sweep.py::test_tiny_sweep_runs_skips_finished_and_resumes_interrupted",
    "test_demo.py::test_demo_shows_mixed_hard_negatives_ahead_for_every_seed",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in item.nodeid for name in SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The bundled toy world, built once per test session: (data_dir, bert_dir)."""
    from toy_world import make_toy_world
    return make_toy_world(str(tmp_path_factory.mktemp("toy")))


def run_script(script, *args, env=None, cwd=ROOT, timeout=600):
    """Run one of the repository's scripts in a subprocess: CompletedProcess with text output."""
    # One torch thread per run: on a shared 2-core machine, spinning threads made runs 3x slower.
    full_env = dict(os.environ, PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false",
                    HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout)


def write_candidates(data_dir, cands_dir, C, seed=0):
    """`cands_dir/candidates_<split>.json` for train, val and test, as save_candidates.py writes
    them: for each mention, C document ids of its world in a fixed pseudo-random order, the gold
    among them for about three mentions in four. Returns `cands_dir`."""
    import json
    import random
    os.makedirs(cands_dir, exist_ok=True)
    docs = {}
    for name in sorted(os.listdir(os.path.join(data_dir, "documents"))):
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

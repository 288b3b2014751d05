import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


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

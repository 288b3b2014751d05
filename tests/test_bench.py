"""bench.py's command line: every mistake refused in one line before any measurement, nothing
written (the figures it measures are the benchmark's own; its numbers are not asserted here)."""
import pytest

import bench
from conftest import assert_refused, run_in_process, tree

REFUSED = [
    (["--device", "gpu"], ["--device", "gpu", "not a device name"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--device", "mps"], ["--device", "mps", "cpu and cuda"]),
    (["--device", "cpu:x"], ["--device", "cpu:x"]),
    (["--device", "cuda:99"], ["--device", "cuda:99"]),
    (["--sizes", "huge"], ["--sizes", "huge"]),
    (["--dtype", "float16"], ["--dtype", "float16"]),
    (["--no_such_flag"], ["--no_such_flag"]),
    (["--out", "{tmp}"], ["--out", "is a folder"]),
    (["--out", "{tmp}/"], ["--out", "is a folder"]),
    (["--out", "/dev/null/bench.json"], ["--out", "/dev/null"]),
    (["--out", "{tmp}/mine.json"], ["--out", "mine.json", "--overwrite"]),
]


@pytest.mark.parametrize("argv, words", REFUSED, ids=[" ".join(r[0]) for r in REFUSED])
def test_mistakes_are_refused_before_any_measurement(argv, words, tmp_path, capfd):
    (tmp_path / "mine.json").write_text('{"owner": "a user"}\n')
    before = tree(tmp_path)
    code, lines, out = run_in_process("bench.py", [a.format(tmp=tmp_path) for a in argv], capfd)
    assert_refused(code, lines, words, [tmp_path], [before])
    assert out == ""


def test_the_default_device_and_cpu_are_accepted():
    assert bench.bench_device(None).type in ("cpu", "cuda")
    assert bench.bench_device("cpu").type == "cpu"

"""`make`'s install step puts torch first when it is missing: the default (CUDA) build where an
NVIDIA driver is found, else the CPU build, from a wheel pip already offers without an index when
there is one, else from PyTorch's CPU index. Checked with a stand-in Python that records what it is
asked to do (no real install)."""
import os
import shutil
import stat
import subprocess

import pytest

from conftest import ROOT

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "{log}"
case "$*" in
  "-c import torch") exit {torch_missing} ;;
  *--no-index*) exit {no_local_wheel} ;;
esac
exit 0
"""


def make_torch(tmp_path, torch_installed=False, local_wheel=False, nvidia=False):
    """Run `make torch` with the stand-in Python; returns (the calls it got, make's output)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(FAKE_PYTHON.format(log=log, torch_missing=0 if torch_installed else 1,
                                       no_local_wheel=0 if local_wheel else 1))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    if nvidia:
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\nexit 0\n")
        smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    if os.path.isdir("/proc/driver/nvidia") and not nvidia:
        pytest.skip("this machine has an NVIDIA driver")
    # PATH: the stand-ins first, then only what make's recipe needs from the system (sh, echo, [),
    # so that a real nvidia-smi elsewhere on PATH does not count
    path = f"{bin_dir}:/usr/bin:/bin"
    out = subprocess.run(["make", "-s", "torch", f"PYTHON={fake}"], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PATH=path), timeout=60)
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return calls, out.stdout + out.stderr


def test_torch_present_installs_nothing(tmp_path):
    calls, _ = make_torch(tmp_path, torch_installed=True)
    assert calls == ["-c import torch"]


def test_cpu_machine_takes_a_local_cpu_wheel_first(tmp_path):
    calls, said = make_torch(tmp_path, local_wheel=True)
    assert calls == ["-c import torch", "-m pip install -q --no-index --no-deps torch",
                     "-m pip install -q torch"]  # the second: torch's own dependencies
    assert "CPU build found locally" in said


def test_cpu_machine_without_a_local_wheel_uses_the_cpu_index(tmp_path):
    calls, said = make_torch(tmp_path)
    assert calls[-1] == "-m pip install -q torch --index-url https://download.pytorch.org/whl/cpu"
    assert len(calls) == 3 and "--no-index" in calls[1]
    assert "CPU build" in said


def test_nvidia_machine_gets_the_default_build(tmp_path):
    calls, said = make_torch(tmp_path, local_wheel=True, nvidia=True)
    assert calls == ["-c import torch", "-m pip install -q torch"]
    assert "CUDA" in said


def test_requirements_do_not_force_a_recent_torch():
    """A cluster's torch 2.4 or later satisfies requirements.txt (no forced upgrade), and the
    transformers bound admits 4.x and 5.x."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        reqs = {line.split(">=")[0].strip(): line.strip() for line in f
                if line.strip() and not line.startswith("#")}
    assert reqs["torch"] == "torch>=2.4"
    assert reqs["transformers"] == "transformers>=4.41,<6"
    with open(os.path.join(ROOT, ".ci", "oldest-requirements.txt")) as f:
        oldest = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert "transformers==4.41.2" in oldest  # what CI runs the suite under

"""`make`'s install step puts torch first when it is missing: the default (CUDA) build where an
NVIDIA driver is found, else the CPU build, from a wheel pip already offers without an index when
there is one, else from PyTorch's CPU index. Checked by running `make` with a stand-in Python that
records what it is asked to do (no real install; slow: it starts processes). And what the
requirements files admit."""
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


@pytest.mark.slow
def test_torch_present_installs_nothing(tmp_path):
    calls, _ = make_torch(tmp_path, torch_installed=True)
    assert calls == ["-c import torch"]


@pytest.mark.slow
def test_cpu_machine_takes_a_local_cpu_wheel_first(tmp_path):
    calls, said = make_torch(tmp_path, local_wheel=True)
    assert calls == ["-c import torch", "-m pip install -q --no-index --no-deps torch",
                     "-m pip install -q torch"]  # the second: torch's own dependencies
    assert "CPU build found locally" in said


@pytest.mark.slow
def test_cpu_machine_without_a_local_wheel_uses_the_cpu_index(tmp_path):
    calls, said = make_torch(tmp_path)
    assert calls[-1] == "-m pip install -q torch --index-url https://download.pytorch.org/whl/cpu"
    assert len(calls) == 3 and "--no-index" in calls[1]
    assert "CPU build" in said


@pytest.mark.slow
def test_nvidia_machine_gets_the_default_build(tmp_path):
    calls, said = make_torch(tmp_path, local_wheel=True, nvidia=True)
    assert calls == ["-c import torch", "-m pip install -q torch"]
    assert "CUDA" in said


def requirements(name):
    """{package: packaging Requirement} of a requirements file of the repository."""
    from packaging.requirements import Requirement
    with open(os.path.join(ROOT, name)) as f:
        reqs = [Requirement(line) for line in (x.split("#")[0].strip() for x in f) if line]
    return {r.name: r for r in reqs}


@pytest.mark.parametrize("package,version,admitted", [
    ("torch", "2.4.0", True),           # a cluster's torch 2.4 is not upgraded
    ("torch", "2.13.0", True),
    ("torch", "2.3.1", False),          # too old for what the code uses
    ("transformers", "4.41.2", True),   # what CI's oldest set runs the suite under
    ("transformers", "5.25.0", True),
    ("transformers", "4.40.2", False),  # no SDPA attention for BERT
    ("transformers", "6.0.0", False),
])
def test_requirements_admit_the_versions_the_code_runs_on(package, version, admitted):
    """What `pip install -r requirements.txt` accepts: a cluster's torch 2.4 or later stays,
    transformers 4.x from 4.41 and 5.x are taken."""
    assert requirements("requirements.txt")[package].specifier.contains(version) == admitted


def test_the_oldest_set_ci_runs_is_one_the_requirements_admit():
    """Each package pinned in .ci/oldest-requirements.txt (CI runs the fast suite under it)
    satisfies requirements.txt, so the suite is run at the lower bounds the requirements
    declare."""
    wanted = requirements("requirements.txt")
    oldest = requirements(os.path.join(".ci", "oldest-requirements.txt"))
    assert set(wanted) <= set(oldest) | {"torch"}, set(wanted) - set(oldest)
    for name, pin in oldest.items():
        (version,) = [s.version for s in pin.specifier]
        if name in wanted:
            assert wanted[name].specifier.contains(version), (name, version)

"""``cf_drop_packed`` (kernels_cu/cf_drop_packed.cuh: the forward's ``CF_DROP_PACKED``,
selected by registry.FWD90_DROP_PACKED) checked on the CPU: the header compiled for the host
with a C++20 compiler, the warp's lanes as threads, must give the words that dropping the
floats first and packing give, and each element's kept flag must be ``cf_dropout_byte >=
threshold``. The GPU side: tests/test_gpu_fwd_drop_early.py. Skipped where no C++20 compiler
is found.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cuflash import compiler

HARNESS = Path(__file__).parent / "host_cpp" / "drop_packed_check.cpp"


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine")
    exe = tmp_path_factory.mktemp("drop_packed") / "check"
    built = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", f"-I{compiler.kernels_dir()}",
                            "-o", str(exe), str(HARNESS)], capture_output=True, text=True)
    if built.returncode and "barrier" in built.stderr:
        pytest.skip(f"{cxx} lacks C++20's <barrier>")
    assert built.returncode == 0, built.stderr[-3000:]
    return exe


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_drop_packed_equals_dropping_before_packing(harness, seed):
    run = subprocess.run([str(harness), str(seed)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "mismatches 0" in run.stdout, run.stdout

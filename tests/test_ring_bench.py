"""bench/ring_scaling.py end to end on CPU processes with gloo (its ``--cpu`` mode).

The script is written for GPUs and NCCL; this runs the same code path (spawn, rendezvous,
validation against one-device cuflash, timing loop, report, JSON) on two CPU processes so a
broken script shows up in CI rather than on the first multi-GPU machine. Slow (~10 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "ring_scaling.py"


@pytest.mark.slow
def test_ring_scaling_runs_on_cpu_processes(tmp_path):
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--gpus", "2", "--seqlens", "512",
         "--validate-seqlen", "256", "--heads", "2", "--head-dim", "64", "--iters", "1",
         "--warmup", "1", "--out-dir", str(tmp_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    (result,) = tmp_path.glob("ring_scaling_cpu_*.json")
    data = json.loads(result.read_text())
    assert all(v["ok"] for v in data["validation"].values())
    assert {r["world_size"] for r in data["rows"]} == {1, 2}
    assert all("fwd_bwd_ms" in r for r in data["rows"])

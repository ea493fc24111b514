"""bench/attention_sweep.py's validation (cuflash.testing's rule on one head), on the CPU path."""

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import attention_sweep as sweep  # noqa: E402

import cuflash  # noqa: E402


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_validation_passes_cuflash_and_catches_a_wrong_output(direction):
    cfg = sweep.Config("bf16", 64, 96, True, batch=2, heads=2)
    inputs = sweep.Inputs(*(torch.randn(2, 96, 2, 64, dtype=torch.bfloat16) for _ in range(4)))
    o, stats = cuflash.attention_forward(inputs.q, inputs.k, inputs.v, causal=True)
    ours = o if direction == "fwd" else cuflash.attention_backward(
        inputs.do, inputs.q, inputs.k, inputs.v, o, stats, causal=True)
    assert sweep._validate(ours, cfg, direction, inputs)["status"] == "ok"
    wrong = ours * 1.05 if direction == "fwd" else tuple(x * 1.05 for x in ours)
    assert sweep._validate(wrong, cfg, direction, inputs)["status"] == "INVALID"
    assert sweep._validate(None, cfg, direction, inputs)["status"] == "not validated"

"""bench/dev/decode16.py without a GPU: its candidate table, and one whole run of the suite
with CPU tensors standing in for CUDA ones and the launches, timers and compiler stubbed (the
plumbing: every part, every record, the table and the JSON), so the one GPU call it is made
for does not die on a typo."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from cuflash import compiler, decode
from cuflash.specs import DeviceFacts

DEV = Path(__file__).resolve().parent.parent / "bench" / "dev"
H200 = DeviceFacts("H200 (stand-in)", "sm_90", 132, 232448)


@pytest.fixture
def decode16(monkeypatch):
    monkeypatch.syspath_prepend(str(DEV.parent))
    monkeypatch.syspath_prepend(str(DEV))
    for name in ("decode16", "decode_variants"):
        sys.modules.pop(name, None)
    import decode16 as module

    return module


def test_candidates_are_valid_specs(decode16):
    for rows in (4, 8, 16, 32):
        specs = decode16._candidates(decode, rows)
        assert specs["selected"] == decode.select_decode("bfloat16", 128, rows)
        assert len({s.name for s in specs.values()}) == len(specs)
    assert {"plain", "row_block", "s2", "w4b2"} <= set(decode16._candidates(decode, 32))
    assert {"paged_sel", "paged_row_block", "s3"} <= set(decode16._candidates(decode, 16))
    assert list(decode16._candidates(decode, 1)) == ["selected"]  # SIMT: nothing to vary


def _cpu_torch():
    """torch with device="cuda" read as the CPU, and the CUDA calls the suite makes stubbed."""
    import torch

    shim = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch)
                                    if not n.startswith("__")})
    on_cpu = lambda fn: (lambda *a, **k: fn(*a, **{**k, "device": "cpu"}) if "device" in k
                         else fn(*a, **k))
    for name in ("randn", "full", "tensor", "empty", "randperm", "Generator"):
        setattr(shim, name, on_cpu(getattr(torch, name)))
    shim.cuda = types.SimpleNamespace(synchronize=lambda: None, empty_cache=lambda: None,
                                      get_device_name=lambda: "CPU stand-in",
                                      current_device=lambda: 0,
                                      current_stream=lambda *device: types.SimpleNamespace(
                                          cuda_stream=0))
    return shim


def test_suite_runs_end_to_end_on_stand_ins(decode16, monkeypatch, tmp_path):
    shim = _cpu_torch()
    monkeypatch.setitem(sys.modules, "torch", shim)
    monkeypatch.setattr("cuflash.launch.device_facts", lambda index: H200)
    report = lambda spec: compiler.CompileReport(spec.name, "sm_90", "flash_decode_split", 168,
                                                 0, 0, 0, 0, spec.smem_bytes, 0.0)
    monkeypatch.setattr(decode16, "_compile_all", lambda specs, arch: {s.name: report(s)
                                                                       for s in specs})

    def pinned(torch, spec, q, k, v, given=None, causal=False, num_splits=None):
        paged = given and "block_table" in given
        shape = decode.DecodeShape(q.shape[0], q.shape[1], k.shape[1] * (
            given["block_table"].shape[1] if paged else 1), q.shape[2], k.shape[2],
            q.shape[3], "bfloat16", k.shape[1] if paged else 0)
        plan = decode.plan_decode(shape, H200.sm_count, num_splits, spec=spec)
        return (lambda: q * 0), plan

    monkeypatch.setattr(decode16, "_pinned_call", pinned)
    monkeypatch.setattr(decode16, "_cudnn_call", lambda torch, q, k, v, gqa: lambda: q * 0)
    monkeypatch.setattr(decode16, "_graph_of", lambda torch, call: types.SimpleNamespace(
        replay=call))
    monkeypatch.setattr(decode16, "_median_ms", lambda torch, fn, reps: (fn(), 1.0)[1])
    small = [(1, 512, 8), (2, 256, 8)]  # small stand-in problems, the real code paths
    monkeypatch.setattr(decode16, "GQA_ROWS", small)
    monkeypatch.setattr(decode16, "ANCHOR_ROWS", [(1, 256, 32)])
    monkeypatch.setattr(decode16, "QLEN_ROWS", small)
    monkeypatch.setattr(decode16, "PAGED_ROW", (2, 512, 8))
    out = tmp_path / "d16.json"
    assert decode16.run_suite(2, str(out)) == 0
    data = json.loads(out.read_text())
    parts = {r["part"] for r in data["results"]}
    assert parts == {"gqa", "qlen", "paged", "ragged"}
    errors = [r for r in data["results"] if "error" in r]
    assert not errors, errors
    variants = {r["variant"] for r in data["results"]}
    assert {"cudnn", "selected", "plain", "wt", "row_block", "paged_sel", "paged_row_block",
            "splits/2"} <= variants

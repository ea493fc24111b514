"""Programmatic dependent launch (cuflash/pdl.py) on the CPU: the ctypes structs have
cuda.h's layout, a dependent launch hands the driver the grid, block, shared memory, stream
and the one attribute, and decode's combine is launched that way only with ``decode.PDL``
on a Hopper, in direct calls and in replays alike. On the GPU: tests/test_gpu_decode_pdl.py."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from cuflash import decode, launch, pdl
from host_backend import NumpyBackend

_HOPPER = launch.DeviceFacts(name="test", arch="sm_90", sm_count=132, smem_optin=227 * 1024)
_AMPERE = launch.DeviceFacts(name="test", arch="sm_80", sm_count=108, smem_optin=163 * 1024)


def test_structs_have_the_drivers_layout():
    """cuda.h (CUDA 12 / 13): CUlaunchAttribute is a 4-byte id, 4 bytes of padding and a
    64-byte union; CUlaunchConfig seven unsigned ints, then the stream, the attributes'
    pointer and their count."""
    assert ctypes.sizeof(pdl.LaunchAttribute) == 72
    assert pdl.LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(pdl.LaunchConfig) == 56
    offsets = [getattr(pdl.LaunchConfig, f).offset for f, _ in pdl.LaunchConfig._fields_]
    assert offsets == [0, 4, 8, 12, 16, 20, 24, 32, 40, 48]


def test_a_dependent_launch_hands_the_driver_its_config(monkeypatch):
    seen = []

    def driver(config, function, params, extra):
        c = pdl.LaunchConfig.from_address(config)
        attr = c.attrs[0]
        seen.append(((c.gridDimX, c.gridDimY, c.gridDimZ), (c.blockDimX, c.blockDimY,
                    c.blockDimZ), c.sharedMemBytes, c.hStream, c.numAttrs, attr.id,
                    attr.value, function, params, extra))
        return 0

    monkeypatch.setattr(pdl, "_launch_ex", driver)
    assert pdl.launch(0xABC, (7, 2, 1), 256, 4160, 0x5000, 0x6000) == 0
    assert seen == [((7, 2, 1), (256, 1, 1), 4160, 0x5000, 1,
                     pdl.PROGRAMMATIC_STREAM_SERIALIZATION, 1, 0xABC, None, 0x6000)]


def test_a_refused_dependent_launch_names_the_kernel(monkeypatch):
    monkeypatch.setattr(pdl, "_launch_ex", lambda *args: 1)  # CUDA_ERROR_INVALID_VALUE
    with pytest.raises(launch.LaunchError, match="combine.*dependent launch.*CUresult 1"):
        launch.launch_function(1, (1, 1, 1), 32, 0, "i", (3,), 0, lambda: "combine",
                               dependent=True)


@pytest.mark.parametrize("facts, on", [(_HOPPER, True), (_AMPERE, False)])
def test_decode_selects_pdl_only_when_asked_on_hopper(monkeypatch, facts, on):
    for rows in (1, 4, 16):  # the SIMT split, then the tensor-core one
        assert not decode.select_decode("bfloat16", 128, rows, facts).pdl
        monkeypatch.setattr(decode, "PDL", True)
        spec = decode.select_decode("bfloat16", 128, rows, facts)
        assert spec.pdl == on, spec.name
        assert ("_pdl" in spec.name) == on
        assert spec.defines.get("CF_DECODE_PDL", 0) == int(on)
        monkeypatch.setattr(decode, "PDL", False)


@pytest.fixture
def launches(monkeypatch):
    """Decode's launches, direct and replayed, as (function, dependent)."""
    calls = []
    monkeypatch.setattr(launch, "launch_packed", lambda fn, *a: calls.append((fn, False)))
    monkeypatch.setattr(launch, "launch_packed_dependent", lambda fn, *a: calls.append((fn, True)))
    monkeypatch.setattr(decode, "_functions_of", lambda spec, device: (11, 22, 33))
    monkeypatch.setattr(launch, "device_facts", lambda index: _HOPPER)
    monkeypatch.setattr(decode, "PDL", True)
    monkeypatch.setattr(decode, "FUSED_COMBINE", False)  # PDL launches the combine kernel
    decode.forget_plans()
    yield calls
    decode.forget_plans()


@pytest.mark.parametrize("heads_kv", [8, 2])  # the SIMT split (one row a kv head), the mma one
def test_the_combine_alone_is_a_dependent_launch(launches, heads_kv):
    rng = np.random.default_rng(0)
    flags = dict(causal=False, softmax_scale=None, window=None, softcap=None, num_splits=4)
    for call in range(3):  # the first binds the layout; the others replay it
        q = rng.standard_normal((1, 1, 8, 64)).astype(np.float16)
        k, v = (rng.standard_normal((1, 2048, heads_kv, 64)).astype(np.float16)
                for _ in range(2))
        launches.clear()
        decode.decode_cuda(NumpyBackend(), q, k, v, {}, flags)
        assert launches == [(11, False), (22, True)], f"call {call}"


def test_one_split_launches_no_combine(launches):
    q = np.zeros((1, 1, 8, 64), np.float16)
    k = v = np.zeros((1, 256, 8, 64), np.float16)
    decode.decode_cuda(NumpyBackend(), q, k, v, {}, dict(causal=False, softmax_scale=None,
                                                         window=None, softcap=None,
                                                         num_splits=1))
    assert launches == [(11, False)]


def test_pdl_specs_compile_with_the_grid_controls():
    """sm_90: the split lets its dependents start and the combine waits, with no spill; sm_80:
    neither instruction (they need sm_90), and the kernels compile there too."""
    from dataclasses import replace

    from nvrtc_required import require_nvrtc

    require_nvrtc()
    from cuflash import compiler

    for rows in (1, 16):  # the SIMT split, the tensor-core one
        spec = replace(decode.select_decode("bfloat16", 128, rows, _HOPPER), pdl=True)
        ptx = compiler._nvrtc_ptx(spec, "sm_90").decode()
        entries = {name: ptx.split(f".entry {name}")[1].split(".entry")[0]
                   for name in ("flash_decode_split", "flash_decode_combine")}
        assert "griddepcontrol.launch_dependents" in entries["flash_decode_split"]
        assert "griddepcontrol.wait" not in entries["flash_decode_split"]
        assert "griddepcontrol.wait" in entries["flash_decode_combine"]
        assert "griddepcontrol" not in compiler._nvrtc_ptx(spec, "sm_80").decode()
        for report in compiler.compile_report(spec, "sm_90"):
            assert report.spill_stores == report.spill_loads == 0, report

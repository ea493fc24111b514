"""kernels_cu/cf_philox.cuh, the device side of cuflash/philox.py (issue #15, docs/dropout.md).

CPU: NVRTC compiles the header's test entries for sm_75, sm_80, sm_90 and sm_120 with zero
spills and no stack. GPU: the device bits equal NumPy's element for element (Random123's
known answers included through the layout), and the fragment form ``cf_dropout_keep4`` (one
Philox call per lane and two shuffles) gives the same kept-mask as ``cuflash.dropout_mask``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from cuflash import philox
from cuflash.compiler import kernels_dir, parse_ptxas_log

ARCHS = ["sm_75", "sm_80", "sm_90", "sm_120"]
ENTRIES = ("cf_philox_test_bits", "cf_philox_test_keep4")


def _source() -> str:
    return '#define CF_PHILOX_TEST 1\n#include "cf_philox.cuh"\n'


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("CuPy's NVRTC is not installed (extra 'cuda13' or 'cuda12')")
    return nvrtc


@pytest.mark.parametrize("arch", ARCHS)
def test_header_compiles_without_spills(arch):
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(_source(), "cf_philox_test.cu", [], [])
    try:
        nvrtc.compileProgram(program, ["--std=c++17", f"-I{kernels_dir()}",
                                       f"--gpu-architecture={arch}", "--ptxas-options=-v"])
        log = nvrtc.getProgramLog(program)
    except Exception as exc:
        raise AssertionError(nvrtc.getProgramLog(program)) from exc
    finally:
        nvrtc.destroyProgram(program)
    reports = parse_ptxas_log(log)
    assert set(reports) == set(ENTRIES), log
    for name, r in reports.items():
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, (name, r)


def _module():
    import cupy

    return cupy.RawModule(code=_source(), options=("--std=c++17", f"-I{kernels_dir()}"),
                          name_expressions=None)


@pytest.mark.gpu
@pytest.mark.parametrize("seed, offset", [(0, 0), (2**64 - 1, 2**32 - 1), (0x1234_5678_9ABC, 77)])
def test_device_bits_equal_numpy(seed, offset):
    import cupy

    batch, heads, rows, cols = 2, 3, 37, 45
    bits = cupy.zeros(batch * heads * rows * cols, dtype=cupy.uint32)
    kernel = _module().get_function("cf_philox_test_bits")
    threads = 256
    kernel(((bits.size + threads - 1) // threads,), (threads,),
           (bits, np.int32(batch), np.int32(heads), np.int32(rows), np.int32(cols),
            np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32), np.uint32(offset)))
    b = np.arange(batch)[:, None, None, None]
    h = np.arange(heads)[None, :, None, None]
    i = np.arange(rows)[None, None, :, None]
    j = np.arange(cols)[None, None, None, :]
    want = philox.dropout_bits(b, h, i, j, heads=heads, seed=seed, offset=offset)
    np.testing.assert_array_equal(cupy.asnumpy(bits).reshape(want.shape), want)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_fragment_form_equals_dropout_mask(p):
    import cupy

    batch, heads, rows, cols = 2, 2, 64, 48
    seed, offset = 2**40 + 3, 12
    keep = cupy.full(batch * heads * rows * cols, 7, dtype=cupy.uint8)  # poisoned
    kernel = _module().get_function("cf_philox_test_keep4")
    kernel(((rows // 16) * (cols // 8), batch * heads), (32,),
           (keep, np.int32(rows), np.int32(cols), np.uint32(seed & 0xFFFFFFFF),
            np.uint32(seed >> 32), np.uint32(offset), np.uint32(philox.keep_threshold(p))))
    want = philox.dropout_mask(batch, heads, rows, cols, dropout_p=p, seed=seed, offset=offset)
    np.testing.assert_array_equal(cupy.asnumpy(keep).reshape(want.shape), want.astype(np.uint8))

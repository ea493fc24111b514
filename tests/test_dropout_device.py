"""kernels_cu/cf_philox.cuh, the device side of cuflash/philox.py (issue #15, docs/dropout.md).

CPU: NVRTC compiles the header's test entries for sm_75, sm_80, sm_90 and sm_120 with zero
spills and no stack. GPU: the device bits equal NumPy's element for element (Random123's
known answers included through the layout), and the fragment form ``cf_dropout_keep4_rows`` (one
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
@pytest.mark.parametrize("keys_as_rows", [0, 1])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_fragment_form_equals_dropout_mask(p, keys_as_rows):
    """Both fragment forms: queries as rows (the forward's S) and keys as rows (S^T)."""
    import cupy

    batch, heads, rows, cols = 2, 2, 64, 48
    seed, offset = 2**40 + 3, 12
    keep = cupy.full(batch * heads * rows * cols, 7, dtype=cupy.uint8)  # poisoned
    kernel = _module().get_function("cf_philox_test_keep4")
    kernel(((rows // 16) * (cols // 8), batch * heads), (32,),
           (keep, np.int32(rows), np.int32(cols), np.uint32(seed & 0xFFFFFFFF),
            np.uint32(seed >> 32), np.uint32(offset), np.uint32(philox.keep_threshold(p)),
            np.int32(keys_as_rows)))
    want = philox.dropout_mask(batch, heads, rows, cols, dropout_p=p, seed=seed, offset=offset)
    np.testing.assert_array_equal(cupy.asnumpy(keep).reshape(want.shape), want.astype(np.uint8))


def _keep4_model(keys_as_rows: bool, bh: int, row0: int, col0: int, *, heads: int, seed: int,
                 offset: int, threshold: int) -> np.ndarray:
    """cf_dropout_keep4_rows for one warp, step by step in NumPy: (32 lanes, 4) kept flags."""
    b, h = divmod(bh, heads)
    words = np.zeros((32, 4), dtype=np.uint32)  # the square each lane computes
    rows_parity = np.zeros(32, dtype=bool)
    for lane in range(32):
        g, t = divmod(lane, 4)
        r0, c0 = row0 + g, col0 + 2 * t
        odd = bool(r0 & 1)
        mine = r0 + 8 if odd else r0
        q, k = (c0, mine) if keys_as_rows else (mine, c0)
        q, k = q & ~1, k & ~1  # the square's corner
        words[lane] = [philox.dropout_bits(b, h, q + qi, k + ki, heads=heads, seed=seed,
                                           offset=offset) for qi in (0, 1) for ki in (0, 1)]
        rows_parity[lane] = odd

    def word(lane, rp, cp):  # words[lane] is ordered (i & 1, j & 1) = 00, 01, 10, 11
        return words[lane][2 * cp + rp if keys_as_rows else 2 * rp + cp]

    keep = np.zeros((32, 4), dtype=bool)
    for lane in range(32):
        odd = rows_parity[lane]
        own = (word(lane, odd, 0), word(lane, odd, 1))
        got = (word(lane ^ 4, not rows_parity[lane ^ 4], 0),
               word(lane ^ 4, not rows_parity[lane ^ 4], 1))
        a, b_ = (got, own) if odd else (own, got)
        keep[lane] = [w >= threshold for w in (*a, *b_)]
    return keep


@pytest.mark.parametrize("keys_as_rows", [False, True])
def test_lane_exchange_model_matches_the_mask(keys_as_rows):
    """The shuffle scheme of cf_dropout_keep4_rows (CPU model): each lane's four flags are
    those of its fragment elements in cuflash.dropout_mask, for both fragment orientations."""
    heads, seed, offset, p = 3, 2**33 + 5, 9, 0.4
    mask = philox.dropout_mask(2, heads, 48, 48, dropout_p=p, seed=seed, offset=offset)
    for bh, row0, col0 in ((0, 0, 0), (4, 16, 8), (5, 32, 40)):
        keep = _keep4_model(keys_as_rows, bh, row0, col0, heads=heads, seed=seed,
                            offset=offset, threshold=philox.keep_threshold(p))
        b, h = divmod(bh, heads)
        for lane in range(32):
            g, t = divmod(lane, 4)
            for e in range(4):
                r, c = row0 + g + 8 * (e >> 1), col0 + 2 * t + (e & 1)
                q, k = (c, r) if keys_as_rows else (r, c)
                assert keep[lane, e] == mask[b, h, q, k], (lane, e)

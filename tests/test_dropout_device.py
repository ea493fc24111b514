"""kernels_cu/cf_philox.cuh, the device side of cuflash/philox.py (issue #15, docs/dropout.md).

CPU: NVRTC compiles the header's test entries for sm_75, sm_80, sm_90 and sm_120 with zero
spills and no stack; a NumPy model of ``Dropout::keep_bits`` (one 4 x 4 block per lane
per pass, the halves swapped with lane ^ 4, cf_keep8's byte comparison and bit order) gives
``cuflash.dropout_mask``'s flags, both fragment orientations. GPU: the device bytes equal
NumPy's element for element, and ``keep_bits`` itself (2, 4 and 16 fragments side by side)
gives the same kept-mask as ``cuflash.dropout_mask``. The same with the words in device
memory (``CF_DROP_RNG_PTR=1``: ``Dropout`` loads seed and offset where it makes a mask), from
an entry written here (the header's own entries take the words as values).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from cuflash import philox
from cuflash.compiler import kernels_dir, parse_ptxas_log

ARCHS = ["sm_75", "sm_80", "sm_90", "sm_120"]
ENTRIES = ("cf_philox_test_bytes", "cf_philox_test_keep")


def _source() -> str:
    return '#define CF_PHILOX_TEST 1\n#define CF_DROPOUT 1\n#include "cf_philox.cuh"\n'


# keep_bits with the words read from device memory: the header's test block (one warp per
# 16 x 8 nt block, written query-major) with a Dropout that holds the words' address
WORDS_ENTRY = "cf_philox_test_keep_words"
_WORDS_SOURCE = """#define CF_PHILOX_TEST 1
#define CF_DROPOUT 1
#define CF_DROP_RNG_PTR 1
#include "cf_philox.cuh"

extern "C" __global__ void cf_philox_test_keep_words(unsigned char* keep, int rows, int cols,
                                                     const unsigned int* words,
                                                     unsigned int threshold, int keys_as_rows,
                                                     int nt) {
  const Dropout drop{cf_dropout{0u, 0u, 0u, threshold}, 1.f, 0, words};
  if (keys_as_rows) {
    if (nt == 4) cf_philox_test_keep_block<4, true>(keep, rows, cols, drop);
    if (nt == 16) cf_philox_test_keep_block<16, true>(keep, rows, cols, drop);
  } else {
    if (nt == 4) cf_philox_test_keep_block<4, false>(keep, rows, cols, drop);
    if (nt == 16) cf_philox_test_keep_block<16, false>(keep, rows, cols, drop);
  }
}
"""


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("CuPy's NVRTC is not installed (extra 'cuda13' or 'cuda12')")
    return nvrtc


@pytest.mark.parametrize("words", [False, True], ids=["values", "device_words"])
@pytest.mark.parametrize("arch", ARCHS)
def test_header_compiles_without_spills(arch, words):
    nvrtc = _nvrtc()
    source = _WORDS_SOURCE if words else _source()
    program = nvrtc.createProgram(source, "cf_philox_test.cu", [], [])
    try:
        nvrtc.compileProgram(program, ["--std=c++17", f"-I{kernels_dir()}",
                                       f"--gpu-architecture={arch}", "--ptxas-options=-v"])
        log = nvrtc.getProgramLog(program)
    except Exception as exc:
        raise AssertionError(nvrtc.getProgramLog(program)) from exc
    finally:
        nvrtc.destroyProgram(program)
    reports = parse_ptxas_log(log)
    assert set(reports) == set(ENTRIES) | ({WORDS_ENTRY} if words else set()), log
    for name, r in reports.items():
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, (name, r)


def _module(source=None):
    import cupy

    return cupy.RawModule(code=source or _source(),
                          options=("--std=c++17", f"-I{kernels_dir()}"), name_expressions=None)


@pytest.mark.gpu
@pytest.mark.parametrize("seed, offset", [(0, 0), (2**64 - 1, 2**32 - 1), (0x1234_5678_9ABC, 77)])
def test_device_bytes_equal_numpy(seed, offset):
    import cupy

    batch, heads, rows, cols = 2, 3, 37, 45
    got = cupy.full(batch * heads * rows * cols, 999, dtype=cupy.uint32)  # poisoned
    kernel = _module().get_function("cf_philox_test_bytes")
    threads = 256
    kernel(((got.size + threads - 1) // threads,), (threads,),
           (got, np.int32(batch), np.int32(heads), np.int32(rows), np.int32(cols),
            np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32), np.uint32(offset)))
    b = np.arange(batch)[:, None, None, None]
    h = np.arange(heads)[None, :, None, None]
    i = np.arange(rows)[None, None, :, None]
    j = np.arange(cols)[None, None, None, :]
    want = philox.dropout_bytes(b, h, i, j, heads=heads, seed=seed, offset=offset)
    np.testing.assert_array_equal(cupy.asnumpy(got).reshape(want.shape), want)


@pytest.mark.gpu
@pytest.mark.parametrize("nt", [2, 4, 16])
@pytest.mark.parametrize("keys_as_rows", [0, 1])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_bits_equal_dropout_mask(p, keys_as_rows, nt):
    """keep_bits in both fragment orientations: queries as rows (the forward's S) and keys
    as rows (S^T), for one block per lane pair (nt = 2) and for the swapped halves."""
    import cupy

    batch, heads, rows, cols = 2, 2, 128, 256
    seed, offset = 2**40 + 3, 12
    keep = cupy.full(batch * heads * rows * cols, 7, dtype=cupy.uint8)  # poisoned
    frag_rows, frag_cols = (cols, rows) if keys_as_rows else (rows, cols)
    kernel = _module().get_function("cf_philox_test_keep")
    kernel(((frag_rows // 16) * (frag_cols // (8 * nt)), batch * heads), (32,),
           (keep, np.int32(rows), np.int32(cols), np.uint32(seed & 0xFFFFFFFF),
            np.uint32(seed >> 32), np.uint32(offset), np.uint32(philox.keep_threshold(p)),
            np.int32(keys_as_rows), np.int32(nt)))
    want = philox.dropout_mask(batch, heads, rows, cols, dropout_p=p, seed=seed, offset=offset)
    np.testing.assert_array_equal(cupy.asnumpy(keep).reshape(want.shape), want.astype(np.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("nt", [4, 16])
@pytest.mark.parametrize("keys_as_rows", [0, 1])
def test_keep_bits_with_device_words_equal_dropout_mask(keys_as_rows, nt):
    """CF_DROP_RNG_PTR: the words (seed low, seed high, offset) read from device memory
    give the mask of that seed and offset; other words in the same buffer, another mask."""
    import cupy

    batch, heads, rows, cols, p = 2, 2, 128, 256, 0.3
    frag_rows, frag_cols = (cols, rows) if keys_as_rows else (rows, cols)
    kernel = _module(_WORDS_SOURCE).get_function(WORDS_ENTRY)
    words = cupy.zeros(3, dtype=cupy.uint32)
    for seed, offset in ((2**40 + 3, 12), (2**64 - 1, 2**31 + 5)):
        words[...] = cupy.asarray([seed & 0xFFFFFFFF, seed >> 32, offset], dtype=cupy.uint32)
        keep = cupy.full(batch * heads * rows * cols, 7, dtype=cupy.uint8)  # poisoned
        kernel(((frag_rows // 16) * (frag_cols // (8 * nt)), batch * heads), (32,),
               (keep, np.int32(rows), np.int32(cols), words,
                np.uint32(philox.keep_threshold(p)), np.int32(keys_as_rows), np.int32(nt)))
        want = philox.dropout_mask(batch, heads, rows, cols, dropout_p=p, seed=seed,
                                   offset=offset)
        np.testing.assert_array_equal(cupy.asnumpy(keep).reshape(want.shape),
                                      want.astype(np.uint8))


# -- a NumPy model of Dropout::keep_bits (the CPU checks the scheme, the GPU the code) -----

def _words(b, h, qi, qj, *, heads, seed, offset):
    """The four uint32 words of block (qi, qj) as Python ints."""
    key = (seed & 0xFFFFFFFF, seed >> 32)
    return [int(w) for w in philox.philox4x32_10((qj, qi, b * heads + h, offset), key)]


def _row_words(words, s, keys_as_rows):
    if not keys_as_rows:
        return words[s], words[s | 2]
    column = [sum(((w >> (8 * r)) & 0xFF) << (8 * k) for k, w in enumerate(words))
              for r in (s, s | 2)]
    return column[0], column[1]


def _keep8(lo, hi, threshold):
    """cf_keep8 with its arithmetic: bit 2k + 1 for byte k of lo, 2k for byte k of hi."""
    h, mask = 0x80808080, 0xFFFFFFFF
    low7x4 = (threshold & 0x7F) * 0x01010101
    small = mask if threshold < 128 else 0
    dl, dh = ((lo | h) - low7x4) & mask, ((hi | h) - low7x4) & mask
    gl = ((lo & dl) | ((lo | dl) & small)) & h
    gh = ((hi & dh) | ((hi | dh) & small)) & h
    pairs = (gl | (gh >> 1)) >> 6
    return ((pairs * 0x01041040) & mask) >> 24


def _keep_bits_model(nt, keys_as_rows, bh, row0, col0, *, heads, seed, offset, threshold):
    """keep_bits for one warp: 32 lanes' 64-bit words."""
    b, h = divmod(bh, heads)
    out = []
    for lane in range(32):
        g, t = divmod(lane, 4)
        r0, c0 = row0 + g, col0 + 2 * t
        s, row_quad = r0 & 1, int(philox.quad(r0))
        col_quad0 = int(philox.quad(c0))

        def block(col_quad, rq=row_quad):
            qi, qj = (col_quad, rq) if keys_as_rows else (rq, col_quad)
            return _words(b, h, qi, qj, heads=heads, seed=seed, offset=offset)

        if nt == 2:
            out.append(_keep8(*_row_words(block(col_quad0), s, keys_as_rows), threshold))
            continue
        bits = 0
        for m in range(0, nt // 2, 2):
            # this lane computes block m + s; its partner (lane ^ 4, slot s ^ 1) block m + 1 - s
            own = _row_words(block(col_quad0 + 4 * (m + s)), s, keys_as_rows)
            got = _row_words(block(col_quad0 + 4 * (m + 1 - s)), s, keys_as_rows)
            first, second = (_keep8(*got, threshold), _keep8(*own, threshold)) if s else \
                (_keep8(*own, threshold), _keep8(*got, threshold))
            bits = (bits >> 16) | ((first | second << 8) << 48)
        out.append(bits if nt == 16 else bits >> (64 - 4 * nt))
    return out


def _bit(bits, t, e):
    """Dropout::bit."""
    return (bits >> (4 * t + 2 * (e & 1) + 1 - (e >> 1))) & 1


@pytest.mark.parametrize("nt", [2, 4, 8, 16])
@pytest.mark.parametrize("keys_as_rows", [False, True])
def test_keep_bits_model_matches_the_mask(keys_as_rows, nt):
    """Each lane's flags from the model are those of its fragment elements in
    cuflash.dropout_mask, for both orientations, thresholds below and above 128."""
    heads, seed, offset = 3, 2**33 + 5, 9
    size = 16 * 8 + 16  # rows and columns: several 16-blocks each way
    for p in (0.3, 0.7):
        mask = philox.dropout_mask(2, heads, size, size, dropout_p=p, seed=seed, offset=offset)
        for bh, row0, col0 in ((0, 0, 0), (4, 16, 16), (5, 128, 128 - 8 * nt + 16)):
            col0 = max(0, min(col0, size - 8 * nt)) // 16 * 16
            words = _keep_bits_model(nt, keys_as_rows, bh, row0, col0, heads=heads, seed=seed,
                                     offset=offset, threshold=philox.keep_threshold(p))
            b, h = divmod(bh, heads)
            for lane in range(32):
                g, t = divmod(lane, 4)
                for f in range(nt):
                    for e in range(4):
                        r = row0 + g + 8 * (e >> 1)
                        c = col0 + 8 * f + 2 * t + (e & 1)
                        q, k = (c, r) if keys_as_rows else (r, c)
                        assert _bit(words[lane], f, e) == mask[b, h, q, k], (lane, f, e, p)

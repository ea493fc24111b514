"""Fused dropout (issue #15, docs/dropout.md) on the CPU path, the reference and the API.

* Philox4x32-10 reproduces Random123's known-answer vectors; the dropout layout (counter
  (j >> 1, i >> 1, b * heads + h, offset), word 2 (i & 1) + (j & 1)) is pinned element by
  element, so a kernel that follows docs/dropout.md makes the same mask.
* The mask: dropped fraction within 1% of dropout_p over 2^21 draws, the same seed and
  offset reproduce it bit for bit, another offset or seed gives another, and any tile of
  it is the same slice of the whole (tiling independence).
* The CPU path (hypothesis: shapes, GQA, causal, window, softcap, dtypes, tiles, head_dim_v)
  against the float64 reference given the same mask, forward and backward; the
  reference's gradients against finite differences of its forward with a fixed mask; m and
  l are the undropped softmax's.
* The API: results equal the reference with ``cuflash.dropout_mask``; bad arguments raise
  TypeError / ValueError naming them before anything is written; CUDA arrays reach the
  kernels' launcher with the validated arguments (tests/test_gpu_dropout.py runs them).
"""

from __future__ import annotations

import contextlib

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import api, cpu, philox, reference
from cuflash.interop import Framework, Imported
from issue15_helpers import DTYPES, Case, check_backward, check_forward

# Random123's kat_vectors for philox4x32 with 10 rounds: (counter, key, output words).
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(w) for w in philox.philox4x32_10(counter, key)) == expected


def test_philox_is_elementwise():
    """Arrays of counters give each counter's scalar result (no mixing across elements)."""
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2**32, (4, 50), dtype=np.uint64).astype(np.uint32)
    words = np.stack(philox.philox4x32_10(tuple(counters), (123, 456)))
    for n in range(0, 50, 7):
        one = philox.philox4x32_10(tuple(int(c) for c in counters[:, n]), (123, 456))
        assert tuple(words[:, n]) == tuple(one)


@settings(max_examples=50)
@given(b=st.integers(0, 3), h=st.integers(0, 7), i=st.integers(0, 5000),
       j=st.integers(0, 5000), seed=st.integers(0, 2**64 - 1), offset=st.integers(0, 2**32 - 1))
def test_dropout_layout_pinned(b, h, i, j, seed, offset):
    """The documented layout, written out for one element (docs/dropout.md)."""
    heads = 8
    quad_i, quad_j = 4 * (i // 16) + (i // 2) % 4, 4 * (j // 16) + (j // 2) % 4
    slot_i, slot_j = i % 2 + 2 * ((i // 8) % 2), j % 2 + 2 * ((j // 8) % 2)
    words = philox.philox4x32_10((quad_j, quad_i, b * heads + h, offset),
                                 (seed & 0xFFFFFFFF, seed >> 32))
    expected = (int(words[slot_i]) >> (8 * slot_j)) & 0xFF
    got = philox.dropout_bytes(b, h, i, j, heads=heads, seed=seed, offset=offset)
    assert int(got) == expected


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.9])
def test_dropped_fraction_within_one_percent(p):
    """Over 2^21 draws the dropped fraction is within 1% (relative) of the mask's own p
    (dropout_p rounded to a multiple of 1/256) and within 0.01 of dropout_p (FlashAttention-2's
    test); the rounding moves p by at most 1/512."""
    mask = cuflash.dropout_mask(4, 8, 256, 256, dropout_p=p, seed=2024, offset=7)  # 2^21
    dropped = 1 - mask.mean()
    assert abs(philox.effective_p(p) - p) <= 1 / 512
    assert abs(dropped - philox.effective_p(p)) <= 0.01 * philox.effective_p(p), (dropped, p)
    assert abs(dropped - p) < 0.01, (dropped, p)


def test_keep_threshold_edges():
    assert philox.keep_threshold(0.0) == 0  # every element kept
    assert philox.keep_threshold(0.5) == 128 and philox.keep_scale(0.5) == 2.0
    assert philox.keep_threshold(0.1) == 26 and philox.effective_p(0.1) == 26 / 256
    assert philox.keep_threshold(1e-9) == 1  # above 0: at least one step
    assert philox.keep_threshold(np.nextafter(1.0, 0)) == 255
    assert philox.keep_scale(0.1) == 256 / 230


def test_same_seed_reproduces_other_offsets_and_seeds_differ():
    kw = dict(dropout_p=0.4, seed=99, offset=3)
    a = cuflash.dropout_mask(2, 3, 40, 50, **kw)
    b = cuflash.dropout_mask(2, 3, 40, 50, **kw)
    np.testing.assert_array_equal(a, b)
    other_offset = cuflash.dropout_mask(2, 3, 40, 50, **{**kw, "offset": 4})
    other_seed = cuflash.dropout_mask(2, 3, 40, 50, **{**kw, "seed": 2**40 + 99})
    for other in (other_offset, other_seed):
        agree = (a == other).mean()
        assert 0.45 < agree < 0.6, agree  # independent masks agree on 0.6^2 + 0.4^2 = 52%


@settings(max_examples=40)
@given(i0=st.integers(0, 60), ni=st.integers(1, 30), j0=st.integers(0, 60),
       nj=st.integers(1, 30), p=st.floats(0.01, 0.95))
def test_any_tile_is_the_slice_of_the_whole_mask(i0, ni, j0, nj, p):
    whole = cuflash.dropout_mask(2, 3, 90, 90, dropout_p=p, seed=5, offset=1)
    tile = philox.keep_mask_tile(2, 3, range(i0, i0 + ni), range(j0, j0 + nj), dropout_p=p,
                                 seed=5, offset=1)
    np.testing.assert_array_equal(tile, whole[:, :, i0:i0 + ni, j0:j0 + nj])


# -- the CPU path against the reference ------------------------------------------------------


SIDE = st.one_of(st.just(-1), st.integers(0, 40))


@st.composite
def dropout_cases(draw) -> Case:
    head_dim = draw(st.sampled_from([8, 16, 40, 64]))
    length = st.one_of(st.integers(1, 5), st.integers(1, 70))
    return Case(batch=draw(st.integers(1, 2)), seqlen_q=draw(length), seqlen_k=draw(length),
                heads_kv=draw(st.sampled_from([1, 2])), group=draw(st.sampled_from([1, 3])),
                head_dim=head_dim,
                head_dim_v=draw(st.sampled_from([head_dim, head_dim, 24, 72])),
                causal=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
                block_m=draw(st.sampled_from([8, 16, 64])),
                block_n=draw(st.sampled_from([8, 16, 32])), seed=draw(st.integers(0, 2**31)),
                dropout_p=draw(st.sampled_from([0.1, 0.5, 0.9])),
                dropout_seed=draw(st.integers(0, 2**64 - 1)),
                dropout_offset=draw(st.integers(0, 2**32 - 1)),
                window=draw(st.one_of(st.none(), st.tuples(SIDE, SIDE))),
                softcap=draw(st.sampled_from([None, None, 5.0])),
                alibi=draw(st.booleans()), sinks=draw(st.booleans()))


@settings(max_examples=150)
@given(case=dropout_cases())
def test_forward_matches_reference(case):
    check_forward(case)


@settings(max_examples=150)
@given(case=dropout_cases())
def test_backward_matches_reference(case):
    check_backward(case)


BASE = Case(batch=2, seqlen_q=75, seqlen_k=93, heads_kv=2, group=2, head_dim=32,
            head_dim_v=32, causal=True, dtype=np.dtype(np.float32), block_m=16, block_n=16,
            seed=3, dropout_p=0.3, dropout_seed=17, dropout_offset=5)


@pytest.mark.parametrize("tiles", [(1, 1), (8, 8), (16, 32), (64, 128), (512, 128)])
def test_tiling_independence(tiles):
    """Every tiling regenerates the same mask: o and the gradients match the reference
    (which draws the mask once, whole) for tiles from 1 x 1 to larger than the problem."""
    case = replace(BASE, block_m=tiles[0], block_n=tiles[1])
    check_forward(case)
    check_backward(case)


def test_statistics_are_those_of_the_undropped_softmax():
    q, k, v, _ = BASE.inputs()
    opts = BASE.options()
    _, m, l = cpu.flash_forward_cpu(q, k, v, **opts, **BASE.tiles())
    plain = {n: x for n, x in opts.items() if not n.startswith("dropout")}
    _, m0, l0 = cpu.flash_forward_cpu(q, k, v, **plain, **BASE.tiles())
    np.testing.assert_array_equal(m, m0)
    np.testing.assert_array_equal(l, l0)


def test_dropout_changes_o_and_zero_p_is_off():
    q, k, v, _ = BASE.inputs()
    plain = dict(causal=True, softmax_scale=BASE.scale)
    o0, _, _ = cpu.flash_forward_cpu(q, k, v, **plain)
    o_zero, _, _ = cpu.flash_forward_cpu(q, k, v, **plain, dropout_p=0.0, dropout_seed=1)
    np.testing.assert_array_equal(o0, o_zero)
    o, _, _ = cpu.flash_forward_cpu(q, k, v, **plain, dropout_p=0.5, dropout_seed=1)
    assert np.abs(o - o0).max() > 0.1


def test_reference_gradients_match_finite_differences():
    """The reference's analytic dropout backward against central differences of its forward,
    in float64, with one fixed mask."""
    rng = np.random.default_rng(8)
    q, k = rng.standard_normal((1, 5, 2, 4)), rng.standard_normal((1, 6, 1, 4))
    v, do = rng.standard_normal((1, 6, 1, 3)), rng.standard_normal((1, 5, 2, 3))
    mask = rng.random((1, 2, 5, 6)) < 0.6
    kw = dict(causal=True, dropout_p=0.4, dropout_mask=mask)
    grads = reference.attention_backward_reference(do, q, k, v, **kw)

    def loss(q_, k_, v_):
        return float((reference.attention_reference(q_, k_, v_, **kw)[0] * do).sum())

    eps = 1e-6
    for which, (x, g) in enumerate(zip((q, k, v), grads)):
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            args = [q, k, v]
            up, down = x.copy(), x.copy()
            up[idx] += eps
            down[idx] -= eps
            args[which] = up
            f_up = loss(*args)
            args[which] = down
            numeric[idx] = (f_up - loss(*args)) / (2 * eps)
        np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-8)


# -- the API --------------------------------------------------------------------------------


def _arrays(dv=16):
    rng = np.random.default_rng(4)
    return (rng.standard_normal((2, 33, 4, 16)).astype(np.float32),
            rng.standard_normal((2, 41, 2, 16)).astype(np.float32),
            rng.standard_normal((2, 41, 2, dv)).astype(np.float32),
            rng.standard_normal((2, 33, 4, dv)).astype(np.float32))


def test_api_matches_reference_with_materialised_mask():
    q, k, v, do = _arrays(dv=24)
    kw = dict(dropout_p=0.25, dropout_seed=2**63 + 11, dropout_offset=9)
    o, stats = cuflash.attention_forward(q, k, v, causal=True, **kw)
    mask = cuflash.dropout_mask(2, 4, 33, 41, dropout_p=0.25, seed=2**63 + 11, offset=9)
    ref = dict(causal=True, dropout_p=0.25, dropout_mask=mask)
    o_ref, m_ref, _ = reference.attention_reference(q, k, v, **ref)
    np.testing.assert_allclose(o, o_ref, atol=2e-6)
    np.testing.assert_allclose(stats.m, m_ref, atol=2e-6)
    grads = cuflash.attention_backward(do, q, k, v, o, stats, causal=True, **kw)
    refs = reference.attention_backward_reference(do, q, k, v, **ref, o=o)
    for got, want in zip(grads, refs):
        np.testing.assert_allclose(got, want, atol=1e-5)
    again = cuflash.attention(q, k, v, causal=True, **kw)
    np.testing.assert_array_equal(again, o)  # bit for bit


SEED_RANGE = "from 0 to 18446744073709551615"
BAD = [  # (keywords, exception, message pattern)
    (dict(dropout_p=1.0, dropout_seed=1), ValueError,
     r"^dropout_p: expected a real number in \[0, 1\), got 1\.0"),
    (dict(dropout_p=-0.1, dropout_seed=1), ValueError, r"^dropout_p: expected .*got -0\.1"),
    (dict(dropout_p=float("nan"), dropout_seed=1), ValueError,
     r"^dropout_p: expected .*got nan"),
    (dict(dropout_p="0.1", dropout_seed=1), TypeError,
     r"^dropout_p: expected a real number .*got str"),
    (dict(dropout_p=True, dropout_seed=1), TypeError, r"^dropout_p: expected .*got bool"),
    (dict(dropout_p=0.1), TypeError,
     r"^dropout_seed: expected an int .*dropout_p > 0 needs one.*got NoneType"),
    (dict(dropout_p=0.1, dropout_seed=1.5), TypeError,
     r"^dropout_seed: expected an int .*got float"),
    (dict(dropout_p=0.1, dropout_seed=-1), ValueError,
     rf"^dropout_seed: expected an int {SEED_RANGE}, got -1"),
    (dict(dropout_p=0.1, dropout_seed=2**64), ValueError,
     r"^dropout_seed: .*got 18446744073709551616"),
    (dict(dropout_p=0.1, dropout_seed=1, dropout_offset=2**32), ValueError,
     r"^dropout_offset: expected an int from 0 to 4294967295, got 4294967296"),
    (dict(dropout_p=0.1, dropout_seed=1, dropout_offset="3"), TypeError,
     r"^dropout_offset: expected an int .*got str"),
]


def _bits(arrays):
    return [a.copy() for a in arrays]


@pytest.mark.parametrize("kw, err, pattern", BAD, ids=[str(b[0]) for b in BAD])
def test_api_rejects_bad_arguments_and_writes_nothing(kw, err, pattern):
    q, k, v, do = _arrays()
    o, stats = cuflash.attention_forward(q, k, v)
    arrays = [q, k, v, do, o, stats.m, stats.l]
    before = _bits(arrays)
    with pytest.raises(err, match=pattern):
        cuflash.attention_forward(q, k, v, **kw)
    with pytest.raises(err, match=pattern):
        cuflash.attention_backward(do, q, k, v, o, stats, **kw)
    with pytest.raises(err, match=pattern):
        cuflash.dropout_mask(1, 1, 2, 2, dropout_p=kw["dropout_p"], seed=kw.get("dropout_seed"),
                             offset=kw.get("dropout_offset", 0))
    for after, bits in zip(arrays, before):
        np.testing.assert_array_equal(after, bits)


@pytest.mark.parametrize("backward_kw, pattern", [
    ({}, r"^dropout_p: expected 0.25 as in the forward pass that made stats, got 0.0"),
    (dict(dropout_p=0.25, dropout_seed=8, dropout_offset=3),
     r"^dropout_seed: expected 7 as in the forward pass that made stats, got 8"),
    (dict(dropout_p=0.25, dropout_seed=7, dropout_offset=4),
     r"^dropout_offset: expected 3 as in the forward pass that made stats, got 4"),
    (dict(dropout_p=0.5, dropout_seed=7, dropout_offset=3), r"^dropout_p: expected 0.25"),
])
def test_backward_must_regenerate_the_forwards_mask(backward_kw, pattern):
    """stats record the forward's dropout; a backward with other values raises before
    anything is computed; the same values (and hand-built stats) pass."""
    q, k, v, do = _arrays()
    kw = dict(dropout_p=0.25, dropout_seed=7, dropout_offset=3)
    o, stats = cuflash.attention_forward(q, k, v, **kw)
    assert stats.dropout == (0.25, 7, 3)
    with pytest.raises(ValueError, match=pattern):
        cuflash.attention_backward(do, q, k, v, o, stats, **backward_kw)
    cuflash.attention_backward(do, q, k, v, o, stats, **kw)
    cuflash.attention_backward(do, q, k, v, o, cuflash.SoftmaxStats(stats.m, stats.l),
                               **backward_kw)
    _, plain = cuflash.attention_forward(q, k, v)
    assert plain.dropout is None
    with pytest.raises(ValueError, match=r"^dropout_p: expected 0.0 as in the forward"):
        cuflash.attention_backward(do, q, k, v, o, plain, **kw)


def _as_cuda(x) -> Imported:
    """A host array labelled as a CuPy array on cuda:0 (as tests/test_masks.py)."""
    return Imported(array=x, framework=Framework.CUPY, device=("cuda", 0))


def test_cuda_path_receives_the_dropout_arguments(monkeypatch):
    """On CUDA arrays the validated (p, seed, offset) reach the kernels' launcher (never the
    fast path, which has no dropout); the GPU side is tests/test_gpu_dropout.py."""
    q, k, v, do = _arrays()
    m, l = np.zeros((2, 4, 33), np.float32), np.ones((2, 4, 33), np.float32)
    seen = []

    def fake_fwd(problem, q_, k_, v_, modifiers, extra):
        seen.append(extra)
        return q_.copy(), m, l

    def fake_bwd(problem, do_, q_, k_, v_, o_, m_, l_, deterministic, stats_of_these_scores,
                 modifiers, extra):
        seen.append(extra)
        return q_.copy(), k_.copy(), v_.copy()

    def forbidden(*args, **kwargs):
        raise AssertionError("dropout took the fast path")

    monkeypatch.setattr(api, "import_array", lambda x, name: _as_cuda(x))
    monkeypatch.setattr(api, "_flash_fwd", fake_fwd)
    monkeypatch.setattr(api, "_flash_bwd", fake_bwd)
    monkeypatch.setattr(api, "_fast_backend", forbidden)
    monkeypatch.setattr(api, "caller_stream", lambda iq: contextlib.nullcontext())
    monkeypatch.setattr(api, "export_array", lambda x, like: x)
    kw = dict(dropout_p=0.1, dropout_seed=2**64 - 1, dropout_offset=7)
    cuflash.attention_forward(q, k, v, **kw)
    cuflash.attention_backward(do, q, k, v, q.copy(), cuflash.SoftmaxStats(m, l), **kw)
    assert seen == [kw, kw]


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(0, 3), heads=st.integers(0, 4), row0=st.integers(0, 300),
       rows=st.integers(0, 40), col0=st.integers(0, 300), cols=st.integers(0, 40),
       seed=st.integers(0, philox.MAX_SEED), offset=st.integers(0, philox.MAX_OFFSET),
       dropout_p=st.floats(0.001, 0.99))
def test_mask_tiles_draw_each_block_once_and_equal_the_elementwise_definition(
        batch, heads, row0, rows, col0, cols, seed, offset, dropout_p):
    """keep_mask_tile draws one Philox call per 4 x 4 block and picks bytes from it: the
    same bits as ``dropout_bytes`` of each element (the layout's definition)."""
    rows, cols = range(row0, row0 + rows), range(col0, col0 + cols)
    got = philox.keep_mask_tile(batch, heads, rows, cols, dropout_p=dropout_p, seed=seed,
                                offset=offset)
    b, h = np.arange(batch)[:, None, None, None], np.arange(heads)[None, :, None, None]
    i, j = np.asarray(rows)[None, None, :, None], np.asarray(cols)[None, None, None, :]
    bytes_ = philox.dropout_bytes(b, h, i, j, heads=heads, seed=seed, offset=offset)
    np.testing.assert_array_equal(got, bytes_ >= philox.keep_threshold(dropout_p))

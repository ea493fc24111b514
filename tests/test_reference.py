"""The float64 reference, the naive same-dtype baseline and the error rule (cuflash.reference).

The reference is the truth every other test trusts, so it is checked against computations
that share none of its code: per-row Python loops for the forward, central finite
differences in float64 for the gradients, and the definition of GQA (repeated kv heads).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuflash.reference import (
    ErrorReport,
    attention_backward_naive,
    attention_backward_reference,
    attention_naive,
    attention_reference,
    compare,
    default_atol,
)

BF16 = np.dtype(ml_dtypes.bfloat16)


def _rows_loop(q, k, v, causal, scale):
    """(o, m, l) by explicit loops over (batch, head, query): the definition, line by line."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    o = np.zeros((b, sq, h, d))
    m = np.full((b, h, sq), -math.inf)
    l = np.zeros((b, h, sq))
    for bi in range(b):
        for hi in range(h):
            kv = hi // group  # query head hi reads kv head hi // group
            for i in range(sq):
                keys = [j for j in range(sk) if not causal or j <= i + sk - sq]
                if not keys:
                    continue
                scores = [scale * float(np.dot(q[bi, i, hi].astype(np.float64),
                                               k[bi, j, kv].astype(np.float64))) for j in keys]
                mx = max(scores)
                weights = [math.exp(s - mx) for s in scores]
                total = math.fsum(weights)
                for w, j in zip(weights, keys):
                    o[bi, i, hi] += (w / total) * v[bi, j, kv].astype(np.float64)
                m[bi, hi, i], l[bi, hi, i] = mx, total
    return o, m, l


@settings(deadline=None, max_examples=25)
@given(
    batch=st.integers(1, 2),
    seqlen_q=st.integers(1, 9),
    seqlen_k=st.integers(0, 9),
    heads_kv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    head_dim=st.sampled_from([1, 4, 8]),
    causal=st.booleans(),
    scale=st.floats(0.1, 2.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_forward_matches_row_loops(batch, seqlen_q, seqlen_k, heads_kv, group, head_dim,
                                   causal, scale, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seqlen_q, heads_kv * group, head_dim))
    k = rng.standard_normal((batch, seqlen_k, heads_kv, head_dim))
    v = rng.standard_normal((batch, seqlen_k, heads_kv, head_dim))
    o, m, l = attention_reference(q, k, v, causal=causal, softmax_scale=scale)
    o_loop, m_loop, l_loop = _rows_loop(q, k, v, causal, scale)
    assert o.dtype == m.dtype == l.dtype == np.float64
    np.testing.assert_allclose(o, o_loop, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isinf(m), np.isinf(m_loop))
    np.testing.assert_allclose(m, m_loop, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(l, l_loop, rtol=1e-12, atol=1e-12)


def test_default_scale_is_inverse_sqrt_head_dim():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 5, 2, 16)) for _ in range(3))
    for a, b in zip(attention_reference(q, k, v), attention_reference(q, k, v, softmax_scale=0.25)):
        np.testing.assert_array_equal(a, b)


def _loss(q, k, v, do, causal, scale):
    return float(np.sum(do * attention_reference(q, k, v, causal=causal, softmax_scale=scale)[0]))


@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, heads, heads_kv, causal",
    [(3, 4, 2, 1, False), (4, 3, 2, 2, True), (5, 2, 4, 2, True), (2, 5, 2, 1, True)],
)
def test_gradients_match_finite_differences(seqlen_q, seqlen_k, heads, heads_kv, causal):
    """Analytic gradients of sum(do * o) vs central differences, everything float64."""
    rng = np.random.default_rng(seqlen_q * 10 + seqlen_k)
    d, scale, eps = 3, 0.7, 1e-6
    q = rng.standard_normal((1, seqlen_q, heads, d))
    k, v = (rng.standard_normal((1, seqlen_k, heads_kv, d)) for _ in range(2))
    do = rng.standard_normal(q.shape)
    grads = attention_backward_reference(do, q, k, v, causal=causal, softmax_scale=scale)
    for x, g in zip((q, k, v), grads):
        assert g.shape == x.shape and g.dtype == np.float64
        fd = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            keep = x[idx]
            x[idx] = keep + eps
            up = _loss(q, k, v, do, causal, scale)
            x[idx] = keep - eps
            down = _loss(q, k, v, do, causal, scale)
            x[idx] = keep
            fd[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=str)
def test_rows_that_see_no_key(dtype):
    """Causal seqlen_q > seqlen_k and seqlen_k == 0: o = 0, m = -inf, l = 0, zero grads."""
    rng = np.random.default_rng(1)
    for sq, sk in [(6, 2), (3, 0)]:
        q = rng.standard_normal((2, sq, 2, 8)).astype(dtype)
        k, v = (rng.standard_normal((2, sk, 1, 8)).astype(dtype) for _ in range(2))
        do = rng.standard_normal(q.shape).astype(dtype)
        dead = slice(0, sq - sk)
        o, m, l = attention_reference(q, k, v, causal=True)
        o_nv, m_nv, l_nv = attention_naive(q, k, v, causal=True, dtype=dtype, return_stats=True)
        for oo, mm, ll in ((o, m, l), (o_nv, m_nv, l_nv)):
            assert np.all(oo[:, dead].astype(np.float64) == 0)
            assert np.all(mm[:, :, dead] == -np.inf) and np.all(ll[:, :, dead] == 0)
            assert np.all(np.isfinite(mm[:, :, sq - sk:]))
        for grads in (attention_backward_reference(do, q, k, v, causal=True),
                      attention_backward_naive(do, q, k, v, causal=True, dtype=dtype)):
            assert np.all(grads[0][:, dead].astype(np.float64) == 0)
            for g in grads:
                assert not np.isnan(g.astype(np.float64)).any()


def test_gqa_is_repeated_kv_heads():
    """Query head h reads kv head h // group; dK, dV of a kv head sum over its group."""
    rng = np.random.default_rng(2)
    b, sq, sk, hkv, group, d = 2, 5, 7, 2, 3, 4
    q = rng.standard_normal((b, sq, hkv * group, d))
    k, v = (rng.standard_normal((b, sk, hkv, d)) for _ in range(2))
    do = rng.standard_normal(q.shape)
    k_rep, v_rep = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    # np.repeat puts kv head 0 at query heads 0..group-1: the h // group mapping
    assert np.array_equal(k_rep[:, :, group - 1], k[:, :, 0])
    for causal in (False, True):
        for a, c in zip(attention_reference(q, k, v, causal=causal),
                        attention_reference(q, k_rep, v_rep, causal=causal)):
            np.testing.assert_allclose(a, c, rtol=1e-13, atol=1e-13)
        dq, dk, dv = attention_backward_reference(do, q, k, v, causal=causal)
        dq_r, dk_r, dv_r = attention_backward_reference(do, q, k_rep, v_rep, causal=causal)
        np.testing.assert_allclose(dq, dq_r, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dk, dk_r.reshape(b, sk, hkv, group, d).sum(3), atol=1e-12)
        np.testing.assert_allclose(dv, dv_r.reshape(b, sk, hkv, group, d).sum(3), atol=1e-12)


@pytest.mark.parametrize(
    "dtype, lo, hi",
    [(np.float32, 1e-8, 1e-5), (np.float16, 1e-5, 3e-2), (BF16, 1e-4, 2e-1)],
    ids=["float32", "float16", "bfloat16"],
)
def test_naive_error_is_the_dtype_noise_floor(dtype, lo, hi):
    """The naive result is in dtype, its error is nonzero and of the dtype's order."""
    rng = np.random.default_rng(3)
    q, k, v, do = (rng.standard_normal((2, 40, 2, 32)).astype(dtype) for _ in range(4))
    o = attention_naive(q, k, v, causal=True, dtype=dtype)
    assert o.dtype == np.dtype(dtype) and o.shape == q.shape
    err = np.abs(o.astype(np.float64) - attention_reference(q, k, v, causal=True)[0]).max()
    assert lo < err < hi
    for g, ref in zip(attention_backward_naive(do, q, k, v, causal=True, dtype=dtype),
                      attention_backward_reference(do, q, k, v, causal=True)):
        assert g.dtype == np.dtype(dtype)
        err = np.abs(g.astype(np.float64) - ref).max()
        assert lo < err < 4 * hi


def test_naive_rounds_intermediates_not_only_inputs():
    """16-bit naive is worse than rounding the float64 result once (it rounds P, S, ...)."""
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 64, 1, 64)).astype(np.float16) for _ in range(3))
    ref = attention_reference(q, k, v)[0]
    once = np.abs(ref.astype(np.float16).astype(np.float64) - ref).max()
    naive = np.abs(attention_naive(q, k, v, dtype=np.float16).astype(np.float64) - ref).max()
    assert naive > 1.5 * once


def test_naive_follows_the_framework_recipe():
    """fp16 naive, spelled out: matmuls accumulate in float32 and round; S * scale rounds;
    softmax in float32 over the rounded scores; P rounds; O = P V rounds (bit-exact)."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 9, 1, 16)).astype(np.float16) for _ in range(3))
    f32 = np.float32

    def r16(x):
        return x.astype(np.float16).astype(f32)

    s = r16(r16(q[0, :, 0].astype(f32) @ k[0, :, 0].astype(f32).T) * f32(0.3))
    e = np.exp(s - s.max(axis=1, keepdims=True))
    p = r16(e / e.sum(axis=1, keepdims=True))
    o = (p @ v[0, :, 0].astype(f32)).astype(np.float16)
    naive = attention_naive(q, k, v, softmax_scale=0.3, dtype=np.float16)
    np.testing.assert_array_equal(naive[0, :, 0], o)


def test_backward_given_o():
    """o=exact output reproduces the true gradients; a perturbed o moves dS by P * delta shift."""
    rng = np.random.default_rng(6)
    q, k, v, do = (rng.standard_normal((2, 7, 2, 8)) for _ in range(4))
    o = attention_reference(q, k, v, causal=True)[0]
    exact = attention_backward_reference(do, q, k, v, causal=True)
    for a, b in zip(exact, attention_backward_reference(do, q, k, v, causal=True, o=o)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    shifted = attention_backward_reference(do, q, k, v, causal=True, o=o + 1e-3)
    dv_unchanged = np.array_equal(shifted[2], exact[2])
    assert dv_unchanged and not np.allclose(shifted[0], exact[0], rtol=0, atol=1e-6)


def test_compare_rule():
    ref = np.array([1.0, 2.0, -np.inf])
    naive = np.array([1.1, 2.0, -np.inf])
    ok = compare("x", np.array([1.2, 2.0, -np.inf]), ref, naive, atol=0.0)
    assert isinstance(ok, ErrorReport) and ok.ok
    assert ok.err == pytest.approx(0.2) and ok.naive_err == pytest.approx(0.1)
    assert ok.bound == pytest.approx(0.2)
    assert not compare("x", np.array([1.21, 2.0, -np.inf]), ref, naive, atol=0.0).ok
    assert compare("x", np.array([1.21, 2.0, -np.inf]), ref, naive, atol=0.02).ok
    # an infinity where the reference is finite, or the reverse, fails
    assert not compare("x", np.array([1.0, np.inf, -np.inf]), ref, naive, atol=1.0).ok
    assert not compare("x", np.array([1.0, 2.0, 0.0]), ref, naive, atol=1.0).ok
    # NaN never passes, whatever the naive error or atol
    nan = np.array([np.nan, 2.0, -np.inf])
    assert not compare("x", nan, ref, naive, atol=1e9).ok
    assert not compare("x", nan, ref, nan, atol=1e9).ok
    # 16-bit arrays are compared in float64; empty arrays pass
    half = np.array([1.0, 2.0], dtype=np.float16)
    assert compare("x", half, np.array([1.0, 2.0]), half, atol=0.0).ok
    assert compare("x", np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3)), atol=0.0).ok
    with pytest.raises(ValueError, match="shape"):
        compare("x", np.zeros(3), np.zeros(4), np.zeros(4), atol=0.0)


def test_default_atol_is_small_and_per_dtype():
    assert default_atol(np.float32) <= 1e-5
    assert default_atol(np.float16) <= 1e-4
    assert default_atol(BF16) <= 1e-3
    for dtype in (np.float16, BF16):  # well below one ulp at 1
        assert default_atol(dtype) < float(ml_dtypes.finfo(dtype).eps) / 4
    with pytest.raises(TypeError):
        default_atol(np.float64)


# -- score modifiers (docs/masks.md): window, softcap, ALiBi, sinks ---------------------------


def _rows_loop_modified(q, k, v, causal, scale, window, softcap, alibi, sinks):
    """(o, m, l) by loops over (batch, head, query), straight from docs/masks.md."""
    b, sq, h, d = q.shape
    sk, group = k.shape[1], h // k.shape[2]
    left, right = window if window is not None else (-1, -1)
    o, m, l = np.zeros((b, sq, h, d)), np.full((b, h, sq), -math.inf), np.zeros((b, h, sq))
    for bi, hi, i in np.ndindex(b, h, sq):
        diag = i + sk - sq  # the key on the query's bottom-right diagonal
        keys = [j for j in range(sk) if (not causal or j <= diag)
                and (left < 0 or j >= diag - left) and (right < 0 or j <= diag + right)]
        scores = []
        for j in keys:
            x = scale * float(np.dot(q[bi, i, hi], k[bi, j, hi // group]))
            if softcap:
                x = softcap * math.tanh(x / softcap)
            if alibi is not None:
                x -= float(alibi[bi, hi] if alibi.ndim == 2 else alibi[hi]) * abs(diag - j)
            scores.append(x)
        logits = scores + ([float(sinks[hi])] if sinks is not None else [])
        if not logits:
            continue
        mx = max(logits)
        total = math.fsum(math.exp(s - mx) for s in logits)
        for s, j in zip(scores, keys):
            o[bi, i, hi] += math.exp(s - mx) / total * v[bi, j, hi // group]
        m[bi, hi, i], l[bi, hi, i] = mx, total
    return o, m, l


@st.composite
def modifiers(draw, batch: int, heads: int) -> dict:
    side = st.sampled_from([-1, 0, 1, 2, 5])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    alibi_shape = draw(st.sampled_from([None, (heads,), (batch, heads)]))
    return dict(
        window=draw(st.one_of(st.none(), st.tuples(side, side))),
        softcap=draw(st.sampled_from([None, 0.0, 0.7, 5.0])),
        alibi_slopes=None if alibi_shape is None else rng.uniform(0, 1, alibi_shape),
        sinks=rng.standard_normal(heads) * 2 if draw(st.booleans()) else None,
    )


@settings(deadline=None, max_examples=40)
@given(data=st.data(), seqlen_q=st.integers(1, 7), seqlen_k=st.integers(0, 7),
       group=st.sampled_from([1, 2]), causal=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_modified_forward_matches_row_loops(data, seqlen_q, seqlen_k, group, causal, seed):
    rng = np.random.default_rng(seed)
    b, hkv, d, scale = 2, 2, 4, 0.9
    q = rng.standard_normal((b, seqlen_q, hkv * group, d))
    k, v = (rng.standard_normal((b, seqlen_k, hkv, d)) for _ in range(2))
    mods = data.draw(modifiers(b, hkv * group))
    got = attention_reference(q, k, v, causal=causal, softmax_scale=scale, **mods)
    want = _rows_loop_modified(q, k, v, causal, scale, **{
        "window": mods["window"], "softcap": mods["softcap"], "alibi": mods["alibi_slopes"],
        "sinks": mods["sinks"]})
    for name, x, y in zip("oml", got, want):
        np.testing.assert_array_equal(np.isinf(x), np.isinf(y), err_msg=name)
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12, err_msg=name)


def _fd_check(params: dict, wrt: dict, loss, eps=1e-6):
    """Central differences of loss(**params) w.r.t. each array named in wrt vs wrt[name]."""
    for name, grad in wrt.items():
        x = params[name]
        fd = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            keep = x[idx]
            x[idx] = keep + eps
            up = loss(**params)
            x[idx] = keep - eps
            down = loss(**params)
            x[idx] = keep
            fd[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("mods", [
    dict(window=(1, 0)),
    dict(window=(2, 1), softcap=0.8),
    dict(alibi_slopes=np.array([0.5, 0.25])),
    dict(sinks=np.array([0.3, -1.0])),
    dict(window=(1, 1), softcap=1.5, alibi_slopes=np.array([[0.5, 0.1], [0.2, 0.9]]),
         sinks=np.array([1.0, 2.0])),
], ids=["window", "window-softcap", "alibi", "sinks", "all"])
@pytest.mark.parametrize("causal", [False, True])
def test_modified_gradients_match_finite_differences(mods, causal):
    """dq, dk, dv (and dsinks) of sum(do * o) vs central differences, all float64; with
    GQA (2 query heads, 1 kv head) and seqlen_q != seqlen_k."""
    rng = np.random.default_rng(7)
    scale = 0.7
    q = rng.standard_normal((2, 4, 2, 3))
    k, v = (rng.standard_normal((2, 5, 1, 3)) for _ in range(2))
    do = rng.standard_normal(q.shape)
    mods = {name: (np.array(x, dtype=np.float64) if isinstance(x, np.ndarray) else x)
            for name, x in mods.items()}
    grads = attention_backward_reference(do, q, k, v, causal=causal, softmax_scale=scale,
                                         **mods)
    assert len(grads) == (4 if "sinks" in mods else 3)
    fixed = {n: x for n, x in mods.items() if n != "sinks"}

    def loss(q, k, v, sinks=None):
        o = attention_reference(q, k, v, causal=causal, softmax_scale=scale, sinks=sinks,
                                **fixed)[0]
        return float(np.sum(do * o))

    params = dict(q=q, k=k, v=v, **({"sinks": mods["sinks"]} if "sinks" in mods else {}))
    _fd_check(params, dict(zip(params, grads)), loss)


def test_naive_with_modifiers_is_the_dtype_noise_floor():
    """The naive baseline takes the same modifiers and stays near the float64 truth."""
    rng = np.random.default_rng(8)
    q, k, v, do = (rng.standard_normal((2, 30, 2, 16)).astype(np.float16) for _ in range(4))
    mods = dict(window=(6, 2), softcap=3.0, alibi_slopes=np.float32([0.3, 0.05]),
                sinks=np.float32([0.5, 2.0]))
    o = attention_naive(q, k, v, dtype=np.float16, **mods)
    err = np.abs(o.astype(np.float64) - attention_reference(q, k, v, **mods)[0]).max()
    assert 1e-5 < err < 3e-2
    naive = attention_backward_naive(do, q, k, v, dtype=np.float16, **mods)
    truth = attention_backward_reference(do, q, k, v, **mods)
    assert len(naive) == len(truth) == 4 and naive[3].dtype == np.float32
    for g, ref in zip(naive, truth):
        err = np.abs(g.astype(np.float64) - ref).max()
        assert err < 0.1 * max(1.0, np.abs(ref).max())

"""cuflash.merge_attention: partial attention over disjoint key ranges, merged, against float64.

Hypothesis splits the keys into contiguous ranges (some empty), computes each part with
cuflash.attention_forward on the CPU path in the drawn dtype, merges, and judges o by
FlashAttention's rule ``err <= 2 * err(naive in the same dtype) + atol`` against the float64
reference over all keys, where the naive counterpart is the same split done plainly: each
part by attention_naive (its o rounded to the dtype, as any part's output is), merged with
every step rounded to the dtype (``_naive_merge``; against one unsplit naive call the bound
missed the parts' own rounding: CI, 2026-12-05, fp16, 15 keys cut 14 + 1, 8.3e-4 against a
bound of 7.3e-4). lse gets a float32-tight check. With a causal mask a part's visible
pairs are a causal square plus a full rectangle (see ``_causal_part``), each one cuflash call.
Rows a part does not see carry finite garbage in o: weight 0 must ignore it.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash.reference import attention_naive, attention_reference, compare, default_atol

DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16),
          "bf16": np.dtype(ml_dtypes.bfloat16)}
LSE_RTOL = 1e-5  # float32 stats of the parts, one log-sum-exp: a few ulp


def _forward_rows(q, k, v, rows: slice, causal: bool, o, lse) -> None:
    """cuflash's forward of q[rows] against k, v, written into o and lse."""
    o_r, stats = cuflash.attention_forward(q[:, rows], k, v, causal=causal)
    o[:, rows], lse[:, :, rows] = o_r, stats.lse


def _part(q, k, v, keys: range, causal: bool, rng):
    """(o, lse) of all queries against keys[a:b], rows that see none of them o = garbage."""
    batch, seqlen_q, heads, _ = q.shape
    o = rng.standard_normal(q.shape).astype(q.dtype)  # finite garbage; must get weight 0
    lse = np.full((batch, heads, seqlen_q), -np.inf, np.float32)
    a, b = keys.start, keys.stop
    if a == b:
        return o, lse
    if not causal:
        _forward_rows(q, k[:, a:b], v[:, a:b], slice(None), False, o, lse)
        return o, lse
    _causal_part(q, k, v, a, b, o, lse)
    return o, lse


def _causal_part(q, k, v, a: int, b: int, o, lse) -> None:
    """Query i sees key j iff j <= i + shift (bottom-right): against keys [a, b) the rows from
    a - shift on see a growing prefix (a causal square: last row, last key aligned) and the
    rows from b - 1 - shift on see every key (no mask)."""
    seqlen_q, shift = q.shape[1], k.shape[1] - q.shape[1]
    tri_from, full_from = max(0, a - shift), min(seqlen_q, max(0, b - 1 - shift))
    if tri_from < full_from:
        end = full_from + shift
        _forward_rows(q, k[:, a:end], v[:, a:end], slice(tri_from, full_from), True, o, lse)
    if full_from < seqlen_q:
        _forward_rows(q, k[:, a:b], v[:, a:b], slice(full_from, seqlen_q), False, o, lse)


def _splits(seqlen_k: int, cuts: list[int]) -> list[range]:
    edges = [0, *sorted(c % (seqlen_k + 1) for c in cuts), seqlen_k]
    return [range(x, y) for x, y in zip(edges, edges[1:])]


def _naive_merge(q, k, v, ranges: list[range], causal: bool, dtype) -> np.ndarray:
    """The split attention done plainly in ``dtype``: each part's o by attention_naive over its
    keys (a causal part as a window ending at the global diagonal), weighted by its float64
    log-sum-exp, products and sums rounded to ``dtype``; rows no part sees are 0."""
    seqlen_k = k.shape[1]

    def rnd(x):
        return np.asarray(x, np.float64).astype(dtype).astype(np.float64)

    parts = []
    for keys in ranges:
        a, b = keys.start, keys.stop
        if a == b:
            continue
        window = (-1, seqlen_k - b) if causal else None
        o_p = attention_naive(q, k[:, a:b], v[:, a:b], window=window, dtype=dtype)
        _, m_p, l_p = attention_reference(q, k[:, a:b], v[:, a:b], window=window)
        with np.errstate(divide="ignore", invalid="ignore"):
            lse_p = np.where(l_p > 0, m_p + np.log(l_p), -np.inf)
        parts.append((np.asarray(o_p, np.float64), lse_p))
    out = np.zeros(q.shape)
    if not parts:
        return out.astype(dtype)
    lse = np.logaddexp.reduce([p[1] for p in parts], axis=0)
    for o_p, lse_p in parts:
        with np.errstate(invalid="ignore"):
            w = np.where(np.isfinite(lse_p), np.exp(lse_p - lse), 0.0)
        w = w.swapaxes(1, 2)[..., None]  # (batch, seqlen_q, heads, 1)
        out = rnd(out + rnd(rnd(w) * np.where(w > 0, o_p, 0.0)))
    return out.astype(dtype)


@st.composite
def cases(draw):
    heads_kv = draw(st.integers(1, 2))
    return dict(
        batch=draw(st.integers(1, 2)), seqlen_q=draw(st.integers(1, 24)),
        seqlen_k=draw(st.integers(0, 24)), heads_kv=heads_kv,
        heads=heads_kv * draw(st.sampled_from([1, 2, 3])),
        head_dim=draw(st.sampled_from([8, 16, 40])), causal=draw(st.booleans()),
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        cuts=draw(st.lists(st.integers(0, 64), max_size=4)), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=60)
@given(cases())
@example(dict(batch=2, seqlen_q=1, seqlen_k=15, heads_kv=2, heads=4, head_dim=16, causal=False,
              dtype="fp16", cuts=[14], seed=2))  # CI, 2026-12-05 (the module docstring)
def test_merge_matches_float64_reference(case):
    rng = np.random.default_rng(case["seed"])
    dtype = DTYPES[case["dtype"]]
    b, sq, sk, d = case["batch"], case["seqlen_q"], case["seqlen_k"], case["head_dim"]
    q = rng.standard_normal((b, sq, case["heads"], d)).astype(dtype)
    k, v = (rng.standard_normal((b, sk, case["heads_kv"], d)).astype(dtype) for _ in "kv")
    ranges = _splits(sk, case["cuts"])
    parts = [_part(q, k, v, keys, case["causal"], rng) for keys in ranges]
    o, lse = cuflash.merge_attention([p[0] for p in parts], [p[1] for p in parts])

    assert o.dtype == dtype and lse.dtype == np.float32
    o_ref, m_ref, l_ref = attention_reference(q, k, v, causal=case["causal"])
    naive = _naive_merge(q, k, v, ranges, case["causal"], dtype)
    report = compare("o", o, o_ref, naive, atol=default_atol(dtype))
    assert report.ok, report
    with np.errstate(divide="ignore"):
        lse_ref = m_ref + np.log(l_ref)
    unseen = np.isneginf(lse_ref)
    assert np.array_equal(np.isneginf(lse), unseen)
    assert (o.astype(np.float32).swapaxes(1, 2)[unseen] == 0).all()
    np.testing.assert_allclose(lse[~unseen], lse_ref[~unseen],
                               rtol=LSE_RTOL, atol=LSE_RTOL)


def _random_parts(rng, n=3, shape=(2, 5, 4, 8), dtype=np.float32):
    batch, seqlen_q, heads, _ = shape
    outputs = [rng.standard_normal(shape).astype(dtype) for _ in range(n)]
    lses = [(3 * rng.standard_normal((batch, heads, seqlen_q))).astype(np.float32)
            for _ in range(n)]
    lses[0][:, :, 0] = -np.inf  # row 0: part 0 saw nothing
    for lse in lses:
        lse[:, 1, 1] = -np.inf  # (head 1, row 1): no part saw anything
    return outputs, lses


def test_a_single_part_is_returned_unchanged():
    rng = np.random.default_rng(0)
    outputs, lses = _random_parts(rng, n=1)
    o, lse = cuflash.merge_attention(outputs, lses)
    seen = np.isfinite(lses[0]).swapaxes(1, 2)
    np.testing.assert_allclose(o[seen], outputs[0][seen], rtol=1e-6)
    assert np.array_equal(lse, lses[0])


def test_mixed_dtypes_merge_to_float32():
    rng = np.random.default_rng(1)
    outputs, lses = _random_parts(rng, n=2)
    outputs[1] = outputs[1].astype(ml_dtypes.bfloat16)
    o, _ = cuflash.merge_attention(outputs, lses)
    assert o.dtype == np.float32


def test_torch_gradients_are_the_merge_weights():
    """d o / d o_i = w_i = exp(lse_i - lse); d lse / d lse_i = w_i; no NaN on unseen rows."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    outputs, lses = _random_parts(rng)
    o_t = [torch.tensor(x, requires_grad=True) for x in outputs]
    l_t = [torch.tensor(x, requires_grad=True) for x in lses]
    o, lse = cuflash.merge_attention(o_t, l_t)
    do = torch.tensor(rng.standard_normal(o.shape).astype(np.float32))
    dlse = torch.where(torch.isfinite(lse),
                       torch.tensor(rng.standard_normal(lse.shape).astype(np.float32)), 0.0)
    ((o * do).sum() + (lse.nan_to_num(neginf=0.0) * dlse).sum()).backward()
    for o_i, lse_i in zip(o_t, l_t):
        w = torch.exp(lse_i - lse).nan_to_num(nan=0.0).detach()  # -inf - -inf: unseen rows
        w_rows = w.transpose(1, 2)[..., None]
        torch.testing.assert_close(o_i.grad, w_rows * do)
        dot = ((o_i - o) * do).sum(-1).transpose(1, 2).detach()
        # float32 cancellation in the head_dim sum of dot: absolute error about
        # eps32 * sum |(o_i - o) do|, a few 1e-6 here; a wrong formula is off by O(1).
        torch.testing.assert_close(lse_i.grad, w * (dot + dlse), atol=1e-5, rtol=1e-5)
    assert isinstance(o, torch.Tensor) and not torch.isnan(o).any()
    np.testing.assert_allclose(o.detach().numpy(), cuflash.merge_attention(outputs, lses)[0],
                               rtol=1e-6, atol=1e-7)


def test_jax_under_jit_and_grad_matches_numpy():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    outputs, lses = _random_parts(rng)
    want_o, want_lse = cuflash.merge_attention(outputs, lses)
    o, lse = jax.jit(cuflash.merge_attention)([jnp.asarray(x) for x in outputs],
                                              [jnp.asarray(x) for x in lses])
    assert isinstance(o, jax.Array)
    np.testing.assert_allclose(np.asarray(o), want_o, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(want_lse))

    def loss(outs, ls):
        o, lse = cuflash.merge_attention(outs, ls)
        return o.sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(outputs, lses)
    assert all(np.isfinite(np.asarray(g)).all() for gs in grads for g in gs)


@pytest.mark.parametrize("outputs, lses, error, match", [
    ([], [], TypeError, "outputs: expected a non-empty list"),
    (np.zeros((1, 2, 1, 8)), [], TypeError, "outputs: expected a non-empty list or tuple"),
    ([np.zeros((1, 2, 1, 8), np.float32)], [], TypeError, "lses: expected a non-empty"),
    ([np.zeros((1, 2, 1, 8), np.float32)] * 2, [np.zeros((1, 1, 2), np.float32)],
     ValueError, r"lses: expected one per output \(2\), got 1"),
    ([np.zeros((2, 1, 8), np.float32)], [np.zeros((1, 1, 2), np.float32)],
     ValueError, r"outputs\[0\]: expected \(batch"),
    ([np.zeros((1, 2, 1, 8), np.float32), np.zeros((1, 3, 1, 8), np.float32)],
     [np.zeros((1, 1, 2), np.float32)] * 2, ValueError, r"outputs\[1\]: expected shape"),
    ([np.zeros((1, 2, 1, 8), np.float32)], [np.zeros((1, 2, 1), np.float32)],
     ValueError, r"lses\[0\]: expected shape \(1, 1, 2\)"),
    ([np.zeros((1, 2, 1, 8), np.float64)], [np.zeros((1, 1, 2), np.float32)],
     TypeError, r"outputs\[0\]: expected float16, bfloat16 or float32, got float64"),
    ([np.zeros((1, 2, 1, 8), np.float32)], [np.zeros((1, 1, 2), np.float16)],
     TypeError, r"lses\[0\]: expected float32, got float16"),
    ([np.zeros((1, 2, 1, 8), np.float32)], [[0.0, 0.0]], TypeError, r"lses\[0\]: expected"),
])
def test_bad_input_names_the_argument(outputs, lses, error, match):
    with pytest.raises(error, match=match):
        cuflash.merge_attention(outputs, lses)


def test_frameworks_cannot_be_mixed():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"lses\[0\]: expected a numpy array"):
        cuflash.merge_attention([np.zeros((1, 2, 1, 8), np.float32)],
                                [torch.zeros((1, 1, 2))])

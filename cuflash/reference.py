"""Float64 truth, the same-dtype noise floor, and the error rule every test uses.

Three things live here:

* ``attention_reference`` / ``attention_backward_reference``: the plain textbook computation
  in float64 with the whole (seqlen_q, seqlen_k) score matrix materialized. This is the
  truth that every implementation (CPU path, CUDA kernels) is measured against.
* ``attention_naive`` / ``attention_backward_naive``: the same plain computation as a
  framework would run it in a given dtype, rounding the inputs and every intermediate to
  that dtype. Its error against the truth is the noise floor of the dtype.
* ``compare`` / ``ErrorReport`` / ``default_atol``: FlashAttention's acceptance rule,
  ``err(ours) <= 2 * err(naive in the same dtype) + atol``; a NaN never passes.

Conventions are those of the library: q (batch, seqlen_q, heads, head_dim), k and v
(batch, seqlen_k, heads_kv, head_dim), query head h reads kv head h // (heads // heads_kv),
causal masks are bottom-right aligned (query i sees key j iff j <= i + seqlen_k - seqlen_q),
and a row that sees no key has o = 0, m = -inf, l = 0 and zero gradients.
"""

from __future__ import annotations

import numpy as np

from .constants import default_softmax_scale

_F32 = np.float32
_F64 = np.float64


# -- shared plumbing -----------------------------------------------------------------------


def _resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is not None:
        return float(softmax_scale)
    return default_softmax_scale(head_dim)


def _group(q: np.ndarray, k: np.ndarray) -> int:
    heads, heads_kv = q.shape[2], k.shape[2]
    if heads_kv == 0:
        return 1
    if heads % heads_kv:
        raise ValueError(f"heads ({heads}) must be a multiple of heads_kv ({heads_kv})")
    return heads // heads_kv


def _visible(seqlen_q: int, seqlen_k: int, causal: bool) -> np.ndarray:
    """(seqlen_q, seqlen_k) bool: query i sees key j (bottom-right aligned when causal)."""
    if not causal:
        return np.ones((seqlen_q, seqlen_k), dtype=bool)
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    return j <= i + (seqlen_k - seqlen_q)


def _heads_first(x: np.ndarray, group: int, dtype) -> np.ndarray:
    """(b, s, h_x, d) -> (b, h_x * group, s, d) in dtype, kv heads repeated for GQA."""
    x = np.repeat(x, group, axis=2) if group > 1 else x
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3), dtype=dtype)


def _sum_group(dx: np.ndarray, group: int) -> np.ndarray:
    """(b, h, s, d) gradient of repeated kv heads -> (b, s, h // group, d) summed per group."""
    b, h, s, d = dx.shape
    return dx.reshape(b, h // group, group, s, d).sum(axis=2).transpose(0, 2, 1, 3)


def _softmax_rows(s: np.ndarray, visible: np.ndarray):
    """Masked softmax over the last axis in the dtype of s; returns (p, m, l).

    A row with no visible key gets p = 0, m = -inf, l = 0 (no NaN). A NaN among a row's
    visible scores makes its l and every p NaN (as torch's softmax); m ignores NaN (fmax, as
    the kernels' fmaxf).
    """
    s = np.where(visible, s, -np.inf)
    m = np.fmax.reduce(s, axis=-1, initial=-np.inf)
    m_safe = np.where(np.isfinite(m), m, 0).astype(s.dtype)
    e = np.exp(s - m_safe[..., None])
    l = e.sum(axis=-1)
    p = e / np.where(l == 0, 1, l)[..., None]
    return p, m, l


# -- float64 truth -------------------------------------------------------------------------


def _reference_probs(q, k, causal, softmax_scale):
    """Float64 (q_h, k_h, p, m, l, scale, group) shared by the forward and backward references."""
    group = _group(q, k)
    scale = _resolve_scale(softmax_scale, q.shape[3])
    q_h, k_h = _heads_first(q, 1, _F64), _heads_first(k, group, _F64)
    s = np.matmul(q_h, k_h.swapaxes(-1, -2)) * scale
    p, m, l = _softmax_rows(s, _visible(q.shape[1], k.shape[1], causal))
    return q_h, k_h, p, m, l, scale, group


def attention_reference(q, k, v, *, causal=False, softmax_scale=None):
    """Float64 attention with a materialized softmax. Returns (o, m, l).

    o: float64 (batch, seqlen_q, heads, head_dim). m, l: float64 (batch, heads, seqlen_q),
    m the row max of softmax_scale * q.k over visible keys, l = sum exp(score - m).
    softmax_scale None means 1 / sqrt(head_dim). GQA repeats each kv head for its group.
    """
    _, _, p, m, l, _, group = _reference_probs(q, k, causal, softmax_scale)
    o = np.matmul(p, _heads_first(v, group, _F64)).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(o), m, l


def attention_backward_reference(do, q, k, v, *, causal=False, softmax_scale=None, o=None):
    """Analytic float64 gradients of sum(do * o). Returns (dq, dk, dv) in float64.

    Without ``o``: the true gradients, from the softmax Jacobian directly,
    dS = P * (dP - rowsum(P * dP)), independent of the delta identity the fast paths use.
    With ``o`` (the forward output as a FlashAttention backward receives it, e.g. rounded to
    a 16-bit dtype): delta = rowsum(dO * o) in float64, i.e. the exact FlashAttention-2
    backward given that o. The two differ only by o's rounding, which FlashAttention's dS
    inherits; tests of a backward judge it against the latter (see tests/test_cpu_numerics.py).
    dK, dV are summed over each GQA group.
    """
    q_h, k_h, p, _, _, scale, group = _reference_probs(q, k, causal, softmax_scale)
    v_h, do_h = _heads_first(v, group, _F64), _heads_first(do, 1, _F64)
    dp = np.matmul(do_h, v_h.swapaxes(-1, -2))
    if o is None:
        delta = (p * dp).sum(axis=-1, keepdims=True)
    else:
        delta = (do_h * _heads_first(o, 1, _F64)).sum(axis=-1)[..., None]
    ds = p * (dp - delta)
    dq = np.matmul(ds, k_h) * scale
    dk = np.matmul(ds.swapaxes(-1, -2), q_h) * scale
    dv = np.matmul(p.swapaxes(-1, -2), do_h)
    dq = np.ascontiguousarray(dq.transpose(0, 2, 1, 3))
    return dq, _sum_group(dk, group), _sum_group(dv, group)


# -- the same computation in a given dtype (the noise floor) ------------------------------


def _rounder(dtype):
    """x -> float32 array holding x rounded to dtype (the identity for float32)."""
    dtype = np.dtype(dtype)
    if dtype == np.dtype(_F32):
        return lambda x: np.asarray(x, dtype=_F32)
    if dtype.itemsize != 2:
        raise TypeError(f"naive attention supports float16, bfloat16, float32, not {dtype}")
    return lambda x: np.asarray(x, dtype=_F32).astype(dtype).astype(_F32)


def _naive_probs(q, k, causal, softmax_scale, rnd):
    """(q_h, k_h, p, m, l, scale, group) as a framework computes them in the rounded dtype.

    Matmuls accumulate in float32 and round to dtype; the multiply by the (float32) scale
    rounds; softmax runs in float32 on the rounded scores and P is rounded to dtype.
    """
    group = _group(q, k)
    scale = _resolve_scale(softmax_scale, q.shape[3])
    q_h, k_h = rnd(_heads_first(q, 1, _F32)), rnd(_heads_first(k, group, _F32))
    s = rnd(rnd(np.matmul(q_h, k_h.swapaxes(-1, -2))) * _F32(scale))
    p, m, l = _softmax_rows(s, _visible(q.shape[1], k.shape[1], causal))
    return q_h, k_h, rnd(p), m, l, _F32(scale), group


def attention_naive(q, k, v, *, causal=False, softmax_scale=None, dtype, return_stats=False):
    """Plain attention with inputs and every intermediate rounded to dtype.

    Returns o in dtype (batch, seqlen_q, heads, head_dim); with return_stats also the
    float32 (m, l) a float32 softmax over the rounded scores produces.
    """
    rnd = _rounder(dtype)
    _, _, p, m, l, _, group = _naive_probs(q, k, causal, softmax_scale, rnd)
    o = rnd(np.matmul(p, rnd(_heads_first(v, group, _F32)))).transpose(0, 2, 1, 3)
    o = np.ascontiguousarray(o).astype(dtype)
    if return_stats:
        return o, m.astype(_F32), l.astype(_F32)
    return o


def attention_backward_naive(do, q, k, v, *, causal=False, softmax_scale=None, dtype):
    """Gradients of sum(do * o) as autograd in dtype computes them. Returns (dq, dk, dv).

    Each product is a float32-accumulated matmul rounded to dtype; the softmax backward runs
    in float32 on the rounded P and dP and rounds dS; repeated kv heads' gradients are
    rounded per head and then summed (in float32, rounded once) like a framework's expand.
    """
    rnd = _rounder(dtype)
    q_h, k_h, p, _, _, scale, group = _naive_probs(q, k, causal, softmax_scale, rnd)
    v_h, do_h = rnd(_heads_first(v, group, _F32)), rnd(_heads_first(do, 1, _F32))
    dv = rnd(np.matmul(p.swapaxes(-1, -2), do_h))
    dp = rnd(np.matmul(do_h, v_h.swapaxes(-1, -2)))
    ds = rnd(p * (dp - (p * dp).sum(axis=-1, keepdims=True)))
    ds = rnd(ds * scale)
    dq = rnd(np.matmul(ds, k_h))
    dk = rnd(np.matmul(ds.swapaxes(-1, -2), q_h))
    dq = np.ascontiguousarray(dq.transpose(0, 2, 1, 3)).astype(dtype)
    dk = np.ascontiguousarray(rnd(_sum_group(dk, group))).astype(dtype)
    dv = np.ascontiguousarray(rnd(_sum_group(dv, group))).astype(dtype)
    return dq, dk, dv


# The acceptance rule (compare, default_atol, ErrorReport) lives in cuflash/testing.py;
# these names stay importable from here for existing callers.
from .testing import ErrorReport, compare, default_atol  # noqa: E402, F401

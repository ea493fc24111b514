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

The score modifiers of issue #14 (docs/masks.md) are keyword arguments of every function
here, each off by default. With ``offset = seqlen_k - seqlen_q`` and the raw score
``x_ij = softmax_scale * q_i . k_j``, row i of the softmax runs over

    s_ij = softcap * tanh(x_ij / softcap)         (x_ij itself without softcap)
           - slope_h * |i + offset - j|           (ALiBi, with alibi_slopes)
    for the keys j that ``visible(i, j)``:
        causal:            j <= i + offset
        window (lo, hi):   i + offset - lo <= j <= i + offset + hi   (-1: that side unbounded)
    plus, with sinks, one more logit ``sinks_h`` that has no value vector:

    m_i = max(max_j s_ij, sinks_h)       l_i = sum_j exp(s_ij - m_i) + exp(sinks_h - m_i)
    P_ij = exp(s_ij - m_i) / l_i         o_i = sum_j P_ij v_j

and the gradients are those of ``sum(do * o)``: ``dsinks_h = -sum_{b,i} P_i,sink delta_i``
with ``P_i,sink = exp(sinks_h - m_i) / l_i`` and ``delta_i = sum_j P_ij dP_ij``; softcap
multiplies dS by its derivative ``1 - tanh(x_ij / softcap)^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import block_sparse, philox
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


def _visible(seqlen_q: int, seqlen_k: int, causal: bool, window=None) -> np.ndarray:
    """(seqlen_q, seqlen_k) bool: query i sees key j. With d = j - (i + seqlen_k - seqlen_q),
    the key's distance right of the query's bottom-right diagonal: causal needs d <= 0, a
    window (left, right) needs -left <= d <= right (a side of -1 is unbounded)."""
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    d = j - (i + (seqlen_k - seqlen_q))
    left, right = (-1, -1) if window is None else window
    visible = np.ones((seqlen_q, seqlen_k), dtype=bool)
    if causal:
        visible &= d <= 0
    if left >= 0:
        visible &= d >= -left
    if right >= 0:
        visible &= d <= right
    return visible


def _alibi_distance(seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """(seqlen_q, seqlen_k) |i + seqlen_k - seqlen_q - j| as float64."""
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    return np.abs(i + (seqlen_k - seqlen_q) - j).astype(_F64)


def _per_head(x, batch: int, heads: int) -> np.ndarray:
    """(heads,) or (batch, heads) -> float64 (batch or 1, heads, 1, 1) for (b, h, sq, sk)."""
    x = np.asarray(x, dtype=_F64)
    return x.reshape((x.shape[0] if x.ndim == 2 else 1), heads, 1, 1)


def _heads_first(x: np.ndarray, group: int, dtype) -> np.ndarray:
    """(b, s, h_x, d) -> (b, h_x * group, s, d) in dtype, kv heads repeated for GQA."""
    x = np.repeat(x, group, axis=2) if group > 1 else x
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3), dtype=dtype)


def _sum_group(dx: np.ndarray, group: int) -> np.ndarray:
    """(b, h, s, d) gradient of repeated kv heads -> (b, s, h // group, d) summed per group."""
    b, h, s, d = dx.shape
    return dx.reshape(b, h // group, group, s, d).sum(axis=2).transpose(0, 2, 1, 3)


def _softmax_rows(s: np.ndarray, visible: np.ndarray, sinks=None):
    """Masked softmax over the last axis in the dtype of s; returns (p, m, l, p_sink).

    A row with no visible key gets p = 0, m = -inf, l = 0 (no NaN). A NaN among a row's
    visible scores makes its l and every p NaN (as torch's softmax); m ignores NaN (fmax, as
    the kernels' fmaxf). ``sinks`` (heads,): one more logit per row, in m and l, without a
    value; p_sink (b, h, sq) is its probability (None without sinks).
    """
    s = np.where(visible, s, -np.inf)
    m = np.fmax.reduce(s, axis=-1, initial=-np.inf)
    sink = None
    if sinks is not None:
        sink = np.asarray(sinks, dtype=s.dtype).reshape(1, -1, 1)
        m = np.fmax(m, sink)
    m_safe = np.where(np.isfinite(m), m, 0).astype(s.dtype)
    e = np.exp(s - m_safe[..., None])
    l = e.sum(axis=-1)
    e_sink = None if sink is None else np.exp(sink - m_safe)
    if e_sink is not None:
        l = l + e_sink
    l_safe = np.where(l == 0, 1, l)
    p = e / l_safe[..., None]
    return p, m, l, (None if e_sink is None else e_sink / l_safe)


@dataclass(frozen=True)
class _Modifiers:
    """The score modifiers of one call (docs/masks.md), each None when off."""

    window: tuple[int, int] | None = None
    softcap: float | None = None
    alibi_slopes: np.ndarray | None = None  # (heads,) or (batch, heads)
    sinks: np.ndarray | None = None  # (heads,)
    # issue #15 (docs/block_sparse.md, docs/dropout.md)
    block_mask: np.ndarray | None = None  # bool (batch|1, heads|1, n_q_blocks, n_k_blocks)
    block_size: tuple[int, int] = block_sparse.BLOCK_SIZE
    dropout_p: float = 0.0
    dropout_mask: np.ndarray | None = None  # bool (batch, heads, seqlen_q, seqlen_k): kept
    dropout_seed: int | None = None
    dropout_offset: int = 0


def _modifiers(window, softcap, alibi_slopes, sinks, **issue15) -> _Modifiers:
    """``issue15``: block_mask, block_size, dropout_p, dropout_mask, dropout_seed,
    dropout_offset (the arguments of the same names of the public functions)."""
    return _Modifiers(window=None if window is None else tuple(window),
                      softcap=float(softcap) if softcap else None,
                      alibi_slopes=alibi_slopes, sinks=sinks, **issue15)


def _issue15(block_mask, block_size, dropout_p, dropout_mask, dropout_seed, dropout_offset):
    return dict(block_mask=block_mask, block_size=tuple(block_size), dropout_p=float(dropout_p),
                dropout_mask=dropout_mask, dropout_seed=dropout_seed,
                dropout_offset=dropout_offset)


def _visible_all(q, k, causal, mods: _Modifiers) -> np.ndarray:
    """bool (batch|1, heads|1, seqlen_q, seqlen_k): causal, window and the block mask."""
    sq, sk = q.shape[1], k.shape[1]
    visible = _visible(sq, sk, causal, mods.window)
    if mods.block_mask is None:
        return visible
    mask = block_sparse.check_block_mask(mods.block_mask, mods.block_size, q.shape[0],
                                         q.shape[2], sq, sk)
    return visible & block_sparse.expand(mask, mods.block_size, range(sq), range(sk))


def _dropout_factor(q, k, mods: _Modifiers, dtype):
    """None without dropout, else (batch, heads, seqlen_q, seqlen_k) kept times
    ``philox.keep_scale(dropout_p)`` (1 / (1 - p) for p a multiple of 1/256) in dtype: P
    times it is the dropped P. The mask is ``mods.dropout_mask`` if given, else
    the one ``philox.dropout_mask`` makes from the seed and offset."""
    if mods.dropout_p == 0 and mods.dropout_mask is None:
        return None
    keep = mods.dropout_mask
    if keep is None:
        keep = philox.dropout_mask(q.shape[0], q.shape[2], q.shape[1], k.shape[1],
                                   dropout_p=mods.dropout_p, seed=mods.dropout_seed,
                                   offset=mods.dropout_offset)
    return np.asarray(keep, dtype=bool).astype(dtype) * dtype(philox.keep_scale(mods.dropout_p))


def _scores(x, mods: _Modifiers, rnd=None):
    """(s, t): raw scores x (b, h, sq, sk) -> softcap, then ALiBi; t = tanh(x / softcap)
    (None without softcap), for the backward's derivative 1 - t^2. ``rnd`` rounds every
    intermediate to a dtype (the naive baseline); None keeps float64."""
    rnd = rnd or (lambda y: y)
    t = None
    if mods.softcap is not None:
        cap = x.dtype.type(mods.softcap)
        t = rnd(np.tanh(rnd(x / cap)))
        x = rnd(t * cap)
    if mods.alibi_slopes is not None:
        b, h, sq, sk = x.shape
        bias = _per_head(mods.alibi_slopes, b, h) * _alibi_distance(sq, sk)
        x = rnd(x - bias.astype(x.dtype))
    return x, t


# -- float64 truth -------------------------------------------------------------------------


def _reference_probs(q, k, causal, softmax_scale, mods: _Modifiers):
    """Float64 (q_h, k_h, p, m, l, p_sink, t, scale, group) shared by the forward and
    backward references."""
    group = _group(q, k)
    scale = _resolve_scale(softmax_scale, q.shape[3])
    q_h, k_h = _heads_first(q, 1, _F64), _heads_first(k, group, _F64)
    s, t = _scores(np.matmul(q_h, k_h.swapaxes(-1, -2)) * scale, mods)
    visible = _visible_all(q, k, causal, mods)
    p, m, l, p_sink = _softmax_rows(s, visible, mods.sinks)
    return q_h, k_h, p, m, l, p_sink, t, scale, group


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, window=None,
                        softcap=None, alibi_slopes=None, sinks=None, block_mask=None,
                        block_size=block_sparse.BLOCK_SIZE, dropout_p=0.0, dropout_seed=None,
                        dropout_offset=0, dropout_mask=None):
    """Float64 attention with a materialized softmax. Returns (o, m, l).

    o: float64 (batch, seqlen_q, heads, head_dim). m, l: float64 (batch, heads, seqlen_q),
    m the row max of the scores over visible keys, l = sum exp(score - m); with sinks the
    sink is one more logit of the row in both: m = max(max_j s_ij, sinks_h),
    l = sum_j exp(s_ij - m) + exp(sinks_h - m), and o = sum_j exp(s_ij - m) / l * v_j.
    Scores: s_ij = softcap * tanh(x_ij / softcap) - slope_h * |i + seqlen_k - seqlen_q - j|
    with x_ij = softmax_scale * q_i . k_j (each term only when given); window (left, right)
    keeps keys i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right (-1:
    unbounded), intersected with causal. softmax_scale None means 1 / sqrt(head_dim).
    softcap None or 0 is off. GQA repeats each kv head for its group. v (and o) may have
    their own head_dim_v.

    Issue #15: ``block_mask`` (docs/block_sparse.md), bool (batch|1, heads|1,
    ceil(seqlen_q / block_m), ceil(seqlen_k / block_n)) at ``block_size`` (block_m, block_n),
    hides the keys of its False blocks too. Dropout (docs/dropout.md): with ``dropout_p`` > 0
    o = sum_j P_ij Z_ij s v_j, s = ``philox.keep_scale(dropout_p)`` (1 / (1 - p) with p
    rounded to a multiple of 1/256), Z the kept-mask ``dropout_mask`` (bool (batch,
    heads, seqlen_q, seqlen_k)) or, without it, ``philox.dropout_mask`` of (dropout_seed,
    dropout_offset); m and l stay those of the undropped softmax.
    """
    mods = _modifiers(window, softcap, alibi_slopes, sinks, **_issue15(
        block_mask, block_size, dropout_p, dropout_mask, dropout_seed, dropout_offset))
    _, _, p, m, l, _, _, _, group = _reference_probs(q, k, causal, softmax_scale, mods)
    z = _dropout_factor(q, k, mods, _F64)
    p = p if z is None else p * z
    o = np.matmul(p, _heads_first(v, group, _F64)).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(o), m, l


def attention_backward_reference(do, q, k, v, *, causal=False, softmax_scale=None, o=None,
                                 window=None, softcap=None, alibi_slopes=None, sinks=None,
                                 block_mask=None, block_size=block_sparse.BLOCK_SIZE,
                                 dropout_p=0.0, dropout_seed=None, dropout_offset=0,
                                 dropout_mask=None):
    """Analytic float64 gradients of sum(do * o). Returns (dq, dk, dv), and dsinks (heads,)
    after them when ``sinks`` is given; all float64.

    Without ``o``: the true gradients, from the softmax Jacobian directly,
    dS = P * (dP - rowsum(P * dP)), independent of the delta identity the fast paths use.
    With ``o`` (the forward output as a FlashAttention backward receives it, e.g. rounded to
    a 16-bit dtype): delta = rowsum(dO * o) in float64, i.e. the exact FlashAttention-2
    backward given that o. The two differ only by o's rounding, which FlashAttention's dS
    inherits; tests of a backward judge it against the latter (see tests/test_cpu_numerics.py).
    dK, dV are summed over each GQA group. Modifiers as in ``attention_reference``:
    softcap multiplies dS by 1 - tanh(x / softcap)^2; the sink, a logit without a value
    (dP_sink = 0), gets dsinks_h = sum_{b,i} P_i,sink (0 - delta_i).
    block_mask and dropout as in ``attention_reference``: with the dropout factor
    Z / (1 - p), dV = (P Z / (1 - p))^T dO and dP = (dO V^T) Z / (1 - p); dS = P (dP - delta)
    as before, with P the undropped probabilities.
    """
    mods = _modifiers(window, softcap, alibi_slopes, sinks, **_issue15(
        block_mask, block_size, dropout_p, dropout_mask, dropout_seed, dropout_offset))
    q_h, k_h, p, _, _, p_sink, t, scale, group = _reference_probs(q, k, causal,
                                                                  softmax_scale, mods)
    v_h, do_h = _heads_first(v, group, _F64), _heads_first(do, 1, _F64)
    dp = np.matmul(do_h, v_h.swapaxes(-1, -2))
    z = _dropout_factor(q, k, mods, _F64)
    p_v = p if z is None else p * z  # what multiplied V in the forward
    dp = dp if z is None else dp * z
    if o is None:
        delta = (p * dp).sum(axis=-1, keepdims=True)
    else:
        delta = (do_h * _heads_first(o, 1, _F64)).sum(axis=-1)[..., None]
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1 - t * t)
    dq = np.matmul(ds, k_h) * scale
    dk = np.matmul(ds.swapaxes(-1, -2), q_h) * scale
    dv = np.matmul(p_v.swapaxes(-1, -2), do_h)
    dq = np.ascontiguousarray(dq.transpose(0, 2, 1, 3))
    grads = (dq, _sum_group(dk, group), _sum_group(dv, group))
    if p_sink is None:
        return grads
    return (*grads, -(p_sink * delta[..., 0]).sum(axis=(0, 2)))


# -- the same computation in a given dtype (the noise floor) ------------------------------


def _rounder(dtype):
    """x -> float32 array holding x rounded to dtype (the identity for float32)."""
    dtype = np.dtype(dtype)
    if dtype == np.dtype(_F32):
        return lambda x: np.asarray(x, dtype=_F32)
    if dtype.itemsize != 2:
        raise TypeError(f"naive attention supports float16, bfloat16, float32, not {dtype}")
    return lambda x: np.asarray(x, dtype=_F32).astype(dtype).astype(_F32)


def _naive_probs(q, k, causal, softmax_scale, rnd, mods: _Modifiers):
    """(q_h, k_h, p, m, l, p_sink, t, scale, group) as a framework computes them in the
    rounded dtype.

    Matmuls accumulate in float32 and round to dtype; the multiply by the (float32) scale
    rounds, and so does each step of softcap and the ALiBi subtraction; softmax runs in
    float32 on the rounded scores (and the float32 sinks) and P is rounded to dtype.
    """
    group = _group(q, k)
    scale = _resolve_scale(softmax_scale, q.shape[3])
    q_h, k_h = rnd(_heads_first(q, 1, _F32)), rnd(_heads_first(k, group, _F32))
    s = rnd(rnd(np.matmul(q_h, k_h.swapaxes(-1, -2))) * _F32(scale))
    s, t = _scores(s, mods, rnd)
    visible = _visible_all(q, k, causal, mods)
    p, m, l, p_sink = _softmax_rows(s, visible, mods.sinks)
    p_sink = None if p_sink is None else rnd(p_sink)
    return q_h, k_h, rnd(p), m, l, p_sink, t, _F32(scale), group


def attention_naive(q, k, v, *, causal=False, softmax_scale=None, dtype, return_stats=False,
                    window=None, softcap=None, alibi_slopes=None, sinks=None, block_mask=None,
                    block_size=block_sparse.BLOCK_SIZE, dropout_p=0.0, dropout_seed=None,
                    dropout_offset=0, dropout_mask=None):
    """Plain attention with inputs and every intermediate rounded to dtype.

    Returns o in dtype (batch, seqlen_q, heads, head_dim); with return_stats also the
    float32 (m, l) a float32 softmax over the rounded scores produces. Modifiers as in
    ``attention_reference`` (dropout: the rounded P times the mask and keep_scale(p), rounded,
    as a framework's dropout layer).
    """
    rnd = _rounder(dtype)
    mods = _modifiers(window, softcap, alibi_slopes, sinks, **_issue15(
        block_mask, block_size, dropout_p, dropout_mask, dropout_seed, dropout_offset))
    _, _, p, m, l, _, _, _, group = _naive_probs(q, k, causal, softmax_scale, rnd, mods)
    z = _dropout_factor(q, k, mods, _F32)
    p = p if z is None else rnd(p * z)
    o = rnd(np.matmul(p, rnd(_heads_first(v, group, _F32)))).transpose(0, 2, 1, 3)
    o = np.ascontiguousarray(o).astype(dtype)
    if return_stats:
        return o, m.astype(_F32), l.astype(_F32)
    return o


def attention_backward_naive(do, q, k, v, *, causal=False, softmax_scale=None, dtype,
                             window=None, softcap=None, alibi_slopes=None, sinks=None,
                             block_mask=None, block_size=block_sparse.BLOCK_SIZE,
                             dropout_p=0.0, dropout_seed=None, dropout_offset=0,
                             dropout_mask=None):
    """Gradients of sum(do * o) as autograd in dtype computes them. Returns (dq, dk, dv),
    and float32 dsinks (heads,) after them when ``sinks`` is given.

    Each product is a float32-accumulated matmul rounded to dtype; the softmax backward runs
    in float32 on the rounded P and dP and rounds dS (and its softcap factor); repeated kv
    heads' gradients are rounded per head and then summed (in float32, rounded once) like a
    framework's expand. The sink's dS is rounded per row and summed in float32 (the float32
    parameter's gradient). Dropout: dV from the rounded dropped P, dP times the mask and
    keep_scale(p), rounded.
    """
    rnd = _rounder(dtype)
    mods = _modifiers(window, softcap, alibi_slopes, sinks, **_issue15(
        block_mask, block_size, dropout_p, dropout_mask, dropout_seed, dropout_offset))
    q_h, k_h, p, _, _, p_sink, t, scale, group = _naive_probs(q, k, causal, softmax_scale,
                                                              rnd, mods)
    v_h, do_h = rnd(_heads_first(v, group, _F32)), rnd(_heads_first(do, 1, _F32))
    z = _dropout_factor(q, k, mods, _F32)
    dv = rnd(np.matmul((p if z is None else rnd(p * z)).swapaxes(-1, -2), do_h))
    dp = rnd(np.matmul(do_h, v_h.swapaxes(-1, -2)))
    dp = dp if z is None else rnd(dp * z)
    delta = (p * dp).sum(axis=-1, keepdims=True)
    ds = rnd(p * (dp - delta))
    if t is not None:
        ds = rnd(ds * rnd(1 - t * t))
    ds = rnd(ds * scale)
    dq = rnd(np.matmul(ds, k_h))
    dk = rnd(np.matmul(ds.swapaxes(-1, -2), q_h))
    dq = np.ascontiguousarray(dq.transpose(0, 2, 1, 3)).astype(dtype)
    dk = np.ascontiguousarray(rnd(_sum_group(dk, group))).astype(dtype)
    dv = np.ascontiguousarray(rnd(_sum_group(dv, group))).astype(dtype)
    if p_sink is None:
        return dq, dk, dv
    dsinks = rnd(-p_sink * delta[..., 0]).sum(axis=(0, 2), dtype=_F32)
    return dq, dk, dv, dsinks


# The acceptance rule (compare, default_atol, ErrorReport) lives in cuflash/testing.py;
# these names stay importable from here for existing callers.
from .testing import ErrorReport, compare, default_atol  # noqa: E402, F401


# -- variable lengths (issue #14, docs/varlen.md) -----------------------------------------
#
# Packed layout, as FlashAttention-2's varlen functions: q (total_q, heads, head_dim) holds
# the queries of sequence b in rows cu_seqlens_q[b] : cu_seqlens_q[b + 1], k and v
# (total_k, heads_kv, head_dim) its keys in rows cu_seqlens_k[b] : cu_seqlens_k[b] + n_k(b),
# n_k(b) = seqused_k[b] if given, else cu_seqlens_k[b + 1] - cu_seqlens_k[b]. Each sequence
# is one dense problem (causal, window and ALiBi aligned bottom-right within it); the
# statistics are (heads, total_q). The spec is literally that loop over sequences.


def _sequences(cu_seqlens_q, cu_seqlens_k, seqused_k=None):
    """(b, query rows, key rows) per sequence, as slices into the packed arrays."""
    cu_q = np.asarray(cu_seqlens_q, dtype=np.int64)
    cu_k = np.asarray(cu_seqlens_k, dtype=np.int64)
    for b in range(len(cu_q) - 1):
        n_k = cu_k[b + 1] - cu_k[b] if seqused_k is None else int(seqused_k[b])
        yield b, slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b] + n_k)


def _sequence_kwargs(kwargs: dict, b: int, rq: slice, rk: slice, heads: int) -> dict:
    """The dense call's keywords for sequence b: (batch, heads) ALiBi slopes -> row b;
    dropout (``dropout_p``, ``dropout_seed``, ``dropout_offset``) -> the mask of batch entry
    b over the sequence's own rows and keys (docs/dropout.md), as ``dropout_mask``."""
    slopes = kwargs.get("alibi_slopes")
    if slopes is not None and np.ndim(slopes) == 2:
        kwargs = {**kwargs, "alibi_slopes": np.asarray(slopes)[b]}
    if kwargs.get("dropout_p"):
        from .philox import keep_mask_tile

        mask = keep_mask_tile(1, heads, range(rq.stop - rq.start), range(rk.stop - rk.start),
                              dropout_p=kwargs["dropout_p"], seed=kwargs["dropout_seed"],
                              offset=kwargs.get("dropout_offset") or 0, first_batch=b)
        kwargs = {**kwargs, "dropout_mask": mask, "dropout_seed": None, "dropout_offset": 0}
    return kwargs


def _dropout_kwargs(dropout_p, dropout_seed, dropout_offset) -> dict:
    return {} if not dropout_p else dict(dropout_p=dropout_p, dropout_seed=dropout_seed,
                                         dropout_offset=dropout_offset)


def _varlen_forward(dense, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, dtype, kwargs):
    """Run ``dense(q_b, k_b, v_b, **kwargs) -> (o_b, m_b, l_b)`` per sequence and pack."""
    total_q, heads, _ = q.shape
    o = np.zeros(q.shape[:2] + v.shape[2:], dtype=dtype)  # v's head_dim_v
    m = np.full((heads, total_q), -np.inf)
    l = np.zeros((heads, total_q))
    for b, rq, rk in _sequences(cu_seqlens_q, cu_seqlens_k, seqused_k):
        if rq.stop == rq.start:
            continue
        o_b, m_b, l_b = dense(q[None, rq], k[None, rk], v[None, rk],
                              **_sequence_kwargs(kwargs, b, rq, rk, heads))
        o[rq], m[:, rq], l[:, rq] = o_b[0], m_b[0], l_b[0]
    return o, m, l


def attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, seqused_k=None,
                               causal=False, softmax_scale=None, window=None, softcap=None,
                               alibi_slopes=None, sinks=None, dropout_p=0.0, dropout_seed=None,
                               dropout_offset=0):
    """Float64 variable-length attention: ``attention_reference`` on each sequence.

    q (total_q, heads, head_dim), k (total_k, heads_kv, head_dim), v (..., head_dim_v);
    cu_seqlens_q, cu_seqlens_k (batch + 1,) offsets of each sequence; seqused_k (batch,) keys
    used per sequence (default: all of its rows). Returns float64 o (total_q, heads,
    head_dim_v) and m, l (heads, total_q). Modifiers as in ``attention_reference``, per
    sequence (alibi_slopes (batch, heads): row b for sequence b; dropout: sequence b's mask
    is batch entry b's over its own rows and keys).
    """
    kwargs = dict(causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap,
                  alibi_slopes=alibi_slopes, sinks=sinks,
                  **_dropout_kwargs(dropout_p, dropout_seed, dropout_offset))
    return _varlen_forward(attention_reference, q, k, v, cu_seqlens_q, cu_seqlens_k,
                           seqused_k, _F64, kwargs)


def attention_varlen_naive(q, k, v, cu_seqlens_q, cu_seqlens_k, *, seqused_k=None,
                           causal=False, softmax_scale=None, dtype, window=None, softcap=None,
                           alibi_slopes=None, sinks=None, dropout_p=0.0, dropout_seed=None,
                           dropout_offset=0):
    """``attention_naive`` per sequence: o (total_q, heads, head_dim) in dtype."""
    kwargs = dict(causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap,
                  alibi_slopes=alibi_slopes, sinks=sinks, dtype=dtype, return_stats=True,
                  **_dropout_kwargs(dropout_p, dropout_seed, dropout_offset))
    return _varlen_forward(attention_naive, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k,
                           dtype, kwargs)[0]


def _varlen_backward(dense, do, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, dtype, o,
                     kwargs):
    """Run ``dense(do_b, q_b, k_b, v_b, **kwargs)`` per sequence; pack dq, dk, dv and sum
    dsinks over the sequences. Keys past seqused_k get zero gradients."""
    dq, dk, dv = (np.zeros(x.shape, dtype=dtype) for x in (q, k, v))
    dsinks = None if kwargs.get("sinks") is None else np.zeros(q.shape[1])
    for b, rq, rk in _sequences(cu_seqlens_q, cu_seqlens_k, seqused_k):
        if rq.stop == rq.start:
            continue
        extra = {} if o is None else {"o": o[None, rq]}
        grads = dense(do[None, rq], q[None, rq], k[None, rk], v[None, rk],
                      **_sequence_kwargs(kwargs, b, rq, rk, q.shape[1]), **extra)
        dq[rq], dk[rk], dv[rk] = grads[0][0], grads[1][0], grads[2][0]
        if dsinks is not None:
            dsinks = dsinks + grads[3]
    return (dq, dk, dv) if dsinks is None else (dq, dk, dv, dsinks)


def attention_varlen_backward_reference(do, q, k, v, cu_seqlens_q, cu_seqlens_k, *,
                                        seqused_k=None, causal=False, softmax_scale=None,
                                        o=None, window=None, softcap=None, alibi_slopes=None,
                                        sinks=None, dropout_p=0.0, dropout_seed=None,
                                        dropout_offset=0):
    """Float64 gradients, ``attention_backward_reference`` per sequence: (dq, dk, dv), and
    dsinks (heads,) summed over the sequences when ``sinks`` is given. ``o``: the packed
    forward output (see ``attention_backward_reference``)."""
    kwargs = dict(causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap,
                  alibi_slopes=alibi_slopes, sinks=sinks,
                  **_dropout_kwargs(dropout_p, dropout_seed, dropout_offset))
    return _varlen_backward(attention_backward_reference, do, q, k, v, cu_seqlens_q,
                            cu_seqlens_k, seqused_k, _F64, o, kwargs)


def attention_varlen_backward_naive(do, q, k, v, cu_seqlens_q, cu_seqlens_k, *,
                                    seqused_k=None, causal=False, softmax_scale=None, dtype,
                                    window=None, softcap=None, alibi_slopes=None, sinks=None,
                                    dropout_p=0.0, dropout_seed=None, dropout_offset=0):
    """``attention_backward_naive`` per sequence, gradients in dtype (dsinks float32)."""
    kwargs = dict(causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap,
                  alibi_slopes=alibi_slopes, sinks=sinks, dtype=dtype,
                  **_dropout_kwargs(dropout_p, dropout_seed, dropout_offset))
    grads = _varlen_backward(attention_backward_naive, do, q, k, v, cu_seqlens_q,
                             cu_seqlens_k, seqused_k, dtype, None, kwargs)
    return grads if sinks is None else (*grads[:3], grads[3].astype(_F32))

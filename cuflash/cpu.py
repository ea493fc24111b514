"""Blockwise FlashAttention-2 in NumPy: the CPU path and the executable spec of the kernels.

Read this beside ``kernels_cu/flash_fwd.cu`` and ``kernels_cu/flash_bwd.cu``; the names match.

Forward (FlashAttention-2 Alg. 1). A kernel block owns ``block_m`` query rows and walks the
K/V blocks of ``block_n`` keys left to right. Here every query row of every (batch, head) is
one "tile" (NumPy vectorizes over all of them at once), and the same key-block loop runs:

    for each K/V block [j0, j1):
        s    = (Q @ K_j^T) * scale_log2          # scores in log2 units, as on chip
        mask keys j > i + seqlen_k - seqlen_q     # causal, bottom-right aligned
        m_new = max(m_i, rowmax(s))
        alpha = exp2(m_i - m_new)                 # rescale factor for the old acc and l_i
        p     = exp2(s - m_new)
        l_i   = alpha * l_i + rowsum(p)
        acc   = alpha * acc + p @ V_j
        m_i   = m_new
    O = acc / l_i;  m = m_i * LN2 (natural log, what we store);  l = l_i

``m_i`` lives in log2 units inside the loop (as in the kernels, where ``exp2`` is the cheap
instruction) and leaves in natural-log units; ``l_i`` is the same number in either unit
system. A row that has seen no key keeps ``m_i = -inf`` and is guarded with ``m_safe = 0``
so ``-inf - -inf`` never produces a NaN; it ends with O = 0, m = -inf, l = 0.

Backward (FlashAttention-2 Alg. 2). A kernel block owns ``block_n`` keys of one kv head and
walks the query rows of every query head in its group; here the loop runs over the same
key blocks and each step handles all query rows that can see the block:

    delta = rowsum(dO * O);  lse2 = m * LOG2E + log2(l)   (+inf where l == 0)
    for each K/V block [j0, j1):
        p   = exp2((Q @ K_j^T) * scale_log2 - lse2)       # P recomputed, never stored
        dV_j = p^T @ dO
        dp  = dO @ V_j^T
        ds  = p * (dp - delta)
        dK_j = softmax_scale * ds^T @ Q
        dQ  += ds @ K_j                           # times softmax_scale once at the end

Layout. Grouped-query attention never expands K or V: Q of shape (batch, seqlen_q, heads,
head_dim) is viewed as (batch, seqlen_q, heads_kv, group, head_dim) and stored once as
float32 rows (batch, heads_kv, seqlen_q * group, head_dim), row ``r = i * group + g``. One
matmul against a (batch, heads_kv, block_n, head_dim) key block then serves every query head
of the group, and ``p^T @ dO`` sums dK and dV over the group for free (the kernel's loop over
the heads of its group). Ordering rows by query index first keeps the rows that can see a
causal key block a contiguous suffix.

Memory is O(seqlen_q * block_n) per (batch, head) for the score block, plus float32 copies
of Q (and dO, dQ) in that row layout; no seqlen_q x seqlen_k array is ever built. The
kernels pad the last key block and mask columns >= seqlen_k; NumPy simply slices a shorter
block, and key blocks a causal row cannot see are skipped (for those rows) like the
kernels' early loop exit.
"""

from __future__ import annotations

import math

import numpy as np

LOG2E = 1.4426950408889634  # log2(e): scores are kept in log2 units inside the block loop
LN2 = 0.6931471805599453  # ln(2): converts the log2-unit row max back to natural log

_F32 = np.float32


def _supported_dtypes() -> tuple[np.dtype, ...]:
    import ml_dtypes

    return (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32))


def _check_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, block_n: int) -> tuple[int, ...]:
    """Validate shapes and dtypes; return (batch, seqlen_q, seqlen_k, heads, heads_kv, d)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, head_dim), got {x.shape}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _supported_dtypes():
        raise TypeError(f"unsupported dtype {q.dtype}: use float16, bfloat16 or float32")
    batch, seqlen_q, heads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k {k.shape} does not match q {q.shape} in batch or head_dim")
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    if heads_kv == 0 and heads != 0 or heads_kv != 0 and heads % heads_kv != 0:
        raise ValueError(f"heads ({heads}) must be a multiple of heads_kv ({heads_kv})")
    if block_n < 1:
        raise ValueError(f"block_n must be positive, got {block_n}")
    return batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim


def _to_rows(x: np.ndarray, heads_kv: int) -> np.ndarray:
    """(b, s, heads, d) any dtype/strides -> float32 C-contiguous (b, heads_kv, s * group, d)."""
    b, s, h, d = x.shape
    group = h // heads_kv
    x5 = x.reshape(b, s, heads_kv, group, d).transpose(0, 2, 1, 3, 4)  # splitting h: a view
    return np.ascontiguousarray(x5, dtype=_F32).reshape(b, heads_kv, s * group, d)


def _from_rows(rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Write float32 (b, heads_kv, s * group, d) rows into out (b, s, heads, d), casting."""
    b, s, h, d = out.shape
    heads_kv = rows.shape[1]
    rows5 = rows.reshape(b, heads_kv, s, h // heads_kv, d).transpose(0, 2, 1, 3, 4)
    out.reshape(b, s, heads_kv, h // heads_kv, d)[...] = rows5
    return out


def _stats_to_rows(x: np.ndarray, heads_kv: int) -> np.ndarray:
    """(b, heads, s) -> float32 (b, heads_kv, s * group): the row order of ``_to_rows``."""
    b, h, s = x.shape
    x4 = x.reshape(b, heads_kv, h // heads_kv, s).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(x4, dtype=_F32).reshape(b, heads_kv, -1)


def _stats_from_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """float32 (b, heads_kv, s * group) -> C-contiguous (b, heads, s)."""
    b, heads_kv, n = rows.shape
    group = heads // heads_kv
    r4 = rows.reshape(b, heads_kv, n // group, group).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(r4).reshape(b, heads, n // group)


def _kv_block(x: np.ndarray, j0: int, j1: int) -> np.ndarray:
    """Keys [j0, j1) of (b, seqlen_k, heads_kv, d) as float32 (b, heads_kv, j1 - j0, d)."""
    return np.ascontiguousarray(x[:, j0:j1].transpose(0, 2, 1, 3), dtype=_F32)


def _visible_rows(j0: int, j1: int, seqlen_q: int, seqlen_k: int, causal: bool):
    """Query rows that see key block [j0, j1): all rows i >= i_lo; rows i >= i_full see all of it.

    Query i sees key j iff j <= i + seqlen_k - seqlen_q, so i_lo is the first row that sees
    key j0 and i_full the first row that sees key j1 - 1. Rows [i_lo, i_full) need the mask.
    """
    if not causal:
        return 0, 0
    offset = seqlen_k - seqlen_q
    i_lo = min(max(j0 - offset, 0), seqlen_q)
    i_full = min(max(j1 - 1 - offset, i_lo), seqlen_q)
    return i_lo, i_full


def _hidden_mask(i_lo: int, i_full: int, j0: int, j1: int, group: int, offset: int):
    """Boolean (rows, keys) mask of the diagonal band, True where key j is hidden from row r."""
    i = np.arange(i_lo, i_full).repeat(group)[:, None]  # query index of each merged row
    j = np.arange(j0, j1)[None, :]
    return j > i + offset


def flash_forward_cpu(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool,
    softmax_scale: float,
    block_n: int = 128,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlashAttention-2 forward on NumPy arrays, block by block like ``flash_fwd``.

    q: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim), one
    dtype among float16, bfloat16 (ml_dtypes), float32; any strides. softmax_scale is the
    resolved scale (the caller applies the 1/sqrt(head_dim) default). Computes in float32.

    Returns o (batch, seqlen_q, heads, head_dim) in the input dtype, and float32 m, l of shape
    (batch, heads, seqlen_q): m the row max of softmax_scale * q.k over visible keys (natural
    log), l = sum exp(score - m). A row that sees no key gets o = 0, m = -inf, l = 0.
    """
    batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim = _check_qkv(q, k, v, block_n)
    o = np.zeros(q.shape, dtype=q.dtype)
    m = np.full((batch, heads, seqlen_q), -np.inf, dtype=_F32)
    l = np.zeros((batch, heads, seqlen_q), dtype=_F32)
    if m.size == 0 or seqlen_k == 0:
        return o, m, l  # nothing to attend to: the row-that-sees-no-key convention
    group = heads // heads_kv
    scale_log2 = _F32(softmax_scale * LOG2E)
    offset = seqlen_k - seqlen_q

    q_rows = _to_rows(q, heads_kv)  # (b, heads_kv, seqlen_q * group, d) float32
    n_rows = q_rows.shape[2]
    m_i = np.full((batch, heads_kv, n_rows), -np.inf, dtype=_F32)  # log2 units
    l_i = np.zeros((batch, heads_kv, n_rows), dtype=_F32)
    acc = np.zeros(q_rows.shape, dtype=_F32)

    for j0 in range(0, seqlen_k, block_n):
        j1 = min(j0 + block_n, seqlen_k)
        i_lo, i_full = _visible_rows(j0, j1, seqlen_q, seqlen_k, causal)
        if i_lo == seqlen_q:
            continue  # no query row sees this block (the kernels' causal early exit)
        r_lo = i_lo * group  # rows [r_lo, n_rows) see the block
        k_j, v_j = _kv_block(k, j0, j1), _kv_block(v, j0, j1)

        # -- s = Q K^T in log2 units; mask the diagonal band
        s = np.matmul(q_rows[:, :, r_lo:], k_j.swapaxes(-1, -2))
        s *= scale_log2
        if i_full > i_lo:
            hidden = _hidden_mask(i_lo, i_full, j0, j1, group, offset)
            np.copyto(s[:, :, : hidden.shape[0]], -np.inf, where=hidden)

        # -- online softmax: new row max, rescale acc and l_i by exp2(m_old - m_new)
        m_old = m_i[:, :, r_lo:]
        m_new = np.maximum(m_old, s.max(axis=-1))
        m_safe = np.where(m_new == -np.inf, _F32(0), m_new)  # row saw nothing yet: no NaN
        alpha = np.exp2(m_old - m_safe)
        s -= m_safe[..., None]
        p = np.exp2(s, out=s)
        l_i[:, :, r_lo:] = alpha * l_i[:, :, r_lo:] + p.sum(axis=-1)
        acc_rows = acc[:, :, r_lo:]
        acc_rows *= alpha[..., None]
        acc_rows += np.matmul(p, v_j)
        m_i[:, :, r_lo:] = m_new

    # -- epilogue: O = acc / l_i, m back to natural log; unseen rows keep O = 0
    seen = l_i > 0
    acc /= np.where(seen, l_i, _F32(1))[..., None]
    _from_rows(acc, o)
    m[...] = _stats_from_rows(np.where(seen, m_i * _F32(LN2), _F32(-np.inf)), heads)
    l[...] = _stats_from_rows(l_i, heads)
    return o, m, l


def flash_backward_cpu(
    do: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    o: np.ndarray,
    m: np.ndarray,
    l: np.ndarray,
    *,
    causal: bool,
    softmax_scale: float,
    block_n: int = 128,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlashAttention-2 backward on NumPy arrays, block by block like ``flash_bwd``.

    do, o: like q; m, l: the float32 (batch, heads, seqlen_q) statistics of the forward pass.
    Returns dq (like q), dk, dv (like k) in the input dtype; float32 accumulation. dK and dV
    are summed over the query heads that share a kv head. Rows that see no key (l == 0)
    contribute nothing and get dq = 0.
    """
    batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim = _check_qkv(q, k, v, block_n)
    if do.shape != q.shape or o.shape != q.shape:
        raise ValueError(f"do {do.shape} and o {o.shape} must have the shape of q {q.shape}")
    if m.shape != (batch, heads, seqlen_q) or l.shape != m.shape:
        raise ValueError(f"m {m.shape}, l {l.shape} must be (batch, heads, seqlen_q)")
    dq = np.zeros(q.shape, dtype=q.dtype)
    dk = np.zeros(k.shape, dtype=k.dtype)
    dv = np.zeros(v.shape, dtype=v.dtype)
    if batch * heads * seqlen_q == 0 or seqlen_k == 0:
        return dq, dk, dv
    group = heads // heads_kv
    scale_log2 = _F32(softmax_scale * LOG2E)
    offset = seqlen_k - seqlen_q

    # -- preprocess (flash_bwd_preprocess): delta = rowsum(dO * O), lse2 in log2 units
    delta_bsh = np.einsum("bshd,bshd->bhs", do.astype(_F32), o.astype(_F32))
    delta = _stats_to_rows(delta_bsh, heads_kv)
    m_rows, l_rows = _stats_to_rows(m, heads_kv), _stats_to_rows(l, heads_kv)
    with np.errstate(divide="ignore"):
        lse2 = np.where(l_rows > 0, m_rows * _F32(LOG2E) + np.log2(l_rows), _F32(np.inf))

    q_rows, do_rows = _to_rows(q, heads_kv), _to_rows(do, heads_kv)
    dq_acc = np.zeros(q_rows.shape, dtype=_F32)  # unscaled: times softmax_scale at the end

    for j0 in range(0, seqlen_k, block_n):
        j1 = min(j0 + block_n, seqlen_k)
        i_lo, i_full = _visible_rows(j0, j1, seqlen_q, seqlen_k, causal)
        if i_lo == seqlen_q:
            continue
        r_lo = i_lo * group
        k_j, v_j = _kv_block(k, j0, j1), _kv_block(v, j0, j1)
        q_r, do_r = q_rows[:, :, r_lo:], do_rows[:, :, r_lo:]

        # -- recompute P = exp2(s * scale_log2 - lse2); masked entries and unseen rows are 0
        s = np.matmul(q_r, k_j.swapaxes(-1, -2))
        s *= scale_log2
        s -= lse2[:, :, r_lo:, None]
        p = np.exp2(s, out=s)
        if i_full > i_lo:
            hidden = _hidden_mask(i_lo, i_full, j0, j1, group, offset)
            np.copyto(p[:, :, : hidden.shape[0]], _F32(0), where=hidden)

        # -- dV_j = P^T dO (sums over the rows of every query head in the group)
        dv_j = np.matmul(p.swapaxes(-1, -2), do_r)
        # -- dS = P * (dP - delta), dP = dO V^T
        ds = np.matmul(do_r, v_j.swapaxes(-1, -2))
        ds -= delta[:, :, r_lo:, None]
        ds *= p
        # -- dK_j = scale * dS^T Q;  dQ += dS K_j
        dk_j = np.matmul(ds.swapaxes(-1, -2), q_r)
        dk_j *= _F32(softmax_scale)
        dq_acc[:, :, r_lo:] += np.matmul(ds, k_j)
        dk[:, j0:j1] = dk_j.transpose(0, 2, 1, 3)
        dv[:, j0:j1] = dv_j.transpose(0, 2, 1, 3)

    dq_acc *= _F32(softmax_scale)  # the kernels' dq_accum holds dQ already times the scale
    _from_rows(dq_acc, dq)
    return dq, dk, dv


def default_softmax_scale(head_dim: int) -> float:
    """1 / sqrt(head_dim); 1.0 for head_dim 0, where every score is 0 anyway."""
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0

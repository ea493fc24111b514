"""Split-KV decoding in NumPy: the CPU path of ``attention_with_kvcache`` and the readable
spec of kernels_cu/flash_decode.cu (read the two side by side; the names match).

Rows: for each (batch entry b, kv head h_kv) the q_len queries of the heads of the kv
group are one block of rows, row ``r = i * group + g`` (query i, query head
h_kv * group + g), so K/V are read once per group (``cpu._to_rows``'s order).

Split (``flash_decode_split``, one block per (b, h_kv, split)): keys [s * per, (s + 1) * per)
of the cache, clipped to the entry's valid length L_b = cache_seqlens[b]:

    m_i = -inf, l_i = 0, acc = 0                 # log2 units, as on chip
    for each block of keys [j0, j1) of the split:
        s     = (Q_rows @ K_j^T) * scale_log2
        s     = -inf where key j >= row_end[r]   # row_end = L_b, or L_b - q_len + i + 1 causal
        m_new = max(m_i, rowmax(s));  alpha = exp2(m_i - m_new);  p = exp2(s - m_new)
        l_i   = alpha * l_i + rowsum(p);  acc = alpha * acc + p @ V_j;  m_i = m_new
    o_s   = acc / l_i  (0 where l_i == 0);  lse_s = (m_i + log2(l_i)) * LN2  (-inf there)

Combine (``flash_decode_combine``; cuflash.merge_attention's math):

    m = max_s lse_s;  w_s = exp(lse_s - m);  lse = m + log(sum_s w_s)
    o = sum_s w_s o_s / sum_s w_s

One split is written directly (no combine), as in the kernel. The kernel's block also splits
its keys among lane groups that it merges the same way at the end; here one block of
``block_n`` keys at a time plays that part.
"""

from __future__ import annotations

import numpy as np

from .cpu import LN2, LOG2E, _from_rows, _stats_from_rows, _to_rows

_F32 = np.float32
BLOCK_N_CPU = 512  # keys per NumPy step (a stack of small matmuls per step)


def decode_forward_cpu(q, k_cache, v_cache, cache_seqlens, *, causal: bool,
                       softmax_scale: float, splits: int, keys_per_split: int,
                       block_n: int = BLOCK_N_CPU):
    """(o, lse) for host arrays: o like q (batch, q_len, heads, head_dim) in q's dtype, lse
    float32 (batch, heads, q_len). ``cache_seqlens``: int array (batch,) of valid lengths in
    [0, seqlen_cache], or None. ``splits`` x ``keys_per_split`` cover the cache
    (``decode.split_keys``)."""
    batch, q_len, heads, head_dim = q.shape
    seqlen_cache, heads_kv = k_cache.shape[1], k_cache.shape[2]
    o = np.zeros(q.shape, dtype=q.dtype)
    lse = np.full((batch, heads, q_len), -np.inf, dtype=_F32)
    if o.size == 0 and lse.size == 0:
        return o, lse
    group = heads // heads_kv
    lens = (np.full(batch, seqlen_cache, np.int64) if cache_seqlens is None
            else np.asarray(cache_seqlens, dtype=np.int64))
    q_rows = _to_rows(q, heads_kv) * _F32(softmax_scale * LOG2E)  # (b, h_kv, rows, d)
    k_rows, v_rows = _to_rows(k_cache, heads_kv), _to_rows(v_cache, heads_kv)
    row_end = _row_end(lens, q_len, group, causal)  # (b, 1, rows, 1)
    parts = [_split(q_rows, k_rows, v_rows, row_end, s * keys_per_split,
                    min((s + 1) * keys_per_split, seqlen_cache), block_n)
             for s in range(splits)]
    o_rows, lse_rows = parts[0] if splits == 1 else _combine(parts)
    _from_rows(o_rows, o)
    lse[...] = _stats_from_rows(lse_rows, heads)
    return o, lse


def _row_end(lens, q_len: int, group: int, causal: bool):
    """End (exclusive) of the keys each row sees: (batch, 1, rows, 1)."""
    i = np.repeat(np.arange(q_len), group)[None, :]  # the query of row r = i * group + g
    end = np.clip(lens[:, None] - q_len + i + 1, 0, lens[:, None]) if causal \
        else np.broadcast_to(lens[:, None], (len(lens), q_len * group))
    return end[:, None, :, None]


def _split(q_rows, k_rows, v_rows, row_end, k0: int, k1: int, block_n: int):
    """One split block: keys [k0, k1). Returns (normalized o rows, lse rows in natural log)."""
    m_i = np.full(q_rows.shape[:3], -np.inf, dtype=_F32)
    l_i = np.zeros(q_rows.shape[:3], dtype=_F32)
    acc = np.zeros(q_rows.shape, dtype=_F32)  # invariant: acc = sum_j exp2(s_j - m_i) V_j
    for j0 in range(k0, k1, block_n):
        j1 = min(j0 + block_n, k1)
        # -- s = q . k in log2 units; keys a row does not see -> -inf
        s = np.matmul(q_rows, k_rows[:, :, j0:j1].swapaxes(-1, -2))
        s = np.where(np.arange(j0, j1) < row_end, s, _F32(-np.inf))
        # -- online softmax: new row max, rescale l_i and acc by exp2(m_old - m_new)
        m_new = np.fmax(m_i, np.fmax.reduce(s, axis=-1))  # NaN-ignoring, as fmaxf
        m_safe = np.where(m_new == -np.inf, _F32(0), m_new)
        alpha = np.exp2(m_i - m_safe)
        p = np.exp2(s - m_safe[..., None])
        l_i = alpha * l_i + p.sum(axis=-1)
        acc = acc * alpha[..., None] + np.matmul(p, v_rows[:, :, j0:j1])
        m_i = m_new
    # -- epilogue: o = acc / l, lse = (m + log2 l) * ln 2; rows that saw no key: 0, -inf
    unseen = l_i == 0  # a NaN l_i (a NaN score) is seen: o stays NaN
    with np.errstate(divide="ignore", invalid="ignore"):
        o = acc / np.where(unseen, _F32(1), l_i)[..., None]
        lse = np.where(unseen, _F32(-np.inf),
                       (np.where(unseen, 0, m_i) + np.log2(np.where(unseen, 1, l_i))) * _F32(LN2))
    return o.astype(_F32), lse.astype(_F32)


def _combine(parts):
    """The combine kernel: merge (o_s, lse_s) of every split by their log-sum-exp."""
    lses = np.stack([lse for _, lse in parts])  # (splits, b, h_kv, rows)
    m = np.fmax.reduce(lses, axis=0)
    m_safe = np.where(m == -np.inf, _F32(0), m)  # every split saw no key: weights 0
    w = np.exp2((lses - m_safe) * _F32(LOG2E))
    total = w.sum(axis=0)
    acc = sum(w_s[..., None] * o_s for w_s, (o_s, _) in zip(w, parts))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(total == 0, _F32(0), _F32(1) / np.where(total == 0, 1, total))
        lse = np.where(total == 0, _F32(-np.inf), m_safe + np.log(np.where(total == 0, 1, total)))
    return (acc * inv[..., None]).astype(_F32), lse.astype(_F32)

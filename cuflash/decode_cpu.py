"""Split-KV decoding in NumPy: the CPU path of ``attention_with_kvcache`` and the readable
spec of kernels_cu/flash_decode.cu (read the two side by side; the names match).

Rows: for each (batch entry b, kv head h_kv) the q_len queries of the heads of the kv
group are one block of rows, row ``r = i * group + g`` (query i, query head
h_kv * group + g), so K/V are read once per group (``cpu._to_rows``'s order).

Append (``flash_decode_append``, with k_new / v_new): k_new[b, t] is written into the cache at
position cache_seqlens[b] + t, in place, through block_table when the cache is paged.

Paged caches: position j of entry b is row j % page_size of page block_table[b, j // page_size];
here the pages of each entry are gathered into one (batch, max_pages * page_size, ...) cache
first (a copy; the kernel reads through the table instead).

Split (``flash_decode_split``, one block per (b, h_kv, split)): keys [s * per, (s + 1) * per)
of the cache, clipped to the entry's valid length L_b = cache_seqlens[b] + seqlen_new; query
i's diagonal key is diag = L_b - q_len + i (docs/masks.md's offset):

    m_i = -inf, l_i = 0, acc = 0                 # log2 units, as on chip
    for each block of keys [j0, j1) of the split:
        s     = Q_rows @ K_j^T * scale_q         # scale_q = scale * LOG2E (scale / softcap)
        s     = softcap * LOG2E * tanh(s)        # softcap only
        s    -= slope_h * LOG2E * |diag - j|     # ALiBi only
        s     = -inf unless lo[r] <= j < hi[r]   # hi = L_b, causal diag + 1, window diag+right+1;
                                                 # lo = 0, window diag - left
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
                       block_table=None, k_new=None, v_new=None, window=None, softcap=None,
                       alibi_slopes=None, block_n: int = BLOCK_N_CPU):
    """(o, lse) for host arrays: o like q (batch, q_len, heads, head_dim) in q's dtype, lse
    float32 (batch, heads, q_len). ``cache_seqlens``: int array (batch,) of lengths before
    the append, or None. ``splits`` x ``keys_per_split`` cover the cache
    (``decode.split_keys``). k_new / v_new are written into k_cache / v_cache in place.
    Arguments are validated by ``decode_checks``."""
    batch, q_len, heads, head_dim = q.shape
    seqlen_new = 0 if k_new is None else k_new.shape[1]
    if seqlen_new:
        append_cpu(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
    k_cache, v_cache = _entries(k_cache, block_table), _entries(v_cache, block_table)
    seqlen_cache, heads_kv = k_cache.shape[1], k_cache.shape[2]
    o = np.zeros(q.shape, dtype=q.dtype)
    lse = np.full((batch, heads, q_len), -np.inf, dtype=_F32)
    if o.size == 0 and lse.size == 0:
        return o, lse
    group = heads // heads_kv
    lens = (np.full(batch, seqlen_cache, np.int64) if cache_seqlens is None
            else np.asarray(cache_seqlens, dtype=np.int64) + seqlen_new)
    scale_q = softmax_scale / softcap if softcap else softmax_scale * LOG2E
    q_rows = _to_rows(q, heads_kv) * _F32(scale_q)  # (b, h_kv, rows, d)
    k_rows, v_rows = _to_rows(k_cache, heads_kv), _to_rows(v_cache, heads_kv)
    rows = _RowScores.of(lens, q_len, heads_kv, group, causal, window, softcap, alibi_slopes)
    parts = [_split(q_rows, k_rows, v_rows, rows, s * keys_per_split,
                    min((s + 1) * keys_per_split, seqlen_cache), block_n)
             for s in range(splits)]
    o_rows, lse_rows = parts[0] if splits == 1 else _combine(parts)
    _from_rows(o_rows, o)
    lse[...] = _stats_from_rows(lse_rows, heads)
    return o, lse


def append_cpu(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table=None) -> None:
    """flash_decode_append: k_new[b, t] -> cache position cache_seqlens[b] + t, in place."""
    for b in range(k_new.shape[0]):
        pos = int(cache_seqlens[b]) + np.arange(k_new.shape[1])
        if block_table is None:
            k_cache[b, pos], v_cache[b, pos] = k_new[b], v_new[b]
        else:
            page_size = k_cache.shape[1]
            pages, offsets = block_table[b, pos // page_size], pos % page_size
            k_cache[pages, offsets], v_cache[pages, offsets] = k_new[b], v_new[b]


def _entries(cache, block_table):
    """A paged cache (num_pages, page_size, h, d) as (batch, max_pages * page_size, h, d)."""
    if block_table is None:
        return cache
    batch, max_pages = block_table.shape
    return cache[block_table].reshape(batch, max_pages * cache.shape[1], *cache.shape[2:])


class _RowScores:
    """The kernel's RowScores: per row (b, 1, rows, 1) the visible keys [lo, hi), the
    diagonal, ALiBi's slope in log2 units; the softcap in log2 units."""

    @classmethod
    def of(cls, lens, q_len: int, heads_kv: int, group: int, causal: bool, window, softcap,
           alibi_slopes):
        self = cls()
        i = np.repeat(np.arange(q_len), group)[None, :]  # the query of row r = i * group + g
        diag = lens[:, None] - q_len + i  # (batch, rows)
        left, right = window or (-1, -1)
        hi = np.broadcast_to(lens[:, None], diag.shape)
        if causal:
            hi = np.minimum(hi, diag + 1)
        if right >= 0:
            hi = np.minimum(hi, diag + right + 1)
        lo = np.maximum(diag - left, 0) if left >= 0 else np.zeros_like(diag)
        shape = (len(lens), 1, q_len * group, 1)
        self.lo, self.hi = lo.reshape(shape), np.maximum(hi, 0).reshape(shape)
        self.diag = diag.reshape(shape)
        self.softcap_log2 = _F32(softcap * LOG2E) if softcap else None
        self.slope_log2 = None
        if alibi_slopes is not None:
            slopes = np.broadcast_to(np.asarray(alibi_slopes, _F32),
                                     (len(lens), heads_kv * group))
            g = np.tile(np.arange(group), q_len)  # the group member of row r
            per_row = slopes.reshape(len(lens), heads_kv, 1, group)[:, :, 0, g]
            self.slope_log2 = (per_row * _F32(LOG2E))[..., None]  # (b, h_kv, rows, 1)
        return self

    def apply(self, s, j0: int, j1: int):
        """Scores of keys [j0, j1) -> softcap, ALiBi, mask (-inf where hidden)."""
        j = np.arange(j0, j1)
        if self.softcap_log2 is not None:
            s = self.softcap_log2 * np.tanh(s)
        if self.slope_log2 is not None:
            s = s - self.slope_log2 * np.abs(self.diag - j).astype(_F32)
        return np.where((j >= self.lo) & (j < self.hi), s, _F32(-np.inf))


def _split(q_rows, k_rows, v_rows, rows: _RowScores, k0: int, k1: int, block_n: int):
    """One split block: keys [k0, k1). Returns (normalized o rows, lse rows in natural log).
    (The kernel also clips [k0, k1) to the keys its rows can see; the mask covers that here.)"""
    m_i = np.full(q_rows.shape[:3], -np.inf, dtype=_F32)
    l_i = np.zeros(q_rows.shape[:3], dtype=_F32)
    acc = np.zeros(q_rows.shape, dtype=_F32)  # invariant: acc = sum_j exp2(s_j - m_i) V_j
    for j0 in range(k0, k1, block_n):
        j1 = min(j0 + block_n, k1)
        # -- s = q . k in log2 units, softcap, ALiBi; keys a row does not see -> -inf
        s = rows.apply(np.matmul(q_rows, k_rows[:, :, j0:j1].swapaxes(-1, -2)), j0, j1)
        s = s.astype(_F32, copy=False)
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

"""Blockwise FlashAttention-2 in NumPy: the CPU path and the executable spec of the kernels.

Read this beside ``kernels_cu/flash_fwd.cu`` and ``kernels_cu/flash_bwd.cu``; the names match
(``m_i l_i acc``, ``lse2``, ``delta``, ``scale_log2``, ``block_m block_n``). Each loop
iteration below does, for every (batch, head) at once, what one kernel block does.

Forward (FlashAttention-2 Alg. 1; ``flash_fwd``, grid = query tiles x heads x batch). One
query tile of ``block_m`` rows walks the K/V blocks of ``block_n`` keys left to right:

    m_i = -inf, l_i = 0, acc = 0
    for each K/V block [j0, j1) the tile can see:
        s     = (Q_tile @ K_j^T) * scale_log2      # scores in log2 units, as on chip
        s     = -inf where key j > i + seqlen_k - seqlen_q    # causal, bottom-right
        m_new = max(m_i, rowmax(s))
        alpha = exp2(m_i - m_new)                  # rescale factor for the old l_i and acc
        p     = exp2(s - m_new)
        l_i   = alpha * l_i + rowsum(p)
        acc   = alpha * acc + p @ V_j
        m_i   = m_new
    O = acc / l_i;  m = m_i * LN2 (stored in natural log);  l = l_i

``m_i`` lives in log2 units inside the loop, as in the kernels where ``exp2`` is the fast
instruction (NumPy's ``exp2`` is also faster than its ``exp`` on float32); ``l_i`` is the
same number in either unit system. While a row has seen no key its ``m_i`` is ``-inf`` and
is replaced by ``m_safe = 0`` so that ``-inf - -inf`` never makes a NaN; a row that never
sees a key ends with O = 0, m = -inf, l = 0.

NaN, as in the kernels: the row max ignores NaN scores (``fmax``, the kernels' ``fmaxf``),
but ``exp2(NaN)`` makes l_i and acc NaN, so a NaN in a score a row sees gives that row
O = NaN, l = NaN (m: the max of its other scores), and the backward's lse2 = NaN spreads it
to the row's dQ and to dK, dV of every key the row sees. "Sees no key" is ``l == 0``, never
``not l > 0``, so a NaN row is not mistaken for one.

Backward (FlashAttention-2 Alg. 2; ``flash_bwd``, grid = key blocks x heads_kv x batch). One
K/V block walks the query tiles that can see it, keeping dK_j and dV_j on chip:

    delta = rowsum(dO * O);  lse2 = m * LOG2E + log2(l)   (+inf where l == 0; NaN if l is)
    for each query tile that sees block [j0, j1):
        p    = exp2((Q_tile @ K_j^T) * scale_log2 - lse2)  # P recomputed, exactly softmax
        p    = 0 where masked                              # (and 0 on rows with l == 0)
        dV_j += p^T @ dO_tile
        ds   = p * (dO_tile @ V_j^T - delta)
        dK_j += ds^T @ Q_tile                              # times softmax_scale at the end
        dQ_tile += ds @ K_j                                # times softmax_scale at the end

Score modifiers (issue #14, docs/masks.md; the kernels have them too). Three places, as in
a kernel: ``_Tiling`` is the mask policy, one ``visible(i, j)`` (causal and the sliding
``window``) from which the tile ranges of both loops and the tile-level mask follow, so
tiles no visible pair touches are never visited; ``_Scores.apply`` turns Q K^T into the
scores the softmax sees (``softmax_scale``, then ``softcap * tanh(x / softcap)``, then ALiBi's
``- slope * |i + seqlen_k - seqlen_q - j|``, in log2 units), and returns the tanh the
backward's softcap derivative needs; ``_fold_sink`` adds the per-head sink logit to m_i and
l_i after a row's last K/V block (a key with no value: acc is only rescaled), so the stored
m, l include it and the backward's lse2 already normalizes over it. The backward adds
``ds *= 1 - t^2`` for softcap and dsinks = -sum_rows P_sink * delta from the preprocess's
lse2 and delta.

Issue #15 (docs/block_sparse.md, docs/dropout.md): a block mask joins ``_Tiling`` (tiles
that every (batch, head) has masked are skipped by both loops, the rest get the expanded mask
as -inf with causal / window); dropout multiplies the tile's p by Z / (1 - p) after l_i
has summed it (forward), and scales dP and the P of dV (backward), Z regenerated per tile by
``_Dropout`` from cuflash.philox. v and o may have their own head_dim_v.

Grouped-query attention never expands K or V. Q (batch, seqlen_q, heads, head_dim) is viewed
as (batch, seqlen_q, heads_kv, group, head_dim) and copied once to float32 "rows" (batch,
heads_kv, seqlen_q * group, head_dim), row ``r = i * group + g`` (query i, head g of the
group). One matmul against a (batch, heads_kv, block_n, head_dim) key block then serves every
query head of the group, and ``p^T @ dO`` sums dK and dV over the group for free (the
kernel's loop over the heads of its group). A query tile [i0, i1) is rows
[i0 * group, i1 * group).

Memory: float32 copies of the inputs in that layout (O((seqlen_q + seqlen_k) * head_dim) per
head) plus one score tile of block_m * group x block_n per (batch, kv head); no seqlen_q x
seqlen_k array is ever built. The kernels pad the last key block and mask columns
>= seqlen_k; NumPy slices a shorter block instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import block_sparse, philox
from .constants import LOG2E  # scores are kept in log2 units, as in the kernels

LN2 = 0.6931471805599453  # ln(2): converts the log2-unit row max back to natural log

_F32 = np.float32

# Query rows per tile on the CPU. Larger than a kernel's block_m because each step is a stack
# of small BLAS calls: on 2 cores of a Xeon host (OpenBLAS, 2 threads), (2, 4096, 8, 128)
# float32 forward + backward took 7.8 s with 128 x 128 tiles, 6.0 s with 512 x 128 and 5.2 s
# with 512 x 256 (block_m x block_n), in one session; runs vary by about +-25%.
BLOCK_M_CPU = 512


# -- problem geometry ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Tiling:
    """The mask policy and the block ranges it implies, in one place.

    ``visible(i, j)`` is the whole policy; the rest follows from it: which key blocks a
    query tile visits (``key_blocks``, the forward), which query tiles a key block visits
    (``query_tiles``, the backward), whether a tile needs the mask at all (``needs_mask``)
    and the tile-level apply (``mask``, for S; the backward's S^T is the same tile read
    transposed). Tiles that no visible pair touches are never visited, so the work of a
    windowed call scales with the window. ``left`` / ``right`` bound the key's distance
    from the query's bottom-right diagonal (-1: unbounded); causal is ``right = 0``.
    """

    seqlen_q: int
    seqlen_k: int
    group: int  # query heads per kv head
    block_m: int
    block_n: int
    left: int = -1
    right: int = -1
    blocks: block_sparse.TileMask | None = None  # the block-sparse mask (issue #15)

    @classmethod
    def of(cls, seqlen_q: int, seqlen_k: int, group: int, *, causal: bool,
           window: tuple[int, int] | None, block_m: int, block_n: int,
           blocks: block_sparse.TileMask | None = None) -> "_Tiling":
        """causal and a window (left, right) intersect: causal caps right at 0."""
        left, right = (-1, -1) if window is None else window
        if causal:
            right = 0 if right < 0 else min(right, 0)
        return cls(seqlen_q, seqlen_k, group, block_m, block_n, left, right, blocks)

    @property
    def offset(self) -> int:
        """Bottom-right alignment: the diagonal of query i is key i + offset."""
        return self.seqlen_k - self.seqlen_q

    def visible(self, i, j):
        """Query i sees key j iff i + offset - left <= j <= i + offset + right (ints or
        broadcasting arrays)."""
        d = j - (i + self.offset)
        seen = True
        if self.left >= 0:
            seen = seen & (d >= -self.left)
        if self.right >= 0:
            seen = seen & (d <= self.right)
        return seen

    def key_blocks(self, i0: int, i1: int) -> range:
        """Starts of the key blocks that query rows [i0, i1) see (the forward's K/V loop):
        from the block holding the first row's first key to the last row's last key."""
        lo = max(i0 + self.offset - self.left, 0) if self.left >= 0 else 0
        hi = (min(max(i1 + self.offset + self.right, 0), self.seqlen_k) if self.right >= 0
              else self.seqlen_k)
        return range(lo - lo % self.block_n, hi, self.block_n) if lo < hi else range(0)

    def query_tiles(self, j0: int, j1: int) -> range:
        """Starts of the query tiles that see some key of [j0, j1) (the backward's loop)."""
        lo = max(j0 - self.offset - self.right, 0) if self.right >= 0 else 0
        hi = (min(max(j1 - self.offset + self.left, 0), self.seqlen_q) if self.left >= 0
              else self.seqlen_q)
        return range(lo - lo % self.block_m, hi, self.block_m) if lo < hi else range(0)

    def needs_mask(self, i0: int, i1: int, j0: int, j1: int) -> bool:
        """True unless every query row of [i0, i1) sees every key of [j0, j1): the corner
        pairs (i0, j1 - 1) and (i1 - 1, j0) are the ones the mask could hide."""
        if self.left < 0 and self.right < 0:
            return False
        return not (self.visible(i0, j1 - 1) and self.visible(i1 - 1, j0))

    def mask(self, x: np.ndarray, i0: int, j0: int, fill: float) -> None:
        """x[..., r, c] = fill where key j0 + c is hidden from query i0 + r // group."""
        i = i0 + np.arange(x.shape[-2])[:, None] // self.group
        j = j0 + np.arange(x.shape[-1])[None, :]
        np.copyto(x, _F32(fill), where=~self.visible(i, j))

    def skips(self, i0: int, i1: int, j0: int, j1: int) -> bool:
        """The block mask hides the whole tile from every (batch, head): never visit it."""
        return self.blocks is not None and self.blocks.skips(i0, i1, j0, j1)

    def mask_tile(self, s: np.ndarray, i0: int, i1: int, j0: int, j1: int) -> None:
        """s = -inf where hidden: the causal / window policy, then the block mask."""
        if self.needs_mask(i0, i1, j0, j1):
            self.mask(s, i0, j0, -np.inf)
        hidden = None if self.blocks is None else self.blocks.rows_mask(i0, i1, j0, j1)
        if hidden is not None:
            np.copyto(s, _F32(-np.inf), where=~hidden)


@dataclass(frozen=True)
class _Dropout:
    """Dropout on P (docs/dropout.md): the kept-mask of a tile from cuflash.philox, in the
    row order of ``_to_rows``, times ``philox.keep_scale(p)``. Regenerated, never stored."""

    p: float
    seed: int
    offset: int
    batch: int
    heads: int
    heads_kv: int
    first_batch: int = 0  # the Philox batch index of entry 0 (varlen: the sequence's)

    @classmethod
    def of(cls, dropout_p, seed, offset, batch, heads, heads_kv,
           first_batch: int = 0) -> "_Dropout | None":
        p = philox.check_dropout(dropout_p, seed, offset)
        return cls(p, seed, offset, batch, heads, heads_kv, first_batch) if p > 0 else None

    def factor(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        """float32 (b, heads_kv, (i1 - i0) * group, j1 - j0): kept / (1 - p), else 0."""
        keep = philox.keep_mask_tile(self.batch, self.heads, range(i0, i1), range(j0, j1),
                                     dropout_p=self.p, seed=self.seed, offset=self.offset,
                                     first_batch=self.first_batch)
        group = self.heads // self.heads_kv
        keep = keep.reshape(self.batch, self.heads_kv, group, i1 - i0, j1 - j0)
        keep = keep.transpose(0, 1, 3, 2, 4).reshape(self.batch, self.heads_kv, -1, j1 - j0)
        return keep * _F32(philox.keep_scale(self.p))


@dataclass(slots=True)
class _Scores:
    """Raw products Q K^T -> the scores the softmax sees, in log2 units (one helper, as a
    kernel's score transform): ``x = softmax_scale * q.k``; softcap: ``softcap * tanh(x /
    softcap)``; ALiBi: ``- slope_h * |i + offset - j|``; then times LOG2E.

    ``alibi``: float32 (batch or 1, heads_kv, group) slopes times LOG2E, in the row order of
    ``_to_rows`` (row r of a tile is query i0 + r // group, head r % group of the group).
    """

    softmax_scale: float
    offset: int
    softcap: float | None = None
    alibi: np.ndarray | None = None
    scale_log2: np.float32 = field(init=False)  # softmax_scale * LOG2E

    def __post_init__(self) -> None:
        self.scale_log2 = _F32(self.softmax_scale * LOG2E)

    @property
    def plain(self) -> bool:
        """No softcap: the rows of dS sum to 0 (``_key_center`` may be used)."""
        return self.softcap is None

    def apply(self, s: np.ndarray, i0: int, j0: int) -> np.ndarray | None:
        """Transform s (b, heads_kv, rows, cols) of query tile i0, key block j0 in place;
        return t = tanh(x / softcap) with softcap (dS's factor is 1 - t^2), else None."""
        t = None
        if self.softcap is None:
            s *= self.scale_log2  # exactly the plain path: one rounding of s * scale_log2
        else:
            s *= _F32(self.softmax_scale / self.softcap)  # x / softcap
            t = np.tanh(s)
            np.multiply(t, _F32(self.softcap * LOG2E), out=s)
        if self.alibi is not None:
            rows, cols = s.shape[-2:]
            group = self.alibi.shape[-1]
            i = i0 + np.arange(rows, dtype=np.int64)[:, None] // group
            j = j0 + np.arange(cols, dtype=np.int64)[None, :]
            distance = np.abs(i + self.offset - j).astype(_F32)
            slopes = np.tile(self.alibi, rows // group)[..., None]  # (b, h_kv, rows, 1)
            s -= slopes * distance
        return t


# -- validation and layout -----------------------------------------------------------------


def _supported_dtypes() -> tuple[np.dtype, ...]:
    import ml_dtypes

    return (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32))


def _check_qkv(q, k, v, block_m: int, block_n: int) -> tuple[int, ...]:
    """Validate shapes, dtypes and tiles; return (batch, seqlen_q, seqlen_k, heads, heads_kv)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, head_dim), got {x.shape}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _supported_dtypes():
        raise TypeError(f"unsupported dtype {q.dtype}: use float16, bfloat16 or float32")
    batch, seqlen_q, heads, head_dim = q.shape
    if k.shape[:3] != v.shape[:3]:  # v may have its own head_dim_v
        raise ValueError(f"k and v must have the same shape but for v's head_dim_v, got "
                         f"{k.shape} and {v.shape}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k {k.shape} does not match q {q.shape} in batch or head_dim")
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    if heads_kv == 0 and heads != 0 or heads_kv != 0 and heads % heads_kv != 0:
        raise ValueError(f"heads ({heads}) must be a multiple of heads_kv ({heads_kv})")
    if block_m < 1 or block_n < 1:
        raise ValueError(f"block_m and block_n must be positive, got {block_m}, {block_n}")
    return batch, seqlen_q, seqlen_k, heads, heads_kv


def _check_modifiers(window, softcap, alibi_slopes, sinks, batch: int, heads: int) -> None:
    """Shapes of the score modifiers (the API validates them fully, ``validate.py``)."""
    if window is not None and (len(window) != 2 or min(window) < -1):
        raise ValueError(f"window must be (left, right) with entries >= -1, got {window!r}")
    if softcap is not None and not softcap >= 0:
        raise ValueError(f"softcap must be >= 0 (0 or None: off), got {softcap!r}")
    if alibi_slopes is not None and alibi_slopes.shape not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must be ({heads},) or ({batch}, {heads}), "
                         f"got {alibi_slopes.shape}")
    if sinks is not None and sinks.shape != (heads,):
        raise ValueError(f"sinks must be ({heads},), got {sinks.shape}")


def _tile_mask(block_mask, block_size, q_shape, k_shape) -> block_sparse.TileMask | None:
    """The block mask, checked against q (b, sq, heads, d) and k (b, sk, heads_kv, d)."""
    if block_mask is None:
        return None
    batch, seqlen_q, heads, _ = q_shape
    mask = block_sparse.check_block_mask(block_mask, block_size, batch, heads, seqlen_q,
                                         k_shape[1])
    heads_kv = k_shape[2]
    return block_sparse.TileMask(mask, block_sparse.check_block_size(block_size), heads_kv,
                                 heads // heads_kv if heads_kv else 1)


def _log2_units(x: np.ndarray) -> np.ndarray:
    """Per-head logits or slopes times LOG2E, rounded once to float32."""
    return (np.asarray(x, dtype=np.float64) * LOG2E).astype(_F32)


def _head_rows(x: np.ndarray | None, heads_kv: int) -> np.ndarray | None:
    """(heads,) or (batch, heads) -> float32 (batch or 1, heads_kv, group) in log2 units:
    head kv * group + g at [.., kv, g], so ``np.tile(_, n)`` lists a tile's rows in the
    order of ``_to_rows`` (row r: query r // group, head r % group of the group)."""
    if x is None:
        return None
    x = x.reshape(-1 if x.ndim == 2 else 1, x.shape[-1])
    return _log2_units(x).reshape(x.shape[0], heads_kv, x.shape[1] // heads_kv)


def _to_rows(x: np.ndarray, heads_kv: int) -> np.ndarray:
    """(b, s, heads, d), any dtype and strides -> float32 C-contiguous (b, heads_kv, s*group, d)."""
    b, s, h, d = x.shape
    x5 = x.reshape(b, s, heads_kv, h // heads_kv, d).transpose(0, 2, 1, 3, 4)  # a view
    return np.ascontiguousarray(x5, dtype=_F32).reshape(b, heads_kv, s * (h // heads_kv), d)


def _from_rows(rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Write float32 (b, heads_kv, s*group, d) rows into out (b, s, heads, d), casting once."""
    b, s, h, d = out.shape
    heads_kv = rows.shape[1]
    rows5 = rows.reshape(b, heads_kv, s, h // heads_kv, d).transpose(0, 2, 1, 3, 4)
    out.reshape(b, s, heads_kv, h // heads_kv, d)[...] = rows5
    return out


def _stats_to_rows(x: np.ndarray, heads_kv: int) -> np.ndarray:
    """(b, heads, s) -> float32 (b, heads_kv, s*group), the row order of ``_to_rows``."""
    b, h, s = x.shape
    x4 = x.reshape(b, heads_kv, h // heads_kv, s).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(x4, dtype=_F32).reshape(b, heads_kv, s * (h // heads_kv))


def _stats_from_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """float32 (b, heads_kv, s*group) -> C-contiguous (b, heads, s)."""
    b, heads_kv, n = rows.shape
    group = heads // heads_kv
    r4 = rows.reshape(b, heads_kv, n // group, group).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(r4).reshape(b, heads, n // group)


# -- forward -------------------------------------------------------------------------------


def flash_forward_cpu(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool,
    softmax_scale: float,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: np.ndarray | None = None,
    sinks: np.ndarray | None = None,
    block_mask: np.ndarray | None = None,
    block_size: tuple[int, int] = block_sparse.BLOCK_SIZE,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    dropout_offset: int = 0,
    dropout_batch0: int = 0,
    block_n: int = 128,
    block_m: int = BLOCK_M_CPU,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlashAttention-2 forward on NumPy arrays, tile by tile like ``flash_fwd``.

    q: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim), one
    dtype among float16, bfloat16 (ml_dtypes) and float32, any strides. softmax_scale is the
    resolved scale (callers apply the 1 / sqrt(head_dim) default). Computes in float32,
    block_m queries (per query head) by block_n keys per step, all (batch, head) at once.

    Returns o (batch, seqlen_q, heads, head_dim) in the input dtype, and float32 m, l of shape
    (batch, heads, seqlen_q): m the row max of softmax_scale * q.k over visible keys (natural
    log), l = sum exp(score - m). A row that sees no key gets o = 0, m = -inf, l = 0.

    Score modifiers (docs/masks.md; each None when off): ``window`` (left, right) keeps key
    j of query i iff i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right
    (-1: unbounded; causal is right = 0); ``softcap`` > 0 (0 is off); ``alibi_slopes``
    float32 (heads,) or (batch, heads); ``sinks`` float32 (heads,), a logit per head that
    joins each row's m and l but has no value: m = max(row max, sink), l counts
    exp(sink - m) too, so a row that sees no key gets o = 0, m = sink, l = 1.

    Issue #15: v (and o) may have their own head_dim_v; any head_dim >= 1. ``block_mask``
    (docs/block_sparse.md): bool (batch|1, heads|1, ceil(seqlen_q / block_size[0]),
    ceil(seqlen_k / block_size[1])); its False blocks are hidden too and tiles they cover
    for every (batch, head) are never visited. ``dropout_p`` in [0, 1) with ``dropout_seed``
    and ``dropout_offset`` (docs/dropout.md): P is multiplied by the kept-mask of
    ``cuflash.philox`` and 1 / (1 - dropout_p) before P V; m and l stay undropped.
    ``dropout_batch0``: the Philox batch index of q's entry 0 (varlen_cpu's sequence b).
    """
    batch, seqlen_q, seqlen_k, heads, heads_kv = _check_qkv(q, k, v, block_m, block_n)
    _check_modifiers(window, softcap, alibi_slopes, sinks, batch, heads)
    blocks = _tile_mask(block_mask, block_size, q.shape, k.shape)
    dropout = _Dropout.of(dropout_p, dropout_seed, dropout_offset, batch, heads, heads_kv,
                          dropout_batch0)
    o = np.zeros(q.shape[:3] + v.shape[3:], dtype=q.dtype)
    m = np.full((batch, heads, seqlen_q), -np.inf, dtype=_F32)
    l = np.zeros((batch, heads, seqlen_q), dtype=_F32)
    if m.size == 0 or seqlen_k == 0 and sinks is None:
        return o, m, l  # no row sees a key
    tiling = _Tiling.of(seqlen_q, seqlen_k, heads // heads_kv, causal=causal, window=window,
                        block_m=block_m, block_n=block_n, blocks=blocks)
    scores = _Scores(softmax_scale, tiling.offset, softcap or None,
                     _head_rows(alibi_slopes, heads_kv))
    sink2 = _head_rows(sinks, heads_kv)  # (1, heads_kv, group), log2 units
    q_rows = _to_rows(q, heads_kv)  # (b, heads_kv, seqlen_q * group, d)
    k_rows, v_rows = _to_rows(k, heads_kv), _to_rows(v, heads_kv)  # (b, heads_kv, seqlen_k, d)
    o_rows = np.empty(q_rows.shape[:3] + v_rows.shape[3:], dtype=_F32)
    m_rows = np.empty(q_rows.shape[:3], dtype=_F32)
    l_rows = np.empty(q_rows.shape[:3], dtype=_F32)

    for i0 in range(0, seqlen_q, block_m):  # one iteration = one kernel block per (b, h)
        i1 = min(i0 + block_m, seqlen_q)
        rows = slice(i0 * tiling.group, i1 * tiling.group)
        q_t = q_rows[:, :, rows]
        m_i, l_i, acc = _forward_tile(q_t, k_rows, v_rows, i0, i1, scores, tiling, dropout)
        if sink2 is not None:  # -- the sink joins m_i and l_i after the last K/V block
            m_i, l_i = _fold_sink(m_i, l_i, acc, np.tile(sink2, i1 - i0))
        # -- epilogue: O = acc / l_i, m back to natural log; unseen rows: O = 0, m = -inf
        unseen = l_i == 0  # a NaN l_i (a NaN score) is seen: O stays NaN
        o_rows[:, :, rows] = acc / np.where(unseen, _F32(1), l_i)[..., None]
        m_nat = np.where(unseen, _F32(-np.inf), m_i * _F32(LN2))
        m_rows[:, :, rows] = m_nat
        # l relative to the stored m (as flash_fwd_fp32 does): the backward's lse2, rebuilt
        # from the stored m and l, then matches this loop's m_i + log2(l_i) to one rounding
        with np.errstate(invalid="ignore"):
            l_rows[:, :, rows] = np.where(unseen, l_i,
                                          l_i * np.exp2(m_i - m_nat * _F32(LOG2E)))

    _from_rows(o_rows, o)
    m[...] = _stats_from_rows(m_rows, heads)
    l[...] = _stats_from_rows(l_rows, heads)
    return o, m, l


def _forward_tile(q_t, k_rows, v_rows, i0, i1, scores, tiling, dropout=None):
    """The K/V loop of query tile [i0, i1). Returns (m_i in log2 units, l_i, acc)."""
    m_i = np.full(q_t.shape[:3], -np.inf, dtype=_F32)
    l_i = np.zeros(q_t.shape[:3], dtype=_F32)
    # invariant: acc = sum_j exp2(s_j - m_i) Z_j / (1 - p) V_j (Z_j = 1 without dropout)
    acc = np.zeros(q_t.shape[:3] + v_rows.shape[3:], dtype=_F32)
    for j0 in tiling.key_blocks(i0, i1):
        j1 = min(j0 + tiling.block_n, tiling.seqlen_k)
        if tiling.skips(i0, i1, j0, j1):  # block-sparse: the tile is never loaded
            continue
        # -- s = Q K^T in log2 units (scale, softcap, ALiBi); hidden keys -> -inf
        s = np.matmul(q_t, k_rows[:, :, j0:j1].swapaxes(-1, -2))
        scores.apply(s, i0, j0)
        tiling.mask_tile(s, i0, i1, j0, j1)
        # -- online softmax: new row max, then rescale l_i and acc by exp2(m_old - m_new)
        m_new = np.fmax(m_i, np.fmax.reduce(s, axis=-1))  # NaN-ignoring, as fmaxf
        m_safe = np.where(m_new == -np.inf, _F32(0), m_new)  # row saw no key yet: no NaN
        alpha = np.exp2(m_i - m_safe)
        s -= m_safe[..., None]
        p = np.exp2(s, out=s)
        l_i = alpha * l_i + p.sum(axis=-1)  # the undropped softmax's l
        if dropout is not None:  # -- dropout acts on P V only
            p *= dropout.factor(i0, i1, j0, j1)
        acc *= alpha[..., None]
        acc += np.matmul(p, v_rows[:, :, j0:j1])
        m_i = m_new
    return m_i, l_i, acc


def _fold_sink(m_i, l_i, acc, sink2):
    """Fold the sink logit (log2 units, one per row) into m_i and l_i as one more key whose
    value is 0: rescale l_i and acc to the new max, add exp2(sink2 - m_new) to l_i. A row
    that saw no key (m_i = -inf) gets m_i = sink2, l_i = 1, acc = 0."""
    m_new = np.fmax(m_i, sink2)
    alpha = np.exp2(m_i - m_new)
    acc *= alpha[..., None]
    return m_new, alpha * l_i + np.exp2(sink2 - m_new)


# -- backward ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BackwardRows:
    """Per-query-row operands of the backward, in the merged GQA row order.

    q, do, dq_acc: float32 (b, heads_kv, seqlen_q * group, d); lse2, delta: float32
    (b, heads_kv, seqlen_q * group). dq_acc accumulates dS @ K (not yet times the scale).
    """

    q: np.ndarray
    do: np.ndarray
    lse2: np.ndarray
    delta: np.ndarray
    dq_acc: np.ndarray


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
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: np.ndarray | None = None,
    sinks: np.ndarray | None = None,
    block_mask: np.ndarray | None = None,
    block_size: tuple[int, int] = block_sparse.BLOCK_SIZE,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    dropout_offset: int = 0,
    dropout_batch0: int = 0,
    block_n: int = 128,
    block_m: int = BLOCK_M_CPU,
    center_keys: bool = False,
) -> tuple[np.ndarray, ...]:
    """FlashAttention-2 backward on NumPy arrays, block by block like ``flash_bwd``.

    do, o: like q (any strides); m, l: the float32 (batch, heads, seqlen_q) statistics of the
    forward pass. Returns dq (like q), dk, dv (like k), C-contiguous in the input dtype, with
    float32 accumulation. dK and dV are summed over the query heads sharing a kv head. Rows
    that see no key (l == 0) contribute nothing and get dq = 0. ``center_keys``: m, l are
    the forward's own for these q, k, so dQ may use keys centred on their mean (more accurate
    at large logits; ``_key_center`` says why); leave False for other statistics.

    Score modifiers as in ``flash_forward_cpu`` (the forward's m, l must come from the same
    ones). softcap multiplies dS by 1 - tanh(x / softcap)^2. With ``sinks`` the result has a
    fourth entry, float32 dsinks (heads,): -sum over batch and rows of P_sink * delta.
    Keys are centred only without softcap and sinks (the rows of dS then sum to 0).
    block_mask, block_size, dropout_p, dropout_seed, dropout_offset: as in the forward
    (the same values); dropout regenerates the forward's mask: dV = (P Z / (1 - p))^T dO,
    dP = (dO V^T) Z / (1 - p), dS = P (dP - delta).
    """
    batch, seqlen_q, seqlen_k, heads, heads_kv = _check_qkv(q, k, v, block_m, block_n)
    o_shape = q.shape[:3] + v.shape[3:]
    if do.shape != o_shape or o.shape != o_shape:
        raise ValueError(f"do {do.shape} and o {o.shape} must have the shape {o_shape} "
                         f"(q's with v's head_dim)")
    if m.shape != (batch, heads, seqlen_q) or l.shape != m.shape:
        raise ValueError(f"m {m.shape}, l {l.shape} must be (batch, heads, seqlen_q)")
    _check_modifiers(window, softcap, alibi_slopes, sinks, batch, heads)
    blocks = _tile_mask(block_mask, block_size, q.shape, k.shape)
    dropout = _Dropout.of(dropout_p, dropout_seed, dropout_offset, batch, heads, heads_kv,
                          dropout_batch0)
    dq = np.zeros(q.shape, dtype=q.dtype)
    dk = np.zeros(k.shape, dtype=k.dtype)
    dv = np.zeros(v.shape, dtype=v.dtype)
    dsinks = () if sinks is None else (np.zeros(heads, dtype=_F32),)
    if batch * heads * seqlen_q == 0 or seqlen_k == 0 and sinks is None:
        return dq, dk, dv, *dsinks
    tiling = _Tiling.of(seqlen_q, seqlen_k, heads // heads_kv, causal=causal, window=window,
                        block_m=block_m, block_n=block_n, blocks=blocks)
    scores = _Scores(softmax_scale, tiling.offset, softcap or None,
                     _head_rows(alibi_slopes, heads_kv))

    # -- preprocess (flash_bwd_preprocess): delta = rowsum(dO * O); lse2 in log2 units
    # to float32's last bit (a float64 sum, as the kernels' compensated one): delta must be
    # sum_j P_j dP_j of the P recomputed below, or dQ = sum_j dS_j k_j picks up the
    # difference times k, which large logits amplify
    delta = np.einsum("bshd,bshd->bhs", do.astype(np.float64),
                      o.astype(np.float64)).astype(_F32)
    m_f32, l_f32 = m.astype(_F32), l.astype(_F32)
    with np.errstate(divide="ignore", invalid="ignore"):  # NaN l (a NaN score) stays NaN
        lse2 = np.where(l_f32 == 0, _F32(np.inf), m_f32 * _F32(LOG2E) + np.log2(l_f32))
    if sinks is not None:
        dsinks = (_sink_grad(sinks, lse2, delta),)
    rows = _BackwardRows(
        q=_to_rows(q, heads_kv),
        do=_to_rows(do, heads_kv),
        lse2=_stats_to_rows(lse2, heads_kv),
        delta=_stats_to_rows(delta, heads_kv),
        dq_acc=np.zeros((batch, heads_kv, seqlen_q * tiling.group, q.shape[3]), dtype=_F32),
    )
    k_rows, v_rows = _to_rows(k, heads_kv), _to_rows(v, heads_kv)
    dk_rows, dv_rows = np.empty_like(k_rows), np.empty_like(v_rows)
    plain = scores.plain and sinks is None  # rows of dS sum to 0 (see _key_center)
    k_center = _key_center(k_rows) if center_keys and plain else None

    for j0 in range(0, seqlen_k, block_n):  # one iteration = one kernel block per (b, h_kv)
        j1 = min(j0 + block_n, seqlen_k)
        dk_j, dv_j = _backward_block(rows, k_rows[:, :, j0:j1], v_rows[:, :, j0:j1], j0, j1,
                                     scores, tiling, k_center, dropout)
        dk_rows[:, :, j0:j1] = dk_j * _F32(softmax_scale)
        dv_rows[:, :, j0:j1] = dv_j

    dq_acc = rows.dq_acc
    dq_acc *= _F32(softmax_scale)  # like the kernels' dq_accum: dQ times the scale
    _from_rows(dq_acc, dq)
    _from_rows(dk_rows, dk)
    _from_rows(dv_rows, dv)
    return dq, dk, dv, *dsinks


def _sink_grad(sinks, lse2, delta):
    """dsinks (heads,) float32 = -sum_{b,i} P_sink * delta, P_sink = exp2(sink2 - lse2):
    the sink's dS (its dP is 0: no value), reduced per head (float64 sum here; a kernel
    would reduce per block in float32 and add the blocks' sums)."""
    p_sink = np.exp2(_log2_units(sinks)[None, :, None] - lse2)
    return (-(p_sink * delta).sum(axis=(0, 2), dtype=np.float64)).astype(_F32)


def _key_center(k_rows: np.ndarray) -> np.ndarray:
    """The mean of each (batch, kv head)'s finite keys, (b, heads_kv, 1, d) float32.

    When m, l are the forward's statistics of these very scores, every row of dS sums to 0
    (sum_j P_ij (dP_ij - delta_i) = delta_i - delta_i), so dQ_i = sum_j dS_ij k_j =
    sum_j dS_ij (k_j - c) for any vector c. With c near the keys the float32 product no
    longer carries a component the keys share, which times the rounding left in sum_j dS_ij
    dominates dQ when logits are large (keys sharing a large direction). With other
    statistics (ring attention passes the global ones for a block of keys) the row sums are
    not 0 and the keys are used as they are. Non-finite keys are left out of the mean, so c
    is finite and a NaN key still spreads only to the rows that see it.
    """
    finite = np.isfinite(k_rows)
    count = np.maximum(finite.sum(axis=2, keepdims=True), 1)
    return (np.where(finite, k_rows, 0).sum(axis=2, keepdims=True) / count).astype(_F32)


def _backward_block(rows, k_j, v_j, j0, j1, scores, tiling, k_center, dropout=None):
    """The query loop of key block [j0, j1): returns (dK_j / softmax_scale, dV_j).

    Summing over rows sums over the query heads of each group, which is the GQA reduction.
    """
    dk_j = np.zeros(k_j.shape, dtype=_F32)
    dv_j = np.zeros(v_j.shape, dtype=_F32)
    for i0 in tiling.query_tiles(j0, j1):
        i1 = min(i0 + tiling.block_m, tiling.seqlen_q)
        if tiling.skips(i0, i1, j0, j1):  # block-sparse: the tile is never loaded
            continue
        r = slice(i0 * tiling.group, i1 * tiling.group)
        q_t, do_t = rows.q[:, :, r], rows.do[:, :, r]
        # -- P = exp2(scores(s) - lse2): 0 on hidden keys and on rows with l == 0
        s = np.matmul(q_t, k_j.swapaxes(-1, -2))
        t = scores.apply(s, i0, j0)
        tiling.mask_tile(s, i0, i1, j0, j1)
        s -= rows.lse2[:, :, r, None]
        p = np.exp2(s, out=s)
        # -- dropout: the forward's mask regenerated; Z / (1 - p) scales P V and so dP
        z = None if dropout is None else dropout.factor(i0, i1, j0, j1)
        # -- dV_j += (P Z)^T dO;  dS = P * (dP - delta) with dP = (dO V^T) Z
        dv_j += np.matmul((p if z is None else p * z).swapaxes(-1, -2), do_t)
        ds = np.matmul(do_t, v_j.swapaxes(-1, -2))
        if z is not None:
            ds *= z
        ds -= rows.delta[:, :, r, None]
        ds *= p
        if t is not None:  # softcap: d(score)/dx = 1 - tanh(x / softcap)^2
            ds *= 1 - t * t
        # -- dK_j += dS^T Q;  dQ += dS K_j (both times softmax_scale later)
        dk_j += np.matmul(ds.swapaxes(-1, -2), q_t)
        rows.dq_acc[:, :, r] += np.matmul(ds, k_j if k_center is None else k_j - k_center)
    return dk_j, dv_j

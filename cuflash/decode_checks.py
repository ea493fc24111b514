"""Every check of ``attention_with_kvcache``: TypeError / ValueError naming the argument,
the expected and the got, raised before anything is allocated, written or launched.

``check_decode`` turns imported arrays into one ``DecodeProblem`` (the facts the planner,
the kernels and the NumPy mirror need). Host arrays have their values checked (lengths,
page ids, that an append fits); CUDA values are not read (that would sync the host): the
kernels clamp them instead (kernels_cu/flash_decode.cu says how).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from . import validate
from .interop import Framework, Imported

MAX_Q_LEN = 8  # query rows per sequence the decode kernel takes (speculative decoding)
MAX_SPLITS = 256  # the combine keeps one weight per split in shared memory
PAGE_MULTIPLE = 16  # page sizes are multiples of this many keys (vLLM's default page)
MAX_GRID_X = 2**31 - 1
MAX_CACHE_ROWS = 2**31 - 1  # the kernel indexes cache rows (page * page_size + j) as int32


@dataclass(frozen=True)
class DecodeShape:
    batch: int
    q_len: int
    seqlen_cache: int  # keys an entry can hold: contiguous axis 1, paged max_pages * page_size
    heads: int
    heads_kv: int
    head_dim: int
    dtype: str
    page_size: int = 0  # 0: a contiguous cache
    seqlen_new: int = 0  # keys appended by the call (k_new / v_new)

    @property
    def rows(self) -> int:
        """Query rows per kv head: q_len queries times the heads of a kv group."""
        return self.q_len * (self.heads // self.heads_kv if self.heads_kv else 1)

    @property
    def empty(self) -> bool:
        return 0 in (self.batch, self.q_len, self.heads)


@dataclass(frozen=True)
class DecodeProblem:
    """The validated facts of one ``attention_with_kvcache`` call."""

    shape: DecodeShape
    causal: bool
    softmax_scale: float
    num_splits: int | None  # None: automatic
    device: tuple
    window: tuple[int, int] | None = None  # (left, right), -1 unbounded; None: no window
    softcap: float | None = None
    alibi_per_batch: bool | None = None  # None: no ALiBi; else slopes (batch, heads)
    num_pages: int = 0  # paged caches: pages in k_cache


def check_num_splits(num_splits) -> int | None:
    """None or 0 (automatic, FlashAttention-2's 0), or an int from 1 to MAX_SPLITS."""
    if num_splits is None:
        return None
    if isinstance(num_splits, (bool, np.bool_)) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits: expected None or an int, got {type(num_splits).__name__} "
                        f"{num_splits!r}")
    if not 0 <= int(num_splits) <= MAX_SPLITS:
        raise ValueError(f"num_splits: expected 0 (automatic) to {MAX_SPLITS}, got {num_splits}")
    return int(num_splits) or None


def check_decode(q: Imported, k: Imported, v: Imported, seqlens: Imported | None, *,
                 causal, softmax_scale, num_splits, block_table: Imported | None = None,
                 k_new: Imported | None = None, v_new: Imported | None = None,
                 window=None, softcap=None, alibi_slopes: Imported | None = None,
                 in_place: bool = True) -> DecodeProblem:
    """Every check of ``attention_with_kvcache``. Nothing is allocated or launched before
    this returns. ``in_place`` False: the caller appends k_new / v_new itself (cuflash.jax
    returns new caches), so the caches need not be writable."""
    causal = validate.check_bool(causal, "causal")
    named = [(q, "q"), (k, "k_cache"), (v, "v_cache")]
    validate._check_ndim(q, "q", 4, "(batch, q_len, heads, head_dim)")
    cache_layout = ("(num_pages, page_size, heads_kv, head_dim)" if block_table is not None
                    else "(batch, seqlen_cache, heads_kv, head_dim)")
    for x, name in named[1:]:
        validate._check_ndim(x, name, 4, cache_layout)
    validate._check_same_place(named)
    dtype = validate._check_dtypes(named)
    batch, q_len, heads, head_dim = q.array.shape
    _check_shapes(tuple(q.array.shape), tuple(k.array.shape), tuple(v.array.shape),
                  paged=block_table is not None)
    scale = validate.check_scale(softmax_scale, head_dim)
    splits = check_num_splits(num_splits)
    window, softcap = validate.check_window(window), validate.check_softcap(softcap)
    page_size, num_pages, seqlen_cache = 0, 0, k.array.shape[1]
    if block_table is not None:
        page_size, num_pages = k.array.shape[1], k.array.shape[0]
        seqlen_cache = _check_block_table(block_table, q, k, batch, page_size)
    seqlen_new = 0
    if k_new is not None or v_new is not None:
        seqlen_new = _check_new(k_new, v_new, q, k, dtype, seqlens)
        if in_place:
            _check_writable(k, v)
    if seqlens is not None:
        _check_seqlens(seqlens, q, batch, seqlen_cache, seqlen_new)
    alibi = _check_alibi(alibi_slopes, q, batch, heads)
    shape = DecodeShape(batch, q_len, seqlen_cache, heads, k.array.shape[2], head_dim, dtype,
                        page_size, seqlen_new)
    if q.is_cuda:
        _check_cuda(named + [(x, n) for x, n in ((k_new, "k_new"), (v_new, "v_new"))
                             if x is not None], shape, num_pages)
    return DecodeProblem(shape, causal, scale, splits, q.device, window, softcap, alibi,
                         num_pages)


def _check_shapes(q: tuple, k: tuple, v: tuple, *, paged: bool) -> None:
    batch, q_len, heads, head_dim = q
    if not q_len <= MAX_Q_LEN:
        raise ValueError(f"q: expected q_len (axis 1) from 1 to {MAX_Q_LEN} for decoding, got "
                         f"{q_len} in shape {q}; use cuflash.attention_forward for prefill")
    if head_dim not in validate.SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: expected head_dim a multiple of 8 from 8 to 256, got {head_dim} "
                         f"in shape {q}")
    if paged and k[3] != head_dim:
        raise ValueError(f"k_cache: expected (num_pages, page_size, heads_kv, head_dim "
                         f"{head_dim}) like q {q} with a block_table, got {k}")
    if not paged and (k[0] != batch or k[3] != head_dim):
        raise ValueError(f"k_cache: expected (batch {batch}, seqlen_cache, heads_kv, head_dim "
                         f"{head_dim}) like q {q}, got {k}")
    if v != k:
        raise ValueError(f"v_cache: expected shape {k} like k_cache, got {v}")
    heads_kv = k[2]
    if (heads_kv == 0 and heads > 0) or (heads_kv and heads % heads_kv):
        raise ValueError(f"k_cache: expected heads_kv >= 1 dividing q's {heads} heads "
                         f"(grouped-query attention), got {heads_kv} in shape {k}")


def _check_int32(x: Imported, name: str, q: Imported, shape: tuple, layout: str) -> np.ndarray:
    validate._check_same_place([(q, "q"), (x, name)])
    a = x.array
    if np.dtype(a.dtype) != np.int32:
        raise TypeError(f"{name}: expected int32, got {np.dtype(a.dtype).name}")
    if tuple(a.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} ({layout}), got {tuple(a.shape)}")
    return a


def _check_seqlens(seqlens: Imported, q: Imported, batch: int, seqlen_cache: int,
                   seqlen_new: int) -> None:
    a = _check_int32(seqlens, "cache_seqlens", q, (batch,), "one length per batch entry")
    if batch > 1 and a.strides[0] != 4:
        raise ValueError(f"cache_seqlens: expected a contiguous int32 array, got stride "
                         f"{a.strides[0]} bytes")
    room = seqlen_cache - seqlen_new
    if not seqlens.is_cuda and batch and (a.min() < 0 or a.max() > room):
        # host arrays only: on CUDA this would be a host sync (values are clamped there)
        extra = f" - seqlen_new {seqlen_new} (the appended keys must fit)" if seqlen_new else ""
        raise ValueError(f"cache_seqlens: expected values from 0 to seqlen_cache "
                         f"{seqlen_cache}{extra}, got min {a.min()} and max {a.max()}")


def _check_block_table(table: Imported, q: Imported, k: Imported, batch: int,
                       page_size: int) -> int:
    """A paged cache: page size, table layout and (host) page ids. Returns seqlen_cache."""
    a = table.array
    if a.ndim != 2 or a.shape[0] != batch:
        raise ValueError(f"block_table: expected shape ({batch}, max_pages) (page ids of each "
                         f"batch entry), got {tuple(a.shape)}")
    a = _check_int32(table, "block_table", q, (batch, a.shape[1]), "batch, max_pages")
    if a.size and a.strides != (4 * a.shape[1], 4):
        raise ValueError(f"block_table: expected a C-contiguous int32 array, got strides "
                         f"{a.strides} bytes")
    if page_size == 0 or page_size % PAGE_MULTIPLE:
        raise ValueError(f"k_cache: expected page_size (axis 1 with a block_table) a positive "
                         f"multiple of {PAGE_MULTIPLE}, got {page_size} in shape "
                         f"{tuple(k.array.shape)}")
    num_pages = k.array.shape[0]
    if not table.is_cuda and a.size and (a.min() < 0 or a.max() >= num_pages):
        raise ValueError(f"block_table: expected page ids from 0 to num_pages - 1 = "
                         f"{num_pages - 1}, got min {a.min()} and max {a.max()}")
    return a.shape[1] * page_size


def _check_new(k_new: Imported | None, v_new: Imported | None, q: Imported, k: Imported,
               dtype: str, seqlens: Imported | None) -> int:
    """k_new / v_new (batch, seqlen_new, heads_kv, head_dim), appended in place. Returns
    seqlen_new."""
    if k_new is None or v_new is None:
        given, missing = ("k_new", "v_new") if v_new is None else ("v_new", "k_new")
        raise ValueError(f"{missing}: expected an array with {given} (both or neither), "
                         f"got None")
    if seqlens is None:
        raise ValueError("cache_seqlens: expected the int32 lengths the new keys are appended "
                         "at (k_new / v_new given), got None")
    named = [(k_new, "k_new"), (v_new, "v_new")]
    for x, name in named:
        validate._check_ndim(x, name, 4, "(batch, seqlen_new, heads_kv, head_dim)")
    validate._check_same_place([(q, "q")] + named)
    validate._check_dtypes([(q, "q")] + named)
    batch, heads_kv, head_dim = q.array.shape[0], k.array.shape[2], k.array.shape[3]
    shape = tuple(k_new.array.shape)
    if (shape[0], shape[2], shape[3]) != (batch, heads_kv, head_dim):
        raise ValueError(f"k_new: expected (batch {batch}, seqlen_new, heads_kv {heads_kv}, "
                         f"head_dim {head_dim}), got {shape}")
    if tuple(v_new.array.shape) != shape:
        raise ValueError(f"v_new: expected shape {shape} like k_new, got "
                         f"{tuple(v_new.array.shape)}")
    return shape[1]


def _check_writable(k: Imported, v: Imported) -> None:
    """An append writes into the caches: they must be writable. JAX arrays are immutable
    (on a GPU their DLPack view would be writable, but writing it would break JAX)."""
    for x, name in ((k, "k_cache"), (v, "v_cache")):
        if x.framework is Framework.JAX or (not x.is_cuda and not x.array.flags.writeable):
            raise ValueError(f"{name}: expected a writable array (k_new / v_new are appended "
                             f"in place), got a read-only {x.framework.value} array")


def _check_alibi(slopes: Imported | None, q: Imported, batch: int, heads: int) -> bool | None:
    """None (no ALiBi), else whether the float32 slopes are per batch entry (batch, heads)."""
    if slopes is None:
        return None
    a = validate._check_head_array(slopes, "alibi_slopes", q, [(heads,), (batch, heads)],
                                   "heads, or batch x heads")
    expected = (4 * heads, 4) if a.ndim == 2 else (4,)
    if a.size > 1 and a.strides[-a.ndim:] != expected[-a.ndim:] and heads > 1:
        raise ValueError(f"alibi_slopes: expected a contiguous float32 array, got strides "
                         f"{a.strides} bytes")
    return a.ndim == 2


def _check_cuda(named: list, shape: DecodeShape, num_pages: int) -> None:
    """Limits of the CUDA kernels: grid size, int32 row indices, 16-byte aligned rows."""
    from .decode import row_bucket

    for x, name in named:
        validate.check_alignment(x.array, name)
    s = shape
    tiles = -(-s.rows // row_bucket(s.rows)) if s.heads_kv else 0
    if s.batch * s.heads_kv * tiles > MAX_GRID_X or s.seqlen_cache > validate.MAX_SEQLEN:
        raise ValueError(f"q: batch * heads_kv * ceil(q_len * heads / heads_kv / 8) must be "
                         f"<= {MAX_GRID_X} and seqlen_cache <= {validate.MAX_SEQLEN} on "
                         f"CUDA, got {s.batch * s.heads_kv * tiles} and {s.seqlen_cache}")
    if s.page_size:
        k = named[1][0].array
        itemsize = k.dtype.itemsize
        if num_pages * s.page_size > MAX_CACHE_ROWS:
            raise ValueError(f"k_cache: expected num_pages * page_size <= {MAX_CACHE_ROWS} on "
                             f"CUDA, got {num_pages * s.page_size}")
        for x, name in named[1:3]:
            st = x.array.strides
            if num_pages > 1 and st[0] != s.page_size * st[1]:
                raise ValueError(f"{name}: expected pages laid end to end (stride of axis 0 "
                                 f"== page_size * stride of axis 1, {s.page_size * st[1]} "
                                 f"bytes), got strides {st} bytes (itemsize {itemsize})")

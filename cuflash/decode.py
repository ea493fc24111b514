"""Decoding against a K/V cache: ``attention_with_kvcache``, its kernel specs, plan and launch.

Decoding one token reads the whole K/V cache once, so it is bound by memory bandwidth and
its parallelism has to come from the key axis (Flash-Decoding). ``flash_decode_split``
(kernels_cu/flash_decode.cu) runs one block per (batch entry, kv head, row tile, key
split): it streams its key range once for every query row of the kv group (the q_len
queries times the group's query heads), and writes a partial o and lse per split;
``flash_decode_combine`` merges the splits by their log-sum-exp (cuflash.merge_attention's
math). One split skips the combine. docs/decode.md has the layout and what is missing.

Layers, as in the rest of the package: ``select_decode`` and ``plan_decode`` are pure
functions of the problem and the device's facts (tested on the CPU); ``run_decode`` launches
a plan on raw pointers on a stream; ``attention_with_kvcache`` validates, picks the path
(CUDA torch / CuPy arrays: their own allocator and current stream, no host sync, so a torch
call can be captured in a CUDA graph; JAX on CUDA through DLPack and CuPy; host arrays: the
NumPy mirror in ``decode_cpu``) and hands back the caller's array type.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from . import validate
from .interop import Imported, caller_stream, export_array, import_array

__all__ = ["attention_with_kvcache"]

MAX_Q_LEN = 8  # query rows per sequence the decode kernel takes (speculative decoding)
MAX_SPLITS = 256  # the combine keeps one weight per split in shared memory
# Below this many keys a split's fixed cost (Q load, the group merge, a partial o written
# and read back) is no longer small against its K/V bytes: 256 keys of bf16 head_dim 128 are
# 128 KB of K + V. Not yet tuned on a GPU.
MIN_KEYS_PER_SPLIT = 256
# Splits are added until there are about this many blocks per SM: a 128-thread block holds
# at most 2 * CF_KEYS 16-byte loads per thread in flight, and several resident blocks per SM
# (plus a second wave to hide the tail) are what keeps HBM busy. Not yet tuned on a GPU.
BLOCKS_PER_SM = 8
WARPS = 4
COMBINE_WARPS = 4  # flash_decode.cu's CF_COMBINE_WARPS
MAX_GRID_X = 2**31 - 1
ROW_BUCKETS = (1, 2, 4, 8)
HEAD_DIM_BUCKETS = (32, 64, 128, 256)  # lanes per key row = bucket / 8: a power of two
# Keys each lane group loads per step, by rows per block: (16-bit, float32). Registers per
# thread grow with rows (q and acc: 16 floats per row) and with keys (K and V in flight:
# 8 registers per key for 16-bit, 16 for float32); these keep every spec under 255
# registers with zero spills (tests/test_decode_compile.py).
_KEYS = {1: (8, 4), 2: (8, 4), 4: (4, 2), 8: (2, 1)}
_DTYPE_CODE = {"float16": 0, "bfloat16": 1, "float32": 2}
_DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
LOG2E = 1.4426950408889634


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- the kernel spec ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeSpec:
    """One compilation of flash_decode.cu (both of its kernels): what ``cuflash.compiler``
    needs of a spec (``name``, ``kind``, ``entry``, ``source``, ``defines``, ``smem_bytes``)."""

    dtype: str
    head_dim: int  # bucket: 32, 64, 128 or 256
    rows: int  # query rows per block (CF_ROWS)
    keys: int  # key rows per lane group per step (CF_KEYS)
    warps: int = WARPS
    kind: str = "decode"
    entry: str = "flash_decode_split"
    source: str = "flash_decode.cu"
    causal: bool = False  # a run-time argument of this kernel; here for spec-table code
    target: str = "device"  # built for the GPU's own arch (specs.compile_arch)

    @property
    def name(self) -> str:
        return (f"decode_{_DTYPE_SHORT[self.dtype]}_d{self.head_dim}_r{self.rows}"
                f"_k{self.keys}_w{self.warps}")

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def key_groups(self) -> int:
        """Key rows the block loads at once (kGroups): head_dim / 8 lanes per row."""
        return self.threads // (self.head_dim // 8)

    @property
    def step(self) -> int:
        """Keys per block per loop step (kStep)."""
        return self.key_groups * self.keys

    @property
    def smem_bytes(self) -> int:
        """kGroups * CF_ROWS * (D + 2) floats: every key group's acc, m_i, l_i."""
        return 4 * self.key_groups * self.rows * (self.head_dim + 2)

    @property
    def defines(self) -> dict[str, int]:
        return {"CF_DTYPE": _DTYPE_CODE[self.dtype], "CF_HEAD_DIM": self.head_dim,
                "CF_ROWS": self.rows, "CF_KEYS": self.keys, "CF_WARPS": self.warps}


def head_dim_bucket(head_dim: int) -> int:
    return next(b for b in HEAD_DIM_BUCKETS if head_dim <= b)


def row_bucket(rows: int) -> int:
    """Rows per block for ``rows`` query rows per kv head (more than 8: several row tiles)."""
    return next((b for b in ROW_BUCKETS if rows <= b), ROW_BUCKETS[-1])


def select_decode(dtype: str, head_dim: int, rows: int) -> DecodeSpec:
    """The spec for (dtype, head_dim, q_len * heads_per_kv rows): pure."""
    r = row_bucket(rows)
    keys = _KEYS[r][1 if dtype == "float32" else 0]
    return DecodeSpec(dtype, head_dim_bucket(head_dim), r, keys)


def all_decode_specs(dtypes=("float16", "bfloat16", "float32")) -> list[DecodeSpec]:
    """Every spec ``select_decode`` can return (for compile checks and warm-up)."""
    return [select_decode(dtype, d, r) for dtype in dtypes for d in HEAD_DIM_BUCKETS
            for r in ROW_BUCKETS]


# -- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeShape:
    batch: int
    q_len: int
    seqlen_cache: int
    heads: int
    heads_kv: int
    head_dim: int
    dtype: str

    @property
    def rows(self) -> int:
        """Query rows per kv head: q_len queries times the heads of a kv group."""
        return self.q_len * (self.heads // self.heads_kv if self.heads_kv else 1)

    @property
    def empty(self) -> bool:
        return 0 in (self.batch, self.q_len, self.heads)


@dataclass(frozen=True)
class DecodePlan:
    """Grids, splits and scratch. Scratch (``workspace_bytes``, only when num_splits > 1):
    float32 o_part (num_splits, batch, q_len, heads, head_dim), then at ``lse_offset``
    float32 lse_part (num_splits, batch, heads, q_len)."""

    shape: DecodeShape
    spec: DecodeSpec
    row_tiles: int
    num_splits: int
    keys_per_split: int
    grid: tuple[int, int, int]
    combine_grid: tuple[int, int, int] | None
    lse_offset: int
    workspace_bytes: int

    @property
    def labels(self) -> tuple[str, ...]:
        return (self.spec.name,) + (("decode_combine",) if self.combine_grid else ())


def split_keys(seqlen_cache: int, num_splits: int, step: int = 1) -> tuple[int, int]:
    """(splits, keys_per_split) for at most ``num_splits`` ranges of whole steps covering
    the cache; never an empty trailing range. Shared with the CPU path."""
    if seqlen_cache == 0:
        return 1, 0
    per = _cdiv(_cdiv(seqlen_cache, max(1, num_splits)), step) * step
    return _cdiv(seqlen_cache, per), per


def auto_splits(blocks: int, seqlen_cache: int, sm_count: int) -> int:
    """Splits so that there are about BLOCKS_PER_SM blocks per SM, each split at least
    MIN_KEYS_PER_SPLIT keys of the cache, at most MAX_SPLITS."""
    if sm_count <= 0 or blocks <= 0:
        return 1
    want = _cdiv(BLOCKS_PER_SM * sm_count, blocks)
    return max(1, min(want, MAX_SPLITS, seqlen_cache // MIN_KEYS_PER_SPLIT))


def plan_decode(shape: DecodeShape, sm_count: int, num_splits: int | None = None) -> DecodePlan:
    """Pure: the spec, grids and scratch of one call. ``num_splits`` None or 0: automatic
    (``auto_splits``); else at most that many (``split_keys``)."""
    s = shape
    spec = select_decode(s.dtype, s.head_dim, s.rows)
    row_tiles = _cdiv(s.rows, spec.rows)
    blocks = s.batch * s.heads_kv * row_tiles
    if num_splits:
        splits, per = split_keys(s.seqlen_cache, num_splits)
    else:
        splits, per = split_keys(s.seqlen_cache, auto_splits(blocks, s.seqlen_cache, sm_count),
                                 spec.step)
    combine_grid = lse_offset = workspace = None
    if splits > 1:
        rows_out = s.batch * s.q_len * s.heads
        combine_grid = (_cdiv(rows_out, COMBINE_WARPS), 1, 1)
        lse_offset = _cdiv(4 * splits * rows_out * s.head_dim, 256) * 256
        workspace = lse_offset + 4 * splits * rows_out
    return DecodePlan(s, spec, row_tiles, splits, per, (blocks, splits, 1), combine_grid,
                      lse_offset or 0, workspace or 0)


# -- launching on raw pointers -----------------------------------------------------------------

_SPLIT_SIGNATURE = "pppppppp" + "i" * 10 + "q" * 12 + "f"
_COMBINE_SIGNATURE = "pppp" + "iiiii" + "qqq"
_functions: dict = {}  # (spec name, device, forced arch) -> (split, combine, loaded kernel)


def _functions_of(spec: DecodeSpec, device_id: int) -> tuple[int, int]:
    from .compiler import get_kernel
    from .specs import forced_arch

    key = (spec.name, device_id, forced_arch())
    hit = _functions.get(key)
    if hit is None:
        loaded = get_kernel(spec, device_id)
        combine = loaded.module.get_function("flash_decode_combine")
        ptr = lambda f: int(getattr(f, "kernel", f).ptr)  # RawKernel or Function
        hit = _functions[key] = (ptr(loaded.function), ptr(combine), loaded, combine)
    return hit[0], hit[1]


def _launch(function: int, grid, threads: int, smem: int, signature: str, args, stream: int,
            what: str) -> None:
    from .launch import launch_function

    launch_function(function, grid, threads, smem, signature, args, stream, lambda: what)


def run_decode(plan: DecodePlan, ptrs: tuple, strides: tuple, causal: bool,
               softmax_scale: float, workspace: int, stream: int, device_id: int) -> None:
    """Enqueue the decode on ``stream``. ``ptrs``: q, k, v, cache_seqlens (0 for none), o,
    lse; ``strides``: (batch, seq, head) element strides of q, k, v, o; ``workspace``: the
    address of ``plan.workspace_bytes`` scratch bytes (unused when num_splits == 1)."""
    s, spec = plan.shape, plan.spec
    split_fn, combine_fn = _functions_of(spec, device_id)
    q, k, v, seqlens, o, lse = ptrs
    o_part, lse_part = (workspace, workspace + plan.lse_offset) if plan.combine_grid else (0, 0)
    args = (q, k, v, seqlens, o, lse, o_part, lse_part, s.batch, s.q_len, s.heads, s.heads_kv,
            s.head_dim, s.seqlen_cache, plan.num_splits, plan.keys_per_split, plan.row_tiles,
            int(causal), *strides, softmax_scale * LOG2E)
    _launch(split_fn, plan.grid, spec.threads, spec.smem_bytes, _SPLIT_SIGNATURE, args, stream,
            f"{spec.name} for {s}")
    if plan.combine_grid:
        args = (o_part, lse_part, o, lse, s.batch, s.q_len, s.heads, s.head_dim,
                plan.num_splits, *strides[9:12])
        _launch(combine_fn, plan.combine_grid, 32 * COMBINE_WARPS,
                4 * COMBINE_WARPS * plan.num_splits, _COMBINE_SIGNATURE, args, stream,
                f"flash_decode_combine for {s}")


# -- validation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeProblem:
    """The validated facts of one ``attention_with_kvcache`` call."""

    shape: DecodeShape
    causal: bool
    softmax_scale: float
    num_splits: int | None  # None: automatic
    device: tuple


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


def check_decode(q: Imported, k: Imported, v: Imported, seqlens: Imported | None, *, causal,
                 softmax_scale, num_splits) -> DecodeProblem:
    """Every check of ``attention_with_kvcache``; raises TypeError / ValueError naming the
    argument. Nothing is allocated or launched before this returns."""
    causal = validate.check_bool(causal, "causal")
    named = [(q, "q"), (k, "k_cache"), (v, "v_cache")]
    validate._check_ndim(q, "q", 4, "(batch, q_len, heads, head_dim)")
    for x, name in named[1:]:
        validate._check_ndim(x, name, 4, "(batch, seqlen_cache, heads_kv, head_dim)")
    validate._check_same_place(named)
    dtype = validate._check_dtypes(named)
    batch, q_len, heads, head_dim = q.array.shape
    _, seqlen_cache, heads_kv, _ = k.array.shape
    _check_shapes(tuple(q.array.shape), tuple(k.array.shape), tuple(v.array.shape))
    scale = validate.check_scale(softmax_scale, head_dim)
    splits = check_num_splits(num_splits)
    if seqlens is not None:
        _check_seqlens(seqlens, q, batch, seqlen_cache)
    shape = DecodeShape(batch, q_len, seqlen_cache, heads, heads_kv, head_dim, dtype)
    if q.is_cuda:
        for x, name in named:
            validate.check_alignment(x.array, name)
        tiles = _cdiv(shape.rows, row_bucket(shape.rows)) if heads_kv else 0
        if batch * heads_kv * tiles > MAX_GRID_X or seqlen_cache > validate.MAX_SEQLEN:
            raise ValueError(f"q: batch * heads_kv * ceil(q_len * heads / heads_kv / 8) must be "
                             f"<= {MAX_GRID_X} and seqlen_cache <= {validate.MAX_SEQLEN} on "
                             f"CUDA, got {batch * heads_kv * tiles} and {seqlen_cache}")
    return DecodeProblem(shape, causal, scale, splits, q.device)


def _check_shapes(q: tuple, k: tuple, v: tuple) -> None:
    batch, q_len, heads, head_dim = q
    if not q_len <= MAX_Q_LEN:
        raise ValueError(f"q: expected q_len (axis 1) from 1 to {MAX_Q_LEN} for decoding, got "
                         f"{q_len} in shape {q}; use cuflash.attention_forward for prefill")
    if head_dim not in validate.SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: expected head_dim a multiple of 8 from 8 to 256, got {head_dim} "
                         f"in shape {q}")
    if k[0] != batch or k[3] != head_dim:
        raise ValueError(f"k_cache: expected (batch {batch}, seqlen_cache, heads_kv, head_dim "
                         f"{head_dim}) like q {q}, got {k}")
    if v != k:
        raise ValueError(f"v_cache: expected shape {k} like k_cache, got {v}")
    heads_kv = k[2]
    if (heads_kv == 0 and heads > 0) or (heads_kv and heads % heads_kv):
        raise ValueError(f"k_cache: expected heads_kv >= 1 dividing q's {heads} heads "
                         f"(grouped-query attention), got {heads_kv} in shape {k}")


def _check_seqlens(seqlens: Imported, q: Imported, batch: int, seqlen_cache: int) -> None:
    validate._check_same_place([(q, "q"), (seqlens, "cache_seqlens")])
    a = seqlens.array
    if np.dtype(a.dtype) != np.int32:
        raise TypeError(f"cache_seqlens: expected int32, got {np.dtype(a.dtype).name}")
    if tuple(a.shape) != (batch,):
        raise ValueError(f"cache_seqlens: expected shape ({batch},) (one length per batch "
                         f"entry), got {tuple(a.shape)}")
    if batch > 1 and a.strides[0] != 4:
        raise ValueError(f"cache_seqlens: expected a contiguous int32 array, got stride "
                         f"{a.strides[0]} bytes")
    if not seqlens.is_cuda and batch and (a.min() < 0 or a.max() > seqlen_cache):
        # host arrays only: on CUDA this would be a host sync (values are clamped there)
        raise ValueError(f"cache_seqlens: expected values from 0 to seqlen_cache "
                         f"{seqlen_cache}, got min {a.min()} and max {a.max()}")


# -- the public function -----------------------------------------------------------------------

_CAUSAL_PICTURE = """
    Causal masks align to the bottom-right of each sequence's valid keys (FlashAttention-2):
    query i of q_len sees cache position j iff j <= cache_seqlens[b] - q_len + i.

        q_len = 3, cache_seqlens[b] = 6 (cache positions 6.. are never read)
          j: 0 1 2 3 4 5 | 6 7
        q0:  x x x x . . | . .
        q1:  x x x x x . | . .
        q2:  x x x x x x | . .
"""


def attention_with_kvcache(q, k_cache, v_cache, *, cache_seqlens=None, causal: bool = False,
                           softmax_scale: float | None = None, num_splits: int | None = None,
                           return_softmax_lse: bool = False):
    """Attention of a few new queries against a K/V cache (decoding), split over the keys.

    Args:
        q: (batch, q_len, heads, head_dim), q_len from 1 to 8; float16, bfloat16 or
            float32, head_dim a multiple of 8 up to 256, head_dim contiguous.
        k_cache, v_cache: (batch, seqlen_cache, heads_kv, head_dim), same dtype and device;
            heads a multiple of heads_kv (query head h reads kv head h // (heads // heads_kv)).
            Read only; nothing is appended (see docs/decode.md for what is missing).
        cache_seqlens: None (every entry holds seqlen_cache keys) or an int32 (batch,) array
            of the framework and device of q: entry b attends to cache positions
            [0, cache_seqlens[b]). Host values outside [0, seqlen_cache] raise ValueError;
            on CUDA they are not checked (that would sync the host) and are clamped.
        causal: bottom-right causal mask within each entry's valid length (below).
        softmax_scale: default 1 / sqrt(head_dim).
        num_splits: None or 0 picks the number of key splits from the problem and the GPU
            (1 on the CPU); n >= 1 asks for at most n splits (1: no split, no combine).
        return_softmax_lse: also return the float32 (batch, heads, q_len) log-sum-exp.

    Returns:
        o like q (a new array of the caller's type, dtype and device), or (o, lse) with
        ``return_softmax_lse``. A row that sees no key (cache_seqlens[b] == 0, or causal with
        cache_seqlens[b] < q_len) gets o = 0 and lse = -inf.

    CUDA torch and CuPy arrays run on the framework's current stream with its allocator
    and no host sync (a torch call can be captured in a CUDA graph).
    """
    from .api import _refuse_untracked_gradients

    named = [(q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache")]
    if cache_seqlens is not None:
        named.append((cache_seqlens, "cache_seqlens"))
    _refuse_untracked_gradients(named)
    return_softmax_lse = validate.check_bool(return_softmax_lse, "return_softmax_lse")
    fast = _fast_backend([x for x, _ in named])
    if fast is not None:
        o, lse = _decode_gpu(fast, q, k_cache, v_cache, cache_seqlens, causal, softmax_scale,
                             num_splits)
        return (o, lse) if return_softmax_lse else o
    imported = [import_array(x, name) for x, name in named]
    iq, ik, iv = imported[:3]
    iseq = imported[3] if cache_seqlens is not None else None
    problem = check_decode(iq, ik, iv, iseq, causal=causal, softmax_scale=softmax_scale,
                           num_splits=num_splits)
    with caller_stream(iq):
        if iq.is_cuda:
            from . import fastpath

            o, lse = _decode_gpu(fastpath.cupy_backend(), iq.array, ik.array, iv.array,
                                 None if iseq is None else iseq.array, causal, softmax_scale,
                                 num_splits, problem)
        else:
            o, lse = _decode_cpu(problem, iq.array, ik.array, iv.array,
                                 None if iseq is None else iseq.array)
        o = export_array(o, like=iq)
        return (o, export_array(lse, like=iq)) if return_softmax_lse else o


attention_with_kvcache.__doc__ += _CAUSAL_PICTURE


def _fast_backend(arrays):
    """fastpath's backend for CUDA torch / CuPy arrays of one type, else None."""
    if type(arrays[0]).__module__.split(".")[0] not in ("torch", "cupy"):
        return None
    from . import fastpath

    return fastpath.backend_for(arrays, False, None)


def _decode_cpu(problem: DecodeProblem, q, k, v, seqlens):
    from .decode_cpu import decode_forward_cpu

    s = problem.shape
    splits, per = split_keys(s.seqlen_cache, problem.num_splits or 1)
    return decode_forward_cpu(q, k, v, seqlens, causal=problem.causal,
                              softmax_scale=problem.softmax_scale, splits=splits,
                              keys_per_split=per)


# -- CUDA: validated once per layout, then pointers and a launch --------------------------------

_problems: dict = {}
_plans: dict = {}
_MAX_LAYOUTS = 4096


def _problem(backend, q, k, v, seqlens, causal, softmax_scale, num_splits) -> DecodeProblem:
    layouts = tuple(backend.layout(x) for x in (q, k, v))
    key = (type(causal), causal, type(softmax_scale), softmax_scale, type(num_splits),
           num_splits, layouts, None if seqlens is None else backend.layout(seqlens))
    known = _problems.get(key)
    if known is not None and all(backend.ptr(x) % validate.ROW_ALIGNMENT == 0
                                 for x in (q, k, v)):
        return known
    named = [(q, "q"), (k, "k_cache"), (v, "v_cache")]
    iq, ik, iv = (import_array(x, n) for x, n in named)
    iseq = None if seqlens is None else import_array(seqlens, "cache_seqlens")
    problem = check_decode(iq, ik, iv, iseq, causal=causal, softmax_scale=softmax_scale,
                           num_splits=num_splits)
    if len(_problems) >= _MAX_LAYOUTS:
        _problems.clear()
    _problems[key] = problem
    return problem


def decode_plan(shape: DecodeShape, num_splits: int | None, device_id: int) -> DecodePlan:
    """``plan_decode`` memoized per (shape, num_splits, device)."""
    key = (shape, num_splits, device_id)
    plan = _plans.get(key)
    if plan is None:
        from .launch import device_facts
        from .specs import check_dtype

        facts = device_facts(device_id)
        check_dtype(facts, shape.dtype)
        plan = _plans[key] = plan_decode(shape, facts.sm_count, num_splits)
    return plan


def _decode_gpu(backend, q, k, v, seqlens, causal, softmax_scale, num_splits,
                problem: DecodeProblem | None = None):
    """(o, lse) on CUDA arrays of ``backend``'s framework, on its current stream."""
    from .launch import poison_enabled

    if problem is None:
        problem = _problem(backend, q, k, v, seqlens, causal, softmax_scale, num_splits)
    s = problem.shape
    o = backend.empty(q.shape, None, q)
    lse = backend.empty((s.batch, s.heads, s.q_len), backend.float32, q)
    if poison_enabled():
        backend.poison(o), backend.poison(lse)
    if s.empty:
        return o, lse
    index = backend.device_index(q)
    with backend.on_device(index):
        plan = decode_plan(s, problem.num_splits, index)
        workspace = (backend.empty((plan.workspace_bytes,), backend.uint8, q)
                     if plan.workspace_bytes else None)
        ops = [backend.operand(x) for x in (q, k, v)]
        strides = tuple(x for op in ops for x in op[1:4])
        strides += (s.q_len * s.heads * s.head_dim, s.heads * s.head_dim, s.head_dim)  # o
        ptrs = (*(op.ptr for op in ops), 0 if seqlens is None else backend.ptr(seqlens),
                backend.ptr(o), backend.ptr(lse))
        run_decode(plan, ptrs, strides, problem.causal, problem.softmax_scale,
                   0 if workspace is None else backend.ptr(workspace), backend.stream(), index)
    return o, lse

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

import ctypes
import math
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
    from cupy_backends.cuda.api import driver

    from .launch import LaunchError, _param_struct

    struct, nbytes = _param_struct(signature)
    params = struct(*args)
    size = ctypes.c_size_t(nbytes)
    extra = (ctypes.c_void_p * 5)(1, ctypes.addressof(params), 2, ctypes.addressof(size), 0)
    try:
        driver.launchKernel(function, *grid, threads, 1, 1, smem, stream, 0,
                            ctypes.addressof(extra))
    except Exception as exc:
        raise LaunchError(f"cuflash: launching {what} (grid {grid}, {threads} threads, {smem} "
                          f"B shared memory) failed: {exc}") from exc


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

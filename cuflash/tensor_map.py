"""Tensor maps for Hopper's bulk tensor copies (TMA), made by the driver's
``cuTensorMapEncodeTiled`` through ctypes (no cuda-python needed).

A kernel that loads with TMA takes one 128-byte map per array, by value
(kernels_cu/cf_sm90.cuh's ``cf_tensor_map``). Each map describes the whole array as
(column, row, head, batch), innermost first, with the array's own byte strides, and a box of
64 columns by a tile's rows with the 128-byte swizzle: the layout the wgmma kernels keep
their tiles in. A map holds the array's address, so every call with new arrays needs new
maps: ``encode`` remembers recent ones (a training loop's allocator hands out the same
addresses again).

What a layout must satisfy (the driver's documented rules for cuTensorMapEncodeTiled) is
``layout_problem``'s business; it is a pure function, checked without a GPU.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import NamedTuple

# CUtensorMapDataType, CUtensorMapSwizzle and the other enums of cuda.h
_DATA_TYPES = {"float16": 6, "bfloat16": 9}
_INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZEROS = 0, 3, 3, 0
MAP_BYTES = 128  # CU_TENSOR_MAP_NUM_QWORDS * 8
MAP_ALIGNMENT = 64
BOX_COLUMNS = 64  # one panel: 64 two-byte columns, the 128-byte swizzle's span
_MAX_STRIDE = 1 << 40
_MAX_DIM = 1 << 32
_MAX_BOX = 256


class TensorMap(NamedTuple):
    """The arguments of one map; ``ptr`` may be a replay stand-in (cuflash.replay.Address),
    filled in per call. ``dims``: (columns, rows, heads, batch) in elements; ``strides``: the
    byte strides of rows, heads and batch; ``box``: (columns, rows, 1, 1)."""

    ptr: object
    dtype: str
    dims: tuple
    strides: tuple
    box: tuple

    def encoded_at(self, ptr: int) -> bytes:
        return encode(ptr, self.dtype, self.dims, self.strides, self.box)

    def encoded(self) -> bytes:
        return self.encoded_at(self.ptr)


def tile_map(ptr, dtype: str, head_dim: int, rows: int, heads: int, batch: int,
             strides: tuple, box_rows: int, itemsize: int = 2) -> TensorMap:
    """The map of a (batch, rows, heads, head_dim) array with element ``strides`` (batch,
    row, head), read in boxes of 64 columns x ``box_rows`` rows. A dim of one element takes
    the smallest legal stride (its stride is never used)."""
    stride_b, stride_m, stride_h = (s * itemsize for s in strides)
    dims = (head_dim, rows, heads, batch)
    byte_strides = tuple(s if n > 1 else 16 for s, n in zip((stride_m, stride_h, stride_b),
                                                            dims[1:]))
    return TensorMap(ptr, dtype, dims, byte_strides, (BOX_COLUMNS, box_rows, 1, 1))


def layout_problem(dtype: str, dims: tuple, strides: tuple, box: tuple) -> str | None:
    """Why the driver would refuse (or a box would misread) this map, or None: the address
    is checked by the caller (16-byte aligned, like every kernel's rows)."""
    if dtype not in _DATA_TYPES:
        return f"dtype {dtype}: TMA tiles here are float16 / bfloat16"
    if len(dims) != len(box) or len(strides) != len(dims) - 1 or not 1 <= len(dims) <= 5:
        return f"rank: dims {dims}, strides {strides}, box {box}"
    for n in dims:
        if not 1 <= n <= _MAX_DIM:
            return f"dims {dims}: each must lie in 1 .. 2^32"
    for stride, n in zip(strides, dims[1:]):
        if stride <= 0 or stride % 16 or stride >= _MAX_STRIDE:
            return (f"strides {strides} bytes: each must be a positive multiple of 16 below "
                    f"2^40 (a broadcast axis of stride 0 cannot be boxed)")
    for b in box:
        if not 1 <= b <= _MAX_BOX:
            return f"box {box}: each side must lie in 1 .. 256"
    if box[0] * 2 != 128:
        return f"box {box}: 64 two-byte columns, the 128-byte swizzle's span"
    return None


_encode_fn = None


def _driver_encode():
    global _encode_fn
    if _encode_fn is None:
        lib = ctypes.CDLL("libcuda.so.1")  # the driver CuPy already loaded
        fn = lib.cuTensorMapEncodeTiled
        u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p,
                       u64p, u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        _encode_fn = fn
    return _encode_fn


@lru_cache(maxsize=4096)
def encode(ptr: int, dtype: str, dims: tuple, strides: tuple, box: tuple) -> bytes:
    """The driver's 128-byte map (a ValueError naming the rule where the layout breaks
    one; a RuntimeError with the driver's code where the driver refuses anyway)."""
    problem = layout_problem(dtype, dims, strides, box)
    if problem:
        raise ValueError(f"tensor map: {problem}")
    if ptr % 16:
        raise ValueError(f"tensor map: address {ptr:#x} is not 16-byte aligned")
    rank = len(dims)
    storage = (ctypes.c_char * (MAP_BYTES + MAP_ALIGNMENT))()
    at = ctypes.addressof(storage)
    at += -at % MAP_ALIGNMENT  # the driver wants the map 64-byte aligned
    status = _driver_encode()(
        at, _DATA_TYPES[dtype], rank, ptr, (ctypes.c_uint64 * rank)(*dims),
        (ctypes.c_uint64 * (rank - 1))(*strides), (ctypes.c_uint32 * rank)(*box),
        (ctypes.c_uint32 * rank)(*([1] * rank)), _INTERLEAVE_NONE, _SWIZZLE_128B,
        _L2_PROMOTION_256B, _OOB_FILL_ZEROS)
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled refused dims {dims}, strides {strides}, "
                           f"box {box} ({dtype}): CUresult {status}")
    return ctypes.string_at(at, MAP_BYTES)

"""Launching the CUDA kernels on CuPy arrays: pointers, strides, grids, the current stream.

Pure functions of arrays: ``flash_forward_gpu`` -> (o, m, l) and ``flash_backward_gpu`` ->
(dq, dk, dv). The caller (``api``) has validated the inputs and made the caller's stream
CuPy's current stream; every launch here goes on that stream. Parameter order is the one in
docs/kernel_abi.md.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np

from . import specs
from .compiler import get_convert_kernel, get_kernel
from .specs import DeviceFacts, KernelSpec

LOG2E = 1.4426950408889634


def poison_enabled() -> bool:
    """Tests set CUFLASH_POISON=1 so every output starts as NaN and an unwritten element shows."""
    return os.environ.get("CUFLASH_POISON", "") == "1"


# NaN bit patterns by logical dtype; 16-bit data may be stored as uint16 in CuPy (bfloat16).
_NAN_BITS = {"float16": 0x7E00, "bfloat16": 0x7FC0}


def _empty(shape, storage_dtype, logical: str = "float32"):
    """A new CuPy array; NaN-filled when poisoning is on (the kernel must overwrite it)."""
    import cupy

    return _poisoned(cupy.empty(shape, dtype=storage_dtype), logical)


def _poisoned(out, logical: str = "float32"):
    """``out`` NaN-filled when poisoning is on (also caller-given outputs, ``out=``)."""
    if poison_enabled() and out.size:
        if logical in _NAN_BITS:
            out.view(np.uint16).fill(_NAN_BITS[logical])
        else:
            out.fill(np.nan)
    return out


@lru_cache(maxsize=None)
def _device_facts(device_id: int) -> DeviceFacts:
    import cupy

    dev = cupy.cuda.Device(device_id)
    attrs = dev.attributes
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return DeviceFacts(name=name, arch=f"sm_{dev.compute_capability}",
                       sm_count=attrs["MultiProcessorCount"],
                       smem_optin=attrs["MaxSharedMemoryPerBlockOptin"])


def device_facts(device_id: int) -> DeviceFacts:
    """The device's facts, with the shared-memory budget override applied."""
    facts = _device_facts(device_id)
    if int(facts.arch[3:]) < 80:
        raise RuntimeError(f"cuflash needs compute capability 8.0 or newer (mma.sync bf16, "
                           f"cp.async); {facts.name} is {facts.arch}")
    return facts.with_budget(specs.smem_budget_override())


def _strides(a) -> tuple[np.int64, np.int64, np.int64]:
    """(batch, seq, head) strides in elements of a (batch, seq, heads, head_dim) array."""
    return tuple(np.int64(s // a.itemsize) for s in a.strides[:3])


def _launch(spec: KernelSpec, device_id: int, grid, args) -> None:
    import cupy

    kernel = get_kernel(spec, device_id).function
    kernel(grid, (spec.threads,), args, shared_mem=spec.smem_bytes,
           stream=cupy.cuda.get_current_stream())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def flash_forward_gpu(q, k, v, *, dtype: str, causal: bool, softmax_scale: float, out=None):
    """Forward on CuPy arrays -> (o, m, l); o is a new (batch, seqlen_q, heads, head_dim).

    ``dtype`` is the logical dtype name; bfloat16 may arrive stored as uint16. ``out``: an
    optional (o, m, l) to write into instead (the XLA FFI target passes XLA's result buffers,
    C-contiguous, of the shapes and dtypes this function would allocate).
    """
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    device_id = q.device.id
    if out is not None:
        o, m, l = _poisoned(out[0], dtype), _poisoned(out[1]), _poisoned(out[2])
    else:
        o = _empty(q.shape, q.dtype, dtype)
        m = _empty((batch, heads, seqlen_q), np.float32)
        l = _empty((batch, heads, seqlen_q), np.float32)
    if o.size == 0:
        return o, m, l
    if seqlen_k == 0:  # every row sees no key
        o.view(np.uint16 if o.itemsize == 2 else np.float32).fill(0)
        m.fill(-np.inf)
        l.fill(0)
        return o, m, l
    spec = specs.select_forward(device_facts(device_id), dtype, head_dim, causal)
    grid = (_cdiv(seqlen_q, spec.block_m), heads, batch)
    args = (q, k, v, o, m, l,
            np.int32(seqlen_q), np.int32(seqlen_k), np.int32(heads),
            np.int32(heads // heads_kv), np.int32(head_dim),
            *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            np.float32(softmax_scale * LOG2E))
    _launch(spec, device_id, grid, args)
    return o, m, l


def flash_backward_gpu(do, q, k, v, o, m, l, *, dtype: str, causal: bool,
                       softmax_scale: float, deterministic: bool = False, out=None):
    """Backward on CuPy arrays -> (dq, dk, dv), recomputing P from the stored m and l.

    ``out``: an optional (dq, dk, dv) to write into instead of new arrays (as in the forward).
    """
    import cupy

    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    device_id = q.device.id
    if out is not None:
        dq, dk, dv = (_poisoned(t, dtype) for t in out)
    else:
        dq = _empty(q.shape, q.dtype, dtype)
        dk = _empty(k.shape, k.dtype, dtype)
        dv = _empty(v.shape, v.dtype, dtype)
    if dq.size == 0 and dk.size == 0:
        return dq, dk, dv
    if seqlen_q == 0 or seqlen_k == 0 or batch == 0 or heads == 0:
        for t in (dq, dk, dv):  # zero bits are +0.0 in every float format
            t.view(np.uint8).fill(0)
        return dq, dk, dv

    facts = device_facts(device_id)
    scalars_qk = (np.int32(seqlen_q), np.int32(seqlen_k), np.int32(heads),
                  np.int32(heads // heads_kv), np.int32(head_dim))
    scale_args = (np.float32(softmax_scale * LOG2E), np.float32(softmax_scale))

    # -- preprocess: delta = rowsum(dO * O), lse2 = m log2(e) + log2(l)
    pre = specs.select_backward_pre(dtype)
    delta = cupy.empty((batch, heads, seqlen_q), np.float32)
    lse2 = cupy.empty((batch, heads, seqlen_q), np.float32)
    pre_grid = (_cdiv(seqlen_q, specs.PRE_ROWS), heads, batch)
    _launch(pre, device_id, pre_grid,
            (o, do, m, l, delta, lse2, np.int32(seqlen_q), np.int32(heads),
             np.int32(head_dim), *_strides(o), *_strides(do)))

    # -- dK, dV (and dQ by atomics unless deterministic)
    spec = specs.select_backward(facts, dtype, head_dim, causal, deterministic)
    dq_accum = None if deterministic else cupy.zeros((batch, seqlen_q, heads, head_dim),
                                                     np.float32)
    n_chunks = _cdiv(head_dim, spec.dchunk)
    grid = (_cdiv(seqlen_k, spec.block_n), heads_kv, batch * n_chunks)
    _launch(spec, device_id, grid,
            (q, k, v, do, lse2, delta, dq_accum if dq_accum is not None else np.uint64(0), dk, dv,
             *scalars_qk, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
             *_strides(dk), *_strides(dv), *scale_args))

    if deterministic:  # -- dQ by its own pass over query tiles: no atomics
        dq_spec = specs.select_backward_dq(facts, dtype, head_dim, causal)
        grid = (_cdiv(seqlen_q, dq_spec.block_m), heads, batch)
        _launch(dq_spec, device_id, grid,
                (q, k, v, do, lse2, delta, dq, *scalars_qk, *_strides(q), *_strides(k),
                 *_strides(v), *_strides(do), *_strides(dq), *scale_args))
    else:
        convert = get_convert_kernel(pre, device_id).function
        convert(pre_grid, (pre.threads,),
                (dq_accum, dq, np.int32(seqlen_q), np.int32(heads), np.int32(head_dim),
                 *_strides(dq)), stream=cupy.cuda.get_current_stream())
    return dq, dk, dv

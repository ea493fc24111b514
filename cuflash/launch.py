"""Launching a plan's kernels on raw device pointers, on a given CUDA stream.

The hot path of every GPU call, whatever the caller's framework: an :class:`Operand` per
(batch, seqlen, heads, head_dim) tensor (its address and strides in elements), the float32
statistics as addresses (contiguous (batch, heads, seqlen_q)), one scratch workspace for the
backward, and the stream. Kernel parameters are packed into one buffer in the order of
docs/kernel_abi.md and handed to ``cuLaunchKernel`` (``CU_LAUNCH_PARAM_BUFFER_POINTER``):
no CuPy arrays, no DLPack, no selection on a repeated call (``plan`` memoizes).

``flash_forward_gpu`` / ``flash_backward_gpu`` are the same on CuPy arrays (they allocate
the outputs); ``cuflash.torch`` and the XLA FFI targets call ``run_forward`` /
``run_backward`` with their own allocations.
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
import threading
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from . import config, philox, specs
from . import plan as planning
from .tensor_map import MAP_ALIGNMENT, TensorMap, tile_map
from .compiler import get_convert_kernel, get_kernel
from .specs import DeviceFacts, KernelSpec

from .constants import LOG2E
class LaunchError(RuntimeError):
    """A kernel launch the driver refused, with the spec, grid and problem that were asked."""


class Operand(NamedTuple):
    """A (batch, seqlen, heads, head_dim) tensor on the device: address and element strides."""

    ptr: int
    stride_b: int
    stride_m: int
    stride_h: int
    itemsize: int

    def batch_slice(self, b0: int) -> int:
        """The address of batch entry ``b0``."""
        return self.ptr + b0 * self.stride_b * self.itemsize


def cupy_operand(a) -> Operand:
    item = a.itemsize
    sb, sm, sh = (s // item for s in a.strides[:3])
    return Operand(a.data.ptr, sb, sm, sh, item)


class ModArgs(NamedTuple):
    """The score modifiers' run-time kernel arguments (docs/kernel_abi.md, cf_mask.cuh):
    window bounds (local mask mode; an unbounded side as seqlen_q + seqlen_k), the softcap
    and the slopes' scale in raw q.k units, device addresses of the float32 slopes (batch
    stride in elements, 0 for (heads,)), sinks and dsinks (0 when off)."""

    window_left: int = 0
    window_right: int = 0
    softcap_raw: float = 0.0
    softcap_inv: float = 0.0
    raw_per_score: float = 0.0
    alibi: int = 0
    stride_alibi_b: int = 0
    sinks: int = 0
    dsinks: int = 0

    def kernel_args(self, b0: int = 0) -> tuple:
        """CF_MOD_PARAMS for a launch whose batch starts at entry ``b0``."""
        alibi = self.alibi + 4 * b0 * self.stride_alibi_b if self.alibi else 0
        return (self.window_left, self.window_right, self.softcap_raw, self.softcap_inv,
                self.raw_per_score, alibi, self.stride_alibi_b)


PLAIN = ModArgs()


class SeqArgs(NamedTuple):
    """The sequence layout's run-time kernel arguments (cf_seq.cuh's CF_SEQ_PARAMS): device
    addresses of the int32 ``cu_seqlens_q``, ``cu_seqlens_k`` (batch + 1,) and ``seqused_k``
    (batch,) (0: none), and q's rows ``total_q`` (the statistics' head stride). ``DENSE``
    (all 0) for a (batch, seqlen, ...) call, whose kernels never read them."""

    cu_seqlens_q: int = 0
    cu_seqlens_k: int = 0
    seqused_k: int = 0
    total_q: int = 0

    @property
    def varlen(self) -> bool:
        return bool(self.cu_seqlens_q)

    def kernel_args(self, b0: int = 0) -> tuple:
        """CF_SEQ_PARAMS for a launch whose batch starts at entry ``b0``: a varlen slice
        only moves the offsets (rows and statistics are addressed through them)."""
        if not self.varlen:
            return (0, 0, 0, 0)
        used = self.seqused_k + 4 * b0 if self.seqused_k else 0
        return (self.cu_seqlens_q + 4 * b0, self.cu_seqlens_k + 4 * b0, used, self.total_q)


DENSE = SeqArgs()


class BlockMaskArgs(NamedTuple):
    """A block mask's run-time kernel arguments (cf_mask.cuh's CF_BSP_PARAMS): the device
    address of the uint8 mask (batch | 1, heads | 1, n_q_blocks, n_k_blocks), rows
    contiguous; its batch and head strides in bytes (0 where the axis broadcasts); its row
    stride (n_k_blocks); the block size. Only block-sparse kernels take them."""

    ptr: int
    stride_b: int
    stride_h: int
    stride_row: int
    block_m: int
    block_n: int

    def kernel_args(self, b0: int = 0) -> tuple:
        return (self.ptr + b0 * self.stride_b, self.stride_b, self.stride_h, self.stride_row,
                self.block_m, self.block_n)

    def check_tiles(self, *kernel_specs) -> None:
        """Each kernel's tiles must lie inside single blocks (cf_mask.cuh): ValueError
        naming block_size otherwise, before anything is launched."""
        for spec in kernel_specs:
            if spec is not None and (self.block_m % spec.block_m or self.block_n % spec.block_n):
                raise ValueError(
                    f"block_size: expected multiples of the kernel's tile "
                    f"({spec.block_m}, {spec.block_n}) on CUDA ({spec.name}; multiples of 128 "
                    f"suit every kernel), got ({self.block_m}, {self.block_n})")


class DropoutArgs(NamedTuple):
    """A dropout call's run-time kernel arguments (cf_philox.cuh's CF_DROP_PARAMS): the
    seed's two words, the offset, the byte threshold, ``philox.keep_scale``, and the heads
    that turn a launch's first batch entry b0 into the Philox head index b0 * heads. Only
    dropout kernels take them. ``rng``: the device address of the three words (seed low,
    seed high, offset) instead, read by the kernels when they run (``specs.with_device_rng``
    kernels; the launch functions switch to them)."""

    seed_lo: int
    seed_hi: int
    offset: int
    threshold: int
    scale: float
    heads: int
    rng: int = 0

    def kernel_args(self, b0: int = 0) -> tuple:
        words = (self.rng,) if self.rng else (self.seed_lo, self.seed_hi, self.offset)
        return (*words, self.threshold, self.scale, b0 * self.heads)

    def kernel(self, kernel: planning.Launch) -> planning.Launch:
        """The launch of ``kernel`` that takes these arguments (device words: the
        ``CF_DROP_RNG_PTR`` variant of a dropout kernel)."""
        if not self.rng or not kernel.spec.mods.dropout:
            return kernel
        return planning.Launch(specs.with_device_rng(kernel.spec), kernel.grid,
                               kernel.batch_per_launch)


def dropout_args(dropout_p: float, seed: int | None, offset: int, heads: int,
                 rng: int = 0) -> DropoutArgs:
    """``DropoutArgs`` of a validated (dropout_p > 0, seed, offset) for ``heads`` query heads;
    or, with ``rng`` (a device address of three uint32 words), of the words found there."""
    if rng:
        return DropoutArgs(0, 0, 0, philox.keep_threshold(dropout_p),
                           philox.keep_scale(dropout_p), heads, rng)
    return DropoutArgs(seed & 0xFFFFFFFF, seed >> 32, offset, philox.keep_threshold(dropout_p),
                       philox.keep_scale(dropout_p), heads)


def block_mask_args(mask, block_size) -> BlockMaskArgs:
    """``BlockMaskArgs`` of a C-contiguous uint8 / bool CuPy mask of 4 dimensions."""
    return block_mask_args_at(mask.data.ptr, mask.shape, mask.strides, block_size)


def block_mask_args_at(ptr, shape, byte_strides, block_size) -> BlockMaskArgs:
    """``BlockMaskArgs`` of a C-contiguous one-byte mask of ``shape`` at ``ptr`` (an
    address, or fastpath's stand-in for one)."""
    batch, heads, _, n_k_blocks = shape
    return BlockMaskArgs(ptr, 0 if batch == 1 else int(byte_strides[0]),
                         0 if heads == 1 else int(byte_strides[1]), n_k_blocks, *block_size)


def mod_args(shape: planning.Shape, window, softcap, softmax_scale: float, alibi: int = 0,
             stride_alibi_b: int = 0, sinks: int = 0, dsinks: int = 0) -> ModArgs:
    """``ModArgs`` of a call: ``window`` as the user gave it (``plan.effective_window``
    folds causal in), ``softcap`` in score units (None or 0: off)."""
    left = right = 0
    effective = planning.effective_window(window, shape.causal)
    if effective is not None:
        unbounded = shape.seqlen_q + shape.seqlen_k  # bounds nothing (cf_mask.cuh)
        left, right = (unbounded if side < 0 else min(side, unbounded) for side in effective)
    cap_raw = float(softcap) / softmax_scale if softcap else 0.0
    return ModArgs(left, right, cap_raw, 1.0 / cap_raw if softcap else 0.0,
                   1.0 / softmax_scale, alibi, stride_alibi_b, sinks, dsinks)


# -- device facts --------------------------------------------------------------------------


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
    facts = specs.usable_facts(_device_facts(device_id))  # refuses pre-Turing GPUs
    return facts.with_budget(specs.smem_budget_override())


def forward_plan(shape: planning.Shape, device_id: int) -> planning.ForwardPlan:
    return planning.forward_plan(shape, device_id, device_facts)


def backward_plan(shape: planning.Shape, device_id: int,
                  deterministic: bool) -> planning.BackwardPlan:
    return planning.backward_plan(shape, device_id, device_facts, deterministic)


def takes_pair(shape: planning.Shape, device_id: int, deterministic: bool | None = None
               ) -> bool:
    """A Hopper kernel takes ``shape``'s v of its own head_dim (``Shape.head_dim_v``) as it
    is: ``head_pad.native_pairs()`` lets it and the plan exists (the forward's with
    ``deterministic`` None, else the backward's); otherwise the caller pads (head_pad.py)."""
    from . import head_pad

    if not head_pad.native_pairs():
        return False
    try:
        if deterministic is None:
            forward_plan(shape, device_id)
        else:
            backward_plan(shape, device_id, deterministic)
    except ValueError:  # no kernel takes the pair (or these modifiers)
        return False
    return True


def backward_head_dim(shape: planning.Shape, device_id: int, deterministic: bool) -> int:
    """``plan.backward_head_dim`` on this device (memoized)."""
    return planning.backward_head_dim_for(shape, device_id, device_facts, deterministic)


# -- parameter buffers ---------------------------------------------------------------------
# Each entry point's parameters, one letter each: p pointer, i int, u unsigned int, q long
# long, f float, T a tensor map (128 bytes, 64-byte aligned: cf_sm90.cuh's cf_tensor_map).
# MODS: the score modifiers' arguments every attention kernel takes last (cf_mask.cuh's
# CF_MOD_PARAMS: window_left, window_right, softcap_raw, softcap_inv, raw_per_score,
# alibi_slopes, stride_alibi_b); the forwards then take the sinks, the preprocess sinks and
# dsinks. SEQ: the sequence layout every attention kernel and the preprocess take last
# (cf_seq.cuh's CF_SEQ_PARAMS: cu_seqlens_q, cu_seqlens_k, seqused_k, total_q); the convert
# takes one cu_seqlens.
MODS = "iifffpq"
SEQ = "pppi"
_SIGNATURES = {
    "fwd": "pppppp" "iiiii" + "q" * 12 + "f" + MODS + "p" + SEQ,
    "bwd": "ppppppppp" "iiiii" + "q" * 18 + "ff" + MODS + SEQ,
    # + kv_splits, dk/dv_accum, dq_semaphore
    "bwd90": "ppppppppp" "iiiii" + "q" * 18 + "ff" "ippp" + MODS + SEQ,
    "bwd_dq": "ppppppp" "iiiii" + "q" * 15 + "ff" + MODS + SEQ,
    "bwd_pre": "pppppp" "iii" + "q" * 6 + "ppp" "i" + SEQ,  # + dq_zero, dq_tile_d
    "convert": "pp" "iii" "qqq" "p" "if",  # + tile_d, scale
}
_SIGNATURES["fwd90"] = _SIGNATURES["fwd"]
BSP = "pqqiii"  # cf_mask.cuh's CF_BSP_PARAMS, after SEQ in block-sparse kernels only
DROP = "uuuufi"  # cf_philox.cuh's CF_DROP_PARAMS, after those in dropout kernels only
DROP_RNG = "pufi"  # the same with CF_DROP_RNG_PTR: the words' address for the first three
# TMA kernels only, last: a tensor map per array of specs.tma_maps (flash_fwd_sm90_ws.cu's
# CF_TMA_PARAMS: q, k, v; flash_bwd_sm90_ws.cu's CF_BWD_TMA_PARAMS: q, k, v, dout)


def signature_of(spec, kind: str | None = None) -> str:
    """The parameter letters of ``spec``'s entry point (``kind``: of another table row)."""
    signature = _SIGNATURES[kind or spec.kind]
    signature += BSP if spec.mods.block_sparse else ""
    if spec.mods.dropout:
        signature += DROP_RNG if specs.device_rng(spec) else DROP
    return signature + "T" * len(specs.tma_maps(spec)) if kind is None else signature
# struct's native (C) alignment; u: unsigned int
_FORMATS = {"p": "P", "i": "i", "u": "I", "q": "q", "f": "f"}
_PARAM_BUFFER_POINTER, _PARAM_BUFFER_SIZE, _PARAM_END = 1, 2, 0  # CU_LAUNCH_PARAM_*
_MAX_PARAM_BYTES = 4096  # cuLaunchKernel's classic limit; our kernels take < 900
# Where sm_90's kernel parameters start in constant bank 0. ptxas aligns a 64-byte-aligned
# parameter's address in the bank, not its offset in the buffer: a tensor map lands at an
# offset of 48 mod 64 (the cubins' parameter tables, tests/test_param_layout.py).
PARAM_BANK_START = 0x210


@lru_cache(maxsize=None)
def param_packer(signature: str) -> struct.Struct:
    """The kernel's parameter buffer as a ``struct.Struct`` in native mode, which lays the
    fields out by the C alignment rules and adds no tail padding (the driver refuses a
    buffer larger than the kernel's parameters)."""
    packer = struct.Struct(_param_layout(signature)[-1])
    assert packer.size <= _MAX_PARAM_BYTES
    return packer


def param_offsets(signature: str) -> tuple:
    """Each parameter's byte offset in ``param_packer(signature)``'s buffer."""
    layouts = _param_layout(signature)
    ends = [struct.calcsize(layout) for layout in layouts[1:]]
    sizes = [128 if c == "T" else struct.calcsize("@" + _FORMATS[c]) for c in signature]
    return tuple(end - size for end, size in zip(ends, sizes))


def _param_layout(signature: str) -> list:
    """struct layouts of the buffer's first 0, 1, .. all parameters."""
    layouts = ["@"]
    for c in signature:
        layout = layouts[-1]
        if c == "T":  # struct aligns no "s" field: pad to the map's bank alignment by hand
            at = PARAM_BANK_START + struct.calcsize(layout)
            layout += "x" * (-at % MAP_ALIGNMENT) + "128s"
        else:
            layout += _FORMATS[c]
        layouts.append(layout)
    return layouts


_get_param_info = None


def check_param_layout(function: int, signature: str, name: str) -> None:
    """Compare the buffer's offsets with the loaded kernel's own (``cuFuncGetParamInfo``,
    drivers of CUDA 12.4 on; skipped before): a map read from the wrong bytes is an illegal
    instruction on the GPU, so a mismatch is refused here, by name."""
    global _get_param_info
    if _get_param_info is None:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = getattr(lib, "cuFuncGetParamInfo", False)
        if fn:
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
                           ctypes.POINTER(ctypes.c_size_t)]
            fn.restype = ctypes.c_int
        _get_param_info = fn
    if not _get_param_info:
        return
    got, offset, size = [], ctypes.c_size_t(), ctypes.c_size_t()
    for i in range(len(signature)):
        status = _get_param_info(function, i, ctypes.byref(offset), ctypes.byref(size))
        if status != 0:
            return  # the driver keeps no table for this function: nothing to compare
        got.append(offset.value)
    want = param_offsets(signature)
    if tuple(got) != want:
        raise LaunchError(f"cuflash: {name}'s parameters lie at byte offsets {tuple(got)}; "
                          f"the launcher packs them at {want} (signature {signature})")


class _ParamBuffer(threading.local):
    """Each thread's parameter buffer and the ``extra`` array that points at it: the
    driver copies the parameters during ``cuLaunchKernel``, so one buffer per thread is
    reused by every launch of that thread."""

    def __init__(self):
        self.data = (ctypes.c_char * _MAX_PARAM_BYTES)()
        self.size = ctypes.c_size_t(0)
        self.extra = (ctypes.c_void_p * 5)(_PARAM_BUFFER_POINTER, ctypes.addressof(self.data),
                                           _PARAM_BUFFER_SIZE, ctypes.addressof(self.size),
                                           _PARAM_END)
        self.extra_address = ctypes.addressof(self.extra)


_params = _ParamBuffer()


# -- recording (cuflash.replay): the launches a call would make, not made --------------------


class Record(NamedTuple):
    """A launch (or, ``function`` None, a memset of ``args[0]``) that was recorded."""

    function: int | None
    grid: tuple
    threads: int
    smem: int
    signature: str
    args: tuple
    what: object = None
    memset_bytes: int = 0
    dependent: bool = False  # a programmatic dependent launch (launch_packed_dependent)


RECORDED_STREAM = -1  # the stream a recorded call is given (a replay gets the real one)


class _Recording(threading.local):
    records: list | None = None


_recording = _Recording()


@contextlib.contextmanager
def recording():
    """Launches and memsets of this thread are appended to the yielded list, not run."""
    previous, _recording.records = _recording.records, []
    try:
        yield _recording.records
    finally:
        _recording.records = previous


# (CUfunction, the loaded kernel that owns it) by (id of a plan's spec, device, convert). The
# plans (memoized for the process's life, one per configuration, a forced arch included) keep
# their specs alive, so ids are stable; holding the loaded kernel keeps its module loaded even
# if the compiler's cache is cleared (tests do), so the address stays valid.
_functions: dict = {}


def _function_ptr(spec: KernelSpec, device_id: int, convert: bool) -> int:
    """CUfunction of the spec's entry (or of the preprocess module's dQ convert)."""
    key = (id(spec), device_id, convert)
    hit = _functions.get(key)
    if hit is None:
        loaded = get_convert_kernel(spec, device_id) if convert else get_kernel(spec, device_id)
        function = loaded.function
        ptr = int(getattr(function, "kernel", function).ptr)
        if not convert and specs.loads_with_tma(spec):
            check_param_layout(ptr, signature_of(spec), spec.name)
        hit = _functions[key] = (ptr, loaded, spec)
    return hit[0]


_driver = _runtime = None  # cupy_backends.cuda.api's driver and runtime, at the first launch


def _import_cuda():
    global _driver, _runtime
    from cupy_backends.cuda.api import driver, runtime

    _driver, _runtime = driver, runtime


def launch_packed(function: int, grid: tuple, threads: int, smem: int,
                  packer: struct.Struct, args, stream: int, what) -> None:
    """One ``cuLaunchKernel`` of CUfunction ``function``, ``args`` packed by ``packer``
    (``param_packer``). ``what()`` describes the launch for an error."""
    if _driver is None:
        _import_cuda()
    buffer = _params
    packer.pack_into(buffer.data, 0, *args)
    buffer.size.value = packer.size
    try:
        _driver.launchKernel(function, grid[0], grid[1], grid[2], threads, 1, 1, smem, stream,
                             0, buffer.extra_address)
    except Exception as exc:  # CUDADriverError: say which kernel, grid and problem
        raise LaunchError(f"cuflash: launching {what()} (grid {tuple(grid)}, {threads} "
                          f"threads, {smem} B shared memory) failed: {exc}") from exc


def launch_packed_dependent(function: int, grid: tuple, threads: int, smem: int,
                            packer: struct.Struct, args, stream: int, what) -> None:
    """``launch_packed`` as a programmatic dependent of the stream's previous kernel
    (cuflash/pdl.py): for kernels that wait for it (``griddepcontrol.wait``) before they read
    its results."""
    from . import pdl

    buffer = _params
    packer.pack_into(buffer.data, 0, *args)
    buffer.size.value = packer.size
    status = pdl.launch(function, grid, threads, smem, stream, buffer.extra_address)
    if status != 0:
        raise LaunchError(f"cuflash: launching {what()} (grid {tuple(grid)}, {threads} "
                          f"threads, {smem} B shared memory) as a dependent launch failed: "
                          f"CUresult {status}")


def launch_function(function: int, grid: tuple, threads: int, smem: int, signature: str,
                    args: tuple, stream: int, what, dependent: bool = False) -> None:
    """One ``cuLaunchKernel`` of CUfunction ``function`` with ``args`` packed by
    ``signature`` into one parameter buffer (or recorded, under ``recording``);
    ``dependent``: a programmatic dependent launch (``launch_packed_dependent``)."""
    records = _recording.records
    if records is not None:
        records.append(Record(function, tuple(grid), threads, smem, signature, tuple(args),
                              what, dependent=dependent))
        return
    if "T" in signature:  # tensor maps hold the call's addresses: made now
        args = tuple(a.encoded() if isinstance(a, TensorMap) else a for a in args)
    enqueue = launch_packed_dependent if dependent else launch_packed
    enqueue(function, grid, threads, smem, param_packer(signature), args, stream, what)


def memset_async(ptr: int, nbytes: int, stream: int) -> None:
    """Zero ``nbytes`` at device address ``ptr`` on ``stream`` (or record it)."""
    records = _recording.records
    if records is not None:
        records.append(Record(None, (), 0, 0, "", (ptr,), memset_bytes=nbytes))
        return
    if _runtime is None:
        _import_cuda()
    _runtime.memsetAsync(ptr, 0, nbytes, stream)


def _launch(launch: planning.Launch, device_id: int, grid_z: int, signature: str, args,
            stream: int, shape: planning.Shape, convert: bool = False) -> None:
    spec = launch.spec
    threads = specs.PRE_THREADS if convert else spec.threads
    smem = 0 if convert else spec.smem_bytes
    name = "flash_bwd_dq_convert" if convert else spec.name
    launch_function(_function_ptr(spec, device_id, convert), (*launch.grid[:2], grid_z),
                    threads, smem, signature, args, stream,
                    lambda: f"{name} for {_describe(shape)}")


def _batch_slices(launch: planning.Launch, batch: int):
    """(first batch entry, grid z) for each launch that together cover the batch."""
    per = launch.batch_per_launch
    z_per_batch = launch.grid[2] // per
    for b0 in range(0, batch, per):
        yield b0, min(per, batch - b0) * z_per_batch


def _describe(shape: planning.Shape) -> str:
    return (f"q ({shape.batch}, {shape.seqlen_q}, {shape.heads}, {shape.head_dim}), "
            f"k/v seqlen {shape.seqlen_k} heads {shape.heads_kv}, {shape.dtype}, "
            f"causal={shape.causal}")


def _strides(*ops: Operand) -> tuple:
    return tuple(s for op in ops for s in (op.stride_b, op.stride_m, op.stride_h))


def _at(op: Operand, b0: int) -> int:
    return op.batch_slice(b0)


# -- forward -------------------------------------------------------------------------------


def forward_tail(shape: planning.Shape, strides: tuple, softmax_scale: float) -> tuple:
    """The forward's parameters after the six addresses: everything a layout fixes.

    ``strides``: (batch, seq, head) element strides of q, k, v and o, in that order.
    """
    s = shape
    return (s.seqlen_q, s.seqlen_k, s.heads, s.heads_per_kv, s.head_dim, *strides,
            softmax_scale * LOG2E)


def launch_forward(plan: planning.ForwardPlan, ptrs: tuple, tail: tuple, itemsize: int,
                   stream: int, device_id: int, mods: ModArgs = PLAIN,
                   seq: SeqArgs = DENSE, bsp: BlockMaskArgs | None = None,
                   drop: DropoutArgs | None = None) -> None:
    """Enqueue the forward: ``ptrs`` = addresses of q, k, v, o, m, l; ``tail`` from
    ``forward_tail``; ``mods`` the score modifiers' arguments; ``seq`` the varlen layout;
    ``bsp``, ``drop``: a block mask's and dropout's arguments (their kernels only).
    Every element of o, m, l is written (for a non-empty call: the caller handles
    ``Shape.empty`` itself)."""
    s, kernel = plan.shape, plan.kernel
    kernel = drop.kernel(kernel) if drop else kernel
    boxed = specs.loads_with_tma(kernel.spec)
    if boxed and (forward_maps(s, kernel.spec, ptrs, tail, 0) is None
                  or specs.clustered(kernel.spec) and kernel.grid[0] % 2):
        kernel, boxed = _without_tma(kernel), False
    signature = signature_of(kernel.spec)
    if kernel.batch_per_launch >= s.batch:  # the common case: one launch
        args = ptrs + tail + mods.kernel_args() + (mods.sinks,) + seq.kernel_args()
        args += bsp.kernel_args() if bsp else ()
        args += drop.kernel_args() if drop else ()
        args += forward_maps(s, kernel.spec, ptrs, tail, 0) if boxed else ()
        _launch(kernel, device_id, kernel.grid[2], signature, args, stream, s)
        return
    # bytes from one batch entry to the next, per address (the stride_b of q, k, v, o; one
    # entry of m / l); varlen slices move only the offsets (seq.kernel_args)
    stats_row = 0 if seq.varlen else 4 * s.heads * s.seqlen_q
    steps = (*(0 if seq.varlen else tail[5 + 3 * i] * itemsize for i in range(4)),
             stats_row, stats_row)
    for b0, grid_z in _batch_slices(kernel, s.batch):
        args = tuple(p + b0 * step for p, step in zip(ptrs, steps)) + tail
        args += mods.kernel_args(b0) + (mods.sinks,) + seq.kernel_args(b0)
        args += bsp.kernel_args(b0) if bsp else ()
        args += drop.kernel_args(b0) if drop else ()
        args += forward_maps(s, kernel.spec, ptrs, tail, b0) if boxed else ()
        _launch(kernel, device_id, grid_z, signature, args, stream, s)


def _without_tma(kernel: planning.Launch) -> planning.Launch:
    """A layout the copy engine cannot box (a broadcast axis), or a grid a cluster of two
    cannot pair: the same tile with cp.async, one block at a time."""
    return planning.Launch(specs.without_tma(kernel.spec), kernel.grid, kernel.batch_per_launch)


def _tile_maps(shape: planning.Shape, b0: int, arrays, batch: int = 0) -> tuple | None:
    """Tensor maps of ``arrays`` ((address, (stride_b, stride_m, stride_h) in elements,
    rows, heads, box rows) each) for a launch from batch entry ``b0`` on (``batch`` entries,
    0: the rest of the shape's), or None where the copy engine cannot box one
    (``tensor_map.layout_problem``)."""
    from .tensor_map import layout_problem

    maps = tuple(tile_map(ptr + b0 * strides[0] * 2, shape.dtype, shape.head_dim, rows, heads,
                          batch or shape.batch - b0, strides, box)  # 16-bit elements
                 for ptr, strides, rows, heads, box in arrays)
    if any(layout_problem(m.dtype, m.dims, m.strides, m.box) for m in maps):
        return None
    return maps


def forward_maps(shape: planning.Shape, spec: KernelSpec, ptrs: tuple, tail: tuple,
                 b0: int) -> tuple | None:
    """The tensor maps of q, k and v for a TMA forward's launch from batch entry ``b0`` on
    (``ptrs``, ``tail`` as ``launch_forward`` takes them), or None (``_tile_maps``)."""
    s, strides = shape, tail[5:14]
    heads_kv = s.heads // s.heads_per_kv
    if s.mods.varlen:  # one map over the packed rows (batch 1); the kernel adds each
        # sequence's first row, and a launch from entry b0 reads its offsets from cu_seqlens
        rows = ((s.total_q, s.heads, spec.block_m), (s.total_k, heads_kv, spec.block_n),
                (s.total_k, heads_kv, spec.block_n))
        return _tile_maps(s, 0, [(ptrs[i], tuple(strides[3 * i:3 * i + 3]), *rows[i])
                                 for i in range(3)], batch=1)
    rows = ((s.seqlen_q, s.heads, spec.block_m), (s.seqlen_k, heads_kv, spec.block_n),
            (s.seqlen_k, heads_kv, spec.block_n))
    return _tile_maps(s, b0, [(ptrs[i], tuple(strides[3 * i:3 * i + 3]), *rows[i])
                              for i in range(3)])


def backward_maps(shape: planning.Shape, spec: KernelSpec, q: Operand, k: Operand,
                  v: Operand, do: Operand, b0: int) -> tuple | None:
    """The tensor maps of q, k, v and dO for a TMA backward's launch from batch entry ``b0``
    on, or None (``_tile_maps``)."""
    s = shape
    heads_kv = s.heads // s.heads_per_kv
    # packed: one map over all rows (batch 1), as forward_maps
    rows_q, rows_k = (s.total_q, s.total_k) if s.mods.varlen else (s.seqlen_q, s.seqlen_k)
    arrays = [(x.ptr, (x.stride_b, x.stride_m, x.stride_h), rows, heads, box)
              for x, rows, heads, box in ((q, rows_q, s.heads, spec.block_m),
                                          (k, rows_k, heads_kv, spec.block_n),
                                          (v, rows_k, heads_kv, spec.block_n),
                                          (do, rows_q, s.heads, spec.block_m))]
    if s.mods.varlen:
        return _tile_maps(s, 0, arrays, batch=1)
    return _tile_maps(s, b0, arrays)


def run_forward(plan: planning.ForwardPlan, q: Operand, k: Operand, v: Operand, o: Operand,
                m: int, l: int, softmax_scale: float, stream: int, device_id: int,
                mods: ModArgs = PLAIN, seq: SeqArgs = DENSE,
                bsp: BlockMaskArgs | None = None, drop: DropoutArgs | None = None) -> None:
    """``launch_forward`` on operands (varlen: packed operands with stride_b 0)."""
    tail = forward_tail(plan.shape, _strides(q, k, v, o), softmax_scale)
    launch_forward(plan, (q.ptr, k.ptr, v.ptr, o.ptr, m, l), tail, q.itemsize, stream,
                   device_id, mods, seq, bsp, drop)


# -- backward ------------------------------------------------------------------------------


def run_backward(plan: planning.BackwardPlan, do: Operand, q: Operand, k: Operand,
                 v: Operand, o: Operand, m: int, l: int, dq: Operand, dk: Operand,
                 dv: Operand, softmax_scale: float, workspace: int, stream: int,
                 device_id: int, mods: ModArgs = PLAIN, seq: SeqArgs = DENSE,
                 bsp: BlockMaskArgs | None = None, drop: DropoutArgs | None = None) -> None:
    """Enqueue the backward on ``stream``. ``workspace``: the address of at least
    ``plan.backward_workspace(plan).total_bytes`` scratch bytes on the device, ordered on
    ``stream`` (the caller keeps it alive until the work is done). With sinks,
    ``mods.dsinks`` (float32 (heads,)) must be zeroed on ``stream`` by the caller. Varlen
    (``seq``): packed operands with stride_b 0; with seqused_k the caller zeroes dk and dv
    (keys past seqused_k are no block's)."""
    s = plan.shape
    ws = planning.backward_workspace(plan)
    # the preprocess zeroes the dQ accumulator (the region's start) as it reads those rows;
    # the memset takes the rest (dK, dV accumulators, semaphores). With v's own head_dim
    # (s.head_dim_v) the preprocess reads rows of that width, so the memset takes dQ's too.
    pre_zeroes_dq = ws.dq_accum is not None and not s.head_dim_v
    dq_zeroed = ws.dq_accum_bytes if pre_zeroes_dq else 0
    if ws.zeroed_bytes > dq_zeroed:
        memset_async(workspace + dq_zeroed, ws.zeroed_bytes - dq_zeroed, stream)
    # bytes from one batch entry to the next in the statistics and accumulators (varlen: 0,
    # the kernels address packed rows through seq's offsets)
    stats_row = 0 if seq.varlen else 4 * s.heads * s.seqlen_q
    delta, lse2 = workspace + ws.delta, workspace + ws.lse2
    dq_accum = workspace + ws.dq_accum if ws.dq_accum is not None else 0
    q_row, kv_row = 4 * s.seqlen_q * s.heads * s.head_dim, 4 * s.seqlen_k * s.heads_kv * s.head_dim
    v_row = 4 * s.seqlen_k * s.heads_kv * s.dv  # dv_accum's
    # the main kernel adds dQ into 64 x 64 pieces (spec.dq_tiled): their head-dim bucket
    tile_d = plan.main.spec.head_dim if plan.main.spec.dq_tiled else 0
    if tile_d:
        q_row = planning.tiled_dq_entry_bytes(s, tile_d)
    if seq.varlen:
        q_row = kv_row = v_row = 0

    # -- preprocess: delta = rowsum(dO * O), lse2 = m log2(e) + log2(l), dq_accum = 0
    for b0, z in _batch_slices(plan.pre, s.batch):
        st = b0 * stats_row
        args = (_at(o, b0), _at(do, b0), m + st, l + st, delta + st, lse2 + st,
                s.seqlen_q, s.heads, s.dv, *_strides(o, do), mods.sinks, mods.dsinks,
                dq_accum + b0 * q_row if pre_zeroes_dq else 0, tile_d, *seq.kernel_args(b0))
        _launch(plan.pre, device_id, z, _SIGNATURES["bwd_pre"], args, stream, s)

    # -- dK, dV (and dQ by atomics unless deterministic)
    main = drop.kernel(plan.main) if drop else plan.main
    boxed = specs.loads_with_tma(main.spec)
    if boxed and backward_maps(s, main.spec, q, k, v, do, 0) is None:
        main, boxed = _without_tma(main), False
    scalars = (s.seqlen_q, s.seqlen_k, s.heads, s.heads_per_kv, s.head_dim)
    scales = (softmax_scale * LOG2E, softmax_scale)
    signature = signature_of(main.spec)
    bsp_args = bsp.kernel_args if bsp else (lambda b0: ())
    drop_args = drop.kernel_args if drop else (lambda b0: ())
    for b0, z in _batch_slices(main, s.batch):
        st = b0 * stats_row
        args = (_at(q, b0), _at(k, b0), _at(v, b0), _at(do, b0), lse2 + st, delta + st,
                dq_accum + b0 * q_row if dq_accum else 0, _at(dk, b0), _at(dv, b0),
                *scalars, *_strides(q, k, v, do, dk, dv), *scales)
        if main.spec.kind == "bwd90":
            accum = ws.dk_accum is not None and plan.kv_splits > 1
            # ordered dQ: the semaphores of batch entries b0 ..
            semaphores = (workspace + ws.dq_semaphore
                          + 4 * b0 * planning.semaphores_per_entry(s, main.spec.block_m)
                          if ws.dq_semaphore is not None else 0)
            args += (plan.kv_splits,
                     workspace + ws.dk_accum + b0 * kv_row if accum else 0,
                     workspace + ws.dv_accum + b0 * v_row if accum else 0, semaphores)
        args += mods.kernel_args(b0) + seq.kernel_args(b0) + bsp_args(b0) + drop_args(b0)
        args += backward_maps(s, main.spec, q, k, v, do, b0) if boxed else ()
        _launch(main, device_id, z, signature, args, stream, s)

    if plan.dq is not None:  # -- dQ by its own pass over query tiles: no atomics
        dq_pass = drop.kernel(plan.dq) if drop else plan.dq
        for b0, z in _batch_slices(dq_pass, s.batch):
            st = b0 * stats_row
            args = (_at(q, b0), _at(k, b0), _at(v, b0), _at(do, b0), lse2 + st, delta + st,
                    _at(dq, b0), *scalars, *_strides(q, k, v, do, dq), *scales,
                    *mods.kernel_args(b0), *seq.kernel_args(b0), *bsp_args(b0),
                    *drop_args(b0))
            _launch(dq_pass, device_id, z, signature_of(dq_pass.spec), args, stream, s)
    else:
        _convert(plan.dq_convert, dq_accum, q_row, dq, s.seqlen_q, s.heads, s, device_id,
                 stream, seq.cu_seqlens_q, tile_d, softmax_scale)
    if plan.kv_convert is not None:
        for accum, out, row, width in ((ws.dk_accum, dk, kv_row, s.head_dim),
                                       (ws.dv_accum, dv, v_row, s.dv)):
            _convert(plan.kv_convert, workspace + accum, row, out, s.seqlen_k, s.heads_kv,
                     s, device_id, stream, seq.cu_seqlens_k, width=width)


def _convert(launch: planning.Launch, accum: int, accum_row: int, out: Operand, seqlen: int,
             heads: int, s: planning.Shape, device_id: int, stream: int,
             cu_seqlens: int = 0, tile_d: int = 0, scale: float = 1.0,
             width: int = 0) -> None:
    """float32 (batch, seqlen, heads, head_dim) accumulator -> out's dtype and strides
    (varlen: (total, heads, head_dim), rows by ``cu_seqlens``, whole sequences); ``tile_d``:
    the tiled dQ accumulator of that bucket instead, whose values ``scale`` multiplies;
    ``width``: the rows' head_dim when not q's (dV of v's own head_dim)."""
    for b0, z in _batch_slices(launch, s.batch):
        args = (accum + b0 * accum_row, _at(out, b0), seqlen, heads, width or s.head_dim,
                out.stride_b, out.stride_m, out.stride_h,
                cu_seqlens + 4 * b0 if cu_seqlens else 0, tile_d, scale if tile_d else 1.0)
        _launch(launch, device_id, z, _SIGNATURES["convert"], args, stream, s,
                convert=True)


# -- on CuPy arrays ------------------------------------------------------------------------


def poison_enabled() -> bool:
    """Tests set CUFLASH_POISON=1 so every output starts as NaN and an unwritten element shows."""
    return _poison_value() in (b"1", "1")


_poison_value = config.env_reader("CUFLASH_POISON")


# NaN bit patterns by logical dtype; 16-bit data may be stored as uint16 in CuPy (bfloat16).
_NAN_BITS = {"float16": 0x7E00, "bfloat16": 0x7FC0}


def _empty(shape, storage_dtype, logical: str = "float32"):
    """A new CuPy array; NaN-filled when poisoning is on (the kernel must overwrite it)."""
    import cupy

    return poison(cupy.empty(shape, dtype=storage_dtype), logical)


def poison(out, logical: str = "float32"):
    """``out`` NaN-filled when poisoning is on (also caller-given outputs, ``out=``)."""
    if poison_enabled() and out.size:
        if logical in _NAN_BITS:
            out.view(np.uint16).fill(_NAN_BITS[logical])
        else:
            out.fill(np.nan)
    return out


def shape_of(q, k, dtype: str, causal: bool, mods: specs.ModFlags = specs.NO_MODS,
             v=None) -> planning.Shape:
    """``v``: given when its head_dim may differ from q's (then ``Shape.head_dim_v``)."""
    batch, seqlen_q, heads, head_dim = q.shape
    head_dim_v = v.shape[3] if v is not None and v.shape[3] != head_dim else 0
    return planning.Shape(batch, seqlen_q, k.shape[1], heads, k.shape[2], head_dim, dtype,
                          bool(causal), mods, head_dim_v=head_dim_v)


def _current_stream() -> int:
    import cupy

    return cupy.cuda.get_current_stream().ptr


def fill_no_key_forward(o, m, l, sinks=None) -> None:
    """seqlen_k == 0: every row sees no key (o = 0, m = -inf, l = 0; with sinks m = sink,
    l = 1: the sink is the row's only score)."""
    o.view(np.uint16 if o.itemsize == 2 else np.float32).fill(0)
    if sinks is None:
        m.fill(-np.inf)
        l.fill(0)
    else:
        m[...] = sinks.astype(np.float32)[None, :, None]
        l.fill(1)


def _cupy_ptr(a) -> int:
    return a.data.ptr


def modifiers_of(shape: planning.Shape, window, softcap, alibi_slopes, sinks,
                  softmax_scale: float, dsinks=None, ptr=_cupy_ptr) -> ModArgs:
    """``ModArgs`` for float32 slopes / sinks (C-contiguous, validated by the caller);
    ``ptr`` reads an array's device address (CuPy's by default; fastpath passes its
    framework's)."""
    alibi = stride = 0
    if alibi_slopes is not None:
        alibi, stride = ptr(alibi_slopes), (shape.heads if alibi_slopes.ndim == 2 else 0)
    return mod_args(shape, window, softcap, softmax_scale, alibi, stride,
                    ptr(sinks) if sinks is not None else 0,
                    ptr(dsinks) if dsinks is not None else 0)


def rng_address(words) -> int:
    """The device address of dropout's three uint32 words (a CuPy array), or 0 for none."""
    if words is None:
        return 0
    if words.dtype != np.uint32 or words.shape != (3,) or not words.flags.c_contiguous:
        raise ValueError(f"dropout_rng: expected a contiguous uint32 array of 3 words, got "
                         f"{words.dtype} with shape {tuple(words.shape)}")
    return words.data.ptr


def flash_forward_gpu(q, k, v, *, dtype: str, causal: bool, softmax_scale: float, out=None,
                      window=None, softcap=None, alibi_slopes=None, sinks=None,
                      block_mask=None, block_size=None, dropout_p=0.0, dropout_seed=None,
                      dropout_offset=0, dropout_rng=None):
    """Forward on CuPy arrays -> (o, m, l); o is a new (batch, seqlen_q, heads, head_dim).

    ``dtype`` is the logical dtype name; bfloat16 may arrive stored as uint16. ``out``: an
    optional (o, m, l) to write into instead (C-contiguous, of the shapes and dtypes this
    function would allocate). ``window``, ``softcap``, ``alibi_slopes``, ``sinks``: the
    score modifiers (docs/masks.md), validated by the caller; the arrays C-contiguous
    float32 CuPy arrays on q's device. A modifier the kernel family lacks raises
    ``ValueError`` before any output is touched. ``block_mask``: a validated C-contiguous
    bool / uint8 CuPy array (docs/block_sparse.md) of ``block_size``. ``dropout_p`` > 0 with
    ``dropout_seed``, ``dropout_offset``: validated (docs/dropout.md); or with
    ``dropout_rng``, a uint32 CuPy array of three words on q's device (seed low, seed high,
    offset) that the kernels read when they run (``specs.with_device_rng``).
    """
    batch, seqlen_q, heads, _ = q.shape
    device_id = q.device.id
    shape = shape_of(q, k, dtype, causal,
                     planning.mod_flags(window, softcap, alibi_slopes, sinks, causal,
                                        block_mask is not None, dropout_p > 0), v)
    drop = (dropout_args(dropout_p, dropout_seed, dropout_offset, heads,
                         rng_address(dropout_rng)) if dropout_p else None)
    plan = bsp = None
    if not shape.empty:
        plan = forward_plan(shape, device_id)  # the selector's ValueError comes first
        if block_mask is not None:
            bsp = block_mask_args(block_mask, block_size)
            bsp.check_tiles(plan.kernel.spec)
    if out is not None:
        o, m, l = poison(out[0], dtype), poison(out[1]), poison(out[2])
    else:
        o = _empty(q.shape[:3] + v.shape[3:], q.dtype, dtype)  # v's head_dim
        m = _empty((batch, heads, seqlen_q), np.float32)
        l = _empty((batch, heads, seqlen_q), np.float32)
    if o.size == 0:
        return o, m, l
    if shape.seqlen_k == 0:
        fill_no_key_forward(o, m, l, sinks)
        return o, m, l
    mods = modifiers_of(shape, window, softcap, alibi_slopes, sinks, softmax_scale)
    run_forward(plan, cupy_operand(q), cupy_operand(k), cupy_operand(v), cupy_operand(o),
                m.data.ptr, l.data.ptr, softmax_scale, _current_stream(), device_id, mods,
                bsp=bsp, drop=drop)
    return o, m, l


def flash_backward_gpu(do, q, k, v, o, m, l, *, dtype: str, causal: bool,
                       softmax_scale: float, deterministic: bool = False, out=None,
                       window=None, softcap=None, alibi_slopes=None, sinks=None,
                       block_mask=None, block_size=None, dropout_p=0.0, dropout_seed=None,
                       dropout_offset=0, dropout_rng=None):
    """Backward on CuPy arrays -> (dq, dk, dv), recomputing P from the stored m and l; with
    sinks (dq, dk, dv, dsinks), dsinks float32 (heads,).

    ``out``: an optional (dq, dk, dv) to write into instead of new arrays (as in the forward).
    The modifiers, the block mask and dropout as in ``flash_forward_gpu`` (dropout's mask
    regenerated from the same seed and offset).
    """
    import cupy

    device_id = q.device.id
    shape = shape_of(q, k, dtype, causal,
                     planning.mod_flags(window, softcap, alibi_slopes, sinks, causal,
                                        block_mask is not None, dropout_p > 0), v)
    drop = (dropout_args(dropout_p, dropout_seed, dropout_offset, q.shape[2],
                         rng_address(dropout_rng)) if dropout_p else None)
    plan = bsp = None
    if not shape.empty:
        plan = backward_plan(shape, device_id, deterministic)  # ValueError before writing
        if block_mask is not None:
            bsp = block_mask_args(block_mask, block_size)
            bsp.check_tiles(plan.main.spec, plan.dq.spec if plan.dq is not None else None)
    if out is not None:
        dq, dk, dv = (poison(t, dtype) for t in out)
    else:
        dq = _empty(q.shape, q.dtype, dtype)
        dk = _empty(k.shape, k.dtype, dtype)
        dv = _empty(v.shape, v.dtype, dtype)
    # dsinks: the preprocess adds each block's share with atomics, so it starts at zero
    dsinks = None if sinks is None else cupy.zeros(sinks.shape, np.float32)
    grads = (dq, dk, dv) if sinks is None else (dq, dk, dv, dsinks)
    if dq.size == 0 and dk.size == 0:
        return grads
    if shape.empty:  # with sinks: o = 0 for rows that see no key, so delta and dsinks are 0
        for t in (dq, dk, dv):  # zero bits are +0.0 in every float format
            t.view(np.uint8).fill(0)
        return grads
    workspace = cupy.empty(planning.backward_workspace(plan).total_bytes, np.uint8)
    mods = modifiers_of(shape, window, softcap, alibi_slopes, sinks, softmax_scale, dsinks)
    run_backward(plan, *(cupy_operand(x) for x in (do, q, k, v, o)), m.data.ptr, l.data.ptr,
                 *(cupy_operand(x) for x in (dq, dk, dv)), softmax_scale, workspace.data.ptr,
                 _current_stream(), device_id, mods, bsp=bsp, drop=drop)
    return grads

"""Array interchange: the caller's array in, a backend array out, and back again.

cuflash computes on two backend array types only:

* ``numpy.ndarray`` for data in host memory (the NumPy reference path), and
* ``cupy.ndarray`` for data in CUDA device memory (the kernels).

Every caller array (NumPy, CuPy, PyTorch, JAX) is turned into one of these by
:func:`import_array` and every result is handed back in the caller's own type by
:func:`export_array`.  Both directions go through DLPack and share memory with
the caller: no hidden copies.  The few places where a framework forces a copy
are named below and in the code.

Zero-copy table (checked by ``tests/test_interop.py``)::

    caller          import (caller -> backend)         export (backend -> caller)
    numpy           the array itself                   the array itself
    cupy            the array itself                   the array itself
    torch cpu       np.from_dlpack(t.detach())         torch.from_dlpack(a)
    torch cpu bf16  view int16 -> numpy -> view bf16    view int16 -> torch -> view bf16
    torch cuda      cupy.from_dlpack (caller stream)   torch.from_dlpack(a)
    jax cpu         np.from_dlpack(x)  (read-only)     jnp.from_dlpack(a)   [1]
    jax cpu bf16    np.asarray(x)      (read-only)     jax.device_put(a)    [1]
    jax gpu         cupy.from_dlpack(x)                jnp.from_dlpack(a)
    (CUDA rows hold for bfloat16 too: CuPy >= 14 carries ml_dtypes.bfloat16 through DLPack;
    checked on an H100 with torch 2.11, jax 0.11, cupy 14.2.)

[1] XLA's CPU client aliases host memory only when the buffer is 64-byte
    aligned; otherwise JAX silently copies.  :func:`empty` allocates host
    buffers with that alignment, so outputs made with it export without a copy.
    NumPy's DLPack does not know bfloat16, so JAX bf16 goes through
    ``np.asarray`` / ``jax.device_put``, which alias under the same rule.

Tensors must have a contiguous last axis (stride 1 in elements).  Other strides
(e.g. a ``(b, h, s, d).transpose(1, 2)`` view) are kept as they are: the kernels
take strides, so no copy is made.  A non-contiguous last axis is an error, never
a silent copy.

Nothing here imports cupy, torch or jax at module import time: each is imported
inside the function that handles an array of that framework.
"""

from __future__ import annotations

import contextlib
import sys
import enum
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

try:  # ml_dtypes registers numpy's 'bfloat16'; JAX and CuPy (v14+) use the same type.
    import ml_dtypes

    BFLOAT16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    BFLOAT16 = None

Device = tuple  # ('cpu', 0) or ('cuda', index)
CPU: Device = ("cpu", 0)

# DLPack device types (dlpack.h, DLDeviceType)
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST = 1, 2, 3

# XLA's CPU client aliases (rather than copies) host buffers aligned to this many bytes.
HOST_ALIGNMENT = 64


class Framework(enum.Enum):
    NUMPY = "numpy"
    CUPY = "cupy"
    TORCH = "torch"
    JAX = "jax"


@dataclass(frozen=True)
class Imported:
    """One caller array seen as a backend array.

    ``array`` is a ``numpy.ndarray`` (``device == ('cpu', 0)``) or a ``cupy.ndarray``
    (``device == ('cuda', index)``) sharing memory with the caller's array;
    ``framework`` is the caller's framework, used to export results back.
    """

    array: Any
    framework: Framework
    device: Device

    @property
    def is_cuda(self) -> bool:
        return self.device[0] == "cuda"


_EXPECTED = "an array supporting DLPack (numpy, cupy, torch, jax)"


def _type_name(x: Any) -> str:
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def framework_of(x: Any, name: str) -> Framework:
    """The framework of ``x``, read from the modules of its type's MRO (no imports).

    Raises ``TypeError`` naming ``name`` for anything that is not an array.
    """
    roots = [c.__module__.split(".")[0] for c in type(x).__mro__]
    if isinstance(x, np.ndarray):
        return Framework.NUMPY
    if "cupy" in roots:
        import cupy

        if isinstance(x, cupy.ndarray):
            return Framework.CUPY
    if "torch" in roots:
        import torch

        if isinstance(x, torch.Tensor):
            return Framework.TORCH
    if "jaxlib" in roots or "jax" in roots:
        import jax

        if isinstance(x, jax.core.Tracer):
            raise TypeError(
                f"{name}: got a JAX tracer ({_type_name(x)}); cuflash.attention* need concrete "
                "arrays (call them outside jax.jit / jax.grad); inside jax.jit, jax.grad or "
                "jax.vmap use cuflash.jax.flash_attention, which has a custom VJP and an XLA "
                "FFI custom call"
            )
        if isinstance(x, jax.Array):
            return Framework.JAX
    raise TypeError(f"{name}: expected {_EXPECTED}, got {_type_name(x)}")


def _dlpack_device(x: Any, framework: Framework, name: str) -> Device:
    """('cpu', 0) or ('cuda', index) from ``x.__dlpack_device__()``; other devices raise."""
    if framework is Framework.NUMPY:
        return CPU
    if framework is Framework.TORCH and x.device.type == "meta":
        raise ValueError(f"{name}: expected a CPU or CUDA tensor, got a meta tensor (no data)")
    try:
        dev_type, dev_id = x.__dlpack_device__()
    except Exception as exc:  # e.g. a JAX array sharded over several devices
        raise ValueError(f"{name}: cannot read its device through DLPack ({exc})") from exc
    if int(dev_type) == _DL_CPU:
        return CPU
    if int(dev_type) == _DL_CUDA:
        return ("cuda", int(dev_id))
    where = getattr(x, "device", None)
    raise ValueError(
        f"{name}: expected an array in CPU memory or on a CUDA device, "
        f"got DLPack device type {int(dev_type)} ({where})"
    )


def import_array(x: Any, name: str) -> Imported:
    """View the caller's array ``x`` as a backend array, without copying.

    ``name`` is the argument's name for error messages.  Raises ``TypeError`` for
    non-arrays and dtypes the backend cannot represent, ``ValueError`` for
    unsupported devices and for a last axis that is not contiguous.
    """
    framework = framework_of(x, name)
    device = _dlpack_device(x, framework, name)
    try:
        if device == CPU:
            array = _import_host(x, framework)
        else:
            array = _import_cuda(x, framework, device[1])
    except (BufferError, RuntimeError) as exc:  # a dtype DLPack / NumPy cannot carry
        raise TypeError(f"{name}: cannot import {_describe(x)} through DLPack ({exc})") from exc
    _check_last_axis(array, name)
    return Imported(array=array, framework=framework, device=device)


def _describe(x: Any) -> str:
    return f"{_type_name(x)} of dtype {getattr(x, 'dtype', '?')}"


def _import_host(x: Any, framework: Framework) -> np.ndarray:
    if framework is Framework.NUMPY:
        return np.asarray(x)  # drops ndarray subclasses (np.matrix, memmap), never copies
    if framework is Framework.TORCH:
        import torch

        t = x.detach()  # detach() shares memory; DLPack refuses tensors that require grad
        if t.dtype == torch.bfloat16:  # NumPy's DLPack has no bfloat16: move the bits
            return np.from_dlpack(t.view(torch.int16)).view(BFLOAT16)
        return np.from_dlpack(t)
    if framework is Framework.JAX:
        if BFLOAT16 is not None and x.dtype == BFLOAT16:
            # NumPy's DLPack has no bfloat16; np.asarray aliases a CPU jax buffer (read-only).
            return np.asarray(x)
        return np.from_dlpack(x)  # read-only view of the jax buffer
    raise AssertionError(f"no host import for {framework}")  # cupy arrays are never on the host


def _import_cuda(x: Any, framework: Framework, index: int) -> Any:
    import cupy

    if framework is Framework.CUPY:
        return x
    with cupy.cuda.Device(index):
        if framework is Framework.TORCH:
            # Import on the caller's stream so the DLPack stream handshake is a no-op.
            with _torch_stream(index):
                return cupy.from_dlpack(x.detach())
        # JAX: cupy.from_dlpack passes CuPy's current stream to x.__dlpack__(stream=...),
        # and JAX orders its pending work on x before that stream.
        return cupy.from_dlpack(x)


def _check_last_axis(array: Any, name: str) -> None:
    if array.ndim == 0 or array.size == 0 or array.shape[-1] == 1:
        return  # no elements, or one per row: the stride is never used
    if array.strides[-1] == array.itemsize:
        return
    raise ValueError(
        f"{name}: the last axis must be contiguous (stride 1 in elements); "
        f"got strides {element_strides(array)} in elements for shape {tuple(array.shape)}. "
        "cuflash does not copy silently: make it contiguous first"
    )


def element_strides(array: Any) -> tuple:
    """Strides of a numpy/cupy array in elements (bytes where not a multiple of itemsize)."""
    item = array.itemsize
    return tuple(s // item if s % item == 0 else f"{s}B" for s in array.strides)


def empty(shape: tuple, dtype: Any, device: Device) -> Any:
    """An uninitialised backend array for results on ``device``.

    Host buffers are aligned to :data:`HOST_ALIGNMENT` bytes so that JAX (and any
    consumer with that rule) can alias them on export instead of copying.
    """
    dtype = np.dtype(dtype)
    if device[0] == "cuda":
        import cupy

        with cupy.cuda.Device(device[1]):
            return cupy.empty(shape, dtype=dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + HOST_ALIGNMENT, dtype=np.uint8)
    start = (-raw.ctypes.data) % HOST_ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def export_array(arr: Any, like: Imported) -> Any:
    """Wrap the backend array ``arr`` as ``like``'s framework on ``like``'s device.

    Zero-copy through DLPack in every case except JAX on the CPU with a buffer that
    is not 64-byte aligned (JAX copies; see the module docstring).  For CUDA data,
    call this inside :func:`caller_stream` so the consumer's DLPack handshake sees
    the stream the result was produced on.
    """
    framework = like.framework
    if framework in (Framework.NUMPY, Framework.CUPY):
        return arr
    on_host = isinstance(arr, np.ndarray)
    is_bf16 = BFLOAT16 is not None and arr.dtype == BFLOAT16
    if framework is Framework.TORCH:
        import torch

        if on_host and is_bf16:  # torch's DLPack import refuses ml_dtypes.bfloat16
            return torch.from_dlpack(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_dlpack(arr)
    if framework is Framework.JAX:
        import jax
        import jax.numpy as jnp

        if on_host and is_bf16:
            # No DLPack route: NumPy cannot export bfloat16 and JAX's bitcast of an int16
            # import is a new buffer.  device_put aliases a 64-byte-aligned host buffer
            # (copies otherwise).
            return jax.device_put(arr, jax.devices("cpu")[0])
        return jnp.from_dlpack(arr)
    raise AssertionError(f"no export for {framework}")


@contextlib.contextmanager
def _torch_stream(index: int) -> Iterator[None]:
    import torch

    with external_stream(torch.cuda.current_stream(index).cuda_stream, index):
        yield


class _StreamHandle:
    """A raw CUstream behind the CUDA stream protocol (``cupy.cuda.Stream.from_external``)."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def external_stream(ptr: int, device_id: int) -> Any:
    """A CuPy stream object for someone else's CUstream ``ptr`` (torch's, XLA's)."""
    import cupy

    if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy >= 14: the CUDA stream protocol
        return cupy.cuda.Stream.from_external(_StreamHandle(ptr))
    return cupy.cuda.ExternalStream(ptr, device_id)  # older CuPy (deprecated from 14 on)


@contextlib.contextmanager
def caller_stream(imported: Imported) -> Iterator[None]:
    """Run the enclosed CuPy work on the caller's CUDA stream; a no-op for host arrays.

    Ordering guarantees, per caller framework:

    * torch: the caller's current stream (``torch.cuda.current_stream(device)``) becomes
      CuPy's current stream (``cupy.cuda.Stream.from_external``, or ``ExternalStream`` on
      CuPy < 14), so kernels launched inside are ordered after the work that
      produced the inputs and before anything the caller queues next on that stream,
      exactly as a torch operator would be.  Memory the result uses comes from CuPy's
      pool; torch keeps it alive through the DLPack capsule.
    * cupy: CuPy's current stream is kept; the caller chose it.
    * jax: JAX exposes no current stream.  Ordering comes from the DLPack stream
      handshake: ``cupy.from_dlpack`` passes CuPy's current stream to ``__dlpack__`` on
      import, so the inputs are ready on that stream, and ``jnp.from_dlpack`` passes
      JAX's stream to our ``__dlpack__`` on export, so CuPy makes it wait for the
      kernels.  We keep CuPy's current stream.
    * numpy / host data: nothing to order; the call is synchronous.

    Results must be exported (:func:`export_array`) inside this context so that the
    handshake on export names the stream the kernels ran on.
    """
    if not imported.is_cuda:
        yield
        return
    import cupy

    index = imported.device[1]
    with cupy.cuda.Device(index):
        if imported.framework is Framework.TORCH:
            with _torch_stream(index):
                yield
        else:
            yield


def array_namespace(x: Any, name: str = "x", *, tracers: bool = False) -> Any:
    """The array module of ``x``'s framework: numpy, cupy, torch or jax.numpy. ``tracers``:
    a JAX tracer counts as a JAX array (for code written in plain jax.numpy, which runs
    under jit; the attention kernels' eager path refuses tracers). Raises ``TypeError``
    naming ``name`` for anything that is not an array."""
    if tracers and "jax" in sys.modules:
        import jax

        if isinstance(x, jax.core.Tracer):
            import jax.numpy as jnp

            return jnp
    framework = framework_of(x, name)
    if framework is Framework.NUMPY:
        return np
    if framework is Framework.CUPY:
        import cupy

        return cupy
    if framework is Framework.TORCH:
        import torch

        return torch
    import jax.numpy as jnp

    return jnp


def xp_log(x: Any) -> Any:
    """Natural log of ``x`` in its own framework (for ``lse = m + log(l)``).

    ``log(0) = -inf`` without NumPy's divide-by-zero warning: rows that see no key
    have ``l = 0`` and ``m = -inf``, so their lse is ``-inf``.
    """
    xp = array_namespace(x)
    if xp is np:
        with np.errstate(divide="ignore"):
            return np.log(x)
    return xp.log(x)


def data_pointer(x: Any) -> int:
    """Address of the first element of ``x`` (any supported framework), for zero-copy tests."""
    framework = framework_of(x, "x")
    if framework is Framework.NUMPY:
        return int(x.__array_interface__["data"][0])
    if framework is Framework.CUPY:
        return int(x.data.ptr)
    if framework is Framework.TORCH:
        return int(x.data_ptr())
    return int(x.unsafe_buffer_pointer())

"""XLA FFI custom-call targets written in Python: the C ABI in ctypes, no compiler, no build step.

XLA calls a typed-FFI target as ``XLA_FFI_Error* handler(XLA_FFI_CallFrame*)``. Here that
function is a ``ctypes.CFUNCTYPE`` callback wrapping a Python function; ``register`` hands it
to XLA through ``jax.ffi.pycapsule`` + ``jax.ffi.register_ffi_target``, and
``jax.ffi.ffi_call`` calls it from a jitted computation. ctypes takes the GIL on entry, so
the callback may run on any XLA thread.

The structs below mirror ``xla/ffi/api/c_api.h`` (API 0.x; jaxlib ships the header under
``jax.ffi.include_dir()``). Only the prefix of each struct that we read is declared; XLA
only ever appends fields, and each struct carries its ``struct_size``.

What the callback does with a call frame:

* metadata query (``extension_start`` is an ``XLA_FFI_Metadata_Extension``): XLA asks, at
  registration, which API version the handler was built for and its traits. We answer with
  the running XLA's own version (we read nothing it lacks) and, by default, no traits: not
  command-buffer compatible, because most of our launches may allocate and compile, so XLA
  must not capture them in a CUDA graph. A target whose handler only launches on XLA's
  stream (kernels loaded at trace time, scratch from XLA, no host sync) registers with
  ``command_buffer=True`` (``XLA_FFI_HANDLER_TRAITS_COMMAND_BUFFER_COMPATIBLE``): XLA may then
  run the handler once while capturing a graph and replay the graph without calling it.
* any stage but EXECUTE: nothing to do (we register an execute-only handler anyway).
* EXECUTE: decode the buffers and attributes into a :class:`Call` and run the Python
  function. Any exception becomes an ``XLA_FFI_Error`` (XLA raises it in Python as an
  ``XlaRuntimeError`` with our message). Nothing escapes the callback: ctypes would print it
  and hand XLA an unwritten return value. If even reporting fails, the handler returns an
  error made in advance (``_ReserveError``); it never returns success after a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import threading
import traceback
from ctypes import POINTER, Structure, c_char_p, c_int, c_int64, c_size_t, c_uint32, c_void_p
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from .interop import external_stream

try:  # ml_dtypes is a dependency of jax
    import ml_dtypes

    _BFLOAT16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BFLOAT16 = None

log = logging.getLogger(__name__)

# -- enums of c_api.h ------------------------------------------------------------------------

EXTENSION_METADATA = 1  # XLA_FFI_Extension_Type
STAGE_EXECUTE = 3  # XLA_FFI_ExecutionStage
ARG_BUFFER = RET_BUFFER = 1  # XLA_FFI_ArgType / XLA_FFI_RetType
ATTR_SCALAR = 3  # XLA_FFI_AttrType
TRAIT_COMMAND_BUFFER_COMPATIBLE = 1  # XLA_FFI_Handler_TraitsBits
ERROR_INVALID_ARGUMENT, ERROR_INTERNAL = 3, 13  # XLA_FFI_Error_Code

# XLA_FFI_DataType (= xla::PrimitiveType) -> NumPy, for the types a buffer or scalar may have
_NUMPY_DTYPES = {1: np.bool_, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.uint8,
                 7: np.uint16, 8: np.uint32, 9: np.uint64, 10: np.float16, 11: np.float32,
                 12: np.float64}
if _BFLOAT16 is not None:
    _NUMPY_DTYPES[16] = _BFLOAT16


# the dtype objects, built once: decode runs on every call
_DTYPES = {code: np.dtype(t) for code, t in _NUMPY_DTYPES.items()}
# scalar attributes read straight from their address (the others through NumPy)
_CTYPES = {1: ctypes.c_bool, 2: ctypes.c_int8, 3: ctypes.c_int16, 4: ctypes.c_int32,
           5: ctypes.c_int64, 6: ctypes.c_uint8, 7: ctypes.c_uint16, 8: ctypes.c_uint32,
           9: ctypes.c_uint64, 11: ctypes.c_float, 12: ctypes.c_double}


def numpy_dtype(xla_dtype: int) -> np.dtype:
    dtype = _DTYPES.get(xla_dtype)
    if dtype is None:
        raise TypeError(f"XLA data type {xla_dtype} (xla::PrimitiveType) is not supported here")
    return dtype


# -- structs of c_api.h (field names as in the header) ---------------------------------------


class ExtensionBase(Structure):
    pass


ExtensionBase._fields_ = [("struct_size", c_size_t), ("type", c_int),
                          ("next", POINTER(ExtensionBase))]


class ApiVersion(Structure):
    _fields_ = [("struct_size", c_size_t), ("extension_start", c_void_p),
                ("major_version", c_int), ("minor_version", c_int)]


class Metadata(Structure):
    _fields_ = [("struct_size", c_size_t), ("api_version", ApiVersion), ("traits", c_uint32),
                ("state_type_id", c_int64)]  # state_type_id: newer XLA only (struct_size says)


class MetadataExtension(Structure):
    _fields_ = [("extension_base", ExtensionBase), ("metadata", POINTER(Metadata))]


class ByteSpan(Structure):
    _fields_ = [("ptr", c_void_p), ("len", c_size_t)]


class Scalar(Structure):
    _fields_ = [("dtype", c_int), ("value", c_void_p)]


class Buffer(Structure):
    _fields_ = [("struct_size", c_size_t), ("extension_start", c_void_p), ("dtype", c_int),
                ("data", c_void_p), ("rank", c_int64), ("dims", POINTER(c_int64))]


class Args(Structure):
    _fields_ = [("struct_size", c_size_t), ("extension_start", c_void_p), ("size", c_int64),
                ("types", POINTER(c_int)), ("args", POINTER(c_void_p))]


class Rets(Structure):
    _fields_ = [("struct_size", c_size_t), ("extension_start", c_void_p), ("size", c_int64),
                ("types", POINTER(c_int)), ("rets", POINTER(c_void_p))]


class Attrs(Structure):
    _fields_ = [("struct_size", c_size_t), ("extension_start", c_void_p), ("size", c_int64),
                ("types", POINTER(c_int)), ("names", POINTER(POINTER(ByteSpan))),
                ("attrs", POINTER(c_void_p))]


class Api(Structure):
    """XLA_FFI_Api up to the functions we call; the rest are never touched."""

    _fields_ = [("struct_size", c_size_t), ("extension_start", c_void_p),
                ("api_version", ApiVersion), ("internal_api", c_void_p),
                ("XLA_FFI_Error_Create", c_void_p), ("XLA_FFI_Error_GetMessage", c_void_p),
                ("XLA_FFI_Error_Destroy", c_void_p), ("XLA_FFI_Handler_Register", c_void_p),
                ("XLA_FFI_Stream_Get", c_void_p)]


class CallFrame(Structure):
    _fields_ = [("struct_size", c_size_t), ("extension_start", POINTER(ExtensionBase)),
                ("api", POINTER(Api)), ("ctx", c_void_p), ("stage", c_int), ("args", Args),
                ("rets", Rets), ("attrs", Attrs), ("future", c_void_p)]


class ErrorCreateArgs(Structure):
    _fields_ = [("struct_size", c_size_t), ("extension_start", c_void_p),
                ("message", c_char_p), ("errc", c_int)]


class ErrorGetMessageArgs(Structure):
    _fields_ = [("struct_size", c_size_t), ("extension_start", c_void_p), ("error", c_void_p),
                ("message", c_char_p)]


class ErrorDestroyArgs(Structure):
    _fields_ = [("struct_size", c_size_t), ("extension_start", c_void_p), ("error", c_void_p)]


class StreamGetArgs(Structure):
    _fields_ = [("struct_size", c_size_t), ("extension_start", c_void_p), ("ctx", c_void_p),
                ("stream", c_void_p)]


def struct_size(struct: type[Structure], last_field: str) -> int:
    """c_api.h's XLA_FFI_STRUCT_SIZE: offsetof(last_field) + sizeof(last_field), no padding."""
    field = getattr(struct, last_field)
    return field.offset + field.size


_ERROR_CREATE = ctypes.CFUNCTYPE(c_void_p, POINTER(ErrorCreateArgs))
_ERROR_GET_MESSAGE = ctypes.CFUNCTYPE(None, POINTER(ErrorGetMessageArgs))
_ERROR_DESTROY = ctypes.CFUNCTYPE(None, POINTER(ErrorDestroyArgs))
_STREAM_GET = ctypes.CFUNCTYPE(c_void_p, POINTER(StreamGetArgs))
HANDLER = ctypes.CFUNCTYPE(c_void_p, POINTER(CallFrame))


# -- decoded call ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BufferView:
    """One argument or result buffer: row-major (ffi_call's default layout), XLA-owned."""

    dtype: np.dtype
    data: int  # address; 0 is possible for an empty buffer
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        # math.prod of Python ints: a few times cheaper than np.prod, and exact
        return math.prod(self.shape) * self.dtype.itemsize

    def folded(self, ndim: int) -> "BufferView":
        """Leading axes (from vmap's broadcast_all) folded into the first of the last ``ndim``."""
        if len(self.shape) <= ndim:
            return self
        lead = math.prod(self.shape[: len(self.shape) - ndim + 1])
        return BufferView(self.dtype, self.data, (lead,) + self.shape[len(self.shape) - ndim + 1:])

    def entries(self, ndim: int) -> list["BufferView"]:
        """One view per entry of the leading axes (from vmap's broadcast_all) before the last
        ``ndim``, in row-major order; ``[self]`` when there are none. For a call that cannot
        fold those axes into its batch (one sink per head, whatever the batch)."""
        if len(self.shape) <= ndim:
            return [self]
        split = len(self.shape) - ndim
        count = math.prod(self.shape[:split])
        inner = self.shape[split:]
        step = math.prod(inner) * self.dtype.itemsize
        return [BufferView(self.dtype, self.data + i * step if self.data else 0, inner)
                for i in range(count)]

    def as_numpy(self) -> np.ndarray:
        """A writable NumPy view of host memory (the CPU platform); no copy."""
        if self.nbytes == 0:
            return np.empty(self.shape, self.dtype)
        raw = (ctypes.c_char * self.nbytes).from_address(self.data)
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.shape)

    def as_cupy(self, device_id: int):
        """A CuPy view of device memory (the CUDA platform); no copy. XLA owns the memory and
        keeps it alive for the duration of the call, which is all we use it for."""
        import cupy

        if self.nbytes == 0:
            with cupy.cuda.Device(device_id):
                return cupy.empty(self.shape, self.dtype)
        memory = cupy.cuda.UnownedMemory(self.data, self.nbytes, None, device_id)
        return cupy.ndarray(self.shape, self.dtype, cupy.cuda.MemoryPointer(memory, 0))


@dataclass(frozen=True)
class Call:
    """An EXECUTE call frame, decoded: buffers in order, attributes by name."""

    args: list[BufferView]
    rets: list[BufferView]
    attrs: dict[str, Any]
    api: Any  # POINTER(Api)
    ctx: int

    def stream(self) -> int:
        """The platform stream XLA runs this call on (a CUstream on CUDA)."""
        args = StreamGetArgs(_STREAM_GET_ARGS_SIZE, None, self.ctx, None)
        _check(self.api, _stream_get(self.api.contents.XLA_FFI_Stream_Get)(ctypes.byref(args)),
               "XLA_FFI_Stream_Get")
        return int(args.stream or 0)

    def device_id(self) -> int:
        """The CUDA device holding this call's buffers (read from a buffer's address)."""
        import cupy

        if _visible_devices() == 1:  # the usual process: no driver query per call
            return 0
        for view in self.rets + self.args:
            if view.data:
                return int(cupy.cuda.runtime.pointerGetAttributes(view.data).device)
        return cupy.cuda.runtime.getDevice()  # all buffers empty: any device will do

    @contextlib.contextmanager
    def on_cuda_stream(self) -> Iterator[int]:
        """Make XLA's stream CuPy's current stream (and its device current); yields the device.

        Everything CuPy launches or allocates inside is ordered on XLA's stream, after the ops
        that produced the arguments and before the ops that read the results.
        """
        import cupy

        device_id = self.device_id()
        with cupy.cuda.Device(device_id), external_stream(self.stream(), device_id):
            yield device_id


_device_count: list = []  # the process's CUDA device count, read once (it cannot change)


def _visible_devices() -> int:
    if not _device_count:
        import cupy

        _device_count.append(cupy.cuda.runtime.getDeviceCount())
    return _device_count[0]


_STREAM_GET_ARGS_SIZE = struct_size(StreamGetArgs, "stream")
_stream_getters: dict = {}  # XLA_FFI_Stream_Get's address -> its ctypes function


def _stream_get(address: int):
    """The ctypes function at ``address``, made once (making one costs more than calling it)."""
    fn = _stream_getters.get(address)
    if fn is None:
        fn = _stream_getters[address] = _STREAM_GET(address)
    return fn


def _buffers(size: int, types, pointers, kind: str, buffer_type: int) -> list[BufferView]:
    views = []
    for i in range(size):
        if types[i] != buffer_type:
            raise TypeError(f"{kind} {i}: expected a buffer, got XLA FFI type {types[i]}")
        buf = Buffer.from_address(pointers[i])
        shape = tuple(buf.dims[:buf.rank])  # a slice of a c_int64 pointer: Python ints
        views.append(BufferView(numpy_dtype(buf.dtype), buf.data or 0, shape))
    return views


def _attributes(attrs: Attrs) -> dict[str, Any]:
    """Scalar attributes by name; other kinds (arrays, strings, dicts) are not used here."""
    out = {}
    for i in range(attrs.size):
        span = attrs.names[i].contents
        name = ctypes.string_at(span.ptr, span.len).decode()
        if attrs.types[i] != ATTR_SCALAR:
            raise TypeError(f"attribute {name!r}: only scalar attributes are supported, "
                            f"got XLA FFI attribute type {attrs.types[i]}")
        scalar = Scalar.from_address(attrs.attrs[i])
        dtype = numpy_dtype(scalar.dtype)  # (raises for a type we do not know)
        ctype = _CTYPES.get(scalar.dtype)
        if ctype is not None:
            out[name] = ctype.from_address(scalar.value).value
        else:  # 16-bit floats
            raw = ctypes.string_at(scalar.value, dtype.itemsize)
            out[name] = np.frombuffer(raw, dtype=dtype)[0].item()
    return out


def decode(frame: CallFrame) -> Call:
    args = _buffers(frame.args.size, frame.args.types, frame.args.args, "argument", ARG_BUFFER)
    rets = _buffers(frame.rets.size, frame.rets.types, frame.rets.rets, "result", RET_BUFFER)
    return Call(args=args, rets=rets, attrs=_attributes(frame.attrs), api=frame.api,
                ctx=frame.ctx or 0)


# -- errors and metadata ---------------------------------------------------------------------


class FfiCallError(RuntimeError):
    pass


def create_error(api, message: str, code: int = ERROR_INTERNAL) -> int | None:
    """A new XLA_FFI_Error (XLA takes ownership and copies the message), or None without an API."""
    if not api:
        return None
    args = ErrorCreateArgs(struct_size(ErrorCreateArgs, "errc"), None,
                           message.encode("utf-8", "replace"), code)
    return _ERROR_CREATE(api.contents.XLA_FFI_Error_Create)(ctypes.byref(args))


def _check(api, error: int | None, what: str) -> None:
    """Raise for an error returned by an XLA API call; the error is ours to destroy."""
    if not error:
        return
    functions = api.contents
    message = ErrorGetMessageArgs(struct_size(ErrorGetMessageArgs, "message"), None, error, None)
    _ERROR_GET_MESSAGE(functions.XLA_FFI_Error_GetMessage)(ctypes.byref(message))
    text = (message.message or b"").decode("utf-8", "replace")  # copied before the destroy
    destroy = ErrorDestroyArgs(struct_size(ErrorDestroyArgs, "error"), None, error)
    _ERROR_DESTROY(functions.XLA_FFI_Error_Destroy)(ctypes.byref(destroy))
    raise FfiCallError(f"{what}: {text}")


def _fill_metadata(frame: CallFrame, traits: int = 0) -> None:
    extension = ctypes.cast(frame.extension_start, POINTER(MetadataExtension)).contents
    metadata = extension.metadata.contents
    if frame.api:
        version = frame.api.contents.api_version
        major, minor = version.major_version, version.minor_version
    else:  # no API to ask: the oldest typed-FFI version we are written against
        major, minor = 0, 1
    metadata.api_version = ApiVersion(struct_size(ApiVersion, "minor_version"), None, major,
                                      minor)
    metadata.traits = traits  # 0: not command-buffer (CUDA graph) compatible
    if metadata.struct_size >= struct_size(Metadata, "state_type_id"):
        metadata.state_type_id = 0  # XLA_FFI_UNKNOWN_TYPE_ID: a stateless handler


_MIN_FRAME_SIZE = struct_size(CallFrame, "attrs")


class _ReserveError:
    """One XLA_FFI_Error made in advance, for a failure that leaves no way to make one.

    A handler must never return NULL (success) after a failure, and an exception escaping a
    ctypes callback returns garbage that XLA dereferences. When reporting a failure itself
    fails (no API in the frame, ``create_error`` raising, even formatting the message
    raising), the handler returns this error instead. It is made from the first API pointer
    a frame carries (XLA's registration-time metadata query has one) and remade after use;
    XLA takes ownership of each one returned.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.api = None  # the XLA_FFI_Api the reserve came from
        self._error = None

    def refill(self, api) -> None:
        if not api or self._error:
            return
        with self._lock:
            if not self._error:
                # a copy of the pointer's value: ``frame.api`` is a view into the call frame,
                # which XLA reuses once the call returns
                address = ctypes.cast(api, c_void_p).value
                self.api = ctypes.cast(c_void_p(address), POINTER(Api))
                self._error = create_error(api, "cuflash XLA FFI handler failed, and reporting "
                                           "the failure failed too (see the log)")

    def take(self) -> int | None:
        with self._lock:
            error, self._error = self._error, None
        return error


_RESERVE = _ReserveError()


def _frame(frame_ptr) -> CallFrame:
    frame = frame_ptr.contents  # raises ValueError for a NULL frame
    _RESERVE.refill(frame.api)
    return frame


def _report(name: str, frame: CallFrame, exc: BaseException) -> int:
    """A new XLA_FFI_Error for ``exc`` (message and traceback); raises if none can be made."""
    detail = traceback.format_exc()
    code = ERROR_INVALID_ARGUMENT if isinstance(exc, (TypeError, ValueError)) else ERROR_INTERNAL
    # the message, traceback included, reaches the caller as JAX's runtime error
    error = create_error(frame.api, f"{name}: {type(exc).__name__}: {exc}\n{detail}", code)
    if not error:
        raise FfiCallError(f"{name}: no XLA API in the call frame to report an error through")
    return error


def _run(name: str, execute: Callable[[Call], None], frame_ptr, traits: int = 0) -> int | None:
    """The handler's work: None for success, else an XLA_FFI_Error; may raise."""
    frame = _frame(frame_ptr)
    try:
        if frame.struct_size < _MIN_FRAME_SIZE:
            raise ValueError(f"XLA_FFI_CallFrame of {frame.struct_size} bytes, expected at "
                             f"least {_MIN_FRAME_SIZE}")
        if frame.extension_start and frame.extension_start.contents.type == EXTENSION_METADATA:
            _fill_metadata(frame, traits)
        elif frame.stage == STAGE_EXECUTE:
            execute(decode(frame))
        return None
    except BaseException as exc:  # noqa: BLE001 - nothing may unwind into XLA
        return _report(name, frame, exc)


def _last_resort(name: str) -> int:
    """The reserve error (or, without one, a clean abort): never success after a failure."""
    try:
        log.error("XLA FFI target %s failed and could not report it:\n%s", name,
                  traceback.format_exc())
    except BaseException:  # noqa: BLE001 - logging itself failed; carry on
        pass
    error = _RESERVE.take()
    if error:
        return error
    try:
        error = create_error(_RESERVE.api, f"{name}: the handler failed (see the log)")
    except BaseException:  # noqa: BLE001
        error = None
    if error:
        return error
    # No XLA API was ever seen: returning NULL would claim success with unwritten results.
    os.write(2, f"cuflash: XLA FFI target {name} failed with no way to report it to XLA; "
                "aborting\n".encode())
    os.abort()


def make_handler(name: str, execute: Callable[[Call], None], *, command_buffer: bool = False):
    """The ctypes callback for ``execute``; keep the returned object alive while XLA may call it.

    Every path returns None (success) or an XLA_FFI_Error: an exception that escaped a ctypes
    callback would hand XLA an unwritten return value. ``command_buffer``: declare the
    handler command-buffer (CUDA graph) compatible (see the module docstring).
    """
    traits = TRAIT_COMMAND_BUFFER_COMPATIBLE if command_buffer else 0

    def handler(frame_ptr):
        try:
            return _run(name, execute, frame_ptr, traits)
        except BaseException:  # noqa: BLE001 - reporting failed; see _last_resort
            return _last_resort(name)

    return HANDLER(handler)


# Every callback handed to XLA, kept for the process's life: XLA holds its address from the
# moment register_ffi_target is called, even if that call then fails.
_CALLBACKS: list[Any] = []
# (name, platform) pairs XLA accepted; written only after register_ffi_target returned.
_REGISTERED: set[tuple[str, str]] = set()
_REGISTRATION_LOCK = threading.Lock()


def register(name: str, execute: Callable[[Call], None], platform: str, *,
             command_buffer: bool = False) -> None:
    """Register ``execute`` as FFI target ``name`` for ``platform`` ("cpu", "CUDA"), once;
    ``command_buffer`` as in ``make_handler``.

    Thread-safe: the first jitted calls of several threads may arrive together, and a second
    registration of a name is refused by XLA (or, worse, replaces a callback XLA holds). A
    registration that raised is retried by the next call.
    """
    import jax

    with _REGISTRATION_LOCK:
        if (name, platform) in _REGISTERED:
            return
        callback = make_handler(name, execute, command_buffer=command_buffer)
        _CALLBACKS.append(callback)
        address = ctypes.cast(callback, c_void_p).value
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(address), platform=platform)
        _REGISTERED.add((name, platform))


def registered(name: str, platform: str) -> bool:
    """Whether XLA accepted target ``name`` for ``platform`` in this process."""
    return (name, platform) in _REGISTERED

"""cuflash.xla_ffi's decoding of a call frame's buffers and scalar attributes, on frames built
here with ctypes (no XLA): every scalar type reads back as the value stored."""

import ctypes

import numpy as np
import pytest

from cuflash import xla_ffi

_BF16 = xla_ffi._BFLOAT16


def _attrs(values: dict):
    """An Attrs struct of scalar attributes (name -> (XLA type code, NumPy value)), and the
    objects that must stay alive while it is read."""
    keep = []
    n = len(values)
    types = (ctypes.c_int * n)(*([xla_ffi.ATTR_SCALAR] * n))
    names = (ctypes.POINTER(xla_ffi.ByteSpan) * n)()
    scalars = (ctypes.c_void_p * n)()
    for i, (name, (code, value)) in enumerate(values.items()):
        raw = ctypes.create_string_buffer(np.asarray(value).tobytes())
        text = ctypes.create_string_buffer(name.encode())
        span = xla_ffi.ByteSpan(ctypes.cast(text, ctypes.c_void_p), len(name))
        scalar = xla_ffi.Scalar(code, ctypes.cast(raw, ctypes.c_void_p))
        names[i] = ctypes.pointer(span)
        scalars[i] = ctypes.addressof(scalar)
        keep += [raw, text, span, scalar]
    attrs = xla_ffi.Attrs(ctypes.sizeof(xla_ffi.Attrs), None, n, types, names, scalars)
    return attrs, keep + [types, names, scalars]


def test_scalar_attributes_of_every_type_read_back():
    values = {"b": (1, np.bool_(True)), "i8": (2, np.int8(-7)), "i16": (3, np.int16(-300)),
              "i32": (4, np.int32(-70000)), "i64": (5, np.int64(-(2 ** 40))),
              "u8": (6, np.uint8(250)), "u16": (7, np.uint16(60000)),
              "u32": (8, np.uint32(2 ** 31 + 5)), "u64": (9, np.uint64(2 ** 63 + 9)),
              "f16": (10, np.float16(0.333)), "f32": (11, np.float32(0.1)),
              "f64": (12, np.float64(0.1))}
    if _BF16 is not None:
        values["bf16"] = (16, np.asarray(0.3, dtype=_BF16)[()])
    attrs, _keep = _attrs(values)
    out = xla_ffi._attributes(attrs)
    assert set(out) == set(values)
    for name, (_, value) in values.items():
        assert out[name] == value.item(), name
        assert type(out[name]) is type(value.item()), name


def test_unknown_scalar_type_is_refused():
    attrs, _keep = _attrs({"x": (99, np.int32(1))})
    with pytest.raises(TypeError, match="XLA data type 99"):
        xla_ffi._attributes(attrs)


@pytest.mark.parametrize("dims", [(), (0,), (2, 3, 5), (1, 0, 4)])
def test_buffers_decode_shape_dtype_address(dims):
    shape = (ctypes.c_int64 * max(1, len(dims)))(*dims)
    buf = xla_ffi.Buffer(ctypes.sizeof(xla_ffi.Buffer), None, 11, 4096, len(dims), shape)
    pointers = (ctypes.c_void_p * 1)(ctypes.addressof(buf))
    types = (ctypes.c_int * 1)(xla_ffi.ARG_BUFFER)
    (view,) = xla_ffi._buffers(1, types, pointers, "argument", xla_ffi.ARG_BUFFER)
    assert view.shape == dims and all(type(d) is int for d in view.shape)
    assert view.dtype == np.float32 and view.data == 4096
    assert view.nbytes == 4 * int(np.prod(dims, dtype=np.int64))
    types[0] = 7
    with pytest.raises(TypeError, match="argument 0: expected a buffer"):
        xla_ffi._buffers(1, types, pointers, "argument", xla_ffi.ARG_BUFFER)


def test_folded_and_entries_keep_the_bytes():
    view = xla_ffi.BufferView(np.dtype(np.float16), 1024, (3, 2, 5, 7))
    folded = view.folded(3)
    assert folded.shape == (6, 5, 7) and folded.nbytes == view.nbytes
    entries = view.entries(2)
    assert [e.shape for e in entries] == [(5, 7)] * 6
    assert [e.data for e in entries] == [1024 + i * 70 for i in range(6)]

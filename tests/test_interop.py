"""cuflash.interop: the caller's array in and out through DLPack, zero-copy.

CPU tests run everywhere (torch / jax tests skip when the framework is not importable);
``gpu`` tests need CuPy with a CUDA device (see conftest.py).

Zero-copy exceptions, documented in cuflash/interop.py and pinned down here:
* JAX on the CPU aliases a host buffer only when it is 64-byte aligned; an unaligned one is
  copied (``interop.empty`` allocates aligned buffers, so outputs made with it alias).
* JAX arrays are always dense row-major, so the transposed-view case applies to NumPy,
  PyTorch and CuPy only.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import ml_dtypes
import numpy as np
import pytest

from cuflash import interop
from cuflash.interop import CPU, Framework, data_pointer, export_array, import_array

DTYPES = ["float32", "float16", "bfloat16"]
FRAMEWORKS = ["numpy", "torch", "jax"]
SHAPE = (2, 5, 3, 16)  # (batch, seqlen, heads, head_dim); seqlen not a multiple of anything


def _torch():
    return pytest.importorskip("torch")


def _jnp():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    return jnp


def _host(shape=SHAPE, dtype="float32", seed=0) -> np.ndarray:
    """Fresh random data (never zeros), in a 64-byte-aligned buffer."""
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) + 0.5
    out = interop.empty(shape, np.dtype(dtype), CPU)
    out[...] = data.astype(np.dtype(dtype))
    return out


def make(framework: str, dtype: str, shape=SHAPE, seed=0):
    """An array of ``framework`` on the CPU holding random data of ``dtype``."""
    host = _host(shape, dtype, seed)
    if framework == "numpy":
        return host
    if framework == "torch":
        torch = _torch()
        return torch.from_numpy(host.astype(np.float32)).to(getattr(torch, dtype))
    jnp = _jnp()
    import jax

    with jax.default_device(jax.devices("cpu")[0]):  # also on machines with a GPU
        return jnp.asarray(host.astype(np.float32), dtype=getattr(jnp, dtype))


def as_float64(x) -> np.ndarray:
    """Values of an array of any framework, for comparisons."""
    if type(x).__module__.startswith("torch"):
        return x.detach().float().numpy().astype(np.float64)
    return np.asarray(x).astype(np.float64)


def framework_name(x) -> str:
    return interop.framework_of(x, "x").value


# -- framework detection and non-arrays ---------------------------------------------------


@pytest.mark.parametrize("bad, got", [([1.0, 2.0], "got list"), (None, "got NoneType"),
                                      (3.0, "got float"), (np.float32(1.0), "numpy.float32"),
                                      ("q", "got str")])
def test_non_array_is_a_type_error_naming_the_argument(bad, got):
    with pytest.raises(TypeError, match=r"^q: expected an array supporting DLPack") as err:
        import_array(bad, "q")
    assert got in str(err.value)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_framework_detection(framework):
    x = make(framework, "float32")
    assert interop.framework_of(x, "q") is Framework(framework)
    assert import_array(x, "q").framework is Framework(framework)


def test_torch_parameter_and_ndarray_subclass_are_detected():
    torch = _torch()
    p = torch.nn.Parameter(torch.ones(2, 3))
    assert interop.framework_of(p, "q") is Framework.TORCH
    m = np.asarray(np.ones((2, 8), np.float32)).view(np.matrix)
    imp = import_array(m, "q")
    assert type(imp.array) is np.ndarray and data_pointer(imp.array) == data_pointer(m)


def test_jax_tracer_is_rejected_with_a_hint():
    pytest.importorskip("jax")
    import jax

    seen = {}

    def f(x):
        with pytest.raises(TypeError, match=r"^q: got a JAX tracer.*outside jax.jit") as err:
            import_array(x, "q")
        seen["msg"] = str(err.value)
        return x

    jax.jit(f)(make("jax", "float32"))
    assert seen


def test_torch_meta_tensor_is_rejected():
    torch = _torch()
    with pytest.raises(ValueError, match=r"^k: .*meta"):
        import_array(torch.empty(SHAPE, device="meta"), "k")


def test_importing_cuflash_imports_no_framework():
    code = ("import sys, numpy as np, cuflash; from cuflash import interop, validate; "
            "q = np.ones((1, 4, 2, 8), np.float32); "
            "validate.check_forward(q, q, q, causal=False, softmax_scale=None); "
            "interop.export_array(q, interop.import_array(q, 'q')); "
            "bad = [m for m in ('cupy', 'torch', 'jax') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- CPU import: zero-copy views, dtype and values ------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_cpu_import_is_a_zero_copy_numpy_view(framework, dtype):
    x = make(framework, dtype)
    imp = import_array(x, "q")
    assert type(imp.array) is np.ndarray
    assert imp.device == ("cpu", 0) and not imp.is_cuda
    assert imp.array.dtype.name == dtype
    assert imp.array.shape == SHAPE
    assert data_pointer(imp.array) == data_pointer(x)
    np.testing.assert_array_equal(imp.array.astype(np.float64), as_float64(x))


def test_torch_bf16_bits_survive_import_and_export():
    torch = _torch()
    bits = torch.arange(-2**15, 2**15, 97, dtype=torch.int32).to(torch.int16)
    t = bits.view(torch.bfloat16).reshape(1, -1, 1, 1).expand(1, bits.numel(), 1, 8).contiguous()
    imp = import_array(t, "q")
    assert imp.array.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(imp.array.view(np.int16)[0, :, 0, 0], bits.numpy())
    back = export_array(imp.array, like=imp)
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), t.view(torch.int16))


def test_torch_requires_grad_is_detached_sharing_memory():
    torch = _torch()
    t = make("torch", "float32").requires_grad_(True)
    imp = import_array(t, "q")
    assert data_pointer(imp.array) == t.data_ptr()
    assert t.requires_grad  # the caller's tensor is untouched


# -- export: the caller's type, zero-copy ---------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_numpy_in_caller_type_out(framework, dtype):
    x = make(framework, dtype)
    like = import_array(x, "q")
    out = _host(SHAPE, dtype, seed=1)  # a result buffer as the API allocates it
    ptr = data_pointer(out)
    y = export_array(out, like=like)
    assert framework_name(y) == framework
    assert type(y) is type(x)
    assert str(y.dtype).endswith(dtype) and tuple(y.shape) == SHAPE
    # Aligned host buffers alias in every framework (JAX: see module docstring).
    assert data_pointer(y) == ptr
    np.testing.assert_array_equal(as_float64(y), out.astype(np.float64))


def test_export_to_jax_of_an_unaligned_buffer_copies_but_is_correct():
    jnp = _jnp()
    like = import_array(make("jax", "float32"), "q")
    raw = np.empty(np.prod(SHAPE) + 1, np.float32)
    # one float off a 64-byte boundary: XLA's CPU client copies such buffers
    start = 1 if raw.ctypes.data % 64 == 0 else 0
    out = raw[start:start + np.prod(SHAPE)].reshape(SHAPE)
    out[...] = _host()
    y = export_array(out, like=like)
    assert isinstance(y, type(jnp.zeros(1)))
    np.testing.assert_array_equal(np.asarray(y), out)


def test_numpy_round_trip_is_the_same_object():
    x = make("numpy", "float16")
    imp = import_array(x, "q")
    assert imp.array is x or imp.array.base is x
    assert export_array(imp.array, like=imp) is imp.array


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_zero_size_arrays_round_trip(framework):
    x = make(framework, "float32", shape=(0, 5, 3, 16))
    imp = import_array(x, "q")
    assert imp.array.shape == (0, 5, 3, 16)
    y = export_array(interop.empty((0, 3, 5), np.float32, CPU), like=imp)
    assert framework_name(y) == framework and tuple(y.shape) == (0, 3, 5)


def test_empty_is_64_byte_aligned():
    for shape in [(1,), (3, 5), (2, 7, 3, 8), (0, 4)]:
        for dtype in DTYPES:
            a = interop.empty(shape, dtype, CPU)
            assert a.shape == shape and a.dtype.name == dtype and a.flags.c_contiguous
            assert a.flags.writeable
            assert a.size == 0 or data_pointer(a) % interop.HOST_ALIGNMENT == 0


# -- strides: transposed views accepted without copy, last axis must be contiguous --------


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_transposed_bhsd_view_is_accepted_without_copy(framework):
    b, h, s, d = 2, 3, 5, 16
    bhsd = make(framework, "float16", shape=(b, h, s, d))
    q = bhsd.transpose(1, 2) if framework == "torch" else bhsd.transpose(0, 2, 1, 3)
    imp = import_array(q, "q")
    assert imp.array.shape == (b, s, h, d)
    assert interop.element_strides(imp.array) == (h * s * d, d, s * d, 1)
    assert data_pointer(imp.array) == data_pointer(bhsd)
    from cuflash import validate

    problem = validate.check_forward(imp, imp, imp, causal=True, softmax_scale=None)
    assert (problem.batch, problem.seqlen_q, problem.heads, problem.head_dim) == (b, s, h, d)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_non_contiguous_last_axis_is_rejected(framework):
    x = make(framework, "float32", shape=(2, 5, 3, 32))
    strided = x[..., ::2]
    with pytest.raises(ValueError, match=r"^v: the last axis must be contiguous"
                                         r".*strides \(480, 96, 32, 2\)"):
        import_array(strided, "v")
    swapped = x.transpose(2, 3) if framework == "torch" else x.swapaxes(2, 3)
    with pytest.raises(ValueError, match=r"^v: the last axis.*strides \(480, 96, 1, 32\)"):
        import_array(swapped, "v")


def test_unit_last_axis_and_broadcast_strides_are_fine():
    torch = _torch()
    x = torch.ones(2, 1, 3, 16).expand(2, 7, 3, 16)  # seqlen stride 0 (a broadcast)
    imp = import_array(x, "k")
    assert interop.element_strides(imp.array) == (48, 0, 16, 1)
    import_array(np.ones((2, 5, 3, 1), np.float32)[..., ::1], "k")


# -- namespace helpers ---------------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_xp_log_and_lse_stay_in_the_callers_framework(framework):
    from cuflash import SoftmaxStats

    like = import_array(make(framework, "float32"), "q")
    m_host = _host((2, 3, 5), seed=1)
    l_host = np.abs(_host((2, 3, 5), seed=2)) + 1.0
    m_host[0, 0, :2], l_host[0, 0, :2] = -np.inf, 0.0  # rows that saw no key
    m, l = export_array(m_host, like=like), export_array(l_host, like=like)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # log(0) must not warn
        lse = SoftmaxStats(m, l).lse
        log_l = interop.xp_log(l)
    assert framework_name(lse) == framework and framework_name(log_l) == framework
    with np.errstate(divide="ignore"):
        expect = m_host.astype(np.float64) + np.log(l_host.astype(np.float64))
    np.testing.assert_allclose(as_float64(lse), expect, rtol=1e-6)
    assert np.isneginf(as_float64(lse)[0, 0, :2]).all()


def test_array_namespace():
    assert interop.array_namespace(np.ones(2)) is np
    torch = _torch()
    assert interop.array_namespace(torch.ones(2)) is torch


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_data_pointer_matches_the_framework(framework):
    x = make(framework, "float32")
    expect = {"numpy": lambda a: a.ctypes.data,
              "torch": lambda a: a.data_ptr(),
              "jax": lambda a: a.unsafe_buffer_pointer()}[framework](x)
    assert data_pointer(x) == expect


def test_caller_stream_is_a_no_op_on_cpu():
    imp = import_array(make("numpy", "float32"), "q")
    with interop.caller_stream(imp):
        y = export_array(imp.array, like=imp)
    assert y is imp.array


# -- CUDA ----------------------------------------------------------------------------------


def _cuda(framework: str, dtype: str, shape=SHAPE, seed=0):
    host = _host(shape, dtype, seed)
    if framework == "cupy":
        import cupy

        return cupy.asarray(host)
    if framework == "torch":
        torch = _torch()
        return torch.from_numpy(host.astype(np.float32)).to("cuda").to(getattr(torch, dtype))
    jnp = _jnp()
    import jax

    gpu = jax.devices("gpu")[0]
    return jax.device_put(jnp.asarray(host.astype(np.float32), dtype=getattr(jnp, dtype)), gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("framework", ["cupy", "torch", "jax"])
def test_cuda_round_trip_zero_copy(framework, dtype):
    import cupy

    x = _cuda(framework, dtype)
    imp = import_array(x, "q")
    assert isinstance(imp.array, cupy.ndarray)
    assert imp.device == ("cuda", 0) and imp.is_cuda
    assert imp.array.dtype.name == dtype
    assert data_pointer(imp.array) == data_pointer(x)
    with interop.caller_stream(imp):
        out = imp.array * 2  # a result made on the caller's stream
        y = export_array(out, like=imp)
    assert framework_name(y) == framework and type(y) is type(x)
    assert data_pointer(y) == data_pointer(out)
    np.testing.assert_array_equal(cupy.asnumpy(out).astype(np.float64),
                                  2 * as_float64(_host(SHAPE, dtype)))


@pytest.mark.gpu
def test_caller_stream_uses_torchs_current_stream():
    import cupy

    torch = _torch()
    x = _cuda("torch", "float16")
    imp = import_array(x, "q")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        y = torch.randn(4096, 4096, device="cuda") @ torch.randn(4096, 4096, device="cuda")
        imp_side = import_array(y, "q")  # queued on `side`, still running
        with interop.caller_stream(imp_side):
            assert cupy.cuda.get_current_stream().ptr == side.cuda_stream
            total = imp_side.array.sum(dtype=np.float64)  # ordered after the matmul
            out = export_array(total.reshape(1), like=imp_side)
        assert torch.allclose(out, y.sum(dtype=torch.float64).reshape(1))
    with interop.caller_stream(imp):
        assert cupy.cuda.get_current_stream().ptr == torch.cuda.current_stream().cuda_stream


@pytest.mark.gpu
def test_cuda_transposed_view_zero_copy_and_strided_last_axis_rejected():
    torch = _torch()
    bhsd = _cuda("torch", "bfloat16", shape=(2, 3, 5, 16))
    imp = import_array(bhsd.transpose(1, 2), "q")
    assert data_pointer(imp.array) == bhsd.data_ptr()
    assert interop.element_strides(imp.array) == (240, 16, 80, 1)
    with pytest.raises(ValueError, match=r"^q: the last axis"):
        import_array(bhsd[..., ::2], "q")
    assert torch.cuda.is_available()

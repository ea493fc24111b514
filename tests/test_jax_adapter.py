"""cuflash.jax on the CPU backend: jax.grad against a jax.numpy reference, eager and jitted, vmap.

Under ``jax.jit`` cuflash runs as an XLA FFI custom call whose handler is a ctypes callback
(``cuflash.xla_ffi``); on the CPU backend the same call-frame decoding runs the NumPy path,
so these tests exercise the FFI plumbing (buffers, attributes, metadata query, errors) that
the CUDA target shares.

Truth is ``jax.vjp`` of a plain jax.numpy attention in float64 (jitted, under
``jax.enable_x64``). The noise floor is ``cuflash.reference``'s naive attention in the test
dtype (every intermediate rounded, as op-by-op autograd rounds; a jitted jax.numpy version in
bf16 would let XLA keep fused intermediates in float32, and an eager one compiles every
primitive, which is slow). The rule is ``err(ours) <= 2 * err(naive) + atol``.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

import cuflash.jax as cj  # noqa: E402
from cuflash import reference  # noqa: E402
from cuflash.reference import compare, default_atol  # noqa: E402

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="these tests cover the CPU backend")

DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}


def _jnp_attention(q, k, v, causal):
    """Textbook attention on (b, s, h, d) arrays in their own dtype; bottom-right causal."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    if causal:
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
        i, j = jnp.arange(seqlen_q)[:, None], jnp.arange(seqlen_k)[None, :]
        s = jnp.where(j <= i + (seqlen_k - seqlen_q), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(jnp.isnan(p), 0, p)  # rows that see no key: o = 0, as cuflash defines
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _value_and_grads(attention, q, k, v, do):
    o, vjp = jax.vjp(attention, q, k, v)
    return (o, *vjp(do))


def _inputs(shape, dtype, seed):
    batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim = shape
    rng = np.random.default_rng(seed)
    sizes = [(batch, seqlen_q, heads, head_dim), (batch, seqlen_k, heads_kv, head_dim),
             (batch, seqlen_k, heads_kv, head_dim), (batch, seqlen_q, heads, head_dim)]
    return [rng.standard_normal(s, dtype=np.float32).astype(dtype) for s in sizes]


@partial(jax.jit, static_argnums=4)
def _reference_value_and_grads(q, k, v, do, causal):
    return _value_and_grads(lambda q, k, v: _jnp_attention(q, k, v, causal), q, k, v, do)


def _truth(q, k, v, do, causal):
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, dtype=np.float64)) for x in (q, k, v, do)]
        return [np.asarray(x) for x in _reference_value_and_grads(*args, causal)]


def _naive(q, k, v, do, causal, dtype):
    q, k, v, do = (np.asarray(x) for x in (q, k, v, do))
    o = reference.attention_naive(q, k, v, causal=causal, dtype=dtype)
    return (o, *reference.attention_backward_naive(do, q, k, v, causal=causal, dtype=dtype))


def _check(ours, naive, truth, dtype):
    for name, got, nv, ref in zip(("o", "dq", "dk", "dv"), ours, naive, truth):
        assert got.dtype == dtype and got.shape == ref.shape
        # default_atol is for values of order 1; dK, dV sum over many rows and a GQA group
        atol = default_atol(dtype) * max(1.0, float(np.abs(ref).max(initial=0.0)))
        report = compare(name, np.asarray(got, np.float64), ref, np.asarray(nv, np.float64),
                         atol=atol)
        assert report.ok, str(report)


SHAPES = [  # (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim)
    pytest.param((2, 37, 37, 4, 4, 32), id="mha-37"),
    pytest.param((1, 45, 150, 4, 2, 24), id="gqa-45x150"),
    pytest.param((2, 70, 33, 2, 1, 16), id="mqa-70x33"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_jnp_reference(shape, causal, dtype, jit):
    dtype = DTYPES[dtype]
    q, k, v, do = (jnp.asarray(x) for x in _inputs(shape, dtype, seed=sum(shape) + causal))
    ours_fn = lambda q, k, v, do: _value_and_grads(  # noqa: E731
        lambda q, k, v: cj.flash_attention(q, k, v, causal=causal), q, k, v, do)
    if jit:
        ours_fn = jax.jit(ours_fn)
    ours = ours_fn(q, k, v, do)
    naive = _naive(q, k, v, do, causal, dtype)
    _check(ours, naive, _truth(q, k, v, do, causal), dtype)


HEAD_DIM_PAIRS = [  # (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim), head_dim_v
    pytest.param((1, 45, 33, 4, 2, 24), 16, id="24-16"),
    pytest.param((2, 20, 37, 2, 2, 59), 59, id="59-59"),
    pytest.param((1, 30, 30, 2, 1, 13), 40, id="13-40"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape, head_dim_v", HEAD_DIM_PAIRS)
def test_head_dims_the_kernels_lack(shape, head_dim_v, causal, jit):
    """head_dim not a multiple of 8, or v's own head_dim_v: eagerly through the API, under
    jit zero-padded in JAX (the targets take the kernels' widths), gradients included."""
    dtype = DTYPES["bf16"]
    rng = np.random.default_rng(sum(shape) + head_dim_v + causal)
    batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim = shape
    sizes = [(batch, seqlen_q, heads, head_dim), (batch, seqlen_k, heads_kv, head_dim),
             (batch, seqlen_k, heads_kv, head_dim_v), (batch, seqlen_q, heads, head_dim_v)]
    q, k, v, do = (jnp.asarray(rng.standard_normal(s, dtype=np.float32).astype(dtype))
                   for s in sizes)
    ours_fn = lambda q, k, v, do: _value_and_grads(  # noqa: E731
        lambda q, k, v: cj.flash_attention(q, k, v, causal=causal), q, k, v, do)
    if jit:
        ours_fn = jax.jit(ours_fn)
    ours = ours_fn(q, k, v, do)
    assert ours[0].shape == (batch, seqlen_q, heads, head_dim_v)
    _check(ours, _naive(q, k, v, do, causal, dtype), _truth(q, k, v, do, causal), dtype)


def test_jit_of_grad_of_scalar_loss_matches_eager():
    q, k, v, w = (jnp.asarray(x) for x in _inputs((2, 30, 41, 4, 2, 16), np.float32, seed=1))

    def loss(q, k, v):
        return jnp.sum(jnp.tanh(cj.flash_attention(q, k, v, causal=True, softmax_scale=0.3)) * w)

    eager = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    jitted = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_vmap_over_leading_axis(jit):
    """vmap of forward and grad equals a loop; q, k batched, v shared (broadcast_all)."""
    n = 3
    q, k, v, do = _inputs((2, 19, 26, 4, 2, 16), np.float32, seed=2)
    rng = np.random.default_rng(3)
    qs = jnp.asarray(q[None] * rng.uniform(0.5, 2, (n, 1, 1, 1, 1)).astype(np.float32))
    ks = jnp.asarray(k[None] + rng.standard_normal((n, *k.shape), dtype=np.float32))
    v, do = jnp.asarray(v), jnp.asarray(do)

    def one(q, k):
        return _value_and_grads(lambda q, k, v: cj.flash_attention(q, k, v, causal=True),
                                q, k, v, do)

    batched = jax.vmap(one)
    got = (jax.jit(batched) if jit else batched)(qs, ks)
    for i in range(n):
        want = one(qs[i], ks[i])
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_nested_vmap():
    q, k, v, _ = _inputs((1, 9, 9, 2, 2, 8), np.float32, seed=4)
    qs = jnp.asarray(np.stack([np.stack([q, 2 * q]), np.stack([-q, 0.5 * q])]))  # (2, 2, ...)
    got = jax.vmap(jax.vmap(lambda q: cj.flash_attention(q, k, v)))(qs)
    want = cj.flash_attention(qs[1, 0], k, v)
    np.testing.assert_allclose(np.asarray(got[1, 0]), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_trace_time_validation():
    q = jnp.zeros((1, 8, 4, 16), jnp.float32)
    kv = jnp.zeros((1, 8, 3, 16), jnp.float32)  # 4 query heads do not group over 3 kv heads
    with pytest.raises(ValueError, match="heads"):
        jax.jit(cj.flash_attention)(q, kv, kv)


def test_eager_output_is_a_jax_array():
    q, k, v, _ = _inputs((1, 9, 9, 2, 2, 8), np.float32, seed=5)
    o = cj.flash_attention(q, k, v)  # NumPy in: converted to JAX arrays first
    assert isinstance(o, jax.Array) and o.shape == q.shape and o.dtype == np.float32


# -- the XLA FFI plumbing (cuflash.xla_ffi), exercised on XLA:CPU ------------------------------


def test_jit_lowers_to_the_ffi_targets_not_a_host_callback():
    q = jnp.zeros((1, 8, 2, 16), jnp.float32)
    fn = jax.jit(jax.grad(lambda q: cj.flash_attention(q, q, q, causal=True).sum()))
    text = fn.lower(q).as_text()
    assert "cuflash_attention_fwd" in text and "cuflash_attention_bwd" in text
    assert "callback" not in text


def test_handler_error_is_raised_by_jax_and_the_process_goes_on():
    """A failure inside the handler comes back as an XLA error with the handler's message."""
    cj._register_targets()
    q = jnp.ones((1, 8, 4, 16), jnp.float32)
    kv = jnp.ones((1, 8, 3, 16), jnp.float32)  # heads 4 do not group over 3 kv heads
    specs = (jax.ShapeDtypeStruct(q.shape, q.dtype),
             *[jax.ShapeDtypeStruct((1, 4, 8), jnp.float32)] * 2)
    call = jax.ffi.ffi_call(cj._FORWARD_TARGET, specs, vmap_method="broadcast_all")
    with pytest.raises(Exception, match="cuflash_attention_fwd: ValueError: .*heads"):
        jax.block_until_ready(jax.jit(lambda q, kv: call(q, kv, kv, causal=False,
                                                         softmax_scale=np.float64(0.25)))(q, kv))
    o = jax.jit(cj.flash_attention)(q, q, q)  # still works
    assert np.isfinite(np.asarray(o)).all()


_SEEN = []


def _echo_target(call):
    """result = arg * scale + offset, recording what the handler decoded."""
    (x,), (out,) = call.args, call.rets
    _SEEN.append((x.dtype, x.shape, dict(call.attrs)))
    a, o = x.as_numpy(), out.as_numpy()
    o[...] = (a.astype(np.float64) * call.attrs["scale"] + call.attrs["offset"]).astype(o.dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_ffi_call_frame_decoding(dtype):
    from cuflash import xla_ffi

    xla_ffi.register("cuflash_test_echo", _echo_target, "cpu")
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    x = jnp.asarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4).astype(dtype))
    call = jax.ffi.ffi_call("cuflash_test_echo", jax.ShapeDtypeStruct(x.shape, x.dtype))
    _SEEN.clear()
    got = jax.jit(lambda x: call(x, scale=np.float32(0.5), offset=np.int64(3), flag=True))(x)
    np.testing.assert_array_equal(np.asarray(got, np.float64),
                                  np.asarray(x, np.float64) * 0.5 + 3)
    assert _SEEN == [(dtype, (2, 3, 4), {"flag": True, "offset": 3, "scale": 0.5})]


def test_zero_size_buffers_under_jit():
    q = jnp.ones((1, 5, 2, 8), jnp.float32)
    empty = jnp.ones((1, 0, 2, 8), jnp.float32)  # seqlen_k = 0: o = 0, zero gradients
    fn = jax.jit(jax.value_and_grad(lambda q, k: cj.flash_attention(q, k, k).sum(),
                                    argnums=(0, 1)))
    value, (dq, dk) = fn(q, empty)
    assert float(value) == 0 and not np.asarray(dq).any() and dk.shape == empty.shape
    assert jax.jit(cj.flash_attention)(q[:0], q[:0], q[:0]).shape == (0, 5, 2, 8)


def test_inside_lax_scan():
    xs = jnp.asarray(np.random.default_rng(6).standard_normal((3, 1, 7, 2, 8), dtype=np.float32))
    total = jax.jit(lambda xs: jax.lax.scan(
        lambda c, x: (c + cj.flash_attention(x, x, x).sum(), None), 0.0, xs)[0])(xs)
    want = sum(float(cj.flash_attention(x, x, x).sum()) for x in xs)
    np.testing.assert_allclose(float(total), want, rtol=1e-5)


def test_xla_api_calls_from_the_handler():
    """The handler calls XLA's API through function pointers (as the CUDA target does for its
    stream). XLA:CPU has no stream: XLA_FFI_Stream_Get returns an error, which we read,
    destroy and raise, with XLA's message."""
    from cuflash import xla_ffi

    seen = []

    def stream_probe(call):
        try:
            call.stream()
        except xla_ffi.FfiCallError as exc:
            seen.append(str(exc))
        call.rets[0].as_numpy()[...] = call.args[0].as_numpy()

    xla_ffi.register("cuflash_test_stream_probe", stream_probe, "cpu")
    x = jnp.arange(4.0, dtype=jnp.float32)
    call = jax.ffi.ffi_call("cuflash_test_stream_probe", jax.ShapeDtypeStruct(x.shape, x.dtype))
    np.testing.assert_array_equal(np.asarray(jax.jit(call)(x)), np.asarray(x))
    assert len(seen) == 1 and seen[0].startswith("XLA_FFI_Stream_Get: ") and len(seen[0]) > 20

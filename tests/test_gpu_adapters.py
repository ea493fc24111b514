"""The framework adapters on a CUDA GPU (``gpu`` tests; skipped cleanly without one).

cuflash.torch: autograd against cuflash.reference in bf16 and fp32, ``torch.library.opcheck``
on CUDA tensors, ``torch.compile(fullgraph=True)`` forward and backward, and the forward and
backward launched on a non-default stream behind a long chain of matmuls.
cuflash.jax: eager forward and ``jax.grad`` on GPU arrays in bf16; under ``jax.jit`` (the
XLA FFI custom call on XLA's stream): forward and VJP in bf16 and fp32, ``jax.jit(jax.grad)``
against a jax.numpy reference, a call queued behind a long chain of XLA matmuls (a launch on
the wrong stream would read stale inputs), and ``jax.vmap`` under jit.

Judged by FlashAttention's rule against the float64 NumPy reference
(``err <= 2 * err(naive same dtype) + atol``, atol scaled by the reference's magnitude).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from cuflash import reference

pytestmark = pytest.mark.gpu

# JAX takes 75% of GPU memory at its first GPU call unless told otherwise; torch and CuPy
# share the device in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

SHAPE = (2, 150, 173, 4, 2, 64)  # batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim


def _np_inputs(shape, seed):
    batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim = shape
    rng = np.random.default_rng(seed)
    sizes = [(batch, seqlen_q, heads, head_dim), (batch, seqlen_k, heads_kv, head_dim),
             (batch, seqlen_k, heads_kv, head_dim), (batch, seqlen_q, heads, head_dim)]
    return [rng.standard_normal(s, dtype=np.float32) for s in sizes]


def _round(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return x.astype(dtype).astype(np.float32)


def _check_against_reference(got, q, k, v, do, causal, dtype):
    """got: (o, dq, dk, dv) as float64 NumPy; q, k, v, do: float32 NumPy already rounded."""
    o_ref = reference.attention_reference(q, k, v, causal=causal)
    o_ref = o_ref[0] if isinstance(o_ref, tuple) else o_ref
    truth = (o_ref, *reference.attention_backward_reference(do, q, k, v, causal=causal))
    naive = (reference.attention_naive(q, k, v, causal=causal, dtype=dtype),
             *reference.attention_backward_naive(do, q, k, v, causal=causal, dtype=dtype))
    for name, g, ref, nv in zip(("o", "dq", "dk", "dv"), got, truth, naive):
        ref = np.asarray(ref, np.float64)
        atol = reference.default_atol(dtype) * max(1.0, float(np.abs(ref).max(initial=0)))
        report = reference.compare(name, g, ref, np.asarray(nv, np.float64), atol=atol)
        assert report.ok, str(report)


# -- torch -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch was built without CUDA or sees no GPU")
    import cuflash.torch  # noqa: F401  (registers the ops)

    return torch


def _torch_inputs(torch, dtype, seed, shape=SHAPE):
    arrays = _np_inputs(shape, seed)
    return [torch.from_numpy(a).to("cuda", dtype) for a in arrays]


def _torch_grads(torch, fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return o, q.grad, k.grad, v.grad


def _torch_host(torch, ts):
    return [t.detach().to(torch.float64).cpu().numpy() for t in ts]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_torch_autograd_cuda(torch_cuda, dtype, causal):
    import ml_dtypes

    import cuflash.torch as ct

    torch = torch_cuda
    tdtype = getattr(torch, dtype)
    q, k, v, do = _torch_inputs(torch, tdtype, seed=1)
    got = _torch_grads(torch, lambda q, k, v: ct.flash_attention(q, k, v, causal=causal),
                       q, k, v, do)
    assert all(t.is_cuda and t.dtype == tdtype for t in got)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    host = [t.float().cpu().numpy() for t in (q, k, v, do)]  # exactly the rounded inputs
    _check_against_reference(_torch_host(torch, got), *host, causal, np_dtype)


def test_torch_opcheck_cuda(torch_cuda):
    torch = torch_cuda
    q, k, v, do = _torch_inputs(torch, torch.bfloat16, seed=2, shape=(1, 40, 56, 4, 2, 64))
    torch.library.opcheck(torch.ops.cuflash.flash_fwd.default, (q, k, v, True, 0.125))
    o, m, l = torch.ops.cuflash.flash_fwd(q, k, v, True, 0.125)
    torch.library.opcheck(torch.ops.cuflash.flash_bwd.default,
                          (do, q, k, v, o, m, l, True, 0.125, False))


def test_torch_compile_fullgraph_cuda(torch_cuda):
    import cuflash.torch as ct

    torch = torch_cuda
    torch._dynamo.reset()
    q, k, v, do = _torch_inputs(torch, torch.bfloat16, seed=3)
    w = torch.nn.Linear(64, 64, device="cuda", dtype=torch.bfloat16)

    def block(q, k, v):
        return w(ct.flash_attention(q, k, v, causal=True)).float()

    eager = _torch_grads(torch, block, q, k, v, do.float())
    compiled = _torch_grads(torch, torch.compile(block, fullgraph=True), q, k, v, do.float())
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_torch_non_default_stream_forward_and_backward(torch_cuda):
    """Forward and backward queued behind ~100 ms of matmuls on a non-blocking stream.

    If either launch went to another stream, it would read q before ``copy_`` wrote it (or
    run before the forward that produced o, m, l), and the result would be wrong.
    """
    import cuflash.torch as ct

    torch = torch_cuda
    q_old, k, v, do = _torch_inputs(torch, torch.bfloat16, seed=4)
    q_final = _torch_inputs(torch, torch.bfloat16, seed=5)[0]
    a = torch.randn(4096, 4096, device="cuda") / 64
    ct.flash_attention(q_old, k, v)  # compile and load outside the timed window
    (a @ a).sum()
    torch.cuda.synchronize()

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = a
        for _ in range(40):
            x = a @ x
        q = q_old.clone()
        q.copy_(q_final)
        q.requires_grad_(True)
        kk, vv = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
        o = ct.flash_attention(q, kk, vv, causal=True)
        o.backward(do)
    stream.synchronize()
    import ml_dtypes

    host = [t.float().cpu().numpy() for t in (q_final, k, v, do)]
    got = _torch_host(torch, (o, q.grad, kk.grad, vv.grad))
    _check_against_reference(got, *host, True, np.dtype(ml_dtypes.bfloat16))


# -- jax ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jax_gpu():
    jax = pytest.importorskip("jax")
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError as exc:
        pytest.skip(f"JAX sees no GPU ({exc})")
    return jax, device


def test_jax_eager_grad_bf16_gpu(jax_gpu):
    import jax.numpy as jnp
    import ml_dtypes

    import cuflash.jax as cj

    jax, device = jax_gpu
    bf16 = np.dtype(ml_dtypes.bfloat16)
    host = [_round(a, bf16) for a in _np_inputs(SHAPE, seed=6)]
    q, k, v, do = (jax.device_put(a.astype(bf16), device) for a in host)
    o, vjp = jax.vjp(lambda q, k, v: cj.flash_attention(q, k, v, causal=True), q, k, v)
    dq, dk, dv = vjp(do)
    for x in (o, dq, dk, dv):
        assert x.dtype == jnp.bfloat16 and list(x.devices())[0] == device
    got = [np.asarray(x).astype(np.float64) for x in (o, dq, dk, dv)]
    _check_against_reference(got, *host, True, bf16)


def _jax_gpu_inputs(jax, device, dtype, seed, shape=SHAPE):
    """Host float32 copies (exactly the rounded values) and the device arrays."""
    host = [_round(a, dtype) for a in _np_inputs(shape, seed)]
    return host, [jax.device_put(a.astype(dtype), device) for a in host]


def _jax_forward_and_vjp(jax, causal):
    """(q, k, v, do) -> (o, dq, dk, dv) through cuflash.jax.flash_attention."""
    import cuflash.jax as cj

    def run(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: cj.flash_attention(q, k, v, causal=causal), q, k, v)
        return (o, *vjp(do))

    return run


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_jax_jit_forward_and_vjp_gpu(jax_gpu, dtype, causal, monkeypatch):
    import ml_dtypes

    monkeypatch.setenv("CUFLASH_POISON", "1")  # XLA's result buffers start as NaN
    jax, device = jax_gpu
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    host, (q, k, v, do) = _jax_gpu_inputs(jax, device, np_dtype, seed=7)
    fn = jax.jit(_jax_forward_and_vjp(jax, causal))
    assert "cuflash_attention_bwd" in fn.lower(q, k, v, do).as_text()
    got = fn(q, k, v, do)
    for x in got:
        assert x.dtype == np_dtype and list(x.devices())[0] == device
    _check_against_reference([np.asarray(x).astype(np.float64) for x in got], *host, causal,
                             np_dtype)


def _jnp_attention(q, k, v, causal):
    """Textbook attention on (b, s, h, d) in q's dtype; bottom-right causal (as cuflash)."""
    import jax
    import jax.numpy as jnp

    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]).astype(q.dtype)
    if causal:
        i, j = np.arange(q.shape[1])[:, None], np.arange(k.shape[1])[None, :]
        s = jnp.where(j <= i + (k.shape[1] - q.shape[1]), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(jnp.isnan(p), 0, p), v)


def test_jax_jit_grad_matches_jnp_reference_gpu(jax_gpu):
    """jax.jit(jax.grad(loss)) through cuflash vs the same loss through jax.numpy attention.

    Truth: the jax.numpy loss in float64 on the GPU; noise floor: the jax.numpy loss in float32
    at HIGHEST matmul precision (XLA's default for float32 on GPU would be TF32).
    """
    import jax.numpy as jnp

    import cuflash.jax as cj

    jax, device = jax_gpu
    host, (q, k, v, w) = _jax_gpu_inputs(jax, device, np.dtype(np.float32), seed=8)

    def grads(attention):
        loss = lambda q, k, v, w: jnp.sum(jnp.tanh(attention(q, k, v)) * w)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    ours = grads(lambda q, k, v: cj.flash_attention(q, k, v, causal=True))(q, k, v, w)
    reference_grads = grads(lambda q, k, v: _jnp_attention(q, k, v, True))
    with jax.default_matmul_precision("highest"):
        naive = reference_grads(q, k, v, w)
    with jax.enable_x64(True):
        truth = [np.asarray(t) for t in reference_grads(
            *(jax.device_put(a.astype(np.float64), device) for a in host))]
    for name, got, nv, ref in zip(("dq", "dk", "dv"), ours, naive, truth):
        assert got.dtype == np.float32 and list(got.devices())[0] == device
        atol = reference.default_atol(np.dtype(np.float32)) * max(1.0, float(np.abs(ref).max()))
        report = reference.compare(name, np.asarray(got, np.float64), ref,
                                   np.asarray(nv, np.float64), atol=atol)
        assert report.ok, str(report)


def test_jax_jit_after_long_xla_work_uses_xla_stream(jax_gpu):
    """Forward and backward inside one jitted function, behind ~100 ms of XLA matmuls.

    q reaches cuflash only through an op that waits for the whole matmul chain
    (``where(isnan(x.sum()), nan, q)``, x finite), so the custom call must run on XLA's stream
    after it. Launched on any other stream, the kernels would read that buffer before XLA
    wrote it, holding the previous call's q (``q_old``), and the results would be wrong.
    """
    import jax.numpy as jnp
    import ml_dtypes

    jax, device = jax_gpu
    bf16 = np.dtype(ml_dtypes.bfloat16)
    host_old, (q_old, k, v, do) = _jax_gpu_inputs(jax, device, bf16, seed=9)
    host, (q_final, *_) = _jax_gpu_inputs(jax, device, bf16, seed=10)
    a = jax.device_put(np.random.default_rng(11).standard_normal((4096, 4096), np.float32)
                       / 64, device)

    @jax.jit
    def chained(a, q, k, v, do):
        x = a
        for _ in range(40):
            x = jnp.matmul(a, x, precision=jax.lax.Precision.HIGHEST)
        q = jnp.where(jnp.isnan(x.sum()), jnp.nan, q).astype(q.dtype)
        return _jax_forward_and_vjp(jax, True)(q, k, v, do)

    jax.block_until_ready(chained(a, q_old, k, v, do))  # compile, load, leave q_old behind
    got = chained(a, q_final, k, v, do)
    _check_against_reference([np.asarray(x).astype(np.float64) for x in got],
                             host[0], *host_old[1:], True, bf16)


def test_jax_vmap_under_jit_gpu(jax_gpu):
    """jit(vmap(forward + vjp)) over a leading axis equals a loop of jitted calls."""
    import jax.numpy as jnp

    jax, device = jax_gpu
    shape = (2, 70, 90, 4, 2, 64)
    _, (q, k, v, do) = _jax_gpu_inputs(jax, device, np.dtype(np.float32), seed=12, shape=shape)
    scales = jnp.asarray([0.5, 1.0, 2.0], jnp.float32)
    qs = scales[:, None, None, None, None] * q[None]  # batched q; k, v, do shared
    one = jax.jit(_jax_forward_and_vjp(jax, True))
    batched = jax.vmap(_jax_forward_and_vjp(jax, True), in_axes=(0, None, None, None))
    got = jax.jit(batched)(qs, k, v, do)
    for i in range(len(scales)):
        for a, b in zip(got, one(qs[i], k, v, do)):
            # dQ accumulates with atomics: the order of float32 additions may differ
            np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-5, atol=1e-5)

"""The framework adapters on a CUDA GPU (``gpu`` tests; skipped cleanly without one).

cuflash.torch: autograd against cuflash.reference in bf16 and fp32, ``torch.library.opcheck``
on CUDA tensors, ``torch.compile(fullgraph=True)`` forward and backward, and the forward and
backward launched on a non-default stream behind a long chain of matmuls.
cuflash.jax: eager forward and ``jax.grad`` on GPU arrays in bf16, and the documented
``NotImplementedError`` when traced (``jax.jit``) for the GPU backend.

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


def test_jax_jit_on_gpu_is_not_implemented(jax_gpu):
    import cuflash.jax as cj

    jax, device = jax_gpu
    if jax.default_backend() == "cpu":
        pytest.skip("JAX's default backend is the CPU")
    q = jax.device_put(np.ones((1, 16, 2, 64), np.float32), device)
    with pytest.raises(NotImplementedError, match="XLA FFI"):
        jax.jit(cj.flash_attention)(q, q, q)
    with pytest.raises(NotImplementedError, match="XLA FFI"):
        jax.jit(jax.grad(lambda q: cj.flash_attention(q, q, q).sum()))(q)

"""cuflash.jax.flash_attention with score modifiers on a CUDA GPU (``gpu`` tests; skipped
without a GPU or a CUDA-enabled JAX).

Eagerly (the API on JAX GPU arrays) and under ``jax.jit`` (the XLA FFI targets of
``cuflash.jax_modifiers`` on XLA's stream, writing into XLA's buffers; backward scratch from
XLA): forward and VJP, sinks' gradient included, in fp16, bf16 and fp32 against the float64
reference with tests/test_gpu_modifiers.py's rule; vmap (leading axes folded into the
batch without sinks, one call per entry with sinks) against a loop; rows without keys.
Outputs are NaN-poisoned (CUFLASH_POISON=1).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from cuflash import jax_modifiers, reference, testing

try:
    import gpu_helpers as gh
    from test_gpu_modifiers import CASES, _few_keys, _inputs, _judge
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh
    from tests.test_gpu_modifiers import CASES, _few_keys, _inputs, _judge

pytestmark = pytest.mark.gpu

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.fixture(scope="module", autouse=True)
def gpu_env():
    yield from gh.gpu_module_env()


@pytest.fixture(scope="module")
def jax_gpu():
    import jax

    return jax, gh.jax_gpu_device()


def _forward_and_vjp(jax, causal, mods, sinks: bool, deterministic: bool = False):
    """(q, k, v, do, slopes, sinks) -> (o, dq, dk, dv[, dsinks]) through cuflash.jax."""
    import cuflash.jax as cj

    kw = dict(causal=causal, window=mods.get("window"), softcap=mods.get("softcap"),
              deterministic=deterministic)

    def run(q, k, v, do, slopes, sink):
        if not sinks:
            o, vjp = jax.vjp(lambda q, k, v: cj.flash_attention(
                q, k, v, alibi_slopes=slopes, **kw), q, k, v)
        else:
            o, vjp = jax.vjp(lambda q, k, v, s: cj.flash_attention(
                q, k, v, alibi_slopes=slopes, sinks=s, **kw), q, k, v, sink)
        return (o, *vjp(do))

    return run


def _device_args(jax, device, q, k, v, do, mods):
    put = lambda x: None if x is None else jax.device_put(x, device)  # noqa: E731
    return [put(x) for x in (q, k, v, do, mods.get("alibi_slopes"), mods.get("sinks"))]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(97, 203), (203, 97)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_jax_modifiers_match_reference_gpu(jax_gpu, case, dtype, seqlen_q, seqlen_k, jit):
    jax, device = jax_gpu
    rng = gh.rng_for()
    q, k, v, do, causal, mods = _inputs(rng, case, dtype, seqlen_q, seqlen_k)
    label = f"jax {'jit' if jit else 'eager'} {case[0]} {gh.describe(q, k, dtype, causal, None)}"
    fn = _forward_and_vjp(jax, causal, mods, "sinks" in mods)
    args = _device_args(jax, device, q, k, v, do, mods)
    if jit:
        fn = jax.jit(fn)
        assert jax_modifiers.BACKWARD_TARGET in fn.lower(*args).as_text()
    got = fn(*args)
    for x in got[:4]:
        assert list(x.devices())[0] == device
    o_host = gh.to_host(got[0], dtype)
    o_ref = reference.attention_reference(q, k, v, causal=causal, **mods)[0]
    o_nv = reference.attention_naive(q, k, v, causal=causal, dtype=gh.np_dtype(dtype), **mods)
    gh.assert_matches_reference("o", o_host, o_ref, o_nv, dtype=dtype, label=label)
    refs = reference.attention_backward_reference(do, q, k, v, causal=causal, o=o_host, **mods)
    naives = reference.attention_backward_naive(do, q, k, v, causal=causal,
                                                dtype=gh.np_dtype(dtype), **mods)
    assert len(got) - 1 == len(refs), label
    few = _few_keys(seqlen_q, seqlen_k, causal, mods["window"])
    scale = testing.magnitude(*refs[:3])
    for name, g, ref, naive in zip(("dq", "dk", "dv", "dsinks"), got[1:], refs, naives):
        host = gh.to_host(g) if name == "dsinks" else gh.to_host(g, dtype)
        s = testing.magnitude(ref) if name == "dsinks" else scale
        _judge(f"{name} [{label}]", host, ref, naive, dtype, s, few)


@pytest.mark.parametrize("case", [CASES[-1], CASES[7]], ids=["all", "alibi_batch"])
def test_jax_vmap_with_modifiers_gpu(jax_gpu, case):
    """jit(vmap) equals a loop of jitted calls: with sinks each vmapped entry runs as its own
    call (own sinks, dsinks, scratch), without them the entries fold into the batch."""
    jax, device = jax_gpu
    import jax.numpy as jnp

    rng = gh.rng_for()
    n = 3
    q, k, v, do, causal, mods = _inputs(rng, case, "float32", 77, 130)
    sinks = "sinks" in mods
    fn = _forward_and_vjp(jax, causal, mods, sinks, deterministic=True)
    args = _device_args(jax, device, q, k, v, do, mods)
    scales = jnp.asarray([1.0, 0.5, 2.0], jnp.float32)
    qs = args[0][None] * scales[:, None, None, None, None]
    extra = [None if x is None else jnp.stack([x * s for s in (1.0, 2.0, 0.5)])
             for x in args[4:]]
    in_axes = (0, None, None, None) + tuple(None if x is None else 0 for x in extra)
    got = jax.jit(jax.vmap(fn, in_axes=in_axes))(qs, *args[1:4], *extra)
    single = jax.jit(fn)
    for i in range(n):
        want = single(qs[i], *args[1:4], *(None if x is None else x[i] for x in extra))
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=2e-5, atol=2e-5)


def test_jax_no_keys_with_sinks_gpu(jax_gpu):
    """seqlen_k == 0 under jit: o = 0, zero gradients and dsinks, never NaN (poisoned)."""
    jax, device = jax_gpu
    import jax.numpy as jnp

    import cuflash.jax as cj

    q = jax.device_put(np.random.default_rng().standard_normal((2, 9, 4, 64), np.float32)
                       .astype(gh.np_dtype("bfloat16")), device)
    kv = jax.device_put(np.zeros((2, 0, 2, 64), gh.np_dtype("bfloat16")), device)
    sink = jax.device_put(np.float32([0.5, -1.0, 2.0, 0.0]), device)
    f = jax.jit(jax.value_and_grad(
        lambda q, s: jnp.sum(cj.flash_attention(q, kv, kv, sinks=s, window=(4, 4))
                             .astype(jnp.float32)), argnums=(0, 1)))
    value, (dq, dsinks) = f(q, sink)
    assert float(value) == 0.0
    assert not np.asarray(dq.astype(jnp.float32)).any() and not np.asarray(dsinks).any()

"""Dropout through cuflash.jax.flash_attention on a CUDA GPU (``gpu`` tests; skipped without
a GPU or a CUDA-enabled JAX): a JAX PRNG key's words (``dropout_words``) as the Philox seed
and offset, eagerly (the API on JAX GPU arrays) and under ``jax.jit`` (the XLA FFI targets
of ``cuflash.jax_modifiers``, the words an operand read back on XLA's stream).

Forward and VJP against the float64 reference given the key's mask, fp16 / bf16, causal or
not, GQA; jit equals eager bit for bit; vmap over keys equals a loop. Outputs are
NaN-poisoned (CUFLASH_POISON=1). The CPU backend: tests/test_jax_dropout.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from cuflash import jax_modifiers, reference, testing

try:
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

P = 0.2


def _module_specs():
    """The d64 dropout kernels the jitted calls run, reading the key's words from XLA's
    buffer (specs.with_device_rng), fp16 / bf16, causal or not, GQA."""
    from cuflash import config, launch, plan, specs

    facts, out = launch.device_facts(0), []
    for dtype in ("float16", "bfloat16"):
        for causal in (False, True):
            shape = plan.Shape(1, 1, 1, 1, 1, 64, dtype, causal, specs.ModFlags(dropout=True))
            out += [specs.with_device_rng(s) for s in gh.shape_specs(shape, facts,
                                                                      config.Config())]
    return out


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


@pytest.fixture(scope="module")
def jax_gpu():
    import jax

    return jax, gh.jax_gpu_device()


def _forward_and_vjp(jax, causal):
    import cuflash.jax as cj

    def run(q, k, v, do, key):
        o, vjp = jax.vjp(lambda q, k, v: cj.flash_attention(
            q, k, v, causal=causal, dropout_p=P, dropout_key=key), q, k, v)
        return (o, *vjp(do))

    return run


def _inputs(rng, dtype, seqlen_q, seqlen_k, heads=4, heads_kv=2, head_dim=64, batch=2):
    sizes = [(batch, seqlen_q, heads, head_dim), (batch, seqlen_k, heads_kv, head_dim),
             (batch, seqlen_k, heads_kv, head_dim), (batch, seqlen_q, heads, head_dim)]
    return [rng.standard_normal(s, dtype=np.float32).astype(gh.np_dtype(dtype)) for s in sizes]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_jax_dropout_matches_reference_gpu(jax_gpu, dtype, causal, jit):
    jax, device = jax_gpu
    import cuflash.jax as cj

    rng = gh.rng_for()
    q, k, v, do = _inputs(rng, dtype, 97, 203)
    key = jax.random.key(int(rng.integers(1 << 31)))
    fn = _forward_and_vjp(jax, causal)
    args = [jax.device_put(x, device) for x in (q, k, v, do)]
    if jit:
        fn = jax.jit(fn)
        assert jax_modifiers.FORWARD_TARGET in fn.lower(*args, key).as_text()
    got = fn(*args, key)
    seed, offset = cj.dropout_seed_offset(key)
    drop = dict(causal=causal, dropout_p=P, dropout_seed=seed, dropout_offset=offset)
    label = f"jax {'jit' if jit else 'eager'} dropout {gh.describe(q, k, dtype, causal, None)}"
    o_host = gh.to_host(got[0], dtype)
    o_ref = reference.attention_reference(q, k, v, **drop)[0]
    o_nv = reference.attention_naive(q, k, v, dtype=gh.np_dtype(dtype), **drop)
    gh.assert_matches_reference("o", o_host, o_ref, o_nv, dtype=dtype, label=label)
    refs = reference.attention_backward_reference(do, q, k, v, o=o_host, **drop)
    naives = reference.attention_backward_naive(do, q, k, v, dtype=gh.np_dtype(dtype), **drop)
    scale = testing.magnitude(*refs[:3])
    for name, g, ref, naive in zip(("dq", "dk", "dv"), got[1:], refs, naives):
        gh.assert_matches_reference(name, gh.to_host(g, dtype), ref, naive, dtype=dtype,
                                    label=label, scale=scale)


def test_jax_dropout_jit_equals_eager_and_vmap_a_loop_gpu(jax_gpu):
    jax, device = jax_gpu

    rng = gh.rng_for()
    q, k, v, do = _inputs(rng, "bfloat16", 130, 77)
    args = [jax.device_put(x, device) for x in (q, k, v, do)]
    fn = _forward_and_vjp(jax, True)
    key = jax.random.key(5)
    eager, jitted = fn(*args, key), jax.jit(fn)(*args, key)
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    keys = jax.random.split(key, 3)
    batched = jax.jit(jax.vmap(fn, in_axes=(None, None, None, None, 0)))(*args, keys)
    for i in range(3):
        for a, b in zip(batched, jax.jit(fn)(*args, keys[i])):
            np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b))
    assert not np.array_equal(np.asarray(batched[0][0]), np.asarray(batched[0][1]))

"""Dropout through cuflash.jax.flash_attention (docs/dropout.md) on the CPU backend: a JAX
PRNG key supplies the Philox seed and offset (``dropout_words``), eagerly and under jax.jit
(the XLA FFI targets of ``cuflash.jax_modifiers``, with the words as an operand).

* Values and gradients against the float64 reference given the mask of the key's seed and
  offset (``dropout_seed_offset``), alone and with modifiers, a block mask and GQA.
* The same key reproduces bit for bit, eager or jitted; another key draws another mask.
* vmap over keys equals a loop of single calls (each entry runs as its own call).
* Bad keys raise naming dropout_key. CUDA: tests/test_gpu_jax_dropout.py.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

import cuflash.jax as cj  # noqa: E402
from cuflash import philox, reference, testing  # noqa: E402
from test_jax_adapter import _inputs  # noqa: E402  (q, k, v, do of a shape)

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="these tests cover the CPU backend")

P = 0.3


def _run(q, k, v, do, key, *, jit, **kw):
    """(o, dq, dk, dv) through cuflash.jax.flash_attention with dropout and jax.vjp."""

    def forward_and_vjp(q, k, v, do, key):
        o, vjp = jax.vjp(lambda q, k, v: cj.flash_attention(
            q, k, v, dropout_p=P, dropout_key=key, **kw), q, k, v)
        return (o, *vjp(do))

    fn = jax.jit(forward_and_vjp) if jit else forward_and_vjp
    return [np.asarray(x) for x in fn(*(jnp.asarray(x) for x in (q, k, v, do)), key)]


def _check(got, q, k, v, do, key, dtype, **kw):
    seed, offset = cj.dropout_seed_offset(key)
    drop = dict(dropout_p=P, dropout_seed=seed, dropout_offset=offset, **kw)
    o_ref = reference.attention_reference(q, k, v, **drop)[0]
    o_naive = reference.attention_naive(q, k, v, dtype=dtype, **drop)
    report = testing.judge("o", got[0], o_ref, o_naive, dtype=np.dtype(dtype).name)
    assert report.ok, str(report)
    refs = reference.attention_backward_reference(do, q, k, v, o=got[0], **drop)
    naives = reference.attention_backward_naive(do, q, k, v, dtype=dtype, **drop)
    scale = testing.magnitude(*refs[:3])
    for name, g, ref, naive in zip(("dq", "dk", "dv"), got[1:], refs, naives):
        report = testing.judge(name, g, ref, naive, dtype=np.dtype(dtype).name, scale=scale)
        assert report.ok, str(report)


CASES = [  # (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim), keyword arguments
    ((2, 37, 53, 4, 2, 32), dict(causal=False)),
    ((2, 41, 29, 4, 4, 16), dict(causal=True)),  # rows that see no key: o = 0
    ((1, 33, 33, 4, 1, 24), dict(causal=True, window=(9, 0), softcap=3.0)),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("shape, kw", CASES)
def test_values_and_gradients_match_the_reference(shape, kw, jit):
    q, k, v, do = _inputs(shape, np.float32, seed=sum(shape))
    key = jax.random.key(sum(shape))
    _check(_run(q, k, v, do, key, jit=jit, **kw), q, k, v, do, key, np.float32, **kw)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bfloat16_with_sinks_and_a_block_mask(jit):
    shape = (1, 40, 70, 2, 1, 16)
    q, k, v, do = _inputs(shape, ml_dtypes.bfloat16, seed=4)
    sinks = np.float32([0.5, -1.0])
    mask = np.array([[[[True, False, True]]]])  # (1, 1, 1 query block, 3 key blocks)
    kw = dict(causal=False, block_mask=mask, block_size=(64, 32))
    key = jax.random.key(8)

    def forward_and_vjp(q, k, v, do, s, key):
        o, vjp = jax.vjp(lambda q, k, v, s: cj.flash_attention(
            q, k, v, sinks=s, dropout_p=P, dropout_key=key, **kw), q, k, v, s)
        return (o, *vjp(do))

    fn = jax.jit(forward_and_vjp) if jit else forward_and_vjp
    got = [np.asarray(x) for x in fn(*(jnp.asarray(x) for x in (q, k, v, do, sinks)), key)]
    seed, offset = cj.dropout_seed_offset(key)
    drop = dict(dropout_p=P, dropout_seed=seed, dropout_offset=offset, sinks=sinks, **kw)
    dtype = ml_dtypes.bfloat16
    o_ref = reference.attention_reference(q, k, v, **drop)[0]
    report = testing.judge("o", got[0], o_ref, reference.attention_naive(q, k, v, dtype=dtype,
                                                                          **drop),
                           dtype="bfloat16")
    assert report.ok, str(report)
    refs = reference.attention_backward_reference(do, q, k, v, o=got[0], **drop)
    naives = reference.attention_backward_naive(do, q, k, v, dtype=dtype, **drop)
    scale = testing.magnitude(*refs[:3])
    for name, g, ref, naive in zip(("dq", "dk", "dv", "dsinks"), got[1:], refs, naives):
        s = testing.magnitude(ref) if name == "dsinks" else scale
        report = testing.judge(name, g, ref, naive,
                               dtype="float32" if name == "dsinks" else "bfloat16", scale=s)
        assert report.ok, str(report)


def test_the_key_reproduces_and_another_key_differs():
    q, k, v, do = _inputs((2, 29, 31, 4, 2, 16), np.float32, seed=1)
    key = jax.random.key(3)
    eager = _run(q, k, v, do, key, jit=False)
    jitted = _run(q, k, v, do, key, jit=True)
    again = _run(q, k, v, do, jax.random.key(3), jit=True)
    for a, b, c in zip(eager, jitted, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, c)
    other = _run(q, k, v, do, jax.random.split(key)[0], jit=True)
    assert not np.array_equal(other[0], eager[0])


def test_the_words_are_the_seed_and_offset_of_the_mask():
    """Without dropout's scale, o of v = identity columns reads the kept mask row by row."""
    key = jax.random.key(21)
    words = np.asarray(cj.dropout_words(key))
    seed, offset = cj.dropout_seed_offset(key)
    assert words.dtype == np.uint32 and words.shape == (3,)
    assert (seed, offset) == (int(words[0]) | int(words[1]) << 32, int(words[2]))
    legacy = jax.random.PRNGKey(21)  # a legacy uint32 (2,) key: its own three words
    lo, hi, off = (int(w) for w in np.asarray(jax.random.bits(legacy, (3,), jnp.uint32)))
    assert cj.dropout_seed_offset(legacy) == (lo | hi << 32, off)
    mask = philox.dropout_mask(1, 1, 16, 16, dropout_p=P, seed=seed, offset=offset)
    q = np.zeros((1, 16, 1, 16), np.float32)  # equal scores: P = 1 / 16 everywhere
    v = np.eye(16, dtype=np.float32)[None, :, None, :]
    o = np.asarray(cj.flash_attention(q, q, v, dropout_p=P, dropout_key=key))[0, :, 0, :]
    np.testing.assert_allclose(o, mask[0, 0] * philox.keep_scale(P) / 16, rtol=1e-6)


def test_vmap_over_keys_equals_a_loop():
    rng = np.random.default_rng(2)
    qs = rng.standard_normal((3, 2, 17, 4, 16), dtype=np.float32)
    k, v = (rng.standard_normal((2, 21, 2, 16), dtype=np.float32) for _ in range(2))
    keys = jax.random.split(jax.random.key(1), 3)

    def f(q, key):
        return cj.flash_attention(q, k, v, causal=True, dropout_p=0.25, dropout_key=key)

    batched = jax.jit(jax.vmap(f))(qs, keys)
    grads = jax.jit(jax.vmap(jax.grad(lambda q, key: f(q, key).sum())))(qs, keys)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(f(qs[i], keys[i])))
        want = jax.grad(lambda q: f(q, keys[i]).sum())(qs[i])
        np.testing.assert_array_equal(np.asarray(grads[i]), np.asarray(want))
    assert not np.array_equal(np.asarray(batched[0]), np.asarray(batched[1]))


def test_no_dropout_needs_no_key_and_ignores_one():
    q, k, v, _ = _inputs((1, 9, 9, 2, 2, 8), np.float32, seed=6)
    plain = np.asarray(cj.flash_attention(q, k, v))
    np.testing.assert_array_equal(
        np.asarray(cj.flash_attention(q, k, v, dropout_p=0.0, dropout_key=jax.random.key(0))),
        plain)


@pytest.mark.parametrize("p, key, error, match", [
    (0.1, None, ValueError, "dropout_key: expected a JAX PRNG key"),
    (0.1, 7, TypeError, "dropout_key: expected a JAX PRNG key"),
    (0.1, "zeros3", TypeError, "dropout_key: expected a typed key"),
    (0.1, "split", ValueError, r"dropout_key: expected one key \(shape \(\)\)"),
    (1.0, "key", ValueError, "dropout_p: expected a real number in"),
    (True, "key", TypeError, "dropout_p: expected a real number"),
])
def test_bad_arguments_name_themselves(p, key, error, match):
    q, k, v, _ = _inputs((1, 9, 9, 2, 2, 8), np.float32, seed=6)
    key = {"zeros3": jnp.zeros(3, jnp.uint32), "split": jax.random.split(jax.random.key(0)),
           "key": jax.random.key(0)}.get(key, key)
    for fn in (cj.flash_attention, jax.jit(cj.flash_attention, static_argnames="dropout_p")):
        if fn is not cj.flash_attention and not isinstance(key, jax.Array):
            continue  # jit takes arrays; the eager call covers the rest
        with pytest.raises(error, match=match):
            fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), dropout_p=p, dropout_key=key)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_varlen_dropout_is_the_core_calls_with_the_keys_seed(jit):
    """flash_attention_varlen(dropout_p=, dropout_key=): the core varlen call with the key's
    seed and offset (sequence b drops as batch entry b), forward and gradients."""
    import cuflash

    rng = np.random.default_rng(4)
    cu_q, cu_k = np.int32([0, 5, 5, 22, 31]), np.int32([0, 7, 10, 27, 47])
    q = rng.standard_normal((31, 4, 16), dtype=np.float32)
    k, v = (rng.standard_normal((47, 2, 16), dtype=np.float32) for _ in range(2))
    do = rng.standard_normal(q.shape, dtype=np.float32)
    key = jax.random.key(12)

    def step(q, k, v, key):
        o, vjp = jax.vjp(lambda q, k, v: cj.flash_attention_varlen(
            q, k, v, cu_q, cu_k, 17, 20, causal=True, dropout_p=P, dropout_key=key), q, k, v)
        return (o, *vjp(jnp.asarray(do)))

    fn = jax.jit(step) if jit else step
    got = [np.asarray(x) for x in fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), key)]
    seed, offset = cj.dropout_seed_offset(key)
    drop = dict(causal=True, dropout_p=P, dropout_seed=seed, dropout_offset=offset)
    o, stats = cuflash.attention_varlen_forward(q, k, v, cu_q, cu_k, 17, 20, **drop)
    grads = cuflash.attention_varlen_backward(do, q, k, v, o, stats, cu_q, cu_k, 17, 20, **drop)
    np.testing.assert_array_equal(got[0], o)
    for g, want in zip(got[1:], grads):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
    plain = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 17, 20, causal=True)
    assert not np.allclose(got[0], plain)

"""cuflash.jax.flash_attention with score modifiers (window, softcap, ALiBi, sinks;
docs/masks.md) on the CPU backend: values and gradients (sinks included) eagerly and under
jax.jit (the XLA FFI targets of ``cuflash.jax_modifiers``) against the float64 reference,
vmap, and the errors at trace time. CUDA: tests/test_gpu_jax_modifiers.py.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

import cuflash.jax as cj  # noqa: E402
from cuflash import jax_modifiers, reference, testing  # noqa: E402

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="these tests cover the CPU backend")

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _inputs(shape, dtype, alibi, sinks, seed):
    """q, k, v, do in dtype; slopes (heads,) / (batch, heads) and sinks (heads,) float32."""
    batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim = shape
    rng = np.random.default_rng(seed)
    sizes = [(batch, seqlen_q, heads, head_dim), (batch, seqlen_k, heads_kv, head_dim),
             (batch, seqlen_k, heads_kv, head_dim), (batch, seqlen_q, heads, head_dim)]
    q, k, v, do = (rng.standard_normal(s, dtype=np.float32).astype(dtype) for s in sizes)
    slopes = {None: None, "heads": (heads,), "batch": (batch, heads)}[alibi]
    if slopes is not None:
        slopes = rng.uniform(0.05, 0.5, slopes).astype(np.float32)
    sink = rng.standard_normal(heads).astype(np.float32) * 2 if sinks else None
    return q, k, v, do, slopes, sink


def _run(q, k, v, do, slopes, sink, *, jit, **kw):
    """(o, dq, dk, dv[, dsinks]) through cuflash.jax.flash_attention and jax.vjp."""

    def forward_and_vjp(q, k, v, do, slopes, sink):
        if sink is None:
            o, vjp = jax.vjp(lambda q, k, v: cj.flash_attention(
                q, k, v, alibi_slopes=slopes, **kw), q, k, v)
        else:
            o, vjp = jax.vjp(lambda q, k, v, s: cj.flash_attention(
                q, k, v, alibi_slopes=slopes, sinks=s, **kw), q, k, v, sink)
        return (o, *vjp(do))

    fn = jax.jit(forward_and_vjp) if jit else forward_and_vjp
    args = [None if x is None else jnp.asarray(x) for x in (q, k, v, do, slopes, sink)]
    return [np.asarray(x) for x in fn(*args)]


def _check(got, q, k, v, do, slopes, sink, dtype, causal, window, softcap):
    mods = dict(window=window, softcap=softcap, alibi_slopes=slopes, sinks=sink)
    o_ref = reference.attention_reference(q, k, v, causal=causal, **mods)[0]
    o_naive = reference.attention_naive(q, k, v, causal=causal, dtype=dtype, **mods)
    report = testing.judge("o", got[0], o_ref, o_naive, dtype=dtype.name)
    assert report.ok, str(report)
    refs = reference.attention_backward_reference(do, q, k, v, causal=causal, o=got[0], **mods)
    naives = reference.attention_backward_naive(do, q, k, v, causal=causal, dtype=dtype,
                                                **mods)
    assert len(got) - 1 == len(refs) == len(naives)
    scale = testing.magnitude(*refs[:3])
    for name, g, ref, naive in zip(("dq", "dk", "dv", "dsinks"), got[1:], refs, naives):
        report = testing.judge(name, g, ref, naive,
                               dtype="float32" if name == "dsinks" else dtype.name,
                               scale=testing.magnitude(ref) if name == "dsinks" else scale)
        assert report.ok, str(report)


CASES = [  # (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim), causal, window, softcap,
    # alibi, sinks: each modifier alone, with causal, with GQA, and all together
    ((2, 37, 53, 4, 2, 32), False, (5, 7), None, None, False),
    ((2, 41, 29, 4, 4, 16), True, (9, -1), None, None, False),
    ((1, 33, 33, 4, 1, 24), False, None, 2.0, None, False),
    ((2, 19, 45, 4, 2, 16), True, None, None, "heads", False),
    ((2, 30, 30, 2, 2, 16), False, None, None, "batch", False),
    ((2, 27, 40, 4, 2, 16), False, None, None, None, True),
    ((2, 40, 27, 4, 2, 16), True, None, None, None, True),  # rows that see no key: o = 0
    ((2, 37, 53, 4, 2, 32), True, (9, -1), 3.0, "heads", True),
    ((1, 31, 47, 6, 3, 40), False, (11, 4), 5.0, "batch", True),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("shape, causal, window, softcap, alibi, sinks", CASES)
def test_values_and_gradients_float32(shape, causal, window, softcap, alibi, sinks, jit):
    dtype = DTYPES["float32"]
    q, k, v, do, slopes, sink = _inputs(shape, dtype, alibi, sinks, seed=sum(shape) + causal)
    got = _run(q, k, v, do, slopes, sink, jit=jit, causal=causal, window=window,
               softcap=softcap)
    _check(got, q, k, v, do, slopes, sink, dtype, causal, window, softcap)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_values_and_gradients_bfloat16(jit):
    dtype = DTYPES["bfloat16"]
    shape, causal, window, softcap, alibi, sinks = CASES[-2]
    q, k, v, do, slopes, sink = _inputs(shape, dtype, alibi, sinks, seed=5)
    got = _run(q, k, v, do, slopes, sink, jit=jit, causal=causal, window=window,
               softcap=softcap)
    _check(got, q, k, v, do, slopes, sink, dtype, causal, window, softcap)


def test_jit_equals_eager_and_deterministic_runs():
    """The FFI handler and the API run the same NumPy path: equal results."""
    q, k, v, do, slopes, sink = _inputs((2, 23, 31, 4, 2, 16), np.float32, "batch", True, 9)
    kw = dict(causal=True, window=(6, -1), softcap=4.0)
    eager = _run(q, k, v, do, slopes, sink, jit=False, **kw)
    jitted = _run(q, k, v, do, slopes, sink, jit=True, deterministic=True, **kw)
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batched", ["all", "q only"])
def test_vmap_matches_a_loop(batched):
    """vmap(jit) of value and gradients equals a loop over the vmapped axis, with slopes and
    sinks batched too (each entry its own sinks: the handler splits the call) or shared
    (the sinks' gradient of a shared array sums over the entries)."""
    n = 3
    q, k, v, do, slopes, sink = _inputs((2, 17, 26, 4, 2, 16), np.float32, "heads", True, 11)
    rng = np.random.default_rng(12)
    qs = q[None] * rng.uniform(0.5, 2, (n, 1, 1, 1, 1)).astype(np.float32)
    slopes_n = slopes[None] * np.float32([1, 2, 3])[:, None]
    sinks_n = sink[None] + np.float32([0, 1, -1])[:, None]
    kw = dict(causal=True, window=(7, -1), softcap=3.0)

    def loss(q, slopes, sink):
        o = cj.flash_attention(q, k, v, alibi_slopes=slopes, sinks=sink, **kw)
        return jnp.sum(o * do)

    grad = jax.value_and_grad(loss, argnums=(0, 2))
    if batched == "all":
        got = jax.jit(jax.vmap(grad))(qs, slopes_n, sinks_n)
        want = [grad(qs[i], slopes_n[i], sinks_n[i]) for i in range(n)]
        pairs = [(got[0][i], want[i][0]) for i in range(n)]
        pairs += [(got[1][j][i], want[i][1][j]) for i in range(n) for j in range(2)]
    else:
        total = jax.jit(jax.grad(
            lambda qs, s: jnp.sum(jax.vmap(lambda q: loss(q, slopes, s))(qs)), argnums=(0, 1)))
        got = total(qs, sink)
        want = [jax.grad(loss, argnums=(0, 2))(qs[i], slopes, sink) for i in range(n)]
        pairs = [(got[0][i], want[i][0]) for i in range(n)]
        pairs.append((got[1], sum(w[1] for w in want)))
    for a, b in pairs:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_vmap_folds_slopes_per_batch_entry():
    """Without sinks the vmapped axes fold into the batch; (heads,) slopes are broadcast to
    (batch, heads) first, so every folded entry reads its own slopes."""
    q, k, v, _, slopes, _ = _inputs((2, 15, 21, 2, 2, 8), np.float32, "heads", False, 13)
    slopes_n = np.stack([slopes, 3 * slopes])
    f = jax.jit(jax.vmap(lambda s: cj.flash_attention(q, k, v, alibi_slopes=s)))
    got = np.asarray(f(slopes_n))
    for i in range(2):
        want = reference.attention_reference(q, k, v, alibi_slopes=slopes_n[i])[0]
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


def test_no_keys_with_sinks_under_jit():
    """seqlen_k == 0: o = 0, zero gradients, dsinks = 0 (the sink is the only score)."""
    q = jnp.asarray(np.random.default_rng(14).standard_normal((1, 5, 2, 8), np.float32))
    kv = jnp.zeros((1, 0, 2, 8), jnp.float32)
    sink = jnp.asarray([0.5, -1.0], jnp.float32)
    f = jax.jit(jax.value_and_grad(
        lambda q, s: jnp.sum(cj.flash_attention(q, kv, kv, sinks=s, softcap=2.0)),
        argnums=(0, 1)))
    value, (dq, dsinks) = f(q, sink)
    assert float(value) == 0.0
    assert not np.asarray(dq).any() and not np.asarray(dsinks).any()


def _lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_plain_calls_keep_their_target_and_modifier_calls_take_theirs():
    q = jnp.ones((1, 8, 2, 16), jnp.float32)
    plain = _lowered(lambda q: cj.flash_attention(q, q, q, window=(-1, -1), softcap=0), q)
    assert "cuflash_attention_fwd" in plain and jax_modifiers.FORWARD_TARGET not in plain
    mods = _lowered(lambda q: cj.flash_attention(q, q, q, window=(3, 0)), q)
    assert jax_modifiers.FORWARD_TARGET in mods


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("kw, error, match", [
    (dict(window=3), TypeError, "^window:"),
    (dict(window=(2, -3)), ValueError, "^window:"),
    (dict(softcap=-1.0), ValueError, "^softcap:"),
    (dict(softcap="2"), TypeError, "^softcap:"),
    (dict(alibi_slopes=np.ones(3, np.float32)), ValueError, r"^alibi_slopes: expected shape"),
    (dict(alibi_slopes=[0.5, 0.5]), TypeError, "^alibi_slopes: expected a jax.Array"),
    (dict(sinks=np.ones(2, np.float64)), TypeError, "^sinks: expected dtype float32"),
    (dict(sinks=np.ones((1, 2), np.float32)), ValueError, r"^sinks: expected shape \(2,\)"),
])
def test_bad_modifiers_raise_the_api_errors_at_trace_time(kw, error, match, jit):
    q = jnp.ones((1, 8, 2, 16), jnp.float32)
    fn = lambda q: cj.flash_attention(q, q, q, **kw)  # noqa: E731
    with pytest.raises(error, match=match):
        (jax.jit(fn) if jit else fn)(q)


def test_off_values_are_the_plain_call():
    q = jnp.asarray(np.random.default_rng(15).standard_normal((1, 8, 2, 16), np.float32))
    np.testing.assert_array_equal(np.asarray(cj.flash_attention(q, q, q)),
                                  np.asarray(cj.flash_attention(q, q, q, window=(-1, -1),
                                                                softcap=0)))


def test_non_finite_sinks():
    """Eagerly the API's ValueError; under jit the handler's, raised by JAX."""
    q = jnp.ones((1, 8, 2, 16), jnp.float32)
    sink = jnp.asarray([0.0, np.inf], jnp.float32)
    with pytest.raises(ValueError, match="^sinks: expected finite values"):
        cj.flash_attention(q, q, q, sinks=sink)
    with pytest.raises(Exception, match="sinks: expected finite values"):
        jax.block_until_ready(jax.jit(lambda q, s: cj.flash_attention(q, q, q, sinks=s))(
            q, sink))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("causal, sinks", [(False, False), (True, True)])
def test_block_mask_values_and_gradients(causal, sinks, jit):
    """A block mask (docs/block_sparse.md; no gradient), alone and with sinks, eagerly and
    through the FFI target, against the reference with the mask expanded."""
    dtype = DTYPES["float32"]
    q, k, v, do, _, sink = _inputs((2, 37, 45, 4, 2, 16), dtype, None, sinks, seed=11)
    rng = np.random.default_rng(12)
    mask = rng.random((2, 1, 3, 3)) < 0.5
    mask[..., 0] = True
    size = (16, 16)

    def forward_and_vjp(q, k, v, do, mask, *s):
        o, vjp = jax.vjp(lambda q, k, v, *s: cj.flash_attention(
            q, k, v, causal=causal, block_mask=mask, block_size=size,
            sinks=s[0] if s else None), q, k, v, *s)
        return (o, *vjp(do))

    fn = jax.jit(forward_and_vjp) if jit else forward_and_vjp
    args = [jnp.asarray(x) for x in (q, k, v, do, mask)] + ([jnp.asarray(sink)] if sinks else [])
    got = [np.asarray(x) for x in fn(*args)]
    sparse = dict(block_mask=mask, block_size=size, sinks=sink)
    o_ref = reference.attention_reference(q, k, v, causal=causal, **sparse)[0]
    o_naive = reference.attention_naive(q, k, v, causal=causal, dtype=dtype, **sparse)
    assert testing.judge("o", got[0], o_ref, o_naive, dtype="float32").ok
    refs = reference.attention_backward_reference(do, q, k, v, causal=causal, o=got[0],
                                                  **sparse)
    naives = reference.attention_backward_naive(do, q, k, v, causal=causal, dtype=dtype,
                                                **sparse)
    scale = testing.magnitude(*refs[:3])
    for name, g, ref, naive in zip(("dq", "dk", "dv"), got[1:4], refs, naives):
        report = testing.judge(name, g, ref, naive, dtype="float32", scale=scale)
        assert report.ok, str(report)

"""cuflash.jax.flash_attention_varlen on the CPU backend: values and gradients (sinks
included) eagerly and under jax.jit (the XLA FFI targets of ``cuflash.jax_varlen``) against
the float64 varlen reference, traced offsets, vmap, and the errors at trace time."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

import cuflash.jax as cj  # noqa: E402
from cuflash import jax_varlen, reference, testing  # noqa: E402

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="these tests cover the CPU backend")

CU_Q, CU_K = [0, 37, 37, 82, 91], [0, 70, 90, 90, 130]  # an empty sequence, one without keys
MAX_Q, MAX_K = 45, 70


def _inputs(dtype, heads=4, heads_kv=2, head_dim=32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((CU_Q[-1], heads, head_dim), dtype=np.float32).astype(dtype)
    k, v = (rng.standard_normal((CU_K[-1], heads_kv, head_dim), dtype=np.float32)
            .astype(dtype) for _ in range(2))
    do = rng.standard_normal(q.shape, dtype=np.float32).astype(dtype)
    return q, k, v, do, rng


def _run(q, k, v, do, *, jit, sinks=None, traced_offsets=False, **kw):
    """(o, dq, dk, dv[, dsinks]) through flash_attention_varlen and jax.vjp."""
    offsets = (np.int32(CU_Q), np.int32(CU_K))

    def forward_and_vjp(q, k, v, do, sinks, cu_q, cu_k):
        if sinks is None:
            f = lambda q, k, v: cj.flash_attention_varlen(q, k, v, cu_q, cu_k, MAX_Q, MAX_K,
                                                          **kw)
            o, vjp = jax.vjp(f, q, k, v)
        else:
            f = lambda q, k, v, s: cj.flash_attention_varlen(q, k, v, cu_q, cu_k, MAX_Q,
                                                             MAX_K, sinks=s, **kw)
            o, vjp = jax.vjp(f, q, k, v, sinks)
        return (o, *vjp(do))

    if jit and traced_offsets:  # the offsets are the jitted function's arguments
        fn = jax.jit(forward_and_vjp)
    elif jit:  # the offsets are constants of the trace
        fn = jax.jit(lambda *a: forward_and_vjp(*a, *offsets))
    else:
        fn = forward_and_vjp
    args = [None if x is None else jnp.asarray(x) for x in (q, k, v, do, sinks)]
    if not jit or traced_offsets:
        args += [jnp.asarray(x) for x in offsets]
    return [np.asarray(x) for x in fn(*args)]


def _check(got, q, k, v, do, dtype, **mods):
    o_ref = reference.attention_varlen_reference(q, k, v, CU_Q, CU_K, **mods)[0]
    o_naive = reference.attention_varlen_naive(q, k, v, CU_Q, CU_K, **mods, dtype=dtype)
    report = testing.judge("o", got[0], o_ref, o_naive, dtype=np.dtype(dtype).name)
    assert report.ok, str(report)
    refs = reference.attention_varlen_backward_reference(do, q, k, v, CU_Q, CU_K, **mods,
                                                         o=got[0])
    naives = reference.attention_varlen_backward_naive(do, q, k, v, CU_Q, CU_K, **mods,
                                                       dtype=dtype)
    assert len(got) - 1 == len(refs)
    scale = testing.magnitude(*refs[:3])
    for name, g, ref, naive in zip(("dq", "dk", "dv", "dsinks"), got[1:], refs, naives):
        dsinks = name == "dsinks"
        report = testing.judge(name, g, ref, naive,
                               dtype="float32" if dsinks else np.dtype(dtype).name,
                               scale=testing.magnitude(ref) if dsinks else scale)
        assert report.ok, str(report)


CASES = {
    "causal": dict(causal=True),
    "window-softcap-sinks": dict(causal=True, window=(16, -1), softcap=4.0, sinks=True),
    "seqused-alibi": dict(window=(5, 9), seqused=True, alibi=True),
}


def _case(name, rng, heads=4):
    mods = dict(CASES[name])
    sinks = rng.standard_normal(heads).astype(np.float32) if mods.pop("sinks", False) else None
    if mods.pop("seqused", False):
        mods["seqused_k"] = np.int32([60, 11, 0, 25])
    if mods.pop("alibi", False):
        mods["alibi_slopes"] = rng.uniform(0.05, 0.5, (len(CU_Q) - 1, heads)).astype(
            np.float32)
    return mods, sinks


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_values_and_gradients_float32(name, jit):
    q, k, v, do, rng = _inputs(np.float32)
    mods, sinks = _case(name, rng)
    got = _run(q, k, v, do, jit=jit, sinks=sinks, **mods)
    _check(got, q, k, v, do, np.float32, sinks=sinks, **mods)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_head_dim_v(jit):
    """v with its own head_dim_v (DeepSeek-style): o (total_q, heads, head_dim_v) and the
    gradients like the reference, eagerly and under jit (padded in JAX there)."""
    q, k, _, _, rng = _inputs(np.float32, head_dim=24)
    v = rng.standard_normal((CU_K[-1], 2, 16), dtype=np.float32)
    do = rng.standard_normal((CU_Q[-1], 4, 16), dtype=np.float32)
    got = _run(q, k, v, do, jit=jit, causal=True)
    assert got[0].shape == (CU_Q[-1], 4, 16)
    _check(got, q, k, v, do, np.float32, causal=True)


def test_values_and_gradients_bfloat16_with_traced_offsets():
    dtype = np.dtype(ml_dtypes.bfloat16)
    q, k, v, do, rng = _inputs(dtype)
    mods, sinks = _case("window-softcap-sinks", rng)
    got = _run(q, k, v, do, jit=True, traced_offsets=True, sinks=sinks, **mods)
    _check(got, q, k, v, do, dtype, sinks=sinks, **mods)


def test_jit_equals_eager_and_the_targets_run():
    q, k, v, do, _ = _inputs(np.float32)
    eager = _run(q, k, v, do, jit=False, causal=True)
    jitted = _run(q, k, v, do, jit=True, traced_offsets=True, causal=True)
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(a, b)  # the same NumPy path, called by the handler
    from cuflash import xla_ffi

    assert xla_ffi.registered(jax_varlen.FORWARD_TARGET, "cpu")
    assert xla_ffi.registered(jax_varlen.BACKWARD_TARGET, "cpu")


def test_vmap_matches_a_loop():
    q, k, v, _, rng = _inputs(np.float32)
    qs = np.stack([q, rng.standard_normal(q.shape).astype(np.float32)])
    f = lambda q: cj.flash_attention_varlen(q, k, v, np.int32(CU_Q), np.int32(CU_K), MAX_Q,
                                            MAX_K, causal=True)
    batched = np.asarray(jax.jit(jax.vmap(f))(jnp.asarray(qs)))
    for i in range(2):
        np.testing.assert_array_equal(batched[i], np.asarray(f(jnp.asarray(qs[i]))))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("change, error, match", [
    (dict(cu_seqlens_q=np.int64(CU_Q)), TypeError, "^cu_seqlens_q: expected dtype int32"),
    (dict(max_seqlen_q=45.0), TypeError, "^max_seqlen_q: expected an int"),
    (dict(q=np.zeros((1, 91, 4, 32), np.float32)), ValueError, "^q: expected a 3-D array"),
    (dict(cu_seqlens_k=np.int32(CU_K[:-1])), ValueError, r"^cu_seqlens_k: expected shape"),
    (dict(window=(1, 2, 3)), TypeError, "^window: expected a pair"),
])
def test_bad_arguments_raise_the_api_errors_at_trace_time(change, error, match, jit):
    q, k, v, _, _ = _inputs(np.float32)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=np.int32(CU_Q), cu_seqlens_k=np.int32(CU_K),
                max_seqlen_q=MAX_Q, max_seqlen_k=MAX_K)
    args.update(change)
    kw = {n: args.pop(n) for n in list(args) if n in ("window",)}
    positional = [args[n] for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k",
                                    "max_seqlen_q", "max_seqlen_k")]
    call = lambda q: cj.flash_attention_varlen(q, *positional[1:], **kw)
    with pytest.raises(error, match=match):
        (jax.jit(call) if jit else call)(positional[0])


def test_offset_values_are_checked_when_the_call_runs():
    """Traced offsets: unknown at trace time; the CPU handler checks them (as an eager call
    does), and JAX raises the failure."""
    q, k, v, _, _ = _inputs(np.float32)
    bad = np.int32([0, 37, 37, 82, 90])  # the last offset must be total_q (91)
    f = jax.jit(lambda q, cu: cj.flash_attention_varlen(q, k, v, cu, np.int32(CU_K), MAX_Q,
                                                        MAX_K))
    with pytest.raises(Exception, match="cu_seqlens_q: expected the last offset"):
        np.asarray(f(jnp.asarray(q), jnp.asarray(bad)))
    with pytest.raises(ValueError, match="cu_seqlens_q: expected the last offset"):
        cj.flash_attention_varlen(q, k, v, bad, np.int32(CU_K), MAX_Q, MAX_K)

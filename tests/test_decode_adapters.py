"""cuflash.torch.attention_with_kvcache and cuflash.jax.attention_with_kvcache on the CPU:
eager calls, torch.compile tracing through the mutating operator (fullgraph, no break), the
JAX functional append; against the framework-neutral call (itself checked against the
float64 reference in tests/test_decode.py). JAX under jit: tests/test_jax_decode.py."""

from __future__ import annotations

import numpy as np
import pytest

import cuflash

try:
    import decode_helpers as dh
except ImportError:  # tests/ collected as a package
    from tests import decode_helpers as dh

CASE = dict(batch=2, q_len=2, heads=8, heads_kv=2, head_dim=32, seqlen_cache=96,
            cache_seqlens=[40, 7], causal=True, dtype="float32", num_splits=None,
            softmax_scale=None, seed=21, page_size=16, seqlen_new=2, window=(30, 0),
            softcap=5.0, alibi="heads")


def _want():
    """o, lse and the caches after the append, from the framework-neutral NumPy call."""
    kw, _ = dh.make_kvcache_inputs(CASE)
    o, lse = cuflash.attention_with_kvcache(**kw, causal=True, return_softmax_lse=True)
    return kw, o, lse


def test_torch_eager_and_compiled():
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    kw, o, lse = _want()
    for compiled in (False, True):
        fresh, _ = dh.make_kvcache_inputs(CASE)
        t = {n: torch.from_numpy(x.copy()) if isinstance(x, np.ndarray) else x
             for n, x in fresh.items()}

        def step(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, alibi_slopes):
            return ct.attention_with_kvcache(
                q, k_cache, v_cache, k_new=k_new, v_new=v_new, cache_seqlens=cache_seqlens,
                block_table=block_table, alibi_slopes=alibi_slopes, causal=True,
                window=t["window"], softcap=t["softcap"], return_softmax_lse=True)

        if compiled:
            torch._dynamo.reset()
            step = torch.compile(step, backend="aot_eager", fullgraph=True)
        got_o, got_lse = step(*(t[n] for n in ("q", "k_cache", "v_cache", "k_new", "v_new",
                                               "cache_seqlens", "block_table", "alibi_slopes")))
        np.testing.assert_allclose(got_o.numpy(), o, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got_lse.numpy(), lse, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(t["k_cache"].numpy(), kw["k_cache"])  # appended in place
        np.testing.assert_array_equal(t["v_cache"].numpy(), kw["v_cache"])


def test_torch_bad_input_names_the_argument():
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    q, k = torch.ones(1, 1, 2, 8), torch.ones(1, 4, 1, 8)
    with pytest.raises(TypeError, match="k_new: expected a torch.Tensor"):
        ct.attention_with_kvcache(q, k, k, k_new=np.ones((1, 1, 1, 8), np.float32))
    with pytest.raises(ValueError, match="window:"):
        ct.attention_with_kvcache(q, k, k, window=(-3, 0))


def test_jax_eager_with_a_functional_append():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    import cuflash.jax as cj

    kw, o, lse = _want()
    fresh, _ = dh.make_kvcache_inputs(CASE)
    j = {n: jnp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in fresh.items()}
    got_o, got_lse, k2, v2 = cj.attention_with_kvcache(**j, causal=True, return_softmax_lse=True)
    np.testing.assert_allclose(np.asarray(got_o), o, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_lse), lse, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(k2), kw["k_cache"])
    np.testing.assert_array_equal(np.asarray(v2), kw["v_cache"])
    np.testing.assert_array_equal(np.asarray(j["k_cache"]), fresh["k_cache"])  # untouched
    # under jit: the XLA FFI target (tests/test_jax_decode.py has the rest)
    jitted = jax.jit(lambda q: cj.attention_with_kvcache(q, j["k_cache"], j["v_cache"],
                                                         block_table=j["block_table"]))(j["q"])
    eager = cj.attention_with_kvcache(j["q"], j["k_cache"], j["v_cache"],
                                      block_table=j["block_table"])
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
    with pytest.raises(ValueError, match="v_new:"):
        cj.attention_with_kvcache(j["q"], j["k_cache"], j["v_cache"], k_new=j["k_new"],
                                  cache_seqlens=j["cache_seqlens"], block_table=j["block_table"])


def test_torch_compiled_read_only_step_uses_the_non_mutating_operator():
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    kw, truth = dh.make_kvcache_inputs(dict(CASE, seqlen_new=0))
    want = cuflash.attention_with_kvcache(**kw, causal=True)
    t = {n: torch.from_numpy(x) for n, x in kw.items() if isinstance(x, np.ndarray)}
    torch._dynamo.reset()
    gm = []

    def backend(graph, example_inputs):
        gm.append(graph)
        return graph.forward

    step = torch.compile(lambda **a: ct.attention_with_kvcache(**a, causal=True, window=(30, 0),
                                                               softcap=5.0),
                         backend=backend, fullgraph=True)
    np.testing.assert_allclose(step(**t).numpy(), want, rtol=0, atol=1e-6)
    code = gm[0].code
    assert "cuflash.kvcache_decode" in code and "append" not in code, code

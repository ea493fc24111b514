"""cuflash.jax.attention_with_kvcache under jax.jit on the CPU backend: the XLA FFI target of
``cuflash.jax_decode`` (the NumPy path in XLA's buffers) against the eager call and the
float64 reference; the append through aliased cache buffers; a decode loop in
lax.fori_loop; vmap; errors at trace time and at run time; the target's attribute plumbing
and the command-buffer trait. CUDA: tests/test_gpu_jax_decode.py.
"""

from __future__ import annotations

import contextlib
import ctypes

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import cuflash.jax as cj  # noqa: E402
from cuflash import decode, jax_decode, xla_ffi  # noqa: E402

try:
    import decode_helpers as dh
except ImportError:  # tests/ collected as a package
    from tests import decode_helpers as dh

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="these tests cover the CPU backend")

ARRAYS = ("q", "k_cache", "v_cache", "k_new", "v_new", "cache_seqlens", "block_table",
          "alibi_slopes")


def _step(static: dict):
    """f(arrays by name) -> attention_with_kvcache(...), the static keywords closed over."""

    def step(arrays):
        return cj.attention_with_kvcache(**arrays, **static)

    return step


def _split(kw: dict, causal: bool, num_splits=None):
    """(arrays as JAX arrays, static keywords) of make_kvcache_inputs' kwargs."""
    arrays = {n: jnp.asarray(kw[n]) for n in ARRAYS if kw.get(n) is not None}
    static = dict(causal=causal, window=kw.get("window"), softcap=kw.get("softcap"),
                  num_splits=num_splits, return_softmax_lse=True)
    return arrays, static


def _jit_vs_eager_and_reference(case):
    kw, truth = dh.make_kvcache_inputs(case)
    arrays, static = _split(kw, case["causal"], case["num_splits"])
    static["softmax_scale"] = case["softmax_scale"]
    host_before = {n: np.asarray(x).copy() for n, x in arrays.items()}
    fn = _step(static)
    eager = fn(arrays)
    got = jax.jit(fn)(arrays)
    assert len(got) == len(eager) == (4 if case["seqlen_new"] else 2)
    for a, b in zip(got, eager):  # the same NumPy path: equal bit for bit
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    o, lse = (np.asarray(x) for x in got[:2])
    mods = {n: truth[n] for n in ("window", "softcap", "alibi_slopes") if n in truth}
    dh.assert_decode_matches(o, lse, kw["q"], truth["k"], truth["v"], truth["lens"],
                             causal=case["causal"], softmax_scale=case["softmax_scale"],
                             dtype=case["dtype"], label=dh.describe(case), **mods)
    if case["seqlen_new"]:  # the returned caches hold the append (through the pages)
        table = kw.get("block_table")
        np.testing.assert_array_equal(dh.logical(np.asarray(got[2]), table), truth["k"])
        np.testing.assert_array_equal(dh.logical(np.asarray(got[3]), table), truth["v"])
    for n, x in arrays.items():  # the operands are never written
        np.testing.assert_array_equal(np.asarray(x), host_before[n])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dh.kvcache_cases(max_cache=120, head_dims=(8, 32, 64)))
def test_jit_matches_eager_and_the_float64_reference(case):
    _jit_vs_eager_and_reference(case)


@pytest.mark.parametrize("heads, heads_kv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("paged, seqlen_new", [(None, 0), (16, 0), (None, 2), (32, 3)])
def test_jit_layouts(heads, heads_kv, q_len, paged, seqlen_new):
    """MHA and GQA, q_len 1 and 4, contiguous and paged, with and without an append; lengths
    given, a window and a softcap."""
    case = dict(batch=3, q_len=q_len, heads=heads, heads_kv=heads_kv, head_dim=32,
                seqlen_cache=75, cache_seqlens=[0, 41, 70], causal=True, dtype="bfloat16",
                num_splits=3, softmax_scale=None, seed=int(np.random.default_rng().integers(
                    2**31)), page_size=paged, seqlen_new=seqlen_new, window=(20, 0),
                softcap=4.0, alibi=None)
    _jit_vs_eager_and_reference(case)


def test_decode_loop_in_fori_loop_matches_eager_steps():
    """Several appends in one jitted lax.fori_loop (the caches and the lengths carried, the
    caches updated in place through the aliases) equal the same steps called eagerly."""
    rng = np.random.default_rng()
    b, hk, h, d, pages, page, steps = 2, 2, 4, 16, 9, 16, 5
    table = jnp.asarray(rng.permutation(pages)[:8].reshape(b, 4), jnp.int32)
    k0, v0 = jnp.asarray(rng.standard_normal((2, pages, page, hk, d), np.float32))
    q = jnp.asarray(rng.standard_normal((steps, b, 1, h, d), np.float32))
    new = jnp.asarray(rng.standard_normal((2, steps, b, 1, hk, d), np.float32))
    lens0 = jnp.asarray([3, 50], jnp.int32)

    def step(i, carry, q, k_new, v_new):
        k, v, lens, outs = carry
        o, k, v = cj.attention_with_kvcache(q[i], k, v, k_new=k_new[i], v_new=v_new[i],
                                             cache_seqlens=lens, block_table=table,
                                             causal=True)
        return k, v, lens + 1, outs.at[i].set(o)

    @jax.jit
    def loop(k, v, lens, q, k_new, v_new):
        outs = jnp.zeros(q.shape, q.dtype)
        body = lambda i, c: step(i, c, q, k_new, v_new)  # noqa: E731
        return jax.lax.fori_loop(0, steps, body, (k, v, lens, outs))

    got = loop(k0, v0, lens0, q, new[0], new[1])
    want = (k0, v0, lens0, jnp.zeros(q.shape))
    for i in range(steps):  # eager steps
        want = step(i, want, q, new[0], new[1])
    for a, b_ in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))
    assert not np.isnan(np.asarray(got[3])).any()


def test_vmap_runs_one_call_per_entry():
    rng = np.random.default_rng()
    kw, _ = dh.make_kvcache_inputs(dict(
        batch=2, q_len=2, heads=4, heads_kv=2, head_dim=16, seqlen_cache=40,
        cache_seqlens=[5, 30], causal=False, dtype="float32", num_splits=2,
        softmax_scale=None, seed=int(rng.integers(2**31)), page_size=16, seqlen_new=1))
    arrays, static = _split(kw, False, 2)
    qs = jnp.stack([arrays["q"] * s for s in (1.0, 0.5, 2.0)])
    fn = _step(static)
    got = jax.jit(jax.vmap(lambda q: fn(dict(arrays, q=q))))(qs)
    for i in range(3):
        want = fn(dict(arrays, q=qs[i]))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b))


def test_lowering_names_the_target_and_aliases_the_caches():
    kw, _ = dh.make_kvcache_inputs(dict(
        batch=1, q_len=1, heads=2, heads_kv=1, head_dim=8, seqlen_cache=20,
        cache_seqlens=[4], causal=True, dtype="float32", num_splits=None, softmax_scale=None,
        seed=3, page_size=None, seqlen_new=1))
    arrays, static = _split(kw, True)
    text = jax.jit(_step(static)).lower(arrays).as_text()
    assert jax_decode.TARGET in text and "output_operand_alias" in text
    assert "tensor<0xui8>" in text  # no GPU backend: no scratch


# -- errors ----------------------------------------------------------------------------------


def _traced(**over):
    """Call attention_with_kvcache under jit with the arrays (and keywords) given."""
    arrays = dict(q=np.ones((2, 1, 4, 16), np.float32),
                  k_cache=np.ones((2, 10, 2, 16), np.float32),
                  v_cache=np.ones((2, 10, 2, 16), np.float32))
    static = {n: over.pop(n) for n in list(over) if n not in ARRAYS}
    arrays.update(over)
    arrays = {n: x for n, x in arrays.items() if x is not None}
    # q is always traced; the others are closed over as given (NumPy keeps its dtype)
    q = jnp.asarray(arrays.pop("q"))
    return jax.jit(lambda q: cj.attention_with_kvcache(q, **arrays, **static))(q)


@pytest.mark.parametrize("over, err, words", [
    (dict(q=np.ones((2, 9, 4, 16), np.float32)), ValueError, ["q:", "q_len", "9"]),
    (dict(k_cache=np.ones((2, 10, 2, 16), np.float64)), TypeError, ["k_cache:", "float64"]),
    (dict(k_cache=np.ones((2, 10, 2, 16, 1), np.float32)), ValueError, ["k_cache:", "4-D"]),
    (dict(v_cache=np.ones((2, 11, 2, 16), np.float32)), ValueError, ["v_cache:"]),
    (dict(cache_seqlens=np.array([1, 2], np.int64)), TypeError, ["cache_seqlens:", "int32"]),
    (dict(cache_seqlens=[1, 2]), TypeError, ["cache_seqlens:", "list"]),
    (dict(k_new=np.ones((2, 1, 2, 16), np.float32)), ValueError, ["v_new:"]),
    (dict(k_new=np.ones((2, 1, 2, 16), np.float32), v_new=np.ones((2, 1, 2, 16), np.float32)),
     ValueError, ["cache_seqlens:"]),
    (dict(block_table=np.zeros((2, 1), np.int32)), ValueError, ["k_cache:", "page_size"]),
    (dict(alibi_slopes=np.ones(3, np.float32)), ValueError, ["alibi_slopes:"]),
    (dict(num_splits=1.5), TypeError, ["num_splits:"]),
    (dict(window=(-3, 0)), ValueError, ["window:"]),
    (dict(softcap="x"), TypeError, ["softcap:"]),
    (dict(causal=1), TypeError, ["causal:"]),
    (dict(return_softmax_lse=None), TypeError, ["return_softmax_lse:"]),
])
def test_bad_input_raises_at_trace_time_naming_the_argument(over, err, words):
    with pytest.raises(err) as info:
        _traced(**over)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_bad_values_raise_when_the_cpu_call_runs():
    """Traced lengths and page ids are checked on the CPU as an eager call checks them."""
    lens = jnp.asarray([3, 11], jnp.int32)
    with pytest.raises(Exception, match="cache_seqlens: expected values from 0 to"):
        jax.block_until_ready(_traced(cache_seqlens=lens))
    k = np.ones((3, 16, 2, 16), np.float32)
    table = jnp.asarray([[0], [3]], jnp.int32)
    with pytest.raises(Exception, match="block_table: expected page ids from 0 to"):
        jax.block_until_ready(_traced(k_cache=k, v_cache=k, block_table=table))


# -- the target's plumbing (pure) ------------------------------------------------------------


@pytest.mark.parametrize("present", [(), ("cache_seqlens", "block_table"),
                                     ("cache_seqlens", "alibi_slopes", "k_new", "v_new")])
def test_options_round_trip_through_the_attributes(present):
    shape = decode.DecodeShape(2, 3, 64, 8, 2, 32, "float16")
    problem = decode.DecodeProblem(shape, True, 0.3, 7, ("cpu", 0), window=(5, -1),
                                   softcap=2.5)
    options = jax_decode.Options.of(problem, present)
    attrs = options.attributes()
    assert all(isinstance(v, (bool, np.int64, np.float64)) for v in attrs.values())
    back = jax_decode.Options.from_attributes({n: np.asarray(v).item()
                                               for n, v in attrs.items()})
    assert back == options
    assert back.operand_names() == ["q", "k_cache", "v_cache"] + [
        n for n in ("cache_seqlens", "block_table", "alibi_slopes", "k_new", "v_new")
        if n in present]
    plain = jax_decode.Options.of(decode.DecodeProblem(shape, False, 1.0, None, ("cpu", 0)), ())
    assert jax_decode.Options.from_attributes(plain.attributes()) == plain
    assert plain.attributes()["num_splits"] == 0 and plain.attributes()["window_left"] == -1


def test_scratch_is_the_largest_plan_of_the_local_gpus(monkeypatch):
    """Traced with two GPUs of different plans: the larger workspace, and each plan's
    kernels loaded on its device before any call (a graph capture cannot load them)."""
    shape = decode.DecodeShape(1, 1, 4096, 8, 8, 128, "bfloat16")
    plans = {0: decode.plan_decode(shape, 132), 1: decode.plan_decode(shape, 16)}
    loaded = []
    monkeypatch.setattr(jax_decode, "_local_cuda_devices", lambda: (0, 1))
    monkeypatch.setattr(jax_decode, "_on_device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(decode, "decode_plan", lambda s, n, device_id: plans[device_id])
    monkeypatch.setattr(decode, "_functions_of", lambda spec, d: loaded.append((spec, d)))
    need = jax_decode.scratch_bytes(shape, None)
    assert need == max(p.workspace_bytes for p in plans.values()) > 0
    assert loaded == [(plans[0].spec, 0), (plans[1].spec, 1)]
    assert jax_decode.scratch_bytes(decode.DecodeShape(0, 1, 64, 8, 8, 128, "bfloat16"),
                                    None) == 0


def _metadata_traits(handler) -> int:
    """What a handler answers to XLA's registration-time metadata query."""
    metadata = xla_ffi.Metadata()
    metadata.struct_size = ctypes.sizeof(xla_ffi.Metadata)
    metadata.traits = 0xFF  # poisoned: the handler must write it
    extension = xla_ffi.MetadataExtension()
    extension.extension_base.struct_size = ctypes.sizeof(xla_ffi.MetadataExtension)
    extension.extension_base.type = xla_ffi.EXTENSION_METADATA
    extension.metadata = ctypes.pointer(metadata)
    frame = xla_ffi.CallFrame()
    frame.struct_size = ctypes.sizeof(xla_ffi.CallFrame)
    frame.extension_start = ctypes.cast(ctypes.pointer(extension),
                                        ctypes.POINTER(xla_ffi.ExtensionBase))
    assert handler(ctypes.pointer(frame)) is None
    return metadata.traits


def test_command_buffer_trait_is_opt_in():
    assert _metadata_traits(xla_ffi.make_handler("cuflash_test_plain", lambda c: None)) == 0
    graphs = xla_ffi.make_handler("cuflash_test_graphs", lambda c: None, command_buffer=True)
    assert _metadata_traits(graphs) == xla_ffi.TRAIT_COMMAND_BUFFER_COMPATIBLE

"""Fuzz every public entry point with malformed input (issue #9): core forward and backward,
cuflash.torch (flash_attention, scaled_dot_product_attention), cuflash.jax eager and under
jax.jit. Each must raise TypeError or ValueError and leave the caller's arrays untouched.

A case is a valid call with one thing broken, drawn by hypothesis.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import validate

SHAPE_Q, SHAPE_KV = (1, 6, 4, 8), (1, 5, 2, 8)

JUNK_FLAGS = st.one_of(st.integers(), st.text(max_size=4), st.none(), st.floats(),
                       st.just([True]))
BAD_SCALES = st.one_of(st.booleans(), st.text(max_size=4), st.just(0.5j), st.just([0.5]),
                       st.floats(max_value=0.0), st.just(float("nan")), st.just(float("inf")),
                       st.floats(min_value=3e38, allow_infinity=False),
                       st.floats(min_value=1e-300, max_value=1e-39))
NOT_ARRAYS = st.one_of(st.none(), st.floats(), st.text(max_size=3),
                       st.just([[1.0, 2.0]]), st.just(object()))


def _rand(shape, dtype, rng):
    return (rng.standard_normal(shape) + 0.25).astype(dtype)


@st.composite
def malformed(draw, with_backward=False, with_deterministic=False):
    """(what was broken, arrays by name, keywords): a valid call with one defect."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from(["float16", "float32"]))
    arrays = {"q": _rand(SHAPE_Q, dtype, rng), "k": _rand(SHAPE_KV, dtype, rng),
              "v": _rand(SHAPE_KV, dtype, rng)}
    if with_backward:
        arrays["do"] = _rand(SHAPE_Q, dtype, rng)
    kw = {"causal": draw(st.booleans()), "softmax_scale": None}
    defects = ["ndim", "head_dim", "dtype", "mixed_dtype", "v_shape", "heads", "causal",
               "scale", "not_array"]
    if with_deterministic:
        defects.append("deterministic")
    defect = draw(st.sampled_from(defects))
    name = draw(st.sampled_from(sorted(arrays)))
    if defect == "ndim":
        arrays[name] = draw(st.sampled_from([arrays[name][0], arrays[name][None]]))
    elif defect == "head_dim":
        d = draw(st.sampled_from([0, 264, 300]))  # the CPU takes 1..256 (issue #15)
        arrays = {n: _rand(a.shape[:3] + (d,), dtype, rng) for n, a in arrays.items()}
    elif defect == "dtype":
        bad = draw(st.sampled_from(["float64", "int32", "int8"]))
        arrays = {n: a.astype(bad) for n, a in arrays.items()}
    elif defect == "mixed_dtype":
        other = "float32" if dtype == "float16" else "float16"
        arrays[draw(st.sampled_from(["k", "v"]))] = arrays["k"].astype(other)
    elif defect == "v_shape":
        arrays["v"] = _rand((1, draw(st.sampled_from([3, 7])), 2, 8), dtype, rng)
    elif defect == "heads":
        hkv = draw(st.sampled_from([3, 8]))
        arrays["k"], arrays["v"] = (_rand((1, 5, hkv, 8), dtype, rng) for _ in range(2))
    elif defect == "causal":
        kw["causal"] = draw(JUNK_FLAGS)
    elif defect == "scale":
        kw["softmax_scale"] = draw(BAD_SCALES)
    elif defect == "deterministic":
        kw["deterministic"] = draw(JUNK_FLAGS)
    elif defect == "not_array":
        arrays[name] = draw(NOT_ARRAYS)
    return defect, arrays, kw


def _snapshot(arrays):
    return {n: a.copy() for n, a in arrays.items() if isinstance(a, np.ndarray)}


def _assert_untouched(arrays, before):
    for n, copy in before.items():
        np.testing.assert_array_equal(arrays[n].view(np.uint8), copy.view(np.uint8), err_msg=n)


def _rejects(call, arrays):
    before = _snapshot(arrays)
    with pytest.raises((TypeError, ValueError)):
        call()
    _assert_untouched(arrays, before)


@settings(max_examples=60)
@given(case=malformed())
def test_core_forward(case):
    defect, a, kw = case
    _rejects(lambda: cuflash.attention_forward(a["q"], a["k"], a["v"], **kw), a)


@settings(max_examples=60)
@given(case=malformed(with_backward=True, with_deterministic=True))
def test_core_backward(case):
    defect, a, kw = case
    q, k, v = (np.ones(s, np.float32) for s in (SHAPE_Q, SHAPE_KV, SHAPE_KV))
    _, stats = cuflash.attention_forward(q, k, v)  # valid stats of the valid shapes
    stats = cuflash.SoftmaxStats(stats.m, stats.l)  # unchecked: the defect must be found
    o = a["q"].copy() if isinstance(a["q"], np.ndarray) else a["q"]
    _rejects(lambda: cuflash.attention_backward(a["do"], a["q"], a["k"], a["v"], o, stats,
                                                **kw), a)


def _to_torch(a):
    """torch tensors sharing memory with the NumPy arrays (so 'untouched' is checked on them)."""
    torch = pytest.importorskip("torch")
    return {n: torch.from_numpy(x) if isinstance(x, np.ndarray) else x for n, x in a.items()}


@settings(max_examples=60)
@given(case=malformed(with_deterministic=True))
def test_torch_flash_attention(case):
    pytest.importorskip("torch")
    import cuflash.torch as ct

    defect, a, kw = case
    assume(kw.get("deterministic", False) is not None)  # None: follow torch's global flag
    t = _to_torch(a)
    _rejects(lambda: ct.flash_attention(t["q"], t["k"], t["v"], **kw), a)


@settings(max_examples=60)
@given(case=malformed())
def test_torch_sdpa(case):
    pytest.importorskip("torch")
    import cuflash.torch as ct

    defect, a, kw = case
    t = {n: x.transpose(1, 2) if hasattr(x, "dim") and x.dim() == 4 else x
         for n, x in _to_torch(a).items()}
    _rejects(lambda: ct.scaled_dot_product_attention(
        t["q"], t["k"], t["v"], is_causal=kw["causal"], scale=kw["softmax_scale"],
        enable_gqa=True), a)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_jax(jit):
    jax = pytest.importorskip("jax")
    import cuflash.jax as cj

    @settings(max_examples=40)
    @given(case=malformed(with_deterministic=True))
    def check(case):
        defect, a, kw = case
        # jax.jit itself turns float64 arguments into float32 (x64 off) before we see them
        assume(not (jit and any(getattr(x, "dtype", None) == np.float64 for x in a.values())))
        fn = lambda q, k, v: cj.flash_attention(q, k, v, **kw)  # noqa: E731 - keywords static
        _rejects(lambda: (jax.jit(fn) if jit else fn)(a["q"], a["k"], a["v"]), a)

    check()


def test_valid_calls_pass_the_same_entry_points():
    """The generator's base case is valid: the rejections above come from the defect."""
    rng = np.random.default_rng(0)
    q, k, v = _rand(SHAPE_Q, "float32", rng), _rand(SHAPE_KV, "float32", rng), \
        _rand(SHAPE_KV, "float32", rng)
    o, stats = cuflash.attention_forward(q, k, v, causal=True)
    cuflash.attention_backward(q, q, k, v, o, stats, causal=True)
    assert validate.check_forward(q, k, v, causal=False, softmax_scale=None).heads_per_kv == 2

"""Hard edges of the core API's validation (issue #9): softmax_scale in float32's range,
torch tensors that require grad, JAX tracers."""

from __future__ import annotations

import math

import numpy as np
import pytest

import cuflash
from cuflash import validate


def rand(shape, dtype="float32", seed=0) -> np.ndarray:
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) + 0.25
    return data.astype(dtype)


def qkv(dtype="float32", shape=(1, 9, 2, 8)):
    return rand(shape, dtype, 1), rand(shape, dtype, 2), rand(shape, dtype, 3)


# -- item 6: a scale finite in float64 but not usable in float32 -----------------------------


@pytest.mark.parametrize("scale", [3e38, 2.4e38, 1e300, 1e-39, 1e-46, 1e-300],
                         ids=["3e38", "2.4e38", "1e300", "subnormal-1e-39", "1e-46", "1e-300"])
def test_scale_outside_float32_is_rejected(scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^softmax_scale: expected a value the float32 kernels "
                                         r"can use, from 1\.175e-38 to 2\.359e\+38 .*got "):
        cuflash.attention_forward(q, k, v, softmax_scale=scale)


@pytest.mark.parametrize("scale, qk_size", [(validate.MIN_SCALE, 1.0),
                                             (validate.MAX_SCALE, 1e-19)])
def test_scale_at_the_float32_limits_is_accepted_and_finite(scale, qk_size):
    """Scores stay finite when q.k is small enough for the scale: the scale itself is usable."""
    q, k, v = qkv()
    q, k = q * np.float32(qk_size), k * np.float32(qk_size)
    o, stats = cuflash.attention_forward(q, k, v, softmax_scale=scale)
    assert np.isfinite(o).all() and np.isfinite(stats.m).all() and (stats.l >= 1).all()


# -- item 12: the statistics remember the forward they came from -----------------------------


def _forward_and_do(causal=False, softmax_scale=None, shape_q=(1, 9, 2, 8),
                    shape_kv=(1, 11, 1, 8)):
    q, k, v = rand(shape_q, seed=1), rand(shape_kv, seed=2), rand(shape_kv, seed=3)
    o, stats = cuflash.attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
    return q, k, v, o, stats, rand(shape_q, seed=4)


def test_stats_record_the_forward():
    q, k, v, o, stats, do = _forward_and_do(causal=True)
    assert (stats.causal, stats.softmax_scale) == (True, 1 / math.sqrt(8))
    assert stats.shape_q == q.shape and stats.shape_kv == k.shape
    np.testing.assert_allclose(stats.lse, stats.m + np.log(stats.l))


@pytest.mark.parametrize("change, pattern", [
    ({"causal": False}, r"^causal: expected True as in the forward pass that made stats, "
                        r"got False"),
    ({"softmax_scale": 0.3}, r"^softmax_scale: expected 0\.3535.* as in the forward pass .*"
                             r"got 0\.3"),
], ids=["causal", "scale"])
def test_backward_with_other_options_than_its_forward_raises(change, pattern):
    q, k, v, o, stats, do = _forward_and_do(causal=True)
    kw = {"causal": True, "softmax_scale": None, **change}
    with pytest.raises(ValueError, match=pattern):
        cuflash.attention_backward(do, q, k, v, o, stats, **kw)


def test_backward_with_other_keys_than_its_forward_raises():
    q, k, v, o, stats, do = _forward_and_do()
    k2, v2 = rand((1, 7, 1, 8), seed=5), rand((1, 7, 1, 8), seed=6)
    with pytest.raises(ValueError, match=r"^k: expected shape \(1, 11, 1, 8\) as in the forward "
                                         r"pass that made stats, got \(1, 7, 1, 8\)"):
        cuflash.attention_backward(do, q, k2, v2, o, stats)


def test_backward_accepts_the_default_scale_written_out():
    q, k, v, o, stats, do = _forward_and_do()
    a = cuflash.attention_backward(do, q, k, v, o, stats)
    b = cuflash.attention_backward(do, q, k, v, o, stats, softmax_scale=8 ** -0.5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_hand_built_stats_are_not_checked():
    q, k, v, o, stats, do = _forward_and_do(causal=True)
    bare = cuflash.SoftmaxStats(stats.m, stats.l)
    assert (bare.causal, bare.softmax_scale, bare.shape_q, bare.shape_kv) == (None,) * 4
    dq, dk, dv = cuflash.attention_backward(do, q, k, v, o, bare, causal=False)
    assert dq.shape == q.shape

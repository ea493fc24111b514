"""Hard edges of the core API's validation (issue #9): softmax_scale in float32's range,
torch tensors that require grad, JAX tracers."""

from __future__ import annotations

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

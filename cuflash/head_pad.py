"""Head dims the CUDA kernels lack (issue #15, docs/head_dims.md): zero-padded copies.

The kernels take one head_dim for q, k and v, a multiple of 8 up to 256 (rows of 16-byte
vectors). A CUDA call with another head_dim, or with v's head_dim_v != head_dim (DeepSeek's
(192, 128)), runs them at ``kernel_dim``: q, k and v copied with zero columns appended. Zero
columns change no score (q . k sums zeros) and give o zero columns, which are cut off; the
backward pads do and o the same way (delta = rowsum(dO o) is unchanged) and cuts dq, dk, dv.
softmax_scale stays the caller's (default 1 / sqrt(head_dim) of the unpadded q).

The copies cost memory and time (about one extra read and write of q, k, v, o, and of dO in
the backward, and the kernel runs at the padded width): the price of running at all, as
FlashAttention-2 pads to a multiple of 8 in Python. ``needed`` is the one test for it.
"""

from __future__ import annotations

import numpy as np

from . import config

KERNEL_DIM_STEP = 8  # the kernels' head_dim granularity (16-byte rows of 16-bit elements)


# The Hopper kernels that take v's own head_dim as it is (specs.select_forward_pair /
# select_backward_pair) run by default since their GPU tests passed (tests/test_gpu_head_dim_v.py,
# 130 of 130, H100, 2026-12-05); CUFLASH_HEAD_DIM_V_NATIVE=0 keeps the padded copies.
_native_value = config.env_reader("CUFLASH_HEAD_DIM_V_NATIVE")


def native_pairs() -> bool:
    """Whether a CUDA call with head_dim_v != head_dim may run a kernel that takes the pair
    as it is (where one does; the others keep the copies): unless the switch says 0."""
    return _native_value() not in (b"0", "0")


def native_candidate(head_dim: int, head_dim_v: int) -> bool:
    """A pair (head_dim_v != head_dim) that a kernel may take as it is: the switch on and
    each a kernel width (``launch.takes_pair`` then decides on the plan)."""
    return (head_dim != head_dim_v and native_pairs()
            and head_dim % KERNEL_DIM_STEP == 0 and head_dim_v % KERNEL_DIM_STEP == 0)


def needed(head_dim: int, head_dim_v: int) -> bool:
    """True when the kernels cannot run these head dims as they are."""
    return head_dim != head_dim_v or head_dim % KERNEL_DIM_STEP != 0


def kernel_dim(head_dim: int, head_dim_v: int) -> int:
    """The head_dim the kernels run: the larger of the two, rounded up to a multiple of 8."""
    width = max(head_dim, head_dim_v)
    return -(-width // KERNEL_DIM_STEP) * KERNEL_DIM_STEP


def _xp(x):
    """The array module of a backend array: NumPy's or CuPy's."""
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def pad(x, width: int):
    """A new contiguous array of x's module: ``x`` (..., d) with zero columns up to ``width``."""
    out = _xp(x).zeros((*x.shape[:-1], width), dtype=x.dtype)
    out[..., :x.shape[-1]] = x
    return out


def cut(x, width: int):
    """The first ``width`` columns of a padded result, as a new contiguous array."""
    return _xp(x).ascontiguousarray(x[..., :width])

"""Merge partial attention results over disjoint key sets into attention over their union.

If part i attended to key set K_i and returned (o_i, lse_i), attention over K_1 u ... u K_n is

    lse = log(sum_i exp(lse_i))
    o   = sum_i exp(lse_i - lse) * o_i

because each o_i is a softmax-weighted mean over K_i with total weight exp(lse_i). This is the
combine step of ring attention, split-KV decoding and any other blockwise use of
``attention_forward``. It runs in float32 with the usual max shift (``m = max_i lse_i``) so no
exp overflows; a part whose row saw no key (lse_i = -inf) gets weight 0, and a row that no
part saw gets o = 0, lse = -inf, as ``attention_forward`` gives for such a row.

Framework-neutral: the arithmetic is a handful of array-API calls (where, exp, log, maximum,
isfinite, swapaxes) that NumPy, CuPy, PyTorch and jax.numpy spell alike, so each caller gets
its own array type back, on its own device and stream, and PyTorch autograd and JAX
transformations (jit, grad, vmap) pass through it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .constants import DTYPES
from .interop import array_namespace

__all__ = ["merge_attention"]

_O_DTYPES = DTYPES  # the dtypes every path takes


def merge_attention(outputs: Sequence[Any], lses: Sequence[Any]) -> tuple[Any, Any]:
    """Combine attention results over disjoint key sets into the result over their union.

    Args:
        outputs: a non-empty list or tuple of arrays o_i, each (batch, seqlen_q, heads,
            head_dim), float16, bfloat16 or float32, all of one framework and device.
        lses: as many float32 (batch, heads, seqlen_q) arrays lse_i, the natural-log
            log-sum-exp of each part's scaled scores (``SoftmaxStats.lse``); ``-inf`` where
            that part's row saw no key.

    Returns:
        (o, lse): o (batch, seqlen_q, heads, head_dim) in the outputs' dtype (float32 when
        they differ), lse float32 (batch, heads, seqlen_q); both computed in float32. Rows
        that no part saw get o = 0 and lse = -inf, never NaN. Arrays of the caller's type;
        differentiable under PyTorch autograd and JAX.
    """
    xp, out_dtype = _check_parts(outputs, lses)
    ops = _Ops(xp)
    lses = [ops.float32(x) for x in lses]
    m = lses[0]
    for lse_i in lses[1:]:
        m = xp.maximum(m, lse_i)
    # any finite shift gives the same result, so no gradient flows through it
    m = ops.no_grad(xp.where(xp.isfinite(m), m, 0.0))
    total = None
    acc = None
    for o_i, lse_i in zip(outputs, lses):
        w_i = xp.exp(lse_i - m)  # 0 where lse_i = -inf
        term = _heads_last(w_i) * ops.float32(o_i)
        total = w_i if total is None else total + w_i
        acc = term if acc is None else acc + term
    seen = total > 0
    safe_total = xp.where(seen, total, 1.0)  # log and 1/x stay finite (and so do gradients)
    lse = xp.where(seen, m + xp.log(safe_total), -np.inf)
    o = acc / _heads_last(safe_total)  # acc is 0 on unseen rows
    return ops.cast(o, out_dtype), lse


def _heads_last(w: Any) -> Any:
    """(batch, heads, seqlen_q) -> (batch, seqlen_q, heads, 1), to scale o rows."""
    return w.swapaxes(1, 2)[..., None]


# -- framework differences, kept to these few lines ------------------------------------------


class _Ops:
    """The operations whose spelling differs between numpy/cupy, torch and jax.numpy."""

    def __init__(self, xp: Any):
        self.xp = xp
        self.is_torch = xp.__name__ == "torch"

    def float32(self, x: Any) -> Any:
        return x.to(self.xp.float32) if self.is_torch else x.astype(self.xp.float32)

    def cast(self, x: Any, dtype_name: str) -> Any:
        if self.is_torch:
            return x.to(getattr(self.xp, dtype_name))
        return x.astype(_numpy_dtype(dtype_name))

    def no_grad(self, x: Any) -> Any:
        if self.is_torch:
            return x.detach()
        if self.xp.__name__.startswith("jax"):
            import jax

            return jax.lax.stop_gradient(x)
        return x


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# -- validation ------------------------------------------------------------------------------


def _dtype_name(x: Any) -> str:
    return str(x.dtype).removeprefix("torch.")


def _device(x: Any) -> Any:
    """The device to compare across parts; None where it cannot be read (JAX tracers)."""
    try:
        device = x.device
    except Exception:  # a JAX tracer has no concrete device
        return None
    return None if callable(device) or device is None else str(device)


def _check_parts(outputs: Sequence[Any], lses: Sequence[Any]) -> tuple[Any, str]:
    """(array namespace, result dtype name) after checking every part; raises naming the
    offending argument as ``outputs[i]`` / ``lses[i]``."""
    for seq, name in ((outputs, "outputs"), (lses, "lses")):
        if not isinstance(seq, (list, tuple)) or not seq:
            got = f"an empty {type(seq).__name__}" if isinstance(seq, (list, tuple)) \
                else type(seq).__name__
            raise TypeError(f"{name}: expected a non-empty list or tuple of arrays, got {got}")
    if len(outputs) != len(lses):
        raise ValueError(f"lses: expected one per output ({len(outputs)}), got {len(lses)}")
    xp = array_namespace(outputs[0], "outputs[0]", tracers=True)
    shape = tuple(outputs[0].shape)
    if len(shape) != 4:
        raise ValueError(f"outputs[0]: expected (batch, seqlen_q, heads, head_dim), got shape "
                         f"{shape}")
    batch, seqlen_q, heads, _ = shape
    device = _device(outputs[0])
    dtypes = set()
    for i, (o_i, lse_i) in enumerate(zip(outputs, lses)):
        for x, name, want_shape in ((o_i, f"outputs[{i}]", shape),
                                    (lse_i, f"lses[{i}]", (batch, heads, seqlen_q))):
            if array_namespace(x, name, tracers=True) is not xp:
                raise TypeError(f"{name}: expected a {xp.__name__} array like outputs[0], "
                                f"got {type(x).__name__}")
            if tuple(x.shape) != want_shape:
                raise ValueError(f"{name}: expected shape {want_shape}, got {tuple(x.shape)}")
            if device is not None and _device(x) not in (None, device):
                raise ValueError(f"{name}: expected device {device} like outputs[0], "
                                 f"got {_device(x)}")
        if _dtype_name(o_i) not in _O_DTYPES:
            raise TypeError(f"outputs[{i}]: expected float16, bfloat16 or float32, "
                            f"got {_dtype_name(o_i)}")
        if _dtype_name(lse_i) != "float32":
            raise TypeError(f"lses[{i}]: expected float32, got {_dtype_name(lse_i)}")
        dtypes.add(_dtype_name(o_i))
    return xp, dtypes.pop() if len(dtypes) == 1 else "float32"

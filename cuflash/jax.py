"""JAX adapter: ``flash_attention`` with a custom VJP, usable eagerly and under jit / grad / vmap.

Import it explicitly (``import cuflash.jax``); ``import cuflash`` never imports jax.

What runs where (docs/frameworks.md has the full table):

* Concrete arrays (eager calls, including eager ``jax.grad`` / ``jax.vjp``, whose custom-VJP
  rules JAX calls with concrete arrays): straight through ``cuflash.attention_forward`` /
  ``attention_backward``. CPU arrays run the NumPy path, GPU arrays the CUDA kernels, ordered
  after JAX's pending work through the DLPack stream handshake (see ``cuflash.interop``).
* Traced arrays on the CPU backend (inside ``jax.jit``, ``jax.vmap``, ``lax.scan`` ...): a
  ``jax.pure_callback`` into the NumPy path, with the result shapes and dtypes declared.
  ``vmap_method="broadcast_all"``: a vmapped call hands the callback arrays with extra leading
  axes (every argument tiled to the full batch), and the callback folds all leading axes into
  the batch axis, so a vmap is one call over a bigger batch instead of a Python loop
  (``"sequential"``) over the vmapped axis.
* Traced arrays on a GPU backend: not implemented. Running the kernels inside an XLA
  computation needs an XLA FFI custom call (launching on XLA's stream with no host round trip),
  which cuflash does not have yet; such calls raise ``NotImplementedError`` at trace time
  rather than silently copying the data to the host and back.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import api, validate
from .stats import SoftmaxStats

__all__ = ["flash_attention"]

_VMAP_METHOD = "broadcast_all"
_GPU_UNDER_TRACE = (
    "cuflash.jax.flash_attention was traced (jax.jit, jax.vmap, lax.scan, ...) for the {backend} "
    "backend: running cuflash's CUDA kernels inside an XLA computation needs an XLA FFI "
    "custom call, which is not implemented yet. Call it eagerly on concrete GPU arrays "
    "(jax.grad / jax.vjp of an un-jitted function also works), or trace it for the CPU backend."
)


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _require_cpu_backend() -> None:
    """Under tracing we only know the backend the computation will be lowered for by default."""
    backend = jax.default_backend()
    if backend != "cpu":
        raise NotImplementedError(_GPU_UNDER_TRACE.format(backend=backend))


def _fold_leading(x: np.ndarray, ndim: int) -> np.ndarray:
    """(*lead, batch, ...) with ``ndim`` trailing axes -> (prod(lead) * batch, ...), no copy."""
    return x.reshape((-1,) + x.shape[x.ndim - ndim + 1:])


# -- host callbacks (NumPy path); extra leading axes come from vmap ------------------------------


def _host_forward(q, k, v, *, causal: bool, softmax_scale: float):
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    lead = q.shape[:-4]
    o, stats = api.attention_forward(_fold_leading(q, 4), _fold_leading(k, 4),
                                     _fold_leading(v, 4), causal=causal,
                                     softmax_scale=softmax_scale)
    batch, seqlen_q, heads, _ = q.shape[-4:]
    stats_shape = lead + (batch, heads, seqlen_q)
    return o.reshape(q.shape), stats.m.reshape(stats_shape), stats.l.reshape(stats_shape)


def _host_backward(do, q, k, v, o, m, l, *, causal: bool, softmax_scale: float):
    do, q, k, v, o, m, l = (np.asarray(x) for x in (do, q, k, v, o, m, l))
    folded = [_fold_leading(x, 4) for x in (do, q, k, v, o)]
    stats = SoftmaxStats(_fold_leading(m, 3), _fold_leading(l, 3))
    dq, dk, dv = api.attention_backward(*folded, stats, causal=causal,
                                        softmax_scale=softmax_scale)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


# -- forward and backward on JAX arrays ----------------------------------------------------------


def _stats_spec(q) -> jax.ShapeDtypeStruct:
    *lead, batch, seqlen_q, heads, _ = q.shape
    return jax.ShapeDtypeStruct((*lead, batch, heads, seqlen_q), jnp.float32)


def _shape_only(x) -> np.ndarray:
    """A NumPy stand-in with x's shape and dtype and no real storage (strides 0 but the last),
    so ``validate`` can check a traced array's shape and dtype at trace time."""
    dtype = np.dtype(x.dtype)
    row = np.empty(max(x.shape[-1], 1), dtype=dtype)
    strides = (0,) * (x.ndim - 1) + (dtype.itemsize,)
    return np.lib.stride_tricks.as_strided(row, x.shape, strides, writeable=False)


def _forward(q, k, v, causal: bool, softmax_scale: float):
    """(o, m, l) for concrete or traced arrays."""
    if _is_concrete(q, k, v):
        o, stats = api.attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
        return o, stats.m, stats.l
    _require_cpu_backend()
    # the same errors, at trace time, that an eager call would raise
    validate.check_forward(*(_shape_only(x) for x in (q, k, v)), causal=causal,
                           softmax_scale=softmax_scale)
    specs = (jax.ShapeDtypeStruct(q.shape, q.dtype), _stats_spec(q), _stats_spec(q))
    return jax.pure_callback(partial(_host_forward, causal=causal, softmax_scale=softmax_scale),
                             specs, q, k, v, vmap_method=_VMAP_METHOD)


def _backward(do, q, k, v, o, m, l, causal: bool, softmax_scale: float):
    """(dq, dk, dv) for concrete or traced arrays."""
    if _is_concrete(do, q, k, v, o, m, l):
        return api.attention_backward(do, q, k, v, o, SoftmaxStats(m, l), causal=causal,
                                      softmax_scale=softmax_scale)
    _require_cpu_backend()
    specs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    return jax.pure_callback(partial(_host_backward, causal=causal, softmax_scale=softmax_scale),
                             specs, do, q, k, v, o, m, l, vmap_method=_VMAP_METHOD)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, causal: bool, softmax_scale: float):
    return _forward(q, k, v, causal, softmax_scale)[0]


def _flash_fwd(q, k, v, causal, softmax_scale):
    o, m, l = _forward(q, k, v, causal, softmax_scale)
    return o, (q, k, v, o, m, l)


def _flash_bwd(causal, softmax_scale, residuals, do):
    q, k, v, o, m, l = residuals
    return tuple(_backward(do, q, k, v, o, m, l, causal, softmax_scale))


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None):
    """Exact attention ``softmax(softmax_scale * q @ k^T) @ v`` with a custom VJP.

    Args:
        q: (batch, seqlen_q, heads, head_dim) ``jax.Array``, float16, bfloat16 or float32;
            head_dim a multiple of 8 up to 256.
        k, v: (batch, seqlen_k, heads_kv, head_dim), same dtype; heads a multiple of heads_kv.
        causal: mask keys after the query's position, bottom-right aligned when
            seqlen_q != seqlen_k (see ``cuflash.attention_forward``). A Python bool (static).
        softmax_scale: default ``1 / sqrt(head_dim)``. A Python float (static).

    Returns:
        o: (batch, seqlen_q, heads, head_dim), q's dtype.

    Differentiable in q, k, v (residuals q, k, v, o and the float32 statistics m, l; the
    attention probabilities are recomputed in the backward pass). Works eagerly on CPU and
    GPU arrays, and under ``jax.jit`` / ``jax.grad`` / ``jax.vmap`` (any number of leading
    vmapped axes) on the CPU backend; traced for a GPU backend it raises
    ``NotImplementedError`` (no XLA FFI custom call yet).
    """
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a Python bool (static), got {type(causal).__name__}")
    if jnp.ndim(q) != 4:
        raise ValueError(f"q: expected a 4-D array (batch, seqlen_q, heads, head_dim), "
                         f"got shape {jnp.shape(q)}")
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)  # NumPy in: JAX arrays out
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    return _flash(q, k, v, bool(causal), scale)

"""PyTorch adapter: cuflash as torch operators with autograd and ``torch.compile`` support.

Import it explicitly (``import cuflash.torch``); ``import cuflash`` never imports torch.

Two registered operators, both ``torch.library.custom_op`` with a fake (meta) implementation so
that ``torch.compile`` traces through them without a graph break:

* ``cuflash::flash_fwd(q, k, v, causal, softmax_scale) -> (o, m, l)``
* ``cuflash::flash_bwd(do, q, k, v, o, m, l, causal, softmax_scale, deterministic)
  -> (dq, dk, dv)``

``flash_fwd``'s autograd formula (``torch.library.register_autograd``) saves q, k, v, o, m, l
and calls ``flash_bwd``: the probabilities are recomputed, never stored. Double backward is
not supported (``flash_bwd`` has no autograd formula; torch raises if one is needed).

Where things run: CPU tensors run cuflash's NumPy path inside the operator (synchronously),
CUDA tensors run the CUDA kernels on ``torch.cuda.current_stream()`` of the tensors' device,
so ordering is exactly that of a native torch operator (streams, CUDA graphs aside: the
kernels are launched by CuPy and are not capturable unless CuPy's launches are).

Memory: outputs (o, m, l, dq, dk, dv) are allocated by cuflash, not by torch's caching
allocator: on CUDA by CuPy's memory pool, on the CPU by NumPy, and handed to torch through
DLPack without a copy. torch keeps them alive through the DLPack capsule. They behave like
any other tensor; only torch's memory statistics do not count them.
"""

from __future__ import annotations

import math

import torch

from . import api
from .stats import SoftmaxStats

__all__ = ["flash_attention", "scaled_dot_product_attention"]

_CUDA_ROW_ALIGN = 16  # bytes; docs/kernel_abi.md: every row start is 16-byte aligned


def _resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


# -- the implementations: CUDA tensors on the fast path, CPU tensors through the API ----------


def _forward_impl(q, k, v, causal: bool, softmax_scale: float):
    if q.is_cuda:
        from . import fastpath

        return fastpath.forward(fastpath.torch_backend(), q, k, v, causal, softmax_scale)
    o, stats = api.attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
    return o, stats.m, stats.l


def _backward_impl(do, q, k, v, o, m, l, causal: bool, softmax_scale: float,
                   deterministic: bool):
    do = _kernel_ready(do)
    if q.is_cuda:
        from . import fastpath

        return fastpath.backward(fastpath.torch_backend(), do, q, k, v, o, m, l, causal,
                                 softmax_scale, deterministic)
    return api.attention_backward(do, q, k, v, o, SoftmaxStats(m, l), causal=causal,
                                  softmax_scale=softmax_scale, deterministic=deterministic)


class _EagerFlashAttention(torch.autograd.Function):
    """The same forward and backward as the custom operators, for eager calls: an
    ``autograd.Function`` costs about 20 us less per call than a ``custom_op`` (measured
    with torch 2.13), and eager is where host time shows. ``torch.compile`` uses the ops."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, deterministic):
        o, m, l = _forward_impl(q, k, v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, o, m, l)
        ctx.causal, ctx.softmax_scale, ctx.deterministic = causal, softmax_scale, deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, m, l = ctx.saved_tensors
        dq, dk, dv = _backward_impl(do, q, k, v, o, m, l, ctx.causal, ctx.softmax_scale,
                                    ctx.deterministic)
        return dq, dk, dv, None, None, None


# -- the operators ----------------------------------------------------------------------------


@torch.library.custom_op("cuflash::flash_fwd", mutates_args=())
def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, m, l): o like q (contiguous), m and l float32 (batch, heads, seqlen_q)."""
    return _forward_impl(q, k, v, causal, softmax_scale)


@_flash_fwd.register_fake
def _(q, k, v, causal, softmax_scale):
    batch, seqlen_q, heads, _ = q.shape
    stats_shape = (batch, heads, seqlen_q)
    return (q.new_empty(q.shape), q.new_empty(stats_shape, dtype=torch.float32),
            q.new_empty(stats_shape, dtype=torch.float32))


@torch.library.custom_op("cuflash::flash_bwd", mutates_args=())
def _flash_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               o: torch.Tensor, m: torch.Tensor, l: torch.Tensor, causal: bool,
               softmax_scale: float, deterministic: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, shaped and typed like q, k, v."""
    return _backward_impl(do, q, k, v, o, m, l, causal, softmax_scale, deterministic)


@_flash_bwd.register_fake
def _(do, q, k, v, o, m, l, causal, softmax_scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _kernel_ready(do: torch.Tensor) -> torch.Tensor:
    """The incoming gradient, copied to a contiguous tensor only if the kernels cannot read it.

    The caller chooses the layout of q, k, v (and cuflash never copies those silently), but
    autograd chooses the layout of dO: ``o.sum()`` hands back an expanded tensor whose strides
    are all 0, a transposed loss a transposed gradient. Those are copied here.
    """
    if do.numel() == 0:
        return do
    strides_ok = do.shape[-1] <= 1 or do.stride(-1) == 1
    if strides_ok and do.is_cuda:
        row_bytes = [s * do.element_size() for s, n in zip(do.stride()[:-1], do.shape) if n > 1]
        strides_ok = (do.data_ptr() % _CUDA_ROW_ALIGN == 0
                      and all(b % _CUDA_ROW_ALIGN == 0 for b in row_bytes))
    return do if strides_ok else do.contiguous()


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale = inputs
    o, m, l = output
    ctx.save_for_backward(q, k, v, o, m, l)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale
    ctx.mark_non_differentiable(m, l)


def _backward(ctx, do, dm, dl):
    q, k, v, o, m, l = ctx.saved_tensors
    dq, dk, dv = _flash_bwd(do, q, k, v, o, m, l, ctx.causal, ctx.softmax_scale, False)
    return dq, dk, dv, None, None


torch.library.register_autograd("cuflash::flash_fwd", _backward, setup_context=_setup_context)


# -- public functions -------------------------------------------------------------------------


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """Exact attention ``softmax(softmax_scale * q @ k^T) @ v``, differentiable.

    Args:
        q: (batch, seqlen_q, heads, head_dim) tensor, float16, bfloat16 or float32, on the CPU
            or a CUDA device; head_dim a multiple of 8 up to 256 and contiguous (stride 1).
        k, v: (batch, seqlen_k, heads_kv, head_dim), same dtype and device; heads a multiple
            of heads_kv (MQA / GQA).
        causal: mask keys after the query's position, bottom-right aligned when
            seqlen_q != seqlen_k (see ``cuflash.attention_forward``).
        softmax_scale: default ``1 / sqrt(head_dim)``.

    Returns:
        o: (batch, seqlen_q, heads, head_dim), contiguous, q's dtype and device; allocated by
        cuflash (CuPy's pool on CUDA, NumPy on the CPU) and handed over through DLPack.

    Gradients flow to q, k and v through ``cuflash::flash_bwd``. Works eagerly, under
    autograd and inside ``torch.compile(fullgraph=True)``. On CUDA it runs on torch's current
    stream.
    """
    scale = _resolve_scale(softmax_scale, q.shape[-1])
    if not torch.compiler.is_compiling():
        return _EagerFlashAttention.apply(q, k, v, bool(causal), scale, False)
    o, _, _ = _flash_fwd(q, k, v, bool(causal), scale)
    return o


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 *, is_causal: bool = False,
                                 scale: float | None = None) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``'s layout: (batch, heads, seq, dim).

    query (batch, heads, seqlen_q, head_dim), key and value (batch, heads_kv, seqlen_k,
    head_dim); returns (batch, heads, seqlen_q, head_dim). No copies: the inputs are passed as
    ``.transpose(1, 2)`` views (the kernels take strides) and the result is a transposed view
    of cuflash's (batch, seqlen_q, heads, head_dim) output, so it is not contiguous.
    heads_kv < heads is grouped-query attention (torch spells this ``enable_gqa=True``).

    No ``attn_mask`` or ``dropout_p``: cuflash computes exact, unmasked or causal attention.

    Causal alignment: torch's ``is_causal`` aligns the mask to the top-left corner, cuflash to
    the bottom-right. The two agree when seqlen_q == seqlen_k; for seqlen_q != seqlen_k this
    raises ``ValueError`` rather than silently computing a different mask (call
    ``flash_attention(..., causal=True)`` for the bottom-right mask).
    """
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (batch, heads, seq, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if is_causal and query.shape[2] != key.shape[2]:
        raise ValueError(
            f"is_causal with seqlen_q ({query.shape[2]}) != seqlen_k ({key.shape[2]}): torch "
            "aligns this mask top-left, cuflash bottom-right, and they differ; use "
            "cuflash.torch.flash_attention(q, k, v, causal=True) for the bottom-right mask")
    o = flash_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                        causal=is_causal, softmax_scale=scale)
    return o.transpose(1, 2)

"""PyTorch adapter: cuflash as torch operators with autograd and ``torch.compile`` support.

Import it explicitly (``import cuflash.torch``); ``import cuflash`` never imports torch.

Two registered operators, both ``torch.library.custom_op`` with a fake (meta) implementation so
that ``torch.compile`` traces through them without a graph break (their CUDA kernels are
registered with the dispatcher directly, below, for less host time per call):

* ``cuflash::flash_fwd(q, k, v, causal, softmax_scale, deterministic=False) -> (o, m, l)``
  (``deterministic`` is not used by the forward; autograd hands it to ``flash_bwd``)
* ``cuflash::flash_bwd(do, q, k, v, o, m, l, causal, softmax_scale, deterministic)
  -> (dq, dk, dv)``

``flash_fwd``'s autograd formula (``torch.library.register_autograd``) saves q, k, v, o, m, l
and calls ``flash_bwd``: the probabilities are recomputed, never stored. Double backward is
not supported (``flash_bwd`` has no autograd formula; torch raises if one is needed).

Eager calls go through an ``autograd.Function`` with the same forward and backward (cheaper
per call than the custom-op dispatch); ``torch.compile`` traces the operators.

Where things run: CPU tensors run cuflash's NumPy path (synchronously). CUDA tensors run the
kernels through ``cuflash.fastpath``: validated layouts and plans are memoized, the launches
go on ``torch.cuda.current_stream()`` of the tensors' device, so ordering is that of a
native torch operator, and nothing synchronizes the host, so ``torch.cuda.graph`` and
``torch.compile(mode="reduce-overhead")`` capture them (tests/test_gpu_host_path.py).

Memory: on CUDA, outputs (o, m, l, dq, dk, dv) and the backward's scratch come from torch's
caching allocator (``torch.cuda.memory_allocated`` counts them); on the CPU from NumPy,
handed over through DLPack without a copy.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import api, block_sparse, decode, dropout_sparse_checks, philox, validate
from .stats import SoftmaxStats

__all__ = ["flash_attention", "scaled_dot_product_attention"]

_CUDA_ROW_ALIGN = 16  # bytes; docs/kernel_abi.md: every row start is 16-byte aligned


# -- the implementations: CUDA tensors on the fast path, CPU tensors through the API ----------


def _forward_impl(q, k, v, causal: bool, softmax_scale: float):
    if q.is_cuda and api._kernel_dims(q, v):  # others: the API pads (cuflash/head_pad.py)
        from . import fastpath

        return fastpath.forward(fastpath.torch_backend(), q, k, v, causal, softmax_scale)
    o, stats = api.attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
    return o, stats.m, stats.l


def _backward_impl(do, q, k, v, o, m, l, causal: bool, softmax_scale: float,
                   deterministic: bool):
    do = _kernel_ready(do)
    if (q.is_cuda and api._kernel_dims(q, v)
            and api.backward_as_is(q, causal, deterministic, q.get_device())):
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
        ctx.call = None  # on CUDA the layout's call: the backward then skips most lookups
        if q.is_cuda:
            from . import fastpath

            o, m, l, ctx.call = fastpath.forward_with_call(fastpath.torch_backend(), q, k, v,
                                                           causal, softmax_scale)
        else:
            o, m, l = _forward_impl(q, k, v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, o, m, l)
        ctx.causal, ctx.softmax_scale, ctx.deterministic = causal, softmax_scale, deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, m, l = ctx.saved_tensors
        if ctx.call is not None:
            from . import fastpath

            dq, dk, dv = fastpath.backward(fastpath.torch_backend(), _kernel_ready(do), q, k,
                                           v, o, m, l, ctx.causal, ctx.softmax_scale,
                                           ctx.deterministic, forward_call=ctx.call)
        else:
            dq, dk, dv = _backward_impl(do, q, k, v, o, m, l, ctx.causal, ctx.softmax_scale,
                                        ctx.deterministic)
        return dq, dk, dv, None, None, None


class _ModifiedFlashAttention(torch.autograd.Function):
    """Calls with score modifiers (window, softcap, ALiBi, sinks; docs/masks.md) or a block
    mask (docs/block_sparse.md), through the API (on CUDA its fastpath where it serves the
    call: torch's allocator and current stream). The sinks get a gradient; ALiBi slopes and
    the block mask none (constants, as in FlashAttention)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, deterministic, window, softcap,
                alibi_slopes, sinks, block_mask, block_size, dropout_p):
        mods = dict(window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
        sparse = {} if block_mask is None else dict(block_mask=block_mask,
                                                    block_size=block_size)
        ctx.dropout = {}
        done = None
        if dropout_p and q.is_cuda:  # words drawn on the device: CUDA graphs replay them
            ctx.dropout = dict(dropout_p=dropout_p, dropout_rng=dropout_words(q.device))
            done = _device_words_forward(q, k, v, causal, softmax_scale, deterministic, mods,
                                         sparse, ctx.dropout)
        if done is not None:
            o, stats = done[0], SoftmaxStats(*done[1:])
        else:
            if dropout_p:  # drawn once here; the backward regenerates the same mask from them
                seed, offset = philox_seed_offset(q.device)
                ctx.dropout = dict(dropout_p=dropout_p, dropout_seed=seed,
                                   dropout_offset=offset)
            o, stats = api.attention_forward(q, k, v, causal=causal,
                                             softmax_scale=softmax_scale, **mods, **sparse,
                                             **ctx.dropout)
        ctx.save_for_backward(q, k, v, o, stats.m, stats.l, alibi_slopes, sinks, block_mask)
        ctx.causal, ctx.softmax_scale, ctx.deterministic = causal, softmax_scale, deterministic
        ctx.window, ctx.softcap, ctx.block_size = window, softcap, block_size
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, m, l, alibi_slopes, sinks, block_mask = ctx.saved_tensors
        sparse = {} if block_mask is None else dict(block_mask=block_mask,
                                                    block_size=ctx.block_size)
        if "dropout_rng" in ctx.dropout:  # the forward's words on the device
            grads = _device_words_backward(_kernel_ready(do), q, k, v, o, m, l, ctx,
                                       alibi_slopes, sinks, sparse)
            dsinks = grads[3] if sinks is not None else None
            return (*grads[:3], None, None, None, None, None, None, dsinks, None, None, None)
        grads = api.attention_backward(
            _kernel_ready(do), q, k, v, o, SoftmaxStats(m, l), causal=ctx.causal,
            softmax_scale=ctx.softmax_scale, deterministic=ctx.deterministic,
            window=ctx.window, softcap=ctx.softcap, alibi_slopes=alibi_slopes, sinks=sinks,
            **sparse, **ctx.dropout)
        dsinks = grads[3] if sinks is not None else None
        return (*grads[:3], None, None, None, None, None, None, dsinks, None, None, None)


@torch.compiler.disable  # the general API path is not traceable: a graph break
def _modified_attention(q, k, v, causal, scale, deterministic, window, softcap, alibi_slopes,
                        sinks, block_mask=None, block_size=None, dropout_p=0.0):
    return _ModifiedFlashAttention.apply(q, k, v, causal, scale, deterministic, window,
                                         softcap, alibi_slopes, sinks, block_mask, block_size,
                                         dropout_p)


# -- dropout on CUDA: words on the device, the fast path's replays (CUDA graphs too) --------


def dropout_words(device: torch.device) -> torch.Tensor:
    """Three random 32-bit words (seed low, seed high, offset) drawn on ``device``'s current
    stream from torch's generator, so ``torch.manual_seed`` reproduces them and, in a
    captured graph, each replay draws new ones (torch registers its generator with the
    graph). The kernels read them when they run (``specs.with_device_rng``). int32 storage;
    the kernels read the bits as uint32 (``seed_offset_of`` reads them back)."""
    return torch.randint(-2**31, 2**31, (3,), dtype=torch.int32, device=device)


def seed_offset_of(words: torch.Tensor) -> tuple[int, int]:
    """(dropout_seed, dropout_offset) of ``dropout_words``' words (a host read): the core
    API's arguments for the same mask (``cuflash.dropout_mask`` materialises it)."""
    return philox.seed_offset_of_words(words.tolist())


def _capture_refused(why: str) -> ValueError:
    return ValueError(f"dropout_p: expected a call the CUDA graph path serves, got {why}; "
                      "capture without dropout or run this step eagerly")


def _device_words_forward(q, k, v, causal, softmax_scale, deterministic, mods, sparse,
                          dropout):
    """(o, m, l) of a CUDA dropout call through the fast path (torch's allocator, its current
    stream, the device words), or None where it does not serve the call (the general path
    then takes it with host-drawn words; under CUDA graph capture that raises)."""
    from . import fastpath

    done = None
    # others: padded copies on the general path (the backward's fast path must serve too)
    if api._kernel_dims(q, v) and api.backward_as_is(q, causal, deterministic,
                                                     q.get_device()):
        done = fastpath.forward_modified(fastpath.torch_backend(), q, k, v, causal,
                                         softmax_scale, mods["window"], mods["softcap"],
                                         mods["alibi_slopes"], mods["sinks"], **sparse,
                                         **dropout)
    if done is None and torch.cuda.is_current_stream_capturing():
        raise _capture_refused("a layout the fast path does not take (head dims that need "
                               "padded copies, non-contiguous sinks or slopes)")
    return None if done is None else done[:3]


def _device_words_backward(do, q, k, v, o, m, l, ctx, alibi_slopes, sinks, sparse) -> tuple:
    from . import fastpath

    grads = fastpath.backward_modified(fastpath.torch_backend(), do, q, k, v, o, m, l,
                                       ctx.causal, ctx.softmax_scale, ctx.deterministic,
                                       ctx.window, ctx.softcap, alibi_slopes, sinks, **sparse,
                                       **ctx.dropout)
    if grads is None:  # the forward's layout took this path: the backward's should too
        raise _capture_refused("a backward layout the fast path does not take")
    return grads


# -- dropout's randomness: torch's generator (docs/dropout.md) --------------------------------

_OFFSET_STEP = 4  # torch's Philox offsets advance in multiples of 4; one call takes one step
_MASK64 = (1 << 64) - 1


def philox_seed_offset(device: torch.device) -> tuple[int, int]:
    """(dropout_seed, dropout_offset) for one call with dropout on ``device``, drawn from
    torch's default generator of that device, so ``torch.manual_seed`` reproduces a run.

    CUDA: the generator's seed and its Philox offset, which this advances by one step as
    torch's own random operators do (the next call gets another mask). torch's offset has 64
    bits and cuflash's 32: the high word is folded into the seed. A CUDA graph would freeze
    these host values into every replay, so capture raises. CPU: 64 random bits from torch's
    CPU generator, offset 0. (CUDA calls the fast path serves draw ``dropout_words`` on the
    device instead; this serves the rest, eagerly.)"""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise ValueError(
                "dropout_p: expected no CUDA graph capture (cuflash draws dropout's seed "
                "and offset on the host, and a graph would replay the same mask every "
                "time), got a call during torch.cuda.graph capture; capture without "
                "dropout or run this step eagerly")
        index = device.index if device.index is not None else torch.cuda.current_device()
        gen = torch.cuda.default_generators[index]
        seed, offset = gen.initial_seed(), gen.get_offset()
        gen.set_offset(offset + _OFFSET_STEP)
        seed ^= ((offset >> 32) * 0x9E3779B97F4A7C15) & _MASK64  # golden-ratio spread
        return seed & _MASK64, offset & 0xFFFFFFFF
    draw = torch.randint(0, 1 << 16, (4,), dtype=torch.int64)  # the CPU generator
    return sum(int(w) << (16 * n) for n, w in enumerate(draw)), 0


# -- the operators ----------------------------------------------------------------------------


@torch.library.custom_op("cuflash::flash_fwd", mutates_args=())
def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               softmax_scale: float, deterministic: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, m, l): o like q (contiguous), m and l float32 (batch, heads, seqlen_q)."""
    return _forward_impl(q, k, v, causal, softmax_scale)


@_flash_fwd.register_fake
def _(q, k, v, causal, softmax_scale, deterministic=False):
    batch, seqlen_q, heads, _ = q.shape
    stats_shape = (batch, heads, seqlen_q)
    return (q.new_empty((batch, seqlen_q, heads, v.shape[-1])),
            q.new_empty(stats_shape, dtype=torch.float32),
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
    if do.is_contiguous() and do.data_ptr() % _CUDA_ROW_ALIGN == 0:  # the usual dO
        return do
    if do.numel() == 0:
        return do
    strides_ok = do.shape[-1] <= 1 or do.stride(-1) == 1
    if strides_ok and do.is_cuda:
        row_bytes = [s * do.element_size() for s, n in zip(do.stride()[:-1], do.shape) if n > 1]
        strides_ok = (do.data_ptr() % _CUDA_ROW_ALIGN == 0
                      and all(b % _CUDA_ROW_ALIGN == 0 for b in row_bytes))
    return do if strides_ok else do.contiguous()


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, *rest = inputs
    o, m, l = output
    ctx.save_for_backward(q, k, v, o, m, l)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale
    ctx.deterministic = bool(rest[0]) if rest else False
    ctx.mark_non_differentiable(m, l)


def _backward(ctx, do, dm, dl):
    q, k, v, o, m, l = ctx.saved_tensors
    dq, dk, dv = _flash_bwd(do, q, k, v, o, m, l, ctx.causal, ctx.softmax_scale,
                            ctx.deterministic)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("cuflash::flash_fwd", _backward, setup_context=_setup_context)

# The operators' CUDA kernels, registered with the dispatcher directly: custom_op's own
# kernel wraps every call in Python checks of its contract (no output aliases an input,
# in-place and out= returns) before and after the implementation, host time that a compiled
# step pays eight times (two operators per layer) while the GPU may be waiting. Both
# implementations return fresh tensors, which opcheck verifies (tests/test_gpu_adapters.py).
# CPU tensors keep custom_op's kernel.
_CUDA_KERNELS = torch.library.Library("cuflash", "IMPL")
_CUDA_KERNELS.impl("flash_fwd", lambda q, k, v, causal, softmax_scale, deterministic=False:
                   _forward_impl(q, k, v, causal, softmax_scale), "CUDA")
_CUDA_KERNELS.impl("flash_bwd", _backward_impl, "CUDA")


# -- public functions -------------------------------------------------------------------------


def _check_tensors(named: list[tuple[object, str]]) -> None:
    """torch.Tensors on one device. A meta tensor among real ones would send the op to its
    fake implementation, which returns uninitialised memory; all-meta is shape inference."""
    for t, name in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    first, first_name = named[0]
    for t, name in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected a tensor on {first.device} like {first_name}, "
                             f"got {t.device}")


def _resolve_deterministic(deterministic: bool | None) -> bool:
    """None follows ``torch.use_deterministic_algorithms``; a bool is taken as given."""
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    return validate.check_bool(deterministic, "deterministic")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    softmax_scale: float | None = None,
                    deterministic: bool | None = None, window=None, softcap=None,
                    alibi_slopes: torch.Tensor | None = None,
                    sinks: torch.Tensor | None = None,
                    block_mask: torch.Tensor | None = None,
                    block_size=block_sparse.BLOCK_SIZE,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """Exact attention ``softmax(softmax_scale * q @ k^T) @ v``, differentiable.

    Args:
        q: (batch, seqlen_q, heads, head_dim) tensor, float16, bfloat16 or float32, on the CPU
            or a CUDA device; head_dim from 1 to 256, contiguous (stride 1).
        k, v: (batch, seqlen_k, heads_kv, head_dim) and (..., head_dim_v), same dtype and
            device; heads a multiple of heads_kv (MQA / GQA); head_dim_v from 1 to 256. On
            CUDA a head_dim that is not a multiple of 8, or head_dim_v != head_dim, runs the
            kernels on zero-padded copies (cuflash/head_pad.py: eagerly the general API
            path; under ``torch.compile`` the operators, whose implementations pad, so no
            graph break).
        causal: a bool: mask keys after the query's position, bottom-right aligned when
            seqlen_q != seqlen_k (see ``cuflash.attention_forward``).
        softmax_scale: default ``1 / sqrt(head_dim)``; else a finite positive real number
            (not a bool or a string) that float32 can carry.
        deterministic: the backward computes dQ without atomics, so gradients are bitwise
            identical run to run on CUDA (somewhat slower; the CPU path always is). ``None``
            (default) follows ``torch.are_deterministic_algorithms_enabled()`` at this call.
        window, softcap, alibi_slopes, sinks: the score modifiers of
            ``cuflash.attention_forward`` (docs/masks.md); alibi_slopes and sinks float32
            tensors on q's device. ``sinks`` gets a gradient (float32 (heads,)), the slopes
            none. With any of them the call takes the general API path (eagerly: under
            ``torch.compile`` it is a graph break).
        block_mask, block_size: block-sparse attention (``cuflash.attention_forward``,
            docs/block_sparse.md): a bool tensor on q's device, (batch | 1, heads | 1,
            ceil(seqlen_q / block_m), ceil(seqlen_k / block_n)); no gradient. The general
            API path too.
        dropout_p: a real in [0, 1): dropout on the attention probabilities (docs/dropout.md),
            applied whenever it is above 0 (pass 0.0 in evaluation, as with torch's SDPA).
            Its seed and offset come from torch's default generator of q's device
            (``torch.manual_seed`` reproduces the mask; each call advances the generator);
            the backward regenerates the same mask. Not under CUDA graph capture
            (``ValueError``). The general API path (under ``torch.compile``, a graph break).

    Returns:
        o: (batch, seqlen_q, heads, head_dim_v), contiguous, q's dtype and device (from
        torch's caching allocator on CUDA).

    Gradients flow to q, k and v through ``cuflash::flash_bwd``. Works eagerly, under
    autograd and inside ``torch.compile(fullgraph=True)``. On CUDA it runs on torch's current
    stream. A NaN in a visible score shows as NaN in that row's output and gradients. Bad
    arguments raise ``TypeError`` / ``ValueError`` naming the argument, as the core API does.
    """
    if (type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor and q.is_cuda
            and k.is_cuda and v.is_cuda and q.get_device() == k.get_device() == v.get_device()
            and q.dim() == 4 and type(causal) is bool and window is None and softcap is None
            and alibi_slopes is None and sinks is None
            and dropout_sparse_checks.is_off(dropout_p, block_mask) and api._kernel_dims(q, v)
            and not torch.compiler.is_compiling()):
        return _eager_cuda(q, k, v, causal, softmax_scale, deterministic)
    _check_tensors([(q, "q"), (k, "k"), (v, "v")])
    causal = validate.check_bool(causal, "causal")
    head_dim = q.shape[-1] if q.dim() else 0  # a 0-d q is rejected by the API's validation
    scale = validate.check_scale(softmax_scale, head_dim)
    deterministic = _resolve_deterministic(deterministic)
    dropout_p = philox.check_dropout(0.0 if dropout_p is None else dropout_p, 0, 0)
    # Head dims the kernels lack take the operators under torch.compile (their
    # implementations run the API, which pads or takes the pair: no graph break), eagerly
    # the general path, as the widened backward does.
    if (not api._plain(window, softcap, alibi_slopes, sinks) or block_mask is not None
            or dropout_p
            or (not api._kernel_dims(q, v) and not torch.compiler.is_compiling())
            or _widened_backward(q, k, v, causal, deterministic)):
        return _modified_attention(q, k, v, causal, scale, deterministic, window, softcap,
                                   alibi_slopes, sinks, block_mask, block_size, dropout_p)
    # all-meta tensors go to the op, whose fake implementation infers the shapes
    if not torch.compiler.is_compiling() and q.device.type != "meta":
        return _EagerFlashAttention.apply(q, k, v, causal, scale, deterministic)
    o, _, _ = _flash_fwd(q, k, v, causal, scale, deterministic)
    return o


_Tensor = torch.Tensor  # exactly: subclasses (Parameter, tensor wrappers) take the full path


def _widened_backward(q, k, v, causal: bool, deterministic: bool) -> bool:
    """An eager CUDA call whose backward runs wider on a Hopper kernel (the general path pads
    it, ``plan.backward_head_dim``); under torch.compile the operators' backward decides."""
    return (q.is_cuda and not torch.compiler.is_compiling() and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)
            and not api.backward_as_is(q, causal, deterministic, q.get_device()))


def _eager_cuda(q, k, v, causal: bool, softmax_scale, deterministic) -> torch.Tensor:
    """``flash_attention`` for plain CUDA tensors on one device with no score modifiers, as
    eager calls make it: the fewest checks that keep its errors (the layout's are the fast
    path's), and no autograd node when no gradient is asked for."""
    scale = validate.check_scale(softmax_scale, q.shape[-1])
    deterministic = _resolve_deterministic(deterministic)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if _widened_backward(q, k, v, causal, deterministic):  # the general path pads it
            return _modified_attention(q, k, v, causal, scale, deterministic, None, None, None,
                                       None)
        return _EagerFlashAttention.apply(q, k, v, causal, scale, deterministic)
    from . import fastpath

    return fastpath.forward_output(fastpath.torch_backend(), q, k, v, causal, scale)


def _check_sdpa_extras(attn_mask, dropout_p, enable_gqa) -> None:
    """The SDPA arguments cuflash cannot serve raise; the values it serves pass."""
    if attn_mask is not None:
        raise ValueError(f"attn_mask: cuflash computes unmasked or causal attention only, "
                         f"expected None, got {type(attn_mask).__name__}")
    philox.check_dropout(dropout_p, 0, 0)  # TypeError / ValueError naming dropout_p
    validate.check_bool(enable_gqa, "enable_gqa")


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``'s signature and layout.

    query (batch, heads, seqlen_q, head_dim), key and value (batch, heads_kv, seqlen_k,
    head_dim); returns (batch, heads, seqlen_q, head_dim). No copies: the inputs are passed as
    ``.transpose(1, 2)`` views (the kernels take strides) and the result is a transposed view
    of cuflash's (batch, seqlen_q, heads, head_dim) output, so it is not contiguous.

    Every SDPA argument is accepted; values cuflash cannot serve raise ``ValueError``: an
    ``attn_mask`` other than None and (as torch does) heads != heads_kv without
    ``enable_gqa=True``. ``dropout_p`` is ``flash_attention``'s (torch's generator, as SDPA;
    cuflash's own mask, not SDPA's). Determinism follows ``torch.use_deterministic_algorithms``.

    Causal alignment: torch's ``is_causal`` aligns the mask to the top-left corner, cuflash to
    the bottom-right. The two agree when seqlen_q == seqlen_k; for seqlen_q != seqlen_k this
    raises ``ValueError`` rather than silently computing a different mask (call
    ``flash_attention(..., causal=True)`` for the bottom-right mask).
    """
    _check_tensors([(query, "query"), (key, "key"), (value, "value")])
    _check_sdpa_extras(attn_mask, dropout_p, enable_gqa)
    is_causal = validate.check_bool(is_causal, "is_causal")
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (batch, heads, seq, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"key: expected {query.shape[1]} heads like query (or enable_gqa=True "
                         f"for grouped-query attention), got {key.shape[1]}")
    if is_causal and query.shape[2] != key.shape[2]:
        raise ValueError(
            f"is_causal with seqlen_q ({query.shape[2]}) != seqlen_k ({key.shape[2]}): torch "
            "aligns this mask top-left, cuflash bottom-right, and they differ; use "
            "cuflash.torch.flash_attention(q, k, v, causal=True) for the bottom-right mask")
    o = flash_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                        causal=is_causal, softmax_scale=scale, dropout_p=dropout_p)
    return o.transpose(1, 2)


# -- variable lengths (issue #14; docs/varlen.md) ---------------------------------------------

import dataclasses  # noqa: E402  (kept with the code that uses it: this section is appended)

__all__.append("flash_attention_varlen")


class _VarlenAttention(torch.autograd.Function):
    """Autograd for ``cuflash.attention_varlen_forward``: saves q, k, v, o and the
    statistics and calls ``attention_varlen_backward``; sinks get their gradient."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, layout, options, deterministic):
        from .varlen import attention_varlen_forward

        o, stats = attention_varlen_forward(q, k, v, *layout, **options,
                                            sinks=None if sinks is None else sinks.detach())
        ctx.save_for_backward(q, k, v, o, stats.m, stats.l, sinks)
        ctx.layout, ctx.options, ctx.deterministic = layout, options, deterministic
        # the forward's call without its arrays, so the backward's origin check still runs
        ctx.stats_record = dataclasses.replace(stats, m=None, l=None)
        lse = stats.lse
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        from .varlen import attention_varlen_backward

        q, k, v, o, m, l, sinks = ctx.saved_tensors
        stats = dataclasses.replace(ctx.stats_record, m=m, l=l)
        grads = attention_varlen_backward(_kernel_ready(do), q, k, v, o, stats, *ctx.layout,
                                          **ctx.options, deterministic=ctx.deterministic,
                                          sinks=None if sinks is None else sinks.detach())
        dsinks = grads[3].to(sinks.dtype) if sinks is not None else None
        return grads[0], grads[1], grads[2], dsinks, None, None, None


@torch.compiler.disable  # host-drawn seeds on the general path: a graph break
def _varlen_with_dropout(q, k, v, sinks, layout, options, deterministic, dropout_p):
    seed, offset = philox_seed_offset(q.device)  # drawn once; the backward reuses them
    options = dict(options, dropout_p=dropout_p, dropout_seed=seed, dropout_offset=offset)
    return _VarlenAttention.apply(q, k, v, sinks, layout, options, deterministic)


# Under torch.compile the same forward and backward as two operators (a fake implementation
# each, so the compiler traces through them without a graph break), with the window and
# softcap flattened into scalars (-1 -1: no window; 0: no softcap).


def _varlen_options(max_seqlen_q, max_seqlen_k, causal, softmax_scale, window_left,
                    window_right, softcap, seqused_k, alibi_slopes) -> dict:
    window = None if (window_left, window_right) == (-1, -1) else (window_left, window_right)
    return dict(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, seqused_k=seqused_k,
                causal=causal, softmax_scale=softmax_scale, window=window,
                softcap=softcap or None, alibi_slopes=alibi_slopes)


@torch.library.custom_op("cuflash::varlen_fwd", mutates_args=())
def _varlen_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                   seqused_k: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor],
                   sinks: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                   causal: bool, softmax_scale: float, window_left: int, window_right: int,
                   softcap: float, deterministic: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, m, l): o like q, m and l float32 (heads, total_q). ``deterministic`` is not used
    by the forward; autograd hands it to the backward."""
    from .varlen import attention_varlen_forward

    options = _varlen_options(max_seqlen_q, max_seqlen_k, causal, softmax_scale, window_left,
                              window_right, softcap, seqused_k, alibi_slopes)
    o, stats = attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, **options,
                                        sinks=sinks)
    return o, stats.m, stats.l


@_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, sinks, *scalars):
    stats = (q.shape[1], q.shape[0])
    return (q.new_empty(q.shape), q.new_empty(stats, dtype=torch.float32),
            q.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op("cuflash::varlen_bwd", mutates_args=())
def _varlen_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   o: torch.Tensor, m: torch.Tensor, l: torch.Tensor,
                   cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                   seqused_k: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor],
                   sinks: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                   causal: bool, softmax_scale: float, window_left: int, window_right: int,
                   softcap: float, deterministic: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks); dsinks float32 (heads,), or empty without sinks."""
    from .varlen import attention_varlen_backward

    options = _varlen_options(max_seqlen_q, max_seqlen_k, causal, softmax_scale, window_left,
                              window_right, softcap, seqused_k, alibi_slopes)
    grads = attention_varlen_backward(_kernel_ready(do), q, k, v, o, SoftmaxStats(m, l),
                                      cu_seqlens_q, cu_seqlens_k, **options, sinks=sinks,
                                      deterministic=deterministic)
    dsinks = grads[3] if sinks is not None else q.new_empty((0,), dtype=torch.float32)
    return grads[0], grads[1], grads[2], dsinks


@_varlen_bwd_op.register_fake
def _(do, q, k, v, o, m, l, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, sinks,
      *scalars):
    heads = 0 if sinks is None else sinks.shape[0]
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty((heads,), dtype=torch.float32))


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, seqused_k, alibi_slopes, sinks = inputs[:8]
    o, m, l = output
    ctx.save_for_backward(q, k, v, o, m, l, cu_q, cu_k, seqused_k, alibi_slopes, sinks)
    ctx.scalars, ctx.deterministic = inputs[8:-1], inputs[-1]  # the max lengths ... softcap
    ctx.mark_non_differentiable(m, l)


def _varlen_backward(ctx, do, dm, dl):
    q, k, v, o, m, l, cu_q, cu_k, seqused_k, alibi_slopes, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = _varlen_bwd_op(do, q, k, v, o, m, l, cu_q, cu_k, seqused_k,
                                        alibi_slopes, sinks, *ctx.scalars, ctx.deterministic)
    return (dq, dk, dv, None, None, None, None,
            None if sinks is None else dsinks.to(sinks.dtype), *(None,) * len(ctx.scalars),
            None)


torch.library.register_autograd("cuflash::varlen_fwd", _varlen_backward,
                                setup_context=_varlen_setup_context)


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, *,
                           seqused_k: torch.Tensor | None = None, causal: bool = False,
                           softmax_scale: float | None = None, window=None, softcap=None,
                           alibi_slopes: torch.Tensor | None = None,
                           sinks: torch.Tensor | None = None, deterministic: bool | None = None,
                           return_lse: bool = False, dropout_p: float = 0.0):
    """Differentiable variable-length attention (``flash_attn_varlen_func``'s layout).

    q (total_q, heads, head_dim), k, v (total_k, heads_kv, head_dim); cu_seqlens_q,
    cu_seqlens_k int32 (batch + 1,) tensors on q's device; the other arguments as in
    ``cuflash.attention_varlen_forward`` (causal, windows and ALiBi bottom-right per
    sequence). ``sinks`` float32 (heads,) may require grad: it gets its gradient, summed
    over every sequence; alibi_slopes get none (constants, as in FlashAttention).

    Returns o (total_q, heads, head_dim); with ``return_lse=True`` (o, lse), lse float32
    (heads, total_q) = m + log(l) (-inf for a row that sees no key), not differentiable.

    CPU tensors run cuflash's NumPy path, CUDA tensors the kernels on torch's current
    stream (the offsets stay on the device and are trusted, as in FlashAttention: no host
    sync; docs/varlen.md).
    ``deterministic``: dQ without atomics on CUDA. Under ``torch.compile`` the call is the
    operators ``cuflash::varlen_fwd`` / ``varlen_bwd`` (no graph break); eager calls take an
    ``autograd.Function`` with the same forward and backward (less host time).
    ``dropout_p``: dropout on the probabilities (docs/dropout.md), the seed and offset drawn
    from torch's generator on the host (``philox_seed_offset``: not under CUDA graph capture),
    sequence b dropped as batch entry b of a dense call; the general path (under
    ``torch.compile`` a graph break).
    """
    named = [(q, "q"), (k, "k"), (v, "v"), (cu_seqlens_q, "cu_seqlens_q"),
             (cu_seqlens_k, "cu_seqlens_k")]
    named += [(x, n) for x, n in ((seqused_k, "seqused_k"), (alibi_slopes, "alibi_slopes"),
                                  (sinks, "sinks")) if x is not None]
    _check_tensors(named)
    validate.check_bool(return_lse, "return_lse")
    deterministic = _resolve_deterministic(deterministic)
    dropout_p = philox.check_dropout(0.0 if dropout_p is None else dropout_p, 0, 0)
    if dropout_p:
        o, lse = _varlen_with_dropout(q, k, v, sinks, (cu_seqlens_q, cu_seqlens_k,
                                                        max_seqlen_q, max_seqlen_k),
                                      dict(seqused_k=seqused_k, causal=causal,
                                           softmax_scale=softmax_scale, window=window,
                                           softcap=softcap, alibi_slopes=alibi_slopes),
                                      deterministic, dropout_p)
        return (o, lse) if return_lse else o
    if torch.compiler.is_compiling():  # the operators: no graph break
        left, right = validate.check_window(window) or (-1, -1)
        o, m, l = _varlen_fwd_op(
            q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, sinks,
            max_seqlen_q, max_seqlen_k, validate.check_bool(causal, "causal"),
            validate.check_scale(softmax_scale, q.shape[-1]), left, right,
            float(validate.check_softcap(softcap) or 0.0), deterministic)
        return (o, m + torch.log(l)) if return_lse else o
    options = dict(seqused_k=seqused_k, causal=causal, softmax_scale=softmax_scale,
                   window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    layout = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    o, lse = _VarlenAttention.apply(q, k, v, sinks, layout, options, deterministic)
    return (o, lse) if return_lse else o


# -- decoding against a K/V cache (issue #16) ---------------------------------------------------
# Two operators for torch.compile: ``cuflash::kvcache_append_decode`` declares that it writes
# k_cache / v_cache (the append), so the compiler orders it after earlier writes of the
# caches; ``cuflash::kvcache_decode`` (no k_new) declares no mutation, so a read-only step
# never makes the functionalization pass copy the caches. Eager calls skip the operator
# dispatch and go straight to cuflash.attention_with_kvcache (torch's stream and allocator,
# no sync).


def _kvcache_impl(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table,
                  alibi_slopes, causal, softmax_scale, window_left, window_right, softcap,
                  num_splits):
    return decode.attention_with_kvcache(
        q, k_cache, v_cache, k_new=k_new, v_new=v_new, cache_seqlens=cache_seqlens,
        block_table=block_table, alibi_slopes=alibi_slopes, causal=causal,
        softmax_scale=softmax_scale, window=(window_left, window_right), softcap=softcap,
        num_splits=num_splits, return_softmax_lse=True)


def _kvcache_fake(q, *args):
    batch, q_len, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, q_len), dtype=torch.float32)


@torch.library.custom_op("cuflash::kvcache_append_decode", mutates_args=("k_cache", "v_cache"))
def _kvcache_append_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_new: torch.Tensor, v_new: torch.Tensor,
                           cache_seqlens: torch.Tensor, block_table: torch.Tensor | None,
                           alibi_slopes: torch.Tensor | None, causal: bool,
                           softmax_scale: float | None, window_left: int, window_right: int,
                           softcap: float, num_splits: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    return _kvcache_impl(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table,
                         alibi_slopes, causal, softmax_scale, window_left, window_right,
                         softcap, num_splits)


@torch.library.custom_op("cuflash::kvcache_decode", mutates_args=())
def _kvcache_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cache_seqlens: torch.Tensor | None, block_table: torch.Tensor | None,
                    alibi_slopes: torch.Tensor | None, causal: bool,
                    softmax_scale: float | None, window_left: int, window_right: int,
                    softcap: float, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _kvcache_impl(q, k_cache, v_cache, None, None, cache_seqlens, block_table,
                         alibi_slopes, causal, softmax_scale, window_left, window_right,
                         softcap, num_splits)


_kvcache_append_decode.register_fake(_kvcache_fake)
_kvcache_decode.register_fake(_kvcache_fake)


def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                           k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                           cache_seqlens: torch.Tensor | None = None,
                           block_table: torch.Tensor | None = None, causal: bool = False,
                           softmax_scale: float | None = None, window=None, softcap=None,
                           alibi_slopes: torch.Tensor | None = None,
                           num_splits: int | None = None, return_softmax_lse: bool = False):
    """``cuflash.attention_with_kvcache`` for torch tensors, traceable by ``torch.compile``
    (one operator that mutates k_cache / v_cache; no graph break) and capturable in CUDA
    graphs. Arguments, results and errors as there (docs/decode.md); no autograd (decoding
    needs no gradients: a tensor that requires grad raises TypeError). Under torch.compile,
    k_new and v_new go together with cache_seqlens (the operator's schema requires them)."""
    tensors = [(q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache")] + [
        (t, n) for t, n in ((k_new, "k_new"), (v_new, "v_new"), (cache_seqlens, "cache_seqlens"),
                            (block_table, "block_table"), (alibi_slopes, "alibi_slopes"))
        if t is not None]
    _check_tensors(tensors)
    if not torch.compiler.is_compiling():
        return decode.attention_with_kvcache(
            q, k_cache, v_cache, k_new=k_new, v_new=v_new, cache_seqlens=cache_seqlens,
            block_table=block_table, causal=causal, softmax_scale=softmax_scale, window=window,
            softcap=softcap, alibi_slopes=alibi_slopes, num_splits=num_splits,
            return_softmax_lse=return_softmax_lse)
    # -- traced: scalars checked here (the operator's schema takes plain ints and floats)
    causal = validate.check_bool(causal, "causal")
    return_softmax_lse = validate.check_bool(return_softmax_lse, "return_softmax_lse")
    left, right = validate.check_window(window) or (-1, -1)
    from .decode_checks import check_num_splits

    scalars = (causal, softmax_scale, left, right, validate.check_softcap(softcap) or 0.0,
               check_num_splits(num_splits) or 0)
    if k_new is None and v_new is None:
        o, lse = _kvcache_decode(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes,
                                 *scalars)
    else:
        if k_new is None or v_new is None:  # the eager call's messages
            missing, given = ("k_new", "v_new") if k_new is None else ("v_new", "k_new")
            raise ValueError(f"{missing}: expected an array with {given} (both or neither), "
                             f"got None")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens: expected the int32 lengths the new keys are "
                             "appended at (k_new / v_new given), got None")
        o, lse = _kvcache_append_decode(q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                                        block_table, alibi_slopes, *scalars)
    return (o, lse) if return_softmax_lse else o


__all__ += ["attention_with_kvcache"]

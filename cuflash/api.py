"""The public functions: validate, bring arrays in through DLPack, dispatch, hand back.

Layers, as in FlashAttention-2's interface: ``_flash_fwd`` / ``_flash_bwd`` are pure
functions of backend arrays (NumPy on the CPU, CuPy on CUDA); the public functions wrap them
with validation and the caller's array type.
"""

from __future__ import annotations

import sys

from . import block_sparse, dropout_sparse_checks, fastpath, head_pad, validate
from .interop import caller_stream, export_array, import_array
from .stats import SoftmaxStats

_CAUSAL_PICTURE = """
    Causal masks align to the bottom-right corner when seqlen_q != seqlen_k: query i sees
    key j iff j <= i + seqlen_k - seqlen_q (as in FlashAttention-2). ``x`` = visible.

        seqlen_q = 2, seqlen_k = 5        seqlen_q = 5, seqlen_k = 2
          k: 0 1 2 3 4                      k: 0 1
        q0:  x x x x .                    q0:  . .    <- sees no key: o = 0, m = -inf,
        q1:  x x x x x                    q1:  . .       l = 0, zero gradients
                                          q2:  . .
                                          q3:  x .
                                          q4:  x x
"""


def _cpu_kwargs(modifiers: validate.Modifiers) -> dict:
    return {} if modifiers is validate.NO_MODIFIERS else modifiers.cpu_kwargs()


def _gpu_kwargs(modifiers: validate.Modifiers) -> dict:
    """The modifiers for ``launch``: slopes and sinks as C-contiguous CuPy arrays."""
    if modifiers is validate.NO_MODIFIERS:
        return {}
    import cupy

    kw = modifiers.cpu_kwargs()
    for name in ("alibi_slopes", "sinks"):
        if kw[name] is not None:
            kw[name] = cupy.ascontiguousarray(kw[name])
    return kw


def _flash_fwd(problem: validate.Problem, q, k, v,
               modifiers: validate.Modifiers = validate.NO_MODIFIERS, extra: dict | None = None):
    """(o, m, l) on backend arrays of the problem's device. ``extra``: dropout and the block
    mask (``dropout_sparse_checks.check``)."""
    if problem.device[0] == "cpu":
        from .cpu import flash_forward_cpu

        return flash_forward_cpu(q, k, v, causal=problem.causal,
                                 softmax_scale=problem.softmax_scale, **_cpu_kwargs(modifiers),
                                 **(extra or {}))
    from .launch import flash_forward_gpu

    head_dim_v = v.shape[3]
    padded = (head_pad.needed(problem.head_dim, head_dim_v)
              and not _pair_runs(problem, head_dim_v, modifiers, extra, arrays=(q, k, v)))
    if padded:  # head dims the kernels lack: zero-padded copies (cuflash/head_pad.py)
        width = head_pad.kernel_dim(problem.head_dim, head_dim_v)
        q, k, v = (head_pad.pad(x, width) for x in (q, k, v))
    o, m, l = flash_forward_gpu(q, k, v, dtype=problem.dtype, causal=problem.causal,
                                softmax_scale=problem.softmax_scale, **_gpu_kwargs(modifiers),
                                **(extra or {}))
    return (head_pad.cut(o, head_dim_v) if padded else o), m, l


def _flash_bwd(problem: validate.Problem, do, q, k, v, o, m, l, deterministic: bool,
               stats_of_these_scores: bool = False,
               modifiers: validate.Modifiers = validate.NO_MODIFIERS, extra: dict | None = None):
    """(dq, dk, dv), and dsinks with sinks, on backend arrays of the problem's device.
    ``stats_of_these_scores``: m, l are the forward's own for these q, k (the CPU path may
    then use that the rows of dS sum to zero; see ``cpu._key_center``)."""
    if problem.device[0] == "cpu":
        from .cpu import flash_backward_cpu

        return flash_backward_cpu(do, q, k, v, o, m, l, causal=problem.causal,
                                  softmax_scale=problem.softmax_scale,
                                  center_keys=stats_of_these_scores, **_cpu_kwargs(modifiers),
                                  **(extra or {}))
    from .launch import flash_backward_gpu

    head_dim_v = v.shape[3]
    if _pair_runs(problem, head_dim_v, modifiers, extra, deterministic, (do, q, k, v, o)):
        padded = False  # a kernel takes v's own head_dim as it is
    else:
        width = _backward_width(problem, head_dim_v, deterministic, modifiers, extra)
        padded = width != problem.head_dim or width != head_dim_v
    if padded:  # as in _flash_fwd; o's zero columns leave delta = rowsum(dO o) unchanged
        do, q, k, v, o = (head_pad.pad(x, width) for x in (do, q, k, v, o))
    grads = flash_backward_gpu(do, q, k, v, o, m, l, dtype=problem.dtype,
                               causal=problem.causal, softmax_scale=problem.softmax_scale,
                               deterministic=deterministic, **_gpu_kwargs(modifiers),
                               **(extra or {}))
    if not padded:
        return grads
    dims = (problem.head_dim, problem.head_dim, head_dim_v)
    return (*(head_pad.cut(g, d) for g, d in zip(grads, dims)), *grads[3:])


def _pair_runs(problem, head_dim_v: int, modifiers, extra, deterministic: bool | None = None,
               arrays=()) -> bool:
    """A Hopper kernel takes this head_dim_v != head_dim as it is (no padded copies): the
    forward's (``deterministic`` None) or the backward's plan exists, and ``arrays`` (the
    call's, which it then reads in place) have rows on 16-byte boundaries (the copies do
    either way). Only widths ``head_pad.native_candidate`` allows (the switch on, the
    default)."""
    if not head_pad.native_candidate(problem.head_dim, head_dim_v):
        return False
    try:
        for x in arrays:
            validate.check_alignment(x, "array")
    except ValueError:
        return False
    from dataclasses import replace

    from . import launch, plan

    shape = replace(plan.Shape.of(problem, _mod_flags(problem, modifiers, extra)),
                    head_dim_v=head_dim_v)
    return launch.takes_pair(shape, problem.device[1], deterministic)


def _mod_flags(problem, modifiers, extra):
    """``plan.mod_flags`` of a call's modifiers and ``extra`` (block mask, dropout)."""
    from . import plan

    extra = extra or {}
    return plan.mod_flags(modifiers.window, modifiers.softcap, modifiers.alibi_slopes,
                          modifiers.sinks, problem.causal,
                          block_sparse=extra.get("block_mask") is not None,
                          dropout=bool(extra.get("dropout_p")))


def _backward_width(problem, head_dim_v: int, deterministic: bool, modifiers, extra) -> int:
    """The head_dim a CUDA backward runs at: the kernels' width for these head dims, or a
    wider one with the Hopper backward (``plan.backward_head_dim``)."""
    return _widest_backward(head_pad.kernel_dim(problem.head_dim, head_dim_v), problem.dtype,
                            problem.causal, _mod_flags(problem, modifiers, extra),
                            problem.device[1], deterministic)


def _widest_backward(width: int, dtype: str, causal: bool, flags, device_index: int,
                     deterministic: bool) -> int:
    """``plan.backward_head_dim`` of a backward at ``width`` on this device. Unit sizes: the
    kernel choice depends on none of them, and the memo stays small."""
    from . import launch, plan

    shape = plan.Shape(1, 1, 1, 1, 1, width, dtype, bool(causal), flags)
    return launch.backward_head_dim(shape, device_index, deterministic)


def backward_as_is(q, causal, deterministic: bool, device_index: int) -> bool:
    """A CUDA backward of q's head_dim runs at that width (no wider Hopper kernel to pad to:
    ``plan.backward_head_dim``); the fast paths serve only those. q: a torch or CuPy array
    whose head dims are the kernels' own."""
    from . import plan

    head_dim = int(q.shape[-1])
    if head_dim in plan.HOPPER_BACKWARD_WIDTHS:  # never widened: skip the lookup (hot path)
        return True
    dtype = str(q.dtype).replace("torch.", "")
    return _widest_backward(head_dim, dtype, causal, plan.NO_MODS, device_index,
                            deterministic) == head_dim


def _kernel_dims(q, v) -> bool:
    """The kernels' own head dims (the fast path serves only those; the general path pads
    the others). Malformed shapes count as fine: the fast path's validation names them."""
    try:
        return not head_pad.needed(int(q.shape[-1]), int(v.shape[-1]))
    except (AttributeError, IndexError, TypeError):
        return True


def _fast_dims(q, v, plain: bool) -> bool:
    """Head dims the fast path may serve: the kernels' own; or, for a call without
    modifiers and with ``head_pad.native_pairs()``, q's and v's each a kernel width of its
    own (the fast path declines a pair that no kernel takes, and the general path pads)."""
    if _kernel_dims(q, v):
        return True
    try:
        return plain and head_pad.native_candidate(int(q.shape[-1]), int(v.shape[-1]))
    except (AttributeError, IndexError, TypeError):
        return False


def _fast_backend(arrays, causal, softmax_scale):
    """fastpath's backend for these arrays, or None (NumPy and JAX arrays never take it)."""
    if type(arrays[0]).__module__.split(".")[0] not in ("torch", "cupy"):
        return None
    return fastpath.backend_for(arrays, causal, softmax_scale)


def _fast_stats(call, m, l) -> SoftmaxStats:
    """The stats of a plain fast-path forward: its layout's record, built on the first call."""
    record = call.caller_memo.get("stats")
    if record is None:
        problem = call.problem
        record = call.caller_memo["stats"] = dict(
            causal=problem.causal, softmax_scale=problem.softmax_scale,
            shape_q=validate.shape_q(problem), shape_kv=validate.shape_kv(problem), **_OFF)
    return SoftmaxStats.with_record(m, l, record)


def _refuse_untracked_gradients(named) -> None:
    """A torch tensor that requires grad, with grad mode on, expects autograd to see this
    call; the framework-neutral API would silently drop that gradient."""
    torch = sys.modules.get("torch")  # a torch tensor means torch is imported already
    if torch is None or not torch.is_grad_enabled():
        return
    for x, name in named:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            raise TypeError(
                f"{name}: expected a tensor that does not require grad (cuflash.attention "
                f"records no autograd graph, so the gradient would be lost), got one with "
                f"requires_grad=True; use cuflash.torch.flash_attention for gradients, or "
                f"call under torch.no_grad() / pass {name}.detach()")


_OFF = validate.NO_MODIFIERS.record()  # SoftmaxStats' record of a call without modifiers


def _present(*arrays) -> tuple:
    """The modifier arrays that were given (they join the fast path's framework check)."""
    return tuple(x for x in arrays if x is not None)


def _plain(window, softcap, alibi_slopes, sinks) -> bool:
    """No score modifier given (the only calls fastpath serves)."""
    return window is None and softcap is None and alibi_slopes is None and sinks is None


def attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
              window=None, softcap=None, alibi_slopes=None, sinks=None, dropout_p=0.0,
              dropout_seed=None, dropout_offset=0, block_mask=None,
              block_size=block_sparse.BLOCK_SIZE):
    """Exact scaled dot-product attention ``softmax(softmax_scale * q @ k^T) @ v``.

    Same arguments as ``attention_forward``; returns only the output ``o``.
    """
    o, _ = attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale,
                             window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                             sinks=sinks, dropout_p=dropout_p, dropout_seed=dropout_seed,
                             dropout_offset=dropout_offset, block_mask=block_mask,
                             block_size=block_size)
    return o


def attention_forward(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
                      window=None, softcap=None, alibi_slopes=None, sinks=None, dropout_p=0.0,
                      dropout_seed=None, dropout_offset=0, block_mask=None,
                      block_size=block_sparse.BLOCK_SIZE):
    """Attention forward pass, returning the output and the softmax statistics.

    Args:
        q: (batch, seqlen_q, heads, head_dim) array of any DLPack framework (NumPy, CuPy,
            PyTorch, JAX), float16, bfloat16 or float32; head_dim from 1 to 256.
            Any strides are accepted as long as head_dim is contiguous.
        k, v: (batch, seqlen_k, heads_kv, head_dim), same dtype and device; heads must be a
            multiple of heads_kv (MQA/GQA: query head h reads kv head h // (heads // heads_kv)).
        causal: mask keys after the query's position, aligned bottom-right (see below).
        softmax_scale: multiplies q @ k^T before the softmax; default 1 / sqrt(head_dim).
        window: (left, right) ints >= -1, a sliding window as in FlashAttention-2: query i
            sees key j iff i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q +
            right (-1: that side unbounded); with causal, right is 0. Default None (off).
        softcap: a real >= 0; scores become softcap * tanh(score / softcap) (score =
            softmax_scale * q.k) before ALiBi and the masks. None or 0: off.
        alibi_slopes: float32 (heads,) or (batch, heads); adds
            -slope * |i + seqlen_k - seqlen_q - j| to each score. Default None.
        sinks: float32 (heads,), one logit per head that joins each row's softmax
            normalizer but has no value vector. Default None.
        The four modifiers (docs/masks.md) run on CPU and CUDA arrays (every kernel
        family), and through ``cuflash.torch`` and ``cuflash.jax``.
        dropout_p: a real in [0, 1) (docs/dropout.md): each probability P[b, h, i, j] is
            kept with probability 1 - p and then scaled by 1 / (1 - p), or set to 0, where p
            is dropout_p rounded to a multiple of 1/256 (``cuflash.philox.effective_p``; the
            kernels compare random bytes); stats m, l stay those of the undropped softmax.
            Default 0 (off).
        dropout_seed: int in [0, 2^64), required when dropout_p > 0; dropout_offset: int in
            [0, 2^32), default 0. The kept-mask is a pure function of (seed, offset, b, h, i,
            j) (Philox4x32-10, ``cuflash.dropout_mask`` materialises it); pass the same
            values to ``attention_backward``, and a new offset (or seed) for a new mask.
        block_mask: bool (batch or 1, heads or 1, ceil(seqlen_q / block_size[0]),
            ceil(seqlen_k / block_size[1])) array of q's framework and device
            (docs/block_sparse.md); query i sees key j only where
            block_mask[b, h, i // block_m, j // block_n] is True, on top of causal and window.
            Default None. block_size: (block_m, block_n), default (128, 128).
        Dropout and block_mask run on CPU and CUDA arrays (every kernel family).
        v (and o) may have their own head_dim_v (1 to 256). The CUDA kernels run multiples of
        8 with head_dim_v == head_dim; other CUDA calls run them on zero-padded copies, at
        the cost of the copies (docs/head_dims.md).

    PyTorch tensors that require grad (with grad mode on) are refused: this function records
    no autograd graph; ``cuflash.torch.flash_attention`` does. Inside ``jax.jit`` /
    ``jax.grad`` use ``cuflash.jax.flash_attention``.

    Returns:
        (o, stats): o like q (a new array of the caller's type, dtype and device);
        stats a ``SoftmaxStats`` with float32 (batch, heads, seqlen_q) arrays m and l
        (with sinks, the sink is one more logit in each row's m and l).
    """
    # the fast path takes a block mask (as one more modifier), not dropout
    no_dropout = dropout_sparse_checks.is_off(dropout_p, None)
    plain = _plain(window, softcap, alibi_slopes, sinks) and block_mask is None
    arrays = (q, k, v) if plain else (q, k, v, *_present(alibi_slopes, sinks, block_mask))
    fast = (_fast_backend(arrays, causal, softmax_scale)
            if no_dropout and _fast_dims(q, v, plain) else None)
    if fast is not None and plain:  # CUDA torch / CuPy arrays, none requiring grad
        done = fastpath.forward_with_call(fast, q, k, v, causal, softmax_scale)
        if done is not None:  # None: a head_dim_v no kernel takes (the general path pads)
            o, m, l, call = done
            return o, _fast_stats(call, m, l)
    elif fast is not None:
        done = fastpath.forward_modified(fast, q, k, v, causal, softmax_scale, window, softcap,
                                         alibi_slopes, sinks, block_mask, block_size)
        if done is not None:  # None: a layout the general path serves
            o, m, l, modifiers = done
            scale = validate.check_scale(softmax_scale, q.shape[-1])  # validated by the call
            return o, SoftmaxStats(m, l, causal=causal, softmax_scale=scale,
                                   shape_q=tuple(q.shape), shape_kv=tuple(k.shape),
                                   **modifiers.record())
    _refuse_untracked_gradients([(q, "q"), (k, "k"), (v, "v")])  # the fast path took none
    iq, ik, iv = import_array(q, "q"), import_array(k, "k"), import_array(v, "v")
    problem = validate.check_forward(iq, ik, iv, causal=causal, softmax_scale=softmax_scale,
                                     padded_ok=True)
    modifiers = validate.NO_MODIFIERS if plain else validate.check_modifiers(
        iq, problem, window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    extra = dropout_sparse_checks.check(
        iq, problem, dropout_p=dropout_p, dropout_seed=dropout_seed,
        dropout_offset=dropout_offset, block_mask=block_mask, block_size=block_size)
    with caller_stream(iq):  # export inside: the DLPack handshake names this stream
        o, m, l = _flash_fwd(problem, iq.array, ik.array, iv.array, modifiers, extra)
        stats = SoftmaxStats(export_array(m, like=iq), export_array(l, like=iq),
                             causal=problem.causal, softmax_scale=problem.softmax_scale,
                             shape_q=validate.shape_q(problem),
                             shape_kv=validate.shape_kv(problem),
                             dropout=dropout_sparse_checks.dropout_record(extra),
                             **(_OFF if plain else modifiers.record()))
        return export_array(o, like=iq), stats


def attention_backward(do, q, k, v, o, stats: SoftmaxStats, *, causal: bool = False,
                       softmax_scale: float | None = None, deterministic: bool = False,
                       window=None, softcap=None, alibi_slopes=None, sinks=None,
                       dropout_p=0.0, dropout_seed=None, dropout_offset=0, block_mask=None,
                       block_size=block_sparse.BLOCK_SIZE):
    """Gradients of attention from the forward's output and softmax statistics.

    Recomputes the attention probabilities block by block from q, k and ``stats`` (m, l);
    never builds a seqlen_q x seqlen_k matrix. Extra device memory is at most one float32
    array the size of q (the dQ accumulator).

    Args:
        do: gradient of the loss w.r.t. o, shaped and typed like q.
        q, k, v, o: as passed to / returned by ``attention_forward``.
        stats: the ``SoftmaxStats`` that ``attention_forward`` returned. It records the
            forward's causal, softmax_scale, shapes, score modifiers and dropout; a
            backward call that differs raises ``ValueError`` (hand-built
            ``SoftmaxStats(m, l)`` are not checked).
        causal, softmax_scale, window, softcap, alibi_slopes, sinks, dropout_p,
            dropout_seed, dropout_offset, block_mask, block_size: the values the forward
            pass used (dropout's mask is regenerated from them, never stored; other dropout
            values than the recorded ones raise; the block mask is not recorded).
        deterministic: on CUDA, compute dQ by a separate pass without atomics, so results
            are bitwise identical run to run (somewhat slower). The CPU path always is.

    Returns:
        (dq, dk, dv) shaped and typed like q, k, v; with sinks also dsinks, float32
        (heads,), the gradient of the sink logits: (dq, dk, dv, dsinks).
    """
    if not isinstance(stats, SoftmaxStats):
        raise TypeError(f"stats: expected the SoftmaxStats returned by attention_forward, "
                        f"got {type(stats).__name__}")
    deterministic = validate.check_bool(deterministic, "deterministic")
    no_dropout = dropout_sparse_checks.is_off(dropout_p, None)
    plain = _plain(window, softcap, alibi_slopes, sinks) and block_mask is None
    arrays = (do, q, k, v, o, stats.m, stats.l, *_present(alibi_slopes, sinks, block_mask))
    fast = (_fast_backend(arrays, causal, softmax_scale)
            if no_dropout and _fast_dims(q, v, plain) else None)
    if (fast is not None and _kernel_dims(q, v)
            and not backward_as_is(q, causal, deterministic, fast.device_index(q))):
        fast = None  # a wider Hopper backward: the general path pads
    if fast is not None and plain:
        scale = validate.check_scale(softmax_scale, q.shape[-1])
        validate.check_stats_origin(stats, causal, scale, tuple(q.shape), tuple(k.shape))
        grads = fastpath.backward(fast, do, q, k, v, o, stats.m, stats.l, causal,
                                  softmax_scale, deterministic)
        if grads is not None:  # None: a head_dim_v no kernel takes (the general path pads)
            return grads
    elif fast is not None:
        scale = validate.check_scale(softmax_scale, q.shape[-1])
        given = validate.Modifiers(validate.check_window(window),
                                   validate.check_softcap(softcap), alibi_slopes, sinks)
        validate.check_stats_origin(stats, causal, scale, tuple(q.shape), tuple(k.shape),
                                    given)
        grads = fastpath.backward_modified(fast, do, q, k, v, o, stats.m, stats.l, causal,
                                           softmax_scale, deterministic, window, softcap,
                                           alibi_slopes, sinks, block_mask, block_size)
        if grads is not None:
            return grads
    names = ("do", "q", "k", "v", "o")
    ido, iq, ik, iv, io = (import_array(x, n) for x, n in zip((do, q, k, v, o), names))
    im, il = import_array(stats.m, "stats.m"), import_array(stats.l, "stats.l")
    problem = validate.check_backward(ido, iq, ik, iv, io, im, il, causal=causal,
                                      softmax_scale=softmax_scale, padded_ok=True)
    modifiers = validate.NO_MODIFIERS if plain else validate.check_modifiers(
        iq, problem, window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    extra = dropout_sparse_checks.check(
        iq, problem, dropout_p=dropout_p, dropout_seed=dropout_seed,
        dropout_offset=dropout_offset, block_mask=block_mask, block_size=block_size)
    validate.check_stats_origin(stats, problem.causal, problem.softmax_scale,
                                validate.shape_q(problem), validate.shape_kv(problem),
                                modifiers, dropout_sparse_checks.dropout_record(extra))
    with caller_stream(iq):
        grads = _flash_bwd(problem, ido.array, iq.array, ik.array, iv.array, io.array,
                           im.array, il.array, deterministic, stats.recorded, modifiers, extra)
        return tuple(export_array(g, like=iq) for g in grads)


attention_forward.__doc__ += _CAUSAL_PICTURE
attention_backward.__doc__ += _CAUSAL_PICTURE

__all__ = ["attention", "attention_forward", "attention_backward"]

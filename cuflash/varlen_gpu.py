"""Variable-length attention on CUDA: the dense kernels compiled with ``CF_VARLEN``.

``varlen_forward_gpu`` / ``varlen_backward_gpu`` take a validated ``varlen._VarlenCall``
(CuPy arrays) and mirror ``launch.flash_forward_gpu`` / ``flash_backward_gpu``: plan (pure,
memoized; a kernel family that lacks a modifier raises before anything is allocated),
allocate o and the (heads, total_q) statistics, launch. The kernels read each sequence's
offsets and lengths on the device (``kernels_cu/cf_seq.cuh``): packed operands go in as a
batch of one with stride_b 0, the grid covers max_seqlen tiles and tiles past a sequence's
own length exit at once. Nothing reads the offsets on the host (no sync).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import launch
from . import plan as planning


def _shape(call, dropout: bool = False) -> planning.Shape:
    p, m = call.problem, call.modifiers
    flags = planning.mod_flags(m.window, m.softcap, m.alibi_slopes, m.sinks, p.causal,
                               dropout=dropout)
    flags = replace(flags, varlen=True)
    head_dim_v = call.v.array.shape[2]
    return planning.Shape(p.batch, p.seqlen_q, p.seqlen_k, p.heads, p.heads_kv, p.head_dim,
                          p.dtype, p.causal, flags, total_q=call.q.array.shape[0],
                          total_k=call.k.array.shape[0],
                          head_dim_v=head_dim_v if head_dim_v != p.head_dim else 0)


def pair_runs(call, deterministic: bool | None = None, dropout: bool = False) -> bool:
    """``launch.takes_pair`` for this call's v of its own head_dim."""
    return launch.takes_pair(_shape(call, dropout), call.q.array.device.id, deterministic)


def _packed(a) -> launch.Operand:
    """A (total, heads, head_dim) CuPy array as the kernels' operand: stride_b 0 (the
    kernels address rows through cu_seqlens)."""
    item = a.itemsize
    return launch.Operand(a.data.ptr, 0, a.strides[0] // item, a.strides[1] // item, item)


def _seq_args(call) -> tuple[launch.SeqArgs, tuple]:
    """The kernels' sequence arguments, and the arrays they point into (keep them alive
    until the launches are enqueued)."""
    import cupy

    cu_q, cu_k, used = (None if x is None else cupy.ascontiguousarray(x)
                        for x in call.offsets)
    return launch.SeqArgs(cu_q.data.ptr, cu_k.data.ptr, 0 if used is None else used.data.ptr,
                          call.q.array.shape[0]), (cu_q, cu_k, used)


def _modifiers(call, shape: planning.Shape, dsinks=None) -> launch.ModArgs:
    import cupy

    kw = call.modifiers.cpu_kwargs()
    arrays = {n: None if kw[n] is None else cupy.ascontiguousarray(kw[n])
              for n in ("alibi_slopes", "sinks")}
    return launch.modifiers_of(shape, kw["window"], kw["softcap"], arrays["alibi_slopes"],
                                arrays["sinks"], call.problem.softmax_scale, dsinks), arrays


def _drop(call, dropout: dict | None) -> launch.DropoutArgs | None:
    """The kernels' dropout arguments (``varlen._dropout``'s values; None when off): the
    Philox head index counts sequences as batch entries."""
    if not dropout:
        return None
    return launch.dropout_args(dropout["dropout_p"], dropout["dropout_seed"],
                               dropout["dropout_offset"], call.problem.heads)


def varlen_forward_gpu(call, dropout: dict | None = None):
    """(o, m, l): o (total_q, heads, head_dim_v) of q's dtype, float32 m, l (heads, total_q).
    ``dropout``: ``varlen._dropout``'s keyword arguments (empty or None: off)."""
    q = call.q.array
    shape = _shape(call, bool(dropout))
    plan = None if shape.empty else launch.forward_plan(shape, q.device.id)  # ValueError first
    o = launch._empty(q.shape[:2] + call.v.array.shape[2:], q.dtype, shape.dtype)
    m = launch._empty((shape.heads, shape.total_q), np.float32)
    l = launch._empty((shape.heads, shape.total_q), np.float32)
    if o.size == 0:
        return o, m, l
    mods, arrays = _modifiers(call, shape)
    if shape.empty:  # no sequence has a key: every row sees none
        _fill_no_key(o, m, l, arrays["sinks"])
        return o, m, l
    seq, _keep = _seq_args(call)
    launch.run_forward(plan, *(_packed(x) for x in (q, call.k.array, call.v.array, o)),
                       m.data.ptr, l.data.ptr, call.problem.softmax_scale,
                       launch._current_stream(), q.device.id, mods, seq,
                       drop=_drop(call, dropout))
    return o, m, l


def _fill_no_key(o, m, l, sinks) -> None:
    o.view(np.uint16 if o.itemsize == 2 else np.float32).fill(0)
    if sinks is None:
        m.fill(-np.inf)
        l.fill(0)
    else:
        m[...] = sinks[:, None]
        l.fill(1)


def varlen_backward_gpu(call, do, o, m, l, deterministic: bool, dropout: dict | None = None):
    """(dq, dk, dv) like q, k, v; with sinks also dsinks float32 (heads,). ``dropout``: the
    forward's (its mask regenerated)."""
    import cupy

    q, k, v = call.q.array, call.k.array, call.v.array
    shape = _shape(call, bool(dropout))
    plan = None if shape.empty else launch.backward_plan(shape, q.device.id, deterministic)
    dq = launch._empty(q.shape, q.dtype, shape.dtype)
    dk = launch._empty(k.shape, k.dtype, shape.dtype)
    dv = launch._empty(v.shape, v.dtype, shape.dtype)
    has_sinks = call.modifiers.sinks is not None
    dsinks = cupy.zeros((shape.heads,), np.float32) if has_sinks else None
    grads = (dq, dk, dv, dsinks) if has_sinks else (dq, dk, dv)
    if dq.size == 0 and dk.size == 0:
        return grads
    # Keys past seqused_k belong to no block: zero them (and everything when no kernel runs).
    # Zero bits are +0.0 in every float format.
    zero = (dq, dk, dv) if shape.empty else (dk, dv) if call.offsets[2] is not None else ()
    for t in zero:
        t.view(np.uint8).fill(0)
    if shape.empty:
        return grads
    mods, _arrays = _modifiers(call, shape, dsinks)
    seq, _keep = _seq_args(call)
    workspace = cupy.empty(planning.backward_workspace(plan).total_bytes, np.uint8)
    ops = (_packed(x) for x in (do, q, k, v, o))
    launch.run_backward(plan, *ops, m.data.ptr, l.data.ptr,
                        *(_packed(x) for x in (dq, dk, dv)), call.problem.softmax_scale,
                        workspace.data.ptr, launch._current_stream(), q.device.id, mods, seq,
                        drop=_drop(call, dropout))
    return grads

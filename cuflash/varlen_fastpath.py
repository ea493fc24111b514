"""Variable-length attention on CUDA torch tensors and CuPy arrays with as little host work
per call as ``cuflash.fastpath`` does for the dense layout.

The first call of a layout (shapes, strides, dtypes and devices of every array, the max
lengths, the flags and the modifiers) is validated as the general path validates it
(``varlen.check_varlen``), and its launches are recorded on stand-in addresses
(``cuflash.replay``); a call of a known layout allocates its outputs from the framework and
replays them on the framework's current stream. The offsets stay on the device, as on the
general path. What a layout does not fix is checked on every call: row alignment, and in the
backward the statistics' origin (``varlen.check_origin``).

Calls this path does not take (nothing to launch, offsets or modifier arrays that are not
contiguous, max lengths that are not plain ints, a window that is not a pair, v of its own
head_dim unless a kernel takes the pair as it is) return None: the general path serves them
and raises its errors.
"""

from __future__ import annotations

from typing import NamedTuple

from . import head_pad, launch, validate
from . import plan as planning
from .fastpath import (DECLINED, Backend, _aligned, _contiguous, _modifier_stand_ins, _new,
                       _remember, kernel_takes, optional_ptr, typed)
from .replay import Replay, addresses

_calls: dict = {}

# the stand-ins' order: the order a replay is given the addresses
_FORWARD = ("q", "k", "v", "o", "m", "l", "cu_q", "cu_k", "used", "alibi", "sinks")
_BACKWARD = ("do", "q", "k", "v", "o", "m", "l", "dq", "dk", "dv", "workspace", "cu_q",
             "cu_k", "used", "alibi", "sinks", "dsinks")


class _Known(NamedTuple):
    """What a validated layout fixes (no array of the first call is kept)."""

    problem: validate.Problem
    shapes: tuple  # (shape_q, shape_kv) as the statistics record them
    window: object  # validated
    softcap: object
    replay: Replay
    workspace_bytes: int = 0


class Layout(NamedTuple):
    """A varlen call's arguments besides q, k, v (and the backward's do, o, stats)."""

    cu_q: object
    cu_k: object
    max_q: object
    max_k: object
    seqused_k: object
    causal: object
    softmax_scale: object
    window: object
    softcap: object
    alibi_slopes: object
    sinks: object

    def checked(self, **more) -> dict:
        """``varlen.check_varlen``'s keyword arguments."""
        return dict(seqused_k=self.seqused_k, causal=self.causal,
                    softmax_scale=self.softmax_scale,
                    modifiers=dict(window=self.window, softcap=self.softcap,
                                   alibi_slopes=self.alibi_slopes, sinks=self.sinks), **more)

    def arrays(self) -> tuple:
        return (self.cu_q, self.cu_k, self.seqused_k, self.alibi_slopes, self.sinks)


def _key(backend: Backend, direction: str, arrays: tuple, layout: Layout, *more):
    """The memo key, or None for a call this path leaves to the general one."""
    if type(layout.max_q) is not int or type(layout.max_k) is not int:
        return None
    window = layout.window
    if window is not None and not (isinstance(window, (tuple, list)) and len(window) == 2):
        return None
    if any(x is not None and not _contiguous(x) for x in layout.arrays()):
        return None
    key = (direction, layout.max_q, layout.max_k, layout.causal, layout.softmax_scale,
           typed(window), typed(layout.softcap), *more,
           *(None if x is None else backend.layout(x) for x in arrays + layout.arrays()),
           planning.configuration())
    return key


def _keep(key, known):  # a _Known, or DECLINED
    try:
        return _remember(_calls, key, known)
    except TypeError:  # a flag the checks took but that cannot key a memo: not remembered
        return known


def _known(key) -> _Known | None:
    """The memo's entry, or None (also for an unhashable flag: the checks say what is wrong)."""
    try:
        return _calls.get(key)
    except TypeError:
        return None


def _packed(backend: Backend, x, at) -> launch.Operand:
    """A (total, heads, head_dim) array as the kernels' operand at a stand-in: stride_b 0
    (rows are addressed through the offsets)."""
    op = backend.operand(x)  # a 3-D array: the strides of rows, heads, dims
    return launch.Operand(at, 0, op.stride_b, op.stride_m, op.itemsize)


def _new_packed(shape, at, itemsize: int) -> launch.Operand:
    """A new contiguous (total, heads, head_dim) array of ``shape``, at a stand-in."""
    _, heads, head_dim = shape
    return launch.Operand(at, 0, heads * head_dim, head_dim, itemsize)


def _record(backend: Backend, layout: Layout, max_q: int, max_k: int) -> tuple:
    """VarlenStats' record of this call's sequence layout (``varlen.device_record``)."""
    from .varlen import addresses_record

    used = layout.seqused_k
    return addresses_record((backend.ptr(layout.cu_q), backend.ptr(layout.cu_k),
                             optional_ptr(backend, used) or None), max_q, max_k)


# -- forward -----------------------------------------------------------------------------------


def _pair_declined(q, v) -> bool:
    """v has its own head_dim and no kernel may take it as it is (the general path pads)."""
    d, dv = q.shape[-1], v.shape[-1]
    return d != dv and not head_pad.native_candidate(d, dv)


def forward(backend: Backend, q, k, v, layout: Layout) -> tuple | None:
    """(o, m, l, the VarlenStats fields) like ``varlen.attention_varlen_forward``, or None.
    o has v's head_dim."""
    if _pair_declined(q, v):
        return None
    key = _key(backend, "forward", (q, k, v), layout)
    if key is None:
        return None
    known = _known(key)
    if known is None or known is not DECLINED and not _aligned(backend, q, k, v):
        known = _learn_forward(backend, q, k, v, layout, key)
    if known is None or known is DECLINED:
        return None
    problem = known.problem
    poison = launch.poison_enabled()
    o = _new(backend, (*q.shape[:2], v.shape[-1]), None, q, poison)
    m = _new(backend, (problem.heads, q.shape[0]), backend.float32, q, poison)
    l = _new(backend, (problem.heads, q.shape[0]), backend.float32, q, poison)
    ptr = backend.ptr
    with backend.on_device(backend.device_index(q)):
        known.replay((ptr(q), ptr(k), ptr(v), ptr(o), ptr(m), ptr(l), ptr(layout.cu_q),
                      ptr(layout.cu_k), optional_ptr(backend, layout.seqused_k),
                      optional_ptr(backend, layout.alibi_slopes),
                      optional_ptr(backend, layout.sinks)), backend.stream())
    return o, m, l, _stats_fields(backend, known, layout)


def _stats_fields(backend: Backend, known: _Known, layout: Layout) -> dict:
    modifiers = validate.Modifiers(known.window, known.softcap, layout.alibi_slopes,
                                   layout.sinks)
    shape_q, shape_kv = known.shapes
    return dict(causal=known.problem.causal, softmax_scale=known.problem.softmax_scale,
                shape_q=shape_q, shape_kv=shape_kv,
                seqlens=_record(backend, layout, known.problem.seqlen_q,
                                known.problem.seqlen_k), **modifiers.record())


def _learn_forward(backend: Backend, q, k, v, layout: Layout, key) -> _Known | None:
    from .varlen import check_varlen
    from .varlen_gpu import _shape

    call = check_varlen(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k,
                        **layout.checked())
    shape = _shape(call)
    if shape.empty or q.shape[0] == 0:
        return None
    index = backend.device_index(q)
    if not kernel_takes(shape, index):
        return _keep(key, DECLINED)
    at = dict(zip(_FORWARD, addresses(len(_FORWARD))))
    item = backend.operand(q).itemsize
    ops = [_packed(backend, x, at[n]) for x, n in ((q, "q"), (k, "k"), (v, "v"))]
    ops.append(_new_packed((*q.shape[:2], v.shape[-1]), at["o"], item))  # o: v's head_dim
    seq = launch.SeqArgs(at["cu_q"], at["cu_k"], 0 if layout.seqused_k is None else at["used"],
                         shape.total_q)
    mods = _modifier_stand_ins(shape, call.modifiers, call.problem, layout.alibi_slopes,
                               layout.sinks)(at["alibi"], at["sinks"])
    with backend.on_device(index):
        plan = launch.forward_plan(shape, index)
    replay = Replay.record(lambda stream: launch.run_forward(
        plan, *ops, at["m"], at["l"], call.problem.softmax_scale, stream, index, mods, seq))
    known = _Known(call.problem, call.shapes, call.modifiers.window, call.modifiers.softcap,
                   replay)
    return _keep(key, known)


# -- backward ----------------------------------------------------------------------------------


def backward(backend: Backend, do, q, k, v, o, stats, layout: Layout,
             deterministic: bool) -> tuple | None:
    """(dq, dk, dv[, dsinks]) like ``varlen.attention_varlen_backward``, or None."""
    from .varlen import check_origin

    if _pair_declined(q, v):
        return None
    key = _key(backend, "backward", (do, q, k, v, o, stats.m, stats.l), layout, deterministic)
    if key is None:
        return None
    known = _known(key)
    if known is None or known is not DECLINED and not _aligned(backend, do, q, k, v, o):
        known = _learn_backward(backend, do, q, k, v, o, stats, layout, deterministic, key)
    if known is None or known is DECLINED:
        return None
    problem = known.problem
    check_origin(stats, problem, known.shapes,
                 validate.Modifiers(known.window, known.softcap, layout.alibi_slopes,
                                    layout.sinks),
                 _record(backend, layout, problem.seqlen_q, problem.seqlen_k))
    poison = launch.poison_enabled()
    dq, dk, dv = (_new(backend, x.shape, None, x, poison) for x in (q, k, v))
    if layout.seqused_k is not None:  # keys past seqused_k are no block's: zero them
        backend.fill(dk, 0), backend.fill(dv, 0)
    dsinks = None
    if layout.sinks is not None:  # the preprocess adds each block's share: it starts at zero
        dsinks = backend.empty(tuple(layout.sinks.shape), backend.float32, layout.sinks)
        backend.fill(dsinks, 0)
    ptr = backend.ptr
    with backend.on_device(backend.device_index(q)):
        workspace = backend.empty((known.workspace_bytes,), backend.uint8, q)
        known.replay((ptr(do), ptr(q), ptr(k), ptr(v), ptr(o), ptr(stats.m), ptr(stats.l),
                      ptr(dq), ptr(dk), ptr(dv), ptr(workspace), ptr(layout.cu_q),
                      ptr(layout.cu_k), optional_ptr(backend, layout.seqused_k),
                      optional_ptr(backend, layout.alibi_slopes),
                      optional_ptr(backend, layout.sinks), optional_ptr(backend, dsinks)),
                     backend.stream())
    return (dq, dk, dv) if dsinks is None else (dq, dk, dv, dsinks)


def _learn_backward(backend: Backend, do, q, k, v, o, stats, layout: Layout,
                    deterministic: bool, key) -> _Known | None:
    from .varlen import check_varlen_backward
    from .varlen_gpu import _shape

    call = check_varlen_backward(do, q, k, v, o, stats, layout.cu_q, layout.cu_k,
                                 layout.max_q, layout.max_k, **layout.checked())
    shape = _shape(call)
    if shape.empty or (q.shape[0] == 0 and k.shape[0] == 0):
        return None
    index = backend.device_index(q)
    if not kernel_takes(shape, index, deterministic):
        return _keep(key, DECLINED)
    with backend.on_device(index):
        plan = launch.backward_plan(shape, index, deterministic)
    at = dict(zip(_BACKWARD, addresses(len(_BACKWARD))))
    item = backend.operand(q).itemsize
    ops = [_packed(backend, x, at[n]) for x, n in
           ((do, "do"), (q, "q"), (k, "k"), (v, "v"), (o, "o"))]
    grads = [_new_packed(x.shape, at[n], item) for x, n in ((q, "dq"), (k, "dk"), (v, "dv"))]
    seq = launch.SeqArgs(at["cu_q"], at["cu_k"], 0 if layout.seqused_k is None else at["used"],
                         shape.total_q)
    mods = _modifier_stand_ins(shape, call.modifiers, call.problem, layout.alibi_slopes,
                               layout.sinks)(at["alibi"], at["sinks"], at["dsinks"])
    replay = Replay.record(lambda stream: launch.run_backward(
        plan, *ops, at["m"], at["l"], *grads, call.problem.softmax_scale, at["workspace"],
        stream, index, mods, seq))
    known = _Known(call.problem, call.shapes, call.modifiers.window, call.modifiers.softcap,
                   replay, planning.backward_workspace(plan).total_bytes)
    return _keep(key, known)

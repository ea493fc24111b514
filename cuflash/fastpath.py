"""The CUDA kernels on torch tensors and CuPy arrays with as little host work per call as possible.

What a repeated call does: one dictionary lookup of the arrays' layout (shapes, strides,
dtypes, devices, flags) for the validated problem, one for the plan, the outputs and the
backward's scratch from the framework's own allocator (torch's caching allocator, so
``torch.cuda.memory_allocated`` counts them and CUDA graphs capture them; CuPy's pool), and
the launches on the framework's current stream. No DLPack, no host synchronization, so a
torch call can be captured by ``torch.cuda.graph``. A layout seen for the first time goes
through the full ``cuflash.validate`` checks, which raise the errors the API documents.

A :class:`Backend` is what differs between frameworks; ``forward`` / ``backward`` are shared.
Import this module only where the framework is installed (callers import it lazily).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from . import block_sparse, launch, philox, validate
from . import plan as planning
from .plan import Shape, backward_workspace
from .replay import Replay, addresses

_MAX_LAYOUTS = 4096  # validated layouts kept per direction; more and the cache starts over


class Backend:
    """One framework's arrays: layout key, operand, allocation, stream, device guard."""

    float32 = uint8 = None  # the framework's dtype objects

    def layout(self, x) -> tuple: ...
    def operand(self, x) -> launch.Operand: ...
    def ptr(self, x) -> int: ...
    def empty(self, shape, dtype, like): ...
    def empty_stats(self, shape, like) -> tuple: ...  # m and l, float32
    def fill(self, x, value: float): ...
    def poison(self, x): ...
    def device_index(self, x) -> int: ...
    def stream(self) -> int: ...
    def on_device(self, index: int): ...


class _Torch(Backend):
    def __init__(self):
        import torch

        self.torch = torch
        self.float32, self.uint8 = torch.float32, torch.uint8
        # torch's own C entry for the current stream's handle (what Triton launches on):
        # a fraction of current_stream().cuda_stream's cost, which builds a Stream object
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self._raw_stream = raw or (lambda index: torch.cuda.current_stream(index).cuda_stream)
        # the current device's index without torch.cuda.current_device()'s Python wrapper
        self._current = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
        # the tensor methods themselves: no Python frame per address or device index
        self.ptr, self.device_index = torch.Tensor.data_ptr, torch.Tensor.get_device

    def layout(self, t):
        # get_device(): the index as an int (-1 off CUDA), cheaper than building t.device
        return (t.shape, t.stride(), t.dtype, t.get_device())

    def operand(self, t):
        sb, sm, sh = t.stride()[:3]
        return launch.Operand(t.data_ptr(), sb, sm, sh, t.element_size())

    def empty(self, shape, dtype, like):
        # new_empty: like's device without a torch.device object, and fewer arguments to
        # parse than torch.empty (about a third less host time per allocation)
        return like.new_empty(shape) if dtype is None else like.new_empty(shape, dtype=dtype)

    def empty_stats(self, shape, like):
        return like.new_empty(shape, dtype=self.float32), like.new_empty(shape, dtype=self.float32)

    def fill(self, t, value):
        t.fill_(value)

    def poison(self, t):
        t.fill_(float("nan"))

    def stream(self):
        return self._raw_stream(self._current())

    def on_device(self, index):
        if index == self._current():
            return _NO_SWITCH
        return self.torch.cuda.device(index)


class _Cupy(Backend):
    def __init__(self):
        import cupy

        self.cupy = cupy
        self.float32, self.uint8 = np.float32, np.uint8
        self._current = cupy.cuda.runtime.getDevice

    def layout(self, a):
        # data.device_id: the index as an int; a.device builds a Device object per access
        return (a.shape, a.strides, a.dtype, a.data.device_id)

    def operand(self, a):
        return launch.cupy_operand(a)

    def ptr(self, a):
        return a.data.ptr

    def empty(self, shape, dtype, like):
        index = like.data.device_id
        if index == self._current():  # the usual case: no device switch and back
            return self.cupy.ndarray(shape, dtype or like.dtype)
        with self.cupy.cuda.Device(index):
            return self.cupy.ndarray(shape, dtype or like.dtype)

    def empty_stats(self, shape, like):
        # one allocation, two views: an allocation from CuPy's pool costs the host more
        # than a view of memory already held
        index, nbytes = like.data.device_id, 4 * math.prod(shape)
        with self.on_device(index):
            memory = self.cupy.cuda.alloc(2 * nbytes)
        return (self.cupy.ndarray(shape, self.float32, memptr=memory),
                self.cupy.ndarray(shape, self.float32, memptr=memory + nbytes))

    def fill(self, a, value):
        if value == 0:  # zero bits are +0.0 in every float format (bfloat16 included)
            a.view(np.uint8).fill(0)
        else:
            a.fill(value)

    def poison(self, a):
        launch.poison(a, np.dtype(a.dtype).name)

    def device_index(self, a):
        return a.data.device_id

    def stream(self):
        return self.cupy.cuda.get_current_stream().ptr

    def on_device(self, index):
        if index == self._current():
            return _NO_SWITCH
        return self.cupy.cuda.Device(index)


_NO_SWITCH = contextlib.nullcontext()  # reusable: nullcontext keeps no state
_instances: dict = {}


def _instance(cls) -> Backend:
    """The one backend of a kind, made on first use (so importing this module imports
    neither framework)."""
    backend = _instances.get(cls)
    if backend is None:
        backend = _instances[cls] = cls()
    return backend


def torch_backend() -> Backend:
    return _instance(_Torch)


def cupy_backend() -> Backend:
    return _instance(_Cupy)


# Per direction, validated layouts -> a _Call: the problem, its plan Shape and the recorded
# launches (cuflash.replay), so a repeated call does one lookup, its allocations, its
# addresses and the launches.
_forward_calls: dict = {}
_backward_calls: dict = {}
_modified_calls: dict = {}


def forget_planned_calls() -> None:
    """Drop the plans and recorded calls made so far, so the next call asks the selector
    again (for tests and benchmarks that patch the selector or the registry)."""
    for memo in (planning._forward_plans, planning._backward_plans, _forward_calls,
                 _backward_calls, _modified_calls):
        memo.clear()


@contextlib.contextmanager
def selector_patched(name: str, knob):
    """``specs.<name>`` (select_forward / select_backward) passing every spec it returns
    through ``knob`` (spec -> spec) inside the block, the planned calls forgotten on the way
    in and out: how tests and benchmarks run a candidate the selection does not pick."""
    from . import specs

    plain = getattr(specs, name)
    setattr(specs, name, lambda *a, **k: knob(plain(*a, **k)))
    forget_planned_calls()
    try:
        yield
    finally:
        setattr(specs, name, plain)
        forget_planned_calls()


class _Call(NamedTuple):
    problem: object  # validate.ForwardProblem / BackwardProblem
    shape: Shape
    replay: Replay | None  # None: nothing to launch (Shape.empty)
    window: object = None  # the validated modifiers (the modified path)
    softcap: object = None
    backward: dict = None  # a forward's: dO's layout, flags -> the backward's call (_Call, bytes)
    caller_memo: dict = None  # a forward's: what its caller derives once per layout


def _remember(cache: dict, key: tuple, known):
    if len(cache) >= _MAX_LAYOUTS:
        cache.clear()
    cache[key] = known
    return known


def optional_ptr(backend: Backend, x) -> int:
    """An optional array's address, 0 when absent (the kernels' "off")."""
    return 0 if x is None else backend.ptr(x)


def _aligned(backend: Backend, *arrays) -> bool:
    """Data pointers on 16-byte boundaries (the strides were checked with the layout)."""
    return all(backend.ptr(x) % validate.ROW_ALIGNMENT == 0 for x in arrays)


def _forward_tail(backend: Backend, q, k, v, shape, problem) -> tuple:
    """The forward kernel's parameters a layout fixes (o is written contiguous, at v's
    head_dim)."""
    _, seqlen_q, heads, _ = q.shape
    head_dim = v.shape[3]
    o_strides = (seqlen_q * heads * head_dim, heads * head_dim, head_dim)
    strides = tuple(s for x in (q, k, v) for s in backend.operand(x)[1:4]) + o_strides
    return launch.forward_tail(shape, strides, problem.softmax_scale)


def _record_forward(backend: Backend, q, k, v, shape, problem, mods=None,
                    sparse=None, dropout=None) -> Replay:
    """The forward's launches on stand-ins for (q, k, v, o, m, l[, alibi, sinks[, block
    mask[, dropout's words]]]); ``sparse``: ``bsp(mask_at)``, the block mask's arguments at
    a stand-in; ``dropout``: ``drop(words_at)``, dropout's (``_dropout_stand_in``)."""
    index = backend.device_index(q)
    tail = _forward_tail(backend, q, k, v, shape, problem)
    with backend.on_device(index):
        plan = launch.forward_plan(shape, index)  # the selector's ValueError comes first
        stand_in = addresses(10)
        args = (launch.PLAIN,) if mods is None else (mods(stand_in[6], stand_in[7]),)
        bsp = None if sparse is None else sparse(stand_in[8])
        if bsp is not None:
            bsp.check_tiles(plan.kernel.spec)
        drop = None if dropout is None else dropout(stand_in[9])
        return Replay.record(lambda stream: launch.launch_forward(
            plan, stand_in[:6], tail, backend.operand(q).itemsize, stream, index, *args,
            bsp=bsp, drop=drop))


def _record_backward(backend: Backend, do, q, k, v, o, shape, problem, deterministic,
                     mods=None, sparse=None, dropout=None) -> tuple[Replay, int]:
    """The backward's launches on stand-ins for (do, q, k, v, o, m, l, dq, dk, dv, workspace
    [, alibi, sinks, dsinks[, block mask[, dropout's words]]]), and the workspace's size in
    bytes."""
    index = backend.device_index(q)
    with backend.on_device(index):
        plan = launch.backward_plan(shape, index, deterministic)
    at = addresses(16)
    bsp = None if sparse is None else sparse(at[14])
    drop = None if dropout is None else dropout(at[15])
    if bsp is not None:
        bsp.check_tiles(plan.main.spec, plan.dq.spec if plan.dq is not None else None)
    operands = [launch.Operand(at[i], *backend.operand(x)[1:]) for i, x in
                enumerate((do, q, k, v, o))]
    operands += [launch.Operand(at[7 + i], *_contiguous_strides(x), backend.operand(x).itemsize)
                 for i, x in enumerate((q, k, v))]  # dq, dk, dv: new, contiguous
    args = (launch.PLAIN,) if mods is None else (mods(at[11], at[12], at[13]),)
    replay = Replay.record(lambda stream: launch.run_backward(
        plan, *operands[:5], at[5], at[6], *operands[5:], problem.softmax_scale, at[10],
        stream, index, *args, bsp=bsp, drop=drop))
    return replay, backward_workspace(plan).total_bytes


def _contiguous_strides(x) -> tuple:
    """(stride_b, stride_m, stride_h) in elements of a new contiguous array shaped like x."""
    _, seqlen, heads, head_dim = x.shape
    return (seqlen * heads * head_dim, heads * head_dim, head_dim)


# A layout whose v has its own head_dim that no kernel takes as it is (launch.takes_pair):
# remembered, so that its calls go to the general path (padded copies) at one lookup.
DECLINED = "declined"


def kernel_takes(shape: Shape, index: int, deterministic: bool | None = None) -> bool:
    """A kernel takes ``shape`` as it is: always, unless v has its own head_dim
    (``launch.takes_pair``; ``deterministic`` None: the forward's, else the backward's). The
    dense and varlen fast paths both ask."""
    return not shape.head_dim_v or launch.takes_pair(shape, index, deterministic)


def _pair_shape(backend: Backend, q, v, shape: Shape, deterministic: bool | None):
    """``shape`` with v's own head_dim where it differs from q's, or DECLINED where no kernel
    takes it."""
    if v.shape[3] != shape.head_dim:
        shape = replace(shape, head_dim_v=v.shape[3])
    return shape if kernel_takes(shape, backend.device_index(q), deterministic) else DECLINED


def _forward_call(backend: Backend, q, k, v, causal, softmax_scale):
    """The layout's ``_Call``, or DECLINED (v's own head_dim, no kernel takes it)."""
    key = (causal, softmax_scale, backend.layout(q), backend.layout(k), backend.layout(v),
           planning.configuration())
    known = _forward_calls.get(key)
    if known is DECLINED or known is not None and _aligned(backend, q, k, v):
        return known
    problem = validate.check_forward(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                     pair_ok=True)
    shape = _pair_shape(backend, q, v, Shape.of(problem), None)
    if shape is DECLINED:
        return _remember(_forward_calls, key, DECLINED)
    replay = None if shape.empty else _record_forward(backend, q, k, v, shape, problem)
    return _remember(_forward_calls, key,
                     _Call(problem, shape, replay, backward={}, caller_memo={}))


def _backward_call(backend: Backend, do, q, k, v, o, m, l, causal, softmax_scale,
                   deterministic: bool):
    """(the layout's ``_Call``, workspace bytes), or DECLINED (as ``_forward_call``)."""
    key = (causal, softmax_scale, deterministic, *map(backend.layout, (do, q, k, v, o, m, l)),
           planning.configuration())
    known = _backward_calls.get(key)
    if known is DECLINED or known is not None and _aligned(backend, do, q, k, v, o):
        return known
    problem = validate.check_backward(do, q, k, v, o, m, l, causal=causal,
                                      softmax_scale=softmax_scale, pair_ok=True)
    shape = _pair_shape(backend, q, v, Shape.of(problem), deterministic)
    if shape is DECLINED:
        return _remember(_backward_calls, key, DECLINED)
    if shape.empty:
        return _remember(_backward_calls, key, (_Call(problem, shape, None), 0))
    replay, workspace = _record_backward(backend, do, q, k, v, o, shape, problem,
                                         deterministic)
    return _remember(_backward_calls, key, (_Call(problem, shape, replay), workspace))


def _new(backend: Backend, shape, dtype, like, poison: bool):
    out = backend.empty(shape, dtype, like)
    if poison:
        backend.poison(out)
    return out


def _forward_outputs(backend: Backend, q, v, poison: bool) -> tuple:
    batch, seqlen_q, heads, _ = q.shape
    o = backend.empty((batch, seqlen_q, heads, v.shape[3]), None, q)
    m, l = backend.empty_stats((batch, heads, seqlen_q), q)
    if poison:
        for x in (o, m, l):
            backend.poison(x)
    return o, m, l


def forward(backend: Backend, q, k, v, causal, softmax_scale) -> tuple:
    """(o, m, l) for CUDA arrays: o contiguous like q, m and l float32 (batch, heads, seqlen_q).
    The kernels' own head dims (v's own head_dim: ``forward_with_call``)."""
    return forward_with_call(backend, q, k, v, causal, softmax_scale)[:3]


def forward_with_call(backend: Backend, q, k, v, causal, softmax_scale) -> tuple | None:
    """(o, m, l, the layout's ``_Call``): hand the call to ``backward`` (``forward_call``)
    and the backward skips the layouts of q, k, v, o, m, l (an autograd pair's case).
    o has v's head_dim; None where v's own head_dim is one no kernel takes (the general
    path pads)."""
    call = _forward_call(backend, q, k, v, causal, softmax_scale)
    if call is DECLINED:
        return None
    o, m, l = _forward_outputs(backend, q, v, launch.poison_enabled())
    if call.replay is None:
        if call.shape.seqlen_k == 0:  # every row sees no key
            backend.fill(o, 0), backend.fill(m, float("-inf")), backend.fill(l, 0)
        return o, m, l, call
    ptr = backend.ptr
    with backend.on_device(backend.device_index(q)):
        call.replay((ptr(q), ptr(k), ptr(v), ptr(o), ptr(m), ptr(l)), backend.stream())
    return o, m, l, call


def forward_output(backend: Backend, q, k, v, causal, softmax_scale):
    """o alone, for calls that want no statistics (no gradient): the kernel's m and l go to
    one scratch allocation, which saves the host an allocator call (inference's host path)."""
    call = _forward_call(backend, q, k, v, causal, softmax_scale)
    if call is DECLINED:  # callers pass the kernels' own head dims
        raise ValueError(f"v: expected head_dim {q.shape[3]} like q, got {v.shape[3]}")
    o = _new(backend, (*q.shape[:3], v.shape[3]), None, q, launch.poison_enabled())
    if call.replay is None:
        if call.shape.seqlen_k == 0:  # every row sees no key
            backend.fill(o, 0)
        return o
    batch, seqlen_q, heads, _ = q.shape
    rows = batch * heads * seqlen_q
    stats = backend.empty((2 * rows,), backend.float32, q)  # written, never read
    ptr = backend.ptr
    with backend.on_device(backend.device_index(q)):
        call.replay((ptr(q), ptr(k), ptr(v), ptr(o), ptr(stats), ptr(stats) + 4 * rows),
                    backend.stream())
    return o


def _backward_after(forward_call: _Call, backend: Backend, do, q, k, v, o, m, l, causal,
                    softmax_scale, deterministic: bool) -> tuple:
    """``_backward_call`` for the outputs of ``forward_call`` (whose layouts it fixed): only
    dO's layout is new."""
    key = (backend.layout(do), deterministic, planning.configuration())
    known = forward_call.backward.get(key)
    if known is not None and _aligned(backend, do):
        return known
    known = _backward_call(backend, do, q, k, v, o, m, l, causal, softmax_scale,
                           deterministic)
    forward_call.backward[key] = known
    return known


def backward(backend: Backend, do, q, k, v, o, m, l, causal, softmax_scale,
             deterministic: bool, forward_call: _Call | None = None) -> tuple | None:
    """(dq, dk, dv) for CUDA arrays, contiguous, shaped and typed like q, k, v.
    ``forward_call``: from ``forward_with_call`` when o, m, l are that call's outputs.
    None where v's own head_dim is one no backward kernel takes (the general path pads)."""
    if forward_call is None:
        known = _backward_call(backend, do, q, k, v, o, m, l, causal, softmax_scale,
                               deterministic)
    else:
        known = _backward_after(forward_call, backend, do, q, k, v, o, m, l, causal,
                                softmax_scale, deterministic)
    if known is DECLINED:
        return None
    call, workspace_bytes = known
    poison = launch.poison_enabled()
    dq, dk, dv = (_new(backend, x.shape, None, x, poison) for x in (q, k, v))
    if call.replay is None:  # zero bits are +0.0 in every float format
        for x in (dq, dk, dv):
            backend.fill(x, 0)
        return dq, dk, dv
    ptr = backend.ptr
    with backend.on_device(backend.device_index(q)):
        workspace = backend.empty((workspace_bytes,), backend.uint8, q)
        call.replay((ptr(do), ptr(q), ptr(k), ptr(v), ptr(o), ptr(m), ptr(l), ptr(dq),
                     ptr(dk), ptr(dv), ptr(workspace)), backend.stream())
    return dq, dk, dv


# -- calls with score modifiers (window, softcap, ALiBi slopes, sinks; docs/masks.md) -------
# The same path with the modifiers' layouts in the memo key: the validated window and softcap,
# the plan Shape (its ModFlags pick the kernels) and the recorded launches are remembered; the
# slopes' and sinks' addresses are new per call. Layouts this path does not take (non-contiguous
# slopes or sinks, calls with nothing to compute) return None: the general path serves them.


def typed(value):
    """A modifier's value as a memo key that keeps 1, 1.0 and True apart (the checks accept
    some of them and refuse others), lists as tuples."""
    if isinstance(value, (tuple, list)):
        return tuple(map(typed, value))
    return (type(value), value)


def _mod_layout(backend: Backend, x):
    return None if x is None else backend.layout(x)


def _contiguous(x) -> bool:
    is_contiguous = getattr(x, "is_contiguous", None)  # torch; CuPy has flags
    return is_contiguous() if is_contiguous is not None else x.flags.c_contiguous


def _modified_call(backend: Backend, q, k, v, causal, softmax_scale, window, softcap,
                   alibi_slopes, sinks, direction: str, extra=(),
                   deterministic: bool = False, block_mask=None,
                   block_size=block_sparse.BLOCK_SIZE, dropout_p=0.0,
                   dropout_rng=None) -> tuple | None:
    key = (direction, causal, softmax_scale, deterministic,
           typed(window), typed(softcap),
           _mod_layout(backend, alibi_slopes), _mod_layout(backend, sinks),
           _mod_layout(backend, block_mask), typed(block_size), typed(dropout_p),
           _mod_layout(backend, dropout_rng),
           *map(backend.layout, (q, k, v, *extra)), planning.configuration())
    known = _modified_calls.get(key)
    if known is not None and _aligned(backend, q, k, v, *extra[:2]):
        return known
    if direction == "forward":
        problem = validate.check_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
    else:  # extra: do, o, m, l
        problem = validate.check_backward(*extra[:1], q, k, v, *extra[1:], causal=causal,
                                          softmax_scale=softmax_scale)
    mods = validate.check_modifiers(q, problem, window=window, softcap=softcap,
                                    alibi_slopes=alibi_slopes, sinks=sinks)
    sparse = None
    if block_mask is not None:
        if backend.device_index(block_mask) != backend.device_index(q):
            return None  # the general path names the devices
        size = block_sparse.check_block_size(block_size)
        block_sparse.check_block_mask(block_mask, size, problem.batch, problem.heads,
                                      problem.seqlen_q, problem.seqlen_k)
        mask_shape, mask_strides = tuple(block_mask.shape), _byte_strides(block_mask)

        def sparse(mask_at):
            return launch.block_mask_args_at(mask_at, mask_shape, mask_strides, size)
    if any(x is not None and not _contiguous(x)
           for x in (alibi_slopes, sinks, block_mask, dropout_rng)):
        return None
    dropout = _dropout_stand_in(backend, q, problem, dropout_p, dropout_rng)
    flags = planning.mod_flags(mods.window, mods.softcap, alibi_slopes, sinks, problem.causal,
                               block_mask is not None, dropout is not None)
    shape = Shape.of(problem, flags)
    if shape.empty:
        return None
    mod_args = _modifier_stand_ins(shape, mods, problem, alibi_slopes, sinks)
    if direction == "forward":
        replay = _record_forward(backend, q, k, v, shape, problem, mod_args, sparse, dropout)
        workspace = 0
    else:
        do, o = extra[:2]
        replay, workspace = _record_backward(backend, do, q, k, v, o, shape, problem,
                                             deterministic, mod_args, sparse, dropout)
    known = (_Call(problem, shape, replay, mods.window, mods.softcap), workspace)
    return _remember(_modified_calls, key, known)


_DSINKS = object()  # stands for the dsinks a backward call allocates


def _dropout_stand_in(backend: Backend, q, problem, dropout_p, dropout_rng):
    """``drop(words_at)``: dropout's ``launch.DropoutArgs`` with the words at a stand-in
    address, or None without dropout. The fast path takes dropout only with its words on the
    device (``dropout_rng``: three 32-bit words, seed low, seed high, offset, that the
    kernels read when they run: CUDA graphs replay them); host seeds take the general
    path."""
    p = philox.check_dropout(dropout_p, 0, 0)
    if p == 0:
        return None
    if dropout_rng is None or tuple(dropout_rng.shape) != (3,) or (
            backend.device_index(dropout_rng) != backend.device_index(q)):
        raise ValueError(f"dropout_rng: expected 3 words on q's device, got "
                         f"{None if dropout_rng is None else tuple(dropout_rng.shape)}")
    return lambda words_at: launch.dropout_args(p, None, 0, problem.heads, rng=words_at)


def _byte_strides(x) -> tuple:
    """Strides in bytes (torch counts elements; a bool element is one byte either way)."""
    strides = x.stride() if callable(getattr(x, "stride", None)) else x.strides
    return tuple(strides)


def _modifier_stand_ins(shape, mods, problem, alibi_slopes, sinks):
    """``args(alibi_at, sinks_at[, dsinks_at])``: the call's ``launch.ModArgs`` with stand-in
    addresses for the slopes, the sinks and (backward) the sinks' gradient."""
    def args(alibi_at, sinks_at, dsinks_at=None):
        at = {id(alibi_slopes): alibi_at, id(sinks): sinks_at, id(_DSINKS): dsinks_at}
        dsinks = _DSINKS if dsinks_at is not None and sinks is not None else None
        return launch.modifiers_of(shape, mods.window, mods.softcap, alibi_slopes, sinks,
                                   problem.softmax_scale, dsinks, ptr=lambda x: at[id(x)])
    return args


def forward_modified(backend: Backend, q, k, v, causal, softmax_scale, window, softcap,
                     alibi_slopes, sinks, block_mask=None,
                     block_size=block_sparse.BLOCK_SIZE, dropout_p=0.0,
                     dropout_rng=None) -> tuple | None:
    """(o, m, l, the validated ``validate.Modifiers``) like ``forward`` for a call with score
    modifiers, a block mask or dropout with its words on the device (``dropout_rng``,
    ``_dropout_stand_in``), or None when the general path must take it (raises the API's
    errors for bad arguments)."""
    known = _modified_call(backend, q, k, v, causal, softmax_scale, window, softcap,
                           alibi_slopes, sinks, "forward", block_mask=block_mask,
                           block_size=block_size, dropout_p=dropout_p,
                           dropout_rng=dropout_rng)
    if known is None:
        return None
    call = known[0]
    o, m, l = _forward_outputs(backend, q, v, launch.poison_enabled())
    ptr = backend.ptr
    with backend.on_device(backend.device_index(q)):
        call.replay((ptr(q), ptr(k), ptr(v), ptr(o), ptr(m), ptr(l),
                     optional_ptr(backend, alibi_slopes), optional_ptr(backend, sinks),
                     optional_ptr(backend, block_mask), optional_ptr(backend, dropout_rng)),
                    backend.stream())
    return o, m, l, validate.Modifiers(call.window, call.softcap, alibi_slopes, sinks)


def backward_modified(backend: Backend, do, q, k, v, o, m, l, causal, softmax_scale,
                      deterministic: bool, window, softcap, alibi_slopes, sinks,
                      block_mask=None, block_size=block_sparse.BLOCK_SIZE, dropout_p=0.0,
                      dropout_rng=None) -> tuple | None:
    """(dq, dk, dv[, dsinks]) like ``backward`` for a call with score modifiers, a block
    mask or dropout with its words on the device (the forward's), or None."""
    known = _modified_call(backend, q, k, v, causal, softmax_scale, window, softcap,
                           alibi_slopes, sinks, "backward", (do, o, m, l), deterministic,
                           block_mask, block_size, dropout_p, dropout_rng)
    if known is None:
        return None
    call, workspace_bytes = known
    poison = launch.poison_enabled()
    dq, dk, dv = (_new(backend, x.shape, None, x, poison) for x in (q, k, v))
    dsinks = None
    if sinks is not None:  # the preprocess adds each block's share: it starts at zero
        dsinks = backend.empty(tuple(sinks.shape), backend.float32, sinks)
        backend.fill(dsinks, 0)
    ptr = backend.ptr
    with backend.on_device(backend.device_index(q)):
        workspace = backend.empty((workspace_bytes,), backend.uint8, q)
        call.replay((ptr(do), ptr(q), ptr(k), ptr(v), ptr(o), ptr(m), ptr(l), ptr(dq),
                     ptr(dk), ptr(dv), ptr(workspace), optional_ptr(backend, alibi_slopes),
                     optional_ptr(backend, sinks), optional_ptr(backend, dsinks),
                     optional_ptr(backend, block_mask), optional_ptr(backend, dropout_rng)),
                    backend.stream())
    return (dq, dk, dv) if sinks is None else (dq, dk, dv, dsinks)


# -- which calls may take this path --------------------------------------------------------

_backends: dict = {}  # array type -> Backend or None


def _backend_of_type(cls) -> Backend | None:
    root = cls.__module__.split(".")[0]
    if root == "torch":
        import torch

        return torch_backend() if issubclass(cls, torch.Tensor) else None
    if root == "cupy":
        import cupy

        return cupy_backend() if issubclass(cls, cupy.ndarray) else None
    return None


def backend_for(arrays, causal, softmax_scale) -> Backend | None:
    """The backend when every array is a CUDA array of one fast framework and the flags have
    their exact types (``1 == True`` and ``True == 1.0`` would share a cache key); else None,
    and the caller takes the general path, which validates everything and raises."""
    if type(causal) is not bool or not (softmax_scale is None or type(softmax_scale) is float):
        return None
    cls = type(arrays[0])
    backend = _backends.get(cls, False)
    if backend is False:
        backend = _backends[cls] = _backend_of_type(cls)
    if backend is None or any(type(x) is not cls for x in arrays):
        return None
    if isinstance(backend, _Torch):
        if not all(x.is_cuda for x in arrays):
            return None
        if backend.torch.is_grad_enabled() and any(x.requires_grad for x in arrays):
            return None  # the general path says what to do instead
    return backend

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

import numpy as np

from . import launch, validate
from . import plan as planning
from .plan import Shape, backward_workspace

_MAX_LAYOUTS = 4096  # validated layouts kept per direction; more and the cache starts over


class Backend:
    """One framework's arrays: layout key, operand, allocation, stream, device guard."""

    float32 = uint8 = None  # the framework's dtype objects

    def layout(self, x) -> tuple: ...
    def operand(self, x) -> launch.Operand: ...
    def ptr(self, x) -> int: ...
    def empty(self, shape, dtype, like): ...
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

    def layout(self, t):
        # get_device(): the index as an int (-1 off CUDA), cheaper than building t.device
        return (t.shape, t.stride(), t.dtype, t.get_device())

    def operand(self, t):
        sb, sm, sh = t.stride()[:3]
        return launch.Operand(t.data_ptr(), sb, sm, sh, t.element_size())

    def ptr(self, t):
        return t.data_ptr()

    def empty(self, shape, dtype, like):
        # an int device is a CUDA ordinal: no torch.device object built per allocation
        return self.torch.empty(shape, dtype=dtype or like.dtype, device=like.get_device())

    def fill(self, t, value):
        t.fill_(value)

    def poison(self, t):
        t.fill_(float("nan"))

    def device_index(self, t):
        return t.get_device()

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

    def layout(self, a):
        return (a.shape, a.strides, a.dtype, a.device.id)

    def operand(self, a):
        return launch.cupy_operand(a)

    def ptr(self, a):
        return a.data.ptr

    def empty(self, shape, dtype, like):
        with self.cupy.cuda.Device(like.device.id):
            return self.cupy.empty(shape, dtype=dtype or like.dtype)

    def fill(self, a, value):
        if value == 0:  # zero bits are +0.0 in every float format (bfloat16 included)
            a.view(np.uint8).fill(0)
        else:
            a.fill(value)

    def poison(self, a):
        launch.poison(a, np.dtype(a.dtype).name)

    def device_index(self, a):
        return a.device.id

    def stream(self):
        return self.cupy.cuda.get_current_stream().ptr

    def on_device(self, index):
        if index == self.cupy.cuda.runtime.getDevice():
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

_forward_problems: dict = {}
_backward_problems: dict = {}


def _remember(cache: dict, key: tuple, known: tuple) -> tuple:
    if len(cache) >= _MAX_LAYOUTS:
        cache.clear()
    cache[key] = known
    return known


def _aligned(backend: Backend, *arrays) -> bool:
    """Data pointers on 16-byte boundaries (the strides were checked with the layout)."""
    return all(backend.ptr(x) % validate.ROW_ALIGNMENT == 0 for x in arrays)


def forward_problem(backend: Backend, q, k, v, causal, softmax_scale) -> tuple:
    """(validated problem, its plan Shape, the kernel parameters the layout fixes), from the
    memo when the layout was seen before."""
    key = (causal, softmax_scale, backend.layout(q), backend.layout(k), backend.layout(v))
    known = _forward_problems.get(key)
    if known is not None and _aligned(backend, q, k, v):
        return known
    problem = validate.check_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
    shape = Shape.of(problem)
    return _remember(_forward_problems, key,
                     (problem, shape, _forward_tail(backend, q, k, v, shape, problem)))


def _forward_tail(backend: Backend, q, k, v, shape, problem) -> tuple:
    """The forward kernel's parameters a layout fixes (o is written contiguous)."""
    _, seqlen_q, heads, head_dim = q.shape
    o_strides = (seqlen_q * heads * head_dim, heads * head_dim, head_dim)
    strides = tuple(s for x in (q, k, v) for s in backend.operand(x)[1:4]) + o_strides
    return launch.forward_tail(shape, strides, problem.softmax_scale)


def backward_problem(backend: Backend, do, q, k, v, o, m, l, causal,
                     softmax_scale) -> tuple:
    key = (causal, softmax_scale, *map(backend.layout, (do, q, k, v, o, m, l)))
    known = _backward_problems.get(key)
    if known is not None and _aligned(backend, do, q, k, v, o):
        return known
    problem = validate.check_backward(do, q, k, v, o, m, l, causal=causal,
                                      softmax_scale=softmax_scale)
    return _remember(_backward_problems, key, (problem, Shape.of(problem)))


def _new(backend: Backend, shape, dtype, like, poison: bool):
    out = backend.empty(shape, dtype, like)
    if poison:
        backend.poison(out)
    return out


def forward(backend: Backend, q, k, v, causal, softmax_scale) -> tuple:
    """(o, m, l) for CUDA arrays: o contiguous like q, m and l float32 (batch, heads, seqlen_q)."""
    problem, shape, tail = forward_problem(backend, q, k, v, causal, softmax_scale)
    batch, seqlen_q, heads, _ = q.shape
    f32, poison = backend.float32, launch.poison_enabled()
    o = _new(backend, q.shape, None, q, poison)
    m = _new(backend, (batch, heads, seqlen_q), f32, q, poison)
    l = _new(backend, (batch, heads, seqlen_q), f32, q, poison)
    if shape.empty:
        if shape.seqlen_k == 0:  # every row sees no key
            backend.fill(o, 0), backend.fill(m, float("-inf")), backend.fill(l, 0)
        return o, m, l
    index = backend.device_index(q)
    ptr = backend.ptr
    with backend.on_device(index):
        launch.launch_forward(launch.forward_plan(shape, index),
                              (ptr(q), ptr(k), ptr(v), ptr(o), ptr(m), ptr(l)), tail,
                              o.itemsize,
                              backend.stream(), index)
    return o, m, l


def backward(backend: Backend, do, q, k, v, o, m, l, causal, softmax_scale,
             deterministic: bool) -> tuple:
    """(dq, dk, dv) for CUDA arrays, contiguous, shaped and typed like q, k, v."""
    problem, shape = backward_problem(backend, do, q, k, v, o, m, l, causal, softmax_scale)
    poison = launch.poison_enabled()
    dq, dk, dv = (_new(backend, x.shape, None, x, poison) for x in (q, k, v))
    if shape.empty:  # zero bits are +0.0 in every float format
        for x in (dq, dk, dv):
            backend.fill(x, 0)
        return dq, dk, dv
    index = backend.device_index(q)
    with backend.on_device(index):
        plan = launch.backward_plan(shape, index, deterministic)
        workspace = backend.empty((backward_workspace(plan).total_bytes,), backend.uint8, q)
        launch.run_backward(plan, *map(backend.operand, (do, q, k, v, o)), backend.ptr(m),
                            backend.ptr(l), *map(backend.operand, (dq, dk, dv)),
                            problem.softmax_scale, backend.ptr(workspace), backend.stream(),
                            index)
    return dq, dk, dv


# -- calls with score modifiers (window, softcap, ALiBi slopes, sinks; docs/masks.md) -------
# The same path with the modifiers' layouts in the memo key: the validated window and softcap,
# the plan Shape (its ModFlags pick the kernels) and the kernel tail are remembered; the slopes'
# and sinks' addresses are read per call. Layouts this path does not take (non-contiguous
# slopes or sinks, calls with nothing to compute) return None: the general path serves them.

_modified_problems: dict = {}


def _mod_layout(backend: Backend, x):
    return None if x is None else backend.layout(x)


def _contiguous(x) -> bool:
    is_contiguous = getattr(x, "is_contiguous", None)  # torch; CuPy has flags
    return is_contiguous() if is_contiguous is not None else x.flags.c_contiguous


def _modified_problem(backend: Backend, q, k, v, causal, softmax_scale, window, softcap,
                      alibi_slopes, sinks, direction: str, extra=()) -> tuple | None:
    key = (direction, causal, softmax_scale, window if window is None else tuple(window),
           softcap, _mod_layout(backend, alibi_slopes), _mod_layout(backend, sinks),
           *map(backend.layout, (q, k, v, *extra)))
    known = _modified_problems.get(key)
    if known is not None and _aligned(backend, q, k, v, *extra[:2]):
        return known
    if direction == "forward":
        problem = validate.check_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
    else:  # extra: do, o, m, l
        problem = validate.check_backward(*extra[:1], q, k, v, *extra[1:], causal=causal,
                                          softmax_scale=softmax_scale)
    mods = validate.check_modifiers(q, problem, window=window, softcap=softcap,
                                    alibi_slopes=alibi_slopes, sinks=sinks)
    if any(x is not None and not _contiguous(x) for x in (alibi_slopes, sinks)):
        return None
    flags = planning.mod_flags(mods.window, mods.softcap, alibi_slopes, sinks, problem.causal)
    shape = Shape.of(problem, flags)
    if shape.empty:
        return None
    known = (problem, shape, mods.window, mods.softcap)
    if direction == "forward":
        known += (_forward_tail(backend, q, k, v, shape, problem),)
    return _remember(_modified_problems, key, known)


def forward_modified(backend: Backend, q, k, v, causal, softmax_scale, window, softcap,
                     alibi_slopes, sinks) -> tuple | None:
    """(o, m, l, the validated ``validate.Modifiers``) like ``forward`` for a call with score
    modifiers, or None when the general path must take it (raises the API's errors for bad
    arguments)."""
    known = _modified_problem(backend, q, k, v, causal, softmax_scale, window, softcap,
                              alibi_slopes, sinks, "forward")
    if known is None:
        return None
    problem, shape, window, softcap, tail = known
    batch, seqlen_q, heads, _ = q.shape
    f32, poison = backend.float32, launch.poison_enabled()
    o = _new(backend, q.shape, None, q, poison)
    m = _new(backend, (batch, heads, seqlen_q), f32, q, poison)
    l = _new(backend, (batch, heads, seqlen_q), f32, q, poison)
    index = backend.device_index(q)
    ptr = backend.ptr
    with backend.on_device(index):
        plan = launch.forward_plan(shape, index)
        mods = launch.modifiers_of(shape, window, softcap, alibi_slopes, sinks,
                                    problem.softmax_scale, ptr=ptr)
        launch.launch_forward(plan, (ptr(q), ptr(k), ptr(v), ptr(o), ptr(m), ptr(l)), tail,
                              o.itemsize, backend.stream(), index, mods)
    return o, m, l, validate.Modifiers(window, softcap, alibi_slopes, sinks)


def backward_modified(backend: Backend, do, q, k, v, o, m, l, causal, softmax_scale,
                      deterministic: bool, window, softcap, alibi_slopes, sinks
                      ) -> tuple | None:
    """(dq, dk, dv[, dsinks]) like ``backward`` for a call with score modifiers, or None."""
    known = _modified_problem(backend, q, k, v, causal, softmax_scale, window, softcap,
                              alibi_slopes, sinks, "backward", (do, o, m, l))
    if known is None:
        return None
    problem, shape, window, softcap = known
    poison = launch.poison_enabled()
    dq, dk, dv = (_new(backend, x.shape, None, x, poison) for x in (q, k, v))
    dsinks = None
    if sinks is not None:  # the preprocess adds each block's share: it starts at zero
        dsinks = backend.empty(tuple(sinks.shape), backend.float32, sinks)
        backend.fill(dsinks, 0)
    index = backend.device_index(q)
    with backend.on_device(index):
        plan = launch.backward_plan(shape, index, deterministic)
        workspace = backend.empty((backward_workspace(plan).total_bytes,), backend.uint8, q)
        mods = launch.modifiers_of(shape, window, softcap, alibi_slopes, sinks,
                                    problem.softmax_scale, dsinks, ptr=backend.ptr)
        launch.run_backward(plan, *map(backend.operand, (do, q, k, v, o)), backend.ptr(m),
                            backend.ptr(l), *map(backend.operand, (dq, dk, dv)),
                            problem.softmax_scale, backend.ptr(workspace), backend.stream(),
                            index, mods)
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

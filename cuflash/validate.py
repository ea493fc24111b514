"""Input validation: every check runs before anything is allocated, launched or written.

``check_forward`` / ``check_backward`` take :class:`cuflash.interop.Imported` objects (what
``import_array`` returns: the backend array plus the caller's framework and device); a plain
array of any supported framework is also accepted and imported here, which is handy in tests.
They return a :class:`Problem`, the facts dispatch needs, or raise:

* ``TypeError`` for a wrong kind of thing: not an array, an unsupported or mixed dtype,
  arrays of different frameworks, ``causal`` not a bool, ``softmax_scale`` not a real number;
* ``ValueError`` for a wrong value: ndim, shapes that do not fit together, head_dim outside
  the supported set, arrays on different devices, ``softmax_scale`` not finite and positive
  or outside what float32 can carry (``MIN_SCALE`` to ``MAX_SCALE``),
  CUDA rows not 16-byte aligned, a non-contiguous head_dim (from ``import_array``).

The score modifiers (issue #14, docs/masks.md) are checked by ``check_modifiers``:
``window`` a pair of ints >= -1 (TypeError / ValueError), ``softcap`` a real number >= 0
that float32 can carry, ``alibi_slopes`` float32 (heads,) or (batch, heads) and ``sinks``
float32 (heads,), arrays of q's framework and device with finite values. On CUDA a kernel
family that lacks a modifier raises ``ValueError`` naming both when the call is planned
(``specs.select``), before any output is written. ``window=(-1, -1)`` and ``softcap=0`` mean
off.

Issue #15: arrays take any head_dim from 1 to 256 and a head_dim_v of v (and o, do) that
differs from q's. The CUDA kernels themselves need head_dim in ``SUPPORTED_HEAD_DIMS`` and
head_dim_v == head_dim: the API's general path passes ``padded_ok=True`` and runs them on
zero-padded copies (``cuflash.head_pad``); the fast paths and the JAX adapter keep the
kernels' own dims (ValueError naming q or v otherwise). Dropout and block masks are checked by
``cuflash.dropout_sparse_checks``.

Every message starts with the argument's name, then what was expected and what came, e.g.
``stats.m: expected float32 (2, 8, 128), got float16 (2, 8, 128)``.

Zero-size dimensions
--------------------
* ``batch == 0``, ``seqlen_q == 0`` or ``heads == 0``: allowed; the outputs are empty arrays
  of the right shapes (o, m, l in the forward; dq in the backward, and dk, dv are zeros).
* ``seqlen_k == 0``: allowed; every query row sees no key, exactly like a fully masked
  causal row: ``o = 0``, ``m = -inf``, ``l = 0``, and all gradients are 0 (never NaN).
* ``heads_kv == 0``: allowed only together with ``heads == 0`` (nothing to compute);
  with ``heads > 0`` it is rejected, since no kv head can serve the query heads.
* ``head_dim == 0``: rejected; it is outside ``SUPPORTED_HEAD_DIMS``.

Alignment
---------
The CUDA kernels load rows with 16-byte vector loads, so for CUDA arrays the data pointer
and every batch / sequence / head stride (in bytes) of q, k, v, o, do must be a multiple of
16 (strides of axes of length 1 do not matter and are not checked; neither is anything for
an empty array).  head_dim itself is a multiple of 8, so a row of 16- or 32-bit elements is
a whole number of 16-byte chunks.  Host (NumPy) arrays have no alignment requirement.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .constants import DTYPES, LOG2E, ROW_ALIGNMENT, default_softmax_scale
from . import head_pad
from .interop import Device, Imported, element_strides, import_array

SUPPORTED_DTYPES: tuple[str, ...] = DTYPES
SUPPORTED_HEAD_DIMS: tuple[int, ...] = tuple(range(8, 257, 8))  # the CUDA kernels'
# The CPU path (and the reference) take any head_dim, and a head_dim_v of v (and o) that
# differs from q and k's (issue #15); the CUDA kernels need SUPPORTED_HEAD_DIMS, v like k.
CPU_HEAD_DIMS = range(1, 257)
# CUDA limits: heads is a grid axis (gridDim.y <= 65535); lengths are int32 kernel arguments
# whose tile arithmetic (a row plus a tile, a query row plus the causal offset seqlen_k -
# seqlen_q) must not overflow, hence 2^30 rather than 2^31.
MAX_GRID_YZ = 65535
MAX_SEQLEN = 2**30 - 1
_LIMIT_REASON = {"heads": "a CUDA grid axis",
                 "seqlen_q": "int32 tile arithmetic in the kernels",
                 "seqlen_k": "int32 tile arithmetic in the kernels"}
# The kernels take softmax_scale * log2(e) and softmax_scale as float32 (flushing subnormals
# to zero): outside this range they would get inf or 0, i.e. NaN or uniform attention.
_F32_INFO = np.finfo(np.float32)
MIN_SCALE = float(_F32_INFO.tiny)
MAX_SCALE = float(np.nextafter(np.float32(float(_F32_INFO.max) / LOG2E), np.float32(0)))

_LAYOUT = "(batch, seqlen, heads, head_dim)"


@dataclass(frozen=True)
class Problem:
    """The validated facts of one attention call (shapes as in docs/kernel_abi.md)."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    heads_kv: int
    head_dim: int
    dtype: str  # 'float16' | 'bfloat16' | 'float32'
    causal: bool
    softmax_scale: float
    device: Device  # ('cpu', 0) or ('cuda', index)

    @property
    def heads_per_kv(self) -> int:
        """Query heads per kv head (1 when there are no heads at all)."""
        return self.heads // self.heads_kv if self.heads_kv else 1


def check_forward(q, k, v, *, causal, softmax_scale, padded_ok: bool = False,
                  pair_ok: bool = False) -> Problem:
    """Validate the forward's inputs; ``softmax_scale=None`` means ``1 / sqrt(head_dim)``.
    ``padded_ok``: CUDA arrays may have any head_dim and head_dim_v from 1 to 256 (the
    caller runs the kernels on zero-padded copies, ``cuflash.head_pad``); their strides
    are then not checked (the copies are aligned). ``pair_ok``: CUDA arrays may have a
    head_dim_v of their own, each a kernel width (the caller runs a kernel that takes the
    pair, ``launch.takes_pair``); strides are checked."""
    q, k, v = _imported(q, "q"), _imported(k, "k"), _imported(v, "v")
    causal = _check_causal(causal)
    named = [(q, "q"), (k, "k"), (v, "v")]
    for x, name in named:
        _check_ndim(x, name, 4, _LAYOUT)
    _check_same_place(named)
    dtype = _check_dtypes(named)
    batch, seqlen_q, heads, head_dim = q.array.shape
    _, seqlen_k, heads_kv, _ = k.array.shape
    padded = padded_ok and head_pad.needed(head_dim, _shape(v)[3])
    _check_qkv_shapes(q, k, v, kernel_dims=q.is_cuda and not padded, pair_ok=pair_ok)
    scale = check_scale(softmax_scale, head_dim)
    if q.is_cuda:
        _check_cuda_limits(batch, heads, seqlen_q, seqlen_k)
        for x, name in named if not padded else ():
            check_alignment(x.array, name)
    return Problem(batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads=heads,
                   heads_kv=heads_kv, head_dim=head_dim, dtype=dtype, causal=causal,
                   softmax_scale=scale, device=q.device)


def check_backward(do, q, k, v, o, stats_m, stats_l, *, causal, softmax_scale,
                   padded_ok: bool = False, pair_ok: bool = False) -> Problem:
    """Validate the backward's inputs: the forward's checks, plus ``do`` and ``o`` like ``q``
    and the statistics ``m``, ``l`` float32 C-contiguous (batch, heads, seqlen_q).
    ``padded_ok``, ``pair_ok``: as in ``check_forward``."""
    do, q, k, v, o = (_imported(x, n) for x, n in zip((do, q, k, v, o), "do q k v o".split()))
    m, l = _imported(stats_m, "stats.m"), _imported(stats_l, "stats.l")
    problem = check_forward(q, k, v, causal=causal, softmax_scale=softmax_scale,
                            padded_ok=padded_ok, pair_ok=pair_ok)
    padded = padded_ok and head_pad.needed(_shape(q)[3], _shape(v)[3])
    o_shape = _shape(q)[:3] + _shape(v)[3:]  # (batch, seqlen_q, heads, head_dim_v)
    for x, name in ((do, "do"), (o, "o")):
        _check_like_q(x, name, q, problem.dtype, o_shape)
    stats_shape = (problem.batch, problem.heads, problem.seqlen_q)
    for x, name in ((m, "stats.m"), (l, "stats.l")):
        _check_stats(x, name, q, stats_shape)
    if q.is_cuda and not padded:
        for x, name in ((do, "do"), (o, "o")):
            check_alignment(x.array, name)
    return problem


@dataclass(frozen=True, eq=False)
class Modifiers:
    """The validated score modifiers of one call (docs/masks.md); None means off.

    ``alibi_slopes`` and ``sinks`` are backend arrays (float32 NumPy or CuPy, on q's device).
    """

    window: tuple[int, int] | None = None
    softcap: float | None = None
    alibi_slopes: Any = None
    sinks: Any = None

    NAMES = ("window", "softcap", "alibi_slopes", "sinks")

    @property
    def first(self) -> str | None:
        """The first modifier that is on, in argument order (for error messages)."""
        return next((n for n in self.NAMES if getattr(self, n) is not None), None)

    def cpu_kwargs(self) -> dict:
        """Keyword arguments of ``cpu.flash_forward_cpu`` / ``flash_backward_cpu``."""
        return {name: getattr(self, name) for name in self.NAMES}

    def record(self) -> dict:
        """What ``SoftmaxStats`` keeps of them: hashable, compared by ``check_stats_origin``
        (an array as (shape, values))."""
        arrays = {name: _values(getattr(self, name)) for name in ("alibi_slopes", "sinks")}
        return dict(window=self.window, softcap=self.softcap, **arrays)


NO_MODIFIERS = Modifiers()


def _values(x: Any) -> tuple | None:
    """A host array as (shape, values); a device array as (shape, ("device", address)): its
    identity, since reading the values back would synchronize the host with the GPU on every
    call (and break CUDA-graph capture). The backward must then pass the same array."""
    if x is None:
        return None
    if not isinstance(x, np.ndarray) and hasattr(x, "data") and hasattr(x.data, "ptr"):
        return tuple(x.shape), ("device", int(x.data.ptr))  # CuPy
    if getattr(x, "is_cuda", False) and hasattr(x, "data_ptr"):  # a torch CUDA tensor
        return tuple(x.shape), ("device", int(x.data_ptr()))
    host = np.asarray(x, dtype=np.float32)
    return tuple(host.shape), tuple(host.ravel().tolist())


def check_modifiers(q: Any, problem: Problem, *, window=None, softcap=None, alibi_slopes=None,
                    sinks=None) -> Modifiers:
    """Validate the score modifiers for ``problem`` (q: its imported query array).

    On CUDA the kernels run them (a kernel family that lacks one raises ``ValueError``
    when the call is planned, before any output is written)."""
    q = _imported(q, "q")
    window, softcap = check_window(window), check_softcap(softcap)
    heads, batch = problem.heads, problem.batch
    return Modifiers(
        window=window, softcap=softcap,
        alibi_slopes=_check_head_array(alibi_slopes, "alibi_slopes", q,
                                       [(heads,), (batch, heads)], "heads, or batch x heads"),
        sinks=_check_head_array(sinks, "sinks", q, [(heads,)], "heads"))


def check_window(window: Any) -> tuple[int, int] | None:
    """``None`` or a pair (left, right) of ints >= -1 (-1: unbounded); (-1, -1) is None."""
    if window is None:
        return None
    expected = "a pair (left, right) of ints >= -1 (-1: unbounded) or None"
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window: expected {expected}, got {_type_name(window)} {window!r}")
    for side in window:
        if isinstance(side, (bool, np.bool_)) or not isinstance(side, numbers.Integral):
            raise TypeError(f"window: expected {expected}, got {_type_name(side)} {side!r} "
                            f"in {window!r}")
    left, right = (int(side) for side in window)
    if left < -1 or right < -1:
        raise ValueError(f"window: expected {expected}, got {(left, right)!r}")
    return None if (left, right) == (-1, -1) else (left, right)


def check_softcap(softcap: Any) -> float | None:
    """``None`` or a real number: 0 (off, as FlashAttention's default) or a positive one in
    float32's range (the kernels will divide the float32 scores by it)."""
    if softcap is None:
        return None
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a real number >= 0 or None, "
                        f"got {_type_name(softcap)} {softcap!r}")
    cap = float(softcap)
    if cap == 0:
        return None
    if not (math.isfinite(cap) and MIN_SCALE <= cap <= float(_F32_INFO.max)):
        raise ValueError(f"softcap: expected 0 (off) or a finite positive number float32 "
                         f"can carry ({MIN_SCALE:.4g} to {float(_F32_INFO.max):.4g}), got {cap!r}")
    return cap


def _check_head_array(x: Any, name: str, q: Imported, shapes: list, layout: str) -> Any:
    """A float32 per-head array of q's framework and device, of one of ``shapes``."""
    if x is None:
        return None
    imported = _imported(x, name)
    _check_same_place([(q, "q"), (imported, name)])
    if _dtype_name(imported) != "float32":
        raise TypeError(f"{name}: expected dtype float32, got {_dtype_name(imported)}")
    if _shape(imported) not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name}: expected shape {expected} ({layout}), got "
                         f"{_shape(imported)}")
    if not imported.is_cuda:  # on a GPU, checking would synchronize every call: NaN / inf
        finite = np.isfinite(imported.array)  # there propagate like NaN in q (README, NaN)
        if not finite.all():
            bad = imported.array[~finite]
            raise ValueError(f"{name}: expected finite values, got {bad.size} that are not "
                             f"(first: {float(bad.ravel()[0])!r})")
    return imported.array


def shape_q(problem: Problem) -> tuple[int, int, int, int]:
    return (problem.batch, problem.seqlen_q, problem.heads, problem.head_dim)


def shape_kv(problem: Problem) -> tuple[int, int, int, int]:
    return (problem.batch, problem.seqlen_k, problem.heads_kv, problem.head_dim)


def check_stats_origin(stats: Any, causal: bool, softmax_scale: float, q_shape: tuple,
                       kv_shape: tuple, modifiers: Modifiers = NO_MODIFIERS,
                       dropout: tuple | None = None) -> None:
    """``ValueError`` unless the backward's causal, resolved softmax_scale, shapes, score
    modifiers and dropout ((p, seed, offset) or None) match the forward that made ``stats``
    (hand-built stats, whose fields are ``None``, are not checked; in recorded ones a
    modifier or dropout of ``None`` was off)."""
    recorded = [("causal", stats.causal, causal),
                ("softmax_scale", stats.softmax_scale, softmax_scale),
                ("q", stats.shape_q, tuple(q_shape)),
                ("k", stats.shape_kv, tuple(kv_shape))]
    for name, forward, backward in recorded:
        if forward is None or _same_for_the_kernels(name, forward, backward):
            continue
        what = "shape " if name in ("q", "k") else ""
        raise ValueError(f"{name}: expected {what}{forward!r} as in the forward pass that made "
                         f"stats, got {backward!r}; the gradients would be wrong")
    if stats.recorded:
        _check_modifiers_origin(stats, modifiers)
        _check_dropout_origin(stats.dropout, dropout)


def _check_dropout_origin(forward: tuple | None, backward: tuple | None) -> None:
    """Another dropout mask than the forward's would give wrong gradients: name the first
    of (dropout_p, dropout_seed, dropout_offset) that differs (p 0.0 when off)."""
    if forward == backward:
        return
    off = (0.0, None, None)
    names = ("dropout_p", "dropout_seed", "dropout_offset")
    name, want, got = next((n, f, b) for n, f, b in zip(names, forward or off, backward or off)
                           if f != b)
    raise ValueError(f"{name}: expected {want!r} as in the forward pass that made stats, got "
                     f"{got!r}; the backward must regenerate the forward's dropout mask")


def _check_modifiers_origin(stats: Any, modifiers: Modifiers) -> None:
    for name, backward in modifiers.record().items():
        forward = getattr(stats, name, None)
        if forward == backward:
            continue
        if name in ("alibi_slopes", "sinks"):
            said = {None: "none"}
            raise ValueError(f"{name}: expected the values of the forward pass that made stats "
                             f"({said.get(forward, 'an array')}), got "
                             f"{said.get(backward, 'other values')}; the gradients would be "
                             f"wrong")
        raise ValueError(f"{name}: expected {forward!r} as in the forward pass that made stats "
                         f"(None: off), got {backward!r}; the gradients would be wrong")


def _same_for_the_kernels(name: str, forward: Any, backward: Any) -> bool:
    if name == "softmax_scale":  # compared in float32: 1 / sqrt(8) and 8 ** -0.5 agree there
        return bool(np.float32(forward) == np.float32(backward))
    return forward == backward


# -- single checks -------------------------------------------------------------------------


def _imported(x: Any, name: str) -> Imported:
    return x if isinstance(x, Imported) else import_array(x, name)


def _type_name(x: Any) -> str:
    return type(x).__name__


def check_bool(value: Any, name: str) -> bool:
    """A flag (``causal``, ``deterministic``): a bool or NumPy bool, never a truthy object
    (``causal="false"`` must not mean causal)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {_type_name(value)} {value!r}")


def _check_causal(causal: Any) -> bool:
    return check_bool(causal, "causal")


def check_scale(softmax_scale: Any, head_dim: int) -> float:
    """The resolved softmax_scale as a float: ``None`` means ``1 / sqrt(head_dim)``; otherwise
    a real (not bool), finite, positive number in float32's range. For a head_dim outside the
    supported set the default is a placeholder 1.0: the shape checks reject that head_dim."""
    if softmax_scale is None:
        # comparisons, not `in range`: under torch.compile head_dim may be symbolic
        inside = CPU_HEAD_DIMS.start <= head_dim < CPU_HEAD_DIMS.stop
        return default_softmax_scale(head_dim) if inside else 1.0
    if isinstance(softmax_scale, (bool, np.bool_)) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale: expected a finite positive real number or None, "
                        f"got {_type_name(softmax_scale)} {softmax_scale!r}")
    scale = float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax_scale: expected a finite positive real number, got {scale!r}")
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise ValueError(f"softmax_scale: expected a value the float32 kernels can use, from "
                         f"{MIN_SCALE:.4g} to {MAX_SCALE:.4g} (float32's smallest normal "
                         f"number to its largest divided by log2(e)), got {scale!r}")
    return scale


def _shape(x: Imported) -> tuple:
    return tuple(x.array.shape)


def _check_ndim(x: Imported, name: str, ndim: int, layout: str) -> None:
    if x.array.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array {layout}, "
                         f"got {x.array.ndim}-D with shape {_shape(x)}")


def _where(x: Imported) -> str:
    return f"{x.device[0]}:{x.device[1]}"


def _check_same_place(named: Sequence[tuple[Imported, str]]) -> None:
    """Same framework (TypeError) and same device (ValueError) as the first array."""
    first, first_name = named[0]
    for x, name in named[1:]:
        if x.framework is not first.framework:
            raise TypeError(f"{name}: expected a {first.framework.value} array like "
                            f"{first_name}, got {x.framework.value}")
        if x.device != first.device:
            raise ValueError(f"{name}: expected an array on {_where(first)} like "
                             f"{first_name}, got {_where(x)}")


def _dtype_name(x: Imported) -> str:
    return np.dtype(x.array.dtype).name


def _check_dtypes(named: Sequence[tuple[Imported, str]]) -> str:
    first, first_name = named[0]
    dtype = _dtype_name(first)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{first_name}: expected dtype float16, bfloat16 or float32, "
                        f"got {dtype}")
    for x, name in named[1:]:
        if _dtype_name(x) != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} like {first_name}, "
                            f"got {_dtype_name(x)}")
    return dtype


def _check_qkv_shapes(q: Imported, k: Imported, v: Imported, kernel_dims: bool,
                      pair_ok: bool = False) -> None:
    """``kernel_dims``: the head dims must be the CUDA kernels' own (no padding); with
    ``pair_ok`` each may be its own (a kernel that takes the pair)."""
    batch, _, heads, head_dim = _shape(q)
    for x, name in ((k, "k"), (v, "v")):
        if _shape(x)[0] != batch:
            raise ValueError(f"{name}: expected batch {batch} like q {_shape(q)}, "
                             f"got {_shape(x)[0]} in shape {_shape(x)}")
    if _shape(k)[3] != head_dim:
        raise ValueError(f"k: expected head_dim {head_dim} like q {_shape(q)}, "
                         f"got {_shape(k)[3]} in shape {_shape(k)}")
    if _shape(v)[:3] != _shape(k)[:3]:
        b, s, h = _shape(k)[:3]
        raise ValueError(f"v: expected shape ({b}, {s}, {h}, head_dim_v) like k (batch, "
                         f"seqlen_k, heads_kv), got {_shape(v)}")
    heads_kv = _shape(k)[2]
    if heads_kv == 0 and heads > 0:
        raise ValueError(f"k: expected heads_kv >= 1 dividing q's {heads} heads, got 0 heads "
                         f"in shape {_shape(k)}")
    if heads_kv and heads % heads_kv:
        raise ValueError(f"k: expected heads_kv dividing q's {heads} heads (grouped-query "
                         f"attention), got {heads_kv} in shape {_shape(k)}")
    if kernel_dims and head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: expected head_dim a multiple of 8 from 8 to 256 on this CUDA "
                         f"path (cuflash.attention* and cuflash.torch.flash_attention take any "
                         f"from 1 to 256, on zero-padded copies), got {head_dim} in "
                         f"shape {_shape(q)}")
    if head_dim not in CPU_HEAD_DIMS:
        raise ValueError(f"q: expected head_dim from 1 to 256, got {head_dim} in shape "
                         f"{_shape(q)}")
    _check_head_dim_v(q, v, kernel_dims, pair_ok)


def _check_head_dim_v(q: Imported, v: Imported, kernel_dims: bool,
                      pair_ok: bool = False) -> None:
    """v's head_dim_v: q's on the kernels' own path (their single head_dim), or with
    ``pair_ok`` any kernel width; else 1 to 256."""
    head_dim, head_dim_v = _shape(q)[3], _shape(v)[3]
    if kernel_dims and pair_ok and head_dim_v not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"v: expected head_dim_v a multiple of 8 from 8 to 256 on this CUDA "
                         f"path, got {head_dim_v} in shape {_shape(v)}")
    if kernel_dims and not pair_ok and head_dim_v != head_dim:
        raise ValueError(f"v: expected head_dim {head_dim} like q on this CUDA path "
                         f"(cuflash.attention* and cuflash.torch.flash_attention take a "
                         f"head_dim_v != head_dim, on zero-padded copies), got {head_dim_v} "
                         f"in shape {_shape(v)}")
    if head_dim_v not in CPU_HEAD_DIMS:
        raise ValueError(f"v: expected head_dim_v from 1 to 256, got {head_dim_v} in shape "
                         f"{_shape(v)}")


def _check_cuda_limits(batch: int, heads: int, seqlen_q: int, seqlen_k: int) -> None:
    """Limits of the CUDA kernels. batch has none: the plan splits a batch that would exceed
    a grid axis into several launches (``plan.MAX_GRID_YZ``)."""
    for what, value, limit in (("heads", heads, MAX_GRID_YZ), ("seqlen_q", seqlen_q, MAX_SEQLEN),
                               ("seqlen_k", seqlen_k, MAX_SEQLEN)):
        if value > limit:
            raise ValueError(f"q: expected {what} <= {limit} on CUDA ({_LIMIT_REASON[what]}), "
                             f"got {value}")


def check_alignment(array: Any, name: str) -> None:
    """Raise ``ValueError`` unless the rows of a (batch, seqlen, heads, head_dim) CUDA array
    start on 16-byte boundaries: data pointer and the strides of the first three axes."""
    if array.size == 0:
        return
    ptr = int(array.data.ptr) if hasattr(array.data, "ptr") else array.ctypes.data
    if ptr % ROW_ALIGNMENT:
        raise ValueError(f"{name}: expected a data pointer aligned to {ROW_ALIGNMENT} bytes "
                         f"for the CUDA kernels, got {ptr:#x} ({ptr % ROW_ALIGNMENT} bytes "
                         "past a boundary); make it contiguous or slice on row boundaries")
    axes = ("batch", "seqlen", "heads")
    for axis, (length, stride) in enumerate(zip(array.shape[:3], array.strides[:3])):
        if length > 1 and stride % ROW_ALIGNMENT:
            raise ValueError(
                f"{name}: expected the {axes[axis]} stride to be a multiple of "
                f"{ROW_ALIGNMENT} bytes for the CUDA kernels, got strides "
                f"{element_strides(array)} elements of {array.itemsize} bytes "
                f"({stride} bytes on axis {axis})")


def _check_like_q(x: Imported, name: str, q: Imported, dtype: str, shape=None) -> None:
    """dtype and place of q; ``shape`` (default q's): o and do have v's head_dim_v."""
    _check_same_place([(q, "q"), (x, name)])
    if _dtype_name(x) != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} like q, got {_dtype_name(x)}")
    shape = _shape(q) if shape is None else shape
    if _shape(x) != shape:
        like = "like q" if shape == _shape(q) else "(q's with v's head_dim_v)"
        raise ValueError(f"{name}: expected shape {shape} {like}, got {_shape(x)}")


def _check_stats(x: Imported, name: str, q: Imported, shape: tuple) -> None:
    _check_same_place([(q, "q"), (x, name)])
    got = f"{_dtype_name(x)} {_shape(x)}"
    if _dtype_name(x) != "float32" or _shape(x) != shape:
        err = TypeError if _shape(x) == shape else ValueError
        raise err(f"{name}: expected float32 {shape}, got {got}")
    if not x.array.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous float32 {shape} array (as "
                         f"attention_forward returns it), got strides "
                         f"{element_strides(x.array)} elements")

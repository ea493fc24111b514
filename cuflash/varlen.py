"""Variable-length attention: many sequences of different lengths packed into one array.

FlashAttention-2's ``flash_attn_varlen_func`` layout (docs/varlen.md): q (total_q, heads,
head_dim) holds every sequence's queries back to back, k and v (total_k, heads_kv, head_dim)
their keys; ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32, batch + 1) are the offsets where
each sequence starts. Each sequence is its own attention problem::

    cu_seqlens_q = [0, 3, 3, 7]        q rows: | s0 s0 s0 | s2 s2 s2 s2 |   (s1 is empty)
    cu_seqlens_k = [0, 5, 6, 8]        k rows: | s0 s0 s0 s0 s0 | s1 | s2 s2 |

Causal masks, windows and ALiBi align bottom-right within each sequence (query i of
sequence b sees key j iff j <= i + n_k(b) - n_q(b)). The statistics are (heads, total_q).

Runs on CPU arrays (the NumPy path, ``varlen_cpu``) and on CUDA arrays (every kernel family
compiled with ``CF_VARLEN``: ``kernels_cu/cf_seq.cuh`` reads each sequence's offsets and
lengths; ``varlen_gpu`` launches them). On CPU arrays every offset value is checked; on CUDA
arrays only their types, shapes and devices: the values stay on the device (no copy, no host
sync) and are trusted, as FlashAttention does (docs/varlen.md).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import head_pad, philox, validate, varlen_fastpath
from .api import _fast_backend, _present, _refuse_untracked_gradients
from .interop import Imported, caller_stream, export_array, import_array
from .stats import SoftmaxStats
from .varlen_cpu import Seqlens, varlen_backward_cpu, varlen_forward_cpu
from .varlen_fastpath import Layout

__all__ = ["VarlenStats", "attention_varlen", "attention_varlen_backward",
           "attention_varlen_forward"]

_PACKED = "(total, heads, head_dim)"


@dataclass(frozen=True)
class VarlenStats(SoftmaxStats):
    """``SoftmaxStats`` of a varlen forward: m, l float32 (heads, total_q); ``seqlens``
    records (cu_seqlens_q, cu_seqlens_k, keys used per sequence) as tuples, so that a
    backward with another layout is refused (its gradients would be wrong). On CUDA, where
    the offsets are never read on the host, it records the offset arrays' addresses and the
    max lengths instead (another array is refused; the same array rewritten is not seen)."""

    seqlens: tuple | None = None


@dataclass(frozen=True)
class _VarlenCall:
    """The validated facts of one varlen call."""

    q: Imported
    k: Imported
    v: Imported
    seqlens: Seqlens | None  # host copies, checked (CPU arrays only)
    problem: validate.Problem  # batch = number of sequences, seqlen_* = the max_seqlen_*
    modifiers: validate.Modifiers
    # the offsets as the caller's int32 backend arrays (cu_q, cu_k, seqused_k or None): the
    # CUDA kernels read these
    offsets: tuple = ()
    record: tuple = ()  # what VarlenStats remember of the layout (see _check_origin)

    @property
    def shapes(self) -> tuple[tuple, tuple]:
        return tuple(self.q.array.shape), tuple(self.k.array.shape)

    @property
    def pair(self) -> bool:
        """v has its own head_dim_v (o, dO, dv too)."""
        return self.v.array.shape[2] != self.q.array.shape[2]

    def padded(self, *extra):
        """This call on CUDA with q, k, v (and ``extra`` arrays: dO, o) zero-padded to one
        head_dim (cuflash/head_pad.py), for kernels with one head_dim: (call, *extra)."""
        width = head_pad.kernel_dim(self.q.array.shape[2], self.v.array.shape[2])
        q, k, v = (replace(x, array=head_pad.pad(x.array, width))
                   for x in (self.q, self.k, self.v))
        problem = replace(self.problem, head_dim=width)  # softmax_scale stays q's own
        return (replace(self, q=q, k=k, v=v, problem=problem),
                *(head_pad.pad(x, width) for x in extra))


# -- validation ----------------------------------------------------------------------------


def _check_packed(q: Imported, k: Imported, v: Imported) -> str:
    """q (total_q, heads, head_dim), k (total_k, heads_kv, head_dim), v (total_k, heads_kv,
    head_dim_v); returns dtype."""
    named = [(q, "q"), (k, "k"), (v, "v")]
    for x, name in named:
        if x.array.ndim != 3:
            raise ValueError(f"{name}: expected a 3-D array {_PACKED}, got {x.array.ndim}-D "
                             f"with shape {tuple(x.array.shape)}")
    validate._check_same_place(named)
    dtype = validate._check_dtypes(named)
    _, heads, head_dim = q.array.shape
    if tuple(v.array.shape[:2]) != tuple(k.array.shape[:2]):
        raise ValueError(f"v: expected shape {tuple(k.array.shape[:2])} + (head_dim_v,) like k "
                         f"(total_k, heads_kv, head_dim), got {tuple(v.array.shape)}")
    _, heads_kv, head_dim_k = k.array.shape
    if head_dim_k != head_dim:
        raise ValueError(f"k: expected head_dim {head_dim} like q {tuple(q.array.shape)}, got "
                         f"{head_dim_k} in shape {tuple(k.array.shape)}")
    if heads_kv == 0 or heads % heads_kv:
        raise ValueError(f"k: expected heads_kv >= 1 dividing q's {heads} heads (grouped-query "
                         f"attention), got {heads_kv} in shape {tuple(k.array.shape)}")
    for x, name in ((q, "q"), (v, "v")):
        if x.array.shape[2] not in validate.SUPPORTED_HEAD_DIMS:
            raise ValueError(f"{name}: expected head_dim a multiple of 8 from 8 to 256, got "
                             f"{x.array.shape[2]} in shape {tuple(x.array.shape)}")
    return dtype


def _offsets(x: Any, name: str, q: Imported, length: int | None) -> Imported:
    """cu_seqlens / seqused_k: an int32 1-D array of q's framework and device, of
    ``length`` entries (None: any length >= 1)."""
    imported = _imported_int32(x, name, q)
    shape = tuple(imported.array.shape)
    if len(shape) != 1 or shape[0] < 1 or length is not None and shape[0] != length:
        want = {"cu_seqlens_q": "(batch + 1,) with batch >= 0",
                "cu_seqlens_k": f"({length},) like cu_seqlens_q (batch + 1)",
                "seqused_k": f"({length},) (batch,)"}[name]
        raise ValueError(f"{name}: expected shape {want}, got {shape}")
    return imported


def _check_offset_values(cu: np.ndarray, name: str, total: int) -> None:
    """Host offsets: starting at 0, non-decreasing, ending at ``total``."""
    if cu[0] != 0:
        raise ValueError(f"{name}: expected the first offset to be 0, got {int(cu[0])}")
    steps = np.diff(cu)
    if (steps < 0).any():
        at = int(np.argmax(steps < 0))
        raise ValueError(f"{name}: expected non-decreasing offsets, got {int(cu[at])} then "
                         f"{int(cu[at + 1])} at index {at}")
    if cu[-1] != total:
        what = "q" if name.endswith("_q") else "k"
        raise ValueError(f"{name}: expected the last offset to equal {what}'s {total} rows "
                         f"(total), got {int(cu[-1])}")


def _imported_int32(x: Any, name: str, q: Imported) -> Imported:
    imported = validate._imported(x, name)
    validate._check_same_place([(q, "q"), (imported, name)])
    dtype = validate._dtype_name(imported)
    if dtype != "int32":
        raise TypeError(f"{name}: expected dtype int32, got {dtype}")
    return imported


def _check_max_seqlen(value: Any, name: str, lengths: np.ndarray | None, total: int) -> int:
    """An int (not bool) >= every sequence's length (FlashAttention sizes its grid by it);
    ``lengths`` None (CUDA: the offsets stay on the device): >= 1 when there are rows."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if lengths is None:
        if int(value) < (1 if total else 0):
            raise ValueError(f"{name}: expected an int >= the longest sequence (>= 1 with "
                             f"{total} rows), got {int(value)}")
        return int(value)
    longest = int(lengths.max(initial=0))
    if int(value) < longest:
        raise ValueError(f"{name}: expected an int >= the longest sequence ({longest}), "
                         f"got {int(value)}")
    return int(value)


def _check_seqused(used: np.ndarray, lengths_k: np.ndarray) -> None:
    """Host seqused_k: 0 <= used <= the sequence's keys."""
    bad = np.nonzero((used < 0) | (used > lengths_k))[0]
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"seqused_k: expected 0 <= seqused_k[b] <= the sequence's keys "
                         f"(cu_seqlens_k[b + 1] - cu_seqlens_k[b]), got {int(used[b])} for "
                         f"b = {b} with {int(lengths_k[b])} keys")


def _host_seqlens(cu_q: Imported, cu_k: Imported, used: Imported | None, total_q: int,
                  total_k: int) -> Seqlens:
    """The CPU path's offsets, checked value by value."""
    host_q, host_k = (np.asarray(x.array).astype(np.int64) for x in (cu_q, cu_k))
    _check_offset_values(host_q, "cu_seqlens_q", total_q)
    _check_offset_values(host_k, "cu_seqlens_k", total_k)
    lengths_k = np.diff(host_k)
    if used is None:
        return Seqlens(host_q, host_k, lengths_k)
    host_used = np.asarray(used.array).astype(np.int64)
    _check_seqused(host_used, lengths_k)
    return Seqlens(host_q, host_k, host_used)


def device_record(offsets: tuple, max_q: int, max_k: int) -> tuple:
    """What VarlenStats remember of a CUDA call's layout without reading it: the offset
    arrays' addresses and the max lengths."""
    def address(x) -> int | None:
        if x is None:
            return None
        return int(x.data.ptr) if hasattr(x.data, "ptr") else x.ctypes.data

    return addresses_record(tuple(map(address, offsets)), max_q, max_k)


def addresses_record(addresses: tuple, max_q: int, max_k: int) -> tuple:
    """``device_record`` from the offsets' addresses (cu_q, cu_k, seqused_k or None)."""
    return ("device", *addresses, max_q, max_k)


def _check_cuda(named, total_q: int, total_k: int, heads: int, seqlen_q: int,
                seqlen_k: int) -> None:
    """The CUDA kernels' limits and row alignment for packed (total, heads, head_dim) arrays."""
    validate._check_cuda_limits(1, heads, seqlen_q, seqlen_k)
    for what, total in (("q", total_q), ("k", total_k)):
        if total > validate.MAX_SEQLEN:
            raise ValueError(f"{what}: expected at most {validate.MAX_SEQLEN} rows (total) on "
                             f"CUDA (int32 row arithmetic in the kernels), got {total}")
    for x, name in named:  # as a batch of one: the row and head strides must be aligned
        validate.check_alignment(x.array[None], name)


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                 seqused_k, causal, softmax_scale, modifiers: dict,
                 values_known: bool = True) -> _VarlenCall:
    """Validate a varlen call; raise before anything is allocated or written.

    CPU arrays: every offset value is checked. CUDA arrays: types, shapes and devices only;
    the values stay on the device (no host copy, no sync), trusted as FlashAttention does.
    ``values_known=False``: the offsets are stand-ins for traced arrays (``cuflash.jax`` at
    trace time): shapes and dtypes only, as on CUDA.
    """
    iq, ik, iv = import_array(q, "q"), import_array(k, "k"), import_array(v, "v")
    dtype = _check_packed(iq, ik, iv)
    causal = validate.check_bool(causal, "causal")
    total_q, heads, head_dim = iq.array.shape
    total_k, heads_kv, _ = ik.array.shape
    scale = validate.check_scale(softmax_scale, head_dim)
    cu_q = _offsets(cu_seqlens_q, "cu_seqlens_q", iq, None)
    batch = cu_q.array.shape[0] - 1
    cu_k = _offsets(cu_seqlens_k, "cu_seqlens_k", iq, batch + 1)
    used = None if seqused_k is None else _offsets(seqused_k, "seqused_k", iq, batch)
    offsets = tuple(None if x is None else x.array for x in (cu_q, cu_k, used))
    if iq.is_cuda or not values_known:
        seqlens = None
        seqlen_q = _check_max_seqlen(max_seqlen_q, "max_seqlen_q", None, total_q)
        seqlen_k = _check_max_seqlen(max_seqlen_k, "max_seqlen_k", None, total_k)
        if iq.is_cuda:
            _check_cuda([(iq, "q"), (ik, "k"), (iv, "v")], total_q, total_k, heads, seqlen_q,
                        seqlen_k)
        record = device_record(offsets, seqlen_q, seqlen_k)
    else:
        seqlens = _host_seqlens(cu_q, cu_k, used, total_q, total_k)
        seqlen_q = _check_max_seqlen(max_seqlen_q, "max_seqlen_q", np.diff(seqlens.cu_q),
                                     total_q)
        seqlen_k = _check_max_seqlen(max_seqlen_k, "max_seqlen_k", np.diff(seqlens.cu_k),
                                     total_k)
        record = seqlens.record()
    problem = validate.Problem(batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                               heads=heads, heads_kv=heads_kv, head_dim=head_dim, dtype=dtype,
                               causal=causal, softmax_scale=scale, device=iq.device)
    checked = validate.check_modifiers(iq, problem, **modifiers)
    return _VarlenCall(iq, ik, iv, seqlens, problem, checked, offsets, record)


# -- public functions ----------------------------------------------------------------------


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     seqused_k=None, causal: bool = False, softmax_scale: float | None = None,
                     window=None, softcap=None, alibi_slopes=None, sinks=None,
                     dropout_p=0.0, dropout_seed=None, dropout_offset=0):
    """Variable-length attention; same arguments as ``attention_varlen_forward``, returns o."""
    o, _ = attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, seqused_k=seqused_k, causal=causal,
                                    softmax_scale=softmax_scale, window=window, softcap=softcap,
                                    alibi_slopes=alibi_slopes, sinks=sinks,
                                    dropout_p=dropout_p, dropout_seed=dropout_seed,
                                    dropout_offset=dropout_offset)
    return o


def _dropout(dropout_p, dropout_seed, dropout_offset) -> dict:
    """Dropout's keyword arguments of the CPU and CUDA paths (empty when off), validated."""
    p = philox.check_dropout(0.0 if dropout_p is None else dropout_p, dropout_seed,
                             dropout_offset)
    if p == 0:
        return {}
    return dict(dropout_p=p, dropout_seed=int(dropout_seed),
                dropout_offset=int(dropout_offset or 0))


def _dropout_record(drop: dict) -> tuple | None:
    return (drop["dropout_p"], drop["dropout_seed"], drop["dropout_offset"]) if drop else None


def attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             *, seqused_k=None, causal: bool = False,
                             softmax_scale: float | None = None, window=None, softcap=None,
                             alibi_slopes=None, sinks=None, dropout_p=0.0, dropout_seed=None,
                             dropout_offset=0):
    """Forward pass of variable-length attention, FlashAttention-2's varlen semantics.

    Args:
        q: (total_q, heads, head_dim), the queries of every sequence back to back; a NumPy,
            PyTorch or JAX array (CPU or CUDA; CUDA rows 16-byte aligned), float16,
            bfloat16 or float32, head_dim a multiple of 8
            up to 256 with stride 1.
        k, v: (total_k, heads_kv, head_dim), same dtype and device; heads a multiple of
            heads_kv (GQA: query head h reads kv head h // (heads // heads_kv)).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) arrays of q's framework and device:
            sequence b owns q rows cu_seqlens_q[b] : cu_seqlens_q[b + 1] and k, v rows
            cu_seqlens_k[b] : cu_seqlens_k[b + 1]. They start at 0, never decrease and end at
            total_q / total_k. Empty sequences (equal neighbours) are allowed.
        max_seqlen_q, max_seqlen_k: ints >= the longest query / key sequence.
        seqused_k: optional int32 (batch,): sequence b attends to only its first
            seqused_k[b] keys (the causal diagonal and windows align to that many keys).
        causal, softmax_scale, window, softcap, alibi_slopes, sinks: as in
            ``cuflash.attention_forward``, applied within each sequence; alibi_slopes may
            be (heads,) or (batch, heads).
        dropout_p, dropout_seed, dropout_offset: as in ``cuflash.attention_forward``
            (docs/dropout.md): sequence b's element (h, i, j), i and j within the sequence,
            is dropped as element (b, h, i, j) of a dense call.

    Returns:
        (o, stats): o (total_q, heads, head_dim) like q; stats a ``VarlenStats`` with
        float32 m, l of shape (heads, total_q). A query row that sees no key gets o = 0,
        m = -inf, l = 0 (with sinks m = sink, l = 1).

    Raises ``TypeError`` / ``ValueError`` naming the argument before anything is written.
    CUDA arrays run the kernels (docs/varlen.md); their offsets are not read on the host
    (no sync): wrong values there are not detected, as in FlashAttention.
    """
    _refuse_untracked_gradients([(q, "q"), (k, "k"), (v, "v")])
    drop = _dropout(dropout_p, dropout_seed, dropout_offset)
    layout = Layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, causal,
                    softmax_scale, window, softcap, alibi_slopes, sinks)
    fast = None if drop else _fast_backend((q, k, v, *_present(*layout.arrays())), causal,
                                           softmax_scale)
    if fast is not None:  # CUDA torch / CuPy arrays: a known layout replays its launches
        done = varlen_fastpath.forward(fast, q, k, v, layout)
        if done is not None:
            o, m, l, fields = done
            return o, VarlenStats(m, l, **fields)
    call = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        **layout.checked())
    problem = call.problem
    shape_q, shape_kv = call.shapes
    with caller_stream(call.q):
        if call.q.is_cuda:
            from .varlen_gpu import pair_runs, varlen_forward_gpu

            if call.pair and not pair_runs(call, dropout=bool(drop)):  # one head_dim: copies
                o, m, l = varlen_forward_gpu(call.padded()[0], drop)
                o = head_pad.cut(o, call.v.array.shape[2])
            else:
                o, m, l = varlen_forward_gpu(call, drop)
        else:
            o, m, l = varlen_forward_cpu(call.q.array, call.k.array, call.v.array,
                                         call.seqlens, causal=problem.causal,
                                         softmax_scale=problem.softmax_scale,
                                         **call.modifiers.cpu_kwargs(), **drop)
        stats = VarlenStats(export_array(m, like=call.q), export_array(l, like=call.q),
                            causal=problem.causal, softmax_scale=problem.softmax_scale,
                            shape_q=shape_q, shape_kv=shape_kv, seqlens=call.record,
                            dropout=_dropout_record(drop), **call.modifiers.record())
        return export_array(o, like=call.q), stats


def attention_varlen_backward(do, q, k, v, o, stats: SoftmaxStats, cu_seqlens_q, cu_seqlens_k,
                              max_seqlen_q, max_seqlen_k, *, seqused_k=None,
                              causal: bool = False, softmax_scale: float | None = None,
                              deterministic: bool = False, window=None, softcap=None,
                              alibi_slopes=None, sinks=None, dropout_p=0.0, dropout_seed=None,
                              dropout_offset=0):
    """Gradients of variable-length attention from the forward's o and statistics.

    do, o: (total_q, heads, head_dim) like q; stats: the ``VarlenStats`` of
    ``attention_varlen_forward`` (or a hand-built ``SoftmaxStats(m, l)`` with float32
    C-contiguous (heads, total_q) arrays, not checked against the forward). The other
    arguments are the forward's; a recorded forward that differs raises ``ValueError``.
    ``deterministic``: on CUDA, dQ by its own pass without atomics (bitwise reproducible);
    the CPU path always is. Dropout's three values must be the forward's (its mask is
    regenerated).

    Returns (dq, dk, dv) like q, k, v (keys past seqused_k get 0), and float32 dsinks
    (heads,), summed over every sequence, when ``sinks`` is given.
    """
    if not isinstance(stats, SoftmaxStats):
        raise TypeError(f"stats: expected the VarlenStats returned by attention_varlen_forward"
                        f", got {type(stats).__name__}")
    deterministic = validate.check_bool(deterministic, "deterministic")
    _refuse_untracked_gradients([(do, "do"), (q, "q"), (k, "k"), (v, "v"), (o, "o")])
    drop = _dropout(dropout_p, dropout_seed, dropout_offset)
    layout = Layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, causal,
                    softmax_scale, window, softcap, alibi_slopes, sinks)
    fast = None if drop or stats.dropout else _fast_backend(
        (do, q, k, v, o, stats.m, stats.l, *_present(*layout.arrays())), causal, softmax_scale)
    if fast is not None:  # CUDA torch / CuPy arrays: a known layout replays its launches
        grads = varlen_fastpath.backward(fast, do, q, k, v, o, stats, layout, deterministic)
        if grads is not None:
            return grads
    call, ido, io, im, il = _check_backward(do, q, k, v, o, stats, cu_seqlens_q, cu_seqlens_k,
                                            max_seqlen_q, max_seqlen_k, **layout.checked())
    check_origin(stats, call.problem, call.shapes, call.modifiers, call.record,
                 _dropout_record(drop))
    problem = call.problem
    with caller_stream(call.q):
        if call.q.is_cuda:
            from .varlen_gpu import pair_runs, varlen_backward_gpu

            if call.pair and not pair_runs(call, deterministic, bool(drop)):  # copies
                padded, pdo, po = call.padded(ido.array, io.array)
                grads = varlen_backward_gpu(padded, pdo, po, im.array, il.array, deterministic,
                                            drop)
                widths = (call.q.array.shape[2], call.k.array.shape[2], call.v.array.shape[2])
                grads = (*(head_pad.cut(g, w) for g, w in zip(grads, widths)), *grads[3:])
            else:
                grads = varlen_backward_gpu(call, ido.array, io.array, im.array, il.array,
                                            deterministic, drop)
        else:
            grads = varlen_backward_cpu(ido.array, call.q.array, call.k.array, call.v.array,
                                        io.array, im.array, il.array, call.seqlens,
                                        causal=problem.causal,
                                        softmax_scale=problem.softmax_scale,
                                        center_keys=stats.recorded,
                                        **call.modifiers.cpu_kwargs(), **drop)
        return tuple(export_array(g, like=call.q) for g in grads)


def check_varlen_backward(do, q, k, v, o, stats, *args, **kwargs) -> _VarlenCall:
    """``check_varlen`` and the backward's own arrays (do, o, stats.m, stats.l): shapes,
    dtypes, devices, row alignment; not the statistics' origin (``check_origin``)."""
    return _check_backward(do, q, k, v, o, stats, *args, **kwargs)[0]


def _check_backward(do, q, k, v, o, stats, *args, **kwargs) -> tuple:
    call = check_varlen(q, k, v, *args, **kwargs)
    ido, io = import_array(do, "do"), import_array(o, "o")
    im, il = import_array(stats.m, "stats.m"), import_array(stats.l, "stats.l")
    o_shape = tuple(call.q.array.shape[:2]) + tuple(call.v.array.shape[2:])  # v's head_dim_v
    for x, name in ((ido, "do"), (io, "o")):
        validate._check_like_q(x, name, call.q, call.problem.dtype, o_shape)
        if x.is_cuda:
            validate.check_alignment(x.array[None], name)
    stats_shape = (call.problem.heads, call.q.array.shape[0])
    for x, name in ((im, "stats.m"), (il, "stats.l")):
        validate._check_stats(x, name, call.q, stats_shape)
    return call, ido, io, im, il


def check_origin(stats: SoftmaxStats, problem: validate.Problem, shapes: tuple,
                 modifiers: validate.Modifiers, record: tuple,
                 dropout: tuple | None = None) -> None:
    """The recorded forward's causal, scale, shapes, modifiers, dropout ((p, seed, offset)
    or None) and sequence layout (``record``: this call's, as ``_VarlenCall.record``)."""
    shape_q, shape_kv = shapes
    validate.check_stats_origin(stats, problem.causal, problem.softmax_scale, shape_q,
                                shape_kv, modifiers, dropout)
    recorded = getattr(stats, "seqlens", None)
    if stats.recorded and recorded != record:
        names = ("cu_seqlens_q", "cu_seqlens_k", "seqused_k")
        if recorded is None:
            raise ValueError("stats: expected the VarlenStats of attention_varlen_forward, got "
                             "the SoftmaxStats of a dense forward")
        pairs = zip(names, recorded[-5:-2], record[-5:-2]) if recorded[0] == "device" \
            else zip(names, recorded, record)
        name = next((n for n, a, b in pairs if a != b), "max_seqlen_q")
        raise ValueError(f"{name}: expected the sequence layout of the forward pass that made "
                         f"stats, got another; the gradients would be wrong")

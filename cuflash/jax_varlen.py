"""``cuflash.jax.flash_attention_varlen``: variable-length attention (docs/varlen.md) for JAX,
with a custom VJP, eagerly and under ``jax.jit`` / ``jax.grad`` / ``jax.vmap``.

Concrete arrays go straight through ``cuflash.attention_varlen_forward`` / ``_backward`` (the
NumPy path on the CPU, the kernels on CUDA). Traced arrays become calls of two XLA FFI
targets, registered for the CPU and CUDA platforms like ``cuflash.jax``'s own:

* ``cuflash_attention_varlen_fwd``: (q, k, v, cu_q, cu_k, [seqused_k], [slopes], [sinks],
  [rng]) -> (o, m, l), m and l float32 (heads, total_q)
* ``cuflash_attention_varlen_bwd``: (do, q, k, v, o, m, l, cu_q, cu_k, [seqused_k],
  [slopes], [sinks], [rng]) -> (dq, dk, dv, [dsinks])

The max lengths, flags and modifiers are attributes (static); booleans say which optional
operands are present. The handlers run the same API calls on views of XLA's buffers (NumPy on
the CPU; CuPy on XLA's stream on CUDA, where the results are computed into CuPy's pool and
copied into XLA's buffers: one copy of o, m, l or the gradients more than the dense targets).
A packed batch cannot fold vmap's axes into its sequences, so a vmapped call runs one call per
entry (``vmap_method="sequential"``). Dropout (``dropout_p``, an attribute) adds ``rng``, the
PRNG key's three uint32 words (``cuflash.jax.dropout_words``), read on the host by the
handler as the API's seed and offset (on CUDA a 12-byte copy that waits for XLA's stream).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import philox, validate, xla_ffi
from .api import _present as present
from .stats import SoftmaxStats

FORWARD_TARGET = "cuflash_attention_varlen_fwd"
BACKWARD_TARGET = "cuflash_attention_varlen_bwd"


@dataclass(frozen=True)
class Options:
    """The static part of a call: what the attributes carry."""

    max_q: int
    max_k: int
    causal: bool
    softmax_scale: float
    window: tuple[int, int] | None
    softcap: float | None
    seqused: bool
    alibi: bool
    sinks: bool
    dropout_p: float = 0.0

    def attributes(self) -> dict:
        left, right = self.window or (-1, -1)
        return {"max_q": np.int64(self.max_q), "max_k": np.int64(self.max_k),
                "causal": self.causal, "softmax_scale": np.float64(self.softmax_scale),
                "window_left": np.int64(left), "window_right": np.int64(right),
                "softcap": np.float64(self.softcap or 0.0), "seqused": self.seqused,
                "alibi": self.alibi, "sinks": self.sinks,
                "dropout_p": np.float64(self.dropout_p)}

    @classmethod
    def of(cls, call: xla_ffi.Call) -> "Options":
        a = call.attrs
        return cls(max_q=int(a["max_q"]), max_k=int(a["max_k"]), causal=bool(a["causal"]),
                   softmax_scale=float(a["softmax_scale"]),
                   window=validate.check_window((int(a["window_left"]),
                                                 int(a["window_right"]))),
                   softcap=validate.check_softcap(float(a["softcap"])),
                   seqused=bool(a["seqused"]), alibi=bool(a["alibi"]), sinks=bool(a["sinks"]),
                   dropout_p=float(a.get("dropout_p", 0.0)))

    def optional(self, extra: list) -> dict:
        """The optional operands (in order: seqused_k, slopes, sinks, rng) by keyword."""
        extra = list(extra)
        return dict(seqused_k=extra.pop(0) if self.seqused else None,
                    alibi_slopes=extra.pop(0) if self.alibi else None,
                    sinks=extra.pop(0) if self.sinks else None,
                    rng=extra.pop(0) if self.dropout_p else None)

    def api(self, optional: dict) -> dict:
        """Keyword arguments of ``attention_varlen_forward`` / ``_backward`` after the max
        lengths (dropout's words read on the host as its seed and offset)."""
        optional = dict(optional)
        rng = optional.pop("rng", None)
        if rng is not None:
            words = rng.get() if hasattr(rng, "get") else np.asarray(rng)
            seed, offset = philox.seed_offset_of_words(words)
            optional.update(dropout_p=self.dropout_p, dropout_seed=seed,
                            dropout_offset=offset)
        return dict(causal=self.causal, softmax_scale=self.softmax_scale, window=self.window,
                    softcap=self.softcap, **optional)


# -- the targets ---------------------------------------------------------------------------


def _views(call: xla_ffi.Call, on_cuda: bool, device_id: int | None):
    view = (lambda b: b.as_cupy(device_id)) if on_cuda else (lambda b: b.as_numpy())
    return [view(b) for b in call.args], [view(b) for b in call.rets]


def _copy(out, value) -> None:
    """value into XLA's buffer, as bytes (CuPy has no bfloat16 arithmetic to copy with)."""
    if out.size:
        out.view(np.uint8)[...] = value.view(np.uint8)


def _run(call: xla_ffi.Call, on_cuda: bool, body) -> None:
    if not on_cuda:
        return body(*_views(call, False, None))
    with call.on_cuda_stream() as device_id:  # CuPy's current stream: XLA's
        return body(*_views(call, True, device_id))


def forward_target(call: xla_ffi.Call, *, on_cuda: bool) -> None:
    from .varlen import attention_varlen_forward

    options = Options.of(call)

    def body(args, rets):
        q, k, v, cu_q, cu_k, *extra = args
        o, stats = attention_varlen_forward(q, k, v, cu_q, cu_k, options.max_q, options.max_k,
                                            **options.api(options.optional(extra)))
        for out, value in zip(rets, (o, stats.m, stats.l)):
            _copy(out, value)

    _run(call, on_cuda, body)


def backward_target(call: xla_ffi.Call, *, on_cuda: bool) -> None:
    from .varlen import attention_varlen_backward

    options = Options.of(call)
    deterministic = bool(call.attrs["deterministic"])

    def body(args, rets):
        do, q, k, v, o, m, l, cu_q, cu_k, *extra = args
        grads = attention_varlen_backward(
            do, q, k, v, o, SoftmaxStats(m, l), cu_q, cu_k, options.max_q, options.max_k,
            deterministic=deterministic, **options.api(options.optional(extra)))
        for out, value in zip(rets, grads, strict=True):
            _copy(out, value)

    _run(call, on_cuda, body)


def register_targets() -> None:
    """Both targets for XLA:CPU and XLA:CUDA, once per process."""
    for platform, on_cuda in (("cpu", False), ("CUDA", True)):
        xla_ffi.register(FORWARD_TARGET, partial(forward_target, on_cuda=on_cuda), platform)
        xla_ffi.register(BACKWARD_TARGET, partial(backward_target, on_cuda=on_cuda), platform)


# -- forward and backward on JAX arrays ----------------------------------------------------


def _forward(q, k, v, cu_q, cu_k, used, slopes, sinks, rng, options: Options):
    """(o, m, l) for concrete or traced arrays."""
    from .jax import _is_concrete

    optional = dict(seqused_k=used, alibi_slopes=slopes, sinks=sinks, rng=rng)
    if _is_concrete(q, k, v, cu_q, cu_k, used, slopes, sinks, rng):
        from .varlen import attention_varlen_forward

        o, stats = attention_varlen_forward(q, k, v, cu_q, cu_k, options.max_q, options.max_k,
                                            **options.api(optional))
        return o, stats.m, stats.l
    register_targets()
    stats = jax.ShapeDtypeStruct((q.shape[1], q.shape[0]), jnp.float32)
    specs = (jax.ShapeDtypeStruct(q.shape, q.dtype), stats, stats)
    call = jax.ffi.ffi_call(FORWARD_TARGET, specs, vmap_method="sequential")
    return tuple(call(q, k, v, cu_q, cu_k, *present(used, slopes, sinks, rng),
                      **options.attributes()))


def _backward(do, q, k, v, o, m, l, cu_q, cu_k, used, slopes, sinks, rng, options: Options,
              deterministic: bool):
    """(dq, dk, dv[, dsinks]) for concrete or traced arrays."""
    from .jax import _is_concrete

    optional = dict(seqused_k=used, alibi_slopes=slopes, sinks=sinks, rng=rng)
    if _is_concrete(do, q, k, v, o, m, l, cu_q, cu_k, used, slopes, sinks, rng):
        from .varlen import attention_varlen_backward

        return attention_varlen_backward(do, q, k, v, o, SoftmaxStats(m, l), cu_q, cu_k,
                                         options.max_q, options.max_k,
                                         deterministic=deterministic, **options.api(optional))
    register_targets()
    specs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    if sinks is not None:
        specs += (jax.ShapeDtypeStruct(sinks.shape, jnp.float32),)
    call = jax.ffi.ffi_call(BACKWARD_TARGET, specs, vmap_method="sequential")
    return tuple(call(do, q, k, v, o, m, l, cu_q, cu_k, *present(used, slopes, sinks, rng),
                      deterministic=bool(deterministic), **options.attributes()))


@partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _varlen(q, k, v, cu_q, cu_k, used, slopes, sinks, rng, options, deterministic):
    return _forward(q, k, v, cu_q, cu_k, used, slopes, sinks, rng, options)[0]


def _varlen_fwd(q, k, v, cu_q, cu_k, used, slopes, sinks, rng, options, deterministic):
    o, m, l = _forward(q, k, v, cu_q, cu_k, used, slopes, sinks, rng, options)
    return o, (q, k, v, cu_q, cu_k, used, slopes, sinks, rng, o, m, l)


def _varlen_bwd(options, deterministic, residuals, do):
    q, k, v, cu_q, cu_k, used, slopes, sinks, rng, o, m, l = residuals
    do = jnp.asarray(do)  # a cotangent handed in as NumPy: the API wants q's framework
    grads = _backward(do, q, k, v, o, m, l, cu_q, cu_k, used, slopes, sinks, rng, options,
                      deterministic)
    # offsets, slopes and dropout's words get no gradient (integers; constants as in
    # FlashAttention): None is JAX's zero cotangent; sinks get theirs, float32 (heads,)
    dsinks = grads[3] if sinks is not None else None
    return (*grads[:3], None, None, None, None, dsinks, None)


_varlen.defvjp(_varlen_fwd, _varlen_bwd)


# -- the public function ---------------------------------------------------------------------


def _check(named: dict, max_q, max_k, causal, scale, window, softcap) -> Options:
    """The core API's checks on shapes, dtypes and flags, on stand-ins: the same errors at
    trace time as an eager call (offset values are the handler's: checked on the CPU when
    the call runs, trusted on CUDA)."""
    from .jax import _check_head_array, _shape_only, _stand_in
    from .varlen import check_varlen

    for name, x in named.items():
        _check_head_array(x, name)  # a JAX array, tracer or NumPy array
    s = {name: _stand_in(x) for name, x in named.items()}
    for name in ("q", "k", "v"):  # no storage for the big ones
        if named[name].ndim == 3:
            s[name] = _shape_only(named[name])
    call = check_varlen(s["q"], s["k"], s["v"], s["cu_seqlens_q"], s["cu_seqlens_k"], max_q,
                        max_k, seqused_k=s["seqused_k"], causal=causal, softmax_scale=scale,
                        modifiers=dict(window=window, softcap=softcap,
                                       alibi_slopes=s["alibi_slopes"], sinks=s["sinks"]),
                        values_known=False)
    p, mods = call.problem, call.modifiers
    return Options(max_q=p.seqlen_q, max_k=p.seqlen_k, causal=p.causal,
                   softmax_scale=p.softmax_scale, window=mods.window, softcap=mods.softcap,
                   seqused=named["seqused_k"] is not None,
                   alibi=named["alibi_slopes"] is not None, sinks=named["sinks"] is not None)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                           max_seqlen_k: int, *, seqused_k=None, causal: bool = False,
                           softmax_scale: float | None = None, deterministic: bool = False,
                           window=None, softcap=None, alibi_slopes=None, sinks=None,
                           dropout_p: float = 0.0, dropout_key=None):
    """Variable-length attention (FlashAttention-2's ``flash_attn_varlen_func`` layout) with a
    custom VJP.

    Args:
        q: (total_q, heads, head_dim), every sequence's queries back to back; k
            (total_k, heads_kv, head_dim), v (total_k, heads_kv, head_dim_v); float16,
            bfloat16 or float32 ``jax.Array`` (or NumPy) arrays, head dims multiples of 8
            up to 256 (v's may differ: the call then runs on copies padded in JAX).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) offsets (arrays: may be traced).
        max_seqlen_q, max_seqlen_k: Python ints >= the longest sequences (static).
        seqused_k: optional int32 (batch,): sequence b attends to its first seqused_k[b] keys.
        causal, softmax_scale, deterministic, window, softcap: static, as in
            ``cuflash.jax.flash_attention``; alibi_slopes float32 (heads,) or (batch, heads)
            and sinks float32 (heads,): arrays.
        dropout_p, dropout_key: dropout as in ``cuflash.jax.flash_attention`` (a static
            rate and a JAX PRNG key); sequence b drops as batch entry b of a dense call
            (docs/varlen.md). The handler reads the key's words on the host (on CUDA a
            12-byte copy that waits for XLA's stream).

    Returns:
        o: (total_q, heads, head_dim_v), q's dtype. Differentiable in q, k, v and sinks.

    The semantics are ``cuflash.attention_varlen_forward``'s (docs/varlen.md): causal,
    windows and ALiBi bottom-right within each sequence. Shapes, dtypes and flags are
    checked at trace time with the eager errors. Offset values are checked when the call
    runs on the CPU (under jit a failure is raised by JAX as ``XlaRuntimeError``) and
    trusted on CUDA, as in FlashAttention. ``jax.vmap`` runs one call per vmapped entry.
    """
    named = dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                 seqused_k=seqused_k, alibi_slopes=alibi_slopes, sinks=sinks)
    deterministic = validate.check_bool(deterministic, "deterministic")
    from .jax import _check_dropout_key, dropout_words, pad_to_kernel_widths  # (imports this)

    dropout_p = philox.check_dropout(0.0 if dropout_p is None else dropout_p, 0, 0)
    _check_dropout_key(dropout_p, dropout_key)
    options = _check(named, max_seqlen_q, max_seqlen_k, causal, softmax_scale, window, softcap)
    options = replace(options, dropout_p=dropout_p)
    arrays = [None if x is None else jnp.asarray(x) for x in named.values()]
    rng = dropout_words(dropout_key) if dropout_p else None

    # v's own head_dim_v: q, k, v padded to one width (the scale in options is q's own)
    head_dim_v = arrays[2].shape[-1]
    q, k, v, padded = pad_to_kernel_widths(*arrays[:3])
    o = _varlen(q, k, v, *arrays[3:], rng, options, deterministic)
    return o[..., :head_dim_v] if padded else o

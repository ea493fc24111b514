"""JAX adapter: ``flash_attention`` with a custom VJP, usable eagerly and under jit / grad / vmap.

Import it explicitly (``import cuflash.jax``); ``import cuflash`` never imports jax.

What runs where (docs/frameworks.md has the full table):

* Concrete arrays (eager calls, including eager ``jax.grad`` / ``jax.vjp``, whose custom-VJP
  rules JAX calls with concrete arrays): straight through ``cuflash.attention_forward`` /
  ``attention_backward``. CPU arrays run the NumPy path, GPU arrays the CUDA kernels, ordered
  after JAX's pending work through the DLPack stream handshake (see ``cuflash.interop``).
* Traced arrays (inside ``jax.jit``, ``jax.vmap``, ``lax.scan`` ...): a ``jax.ffi.ffi_call``
  to the XLA FFI targets ``cuflash_attention_fwd`` / ``cuflash_attention_bwd``, written in
  Python with ctypes (``cuflash.xla_ffi``) and registered for two platforms:

  - CUDA: the handler wraps XLA's device buffers as CuPy arrays (no copies), makes XLA's
    stream CuPy's current stream and launches the kernels there, writing straight into XLA's
    result buffers. No host round trip; ordered like any XLA op.
  - cpu: the same call frame, viewed as NumPy arrays, runs the NumPy path.

  Calls with score modifiers (window, softcap, ALiBi slopes, sinks) take targets of their
  own, ``cuflash.jax_modifiers``, so plain calls keep theirs unchanged; decoding against a
  K/V cache (``attention_with_kvcache``) takes ``cuflash.jax_decode``'s.

  ``vmap_method="broadcast_all"``: a vmapped call hands the target arrays with extra leading
  axes (every argument tiled to the full batch), and the target folds all leading axes into
  the batch axis, so a vmap is one call over a bigger batch instead of a loop
  (``"sequential"``) over the vmapped axis. Shapes and dtypes are validated at trace time
  with the errors an eager call raises; the handler validates again (alignment, CUDA limits)
  and reports a failure as an XLA error, raised by JAX as an ``XlaRuntimeError``.
"""

from __future__ import annotations

import contextlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import api, block_sparse, head_pad, jax_decode, jax_modifiers, philox, validate, xla_ffi
from . import launch as launch_mod
from . import plan as planning
from .plan import Shape
from .stats import SoftmaxStats

__all__ = ["flash_attention", "dropout_words", "dropout_seed_offset"]

_VMAP_METHOD = "broadcast_all"
_FORWARD_TARGET = "cuflash_attention_fwd"
_BACKWARD_TARGET = "cuflash_attention_bwd"


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


# -- the XLA FFI targets: run by XLA on its own buffers; leading axes come from vmap ------------


def _target_options(call: xla_ffi.Call) -> dict:
    return {"causal": bool(call.attrs["causal"]),
            "softmax_scale": float(call.attrs["softmax_scale"])}


def _deterministic(call: xla_ffi.Call) -> bool:
    """The backward's ``deterministic`` attribute (absent in calls lowered before it existed)."""
    return bool(call.attrs.get("deterministic", False))


def _forward_target(call: xla_ffi.Call, *, on_cuda: bool) -> None:
    """(q, k, v) -> (o, m, l), written into XLA's result buffers."""
    views = [b.folded(4) for b in call.args + call.rets[:1]] + [b.folded(3) for b in call.rets[1:]]
    options = _target_options(call)
    if on_cuda:
        _cuda_forward(call, views, options)
        return
    from .cpu import flash_forward_cpu

    q, k, v, o, m, l = (b.as_numpy() for b in views)
    validate.check_forward(q, k, v, **options)
    # The NumPy path allocates its outputs; one O(n) copy next to its O(n^2) work.
    for result, value in zip((o, m, l), flash_forward_cpu(q, k, v, **options)):
        np.copyto(result, value)


def _backward_target(call: xla_ffi.Call, *, on_cuda: bool) -> None:
    """(do, q, k, v, o, m, l) -> (dq, dk, dv), written into XLA's result buffers."""
    views = ([b.folded(4) for b in call.args[:5]] + [b.folded(3) for b in call.args[5:]]
             + [b.folded(4) for b in call.rets[:3]])  # rets[3]: the CUDA kernels' scratch
    options = _target_options(call)
    if on_cuda:
        _cuda_backward(call, views, call.rets[3], options)
        return
    from .cpu import flash_backward_cpu

    do, q, k, v, o, m, l, dq, dk, dv = (b.as_numpy() for b in views)
    validate.check_backward(do, q, k, v, o, m, l, **options)
    for result, value in zip((dq, dk, dv), flash_backward_cpu(do, q, k, v, o, m, l, **options)):
        np.copyto(result, value)  # as in the forward: the NumPy path allocates


# -- the CUDA targets' hot path: validate and plan once per call signature --------------------
# XLA hands the same shapes, dtypes and attributes to every execution of a compiled call, so
# the checks, the plan and the kernel parameters a layout fixes are memoized by them; an
# execution then reads the addresses and the stream and launches (no CuPy arrays).

_cuda_calls: dict = {}


def _signature(views, options: dict, *extra) -> tuple:
    return (*((b.dtype, b.shape) for b in views), options["causal"], options["softmax_scale"],
            *extra)


def _contiguous(b: xla_ffi.BufferView) -> launch_mod.Operand:
    _, seqlen, heads, head_dim = b.shape
    return launch_mod.Operand(b.data, seqlen * heads * head_dim, heads * head_dim, head_dim,
                              b.dtype.itemsize)


def _check_addresses(views) -> None:
    """XLA aligns its buffers far beyond 16 bytes; checked anyway, it costs nothing."""
    for b in views:
        if b.data % validate.ROW_ALIGNMENT and b.nbytes:
            raise ValueError(f"XLA buffer at {b.data:#x} is not {validate.ROW_ALIGNMENT}-byte "
                             "aligned, which the CUDA kernels need")


def _cuda_forward(call: xla_ffi.Call, views, options: dict) -> None:
    key = _signature(views, options, "fwd")
    known = _cuda_calls.get(key)
    device_id = call.device_id()
    if known is None:  # the full checks, once per signature
        q, k, v = (b.as_cupy(device_id) for b in views[:3])
        problem = validate.check_forward(q, k, v, **options)
        shape = Shape.of(problem)
        strides = tuple(x for b in views[:4] for x in _contiguous(b)[1:4])
        known = _cuda_calls[key] = (shape, launch_mod.forward_tail(shape, strides,
                                                                   problem.softmax_scale))
    shape, tail = known
    _check_addresses(views)
    o, m, l = views[3:]
    if shape.empty:
        if o.nbytes:
            with call.on_cuda_stream():
                launch_mod.fill_no_key_forward(*(b.as_cupy(device_id) for b in (o, m, l)))
        return
    with _current_device(device_id):
        plan = launch_mod.forward_plan(shape, device_id)
        launch_mod.launch_forward(plan, tuple(b.data for b in views), tail,
                                  views[0].dtype.itemsize, call.stream(), device_id)


def _cuda_backward(call: xla_ffi.Call, views, scratch: xla_ffi.BufferView, options) -> None:
    deterministic = _deterministic(call)
    key = _signature(views, options, "bwd", deterministic)
    known = _cuda_calls.get(key)
    device_id = call.device_id()
    if known is None:
        do, q, k, v, o, m, l = (b.as_cupy(device_id) for b in views[:7])
        problem = validate.check_backward(do, q, k, v, o, m, l, **options)
        known = _cuda_calls[key] = (Shape.of(problem), problem.softmax_scale)
    shape, scale = known
    _check_addresses(views)
    dq, dk, dv = views[7:]
    if shape.empty:
        with call.on_cuda_stream():
            for b in (dq, dk, dv):
                if b.nbytes:
                    b.as_cupy(device_id).view(np.uint8).fill(0)
        return
    with _current_device(device_id):
        plan = launch_mod.backward_plan(shape, device_id, deterministic)
        need = planning.backward_workspace(plan).total_bytes
        if scratch.nbytes < need:
            raise AssertionError(f"scratch of {scratch.nbytes} bytes, the plan needs {need}")
        ops = [_contiguous(b) for b in views[:5]] + [_contiguous(b) for b in views[7:]]
        launch_mod.run_backward(plan, *ops[:5], views[5].data, views[6].data, *ops[5:], scale,
                                scratch.data, call.stream(), device_id)


def _current_device(device_id: int):
    import cupy

    if cupy.cuda.runtime.getDevice() == device_id:
        return contextlib.nullcontext()
    return cupy.cuda.Device(device_id)


def _scratch_spec(q, k, deterministic: bool) -> jax.ShapeDtypeStruct:
    """Scratch for the CUDA backward, as a result XLA allocates (on its stream, freed after):
    ``plan.workspace_bound`` of the problem, which holds for any device. vmap tiles leading
    axes onto this result too, so each entry is sized for one unfolded call, plus slack for
    the folded call's region alignment."""
    *lead, batch, seqlen_q, heads, head_dim = q.shape
    shape = Shape(batch, seqlen_q, k.shape[-3], heads, k.shape[-2], head_dim, "float32", False)
    nbytes = (planning.workspace_bound(shape, deterministic).total_bytes
              + 8 * planning.SCRATCH_ALIGN)
    return jax.ShapeDtypeStruct((*lead, nbytes), jnp.uint8)


def _register_targets() -> None:
    """Register both targets for XLA:CPU and XLA:GPU (CUDA), once per process (later calls
    return at once; ``xla_ffi.register`` is thread-safe). Registering for CUDA on a machine
    without it only queues the registration; nothing imports CuPy."""
    for platform, on_cuda in (("cpu", False), ("CUDA", True)):
        xla_ffi.register(_FORWARD_TARGET, partial(_forward_target, on_cuda=on_cuda), platform)
        xla_ffi.register(_BACKWARD_TARGET, partial(_backward_target, on_cuda=on_cuda), platform)


def _ffi_attributes(causal: bool, softmax_scale: float) -> dict:
    # float64 so that a jitted call uses exactly the eager call's scale (the kernels round it
    # to float32 themselves, the NumPy path does not)
    return {"causal": bool(causal), "softmax_scale": np.float64(softmax_scale)}


def _check_array(x, name: str) -> None:
    """A JAX array (or tracer) or a NumPy array: what the core API takes, traced or not."""
    if not isinstance(x, (jax.Array, jax.core.Tracer, np.ndarray)):
        raise TypeError(f"{name}: expected a jax.Array or numpy.ndarray, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected a 4-D array (batch, seqlen, heads, head_dim), "
                         f"got {x.ndim}-D with shape {tuple(x.shape)}")
    # checked before jnp.asarray, which would turn a NumPy float64 into float32 silently
    if np.dtype(x.dtype).name not in validate.SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, "
                        f"got {np.dtype(x.dtype).name}")


# -- forward and backward on JAX arrays ----------------------------------------------------------


def _stats_spec(q) -> jax.ShapeDtypeStruct:
    *lead, batch, seqlen_q, heads, _ = q.shape
    return jax.ShapeDtypeStruct((*lead, batch, heads, seqlen_q), jnp.float32)


def _shape_only(x) -> np.ndarray:
    """A NumPy stand-in with x's shape and dtype and no real storage (strides 0 but the last),
    so ``validate`` can check a traced array's shape and dtype at trace time."""
    dtype = np.dtype(x.dtype)
    row = np.empty(max(x.shape[-1], 1), dtype=dtype)
    strides = (0,) * (x.ndim - 1) + (dtype.itemsize,)
    return np.lib.stride_tricks.as_strided(row, x.shape, strides, writeable=False)


def _forward(q, k, v, causal: bool, softmax_scale: float):
    """(o, m, l) for concrete or traced arrays."""
    if _is_concrete(q, k, v):
        o, stats = api.attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
        return o, stats.m, stats.l
    # the same errors, at trace time, that an eager call would raise
    validate.check_forward(*(_shape_only(x) for x in (q, k, v)), causal=causal,
                           softmax_scale=softmax_scale)
    _register_targets()
    specs = (jax.ShapeDtypeStruct(q.shape, q.dtype), _stats_spec(q), _stats_spec(q))
    call = jax.ffi.ffi_call(_FORWARD_TARGET, specs, vmap_method=_VMAP_METHOD)
    return tuple(call(q, k, v, **_ffi_attributes(causal, softmax_scale)))


def _backward(do, q, k, v, o, m, l, causal: bool, softmax_scale: float, deterministic: bool):
    """(dq, dk, dv) for concrete or traced arrays."""
    if _is_concrete(do, q, k, v, o, m, l):
        return api.attention_backward(do, q, k, v, o, SoftmaxStats(m, l), causal=causal,
                                      softmax_scale=softmax_scale, deterministic=deterministic)
    _register_targets()
    specs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    specs += (_scratch_spec(q, k, deterministic),)
    call = jax.ffi.ffi_call(_BACKWARD_TARGET, specs, vmap_method=_VMAP_METHOD)
    return tuple(call(do, q, k, v, o, m, l, deterministic=bool(deterministic),
                      **_ffi_attributes(causal, softmax_scale))[:3])


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash(q, k, v, causal: bool, softmax_scale: float, deterministic: bool):
    return _forward(q, k, v, causal, softmax_scale)[0]


def _flash_fwd(q, k, v, causal, softmax_scale, deterministic):
    o, m, l = _forward(q, k, v, causal, softmax_scale)
    return o, (q, k, v, o, m, l)


def _flash_bwd(causal, softmax_scale, deterministic, residuals, do):
    q, k, v, o, m, l = residuals
    return tuple(_backward(do, q, k, v, o, m, l, causal, softmax_scale, deterministic))


_flash.defvjp(_flash_fwd, _flash_bwd)


# -- calls with score modifiers (docs/masks.md): their own targets, cuflash.jax_modifiers ---


def _forward_mods(q, k, v, slopes, sinks, mask, rng, options: jax_modifiers.Options):
    """(o, m, l) of a call with modifiers, a block mask or dropout, for concrete or traced
    arrays."""
    if _is_concrete(q, k, v, slopes, sinks, mask, rng):
        o, stats = api.attention_forward(q, k, v, **_api_options(options, slopes, sinks, mask,
                                                                 rng))
        return o, stats.m, stats.l
    jax_modifiers.register_targets()
    specs = (jax.ShapeDtypeStruct(q.shape, q.dtype), _stats_spec(q), _stats_spec(q))
    call = jax.ffi.ffi_call(jax_modifiers.FORWARD_TARGET, specs, vmap_method=_VMAP_METHOD)
    return tuple(call(q, k, v, *_extra_operands(q, slopes, sinks, mask, rng),
                      **options.attributes()))


def _backward_mods(do, q, k, v, o, m, l, slopes, sinks, mask, rng,
                   options: jax_modifiers.Options, deterministic: bool):
    """(dq, dk, dv), and dsinks with sinks, for concrete or traced arrays."""
    if _is_concrete(do, q, k, v, o, m, l, slopes, sinks, mask, rng):
        return api.attention_backward(do, q, k, v, o, SoftmaxStats(m, l),
                                      deterministic=deterministic,
                                      **_api_options(options, slopes, sinks, mask, rng))
    jax_modifiers.register_targets()
    specs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    specs += (_scratch_spec(q, k, deterministic),)
    if sinks is not None:
        specs += (jax.ShapeDtypeStruct(sinks.shape, jnp.float32),)
    call = jax.ffi.ffi_call(jax_modifiers.BACKWARD_TARGET, specs, vmap_method=_VMAP_METHOD)
    grads = call(do, q, k, v, o, m, l, *_extra_operands(q, slopes, sinks, mask, rng),
                 deterministic=bool(deterministic), **options.attributes())
    return tuple(grads[:3]) + tuple(grads[4:])  # grads[3]: the CUDA kernels' scratch


def _api_options(options: jax_modifiers.Options, slopes, sinks, mask=None, rng=None) -> dict:
    sparse = {} if mask is None else dict(block_mask=mask, block_size=options.block_size)
    if rng is not None:  # concrete: its words read back to the host
        seed, offset = philox.seed_offset_of_words(np.asarray(rng))
        sparse.update(dropout_p=options.dropout_p, dropout_seed=seed, dropout_offset=offset)
    return dict(causal=options.causal, softmax_scale=options.softmax_scale,
                window=options.window, softcap=options.softcap, alibi_slopes=slopes,
                sinks=sinks, **sparse)


def _extra_operands(q, slopes, sinks, mask=None, rng=None) -> list:
    """The targets' optional operands. Slopes go as (batch, heads), so that vmap's leading
    axes fold into the batch with q's (a (heads,) array would be tiled per vmapped entry,
    not per batch entry)."""
    extra = []
    if slopes is not None:
        extra.append(jnp.broadcast_to(slopes, (q.shape[0], q.shape[2])))
    if sinks is not None:
        extra.append(sinks)
    if mask is not None:
        extra.append(mask)
    if rng is not None:
        extra.append(rng)
    return extra


@partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _flash_mods(q, k, v, slopes, sinks, mask, rng, options, deterministic):
    return _forward_mods(q, k, v, slopes, sinks, mask, rng, options)[0]


def _flash_mods_fwd(q, k, v, slopes, sinks, mask, rng, options, deterministic):
    o, m, l = _forward_mods(q, k, v, slopes, sinks, mask, rng, options)
    return o, (q, k, v, slopes, sinks, mask, rng, o, m, l)


def _flash_mods_bwd(options, deterministic, residuals, do):
    q, k, v, slopes, sinks, mask, rng, o, m, l = residuals
    grads = _backward_mods(do, q, k, v, o, m, l, slopes, sinks, mask, rng, options,
                           deterministic)
    # sinks get their gradient (float32 (heads,)); ALiBi slopes, the block mask and the
    # dropout words none (constants, as in FlashAttention): None is JAX's zero cotangent
    dsinks = grads[3] if sinks is not None else None
    return (*grads[:3], None, dsinks, None, None)


_flash_mods.defvjp(_flash_mods_fwd, _flash_mods_bwd)


def _check_head_array(x, name: str) -> None:
    """alibi_slopes / sinks: a JAX array (or tracer) or a NumPy array, checked before
    ``jnp.asarray`` (which would turn float64 into float32 silently)."""
    if x is not None and not isinstance(x, (jax.Array, jax.core.Tracer, np.ndarray)):
        raise TypeError(f"{name}: expected a jax.Array or numpy.ndarray, "
                        f"got {type(x).__name__}")


def _stand_in(x):
    """Zeros with x's shape and dtype: for ``validate`` at trace time (values are checked
    by the call itself: the API eagerly, the FFI handler under jit)."""
    return None if x is None else np.zeros(x.shape, np.dtype(x.dtype))


def _check_modifiers(q, k, v, causal, scale, window, softcap, alibi_slopes, sinks,
                     block_mask=None, block_size=block_sparse.BLOCK_SIZE, dropout_p=0.0
                     ) -> jax_modifiers.Options:
    """The core API's checks on shapes and dtypes, for concrete and traced arrays alike."""
    for x, name in ((alibi_slopes, "alibi_slopes"), (sinks, "sinks"),
                    (block_mask, "block_mask")):
        _check_head_array(x, name)
    q0, k0, v0 = (_shape_only(x) for x in (q, k, v))
    problem = validate.check_forward(q0, k0, v0, causal=causal, softmax_scale=scale)
    mods = validate.check_modifiers(q0, problem, window=window, softcap=softcap,
                                    alibi_slopes=_stand_in(alibi_slopes),
                                    sinks=_stand_in(sinks))
    size = block_sparse.check_block_size(block_size)
    if block_mask is not None:
        block_sparse.check_block_mask(block_mask, size, problem.batch,
                                      problem.heads, problem.seqlen_q, problem.seqlen_k)
    return jax_modifiers.Options(causal=causal, softmax_scale=scale, window=mods.window,
                                 softcap=mods.softcap, alibi=alibi_slopes is not None,
                                 sinks=sinks is not None, block_mask=block_mask is not None,
                                 block_size=size, dropout_p=dropout_p)


def dropout_words(key):
    """The uint32 (3,) words (seed low, seed high, offset) of dropout's Philox stream drawn
    from the JAX PRNG key ``key`` (``jax.random.key`` or a legacy ``jax.random.PRNGKey``):
    ``jax.random.bits(key, (3,), uint32)``. Traced keys give traced words (jit, vmap)."""
    return jax.random.bits(key, (3,), jnp.uint32)


def dropout_seed_offset(key) -> tuple[int, int]:
    """(dropout_seed, dropout_offset) of a concrete key: the core API's arguments that give
    the mask ``flash_attention(..., dropout_key=key)`` draws (``cuflash.dropout_mask``
    materialises it)."""
    return philox.seed_offset_of_words(np.asarray(dropout_words(key)))


def _check_dropout_key(dropout_p: float, key) -> None:
    if key is None:
        if dropout_p > 0:
            raise ValueError("dropout_key: expected a JAX PRNG key (jax.random.key(seed)) "
                             f"with dropout_p > 0, got None (dropout_p={dropout_p})")
        return
    if not isinstance(key, (jax.Array, jax.core.Tracer)):
        raise TypeError(f"dropout_key: expected a JAX PRNG key (jax.random.key(seed)), got "
                        f"{type(key).__name__}")
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if typed and key.shape != ():
        raise ValueError(f"dropout_key: expected one key (shape ()), got shape "
                         f"{tuple(key.shape)}; vmap over keys to run several")
    if not typed and (key.dtype != jnp.uint32 or key.shape != (2,)):
        raise TypeError(f"dropout_key: expected a typed key (jax.random.key) or a legacy "
                        f"uint32 (2,) jax.random.PRNGKey, got {key.dtype} with shape "
                        f"{tuple(key.shape)}")


def flash_attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
                    deterministic: bool = False, window=None, softcap=None, alibi_slopes=None,
                    sinks=None, block_mask=None, block_size=block_sparse.BLOCK_SIZE,
                    dropout_p: float = 0.0, dropout_key=None):
    """Exact attention ``softmax(softmax_scale * q @ k^T) @ v`` with a custom VJP.

    Args:
        q: (batch, seqlen_q, heads, head_dim) ``jax.Array``, float16, bfloat16 or float32;
            head_dim from 1 to 256.
        k, v: (batch, seqlen_k, heads_kv, head_dim) and (..., head_dim_v), same dtype; heads
            a multiple of heads_kv; head_dim_v from 1 to 256. Under jit, head dims the
            kernels lack (not a multiple of 8, or head_dim_v != head_dim) run on copies
            zero-padded in JAX (docs/head_dims.md); eager calls as the core API runs them.
        causal: mask keys after the query's position, bottom-right aligned when
            seqlen_q != seqlen_k (see ``cuflash.attention_forward``). A Python bool (static).
        softmax_scale: default ``1 / sqrt(head_dim)``. A Python float (static), finite,
            positive and within float32's range (not a bool or a string).
        deterministic: the backward computes dQ without atomics, so gradients are bitwise
            identical run to run on CUDA (somewhat slower; the CPU path always is). A Python
            bool (static); under jit it is the FFI attribute ``deterministic``.
        window, softcap, alibi_slopes, sinks: the score modifiers of
            ``cuflash.attention_forward`` (docs/masks.md). ``window`` (a pair of ints) and
            ``softcap`` (a real) are static; ``alibi_slopes`` float32 (heads,) or
            (batch, heads) and ``sinks`` float32 (heads,) are arrays (JAX or NumPy).
            ``sinks`` gets a gradient, float32 (heads,); the slopes get none (a zero
            cotangent: constants, as in FlashAttention).
        block_mask, block_size: block-sparse attention (``cuflash.attention_forward``,
            docs/block_sparse.md): a bool array (JAX or NumPy) of shape (batch | 1,
            heads | 1, ceil(seqlen_q / block_m), ceil(seqlen_k / block_n)); ``block_size``
            static. No gradient.
        dropout_p, dropout_key: dropout on the attention probabilities (docs/dropout.md):
            ``dropout_p`` a static real in [0, 1); ``dropout_key`` a JAX PRNG key
            (``jax.random.key``; traced under jit / vmap), required when dropout_p > 0. The
            key's three words (``dropout_words``) are the Philox seed and offset, so the
            same key gives the same mask, a split key another; the backward regenerates the
            forward's. ``dropout_seed_offset(key)`` gives the core API's seed and offset
            (``cuflash.dropout_mask`` materialises the mask). Eager calls read the words on
            the host; under jit they are an operand, which the CUDA kernels read from
            XLA's buffer when they run. Under vmap each entry runs as its own call with its
            own key.

    Returns:
        o: (batch, seqlen_q, heads, head_dim_v), q's dtype.

    Differentiable in q, k, v (and sinks), with residuals q, k, v, o and the float32
    statistics m, l (the attention probabilities are recomputed in the backward pass).
    Works eagerly on CPU and GPU arrays, and under ``jax.jit`` / ``jax.grad`` / ``jax.vmap``
    (any number of leading vmapped axes) on the CPU and CUDA backends, through an XLA FFI
    custom call (calls with modifiers: ``cuflash.jax_modifiers``' targets). A NaN in a
    visible score shows as NaN in that row's output and gradients. Bad arguments raise
    ``TypeError`` / ``ValueError`` naming the argument, as the core API does, at trace time
    (values of traced slopes / sinks, e.g. their finiteness, are checked when the call runs,
    and a failure there is raised by JAX as an ``XlaRuntimeError``).
    """
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_array(x, name)
    causal = validate.check_bool(causal, "causal")
    deterministic = validate.check_bool(deterministic, "deterministic")
    scale = validate.check_scale(softmax_scale, q.shape[-1])  # of q's own head_dim
    window, softcap = validate.check_window(window), validate.check_softcap(softcap)
    dropout_p = philox.check_dropout(0.0 if dropout_p is None else dropout_p, 0, 0)
    _check_dropout_key(dropout_p, dropout_key)
    plain = (window is None and softcap is None and alibi_slopes is None and sinks is None
             and block_mask is None and dropout_p == 0)
    if plain:  # the shapes' errors before any padding
        validate.check_forward(*(_shape_only(x) for x in (q, k, v)), causal=causal,
                               softmax_scale=scale)
    else:
        options = _check_modifiers(q, k, v, causal, scale, window, softcap, alibi_slopes,
                                   sinks, block_mask, block_size, dropout_p)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)  # NumPy in: JAX arrays out
    head_dim_v = v.shape[-1]
    # concrete arrays go to the API as they are (it pads, or a kernel takes the pair)
    q, k, v, padded = ((q, k, v, False) if _is_concrete(q, k, v)
                       else pad_to_kernel_widths(q, k, v))
    if plain:
        o = _flash(q, k, v, causal, scale, deterministic)
    else:
        slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes)
        sinks = None if sinks is None else jnp.asarray(sinks)
        mask = None if block_mask is None else jnp.asarray(block_mask)
        rng = dropout_words(dropout_key) if dropout_p > 0 else None
        o = _flash_mods(q, k, v, slopes, sinks, mask, rng, options, deterministic)
    return o[..., :head_dim_v] if padded else o


def pad_to_kernel_widths(q, k, v):
    """(q, k, v, padded): JAX arrays whose head dims the kernels lack (not a multiple of 8,
    or v's head_dim_v != head_dim) zero-padded in JAX to ``head_pad.kernel_dim``, as the
    core API pads its arrays (cuflash/head_pad.py: zero columns change no score and give o
    zero columns, cut off by the caller; JAX's own derivatives of the pad and the cut carry
    the gradients)."""
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    if not head_pad.needed(head_dim, head_dim_v):
        return q, k, v, False
    width = head_pad.kernel_dim(head_dim, head_dim_v)

    def pad(x):
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])

    return pad(q), pad(k), pad(v), True


# -- decoding against a K/V cache (issue #16) ---------------------------------------------------


def attention_with_kvcache(q, k_cache, v_cache, *, k_new=None, v_new=None, cache_seqlens=None,
                           block_table=None, causal: bool = False,
                           softmax_scale: float | None = None, window=None, softcap=None,
                           alibi_slopes=None, num_splits: int | None = None,
                           return_softmax_lse: bool = False):
    """``cuflash.attention_with_kvcache`` for JAX arrays (docs/decode.md), eagerly and under
    ``jax.jit`` / ``lax.fori_loop`` / ``lax.scan`` / ``jax.vmap``.

    JAX arrays are immutable, so an append is functional: with ``k_new`` / ``v_new`` the
    updated caches (eagerly made with ``.at[].set``, through ``block_table`` when paged) are
    returned after the results: ``(o, k_cache, v_cache)``, or ``(o, lse, k_cache, v_cache)``
    with ``return_softmax_lse``. ``cache_seqlens`` is the length before the append and is
    not updated (add ``k_new.shape[1]`` for the next step). Other arguments, results and
    errors as the core call.

    Under ``jax.jit`` (any argument a tracer) the call is the XLA FFI target of
    ``cuflash.jax_decode``: on CUDA the eager call's kernels and splits on XLA's stream,
    with no host sync, capturable in XLA's CUDA graphs; on the CPU the NumPy path. An
    append writes into the caches in place when XLA can give their buffers to the call
    (donated caches, or caches carried through a loop), else into copies. Shapes, dtypes
    and flags are checked at trace time with the eager errors; values (lengths, page ids)
    are checked on the CPU when the call runs (raised by JAX as ``XlaRuntimeError``) and
    clamped on CUDA, as in an eager CUDA call. ``jax.vmap`` runs one call per vmapped entry.
    """
    given = {n: x for n, x in dict(q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new,
                                     v_new=v_new, cache_seqlens=cache_seqlens,
                                     block_table=block_table, alibi_slopes=alibi_slopes).items()
             if x is not None}
    return_softmax_lse = validate.check_bool(return_softmax_lse, "return_softmax_lse")
    flags = dict(causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap,
                 num_splits=num_splits)
    if _is_concrete(*given.values()):
        o, lse, caches = _kvcache_eager(given, flags)
    else:
        o, lse, caches = _kvcache_traced(given, flags)
    out = (o, lse) if return_softmax_lse else (o,)
    out += caches
    return out[0] if len(out) == 1 else out


def _kvcache_eager(given: dict, flags: dict):
    """(o, lse, new caches or ()) of concrete arrays, through the framework-neutral call."""
    from . import decode
    from .decode_checks import check_decode
    from .interop import import_array

    imported = {n: import_array(x, n) for n, x in given.items()}
    check_decode(imported["q"], imported["k_cache"], imported["v_cache"],
                 imported.get("cache_seqlens"), block_table=imported.get("block_table"),
                 k_new=imported.get("k_new"), v_new=imported.get("v_new"),
                 alibi_slopes=imported.get("alibi_slopes"), in_place=False, **flags)
    k_cache, v_cache, seqlens = given["k_cache"], given["v_cache"], given.get("cache_seqlens")
    table = given.get("block_table")
    if "k_new" in given:
        k_cache = _append_functional(k_cache, given["k_new"], seqlens, table)
        v_cache = _append_functional(v_cache, given["v_new"], seqlens, table)
        seqlens = jnp.asarray(seqlens) + jnp.int32(given["k_new"].shape[1])
    o, lse = decode.attention_with_kvcache(
        given["q"], k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
        alibi_slopes=given.get("alibi_slopes"), return_softmax_lse=True, **flags)
    return o, lse, (k_cache, v_cache) if "k_new" in given else ()


def _kvcache_traced(given: dict, flags: dict):
    """(o, lse, new caches or ()) with a tracer among the arrays: the XLA FFI target.
    Checked first on stand-ins with each array's shape and dtype (before ``jnp.asarray``,
    which would turn a NumPy float64 / int64 into float32 / int32 silently)."""
    for name, x in given.items():
        _check_head_array(x, name)  # a JAX array, tracer or NumPy array
    four_d = ("q", "k_cache", "v_cache", "k_new", "v_new")
    stand_ins = {n: _shape_only(x) if n in four_d and x.ndim else _stand_in(x)
                 for n, x in given.items()}
    problem = jax_decode.check(stand_ins, flags)
    options = jax_decode.Options.of(problem, given)
    results = jax_decode.ffi_call({n: jnp.asarray(x) for n, x in given.items()}, problem,
                                  options)
    return results[0], results[1], tuple(results[2:])


def _append_functional(cache, new, cache_seqlens, block_table):
    """cache with new[b, t] at position cache_seqlens[b] + t (through the page table)."""
    batch, n = new.shape[:2]
    pos = jnp.asarray(cache_seqlens)[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
    entry = jnp.broadcast_to(jnp.arange(batch)[:, None], pos.shape)
    cache, new = jnp.asarray(cache), jnp.asarray(new)
    if block_table is None:
        return cache.at[entry, pos].set(new)
    page_size = cache.shape[1]
    pages = jnp.asarray(block_table)[entry, pos // page_size]
    return cache.at[pages, pos % page_size].set(new)


__all__ += ["attention_with_kvcache"]

from .jax_varlen import flash_attention_varlen  # noqa: E402  (imports this module lazily)

__all__ += ["flash_attention_varlen"]

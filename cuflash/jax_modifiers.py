"""The XLA FFI targets of ``cuflash.jax.flash_attention`` calls with score modifiers.

Plain calls keep their own targets (``cuflash_attention_fwd`` / ``_bwd`` in cuflash.jax),
untouched: same operands, attributes and memoized CUDA hot path. A call with a window,
softcap, ALiBi slopes or sinks (docs/masks.md) goes to these two instead:

* ``cuflash_attention_fwd_mods``: (q, k, v, [slopes], [sinks], [block_mask], [rng])
  -> (o, m, l)
* ``cuflash_attention_bwd_mods``: (do, q, k, v, o, m, l, [slopes], [sinks], [block_mask],
  [rng]) -> (dq, dk, dv, scratch, [dsinks])

The attributes ``alibi``, ``sinks`` and ``block_mask`` (bools) say which optional operands
are present (a block mask, docs/block_sparse.md, with its ``block_m`` / ``block_n``);
``window_left`` / ``window_right`` (-1 -1: off) and ``softcap`` (0: off) are static, as
``causal`` and ``softmax_scale`` are. Slopes always arrive as (batch, heads): the caller
broadcasts (heads,) ones, so vmap's leading axes fold into the batch like q's.

Dropout (``dropout_p`` > 0, static, docs/dropout.md) adds the operand ``rng``: uint32 (3,),
the words (seed low, seed high, offset) that cuflash.jax draws from the caller's PRNG key.
The CPU handler reads them; on CUDA the kernels read them from XLA's buffer when they run
(``specs.with_device_rng``), so nothing waits for the stream.

Sinks are one logit per head for the whole batch (and dsinks one sum over it), so a vmapped
call with sinks cannot fold its leading axes into the batch: the handler runs one call per
leading entry, each with its own sinks, dsinks and scratch (a loop of launches on the same
stream, not a loop in Python over JAX calls). Dropout does the same, so that each entry's
mask is the one an unbatched call with its key would draw (the mask depends on the batch
index).

The handlers validate every execution (the plain targets memoize by signature; calls with
modifiers pay the checks' host time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import block_sparse, philox, validate, xla_ffi
from . import launch as launch_mod
from . import plan as planning

FORWARD_TARGET = "cuflash_attention_fwd_mods"
BACKWARD_TARGET = "cuflash_attention_bwd_mods"


@dataclass(frozen=True)
class Options:
    """The static part of a call: what the attributes carry."""

    causal: bool
    softmax_scale: float
    window: tuple[int, int] | None
    softcap: float | None
    alibi: bool
    sinks: bool
    block_mask: bool = False
    block_size: tuple[int, int] = block_sparse.BLOCK_SIZE
    dropout_p: float = 0.0

    def attributes(self) -> dict:
        left, right = self.window or (-1, -1)
        # float64 so that a jitted call uses exactly the eager call's values
        return {"causal": self.causal, "softmax_scale": np.float64(self.softmax_scale),
                "window_left": np.int64(left), "window_right": np.int64(right),
                "softcap": np.float64(self.softcap or 0.0), "alibi": self.alibi,
                "sinks": self.sinks, "block_mask": self.block_mask,
                "block_m": np.int64(self.block_size[0]), "block_n": np.int64(self.block_size[1]),
                "dropout_p": np.float64(self.dropout_p)}

    @classmethod
    def of(cls, call: xla_ffi.Call) -> "Options":
        a = call.attrs
        return cls(causal=bool(a["causal"]), softmax_scale=float(a["softmax_scale"]),
                   window=validate.check_window((int(a["window_left"]),
                                                 int(a["window_right"]))),
                   softcap=validate.check_softcap(float(a["softcap"])),
                   alibi=bool(a["alibi"]), sinks=bool(a["sinks"]),
                   block_mask=bool(a["block_mask"]),
                   block_size=(int(a["block_m"]), int(a["block_n"])),
                   dropout_p=float(a.get("dropout_p", 0.0)))

    @property
    def dropout(self) -> bool:
        return self.dropout_p > 0

    @property
    def split(self) -> bool:
        """One call per vmapped entry (sinks and dropout: see the module docstring)."""
        return self.sinks or self.dropout

    def extra_ndims(self) -> list[int]:
        """ndim of the optional operands, in order: slopes (batch, heads), sinks (heads,),
        the block mask (batch | 1, heads | 1, query blocks, key blocks), dropout's rng (3,)."""
        return [2] * self.alibi + [1] * self.sinks + [4] * self.block_mask + [1] * self.dropout

    def check(self, q, problem: validate.Problem, extra) -> validate.Modifiers:
        """``validate.check_modifiers`` on the optional operands (backend arrays)."""
        extra = list(extra)
        slopes = extra.pop(0) if self.alibi else None
        sinks = extra.pop(0) if self.sinks else None
        return validate.check_modifiers(q, problem, window=self.window, softcap=self.softcap,
                                        alibi_slopes=slopes, sinks=sinks)

    def sparse_kwargs(self, problem: validate.Problem, extra) -> dict:
        """The block mask's keyword arguments (checked; the optional operand before rng)."""
        if not self.block_mask:
            return {}
        mask = block_sparse.check_block_mask(extra[len(extra) - 1 - self.dropout],
                                             self.block_size, problem.batch, problem.heads,
                                             problem.seqlen_q, problem.seqlen_k)
        return {"block_mask": mask, "block_size": self.block_size}

    def dropout_kwargs(self, extra) -> dict:
        """Dropout's keyword arguments from the rng operand (the last): on the CPU its three
        words as the seed and offset; on CUDA (a CuPy array) the array itself, which the
        kernels read when they run (``launch.flash_forward_gpu``'s ``dropout_rng``)."""
        if not self.dropout:
            return {}
        words = extra[-1]
        if not isinstance(words, np.ndarray):  # CuPy: left on the device
            philox.check_dropout(self.dropout_p, 0, 0)
            return {"dropout_p": self.dropout_p, "dropout_rng": words}
        seed, offset = philox.seed_offset_of_words(words)
        philox.check_dropout(self.dropout_p, seed, offset)
        return {"dropout_p": self.dropout_p, "dropout_seed": seed, "dropout_offset": offset}



def _calls(buffers, ndims, split: bool) -> list[list[xla_ffi.BufferView]]:
    """The buffers of each call to run: vmap's leading axes folded into the batch (one call),
    or with ``split`` one call per leading entry."""
    if not split:
        return [[b.folded(n) for b, n in zip(buffers, ndims)]]
    return [list(views) for views in zip(*(b.entries(n) for b, n in zip(buffers, ndims)))]


# -- forward -------------------------------------------------------------------------------


def forward_target(call: xla_ffi.Call, *, on_cuda: bool) -> None:
    """(q, k, v, [slopes], [sinks]) -> (o, m, l), written into XLA's result buffers."""
    options = Options.of(call)
    ndims = [4, 4, 4] + options.extra_ndims() + [4, 3, 3]
    for views in _calls(call.args + call.rets, ndims, split=options.split):
        if on_cuda:
            _cuda_forward(call, views, options)
        else:
            _cpu_forward(views, options)


def _cpu_forward(views, options: Options) -> None:
    from .cpu import flash_forward_cpu

    arrays = [b.as_numpy() for b in views]
    (q, k, v), extra, outs = arrays[:3], arrays[3:-3], arrays[-3:]
    problem = validate.check_forward(q, k, v, causal=options.causal,
                                     softmax_scale=options.softmax_scale)
    mods = options.check(q, problem, extra)
    results = flash_forward_cpu(q, k, v, causal=problem.causal,
                                softmax_scale=problem.softmax_scale, **mods.cpu_kwargs(),
                                **options.sparse_kwargs(problem, extra),
                                **options.dropout_kwargs(extra))
    for out, value in zip(outs, results):  # the NumPy path allocates its outputs
        np.copyto(out, value)


def _cuda_forward(call: xla_ffi.Call, views, options: Options) -> None:
    with call.on_cuda_stream() as device_id:
        arrays = [b.as_cupy(device_id) for b in views]
        (q, k, v), extra, outs = arrays[:3], arrays[3:-3], arrays[-3:]
        problem = validate.check_forward(q, k, v, causal=options.causal,
                                         softmax_scale=options.softmax_scale)
        mods = options.check(q, problem, extra)
        # writes into XLA's buffers on XLA's stream (CuPy's current one here)
        launch_mod.flash_forward_gpu(q, k, v, dtype=problem.dtype, causal=problem.causal,
                                     softmax_scale=problem.softmax_scale, out=tuple(outs),
                                     **mods.cpu_kwargs(), **options.sparse_kwargs(problem, extra),
                                     **options.dropout_kwargs(extra))


# -- backward ------------------------------------------------------------------------------


def backward_target(call: xla_ffi.Call, *, on_cuda: bool) -> None:
    """(do, q, k, v, o, m, l, [slopes], [sinks]) -> (dq, dk, dv, scratch, [dsinks])."""
    options = Options.of(call)
    deterministic = bool(call.attrs["deterministic"])
    ndims = ([4] * 5 + [3, 3] + options.extra_ndims() + [4, 4, 4, 1]
             + [1] * options.sinks)
    for views in _calls(call.args + call.rets, ndims, split=options.split):
        n_in = 7 + options.alibi + options.sinks + options.block_mask + options.dropout
        inputs, outputs = views[:n_in], views[n_in:]
        if on_cuda:
            _cuda_backward(call, inputs, outputs, options, deterministic)
        else:
            _cpu_backward(inputs, outputs, options)


def _cpu_backward(inputs, outputs, options: Options) -> None:
    from .cpu import flash_backward_cpu

    arrays = [b.as_numpy() for b in inputs]
    (do, q, k, v, o, m, l), extra = arrays[:7], arrays[7:]
    problem = validate.check_backward(do, q, k, v, o, m, l, causal=options.causal,
                                      softmax_scale=options.softmax_scale)
    mods = options.check(q, problem, extra)
    grads = flash_backward_cpu(do, q, k, v, o, m, l, causal=problem.causal,
                               softmax_scale=problem.softmax_scale, **mods.cpu_kwargs(),
                               **options.sparse_kwargs(problem, extra),
                               **options.dropout_kwargs(extra))
    results = [b.as_numpy() for b in outputs[:3] + outputs[4:]]  # outputs[3]: CUDA scratch
    for out, value in zip(results, grads, strict=True):
        np.copyto(out, value)


def _cuda_backward(call: xla_ffi.Call, inputs, outputs, options: Options,
                   deterministic: bool) -> None:
    """What ``launch.flash_backward_gpu`` does, into XLA's result buffers and with XLA's
    scratch (its CuPy workspace would come from CuPy's pool, outside XLA's memory budget)."""
    with call.on_cuda_stream() as device_id:
        arrays = [b.as_cupy(device_id) for b in inputs]
        (do, q, k, v, o, m, l), extra = arrays[:7], arrays[7:]
        problem = validate.check_backward(do, q, k, v, o, m, l, causal=options.causal,
                                          softmax_scale=options.softmax_scale)
        mods = options.check(q, problem, extra)
        sparse = options.sparse_kwargs(problem, extra)
        dropout = options.dropout_kwargs(extra)
        drop = (launch_mod.dropout_args(dropout["dropout_p"], None, 0, problem.heads,
                                        launch_mod.rng_address(dropout["dropout_rng"]))
                if dropout else None)
        dq, dk, dv = (launch_mod.poison(b.as_cupy(device_id), problem.dtype)  # tests' NaN
                      for b in outputs[:3])
        dsinks = outputs[4].as_cupy(device_id) if options.sinks else None
        shape = launch_mod.shape_of(q, k, problem.dtype, problem.causal, planning.mod_flags(
            mods.window, mods.softcap, mods.alibi_slopes, mods.sinks, problem.causal,
            options.block_mask, options.dropout))
        plan = bsp = None
        if not shape.empty:  # the selector's ValueError before anything is written
            plan = launch_mod.backward_plan(shape, device_id, deterministic)
            if sparse:
                import cupy

                bsp = launch_mod.block_mask_args(
                    cupy.ascontiguousarray(sparse["block_mask"]), options.block_size)
                bsp.check_tiles(plan.main.spec, plan.dq.spec if plan.dq is not None else None)
        if dsinks is not None:  # the preprocess adds each block's share with atomics
            dsinks.fill(0)
        if shape.empty:  # with sinks: rows that see no key have o = 0, so dsinks is 0
            for t in (dq, dk, dv):
                if t.size:
                    t.view(np.uint8).fill(0)
            return
        scratch = outputs[3]
        need = planning.backward_workspace(plan).total_bytes
        if scratch.nbytes < need:
            raise AssertionError(f"scratch of {scratch.nbytes} bytes, the plan needs {need}")
        slopes = mods.alibi_slopes  # (batch, heads) from cuflash.jax; (heads,) taken too
        args = launch_mod.mod_args(
            shape, mods.window, mods.softcap, problem.softmax_scale,
            alibi=slopes.data.ptr if slopes is not None else 0,
            stride_alibi_b=problem.heads if slopes is not None and slopes.ndim == 2 else 0,
            sinks=mods.sinks.data.ptr if mods.sinks is not None else 0,
            dsinks=dsinks.data.ptr if dsinks is not None else 0)
        operands = [launch_mod.cupy_operand(x) for x in (do, q, k, v, o, dq, dk, dv)]
        launch_mod.run_backward(plan, *operands[:5], m.data.ptr, l.data.ptr, *operands[5:],
                                problem.softmax_scale, scratch.data, call.stream(), device_id,
                                args, bsp=bsp, drop=drop)


def register_targets() -> None:
    """Both targets for XLA:CPU and XLA:CUDA, once per process (as cuflash.jax's own)."""
    from functools import partial

    for platform, on_cuda in (("cpu", False), ("CUDA", True)):
        xla_ffi.register(FORWARD_TARGET, partial(forward_target, on_cuda=on_cuda), platform)
        xla_ffi.register(BACKWARD_TARGET, partial(backward_target, on_cuda=on_cuda), platform)

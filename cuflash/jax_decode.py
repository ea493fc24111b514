"""The XLA FFI target of ``cuflash.jax.attention_with_kvcache`` under ``jax.jit``.

One target, ``cuflash_attention_with_kvcache``, registered for XLA:CPU and XLA:CUDA:

    (q, k_cache, v_cache, [cache_seqlens], [block_table], [alibi_slopes], [k_new, v_new])
        -> (o, lse, scratch, [k_cache, v_cache])

Bool attributes ``seqlens``, ``paged``, ``alibi`` and ``append`` say which optional operands
are present; ``causal``, ``softmax_scale``, ``window_left`` / ``window_right`` (-1 -1: off),
``softcap`` (0: off) and ``num_splits`` (0: automatic) are static, as in the eager call.

An append (k_new / v_new) writes into the caches: the cache results alias the cache operands
(``input_output_aliases``), so XLA hands the handler buffers that already hold the caches
(the operands themselves when they are donated or carried through a loop, else copies) and
the call returns them as the new caches. ``cache_seqlens`` is the length before the append,
as in the core call.

``scratch`` is the split-KV workspace (partial o and lse) as a result XLA allocates: its size
is ``plan_decode``'s ``workspace_bytes``, computed at trace time from the static shapes and
the facts (SM count, arch) of each local GPU (the largest). The handler plans with the same
memoized ``decode.decode_plan`` as an eager call, so a jitted call runs exactly the eager
call's kernels and splits; a device that needs more scratch than was traced for raises.

CUDA: the handler only launches on XLA's stream: the kernels are compiled and loaded at
trace time (module loading is not allowed while a stream is captured), the checks and the
plan are memoized per signature, nothing is allocated, no device value is read and the host
never waits. It is registered without XLA's command-buffer trait, like cuflash's other
targets, so XLA runs it between its CUDA graphs: with the trait declared, XLA (JAX 0.11,
H200, 2026-12-01) still left it out of every command buffer, even forced, so capture is not
claimed. ``CUFLASH_XLA_COMMAND_BUFFER=1`` (read when the target is first registered)
declares the trait, for trying newer XLA versions.

CPU: the same call frame as NumPy arrays runs the NumPy path of the eager call, host values
(lengths, page ids) checked as there.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from . import decode, xla_ffi
from .decode_checks import DecodeProblem, DecodeShape, check_decode
from .interop import CPU, Framework, Imported

TARGET = "cuflash_attention_with_kvcache"
# each optional operand's presence attribute and names, in operand order
_OPTIONAL = (("seqlens", ("cache_seqlens",)), ("paged", ("block_table",)),
             ("alibi", ("alibi_slopes",)), ("append", ("k_new", "v_new")))


@dataclass(frozen=True)
class Options:
    """The static part of a call: what the attributes carry."""

    causal: bool
    softmax_scale: float
    window: tuple[int, int] | None
    softcap: float | None
    num_splits: int | None
    seqlens: bool
    paged: bool
    alibi: bool
    append: bool

    @classmethod
    def of(cls, problem: DecodeProblem, present) -> "Options":
        """From a validated problem and the names of the optional operands given."""
        present = set(present)
        return cls(causal=problem.causal, softmax_scale=problem.softmax_scale,
                   window=problem.window, softcap=problem.softcap,
                   num_splits=problem.num_splits, seqlens="cache_seqlens" in present,
                   paged="block_table" in present, alibi="alibi_slopes" in present,
                   append="k_new" in present)

    def attributes(self) -> dict:
        left, right = self.window or (-1, -1)
        # float64 so that a jitted call uses exactly the eager call's values
        return {"causal": self.causal, "softmax_scale": np.float64(self.softmax_scale),
                "window_left": np.int64(left), "window_right": np.int64(right),
                "softcap": np.float64(self.softcap or 0.0),
                "num_splits": np.int64(self.num_splits or 0), "seqlens": self.seqlens,
                "paged": self.paged, "alibi": self.alibi, "append": self.append}

    @classmethod
    def from_attributes(cls, a: dict) -> "Options":
        window = (int(a["window_left"]), int(a["window_right"]))
        return cls(causal=bool(a["causal"]), softmax_scale=float(a["softmax_scale"]),
                   window=None if window == (-1, -1) else window,
                   softcap=float(a["softcap"]) or None, num_splits=int(a["num_splits"]) or None,
                   seqlens=bool(a["seqlens"]), paged=bool(a["paged"]), alibi=bool(a["alibi"]),
                   append=bool(a["append"]))

    def operand_names(self) -> list[str]:
        """The target's operands, in order."""
        names = ["q", "k_cache", "v_cache"]
        for flag, optional in _OPTIONAL:
            if getattr(self, flag):
                names += optional
        return names

    def flags(self) -> dict:
        """``check_decode``'s keyword flags."""
        return dict(causal=self.causal, softmax_scale=self.softmax_scale, window=self.window,
                    softcap=self.softcap, num_splits=self.num_splits)


def check(arrays: dict, flags: dict, device=CPU, framework=Framework.NUMPY) -> DecodeProblem:
    """``check_decode`` on backend arrays by name (the caller appends: ``in_place`` False).
    Host arrays get their values checked (lengths, page ids), CUDA ones their limits."""
    imported = {n: Imported(x, framework, device) for n, x in arrays.items()}
    return check_decode(imported["q"], imported["k_cache"], imported["v_cache"],
                        imported.get("cache_seqlens"), block_table=imported.get("block_table"),
                        k_new=imported.get("k_new"), v_new=imported.get("v_new"),
                        alibi_slopes=imported.get("alibi_slopes"), in_place=False, **flags)


# -- trace time ------------------------------------------------------------------------------


def result_specs(q, k_cache, problem: DecodeProblem, append: bool) -> tuple:
    """(o, lse, scratch[, k_cache, v_cache]) as ``jax.ShapeDtypeStruct``s."""
    import jax
    import jax.numpy as jnp

    s = problem.shape
    specs = (jax.ShapeDtypeStruct(q.shape, q.dtype),
             jax.ShapeDtypeStruct((s.batch, s.heads, s.q_len), jnp.float32),
             jax.ShapeDtypeStruct((scratch_bytes(s, problem.num_splits),), jnp.uint8))
    if append:
        specs += (jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),) * 2
    return specs


def scratch_bytes(shape: DecodeShape, num_splits: int | None) -> int:
    """The largest ``workspace_bytes`` of the plans of this JAX's local GPUs (0 without a
    GPU backend). Loads each plan's kernels on its device too, so that no call compiles or
    loads a module, which a CUDA graph capture forbids."""
    if shape.empty and not shape.seqlen_new:
        return 0  # nothing runs (as in the eager call)
    need = 0
    for device_id in _local_cuda_devices():
        with _on_device(device_id):  # CuPy loads a module's functions on the current device
            plan = decode.decode_plan(shape, num_splits, device_id)
            decode._functions_of(plan.spec, device_id)  # now, not in a graph capture
        need = max(need, plan.workspace_bytes)
    return need


@functools.lru_cache(maxsize=1)
def _local_cuda_devices() -> tuple[int, ...]:
    """CUDA ordinals of JAX's local GPUs when its default backend is the GPU, else ()."""
    import jax

    if jax.default_backend() != "gpu":
        return ()
    return tuple(int(getattr(d, "local_hardware_id", d.id)) for d in jax.local_devices())


def ffi_call(operands: dict, problem: DecodeProblem, options: Options) -> tuple:
    """The jitted call: (o, lse[, k_cache, v_cache]) for JAX arrays by operand name."""
    import jax

    register_targets()
    specs = result_specs(operands["q"], operands["k_cache"], problem, options.append)
    aliases = {1: 3, 2: 4} if options.append else None  # caches in place: results 3 and 4
    # vmap: one call per vmapped entry (page ids refer to one entry's pages, so entries
    # cannot be folded into the batch as flash_attention's targets do)
    call = jax.ffi.ffi_call(TARGET, specs, vmap_method="sequential",
                            input_output_aliases=aliases)
    results = call(*(operands[n] for n in options.operand_names()), **options.attributes())
    return tuple(results[:2]) + tuple(results[3:])  # results[2]: the scratch


# -- the handler -----------------------------------------------------------------------------


def target(call: xla_ffi.Call, *, on_cuda: bool) -> None:
    options = Options.from_attributes(call.attrs)
    names = options.operand_names()
    if len(call.args) != len(names) or len(call.rets) != 3 + 2 * options.append:
        raise ValueError(f"{TARGET}: expected operands {names} and {3 + 2 * options.append} "
                         f"results, got {len(call.args)} operands and {len(call.rets)} results")
    views = dict(zip(names, call.args))
    o, lse, scratch = call.rets[:3]
    if options.append:  # the aliased results: the caches to append to and read
        views["k_cache"], views["v_cache"] = call.rets[3:]
    if on_cuda:
        _cuda(call, views, o, lse, scratch, options)
    else:
        _cpu(views, o, lse, options)


def _cpu(views: dict, o, lse, options: Options) -> None:
    arrays = {n: b.as_numpy() for n, b in views.items()}
    problem = check(arrays, options.flags())
    # the eager call's NumPy path, so that jit and eager agree bit for bit; it appends into
    # arrays["k_cache"] / ["v_cache"] (the aliased results) and allocates o and lse
    results = decode._decode_cpu(problem, arrays)
    for out, value in zip((o, lse), results):
        np.copyto(out.as_numpy(), value)


_problems: dict = {}  # signature -> DecodeProblem; XLA repeats shapes and attributes
_MAX_SIGNATURES = 4096


def _cuda(call: xla_ffi.Call, views: dict, o, lse, scratch, options: Options) -> None:
    device_id = call.device_id()
    problem = _cuda_problem(views, options, device_id)
    s = problem.shape
    with _on_device(device_id):
        _poison(o, lse, call)
        if s.empty and not s.seqlen_new:
            return
        plan = decode.decode_plan(s, problem.num_splits, device_id)
        if scratch.nbytes < plan.workspace_bytes:
            raise ValueError(
                f"scratch: the plan on CUDA device {device_id} needs {plan.workspace_bytes} "
                f"bytes, the call was traced with {scratch.nbytes} (traced for a GPU with "
                f"fewer SMs, or without a GPU backend?); trace on this GPU or pass num_splits")
        decode.run_decode(plan, problem, _operands(views, o, lse), scratch.data,
                          call.stream(), device_id)


def _cuda_problem(views: dict, options: Options, device_id: int) -> DecodeProblem:
    """The full checks once per signature (CUDA limits included); then addresses only."""
    key = (device_id, options, tuple((n, b.dtype, b.shape) for n, b in views.items()))
    problem = _problems.get(key)
    if problem is None:
        arrays = {n: b.as_cupy(device_id) for n, b in views.items()}
        problem = check(arrays, options.flags(), ("cuda", device_id), Framework.CUPY)
        if len(_problems) >= _MAX_SIGNATURES:
            _problems.clear()
        _problems[key] = problem
        return problem
    for name in ("q", "k_cache", "v_cache", "k_new", "v_new"):
        b = views.get(name)
        if b is not None and b.nbytes and b.data % 16:
            raise ValueError(f"{name}: XLA buffer at {b.data:#x} is not 16-byte aligned, "
                             f"which the CUDA kernels need")
    return problem


def _operands(views: dict, o, lse) -> decode.DecodeOperands:
    address = lambda name: views[name].data if name in views else 0  # noqa: E731
    new = {}
    if "k_new" in views:
        new = dict(k_new=address("k_new"), v_new=address("v_new"),
                   strides_k_new=_strides(views["k_new"]), strides_v_new=_strides(views["v_new"]))
    return decode.DecodeOperands(
        views["q"].data, views["k_cache"].data, views["v_cache"].data, o.data, lse.data,
        _strides(views["q"]), _strides(views["k_cache"]), _strides(views["v_cache"]),
        _strides(o), cache_seqlens=address("cache_seqlens"),
        block_table=address("block_table"), alibi_slopes=address("alibi_slopes"), **new)


def _strides(b: xla_ffi.BufferView) -> tuple[int, int, int]:
    """Element strides of axes 0-2 of a row-major 4-D buffer (XLA's default layout); for a
    paged cache axis 0 is the page."""
    _, n1, n2, n3 = b.shape
    return (n1 * n2 * n3, n2 * n3, n3)


def _poison(o, lse, call: xla_ffi.Call) -> None:
    """Tests' NaN (CUFLASH_POISON=1): bytes 0xFF are NaN in float16, bfloat16 and float32.
    A memset on XLA's stream, which a CUDA graph captures like a launch."""
    from .launch import poison_enabled

    if not poison_enabled():
        return
    import cupy

    for b in (o, lse):
        if b.nbytes:
            cupy.cuda.runtime.memsetAsync(b.data, 0xFF, b.nbytes, call.stream())


def _on_device(device_id: int):
    import contextlib

    import cupy

    if cupy.cuda.runtime.getDevice() == device_id:
        return contextlib.nullcontext()
    return cupy.cuda.Device(device_id)


def register_targets() -> None:
    """The target for XLA:CPU and XLA:CUDA, once per process (as cuflash.jax's own). The
    CUDA one declares XLA's command-buffer trait only with CUFLASH_XLA_COMMAND_BUFFER=1."""
    graphs = os.environ.get("CUFLASH_XLA_COMMAND_BUFFER", "0") == "1"
    xla_ffi.register(TARGET, functools.partial(target, on_cuda=False), "cpu")
    xla_ffi.register(TARGET, functools.partial(target, on_cuda=True), "CUDA",
                     command_buffer=graphs)

"""Shared pieces of the GPU tests: inputs, device transfer, spec names, the error rule.

Nothing here touches a GPU at import time (cupy, torch and jax are imported inside the
functions that need them), so the GPU test modules import and skip cleanly on a CPU-only
machine.

The rule every comparison applies is FlashAttention's (``cuflash.reference.compare``):
``err(ours) <= 2 * err(naive in the same dtype) + atol`` per output, with the float64
reference as truth; atol is ``default_atol(dtype)`` plus a small slack at the output's
magnitude (``ULP_SLACK`` says why). The softmax statistics m and l are judged differently,
see ``STATS_RTOL``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from cuflash import plan as planning
from cuflash import reference, specs

# JAX grabs 75% of GPU memory at its first GPU call unless told otherwise; CuPy and torch
# share the device in the same process. Read when JAX's backend starts, so set it early.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

BF16 = np.dtype(ml_dtypes.bfloat16)
NP_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": BF16, "float32": np.dtype(np.float32)}
DTYPES = tuple(NP_DTYPES)
HEAD_DIMS = tuple(range(8, 257, 8))  # every head_dim the library accepts

# m and l are float32 functions of the scores. The kernels compute every score in float32
# from the (exactly representable) products of the 16-bit inputs and never round scores or
# P to 16 bits before taking the max and the sum, so, unlike o, the stats carry no 16-bit
# rounding: their error is float32 accumulation order plus ex2.approx, ~1e-6 relative.
# The naive same-dtype baseline does round its scores to 16 bits, so "2 x naive" would be a
# far looser bound than needed; we compare m and l directly with the float64 reference:
# |got - ref| <= rtol * max(1, |ref|), rtol 1e-3 for 16-bit inputs and 1e-4 for float32, both
# two orders above the expected error. A real bug (a missed key tile, a wrong rescale, a
# wrong mask) moves l or m by far more than 1e-3; -inf / 0 of key-less rows must match exactly.
STATS_RTOL = {"float16": 1e-3, "bfloat16": 1e-3, "float32": 1e-4}


def np_dtype(dtype: str) -> np.dtype:
    return NP_DTYPES[dtype]


def short(dtype: str) -> str:
    return specs.DTYPE_SHORT[dtype]


# -- inputs ------------------------------------------------------------------------------------


def rng_for(seed: int | None = None) -> np.random.Generator:
    """A fresh generator: new entropy on each call unless given a seed (drawn by hypothesis)."""
    return np.random.default_rng(seed)


def randn(rng: np.random.Generator, shape: tuple, dtype: str) -> np.ndarray:
    """Standard-normal host array rounded to dtype (never all zeros)."""
    return rng.standard_normal(shape, dtype=np.float32).astype(np_dtype(dtype))


def random_qkv(rng, *, batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype):
    """Host (q, k, v) in dtype: q (b, s_q, h, d), k and v (b, s_k, h_kv, d)."""
    q = randn(rng, (batch, seqlen_q, heads, head_dim), dtype)
    k = randn(rng, (batch, seqlen_k, heads_kv, head_dim), dtype)
    v = randn(rng, (batch, seqlen_k, heads_kv, head_dim), dtype)
    return q, k, v


# -- host <-> device ---------------------------------------------------------------------------


def _torch_cuda(a: np.ndarray):
    import torch

    if a.dtype == BF16:  # torch.from_numpy does not know ml_dtypes.bfloat16: move the bits
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).cuda()
    return torch.from_numpy(np.ascontiguousarray(a)).cuda()


def _cupy_bf16(a: np.ndarray):
    """bf16 for the CuPy path: CuPy 14 holds ml_dtypes.bfloat16 natively; if this build
    does not, go through torch and DLPack, and as a last resort hand cuflash the torch tensor
    itself (its interop imports it)."""
    import cupy

    try:
        return cupy.asarray(a)
    except Exception:
        pass
    t = _torch_cuda(a)
    try:
        return cupy.from_dlpack(t)
    except Exception:
        return t


def jax_gpu_device():
    """JAX's first GPU, or skip the test when this JAX has no CUDA backend."""
    import pytest

    jax = pytest.importorskip("jax")
    try:
        return jax.devices("gpu")[0]
    except Exception as exc:  # RuntimeError: unknown backend 'gpu'
        pytest.skip(f"JAX has no GPU backend here ({exc})")


def to_gpu(a: np.ndarray, framework: str = "cupy", *, heads_first: bool = False):
    """Copy a host (b, s, h, d) array to the GPU as a ``framework`` array.

    ``heads_first``: store it as a contiguous (b, h, s, d) buffer and return the
    ``transpose`` view back to (b, s, h, d) (strided seq / head axes, as attention layers
    often produce). Not for JAX, whose arrays have no strides.
    """
    host = np.ascontiguousarray(a.transpose(0, 2, 1, 3)) if heads_first else np.ascontiguousarray(a)
    if framework == "cupy":
        import cupy

        x = _cupy_bf16(host) if host.dtype == BF16 else cupy.asarray(host)
    elif framework == "torch":
        x = _torch_cuda(host)
    elif framework == "jax":
        if heads_first:
            raise ValueError("JAX arrays have no strides; heads_first is for cupy / torch")
        import jax

        return jax.device_put(host, jax_gpu_device())
    else:
        raise ValueError(f"framework: expected cupy, torch or jax, got {framework!r}")
    if heads_first:
        return x.transpose(1, 2) if _is_torch(x) else x.transpose(0, 2, 1, 3)
    return x


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def to_host(x: Any, dtype: str | None = None) -> np.ndarray:
    """Any supported array (numpy, cupy, torch, jax; bf16 included) -> a numpy array.

    ``dtype``: the logical dtype, to reinterpret 16-bit storage that arrived as (u)int16.
    """
    root = type(x).__module__.split(".")[0]
    if root == "cupy":
        out = _cupy_to_host(x)
    elif root == "torch":
        import torch

        t = x.detach()
        if t.dtype == torch.bfloat16:
            out = t.view(torch.int16).cpu().numpy().view(BF16)
        else:
            out = t.cpu().numpy()
    else:  # numpy, jax (np.asarray gives ml_dtypes.bfloat16 for JAX bf16)
        out = np.asarray(x)
    if dtype is not None and out.dtype != np_dtype(dtype) and out.dtype.kind in "iu":
        out = out.view(np_dtype(dtype))
    return out


def _cupy_to_host(x) -> np.ndarray:
    import cupy

    try:
        return cupy.asnumpy(x)
    except Exception:  # a CuPy without host bf16 conversion: move the bits
        if x.dtype.itemsize != 2:
            raise
        return cupy.asnumpy(x.view(cupy.uint16)).view(BF16)


# -- which kernels run: the plan's labels ----------------------------------------------------
# The labels come from the plan the library itself runs (cuflash.plan), never from a second
# call of the selector, so a failure message names the kernels that produced the output.


def label_shape(dtype: str, head_dim: int, causal: bool) -> planning.Shape:
    """A one-row problem: which kernels a plan runs depends on dtype, head_dim, causal alone."""
    return planning.Shape(batch=1, seqlen_q=1, seqlen_k=1, heads=1, heads_kv=1,
                          head_dim=head_dim, dtype=dtype, causal=causal)


def forward_spec_name(dtype: str, head_dim: int, causal: bool) -> str:
    """The labels of the forward plan the device runs now (smem budget override included)."""
    from cuflash import launch

    try:
        return "+".join(launch.forward_plan(label_shape(dtype, head_dim, causal), 0).labels)
    except Exception as exc:  # the message must not hide the real failure
        return f"<no forward plan: {exc}>"


def backward_spec_name(dtype: str, head_dim: int, causal: bool, deterministic: bool) -> str:
    from cuflash import launch

    try:
        plan = launch.backward_plan(label_shape(dtype, head_dim, causal), 0, deterministic)
        return "+".join(plan.labels)
    except Exception as exc:
        return f"<no backward plan: {exc}>"


def planned_specs(facts, cfg, dtype: str, head_dim: int, causal: bool, *, forward: bool = True,
                  backward: tuple[bool, ...] = (False, True)) -> list:
    """The KernelSpecs the plans of one problem run on ``facts`` with ``cfg`` (a
    ``cuflash.config.Config``): the forward and the backward in each deterministic mode given.
    A plan for which no tile fits ``facts``' budget contributes nothing."""
    shape = label_shape(dtype, head_dim, causal)
    out = []
    if forward:
        try:
            out.append(planning.plan_forward(shape, facts, cfg).kernel.spec)
        except ValueError:
            pass
    for deterministic in backward:
        try:
            plan = planning.plan_backward(shape, facts, deterministic, cfg)
        except ValueError:
            continue
        out += [launch.spec for launch in (plan.pre, plan.main, plan.dq) if launch is not None]
    return out


def describe(q: np.ndarray, k: np.ndarray, dtype: str, causal: bool, softmax_scale,
             **extra) -> str:
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    parts = [f"{short(dtype)} b{b} sq{sq} sk{sk} h{h}/{hkv} d{d}",
             "causal" if causal else "full", f"scale={softmax_scale}"]
    parts += [f"{key}={value}" for key, value in extra.items()]
    return " ".join(parts)


# -- the rule ------------------------------------------------------------------------------------

# Slack added to the rule's atol, in units of the dtype's epsilon at the outputs' magnitude:
# atol = default_atol(dtype) + ULP_SLACK[dtype] * eps(dtype) * max(1, magnitude), where the
# magnitude is max|ref| over the outputs of the call (o; or dq, dk and dv together, since
# their rounding noise comes from the same P and dP: dK of a single key is 0 in truth, yet
# carries noise at the scale of dV).
# Why: "2 x naive" compares two random errors, and on small problems (a few keys or query
# rows, so a max over few elements) or steep softmaxes (softmax_scale 1 with head_dim 256:
# logits ~ +-50) the naive result is sometimes lucky. Running cuflash's CPU path (the same
# blockwise algorithm, exp2 with scale * log2(e), delta = rowsum(dO * O)) on 800 drawn
# problems failed the bare rule in ~1% of them: float32 outputs up to 2.8x naive (needing up
# to 17 eps * magnitude of slack; e.g. dk of a single key, which is 0 in truth, where naive
# is exactly 0 and ours carries the delta identity's cancellation noise), and one bf16 dq at
# 1.1x naive. The slack is far below what any real defect produces (a missed tile, a wrong
# mask or rescale, a race, bf16 accumulation: errors of 1e-3 to 1 relative): 64 eps * |ref|
# is 8e-6 relative in float32, and half a bf16 / fp16 unit at the output's magnitude is the
# rounding every stored output carries anyway (FlashAttention-3's tests add a similar term).
ULP_SLACK = {"float32": 64.0, "float16": 0.5, "bfloat16": 0.5}
EPS = {name: float(ml_dtypes.finfo(dt).eps) for name, dt in NP_DTYPES.items()}


def magnitude(*refs) -> float:
    """max |x| over the given arrays (0 for empty ones)."""
    return max([float(np.abs(r).max()) for r in refs if np.size(r)], default=0.0)


def rule_atol(dtype: str, scale: float) -> float:
    """The atol of ``err <= 2 * naive_err + atol`` for outputs of magnitude ``scale``."""
    return reference.default_atol(np_dtype(dtype)) + ULP_SLACK[dtype] * EPS[dtype] * max(1.0, scale)


def assert_matches_reference(name: str, got, ref, naive, *, dtype: str, label: str,
                             scale: float | None = None, allowance: float = 0.0) -> None:
    """err(got) <= 2 * err(naive) + atol against the float64 ref; NaN never passes.

    ``scale``: the magnitude for the atol slack (default max|ref|; see ULP_SLACK).
    ``allowance``: an error the algorithm has by design, added to atol (see
    ``stored_o_allowance``).
    """
    got = np.asarray(got)
    if got.shape != np.shape(ref):
        raise AssertionError(f"{name} [{label}]: shape {got.shape}, expected {np.shape(ref)}")
    atol = rule_atol(dtype, magnitude(ref) if scale is None else scale) + allowance
    report = reference.compare(name, got, ref, naive, atol=atol)
    assert report.ok, f"{report} [{label}; atol {atol:.3g}]"


def stats_error(got, ref) -> float:
    """max |got - ref| / max(1, |ref|); equal values (including infinities) count 0,
    an infinity on one side only counts inf, NaN in got gives NaN."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.size == 0:
        return 0.0
    if np.isnan(got).any():
        return math.nan
    with np.errstate(invalid="ignore"):
        rel = np.abs(got - ref) / np.maximum(1.0, np.abs(ref))
    rel = np.where(np.isinf(got) | np.isinf(ref), np.inf, rel)
    return float(np.where(got == ref, 0.0, rel).max())


def assert_stats_match(name: str, got, ref, *, dtype: str, label: str) -> None:
    got = np.asarray(got)
    if got.shape != np.shape(ref):
        raise AssertionError(f"{name} [{label}]: shape {got.shape}, expected {np.shape(ref)}")
    if got.dtype != np.float32:
        raise AssertionError(f"{name} [{label}]: dtype {got.dtype}, expected float32")
    err, rtol = stats_error(got, ref), STATS_RTOL[dtype]
    assert err <= rtol, f"{name}: relative err {err:.3g} vs rtol {rtol:g} FAIL [{label}]"


def assert_forward_matches_reference(q, k, v, o, m, l, *, dtype: str, causal: bool,
                                     softmax_scale=None, label: str = "") -> None:
    """o, m, l (host arrays) against the float64 reference of host q, k, v (b, s, h, d)."""
    kw = dict(causal=causal, softmax_scale=softmax_scale)
    o_ref, m_ref, l_ref = reference.attention_reference(q, k, v, **kw)
    o_naive = reference.attention_naive(q, k, v, dtype=np_dtype(dtype), **kw)
    label = f"{forward_spec_name(dtype, q.shape[3], causal)}; {label}"
    assert_matches_reference("o", o, o_ref, o_naive, dtype=dtype, label=label)
    assert_stats_match("m", m, m_ref, dtype=dtype, label=label)
    assert_stats_match("l", l, l_ref, dtype=dtype, label=label)


def stored_o_allowance(do, q, k, v, o, *, causal: bool, softmax_scale=None):
    """max |dX(FlashAttention, exact arithmetic, given the stored o) - dX(truth)| for dq, dk, dv.

    FlashAttention's backward takes ``delta_i = sum_d dO_id * O_id`` from the o that the
    forward stored (rounded to the dtype), where the truth has ``sum_j P_ij dP_ij``. The naive
    baseline never forms delta, so this error is not in its noise floor, and it is not small
    where the softmax is peaked: with few keys, softmax_scale 1 and head_dim 216, fp16 dq
    came out 9x naive from it (in the CPU path). By design, so it is added to atol, computed
    exactly: ``dS`` shifts by ``-P_ij * ddelta_i`` with ``ddelta = rowsum(dO * (o - o_true))``,
    hence ``dq_i`` by ``-scale * ddelta_i * sum_j P_ij k_j`` (attention with v = k) and ``dk``
    by ``-scale * P^T (ddelta * q)`` (what the reference returns as dv for dO = ddelta * q).
    dv does not involve delta. ``o``: the forward's output (host, in the dtype).
    """
    kw = dict(causal=causal, softmax_scale=softmax_scale)
    scale = 1.0 / math.sqrt(q.shape[3]) if softmax_scale is None else softmax_scale
    o_true = reference.attention_reference(q, k, v, **kw)[0]
    ddelta = np.sum(do.astype(np.float64) * (o.astype(np.float64) - o_true), axis=-1,
                    keepdims=True)  # (b, s_q, h, 1)
    dq_shift = scale * ddelta * reference.attention_reference(q, k, k, **kw)[0]
    dk_shift = scale * reference.attention_backward_reference(ddelta * q.astype(np.float64),
                                                              q, k, v, **kw)[2]
    return magnitude(dq_shift), magnitude(dk_shift), 0.0


def backward_references(do, q, k, v, o, *, dtype: str, causal: bool, softmax_scale=None):
    """(truth, naive, allowance): float64 (dq, dk, dv), the same in dtype computed naively,
    and ``stored_o_allowance`` for the forward's output o (all host arrays)."""
    kw = dict(causal=causal, softmax_scale=softmax_scale)
    return (reference.attention_backward_reference(do, q, k, v, **kw),
            reference.attention_backward_naive(do, q, k, v, dtype=np_dtype(dtype), **kw),
            stored_o_allowance(do, q, k, v, o, **kw))


def assert_backward_matches_reference(do, q, k, v, o, dq, dk, dv, *, dtype: str, causal: bool,
                                      deterministic: bool, softmax_scale=None,
                                      label: str = "", references=None) -> None:
    """dq, dk, dv (host arrays) against the float64 reference gradients of sum(do * o);
    o is the forward's output the backward consumed.

    ``references``: what ``backward_references`` returned for these inputs, to reuse it.
    """
    refs, naives, allowances = references or backward_references(
        do, q, k, v, o, dtype=dtype, causal=causal, softmax_scale=softmax_scale)
    label = f"{backward_spec_name(dtype, q.shape[3], causal, deterministic)}; {label}"
    scale = magnitude(*refs)
    for name, got, ref, naive, allowance in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, naives,
                                                allowances):
        assert_matches_reference(name, got, ref, naive, dtype=dtype, label=label, scale=scale,
                                 allowance=allowance)


def assert_no_nan(label: str, **arrays) -> None:
    for name, a in arrays.items():
        bad = int(np.isnan(np.asarray(a, dtype=np.float64)).sum())
        assert bad == 0, f"{name}: {bad} NaN element(s) [{label}]"


# -- running the library on device inputs ------------------------------------------------------


def run_forward(q, k, v, *, dtype: str, causal: bool, softmax_scale=None,
                framework: str = "cupy", heads_first: bool = False):
    """Host inputs -> cuflash.attention_forward on the GPU -> (device o, stats, host o, m, l)."""
    import cuflash

    gq, gk, gv = (to_gpu(x, framework, heads_first=heads_first) for x in (q, k, v))
    o, stats = cuflash.attention_forward(gq, gk, gv, causal=causal, softmax_scale=softmax_scale)
    return o, stats, to_host(o, dtype), to_host(stats.m), to_host(stats.l)


# -- compiling ahead, in parallel ---------------------------------------------------------------

PRECOMPILE_LOG: list[str] = []


def precompile(spec_list: Iterable, device_id: int = 0) -> dict[str, str]:
    """Compile the given KernelSpecs on a thread pool before the tests need them.

    NVRTC runs outside the GIL, so on a 16-core host this cuts the suite's JIT time from
    (specs x seconds) to about a sixteenth. Best effort: a spec that fails to compile is
    reported here (returned and printed) and the test that needs it fails with the compiler's
    own message when it compiles it again. CUFLASH_TEST_PRECOMPILE=0 turns this off.
    """
    if os.environ.get("CUFLASH_TEST_PRECOMPILE", "1") == "0":
        return {}
    from cuflash.compiler import get_kernel

    unique = {s.name: s for s in spec_list}
    failures: dict[str, str] = {}

    def build(spec):
        try:
            get_kernel(spec, device_id)
        except Exception as exc:  # reported below; the test compiles it again and fails
            failures[spec.name] = f"{type(exc).__name__}: {str(exc)[:1500]}"

    start = time.perf_counter()
    workers = max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(build, unique.values()))
    line = (f"cuflash tests: precompiled {len(unique)} specs on {workers} threads in "
            f"{time.perf_counter() - start:.1f} s, {len(failures)} failed")
    PRECOMPILE_LOG.append(line)
    print(line, file=sys.stderr)
    for name, why in failures.items():
        print(f"  {name}: {why}", file=sys.stderr)
    return failures


def gpu_module_env(module_specs: Callable[[], Iterable] | None = None,
                   failures: dict[str, str] | None = None) -> Iterator[None]:
    """Body of a GPU test module's autouse fixture: outputs NaN-poisoned, the device's own
    shared-memory budget, and ``module_specs()`` compiled ahead (failures into ``failures``)."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUFLASH_POISON", "1")
        mp.delenv("CUFLASH_SMEM_BUDGET", raising=False)
        specs.set_smem_budget(None)
        if module_specs is not None:
            failures.update(precompile(module_specs()))
        yield
    specs.set_smem_budget(None)


def assert_precompiled(failures: dict[str, str]) -> None:
    """Every spec precompiled for a module built (the tests that use a failed one also fail,
    with the compiler's log; this lists them all in one place)."""
    assert not failures, "specs that failed to compile:\n" + "\n".join(
        f"  {name}: {why}" for name, why in failures.items())

"""Shared pieces of the GPU tests: inputs, device transfer, spec names, the error rule.

Nothing here touches a GPU at import time (cupy, torch and jax are imported inside the
functions that need them), so the GPU test modules import and skip cleanly on a CPU-only
machine.

The rule every comparison applies is the package's one acceptance rule, ``cuflash.testing``
(FlashAttention's ``err(ours) <= 2 * err(naive in the same dtype) + atol`` per output against
the float64 reference, the ULP slack, the stats rule); the helpers here only run it and
label failures with the kernels the plan ran.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from cuflash import plan as planning
from cuflash import reference, specs, testing
from cuflash.testing import (EPS, STATS_RTOL, ULP_SLACK, backward_references,  # noqa: F401
                             magnitude, rule_atol, stats_error, stored_o_allowance)

# JAX grabs 75% of GPU memory at its first GPU call unless told otherwise; CuPy and torch
# share the device in the same process. Read when JAX's backend starts, so set it early.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

BF16 = np.dtype(ml_dtypes.bfloat16)
NP_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": BF16, "float32": np.dtype(np.float32)}
DTYPES = tuple(NP_DTYPES)
HEAD_DIMS = tuple(range(8, 257, 8))  # every head_dim the library accepts

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
    return shape_specs(label_shape(dtype, head_dim, causal), facts, cfg, forward=forward,
                       backward=backward)


def hopper_specs(calls, head_dims, knobs=(lambda spec: spec,),
                 dtypes=("float16", "bfloat16")) -> list:
    """The specs a Hopper-only test module's calls plan, for its module fixture to compile
    ahead: for each (causal, ModFlags) of ``calls``, dtype and head_dim, every spec
    ``shape_specs`` gives, through each of ``knobs`` (the candidates its fixtures patch in).
    None off Hopper, where the module's tests skip."""
    from cuflash import config
    from cuflash import launch as device

    facts = device.device_facts(0)
    if facts.arch != "sm_90":
        return []
    out = []
    for causal, flags in calls:
        for dtype in dtypes:
            for head_dim in head_dims:  # (the last two: rows of packed sequences)
                shape = planning.Shape(1, 1, 1, 1, 1, head_dim, dtype, causal, flags, 1, 1)
                for spec in shape_specs(shape, facts, config.Config()):
                    out += [knob(spec) for knob in knobs]
    return out


def shape_specs(shape: planning.Shape, facts, cfg, *, forward: bool = True,
                backward: tuple[bool, ...] = (False, True)) -> list:
    """``planned_specs`` for a given ``planning.Shape`` (score modifiers, varlen)."""
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


def family_fixture(families):
    """A fixture over kernel families ``(id, smem budget KiB or None, wgmma)``: the budget
    set and the Hopper kernels switched off for the test, restored after."""
    import pytest

    @pytest.fixture(params=families, ids=[f[0] for f in families])
    def family(request, monkeypatch):
        _, kib, wgmma = request.param
        specs.set_smem_budget(kib * specs.KIB if kib else None)
        if not wgmma:
            monkeypatch.setenv("CUFLASH_DISABLE_WGMMA", "1")
        yield request.param[0]
        specs.set_smem_budget(None)
    return family


def describe(q: np.ndarray, k: np.ndarray, dtype: str, causal: bool, softmax_scale,
             **extra) -> str:
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    parts = [f"{short(dtype)} b{b} sq{sq} sk{sk} h{h}/{hkv} d{d}",
             "causal" if causal else "full", f"scale={softmax_scale}"]
    parts += [f"{key}={value}" for key, value in extra.items()]
    return " ".join(parts)


# -- the rule ------------------------------------------------------------------------------------

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
    report = testing.judge(name, got, ref, naive, dtype=dtype, scale=scale, allowance=allowance)
    assert report.ok, f"{report} [{label}]"


def assert_stats_match(name: str, got, ref, *, dtype: str, label: str) -> None:
    got = np.asarray(got)
    if got.shape != np.shape(ref):
        raise AssertionError(f"{name} [{label}]: shape {got.shape}, expected {np.shape(ref)}")
    if got.dtype != np.float32:
        raise AssertionError(f"{name} [{label}]: dtype {got.dtype}, expected float32")
    report = testing.judge_stats(name, got, ref, dtype=dtype)
    assert report.ok, f"{name}: relative err {report.err:.3g} vs rtol {report.bound:g} FAIL [{label}]"


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


def assert_call_matches_reference(q, k, v, do, *, causal: bool, dtype: str, label: str,
                                  host_kwargs: dict, gpu_kwargs: dict) -> None:
    """One ``attention_forward`` on CuPy copies of host (q, k, v) and ``attention_backward``
    in both modes against the float64 reference: o, m, l, then dq, dk, dv (and dsinks).
    ``host_kwargs``: the keyword arguments (NumPy arrays) of the reference and the naive
    computation; ``gpu_kwargs``: the same for the call (arrays on the GPU)."""
    import cuflash

    gq, gk, gv, gdo = (to_gpu(x) for x in (q, k, v, do))
    o, stats = cuflash.attention_forward(gq, gk, gv, causal=causal, **gpu_kwargs)
    o_host = to_host(o, dtype)
    o_ref, m_ref, l_ref = reference.attention_reference(q, k, v, causal=causal, **host_kwargs)
    o_nv = reference.attention_naive(q, k, v, causal=causal, dtype=np_dtype(dtype),
                                     **host_kwargs)
    assert_matches_reference("o", o_host, o_ref, o_nv, dtype=dtype, label=label)
    assert_stats_match("m", to_host(stats.m), m_ref, dtype=dtype, label=label)
    assert_stats_match("l", to_host(stats.l), l_ref, dtype=dtype, label=label)
    refs = reference.attention_backward_reference(do, q, k, v, causal=causal, o=o_host,
                                                  **host_kwargs)
    naives = reference.attention_backward_naive(do, q, k, v, causal=causal,
                                                dtype=np_dtype(dtype), **host_kwargs)
    scale = magnitude(*refs[:3])
    for deterministic in (False, True):
        grads = cuflash.attention_backward(gdo, gq, gk, gv, o, stats, causal=causal,
                                           deterministic=deterministic, **gpu_kwargs)
        for name, got, ref, naive in zip(("dq", "dk", "dv", "dsinks"), grads, refs, naives):
            host = to_host(got) if name == "dsinks" else to_host(got, dtype)
            s = magnitude(ref) if name == "dsinks" else scale
            assert_matches_reference(name, host, ref, naive, dtype=dtype, scale=s,
                                     label=f"det={deterministic} {label}")


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


def forget_planned_calls() -> None:
    """Drop the plans and fast-path records of earlier calls (``fastpath``'s)."""
    from cuflash import fastpath

    fastpath.forget_planned_calls()


def selector_with_knob(name: str, knob):
    """``fastpath.selector_patched`` (``specs.<name>`` passing every spec through ``knob``)
    as a generator for a fixture to yield from."""
    from cuflash import fastpath

    with fastpath.selector_patched(name, knob):
        yield


def forward_planned(q, k, v, causal: bool, kwargs: dict, knob):
    """cuflash's forward with ``specs.select_forward`` passing every spec through ``knob``:
    (o, stats, the specs its plans ran)."""
    import cuflash
    from cuflash import fastpath

    with fastpath.selector_patched("select_forward", knob):
        o, stats = cuflash.attention_forward(q, k, v, causal=causal, **kwargs)
        return o, stats, [p.kernel.spec for p in planning._forward_plans.values()]


def hopper_only(why: str) -> None:
    """Skip the test for ``why`` unless device 0 is a Hopper GPU."""
    import cupy
    import pytest

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip(why)


def hopper_selector_with_knob(name: str, knob, why: str):
    """``selector_with_knob`` on a Hopper GPU; elsewhere the test is skipped for ``why``."""
    import cupy
    import pytest

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip(why)
    yield from selector_with_knob(name, knob)


def staged_bulk_dq(spec):
    """``spec`` with dQ staged in shared memory for bulk reduce-adds: without the vector
    reductions the selection may give it (CF_DQ_RED4) and the own dO panels that ride on them
    (CF_HSPLIT_DO_OWN), so the staging keeps its tests."""
    return spec.without_knob("CF_DQ_RED4").without_knob("CF_HSPLIT_DO_OWN")


def module_setup(module_specs: Callable[[], Iterable]):
    """(autouse module fixture, test) for a GPU test module: ``gpu_module_env`` with
    ``module_specs`` compiled ahead, and the test that lists what failed to compile. Assign
    them to module names (``gpu_env, test_module_specs_compile = gh.module_setup(...)``)."""
    import pytest

    failures: dict[str, str] = {}

    @pytest.fixture(scope="module", autouse=True)
    def gpu_env():
        yield from gpu_module_env(module_specs, failures)

    def test_module_specs_compile():
        assert_precompiled(failures)

    return gpu_env, test_module_specs_compile


def assert_precompiled(failures: dict[str, str]) -> None:
    """Every spec precompiled for a module built (the tests that use a failed one also fail,
    with the compiler's log; this lists them all in one place)."""
    assert not failures, "specs that failed to compile:\n" + "\n".join(
        f"  {name}: {why}" for name, why in failures.items())

"""The CUDA forward kernels against the float64 reference (``gpu`` tests).

Every test runs with CUFLASH_POISON=1 (outputs start as NaN, so an element the kernel does
not write fails the comparison) and judges o by FlashAttention's rule
``err <= 2 * err(naive same-dtype) + atol``; m and l are compared directly with the float64
reference (tests/gpu_helpers.py, STATS_RTOL, says why). Inputs are fresh standard-normal data.

The kernels the module needs are compiled up front on a thread pool (gpu_helpers.precompile):
every forward spec of the device at its own budget (hypothesis may draw any of them) plus the
tiles of the smaller shared-memory budgets.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import interop, reference, specs

try:
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu

KIB = specs.KIB
CAUSAL_IDS = {False: "full", True: "causal"}


def _module_specs():
    """The specs the forward plans of this module's problems run (cuflash.plan)."""
    from cuflash import config, launch

    facts, cfg = launch.device_facts(0), config.current()
    out = [spec for dtype in specs.arch_dtypes(facts.arch) for bucket in specs.HEAD_DIM_BUCKETS
           for causal in (False, True)
           for spec in gh.planned_specs(facts, cfg, dtype, bucket, causal, backward=())]
    for kib in specs.BUDGETS_KIB:
        budget_facts = facts.with_budget(kib * KIB)
        out += [spec for dtype in BUDGET_DTYPES for d in BUDGET_HEAD_DIMS
                for causal in (False, True)
                for spec in gh.planned_specs(budget_facts, cfg, dtype, d, causal, backward=())]
    return out


PRECOMPILE_FAILURES: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def gpu_env():
    """Poisoned outputs, the device's own smem budget, kernels compiled ahead."""
    yield from gh.gpu_module_env(_module_specs, PRECOMPILE_FAILURES)


def test_module_specs_compile():
    gh.assert_precompiled(PRECOMPILE_FAILURES)


def _check(q, k, v, *, dtype, causal, softmax_scale=None, framework="cupy", heads_first=False,
           **extra):
    """Run the forward on the GPU and assert o, m, l against the reference."""
    _, _, o, m, l = gh.run_forward(q, k, v, dtype=dtype, causal=causal,
                                   softmax_scale=softmax_scale, framework=framework,
                                   heads_first=heads_first)
    label = gh.describe(q, k, dtype, causal, softmax_scale, heads_first=heads_first, **extra)
    gh.assert_forward_matches_reference(q, k, v, o, m, l, dtype=dtype, causal=causal,
                                        softmax_scale=softmax_scale, label=label)


# -- drawn shapes ------------------------------------------------------------------------------


@st.composite
def forward_cases(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4, 6]))
    return dict(
        batch=draw(st.integers(1, 2)),
        seqlen_q=draw(st.integers(1, 300)),  # independent: seqlen_q < and > seqlen_k both
        seqlen_k=draw(st.integers(1, 300)),
        heads=heads,
        heads_kv=draw(st.sampled_from([h for h in range(1, heads + 1) if heads % h == 0])),
        head_dim=draw(st.sampled_from(gh.HEAD_DIMS)),
        dtype=draw(st.sampled_from(gh.DTYPES)),
        causal=draw(st.booleans()),
        heads_first=draw(st.booleans()),  # (b, h, s, d) storage passed as .transpose(1, 2)
        softmax_scale=draw(st.sampled_from([None, None, 0.3, 1.0])),
        seed=draw(st.integers(0, 2**32 - 1)),  # data follows the draw, so a replay reproduces it
    )


# No shrinking: the suite has one run on a precious GPU; a failure is printed as drawn.
@settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@given(case=forward_cases())
def test_forward_drawn_shapes(case):
    rng = gh.rng_for(case["seed"])
    q, k, v = gh.random_qkv(rng, **{key: case[key] for key in (
        "batch", "seqlen_q", "seqlen_k", "heads", "heads_kv", "head_dim", "dtype")})
    _check(q, k, v, dtype=case["dtype"], causal=case["causal"],
           softmax_scale=case["softmax_scale"], heads_first=case["heads_first"],
           seed=case["seed"])


# -- every head_dim --------------------------------------------------------------------------

HEAD_DIM_CASES = [pytest.param("bfloat16", d, False, id=f"bf16-d{d}") for d in gh.HEAD_DIMS] + [
    pytest.param("float16", 72, True, id="fp16-d72-causal"),
    pytest.param("float32", 40, False, id="fp32-d40"),
    pytest.param("float32", 200, True, id="fp32-d200-causal"),
]


@pytest.mark.parametrize("dtype, head_dim, causal", HEAD_DIM_CASES)
def test_forward_every_head_dim(dtype, head_dim, causal):
    # 131 queries and 141 keys: at least two tiles each way for every tile-table entry, the
    # last one partial; GQA, 2 query heads per kv head.
    q, k, v = gh.random_qkv(gh.rng_for(), batch=2, seqlen_q=131, seqlen_k=141, heads=2,
                            heads_kv=1, head_dim=head_dim, dtype=dtype)
    _check(q, k, v, dtype=dtype, causal=causal)


# -- every shared-memory budget -------------------------------------------------------------

BUDGET_DTYPES = ("bfloat16", "float32")
BUDGET_HEAD_DIMS = (64, 128, 256)


@pytest.mark.parametrize("budget_kib", specs.BUDGETS_KIB, ids=lambda b: f"smem{b}K")
@pytest.mark.parametrize("head_dim", BUDGET_HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS.get)
@pytest.mark.parametrize("dtype", BUDGET_DTYPES, ids=gh.short)
def test_forward_every_smem_budget(smem_budget, budget_kib, head_dim, causal, dtype):
    smem_budget(budget_kib)
    q, k, v = gh.random_qkv(gh.rng_for(), batch=1, seqlen_q=157, seqlen_k=203, heads=2,
                            heads_kv=1, head_dim=head_dim, dtype=dtype)
    _check(q, k, v, dtype=dtype, causal=causal, smem=f"{budget_kib}K")


# -- both 16-bit kernels on a Hopper GPU ----------------------------------------------------
# On sm_90 the selector prefers the wgmma kernel (flash_fwd_sm90.cu) for head-dim buckets 64,
# 128 and 256; CUFLASH_DISABLE_WGMMA=1 brings back the portable mma.sync kernel, which every
# other GPU runs, so both stay tested here.


@pytest.mark.parametrize("head_dim", (64, 128, 256, 120), ids=lambda d: f"d{d}")
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS.get)
@pytest.mark.parametrize("dtype", ("bfloat16", "float16"), ids=gh.short)
@pytest.mark.parametrize("wgmma", [True, False], ids=["wgmma", "portable"])
def test_forward_both_kernels(monkeypatch, wgmma, dtype, causal, head_dim):
    from cuflash import launch

    if wgmma and not specs.uses_wgmma(launch.device_facts(0)):
        pytest.skip("the wgmma kernel needs an sm_90 GPU")
    if not wgmma:
        monkeypatch.setenv("CUFLASH_DISABLE_WGMMA", "1")
    spec = launch.forward_plan(gh.label_shape(dtype, head_dim, causal), 0).kernel.spec
    assert (spec.kind == "fwd90") == wgmma, spec.name
    q, k, v = gh.random_qkv(gh.rng_for(), batch=2, seqlen_q=300, seqlen_k=277, heads=4,
                            heads_kv=2, head_dim=head_dim, dtype=dtype)
    _check(q, k, v, dtype=dtype, causal=causal, kernel=spec.name)


# -- rows that see no key ------------------------------------------------------------------


@pytest.mark.parametrize("dtype, head_dim, seqlen_q, seqlen_k, causal", [
    pytest.param("bfloat16", 64, 200, 70, True, id="bf16-causal-sq200-sk70"),
    pytest.param("float32", 128, 150, 33, True, id="fp32-causal-sq150-sk33"),
    pytest.param("bfloat16", 64, 50, 0, False, id="bf16-sk0"),
    pytest.param("float16", 96, 50, 0, True, id="fp16-sk0-causal"),
])
def test_forward_rows_without_keys(dtype, head_dim, seqlen_q, seqlen_k, causal):
    # bottom-right causal: query i sees key j iff j <= i + seqlen_k - seqlen_q, so the first
    # seqlen_q - seqlen_k rows see nothing; with seqlen_k == 0 no row sees anything.
    q, k, v = gh.random_qkv(gh.rng_for(), batch=2, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                            heads=4, heads_kv=2, head_dim=head_dim, dtype=dtype)
    _, _, o, m, l = gh.run_forward(q, k, v, dtype=dtype, causal=causal)
    label = gh.describe(q, k, dtype, causal, None)
    gh.assert_no_nan(label, o=o, m=m, l=l)
    empty = seqlen_q - seqlen_k if seqlen_k else seqlen_q
    o_empty = o[:, :empty].astype(np.float32)
    assert (o_empty == 0).all(), f"o: rows without keys are not 0 [{label}]"
    assert (m[:, :, :empty] == -np.inf).all(), f"m: rows without keys are not -inf [{label}]"
    assert (l[:, :, :empty] == 0).all(), f"l: rows without keys are not 0 [{label}]"
    if seqlen_k:
        gh.assert_forward_matches_reference(q, k, v, o, m, l, dtype=dtype, causal=causal,
                                            label=label)


# -- torch and JAX CUDA arrays ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"], ids=gh.short)
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_forward_framework_arrays(framework, dtype):
    """Results come back as the caller's type on the caller's device; inputs are not copied."""
    mod = pytest.importorskip(framework)
    q, k, v = gh.random_qkv(gh.rng_for(), batch=2, seqlen_q=100, seqlen_k=77, heads=4,
                            heads_kv=2, head_dim=64, dtype=dtype)
    gq, gk, gv = (gh.to_gpu(x, framework) for x in (q, k, v))
    o, stats = cuflash.attention_forward(gq, gk, gv, causal=True)

    for name, x in (("q", gq), ("k", gk), ("v", gv)):  # the kernel reads the caller's memory
        imported = interop.import_array(x, name)
        assert int(imported.array.data.ptr) == interop.data_pointer(x), f"{name} was copied"
    if framework == "torch":
        for name, out, dt in (("o", o, gq.dtype), ("m", stats.m, mod.float32),
                              ("l", stats.l, mod.float32)):
            assert isinstance(out, mod.Tensor), f"{name}: got {type(out)}"
            assert out.device == gq.device, f"{name}: on {out.device}, q on {gq.device}"
            assert out.dtype == dt, f"{name}: dtype {out.dtype}, expected {dt}"
    else:
        for name, out, dt in (("o", o, gq.dtype), ("m", stats.m, np.float32),
                              ("l", stats.l, np.float32)):
            assert isinstance(out, mod.Array), f"{name}: got {type(out)}"
            assert out.devices() == gq.devices(), f"{name}: on {out.devices()}"
            assert np.dtype(out.dtype) == np.dtype(dt), f"{name}: dtype {out.dtype}, expected {dt}"
    assert tuple(o.shape) == q.shape
    assert type(cuflash.attention(gq, gk, gv, causal=True)) is type(o)
    label = gh.describe(q, k, dtype, True, None, framework=framework)
    gh.assert_forward_matches_reference(q, k, v, gh.to_host(o, dtype), gh.to_host(stats.m),
                                        gh.to_host(stats.l), dtype=dtype, causal=True,
                                        label=label)


# -- a long sequence, checked on sampled rows ----------------------------------------------------


def test_forward_long_sequence_sampled_rows():
    """seqlen 8192 causal: 256 sampled rows against float64 truth computed for those rows
    only, as 16 runs of 16 consecutive rows at random offsets (plus the first and the last
    run). Rows i0..i0+15 see keys 0..i, which is exactly the bottom-right causal mask of a
    16 x (i0 + 16) problem, so the reference runs on that small problem."""
    dtype, seqlen, heads, head_dim, run = "bfloat16", 8192, 2, 128, 16
    rng = gh.rng_for()
    q, k, v = gh.random_qkv(rng, batch=1, seqlen_q=seqlen, seqlen_k=seqlen, heads=heads,
                            heads_kv=heads, head_dim=head_dim, dtype=dtype)
    _, _, o, m, l = gh.run_forward(q, k, v, dtype=dtype, causal=True)

    starts = np.concatenate([[0, seqlen - run], rng.choice(seqlen - run, 14, replace=False)])
    rows = np.concatenate([np.arange(i0, i0 + run) for i0 in starts])
    o_ref, m_ref, l_ref, o_naive = [], [], [], []
    for i0 in starts:
        part = (q[:, i0:i0 + run], k[:, :i0 + run], v[:, :i0 + run])
        o_r, m_r, l_r = reference.attention_reference(*part, causal=True)
        o_ref.append(o_r)
        m_ref.append(m_r)
        l_ref.append(l_r)
        o_naive.append(reference.attention_naive(*part, causal=True, dtype=gh.BF16))
    label = (f"{gh.forward_spec_name(dtype, head_dim, True)}; "
             f"{gh.describe(q, k, dtype, True, None)} rows={len(rows)}")
    gh.assert_no_nan(label, o=o, m=m, l=l)
    gh.assert_matches_reference("o", o[:, rows], np.concatenate(o_ref, axis=1),
                                np.concatenate(o_naive, axis=1), dtype=dtype, label=label)
    gh.assert_stats_match("m", m[:, :, rows], np.concatenate(m_ref, axis=2), dtype=dtype,
                          label=label)
    gh.assert_stats_match("l", l[:, :, rows], np.concatenate(l_ref, axis=2), dtype=dtype,
                          label=label)

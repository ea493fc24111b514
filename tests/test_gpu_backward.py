"""The CUDA backward kernels against the float64 reference gradients (``gpu`` tests).

dq, dk, dv are judged by FlashAttention's rule ``err <= 2 * err(naive same-dtype) + atol``
against ``cuflash.reference.attention_backward_reference``, with CUFLASH_POISON=1 so every
gradient element the kernels leave unwritten is NaN and fails. The backward runs on the o
and stats that cuflash's own forward returned, as a caller's would.

Both modes are exercised: deterministic=False (dQ by float atomics, then converted) and
deterministic=True (dQ by its own pass; bitwise reproducible). The module's kernels are
compiled up front on a thread pool (gpu_helpers.precompile): every spec of the device at its
own budget, plus the head_dim 256 tiles of the smaller budgets.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import reference, specs

try:
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu

KIB = specs.KIB
CAUSAL_IDS = {False: "full", True: "causal"}
BUDGET_DTYPES = ("bfloat16", "float16")
BUDGET_HEAD_DIM = 256


def _module_specs():
    """The specs the plans of this module's problems run (cuflash.plan), compiled ahead."""
    from cuflash import config, launch

    facts, cfg = launch.device_facts(0), config.current()
    out = []
    for dtype in specs.arch_dtypes(facts.arch):  # what hypothesis may draw: the device's budget
        for bucket in specs.HEAD_DIM_BUCKETS:
            for causal in (False, True):
                out += gh.planned_specs(facts, cfg, dtype, bucket, causal)
    for kib in specs.BUDGETS_KIB:
        f = facts.with_budget(kib * KIB)
        for dtype in BUDGET_DTYPES:
            for causal in (False, True):
                out += gh.planned_specs(f, cfg, dtype, BUDGET_HEAD_DIM, causal, forward=False)
        for bucket in specs.HEAD_DIM_BUCKETS:  # test_backward_every_head_dim_every_budget
            out += gh.planned_specs(f, cfg, "bfloat16", bucket, _every_budget_causal(bucket),
                                    forward=False)
    return out


PRECOMPILE_FAILURES: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def gpu_env():
    """Poisoned outputs, the device's own smem budget, kernels compiled ahead."""
    yield from gh.gpu_module_env(_module_specs, PRECOMPILE_FAILURES)


def test_module_specs_compile():
    gh.assert_precompiled(PRECOMPILE_FAILURES)


class Problem:
    """Host inputs, their GPU copies, and the forward's o and stats on the GPU."""

    def __init__(self, rng, *, batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype,
                 causal, softmax_scale=None, heads_first=False, framework="cupy"):
        self.dtype, self.causal, self.softmax_scale = dtype, causal, softmax_scale
        self.heads_first = heads_first
        self.q, self.k, self.v = gh.random_qkv(
            rng, batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads=heads,
            heads_kv=heads_kv, head_dim=head_dim, dtype=dtype)
        self.do = gh.randn(rng, self.q.shape, dtype)
        self.gq, self.gk, self.gv, self.gdo = (
            gh.to_gpu(x, framework, heads_first=heads_first)
            for x in (self.q, self.k, self.v, self.do))
        self.o, self.stats = cuflash.attention_forward(
            self.gq, self.gk, self.gv, causal=causal, softmax_scale=softmax_scale)
        self.o_host = gh.to_host(self.o, dtype)
        self._references = None  # computed once, shared by both modes

    def backward(self, deterministic: bool):
        """(dq, dk, dv) as host arrays."""
        grads = cuflash.attention_backward(
            self.gdo, self.gq, self.gk, self.gv, self.o, self.stats, causal=self.causal,
            softmax_scale=self.softmax_scale, deterministic=deterministic)
        return tuple(gh.to_host(g, self.dtype) for g in grads)

    def label(self, deterministic: bool, **extra) -> str:
        return gh.describe(self.q, self.k, self.dtype, self.causal, self.softmax_scale,
                           deterministic=deterministic, heads_first=self.heads_first, **extra)

    def check(self, deterministic: bool, **extra):
        """Run the backward and assert dq, dk, dv against the reference; returns them."""
        dq, dk, dv = self.backward(deterministic)
        if self._references is None:
            self._references = gh.backward_references(
                self.do, self.q, self.k, self.v, self.o_host, dtype=self.dtype,
                causal=self.causal, softmax_scale=self.softmax_scale)
        gh.assert_backward_matches_reference(
            self.do, self.q, self.k, self.v, self.o_host, dq, dk, dv, dtype=self.dtype,
            causal=self.causal, deterministic=deterministic, softmax_scale=self.softmax_scale,
            label=self.label(deterministic, **extra), references=self._references)
        return dq, dk, dv


# -- drawn shapes --------------------------------------------------------------------------------


@st.composite
def backward_cases(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4, 6]))
    return dict(
        batch=draw(st.integers(1, 2)),
        seqlen_q=draw(st.integers(1, 300)),
        seqlen_k=draw(st.integers(1, 300)),
        heads=heads,
        heads_kv=draw(st.sampled_from([h for h in range(1, heads + 1) if heads % h == 0])),
        head_dim=draw(st.sampled_from(gh.HEAD_DIMS)),
        dtype=draw(st.sampled_from(gh.DTYPES)),
        causal=draw(st.booleans()),
        heads_first=draw(st.booleans()),
        softmax_scale=draw(st.sampled_from([None, None, 0.3, 1.0])),
        seed=draw(st.integers(0, 2**32 - 1)),  # data follows the draw, so a replay reproduces it
    )


# No shrinking: the suite has one run on a precious GPU; a failure is printed as drawn.
@settings(max_examples=20, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@given(case=backward_cases())
def test_backward_drawn_shapes(case):
    case = dict(case)
    seed = case.pop("seed")
    problem = Problem(gh.rng_for(seed), **case)
    for deterministic in (False, True):
        problem.check(deterministic, seed=seed)


# -- every head_dim ----------------------------------------------------------------------------

def _bf16_case(head_dim: int):
    """bf16, alternating the mode so that each head-dim bucket (4 head_dims) runs both."""
    deterministic = head_dim % 16 == 8
    return pytest.param("bfloat16", head_dim, False, deterministic,
                        id=f"bf16-d{head_dim}-{'det' if deterministic else 'atomic'}")


HEAD_DIM_CASES = [_bf16_case(d) for d in gh.HEAD_DIMS] + [
    pytest.param("float16", 40, True, True, id="fp16-d40-causal-det"),
    pytest.param("float16", 160, False, False, id="fp16-d160-atomic"),
    pytest.param("float32", 136, False, False, id="fp32-d136-atomic"),
    pytest.param("float32", 24, True, True, id="fp32-d24-causal-det"),
]


@pytest.mark.parametrize("dtype, head_dim, causal, deterministic", HEAD_DIM_CASES)
def test_backward_every_head_dim(dtype, head_dim, causal, deterministic):
    # 131 queries, 141 keys: partial query and key tiles; GQA with 2 query heads per kv head.
    problem = Problem(gh.rng_for(), batch=2, seqlen_q=131, seqlen_k=141, heads=2, heads_kv=1,
                      head_dim=head_dim, dtype=dtype, causal=causal)
    problem.check(deterministic)


# -- head_dim 256 at every shared-memory budget -----------------------------------------------


@pytest.mark.parametrize("budget_kib", specs.BUDGETS_KIB, ids=lambda b: f"smem{b}K")
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS.get)
@pytest.mark.parametrize("dtype", BUDGET_DTYPES, ids=gh.short)
def test_backward_d256_every_smem_budget(smem_budget, budget_kib, causal, dtype):
    # The forward runs at the device's budget; only the backward is planned for budget_kib.
    problem = Problem(gh.rng_for(), batch=1, seqlen_q=133, seqlen_k=97, heads=2, heads_kv=1,
                      head_dim=BUDGET_HEAD_DIM, dtype=dtype, causal=causal)
    smem_budget(budget_kib)
    for deterministic in (False, True):
        problem.check(deterministic, smem=f"{budget_kib}K")


# -- every head_dim at every shared-memory budget ---------------------------------------------


def _every_budget_causal(head_dim: int) -> bool:
    return head_dim % 64 == 0  # causal for 4 of the 32 head_dims (d64, d128, d192, d256)


@pytest.mark.parametrize("budget_kib", specs.BUDGETS_KIB, ids=lambda b: f"smem{b}K")
@pytest.mark.parametrize("head_dim", gh.HEAD_DIMS, ids=lambda d: f"d{d}")
def test_backward_every_head_dim_every_budget(smem_budget, budget_kib, head_dim):
    """bf16, both modes, the tiles each budget gets (the forward runs at the device's)."""
    causal = _every_budget_causal(head_dim)
    problem = Problem(gh.rng_for(), batch=1, seqlen_q=131, seqlen_k=141, heads=2, heads_kv=1,
                      head_dim=head_dim, dtype="bfloat16", causal=causal)
    smem_budget(budget_kib)
    for deterministic in (False, True):
        problem.check(deterministic, smem=f"{budget_kib}K")


# -- both 16-bit backward kernels on a Hopper GPU -------------------------------------------


@pytest.mark.parametrize("head_dim", (64, 128, 120, 56), ids=lambda d: f"d{d}")
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS.get)
@pytest.mark.parametrize("dtype", BUDGET_DTYPES, ids=gh.short)
@pytest.mark.parametrize("wgmma", [True, False], ids=["wgmma", "portable"])
def test_backward_both_kernels(monkeypatch, wgmma, dtype, causal, head_dim):
    """On sm_90 the atomic mode prefers flash_bwd_sm90.cu for buckets 64 and 128;
    CUFLASH_DISABLE_WGMMA=1 brings back flash_bwd.cu, which other GPUs run."""
    from cuflash import launch

    if wgmma and not specs.uses_wgmma(launch.device_facts(0)):
        pytest.skip("the wgmma kernel needs an sm_90 GPU")
    if not wgmma:
        monkeypatch.setenv("CUFLASH_DISABLE_WGMMA", "1")
    spec = launch.backward_plan(gh.label_shape(dtype, head_dim, causal), 0, False).main.spec
    assert (spec.kind == "bwd90") == wgmma, spec.name
    problem = Problem(gh.rng_for(), batch=2, seqlen_q=300, seqlen_k=277, heads=4, heads_kv=2,
                      head_dim=head_dim, dtype=dtype, causal=causal)
    problem.check(False, kernel=spec.name)


# -- determinism --------------------------------------------------------------------------------


def test_backward_deterministic_is_bitwise_reproducible():
    """deterministic=True: three runs give identical bits. Several key and query tiles per
    head and 3 query heads per kv head, so a dK/dV block sums over many tiles and heads and
    dQ over many key tiles. deterministic=False must still be within tolerance."""
    problem = Problem(gh.rng_for(), batch=2, seqlen_q=333, seqlen_k=290, heads=6, heads_kv=2,
                      head_dim=64, dtype="bfloat16", causal=False)
    first = problem.check(True)
    for run in (2, 3):
        again = problem.backward(True)
        for name, a, b in zip(("dq", "dk", "dv"), first, again):
            differ = int((a.view(np.uint16) != b.view(np.uint16)).sum())
            assert differ == 0, (f"{name}: run {run} differs from run 1 in {differ} elements "
                                 f"[{problem.label(True)}]")
    problem.check(False)


# -- rows that see no key ------------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("dtype, head_dim, seqlen_q, seqlen_k", [
    pytest.param("bfloat16", 64, 200, 70, id="bf16-sq200-sk70"),
    pytest.param("float32", 96, 150, 33, id="fp32-sq150-sk33"),
])
def test_backward_rows_without_keys(dtype, head_dim, seqlen_q, seqlen_k, deterministic):
    """Causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k query rows see no key;
    their dq is exactly 0, and no gradient anywhere is NaN."""
    problem = Problem(gh.rng_for(), batch=2, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads=4,
                      heads_kv=2, head_dim=head_dim, dtype=dtype, causal=True)
    dq, dk, dv = problem.check(deterministic)
    label = problem.label(deterministic)
    gh.assert_no_nan(label, dq=dq, dk=dk, dv=dv)
    empty = seqlen_q - seqlen_k
    assert (dq[:, :empty].astype(np.float32) == 0).all(), \
        f"dq: rows without keys are not exactly 0 [{label}]"


def test_backward_no_keys_at_all():
    """seqlen_k == 0: every gradient is 0 (dk, dv are empty), never NaN."""
    problem = Problem(gh.rng_for(), batch=2, seqlen_q=50, seqlen_k=0, heads=2, heads_kv=1,
                      head_dim=64, dtype="bfloat16", causal=True)
    for deterministic in (False, True):
        dq, dk, dv = problem.backward(deterministic)
        assert dk.shape == problem.k.shape and dv.shape == problem.v.shape
        assert (dq.astype(np.float32) == 0).all(), f"dq not 0 [{problem.label(deterministic)}]"


# -- grouped-query attention ---------------------------------------------------------------------


@pytest.mark.parametrize("heads, heads_kv, causal, deterministic", [
    pytest.param(8, 2, False, False, id="h8-kv2-full-atomic"),
    pytest.param(4, 1, True, True, id="h4-kv1-causal-det"),
    pytest.param(6, 3, True, False, id="h6-kv3-causal-atomic"),
])
def test_backward_gqa_sums_group_gradients(heads, heads_kv, causal, deterministic):
    """dk, dv of a shared kv head equal the sum over its query heads of the per-head
    gradients, computed here by repeating k and v to one head per query head."""
    dtype = "bfloat16"
    problem = Problem(gh.rng_for(), batch=2, seqlen_q=97, seqlen_k=120, heads=heads,
                      heads_kv=heads_kv, head_dim=64, dtype=dtype, causal=causal)
    dq, dk, dv = problem.backward(deterministic)
    group = heads // heads_kv
    k_rep, v_rep = (np.repeat(x, group, axis=2) for x in (problem.k, problem.v))
    dq_ref, dk_per_head, dv_per_head = reference.attention_backward_reference(
        problem.do, problem.q, k_rep, v_rep, causal=causal)
    b, s_k, _, d = dk_per_head.shape
    dk_ref, dv_ref = (g.reshape(b, s_k, heads_kv, group, d).sum(axis=3)
                      for g in (dk_per_head, dv_per_head))
    inputs = (problem.do, problem.q, problem.k, problem.v)
    naives = reference.attention_backward_naive(*inputs, causal=causal,
                                                dtype=gh.np_dtype(dtype))
    allowances = gh.stored_o_allowance(*inputs, problem.o_host, causal=causal)
    label = (f"{gh.backward_spec_name(dtype, 64, causal, deterministic)}; "
             f"{problem.label(deterministic)} group={group}")
    refs = (dq_ref, dk_ref, dv_ref)
    for name, got, ref, naive, allowance in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, naives,
                                                allowances):
        gh.assert_matches_reference(name, got, ref, naive, dtype=dtype, label=label,
                                    scale=gh.magnitude(*refs), allowance=allowance)

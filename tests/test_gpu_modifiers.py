"""Score modifiers (window, softcap, ALiBi, sinks; docs/masks.md) in the CUDA kernels against
the float64 reference (``gpu`` tests).

Every kernel family that runs them: the Hopper wgmma kernels (on an H100 / H200, wgmma on),
the portable 16-bit kernels (wgmma off, and at smaller shared-memory budgets, which pick the
smaller tiles), the float32 SIMT kernels; forward and backward in both deterministic modes;
fp16, bf16 and fp32, odd lengths, seqlen_q != seqlen_k, GQA.
Outputs are NaN-poisoned (CUFLASH_POISON=1); the rule is cuflash.testing's
``err <= 2 * err(naive same dtype) + atol``, with test_masks.py's allowance for rows that see
fewer than MIN_KEYS keys.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import reference, specs, testing

try:
    import gpu_helpers as gh
    from test_masks import FEW_KEYS_RTOL, MIN_KEYS
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh
    from tests.test_masks import FEW_KEYS_RTOL, MIN_KEYS

pytestmark = pytest.mark.gpu

# (name, causal, window, softcap, alibi ("heads" / "batch" / None), sinks)
CASES = [
    ("window", False, (37, 11), None, None, False),
    ("window_left_only", False, (50, -1), None, None, False),
    ("window+causal", True, (45, -1), None, None, False),
    ("window+causal_right", True, (29, 7), None, None, False),
    ("softcap", False, None, 5.0, None, False),
    ("softcap+causal", True, None, 2.0, None, False),
    ("alibi_heads", True, None, None, "heads", False),
    ("alibi_batch", False, None, None, "batch", False),
    ("softcap+alibi", True, None, 3.0, "heads", False),
    ("sinks", False, None, None, None, True),
    ("sinks+window", True, (40, -1), None, None, True),
    ("all", False, (60, 20), 4.0, "batch", True),
]
# (seqlen_q, seqlen_k): odd lengths, both orders, one longer than a few key tiles
LENGTHS = [(131, 131), (97, 203), (203, 97), (257, 1029)]
# Families: wgmma on (Hopper kernels on sm_90), off (portable), portable at 48 / 100 KiB
FAMILIES = [("own", None, True), ("portable", None, False), ("48k", 48, False),
            ("100k", 100, False)]


def _flags(case) -> specs.ModFlags:
    from cuflash import plan

    _, causal, window, softcap, alibi, sinks = case
    return plan.mod_flags(window, softcap, alibi, True if sinks else None, causal)


def _module_specs():
    """The specs this module's calls plan, compiled ahead on a thread pool."""
    from cuflash import config, launch, plan

    facts, out = launch.device_facts(0), []
    for _, kib, wgmma in FAMILIES:
        f = facts.with_budget(kib * specs.KIB if kib else None)
        cfg = config.Config(wgmma=wgmma)
        for case in CASES + [("sinks+causal", True, None, None, None, True)]:
            for dtype in specs.arch_dtypes(facts.arch):
                head_dims = ((32, 64, 96, 128, 256) if case[0] == "all" else
                             (64, 128, 192, 256) if "alibi" in case[0] else (64,))
                for head_dim in head_dims:
                    shape = plan.Shape(1, 1, 1, 1, 1, head_dim, dtype, case[1], _flags(case))
                    out += gh.shape_specs(shape, f, cfg)
    return out


PRECOMPILE_FAILURES: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def gpu_env():
    yield from gh.gpu_module_env(_module_specs, PRECOMPILE_FAILURES)


def test_module_specs_compile():
    gh.assert_precompiled(PRECOMPILE_FAILURES)


family = gh.family_fixture(FAMILIES)


def _inputs(rng, case, dtype, seqlen_q, seqlen_k, head_dim=64, batch=2, heads=6, heads_kv=2,
            slopes=(0.01, 0.5)):
    _, causal, window, softcap, alibi, sinks = case
    q, k, v = gh.random_qkv(rng, batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                            heads=heads, heads_kv=heads_kv, head_dim=head_dim, dtype=dtype)
    do = gh.randn(rng, q.shape, dtype)
    mods = dict(window=window, softcap=softcap)
    if alibi is not None:
        shape = (heads,) if alibi == "heads" else (batch, heads)
        mods["alibi_slopes"] = rng.uniform(*slopes, shape).astype(np.float32)
    if sinks:
        mods["sinks"] = rng.normal(0.0, 2.0, (heads,)).astype(np.float32)
    return q, k, v, do, causal, mods


def _on_gpu(mods: dict) -> dict:
    import cupy

    return {n: cupy.asarray(x) if isinstance(x, np.ndarray) else x for n, x in mods.items()}


def check_forward(case, dtype: str, seqlen_q: int, seqlen_k: int, head_dim: int,
                  label: str, **inputs) -> None:
    """The library's forward on the GPU for ``case`` (CASES' layout): o, m and l against the
    float64 reference with the case's modifiers (the knob test modules' check)."""
    rng = gh.rng_for()
    q, k, v, _do, causal, mods = _inputs(rng, case, dtype, seqlen_q, seqlen_k,
                                         head_dim=head_dim, **inputs)
    label = f"{label} {case[0]} {gh.describe(q, k, dtype, causal, None)}"
    o, stats = cuflash.attention_forward(*(gh.to_gpu(x) for x in (q, k, v)), causal=causal,
                                         **_on_gpu(mods))
    o_ref, m_ref, l_ref = reference.attention_reference(q, k, v, causal=causal, **mods)
    o_nv = reference.attention_naive(q, k, v, causal=causal, dtype=gh.np_dtype(dtype), **mods)
    gh.assert_matches_reference("o", gh.to_host(o, dtype), o_ref, o_nv, dtype=dtype,
                                label=label)
    gh.assert_stats_match("m", gh.to_host(stats.m), m_ref, dtype=dtype, label=label)
    gh.assert_stats_match("l", gh.to_host(stats.l), l_ref, dtype=dtype, label=label)


def check_backward(case, dtype: str, seqlen_q: int, seqlen_k: int, head_dim: int,
                   label: str, deterministic: bool = False) -> tuple:
    """The library's forward and backward on the GPU for ``case``: dq, dk and dv against the
    float64 reference (the knob test modules' check). Returns the gradients on the host and
    a function that runs the same backward again and returns its gradients (repeatability)."""
    rng = gh.rng_for()
    q, k, v, do, causal, mods = _inputs(rng, case, dtype, seqlen_q, seqlen_k,
                                        head_dim=head_dim)
    label = f"{label} {case[0]} {gh.describe(q, k, dtype, causal, None)}"
    gq, gk, gv, gdo = (gh.to_gpu(x) for x in (q, k, v, do))
    gmods = _on_gpu(mods)
    o, stats = cuflash.attention_forward(gq, gk, gv, causal=causal, **gmods)

    def backward() -> list:
        grads = cuflash.attention_backward(gdo, gq, gk, gv, o, stats, causal=causal,
                                           deterministic=deterministic, **gmods)
        return [gh.to_host(g, dtype) for g in grads[:3]]

    got = backward()
    refs = reference.attention_backward_reference(do, q, k, v, causal=causal,
                                                  o=gh.to_host(o, dtype), **mods)
    naives = reference.attention_backward_naive(do, q, k, v, causal=causal,
                                                dtype=gh.np_dtype(dtype), **mods)
    scale = testing.magnitude(*refs[:3])
    few = _few_keys(seqlen_q, seqlen_k, causal, mods["window"])
    for name, g, ref, naive in zip(("dq", "dk", "dv"), got, refs, naives):
        _judge(f"{name} [{label}]", g, ref, naive, dtype, scale, few)
    return got, backward


def _few_keys(seqlen_q, seqlen_k, causal, window) -> bool:
    counts = reference._visible(seqlen_q, seqlen_k, causal, window).sum(axis=1)
    return bool(((counts > 0) & (counts < MIN_KEYS)).any())


def _judge(name, got, ref, naive, dtype, scale, few):
    report = testing.judge(name, got, ref, naive, dtype=dtype, scale=scale)
    if few:  # rows with a handful of keys: the naive reference cancels by luck there
        err = np.abs(np.asarray(got, np.float64) - ref).max(initial=0.0)
        bound = max(report.bound, FEW_KEYS_RTOL[np.dtype(gh.np_dtype(dtype))] * max(1.0, scale))
        assert err <= bound, f"{name}: err {err:.3g} vs bound {bound:.3g} (few keys)"
    else:
        assert report.ok, str(report)


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_backward_match_reference(family, case, dtype, seqlen_q, seqlen_k):
    if family in ("48k", "100k") and case[0] not in ("window+causal_right", "all"):
        pytest.skip("smaller budgets: two cases (the tiles change, not the modifier code)")
    if dtype == "float32" and family in ("portable", "100k"):
        pytest.skip("float32 has one family: its own and 48k suffice")
    rng = gh.rng_for()
    q, k, v, do, causal, mods = _inputs(rng, case, dtype, seqlen_q, seqlen_k)
    label = f"{family} {case[0]} {gh.describe(q, k, dtype, causal, None)}"
    gq, gk, gv, gdo = (gh.to_gpu(x) for x in (q, k, v, do))
    gmods = _on_gpu(mods)  # the same slopes and sinks arrays for the backward (stats check)
    o, stats = cuflash.attention_forward(gq, gk, gv, causal=causal, **gmods)
    o_host = gh.to_host(o, dtype)
    o_ref, m_ref, l_ref = reference.attention_reference(q, k, v, causal=causal, **mods)
    o_nv = reference.attention_naive(q, k, v, causal=causal, dtype=gh.np_dtype(dtype), **mods)
    gh.assert_matches_reference("o", o_host, o_ref, o_nv, dtype=dtype, label=label)
    gh.assert_stats_match("m", gh.to_host(stats.m), m_ref, dtype=dtype, label=label)
    gh.assert_stats_match("l", gh.to_host(stats.l), l_ref, dtype=dtype, label=label)

    few = _few_keys(seqlen_q, seqlen_k, causal, mods["window"])
    for deterministic in (False, True):
        grads = cuflash.attention_backward(gdo, gq, gk, gv, o, stats, causal=causal,
                                           deterministic=deterministic, **gmods)
        refs = reference.attention_backward_reference(do, q, k, v, causal=causal, o=o_host,
                                                      **mods)
        naives = reference.attention_backward_naive(do, q, k, v, causal=causal,
                                                    dtype=gh.np_dtype(dtype), **mods)
        assert len(grads) == len(refs) == (4 if "sinks" in mods else 3), label
        scale = testing.magnitude(*refs[:3])
        for name, got, ref, naive in zip(("dq", "dk", "dv", "dsinks"), grads, refs, naives):
            host = gh.to_host(got) if name == "dsinks" else gh.to_host(got, dtype)
            s = testing.magnitude(ref) if name == "dsinks" else scale
            _judge(f"{name} det={deterministic} [{label}]", host, ref, naive, dtype, s, few)


ALIBI_CASES = [c for c in CASES if "alibi" in c[0]]


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(257, 1029), (1029, 257), (640, 640)])
@pytest.mark.parametrize("head_dim", [64, 128, 192, 256])
@pytest.mark.parametrize("case", ALIBI_CASES, ids=[c[0] for c in ALIBI_CASES])
def test_alibi_forward_at_every_hopper_head_dim(family, case, head_dim, seqlen_q, seqlen_k):
    """The 16-bit forwards move ALiBi's per-row term into the softmax's row offsets where a
    lane's keys all lie on one side of the diagonal (cf_mask.cuh's modify_s): tiles wholly
    left of it, right of it (not causal) and across it, at each Hopper forward's head_dim.
    Slopes small enough that far keys still weigh in the softmax."""
    if family in ("48k", "100k"):
        pytest.skip("the budgets change the tiles, not the modifier code")
    check_forward(case, "bfloat16", seqlen_q, seqlen_k, head_dim, family,
                  slopes=(0.0005, 0.02))


@pytest.mark.parametrize("head_dim", [32, 96, 128, 256])
def test_every_head_dim_with_all_modifiers(family, head_dim):
    rng = gh.rng_for()
    case = CASES[-1]
    q, k, v, do, causal, mods = _inputs(rng, case, "bfloat16", 77, 301, head_dim=head_dim)
    gq, gk, gv, gdo = (gh.to_gpu(x) for x in (q, k, v, do))
    gmods = _on_gpu(mods)
    o, stats = cuflash.attention_forward(gq, gk, gv, causal=causal, **gmods)
    o_ref, _, _ = reference.attention_reference(q, k, v, causal=causal, **mods)
    o_nv = reference.attention_naive(q, k, v, causal=causal, dtype=gh.np_dtype("bfloat16"),
                                     **mods)
    gh.assert_matches_reference("o", gh.to_host(o, "bfloat16"), o_ref, o_nv, dtype="bfloat16",
                                label=f"{family} d{head_dim}")
    grads = cuflash.attention_backward(gdo, gq, gk, gv, o, stats, causal=causal, **gmods)
    gh.assert_no_nan(f"{family} d{head_dim}", **{n: gh.to_host(g) for n, g in
                                                 zip(("dq", "dk", "dv", "dsinks"), grads)})


def test_sinks_on_rows_that_see_no_key(family):
    """seqlen_q > seqlen_k under causal: the first rows see no key; with sinks their o is 0,
    m the sink and l 1 (docs/masks.md), never NaN."""
    rng = gh.rng_for()
    case = ("sinks+causal", True, None, None, None, True)
    q, k, v, _, causal, mods = _inputs(rng, case, "float16", 150, 40)
    o, stats = cuflash.attention_forward(*(gh.to_gpu(x) for x in (q, k, v)), causal=True,
                                         **_on_gpu(mods))
    hidden = slice(0, 150 - 40)
    assert not np.any(gh.to_host(o, "float16")[:, hidden])
    np.testing.assert_allclose(gh.to_host(stats.m)[:, :, hidden],
                               np.broadcast_to(mods["sinks"][None, :, None], (2, 6, 110)),
                               rtol=1e-6)
    np.testing.assert_allclose(gh.to_host(stats.l)[:, :, hidden], 1.0, rtol=1e-6)


def test_torch_cuda_modifiers_and_sink_gradient():
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True)
               for shape in ((2, 131, 6, 64), (2, 203, 2, 64), (2, 203, 2, 64)))
    sinks = torch.randn(6, generator=gen, device="cuda", requires_grad=True)
    slopes = torch.rand(6, generator=gen, device="cuda")
    kw = dict(causal=True, window=(50, -1), softcap=4.0)
    o = ct.flash_attention(q, k, v, alibi_slopes=slopes, sinks=sinks, **kw)
    do = torch.randn(o.shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    o.backward(do)
    host = [gh.to_host(x.detach(), "bfloat16") for x in (q, k, v)]
    mods = dict(kw, alibi_slopes=slopes.cpu().numpy(), sinks=sinks.detach().cpu().numpy())
    o_ref, _, _ = reference.attention_reference(*host, **mods)
    o_nv = reference.attention_naive(*host, dtype=gh.np_dtype("bfloat16"), **mods)
    gh.assert_matches_reference("o", gh.to_host(o.detach(), "bfloat16"), o_ref, o_nv,
                                dtype="bfloat16", label="torch")
    refs = reference.attention_backward_reference(gh.to_host(do, "bfloat16"), *host,
                                                  o=gh.to_host(o.detach(), "bfloat16"), **mods)
    naives = reference.attention_backward_naive(gh.to_host(do, "bfloat16"), *host,
                                                dtype=gh.np_dtype("bfloat16"), **mods)
    got = (q.grad, k.grad, v.grad, sinks.grad)
    for name, g, ref, naive in zip(("dq", "dk", "dv", "dsinks"), got, refs, naives):
        host_g = gh.to_host(g) if name == "dsinks" else gh.to_host(g, "bfloat16")
        _judge(name, host_g, ref, naive, "bfloat16", testing.magnitude(ref), False)

"""The Hopper kernels at head_dim 192 (in the registry since they passed here on an H200,
2026-12-03): the forward (flash_fwd_sm90.cu, three 64-column panels, m64n192 wgmma for P V)
and the backward (flash_bwd_sm90.cu's role split, as at 256: 64 keys, warpgroup 0 dK,
warpgroup 1 dV, warpgroup 1 one dQ panel). ``gpu`` tests on sm_90: the plans must pick them,
and o, m, l, dq, dk, dv match the float64 reference (head_dim 192 and 176, a partial bucket;
causal or not; GQA; odd lengths; modifiers). The fixture pins the registry rows the tests
were written against, so a later registry change keeps these kernels covered."""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import plan, reference, registry

try:
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu


@pytest.fixture
def with_d192(monkeypatch):
    import cupy

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("the Hopper kernels need sm_90")
    monkeypatch.setitem(registry.FWD90, 192, (registry._fwd16(8, 64, 2),))
    monkeypatch.setitem(registry.BWD90, 192, (registry._t(8, 64, 64, 2),))
    gh.forget_planned_calls()
    yield
    gh.forget_planned_calls()


@pytest.mark.parametrize("head_dim", [192, 176])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mods", [{}, {"window": (100, 20), "softcap": 5.0}],
                         ids=["plain", "window+softcap"])
def test_forward_and_backward_match_reference(with_d192, dtype, causal, head_dim, mods):
    from cuflash import launch, testing

    rng = gh.rng_for()
    q, k, v = gh.random_qkv(rng, batch=2, seqlen_q=333, seqlen_k=517, heads=6, heads_kv=2,
                            head_dim=head_dim, dtype=dtype)
    flags = plan.mod_flags(mods.get("window"), mods.get("softcap"), None, None, causal)
    shape = plan.Shape(2, 333, 517, 6, 2, head_dim, dtype, causal, flags)
    picked = launch.forward_plan(shape, 0).kernel.spec
    assert picked.kind == "fwd90" and picked.head_dim == 192, picked.name
    main = launch.backward_plan(shape, 0, False).main.spec
    assert main.kind == "bwd90" and main.head_dim == 192, main.name
    gq, gk, gv = (gh.to_gpu(x) for x in (q, k, v))
    o, stats = cuflash.attention_forward(gq, gk, gv, causal=causal, **mods)
    label = f"{picked.name} {gh.describe(q, k, dtype, causal, None)} {mods}"
    o_ref, m_ref, l_ref = reference.attention_reference(q, k, v, causal=causal, **mods)
    o_nv = reference.attention_naive(q, k, v, causal=causal, dtype=gh.np_dtype(dtype), **mods)
    gh.assert_matches_reference("o", gh.to_host(o, dtype), o_ref, o_nv, dtype=dtype,
                                label=label)
    gh.assert_stats_match("m", gh.to_host(stats.m), m_ref, dtype=dtype, label=label)
    gh.assert_stats_match("l", gh.to_host(stats.l), l_ref, dtype=dtype, label=label)
    assert np.isfinite(gh.to_host(o, dtype).astype(np.float32)).all()
    do = gh.randn(rng, q.shape, dtype)
    o_host = gh.to_host(o, dtype)
    refs = reference.attention_backward_reference(do, q, k, v, causal=causal, o=o_host, **mods)
    naives = reference.attention_backward_naive(do, q, k, v, causal=causal,
                                                dtype=gh.np_dtype(dtype), **mods)
    grads = cuflash.attention_backward(gh.to_gpu(do), gq, gk, gv, o, stats, causal=causal,
                                       **mods)
    scale = testing.magnitude(*refs)
    for name, got, ref, naive in zip(("dq", "dk", "dv"), grads, refs, naives):
        gh.assert_matches_reference(name, gh.to_host(got, dtype), ref, naive, dtype=dtype,
                                    scale=scale, label=f"{main.name} {label}")

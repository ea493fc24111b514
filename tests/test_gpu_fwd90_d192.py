"""The Hopper forward at head_dim 192 (flash_fwd_sm90.cu, bucket 192: three 64-column panels,
m64n192 wgmma for P V; written and compiled 2026-12-03, not yet in the registry because it
has not run on a GPU). ``gpu`` tests on sm_90: the registry entry is added for the test,
the plan must pick it, and o, m, l match the float64 reference (head_dim 192 and 176, a
partial bucket; causal or not; GQA; odd lengths; modifiers). When these pass, the entry
goes into registry.FWD90 with its measured speed (bench/dev/tile_sweep.py --kind fwd90
--head-dim 192 --candidates 8,64,2).
"""

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


def _clear_plans():
    from cuflash import fastpath

    for cache in (plan._forward_plans, plan._backward_plans, fastpath._forward_calls,
                  fastpath._modified_calls):
        cache.clear()


@pytest.fixture
def with_d192(monkeypatch):
    import cupy

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("the Hopper kernels need sm_90")
    monkeypatch.setitem(registry.FWD90, 192, (registry._fwd16(8, 64, 2),))
    _clear_plans()
    yield
    _clear_plans()


@pytest.mark.parametrize("head_dim", [192, 176])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mods", [{}, {"window": (100, 20), "softcap": 5.0}],
                         ids=["plain", "window+softcap"])
def test_forward_matches_reference(with_d192, dtype, causal, head_dim, mods):
    from cuflash import launch

    rng = gh.rng_for()
    q, k, v = gh.random_qkv(rng, batch=2, seqlen_q=333, seqlen_k=517, heads=6, heads_kv=2,
                            head_dim=head_dim, dtype=dtype)
    flags = plan.mod_flags(mods.get("window"), mods.get("softcap"), None, None, causal)
    shape = plan.Shape(2, 333, 517, 6, 2, head_dim, dtype, causal, flags)
    picked = launch.forward_plan(shape, 0).kernel.spec
    assert picked.kind == "fwd90" and picked.head_dim == 192, picked.name
    o, stats = cuflash.attention_forward(*(gh.to_gpu(x) for x in (q, k, v)), causal=causal,
                                         **mods)
    label = f"{picked.name} {gh.describe(q, k, dtype, causal, None)} {mods}"
    o_ref, m_ref, l_ref = reference.attention_reference(q, k, v, causal=causal, **mods)
    o_nv = reference.attention_naive(q, k, v, causal=causal, dtype=gh.np_dtype(dtype), **mods)
    gh.assert_matches_reference("o", gh.to_host(o, dtype), o_ref, o_nv, dtype=dtype,
                                label=label)
    gh.assert_stats_match("m", gh.to_host(stats.m), m_ref, dtype=dtype, label=label)
    gh.assert_stats_match("l", gh.to_host(stats.l), l_ref, dtype=dtype, label=label)
    assert np.isfinite(gh.to_host(o, dtype).astype(np.float32)).all()

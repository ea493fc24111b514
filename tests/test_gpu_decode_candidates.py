"""Issue 16's candidate knobs of the tensor-core decode split (``decode._MMA_KNOBS``,
``decode._MMA_MAX_ROWS``; "sa" is the selection since session 18) against the float64 reference (``gpu``): a
subset of tests/test_gpu_decode.py's tensor-core, paged and modifier cases, run once per
knob set with the knobs switched on for every selected spec. Run by the ``decode16`` stage of
bench/gpu_suite.sh before it times them.
"""

from __future__ import annotations

import os

import pytest

from cuflash import decode

try:
    import test_gpu_decode as base
except ImportError:  # tests/ collected as a package
    from tests import test_gpu_decode as base

pytestmark = pytest.mark.gpu

# name -> (contiguous knobs, rows cap, paged knobs): decode._MMA_KNOBS, _MMA_MAX_ROWS and
# _MMA_PAGED_KNOBS while the set's tests run
KNOB_SETS = {
    "pid": ({"page_ids": True}, {}, {"page_ids": True}),
    "r16x2": ({}, {128: 16}, {"page_ids": True}),
    "sa": ({"step_addr": True}, {}, {"page_ids": True}),
    "ps1": ({"step_addr": True}, {}, {"page_ids": True, "paged_step": 1}),
    "ps7": ({"step_addr": True}, {}, {"page_ids": True, "paged_step": 7}),
    "wt": ({"step_addr": True, "whole_tiles": True}, {},
           {"page_ids": True, "paged_step": 7, "whole_tiles": True}),
    "cr": ({"step_addr": True, "combine_rows": True}, {},
           {"page_ids": True, "paged_step": 7, "combine_rows": True}),
}


@pytest.fixture(scope="module", autouse=True)
def precompile():
    """Every spec the knob sets select here, compiled on a thread pool first (NVRTC runs
    outside the GIL; one by one at first use they would take minutes)."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from cuflash import compiler

    work = {replace(decode.mma_spec(dtype, d, min(r, max_rows.get(d, r)), paged),
                    **(paged_knobs if paged else spec_knobs))
            for spec_knobs, max_rows, paged_knobs in KNOB_SETS.values()
            for dtype in {_dtype()} for d in (64, 128, 256) for r in (16, 32, 64)
            for paged in (False, True)}
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda s: compiler.get_kernel(s, 0), work))


@pytest.fixture(params=list(KNOB_SETS), autouse=True)
def knobs(request, monkeypatch):
    spec_knobs, max_rows, paged_knobs = KNOB_SETS[request.param]
    monkeypatch.setenv("CUFLASH_POISON", "1")
    monkeypatch.setattr(decode, "_MMA_KNOBS", spec_knobs)
    monkeypatch.setattr(decode, "_MMA_MAX_ROWS", max_rows)
    monkeypatch.setattr(decode, "_MMA_PAGED_KNOBS", paged_knobs)
    decode.forget_plans()
    yield request.param
    decode.forget_plans()


def _dtype():
    return "bfloat16" if "bfloat16" in base._dtypes_here() else "float16"


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("q_len, group", [(1, 4), (2, 4), (8, 4), (8, 8)])
def test_candidate_tensor_core_rows(q_len, group, head_dim, knobs):
    spec_knobs, max_rows, _ = KNOB_SETS[knobs]
    shape = decode.DecodeShape(2, q_len, 3001, 2 * group, 2, head_dim, _dtype())
    plan = decode.decode_plan(shape, None, 0)
    expected = decode.mma_knobs(plan.spec.head_dim, plan.spec.rows)  # less spilling buckets
    assert all(getattr(plan.spec, k) == v for k, v in expected.items()), plan.spec.name
    assert plan.spec.rows <= max_rows.get(head_dim, 64), plan.spec.name
    base.test_gpu_tensor_core_rows(q_len, group, head_dim, _dtype())


@pytest.mark.parametrize("page_size", [16, 32, 64, 256])
@pytest.mark.parametrize("heads, heads_kv, q_len", [(8, 2, 1), (8, 2, 3), (16, 2, 8)])
def test_candidate_paged_long_caches(page_size, heads, heads_kv, q_len, knobs):
    _, _, paged_knobs = KNOB_SETS[knobs]
    shape = decode.DecodeShape(2, q_len, 3001, heads, heads_kv, 128, _dtype(), page_size)
    spec = decode.decode_plan(shape, None, 0).spec
    if isinstance(spec, decode.DecodeMmaSpec):
        assert all(getattr(spec, k) == v for k, v in paged_knobs.items()), spec.name
    base.test_gpu_paged_long_caches(page_size, heads, heads_kv, q_len)


@pytest.mark.parametrize("mods", [dict(window=(300, 0)), dict(window=(-1, 5)),
                                  dict(softcap=30.0), dict(alibi="batch_heads"),
                                  dict(window=(1000, 0), softcap=5.0, alibi="heads")],
                         ids=["window-left", "window-right", "softcap", "alibi", "all"])
@pytest.mark.parametrize("q_len, heads", [(2, 16), (8, 16)], ids=["mma16", "mma32"])
def test_candidate_modifiers_on_long_caches(mods, q_len, heads):
    base.test_gpu_modifiers_on_long_caches(mods, q_len, heads)


def test_poison_is_on():
    assert os.environ.get("CUFLASH_POISON") == "1"


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("window", [(300, 0), (1000, 0), None], ids=["w300", "w1000", "full"])
def test_candidate_paged_windows(page_size, window):
    """A window clips a split's first key off a tile boundary: the paged stepped loop
    (CF_PAGED_STEP) must fall back to the page-id loop there, and take the aligned splits."""
    dtype = _dtype()
    case = dict(batch=2, q_len=2, heads=16, heads_kv=4, head_dim=128, seqlen_cache=6000,
                cache_seqlens=[6000, 2501], causal=True, dtype=dtype, num_splits=None,
                softmax_scale=None, seed=5, page_size=page_size, seqlen_new=0, window=window,
                softcap=None, alibi=None)
    base._run_kvcache(case)

"""The decode splits merged by the split kernel's last block of each row tile
(``decode.FUSED_COMBINE``, flash_decode.cu's ``merge_splits_if_last``) against the float64
reference (``gpu``): tests/test_gpu_decode.py's splitting cases (long, paged, modifier, graph
and append cases: SIMT and tensor-core splits, every head_dim bucket, fp32 too) run again with
the knob on for every selected spec, plus CUDA-graph replays that each need the ticket
counters zeroed again. Run by the ``decode_fused`` stage of bench/gpu_suite.sh.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import pytest

import cuflash
from cuflash import decode

try:
    import decode_helpers as dh
    import test_gpu_decode as base
except ImportError:  # tests/ collected as a package
    from tests import decode_helpers as dh
    from tests import test_gpu_decode as base

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def fused_poisoned_precompiled():
    """The knob on (the decode memos cleared: they hold plans made without it), outputs
    poisoned with NaN, and every fused spec of the device compiled on a thread pool."""
    from cuflash import compiler, launch, specs

    old = os.environ.get("CUFLASH_POISON")
    os.environ["CUFLASH_POISON"] = "1"
    previous, decode.FUSED_COMBINE = decode.FUSED_COMBINE, True
    decode.forget_plans()
    arch = launch.device_facts(0).arch
    work = decode.all_decode_specs(specs.arch_dtypes(arch), arch)  # the fused ones now
    assert any(s.fused_combine for s in work)
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda s: compiler.get_kernel(s, 0), work))
    yield
    decode.FUSED_COMBINE = previous
    decode.forget_plans()
    if old is None:
        os.environ.pop("CUFLASH_POISON", None)
    else:
        os.environ["CUFLASH_POISON"] = old


test_gpu_long_caches = base.test_gpu_long_caches
test_gpu_tensor_core_rows = base.test_gpu_tensor_core_rows
test_gpu_splits_agree_and_plan_splits = base.test_gpu_splits_agree_and_plan_splits
test_gpu_torch_and_cuda_graph = base.test_gpu_torch_and_cuda_graph
test_gpu_paged_long_caches = base.test_gpu_paged_long_caches
test_gpu_modifiers_on_long_caches = base.test_gpu_modifiers_on_long_caches
test_gpu_torch_graph_with_append_and_pages = base.test_gpu_torch_graph_with_append_and_pages


@pytest.mark.parametrize("heads, heads_kv, q_len, head_dim, dtype",
                         [(32, 8, 1, 128, "bfloat16"), (8, 8, 1, 128, "float16"),
                          (32, 8, 8, 128, "bfloat16"), (16, 2, 3, 256, "float16"),
                          (4, 4, 2, 64, "float32")])
def test_gpu_the_plans_fuse(heads, heads_kv, q_len, head_dim, dtype):
    """The knob reaches the launch: these long caches split and merge inside the split
    kernel (no combine kernel), so the tests above ran the fused merge."""
    shape = decode.DecodeShape(1, q_len, 32768, heads, heads_kv, head_dim, dtype)
    plan = decode.decode_plan(shape, None, 0)
    assert plan.num_splits > 1 and plan.fuses and plan.combine_grid is None, plan
    assert plan.spec.fused_combine and plan.spec.name.endswith("_fc"), plan.spec.name


def test_gpu_graph_replays_zero_their_counters():
    """Three replays of one captured call, each with new queries and lengths: a counter left
    at num_splits by the replay before would make no block (or the wrong one) merge."""
    torch = pytest.importorskip("torch")
    dtype = "bfloat16" if "bfloat16" in base._dtypes_here() else "float16"
    case = dict(batch=2, q_len=1, heads=32, heads_kv=8, head_dim=128, seqlen_cache=16384,
                cache_seqlens=[16384, 9000], causal=True, dtype=dtype, num_splits=None,
                softmax_scale=None, seed=21)
    q, k, v, lens = dh.make_inputs(case)
    tq, tk, tv, tl = (dh.to_device(x, "torch") for x in (q, k, v, lens))
    graph, (o_graph, lse_graph) = base.captured(torch, lambda: cuflash.attention_with_kvcache(
        tq, tk, tv, cache_seqlens=tl, causal=True, return_softmax_lse=True))
    rng = np.random.default_rng()
    for replay in range(3):
        q2, _, _, _ = dh.make_inputs(dict(case, seed=int(rng.integers(2**32))))
        lens2 = np.array([int(x) for x in rng.integers(1, 16385, 2)], np.int32)
        tq.copy_(dh.to_device(q2, "torch"))
        tl.copy_(torch.from_numpy(lens2).cuda())
        o_graph.fill_(float("nan")), lse_graph.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        dh.assert_decode_matches(dh.to_host(o_graph), dh.to_host(lse_graph), q2, k, v, lens2,
                                 causal=True, softmax_scale=None, dtype=dtype,
                                 label=f"fused graph replay {replay}")

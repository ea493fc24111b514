"""Decode with the combine launched as the split's programmatic dependent (``decode.PDL``,
CF_DECODE_PDL, cuflash/pdl.py; a candidate) against the float64 reference (``gpu``, Hopper
and newer): test_gpu_decode's tests that split the keys (so a combine runs), CUDA graphs
included, with PDL on for every selected spec. The host side is tests/test_pdl.py; times:
bench/dev/decode_knob_ab.py --knob PDL (``gpu_suite.sh decode_pdl``)."""

from __future__ import annotations

import pytest

from cuflash import decode

try:
    from test_gpu_decode import (poison_and_precompile, test_gpu_long_caches,  # noqa: F401
                                 test_gpu_modifiers_on_long_caches, test_gpu_paged_long_caches,
                                 test_gpu_splits_agree_and_plan_splits,
                                 test_gpu_tensor_core_rows, test_gpu_torch_and_cuda_graph,
                                 test_gpu_torch_graph_with_append_and_pages)
except ImportError:  # tests/ collected as a package
    from tests.test_gpu_decode import (poison_and_precompile, test_gpu_long_caches,  # noqa: F401
                                       test_gpu_modifiers_on_long_caches,
                                       test_gpu_paged_long_caches,
                                       test_gpu_splits_agree_and_plan_splits,
                                       test_gpu_tensor_core_rows, test_gpu_torch_and_cuda_graph,
                                       test_gpu_torch_graph_with_append_and_pages)

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def pdl_on(monkeypatch):
    """PDL on for each test (plans made again), and checked to be what runs."""
    import cupy

    from cuflash import launch

    if int(cupy.cuda.Device(0).compute_capability) < 90:
        pytest.skip("programmatic dependent launch needs sm_90")
    monkeypatch.setattr(decode, "PDL", True)
    monkeypatch.setattr(decode, "FUSED_COMBINE", False)  # PDL launches the combine kernel
    decode.forget_plans()
    dependent = []
    real = launch.launch_packed_dependent
    monkeypatch.setattr(launch, "launch_packed_dependent",
                        lambda *args: dependent.append(1) or real(*args))
    yield dependent
    decode.forget_plans()


def test_a_split_decode_launches_its_combine_as_a_dependent(pdl_on):
    import cupy

    import cuflash

    q = cupy.random.standard_normal((1, 1, 32, 128)).astype(cupy.float16)
    k, v = (cupy.random.standard_normal((1, 32768, 8, 128)).astype(cupy.float16)
            for _ in range(2))
    plan = decode.decode_plan(decode.DecodeShape(1, 1, 32768, 32, 8, 128, "float16"), None, 0)
    assert plan.spec.pdl and plan.combine_grid, plan.spec.name
    for _ in range(2):  # a direct call, then a replay of its launches
        cuflash.attention_with_kvcache(q, k, v)
    assert len(pdl_on) == 2

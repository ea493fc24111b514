"""The 8-warp Hopper forward with each warpgroup's softmax overlapping its P V product
(``CF_FWD_OVERLAP``, flash_fwd_sm90.cu; 1 / 2 selected, 3 a candidate) against the float64
reference (``gpu``):
head_dim 192 and 256 (the buckets that kernel serves), every score modifier of
test_gpu_modifiers, causal rows with no visible key, a dozen key tiles, fp16 and bf16; m and
l too, which the backward reads. Timed by bench/dev/exp2_fma_ab.py --knob CF_FWD_OVERLAP
(``gpu_suite.sh fwd_overlap``).
"""

from __future__ import annotations

import pytest

from cuflash import plan, specs
from cuflash.registry import fwd90_warp_specialized

try:
    import gpu_helpers as gh
    import test_gpu_modifiers as mods_tests
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh
    from tests import test_gpu_modifiers as mods_tests

pytestmark = pytest.mark.gpu

KNOB = "CF_FWD_OVERLAP"
HEAD_DIMS = (192, 256)
PLAIN = [("plain", False, None, None, None, False), ("plain+causal", True, None, None, None,
                                                      False)]
CASES = PLAIN + mods_tests.CASES
LENGTHS = [(131, 131), (203, 97), (257, 1029), (77, 811)]


# 2: the next tile's loads issued after the tile's wgmma; 3: mbarriers instead of the
# per-tile __syncthreads (written in session 19, first run pending)
VALUES = (1, 2, 3)


def _overlapped(spec, value):
    eight_warps = spec.kind == "fwd90" and not fwd90_warp_specialized(spec)
    return spec.with_knobs(**{KNOB: value}) if eight_warps else spec


def _module_specs():
    """The forward specs this module's calls select, with the knob (compiled ahead)."""
    from cuflash import launch

    facts = launch.device_facts(0)
    if facts.arch != "sm_90":
        return []
    return [_overlapped(specs.select_forward(facts, dtype, d, case[1],
                                             mods=mods_tests._flags(case)), value)
            for case in CASES for dtype in ("float16", "bfloat16") for d in HEAD_DIMS
            for value in VALUES]


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


@pytest.fixture(params=VALUES, ids=lambda v: f"v{v}")
def overlap(request):
    import cupy

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("the knob is a Hopper forward's")
    for _ in gh.selector_with_knob("select_forward",
                                   lambda spec: _overlapped(spec, request.param)):
        yield request.param


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(overlap, case, head_dim, dtype, seqlen_q, seqlen_k):
    from cuflash import launch

    _, causal, *_ = case
    p = launch.forward_plan(plan.Shape(2, seqlen_q, seqlen_k, 6, 2, head_dim, dtype, causal,
                                       mods_tests._flags(case)), 0)
    assert (KNOB, overlap) in p.kernel.spec.knobs, p.kernel.spec.name
    mods_tests.check_forward(case, dtype, seqlen_q, seqlen_k, head_dim, f"overlap {overlap}")


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_forward_and_backward_with_all_modifiers(overlap, head_dim):
    mods_tests.test_every_head_dim_with_all_modifiers("own", head_dim)

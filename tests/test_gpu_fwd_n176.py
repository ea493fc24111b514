"""The warp-specialized Hopper forward at head_dim 128 with 176-key tiles (two stages;
FlashAttention-3's d128 tile, a candidate, not selected) against the float64 reference
(``gpu``): every score modifier of test_gpu_modifiers, causal rows with no visible key,
lengths that are not multiples of 176, fp16 and bf16, with and without persistent blocks;
m and l too. Not with dropout (its keep bits come in blocks of up to 16 fragments, 176 keys
are 22) nor block masks (their blocks are multiples of 128 keys). Timed by
``gpu_suite.sh fwd_n176`` (bench/dev/tile_sweep.py --candidates 12,176,2).
"""

from __future__ import annotations

from dataclasses import replace

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

PLAIN = [("plain", False, None, None, None, False), ("plain+causal", True, None, None, None,
                                                      False)]
CASES = PLAIN + mods_tests.CASES
LENGTHS = [(131, 131), (203, 97), (257, 1029), (400, 353)]
PERSISTENT = (0, 1)


def _n176(spec, persistent):
    if spec.head_dim != 128 or not fwd90_warp_specialized(spec):
        return spec
    spec = replace(spec, block_n=176, stages=2).without_knob(plan.PERSISTENT)
    return spec.with_knobs(**{plan.PERSISTENT: 1}) if persistent else spec


def _module_specs():
    from cuflash import launch

    facts = launch.device_facts(0)
    if facts.arch != "sm_90":
        return []
    return [_n176(specs.select_forward(facts, dtype, 128, case[1],
                                       mods=mods_tests._flags(case)), p)
            for case in CASES for dtype in ("float16", "bfloat16") for p in PERSISTENT]


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


@pytest.fixture(params=PERSISTENT, ids=lambda p: f"persistent{p}")
def n176(request):
    import cupy

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("a Hopper forward's tile")
    for _ in gh.selector_with_knob("select_forward",
                                   lambda spec: _n176(spec, request.param)):
        yield request.param


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(n176, case, dtype, seqlen_q, seqlen_k):
    from cuflash import launch

    _, causal, *_ = case
    p = launch.forward_plan(plan.Shape(2, seqlen_q, seqlen_k, 6, 2, 128, dtype, causal,
                                       mods_tests._flags(case)), 0)
    assert p.kernel.spec.block_n == 176, p.kernel.spec.name
    mods_tests.check_forward(case, dtype, seqlen_q, seqlen_k, 128, f"n176 persistent={n176}")

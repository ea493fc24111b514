"""The warp-specialized Hopper backward at head_dim 128 with three Q / dO stages (a candidate:
two are selected) against the float64 reference (``gpu``): atomic and ordered dQ (the latter
bitwise repeatable), causal or not, a few score modifiers, lengths that leave partial tiles
and one long enough to turn the stage ring many times. Timed by ``gpu_suite.sh bwd_stages``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cuflash import plan, specs

try:
    import gpu_helpers as gh
    import test_gpu_modifiers as mods_tests
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh
    from tests import test_gpu_modifiers as mods_tests

pytestmark = pytest.mark.gpu

HEAD_DIM, STAGES = 128, 3
CASES = [("plain", False, None, None, None, False), ("plain+causal", True, None, None, None,
                                                      False),
         *(c for c in mods_tests.CASES if c[0] in ("window+causal", "softcap", "sinks", "all"))]
LENGTHS = [(131, 131), (203, 97), (257, 301), (1000, 1000)]


def _three_stages(spec):
    """Three stages where the spec is the warp-specialized backward at HEAD_DIM and they fit
    the device; else the spec as it is (the test below asserts the knob took)."""
    from cuflash import launch

    if not (spec.kind == "bwd90" and spec.head_dim == HEAD_DIM
            and specs.bwd90_warp_specialized(spec)):
        return spec
    three = replace(spec, stages=STAGES)
    return three if three.smem_bytes <= launch.device_facts(0).smem_optin else spec


def _module_specs():
    """The backward specs this module's calls select, with three stages, and their forwards."""
    from cuflash import config, launch

    facts = launch.device_facts(0)
    if facts.arch != "sm_90":
        return []
    out = []
    for case in CASES:
        flags = mods_tests._flags(case)
        for dtype in ("float16", "bfloat16"):
            for deterministic in (False, True):
                out.append(_three_stages(specs.select_backward(
                    facts, dtype, HEAD_DIM, case[1], deterministic, mods=flags)))
            shape = plan.Shape(1, 1, 1, 1, 1, HEAD_DIM, dtype, case[1], flags)
            out += gh.shape_specs(shape, facts, config.Config(), forward=True)
    return out


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


@pytest.fixture
def three_stages():
    yield from gh.hopper_selector_with_knob("select_backward", _three_stages,
                                            "the warp-specialized backward is Hopper's")


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "ordered"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_reference(three_stages, case, dtype, deterministic, seqlen_q,
                                    seqlen_k):
    from cuflash import launch

    _, causal, *_ = case
    picked = specs.select_backward(launch.device_facts(0), dtype, HEAD_DIM, causal,
                                   deterministic, mods=mods_tests._flags(case))
    if not specs.bwd90_warp_specialized(picked):  # the deterministic mode with a window
        pytest.skip(f"{picked.name}: not the warp-specialized backward")
    assert picked.stages == STAGES and picked.dq_ordered == deterministic, picked.name
    got, again = mods_tests.check_backward(case, dtype, seqlen_q, seqlen_k, HEAD_DIM,
                                           f"stages {STAGES}", deterministic)
    if deterministic:  # the same call again leaves the same bits
        for name, first, second in zip(("dq", "dk", "dv"), got, again()):
            assert np.array_equal(first, second), name

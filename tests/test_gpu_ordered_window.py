"""The deterministic backward with a sliding window on the warp-specialized Hopper kernel
(ordered dQ in descending key-tile order, the blocks of a head starting with its last key
tile; bench/dev/ordered_turns_model.py checks the turns without a GPU) against the float64
reference (``gpu``), bitwise repeatable. A candidate: the selector still gives windows the
portable kernels in the deterministic mode (registry._ordered_dq) until this has passed.
Timed by ``gpu_suite.sh det_window``.
"""

from __future__ import annotations

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

HEAD_DIMS = (64, 128)
CASES = [c for c in mods_tests.CASES if c[2] is not None]  # those with a window
LENGTHS = [(131, 131), (203, 97), (257, 301), (700, 1000)]


def ordered_window_backward(facts, dtype, head_dim, causal, mods):
    """The warp-specialized backward of a windowed call with ordered dQ: the atomic mode's
    spec (its tile, bulk dQ) made ordered; None where the atomic mode is not that kernel."""
    return specs.with_ordered_dq(_plain_select_backward(facts, dtype, head_dim, causal, False,
                                                        mods=mods))


_plain_select_backward = specs.select_backward


def _ordered(spec):
    """The selector's deterministic windowed spec as the ordered warp-specialized one."""
    from cuflash import launch

    if spec.kind == "bwd90" or not spec.deterministic or not spec.mods.window:
        return spec
    ordered = ordered_window_backward(launch.device_facts(0), spec.dtype, spec.head_dim,
                                      spec.causal, spec.mods)
    return ordered or spec


def _module_specs():
    """The ordered window specs this module's calls run, and their forwards."""
    from cuflash import config, launch

    facts = launch.device_facts(0)
    if facts.arch != "sm_90":
        return []
    out = []
    for case in CASES:
        flags = mods_tests._flags(case)
        for dtype in ("float16", "bfloat16"):
            for d in HEAD_DIMS:
                spec = ordered_window_backward(facts, dtype, d, case[1], flags)
                out += [spec] if spec is not None else []
                shape = plan.Shape(1, 1, 1, 1, 1, d, dtype, case[1], flags)
                out += gh.shape_specs(shape, facts, config.Config(), forward=True)
    return out


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


@pytest.fixture
def ordered_windows():
    yield from gh.hopper_selector_with_knob("select_backward", _ordered,
                                            "the warp-specialized backward is Hopper's")


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_reference_and_repeats(ordered_windows, case, head_dim, dtype,
                                                seqlen_q, seqlen_k):
    from cuflash import launch

    _, causal, *_ = case
    picked = specs.select_backward(launch.device_facts(0), dtype, head_dim, causal, True,
                                   mods=mods_tests._flags(case))
    if not specs.bwd90_warp_specialized(picked):
        pytest.skip(f"{picked.name}: the atomic mode is not the warp-specialized kernel here")
    assert picked.dq_ordered and picked.mods.window, picked.name
    got, again = mods_tests.check_backward(case, dtype, seqlen_q, seqlen_k, head_dim,
                                           "ordered window", deterministic=True)
    for name, first, second in zip(("dq", "dk", "dv"), got, again()):
        assert np.array_equal(first, second), f"{name} differs between runs [{case[0]}]"

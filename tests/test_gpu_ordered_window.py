"""The deterministic backward with a sliding window on the warp-specialized Hopper kernel
(ordered dQ in descending key-tile order, the blocks of a head starting with its last key
tile; bench/dev/ordered_turns_model.py checks the turns without a GPU) against the float64
reference (``gpu``), bitwise repeatable: the selection since it passed on an H100
(2026-12-06, registry._ordered_dq). Timed by ``gpu_suite.sh det_window``.
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
    """The deterministic mode's spec for a windowed call where it is the warp-specialized
    kernel with ordered dQ; None elsewhere (other GPUs, other buckets)."""
    spec = specs.select_backward(facts, dtype, head_dim, causal, True, mods=mods)
    return spec if specs.bwd90_warp_specialized(spec) and spec.dq_ordered else None


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


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_reference_and_repeats(case, head_dim, dtype, seqlen_q, seqlen_k):
    from cuflash import launch

    _, causal, *_ = case
    picked = specs.select_backward(launch.device_facts(0), dtype, head_dim, causal, True,
                                   mods=mods_tests._flags(case))
    if not specs.bwd90_warp_specialized(picked):
        pytest.skip(f"{picked.name}: not the warp-specialized kernel (a Hopper's, d64 / d128)")
    assert picked.dq_ordered and picked.mods.window, picked.name
    got, again = mods_tests.check_backward(case, dtype, seqlen_q, seqlen_k, head_dim,
                                           "ordered window", deterministic=True)
    for name, first, second in zip(("dq", "dk", "dv"), got, again()):
        assert np.array_equal(first, second), f"{name} differs between runs [{case[0]}]"

"""The Hopper backward at head_dim 192 / 256 with its first dQ panel issued before dK / dV
(``CF_BWD_DQ_FIRST``, flash_bwd_sm90.cu's role split; selected) against the float64
reference (``gpu``): every score modifier of test_gpu_modifiers, causal rows with no visible
key, several query and key tiles, fp16 and bf16; dq, dk and dv. Timed by
``gpu_suite.sh bwd_dq_first`` (bench/dev/tile_sweep.py --variant CF_BWD_DQ_FIRST=1).
"""

from __future__ import annotations

import pytest

from cuflash import plan, specs

try:
    import gpu_helpers as gh
    import test_gpu_modifiers as mods_tests
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh
    from tests import test_gpu_modifiers as mods_tests

pytestmark = pytest.mark.gpu

KNOB = "CF_BWD_DQ_FIRST"
HEAD_DIMS = (192, 256)
PLAIN = [("plain", False, None, None, None, False), ("plain+causal", True, None, None, None,
                                                      False)]
CASES = PLAIN + mods_tests.CASES
LENGTHS = [(131, 131), (203, 97), (257, 301)]


def _with_knob(spec):
    return spec.with_knobs(**{KNOB: 1}) if spec.kind == "bwd90" and spec.head_dim >= 192 else spec


def _module_specs():
    """The backward specs this module's calls select, with the knob, and their forwards."""
    from cuflash import config, launch

    facts = launch.device_facts(0)
    if facts.arch != "sm_90":
        return []
    out = []
    for case in CASES:
        for dtype in ("float16", "bfloat16"):
            for d in HEAD_DIMS:
                flags = mods_tests._flags(case)
                out.append(_with_knob(specs.select_backward(facts, dtype, d, case[1], False,
                                                            mods=flags)))
                shape = plan.Shape(1, 1, 1, 1, 1, d, dtype, case[1], flags)
                out += gh.shape_specs(shape, facts, config.Config(), forward=True)
    return out


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


@pytest.fixture
def dq_first():
    yield from gh.hopper_selector_with_knob("select_backward", _with_knob,
                                            "the knob is the Hopper backward's")


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_reference(dq_first, case, head_dim, dtype, seqlen_q, seqlen_k):
    from cuflash import launch

    _, causal, *_ = case
    facts = launch.device_facts(0)
    picked = specs.select_backward(facts, dtype, head_dim, causal, False,
                                   mods=mods_tests._flags(case))
    assert (KNOB, 1) in picked.knobs, picked.name
    mods_tests.check_backward(case, dtype, seqlen_q, seqlen_k, head_dim, "dq_first")

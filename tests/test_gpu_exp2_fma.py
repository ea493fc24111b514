"""The forward softmax's exp2 partly on the FMA pipe (``CF_EXP2_FMA``, cf_common.cuh's
fma_exp2) against the float64 reference (``gpu``): the Hopper forward with the knob switched
on for every fwd90 spec it selects (k of every 8 scores, k = 2, 4, 8), plain and with score
modifiers, causal rows with no visible key (seqlen_q > seqlen_k: P = 0 and l = 0 must stay
exact), fp16 and bf16. The backward runs too: it recomputes P from the forward's m and l.
Timed by bench/dev/exp2_fma_ab.py (``gpu_suite.sh exp2_fma``).
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

PLAIN = [("plain", False, None, None, None, False), ("plain+causal", True, None, None, None,
                                                      False)]
CASES = PLAIN + [c for c in mods_tests.CASES if c[0] in ("softcap", "softcap+causal",
                                                         "window+causal", "all")]


def _module_specs():
    """The forward specs this module's calls select, each knob value, and the backward's
    (compiled ahead)."""
    from cuflash import config, launch

    facts = launch.device_facts(0)
    if facts.arch != "sm_90":
        return []
    out = []
    for case in CASES:
        for dtype in ("float16", "bfloat16"):
            for head_dim in ((64, 128, 256) if case[0] == "all" else (64,)):
                spec = specs.select_forward(facts, dtype, head_dim, case[1],
                                            mods=mods_tests._flags(case))
                out += [spec.with_knobs(CF_EXP2_FMA=k) for k in KNOB_VALUES]
                shape = plan.Shape(1, 1, 1, 1, 1, head_dim, dtype, case[1],
                                   mods_tests._flags(case))
                out += gh.shape_specs(shape, facts, config.Config(), forward=False)
    return out


KNOB_VALUES = (2, 4, 8)
gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


@pytest.fixture(params=KNOB_VALUES, ids=lambda k: f"k{k}")
def exp2_fma(request):
    import cupy

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("the knob is timed and tested in the Hopper forward")

    def knob(spec):
        return spec.with_knobs(CF_EXP2_FMA=request.param) if spec.kind == "fwd90" else spec

    for _ in gh.selector_with_knob("select_forward", knob):
        yield request.param


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(131, 131), (203, 97), (257, 1029)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_with_fma_exp2_matches_reference(exp2_fma, case, dtype, seqlen_q, seqlen_k):
    from cuflash import launch

    p = launch.forward_plan(plan.Shape(2, seqlen_q, seqlen_k, 6, 2, 64, dtype, case[1],
                                       mods_tests._flags(case)), 0)
    assert ("CF_EXP2_FMA", exp2_fma) in p.kernel.spec.knobs, p.kernel.spec.name
    mods_tests.test_forward_and_backward_match_reference("own", case, dtype, seqlen_q,
                                                         seqlen_k)


@pytest.mark.parametrize("head_dim", [128, 256])
def test_other_head_dims(exp2_fma, head_dim):
    mods_tests.test_every_head_dim_with_all_modifiers("own", head_dim)

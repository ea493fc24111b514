"""The warp-specialized Hopper backward with dropout's 1 / (1 - p) folded into its staged
statistics (``CF_BWD_DROP_FOLD=1``, selected: registry.BWD90_DROP_FOLD; docs/dropout.md)
against the float64 reference (``gpu``): P comes out of the exponential already scaled,
dS = P' (dP Z - delta (1 - p)), so the gradients differ from the unfolded kernel's in
rounding only. Timed by
bench/dev/dropout_ab.py (``gpu_suite.sh dropout_ab``).
"""

from __future__ import annotations

import pytest

from cuflash import specs
from cuflash.registry import bwd90_warp_specialized

try:
    import gpu_helpers as gh
    import test_gpu_dropout as dropout_tests
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh
    from tests import test_gpu_dropout as dropout_tests

pytestmark = pytest.mark.gpu

KNOB = "CF_BWD_DROP_FOLD"
HEAD_DIMS = (64, 128)
CASES = dropout_tests.CASES  # plain, causal GQA, window + ALiBi, softcap + sinks, block mask
LENGTHS = [(389, 389), (300, 777), (777, 260)]


def _folded(spec):
    if not (bwd90_warp_specialized(spec) and spec.mods.dropout):
        return spec
    return spec.with_knobs(**{KNOB: 1})


def _module_specs():
    calls = [(case[1], dropout_tests.mod_flags(case)) for case in CASES]
    return gh.hopper_specs(calls, HEAD_DIMS, (_folded,))


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


@pytest.fixture
def folded():
    yield from gh.hopper_selector_with_knob("select_backward", _folded,
                                            "the knob is a Hopper backward's")


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_backward_match_reference(folded, case, dtype, head_dim, seqlen_q,
                                              seqlen_k):
    from cuflash import launch

    picked = specs.select_backward(launch.device_facts(0), dtype, head_dim, case[1], False,
                                   mods=dropout_tests.mod_flags(case))
    if not bwd90_warp_specialized(picked):  # d64 causal under a block mask: the 8-warp tile
        pytest.skip(f"the selection runs {picked.name}, which has no fold")
    assert dict(picked.knobs).get(KNOB) == 1, picked.name  # the fold is what runs
    # both deterministic modes (the ordered-dQ tile takes the knob too, where it runs)
    dropout_tests._check("fold", case, dtype, seqlen_q, seqlen_k, head_dim)


"""The Hopper forward and backward on packed sequences loading with bulk tensor copies
(``CF_FWD_TMA=1`` / ``CF_BWD_TMA=1`` with ``CF_VARLEN``: specs.with_forward_tma /
with_backward_tma, selected since session 33): one map over each array's rows, boxes
from each sequence's first row, so a box past a sequence's end reads the rows after it, which
the kernels zero before any product (kTailZero in both). Against the float64 varlen reference
on test_gpu_varlen's mixed layout (empty sequences, queries without keys, seqused_k, several
tiles), every modifier, d64 / d128, fp16 / bf16; with NaN and inf in the rows after each
sequence (test_gpu_varlen.check_isolated); and bit for bit against the dense TMA forward
(selected) at equal lengths. H100, session 33: 84 passed (the fixtures box what the
selection now boxes too). Timed by ``gpu_suite.sh varlen_tma`` (bench/dev/varlen_bench.py
--tma).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cuflash import specs

try:
    import gpu_helpers as gh
    import test_gpu_varlen as varlen_tests
    from test_varlen import ALONE, Case
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh
    from tests import test_gpu_varlen as varlen_tests
    from tests.test_varlen import ALONE, Case

pytestmark = pytest.mark.gpu

HEAD_DIMS = (64, 128)


BOXED = specs.boxed_where("varlen")  # forward and backward (atomic dQ) with bulk copies


def _module_specs():
    from cuflash import plan

    calls = [(options.get("causal", False),
              replace(plan.mod_flags(options.get("window"), options.get("softcap"),
                                     options.get("alibi"), options.get("sinks") or None,
                                     options.get("causal", False)), varlen=True))
             for options in ALONE.values()]
    return gh.hopper_specs(calls, HEAD_DIMS, (BOXED,))


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


@pytest.fixture
def boxed_varlen():
    yield from gh.hopper_selector_with_knob("select_forward", BOXED,
                                            "the TMA forward is a Hopper kernel")


@pytest.fixture
def boxed_varlen_backward(boxed_varlen):
    """The packed forward and the packed backward (atomic dQ) both boxed."""
    yield from gh.selector_with_knob("select_backward", BOXED)


def _packed_shape(case: Case):
    from cuflash import plan

    flags = replace(plan.mod_flags(case.window, case.softcap, case.alibi, case.sinks or None,
                                   case.causal), varlen=True)
    return plan.Shape(1, 100, 100, case.heads_kv * case.group, case.heads_kv, case.head_dim,
                      varlen_tests._dtype_name(case), case.causal, flags, 100, 100)


def _assert_boxed(case: Case):
    from cuflash import launch

    spec = launch.forward_plan(_packed_shape(case), 0).kernel.spec
    assert specs.loads_with_tma(spec) and spec.mods.varlen, spec.name


def _assert_backward_boxed(case: Case):
    from cuflash import launch

    spec = launch.backward_plan(_packed_shape(case), 0, False).main.spec
    assert specs.loads_with_tma(spec) and spec.mods.varlen, spec.name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("which", ALONE, ids=list(ALONE))
def test_mixed_layout_matches_reference(boxed_varlen, which, head_dim, dtype):
    case = Case(lengths=varlen_tests.LAYOUT, heads_kv=2, group=3, head_dim=head_dim,
                causal=False, scale=head_dim ** -0.5, dtype=varlen_tests.DTYPES[dtype],
                seed=head_dim + len(which))
    case = replace(case, **ALONE[which])
    _assert_boxed(case)
    varlen_tests.check_case(case, f"tma {which} d{head_dim} {dtype}",
                            deterministic_modes=(False,))


@pytest.mark.parametrize("d, causal", [(128, True), (64, False), (128, False)])
def test_equal_lengths_equal_the_dense_tma_forward(boxed_varlen, d, causal):
    """test_gpu_varlen's equal-lengths check with the packed forward boxed: o, m and l bitwise
    equal to the dense call's (the selected TMA forward), though each box past a sequence
    reads the next one's rows; the gradients as that test asks."""
    varlen_tests.test_equal_lengths_equal_the_dense_kernels(d, causal)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_rows_outside_a_sequence_never_reach_the_boxed_forward(boxed_varlen, head_dim, causal):
    """test_gpu_varlen's isolation check with the packed forward boxed: its boxes read the
    NaN / inf rows past each judged sequence, and the kernel zeroes a sequence's last V tile
    past its end before P V (flash_fwd_sm90_ws.cu's kTailZero)."""
    case = Case(lengths=varlen_tests.ISOLATION, heads_kv=2, group=2, head_dim=head_dim,
                causal=causal, scale=head_dim ** -0.5, dtype=varlen_tests.DTYPES["bfloat16"],
                seed=0)
    _assert_boxed(case)
    varlen_tests.check_isolated(head_dim, causal, f"tma d{head_dim} causal={causal}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("which", ALONE, ids=list(ALONE))
def test_mixed_layout_boxed_backward_matches_reference(boxed_varlen_backward, which, head_dim,
                                                        dtype):
    """The packed backward boxed (atomic dQ): its key tiles and last query tiles run past
    their sequences, zeroed there before the products."""
    case = Case(lengths=varlen_tests.LAYOUT, heads_kv=2, group=3, head_dim=head_dim,
                causal=False, scale=head_dim ** -0.5, dtype=varlen_tests.DTYPES[dtype],
                seed=head_dim + len(which) + 1)
    case = replace(case, **ALONE[which])
    _assert_boxed(case)
    _assert_backward_boxed(case)
    varlen_tests.check_case(case, f"tma bwd {which} d{head_dim} {dtype}",
                            deterministic_modes=(False,))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_rows_outside_a_sequence_never_reach_the_boxed_backward(boxed_varlen_backward,
                                                                head_dim, causal):
    """check_isolated with both passes boxed: Q and dO rows past a sequence (whose lse2 and
    delta are 0, unmasked) and K / V rows past it must all be zeros by the products."""
    case = Case(lengths=varlen_tests.ISOLATION, heads_kv=2, group=2, head_dim=head_dim,
                causal=causal, scale=head_dim ** -0.5, dtype=varlen_tests.DTYPES["bfloat16"],
                seed=0)
    _assert_backward_boxed(case)
    varlen_tests.check_isolated(head_dim, causal, f"tma bwd d{head_dim} causal={causal}")

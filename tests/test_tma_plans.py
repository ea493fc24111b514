"""The plans tests/test_gpu_tma.py asserts, made on the CPU with a Hopper's facts: each GPU
test's own assertion helper, under its fixture's selector patch, must find the kernel the
test says it runs (a TMA forward or backward, a 12-warp head_dim 256 tile, a cluster of two).
Session 29 spent two GPU calls on ten such assertions that could not hold (widths in the
8-warp d96 bucket; the windowed deterministic backward, which keeps the portable kernels):
the kernels had not failed."""

from __future__ import annotations

import pytest

from cuflash import fastpath, launch, specs

import test_gpu_modifiers as mods_tests
import test_gpu_tma as tma_tests

_HOPPER = specs.DeviceFacts("stand-in H100", "sm_90", 132, 227 * 1024)


@pytest.fixture(autouse=True)
def hopper(monkeypatch):
    monkeypatch.setattr(launch, "device_facts", lambda index: _HOPPER)
    fastpath.forget_planned_calls()
    yield
    fastpath.forget_planned_calls()


@pytest.mark.parametrize("loop", tma_tests.LOOPS)
def test_forward_tests_plan_a_tma_kernel(loop):
    knob = lambda spec: tma_tests._tma(spec, loop, _HOPPER)  # noqa: E731 (the fixture's)
    with fastpath.selector_patched("select_forward", knob):
        for seqlen_q, seqlen_k in tma_tests.LENGTHS:
            for head_dim in (64, 128):
                for case in tma_tests.CASES:
                    tma_tests._assert_planned_with_tma(
                        seqlen_q, seqlen_k, head_dim, tma_tests._forward_dtype(head_dim, seqlen_q),
                        case[1], mods_tests._flags(case))
        for head_dim in tma_tests.WIDTHS:
            for causal in (False, True):
                tma_tests._assert_planned_with_tma(200, 333, head_dim, "bfloat16", causal)


def test_backward_tests_plan_a_tma_kernel():
    knob = lambda spec: specs.with_backward_tma(spec) or spec  # noqa: E731 (tma_bwd's)
    with fastpath.selector_patched("select_backward", knob):
        for case in tma_tests.CASES:
            tma_tests._assert_backward_planned_with_tma(64, "bfloat16", case[1],
                                                        mods_tests._flags(case), False)
        for case in tma_tests.D128_BACKWARD_CASES:
            for dtype in ("float16", "bfloat16"):
                tma_tests._assert_backward_planned_with_tma(
                    128, dtype, case[1], mods_tests._flags(case), tma_tests._d128_boxed_mode(case))


@pytest.mark.parametrize("block_n, boxed", tma_tests.D256_TILES)
def test_d256_tests_plan_their_tile(block_n, boxed):
    knob = lambda spec: tma_tests._ws_d256(spec, block_n, boxed)  # noqa: E731 (ws_d256's)
    with fastpath.selector_patched("select_forward", knob):
        for case in tma_tests.D256_CASES:
            for seqlen_q, seqlen_k in tma_tests.LENGTHS:
                tma_tests._assert_d256_tile(case, seqlen_q, seqlen_k, block_n, boxed)


@pytest.mark.parametrize("head_dim", [128, 256])
def test_cluster_tests_plan_pairs(head_dim):
    with fastpath.selector_patched("select_forward", tma_tests._cluster_knob):
        for case in tma_tests.CLUSTER_CASES:
            for seqlen_q, seqlen_k in tma_tests.CLUSTER_LENGTHS:
                tma_tests._assert_paired(case, seqlen_q, seqlen_k, head_dim)


def _packed_case(head_dim: int, dtype: str):
    """test_gpu_varlen_tma's mixed layout (its tests' shapes plan as this one does)."""
    import test_gpu_varlen_tma as varlen_tma

    return varlen_tma.Case(lengths=varlen_tma.varlen_tests.LAYOUT, heads_kv=2, group=3,
                           head_dim=head_dim, causal=False, scale=0.1,
                           dtype=varlen_tma.varlen_tests.DTYPES[dtype], seed=0)


def test_packed_tma_tests_plan_a_tma_kernel():
    """tests/test_gpu_varlen_tma.py's plan assertion, for each of its cases."""
    import test_gpu_varlen_tma as varlen_tma
    from dataclasses import replace

    with fastpath.selector_patched("select_forward", varlen_tma.BOXED):
        for which, options in varlen_tma.ALONE.items():
            for head_dim in varlen_tma.HEAD_DIMS:
                for dtype in ("float16", "bfloat16"):
                    varlen_tma._assert_boxed(replace(_packed_case(head_dim, dtype), **options))


def test_packed_tma_backward_tests_plan_tma_kernels():
    """test_gpu_varlen_tma.py's backward and isolation tests: both passes boxed."""
    import test_gpu_varlen_tma as varlen_tma
    from dataclasses import replace

    with fastpath.selector_patched("select_forward", varlen_tma.BOXED), \
            fastpath.selector_patched("select_backward", varlen_tma.BOXED):
        for head_dim in varlen_tma.HEAD_DIMS:
            for dtype in ("float16", "bfloat16"):
                case = _packed_case(head_dim, dtype)
                for options in varlen_tma.ALONE.values():
                    varlen_tma._assert_boxed(replace(case, **options))
                    varlen_tma._assert_backward_boxed(replace(case, **options))
            for causal in (False, True):
                iso = replace(case, lengths=varlen_tma.varlen_tests.ISOLATION, causal=causal)
                varlen_tma._assert_backward_boxed(iso)


def test_dropout_candidate_tests_plan_their_kernels():
    """test_gpu_dropout_candidates.py: under its fixtures every case plans the candidate it
    asserts (a boxed forward, a boxed warp-specialized backward; two consumers at d64)."""
    import test_gpu_dropout_candidates as drop

    from cuflash.registry import bwd90_warp_specialized

    with fastpath.selector_patched("select_forward", drop.BOXED), \
            fastpath.selector_patched("select_backward", drop.BOXED):
        for case in drop.CASES:
            for head_dim in drop.HEAD_DIMS:
                forward, backward = drop._picked(case, "bfloat16", head_dim)
                assert specs.loads_with_tma(forward), forward.name
                assert not bwd90_warp_specialized(backward) or \
                    specs.loads_with_tma(backward), backward.name
    with fastpath.selector_patched("select_forward", specs.with_dropout_on_two_consumers):
        for case in drop.CASES:
            forward, _ = drop._picked(case, "bfloat16", 64)
            assert (forward.block_m, forward.warps) == (128, 12), forward.name


def test_candidate_knobs_leave_other_specs_alone():
    """specs.boxed_where boxes only specs with its modifier on (the backward with atomic dQ
    only); with_dropout_on_two_consumers moves only the 192-row forward with dropout."""
    plain = specs.select_forward(_HOPPER, "bfloat16", 64, False)
    dropped = specs.select_forward(_HOPPER, "bfloat16", 64, False,
                                   mods=specs.ModFlags(dropout=True))
    assert specs.boxed_where("varlen")(dropped) == dropped
    assert specs.loads_with_tma(specs.boxed_where("dropout")(dropped))
    ordered = specs.select_backward(_HOPPER, "bfloat16", 128, False, True,
                                    mods=specs.ModFlags(dropout=True))
    assert ordered.dq_ordered and specs.boxed_where("dropout")(ordered) == ordered
    assert specs.with_dropout_on_two_consumers(plain) == plain
    assert dropped.block_m == 192  # (causal d64 dropout already runs 128 rows)
    moved = specs.with_dropout_on_two_consumers(dropped)
    assert (moved.block_m, moved.warps) == (128, 12)

"""The Hopper backward's bulk dQ adds (flash_bwd_sm90_ws.cu with CF_DQ_BULK, spec.dq_tiled):
on sm_90 the plans pick them for 16-bit head_dim 64 and 128, atomic and deterministic
(ordered: the turn agent issues the adds); every bulk add stays inside its own 64 x 64 piece
of the tiled accumulator, the gradients match the float64 reference, and the deterministic
mode repeats bit for bit. The ordered mode runs again with two pieces a warpgroup
(``CF_DQ_PIECES=2``, a knob the selector does not set yet), and the atomic mode with the
pieces added by vector reductions from registers (``CF_DQ_RED4``), at head_dim 256 on the
head-dim split too, and the ordered mode with those reductions inside its turns.

The guard: the call runs on a workspace laid out as the plan's, with 64 KiB of -0.0 floats
inserted right after the dQ accumulator (nothing else writes there: the preprocess zeroes
only the pieces, the memset starts after the guard). A bulk add that strays past the last
piece (one added into the next region before the fix: head_dim 64's 128-row query tile whose
second 64 rows lie past seqlen_q has no piece) turns -0.0 + 0.0 into +0.0. The gradients
are then checked against the float64 reference, GQA splits and causal or not included.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cuflash import launch, plan, reference

try:
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu

_GUARD = 64 * 1024


def _guarded(scratch: plan.Workspace) -> plan.Workspace:
    """``scratch`` with _GUARD bytes after the dQ accumulator (the regions after it move up;
    the launcher's memset starts past the guard, at ``dq_accum_bytes``)."""
    def moved(offset):
        return None if offset is None else offset + _GUARD

    return replace(scratch, dk_accum=moved(scratch.dk_accum), dv_accum=moved(scratch.dv_accum),
                   dq_semaphore=moved(scratch.dq_semaphore), delta=scratch.delta + _GUARD,
                   lse2=scratch.lse2 + _GUARD, zeroed_bytes=scratch.zeroed_bytes + _GUARD,
                   total_bytes=scratch.total_bytes + _GUARD,
                   dq_accum_bytes=scratch.dq_accum_bytes + _GUARD)


# (head_dim, mode): the warp-specialized kernel at 64 / 128 in every mode; the head-dim split
# at 256 (its tiled accumulator serves the atomic mode only); "red4": the vector reductions
# from registers into the same pieces (CF_DQ_RED4, specs.with_dq_red4), session 40
MODES = [(d, m) for d in (64, 128)
         for m in ("atomic", "red4", "ordered", "ordered_2pieces", "ordered_red4")]
MODES += [(256, "atomic"), (256, "red4")]


@pytest.mark.parametrize("seqlen_q", [130, 200, 64])
@pytest.mark.parametrize("heads_kv", [4, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim, mode", MODES, ids=[f"d{d}-{m}" for d, m in MODES])
def test_bulk_dq_stays_in_its_pieces_and_matches_reference(head_dim, mode, seqlen_q, heads_kv,
                                                          causal):
    import cupy

    import cuflash
    from cuflash import specs

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("the bulk dQ adds are in the Hopper backward")
    deterministic, pieces = mode.startswith("ordered"), 2 if mode.endswith("2pieces") else 1
    dtype, batch, heads, seqlen_k = "bfloat16", 2, 4, 177
    rng = gh.rng_for()
    q, k, v = gh.random_qkv(rng, batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                            heads=heads, heads_kv=heads_kv, head_dim=head_dim, dtype=dtype)
    do = gh.randn(rng, q.shape, dtype)
    gq, gk, gv, gdo = (gh.to_gpu(x) for x in (q, k, v, do))
    o, stats = cuflash.attention_forward(gq, gk, gv, causal=causal)
    shape = plan.Shape(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype, causal,
                       plan.mod_flags(None, None, None, None, causal))
    p = launch.backward_plan(shape, 0, deterministic)
    assert p.main.spec.dq_tiled and p.main.spec.dq_ordered == deterministic, p.main.spec.name
    if pieces == 2:  # the knob, not selected yet: two pieces a warpgroup (CF_DQ_PIECES)
        p = replace(p, main=replace(p.main, spec=p.main.spec.with_knobs(CF_DQ_PIECES=2)))
    if mode == "atomic":  # the staged bulk adds, where the selection reduces from registers
        p = replace(p, main=replace(p.main, spec=gh.staged_bulk_dq(p.main.spec)))
    if mode.endswith("red4"):  # (ordered: reduced inside the turns)
        p = replace(p, main=replace(p.main, spec=specs.with_dq_red4(p.main.spec)))
        assert dict(p.main.spec.knobs).get("CF_DQ_RED4"), p.main.spec.name
    p = replace(p, scratch=_guarded(p.scratch))
    scale = 1.0 / np.sqrt(head_dim)

    def run():
        workspace = cupy.empty(p.scratch.total_bytes, np.uint8)
        guard = workspace[p.scratch.dq_accum_bytes - _GUARD:
                          p.scratch.dq_accum_bytes].view(np.uint32)
        guard.fill(0x80000000)  # -0.0: any bulk add of a float, +0.0 included, changes its bits
        grads = [launch._empty(x.shape, x.dtype, dtype) for x in (gq, gk, gv)]
        for g in grads:
            g.view(np.uint16).fill(0x7fc1)  # poisoned: NaN in both 16-bit types
        launch.run_backward(p, *(launch.cupy_operand(x) for x in (gdo, gq, gk, gv, o)),
                            stats.m.data.ptr, stats.l.data.ptr,
                            *(launch.cupy_operand(x) for x in grads), scale,
                            workspace.data.ptr, launch._current_stream(), 0)
        cupy.cuda.get_current_stream().synchronize()
        changed = int((guard != np.uint32(0x80000000)).sum())
        assert changed == 0, f"{p.main.spec.name}: {changed} guard words past the dQ pieces"
        return grads

    dq, dk, dv = run()
    if deterministic:  # the ordered adds: the same bits again
        for name, first, again in zip(("dq", "dk", "dv"), (dq, dk, dv), run()):
            np.testing.assert_array_equal(gh.to_host(first, dtype), gh.to_host(again, dtype),
                                          err_msg=f"{p.main.spec.name} {name}")

    label = f"{p.main.spec.name} seqlen_q {seqlen_q} heads_kv {heads_kv}"
    o_host = gh.to_host(o, dtype)
    refs = reference.attention_backward_reference(do, q, k, v, causal=causal, o=o_host)
    naives = reference.attention_backward_naive(do, q, k, v, causal=causal,
                                                dtype=gh.np_dtype(dtype))
    magnitude = gh.magnitude(*refs[:3])
    for name, got, ref, naive in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, naives):
        gh.assert_matches_reference(name, gh.to_host(got, dtype), ref, naive, dtype=dtype,
                                    scale=magnitude, label=label)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_red4_dq_on_packed_sequences(head_dim, causal):
    """The vector reductions place packed sequences' pieces by cf_seq.cuh's dq_piece, as the
    bulk adds do (test_gpu_varlen's layout: empty sequences, queries without keys)."""
    from cuflash import fastpath, specs

    gh.hopper_only("the bulk dQ adds are in the Hopper backward")
    try:
        import test_gpu_varlen as varlen_tests
        from test_varlen import Case
    except ImportError:  # tests/ collected as a package
        from tests import test_gpu_varlen as varlen_tests
        from tests.test_varlen import Case
    facts = launch.device_facts(0)
    picked = specs.with_dq_red4(specs.select_backward(facts, "bfloat16", head_dim, causal, False,
                                                      mods=specs.ModFlags(varlen=True)))
    assert dict(picked.knobs).get("CF_DQ_RED4"), picked.name
    case = Case(lengths=varlen_tests.LAYOUT, heads_kv=2, group=3, head_dim=head_dim,
                causal=causal, scale=head_dim ** -0.5, dtype=varlen_tests.DTYPES["bfloat16"],
                seed=head_dim + causal)
    with fastpath.selector_patched("select_backward", specs.with_dq_red4):
        varlen_tests.check_case(case, f"red4 varlen d{head_dim} causal={causal}",
                                deterministic_modes=(False,))

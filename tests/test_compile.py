"""Every kernel spec compiles through NVRTC for sm_75, sm_80, sm_90 and sm_120 with zero spills.

No GPU needed. Per arch: every spec the selector picks at the arch's own shared memory, causal
and not (what a GPU of that arch runs), plus each tile set that only a smaller budget reaches
(``CUFLASH_SMEM_BUDGET``, the GPU tests' budgets) once, in its causal variant: that keeps the
test near 1,300 compiles instead of 1,800 (CI has 2 cores). ``python -m cuflash compile --arch
all --all-budgets`` compiles everything. A failure lists every offending kernel with its
ptxas numbers.
"""


import itertools

import pytest

from cuflash import aot, specs

try:
    from nvrtc_required import require_nvrtc
except ImportError:  # tests/ collected as a package
    from tests.nvrtc_required import require_nvrtc

nvrtc = require_nvrtc()

# Turing (mma.sync m16n8k8, no cp.async), Ampere, Hopper (+ sm_90a wgmma), Blackwell (sm_120:
# the most distinct SASS of the Blackwell family; sm_100 shares sm_90's tile plans).
ARCHS = ["sm_75", "sm_80", "sm_90", "sm_120"]


def _specs_to_compile(arch: str) -> list[specs.KernelSpec]:
    own = {spec.name: spec for spec, _ in aot.compile_work([arch], all_budgets=False)}
    extra = {}
    for spec, _ in aot.compile_work([arch], all_budgets=True):
        tiles = spec.name.removesuffix("_causal")
        if spec.name not in own and (tiles not in extra or spec.causal):
            extra[tiles] = spec
    return [*own.values(), *extra.values()]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_spec_compiles_without_spills(arch):
    work = [(spec, arch) for spec in _specs_to_compile(arch)]
    results = aot.run_parallel(aot.report_one, work, 2, f"compiling {len(work)} specs for {arch}")
    reports = [r for batch in results for r in batch]
    failed = [f"{r.spec}: {r.error}" for r in reports if isinstance(r, aot.CompileFailure)]
    assert not failed, "\n".join(failed)
    compiled = {r.spec for r in reports}
    assert compiled == {spec.name for spec, _ in work}
    limit = specs.ARCH_SMEM_OPTIN[arch]
    bad = [f"{r.spec}/{r.function}: {r.registers} regs, {r.spills} B spilled, "
           f"{r.stack_bytes} B stack, {r.dynamic_smem + r.static_smem} B smem"
           for r in reports
           if r.spills or r.stack_bytes or r.dynamic_smem + r.static_smem > limit]
    assert not bad, f"{len(bad)} of {len(reports)} kernels for {arch}:\n" + "\n".join(bad)


def _assert_compiled_without_spills(work, what: str) -> None:
    """Every (spec, arch) of ``work`` compiles, with no spill and no stack."""
    results = aot.run_parallel(aot.report_one, work, 2, f"compiling {len(work)} {what} specs")
    reports = [r for batch in results for r in batch]
    failed = [f"{r.spec}: {r.error}" for r in reports if isinstance(r, aot.CompileFailure)]
    assert not failed, "\n".join(failed)
    bad = [f"{r.spec}/{r.function}: {r.registers} regs, {r.spills} B spilled, "
           f"{r.stack_bytes} B stack" for r in reports if r.spills or r.stack_bytes]
    assert not bad, f"{len(bad)} of {len(reports)} {what} kernels:\n" + "\n".join(bad)


def _assert_unserialized(spec, arch: str) -> None:
    """ptxas keeps the spec's wgmma asynchronous: no C7519 ("wgmma.mma_async instructions are
    serialized") in its log."""
    from cuflash import compiler

    opts = compiler.nvrtc_options(spec) + [
        f"--gpu-architecture={specs.compile_arch(spec, arch)}", "--ptxas-options=-v"]
    log, _ = compiler._nvrtc_compile(spec, arch, opts)
    assert "C7519" not in log, f"{spec.name}: {log[-600:]}"


def _sm90a_ptx(spec) -> bytes:
    from cuflash import compiler

    _, ptx = compiler._nvrtc_compile(spec, "compute_90a", compiler.nvrtc_options(spec) +
                                     ["--gpu-architecture=compute_90a"], ptx=True)
    return ptx


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_varlen_specs_compile_without_spills(arch):
    """Every spec the arch selects, compiled for packed sequences (CF_VARLEN: cf_seq.cuh's
    offsets and per-sequence lengths): zero spills, like the dense ones."""
    work = aot.compile_work([arch], all_budgets=False, varlen=True)
    assert work and all(spec.mods.varlen and "_varlen" in spec.name for spec, _ in work)
    _assert_compiled_without_spills(work, f"varlen {arch}")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_block_sparse_specs_compile_without_spills(arch):
    """Every spec the arch selects, compiled for block masks (CF_BLOCK_SPARSE: cf_mask.cuh's
    tile cursors; docs/block_sparse.md): zero spills, like the dense ones."""
    work = aot.compile_work([arch], all_budgets=False, block_sparse=True)
    # (the preprocess has no tiles to skip: its spec has no block-sparse form)
    assert work and all(spec.mods.block_sparse and "_block_sparse" in spec.name
                        for spec, _ in work if spec.kind != "bwd_pre")
    _assert_compiled_without_spills(work, f"block-sparse {arch}")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_dropout_specs_compile_without_spills(arch):
    """Every spec the arch selects, compiled for dropout (CF_DROPOUT: cf_philox.cuh's
    Philox mask in the softmax; docs/dropout.md): zero spills, like the dense ones."""
    work = aot.compile_work([arch], all_budgets=False, dropout=True)
    assert work and all("_dropout" in spec.name for spec, _ in work if spec.kind != "bwd_pre")
    _assert_compiled_without_spills(work, f"dropout {arch}")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_device_rng_dropout_specs_compile_without_spills(arch):
    """The same dropout specs reading the seed and offset from device memory
    (CF_DROP_RNG_PTR: jax.jit's words, a CUDA graph's replays): zero spills too."""
    work = aot.compile_work([arch], all_budgets=False, device_rng=True)
    assert work and all(specs.device_rng(spec) for spec, _ in work if spec.kind != "bwd_pre")
    _assert_compiled_without_spills(work, f"device-rng dropout {arch}")


# The Hopper kernels at head_dim 192 (in the registry since 2026-12-03, session 10): the
# selector's specs compile above; here every modifier at once, dropout and packed sequences.
HOPPER_D192 = (dict(kind="fwd90", head_dim=192, block_m=128, block_n=64, warps=8, stages=2),
               dict(kind="bwd90", head_dim=192, block_m=64, block_n=64, warps=8, stages=2,
                    dq_atomic=True, dchunk=192))


def test_hopper_head_dim_192_compiles_without_spills():
    every = specs.ModFlags(window=True, softcap=True, alibi=True, sinks=True)
    work = [(specs.KernelSpec(dtype=dtype, causal=causal, mods=mods, **tiles), "sm_90")
            for tiles in HOPPER_D192
            for dtype, causal, mods in (("bfloat16", False, specs.NO_MODS),
                                        ("bfloat16", True, every),
                                        ("float16", True, specs.ModFlags(dropout=True)),
                                        ("bfloat16", False, specs.ModFlags(varlen=True)))]
    _assert_compiled_without_spills(work, "Hopper d192")


def test_wide_boxed_causal_block_sparse_backward_compiles_without_spills():
    """The d64 causal block-sparse backward on the 12-warp tile boxed, its consumers at 240
    registers (specs.with_wide_boxed_backward, a candidate; registry.BWD90_BOXED_ONLY): fp16
    and bf16, alone and with softcap, ALiBi, sinks or softcap + sinks (the cp.async form
    spills 24-64 B at 232)."""
    facts = specs.facts_for_arch("sm_90")
    knob = specs.with_wide_boxed_backward(facts)
    work = []
    for dtype in ("bfloat16", "float16"):
        for extra in ({}, {"softcap": True}, {"alibi": True}, {"sinks": True},
                      {"softcap": True, "sinks": True}):
            spec = knob(specs.select_backward(facts, dtype, 64, True, False,
                                              mods=specs.ModFlags(block_sparse=True, **extra)))
            assert spec.warps == 12 and specs.loads_with_tma(spec), spec.name
            work.append((spec, "sm_90"))
    _assert_compiled_without_spills(work, "wide boxed causal block-sparse backward")


def test_ordered_bulk_dq_with_two_pieces_compiles_without_spills():
    """The deterministic Hopper backward with two dQ pieces a warpgroup (the knob
    CF_DQ_PIECES=2, not selected yet): d64 and d128, causal and not, plus packed sequences
    and dropout; zero spills, and the shared memory the host computes fits sm_90."""
    base = [specs.KernelSpec(kind="bwd90", dtype=dtype, head_dim=d, block_m=m, block_n=128,
                             warps=12, stages=2, causal=causal, dq_atomic=True, dchunk=d,
                             dq_ordered=True, mods=mods)
            for d, m in ((64, 128), (128, 64))
            for dtype, causal, mods in (("bfloat16", False, specs.NO_MODS),
                                        ("float16", True, specs.NO_MODS),
                                        ("bfloat16", True, specs.ModFlags(varlen=True)),
                                        ("bfloat16", False, specs.ModFlags(dropout=True)))]
    work = [(spec.with_knobs(CF_DQ_BULK=1, CF_DQ_PIECES=2), "sm_90") for spec in base]
    assert all(spec.smem_bytes <= specs.ARCH_SMEM_OPTIN["sm_90"] for spec, _ in work)
    _assert_compiled_without_spills(work, "two-piece ordered bulk dQ")


def test_overlapped_hopper_forward_compiles_unserialized_without_spills():
    """The 8-warp Hopper forward with CF_FWD_OVERLAP 1 / 2 / 3 (softmax beside P V; 3, with
    mbarriers, not yet run on a GPU) at head_dim 192 and 256, plain, causal, modified, packed,
    dropout and block-sparse: zero spills, the shared memory the host computes fits sm_90,
    and ptxas keeps its wgmma asynchronous (no C7519 "wgmma.mma_async instructions are
    serialized")."""
    facts = specs.facts_for_arch("sm_90")
    mod_sets = (specs.NO_MODS, specs.ModFlags(softcap=True, alibi=True),
                specs.ModFlags(window=True), specs.ModFlags(varlen=True),
                specs.ModFlags(dropout=True), specs.ModFlags(block_sparse=True))
    work = []
    for d in (192, 256):
        for causal in (False, True):
            for mods in mod_sets:
                spec = specs.select_forward(facts, "bfloat16", d, causal, mods=mods)
                assert spec.kind == "fwd90" and spec.warps == 8, spec.name
                work.append((spec.with_knobs(CF_FWD_OVERLAP=1), "sm_90"))
                if not (d == 256 and causal and mods.dropout):  # value 2 spills 8 B there
                    work.append((spec.with_knobs(CF_FWD_OVERLAP=2), "sm_90"))
                work.append((spec.with_knobs(CF_FWD_OVERLAP=3), "sm_90"))
    assert all(spec.smem_bytes <= specs.ARCH_SMEM_OPTIN["sm_90"] for spec, _ in work)
    _assert_compiled_without_spills(work, "overlapped forward")
    for spec, arch in work[:9]:  # the serialization advisory (plain and modified)
        _assert_unserialized(spec, arch)


def test_head_dim_v_pairs_compile_unserialized_without_spills():
    """v's own head_dim (issue #15's pairs; specs.select_forward_pair / select_backward_pair):
    the forward and the role-split backward selected for (192, 128), (256, 128) and (64, 128),
    plain, causal, with softcap + ALiBi, a window, packed sequences or dropout: zero spills,
    the shared memory fits sm_90, and no C7519 (the backward's warpgroups issue dK and dV
    products of different widths behind a warp-uniform branch)."""
    facts = specs.facts_for_arch("sm_90")
    mod_sets = (specs.NO_MODS, specs.ModFlags(softcap=True, alibi=True),
                specs.ModFlags(window=True), specs.ModFlags(varlen=True),
                specs.ModFlags(dropout=True))
    work = []
    for d, dv in ((192, 128), (256, 128), (64, 128)):
        for causal in (False, True):
            for mods in mod_sets:
                work.append((specs.select_forward_pair(facts, "bfloat16", d, dv, causal,
                                                       mods=mods), "sm_90"))
                if d >= 192:
                    work.append((specs.select_backward_pair(facts, "bfloat16", d, dv, causal,
                                                            False, mods=mods), "sm_90"))
    assert all(spec.head_dim_v for spec, _ in work)
    assert all(spec.smem_bytes <= specs.ARCH_SMEM_OPTIN["sm_90"] for spec, _ in work)
    _assert_compiled_without_spills(work, "head_dim_v pair")
    for spec, arch in work[:4] + [w for w in work if w[0].kind == "bwd90"][:4]:
        _assert_unserialized(spec, arch)


def test_tma_kernels_compile_unserialized_without_spills():
    """The warp-specialized forward and backward loading with bulk tensor copies
    (CF_FWD_TMA=1 / CF_BWD_TMA=1, candidates, specs.with_forward_tma / with_backward_tma) at
    head_dim 64 and 128: as selected (persistent or not; atomic and ordered dQ), plain,
    causal, each score modifier, dropout and block masks, the forward's pipeline across
    tiles (CF_FWD_PERSISTENT=2) and its clusters of two (CF_FWD_CLUSTER=2): zero spills, no
    C7519, and the copy instruction is there."""
    facts = specs.facts_for_arch("sm_90")
    mod_sets = (specs.NO_MODS, specs.ModFlags(window=True), specs.ModFlags(softcap=True),
                specs.ModFlags(alibi=True, sinks=True), specs.ModFlags(dropout=True),
                specs.ModFlags(block_sparse=True))
    work = []
    for d in (64, 128):
        for causal in (False, True):
            for mods in mod_sets:
                spec = specs.select_forward(facts, "bfloat16", d, causal, mods=mods)
                work.append((specs.with_forward_tma(spec), "sm_90"))
            across = specs.with_forward_across_tiles(
                specs.select_forward(facts, "float16", d, causal), facts)
            work.append((specs.with_forward_tma(across), "sm_90"))
            for deterministic in (False, True):  # the backward's (CF_BWD_TMA)
                for mods in mod_sets:
                    if deterministic and mods.block_sparse:
                        continue
                    back = specs.with_backward_tma(specs.select_backward(
                        facts, "float16", d, causal, deterministic, mods=mods))
                    if back is not None:
                        work.append((back, "sm_90"))
    for mods in mod_sets:  # clusters of two sharing K / V (CF_FWD_CLUSTER=2)
        paired = specs.with_forward_cluster(specs.select_forward(facts, "bfloat16", 128, False,
                                                                 mods=mods))
        assert (paired is None) == bool(mods.window or mods.block_sparse)
        if paired is not None:
            work.append((paired, "sm_90"))
    assert specs.with_forward_cluster(specs.select_forward(facts, "bfloat16", 64, False)) is None
    assert specs.with_forward_cluster(specs.select_forward(facts, "bfloat16", 128, True)) is None
    for d in (64, 128):  # packed sequences (candidates: one map over every row)
        for causal in (False, True):
            for mods in (specs.ModFlags(varlen=True), specs.ModFlags(varlen=True, window=True)):
                packed = specs.select_forward(facts, "bfloat16", d, causal, mods=mods)
                work.append((specs.with_forward_tma(packed), "sm_90"))
                persistent = packed.with_knobs(CF_FWD_PERSISTENT=1)  # uniform lengths
                work.append((specs.with_forward_tma(persistent), "sm_90"))
                for dtype in ("bfloat16", "float16"):  # the packed backward, atomic dQ
                    back = specs.with_backward_tma(specs.select_backward(
                        facts, dtype, d, causal, False, mods=mods))
                    work.append((back, "sm_90"))
    for mods in (specs.ModFlags(varlen=True, alibi=True, sinks=True),
                 specs.ModFlags(varlen=True, softcap=True), specs.ModFlags(varlen=True,
                                                                           dropout=True)):
        for causal in (False, True):
            work.append((specs.with_backward_tma(specs.select_backward(
                facts, "bfloat16", 64, causal, False, mods=mods)), "sm_90"))
    assert specs.with_backward_tma(specs.select_backward(  # ordered dQ: not packed
        facts, "bfloat16", 128, False, True, mods=specs.ModFlags(varlen=True))) is None
    assert sum(spec.kind == "bwd90" for spec, _ in work) >= 30
    assert all(spec is not None and specs.loads_with_tma(spec) for spec, _ in work)
    _assert_compiled_without_spills(work, "TMA")
    for spec, arch in work[:2] + [w for w in work if w[0].kind == "bwd90"][:2] + work[-2:]:
        _assert_unserialized(spec, arch)
        ptx = _sm90a_ptx(spec)
        assert b"cp.async.bulk.tensor.4d" in ptx and b"cp.async.cg" not in ptx, spec.name


def test_head_dim_split_backward_compiles_unserialized_without_spills():
    """The head_dim 192 / 256 backward on 96- / 80-key tiles (flash_bwd_sm90_hsplit.cu, a
    candidate, specs.with_backward_head_dim_split): fp16 / bf16 and the modifier sets it
    serves (plain, causal, each modifier, packed sequences, some pairs), atomic and ordered
    dQ, with the shared memory the host computes: zero spills, no C7519, and the kernel's own
    wgmma shapes in the PTX; the sets it declines (where it spilled, registry.BWD90_HSPLIT, or
    does not serve) get None."""
    facts = specs.facts_for_arch("sm_90")
    served = [(False, specs.NO_MODS), (True, specs.NO_MODS), (False, specs.ModFlags(window=True)),
              (False, specs.ModFlags(softcap=True)), (True, specs.ModFlags(varlen=True)),
              (False, specs.ModFlags(alibi=True, sinks=True, varlen=True))]
    forms = {256: served + [(True, specs.ModFlags(alibi=True)),
                            (False, specs.ModFlags(window=True, softcap=True, varlen=True))],
             192: served + [(False, specs.ModFlags(window=True, softcap=True))]}
    ordered = [(False, specs.NO_MODS), (True, specs.NO_MODS), (True, specs.ModFlags(varlen=True)),
               (False, specs.ModFlags(softcap=True, sinks=True))]
    smem = {256: 201_728, 192: 197_632}
    work = []
    for d, sets in forms.items():
        for dtype in ("float16", "bfloat16"):
            for det, (causal, mods) in [(False, f) for f in sets] + [(True, f) for f in ordered]:
                spec = specs.with_backward_head_dim_split(
                    specs.select_backward(facts, dtype, d, causal, det, mods=mods))
                assert spec is not None and spec.source == "flash_bwd_sm90_hsplit.cu", mods
                assert spec.dq_ordered == det and spec.smem_bytes == smem[d]
                assert spec.smem_bytes <= specs.ARCH_SMEM_OPTIN["sm_90"]
                work.append((spec, "sm_90"))
    _assert_compiled_without_spills(work, "head-dim split backward")
    for spec, shapes in ((work[1][0], (b"m64n40k16", b"m64n80k16")),
                         (work[-1][0], (b"m64n32k16", b"m64n96k16"))):
        _assert_unserialized(spec, "sm_90")
        ptx = _sm90a_ptx(spec)
        assert all(shape in ptx for shape in shapes), spec.name
    declined = [(256, False, specs.ModFlags(softcap=True, alibi=True)),
                (256, True, specs.ModFlags(softcap=True, alibi=True)),
                (256, False, specs.ModFlags(dropout=True)),
                (256, False, specs.ModFlags(block_sparse=True)),
                (192, True, specs.ModFlags(alibi=True)), (192, True, specs.ModFlags(softcap=True))]
    for d, causal, mods in declined:
        assert specs.with_backward_head_dim_split(
            specs.select_backward(facts, "bfloat16", d, causal, False, mods=mods)) is None


def test_head_dim_split_vector_reductions_compile_without_spills():
    """dQ by vector reductions from registers into the tiled accumulator (CF_DQ_RED4,
    specs.with_dq_red4; selected at 192 and 256 by registry.BWD90_DQ_RED4, at 256 beside each
    warpgroup's own dO panels, CF_HSPLIT_DO_OWN): zero spills under every modifier set the
    selection gives them, red.global.add.v4.f32 in place of the bulk adds; the sets where they
    spilled keep the staging / the shared dO loads."""
    facts = specs.facts_for_arch("sm_90")
    names = ("window", "softcap", "alibi", "varlen", "sinks")
    work = []
    for d in (256, 192):
        for causal in (False, True):
            for n in range(4):
                for combo in itertools.combinations(names, n):
                    mods = specs.ModFlags(**{name: True for name in combo})
                    spec = specs.with_dq_red4(specs.with_bulk_dq(specs.select_backward(
                        facts, "bfloat16", d, causal, False, mods=mods), facts))
                    if dict(spec.knobs).get("CF_DQ_RED4"):
                        work.append((spec, "sm_90"))
    assert len(work) > 60, len(work)
    _assert_compiled_without_spills(work, "head-dim split backward, vector dQ reductions")
    selected = specs.select_backward(facts, "bfloat16", 256, False, False)
    assert dict(selected.knobs).get("CF_DQ_RED4") == 2, selected.name
    assert dict(selected.knobs).get("CF_HSPLIT_DO_OWN") == 1, selected.name
    at_192 = specs.select_backward(facts, "bfloat16", 192, True, False)
    assert dict(at_192.knobs).get("CF_DQ_RED4") == 1, at_192.name
    spilled = specs.select_backward(facts, "bfloat16", 256, False, False,
                                    mods=specs.ModFlags(softcap=True, varlen=True))
    assert not dict(spilled.knobs).get("CF_HSPLIT_DO_OWN"), spilled.name
    ptx = _sm90a_ptx(selected)
    assert b"red.global.add.v4.f32" in ptx and b"cp.reduce.async.bulk" not in ptx
    declined = specs.with_dq_red4(specs.with_bulk_dq(specs.select_backward(
        facts, "bfloat16", 192, False, False, mods=specs.ModFlags(window=True, alibi=True)),
        facts))
    assert not dict(declined.knobs).get("CF_DQ_RED4"), declined.name


def test_head_dim_split_bulk_dq_compiles_without_spills():
    """The head-dim split with dQ by bulk reduce-adds (CF_DQ_BULK through specs.with_bulk_dq,
    a candidate): half a 16 KB piece of staging a warpgroup on top of the shared memory, zero
    spills, no C7519, the bulk reduce-add in the PTX in place of dQ's vector atomics (dK / dV's
    are scalar); the ordered mode and the set where it spilled keep the atomic adds."""
    facts = specs.facts_for_arch("sm_90")
    sets = [(False, specs.NO_MODS), (True, specs.NO_MODS), (True, specs.ModFlags(varlen=True)),
            (False, specs.ModFlags(softcap=True)), (False, specs.ModFlags(window=True))]
    smem = {256: 201_728 + 2 * 8192, 192: 197_632 + 3 * 8192}
    work = []
    for d in (256, 192):
        for dtype, (causal, mods) in zip(("bfloat16", "float16") * 3, sets):
            base = specs.with_backward_head_dim_split(
                specs.select_backward(facts, dtype, d, causal, False, mods=mods))
            # (the staged adds: the selection's vector reductions at 256 taken off)
            spec = specs.with_bulk_dq(base, facts).without_knob("CF_DQ_RED4")
            assert spec.dq_tiled and spec.smem_bytes == smem[d], spec.name
            work.append((spec, "sm_90"))
    _assert_compiled_without_spills(work, "head-dim split backward, bulk dQ")
    _assert_unserialized(work[0][0], "sm_90")
    ptx = _sm90a_ptx(work[0][0])
    assert b"cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32" in ptx
    assert b"red.global.add.v2.f32" not in ptx
    for d, det, mods in ((256, True, specs.NO_MODS),
                         (192, False, specs.ModFlags(window=True, varlen=True))):
        base = specs.with_backward_head_dim_split(
            specs.select_backward(facts, "bfloat16", d, False, det, mods=mods))
        assert not specs.with_bulk_dq(base, facts).dq_tiled, base.name
    for d, causal, mods in ((256, False, specs.ModFlags(window=True)),  # ordered: no window
                            (192, False, specs.ModFlags(softcap=True, alibi=True))):
        assert specs.with_backward_head_dim_split(
            specs.select_backward(facts, "bfloat16", d, causal, True, mods=mods)) is None
    assert specs.with_backward_head_dim_split(
        specs.select_backward(facts, "bfloat16", 128, False, False)) is None
    assert specs.with_backward_head_dim_split(
        specs.select_backward(facts, "float32", 256, False, False)) is None


def test_uniform_packed_persistent_specs_compile_without_spills():
    """Packed sequences of one length take the dense call's persistent blocks
    (plan._persistent_like_dense): those varlen + CF_FWD_PERSISTENT forms, for every modifier
    set of aot.MOD_COMBOS with dropout, fp16 / bf16, causal or not, compile with no spill."""
    from dataclasses import replace

    from cuflash import plan

    facts = specs.DeviceFacts("H200", "sm_90", 132, specs.ARCH_SMEM_OPTIN["sm_90"])
    combos = [replace(m, varlen=True) for m in (*aot.MOD_COMBOS, specs.ModFlags(dropout=True))]
    work = {}
    for d in (64, 128):
        for dtype in ("float16", "bfloat16"):
            for causal in (False, True):
                for mods in combos:
                    for batch, n in ((32, 512), (1, 16384)):
                        shape = plan.Shape(batch, n, n, 16, 16, d, dtype, causal, mods,
                                           total_q=batch * n, total_k=batch * n)
                        spec = plan.plan_forward(shape, facts).kernel.spec
                        if plan.PERSISTENT in dict(spec.knobs):
                            work[spec.name] = (spec, "sm_90")
    assert len(work) >= 12
    _assert_compiled_without_spills(list(work.values()), "uniform packed persistent")


def test_compile_plan_covers_every_tile_set():
    for arch in ARCHS:
        chosen = {s.name.removesuffix("_causal") for s in _specs_to_compile(arch)}
        every = {s.name.removesuffix("_causal") for s, _ in aot.compile_work([arch], True)}
        assert chosen == every, arch


def test_ptxas_log_parser():
    from cuflash.compiler import parse_ptxas_log

    log = """ptxas info    : Compiling entry function 'flash_fwd' for 'sm_90'
ptxas info    : Function properties for flash_fwd
ptxas         .     8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 456 bytes cmem[0]"""
    r = parse_ptxas_log(log)["flash_fwd"]
    assert r == dict(registers=255, stack=8, spill_stores=12, spill_loads=16, smem=1024)


def test_wgmma_header_is_current():
    """cf_wgmma.cuh is generated; a hand edit or a stale copy would drift from its generator."""
    import importlib.util

    from cuflash.compiler import kernels_dir

    path = kernels_dir() / "cf_wgmma_gen.py"
    module_spec = importlib.util.spec_from_file_location("cf_wgmma_gen", path)
    gen = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(gen)
    assert (kernels_dir() / "cf_wgmma.cuh").read_text() == gen.render()

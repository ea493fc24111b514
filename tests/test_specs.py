"""The tile selector as a pure function of device facts: every budget, every head_dim."""

from dataclasses import replace

import pytest

from cuflash import registry, specs
from cuflash.specs import KIB, DeviceFacts, KernelSpec

HEAD_DIMS = list(range(8, 257, 8))


def facts(budget_kib: int) -> DeviceFacts:
    return DeviceFacts(name=f"gpu{budget_kib}k", arch="sm_90", sm_count=132,
                       smem_optin=budget_kib * KIB)


@pytest.mark.parametrize("budget_kib", specs.BUDGETS_KIB)
@pytest.mark.parametrize("dtype", specs.DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_every_head_dim_fits_every_budget(budget_kib, dtype, causal):
    f = facts(budget_kib)
    for head_dim in HEAD_DIMS:
        chosen = [specs.select_forward(f, dtype, head_dim, causal),
                  specs.select_backward(f, dtype, head_dim, causal, deterministic=False),
                  specs.select_backward(f, dtype, head_dim, causal, deterministic=True),
                  specs.select_backward_dq(f, dtype, head_dim, causal)]
        for spec in chosen:
            assert spec.smem_bytes <= budget_kib * KIB, spec.name
            assert spec.head_dim >= head_dim and spec.head_dim % 32 == 0, spec.name
            assert spec.causal == causal and spec.dtype == dtype
            if dtype == "float32":  # SIMT layout constraints of the fp32 kernels
                assert spec.block_m % (4 * spec.warps) == 0 and spec.block_n % 8 == 0
            elif registry.fwd90_warp_specialized(spec):  # + a producer warpgroup
                assert spec.block_m == 16 * (spec.warps - 4)
            elif spec.kind in ("fwd", "fwd90", "bwd_dq"):  # a warp owns 16 query rows
                assert spec.block_m == 16 * spec.warps
            elif spec.kind == "bwd":  # a warp owns 16 keys
                assert spec.block_n == 16 * spec.warps
                assert spec.dchunk <= 128, spec.name
                if dtype == "float32":
                    assert spec.head_dim % spec.dchunk == 0, spec.name
                else:
                    assert spec.dchunk % 64 == 0 or spec.dchunk == spec.head_dim, spec.name


def test_larger_budget_never_picks_smaller_tiles():
    for dtype in specs.DTYPES:
        for head_dim in HEAD_DIMS:
            tiles = [specs.select_forward(facts(b), dtype, head_dim, False)
                     for b in specs.BUDGETS_KIB]
            areas = [t.block_m * t.block_n * t.stages for t in tiles]
            assert areas == sorted(areas), [t.name for t in tiles]


def test_h100_picks_the_wgmma_kernel_for_bf16_d128():
    spec = specs.select_forward(facts(227), "bfloat16", 128, False)
    # warp-specialized, one block per tile (persistent blocks left d128 in session 42),
    # loading with TMA
    assert spec.name == "fwd90_bf16_d128_m128_n128_w12_s3_fwd_tma1"
    assert spec.source == "flash_fwd_sm90_ws.cu" and spec.threads == 384
    assert specs.compile_arch(spec, "sm_90") == "sm_90a"


def test_persistent_forward_selection():
    """Persistent blocks where registry.FWD90_PERSISTENT lists the bucket (d64, causal or
    not; d128 left it in session 42), not on packed sequences or block masks, nor where d64's
    three consumers spill."""
    knob = ("CF_FWD_PERSISTENT", 1)

    def chosen(d, causal, **mods):
        spec = specs.select_forward(facts(227), "bfloat16", d, causal, mods=specs.ModFlags(**mods))
        return knob in spec.knobs

    assert chosen(64, False) and chosen(64, True) and chosen(64, False, alibi=True)
    assert not chosen(128, False) and not chosen(128, True)
    assert not chosen(128, False, softcap=True) and not chosen(128, False, window=True)
    assert not chosen(64, False, varlen=True) and not chosen(128, False, block_sparse=True)
    assert not chosen(64, False, softcap=True) or specs.select_forward(
        facts(227), "bfloat16", 64, False, mods=specs.ModFlags(softcap=True)).block_m != 192
    assert not chosen(192, False) and not chosen(256, False)


def test_forward_across_tiles_fits_a_second_q_buffer():
    """CF_FWD_PERSISTENT=2's tiles: two consumers, the stages that fit beside two Q tiles."""
    f = facts(227)
    d64 = specs.with_forward_across_tiles(specs.select_forward(f, "bfloat16", 64, True), f)
    d128 = specs.with_forward_across_tiles(specs.select_forward(f, "bfloat16", 128, False), f)
    assert (d64.block_m, d64.warps, d64.stages) == (128, 12, 3)
    assert (d128.block_m, d128.warps, d128.stages) == (128, 12, 2)
    for spec in (d64, d128):
        assert ("CF_FWD_PERSISTENT", 2) in spec.knobs
        q, kv = 128 * spec.head_dim * 2, spec.block_n * spec.head_dim * 2
        assert spec.smem_bytes == 2 * q + 2 * spec.stages * kv + 128 <= f.smem_optin
    assert specs.with_forward_across_tiles(
        specs.select_forward(f, "bfloat16", 128, False, mods=specs.ModFlags(block_sparse=True)),
        f) is None
    assert specs.with_forward_across_tiles(specs.select_forward(f, "bfloat16", 256, False),
                                           f) is None


def test_h100_picks_the_warp_specialized_backward_at_d64_and_d128():
    for d, block_m in ((64, 128), (128, 64)):
        for causal in (False, True):
            spec = specs.select_backward(facts(227), "bfloat16", d, causal, False, wgmma=True)
            assert (spec.kind, spec.warps, spec.block_m) == ("bwd90", 12, block_m)
            assert spec.source == "flash_bwd_sm90_ws.cu" and spec.threads == 384
    spec = specs.select_backward(facts(227), "bfloat16", 256, False, False, wgmma=True)
    assert spec.source == "flash_bwd_sm90_hsplit.cu"  # 256: the head-dim split, 8 warps


def test_wgmma_only_on_sm90_and_only_whole_panels():
    a100 = DeviceFacts(name="a100", arch="sm_80", sm_count=108, smem_optin=163 * KIB)
    assert specs.select_forward(a100, "bfloat16", 128, False).name == "fwd_bf16_d128_m128_n64_w8_s2"
    assert specs.select_forward(facts(227), "bfloat16", 96, False).kind == "fwd"
    assert specs.select_forward(facts(227), "float32", 128, False).kind == "fwd"
    assert specs.select_forward(facts(99), "float16", 64, True).kind == "fwd90"
    assert specs.select_forward(facts(227), "bfloat16", 128, False, wgmma=False).kind == "fwd"


def test_the_selector_reads_no_environment(monkeypatch):
    """The wgmma switch and the budget come in as arguments; the caller reads the environment."""
    from cuflash import config

    monkeypatch.setenv("CUFLASH_DISABLE_WGMMA", "1")
    monkeypatch.setenv("CUFLASH_SMEM_BUDGET", "48K")
    assert specs.select_forward(facts(227), "bfloat16", 128, False).kind == "fwd90"
    assert config.current() == config.Config(smem_budget=48 * KIB, wgmma=False)
    assert not specs.uses_wgmma(facts(227))


def test_names_are_unique_and_canonical():
    all_specs = specs.all_specs(facts(227))
    names = [s.name for s in all_specs]
    assert len(names) == len(set(names))
    causal = specs.select_forward(facts(99), "float16", 40, True)
    assert causal.name.startswith("fwd90_fp16_d64_") and causal.name.endswith("_causal")


def test_spec_defines_match_abi():
    spec = specs.select_backward(facts(163), "bfloat16", 256, True, deterministic=False)
    d = spec.defines
    assert d["CF_DTYPE"] == 1 and d["CF_HEAD_DIM"] == 256 and d["CF_MASK"] == 1
    assert d["CF_DQ_ATOMIC"] == 1 and d["CF_DCHUNK"] == 128
    assert spec.source == "flash_bwd.cu" and spec.entry == "flash_bwd"
    assert specs.select_backward_pre("float32").source == "flash_bwd_pre.cu"
    assert specs.select_forward(facts(48), "float32", 64, False).source == "flash_fwd_fp32.cu"


@pytest.mark.parametrize("bad", [0, 9, 257, 264])
def test_head_dim_outside_support_raises(bad):
    with pytest.raises(ValueError, match="head_dim"):
        specs.head_dim_bucket(bad)


def test_budget_override_env_and_setter(monkeypatch):
    monkeypatch.setenv("CUFLASH_SMEM_BUDGET", "99K")
    assert specs.smem_budget_override() == 99 * KIB
    specs.set_smem_budget(64 * KIB)
    try:
        assert specs.smem_budget_override() == 64 * KIB
    finally:
        specs.set_smem_budget(None)
    monkeypatch.setenv("CUFLASH_SMEM_BUDGET", "12")
    with pytest.raises(ValueError, match="CUFLASH_SMEM_BUDGET"):
        specs.smem_budget_override()
    with pytest.raises(ValueError, match="smem budget"):
        specs.set_smem_budget(1000)


def test_budget_override_only_shrinks():
    f = facts(99).with_budget(227 * KIB)
    assert f.smem_optin == 99 * KIB
    assert facts(227).with_budget(48 * KIB).smem_optin == 48 * KIB


def test_no_budget_fits_raises_with_reason():
    tiny = DeviceFacts("tiny", "sm_90", 1, 8 * KIB)
    with pytest.raises(ValueError, match="no tile configuration fits"):
        specs.select_forward(tiny, "bfloat16", 256, False)


def test_kernel_spec_is_hashable_and_frozen():
    spec = KernelSpec(kind="fwd", dtype="bfloat16", head_dim=64, block_m=64, block_n=64,
                      warps=4, stages=2)
    assert {spec: 1}[spec] == 1
    with pytest.raises(Exception):
        spec.block_m = 32
    with pytest.raises(TypeError):  # keyword construction only: no positional tuples
        KernelSpec("fwd", "bfloat16")


def test_the_deterministic_mode_with_a_window_runs_ordered_dq_where_hopper_has_it():
    """registry._ordered_dq: a window's deterministic backward is the warp-specialized
    kernel with ordered dQ at head_dim 64 / 128 (descending key tiles, no rotation, cp.async:
    BWD90_TMA is the atomic mode's); a block mask, and buckets without that kernel, keep the
    portable kernels and the dQ pass."""
    hopper = facts(227)
    for head_dim in (64, 128):
        for causal in (False, True):
            window = specs.ModFlags(window=True)
            spec = specs.select_backward(hopper, "bfloat16", head_dim, causal, True, mods=window)
            assert specs.bwd90_warp_specialized(spec) and spec.dq_ordered, spec.name
            assert "CF_DQ_ROTATE_KEY_TILES" not in spec.defines, spec.name
            assert not specs.loads_with_tma(spec), spec.name
            atomic = specs.select_backward(hopper, "bfloat16", head_dim, causal, False,
                                           mods=window)
            assert specs.loads_with_tma(atomic) and not atomic.dq_ordered, atomic.name
            sparse = specs.select_backward(hopper, "bfloat16", head_dim, causal, True,
                                           mods=specs.ModFlags(window=True, block_sparse=True))
            assert not sparse.dq_ordered and sparse.deterministic, sparse.name
    for head_dim in (96, 256):
        spec = specs.select_backward(hopper, "bfloat16", head_dim, False, True,
                                     mods=specs.ModFlags(window=True))
        assert not specs.bwd90_warp_specialized(spec), spec.name


def test_dropout_folds_its_scale_into_the_warp_specialized_backward_only():
    """registry.BWD90_DROP_FOLD: the warp-specialized backward with dropout, either mode,
    takes CF_BWD_DROP_FOLD; without dropout, or on another kernel, no knob."""
    hopper = facts(227)
    drop = specs.ModFlags(dropout=True)
    for head_dim in (64, 128):
        for deterministic in (False, True):
            spec = specs.select_backward(hopper, "bfloat16", head_dim, False, deterministic,
                                         mods=drop)
            assert specs.bwd90_warp_specialized(spec), spec.name
            assert dict(spec.knobs).get("CF_BWD_DROP_FOLD") == 1, spec.name
            plain = specs.select_backward(hopper, "bfloat16", head_dim, False, deterministic)
            assert "CF_BWD_DROP_FOLD" not in dict(plain.knobs), plain.name
    for spec in (specs.select_backward(hopper, "bfloat16", 256, False, False, mods=drop),
                 specs.select_backward(facts(99), "bfloat16", 128, False, False, mods=drop),
                 specs.select_backward(hopper, "bfloat16", 128, False, False, mods=drop,
                                       wgmma=False)):
        assert "CF_BWD_DROP_FOLD" not in dict(spec.knobs), spec.name


def test_dropout_drops_packed_p_in_the_warp_specialized_forward_only():
    """registry.FWD90_DROP_PACKED: the warp-specialized Hopper forward with dropout takes
    CF_DROP_PACKED, causal or not, with other modifiers too; without dropout, on the 8-warp
    Hopper forward (head_dim 256) or the portable kernels, no knob."""
    hopper = facts(227)
    for head_dim in (64, 128):
        for causal in (False, True):
            for mods in ({}, {"softcap": True}, {"varlen": True}, {"block_sparse": True}):
                flags = specs.ModFlags(dropout=True, **mods)
                spec = specs.select_forward(hopper, "bfloat16", head_dim, causal, mods=flags)
                assert specs.fwd90_warp_specialized(spec), spec.name
                assert dict(spec.knobs).get("CF_DROP_PACKED") == 1, spec.name
            plain = specs.select_forward(hopper, "bfloat16", head_dim, causal)
            assert "CF_DROP_PACKED" not in dict(plain.knobs), plain.name
    drop = specs.ModFlags(dropout=True)
    for spec in (specs.select_forward(hopper, "bfloat16", 256, False, mods=drop),
                 specs.select_forward(facts(99), "bfloat16", 128, False, mods=drop),
                 specs.select_forward(hopper, "bfloat16", 128, False, mods=drop, wgmma=False)):
        assert "CF_DROP_PACKED" not in dict(spec.knobs), spec.name


def test_rescale_early_applies_to_the_overlapped_hopper_forwards():
    """specs.with_forward_rescale_early: the warp-specialized forward (not its pipeline
    across tiles) and the 8-warp kernel's overlapped loop; None for the plain loop and for
    other kernels. The knob only is added (tiles as selected)."""
    hopper = facts(227)
    for head_dim in (64, 128, 256):
        for causal in (False, True):
            base = specs.select_forward(hopper, "bfloat16", head_dim, causal)
            early = specs.with_forward_rescale_early(base)
            assert early is not None, base.name
            assert dict(early.knobs) == {**dict(base.knobs), "CF_FWD_RESCALE_EARLY": 1}
            assert replace(early, knobs=base.knobs) == base
    plain = specs.select_forward(hopper, "bfloat16", 256, False, mods=specs.ModFlags(
        window=True, softcap=True, alibi=True, sinks=True))
    assert "CF_FWD_OVERLAP" not in dict(plain.knobs), plain.name  # the case the GPU test skips
    assert specs.with_forward_rescale_early(plain) is None
    across = specs.with_forward_across_tiles(
        specs.select_forward(hopper, "bfloat16", 128, False), hopper)
    assert across is not None and specs.with_forward_rescale_early(across) is None
    back = specs.select_backward(hopper, "bfloat16", 128, False, False)
    assert specs.with_forward_rescale_early(back) is None


def test_flag_rings_apply_where_their_kernels_allow():
    """specs.with_drop_ring / with_backward_drop_ring (the candidates behind registry
    FWD90_DROP_RING / BWD90_DROP_RING): only with dropout on the warp-specialized kernels
    loading with TMA; the forward keeps its tile and drops K / V stages until the slots fit;
    the backward declines ordered dQ, block masks and packed sequences."""
    hopper, drop = facts(227), specs.ModFlags(dropout=True)
    for head_dim in (64, 128):
        for causal in (False, True):
            base = specs.select_forward(hopper, "bfloat16", head_dim, causal, mods=drop)
            ring = specs.with_drop_ring(base, hopper, 2)
            assert dict(ring.knobs)["CF_DROP_RING"] == 2, ring.name
            assert (ring.block_m, ring.block_n, ring.warps) == \
                (base.block_m, base.block_n, base.warps), ring.name
            assert ring.smem_bytes <= hopper.smem_optin
            assert ring.stages == (2 if head_dim == 128 else base.stages), ring.name
            # a byte an element a slot, and a second 128 bytes of mbarriers
            assert ring.smem_bytes == (replace(base, stages=ring.stages).smem_bytes
                                       + 2 * base.block_m * base.block_n + 128)
            back = specs.select_backward(hopper, "bfloat16", head_dim, causal, False, mods=drop)
            bring = specs.with_backward_drop_ring(back, hopper, 3)
            assert dict(bring.knobs)["CF_DROP_RING"] == 3, bring.name
            assert bring.smem_bytes <= hopper.smem_optin
            assert specs.with_backward_drop_ring(
                specs.select_backward(hopper, "bfloat16", head_dim, causal, True, mods=drop),
                hopper) is None  # ordered dQ: warp 2 keeps the turns
            for mods in ({"block_sparse": True}, {"varlen": True}):
                flags = specs.ModFlags(dropout=True, **mods)
                assert specs.with_backward_drop_ring(specs.select_backward(
                    hopper, "bfloat16", head_dim, causal, False, mods=flags), hopper) is None
            plain = specs.select_forward(hopper, "bfloat16", head_dim, causal)
            assert specs.with_drop_ring(plain, hopper) is None, plain.name
    # no TMA (d64 causal softcap loads with cp.async), no warp-specialized forward (d256)
    softcap = specs.ModFlags(dropout=True, softcap=True)
    assert specs.with_drop_ring(specs.select_forward(hopper, "bfloat16", 64, True, mods=softcap),
                                hopper) is None
    assert specs.with_drop_ring(specs.select_forward(hopper, "bfloat16", 256, False, mods=drop),
                                hopper) is None
    # not selected until measured
    assert specs.select_forward(hopper, "bfloat16", 64, False, mods=drop) == \
        specs.with_packed_dropout(specs.select_forward(hopper, "bfloat16", 64, False, mods=drop))
    assert not registry.FWD90_DROP_RING and not registry.BWD90_DROP_RING


def test_knobs_are_part_of_the_name_and_the_defines():
    # causal: no rotation knob; without the bulk dQ knob, none at all
    base = specs.select_backward(facts(227), "bfloat16", 128, True, True).without_knob(
        "CF_DQ_BULK")
    tuned = base.with_knobs(CF_BWD_MSUB=16)
    assert tuned.name == base.name + "_bwd_msub16" and tuned != base
    assert tuned.defines == {**base.defines, "CF_BWD_MSUB": 16}
    assert tuned.smem_bytes == base.smem_bytes and tuned.source == base.source
    with pytest.raises(ValueError, match="knobs"):
        base.with_knobs(CF_HEAD_DIM=64)  # the spec's own defines are its fields


def test_ordered_dq_rotates_only_where_all_key_tiles_fit_on_the_gpu():
    """The deterministic Hopper backward without a mask starts its key tiles spread over the
    query tiles only up to half the device's SMs (at most 64) key tiles a head: beyond what
    can be resident at once its blocks would wait for each other in a cycle."""
    def ordered(sm_count, causal=False, mods=specs.NO_MODS):
        f = DeviceFacts(name="h", arch="sm_90", sm_count=sm_count, smem_optin=227 * KIB)
        spec = specs.select_backward(f, "bfloat16", 128, causal, True, mods=mods)
        assert spec.dq_ordered
        return spec.defines.get("CF_DQ_ROTATE_KEY_TILES")

    assert ordered(132) == 64 and ordered(114) == 57 and ordered(16) == 8
    assert ordered(0) is None  # no SM count known: the kernel's default, never
    assert ordered(132, causal=True) is None
    assert ordered(132, mods=specs.ModFlags(window=True)) is None
    assert ordered(132, mods=specs.ModFlags(varlen=True)) is None
    atomic = specs.select_backward(DeviceFacts(name="h", arch="sm_90", sm_count=132,
                                               smem_optin=227 * KIB), "bfloat16", 128, False,
                                   False)
    assert "CF_DQ_ROTATE_KEY_TILES" not in atomic.defines


def test_every_registry_tile_says_why():
    from cuflash import registry

    for variant in registry.VARIANTS:
        for bucket, tiles in variant.tiles.items():
            assert tiles, (variant.kind, bucket)
            assert all(t.why for t in tiles), (variant.kind, bucket)


# -- which GPUs -------------------------------------------------------------------------------

def _gpu(arch: str, smem_kib: int, name: str = "gpu") -> DeviceFacts:
    return DeviceFacts(name=name, arch=arch, sm_count=40, smem_optin=smem_kib * KIB)


@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100",
                                  "sm_103", "sm_110", "sm_120", "sm_121"])
def test_every_gpu_with_ldmatrix_mma_is_accepted(arch, monkeypatch):
    monkeypatch.delenv("CUFLASH_FORCE_ARCH", raising=False)
    assert specs.arch_unsupported_reason(arch) is None
    f = _gpu(arch, specs.ARCH_SMEM_OPTIN.get(arch, 227 * KIB) // KIB)
    assert specs.usable_facts(f) == f
    spec = specs.select_forward(f, "float16", 128, True)
    assert spec.kind == ("fwd90" if arch == "sm_90" else "fwd")  # wgmma stays sm_90a-only
    assert spec.smem_bytes <= f.smem_optin


@pytest.mark.parametrize("arch", ["sm_70", "sm_61", "sm_52"])
def test_pre_turing_is_refused_with_the_reason(arch):
    assert "7.5" in specs.arch_unsupported_reason(arch)
    with pytest.raises(RuntimeError, match=f"{arch} is older than Turing"):
        specs.usable_facts(_gpu(arch, 96, name="V100"))


def test_arch_name_must_be_sm_and_a_number():
    for bad in ("90", "sm90", "sm_9x", "compute_90"):
        with pytest.raises(ValueError, match="arch: expected 'sm_'"):
            specs.arch_number(bad)


def test_turing_plans_fp16_fp32_in_64k_and_refuses_bf16():
    t4 = _gpu("sm_75", 64, name="Tesla T4")
    assert specs.arch_dtypes("sm_75") == ("float16", "float32")
    for dtype in ("float16", "float32"):
        for head_dim in HEAD_DIMS:
            for spec in (specs.select_forward(t4, dtype, head_dim, True),
                         specs.select_backward(t4, dtype, head_dim, True, False),
                         specs.select_backward_dq(t4, dtype, head_dim, False)):
                assert spec.kind in ("fwd", "bwd", "bwd_dq") and spec.smem_bytes <= 64 * KIB
    calls = [lambda: specs.select_forward(t4, "bfloat16", 64, False),
             lambda: specs.select_backward(t4, "bfloat16", 64, False, False),
             lambda: specs.select_backward_dq(t4, "bfloat16", 64, False),
             lambda: specs.select_backward_pre("bfloat16", t4)]
    for call in calls:
        with pytest.raises(ValueError, match="bfloat16 needs compute capability 8.0.*Tesla T4"):
            call()
    assert {s.dtype for s in specs.all_specs(specs.facts_for_arch("sm_75"))} == {
        "float16", "float32"}


def test_blackwell_plans_portable_kernels_by_its_shared_memory():
    b200, rtx5090 = specs.facts_for_arch("sm_100"), specs.facts_for_arch("sm_120")
    assert {s.kind for s in specs.all_specs(b200)} == {"fwd", "bwd", "bwd_dq", "bwd_pre"}
    # same shared memory, same tiles: B200 as an H100 without wgmma, RTX 5090 as an RTX 4090
    h100, rtx4090 = specs.facts_for_arch("sm_90"), specs.facts_for_arch("sm_89")
    for dtype in specs.DTYPES:
        assert specs.select_backward(b200, dtype, 128, True, True) == \
            specs.select_backward(h100, dtype, 128, True, True, wgmma=False)
        assert specs.select_forward(rtx5090, dtype, 96, False) == \
            specs.select_forward(rtx4090, dtype, 96, False)


def test_forced_arch_plans_as_the_older_gpu(monkeypatch):
    h200 = _gpu("sm_90", 227, name="NVIDIA H200")
    monkeypatch.setenv("CUFLASH_FORCE_ARCH", "sm_75")
    forced = specs.usable_facts(h200)
    assert (forced.arch, forced.smem_optin, forced.name) == ("sm_75", 64 * KIB,
                                                              "NVIDIA H200 as sm_75")
    assert specs.select_forward(forced, "float16", 128, False).kind == "fwd"
    monkeypatch.setenv("CUFLASH_FORCE_ARCH", "sm_80")
    assert specs.usable_facts(h200).smem_optin == 163 * KIB
    monkeypatch.setenv("CUFLASH_FORCE_ARCH", "sm_90")
    assert specs.usable_facts(h200) == h200  # forcing the device's own arch changes nothing
    for newer, device in (("sm_100", h200), ("sm_90", _gpu("sm_100", 227))):
        monkeypatch.setenv("CUFLASH_FORCE_ARCH", newer)
        with pytest.raises(RuntimeError, match=f"CUFLASH_FORCE_ARCH={newer} cannot run"):
            specs.usable_facts(device)
    monkeypatch.setenv("CUFLASH_FORCE_ARCH", "turing")
    with pytest.raises(ValueError, match="CUFLASH_FORCE_ARCH: expected one of sm_75"):
        specs.forced_arch()


def test_tiles_an_arch_spills_are_skipped_there_only():
    at_48k = {a: specs.facts_for_arch(a, 48 * KIB) for a in ("sm_75", "sm_80", "sm_120")}
    pick = {a: specs.select_backward(f, "float16", 128, True, False) for a, f in at_48k.items()}
    assert (pick["sm_80"].block_m, pick["sm_80"].warps) == (32, 2)
    assert (pick["sm_120"].block_m, pick["sm_120"].warps) == (16, 2)
    d64 = {a: specs.select_backward(f, "float16", 64, True, False) for a, f in at_48k.items()}
    assert (d64["sm_80"].block_m, d64["sm_80"].stages) == (64, 1)
    assert (d64["sm_75"].block_m, d64["sm_75"].stages) == (32, 1)
    # Turing: 64-column chunks where 128 would leave a partial last chunk
    t4 = specs.facts_for_arch("sm_75")
    assert [specs.select_backward(t4, "float16", d, False, False).dchunk
            for d in (128, 160, 192, 224, 256)] == [128, 64, 128, 64, 128]


def test_forward_overlap_where_measured_and_where_registers_allow():
    """specs.with_forward_overlap: the 8-warp Hopper forward at head_dim 192 / 256 takes
    CF_FWD_OVERLAP 2 (3 at 192), 1 or none where registry.FWD90_OVERLAP_ONE_WHEN / _OFF_WHEN say (the
    registers), none without room for the third V stage; warp-specialized and portable
    specs never."""
    facts = specs.facts_for_arch("sm_90")
    M = specs.ModFlags

    def value(head_dim, causal=False, facts=facts, **mods):
        spec = specs.select_forward(facts, "bfloat16", head_dim, causal, mods=M(**mods))
        return dict(spec.knobs).get("CF_FWD_OVERLAP", 0)

    assert value(256) == value(256, True) == 2
    assert value(192) == value(192, True) == 3  # stage mbarriers (session 42)
    assert value(256, softcap=True, sinks=True) == value(256, window=True) == 2
    assert value(192, softcap=True) == value(192, True, softcap=True) == 1
    assert value(256, True, varlen=True, block_sparse=True) == 1
    assert value(256, window=True, varlen=True, block_sparse=True) == 1  # a window is causal
    assert value(256, varlen=True, block_sparse=True) == 2
    assert value(256, alibi=True) == value(256, dropout=True) == value(256, True, alibi=True) == 2
    assert value(256, True, dropout=True) == value(256, alibi=True, dropout=True) == 1
    assert value(256, window=True, alibi=True) == value(256, True, alibi=True, dropout=True) == 0
    assert value(192, alibi=True) == value(192, True, dropout=True) == 3
    assert value(64) == value(128) == value(128, True) == 0  # warp-specialized there
    assert value(256, facts=specs.facts_for_arch("sm_90", 200 * specs.KIB)) == 0
    assert value(256, facts=specs.facts_for_arch("sm_80")) == 0
    overlapped = specs.select_forward(facts, "bfloat16", 256, True)
    plain = overlapped.without_knob("CF_FWD_OVERLAP")
    assert overlapped.smem_bytes - plain.smem_bytes == 64 * 256 * 2  # the third V stage
    assert overlapped.smem_bytes <= specs.ARCH_SMEM_OPTIN["sm_90"]


def test_dq_first_in_the_role_split_where_measured():
    """specs.with_dq_first: the role split at head_dim 192 and 256 (registry.BWD90_DQ_FIRST;
    it runs where the head-dim split does not serve: dropout, the sets the split spills on)
    issues a dQ panel before dK / dV; the head-dim split, 128 (warp-specialized) and the
    deterministic kernels never."""
    facts = specs.facts_for_arch("sm_90")

    def knob(head_dim, deterministic=False, **mods):
        spec = specs.select_backward(facts, "bfloat16", head_dim, True, deterministic,
                                     mods=specs.ModFlags(**mods))
        return dict(spec.knobs).get("CF_BWD_DQ_FIRST", 0)

    assert knob(192, softcap=True, alibi=True) == knob(192, dropout=True) == 1
    assert knob(256, dropout=True) == knob(256, softcap=True, alibi=True) == 1
    assert knob(192) == knob(256) == knob(192, varlen=True) == 0  # the head-dim split
    assert knob(128) == knob(64) == knob(192, deterministic=True) == 0
    assert specs.select_backward(specs.facts_for_arch("sm_80"), "bfloat16", 192, True,
                                 False).knobs == ()


def test_head_dim_split_backward_selected_on_hopper_where_it_serves():
    """At head_dim 192 / 256 on sm_90 the backward is flash_bwd_sm90_hsplit.cu's tile
    (registry.BWD90_HSPLIT): dQ by bulk adds in the default mode, ordered dQ in the
    deterministic one. Not where it declines (dropout; a window with ordered dQ), with wgmma
    off, on other archs, or where its shared memory does not fit the budget."""
    from cuflash import registry

    hopper = specs.facts_for_arch("sm_90")
    for head_dim in (192, 256):
        for causal in (False, True):
            fast = specs.select_backward(hopper, "bfloat16", head_dim, causal, False)
            det = specs.select_backward(hopper, "float16", head_dim, causal, True)
            assert registry.bwd90_head_dim_split(fast) and fast.dq_tiled, fast.name
            assert registry.bwd90_head_dim_split(det) and det.dq_ordered, det.name
        for kw in (dict(dropout=True), dict(block_sparse=True)):
            spec = specs.select_backward(hopper, "bfloat16", head_dim, False, False,
                                         mods=specs.ModFlags(**kw))
            assert not registry.bwd90_head_dim_split(spec), spec.name
        windowed_det = specs.select_backward(hopper, "bfloat16", head_dim, False, True,
                                             mods=specs.ModFlags(window=True))
        assert windowed_det.kind == "bwd", windowed_det.name
        for spec in (specs.select_backward(hopper, "bfloat16", head_dim, False, False,
                                           wgmma=False),
                     specs.select_backward(hopper.with_budget(100 * specs.KIB), "bfloat16",
                                           head_dim, False, False),
                     specs.select_backward(specs.facts_for_arch("sm_80"), "bfloat16",
                                           head_dim, False, True)):
            assert not registry.bwd90_head_dim_split(spec), spec.name
    assert not registry.bwd90_head_dim_split(
        specs.select_backward(hopper, "bfloat16", 128, False, False))


def test_descriptor_adds_where_measured():
    """CF_DESC_ADD where registry.DESC_ADD lists the kind and bucket: the Hopper backward at
    64 / 192 / 256 (either dQ mode) and the 8-warp forward at 192; not d128, not the d256
    forward, not the portable kernels."""
    f = specs.facts_for_arch("sm_90")
    knob = ("CF_DESC_ADD", 1)

    def fwd(d, causal=False, facts=f):
        return knob in specs.select_forward(facts, "bfloat16", d, causal).knobs

    def bwd(d, deterministic=False, facts=f):
        return knob in specs.select_backward(facts, "bfloat16", d, True, deterministic).knobs

    assert fwd(192) and fwd(192, True) and not fwd(64) and not fwd(128) and not fwd(256)
    assert all(bwd(d) and bwd(d, True) for d in (64, 192, 256))
    assert not bwd(128) and not bwd(128, True)
    window_alibi = specs.ModFlags(window=True, alibi=True)  # spilled 20 B with it
    assert knob not in specs.select_backward(f, "bfloat16", 192, False, False,
                                             mods=window_alibi).knobs
    assert knob in specs.select_backward(f, "bfloat16", 256, False, False,
                                         mods=window_alibi).knobs
    assert not fwd(192, facts=specs.facts_for_arch("sm_80"))
    assert not bwd(64, facts=specs.facts_for_arch("sm_80"))

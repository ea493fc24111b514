"""The tile selector as a pure function of device facts: every budget, every head_dim."""

import pytest

from cuflash import specs
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
    assert spec.name == "fwd90_bf16_d128_m128_n128_w8_s2"
    assert specs.compile_arch(spec, "sm_90") == "sm_90a"


def test_wgmma_only_on_sm90_and_only_whole_panels(monkeypatch):
    a100 = DeviceFacts(name="a100", arch="sm_80", sm_count=108, smem_optin=163 * KIB)
    assert specs.select_forward(a100, "bfloat16", 128, False).name == "fwd_bf16_d128_m128_n64_w8_s2"
    assert specs.select_forward(facts(227), "bfloat16", 96, False).kind == "fwd"
    assert specs.select_forward(facts(227), "float32", 128, False).kind == "fwd"
    assert specs.select_forward(facts(99), "float16", 64, True).kind == "fwd90"
    monkeypatch.setenv("CUFLASH_DISABLE_WGMMA", "1")
    assert specs.select_forward(facts(227), "bfloat16", 128, False).kind == "fwd"


def test_names_are_unique_and_canonical():
    all_specs = specs.all_specs(facts(227))
    names = [s.name for s in all_specs]
    assert len(names) == len(set(names))
    causal = specs.select_forward(facts(99), "float16", 40, True)
    assert causal.name.startswith("fwd90_fp16_d64_") and causal.name.endswith("_causal")


def test_spec_defines_match_abi():
    spec = specs.select_backward(facts(163), "bfloat16", 256, True, deterministic=False)
    d = spec.defines
    assert d["CF_DTYPE"] == 1 and d["CF_HEAD_DIM"] == 256 and d["CF_CAUSAL"] == 1
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
    spec = KernelSpec("fwd", "bfloat16", 64, 64, 64, 4, 2, False)
    assert {spec: 1}[spec] == 1
    with pytest.raises(Exception):
        spec.block_m = 32

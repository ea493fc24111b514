"""cuflash.attention_with_kvcache on the CPU path (the NumPy mirror of the split-KV kernel),
its validation, and the pure planner of the CUDA kernels.

Hypothesis draws batch, q_len 1-8, heads / heads_kv (GQA), head_dim, cache lengths (zeros,
lengths that are multiples of nothing), causal, dtype and num_splits; o must pass
``err <= 2 * err(naive same dtype) + atol`` against the float64 reference of each batch
entry's valid keys, lse a float32-tight check (tests/decode_helpers.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import decode, specs

try:
    import decode_helpers as dh
except ImportError:  # tests/ collected as a package
    from tests import decode_helpers as dh


@settings(max_examples=120)
@given(dh.decode_cases())
def test_cpu_matches_float64_reference(case):
    q, k, v, lens = dh.make_inputs(case)
    o, lse = cuflash.attention_with_kvcache(
        q, k, v, cache_seqlens=lens, causal=case["causal"], softmax_scale=case["softmax_scale"],
        num_splits=case["num_splits"], return_softmax_lse=True)
    assert lse.dtype == np.float32
    dh.assert_decode_matches(o, lse, q, k, v, lens, causal=case["causal"],
                             softmax_scale=case["softmax_scale"], dtype=case["dtype"],
                             label=dh.describe(case))


def test_splits_agree_with_one_split():
    """Splitting changes only float32 rounding (the combine is exact math)."""
    case = dict(batch=2, q_len=4, heads=8, heads_kv=2, head_dim=64, seqlen_cache=1000,
                cache_seqlens=[1000, 333], causal=True, dtype="float32", seed=1)
    q, k, v, lens = dh.make_inputs(case)
    one = cuflash.attention_with_kvcache(q, k, v, cache_seqlens=lens, causal=True, num_splits=1,
                                         return_softmax_lse=True)
    for n in (2, 5, 17, 256):
        many = cuflash.attention_with_kvcache(q, k, v, cache_seqlens=lens, causal=True,
                                              num_splits=n, return_softmax_lse=True)
        np.testing.assert_allclose(many[0], one[0], rtol=0, atol=2e-6)
        np.testing.assert_allclose(many[1], one[1], rtol=1e-6, atol=0)


def test_rows_that_see_no_key():
    """cache_seqlens 0, and causal with fewer valid keys than queries: o = 0, lse = -inf."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 2, 16), np.float32)
    k = rng.standard_normal((2, 5, 1, 16), np.float32)
    o, lse = cuflash.attention_with_kvcache(q, k, k, cache_seqlens=np.array([0, 2], np.int32),
                                            causal=True, return_softmax_lse=True)
    assert (o[0] == 0).all() and (lse[0] == -np.inf).all()
    assert (o[1, :2] == 0).all() and (lse[1, :, :2] == -np.inf).all()  # queries 0, 1
    assert np.isfinite(lse[1, :, 2:]).all()


def test_other_frameworks_on_the_cpu():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 4, 32), np.float32)
    k = rng.standard_normal((1, 50, 2, 32), np.float32)
    want = cuflash.attention_with_kvcache(q, k, k, causal=True)
    got = cuflash.attention_with_kvcache(torch.from_numpy(q), torch.from_numpy(k),
                                         torch.from_numpy(k), causal=True,
                                         cache_seqlens=torch.tensor([50], dtype=torch.int32))
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), want)
    jnp = pytest.importorskip("jax.numpy")
    o, lse = cuflash.attention_with_kvcache(jnp.asarray(q), jnp.asarray(k), jnp.asarray(k),
                                            causal=True, return_softmax_lse=True)
    assert type(o).__module__.startswith("jax") and lse.shape == (1, 4, 2)
    np.testing.assert_array_equal(np.asarray(o), want)


def test_empty_problems():
    k = np.ones((2, 7, 1, 8), np.float32)
    o, lse = cuflash.attention_with_kvcache(np.ones((2, 0, 2, 8), np.float32), k, k,
                                            return_softmax_lse=True)
    assert o.shape == (2, 0, 2, 8) and lse.shape == (2, 2, 0)
    k0 = np.ones((2, 0, 1, 8), np.float32)
    o, lse = cuflash.attention_with_kvcache(np.ones((2, 1, 2, 8), np.float32), k0, k0,
                                            return_softmax_lse=True)
    assert (o == 0).all() and (lse == -np.inf).all()


# -- validation: TypeError / ValueError naming the argument ------------------------------------

def _args(**over):
    a = dict(q=np.ones((2, 1, 4, 16), np.float32), k_cache=np.ones((2, 10, 2, 16), np.float32),
             v_cache=np.ones((2, 10, 2, 16), np.float32))
    a.update(over)
    return a


@pytest.mark.parametrize("over, kw, err, words", [
    (dict(q=np.ones((2, 9, 4, 16), np.float32)), {}, ValueError, ["q:", "q_len", "9"]),
    (dict(q=np.ones((2, 4, 16), np.float32)), {}, ValueError, ["q:", "4-D"]),
    (dict(k_cache=np.ones((2, 10, 3, 16), np.float32), v_cache=np.ones((2, 10, 3, 16),
                                                                        np.float32)), {},
     ValueError, ["k_cache:", "heads_kv"]),
    (dict(v_cache=np.ones((2, 11, 2, 16), np.float32)), {}, ValueError, ["v_cache:"]),
    (dict(k_cache=np.ones((2, 10, 2, 16), np.float16)), {}, TypeError, ["k_cache:", "float32"]),
    (dict(q=np.ones((2, 1, 4, 12), np.float32), k_cache=np.ones((2, 10, 2, 12), np.float32),
          v_cache=np.ones((2, 10, 2, 12), np.float32)), {}, ValueError, ["q:", "head_dim"]),
    ({}, dict(cache_seqlens=np.array([1, 2], np.int64)), TypeError, ["cache_seqlens:", "int32"]),
    ({}, dict(cache_seqlens=np.array([1, 2, 3], np.int32)), ValueError, ["cache_seqlens:"]),
    ({}, dict(cache_seqlens=np.array([1, 11], np.int32)), ValueError, ["cache_seqlens:", "11"]),
    ({}, dict(cache_seqlens=np.array([-1, 1], np.int32)), ValueError, ["cache_seqlens:"]),
    ({}, dict(cache_seqlens=[1, 2]), TypeError, ["cache_seqlens:"]),
    ({}, dict(num_splits=1.5), TypeError, ["num_splits:"]),
    ({}, dict(num_splits=True), TypeError, ["num_splits:"]),
    ({}, dict(num_splits=257), ValueError, ["num_splits:", "257"]),
    ({}, dict(num_splits=-1), ValueError, ["num_splits:"]),
    ({}, dict(causal="yes"), TypeError, ["causal:"]),
    ({}, dict(softmax_scale=-1.0), ValueError, ["softmax_scale:"]),
    ({}, dict(return_softmax_lse=1), TypeError, ["return_softmax_lse:"]),
])
def test_bad_input_raises_naming_the_argument(over, kw, err, words):
    args = _args(**over)
    before = {name: a.copy() for name, a in args.items()}
    with pytest.raises(err) as info:
        cuflash.attention_with_kvcache(**args, **kw)
    for word in words:
        assert word in str(info.value), str(info.value)
    for name, a in args.items():  # nothing written
        np.testing.assert_array_equal(a, before[name])


def test_unsupported_keywords_are_not_accepted():
    """Not yet (docs/decode.md): rotary embedding on append, attention sinks, FA-2's
    cache_batch_idx; and FlashAttention-2's other names are not aliases."""
    for kw in ("k", "v", "window_size", "rotary_cos", "sinks", "cache_batch_idx"):
        with pytest.raises(TypeError):
            cuflash.attention_with_kvcache(**_args(), **{kw: None})


# -- the planner (pure) ------------------------------------------------------------------------

def _shape(batch, cache, heads_kv, heads=32, q_len=1, head_dim=128, dtype="bfloat16"):
    return decode.DecodeShape(batch, q_len, cache, heads, heads_kv, head_dim, dtype)


@pytest.mark.parametrize("batch, cache, heads_kv, splits", [
    (1, 32768, 32, 16), (8, 8192, 32, 2), (32, 4096, 32, 1), (8, 8192, 8, 4), (64, 2048, 32, 1),
    (64, 2048, 8, 1), (1, 32768, 8, 32), (1, 1024, 1, 4)])
def test_plan_fills_whole_waves_with_few_splits(batch, cache, heads_kv, splits):
    """The issue's rows on an H200 (132 SMs): the fewest splits that fill 95% of the last wave
    of resident blocks (decode.auto_splits says why), splits of whole steps >= 256 keys."""
    plan = decode.plan_decode(_shape(batch, cache, heads_kv), sm_count=132)
    assert plan.num_splits == splits, plan
    slots = 132 * plan.spec.min_blocks
    blocks = plan.grid[0] * plan.grid[1]
    # (1, 32k, 8): splits of whole 64-key tiles give 47 (376 of 396 slots), not 49
    assert decode.wave_fill(blocks, slots) >= decode.WAVE_FILL - 0.01 or \
        plan.keys_per_split < 2 * decode.MIN_KEYS_PER_SPLIT  # no room for more splits
    assert plan.num_splits == 1 or plan.keys_per_split >= decode.MIN_KEYS_PER_SPLIT
    assert plan.keys_per_split % plan.spec.step == 0
    per = plan.keys_per_split
    assert (plan.num_splits - 1) * per < cache <= plan.num_splits * per
    # a GQA group shares one K/V read: one row per block for MHA, the tensor-core split's
    # 16 or 32 rows for groups of 4 and 32
    assert plan.spec.rows == {32: 1, 8: 16, 1: 32}[heads_kv]
    assert plan.row_tiles == 1
    assert (plan.combine_grid is None) == (plan.num_splits == 1 or plan.fuses)
    # 32 rows take a ring of 3 tiles (104 KB; 2 where a block gets 99 KB: the test below)
    assert plan.spec.smem_bytes <= {32: 48, 8: 99, 1: 104}[heads_kv] * 1024


@pytest.mark.parametrize("arch, smem_kb, stages", [
    ("sm_90", 227, 3), ("sm_80", 163, 3), ("sm_86", 99, 2), ("sm_89", 99, 2), ("sm_120", 99, 2)])
def test_a_deep_ring_drops_to_two_tiles_where_it_does_not_fit(arch, smem_kb, stages):
    """32 rows at head_dim 128 (GQA 4 at q_len 8): 3 tiles of K/V where the block's shared
    memory holds them, else 2 (still the tensor-core kernel, not the SIMT fallback)."""
    facts = specs.DeviceFacts("gpu", arch, 100, smem_kb * 1024)
    spec = decode.select_decode("bfloat16", 128, 32, facts)
    assert isinstance(spec, decode.DecodeMmaSpec)
    assert (spec.rows, spec.stages) == (32, stages)
    assert spec.smem_bytes <= facts.smem_optin
    assert spec in decode.all_decode_specs(arch=arch)  # compiled by the spill audit


@given(st.integers(1, 5000), st.integers(0, 200000), st.sampled_from([16, 32, 64, 128]),
       st.integers(1, 200), st.integers(2, 4))
def test_auto_splits_is_bounded_and_never_worse_than_one_split(base, cache, step, sms, per_sm):
    splits = decode.auto_splits(base, cache, step, sms, per_sm)
    assert 1 <= splits <= max(1, min(decode.MAX_SPLITS, cache // decode.MIN_KEYS_PER_SPLIT))
    slots = sms * per_sm
    one = decode.wave_fill(base, slots)
    got = decode.wave_fill(base * splits, slots)
    assert got >= min(one, decode.WAVE_FILL) - 1e-9
    if splits > 1:  # a split was only added because one split left the wave emptier
        assert one < decode.WAVE_FILL


def test_plan_appends_first_and_sizes_the_append_grid():
    shape = decode.DecodeShape(3, 2, 4096, 8, 2, 128, "float16", page_size=16, seqlen_new=2)
    plan = decode.plan_decode(shape, sm_count=132)
    assert plan.labels[0] == "decode_append"
    assert plan.append_grid[0] * plan.spec.threads >= 3 * 2 * 2 * 128 // 8
    assert decode.plan_decode(decode.DecodeShape(3, 2, 4096, 8, 2, 128, "float16"),
                              132).append_grid is None


def test_plan_user_splits_and_row_tiles():
    plan = decode.plan_decode(_shape(2, 100, 1, heads=16, q_len=3), sm_count=132, num_splits=7)
    assert plan.num_splits <= 7 and plan.num_splits * plan.keys_per_split >= 100
    assert plan.spec.rows == 64 and plan.row_tiles == 1  # 48 rows per kv head, one band each
    assert plan.workspace_bytes >= 4 * plan.num_splits * 2 * 3 * 16 * (128 + 1)
    assert decode.plan_decode(_shape(2, 0, 1), 132).num_splits == 1
    assert decode.plan_decode(_shape(2, 10**6, 1), 132, num_splits=1).combine_grid is None


@given(st.integers(0, 10**6), st.integers(1, 300), st.integers(1, 256))
def test_split_keys_cover_the_cache(seqlen, want, step):
    splits, per = decode.split_keys(seqlen, want, step)
    assert 1 <= splits <= max(1, want)
    if seqlen:
        assert per % step == 0 and (splits - 1) * per < seqlen <= splits * per


def test_spec_names_and_buckets():
    fc = "_fc" if decode.FUSED_COMBINE else ""  # the fused merge's suffix, where selected
    spec = decode.select_decode("float32", 72, 3)
    assert (spec.head_dim, spec.rows) == (128, 4)
    assert spec.name == "decode_fp32_d128_r4_k1_s2_b3_w4" + fc
    spec = decode.select_decode("bfloat16", 72, 2)
    assert spec.name == "decode_bf16_d128_r2_k8_s1_b3_w4" + fc
    assert decode.select_decode("bfloat16", 72, 3).name == \
        "decode_bf16_d128_r16_n64_s2_b2_w4_mma_sa_cr" + fc
    # 48 SIMT specs; 11 tensor-core (dtype x head_dim x rows) for each 16-bit dtype, 11 more
    # for paged caches (decode._MMA_PAGED_KNOBS), and the two-tile twins of the 3-tile ring
    # (32 rows at head_dim 128; contiguous and paged) for 99-KB devices
    assert len({s.name for s in decode.all_decode_specs()}) == 48 + 2 * 24
    assert len(decode.all_decode_specs(arch="sm_75")) == 48


H200 = specs.DeviceFacts("H200", "sm_90", 132, 227 * 1024)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("head_dim", [8, 40, 64, 128, 136, 256])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 16, 17, 32, 33, 64, 65, 256])
def test_select_decode_takes_tensor_cores_from_three_16bit_rows(dtype, head_dim, rows):
    """16-bit data with 3+ rows per kv head: the tensor-core split, in the fewest bands of 16
    rows that hold them (64 at most, 32 at head_dim 256); SIMT otherwise."""
    spec = decode.select_decode(dtype, head_dim, rows, H200)
    mma = dtype != "float32" and rows >= 3
    assert isinstance(spec, decode.DecodeMmaSpec) == mma
    assert spec.head_dim == decode.head_dim_bucket(head_dim)
    if mma:
        most = 32 if spec.head_dim == 256 else 64
        assert spec.rows == min(most, max(16, 1 << (rows - 1).bit_length())), spec
        assert spec.block_n % (16 * spec.key_parts) == 0 and spec.stages >= 2
        # sm_86 / sm_89 / sm_120's opt-in limit, but for 32 rows at head_dim 128 (a ring of 3
        # tiles, 104 KB; test_a_deep_ring_drops_to_two_tiles_where_it_does_not_fit)
        deep = (spec.head_dim, spec.rows) == (128, 32)
        assert spec.smem_bytes <= (104 if deep else 99) * 1024
        assert spec.bytes_in_flight >= 16 * 1024  # a tile of K + V loading while one computes
    assert spec == decode.select_decode(dtype, head_dim, rows)  # no facts: the same choice


def test_select_decode_falls_back_to_simt_where_tensor_cores_cannot_run():
    small = specs.DeviceFacts("RTX 3090", "sm_86", 82, 64 * 1024)  # a budget below the spec
    turing = specs.DeviceFacts("T4", "sm_75", 40, 64 * 1024)
    for facts in (small, turing):
        spec = decode.select_decode("float16", 128, 8, facts)
        assert isinstance(spec, decode.DecodeSpec) and spec.rows == 8, facts
    spec = decode.select_decode("float16", 32, 64, turing)  # fits 64 KB, but no cp.async
    assert isinstance(spec, decode.DecodeSpec)
    assert isinstance(decode.select_decode("float16", 32, 64, small), decode.DecodeMmaSpec)


def test_plan_counts_the_tensor_core_blocks():
    """The split heuristic sees 16-row blocks, min_blocks resident, splits of whole tiles."""
    shape = _shape(8, 8192, 8, q_len=2)  # 8 rows per kv head
    plan = decode.plan_decode(shape, sm_count=132, facts=H200)
    spec = plan.spec
    assert isinstance(spec, decode.DecodeMmaSpec) and plan.row_tiles == 1
    assert plan.grid == (8 * 8, plan.num_splits, 1)
    assert plan.keys_per_split % spec.block_n == 0
    assert decode.wave_fill(plan.grid[0] * plan.grid[1], 132 * spec.min_blocks) >= decode.WAVE_FILL
    assert plan.labels == (spec.name,) + (() if plan.fuses else ("decode_combine",))
    # q_len 8 with groups of 8 (64 rows) still reads K / V once per kv head
    plan = decode.plan_decode(_shape(2, 4096, 4, q_len=8), sm_count=132, facts=H200)
    assert plan.spec.rows == 64 and plan.row_tiles == 1


def test_paged_specs_load_page_ids_ahead_and_step_through_pages():
    """decode._MMA_PAGED_KNOBS and the paged_step masks: every paged tensor-core spec loads
    its page ids a tile ahead and, but where the mask is 0, copies tiles of whole pages from
    page bases (CF_PAGED_STEP); it differs from the contiguous spec in those knobs alone
    (and the contiguous one's stepped addresses, decode._MMA_KNOBS). Both run the blocks per
    SM of _MMA_TILES (decode._MMA_PAGED_MIN_BLOCKS is empty since session 18)."""
    from dataclasses import replace

    contiguous = _shape(8, 8192, 8)
    paged = replace(contiguous, page_size=64)
    flat = decode.plan_decode(contiguous, sm_count=132, facts=H200)
    pages = decode.plan_decode(paged, sm_count=132, facts=H200)
    assert flat.spec.min_blocks == pages.spec.min_blocks == 2
    assert pages.spec == replace(flat.spec, page_ids=True, paged_step=7, step_addr=False)
    assert not flat.spec.page_ids and flat.spec.step_addr
    assert flat.num_splits == pages.num_splits == 4
    for head_dim, rows, mask in ((64, 16, 7), (128, 32, 7), (256, 16, 3), (128, 64, 0)):
        contiguous_spec = decode.select_decode("bfloat16", head_dim, rows, H200)
        assert decode.select_decode("bfloat16", head_dim, rows, H200, paged=True) == \
            replace(contiguous_spec, page_ids=True, paged_step=mask, step_addr=False)
    assert pages.spec in decode.all_decode_specs()  # compiled and warmed with the others


@pytest.mark.parametrize("kw, words", [
    (dict(dtype="float32"), "float16 or bfloat16"),
    (dict(block_n=48), r"multiple of 16 \* key_parts = 64"),
    (dict(rows=8), "rows"), (dict(rows=64, warps=2), "rows"),
    (dict(stages=1), "at least 2")])
def test_mma_spec_refuses_shapes_the_kernel_cannot_run(kw, words):
    args = dict(dtype="bfloat16", head_dim=128, block_n=64) | kw
    with pytest.raises(ValueError, match=words):
        decode.DecodeMmaSpec(**args)



# -- paged caches, in-place append, window / softcap / ALiBi -----------------------------------


@settings(max_examples=150, deadline=None)
@given(dh.kvcache_cases())
def test_cpu_kvcache_features_match_float64_reference(case):
    """Paged (shuffled pages, one unused), appended keys, modifiers, drawn together."""
    kw, truth = dh.make_kvcache_inputs(case)
    before_pages = kw["k_cache"].copy()
    o, lse = cuflash.attention_with_kvcache(
        **kw, causal=case["causal"], softmax_scale=case["softmax_scale"],
        num_splits=case["num_splits"], return_softmax_lse=True)
    mods = {n: truth[n] for n in ("window", "softcap", "alibi_slopes") if n in truth}
    dh.assert_decode_matches(o, lse, kw["q"], truth["k"], truth["v"], truth["lens"],
                             causal=case["causal"], softmax_scale=case["softmax_scale"],
                             dtype=case["dtype"], label=dh.describe(case), **mods)
    if case["seqlen_new"]:  # the append wrote exactly the new rows, in place
        changed = (kw["k_cache"] != before_pages).any(axis=(-1, -2))
        assert changed.sum() <= case["batch"] * case["seqlen_new"]
        got = dh.logical(kw["k_cache"], kw.get("block_table"))
        for b, n in enumerate(kw["cache_seqlens"]):
            np.testing.assert_array_equal(got[b, n:n + case["seqlen_new"]], kw["k_new"][b])


def test_append_is_in_place_for_torch_cpu_and_refused_for_jax():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 1, 4, 16), np.float32)
    k = rng.standard_normal((2, 10, 2, 16), np.float32)
    new = rng.standard_normal((2, 1, 2, 16), np.float32)
    lens = np.array([3, 9], np.int32)
    tk, tv = torch.from_numpy(k.copy()), torch.from_numpy(k.copy())
    cuflash.attention_with_kvcache(torch.from_numpy(q), tk, tv, k_new=torch.from_numpy(new),
                                   v_new=torch.from_numpy(new),
                                   cache_seqlens=torch.from_numpy(lens))
    assert torch.equal(tk[0, 3], torch.from_numpy(new[0, 0]))
    assert torch.equal(tv[1, 9], torch.from_numpy(new[1, 0]))
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(ValueError, match="k_cache: expected a writable"):
        cuflash.attention_with_kvcache(jnp.asarray(q), jnp.asarray(k), jnp.asarray(k),
                                       k_new=jnp.asarray(new), v_new=jnp.asarray(new),
                                       cache_seqlens=jnp.asarray(lens))


def test_paged_equals_contiguous_exactly_in_float32():
    """Same keys, other storage: the same result up to float32 summation order (the gathered
    cache is padded to whole pages, which changes NumPy's matmul blocking)."""
    case = dict(batch=3, q_len=2, heads=8, heads_kv=2, head_dim=64, seqlen_cache=300,
                cache_seqlens=[300, 17, 0], causal=True, dtype="float32", seed=4)
    q, k, v, lens = dh.make_inputs(case)
    want = cuflash.attention_with_kvcache(q, k, v, cache_seqlens=lens, causal=True)
    for page in (16, 48, 256):
        kp, vp, table = dh.paged(k, v, page, np.random.default_rng(page))
        got = cuflash.attention_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=table,
                                             causal=True)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def _paged_args(**over):
    a = dict(q=np.ones((2, 1, 4, 16), np.float32), k_cache=np.ones((5, 16, 2, 16), np.float32),
             v_cache=np.ones((5, 16, 2, 16), np.float32),
             block_table=np.array([[0, 1], [2, 3]], np.int32),
             cache_seqlens=np.array([3, 20], np.int32))
    a.update(over)
    return a


@pytest.mark.parametrize("over, err, words", [
    (dict(block_table=np.array([[0, 1], [2, 3]], np.int64)), TypeError, ["block_table:", "int32"]),
    (dict(block_table=np.array([[0, 1]], np.int32)), ValueError, ["block_table:", "(2, max_pages)"]),
    (dict(block_table=np.array([[0, 1], [2, 5]], np.int32)), ValueError, ["block_table:", "4"]),
    (dict(block_table=np.array([[0, 1], [2, -1]], np.int32)), ValueError, ["block_table:"]),
    (dict(block_table=np.array([[0, 9, 1], [2, 9, 3]], np.int32)[:, ::2]), ValueError,
     ["block_table:", "contiguous"]),
    (dict(k_cache=np.ones((5, 24, 2, 16), np.float32), v_cache=np.ones((5, 24, 2, 16), np.float32)),
     ValueError, ["k_cache:", "multiple of 16", "24"]),
    (dict(cache_seqlens=np.array([3, 33], np.int32)), ValueError, ["cache_seqlens:", "32"]),
    (dict(k_new=np.ones((2, 1, 2, 16), np.float32)), ValueError, ["v_new:", "k_new"]),
    (dict(k_new=np.ones((2, 1, 2, 16), np.float32), v_new=np.ones((2, 1, 2, 8), np.float32)),
     ValueError, ["v_new:"]),
    (dict(k_new=np.ones((2, 1, 3, 16), np.float32), v_new=np.ones((2, 1, 3, 16), np.float32)),
     ValueError, ["k_new:", "heads_kv 2"]),
    (dict(k_new=np.ones((2, 1, 2, 16), np.float16), v_new=np.ones((2, 1, 2, 16), np.float16)),
     TypeError, ["k_new:", "float32"]),
    (dict(k_new=np.ones((2, 13, 2, 16), np.float32), v_new=np.ones((2, 13, 2, 16), np.float32)),
     ValueError, ["cache_seqlens:", "seqlen_new 13"]),
    (dict(k_new=np.ones((2, 1, 2, 16), np.float32), v_new=np.ones((2, 1, 2, 16), np.float32),
          cache_seqlens=None), ValueError, ["cache_seqlens:", "None"]),
    (dict(alibi_slopes=np.ones(3, np.float32)), ValueError, ["alibi_slopes:", "(4,)"]),
    (dict(alibi_slopes=np.ones(4, np.float64)), TypeError, ["alibi_slopes:", "float32"]),
    (dict(alibi_slopes=np.array([1, 1, np.inf, 1], np.float32)), ValueError, ["alibi_slopes:"]),
    (dict(window=(1,)), TypeError, ["window:"]),
    (dict(window=(-2, 0)), ValueError, ["window:"]),
    (dict(softcap=-1.0), ValueError, ["softcap:"]),
    (dict(softcap="big"), TypeError, ["softcap:"]),
])
def test_bad_paged_append_and_modifier_input(over, err, words):
    args = _paged_args(**over)
    before = {n: a.copy() for n, a in args.items() if isinstance(a, np.ndarray)}
    with pytest.raises(err) as info:
        cuflash.attention_with_kvcache(**args)
    for word in words:
        assert word in str(info.value), str(info.value)
    for name, a in before.items():  # nothing written, the caches included
        np.testing.assert_array_equal(args[name], a)


def test_contiguous_tensor_core_specs_step_addresses_except_where_they_spilled():
    """decode._MMA_KNOBS: contiguous tensor-core specs step their copy addresses
    (CF_STEP_ADDR), paged ones never (the stepped loop reads a contiguous cache);
    decode._MMA_PLAIN_LOOP keeps the plain loop at (64, 32), which spilled on sm_120."""
    for spec in decode.all_decode_specs():
        if isinstance(spec, decode.DecodeMmaSpec):
            plain = spec.page_ids or (spec.head_dim, spec.rows) in decode._MMA_PLAIN_LOOP
            assert spec.step_addr == (not plain), spec.name
            assert bool(spec.paged_step) == (spec.page_ids and decode._MMA_PAGED_STEP_MASKS.get(
                (spec.head_dim, spec.rows), 7) != 0), spec.name
    assert not decode.select_decode("bfloat16", 64, 32).step_addr
    assert decode.select_decode("bfloat16", 64, 16).step_addr


def test_every_tensor_core_spec_combines_a_row_a_warp(monkeypatch):
    """decode._MMA_KNOBS / _MMA_PAGED_KNOBS: every tensor-core spec, contiguous or paged,
    carries combine_rows (selected in session 19); the SIMT specs keep the block-a-row
    combine (their spec has no such knob). (Where the combine kernel runs at all: not with
    the fused merge, switched off here.)"""
    monkeypatch.setattr(decode, "FUSED_COMBINE", False)
    mma = [s for s in decode.all_decode_specs() if isinstance(s, decode.DecodeMmaSpec)]
    assert mma and all(s.combine_rows and s.name.endswith("_cr") for s in mma)
    plan = decode.plan_decode(_shape(8, 8192, 8, q_len=8), sm_count=132, facts=H200)
    assert plan.num_splits == 2 and decode.combine_by_warps(plan.spec, plan.num_splits)
    assert plan.combine_grid == (8 * 8 * 32 // decode.COMBINE_WARPS, 1, 1)


def test_combine_takes_a_row_a_warp_only_with_the_knob_and_few_splits():
    """decode.combine_by_warps (CF_COMBINE_ROWS): with at most COMBINE_BATCH
    splits (half that at head_dim 256) the combine grid is rows / COMBINE_WARPS blocks, else
    one block a row; without the knob always one block a row."""
    from dataclasses import replace

    shape = _shape(8, 8192, 8, q_len=8)
    rows = shape.batch * shape.q_len * shape.heads
    plain = decode.plan_decode(shape, sm_count=132, num_splits=4, facts=H200,
                               spec=replace(decode.mma_spec("bfloat16", 128, 32),
                                            combine_rows=False))
    spec = replace(plain.spec, combine_rows=True)
    assert spec.name.endswith("_cr") and spec.defines["CF_COMBINE_ROWS"] == 1
    assert plain.combine_grid == (rows, 1, 1)
    few = decode.plan_decode(shape, sm_count=132, num_splits=4, spec=spec)
    assert few.combine_grid == (-(-rows // decode.COMBINE_WARPS), 1, 1)
    many = decode.plan_decode(shape, sm_count=132, num_splits=5, spec=spec)
    assert many.combine_grid == (rows, 1, 1)
    wide = replace(decode.mma_spec("bfloat16", 256, 16), combine_rows=True)
    assert decode.combine_by_warps(wide, 2) and not decode.combine_by_warps(wide, 3)


def test_fused_combine_plans_counters_instead_of_a_combine():
    """decode.fuses_splits / plan_decode with a ``fused_combine`` spec (CF_FUSED_COMBINE):
    with splits, the scratch gains one int32 counter a split block's row tile (16-byte
    aligned, after lse_part) and there is no combine grid; with one split, nothing; where the
    merge's weights (rows x splits floats) pass the block's shared memory, the combine
    kernel as before."""
    from dataclasses import replace

    shape = _shape(1, 32768, 8)
    spec = replace(decode.select_decode("bfloat16", 128, 4), fused_combine=True)
    assert spec.name.endswith("_fc") and spec.defines["CF_FUSED_COMBINE"] == 1
    plan = decode.plan_decode(shape, sm_count=132, facts=H200, spec=spec)
    plain = decode.plan_decode(shape, sm_count=132, facts=H200,
                               spec=replace(spec, fused_combine=False))
    assert plan.num_splits == plain.num_splits > 1 and plain.combine_grid and not plain.fuses
    assert plan.fuses and plan.combine_grid is None
    assert plan.counter_offset == -(-plain.workspace_bytes // 16) * 16
    assert plan.workspace_bytes == plan.counter_offset + 4 * plan.grid[0]
    assert plan.labels == (spec.name,)
    one = decode.plan_decode(shape, sm_count=132, num_splits=1, spec=spec)
    assert not one.fuses and one.workspace_bytes == 0 and one.combine_grid is None
    simt = replace(decode.select_decode("float32", 64, 1), fused_combine=True)
    fits = simt.smem_bytes // (4 * simt.rows)
    assert decode.fuses_splits(simt, min(fits, decode.MAX_SPLITS))
    assert not decode.fuses_splits(simt, 1)
    assert not decode.fuses_splits(replace(simt, fused_combine=False), 8)
    from types import SimpleNamespace

    tight = SimpleNamespace(fused_combine=True, rows=16, smem_bytes=4 * 16 * 10)
    assert decode.fuses_splits(tight, 10) and not decode.fuses_splits(tight, 11)


def test_fused_combine_knob_reaches_every_selected_spec(monkeypatch):
    """decode.FUSED_COMBINE puts ``fused_combine`` on every selected spec, SIMT and
    tensor-core, contiguous and paged (but decode._FUSED_SPILLS' buckets); off, on none."""
    monkeypatch.setattr(decode, "FUSED_COMBINE", False)
    assert not any(s.fused_combine for s in decode.all_decode_specs())
    assert not decode.select_decode("bfloat16", 128, 4, H200).fused_combine
    monkeypatch.setattr(decode, "FUSED_COMBINE", True)
    for rows, paged in ((1, False), (4, False), (4, True), (32, False), (8, True)):
        assert decode.select_decode("bfloat16", 128, rows, H200, paged=paged).fused_combine
    assert decode.select_decode("float32", 64, 2, H200).fused_combine
    kept = decode._FUSED_SPILLS
    assert not decode.select_decode("bfloat16", 32, 4, H200, paged=True).fused_combine
    assert all(s.fused_combine != (isinstance(s, decode.DecodeMmaSpec)
                                   and (s.head_dim, s.rows, s.page_ids) in kept)
               for s in decode.all_decode_specs())

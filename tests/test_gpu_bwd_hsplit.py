"""The head_dim 256 and 192 Hopper backward on 80- and 96-key tiles (flash_bwd_sm90_hsplit.cu:
the warpgroups split head_dim for dK and dV; specs.with_backward_head_dim_split, selected on
Hopper since 5d95584) against the float64 reference (``gpu``): plain, causal (rows with no
visible key too) and every modifier case of test_gpu_modifiers it serves (the sets where it
spilled keep the role split), packed sequences, GQA splits of the kv heads, lengths that are
not multiples of the tiles, seqlen_q != seqlen_k, widths inside a bucket; fp16 and bf16; dq,
dk and dv; its deterministic mode (ordered dQ), repeated bit for bit; and dQ by bulk
reduce-adds (CF_DQ_BULK, specs.with_bulk_dq). Timed by ``gpu_suite.sh bwd_hsplit``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

import cuflash
from cuflash import plan, reference, specs, testing

try:
    import gpu_helpers as gh
    import test_gpu_modifiers as mods_tests
    import test_gpu_varlen as varlen_tests
    from test_varlen import Case
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh
    from tests import test_gpu_modifiers as mods_tests
    from tests import test_gpu_varlen as varlen_tests
    from tests.test_varlen import Case

pytestmark = pytest.mark.gpu

PLAIN = [("plain", False, None, None, None, False), ("plain+causal", True, None, None, None,
                                                      False)]


def _serves(head_dim, case) -> bool:
    facts = specs.facts_for_arch("sm_90")
    return specs.with_backward_head_dim_split(specs.select_backward(
        facts, "bfloat16", head_dim, case[1], False, mods=mods_tests._flags(case))) is not None


PARAMS = [(d, c) for d in (256, 192) for c in PLAIN + mods_tests.CASES if _serves(d, c)]
# one tile, tails of both tiles, several key tiles, seqlen_q > seqlen_k (causal: rows that
# see no key), seqlen_q < seqlen_k
LENGTHS = [(64, 80), (131, 131), (203, 97), (257, 561)]


def _split(spec):
    return specs.with_backward_head_dim_split(spec) or spec


def _split_bulk(spec):
    from cuflash import launch

    return gh.staged_bulk_dq(specs.with_bulk_dq(_split(spec), launch.device_facts(0)))


def _split_red4(spec):
    return specs.with_dq_red4(_split_bulk(spec))  # the reductions alone (no own dO panels)


BULK_CASES = PLAIN + [mods_tests.CASES[4], mods_tests.CASES[9]]


def _module_specs():
    from cuflash import config, launch

    facts = launch.device_facts(0)
    if facts.arch != "sm_90":
        return []
    out = []
    for d, case in PARAMS:
        flags = mods_tests._flags(case)
        for dtype in ("float16", "bfloat16"):
            for varlen in (False, True):
                f = replace(flags, varlen=varlen)
                for det in (False, True):  # ordered dQ where the split serves it
                    out.append(_split(specs.select_backward(facts, dtype, d, case[1], det,
                                                            mods=f)))
                if case in BULK_CASES and d == 256:
                    out.append(_own_do(specs.select_backward(facts, dtype, d, case[1], False,
                                                             mods=f)))
                if case in BULK_CASES:
                    out.append(_split_bulk(specs.select_backward(facts, dtype, d, case[1],
                                                                 False, mods=f)))
                    out.append(_split_red4(specs.select_backward(facts, dtype, d, case[1],
                                                                 False, mods=f)))
                shape = plan.Shape(1, 1, 1, 1, 1, d, dtype, case[1], f)
                out += gh.shape_specs(shape, facts, config.Config(), forward=True)
    return out


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


@pytest.fixture
def hsplit():
    import cupy

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("a Hopper backward's tile")
    yield from gh.selector_with_knob("select_backward", _split)


@pytest.fixture
def hsplit_bulk():
    import cupy

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("a Hopper backward's tile")
    yield from gh.selector_with_knob("select_backward", _split_bulk)


@pytest.fixture
def hsplit_red4():
    yield from gh.hopper_selector_with_knob("select_backward", _split_red4,
                                            "a Hopper backward's tile")


def _assert_planned(dtype, causal, flags, head_dim=256, deterministic=False, bulk=False):
    from cuflash import launch

    picked = specs.select_backward(launch.device_facts(0), dtype, head_dim, causal,
                                   deterministic, mods=flags)
    assert picked.source == "flash_bwd_sm90_hsplit.cu", picked.name
    assert picked.dq_ordered == deterministic, picked.name
    assert picked.dq_tiled == bulk, picked.name


def _check_against_reference(head_dim, case, seqlen_q, seqlen_k, label):
    """Batch 2, 6 query heads on 2 kv heads (the plan may split a group's heads over blocks,
    which then add into the float32 dK / dV accumulators); fp16 in a third of the cases."""
    dtype = "bfloat16" if (seqlen_q + len(case[0])) % 3 else "float16"
    rng = gh.rng_for()
    q, k, v, do, causal, mods = mods_tests._inputs(rng, case, dtype, seqlen_q, seqlen_k,
                                                   head_dim=head_dim)
    label = f"{label} {case[0]} {gh.describe(q, k, dtype, causal, None)}"
    gq, gk, gv, gdo = (gh.to_gpu(x) for x in (q, k, v, do))
    gmods = mods_tests._on_gpu(mods)
    o, stats = cuflash.attention_forward(gq, gk, gv, causal=causal, **gmods)
    o_host = gh.to_host(o, dtype)
    grads = cuflash.attention_backward(gdo, gq, gk, gv, o, stats, causal=causal, **gmods)
    refs = reference.attention_backward_reference(do, q, k, v, causal=causal, o=o_host, **mods)
    naives = reference.attention_backward_naive(do, q, k, v, causal=causal,
                                                dtype=gh.np_dtype(dtype), **mods)
    scale = testing.magnitude(*refs[:3])
    few = mods_tests._few_keys(seqlen_q, seqlen_k, causal, mods["window"])
    for name, got, ref, naive in zip(("dq", "dk", "dv"), grads, refs, naives):
        mods_tests._judge(f"{name} [{label}]", gh.to_host(got, dtype), ref, naive, dtype,
                          scale, few)


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("head_dim, case", PARAMS, ids=[f"d{d}-{c[0]}" for d, c in PARAMS])
def test_backward_matches_reference(hsplit, head_dim, case, seqlen_q, seqlen_k):
    _assert_planned("bfloat16", case[1], mods_tests._flags(case), head_dim)
    _check_against_reference(head_dim, case, seqlen_q, seqlen_k, "hsplit")


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("head_dim", [256, 192])
@pytest.mark.parametrize("case", BULK_CASES, ids=lambda c: c[0])
def test_bulk_dq_matches_reference(hsplit_bulk, head_dim, case, seqlen_q, seqlen_k):
    """dQ staged 32 columns at a time and added by one bulk reduce-add (the tiled
    accumulator, scaled by the convert): tails of the query tile (rows past seqlen_q collect
    in the piece, never read), several key tiles, GQA splits."""
    _assert_planned("bfloat16", case[1], mods_tests._flags(case), head_dim, bulk=True)
    _check_against_reference(head_dim, case, seqlen_q, seqlen_k, "hsplit bulk")


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("head_dim", [256, 192])
@pytest.mark.parametrize("case", BULK_CASES, ids=lambda c: c[0])
def test_red4_dq_matches_reference(hsplit_red4, head_dim, case, seqlen_q, seqlen_k):
    """dQ added from registers by vector reductions into the same tiled accumulator
    (CF_DQ_RED4, specs.with_dq_red4): a whole 64-column panel a warpgroup, eight
    red.global.add.v4.f32 a thread."""
    from cuflash import launch

    _assert_planned("bfloat16", case[1], mods_tests._flags(case), head_dim, bulk=True)
    picked = specs.select_backward(launch.device_facts(0), "bfloat16", head_dim, case[1], False,
                                   mods=mods_tests._flags(case))
    assert dict(picked.knobs).get("CF_DQ_RED4"), picked.name
    _check_against_reference(head_dim, case, seqlen_q, seqlen_k, "hsplit red4")


def _own_do(spec):
    spec = _split(spec)
    return spec.with_knobs(CF_HSPLIT_DO_OWN=1) if spec.head_dim == 256 else spec


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("case", BULK_CASES, ids=lambda c: c[0])
def test_own_do_panels_match_reference(case, seqlen_q, seqlen_k):
    """head_dim 256 with each warpgroup loading its own panels of the next dO
    (CF_HSPLIT_DO_OWN; selected beside CF_DQ_RED4=2 since session 40, so this pins it where
    the selection would not add it)."""
    from cuflash import fastpath

    gh.hopper_only("a Hopper backward's tile")
    with fastpath.selector_patched("select_backward", _own_do):
        _check_against_reference(256, case, seqlen_q, seqlen_k, "hsplit own dO")


@pytest.mark.parametrize("causal", [False, True])
def test_bulk_dq_on_packed_sequences(hsplit_bulk, causal):
    """Packed sequences place their pieces by cf_seq.cuh's dq_piece (a sequence's rows start a
    piece row of their own)."""
    _assert_planned("bfloat16", causal, specs.ModFlags(varlen=True), 256, bulk=True)
    case = Case(lengths=varlen_tests.LAYOUT, heads_kv=2, group=3, head_dim=256, causal=causal,
                scale=256 ** -0.5, dtype=varlen_tests.DTYPES["bfloat16"], seed=11 + causal)
    varlen_tests.check_case(case, f"hsplit bulk varlen causal={causal}",
                            deterministic_modes=(False,))


@pytest.mark.parametrize("head_dim", [176, 192, 240, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_sequences(hsplit, head_dim, causal):
    """test_gpu_varlen's layout (empty sequences, queries without keys, seqused_k) at head_dim
    192 and 256 and widths inside those buckets (columns past them are zeros)."""
    _assert_planned("bfloat16", causal, specs.ModFlags(varlen=True),
                    192 if head_dim <= 192 else 256)
    case = Case(lengths=varlen_tests.LAYOUT, heads_kv=2, group=3, head_dim=head_dim,
                causal=causal, scale=head_dim ** -0.5, dtype=varlen_tests.DTYPES["bfloat16"],
                seed=head_dim + causal)
    varlen_tests.check_case(case, f"hsplit varlen d{head_dim} causal={causal}",
                            deterministic_modes=(False,))


@pytest.mark.parametrize("head_dim", [192, 256])
@pytest.mark.parametrize("case", PLAIN + [mods_tests.CASES[4], mods_tests.CASES[9]],
                         ids=lambda c: c[0])
def test_ordered_dq_repeats_bit_for_bit(hsplit, head_dim, case):
    """The deterministic mode on the split (ordered dQ: the key tiles that see a query tile
    add in turn, descending under causal): two calls give the same bits, and they match the
    reference. 5 key tiles a head at 389 keys; GQA 6 / 2 (no kv-head splits in this mode)."""
    import cupy

    _assert_planned("bfloat16", case[1], mods_tests._flags(case), head_dim, True)
    rng = gh.rng_for()
    q, k, v, do, causal, mods = mods_tests._inputs(rng, case, "bfloat16", 203, 389,
                                                   head_dim=head_dim)
    gq, gk, gv, gdo = (gh.to_gpu(x) for x in (q, k, v, do))
    gmods = mods_tests._on_gpu(mods)
    o, stats = cuflash.attention_forward(gq, gk, gv, causal=causal, **gmods)
    runs = [cuflash.attention_backward(gdo, gq, gk, gv, o, stats, causal=causal,
                                       deterministic=True, **gmods) for _ in range(2)]
    for name, a, b in zip(("dq", "dk", "dv"), *runs):
        assert cupy.array_equal(a.view(cupy.uint16), b.view(cupy.uint16)), name
    o_host = gh.to_host(o, "bfloat16")
    refs = reference.attention_backward_reference(do, q, k, v, causal=causal, o=o_host, **mods)
    naives = reference.attention_backward_naive(do, q, k, v, causal=causal,
                                                dtype=gh.np_dtype("bfloat16"), **mods)
    scale = testing.magnitude(*refs[:3])
    few = mods_tests._few_keys(203, 389, causal, mods["window"])
    for name, got, ref, naive in zip(("dq", "dk", "dv"), runs[0], refs, naives):
        mods_tests._judge(f"{name} [hsplit ordered d{head_dim} {case[0]}]",
                          gh.to_host(got, "bfloat16"), ref, naive, "bfloat16", scale, few)


@pytest.mark.parametrize("causal", [False, True])
def test_ordered_dq_on_packed_sequences(hsplit, causal):
    _assert_planned("bfloat16", causal, specs.ModFlags(varlen=True), 256, True)
    case = Case(lengths=varlen_tests.LAYOUT, heads_kv=2, group=3, head_dim=256, causal=causal,
                scale=256 ** -0.5, dtype=varlen_tests.DTYPES["bfloat16"], seed=7 + causal)
    varlen_tests.check_case(case, f"hsplit ordered varlen causal={causal}",
                            deterministic_modes=(True,))


@pytest.mark.parametrize("head_dim", [176, 240])
def test_widths_inside_a_bucket(hsplit, head_dim):
    """Columns past head_dim (bucket 192 or 256) are zeros in the tiles and never stored."""
    case = PLAIN[0]
    _assert_planned("bfloat16", False, specs.NO_MODS, 192 if head_dim <= 192 else 256)
    rng = gh.rng_for()
    q, k, v, do, causal, mods = mods_tests._inputs(rng, case, "bfloat16", 150, 233,
                                                   head_dim=head_dim)
    gh.assert_call_matches_reference(q, k, v, do, causal=False, dtype="bfloat16",
                                     label=f"hsplit d{head_dim}", host_kwargs=mods,
                                     gpu_kwargs=mods_tests._on_gpu(mods))


def test_declined_sets_keep_the_role_split(hsplit):
    """Softcap with ALiBi at 256 and causal ALiBi at 192 (they spilled there), and a window
    in the deterministic mode, plan the selected kernels."""
    from cuflash import launch

    facts = launch.device_facts(0)
    for d, causal, flags, deterministic in ((256, False, specs.ModFlags(softcap=True, alibi=True),
                                             False),
                                            (192, True, specs.ModFlags(alibi=True), False),
                                            (256, False, specs.ModFlags(window=True), True)):
        picked = specs.select_backward(facts, "bfloat16", d, causal, deterministic,
                                       mods=flags)
        assert picked.source != "flash_bwd_sm90_hsplit.cu", picked.name


def test_selected_where_it_serves():
    """Selected at head_dim 192 / 256 since 5d95584 (bulk dQ by default, ordered dQ in the
    deterministic mode), plain and causal, on the device in hand."""
    from cuflash import launch

    facts = launch.device_facts(0)
    if facts.arch != "sm_90":
        pytest.skip("a Hopper backward")
    for d in (192, 256):
        for causal in (False, True):
            for deterministic in (False, True):
                picked = specs.select_backward(facts, "bfloat16", d, causal, deterministic)
                assert picked.source == "flash_bwd_sm90_hsplit.cu", picked.name
                assert picked.dq_ordered == deterministic, picked.name

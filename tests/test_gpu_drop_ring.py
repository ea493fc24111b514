"""Dropout's kept flags drawn by the warp-specialized Hopper kernels' idle producer warps into a
ring of shared-memory slots (``CF_DROP_RING``, kernels_cu/cf_drop_ring.cuh; candidates:
registry.FWD90_DROP_RING, BWD90_DROP_RING), against the same tiles drawing the flags in their
consumers (``gpu``). The flags are the same, so the forward's outputs and statistics must be
equal bit for bit (persistent blocks and two or three slots too), and the backward's dK and
dV (dQ is added by atomics, in no fixed order: within float32 rounding); the kept set is
read back exactly against ``cuflash.dropout_mask``; and a few cases run forward and backward
against the float64 reference with both rings. tests/test_drop_packed_host.py checks the
words on the CPU; bench/dev/dropout_ab.py (variants ``ring``, ``bwd_ring``) times them.
"""

from __future__ import annotations

import pytest

import cuflash
from cuflash import plan, specs

try:
    import gpu_helpers as gh
    import test_gpu_dropout as dropout_tests
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh
    from tests import test_gpu_dropout as dropout_tests

pytestmark = pytest.mark.gpu

HEAD_DIMS = (64, 128)
CASES = dropout_tests.CASES  # plain, causal GQA, window + ALiBi, softcap + sinks, block mask
LENGTHS = [(131, 131), (389, 1029), (777, 260)]
RING = "CF_DROP_RING"


def _facts():
    from cuflash import launch

    return launch.device_facts(0)


def _ring(spec, slots=2, persistent=False):
    """``spec`` drawing its flags in the producer's warps where the ring applies."""
    ringed = specs.with_drop_ring(spec, _facts(), slots)
    if ringed is None:
        return spec
    return ringed.with_knobs(**{plan.PERSISTENT: 1}) if persistent else ringed


def _bwd_ring(spec, slots=2):
    """The backward ``spec`` reading its flags from the producer's ring where that applies."""
    return specs.with_backward_drop_ring(spec, _facts(), slots) or spec


def _baseline(spec, persistent=False):
    """The ring's tile (its K / V stages) with the consumers drawing the flags."""
    return _ring(spec, 2, persistent).without_knob(RING)


def _module_specs():
    out = []
    for facts, dtype, d, causal, flags in dropout_tests.hopper_selections(HEAD_DIMS):
        spec = specs.select_forward(facts, dtype, d, causal, mods=flags)
        for persistent in (False, True):
            out += [_baseline(spec, persistent)]
            out += [_ring(spec, slots, persistent) for slots in (2, 3)]
        back = specs.select_backward(facts, dtype, d, causal, False, mods=flags)
        out += [back] + [_bwd_ring(back, slots) for slots in (2, 3)]
    return out


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


def _hopper_only():
    gh.hopper_only("the ring is a Hopper kernel's")


@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("persistent", [False, True], ids=["tile", "persistent"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equal_to_drawing_in_the_consumers(case, head_dim, seqlen_q, seqlen_k, persistent,
                                           slots):
    """Bit for bit the same tile with the consumers drawing (o, m, l)."""
    _hopper_only()
    label = f"{case[0]} d{head_dim} {seqlen_q}x{seqlen_k} persistent={persistent} {slots} slots"
    ran = dropout_tests.check_forward_bitwise(
        case, head_dim, seqlen_q, seqlen_k, lambda s: _baseline(s, persistent),
        lambda s: _ring(s, slots, persistent), RING, slots, label)
    if ran is None:
        pytest.skip(f"no ring for {label} (loads without TMA)")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_kept_set_is_dropout_mask(head_dim, causal):
    """With q = 0 and v the identity over a chunk of keys, o shows the kept set."""
    _hopper_only()
    dropout_tests.check_kept_set_under(_ring, RING, 2, head_dim, causal)


@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_equal_to_drawing_in_the_consumers(case, head_dim, seqlen_q, seqlen_k, slots):
    """dK, dV bit for bit the backward drawing in its consumers where one block sums them
    (MHA); dQ, and GQA's dK, dV (a kv head's query heads split over blocks that add into
    float32 accumulators), within float32 rounding: atomic adds, in no fixed order."""
    import cupy

    from cuflash import fastpath

    _hopper_only()
    rng = gh.rng_for()
    q, k, v, do, causal, mods, issue15 = dropout_tests._inputs(
        rng, case, "bfloat16", seqlen_q, seqlen_k, head_dim)
    kwargs = dropout_tests._on_gpu({**mods, **issue15})
    q, k, v, do = (gh.to_gpu(x) for x in (q, k, v, do))
    o, stats = cuflash.attention_forward(q, k, v, causal=causal, **kwargs)
    grads, ran = {}, {}
    for name, knob in (("want", lambda s: s), ("got", lambda s: _bwd_ring(s, slots))):
        with fastpath.selector_patched("select_backward", knob):
            grads[name] = cuflash.attention_backward(do, q, k, v, o, stats, causal=causal,
                                                     **kwargs)
            ran[name] = [p.main.spec for p in plan._backward_plans.values()]
    label = f"{case[0]} d{head_dim} {seqlen_q}x{seqlen_k} {slots} slots"
    if not any(dict(s.knobs).get(RING) for s in ran["got"]):
        pytest.skip(f"no ring for {ran['got']}")
    assert [dict(s.knobs).get(RING) for s in ran["got"]] == [slots], (ran["got"], label)
    assert not any(dict(s.knobs).get(RING) for s in ran["want"]), (ran["want"], label)
    (dq0, dk0, dv0), (dq1, dk1, dv1) = grads["want"][:3], grads["got"][:3]  # (+ dsinks)
    exact = ("dk", "dv") if case[2] == case[3] else ()
    for name, a, b in (("dq", dq0, dq1), ("dk", dk0, dk1), ("dv", dv0, dv1)):
        if name in exact:
            assert cupy.array_equal(a.view(cupy.uint16), b.view(cupy.uint16)), f"{name}: {label}"
            continue
        a, b = a.astype(cupy.float32), b.astype(cupy.float32)
        scale = float(cupy.abs(a).max()) or 1.0
        assert float(cupy.abs(a - b).max()) <= 2e-2 * scale, f"{name}: {label}"


@pytest.fixture
def ring_selected():
    import cupy

    from cuflash import fastpath

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("the ring is a Hopper kernel's")
    with fastpath.selector_patched("select_forward", _ring), \
            fastpath.selector_patched("select_backward", _bwd_ring):
        yield


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_backward_match_reference(ring_selected, case, dtype, head_dim):
    dropout_tests._check("ring", case, dtype, 389, 777, head_dim)

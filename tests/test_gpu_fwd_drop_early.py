"""Two ways of the warp-specialized Hopper forward to apply dropout, against the forward
that drops the floats after the softmax (``gpu``): drawing the kept flags while its products
run (``CF_FWD_DROP_EARLY=1``, a candidate) and dropping P after packing it, by byte masks
(``CF_DROP_PACKED=1``, kernels_cu/cf_drop_packed.cuh; selected since session 37). The flags
are the same, so the outputs and the statistics must be equal bit for bit; the kept set is
read back exactly against ``cuflash.dropout_mask``; and a few cases run against the float64
reference, persistent blocks too. Timed by bench/dev/dropout_ab.py (``gpu_suite.sh
dropout_ab`` / ``drop_packed``). tests/test_drop_packed_host.py checks the packed form on the
CPU (the header compiled for the host, 32 lanes as threads).
"""

from __future__ import annotations

import pytest

from cuflash import plan, specs
from cuflash.registry import fwd90_warp_specialized

try:
    import gpu_helpers as gh
    import test_gpu_dropout as dropout_tests
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh
    from tests import test_gpu_dropout as dropout_tests

pytestmark = pytest.mark.gpu

KNOBS = {"early": "CF_FWD_DROP_EARLY", "packed": "CF_DROP_PACKED"}
HEAD_DIMS = (64, 128)
CASES = dropout_tests.CASES  # plain, causal GQA, window + ALiBi, softcap + sinks, block mask
LENGTHS = [(131, 131), (389, 1029), (777, 260)]


def _unpacked(spec):
    """``spec`` dropping the floats before packing (the forward before CF_DROP_PACKED was
    selected: registry.FWD90_DROP_PACKED), the baseline both ways are held to; the consumers
    draw (no CF_DROP_RING: tests/test_gpu_drop_ring.py holds the ring to this tile)."""
    return spec.without_knob(KNOBS["packed"]).without_knob("CF_DROP_RING")


def _with(knob, spec, persistent=False):
    """``spec`` with the ``knob`` (a KNOBS key) alone where it applies."""
    if not (fwd90_warp_specialized(spec) and spec.mods.dropout):
        return spec
    spec = _unpacked(spec).with_knobs(**{KNOBS[knob]: 1})
    return spec.with_knobs(**{plan.PERSISTENT: 1}) if persistent else spec


def _module_specs():
    out = []
    for facts, dtype, d, causal, flags in dropout_tests.hopper_selections(HEAD_DIMS):
        spec = specs.select_forward(facts, dtype, d, causal, mods=flags)
        out += [spec, _unpacked(spec)]
        out += [_with(knob, spec, persistent) for knob in KNOBS for persistent in (False, True)]
    return out


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


def _hopper_only():
    gh.hopper_only("the knob is a Hopper forward's")


@pytest.mark.parametrize("persistent", [False, True], ids=["tile", "persistent"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("knob", list(KNOBS))
def test_equal_to_dropping_the_floats(knob, case, head_dim, seqlen_q, seqlen_k, persistent):
    """Bit for bit the forward that drops the floats after the softmax, before packing
    (o, m, l)."""
    _hopper_only()
    label = f"{knob} {case[0]} d{head_dim} {seqlen_q}x{seqlen_k} persistent={persistent}"
    ran = dropout_tests.check_forward_bitwise(
        case, head_dim, seqlen_q, seqlen_k, _unpacked, lambda s: _with(knob, s, persistent),
        KNOBS[knob], 1, label)
    assert ran is not None, label


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("knob", list(KNOBS))
def test_kept_set_is_dropout_mask(knob, head_dim, causal):
    """With q = 0 and v the identity over a chunk of keys, o shows the kept set."""
    _hopper_only()
    dropout_tests.check_kept_set_under(lambda s: _with(knob, s), KNOBS[knob], 1, head_dim,
                                       causal)


@pytest.fixture(params=list(KNOBS))
def candidate(request):
    knob = request.param
    for _ in gh.hopper_selector_with_knob("select_forward", lambda s: _with(knob, s),
                                          "the knob is a Hopper forward's"):
        yield knob


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_backward_match_reference(candidate, case, dtype):
    from cuflash import launch

    picked = specs.select_forward(launch.device_facts(0), dtype, 128, case[1],
                                  mods=dropout_tests.mod_flags(case))
    assert dict(picked.knobs).get(KNOBS[candidate]) == 1, picked.name
    dropout_tests._check(candidate, case, dtype, 389, 777, 128)

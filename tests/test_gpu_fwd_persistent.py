"""The warp-specialized Hopper forward with persistent blocks (``CF_FWD_PERSISTENT``,
flash_fwd_sm90_ws.cu's TileWalk; head_dim 64 and 128) against the float64 reference
(``gpu``): every score modifier of test_gpu_modifiers, packed sequences, block masks,
dropout, fp16 and bf16; m and l too, which the backward reads.

A block walks several query tiles only when the batch has more (tile, head) pairs than
blocks, which these small shapes have not on 132 SMs: the fixture also plans for 6 and 16
SMs (``launch.device_facts`` patched) and accepts any static split there
(``tile_walk.SLACK`` raised), so that blocks walk up to a dozen tiles, causal ones too,
their K/V stages and Q buffer changing hands across tiles (the packed batch of 8 sequences
on 6 SMs still runs one block per tile: too few SMs for whole blocks per entry). Timed by
bench/dev/exp2_fma_ab.py --knob CF_FWD_PERSISTENT (``gpu_suite.sh fwd_persistent``).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cuflash import plan, specs, tile_walk
from cuflash.registry import fwd90_warp_specialized

try:
    import gpu_helpers as gh
    import test_gpu_block_sparse as bsp_tests
    import test_gpu_dropout as dropout_tests
    import test_gpu_modifiers as mods_tests
    import test_gpu_varlen as varlen_tests
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh
    from tests import test_gpu_block_sparse as bsp_tests
    from tests import test_gpu_dropout as dropout_tests
    from tests import test_gpu_modifiers as mods_tests
    from tests import test_gpu_varlen as varlen_tests

pytestmark = pytest.mark.gpu

KNOB = plan.PERSISTENT
HEAD_DIMS = (64, 128)
PLAIN = [("plain", False, None, None, None, False), ("plain+causal", True, None, None, None,
                                                      False)]
CASES = PLAIN + mods_tests.CASES
LENGTHS = [(131, 131), (203, 97), (257, 1029), (700, 300)]
SM_COUNTS = (None, 6, 16)  # None: the device's own
# 1: persistent blocks (selected); 2: their consumers' pipeline across tiles (a candidate,
# specs.with_forward_across_tiles: two consumers, a second Q buffer, fewer stages at d128)
VALUES = (1, 2)


def _persistent(spec, value=1, facts=None):
    if not fwd90_warp_specialized(spec):
        return spec
    if value == 2:  # (not under a block mask: the plain selection there)
        return specs.with_forward_across_tiles(spec, facts) or spec
    return spec.with_knobs(**{KNOB: 1})


def _module_specs():
    """The forward specs this module's calls select, with the knob (compiled ahead)."""
    from cuflash import launch

    facts = launch.device_facts(0)
    if facts.arch != "sm_90":
        return []
    calls = [(mods_tests._flags(case), case[1], d) for case in CASES for d in HEAD_DIMS]
    flags = specs.ModFlags
    calls += [(flags(varlen=True), False, 64), (flags(varlen=True), True, 64),
              (flags(varlen=True, window=True), True, 64),
              (flags(varlen=True, window=True, softcap=True, alibi=True, sinks=True), True, 64)]
    calls += [(flags(block_sparse=True), True, d) for d in HEAD_DIMS]
    calls += [(flags(block_sparse=True, window=True, alibi=True), False, d) for d in HEAD_DIMS]
    calls += [(flags(dropout=True), causal, d) for causal in (False, True) for d in HEAD_DIMS]
    return [_persistent(specs.select_forward(facts, dtype, d, causal, mods=f), value, facts)
            for f, causal, d in calls for dtype in ("float16", "bfloat16") for value in VALUES]


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


@pytest.fixture(params=[(v, n) for v in VALUES for n in SM_COUNTS],
                ids=lambda p: f"v{p[0]}-sms{p[1] or 'dev'}")
def persistent(request, monkeypatch):
    import cupy

    from cuflash import launch

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("the knob is a Hopper forward's")
    value, sms = request.param
    if sms:
        own = launch.device_facts
        monkeypatch.setattr(launch, "device_facts", lambda i: replace(own(i), sm_count=sms))
        monkeypatch.setattr(tile_walk, "SLACK", float("inf"))
    facts = launch.device_facts(0)
    for _ in gh.selector_with_knob("select_forward",
                                   lambda spec: _persistent(spec, value, facts)):
        yield value, sms


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(persistent, case, head_dim, dtype, seqlen_q, seqlen_k):
    from cuflash import launch

    _, causal, *_ = case
    shape = plan.Shape(2, seqlen_q, seqlen_k, 6, 2, head_dim, dtype, causal,
                       mods_tests._flags(case))
    p = launch.forward_plan(shape, 0)
    spec = p.kernel.spec
    blocks = tile_walk.persistent_blocks(2, 6, seqlen_q, seqlen_k, spec.block_m, spec.block_n,
                                         causal and not shape.mods.window,
                                         launch.device_facts(0).sm_count)
    value, sms = persistent
    if blocks:  # per batch entry, each walking the batch's triples
        assert (KNOB, value) in spec.knobs and p.kernel.grid == (blocks, 1, 2), spec.name
    else:  # the planner priced the static split and kept one block per tile
        assert KNOB not in dict(spec.knobs) and p.kernel.grid[1:] == (6, 2), spec.name
    mods_tests.check_forward(case, dtype, seqlen_q, seqlen_k, head_dim,
                             f"persistent value={value} sms={sms}")


@pytest.mark.parametrize("which", ["plain", "causal", "window-causal", "all"])
def test_packed_sequences(persistent, which):
    """Sequences of different lengths: a block skips the tiles past its sequence's end."""
    for dtype in ("float16", "bfloat16"):
        varlen_tests.test_mixed_layout_matches_reference("own", which, dtype)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_block_masks(persistent, head_dim):
    """Tiles whose keys are all masked out: a block walks past them without loading Q."""
    if persistent[0] == 2:
        pytest.skip("value 2 is not built under a block mask")
    for case in (bsp_tests.CASES[1], bsp_tests.CASES[4]):
        bsp_tests._check("own", case, "bfloat16", 300, 555, head_dim)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_dropout(persistent, head_dim):
    """Dropout's Philox positions follow each tile's batch entry and head (not selected with
    persistent blocks until this has run)."""
    for case in dropout_tests.CASES[:3]:
        dropout_tests._check("own", case, "bfloat16", 300, 555, head_dim)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_forward_and_backward_with_all_modifiers(persistent, head_dim):
    mods_tests.test_every_head_dim_with_all_modifiers("own", head_dim)

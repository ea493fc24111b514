"""O rescaled under the S product (``CF_FWD_RESCALE_EARLY=1``, a candidate: flash_fwd_sm90.cu's
overlapped loop and flash_fwd_sm90_ws.cu's step) against the float64 reference (``gpu``):
the selected head_dim 256 tile (8 warps, CF_FWD_OVERLAP 2), FlashAttention-3's 128 x 80
warp-specialized tile with TMA, with and without turn-taking, and the selected head_dim 128
tile; every forward that ran carries the knob unless specs.with_forward_rescale_early declines
its loop (asserted; at head_dim 256 the selected tile of the "all" case has none). Times: ``gpu_suite.sh fwd_rescale``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cuflash import specs

try:
    import gpu_helpers as gh
    import test_gpu_modifiers as mods_tests
    import test_gpu_tma as tma_tests
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh
    from tests import test_gpu_modifiers as mods_tests
    from tests import test_gpu_tma as tma_tests

pytestmark = pytest.mark.gpu

CASES = tma_tests.PLAIN + [c for c in mods_tests.CASES
                           if c[0] in ("window+causal", "softcap", "sinks+window", "all")]
LENGTHS = [(131, 131), (257, 1029)]


def _selected(spec):
    return specs.with_forward_rescale_early(spec) or spec


def _ws80(spec, pingpong: int):
    if spec.kind != "fwd90" or spec.head_dim != 256:
        return spec
    ws = replace(spec, block_m=128, block_n=80, warps=12, stages=2, knobs=())
    ws = specs.with_forward_tma(ws) or ws
    ws = specs.with_forward_rescale_early(ws)
    return ws if pingpong else ws.with_knobs(CF_FWD_PINGPONG=0)


TILES = {"selected": _selected, "ws80": lambda s: _ws80(s, 1),
         "ws80_no_turns": lambda s: _ws80(s, 0)}


def _runs(head_dim: int, tile: str, case) -> bool:
    """The 128 x 80 tile is head_dim 256's; with turns, early rescale and every modifier it
    spills 4 B (NVRTC 13.0, sm_90), so that case is left out."""
    return (head_dim == 256 or tile == "selected") and (tile, case[0]) != ("ws80", "all")


def _module_specs():
    """The specs the tests below run, compiled ahead (empty off Hopper: they skip)."""
    from cuflash import launch

    facts = launch.device_facts(0)
    if facts.arch != "sm_90":
        return []
    out = set()
    for head_dim in (256, 128):
        for case in CASES:
            spec = specs.select_forward(facts, "bfloat16", head_dim, case[1],
                                        mods=mods_tests._flags(case))
            out |= {knob(spec) for name, knob in TILES.items()
                    if _runs(head_dim, name, case)}
    return sorted(out, key=lambda spec: spec.name)


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("tile", list(TILES))
@pytest.mark.parametrize("head_dim", [256, 128])
def test_rescale_early_matches_reference(head_dim, tile, case, seqlen_q, seqlen_k):
    gh.hopper_only("a Hopper forward's knob")
    if not _runs(head_dim, tile, case):
        pytest.skip("not this tile's case (_runs)")
    knob = TILES[tile]
    ran = []

    def recorded(spec):
        out = knob(spec)
        ran.append(out)
        return out

    for _ in gh.selector_with_knob("select_forward", recorded):
        mods_tests.check_forward(case, "bfloat16", seqlen_q, seqlen_k, head_dim,
                                 f"rescale early d{head_dim} {tile}")
    fwd = [s for s in ran if s.kind == "fwd90"]
    assert fwd, [s.name for s in ran]
    for spec in fwd:  # the knob, unless the helper declines the loop (d256 "all": plain)
        assert (("CF_FWD_RESCALE_EARLY", 1) in spec.knobs
                or specs.with_forward_rescale_early(spec) is None), spec.name

"""The persistent Hopper forward under compute-sanitizer, with blocks that walk tiles.

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/dev/sanitize_persistent.py

bench/sanitize.py's shapes give every (tile, head) its own block on a full GPU. Here the
planner sees 4 SMs and takes any static split (tile_walk.SLACK raised), so two blocks per
batch entry walk 3-9 query tiles each: the Q buffer and K/V stages change hands across
tiles (q_empty, the last stage's release), which is where a race or a stale read would be.
Cases: head_dim 64 (three consumers) and 128 (two), causal or not, bf16, batch 2, 4 query
heads over 2 kv heads, 450 queries over 300 keys (and 300 over 450); each is checked against
the float64 reference. Then the same with CF_FWD_PERSISTENT=2 (the pipeline across tiles,
specs.with_forward_across_tiles), causal included. Prints one line per case and exits 1 on a
mismatch. ``--tma``: every one of those kernels loading with bulk tensor copies
(specs.with_forward_tma, CF_FWD_TMA); ``--cluster``: the non-causal ones on clusters of two
sharing K / V (specs.with_forward_cluster; one block per tile).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # a source checkout; the tests' error rule


def main() -> int:
    import cupy

    import cuflash
    import gpu_helpers as gh
    from cuflash import launch, plan, reference, specs, testing, tile_walk

    own = launch.device_facts
    launch.device_facts = lambda i: replace(own(i), sm_count=4)
    tile_walk.SLACK = float("inf")
    facts = launch.device_facts(0)
    plain = specs.select_forward
    if "--cluster" in sys.argv[1:]:  # non-causal d128: pairs sharing K / V; causal: TMA
        selected = lambda *a, **k: (specs.with_forward_cluster(plain(*a, **k))
                                    or specs.with_forward_tma(plain(*a, **k)) or plain(*a, **k))
    elif "--tma" in sys.argv[1:]:
        selected = lambda *a, **k: specs.with_forward_tma(plain(*a, **k)) or plain(*a, **k)
    else:
        selected = plain
    rng = gh.rng_for()
    bad = 0
    for value, head_dim in ((v, d) for v in (1, 2) for d in (64, 128)):
        # 1: the selection (persistent where selected); 2: the pipeline across tiles
        specs.select_forward = selected if value == 1 else (
            lambda *a, **k: _across(selected(*a, **k), facts, specs))
        gh.forget_planned_calls()
        for causal in (False, True):
            for seqlen_q, seqlen_k in ((450, 300), (300, 450)):
                q, k, v = gh.random_qkv(rng, batch=2, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                                        heads=4, heads_kv=2, head_dim=head_dim,
                                        dtype="bfloat16")
                p = launch.forward_plan(plan.Shape(2, seqlen_q, seqlen_k, 4, 2, head_dim,
                                                   "bfloat16", causal), 0)
                o, _ = cuflash.attention_forward(*(gh.to_gpu(x) for x in (q, k, v)),
                                                 causal=causal)
                cupy.cuda.Device().synchronize()  # sanitizer reports land on this case
                report = testing.judge(
                    "o", gh.to_host(o, "bfloat16"),
                    reference.attention_reference(q, k, v, causal=causal)[0],
                    reference.attention_naive(q, k, v, causal=causal,
                                              dtype=gh.np_dtype("bfloat16")),
                    dtype="bfloat16")
                bad += not report.ok
                print(f"d{head_dim} causal={causal} {seqlen_q}x{seqlen_k}: {p.kernel.spec.name} "
                      f"grid {p.kernel.grid}: {report}", flush=True)
    return 1 if bad else 0


def _across(spec, facts, specs):
    """``spec`` on the pipeline across tiles, loading as ``spec`` does (TMA or cp.async)."""
    across = specs.with_forward_across_tiles(spec.without_knob("CF_FWD_TMA"), facts)
    if across is None:
        return spec
    return (specs.with_forward_tma(across) or across) if specs.loads_with_tma(spec) else across


if __name__ == "__main__":
    sys.exit(main())

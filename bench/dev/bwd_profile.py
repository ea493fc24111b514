"""Run one Hopper backward kernel (a spec pinned, knobs included) a few times on one problem,
for a profiler to watch: the ncu A/B of two dQ modes in the same shape.

    ncu --clock-control none -k regex:flash_bwd_sm90 -s 2 -c 1 --set full -o OUT/ordered \
        python bench/dev/bwd_profile.py --ordered --knob CF_DQ_BULK=1

    ncu --clock-control none -k regex:flash_bwd_sm90 -s 2 -c 1 --section SpeedOfLight \
        python bench/dev/bwd_profile.py --head-dim 256 --hsplit

bf16, 16k tokens, heads * head_dim = 2048, as tile_sweep.py. head_dim 128: the 64-query,
128-key tile of 12 warps; other head_dims: the selected tile, or with --hsplit the head_dim 256
candidate on 80-key tiles (specs.with_backward_head_dim_split).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from devtools import pinned_backward, pinned_forward

from cuflash import specs
from cuflash.launch import device_facts
from cuflash.specs import KernelSpec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--ordered", action="store_true", help="ordered (deterministic) dQ")
    parser.add_argument("--knob", action="append", default=[], help="NAME=VALUE, repeatable")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--hsplit", action="store_true",
                        help="head_dim 256: the 80-key head-dim split (flash_bwd_sm90_hsplit.cu)")
    args = parser.parse_args(argv)
    d, s = args.head_dim, args.seqlen
    batch, heads = max(1, 16384 // s), 2048 // d
    facts = device_facts(0)
    if d == 128:
        spec = KernelSpec(kind="bwd90", dtype="bfloat16", head_dim=d, block_m=64, block_n=128,
                          warps=12, stages=2, causal=args.causal, dq_atomic=True, dchunk=d)
    else:
        spec = specs.select_backward(facts, "bfloat16", d, args.causal, False)
    if args.hsplit:
        spec = specs.with_backward_head_dim_split(spec)
    if args.ordered:  # as the selector makes it: with this GPU's rotated walk where it applies
        spec = specs.with_ordered_rotation(replace(spec, dq_ordered=True), facts)
    spec = spec.with_knobs(**{k: int(v) for k, v in (kv.split("=") for kv in args.knob)})
    print(spec.name)
    q, k, v, do = (torch.randn(batch, s, heads, d, device="cuda", dtype=torch.bfloat16)
                   for _ in range(4))
    o, m, l = pinned_forward(specs.select_forward(facts, "bfloat16", d, args.causal), q, k, v,
                             args.causal)
    for _ in range(args.calls):
        pinned_backward(spec, do, q, k, v, o, m, l, args.causal)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

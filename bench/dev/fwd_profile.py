"""Run cuflash's forward a few times on one problem, for a profiler to watch (ncu): the
A/B of one kernel between two trees (PYTHONPATH picks the tree).

    PYTHONPATH=.old ncu --clock-control none -k regex:flash_fwd -c 1 --set full \
        -o OUT/old python bench/dev/fwd_profile.py --head-dim 256 --seqlen 4096 --causal

bf16, ab_compare.py's shapes (TOKENS tokens, heads * head_dim = WIDTH).
"""

from __future__ import annotations

import argparse
import os

from ab_compare import TOKENS, WIDTH  # the shapes of the A/B this profiles


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--tma", action="store_true",
                        help="the warp-specialized forward with bulk tensor copies")
    parser.add_argument("--varlen", action="store_true",
                        help="the same batch as packed sequences of equal length")
    parser.add_argument("--one-block-per-tile", action="store_true",
                        help="the selected forward without persistent blocks")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout probability (#15: what the d64 forward spends on it)")
    parser.add_argument("--tile", default=None, metavar="W,N,S",
                        help="pin a fwd90 tile (warps, block_n, stages) instead of the "
                             "selection: the d256 warp-specialized candidates under ncu")
    parser.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                        help="with --tile: a knob of the pinned spec, repeatable")
    args = parser.parse_args(argv)
    import torch

    import cuflash

    if args.one_block_per_tile:  # dense against packed, the walk alike
        from cuflash import specs

        chosen = specs.select_forward
        specs.select_forward = lambda *a, **k: chosen(*a, **k).without_knob("CF_FWD_PERSISTENT")

    if args.tma or os.environ.get("CUFLASH_TEST_TMA") == "1":  # the TMA candidate's loads
        from cuflash import specs

        plain = specs.select_forward
        specs.select_forward = lambda *a, **k: (specs.with_forward_tma(plain(*a, **k))
                                                or plain(*a, **k))
    batch, heads = TOKENS // args.seqlen, WIDTH // args.head_dim
    q, k, v = (torch.randn((batch, args.seqlen, heads, args.head_dim), device="cuda",
                           dtype=torch.bfloat16) for _ in range(3))
    if args.varlen:
        cu = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * args.seqlen
        packed = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v)]
        for _ in range(args.calls):
            cuflash.attention_varlen_forward(*packed, cu, cu, args.seqlen, args.seqlen,
                                             causal=args.causal)
    if args.tile:
        from devtools import fwd_block_m, pinned_forward

        from cuflash.specs import KernelSpec

        w, n, st = (int(x) for x in args.tile.split(","))
        spec = KernelSpec(kind="fwd90", dtype="bfloat16", head_dim=args.head_dim,
                          block_m=fwd_block_m("fwd90", w), block_n=n, warps=w, stages=st,
                          causal=args.causal).with_knobs(
            **{a: int(b) for a, b in (kv.split("=") for kv in args.knob)})
        for _ in range(args.calls):
            pinned_forward(spec, q, k, v, args.causal)
        torch.cuda.synchronize()
        return 0
    for _ in range(0 if args.varlen else args.calls):
        cuflash.attention_forward(q, k, v, causal=args.causal, dropout_p=args.dropout,
                                  dropout_seed=1234 if args.dropout else None)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Two forward kernels on the same odd-shaped problems: does a new layout agree with the old?

    python bench/dev/fwd_layout_check.py --old fwd90:8,128,2 --new fwd90:12,128,2 --head-dim 64 128

Each spec runs pinned (devtools.pinned_forward) on shapes whose lengths are not multiples of
the tiles (seqlen_q != seqlen_k, one row, GQA), causal and not;
prints max |o_new - o_old| and |m|, |l| differences next to max |o_old - SDPA| (the old
kernel's own distance from a peer), and exits 1 when the new one is further from the old than
4x that distance (or has a NaN). A quick screen before the GPU tests, not a substitute.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from devtools import fwd_block_m, pinned_forward

from cuflash import specs
from cuflash.specs import KernelSpec

SHAPES = [(2, 1000, 1000, 8, 8), (1, 333, 1531, 8, 2), (3, 1, 700, 4, 4), (1, 4096, 4096, 16, 4),
          (1, 129, 127, 4, 1)]  # batch, seqlen_q, seqlen_k, heads, heads_kv


def spec_of(text: str, head_dim: int, causal: bool) -> KernelSpec:
    kind, tile = text.split(":")
    w, n, s = (int(x) for x in tile.split(","))
    return KernelSpec(kind=kind, dtype="bfloat16", head_dim=specs.head_dim_bucket(head_dim),
                      block_m=fwd_block_m(kind, w), block_n=n, warps=w, stages=s, causal=causal)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--old", required=True)
    p.add_argument("--new", required=True)
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    args = p.parse_args()
    bad = 0
    for d in args.head_dim:
        for causal in (False, True):
            old, new = spec_of(args.old, d, causal), spec_of(args.new, d, causal)
            for b, sq, sk, h, hk in SHAPES:
                q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
                k, v = (torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
                        for _ in range(2))
                o1, m1, l1 = pinned_forward(old, q, k, v, causal)
                o1, m1, l1 = o1.clone(), m1.clone(), l1.clone()
                o2, m2, l2 = pinned_forward(new, q, k, v, causal)
                rep = h // hk
                ref = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2),
                    v.repeat_interleave(rep, 2).transpose(1, 2),
                    attn_mask=torch.ones(sq, sk, dtype=torch.bool, device="cuda").tril(sk - sq)
                    if causal else None).transpose(1, 2)
                visible = torch.isfinite(m1)  # rows with keys (causal rows may have none)
                d_old = (o1.float() - ref.float()).abs().nan_to_num(0).max().item()
                d_new = (o2.float() - o1.float()).abs().max().item()
                d_m = (m2 - m1)[visible].abs().max().item() if visible.any() else 0.0
                d_l = ((l2 - l1) / l1.clamp_min(1e-30))[visible].abs().max().item() \
                    if visible.any() else 0.0
                ok = d_new == d_new and d_new <= 4 * max(d_old, 1e-2) and d_m < 1e-3 \
                    and d_l < 1e-3 and (m2 == m1)[~visible].all().item()
                bad += not ok
                print(f"{new.name:<44} {(b, sq, sk, h, hk)!s:<26} |o-old| {d_new:.2e} "
                      f"(old-sdpa {d_old:.2e}) |dm| {d_m:.1e} |dl/l| {d_l:.1e} "
                      f"{'ok' if ok else 'MISMATCH'}", flush=True)
    print(f"{bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""#13's GQA line: the backward alone (cuflash.attention_backward) with 16 query heads and
16 / 4 / 1 kv heads, per FLOP against the same call with 16 (MHA). The FLOPs count the query
heads (the same work for every kv count), so the ratio is one of times. SDPA's cuDNN
backward on the MHA shape is printed beside as the peer (same process).

    python bench/dev/gqa_backward.py [--out FILE.json]
    python bench/dev/gqa_backward.py --splits 1,2,4,8,16 [--causal-only]

--splits times the GQA / MQA rows again with each count of blocks sharing a kv head's query
heads forced (plan.kv_head_splits; counts that do not divide the group are skipped): the
planner asks for two waves of blocks, which at causal rows leaves few, long blocks.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from devtools import time_ms

import cuflash

QUERY_HEADS, HEAD_DIM = 16, 128


def sdpa_backward_ms(q, k, v, do, causal) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        dot = do.transpose(1, 2)
        return time_ms(lambda: torch.autograd.grad(o, (qt, kt, vt), dot, retain_graph=True))


def _forced_ms(n, do, q, k, v, o, stats, causal) -> float:
    """The backward's time with ``n`` blocks sharing each kv head's query heads."""
    from cuflash import fastpath, plan

    chosen = plan.kv_head_splits
    plan.kv_head_splits = lambda shape, spec, sm_count: n if shape.heads_per_kv > 1 else 1
    fastpath.forget_planned_calls()
    try:
        return time_ms(lambda: cuflash.attention_backward(do, q, k, v, o, stats, causal=causal))
    finally:
        plan.kv_head_splits = chosen
        fastpath.forget_planned_calls()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--splits", default="", help="comma-separated split counts to force")
    ap.add_argument("--causal-only", action="store_true")
    args = ap.parse_args(argv)
    forced = [int(x) for x in args.splits.split(",") if x]
    rows = []
    print(f"{torch.cuda.get_device_name(0)}, backward alone, 16 query heads, d{HEAD_DIM}")
    for dtype in (torch.bfloat16, torch.float16):
        for seqlen in (4096, 16384):
            for causal in ((True,) if args.causal_only else (False, True)):
                batch = 16384 // seqlen
                flops = 2.5 * 4 * batch * QUERY_HEADS * seqlen * seqlen * HEAD_DIM
                flops /= 2 if causal else 1
                q, do = (torch.randn(batch, seqlen, QUERY_HEADS, HEAD_DIM, device="cuda",
                                     dtype=dtype) for _ in range(2))
                times = {}
                for kv_heads in (16, 4, 1):
                    k, v = (torch.randn(batch, seqlen, kv_heads, HEAD_DIM, device="cuda",
                                        dtype=dtype) for _ in range(2))
                    o, stats = cuflash.attention_forward(q, k, v, causal=causal)
                    times[kv_heads] = time_ms(lambda: cuflash.attention_backward(
                        do, q, k, v, o, stats, causal=causal))
                    for n in forced if kv_heads < QUERY_HEADS else ():
                        if (QUERY_HEADS // kv_heads) % n == 0:
                            times[f"{kv_heads}s{n}"] = _forced_ms(n, do, q, k, v, o, stats,
                                                                  causal)
                    if kv_heads == 16:
                        cudnn = sdpa_backward_ms(q, k, v, do, causal)
                row = {"dtype": str(dtype).removeprefix("torch."), "seqlen": seqlen,
                       "batch": batch, "causal": causal, "cudnn_mha_ms": cudnn,
                       **{f"ms_kv{h}": t for h, t in times.items()},
                       **{f"tflops_kv{h}": flops / t / 1e9 for h, t in times.items()}}
                rows.append(row)
                tf = "  ".join(f"kv {h:>4} {flops / t / 1e9:6.1f} ({times[16] / t:.3f}x MHA)"
                               for h, t in times.items())
                print(f"{row['dtype']:>8} {seqlen:>5}{' causal' if causal else '       '}  "
                      f"{tf}  cuDNN MHA {flops / cudnn / 1e9:6.1f} TFLOP/s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

"""Time candidate tile shapes for one problem, to justify (or change) the tables in specs.py.

    python bench/dev/tile_sweep.py --kind fwd --head-dim 128 --seqlen 16384 [--causal]
    python bench/dev/tile_sweep.py --kind bwd --head-dim 64 --seqlen 4096

For each candidate the selector is pinned to that KernelSpec (monkeypatched), the output is
checked against torch SDPA's flash backend once, then timed: median of CUDA-event timings
after warm-up. batch*seqlen = 16k tokens and heads*head_dim = 2048, as in the benchmark.
Prints TFLOP/s per candidate (FLOPs = 4*B*H*S*S*D, halved when causal, x2.5 backward).
Written for the next GPU session; not yet run.
"""

from __future__ import annotations

import argparse
import statistics

from cuflash import specs
from cuflash.specs import KernelSpec

# (warps, block_n, stages) for fwd; (warps, block_m, stages) for bwd: block_m (fwd) and
# block_n (bwd) are 16 * warps, as the kernels require.
FWD_CANDIDATES = [(8, 128, 2), (8, 64, 2), (8, 64, 1), (8, 32, 2), (4, 128, 2), (4, 64, 2),
                  (4, 32, 2)]
BWD_CANDIDATES = [(4, 64, 2), (4, 64, 1), (4, 128, 1), (8, 64, 2), (8, 64, 1), (2, 64, 2),
                  (4, 32, 2)]


def candidate_specs(kind, dtype, head_dim, causal):
    bucket = specs.head_dim_bucket(head_dim)
    if kind == "fwd":
        return [KernelSpec("fwd", dtype, bucket, 16 * w, n, w, s, causal)
                for w, n, s in FWD_CANDIDATES]
    return [KernelSpec("bwd", dtype, bucket, m, 16 * w, w, s, causal, dq_atomic=True,
                       dchunk=min(bucket, 128)) for w, m, s in BWD_CANDIDATES]


def time_ms(fn, reps=20, warmup=3):
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    import torch
    import torch.nn.functional as F

    import cuflash
    from cuflash.launch import device_facts

    p = argparse.ArgumentParser()
    p.add_argument("--kind", choices=["fwd", "bwd"], default="fwd")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    d, s = args.head_dim, args.seqlen
    batch, heads = max(1, 16384 // s), 2048 // d
    dt = getattr(torch, args.dtype)
    q, k, v, do = (torch.randn(batch, s, heads, d, device="cuda", dtype=dt) for _ in range(4))
    flops = 4 * batch * heads * s * s * d / (2 if args.causal else 1)
    flops *= 2.5 if args.kind == "bwd" else 1
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2), is_causal=args.causal).transpose(1, 2)
    budget = device_facts(q.device.index).smem_optin
    for spec in candidate_specs(args.kind, args.dtype, d, args.causal):
        if spec.smem_bytes > budget:
            print(f"{spec.name:<52} does not fit ({spec.smem_bytes} B)")
            continue
        pin = (lambda sp: lambda *a, **k: sp)(spec)
        if args.kind == "fwd":
            specs.select_forward = pin
            o, stats = cuflash.attention_forward(q, k, v, causal=args.causal)
            err = (o.float() - ref.float()).abs().max().item()
            ms = time_ms(lambda: cuflash.attention_forward(q, k, v, causal=args.causal))
        else:
            specs.select_backward = pin
            o, stats = cuflash.attention_forward(q, k, v, causal=args.causal)
            err = (o.float() - ref.float()).abs().max().item()
            ms = time_ms(lambda: cuflash.attention_backward(do, q, k, v, o, stats,
                                                            causal=args.causal))
        print(f"{spec.name:<52} {flops / ms / 1e9:7.1f} TFLOP/s  {ms:8.3f} ms  "
              f"max|o - sdpa| {err:.1e}")


if __name__ == "__main__":
    main()

"""Host (Python) time per cuflash call on a GPU, and where it goes (cProfile).

    python bench/dev/host_overhead.py [--calls 300]

Tiny shapes, so the GPU work is negligible and a call's wall time is its host overhead:
validation, DLPack import / export, stream handshake, spec selection, allocation, launch.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import cuflash


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    q, k, v, do = (torch.randn(1, 128, 4, 64, device="cuda", dtype=torch.bfloat16)
                   for _ in range(4))
    o, stats = cuflash.attention_forward(q, k, v)
    cuflash.attention_backward(do, q, k, v, o, stats)
    torch.cuda.synchronize()
    cases = {
        "forward": lambda: cuflash.attention_forward(q, k, v),
        "backward": lambda: cuflash.attention_backward(do, q, k, v, o, stats),
        "sdpa forward (peer)": lambda: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
    }
    for name, fn in cases.items():
        start = time.perf_counter()
        for _ in range(args.calls):
            fn()
        torch.cuda.synchronize()
        print(f"{name:<22} {(time.perf_counter() - start) / args.calls * 1e6:8.1f} us per call")
    for name in ("forward", "backward"):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            cases[name]()
        prof.disable()
        torch.cuda.synchronize()
        print(f"--- {name}: top functions by own time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()

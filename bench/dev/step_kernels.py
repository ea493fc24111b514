"""Where the GPU time of one forward+backward goes: each kernel's time, cuflash.torch beside
torch SDPA, from torch.profiler (the kernels of a call, summed, per call).

    python bench/dev/step_kernels.py [--heads-kv 16 4 1] [--seqlen 4096] [--head-dim 128]

Shape as bench/real_workloads.py's GQA section: batch 1, heads 16, causal, bf16. Prints, per
implementation, the kernels by total time and the sum against the wall time of the call
(CUDA events), so the gaps between kernels show too.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from real_workloads import cuflash_torch, fwd_bwd, rand, sdpa, time_ms  # noqa: E402


def kernel_table(run, calls: int = 10, launches: dict | None = None) -> dict[str, float]:
    """Microseconds per call of each kernel name (``launches``, if given, gets each name's
    launches per call)."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / calls
            if launches is not None:
                launches[event.name] = launches.get(event.name, 0) + 1 / calls
    return dict(totals)


def host_us(run, calls: int = 10) -> float:
    """Microseconds of host time per call: ``calls`` enqueued back to back (too few to fill
    the launch queue, so the host never waits for the GPU), timed by the host clock."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--heads-kv", type=int, nargs="+", default=[16, 4, 1])
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    s, d = args.seqlen, args.head_dim
    for heads_kv in args.heads_kv:
        q, do = rand(1, s, 16, d, grad=True), rand(1, s, 16, d)
        k, v = (rand(1, s, heads_kv, d, grad=True) for _ in range(2))
        print(f"\n== fwd+bwd, batch 1, heads 16/{heads_kv}, seqlen {s}, head_dim {d}, causal")
        for label, attn in (("cuflash", cuflash_torch), ("sdpa", sdpa)):
            run = fwd_bwd(attn, q, k, v, do, True)
            wall = time_ms(run) * 1e3
            table = kernel_table(run)
            print(f"-- {label}: wall {wall:.1f} us, kernels {sum(table.values()):.1f} us, "
                  f"host {host_us(run):.1f} us a call")
            for name, us in sorted(table.items(), key=lambda kv: -kv[1]):
                print(f"   {us:8.1f} us  {name[:100]}")


if __name__ == "__main__":
    main()

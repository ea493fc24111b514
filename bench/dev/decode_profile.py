"""Run cuflash's decode a few times on one problem, for a profiler to watch (ncu):

    ncu --clock-control none -k regex:flash_decode -c 2 --section SpeedOfLight \
        python bench/dev/decode_profile.py --rows 64,2048,8 [--q-len 1]
    python bench/dev/decode_profile.py --rows 1,32768,8 --kernel-times

bf16, head_dim 128, 32 query heads, full caches: the rows of bench/decode.py.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="64,2048,8", help="batch,cache,kv_heads")
    parser.add_argument("--q-len", type=int, default=1)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--kernel-times", action="store_true",
                        help="print each kernel's mean time (torch.profiler) instead")
    args = parser.parse_args(argv)
    import torch

    import cuflash.torch as cft

    batch, cache, heads_kv = (int(x) for x in args.rows.split(","))
    mk = lambda s, h: torch.randn((batch, s, h, 128), device="cuda", dtype=torch.bfloat16)
    q, k, v = mk(args.q_len, 32), mk(cache, heads_kv), mk(cache, heads_kv)
    for _ in range(args.calls):
        cft.attention_with_kvcache(q, k, v, causal=True)
    torch.cuda.synchronize()
    if args.kernel_times:  # split vs combine: where a short call's time goes
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                cft.attention_with_kvcache(q, k, v, causal=True)
            torch.cuda.synchronize()
        kv_bytes = 2 * k.numel() * k.element_size()
        for e in prof.key_averages():
            if e.device_time_total > 0:
                us = e.device_time_total / e.count
                print(f"{args.rows} q_len {args.q_len}: {e.key[:40]:40s} {us:8.2f} us "
                      f"x{e.count} ({kv_bytes / us / 1e6:.2f} TB/s of K+V if alone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

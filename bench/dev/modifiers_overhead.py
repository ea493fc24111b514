"""What the score modifiers cost on the GPU (issue #14's speed targets), one run, side by side.

    python bench/dev/modifiers_overhead.py [--seqlen 4096] [--head-dim 128] [--dtype bfloat16]

Per row: forward and forward+backward median milliseconds (CUDA events, 3 warmups, 10 timed
calls) of plain causal attention and of each modifier (softcap, ALiBi, sinks, all three), and
the ratio to plain (target: <= 1.10); then a sliding window of 4096 at seqlen 32k against full
causal (target: >= 6x faster). Batch 1, 16 heads (GQA 16/4). Prints the specs the plans ran.
"""

from __future__ import annotations

import argparse

import numpy as np


def _time(fn, warmup: int = 3, reps: int = 10) -> float:
    import cupy

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def _inputs(seqlen: int, head_dim: int, dtype: str, heads: int = 16, heads_kv: int = 4):
    import torch  # cupy has no bfloat16: torch tensors (the slopes and sinks too: q's framework)

    dt = getattr(torch, dtype)
    q = torch.randn(1, seqlen, heads, head_dim, device="cuda", dtype=dt)
    k = torch.randn(1, seqlen, heads_kv, head_dim, device="cuda", dtype=dt)
    v = torch.randn_like(k)
    do = torch.randn_like(q)
    slopes = torch.tensor(np.geomspace(0.5, 2.0**-8, heads), device="cuda", dtype=torch.float32)
    sinks = torch.randn(heads, device="cuda", dtype=torch.float32)
    return q, k, v, do, slopes, sinks


def _row(label: str, q, k, v, do, **mods) -> tuple[float, float]:
    import cuflash

    def fwd():
        return cuflash.attention_forward(q, k, v, causal=True, **mods)

    def fwd_bwd():
        o2, s2 = fwd()
        cuflash.attention_backward(do, q, k, v, o2, s2, causal=True, **mods)

    return _time(fwd), _time(fwd_bwd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    q, k, v, do, slopes, sinks = _inputs(args.seqlen, args.head_dim, args.dtype)
    rows = {"plain causal": {}, "softcap 30": dict(softcap=30.0),
            "alibi": dict(alibi_slopes=slopes), "sinks": dict(sinks=sinks),
            "softcap+alibi+sinks": dict(softcap=30.0, alibi_slopes=slopes, sinks=sinks)}
    base = None
    print(f"seqlen {args.seqlen}, d{args.head_dim}, {args.dtype}, 16/4 heads, causal")
    for label, mods in rows.items():
        f, fb = _row(label, q, k, v, do, **mods)
        base = base or (f, fb)
        print(f"{label:22s} fwd {f:8.3f} ms ({f / base[0]:.2f}x)   fwd+bwd {fb:8.3f} ms "
              f"({fb / base[1]:.2f}x)")
    q, k, v, do, _, _ = _inputs(32768, args.head_dim, args.dtype)
    f_full, fb_full = _row("causal 32k", q, k, v, do)
    f_win, fb_win = _row("window 4096", q, k, v, do, window=(4095, 0))
    print(f"seqlen 32k: causal fwd {f_full:.2f} ms, window 4096 fwd {f_win:.2f} ms "
          f"({f_full / f_win:.1f}x faster); fwd+bwd {fb_full:.2f} vs {fb_win:.2f} ms "
          f"({fb_full / fb_win:.1f}x)")


if __name__ == "__main__":
    main()

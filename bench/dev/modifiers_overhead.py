"""What the score modifiers cost on the GPU (issue #14's speed targets), one run, side by side.

    python bench/dev/modifiers_overhead.py [--seqlen 4096] [--head-dim 128] [--dtype bfloat16]

Per row: forward and forward+backward median milliseconds of plain attention (causal, then
not) and of each modifier (softcap, ALiBi, sinks, all three), and the ratio to plain (target:
<= 1.10); then a sliding window of 4096 at seqlen 32k against full causal (target: >= 6x
faster). Batch 1, 16 heads (GQA 16/4). Kernel time: devtools.time_ms, CUDA events around calls
enqueued back to back behind a GPU sleep, so host time is not counted (before
2026-12-02 each call was synchronized, which added the host path to every row alike).
"""

from __future__ import annotations

import argparse

import numpy as np
from devtools import time_ms  # kernel time: calls queued behind a GPU sleep


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


def _row(label: str, q, k, v, do, causal: bool = True, **mods) -> tuple[float, float]:
    import cuflash

    def fwd():
        return cuflash.attention_forward(q, k, v, causal=causal, **mods)

    def fwd_bwd():
        o2, s2 = fwd()
        cuflash.attention_backward(do, q, k, v, o2, s2, causal=causal, **mods)

    return time_ms(fwd, reps=10, warmup=3), time_ms(fwd_bwd, reps=10, warmup=3)


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
    for causal in (True, False):
        base = None
        print(f"seqlen {args.seqlen}, d{args.head_dim}, {args.dtype}, 16/4 heads"
              f"{', causal' if causal else ''}")
        for label, mods in rows.items():
            f, fb = _row(label, q, k, v, do, causal, **mods)
            base = base or (f, fb)
            print(f"{label.replace('plain causal', 'plain'):22s} fwd {f:8.3f} ms "
                  f"({f / base[0]:.2f}x)   fwd+bwd {fb:8.3f} ms ({fb / base[1]:.2f}x)")
    q, k, v, do, _, _ = _inputs(32768, args.head_dim, args.dtype)
    f_full, fb_full = _row("causal 32k", q, k, v, do)
    f_win, fb_win = _row("window 4096", q, k, v, do, window=(4095, 0))
    print(f"seqlen 32k: causal fwd {f_full:.2f} ms, window 4096 fwd {f_win:.2f} ms "
          f"({f_full / f_win:.1f}x faster); fwd+bwd {fb_full:.2f} vs {fb_win:.2f} ms "
          f"({fb_full / fb_win:.1f}x)")


if __name__ == "__main__":
    main()

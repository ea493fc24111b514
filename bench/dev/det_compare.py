"""The backward through the public API, deterministic or not, in TFLOP/s (bf16, 16k tokens,
heads x head_dim = 2048): run it once as is and once with CUFLASH_DISABLE_WGMMA=1 to set the
Hopper deterministic mode (ordered dQ) against the portable one.

    python bench/dev/det_compare.py [HEAD_DIM ...]
"""

from __future__ import annotations

import os
import sys

import torch
from devtools import time_ms

import cuflash


def main(head_dims) -> None:
    mode = "portable (wgmma off)" if os.environ.get("CUFLASH_DISABLE_WGMMA") else "default"
    for d in head_dims:
        for s in (4096, 16384):
            for causal in (False, True):
                b, h = 16384 // s, 2048 // d
                q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
                               for _ in range(4))
                o, stats = cuflash.attention_forward(q, k, v, causal=causal)
                flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
                row = []
                for det in (False, True):
                    ms = time_ms(lambda: cuflash.attention_backward(
                        do, q, k, v, o, stats, causal=causal, deterministic=det))
                    row.append(f"{'det' if det else 'atomic'} {flops / ms / 1e9:6.1f}")
                print(f"{mode:<22} d{d} {s:>5}{' causal' if causal else '       '}  "
                      + "  ".join(row) + " TFLOP/s", flush=True)


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [128])

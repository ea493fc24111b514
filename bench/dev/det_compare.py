"""The backward through the public API, deterministic or not, in TFLOP/s (bf16, 16k tokens,
heads x head_dim = 2048): run it once as is and once with CUFLASH_DISABLE_WGMMA=1 to set the
Hopper deterministic mode (ordered dQ) against the portable one.

    python bench/dev/det_compare.py [HEAD_DIM ...] [--red4]

--red4 also times the deterministic mode with its dQ reduced from registers inside the turns
(specs.with_dq_red4 on the ordered warp-specialized specs, CF_DQ_RED4; session 40).
"""

from __future__ import annotations

import os
import sys

import torch
from devtools import time_ms

import cuflash
from cuflash import fastpath, specs


def main(head_dims, red4: bool = False) -> None:
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
                if red4:
                    with fastpath.selector_patched("select_backward", specs.with_dq_red4):
                        grads = cuflash.attention_backward(do, q, k, v, o, stats,
                                                           causal=causal, deterministic=True)
                        again = cuflash.attention_backward(do, q, k, v, o, stats,
                                                           causal=causal, deterministic=True)
                        same = all(torch.equal(a, b) for a, b in zip(grads, again))
                        ms = time_ms(lambda: cuflash.attention_backward(
                            do, q, k, v, o, stats, causal=causal, deterministic=True))
                    row.append(f"det+red4 {flops / ms / 1e9:6.1f}"
                               f" ({'repeats' if same else 'DIFFERS'})")
                print(f"{mode:<22} d{d} {s:>5}{' causal' if causal else '       '}  "
                      + "  ".join(row) + " TFLOP/s", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    main([int(x) for x in args if x != "--red4"] or [128], red4="--red4" in args)

"""The deterministic backward with a sliding window, TFLOP/s (bf16, 16k tokens, heads x
head_dim = 2048): the atomic mode, the deterministic mode as selected (on Hopper at d64 /
d128 the warp-specialized kernel with ordered dQ in descending key-tile order, since
2026-12-06; tests/test_gpu_ordered_window.py), and the portable kernels with the dQ pass that
it ran before (the portable 16-bit backward, selected with wgmma off).

    python bench/dev/det_window.py [HEAD_DIM ...]

FLOPs count the visible pairs of the band (a query row sees at most left + 1 keys when
causal, left + right + 1 otherwise).
"""

from __future__ import annotations

import sys

import torch
from devtools import time_ms

import cuflash
from cuflash import fastpath, specs

_plain = specs.select_backward


def _portable(facts, dtype, head_dim, causal, deterministic, **kwargs):
    if deterministic and kwargs.get("mods", specs.NO_MODS).window:
        return _plain(facts, dtype, head_dim, causal, deterministic, **{**kwargs, "wgmma": False})
    return _plain(facts, dtype, head_dim, causal, deterministic, **kwargs)


def visible_pairs(s: int, left: int, right: int) -> int:
    return sum(min(s - 1, i + right) - max(0, i - left) + 1 for i in range(s))


def main(head_dims) -> None:
    for d in head_dims:
        for s in (4096, 16384):
            for window, causal in (((1024, 0), True), ((4096, 0), True), ((2048, 2048), False)):
                b, h = 16384 // s, 2048 // d
                q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
                               for _ in range(4))
                o, stats = cuflash.attention_forward(q, k, v, causal=causal, window=window)
                flops = 2.5 * 4 * b * h * d * visible_pairs(s, window[0], window[1])
                row = []
                for label, det, selector in (("atomic", False, _plain),
                                             ("det portable", True, _portable),
                                             ("det ordered", True, _plain)):
                    specs.select_backward = selector
                    fastpath.forget_planned_calls()
                    ms = time_ms(lambda: cuflash.attention_backward(
                        do, q, k, v, o, stats, causal=causal, window=window,
                        deterministic=det))
                    row.append(f"{label} {flops / ms / 1e9:6.1f}")
                specs.select_backward = _plain
                fastpath.forget_planned_calls()
                print(f"d{d} {s:>5} window {window}{' causal' if causal else ''}:  "
                      + "  ".join(row) + " TFLOP/s", flush=True)


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [64, 128])

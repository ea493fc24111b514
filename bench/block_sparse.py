"""Block-sparse attention against dense on the GPU (issue #15): forward and backward time of
the same call with a random block mask of a given density, CUDA-event medians after warm-up.

    python bench/block_sparse.py [--seqlen 16384] [--density 0.1] [--json out.json]

Dense FLOPs are 4 B H S^2 D (x2.5 backward); the sparse call's "dense-equivalent" speed-up is
dense time / sparse time, next to the kept fraction of blocks (the ideal speed-up is about
1 / kept).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _median_ms(fn, reps: int = 20, warmup: int = 3) -> float:
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


def run(batch, heads, seqlen, head_dim, density, causal, dtype, block) -> dict:
    import cupy

    import cuflash

    rng = np.random.default_rng(0)
    shape = (batch, seqlen, heads, head_dim)
    q, k, v, do = (cupy.asarray(rng.standard_normal(shape, dtype=np.float32).astype(dtype))
                   for _ in range(4))
    n = -(-seqlen // block)
    mask = cupy.asarray(rng.random((batch, heads, n, n)) < density)
    mask[..., :, 0] = True  # every row keeps a block
    kept = float(mask.mean())
    out = {"batch": batch, "heads": heads, "seqlen": seqlen, "head_dim": head_dim,
           "causal": causal, "dtype": str(np.dtype(dtype)), "block": block,
           "density_asked": density, "kept": kept}
    for name, bm in (("dense", None), ("sparse", mask)):
        o, stats = cuflash.attention_forward(q, k, v, causal=causal, block_mask=bm)
        out[f"{name}_fwd_ms"] = _median_ms(
            lambda: cuflash.attention_forward(q, k, v, causal=causal, block_mask=bm))
        out[f"{name}_bwd_ms"] = _median_ms(
            lambda: cuflash.attention_backward(do, q, k, v, o, stats, causal=causal,
                                               block_mask=bm))
    flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
    out["dense_fwd_tflops"] = flops / out["dense_fwd_ms"] / 1e9
    out["dense_bwd_tflops"] = 2.5 * flops / out["dense_bwd_ms"] / 1e9
    out["speedup_fwd"] = out["dense_fwd_ms"] / out["sparse_fwd_ms"]
    out["speedup_bwd"] = out["dense_bwd_ms"] / out["sparse_bwd_ms"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--json")
    args = p.parse_args(argv)
    import cupy

    import ml_dtypes

    rows = []
    for d in (int(x) for x in args.head_dims.split(",")):
        for causal in (False, True):
            r = run(args.batch, args.heads, args.seqlen, d, args.density, causal,
                    ml_dtypes.bfloat16, args.block)
            rows.append(r)
            print(f"d{d} {'causal' if causal else 'full  '} kept {r['kept']:.3f}: "
                  f"fwd {r['dense_fwd_ms']:.3f} -> {r['sparse_fwd_ms']:.3f} ms "
                  f"({r['speedup_fwd']:.2f}x; dense {r['dense_fwd_tflops']:.0f} TFLOP/s), "
                  f"bwd {r['dense_bwd_ms']:.3f} -> {r['sparse_bwd_ms']:.3f} ms "
                  f"({r['speedup_bwd']:.2f}x; dense {r['dense_bwd_tflops']:.0f} TFLOP/s)",
                  flush=True)
    if args.json:
        dev = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        with open(args.json, "w") as f:
            json.dump({"device": dev.decode() if isinstance(dev, bytes) else dev,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

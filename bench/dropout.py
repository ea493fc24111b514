"""Fused dropout against the same call without it on the GPU (issue #15): forward, backward
and the step (forward + backward), CUDA-event medians after warm-up, with torch SDPA's own
dropout (its flash backend; cuDNN's takes no dropout) beside when torch is installed.

    python bench/dropout.py [--seqlen 4096,16384] [--head-dims 64,128] [--p 0.1] [--json out.json]

Issue #15 asks that a dropout step cost at most 15% over the same step without dropout.
FLOPs are 4 B H S^2 D forward (halved if causal), 2.5x for the backward.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _ms(fn) -> float:
    from real_workloads import time_ms

    return time_ms(fn, inner=1)


def _queued_ms(fn) -> float:
    """The GPU's time alone (calls queued behind a sleep kernel): ``_ms`` counts the host's
    time before each launch too, and a dropout call with a host seed takes the general path."""
    from real_workloads import queued_ms

    return queued_ms(fn)


def _sdpa(q, k, v, do, causal, p) -> dict:
    """torch SDPA with and without dropout on torch copies of the same inputs (b, h, s, d)."""
    import torch
    import torch.nn.functional as F

    tq, tk, tv, tdo = (torch.from_dlpack(x).transpose(1, 2).contiguous() for x in (q, k, v, do))
    out = {}
    for name, drop in (("sdpa_nodrop", 0.0), ("sdpa_drop", p)):
        def step(drop=drop):
            qq, kk, vv = (x.detach().requires_grad_() for x in (tq, tk, tv))
            F.scaled_dot_product_attention(qq, kk, vv, dropout_p=drop,
                                           is_causal=causal).backward(tdo)

        def fwd(drop=drop):
            with torch.no_grad():
                F.scaled_dot_product_attention(tq, tk, tv, dropout_p=drop, is_causal=causal)

        out[f"{name}_fwd_ms"], out[f"{name}_step_ms"] = _ms(fwd), _ms(step)
    return out


def run(batch, heads, seqlen, head_dim, causal, p, dtype, sdpa=True) -> dict:
    import cupy

    import cuflash

    rng = np.random.default_rng(0)
    shape = (batch, seqlen, heads, head_dim)
    q, k, v, do = (cupy.asarray(rng.standard_normal(shape, dtype=np.float32).astype(dtype))
                   for _ in range(4))
    out = {"batch": batch, "heads": heads, "seqlen": seqlen, "head_dim": head_dim,
           "causal": causal, "dtype": str(np.dtype(dtype)), "dropout_p": p}
    for name, kw in (("nodrop", {}), ("drop", dict(dropout_p=p, dropout_seed=1234,
                                                   dropout_offset=0))):
        o, stats = cuflash.attention_forward(q, k, v, causal=causal, **kw)

        def step(kw=kw):
            o_, s_ = cuflash.attention_forward(q, k, v, causal=causal, **kw)
            cuflash.attention_backward(do, q, k, v, o_, s_, causal=causal, **kw)

        out[f"{name}_fwd_ms"] = _ms(lambda: cuflash.attention_forward(q, k, v, causal=causal,
                                                                      **kw))
        out[f"{name}_bwd_ms"] = _ms(lambda: cuflash.attention_backward(
            do, q, k, v, o, stats, causal=causal, **kw))
        out[f"{name}_step_ms"] = _ms(step)
        out[f"{name}_step_queued_ms"] = _queued_ms(step)
    flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
    for name in ("nodrop", "drop"):
        out[f"{name}_fwd_tflops"] = flops / out[f"{name}_fwd_ms"] / 1e9
        out[f"{name}_bwd_tflops"] = 2.5 * flops / out[f"{name}_bwd_ms"] / 1e9
    out["step_overhead"] = out["drop_step_ms"] / out["nodrop_step_ms"] - 1
    out["step_overhead_queued"] = out["drop_step_queued_ms"] / out["nodrop_step_queued_ms"] - 1
    if sdpa:
        try:
            out.update(_sdpa(q, k, v, do, causal, p))
        except Exception as exc:  # no torch, or no SDPA backend for this shape
            out["sdpa_error"] = f"{type(exc).__name__}: {exc}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seqlen", default="4096,16384")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--causal", default="0,1", help="comma-separated 0 / 1")
    p.add_argument("--p", type=float, default=0.1)
    p.add_argument("--no-sdpa", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import ml_dtypes

    rows = []
    for s in (int(x) for x in args.seqlen.split(",")):
        for d in (int(x) for x in args.head_dims.split(",")):
            for causal in (bool(int(c)) for c in args.causal.split(",")):
                r = run(args.batch, args.heads, s, d, causal, args.p, ml_dtypes.bfloat16,
                        not args.no_sdpa)
                rows.append(r)
                line = (f"s{s} d{d} {'causal' if causal else 'full  '} p={args.p}: "
                        f"fwd {r['nodrop_fwd_ms']:.3f} -> {r['drop_fwd_ms']:.3f} ms "
                        f"({r['drop_fwd_tflops']:.0f} TFLOP/s), "
                        f"bwd {r['nodrop_bwd_ms']:.3f} -> {r['drop_bwd_ms']:.3f} ms "
                        f"({r['drop_bwd_tflops']:.0f}), step {r['nodrop_step_ms']:.3f} -> "
                        f"{r['drop_step_ms']:.3f} ms (+{100 * r['step_overhead']:.1f}%; "
                        f"queued {r['nodrop_step_queued_ms']:.3f} -> "
                        f"{r['drop_step_queued_ms']:.3f}, "
                        f"+{100 * r['step_overhead_queued']:.1f}%)")
                if "sdpa_drop_step_ms" in r:
                    line += (f" | SDPA step {r['sdpa_nodrop_step_ms']:.3f} -> "
                             f"{r['sdpa_drop_step_ms']:.3f} ms")
                print(line, flush=True)
    if args.json:
        from real_workloads import save_rows

        save_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

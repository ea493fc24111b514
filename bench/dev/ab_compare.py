"""Kernel time of two cuflash trees side by side: did a change make a kernel slower?

    python bench/dev/ab_compare.py OLD_TREE NEW_TREE [--rounds 3] [--out ab.json]

Each tree (a directory holding ``cuflash/`` and ``kernels_cu/``, e.g. a ``git archive`` of the
old commit) runs in its own subprocess, alternating round by round so clock drift hits both
alike (old first in even rounds, new first in odd ones). A worker times ``attention_forward`` and ``attention_backward`` on torch tensors (bf16
unless ``--dtype``) with CUDA events (median of 12 groups of 5 calls, after 5 warm-up calls)
at FlashAttention-2's benchmark shapes (16k tokens, heads * head_dim = 2048). The table prints
the best round of each tree and new/old.

``--cudnn`` adds torch SDPA's cuDNN backend, timed the same way in the new tree's worker
(its best round), as a column beside the new tree: #12 / #13's bar in the same process.

Kernel time, not host time: before each timed group of calls the GPU sleeps (``torch.cuda.
_sleep``) long enough for the host to enqueue the whole group, so an older tree's slower
host path cannot leave the GPU idle inside the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SHAPES = [(d, n, c) for d in (64, 128, 256) for n in (1024, 4096, 16384) for c in (False, True)]
TOKENS, WIDTH = 16384, 2048
# Calls per timed group, and the GPU's sleep before it: 2e7 cycles (about 10 ms at 2 GHz)
# cover five calls of the slowest host path measured (about 0.5 ms each, 2026-12-01).
GROUP_CALLS, QUEUE_CYCLES = 5, 20_000_000


def flops(d, n, causal, heads, batch):
    return 4 * batch * heads * n * n * d / (2 if causal else 1)


def cudnn_times(q, k, v, do, causal, timed):
    """SDPA's cuDNN forward and backward ms on the (batch, seqlen, heads, d) tensors, or
    None where the backend refuses the shape."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    dot = do.transpose(1, 2)
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = sdpa(qt, kt, vt, is_causal=causal)
            fwd = timed(lambda: sdpa(qt, kt, vt, is_causal=causal))
            bwd = timed(lambda: torch.autograd.grad(out, (qt, kt, vt), dot, retain_graph=True))
    except RuntimeError as exc:
        print(f"cuDNN refused d{q.shape[-1]} n{q.shape[1]}: {str(exc)[:100]}", file=sys.stderr)
        return None
    return fwd, bwd


def worker(shapes, dtype_name, with_cudnn=False):
    import torch
    import cuflash

    dtype = getattr(torch, dtype_name)

    def timed(fn, reps=12, calls=GROUP_CALLS):
        for _ in range(5):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            torch.cuda._sleep(QUEUE_CYCLES)  # the host enqueues the group meanwhile
            s.record()
            for _ in range(calls):
                fn()
            e.record()
            e.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / calls

    rows = []
    for d, n, causal in shapes:
        heads, batch = WIDTH // d, max(1, TOKENS // n)
        q, k, v, do = (torch.randn(batch, n, heads, d, device="cuda", dtype=dtype)
                       for _ in range(4))
        o, stats = cuflash.attention_forward(q, k, v, causal=causal)
        fwd = timed(lambda: cuflash.attention_forward(q, k, v, causal=causal))
        bwd = timed(lambda: cuflash.attention_backward(do, q, k, v, o, stats, causal=causal))
        f = flops(d, n, causal, heads, batch)
        rows.append({"head_dim": d, "seqlen": n, "causal": causal,
                     "fwd_tflops": f / fwd / 1e9, "bwd_tflops": 2.5 * f / bwd / 1e9})
        peer = cudnn_times(q, k, v, do, causal, timed) if with_cudnn else None
        if peer:
            rows[-1].update(cudnn_fwd_tflops=f / peer[0] / 1e9,
                            cudnn_bwd_tflops=2.5 * f / peer[1] / 1e9)
        del q, k, v, do, o, stats
    print(json.dumps(rows))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("trees", nargs="*")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--head-dims", default="64,128,256", help="comma-separated")
    p.add_argument("--seqlens", default="1024,4096,16384", help="comma-separated")
    p.add_argument("--dtype", default="bfloat16", help="torch dtype name (bfloat16, float32)")
    p.add_argument("--cudnn", action="store_true", help="time SDPA's cuDNN beside the new tree")
    p.add_argument("--worker", action="store_true")
    args = p.parse_args()
    dims = {int(d) for d in args.head_dims.split(",")}
    lens = {int(n) for n in args.seqlens.split(",")}
    shapes = [s for s in SHAPES if s[0] in dims and s[1] in lens]
    if args.worker:
        return worker(shapes, args.dtype, args.cudnn)
    old, new = (os.path.abspath(t) for t in args.trees)
    best = {}
    for r in range(args.rounds):
        # which tree goes first alternates too: in one call the second of two back-to-back
        # processes ran at lower clocks (1.791 vs 1.813 GHz under ncu, 2026-12-04)
        order = (("old", old), ("new", new))
        for tag, tree in order if r % 2 == 0 else order[::-1]:
            env = dict(os.environ, PYTHONPATH=tree)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                                  "--head-dims", args.head_dims, "--seqlens", args.seqlens,
                                  "--dtype", args.dtype,
                                  *(["--cudnn"] if args.cudnn and tag == "new" else [])],
                                 env=env, cwd=tree, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:])
                raise SystemExit(f"{tag} worker failed")
            line = out.stdout.strip().splitlines()[-1]
            print(f"round {r} {tag}: {line}", flush=True)  # kept even if a later round dies
            for row in json.loads(line):
                key = (tag, row["head_dim"], row["seqlen"], row["causal"])
                prev = best.get(key)
                for m in ("fwd_tflops", "bwd_tflops", "cudnn_fwd_tflops", "cudnn_bwd_tflops"):
                    if m in row:
                        row[m] = max(row[m], prev.get(m, 0)) if prev else row[m]
                best[key] = row
    table = []
    print(f"{'d':>4} {'n':>6} {'causal':>6} | {'fwd old':>8} {'new':>8} {'x':>6} |"
          f" {'bwd old':>8} {'new':>8} {'x':>6}" + (" | cuDNN fwd   bwd  new/cuDNN fwd  bwd"
                                                     if args.cudnn else ""))
    for d, n, c in shapes:
        o, w = best[("old", d, n, c)], best[("new", d, n, c)]
        fx, bx = w["fwd_tflops"] / o["fwd_tflops"], w["bwd_tflops"] / o["bwd_tflops"]
        table.append({"head_dim": d, "seqlen": n, "causal": c, "old": o, "new": w,
                      "fwd_ratio": fx, "bwd_ratio": bx})
        peer = ""
        if "cudnn_fwd_tflops" in w:
            peer = (f" | {w['cudnn_fwd_tflops']:9.1f} {w['cudnn_bwd_tflops']:5.1f}"
                    f"  {w['fwd_tflops'] / w['cudnn_fwd_tflops']:13.3f}"
                    f" {w['bwd_tflops'] / w['cudnn_bwd_tflops']:4.3f}")
        print(f"{d:>4} {n:>6} {str(c):>6} | {o['fwd_tflops']:8.1f} {w['fwd_tflops']:8.1f} "
              f"{fx:6.3f} | {o['bwd_tflops']:8.1f} {w['bwd_tflops']:8.1f} {bx:6.3f}{peer}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rounds": args.rounds, "dtype": args.dtype, "rows": table}, f, indent=1)


if __name__ == "__main__":
    main()

"""Varlen against dense at equal total tokens on the GPU (issue #14's target: within 5%).

    python bench/dev/varlen_bench.py [--tokens 16384] [--head-dim 128] [--dtype bfloat16]
                                     [--heads 16] [--heads-kv 16] [--rounds 5] [--tma]

Per row: the dense call on (batch, seqlen, heads, head_dim) and the varlen call on the same
sequences packed (cu_seqlens = 0, seqlen, 2 seqlen, ...), forward and backward median
milliseconds (CUDA events around calls enqueued back to back behind a sleep kernel, so the
host keeps ahead as in training: devtools.time_ms, 10 timed calls a round; the median of the
rounds, the two alternating) and varlen / dense (target <= 1.05). Session 27 timed each once,
dense first, and saw 1.107 at 2 x 8192 where the two kernels' loops are the same length in
SASS. Until session 32 each call was timed alone on an idle GPU (a sync after each), which
counted the host's time before the launch as well: the varlen call's host path is longer,
so its ratio came out high at short kernels (32 x 512). ``--idle`` times that way still
(latency on an idle GPU).
Both through the public API on torch CUDA tensors (the varlen call never syncs: its offsets
stay on the device). Then mixed lengths (informational):
varlen on random lengths vs dense padded to the longest. Prints the specs the plans ran.
``--tma``: packed sequences' forward and backward (atomic dQ) load with bulk tensor copies too
(candidates, specs.with_forward_tma / with_backward_tma; tests/test_gpu_varlen_tma.py checks
them first).
"""

from __future__ import annotations

import argparse

import numpy as np


IDLE = False  # --idle: each call alone on an idle GPU, its host time included


def _time(fn, warmup: int = 3, reps: int = 10) -> float:
    import torch

    if not IDLE:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from devtools import time_ms

        return time_ms(fn, reps=reps, warmup=warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return float(np.median(times))


def _pair(batch, seqlen, heads, heads_kv, head_dim, dtype, causal, rounds):
    """(dense fwd, dense bwd, varlen fwd, varlen bwd) ms for batch sequences of seqlen: the
    median over ``rounds`` rounds, dense and varlen alternating (which goes first too), so
    clocks that sag under a long run weigh on both alike."""
    import torch

    import cuflash

    dt = getattr(torch, dtype)
    q = torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dt)
    k = torch.randn(batch, seqlen, heads_kv, head_dim, device="cuda", dtype=dt)
    v, do = torch.randn_like(k), torch.randn_like(q)
    o, stats = cuflash.attention_forward(q, k, v, causal=causal)
    pq, pk, pv, pdo = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v, do))
    cu = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * seqlen
    po, pstats = cuflash.attention_varlen_forward(pq, pk, pv, cu, cu, seqlen, seqlen,
                                                  causal=causal)
    calls = (lambda: cuflash.attention_forward(q, k, v, causal=causal),
             lambda: cuflash.attention_backward(do, q, k, v, o, stats, causal=causal),
             lambda: cuflash.attention_varlen_forward(pq, pk, pv, cu, cu, seqlen, seqlen,
                                                      causal=causal),
             lambda: cuflash.attention_varlen_backward(pdo, pq, pk, pv, po, pstats, cu, cu,
                                                       seqlen, seqlen, causal=causal))
    times = [[] for _ in calls]
    for r in range(rounds):
        order = (0, 2, 1, 3) if r % 2 == 0 else (2, 0, 3, 1)
        for i in order:
            times[i].append(_time(calls[i]))
    return tuple(float(np.median(t)) for t in times)


def _mixed(tokens, heads, heads_kv, head_dim, dtype, seed=0):
    """Random lengths summing to about ``tokens``: varlen fwd / bwd vs dense padded."""
    import torch

    import cuflash

    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(rng.integers(64, 4096)))
    lengths[-1] -= sum(lengths) - tokens
    longest, batch = max(lengths), len(lengths)
    dt = getattr(torch, dtype)
    pq = torch.randn(tokens, heads, head_dim, device="cuda", dtype=dt)
    pk = torch.randn(tokens, heads_kv, head_dim, device="cuda", dtype=dt)
    pv, pdo = torch.randn_like(pk), torch.randn_like(pq)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), device="cuda",
                      dtype=torch.int32)
    po, pstats = cuflash.attention_varlen_forward(pq, pk, pv, cu, cu, longest, longest,
                                                  causal=True)
    q = torch.randn(batch, longest, heads, head_dim, device="cuda", dtype=dt)
    k = torch.randn(batch, longest, heads_kv, head_dim, device="cuda", dtype=dt)
    v, do = torch.randn_like(k), torch.randn_like(q)
    o, stats = cuflash.attention_forward(q, k, v, causal=True)
    return batch, longest, (
        _time(lambda: cuflash.attention_varlen_forward(pq, pk, pv, cu, cu, longest, longest,
                                                       causal=True)),
        _time(lambda: cuflash.attention_varlen_backward(pdo, pq, pk, pv, po, pstats, cu, cu,
                                                        longest, longest, causal=True)),
        _time(lambda: cuflash.attention_forward(q, k, v, causal=True)),
        _time(lambda: cuflash.attention_backward(do, q, k, v, o, stats, causal=True)))


def _specs(tokens, heads, heads_kv, head_dim, dtype):
    from dataclasses import replace

    from cuflash import launch, plan
    from cuflash.specs import ModFlags

    for seqlen, causal in ((2048, True), (8192, False)):
        shape = plan.Shape(tokens // seqlen, seqlen, seqlen, heads, heads_kv, head_dim, dtype,
                           causal)
        packed = replace(shape, mods=ModFlags(varlen=True), total_q=tokens, total_k=tokens)
        for label, s in (("dense", shape), ("varlen", packed)):
            f = launch.forward_plan(s, 0)
            b = launch.backward_plan(s, 0, False)
            print(f"  {label} {shape.batch} x {seqlen}{' causal' if causal else ''}: "
                  f"{', '.join(f.labels + b.labels)} grid {f.kernel.grid}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--heads-kv", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tma", action="store_true", help="the packed TMA candidates")
    ap.add_argument("--idle", action="store_true",
                    help="time each call alone on an idle GPU (host time included)")
    args = ap.parse_args()
    global IDLE
    IDLE = args.idle
    if args.tma:
        from cuflash import fastpath, specs

        boxed = specs.boxed_where("varlen")
        with fastpath.selector_patched("select_forward", boxed), \
                fastpath.selector_patched("select_backward", boxed):
            return _report(args)
    _report(args)


def _report(args) -> None:
    h, hkv, d, dt = args.heads, args.heads_kv, args.head_dim, args.dtype
    print(f"{args.tokens} tokens, d{d}, {dt}, {h}/{hkv} heads; ms (varlen / dense)")
    worst = 0.0
    for causal in (False, True):
        for seqlen in (512, 2048, 8192):
            batch = args.tokens // seqlen
            df, db, vf, vb = _pair(batch, seqlen, h, hkv, d, dt, causal, args.rounds)
            worst = max(worst, vf / df, vb / db)
            print(f"{'causal' if causal else 'full':6s} {batch:3d} x {seqlen:5d}  fwd dense "
                  f"{df:7.3f} varlen {vf:7.3f} ({vf / df:.3f})   bwd dense {db:7.3f} varlen "
                  f"{vb:7.3f} ({vb / db:.3f})")
    print(f"worst varlen / dense: {worst:.3f} (target <= 1.05)")
    batch, longest, (vf, vb, pf, pb) = _mixed(args.tokens, h, hkv, d, dt)
    print(f"mixed lengths, causal: {batch} sequences (longest {longest}): varlen fwd {vf:.3f} "
          f"bwd {vb:.3f}; dense padded to {longest}: fwd {pf:.3f} bwd {pb:.3f}")
    _specs(args.tokens, h, hkv, d, dt)


if __name__ == "__main__":
    main()

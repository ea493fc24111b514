"""Pieces the GPU dev checks share (check_fwd90.py, check_bwd90.py): shapes, inputs, timing."""

from __future__ import annotations

import statistics

import torch

# (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim): tails both ways, GQA, one query,
# head_dim below its bucket (120, 56).
SHAPES = [
    (2, 256, 256, 4, 4, 128), (1, 1000, 777, 3, 1, 128), (2, 130, 515, 4, 2, 64),
    (1, 517, 129, 2, 2, 64), (1, 64, 300, 2, 1, 256), (1, 333, 333, 2, 2, 256),
    (1, 2048, 2048, 2, 2, 128), (3, 1, 70, 2, 2, 128), (1, 200, 200, 2, 2, 120),
    (1, 90, 333, 2, 1, 56),
]


def random_inputs(shape, dtype, with_do=False):
    """Fresh standard-normal q, k, v (and do) on the GPU for one SHAPES entry."""
    b, sq, sk, h, hk, d = shape
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    if not with_do:
        return q, k, v
    return q, k, v, torch.randn(b, sq, h, d, device="cuda", dtype=dtype)


def time_ms(fn, reps=30, warmup=5):
    """Median CUDA-event time of calls enqueued back to back (the host keeps ahead, as in
    training), as bench/attention_sweep.py does: per-call host overhead is not counted."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    torch.cuda._sleep(50_000_000)  # ~25 ms of GPU work so the host gets ahead of the queue
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)

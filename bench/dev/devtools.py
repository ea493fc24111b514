"""Pieces the GPU dev scripts share (tile_sweep.py): timing, a pinned kernel's run."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/: real_workloads
from real_workloads import queued_ms  # noqa: E402


def time_ms(fn, reps=30, warmup=5):
    """Median CUDA-event time of calls enqueued back to back (the host keeps ahead, as in
    training), as bench/attention_sweep.py does: per-call host overhead is not counted
    (real_workloads.queued_ms)."""
    return queued_ms(fn, reps, warmup)


def fwd_block_m(kind: str, warps: int) -> int:
    """Query rows of a forward tile of ``warps`` warps: 16 per warp, but a fwd90 tile past 8
    warps is warp-specialized (registry.fwd90_warp_specialized): 4 of its warps copy."""
    return 16 * (warps - 4) if kind == "fwd90" and warps > 8 else 16 * warps


# -- one pinned kernel through the library's launcher -----------------------------------------
# A tuning run must time the tile it names: cuflash memoizes its plans, so swapping the
# selector does nothing after the first call. Instead build the plan with the spec pinned
# (cuflash.plan's ``spec=``; extra -D defines as ``spec.with_knobs(...)``, which are in the
# spec's name and cache key) and launch it on torch's current stream.

def _operand(t):
    from cuflash.launch import Operand

    return Operand(t.data_ptr(), *t.stride()[:3], t.element_size())


def _shape(q, k, v, causal):
    """The plan's Shape; v of its own head_dim sets ``head_dim_v``."""
    from cuflash.plan import Shape

    b, sq, h, d = q.shape
    dv = v.shape[3]
    return Shape(batch=b, seqlen_q=sq, seqlen_k=k.shape[1], heads=h, heads_kv=k.shape[2],
                 head_dim=d, dtype=str(q.dtype).split(".")[1], causal=causal,
                 head_dim_v=dv if dv != d else 0)


def pinned_forward(spec, q, k, v, causal):
    """(o, m, l) of the forward run with ``spec`` (torch tensors on the GPU); o at v's
    head_dim."""
    from cuflash import launch, plan

    device = q.device.index
    p = plan.plan_forward(_shape(q, k, v, causal), launch.device_facts(device), spec=spec)
    o = q.new_empty(*q.shape[:3], v.shape[3])
    m, l = (torch.empty(q.shape[0], q.shape[2], q.shape[1], device=q.device,
                        dtype=torch.float32) for _ in range(2))
    launch.run_forward(p, *map(_operand, (q, k, v, o)), m.data_ptr(), l.data_ptr(),
                       q.shape[3] ** -0.5, torch.cuda.current_stream().cuda_stream, device)
    return o, m, l


def pinned_backward(spec, do, q, k, v, o, m, l, causal):
    """(dq, dk, dv) of the backward run with ``spec`` as its dK/dV kernel."""
    from cuflash import launch, plan

    device = q.device.index
    p = plan.plan_backward(_shape(q, k, v, causal), launch.device_facts(device),
                           spec.deterministic, spec=spec)
    workspace = torch.empty(plan.backward_workspace(p).total_bytes, device=q.device,
                            dtype=torch.uint8)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    launch.run_backward(p, *map(_operand, (do, q, k, v, o)), m.data_ptr(), l.data_ptr(),
                        *map(_operand, (dq, dk, dv)), q.shape[3] ** -0.5,
                        workspace.data_ptr(), torch.cuda.current_stream().cuda_stream, device)
    return dq, dk, dv

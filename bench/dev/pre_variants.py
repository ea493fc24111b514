"""The backward's preprocess in variants, side by side at one shape: CUDA-event medians.

    python bench/dev/pre_variants.py [--shape 1,16,4,4096,128] [--passes 4 2 1]
        [--convert-passes 4 2 1]

Each variant is the planner's preprocess launch with the knob ``CF_PRE_PASSES`` (how many passes
of rows a lane loads together; kernels_cu/flash_bwd_pre.cu), launched alone with the
arguments the backward gives it (dQ accumulator zeroed in the pass, tiled where the planner
tiles it). Also: the preprocess without the zeroing plus a memset of the accumulator, and a
device-to-device copy of as many bytes as the preprocess moves (the rate to aim at). The
variants' delta and lse2 are checked bit-equal to the default's. Where the plan converts split
kv heads' dK, dV accumulators (GQA), the row-major convert too, with ``CF_CONVERT_PASSES``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from real_workloads import time_ms  # noqa: E402

from cuflash import launch, validate  # noqa: E402
from cuflash import plan as planning  # noqa: E402


def event_us(fn) -> float:
    return time_ms(fn, reps=30, inner=10) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1,16,4,4096,128", help="batch,heads,heads_kv,seqlen,d")
    p.add_argument("--passes", type=int, nargs="+", default=[4, 2, 1])
    p.add_argument("--convert-passes", type=int, nargs="+", default=[4, 2, 1])
    args = p.parse_args()
    b, h, hkv, s, d = map(int, args.shape.split(","))
    bf16 = torch.bfloat16

    def rand(heads):
        return torch.randn(b, s, heads, d, device="cuda", dtype=bf16)

    q, k, v, o, do = rand(h), rand(hkv), rand(hkv), rand(h), rand(h)
    m = torch.randn(b, h, s, device="cuda")
    l = torch.rand(b, h, s, device="cuda") + 1
    problem = validate.check_backward(do, q, k, v, o, m, l, causal=True, softmax_scale=None)
    shape = planning.Shape.of(problem)
    plan = launch.backward_plan(shape, 0, False)
    ws = planning.backward_workspace(plan)
    workspace = torch.empty(ws.total_bytes, dtype=torch.uint8, device="cuda")
    base = workspace.data_ptr()
    tile_d = plan.main.spec.head_dim if plan.main.spec.dq_tiled else 0
    dq_accum = base + ws.dq_accum if ws.dq_accum is not None else 0
    stream = torch.cuda.current_stream().cuda_stream
    o_op, do_op = (launch.Operand(x.data_ptr(), *x.stride()[:3], 2) for x in (o, do))

    def run(pre, zero: bool):
        for b0, z in launch._batch_slices(pre, shape.batch):
            assert b0 == 0, "one launch: the bench's shapes keep grid z small"
            call_args = (o_op.ptr, do_op.ptr, m.data_ptr(), l.data_ptr(), base + ws.delta,
                         base + ws.lse2, s, h, d, *launch._strides(o_op, do_op),
                         0, 0, dq_accum if zero else 0, tile_d,
                         *launch.DENSE.kernel_args(0))
            launch._launch(pre, 0, z, launch._SIGNATURES["bwd_pre"], call_args, stream, shape)

    rows = b * h * s
    moved = 2 * rows * d * 2 + 2 * rows * 4 + 2 * rows * 4 + ws.dq_accum_bytes
    print(f"shape b{b} h{h}/{hkv} s{s} d{d}; grid {plan.pre.grid}; tiled dQ {tile_d}; "
          f"{moved / 1e6:.0f} MB moved")
    reference = None
    for passes in args.passes:
        spec = plan.pre.spec.with_knobs(CF_PRE_PASSES=passes)
        pre = dataclasses.replace(plan.pre, spec=spec)
        us = event_us(lambda: run(pre, True))
        stats = torch.cat([workspace[at: at + 4 * rows] for at in (ws.delta, ws.lse2)])
        if reference is None:
            reference = stats
        same = torch.equal(stats, reference)
        print(f"passes {passes}: {us:7.1f} us  {moved / us / 1e6:5.2f} TB/s  "
              f"delta/lse2 {'bit-equal' if same else 'DIFFER'}")
    pre = dataclasses.replace(plan.pre, spec=plan.pre.spec.with_knobs(CF_PRE_PASSES=4))
    read_only = event_us(lambda: run(pre, False))
    accum = workspace[ws.dq_accum: ws.dq_accum + ws.dq_accum_bytes] if dq_accum else None
    memset = event_us(lambda: accum.zero_()) if accum is not None else 0.0
    print(f"no zeroing: {read_only:7.1f} us; + memset of the accumulator {memset:7.1f} us "
          f"= {read_only + memset:7.1f} us")
    if plan.kv_convert is not None and ws.dk_accum is not None:
        kv_row = 4 * s * hkv * d
        workspace[ws.dk_accum: ws.dk_accum + b * kv_row].view(torch.float32).normal_()
        dk = torch.empty_like(k)
        dk_op = launch.Operand(dk.data_ptr(), *dk.stride()[:3], 2)
        kv_bytes = b * s * hkv * d * (4 + 2)
        first = None
        for passes in args.convert_passes:
            conv = dataclasses.replace(
                plan.kv_convert, spec=plan.kv_convert.spec.with_knobs(CF_CONVERT_PASSES=passes))
            us = event_us(lambda: launch._convert(conv, base + ws.dk_accum, kv_row, dk_op, s, hkv,
                                                  shape, 0, stream))
            out = dk.clone()
            first = out if first is None else first
            same = "bit-equal" if torch.equal(out, first) else "DIFFER"
            print(f"kv convert, passes {passes}: {us:7.1f} us  {kv_bytes / us / 1e6:5.2f} TB/s  "
                  f"grid {plan.kv_convert.grid}  {same}")
    src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = event_us(lambda: dst.copy_(src))
    print(f"copy of {moved // 2 / 1e6:.0f} MB: {copy:7.1f} us  {moved / copy / 1e6:5.2f} TB/s")


if __name__ == "__main__":
    main()

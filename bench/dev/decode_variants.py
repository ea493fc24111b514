"""Time decode spec variants (keys per step, stages, resident blocks per SM) on the GPU, each
pinned in the plan (``decode.plan_decode(spec=...)``), to pick ``decode._KEYS`` and
``DecodeSpec.min_blocks`` from measurements instead of the bytes-in-flight reasoning they
come from now (docs/decode.md).

    python bench/dev/decode_variants.py [--rows 8,8192,8 1,32768,32] [--q-len 1] [--reps 20]

For every (problem, variant): NVRTC's register / spill report for the device's arch (spilling
variants are skipped), the output checked against the selected spec's (max |diff| <= 2e-2),
then the CUDA-event median of a CUDA graph of 10 calls; K+V TB/s, splits and blocks.
--help works without a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

CALLS, HEADS, HEAD_DIM = 10, 32, 128


def _median_ms(torch, fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS)
    return statistics.median(times)


def _pinned_call(torch, spec, q, k, v):
    """cuflash's decode with ``spec`` pinned: the public call's launch path, other plan."""
    from cuflash import decode, fastpath, launch

    backend = fastpath.torch_backend()
    problem = decode._problem(backend, q, k, v, {}, dict(causal=False, softmax_scale=None,
                                                         window=None, softcap=None,
                                                         num_splits=None))
    index = torch.cuda.current_device()
    plan = decode.plan_decode(problem.shape, launch.device_facts(index).sm_count, spec=spec)

    def call():
        o = torch.empty_like(q)
        lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32,
                          device=q.device)
        work = torch.empty(max(plan.workspace_bytes, 1), dtype=torch.uint8, device=q.device)
        ops = decode._operands(backend, q, k, v, {}, o, lse, problem.shape)
        decode.run_decode(plan, problem, ops, work.data_ptr(), backend.stream(), index)
        return o
    return call, plan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["8,8192,8", "1,32768,32", "8,8192,32"],
                        help="batch,cache,kv_heads problems")
    parser.add_argument("--q-len", type=int, default=1)
    parser.add_argument("--keys", default="1,2,4,8")
    parser.add_argument("--stages", default="1,2")
    parser.add_argument("--min-blocks", default="2,3,4")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    import torch

    from cuflash import compiler, decode, launch

    arch = launch.device_facts(torch.cuda.current_device()).arch
    ints = lambda text: [int(x) for x in text.split(",")]
    for text in args.rows:
        batch, cache, heads_kv = ints(text)
        gen = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda s, h: torch.randn((batch, s, h, HEAD_DIM), device="cuda",
                                      dtype=torch.bfloat16, generator=gen)
        q, k, v = mk(args.q_len, HEADS), mk(cache, heads_kv), mk(cache, heads_kv)
        kv_bytes = 2 * k.numel() * k.element_size()
        selected = decode.select_decode("bfloat16", HEAD_DIM, args.q_len * HEADS // heads_kv)
        want = _pinned_call(torch, selected, q, k, v)[0]()
        print(f"-- batch {batch} cache {cache} kv heads {heads_kv} q_len {args.q_len}; "
              f"selected {selected.name}")
        for keys, stages, blocks in itertools.product(ints(args.keys), ints(args.stages),
                                                      ints(args.min_blocks)):
            spec = decode.DecodeSpec("bfloat16", HEAD_DIM, selected.rows, keys, stages, blocks)
            split = [r for r in compiler.compile_report(spec, arch)
                     if r.function == "flash_decode_split"][0]
            if split.spills or split.stack_bytes:
                print(f"{spec.name:36s} skipped: {split.registers} regs, {split.spills} B spilled")
                continue
            call, plan = _pinned_call(torch, spec, q, k, v)
            diff = float((call().float() - want.float()).abs().max())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                call()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(CALLS):
                    call()
            ms = _median_ms(torch, graph.replay, args.reps)
            flag = "" if diff <= 2e-2 else f"  WRONG (max diff {diff:.3g})"
            print(f"{spec.name:36s} {split.registers:4d} regs  {kv_bytes / ms / 1e9:5.2f} TB/s  "
                  f"splits {plan.num_splits:3d}  blocks {plan.grid[0] * plan.grid[1]:5d}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

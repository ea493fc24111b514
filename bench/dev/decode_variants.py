"""Time decode spec variants on the GPU, each pinned in the plan (``decode.plan_decode(spec=
...)``), to pick ``decode._KEYS`` / ``DecodeSpec.min_blocks`` (SIMT split) and
``decode._MMA_TILES`` (tensor-core split) from measurements instead of the bytes-in-flight
reasoning they come from now (docs/decode.md).

    python bench/dev/decode_variants.py [--rows 8,8192,8 1,32768,32] [--q-len 1 4] [--reps 20]
    python bench/dev/decode_variants.py --mma [--block-n 32,64,128] [--stages 2,3,4]
        [--warps 2,4] [--min-blocks 2,3]

    python bench/dev/decode_variants.py --decode16 [--out decode16.json]

SIMT variants: keys per step x stages x min_blocks at the selected row bucket. --mma: the
tensor-core split's tile keys x ring stages x warps x min_blocks at its row bucket (16, 32
or 64 rows), plus the selected spec and the SIMT spec of the same rows for reference.
For every (problem, q_len, variant): NVRTC's register / spill report for the device's arch
(spilling variants, and those whose shared memory exceeds the device's, are skipped), the
output checked against the selected spec's (max |diff| <= 2e-2), then the CUDA-event median
of a CUDA graph of 10 calls; K+V TB/s, splits and blocks. --help works without a GPU.

--decode16: issue 16's open rows in one process (bench/dev/decode16.py): the selection
against its candidate specs and knobs at the GQA rows (beside SDPA's cuDNN), GQA q_len 2 / 4
/ 8 and paged GQA, one compact table, under a minute or two of GPU time.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: decode.py's timer
from decode import _events_ms as _median_ms, _graph_of  # noqa: E402  (CALLS per graph)

HEADS, HEAD_DIM = 32, 128


def _pinned_call(torch, spec, q, k, v, given=None, causal=False, num_splits=None):
    """cuflash's decode with ``spec`` pinned: the public call's launch path, other plan.
    ``given``: the optional arrays by name (cache_seqlens, block_table); ``num_splits``: at
    most that many splits instead of auto_splits' count."""
    from cuflash import decode, fastpath, launch

    given = given or {}
    backend = fastpath.torch_backend()
    problem = decode._problem(backend, q, k, v, given, dict(causal=causal, softmax_scale=None,
                                                            window=None, softcap=None,
                                                            num_splits=None))
    index = torch.cuda.current_device()
    plan = decode.plan_decode(problem.shape, launch.device_facts(index).sm_count, num_splits,
                              spec=spec)

    def call():
        o = torch.empty_like(q)
        lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32,
                          device=q.device)
        work = torch.empty(max(plan.workspace_bytes, 1), dtype=torch.uint8, device=q.device)
        ops = decode._operands(backend, q, k, v, given, o, lse, problem.shape)
        decode.run_decode(plan, problem, ops, work.data_ptr(), backend.stream(), index)
        return o
    return call, plan


def _variants(args, decode, selected, ints, rows_needed):
    """The specs to time for one problem: SIMT grid, or --mma's (plus two references: the
    selected spec and the SIMT spec of the problem's rows)."""
    if not args.mma:  # the SIMT row bucket, whichever split select_decode picked
        simt_rows = decode.row_bucket(rows_needed)
        return [decode.DecodeSpec("bfloat16", HEAD_DIM, simt_rows, keys, stages, blocks)
                for keys, stages, blocks in itertools.product(
                    ints(args.keys), ints(args.stages), ints(args.min_blocks))]
    rows = selected.rows if isinstance(selected, decode.DecodeMmaSpec) else 16
    simt_rows = decode.row_bucket(rows_needed)
    out = [selected, decode.DecodeSpec("bfloat16", HEAD_DIM, simt_rows,
                                       *decode._KEYS[simt_rows][0])]
    refused = 0
    for block_n, stages, warps, blocks in itertools.product(
            ints(args.block_n), ints(args.stages), ints(args.warps), ints(args.min_blocks)):
        try:
            spec = decode.DecodeMmaSpec("bfloat16", HEAD_DIM, block_n, stages, warps, blocks,
                                        rows)
        except ValueError:  # a tile the warps cannot share, rows the warps cannot band
            refused += 1
            continue
        if spec not in out:
            out.append(spec)
    if refused:
        print(f"   ({refused} combinations the kernel cannot run: DecodeMmaSpec refused them)")
    return out


_REPORTS: dict = {}  # spec name -> the split kernel's compile report


def _time_problem(torch, args, batch, cache, heads_kv, q_len, ints, arch, smem_optin):
    from cuflash import compiler, decode

    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda s, h: torch.randn((batch, s, h, HEAD_DIM), device="cuda", dtype=torch.bfloat16,
                                  generator=gen)
    q, k, v = mk(q_len, HEADS), mk(cache, heads_kv), mk(cache, heads_kv)
    kv_bytes = 2 * k.numel() * k.element_size()
    rows = q_len * HEADS // heads_kv
    selected = decode.select_decode("bfloat16", HEAD_DIM, rows)
    want = _pinned_call(torch, selected, q, k, v)[0]()
    print(f"-- batch {batch} cache {cache} kv heads {heads_kv} q_len {q_len}; "
          f"selected {selected.name}")
    variants = _variants(args, decode, selected, ints, rows)
    specs = [x for x in variants if x.name not in _REPORTS]
    with ThreadPoolExecutor(16) as pool:  # NVRTC runs outside the GIL; each spec once
        for spec, reports in zip(specs, pool.map(lambda x: compiler.compile_report(x, arch),
                                                 specs)):
            _REPORTS[spec.name] = [r for r in reports if r.function == "flash_decode_split"][0]
    for spec in variants:
        if spec.smem_bytes > smem_optin:
            print(f"{spec.name:40s} skipped: {spec.smem_bytes} B shared memory")
            continue
        split = _REPORTS[spec.name]
        if split.spills or split.stack_bytes:
            print(f"{spec.name:40s} skipped: {split.registers} regs, {split.spills} B spilled")
            continue
        call, plan = _pinned_call(torch, spec, q, k, v)
        diff = float((call().float() - want.float()).abs().max())
        ms = _median_ms(torch, _graph_of(torch, call).replay, args.reps)
        flag = "" if diff <= 2e-2 else f"  WRONG (max diff {diff:.3g})"
        print(f"{spec.name:40s} {split.registers:4d} regs  {kv_bytes / ms / 1e9:5.2f} TB/s  "
              f"splits {plan.num_splits:3d}  blocks {plan.grid[0] * plan.grid[1]:5d}{flag}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["8,8192,8", "1,32768,32", "8,8192,32"],
                        help="batch,cache,kv_heads problems")
    parser.add_argument("--q-len", type=int, nargs="+", default=[1])
    parser.add_argument("--keys", default="1,2,4,8", help="SIMT: keys per lane group a step")
    parser.add_argument("--stages", default=None,
                        help="SIMT: 1,2 (register stages); --mma: 2,3,4 (ring stages)")
    parser.add_argument("--min-blocks", default="2,3,4")
    parser.add_argument("--mma", action="store_true", help="time the tensor-core split")
    parser.add_argument("--block-n", default="32,64,128", help="--mma: keys per tile")
    parser.add_argument("--warps", default="2,4", help="--mma: warps per block")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--decode16", action="store_true",
                        help="issue 16's candidates at its open rows (bench/dev/decode16.py)")
    parser.add_argument("--out", default=None, help="--decode16: JSON of every timing")
    args = parser.parse_args(argv)
    if args.decode16:
        from decode16 import run_suite  # bench/dev/, beside this file

        return run_suite(args.reps, args.out)
    args.stages = args.stages or ("2,3,4" if args.mma else "1,2")
    import torch

    from cuflash import launch

    facts = launch.device_facts(torch.cuda.current_device())
    ints = lambda text: [int(x) for x in text.split(",")]
    for text in args.rows:
        batch, cache, heads_kv = ints(text)
        for q_len in args.q_len:
            _time_problem(torch, args, batch, cache, heads_kv, q_len, ints, facts.arch,
                          facts.smem_optin)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile every backward kernel configuration with NVRTC and report registers and spills.

No GPU needed: NVRTC + ptxas -v for sm_80 and sm_90. The configurations are the ones the
backward kernels promise to build spill-free (kernels_cu/flash_bwd.cu, flash_bwd_dq.cu,
flash_bwd_pre.cu):

  flash_bwd     CF_DTYPE 0/1 x CF_HEAD_DIM 32..256 x CF_DCHUNK {min(head_dim, 128), 64}
                x CF_BLOCK_N {16, 32, 64, 128} (CF_WARPS = CF_BLOCK_N / 16)
                x CF_BLOCK_M {16, 32, 64, 128} x CF_STAGES {1, 2}
  flash_bwd_dq  CF_DTYPE 0/1 x CF_HEAD_DIM 32..256 x CF_WARPS {1, 2, 4, 8}
                x CF_BLOCK_N {16, 32, 64} x CF_STAGES {1, 2}
  flash_bwd_pre CF_DTYPE 0/1/2

CF_CAUSAL = 1 and CF_DQ_ATOMIC = 1 by default (the largest code); --all-modes adds the other
three combinations. Exit status 1 when any configuration spills, has a stack frame or fails.

    python bench/dev/compile_bwd_sweep.py                 # everything, both archs
    python bench/dev/compile_bwd_sweep.py --kernel dq --arch sm_90 --head-dim 256
    python bench/dev/compile_bwd_sweep.py --define CF_BWD_MSUB=32 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels_cu"
HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)
FILES = {"bwd": "flash_bwd.cu", "dq": "flash_bwd_dq.cu", "pre": "flash_bwd_pre.cu"}

_STACK_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")
_FUNC_RE = re.compile(r"Compiling entry function '(\w+)'")


def configs(kernel: str, head_dims, modes, dtypes=(0, 1)) -> list[dict[str, int]]:
    """The define sets of one kernel family."""
    out = []
    if kernel == "pre":
        return [dict(CF_DTYPE=d) for d in (0, 1, 2)]
    for dtype, d, (causal, atomic) in itertools.product(dtypes, head_dims, modes):
        if kernel == "bwd":
            for dchunk in sorted({min(d, 128), 64}):
                for bn, bm, st in itertools.product((16, 32, 64, 128), (16, 32, 64, 128), (1, 2)):
                    out.append(dict(CF_DTYPE=dtype, CF_HEAD_DIM=d, CF_DCHUNK=dchunk,
                                    CF_BLOCK_N=bn, CF_WARPS=bn // 16, CF_BLOCK_M=bm,
                                    CF_STAGES=st, CF_CAUSAL=causal, CF_DQ_ATOMIC=atomic))
        else:
            if atomic == 0:  # flash_bwd_dq has no CF_DQ_ATOMIC; one entry per causal value
                continue
            for w, bn, st in itertools.product((1, 2, 4, 8), (16, 32, 64), (1, 2)):
                out.append(dict(CF_DTYPE=dtype, CF_HEAD_DIM=d, CF_WARPS=w, CF_BLOCK_M=16 * w,
                                CF_BLOCK_N=bn, CF_STAGES=st, CF_CAUSAL=causal))
    return out


def compile_one(job):
    """(file, arch, defines, extra) -> list of per-function results."""
    fname, arch, defines, extra = job
    from cupy_backends.cuda.libs import nvrtc

    src = (KERNELS_DIR / fname).read_text()
    prog = nvrtc.createProgram(src, fname, [], [])
    opts = [f"--gpu-architecture={arch}", "--ptxas-options=-v", "--std=c++17",
            f"-I{KERNELS_DIR}"] + [f"-D{k}={v}" for k, v in {**defines, **extra}.items()]
    try:
        try:
            nvrtc.compileProgram(prog, opts)
        except Exception:  # noqa: BLE001 -- NVRTC raises its own error type
            return [dict(file=fname, arch=arch, defines=defines, function="?", error=True,
                         log=nvrtc.getProgramLog(prog)[-3000:])]
        log = nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)
    results, cur = [], None
    for line in log.splitlines():
        if (m := _FUNC_RE.search(line)):
            cur = dict(file=fname, arch=arch, defines=defines, function=m.group(1), error=False)
            results.append(cur)
        elif cur is not None and (m := _STACK_RE.search(line)):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                       spill_loads=int(m.group(3)))
        elif cur is not None and (m := _REGS_RE.search(line)):
            cur["registers"] = int(m.group(1))
    return results


def label(r) -> str:
    d = r["defines"]
    short = {"CF_DTYPE": "t", "CF_HEAD_DIM": "d", "CF_DCHUNK": "c", "CF_BLOCK_N": "n",
             "CF_WARPS": "w", "CF_BLOCK_M": "m", "CF_STAGES": "s", "CF_CAUSAL": "causal",
             "CF_DQ_ATOMIC": "atomic"}
    return " ".join(f"{short[k]}{v}" for k, v in d.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("bwd", "dq", "pre", "all"), default="all")
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"])
    ap.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS))
    ap.add_argument("--dtype", type=int, nargs="+", default=[0, 1], help="CF_DTYPE values (0, 1)")
    ap.add_argument("--all-modes", action="store_true",
                    help="also causal 0 and dq_atomic 0 (default: causal 1, atomic 1 only)")
    ap.add_argument("--define", action="append", default=[],
                    help="extra NAME=VALUE for every compile (e.g. CF_BWD_MSUB=32)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write every result to this file")
    ap.add_argument("--verbose", action="store_true", help="print every configuration")
    args = ap.parse_args()

    extra = dict(kv.split("=", 1) for kv in args.define)
    modes = [(1, 1)] + ([(0, 1), (1, 0), (0, 0)] if args.all_modes else [])
    kernels = ("pre", "dq", "bwd") if args.kernel == "all" else (args.kernel,)
    jobs = [(FILES[k], arch, cfg, extra) for k in kernels for arch in args.arch
            for cfg in configs(k, args.head_dim, modes, tuple(args.dtype))]
    print(f"{len(jobs)} compiles on {args.jobs} processes", flush=True)
    start = time.time()
    results = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for rs in pool.map(compile_one, jobs, chunksize=1):
            results += rs
            for r in rs:
                bad = r["error"] or r["stack"] or r["spill_stores"] or r["spill_loads"]
                if bad or args.verbose:
                    what = ("FAILED\n" + r["log"]) if r["error"] else (
                        f"{r['registers']:3d} regs, stack {r['stack']}, spills "
                        f"{r['spill_stores']}/{r['spill_loads']}")
                    print(f"{'BAD ' if bad else ''}{r['arch']} {r['function']:22s} {label(r)}: "
                          f"{what}", flush=True)

    # -- summary: max registers per (arch, function, head_dim), and the failures
    print(f"\n{len(results)} kernels compiled in {time.time() - start:.0f} s")
    table: dict[tuple, list[int]] = {}
    for r in results:
        if r["error"]:
            continue
        key = (r["arch"], r["function"], r["defines"].get("CF_HEAD_DIM", 0))
        table.setdefault(key, []).append(r["registers"])
    print(f"{'arch':6s} {'function':22s} {'head_dim':>8s} {'configs':>7s} {'regs min..max':>14s}")
    for key in sorted(table):
        regs = table[key]
        print(f"{key[0]:6s} {key[1]:22s} {key[2]:8d} {len(regs):7d} {min(regs):6d}..{max(regs):<6d}")
    bad = [r for r in results
           if r["error"] or r["stack"] or r["spill_stores"] or r["spill_loads"]]
    print(f"\n{len(bad)} configurations spill, use a stack frame or fail")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

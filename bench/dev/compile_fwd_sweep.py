#!/usr/bin/env python3
"""Compile kernels_cu/flash_fwd.cu over its configuration grid with NVRTC (no GPU needed) and
print ptxas' registers / spills / stack per config, for sm_80 and sm_90.

  python bench/dev/compile_fwd_sweep.py                 # the whole grid, both archs
  python bench/dev/compile_fwd_sweep.py --arch sm_90 --d 128 --warps 8 --causal 0
  python bench/dev/compile_fwd_sweep.py --define CF_FWD_Q_IN_REGS=0 --d 160 192

Grid: head_dim bucket x warps x block_n x stages x causal x dtype. Prints one line per config
and, last, the configs that spill or use a stack frame (the tile selector must avoid those).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

KDIR = Path(__file__).resolve().parents[2] / "kernels_cu"
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(job):
    arch, dtype, d, w, n, s, causal, defines = job
    from cupy_backends.cuda.libs import nvrtc
    src = (KDIR / "flash_fwd.cu").read_text()
    opts = [f"--gpu-architecture={arch}", "--ptxas-options=-v", "--std=c++17", f"-I{KDIR}",
            f"-DCF_DTYPE={dtype}", f"-DCF_HEAD_DIM={d}", f"-DCF_BLOCK_M={16 * w}",
            f"-DCF_BLOCK_N={n}", f"-DCF_WARPS={w}", f"-DCF_STAGES={s}", f"-DCF_CAUSAL={causal}",
            "-DCF_SOURCE_HASH=0x0ULL"] + [f"-D{x}" for x in defines]
    prog = nvrtc.createProgram(src, "flash_fwd.cu", [], [])
    try:
        nvrtc.compileProgram(prog, opts)
        log = nvrtc.getProgramLog(prog)
    except Exception:
        return job, None, nvrtc.getProgramLog(prog)
    regs = int(_REGS.search(log).group(1))
    stack, st, ld = map(int, _SPILL.search(log).groups())
    return job, (regs, stack, st, ld), ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"])
    ap.add_argument("--d", nargs="+", type=int, default=[32, 64, 96, 128, 160, 192, 224, 256])
    ap.add_argument("--warps", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--n", nargs="+", type=int, default=[16, 32, 64, 128])
    ap.add_argument("--stages", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--causal", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--dtype", nargs="+", type=int, default=[1], help="0 fp16, 1 bf16")
    ap.add_argument("--define", nargs="*", default=[], help="extra NAME=VALUE defines")
    ap.add_argument("-j", type=int, default=os.cpu_count())
    a = ap.parse_args()
    jobs = [(arch, dt, d, w, n, s, c, tuple(a.define)) for arch, dt, d, w, n, s, c in
            itertools.product(a.arch, a.dtype, a.d, a.warps, a.n, a.stages, a.causal)]
    bad = []
    print(f"{'arch':6} {'dt':4} {'d':>3} {'w':>2} {'n':>4} {'s':>2} {'c':>2}"
          "  regs stack spill_st spill_ld")
    with ProcessPoolExecutor(a.j) as ex:
        for job, res, log in ex.map(compile_one, jobs):
            arch, dt, d, w, n, s, c, _ = job
            head = f"{arch:6} {'bf16' if dt else 'fp16':4} {d:3} {w:2} {n:4} {s:2} {c:2}"
            if res is None:
                print(f"{head}  COMPILE FAILED\n{log}")
                bad.append(head + "  compile failed")
                continue
            regs, stack, st, ld = res
            flag = "  <-- SPILLS" if (stack or st or ld) else ""
            print(f"{head}  {regs:4} {stack:5} {st:8} {ld:8}{flag}", flush=True)
            if flag:
                bad.append(f"{head}  regs {regs} stack {stack} spill {st}/{ld}")
    print(f"\n{len(jobs) - len(bad)} of {len(jobs)} configs compile spill-free")
    for line in bad:
        print("  spills:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

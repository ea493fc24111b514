"""Compile-check the float32 SIMT attention kernels without a GPU (NVRTC + ptxas -v).

Kernels: kernels_cu/flash_fwd_fp32.cu (flash_fwd), flash_bwd_fp32.cu (flash_bwd),
flash_bwd_dq_fp32.cu (flash_bwd_dq). For every configuration in PROPOSED (one per
shared-memory budget and head-dim bucket), both causal flags and, for flash_bwd, both
CF_DQ_ATOMIC modes, on sm_80 and sm_90, this compiles the kernel with the launcher's defines,
reads registers / spill bytes / stack frame from the ptxas log and checks
  * 0 spill bytes and a 0-byte stack frame,
  * the shared-memory formula (mirrored below from each kernel's header) <= the budget,
  * every kernel runs head_dim 256 within 48 KB (the 48 KB row of PROPOSED).
It prints a register table (max over causal / dq_atomic) and exits non-zero on any failure.

    python bench/dev/compile_fp32_sweep.py                  # PROPOSED, sm_80 and sm_90
    python bench/dev/compile_fp32_sweep.py --arch sm_90 --only fwd --jobs 2
    python bench/dev/compile_fp32_sweep.py --rank           # the cost model's top candidates

PROPOSED was chosen with the cost model below (--rank), not with timings: there was no GPU.
The model scores a configuration by (a) the FFMA : LDS.128 ratio of its thread tiles (a SIMT
product is shared-memory bound below 16 FFMA per LDS.128 on sm_80 / sm_90), weighted by the
flops of each product (flash_bwd pays the S and dP recompute once per head_dim chunk),
(b) warps per SM from shared memory and estimated registers (latency hiding, saturating at
16), (c) K/V (or Q/dO) reuse, i.e. the block's row count. Time on an H100 before trusting it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

KERNELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "kernels_cu")
FILES = {"fwd": "flash_fwd_fp32.cu", "bwd": "flash_bwd_fp32.cu", "dq": "flash_bwd_dq_fp32.cu"}
BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)
BUDGETS_KIB = (48, 64, 99, 163, 227)
# Shared memory of one SM (KiB) on the GPUs behind each opt-in budget: 48 KB (no opt-in, any
# GPU; assume a 64 KB SM), T4 64, RTX 30xx/40xx 100, A100 164, H100 228.
SM_SMEM_KIB = {48: 64, 64: 64, 99: 100, 163: 164, 227: 228}

# -- proposed tiles ---------------------------------------------------------------------------
# fwd / dq: (BLOCK_M, BLOCK_N, WARPS); bwd: (BLOCK_M, BLOCK_N, WARPS, DCHUNK). CF_STAGES = 1.
# Per budget (KiB), per head-dim bucket.
PROPOSED = {
    "fwd": {
        48: {32: (128, 32, 8), 64: (64, 16, 4), 96: (64, 16, 8), 128: (32, 8, 4),
             160: (32, 16, 4), 192: (32, 8, 4), 224: (32, 8, 4), 256: (16, 8, 4)},
        64: {32: (128, 32, 8), 64: (128, 16, 8), 96: (64, 32, 8), 128: (64, 16, 8),
             160: (32, 16, 4), 192: (32, 16, 4), 224: (32, 16, 4), 256: (32, 8, 4)},
        99: {32: (64, 32, 4), 64: (128, 32, 8), 96: (128, 32, 8), 128: (128, 16, 8),
             160: (64, 32, 4), 192: (64, 16, 4), 224: (64, 16, 4), 256: (32, 16, 4)},
        163: {32: (64, 32, 4), 64: (64, 32, 4), 96: (128, 64, 8), 128: (128, 32, 8),
              160: (128, 32, 8), 192: (128, 16, 8), 224: (128, 16, 8), 256: (64, 32, 8)},
        227: {32: (64, 32, 4), 64: (64, 32, 4), 96: (128, 64, 8), 128: (128, 32, 8),
              160: (128, 32, 8), 192: (128, 32, 8), 224: (128, 16, 8), 256: (64, 32, 8)},
    },
    "bwd": {
        48: {32: (16, 64, 4, 32), 64: (32, 32, 4, 64), 96: (16, 32, 4, 96), 128: (8, 32, 4, 128),
             160: (16, 16, 4, 160), 192: (8, 16, 4, 192), 224: (8, 8, 2, 224),
             256: (8, 8, 2, 256)},
        64: {32: (32, 64, 4, 32), 64: (16, 64, 4, 64), 96: (16, 32, 4, 96),
             128: (16, 32, 4, 128), 160: (16, 16, 4, 160), 192: (16, 16, 4, 192),
             224: (16, 16, 4, 224), 256: (8, 16, 4, 256)},
        99: {32: (64, 64, 8, 32), 64: (32, 64, 4, 64), 96: (16, 64, 4, 96),
             128: (32, 32, 8, 128), 160: (32, 32, 4, 160), 192: (16, 32, 4, 192),
             224: (16, 32, 4, 224), 256: (16, 16, 4, 256)},
        163: {32: (32, 64, 4, 32), 64: (32, 64, 4, 64), 96: (64, 64, 8, 96),
              128: (32, 64, 8, 128), 160: (32, 64, 8, 160), 192: (16, 32, 4, 192),
              224: (32, 32, 8, 224), 256: (32, 32, 8, 256)},
        227: {32: (32, 64, 4, 32), 64: (32, 64, 4, 64), 96: (32, 64, 4, 96),
              128: (64, 64, 8, 128), 160: (64, 64, 8, 160), 192: (32, 64, 8, 192),
              224: (32, 64, 8, 224), 256: (64, 32, 8, 256)},
    },
    "dq": {
        48: {32: (64, 16, 4), 64: (64, 16, 8), 96: (32, 16, 4), 128: (32, 8, 4),
             160: (16, 16, 4), 192: (16, 8, 4), 224: (16, 8, 4), 256: (8, 8, 2)},
        64: {32: (128, 32, 8), 64: (64, 32, 4), 96: (32, 32, 4), 128: (32, 16, 4),
             160: (32, 8, 4), 192: (32, 8, 4), 224: (16, 16, 4), 256: (16, 8, 4)},
        99: {32: (128, 64, 8), 64: (64, 64, 8), 96: (64, 32, 4), 128: (64, 16, 8),
             160: (32, 32, 4), 192: (32, 16, 4), 224: (32, 16, 4), 256: (32, 8, 4)},
        163: {32: (64, 32, 4), 64: (128, 32, 8), 96: (128, 32, 8), 128: (64, 64, 8),
              160: (64, 32, 4), 192: (64, 32, 8), 224: (64, 16, 4), 256: (32, 32, 8)},
        227: {32: (64, 32, 4), 64: (128, 32, 8), 96: (64, 32, 8), 128: (64, 64, 8),
              160: (128, 32, 8), 192: (64, 64, 8), 224: (64, 32, 8), 256: (64, 32, 8)},
    },
}


# -- shared memory (bytes): the formulas of the kernel headers ---------------------------------
def smem_bytes(kind: str, block_m: int, block_n: int, head_dim: int) -> int:
    m, n, d = block_m, block_n, head_dim
    if kind == "fwd":  # sQ + sK + sV [rows][d+4], sP [m][n+4]
        return 4 * ((m + 2 * n) * (d + 4) + m * (n + 4))
    if kind == "bwd":  # sQ, sdO, sK, sV [rows][d+4]; sPt, sdSt [n][m+4]; sdS [m][n+4]
        return 4 * (2 * (m + n) * (d + 4) + 2 * n * (m + 4) + m * (n + 4))
    if kind == "dq":  # sQ, sdO, sK, sV [rows][d+4]; sdS [m][n+4]
        return 4 * (2 * (m + n) * (d + 4) + m * (n + 4))
    raise ValueError(kind)


# -- compile ---------------------------------------------------------------------------------
def defines(kind: str, head_dim: int, cfg: tuple, causal: int, atomic: int) -> dict:
    d = dict(CF_DTYPE=2, CF_HEAD_DIM=head_dim, CF_BLOCK_M=cfg[0], CF_BLOCK_N=cfg[1],
             CF_WARPS=cfg[2], CF_STAGES=1, CF_CAUSAL=causal)
    if kind == "bwd":
        d.update(CF_DQ_ATOMIC=atomic, CF_DCHUNK=cfg[3])
    return d


def compile_one(job: tuple) -> tuple:
    """job = (kind, head_dim, cfg, causal, atomic, arch) -> (job, result dict or error text)."""
    from cupy_backends.cuda.libs import nvrtc

    kind, head_dim, cfg, causal, atomic, arch = job
    path = os.path.join(KERNELS_DIR, FILES[kind])
    src = open(path).read()
    opts = [f"--gpu-architecture={arch}", "--ptxas-options=-v", "--std=c++17",
            f"-I{os.path.abspath(KERNELS_DIR)}"]
    opts += [f"-D{k}={v}" for k, v in defines(kind, head_dim, cfg, causal, atomic).items()]
    prog = nvrtc.createProgram(src, FILES[kind], [], [])
    try:
        nvrtc.compileProgram(prog, opts)
    except Exception:  # the log says why
        return job, nvrtc.getProgramLog(prog).strip()[-1500:]
    log = nvrtc.getProgramLog(prog)
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      log)
    if not regs or not frame:
        return job, "could not parse the ptxas log:\n" + log
    return job, dict(regs=int(regs.group(1)), stack=int(frame.group(1)),
                     spill=int(frame.group(2)) + int(frame.group(3)))


def proposed_jobs(kinds, archs) -> list:
    jobs = set()
    for kind in kinds:
        for budget, row in PROPOSED[kind].items():
            for head_dim, cfg in row.items():
                for causal in (0, 1):
                    for atomic in ((0, 1) if kind == "bwd" else (0,)):
                        for arch in archs:
                            jobs.add((kind, head_dim, cfg, causal, atomic, arch))
    return sorted(jobs)


def check_table(kinds) -> list:
    """Static checks of PROPOSED: smem within budget, every bucket covered."""
    errors = []
    for kind in kinds:
        for budget in BUDGETS_KIB:
            row = PROPOSED[kind][budget]
            for head_dim in BUCKETS:
                if head_dim not in row:
                    errors.append(f"{kind} {budget}K: no configuration for head_dim {head_dim}")
                    continue
                cfg = row[head_dim]
                sm = smem_bytes(kind, cfg[0], cfg[1], head_dim)
                if sm > budget * 1024:
                    errors.append(f"{kind} {budget}K d{head_dim} {cfg}: {sm} B > budget")
    return errors


def run_sweep(kinds, archs, jobs_n) -> int:
    errors = check_table(kinds)
    jobs = proposed_jobs(kinds, archs)
    print(f"compiling {len(jobs)} kernels ({', '.join(kinds)}; {', '.join(archs)})", flush=True)
    results = {}
    with ProcessPoolExecutor(max_workers=jobs_n) as pool:
        for job, res in pool.map(compile_one, jobs):
            results[job] = res
            if isinstance(res, str):
                errors.append(f"{job}: compile failed\n{res}")
            elif res["spill"] or res["stack"]:
                errors.append(f"{job}: {res['spill']} spill bytes, {res['stack']} B stack")
    # -- register table: max over causal (and dq_atomic), per arch
    for kind in kinds:
        print(f"\n{kind}: registers per thread (sm_80 / sm_90, max over causal"
              f"{' and dq_atomic' if kind == 'bwd' else ''}), config, smem bytes")
        for budget in BUDGETS_KIB:
            print(f"  {budget:3d} KB")
            for head_dim in BUCKETS:
                cfg = PROPOSED[kind][budget][head_dim]
                regs = []
                for arch in archs:
                    vals = [r["regs"] for j, r in results.items()
                            if j[0] == kind and j[1] == head_dim and j[2] == cfg and j[5] == arch
                            and isinstance(r, dict)]
                    regs.append(str(max(vals)) if vals else "--")
                print(f"    d{head_dim:<3d} {str(cfg):18s} regs {' / '.join(regs):9s} "
                      f"smem {smem_bytes(kind, cfg[0], cfg[1], head_dim)}")
    if errors:
        print("\nFAILED:\n" + "\n".join(errors))
        return 1
    print(f"\nOK: {len(jobs)} compiles, 0 spills, 0-byte stack frames, every smem <= budget")
    return 0


# -- cost model (for --rank) -------------------------------------------------------------------
def _layout(rows, cols, unit, warps, fixed_rl=0):
    """Mirror of simt_pick_layout (cf_simt.cuh): -> (TM, TN) or None."""
    best, best_cost = None, 1 << 30
    for wr in range(warps, 0, -1):
        if fixed_rl and wr != warps:
            continue
        for rl in (4, 8, 2, 16, 1, 32):
            if fixed_rl and rl != fixed_rl:
                continue
            wc, cl = warps // wr, 32 // rl
            if warps % wr or rows % (wr * rl) or cols % (wc * cl):
                continue
            cost = rows // (wr * rl) + unit * (cols // (wc * cl))
            if cost < best_cost:
                best_cost, best = cost, (rows // (wr * rl), cols // (wc * cl))
    return best


def _pass_chunks(tm, tq, max_regs=32):
    """Mirror of simt_pass_chunks."""
    return max([1] + [qp for qp in range(1, tq + 1) if tq % qp == 0 and tm * 4 * qp <= max_regs])


def _eff_nt(tm, tn):  # FFMA per LDS.128, capped at the balance point 16
    return min(1.0, 4 * tm * tn / (tm + tn) / 16)


def _eff_nn(tm, tq):
    return min(1.0, 16 * tm * tq / (tm + 4 * tq) / 16)


def model(kind, head_dim, cfg, budget):
    """-> dict(score, eff, warps, need, smem) or None (no layout, too many registers, too big)."""
    d, (m, n, w) = head_dim, cfg[:3]
    if kind == "fwd":
        if m % (4 * w) or n % 8:
            return None
        tm, tn, tq = m // (4 * w), n // 8, d // 32
        qp = _pass_chunks(tm, tq)
        need = tm * 4 * tq + max(2 * tm * tn + 4 * (tm + tn), tm * 4 * qp + 5 * tm + 4 * qp)
        need += 2 * tm + 24
        parts, useful = [(1, _eff_nt(tm, tn)), (1, _eff_nn(tm, qp))], 2
    elif kind == "dq":
        l1, l3 = _layout(m, n, 1, w), _layout(m, d // 4, 4, w)
        if not l1 or not l3:
            return None
        (tm1, tn1), (tm3, tq3) = l1, l3
        qp = _pass_chunks(tm3, tq3)
        need = tm3 * 4 * tq3 + max(3 * tm1 * tn1 + 4 * (tm1 + tn1) + 3 * tm1,
                                   tm3 * 4 * qp + 4 * tm3 + 4 * qp) + 24
        parts, useful = [(2, _eff_nt(tm1, tn1)), (1, _eff_nn(tm3, qp))], 3
    else:
        dc = cfg[3]
        l1, l2, l3 = _layout(m, n, 1, w), _layout(n, dc // 4, 4, w), _layout(m, dc // 4, 4, w)
        if d % dc or dc % 8 or not l1 or not l2 or not l3:
            return None
        (tm1, tn1), (tm2, tq2), (tm3, tq3) = l1, l2, l3
        qp2 = _pass_chunks(tm2, tq2)
        need = 2 * tm2 * 4 * tq2 + max(3 * tm1 * tn1 + 4 * (tm1 + tn1),
                                       tm2 * 4 * qp2 + 4 * tm2 + 4 * qp2,
                                       tm3 * 4 * tq3 + 4 * tm3 + 4 * tq3) + 24
        parts = [(2 * d / dc, _eff_nt(tm1, tn1)), (2, _eff_nn(tm2, qp2)), (1, _eff_nn(tm3, tq3))]
        useful = 5
    if need > 200:  # leave ptxas room: no spills
        return None
    sm = smem_bytes(kind, m, n, d)
    if sm > budget * 1024:
        return None
    regs = min(255, -(-int(need * 1.2) // 8) * 8)  # ptxas takes ~20% over the need
    nt = 32 * w
    blocks = min(SM_SMEM_KIB[budget] * 1024 // (sm + 1024), 65536 // (regs * nt), 2048 // nt, 32)
    if blocks == 0:
        return None
    warps = blocks * w
    eff = useful / sum(flops / e for flops, e in parts)
    occ = min(1.0, warps / 16) ** 0.5 * min(1.0, warps / 4)
    reuse = min(1.0, (m if kind in ("fwd", "dq") else n) / 64) ** 0.3
    return dict(score=eff * occ * reuse, eff=eff, warps=warps, need=need, smem=sm)


FAMILY = {  # candidates --rank looks at (DCHUNK: head_dim or head_dim / 2)
    "fwd": [(128, 64, 8), (128, 32, 8), (64, 64, 4), (64, 32, 4), (64, 32, 8), (128, 16, 8),
            (64, 16, 4), (64, 16, 8), (32, 32, 4), (32, 16, 4), (32, 8, 4), (16, 8, 4), (16, 8, 2)],
    "dq": [(128, 64, 8), (128, 32, 8), (64, 64, 8), (64, 64, 4), (64, 32, 4), (64, 32, 8),
           (64, 16, 4), (64, 16, 8), (32, 32, 4), (32, 32, 8), (32, 16, 4), (32, 8, 4),
           (16, 16, 4), (16, 8, 4), (8, 8, 2)],
    "bwd": [(64, 64, 8), (32, 64, 8), (32, 64, 4), (64, 32, 8), (32, 32, 4), (32, 32, 8),
            (16, 64, 4), (16, 32, 4), (16, 16, 4), (8, 32, 4), (8, 16, 4), (8, 8, 2)],
}


def rank(kinds, top=3) -> None:
    for kind in kinds:
        print(f"== {kind}")
        for budget in BUDGETS_KIB:
            for head_dim in BUCKETS:
                scored = []
                for cfg in FAMILY[kind]:
                    dchunks = [None] if kind != "bwd" else sorted({head_dim, head_dim // 2})
                    for dc in dchunks:
                        c = cfg if dc is None else cfg + (dc,)
                        s = model(kind, head_dim, c, budget)
                        if s:
                            scored.append((round(s["score"], 2), c, s))
                scored.sort(key=lambda t: (-t[0], -t[1][0] * t[1][1], t[2]["smem"]))
                cells = [f"{c} score {s['score']:.2f} eff {s['eff']:.2f} warps/SM {s['warps']}"
                         for _, c, s in scored[:top]]
                mark = "" if scored and scored[0][1] == PROPOSED[kind][budget][head_dim] else " *"
                print(f"{budget:3d}K d{head_dim:<3d}{mark} " + " | ".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_80,sm_90", help="comma-separated, e.g. sm_90")
    ap.add_argument("--only", default="fwd,bwd,dq", help="comma-separated subset of fwd,bwd,dq")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rank", action="store_true", help="print the cost model's ranking only")
    args = ap.parse_args()
    kinds = [k for k in args.only.split(",") if k]
    if args.rank:
        rank(kinds)
        return 0
    return run_sweep(kinds, [a for a in args.arch.split(",") if a], args.jobs)


if __name__ == "__main__":
    sys.exit(main())

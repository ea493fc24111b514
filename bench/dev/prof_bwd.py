"""One backward of cuflash under Nsight Compute, and a filtered print of the report.

    ncu --set full -k regex:^flash_bwd$ -c 1 -o OUT/prof python bench/dev/prof_bwd.py run
    python bench/dev/prof_bwd.py show OUT/prof.ncu-rep
    python bench/dev/prof_bwd.py sass OUT/prof.ncu-rep [N]

`run`: bf16, batch 1, seqlen 4096, 16 heads, head_dim 128 (`run HEAD_DIM`, --causal): forward,
then one backward (the profiled flash_bwd). --warps W pins the Hopper backward tile with W
warps (8: flash_bwd_sm90.cu, 12: flash_bwd_sm90_ws.cu) instead of the selector's choice.
`show`: the stall reasons, pipe and shared-memory utilisation and local-memory (spill)
traffic of the report's raw page. `sass`: the N SASS instructions (default 40) with the most
warp-stall samples, with their stall reasons (needs a report taken with SourceCounters, as
--set full does).
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys

KEEP = re.compile(
    r"smsp__average_warps_issue_stalled_\w+_per_issue_active\.ratio$|"
    r"sm__pipe_tensor_op_hmma_cycles_active\.avg\.pct_of_peak_sustained_active$|"
    r"l1tex__data_pipe_lsu_wavefronts_mem_shared\.avg\.pct_of_peak_sustained_elapsed$|"
    r"l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_(ld|st)\.sum$|"
    r"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_(ld|st)\.sum$|"
    r"sm__throughput\.avg\.pct_of_peak_sustained_elapsed$|"
    r"smsp__issue_active\.avg\.pct_of_peak_sustained_active$|"
    r"smsp__inst_executed\.sum$|gpu__time_duration\.sum$|"
    r"lts__throughput\.avg\.pct_of_peak_sustained_elapsed$|"
    r"sm__cycles_elapsed\.avg\.per_second$|launch__registers_per_thread$|"
    r"l1tex__t_bytes_pipe_lsu_mem_local_op_(ld|st)\.sum$")


def run(head_dim: int, causal: bool, warps: int | None) -> None:
    import torch

    import cuflash

    q, k, v, do = (torch.randn(1, 4096, 2048 // head_dim, head_dim, device="cuda",
                               dtype=torch.bfloat16) for _ in range(4))
    o, stats = cuflash.attention_forward(q, k, v, causal=causal)
    if warps is None:
        cuflash.attention_backward(do, q, k, v, o, stats, causal=causal)
    else:
        from devtools import pinned_backward

        from cuflash.specs import KernelSpec

        spec = KernelSpec(kind="bwd90", dtype="bfloat16", head_dim=head_dim,
                          block_m=128 if head_dim == 64 else 64, block_n=128, warps=warps,
                          stages=2, causal=causal, dq_atomic=True, dchunk=head_dim)
        m, l = stats.m, stats.l
        pinned_backward(spec, do, q, k, v, o, m, l, causal)
    torch.cuda.synchronize()


def show(report: str) -> None:
    raw = subprocess.run(["ncu", "--import", report, "--page", "raw", "--csv"],
                         capture_output=True, text=True, check=True).stdout
    rows = list(csv.reader(io.StringIO(raw)))
    names, units, values = rows[0], rows[1], rows[2]
    for name, unit, value in zip(names, units, values):
        if KEEP.search(name):
            name = name.replace("smsp__average_warps_issue_stalled_", "stall_")
            print(f"{name:<72} {value:>14} {unit}")


def sass(report: str, top: int) -> None:
    out = subprocess.run(["ncu", "--import", report, "--page", "source", "--csv",
                          "--print-source", "sass"], capture_output=True, text=True,
                         check=True).stdout
    rows = list(csv.reader(io.StringIO(out)))
    header = next(i for i, r in enumerate(rows) if any("Source" == c for c in r))
    names, body = rows[header], rows[header + 1:]
    col = {n: i for i, n in enumerate(names)}
    samples = next(n for n in names if n.startswith("Warp Stall Sampling (All"))
    reasons = [n for n in names if n.startswith("stall_") or n.endswith("_stall")]

    def count(r, name):
        try:
            return float(r[col[name]].replace(",", ""))
        except (ValueError, IndexError):
            return 0.0

    total = sum(count(r, samples) for r in body) or 1.0
    print(f"{len(body)} SASS lines, {total:.0f} samples; columns: {', '.join(names)}")
    for r in sorted(body, key=lambda r: -count(r, samples))[:top]:
        top_reasons = sorted(((count(r, n), n) for n in reasons), reverse=True)[:3]
        why = " ".join(f"{n}={v:.0f}" for v, n in top_reasons if v)
        print(f"{100 * count(r, samples) / total:5.1f}%  {r[col.get('Address', 0)]:>6}  "
              f"{r[col['Source']][:70]:<70} {why}")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        warps = int(sys.argv[sys.argv.index("--warps") + 1]) if "--warps" in sys.argv else None
        run(int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 128,
            "--causal" in sys.argv, warps)
    elif sys.argv[1] == "sass":
        sass(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 40)
    else:
        show(sys.argv[2])

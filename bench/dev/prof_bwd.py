"""One backward of cuflash under Nsight Compute, and a filtered print of the report.

    ncu --set full -k regex:^flash_bwd$ -c 1 -o OUT/prof python bench/dev/prof_bwd.py run
    python bench/dev/prof_bwd.py show OUT/prof.ncu-rep

`run`: bf16, batch 1, seqlen 4096, 16 heads, head_dim 128 (--head-dim, --causal): forward, then
one backward (the profiled flash_bwd). `show`: the stall reasons, pipe and shared-memory
utilisation of the report's raw page.
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
    r"sm__cycles_elapsed\.avg\.per_second$|launch__registers_per_thread$")


def run(head_dim: int, causal: bool) -> None:
    import torch

    import cuflash

    q, k, v, do = (torch.randn(1, 4096, 2048 // head_dim, head_dim, device="cuda",
                               dtype=torch.bfloat16) for _ in range(4))
    o, stats = cuflash.attention_forward(q, k, v, causal=causal)
    cuflash.attention_backward(do, q, k, v, o, stats, causal=causal)
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


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(int(sys.argv[2]) if len(sys.argv) > 2 else 128, "--causal" in sys.argv)
    else:
        show(sys.argv[2])

"""Host microseconds per call of the paths a training step takes into cuflash's kernels, beside
SDPA's, at a shape whose kernels are short (so the host, not the GPU, sets the pace).

    python bench/dev/op_host_cost.py [--seqlen 512]

Rows: the registered operators as a compiled graph calls them (``torch.ops.cuflash.flash_fwd``
/ ``flash_bwd`` under no_grad), the fast path they end in (``fastpath.forward`` /
``backward``), the eager autograd path, and the aten SDPA ops a compiled graph calls for SDPA.
Session 11 (2026-12-03) found the compiled GQA training step host-bound with cuflash (the
host returned after 11.3 ms of a 13.0 ms step; 6.9 of 12.6 with SDPA): this says where.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cuflash.torch as ct  # noqa: E402
from cuflash import fastpath  # noqa: E402


def host_us(fn, calls: int = 50, reps: int = 7) -> float:
    """Best of ``reps``: ``calls`` calls enqueued back to back, host clock, then a sync."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args()
    s, scale = args.seqlen, 128 ** -0.5

    def rand(heads, grad=False):
        return torch.randn(1, s, heads, 128, device="cuda", dtype=torch.bfloat16,
                           requires_grad=grad)

    q, k, v, do = rand(16), rand(4), rand(4), rand(16)
    backend = fastpath.torch_backend()
    with torch.no_grad():
        o, m, l = torch.ops.cuflash.flash_fwd.default(q, k, v, True, scale)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        rows = {
            "op flash_fwd (no grad)": lambda: torch.ops.cuflash.flash_fwd.default(
                q, k, v, True, scale),
            "fastpath.forward": lambda: fastpath.forward(backend, q, k, v, True, scale),
            "op flash_bwd (no grad)": lambda: torch.ops.cuflash.flash_bwd.default(
                do, q, k, v, o, m, l, True, scale, False),
            "fastpath.backward": lambda: fastpath.backward(backend, do, q, k, v, o, m, l, True,
                                                           scale, False),
            "aten cudnn attention fwd": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
                qt, kt, vt, None, True, 0.0, True, False, scale=scale),
            "F.sdpa (no grad, GQA)": lambda: F.scaled_dot_product_attention(
                qt, kt, vt, is_causal=True, enable_gqa=True),
        }
        for name, fn in rows.items():
            try:
                print(f"{name:<28} {host_us(fn):7.1f} us")
            except (RuntimeError, ValueError) as exc:  # e.g. an aten op refusing GQA
                print(f"{name:<28} failed: {str(exc).splitlines()[0][:80]}")
    qg, kg, vg = rand(16, True), rand(4, True), rand(4, True)

    def eager_fwd_bwd():
        out = ct.flash_attention(qg, kg, vg, causal=True)
        torch.autograd.grad(out, (qg, kg, vg), do)

    def sdpa_fwd_bwd():
        out = F.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2),
                                             vg.transpose(1, 2), is_causal=True,
                                             enable_gqa=True)
        torch.autograd.grad(out, (qg, kg, vg), do.transpose(1, 2))

    print(f"{'eager fwd+bwd cuflash.torch':<28} {host_us(eager_fwd_bwd):7.1f} us")
    print(f"{'eager fwd+bwd SDPA':<28} {host_us(sdpa_fwd_bwd):7.1f} us")


if __name__ == "__main__":
    main()

"""Why the compiled GQA step's cat of (dq, dk, dv) took 96.5 us a step with cuflash against
47.6 with SDPA (session 14's profile): the cat alone, per input layout, and the Triton source
inductor wrote for it in one compiled attention layer of each kind.

    python bench/dev/cat_probe.py [--source-out cat_kernels.txt]

Prints microseconds per cat (devtools.time_ms: CUDA events, median of 50) for dq, dk, dv of
the GQA training shape (1, 4096, 16 / 4 / 4 heads, 128) laid out as cuflash returns them
(contiguous (b, s, h, d)) and as (b, h, s, d) memory seen through ``transpose(1, 2)``; then
the cat kernels of one compiled layer with each attention, by profiler time, and their source.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="cat_probe_"))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cuflash.torch as ct  # noqa: E402
from devtools import time_ms  # noqa: E402

B, S, H, HKV, D = 1, 4096, 16, 4, 128


def timed_us(fn) -> float:
    return time_ms(fn, reps=50) * 1e3


def grads(layout: str):
    def one(h):
        if layout == "bshd":
            return torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16)
        return torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    return one(H), one(HKV), one(HKV)


def cat_alone() -> None:
    cat = torch.compile(lambda a, b, c: torch.cat([a, b, c], dim=2))
    for layout in ("bshd", "bhsd_transposed"):
        a, b, c = grads(layout)
        us = timed_us(lambda: cat(a, b, c))
        moved = 2 * (a.numel() + b.numel() + c.numel()) * 2
        print(f"cat alone, inputs {layout:16s}: {us:7.1f} us ({moved / us / 1e6:.2f} TB/s)")
        eager = timed_us(lambda: torch.cat([a, b, c], dim=2))
        print(f"  eager torch.cat                : {eager:7.1f} us")


class Layer(torch.nn.Module):
    def __init__(self, attention: str):
        super().__init__()
        self.qkv = torch.nn.Linear(H * D, (H + 2 * HKV) * D, bias=False)
        self.proj = torch.nn.Linear(H * D, H * D, bias=False)
        self.attention = attention

    def forward(self, x):
        qkv = self.qkv(x).view(B, S, H + 2 * HKV, D)
        q, k, v = qkv.split((H, HKV, HKV), dim=2)
        if self.attention == "cuflash":
            o = ct.flash_attention(q, k, v, causal=True)
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True,
                                               enable_gqa=True).transpose(1, 2)
        return self.proj(o.reshape(B, S, H * D))


def layer_kernels(attention: str) -> None:
    torch.manual_seed(0)
    layer = Layer(attention).cuda().to(torch.bfloat16)
    step_layer = torch.compile(layer)
    x = torch.randn(B, S, H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        step_layer(x).float().square().mean().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_time_total > 0:
            totals[event.key] = event.device_time_total / 10
    print(f"-- {attention}: kernels per step (us)")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:14]:
        print(f"  {us:8.1f}  {name[:100]}")


def cat_sources(out: Path) -> None:
    root = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(errors="replace")
        for name in ("triton_poi_fused_cat", "triton_poi_fused_cat_transpose"):
            if f"def {name}" in text or f"{name}_" in text and "@triton.jit" in text:
                found.append(f"### {path.relative_to(root)}\n{text}")
                break
    out.write_text("\n\n".join(found))
    print(f"wrote {len(found)} inductor sources with a cat kernel to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-out", type=Path, default=Path("cat_kernels.txt"))
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    cat_alone()
    for attention in ("sdpa", "cuflash", "sdpa", "cuflash"):
        layer_kernels(attention)
    cat_sources(args.source_out)


if __name__ == "__main__":
    main()

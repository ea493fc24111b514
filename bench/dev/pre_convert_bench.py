"""The two elementwise kernels around the backward (flash_bwd_preprocess, flash_bwd_dq_convert):
microseconds per call and the bytes they move per second, from torch.profiler over a
cuflash.torch forward+backward, at the shapes a training step meets. cuDNN's kernels of the
same jobs (through SDPA) print beside them.

    python bench/dev/pre_convert_bench.py

Bytes:
the preprocess reads O and dO and zeroes the float32 dQ accumulator; the convert reads the
accumulator and writes dQ (the accumulator's rows rounded up to 64; its width the head-dim
bucket, taken here as head_dim rounded up to 64).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from step_kernels import kernel_table  # (bench/dev: puts the checkout on sys.path)

import cuflash.torch as ct

SHAPES = (  # batch, heads, heads_kv, seqlen, head_dim, causal
    (1, 16, 4, 4096, 128, True),  # the GQA training model's layer (bench/train_small.py --gqa)
    (1, 16, 16, 4096, 128, False),
    (4, 16, 16, 4096, 64, False),
    (1, 16, 16, 8192, 256, False),
    (16, 16, 16, 1024, 128, True),
)


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    for b, h, hkv, s, d, causal in SHAPES:
        def rand(heads, grad):
            return torch.randn(b, heads, s, d, device="cuda", dtype=torch.bfloat16,
                               requires_grad=grad)
        q, k, v = rand(h, True), rand(hkv, True), rand(hkv, True)
        do = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)

        def cuflash_step():
            out = ct.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                     causal=causal)
            out.backward(do.transpose(1, 2))

        def sdpa_step():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hkv != h)
            out.backward(do)

        rows64 = -(-s // 64) * 64
        tile_d = -(-d // 64) * 64
        pre_bytes = 2 * b * s * h * d * 2 + b * rows64 * h * tile_d * 4
        conv_bytes = b * rows64 * h * tile_d * 4 + b * s * h * d * 2
        # the dK / dV converts of split kv heads (GQA): float32 (b, s, hkv, d) to 16 bits each
        kv_bytes = b * s * hkv * d * (4 + 2)
        print(f"\n== batch {b}, heads {h}/{hkv}, seqlen {s}, head_dim {d}, causal {causal}")
        counts: dict = {}
        table = kernel_table(cuflash_step, launches=counts)
        for name, nbytes in (("flash_bwd_preprocess", pre_bytes),
                             ("flash_bwd_dq_convert", conv_bytes)):
            us, n = table.get(name, 0.0), round(counts.get(name, 0))
            if name.endswith("convert") and n == 3:
                nbytes += 2 * kv_bytes
            rate = nbytes / us / 1e6 if us else 0.0
            print(f"   cuflash {name:24s} x{n} {us:8.1f} us  {rate:5.2f} TB/s  "
                  f"({nbytes / 1e6:.0f} MB)")
        for name, us in sorted(kernel_table(sdpa_step).items(), key=lambda kv: -kv[1]):
            if any(key in name for key in ("dot_do_o", "convert_dq", "reduce_head", "Memset",
                                            "preprocess", "convert")):
                print(f"   sdpa    {name[:60]:60s} {us:8.1f} us")


if __name__ == "__main__":
    main()

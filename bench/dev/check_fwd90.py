"""Dev check of the Hopper forward (kernels_cu/flash_fwd_sm90.cu) on an H100: correctness
against a float64 reference over awkward shapes, then timings beside SDPA's FA-2 and cuDNN.

    python bench/dev/check_fwd90.py [--variant NAME=VALUE] [--bench]

--variant adds a -D define (tuning / layout knobs of the kernel) to every compile, so several
variants can be checked in one GPU call. Error rule: max|o - ref| <= 2 max|naive - ref| + 1e-3.
"""

from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F

import cuflash
from cuflash import compiler, specs
from cuflash.launch import device_facts
from devtools import SHAPES, random_inputs, time_ms


def add_define(define: str | None) -> None:
    """Compile every kernel with an extra -D (the disk cache key includes it)."""
    base = compiler.nvrtc_options
    compiler._loaded.clear()
    if define:
        compiler.nvrtc_options = lambda spec: base(spec) + [f"-DCF_SM90_{define}"]


def reference(q, k, v, causal, scale):
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    hq, hk = qd.shape[1], kd.shape[1]
    kd, vd = kd.repeat_interleave(hq // hk, 1), vd.repeat_interleave(hq // hk, 1)
    s = qd @ kd.transpose(-1, -2) * scale
    if causal:
        sq, sk = s.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(sk - sq)
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vd).transpose(1, 2)


def naive(q, k, v, causal, scale):
    """The same computation in the inputs' dtype: the noise floor."""
    hq, hk = q.shape[2], k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(hq // hk, 1)
    vt = v.transpose(1, 2).repeat_interleave(hq // hk, 1)
    s = (qt @ kt.transpose(-1, -2)).float() * scale
    if causal:
        sq, sk = s.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(sk - sq)
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype)
    return (p @ vt).transpose(1, 2)




def check() -> int:
    failures = 0
    for dtype in (torch.bfloat16, torch.float16):
        for b, sq, sk, h, hk, d in SHAPES:
            for causal in (False, True):
                q, k, v = random_inputs((b, sq, sk, h, hk, d), dtype)
                scale = d ** -0.5
                spec = specs.select_forward(device_facts(0),
                                            str(dtype).split(".")[1], d, causal)
                o, stats = cuflash.attention_forward(q, k, v, causal=causal)
                ref = reference(q, k, v, causal, scale)
                err = (o.double() - ref).abs().max().item()
                floor = (naive(q, k, v, causal, scale).double() - ref).abs().max().item()
                ok = err <= 2 * floor + 1e-3 and torch.isfinite(o).all().item()
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {spec.name:<40} {(b, sq, sk, h, hk, d)} "
                      f"err {err:.2e} naive {floor:.2e}", flush=True)
    return failures



def bench() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for d in (64, 128, 256):
        for s in (4096, 16384):
            for causal in (False, True):
                batch, heads = 16384 // s, 2048 // d
                q, k, v = (torch.randn(batch, s, heads, d, device="cuda", dtype=torch.bfloat16)
                           for _ in range(3))
                flops = 4 * batch * heads * s * s * d / (2 if causal else 1)
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                row = {"cuflash": time_ms(lambda: cuflash.attention_forward(q, k, v,
                                                                            causal=causal))}
                for name, be in (("fa2", SDPBackend.FLASH_ATTENTION),
                                 ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    with sdpa_kernel(be):
                        row[name] = time_ms(lambda: F.scaled_dot_product_attention(
                            qt, kt, vt, is_causal=causal))
                tf = {n: flops / ms / 1e9 for n, ms in row.items()}
                print(f"bf16 d{d} s{s} {'causal' if causal else 'full  '} "
                      f"cuflash {tf['cuflash']:6.1f}  fa2 {tf['fa2']:6.1f}  cudnn {tf['cudnn']:6.1f}"
                      f"  ratio/fa2 {tf['cuflash'] / tf['fa2']:.2f}  ratio/cudnn "
                      f"{tf['cuflash'] / tf['cudnn']:.2f}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default=None, help="NAME=VALUE adds -DCF_SM90_NAME=VALUE")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--no-check", action="store_true")
    args = p.parse_args()
    add_define(args.variant)
    failures = 0 if args.no_check else check()
    print(f"variant {args.variant}: {failures} failures", flush=True)
    if args.bench and failures == 0:
        bench()


if __name__ == "__main__":
    main()

"""Dev check of the 16-bit backward on a GPU (the Hopper flash_bwd_sm90.cu where the selector
picks it): dq, dk, dv against float64 autograd over awkward shapes, then timings beside
SDPA's FA-2 and cuDNN backends.

    python bench/dev/check_bwd90.py [--bench] [--no-check]

Error rule: max|grad - ref| <= 2 max|naive - ref| + 1e-3 per gradient, naive = the same
math in the inputs' dtype through torch autograd (scores in float32).
"""

from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F

import cuflash
from cuflash import specs
from cuflash.launch import device_facts
from devtools import SHAPES, random_inputs, time_ms


def attention(q, k, v, causal, scale, dtype):
    """(b, s, h, d) attention with torch ops, computed in ``dtype`` (float64: the reference)."""
    hq, hk = q.shape[2], k.shape[2]
    qt = q.transpose(1, 2).to(dtype)
    kt = k.transpose(1, 2).repeat_interleave(hq // hk, 1).to(dtype)
    vt = v.transpose(1, 2).repeat_interleave(hq // hk, 1).to(dtype)
    s = (qt @ kt.transpose(-1, -2)).float() * scale if dtype != torch.float64 else \
        qt @ kt.transpose(-1, -2) * scale
    if causal:
        sq, sk = s.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(sk - sq)
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0).to(dtype)
    return (p @ vt).transpose(1, 2)


def grads(q, k, v, do, causal, scale, dtype):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, causal, scale, dtype)
    return torch.autograd.grad(out, leaves, do.to(out.dtype))




def check() -> int:
    failures = 0
    for dtype in (torch.bfloat16, torch.float16):
        for b, sq, sk, h, hk, d in SHAPES:
            for causal in (False, True):
                q, k, v, do = random_inputs((b, sq, sk, h, hk, d), dtype, with_do=True)
                scale = d ** -0.5
                name = str(dtype).split(".")[1]
                spec = specs.select_backward(device_facts(0), name, d, causal, False)
                o, stats = cuflash.attention_forward(q, k, v, causal=causal)
                ours = cuflash.attention_backward(do, q, k, v, o, stats, causal=causal)
                ref = grads(q, k, v, do, causal, scale, torch.float64)
                naive = grads(q, k, v, do, causal, scale, dtype)
                worst = []
                for label, g, r, n in zip(("dq", "dk", "dv"), ours, ref, naive):
                    err = (g.double() - r).abs().max().item()
                    floor = (n.double() - r).abs().max().item()
                    ok = err <= 2 * floor + 1e-3 and torch.isfinite(g).all().item()
                    worst.append((ok, f"{label} {err:.1e}/{floor:.1e}"))
                ok = all(w[0] for w in worst)
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {spec.name:<46} {(b, sq, sk, h, hk, d)} "
                      f"{'causal' if causal else 'full  '} " + " ".join(w[1] for w in worst),
                      flush=True)
    return failures



def bench() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for d in (64, 128):
        for s in (4096, 16384):
            for causal in (False, True):
                batch, heads = 16384 // s, 2048 // d
                q, k, v, do = (torch.randn(batch, s, heads, d, device="cuda",
                                           dtype=torch.bfloat16) for _ in range(4))
                flops = 2.5 * 4 * batch * heads * s * s * d / (2 if causal else 1)
                o, stats = cuflash.attention_forward(q, k, v, causal=causal)
                row = {"cuflash": time_ms(lambda: cuflash.attention_backward(
                    do, q, k, v, o, stats, causal=causal))}
                qg, kg, vg = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
                for name, be in (("fa2", SDPBackend.FLASH_ATTENTION),
                                 ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    with sdpa_kernel(be):
                        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
                        dot = do.transpose(1, 2)
                        row[name] = time_ms(lambda: torch.autograd.grad(
                            out, (qg, kg, vg), dot, retain_graph=True))
                tf = {n: flops / ms / 1e9 for n, ms in row.items()}
                print(f"bwd bf16 d{d} s{s} {'causal' if causal else 'full  '} "
                      f"cuflash {tf['cuflash']:6.1f}  fa2 {tf['fa2']:6.1f}  cudnn {tf['cudnn']:6.1f}"
                      f"  ratio/fa2 {tf['cuflash'] / tf['fa2']:.2f}  ratio/cudnn "
                      f"{tf['cuflash'] / tf['cudnn']:.2f}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bench", action="store_true")
    p.add_argument("--no-check", action="store_true")
    args = p.parse_args()
    failures = 0 if args.no_check else check()
    print(f"{failures} failures", flush=True)
    if args.bench and failures == 0:
        bench()


if __name__ == "__main__":
    main()

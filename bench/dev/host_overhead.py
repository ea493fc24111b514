"""Host (Python) time per cuflash call on a GPU, and where it goes (cProfile).

    python bench/dev/host_overhead.py [--calls 300] [--decode]

Tiny shapes, so the GPU work is negligible and a call's wall time is its host overhead:
validation, layout lookup, plan lookup, allocation, launch.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: real_workloads

import torch  # noqa: E402

import cuflash  # noqa: E402
import cuflash.torch as ct  # noqa: E402
from real_workloads import host_us  # noqa: E402  (the one host-time measurement)


def _report(cases: dict, calls: int, profiled: tuple, rows: int) -> None:
    """Host microseconds per call of every case (back to back after a warm-up, one
    synchronize at the end), then cProfile's top functions of the ``profiled`` cases."""
    width = max(map(len, cases)) + 2
    for name, fn in cases.items():
        print(f"{name:<{width}} {host_us(fn, calls):8.1f} us per call")
    for name in profiled:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            cases[name]()
        prof.disable()
        torch.cuda.synchronize()
        print(f"--- {name}: top functions by own time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--decode", action="store_true",
                   help="decoding instead: attention_with_kvcache and transformers' attention "
                        "functions (cufa vs sdpa) at q_len 1 against a 4k GQA cache")
    args = p.parse_args()
    if args.decode:
        return decode_overhead(args.calls)
    q, k, v, do = (torch.randn(1, 128, 4, 64, device="cuda", dtype=torch.bfloat16)
                   for _ in range(4))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    o, stats = cuflash.attention_forward(q, k, v)

    def fwd_bwd():
        out = ct.flash_attention(qg, kg, vg, causal=True)
        torch.autograd.grad(out, (qg, kg, vg), do)

    from cuflash import fastpath

    tb = fastpath.torch_backend()
    ot, mt, lt = fastpath.forward(tb, q, k, v, True, None)
    import cupy

    cq, ck, cv, cdo = (cupy.from_dlpack(x) for x in (q, k, v, do))
    co, cstats = cuflash.attention_forward(cq, ck, cv, causal=True)
    pq, pk, pv, pdo = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v, do))
    cu = torch.tensor([0, 50, 128], dtype=torch.int32, device="cuda")
    po, pstats = cuflash.attention_varlen_forward(pq, pk, pv, cu, cu, 78, 78, causal=True)
    cases = {
        "varlen forward": lambda: cuflash.attention_varlen_forward(pq, pk, pv, cu, cu, 78, 78,
                                                                  causal=True),
        "varlen backward": lambda: cuflash.attention_varlen_backward(
            pdo, pq, pk, pv, po, pstats, cu, cu, 78, 78, causal=True),
        "fastpath backward": lambda: fastpath.backward(tb, do, q, k, v, ot, mt, lt, True, None,
                                                      False),
        "torch fwd only (grad)": lambda: ct.flash_attention(qg, kg, vg, causal=True),
        "torch forward (no grad)": lambda: ct.flash_attention(q, k, v, causal=True),
        "forward": lambda: cuflash.attention_forward(q, k, v),
        "backward": lambda: cuflash.attention_backward(do, q, k, v, o, stats),
        "cupy API forward": lambda: cuflash.attention_forward(cq, ck, cv, causal=True),
        "cupy API backward": lambda: cuflash.attention_backward(cdo, cq, ck, cv, co, cstats,
                                                                causal=True),
        "torch fwd+bwd": fwd_bwd,
        "sdpa forward (peer)": lambda: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
    }
    _report(cases, args.calls, ("torch forward (no grad)", "cupy API forward",
                                "cupy API backward", "torch fwd+bwd", "varlen backward"), 16)


def decode_overhead(calls: int) -> None:
    """Host time of one decode-step attention call, the way transformers' generation makes
    it: (batch, heads, 1, d) queries against (batch, heads_kv, L, d) caches. A cache that
    grows by one key per step is a new layout each step (as with DynamicCache)."""
    import types

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import cuflash.transformers as cftr

    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=4, training=False)
    mk = lambda h, n: torch.randn(1, h, n, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = mk(16, 1), mk(4, 4096), mk(4, 4096)
    grow = [(mk(4, 4096 + i), mk(4, 4096 + i)) for i in range(8)]
    step = iter(range(10**9))
    cases = {
        "cuflash.torch decode": lambda: ct.attention_with_kvcache(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True),
        "cufa attention fn": lambda: cftr.attention_forward(module, q, k, v, None),
        "cufa fn, growing cache": lambda: cftr.attention_forward(
            module, q, *grow[next(step) % 8], None),
        "sdpa attention fn": lambda: sdpa_attention_forward(module, q, k, v, None),
        "sdpa fn, growing cache": lambda: sdpa_attention_forward(
            module, q, *grow[next(step) % 8], None),
    }
    _report(cases, calls, ("cufa attention fn", "cufa fn, growing cache"), 25)


if __name__ == "__main__":
    main()

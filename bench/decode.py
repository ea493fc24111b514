"""Decoding throughput: K+V bytes read per second, cuflash.attention_with_kvcache next to
torch SDPA's backends in the same process, with the device's copy bandwidth as the ceiling
(issue #16).

    python bench/decode.py [--out results.json] [--reps 20] [--parts main paged qlen]

Three parts, bf16, head_dim 128, 32 query heads, every cache entry full:

* main: the issue's rows (batch, cache length, kv heads) plus batch 64 / cache 2k, MHA (32 kv
  heads) and GQA (8 kv heads), q_len 1: cuflash beside SDPA's flash, cuDNN, efficient and
  default backends. Every implementation reads the same (batch, seqlen, heads, head_dim)
  tensors (SDPA gets the (batch, heads, seqlen, head_dim) transposed views, FlashAttention's
  native layout; enable_gqa for GQA). The issue's bar: cuflash >= 1.0x cuDNN and >= 85% of
  the copy bandwidth on every row ("done" column).
* paged: cuflash with a paged cache (page sizes 16-256, pages in shuffled order) against the
  same keys contiguous, rows (8, 8k, 32) and (8, 8k, 8). Bar: within 5% of contiguous.
* qlen: cuflash with q_len 1, 2, 4, 8 (speculative decoding; causal), same rows, K+V bytes
  per second. Bar: within 10% of q_len 1.

Metric: K+V bytes / median time, bytes = 2 * batch * cache * kv_heads * head_dim * 2 (K and V
read once; q and o are negligible). Copy ceiling: a 2 GiB device-to-device copy, bytes read +
written / median time.

Timing: every implementation is checked once against cuflash (max |diff| <= 2e-2), warmed
up, then timed by CUDA-event medians of ``--reps`` replays of a CUDA graph of 10 calls (GPU
time only; "eager" times 10 back-to-back eager calls, host overhead included where it shows).
``--help`` works without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

ROWS = [(1, 32768, 32), (8, 8192, 32), (32, 4096, 32), (64, 2048, 32),
        (1, 32768, 8), (8, 8192, 8), (32, 4096, 8), (64, 2048, 8)]
SWEEP_ROWS = [(8, 8192, 32), (8, 8192, 8)]
PAGE_SIZES = (16, 32, 64, 128, 256)
Q_LENS = (1, 2, 4, 8)
HEADS, HEAD_DIM, CALLS = 32, 128, 10
IMPLS = ("cuflash", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_default")
# The issue's numbers on an H200 (TB/s): cuflash before this kernel, FA-2, cuDNN.
ISSUE = {(1, 32768, 32): (0.94, 3.59, 3.94), (8, 8192, 32): (1.93, 2.59, 4.27),
         (32, 4096, 32): (3.53, 2.41, 4.45), (8, 8192, 8): (0.51, 3.30, 3.41)}
COPY_FRACTION, CUDNN_RATIO = 0.85, 1.0  # the issue's bars


def _events_ms(torch, fn, reps: int) -> float:
    """Median milliseconds of one call (fn runs CALLS calls) by CUDA events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS)
    return statistics.median(times)


def _graph_of(torch, call):
    """A CUDA graph of CALLS calls, warmed up on a side stream first."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            call()
    return graph


def _time(torch, call, want, kv_bytes: int, reps: int) -> dict:
    """Checked against ``want``, then graph and eager medians; or the error, recorded."""
    try:
        out = call()
        out = out[0] if isinstance(out, tuple) else out
        diff = float((out.float() - want.float()).abs().max())
        if not diff <= 2e-2:
            raise AssertionError(f"max |o - cuflash o| = {diff:.3g}")
        eager = _events_ms(torch, lambda: [call() for _ in range(CALLS)], reps)
        ms = _events_ms(torch, _graph_of(torch, call).replay, reps)
        return {"ms": ms, "eager_ms": eager, "tb_s": kv_bytes / ms / 1e9,
                "eager_tb_s": kv_bytes / eager / 1e9, "max_diff": diff}
    except Exception as exc:  # a backend that does not run this shape: recorded
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    finally:
        torch.cuda.synchronize()


def _inputs(torch, batch: int, cache: int, heads_kv: int, q_len: int = 1):
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda s, h: torch.randn((batch, s, h, HEAD_DIM), device="cuda", dtype=torch.bfloat16,
                                  generator=gen)
    return mk(q_len, HEADS), mk(cache, heads_kv), mk(cache, heads_kv)


def _sdpa_impls(torch, q, k, v, gqa: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def sdpa_with(backend):
        def call():
            if backend is None:
                return sdpa(qt, kt, vt, enable_gqa=gqa).transpose(1, 2)
            with sdpa_kernel(backend):
                return sdpa(qt, kt, vt, enable_gqa=gqa).transpose(1, 2)
        return call

    return {"sdpa_flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
            "sdpa_cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
            "sdpa_efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
            "sdpa_default": sdpa_with(None)}


def _plan_of(torch, shape) -> dict:
    from cuflash import decode

    plan = decode.decode_plan(shape, None, torch.cuda.current_device())
    return {"spec": plan.spec.name, "splits": plan.num_splits,
            "keys_per_split": plan.keys_per_split, "grid": plan.grid}


def bench_main_row(torch, batch: int, cache: int, heads_kv: int, reps: int,
                   copy_tb_s: float) -> dict:
    import cuflash
    from cuflash import decode

    q, k, v = _inputs(torch, batch, cache, heads_kv)
    kv_bytes = 2 * batch * cache * heads_kv * HEAD_DIM * 2
    row = {"batch": batch, "cache": cache, "heads_kv": heads_kv, "kv_bytes": kv_bytes,
           "cuflash_plan": _plan_of(torch, decode.DecodeShape(batch, 1, cache, HEADS, heads_kv,
                                                              HEAD_DIM, "bfloat16"))}
    impls = {"cuflash": lambda: cuflash.attention_with_kvcache(q, k, v)}
    impls.update(_sdpa_impls(torch, q, k, v, heads_kv != HEADS))
    want = impls["cuflash"]()
    for name, call in impls.items():
        row[name] = _time(torch, call, want, kv_bytes, reps)
    ours, cudnn = row["cuflash"].get("tb_s"), row["sdpa_cudnn"].get("tb_s")
    row["vs_cudnn"] = ours / cudnn if ours and cudnn else None
    row["of_copy"] = ours / copy_tb_s if ours else None
    row["done"] = bool(ours and row["of_copy"] >= COPY_FRACTION
                       and (cudnn is None or row["vs_cudnn"] >= CUDNN_RATIO))
    torch.cuda.empty_cache()
    return row


def _paged_copy(torch, k, v, page_size: int):
    """(k_pages, v_pages, block_table): the same keys as pages in shuffled order."""
    batch, cache, heads_kv, dim = k.shape
    pages = cache // page_size
    order = torch.randperm(batch * pages, device="cuda", generator=torch.Generator(
        device="cuda").manual_seed(1))
    table = order.reshape(batch, pages).to(torch.int32)
    out = []
    for x in (k, v):
        paged = torch.empty((batch * pages, page_size, heads_kv, dim), dtype=x.dtype,
                            device="cuda")
        paged[order] = x.reshape(batch * pages, page_size, heads_kv, dim)
        out.append(paged)
    return out[0], out[1], table


def bench_paged(torch, batch: int, cache: int, heads_kv: int, reps: int) -> dict:
    import cuflash

    q, k, v = _inputs(torch, batch, cache, heads_kv)
    kv_bytes = 2 * batch * cache * heads_kv * HEAD_DIM * 2
    lens = torch.full((batch,), cache, dtype=torch.int32, device="cuda")
    contiguous = lambda: cuflash.attention_with_kvcache(q, k, v, cache_seqlens=lens)
    want = contiguous()
    row = {"batch": batch, "cache": cache, "heads_kv": heads_kv,
           "contiguous": _time(torch, contiguous, want, kv_bytes, reps), "paged": {}}
    for page in PAGE_SIZES:
        kp, vp, table = _paged_copy(torch, k, v, page)
        call = lambda: cuflash.attention_with_kvcache(q, kp, vp, cache_seqlens=lens,
                                                      block_table=table)
        row["paged"][page] = _time(torch, call, want, kv_bytes, reps)
    torch.cuda.empty_cache()
    return row


def bench_qlen(torch, batch: int, cache: int, heads_kv: int, reps: int) -> dict:
    import cuflash
    from cuflash import decode

    kv_bytes = 2 * batch * cache * heads_kv * HEAD_DIM * 2
    row = {"batch": batch, "cache": cache, "heads_kv": heads_kv, "q_len": {}}
    for q_len in Q_LENS:
        q, k, v = _inputs(torch, batch, cache, heads_kv, q_len)
        call = lambda: cuflash.attention_with_kvcache(q, k, v, causal=True)
        result = _time(torch, call, call(), kv_bytes, reps)
        result["plan"] = _plan_of(torch, decode.DecodeShape(batch, q_len, cache, HEADS,
                                                            heads_kv, HEAD_DIM, "bfloat16"))
        row["q_len"][q_len] = result
    torch.cuda.empty_cache()
    return row


def copy_bandwidth(torch, reps: int) -> float:
    """TB/s of a 2 GiB device-to-device copy, bytes read + written."""
    n = 2 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = _events_ms(torch, lambda: [dst.copy_(src) for _ in range(CALLS)], reps)
    torch.cuda.empty_cache()
    return 2 * n / ms / 1e9


def _cell(r: dict) -> str:
    return f"{'n/a':>14}" if "error" in r else f"{r['tb_s']:6.2f} ({r['eager_tb_s']:5.2f})"


def table(result: dict) -> str:
    lines = [f"{result['device']}  copy ceiling {result['copy_tb_s']:.2f} TB/s (read+write)"]
    if result.get("main"):
        lines += [f"K+V TB/s (CUDA graph; eager in parentheses), bf16 d{HEAD_DIM} {HEADS} q "
                  f"heads, q_len 1",
                  f"{'batch cache kv':>16} | " + " | ".join(f"{n:>14}" for n in IMPLS)
                  + " | x cuDNN | of copy | done | splits | issue old/FA2/cuDNN"]
        for row in result["main"]:
            key = (row["batch"], row["cache"], row["heads_kv"])
            issue = "/".join(f"{x:.2f}" for x in ISSUE[key]) if key in ISSUE else "-"
            ratio = f"{row['vs_cudnn']:7.2f}" if row["vs_cudnn"] else f"{'-':>7}"
            of_copy = f"{row['of_copy']:7.0%}" if row["of_copy"] else f"{'-':>7}"
            lines.append(f"{row['batch']:5d} {row['cache']:5d} {row['heads_kv']:4d} | "
                         + " | ".join(_cell(row[n]) for n in IMPLS)
                         + f" | {ratio} | {of_copy} | {'yes' if row['done'] else 'NO':>4} | "
                         f"{row['cuflash_plan']['splits']:6d} | {issue}")
    for row in result.get("paged", []):
        base = row["contiguous"].get("tb_s")
        cells = [f"{p}: {r['tb_s']:.2f} ({r['tb_s'] / base:.0%})" if "tb_s" in r and base
                 else f"{p}: n/a" for p, r in row["paged"].items()]
        lines.append(f"paged {row['batch']}/{row['cache']}/{row['heads_kv']}: contiguous "
                     f"{_cell(row['contiguous']).strip()} | " + " | ".join(cells))
    for row in result.get("qlen", []):
        base = row["q_len"][1].get("tb_s")
        cells = [f"q_len {n}: {r['tb_s']:.2f} ({r['tb_s'] / base:.0%}, {r['plan']['spec']})"
                 if "tb_s" in r and base else f"q_len {n}: n/a" for n, r in row["q_len"].items()]
        lines.append(f"q_len {row['batch']}/{row['cache']}/{row['heads_kv']}: "
                     + " | ".join(cells))
    errors = [f"  {row['batch']}/{row['cache']}/{row['heads_kv']} {n}: {row[n]['error']}"
              for row in result.get("main", []) for n in IMPLS if "error" in row[n]]
    return "\n".join(lines + (["errors:"] + errors if errors else []))


def _set_flags(assignments: list) -> dict:
    """--set FLAG=0|1: cuflash.decode's module flag, before any plan; returns them all."""
    from cuflash import decode

    for item in assignments:
        name, _, value = item.partition("=")
        if name not in ("FUSED_COMBINE", "PDL") or value not in ("0", "1"):
            raise SystemExit(f"--set: expected FUSED_COMBINE=0|1 or PDL=0|1, got {item!r}")
        setattr(decode, name, value == "1")
    return {"FUSED_COMBINE": decode.FUSED_COMBINE, "PDL": decode.PDL}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--out", type=Path, default=Path("decode_bench.json"))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--parts", nargs="+", choices=("main", "paged", "qlen"),
                        default=["main", "paged", "qlen"])
    parser.add_argument("--set", action="append", default=[], metavar="FLAG=0|1",
                        help="a cuflash.decode selection flag (FUSED_COMBINE, PDL) set first: "
                             "a candidate's table before it is selected")
    args = parser.parse_args(argv)
    import torch

    flags = _set_flags(args.set)

    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "dtype": "bfloat16", "head_dim": HEAD_DIM,
              "heads": HEADS, "calls_per_timing": CALLS,
              "metric": "K+V bytes (2 * batch * cache * kv_heads * head_dim * 2) / median time",
              "bars": {"of_copy": COPY_FRACTION, "vs_cudnn": CUDNN_RATIO},
              "copy_tb_s": copy_bandwidth(torch, args.reps), "decode_flags": flags}
    if "main" in args.parts:
        result["main"] = [bench_main_row(torch, *row, args.reps, result["copy_tb_s"])
                          for row in ROWS]
    if "paged" in args.parts:
        result["paged"] = [bench_paged(torch, *row, args.reps) for row in SWEEP_ROWS]
    if "qlen" in args.parts:
        result["qlen"] = [bench_qlen(torch, *row, args.reps) for row in SWEEP_ROWS]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ring-attention scaling on the GPUs of one host: causal bf16, head_dim 128, 128k-1M tokens.

    python bench/ring_scaling.py                  # world sizes 1, 2, 4, ... up to every GPU
    python bench/ring_scaling.py --smoke          # 1 GPU, world size 1, 16k tokens: does it run?
    python bench/ring_scaling.py --gpus 2 --seqlens 128k 256k --iters 3
    python bench/ring_scaling.py --cpu --gpus 2 --seqlens 1k --validate-seqlen 512 --heads 2
                                                  # the same code on CPU processes with gloo

No torchrun: the script spawns one process per GPU of each world size itself
(``torch.multiprocessing``, NCCL, rendezvous on a free 127.0.0.1 port). Every rank holds its
zig-zag shard of one sequence (``cuflash.distributed``) and runs
``cuflash.distributed.torch.ring_attention``.

Per world size: validate once (a short sequence, every rank's shard of o, dq, dk, dv against
one-GPU ``cuflash.torch.flash_attention`` on the whole sequence; tolerance as in
``bench/attention_sweep.py``: 2e-2 relative for bf16), then per sequence length warm up and time
forward and forward+backward with CUDA events on the current stream, a barrier before each
call, the slowest rank's time per call, and the median over calls. Throughput is compared
with world size 1 at the same sequence length (where that fits in one GPU's memory).

FLOPs (FlashAttention-2's convention, softmax not counted), over the whole sequence S:
    forward          = 4 * batch * heads * S^2 * head_dim / 2     (causal: half the pairs)
    forward+backward = 3.5 * forward                              (backward = 2.5 x forward)
TFLOP/s per GPU = FLOPs / median time / world_size.

Results: a table on stdout and bench/results/ring_scaling_<device>_<date>.json (+ .png when
matplotlib is installed). Status: written and checked on the CPU only (no multi-GPU machine
was available); see docs/distributed.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import cuflash  # noqa: E402
from cuflash.distributed import shard_sequence  # noqa: E402
from cuflash.distributed.torch import ring_attention  # noqa: E402

BF16_TOL = 2e-2  # bench/attention_sweep.py's bf16 tolerance


def _tokens(text: str) -> int:
    text = text.lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlens", nargs="+", type=_tokens,
                   default=[_tokens(s) for s in ("128k", "256k", "512k", "1m")])
    p.add_argument("--gpus", type=int, default=None, help="largest world size (default: all)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--heads-kv", type=int, default=None, help="GQA (default: heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--validate-seqlen", type=_tokens, default=8192)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--smoke", action="store_true", help="world size 1, 16k tokens, 2 iterations")
    p.add_argument("--cpu", action="store_true",
                   help="CPU processes and gloo instead of GPUs and NCCL: checks the script "
                        "without a GPU (--gpus is then the number of processes; times are "
                        "wall clock and mean nothing for GPUs)")
    args = p.parse_args(argv)
    args.heads_kv = args.heads_kv or args.heads
    if args.smoke:
        args.gpus, args.seqlens, args.iters, args.warmup = 1, [16384], 2, 1
    return args


def _world_sizes(n_gpus: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 <= n_gpus:
        sizes.append(sizes[-1] * 2)
    return sizes if sizes[-1] == n_gpus else sizes + [n_gpus]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- inside one rank ---------------------------------------------------------------------------


def _device(args) -> torch.device:
    return torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())


def _full(args, seqlen: int, heads: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device=_device(args)).manual_seed(seed)
    return torch.randn(args.batch, seqlen, heads, args.head_dim, generator=g,
                       device=_device(args), dtype=torch.bfloat16)


def _validate(args, rank: int, world: int) -> dict:
    """Every rank's shard of the ring's o and grads against one-GPU cuflash (whole sequence)."""
    from cuflash.torch import flash_attention

    seqlen = args.validate_seqlen
    q, k, v, do = (_full(args, seqlen, h, seed) for h, seed in
                   ((args.heads, 1), (args.heads_kv, 2), (args.heads_kv, 3), (args.heads, 4)))
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = flash_attention(*full, causal=True)
    o_ref.backward(do)
    refs = [o_ref.detach()] + [x.grad for x in full]
    mine = [shard_sequence(x, rank, world).requires_grad_() for x in (q, k, v)]
    o = ring_attention(*mine, causal=True)
    o.backward(shard_sequence(do, rank, world))
    errors = {}
    for name, got, ref in zip(("o", "dq", "dk", "dv"), [o.detach()] + [x.grad for x in mine],
                              refs):
        ref = shard_sequence(ref, rank, world).float()
        errors[name] = float((got.float() - ref).abs().max() / ref.abs().max().clamp(min=1))
    worst = torch.tensor(max(errors.values()), device=_device(args))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"seqlen": seqlen, "rel_err_rank0": errors, "max_rel_err": float(worst),
            "ok": bool(worst <= BF16_TOL)}


def _median_ms(call, args) -> float:
    """Median over calls of the slowest rank's CUDA-event time."""
    for _ in range(args.warmup):
        call()
    times = []
    for _ in range(args.iters):
        dist.barrier()
        if args.cpu:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    slowest = torch.tensor(times, device=_device(args))
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return statistics.median(slowest.tolist())


def _time_seqlen(args, seqlen: int, rank: int, world: int) -> dict:
    shard = seqlen // world
    q, k, v, do = (_full(args, shard, h, 10 * rank + i) for i, h in
                   enumerate((args.heads, args.heads_kv, args.heads_kv, args.heads)))
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def forward():
        with torch.no_grad():
            ring_attention(*leaves, causal=True)

    def forward_backward():
        ring_attention(*leaves, causal=True).backward(do)
        for x in leaves:
            x.grad = None

    fwd_ms, fwd_bwd_ms = _median_ms(forward, args), _median_ms(forward_backward, args)
    flops_fwd = 4 * args.batch * args.heads * seqlen ** 2 * args.head_dim / 2
    return {"seqlen": seqlen, "world_size": world, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
            "fwd_tflops_per_gpu": flops_fwd / (fwd_ms * 1e-3) / world / 1e12,
            "fwd_bwd_tflops_per_gpu": 3.5 * flops_fwd / (fwd_bwd_ms * 1e-3) / world / 1e12,
            "fwd_bwd_tokens_per_s": args.batch * seqlen / (fwd_bwd_ms * 1e-3)}


def _rank_main(rank: int, world: int, port: int, args, out_path: str) -> None:
    init = dict(init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if args.cpu:
        dist.init_process_group("gloo", **init)
    else:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", rank), **init)
    try:
        validation = _validate(args, rank, world)
        if not validation["ok"]:
            raise RuntimeError(f"ring attention INVALID at world size {world}: {validation}")
        rows = []
        for seqlen in args.seqlens:
            if seqlen % (2 * world):
                continue
            try:
                rows.append(_time_seqlen(args, seqlen, rank, world))
            except torch.cuda.OutOfMemoryError:  # shards are equal: every rank fails alike
                rows.append({"seqlen": seqlen, "world_size": world, "error": "out of memory"})
            if not args.cpu:
                torch.cuda.empty_cache()
        if rank == 0:
            Path(out_path).write_text(json.dumps({"validation": validation, "rows": rows}))
        # every rank done before any tears its group down: a CPU run (gloo) once aborted in
        # rank 1 ("terminate called without an active exception") at world size 2 in CI
        dist.barrier()
    finally:
        dist.destroy_process_group()


# -- the driver ------------------------------------------------------------------------------


def _report(rows: list[dict]) -> None:
    base = {r["seqlen"]: r for r in rows if r["world_size"] == 1 and "error" not in r}
    print(f"{'tokens':>8} {'gpus':>4} {'fwd ms':>9} {'f+b ms':>9} {'TFLOP/s/gpu':>11} "
          f"{'tokens/s':>10} {'speedup':>7} {'eff':>5}")
    for r in sorted(rows, key=lambda r: (r["seqlen"], r["world_size"])):
        if "error" in r:
            print(f"{r['seqlen']:>8} {r['world_size']:>4}  {r['error']}")
            continue
        one = base.get(r["seqlen"])
        speedup = one["fwd_bwd_ms"] / r["fwd_bwd_ms"] if one else float("nan")
        r["speedup_vs_1gpu"] = speedup
        print(f"{r['seqlen']:>8} {r['world_size']:>4} {r['fwd_ms']:>9.1f} "
              f"{r['fwd_bwd_ms']:>9.1f} {r['fwd_bwd_tflops_per_gpu']:>11.1f} "
              f"{r['fwd_bwd_tokens_per_s']:>10.3g} {speedup:>7.2f} "
              f"{speedup / r['world_size']:>5.2f}")


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for seqlen in sorted({r["seqlen"] for r in rows}):
        pts = [(r["world_size"], r["speedup_vs_1gpu"]) for r in rows
               if r["seqlen"] == seqlen and "speedup_vs_1gpu" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{seqlen // 1024}k tokens")
    ax.set(xlabel="GPUs", ylabel="speedup vs 1 GPU (fwd+bwd)", title="cuflash ring attention")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    args = _parse(argv)
    n_gpus = (args.gpus or 1) if args.cpu else torch.cuda.device_count()
    if n_gpus == 0:
        print("ring_scaling: no CUDA GPU visible", file=sys.stderr)
        return 1
    args.gpus = min(args.gpus or n_gpus, n_gpus)
    rows, validations = [], {}
    for world in _world_sizes(args.gpus):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rank0.json")
            mp.spawn(_rank_main, args=(world, _free_port(), args, out), nprocs=world, join=True)
            result = json.loads(Path(out).read_text())
        validations[world] = result["validation"]
        rows += result["rows"]
        print(f"world size {world}: validation {result['validation']}", flush=True)
    _report(rows)
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    slug = device.lower().replace(" ", "-")
    path = args.out_dir / f"ring_scaling_{slug}_{date[:10]}.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path.write_text(json.dumps({"device": device, "gpus": n_gpus, "date": date,
                                "torch": torch.__version__, "cuflash": cuflash.__version__,
                                "config": config, "validation": validations, "rows": rows},
                               indent=1))
    _plot(rows, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the GPU time of one training step goes: bench/train_small.py's GQA model (eager),
each kernel's time per step with cuflash.torch beside torch SDPA, from torch.profiler.

    python bench/dev/train_step_kernels.py [--steps 5] [--top 25] [--compile]

The step-time gap of issue #10 is this table's difference: the attention kernels' share and
whatever else (copies, casts, reductions) one attention path adds around them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from train_small import GQA, build_torch_model, make_batches, set_attention  # noqa: E402


def step_fn(model, opt):
    def step(tokens):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def profile_steps(step, batches, steps: int) -> tuple[dict[str, float], float]:
    """Microseconds per step of each kernel name, and the median wall time of a step (ms).
    Also prints the host's share: the time until step() returns (the GPU still working), and
    the CUDA runtime / driver calls per step that can block the host or the GPU's queue."""
    for tokens in batches[:3]:
        step(tokens)
    torch.cuda.synchronize()
    walls, enqueue = [], []
    for tokens in batches[3:3 + steps]:
        start = time.perf_counter()
        step(tokens)
        enqueue.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) * 1e3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for tokens in batches[:steps]:
            step(tokens)
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    runtime: dict[str, list] = defaultdict(lambda: [0, 0.0])
    spans = []  # (start, end) us of the device's kernels, copies and memsets
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / steps
            if "#" not in event.name:  # "Optimizer.step#AdamW.step": an annotation's span
                spans.append((event.time_range.start, event.time_range.end))
        elif event.name.startswith(("cuda", "cu")) and not event.name.startswith("cuLaunch"):
            runtime[event.name][0] += 1
            runtime[event.name][1] += event.cpu_time_total
    print(f"   host: step() returns after {statistics.median(enqueue):.2f} ms (median)")
    busy = _union_us(spans) / steps / 1e3
    print(f"   device: busy {busy:.2f} ms a step (the union of its kernels' spans); "
          f"idle {statistics.median(walls) - busy:.2f} ms of the median step")
    for name, (count, us) in sorted(runtime.items(), key=lambda kv: -kv[1][1])[:8]:
        print(f"   host: {name}: {count / steps:.1f} calls, {us / steps:.1f} us a step")
    return dict(totals), statistics.median(walls)


def _union_us(spans: list) -> float:
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--compile", action="store_true", help="the step under torch.compile")
    args = p.parse_args()
    torch.manual_seed(0)
    init = build_torch_model(GQA, "sdpa").cuda()
    batches = torch.from_numpy(make_batches(GQA, args.steps + 3, 0)).cuda()
    tables = {}
    for attention in ("sdpa", "cuflash"):
        model = copy.deepcopy(init)
        set_attention(model, attention)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        step = step_fn(model, opt)
        if args.compile:
            torch._dynamo.reset()
            step = torch.compile(step)
        table, wall = profile_steps(step, batches, args.steps)
        tables[attention] = table
        print(f"\n-- {attention}: wall {wall:.2f} ms a step, kernels "
              f"{sum(table.values()) / 1e3:.2f} ms")
        for name, us in sorted(table.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"   {us:9.1f} us  {name[:110]}")
    names = set(tables["sdpa"]) | set(tables["cuflash"])
    print("\n-- kernels in one path only, or differing by > 5 us a step (cuflash - sdpa)")
    for name in sorted(names, key=lambda n: -abs(tables["cuflash"].get(n, 0)
                                               - tables["sdpa"].get(n, 0))):
        a, b = tables["sdpa"].get(name, 0.0), tables["cuflash"].get(name, 0.0)
        if abs(b - a) > 5:
            print(f"   {b - a:+9.1f} us  (sdpa {a:8.1f}, cuflash {b:8.1f})  {name[:90]}")


if __name__ == "__main__":
    main()

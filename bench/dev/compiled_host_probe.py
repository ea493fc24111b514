"""Where the host time of a compiled training step with cuflash goes.

    python bench/dev/compiled_host_probe.py [--steps 10] [--eager] [--rows 30]
        [--attention sdpa] [--direct] [--gc-freeze]

bench/train_small.py's GQA model, the step under ``torch.compile`` (or eager with --eager),
cuflash's attention. Prints, per step: how often the fast path missed its memo (validation and
recording again), the host microseconds spent inside cuflash's forward and backward
implementations, the caching allocator's device allocations, Python's garbage collections,
one step's timeline of cuflash's calls, then a cProfile of a few steps. A/B switches:
``--direct`` registers the operators' CUDA kernels with ``torch.library.Library`` (no
``custom_op`` wrapper between the dispatcher and cuflash), ``--gc-freeze`` moves everything
alive after warm-up out of the collector's reach (``gc.freeze``).
Session 11 (2026-12-03) saw the compiled cuflash step's host return after 11.3 ms against
SDPA's 6.9 ms, with the profiler putting about 300 us in each ``cuflash::flash_bwd`` call.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cuflash.torch as ct  # noqa: E402
from cuflash import fastpath, validate  # noqa: E402
from train_small import GQA, build_torch_model, make_batches, set_attention  # noqa: E402
from train_step_kernels import step_fn  # noqa: E402

calls: Counter = Counter()
host_us: dict = defaultdict(list)


def _counted(module, name: str) -> None:
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    setattr(module, name, wrapper)


def _timed(module, name: str) -> None:
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        host_us[name].append((time.perf_counter() - start) * 1e6)
        return out
    setattr(module, name, wrapper)


timeline: list = []
gc_pauses: list = []
_gc_start = [0.0]


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_start[0] = time.perf_counter()
    else:
        gc_pauses.append((info["generation"], (time.perf_counter() - _gc_start[0]) * 1e6))


def _timeline(module, name: str) -> None:
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timeline.append((name, start, time.perf_counter()))
        return out
    setattr(module, name, wrapper)


def _direct_kernels() -> None:
    """The ops' CUDA kernels straight from the dispatcher to cuflash's implementations."""
    lib = torch.library.Library("cuflash", "IMPL")
    lib.impl("flash_fwd", lambda q, k, v, causal, scale, deterministic=False:
             ct._forward_impl(q, k, v, causal, scale), "CUDA")
    lib.impl("flash_bwd", lambda do, q, k, v, o, m, l, causal, scale, deterministic:
             ct._backward_impl(do, q, k, v, o, m, l, causal, scale, deterministic), "CUDA")
    _direct_kernels.lib = lib  # kept alive: the registration ends with the Library


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--attention", default="cuflash", choices=("cuflash", "sdpa"))
    p.add_argument("--direct", action="store_true")
    p.add_argument("--gc-freeze", action="store_true")
    args = p.parse_args()
    import torch._library.utils as library_utils
    for name in ("check_aliasing_constraint", "_c_check_aliasing_constraint"):
        if hasattr(library_utils, name):
            _timed(library_utils, name)
    for name in ("check_forward", "check_backward"):
        _counted(validate, name)
    for name in ("_record_forward", "_record_backward"):
        _counted(fastpath, name)
    for name in ("_forward_impl", "_backward_impl"):
        _timed(ct, name)
    for name in ("forward_with_call", "backward"):
        _timed(fastpath, name)
    if args.direct:
        _direct_kernels()
    for name in ("_forward_impl", "_backward_impl"):
        _timeline(ct, name)
    torch.manual_seed(0)
    model = build_torch_model(GQA, "sdpa").cuda()
    set_attention(model, args.attention)
    batches = torch.from_numpy(make_batches(GQA, args.steps + 3, 0)).cuda()
    step = step_fn(model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0))
    fn = step if args.eager else torch.compile(step)
    for tokens in batches[:3]:
        fn(tokens)
    torch.cuda.synchronize()
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    calls.clear()
    host_us.clear()
    gc.callbacks.append(_on_gc)
    stats0 = torch.cuda.memory_stats()
    enqueue, walls, starts = [], [], []
    for tokens in batches[3:3 + args.steps]:
        start = time.perf_counter()
        starts.append(start)
        timeline.append(("step", start, start))
        fn(tokens)
        enqueue.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) * 1e3)
    stats1 = torch.cuda.memory_stats()
    gc.callbacks.remove(_on_gc)
    mode = ("eager" if args.eager else "compiled") + f" {args.attention}" + (
        " direct" if args.direct else "") + (" gc-freeze" if args.gc_freeze else "")
    print(f"{mode}: step {statistics.median(walls):.2f} ms, host returns after "
          f"{statistics.median(enqueue):.2f} ms (medians of {args.steps})")
    for name in ("check_forward", "check_backward", "_record_forward", "_record_backward"):
        print(f"  memo misses: {name} {calls[name] / args.steps:.1f} a step")
    for name, times in host_us.items():
        print(f"  {name}: {len(times) / args.steps:.1f} a step, "
              f"median {statistics.median(times):.1f} us, max {max(times):.1f} us")
    for key in ("num_device_alloc", "num_device_free", "num_alloc_retries",
                "num_sync_all_streams"):
        if key in stats1:
            per_step = (stats1[key] - stats0.get(key, 0)) / args.steps
            print(f"  allocator {key}: {per_step:.1f} a step")
    pauses = [us for _, us in gc_pauses]
    print(f"  gc: {len(pauses) / args.steps:.1f} collections a step, "
          f"{sum(pauses) / args.steps:.0f} us a step, by generation "
          f"{dict(Counter(g for g, _ in gc_pauses))}, longest {max(pauses, default=0):.0f} us")
    last = starts[-1]
    print("  last step's timeline (ms from the step's start: name entry-exit):")
    for name, t0, t1 in timeline:
        if t0 >= last and name != "step":
            print(f"    {name:<12} {(t0 - last) * 1e3:7.3f} - {(t1 - last) * 1e3:7.3f}")
    prof = cProfile.Profile()
    prof.enable()
    for tokens in batches[3:6]:
        fn(tokens)
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    print("\n-- cProfile, 3 steps, by own time")
    stats.sort_stats("tottime").print_stats(args.rows)
    print("\n-- cProfile, 3 steps, cumulative, cuflash and torch.library frames")
    stats.sort_stats("cumtime").print_stats(r"cuflash|_library|custom_op|autograd", args.rows)


if __name__ == "__main__":
    main()

"""cuflash against torch SDPA (flash, cuDNN, efficient) and naive attention.

    python bench/attention_sweep.py [--quick | --memory] ...   (or, in a checkout,
    python -m cuflash bench ...)

Two runs (bench/README.md has the long form):

* throughput (default): forward and backward TFLOP/s over dtype x head_dim x seqlen x causal
  with batch * seqlen = 16k tokens and heads * head_dim = 2048, FlashAttention-2's benchmark
  shapes; every implementation runs side by side on the same inputs in the same process.
* memory (``--memory``): peak device memory of cuflash's forward vs naive attention as the
  sequence doubles, batch 1, 16 heads, head_dim 128, bf16 (llm.c style): O(N) vs O(N^2).

Each configuration is validated once (cuflash vs torch's flash backend, else cuDNN, ...)
before anything is timed. An exception in one configuration is recorded and the sweep goes
on; a wall-clock budget stops launching new rows. Results: a JSON with every number, a PNG
(``plot_results.py``, beside this file), and the compact table printed last. Each row's
"spec" is the labels of the plan cuflash ran it by (``cuflash.plan``). torch and CuPy are imported
inside functions only, so ``--help`` works on a machine without them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import re
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

IMPLS = ("cuflash", "flash", "cudnn", "efficient", "naive")
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
# Validation: cuflash.testing's rule (err <= 2 * err(naive same dtype) + atol against float64)
# on batch entry 0, head 0 of input set 0: one head's outputs depend on that head alone
# (heads_kv = heads here), and one head keeps the float64 truth (seqlen^2 scores) small.
VALIDATED = "float64 reference, batch 0 head 0 (cuflash.testing rule)"

FULL_SWEEP = {"dtypes": ("bf16", "fp16"), "head_dims": (64, 128, 256),
              "seqlens": (1024, 2048, 4096, 8192, 16384)}
QUICK_SWEEP = {"dtypes": ("bf16",), "head_dims": (64, 128), "seqlens": (1024, 4096, 16384)}
DEFAULT_BUDGET_S = {"full": 240.0, "quick": 75.0, "memory": 240.0}
MEMORY_SHAPE = {"batch": 1, "heads": 16, "head_dim": 128, "dtype": "bf16"}
GIB = 1 << 30

# FLOPs of exact attention, FlashAttention-2's benchmark convention:
#   forward  = 4 * batch * heads * seqlen_q * seqlen_k * head_dim
#              (two matmuls, S = Q K^T and O = P V, of 2 * seqlen_q * seqlen_k * head_dim
#              each), halved when causal (half the score matrix is masked);
#   backward = 2.5 * forward (five matmuls instead of two: S = Q K^T again, dV = P^T dO,
#              dP = dO V^T, dQ = dS K, dK = dS^T Q).
# The softmax's exponentials are not counted. TFLOP/s = FLOPs / median time / 1e12.
FLOP_FORMULA = ("fwd = 4 * batch * heads * seqlen_q * seqlen_k * head_dim (/ 2 if causal); "
                "bwd = 2.5 * fwd")

MEMORY_METHOD = (
    "peak = torch.cuda.max_memory_allocated() after reset_peak_memory_stats() (the inputs "
    "q, k, v and, for naive, every intermediate) + the peak of CuPy's default pool "
    "used_bytes() seen at each malloc during the call (cuflash allocates o, m, l through "
    "CuPy's pool, which torch does not see). Measured on the second call; the first compiles.")


@dataclass(frozen=True)
class Timing:
    """How one (implementation, row) is timed."""

    warmup: int = 3  # untimed calls; the first also compiles (cuflash) or plans (cuDNN)
    min_reps: int = 5
    max_reps: int = 100
    target_s: float = 0.1  # timed calls add up to about this much GPU time...
    cap_s: float = 2.0  # ...and to at most about this much for a very slow implementation


@dataclass(frozen=True)
class Config:
    dtype: str  # "bf16" or "fp16"
    head_dim: int
    seqlen: int
    causal: bool
    batch: int
    heads: int

    def flops(self, direction: str) -> int:
        """See FLOP_FORMULA above."""
        fwd = 4 * self.batch * self.heads * self.seqlen * self.seqlen * self.head_dim
        fwd = fwd // 2 if self.causal else fwd
        return fwd * 5 // 2 if direction == "bwd" else fwd

    @property
    def label(self) -> str:
        return (f"{self.dtype} d{self.head_dim} {_k(self.seqlen)} "
                f"{'causal' if self.causal else 'full'}")


@dataclass
class Inputs:
    """One input set, all (batch, seqlen, heads, head_dim): FlashAttention's layout."""

    q: Any
    k: Any
    v: Any
    do: Any


@dataclass
class Runner:
    """One implementation set up for one row: ``call(i)`` runs it on input set ``i``."""

    call: Callable[[int], Any]  # -> o (fwd) or (dq, dk, dv) (bwd), (batch, seqlen, heads, d)
    context: Callable[[], Any] = contextlib.nullcontext  # held around every call


class Skipped(Exception):
    """An implementation deliberately not run for a configuration (reason in the message)."""


# -- the implementations ---------------------------------------------------------------------

def naive_attention(q, k, v, causal: bool):
    """softmax(q k^T / sqrt(d)) v in torch, materializing the seqlen_q x seqlen_k scores.

    q, k, v: (batch, seqlen, heads, head_dim); computed in their dtype (softmax accumulates
    in float32 internally); causal aligned bottom-right as in cuflash.
    """
    import torch

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (batch, heads, seqlen, head_dim)
    scores = torch.matmul(qt * qt.shape[-1] ** -0.5, kt.transpose(-2, -1))
    if causal:  # in place: matmul's backward needs its inputs, not its output
        sq, sk = scores.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu_(sk - sq + 1)
        scores.masked_fill_(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vt).transpose(1, 2)


def _make_runner(impl: str, direction: str, cfg: Config, sets: list[Inputs], args) -> Runner:
    if impl == "cuflash":
        return _cuflash_runner(direction, cfg, sets, args.deterministic)
    if impl == "naive":
        return _naive_runner(direction, cfg, sets, args.naive_max_gib)
    return _sdpa_runner(SDPA_BACKENDS[impl], direction, cfg, sets)


def _cuflash_runner(direction: str, cfg: Config, sets: list[Inputs], deterministic: bool):
    import cuflash

    if direction == "fwd":
        return Runner(lambda i: cuflash.attention_forward(
            sets[i].q, sets[i].k, sets[i].v, causal=cfg.causal)[0])
    # The backward alone: o and the softmax statistics come from one untimed forward per set.
    saved = [cuflash.attention_forward(s.q, s.k, s.v, causal=cfg.causal) for s in sets]

    def call(i):
        s, (o, stats) = sets[i], saved[i]
        return cuflash.attention_backward(s.do, s.q, s.k, s.v, o, stats, causal=cfg.causal,
                                          deterministic=deterministic)
    return Runner(call)


def _sdpa_runner(backend_name: str, direction: str, cfg: Config, sets: list[Inputs]):
    """torch SDPA with one backend forced; it takes (batch, heads, seqlen, d) views."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def context():
        return sdpa_kernel(backend)

    def forward(q, k, v):  # -> (batch, heads, seqlen, head_dim)
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=cfg.causal)

    if direction == "fwd":
        return Runner(lambda i: forward(sets[i].q, sets[i].k, sets[i].v).transpose(1, 2),
                      context)
    # The backward: one forward with requires_grad per set, then autograd.grad alone is
    # timed (retain_graph keeps the saved tensors): the backward kernel(s) plus autograd's
    # overhead, which is small next to the kernels at these sizes.
    graphs = []
    with context():
        for s in sets:
            leaves = tuple(x.detach().requires_grad_() for x in (s.q, s.k, s.v))
            out = forward(*leaves)
            do = torch.empty_like(out)  # out's strides: no relayout of dO in the timed call
            do.copy_(s.do.transpose(1, 2))
            graphs.append((out, leaves, do))
    return Runner(lambda i: torch.autograd.grad(graphs[i][0], graphs[i][1], graphs[i][2],
                                                retain_graph=True), context)


def _naive_runner(direction: str, cfg: Config, sets: list[Inputs], max_gib: float):
    import torch

    score_bytes = cfg.batch * cfg.heads * cfg.seqlen * cfg.seqlen * 2
    if score_bytes > max_gib * GIB:
        raise Skipped(f"its {score_bytes / GIB:.3g} GiB score matrix is over "
                      f"--naive-max-gib {max_gib:g}")
    if direction == "fwd":
        return Runner(lambda i: naive_attention(sets[i].q, sets[i].k, sets[i].v, cfg.causal))
    graphs = []
    for s in sets:
        leaves = tuple(x.detach().requires_grad_() for x in (s.q, s.k, s.v))
        graphs.append((naive_attention(*leaves, cfg.causal), leaves, s.do))
    return Runner(lambda i: torch.autograd.grad(graphs[i][0], graphs[i][1], graphs[i][2],
                                                retain_graph=True))


# -- set up, validate, time ------------------------------------------------------------------

def _make_inputs(cfg: Config, l2_bytes: int) -> list[Inputs]:
    """Fresh standard-normal inputs (never zeros), in 1 set or, when small, 3 to rotate.

    Calls repeated on inputs that fit in the L2 cache (50 MB on an H100) would read them
    from L2 after the first call, which no training step does; below 2x L2 per set the timed
    calls rotate through 3 sets. (Sets far below L2 still fit all three; those rows are
    launch-bound anyway.) The default sweep's sets are 4 x 64 MB and use one.
    """
    import torch

    dtype = getattr(torch, DTYPES[cfg.dtype])
    shape = (cfg.batch, cfg.seqlen, cfg.heads, cfg.head_dim)
    set_bytes = 4 * math.prod(shape) * 2
    n_sets = 1 if set_bytes >= 2 * l2_bytes else 3
    return [Inputs(*(torch.randn(shape, device="cuda", dtype=dtype) for _ in range(4)))
            for _ in range(n_sets)]


def _prepare(impl: str, direction: str, cfg: Config, sets: list[Inputs], args):
    """Set ``impl`` up and make its first call (which compiles kernels or builds plans).

    Returns (runner, output on input set 0, record); runner is None when it failed.
    """
    import torch

    start, failed = time.perf_counter(), None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            runner = _make_runner(impl, direction, cfg, sets, args)
            with runner.context():
                out = runner.call(0)
            torch.cuda.synchronize()
        except Exception as exc:
            failed = _failure(impl, exc, caught)
    if failed is not None:
        if failed["status"] == "oom":  # the traceback's frames held tensors: collect them
            _release_memory()
        return None, None, failed
    return runner, out, {"first_call_s": round(time.perf_counter() - start, 4)}


def _failure(impl: str, exc: BaseException, caught=()) -> dict:
    """The record of a failed implementation; torch's reasons come as warnings."""
    if _is_oom(exc):
        status = "oom"
    elif isinstance(exc, Skipped):
        status = "skipped"
    elif impl in SDPA_BACKENDS or isinstance(exc, (ValueError, TypeError, NotImplementedError)):
        status = "unsupported"
    else:
        status = "error"
        print(f"  {impl}: {traceback.format_exception_only(type(exc), exc)[-1].strip()}",
              file=sys.stderr)
    why = []
    for w in caught:  # e.g. "Flash attention requires ... head_dim ..." from torch
        line = (str(w.message).strip().splitlines() or [""])[0][:200]
        if line and line not in why:
            why.append(line)
    return {"status": status, "error": _first_line(exc), "warnings": why[:6]}


def _is_oom(exc: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError and cupy.cuda.memory.OutOfMemoryError share the name
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _time(runner: Runner, n_sets: int, timing: Timing, est_ms: float | None = None) -> dict:
    """Warm up, then CUDA-event times of calls enqueued back to back; median and all.

    One event pair brackets each call on the current stream (where cuflash launches too)
    and nothing synchronizes between calls, so a call's time is its GPU time whenever the
    host keeps ahead; for tiny problems the host's per-call overhead shows, as it would in use.
    """
    import torch

    def event():
        return torch.cuda.Event(enable_timing=True)

    with runner.context():
        for i in range(1, timing.warmup):  # call 0 was made by _prepare
            runner.call(i % n_sets)
        if est_ms is None:  # one timed call sizes the repetitions
            start, end = event(), event()
            start.record()
            runner.call(0)
            end.record()
            end.synchronize()
            est_ms = start.elapsed_time(end)
        reps = _reps(max(est_ms, 1e-3), timing)
        events = [(event(), event()) for _ in range(reps)]
        for r, (start, end) in enumerate(events):
            start.record()
            runner.call(r % n_sets)
            end.record()
        torch.cuda.synchronize()
    ms = [s.elapsed_time(e) for s, e in events]
    return {"ms_median": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms),
            "reps": reps, "ms_all": [round(x, 5) for x in ms]}


def _reps(est_ms: float, timing: Timing) -> int:
    reps = min(timing.max_reps, max(timing.min_reps, math.ceil(timing.target_s * 1e3 / est_ms)))
    if reps * est_ms > timing.cap_s * 1e3:  # a very slow call: fewer (recorded in "reps")
        reps = max(1, int(timing.cap_s * 1e3 / est_ms))
    return reps


def _validate(ours, cfg: Config, direction: str, inputs: Inputs) -> dict:
    """cuflash's output on ``inputs`` (o, or (dq, dk, dv)) by cuflash.testing's rule, on
    (batch 0, head 0): the truth in float64 and the naive attention in the row's dtype, both
    with torch on the GPU. The backward's stored-o allowance is left out: it needs the float64
    truth of a second product and is negligible for these unpeaked standard-normal inputs."""
    from cuflash import testing

    if ours is None:
        return {"status": "not validated", "reason": "cuflash failed", "reference": VALIDATED,
                "max_abs_diff": None}
    dtype = DTYPES[cfg.dtype]
    head = tuple(x[:1, :, :1] for x in (inputs.q, inputs.k, inputs.v, inputs.do))
    truth = _head_outputs(direction, cfg.causal, *(x.double() for x in head))
    naive = _head_outputs(direction, cfg.causal, *head)
    got = (ours,) if direction == "fwd" else tuple(ours)
    names = ("o",) if direction == "fwd" else ("dq", "dk", "dv")
    host = [[_to_numpy(x[:1, :, :1]) for x in group] for group in (got, truth, naive)]
    scale = testing.magnitude(*host[1])  # one slack for dq, dk, dv, as the tests do
    reports = [testing.judge(n, g, t, nv, dtype=dtype, scale=scale)
               for n, g, t, nv in zip(names, *host)]
    ok = all(r.ok for r in reports)
    worst = max((r.err for r in reports), key=lambda x: math.inf if math.isnan(x) else x)
    return {"status": "ok" if ok else "INVALID", "reference": VALIDATED, "max_abs_diff": worst,
            "per_output": {r.name: {"err": r.err, "bound": r.bound, "naive_err": r.naive_err}
                           for r in reports}}


def _head_outputs(direction: str, causal: bool, q, k, v, do):
    """naive_attention's o, or its (dq, dk, dv) for sum(do * o), in the inputs' dtype."""
    import torch

    if direction == "fwd":
        return (naive_attention(q, k, v, causal),)
    leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
    return torch.autograd.grad(naive_attention(*leaves, causal), leaves, do)


def _to_numpy(x):
    """A torch tensor as a host array in its own precision (bfloat16 as ml_dtypes')."""
    import ml_dtypes
    import torch

    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


# -- one row: (config, direction) ------------------------------------------------------------

def _row_header(cfg: Config, direction: str, args) -> dict:
    return {**asdict(cfg), "direction": direction,
            "deterministic": bool(args.deterministic) if direction == "bwd" else None,
            "flops": cfg.flops(direction), "spec": _spec_name(cfg, direction, args),
            "status": "ok", "impls": {}, "validation": None, "ratios": {}, "seconds": None}


def _spec_name(cfg: Config, direction: str, args) -> str:
    """The labels of the plan cuflash runs this row by (its KernelSpec names, '+'-joined)."""
    try:
        import torch

        from cuflash import launch
        from cuflash.plan import Shape

        shape = Shape(batch=cfg.batch, seqlen_q=cfg.seqlen, seqlen_k=cfg.seqlen,
                      heads=cfg.heads, heads_kv=cfg.heads, head_dim=cfg.head_dim,
                      dtype=DTYPES[cfg.dtype], causal=cfg.causal)
        device = torch.cuda.current_device()
        if direction == "fwd":
            return "+".join(launch.forward_plan(shape, device).labels)
        return "+".join(launch.backward_plan(shape, device, bool(args.deterministic)).labels)
    except Exception as exc:
        return f"unknown ({_first_line(exc)})"


def _run_row(cfg: Config, direction: str, sets: list[Inputs], args) -> dict:
    row = _row_header(cfg, direction, args)
    prepared = {}
    # -- validate before timing: cuflash's first call against the float64 truth
    if "cuflash" in args.impls:
        runner, out, rec = _prepare("cuflash", direction, cfg, sets, args)
        if runner is None:
            row["impls"]["cuflash"] = rec
        else:
            prepared["cuflash"] = (runner, rec)
        row["validation"] = _validate(out, cfg, direction, sets[0])
        runner = out = None
        _release_memory()  # the float64 truth's scores
        if row["validation"]["status"] == "INVALID":
            row["status"] = "INVALID"
    # -- time each implementation, releasing it before the next
    for impl in args.impls:
        if impl not in row["impls"]:
            row["impls"][impl] = _time_impl(impl, prepared.pop(impl, None), direction, cfg,
                                            sets, args)
    prepared.clear()
    ok = {i: r["tflops"] for i, r in row["impls"].items() if r.get("status") == "ok"}
    row["ratios"] = {f"cuflash/{p}": ok["cuflash"] / ok[p]
                     for p in ("flash", "cudnn") if "cuflash" in ok and p in ok}
    return row


def _time_impl(impl: str, prepared, direction: str, cfg: Config, sets: list[Inputs], args):
    if prepared is None:
        runner, _, rec = _prepare(impl, direction, cfg, sets, args)
        if runner is None:
            return rec
    else:
        runner, rec = prepared
    failed = None
    try:
        rec.update(_time(runner, len(sets), args.timing))
    except Exception as exc:
        failed = {**rec, **_failure(impl, exc)}
    if failed is not None:
        runner = None
        _release_memory()
        return failed
    rec["status"] = "ok"
    rec["tflops"] = cfg.flops(direction) / (rec["ms_median"] * 1e-3) / 1e12
    return rec


def _safe_row(cfg: Config, direction: str, sets, args) -> dict:
    """_run_row, with anything unforeseen recorded in the row instead of ending the sweep."""
    start = time.perf_counter()
    try:
        row = _run_row(cfg, direction, sets, args)
    except Exception as exc:
        traceback.print_exc()
        row = _row_header(cfg, direction, args)
        row.update(status="error", error=_first_line(exc))
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


# -- the throughput sweep --------------------------------------------------------------------

def _configs(args) -> list[Config]:
    """Rows in run order: the first dtype / head_dim given runs first (and survives a cut)."""
    causals = {"0": (False,), "1": (True,), "both": (False, True)}[args.causal]
    return [Config(dtype, d, s, causal, batch=max(1, args.tokens // s),
                   heads=max(1, args.hidden // d))
            for dtype in args.dtypes for d in args.head_dims for causal in causals
            for s in args.seqlens]


def run_sweep(args) -> int:
    meta = _environment(args, "attention")
    path = args.out_dir / f"attention_{meta['device_slug']}_{meta['date'][:10]}.json"
    configs, dirs = _configs(args), args.directions
    print(f"cuflash bench: {meta['device']}, torch {meta['torch']}, cupy {meta['cupy']}; "
          f"{len(configs) * len(dirs)} rows x {len(args.impls)} implementations, "
          f"time budget {args.time_budget:g} s; results -> {path}", flush=True)
    rows, start, last = [], time.perf_counter(), 0.0
    for cfg in configs:
        sets = None
        for direction in dirs:
            elapsed = time.perf_counter() - start
            if elapsed + last > args.time_budget:  # the next row would likely end past it
                rows.append({**_row_header(cfg, direction, args), "status": "skipped",
                             "error": f"time budget {args.time_budget:g} s"})
                continue
            try:
                sets = sets or _make_inputs(cfg, meta["l2_bytes"])
            except Exception as exc:
                rows.append({**_row_header(cfg, direction, args), "status": "error",
                             "error": f"inputs: {_first_line(exc)}"})
                continue
            rows.append(_safe_row(cfg, direction, sets, args))
            last = rows[-1]["seconds"]
            print(_progress_line(rows[-1], elapsed), flush=True)
            _write_json(path, _payload(meta, rows, start, args))
        sets = None
        _release_memory()
    _write_json(path, _payload(meta, rows, start, args))
    png = None if args.no_plot else _plot("plot_throughput", path)
    _print_notes(rows, path, png)
    print("\n".join(_table(rows, args.impls)))
    bad = [r for r in rows if r["status"] in ("INVALID", "error")
           or r["impls"].get("cuflash", {}).get("status") == "error"]
    return 1 if bad else 0


def _payload(meta: dict, rows: list[dict], start: float, args) -> dict:
    skipped = sum(r["status"] == "skipped" for r in rows)
    return {**meta, "elapsed_s": round(time.perf_counter() - start, 2),
            "time_budget_s": args.time_budget, "rows_skipped_by_budget": skipped,
            "summary": _geomeans(rows), "rows": rows}


def _geomeans(rows: list[dict]) -> dict:
    """Geometric means of cuflash's ratios over the valid rows, per direction."""
    out = {}
    for direction in ("fwd", "bwd"):
        for key in ("cuflash/flash", "cuflash/cudnn"):
            vals = [r["ratios"][key] for r in rows if r["direction"] == direction
                    and r["status"] == "ok" and key in r.get("ratios", {})]
            if vals:
                out[f"{direction} {key}"] = math.exp(sum(map(math.log, vals)) / len(vals))
    return out


# -- the memory run --------------------------------------------------------------------------

class CupyPeak:
    """The peak of CuPy's default pool during a call: an allocator noting used_bytes().

    cuflash allocates o, m, l (and the backward's scratch) with cupy.empty, from CuPy's
    pool, which torch.cuda.max_memory_allocated does not see, and CuPy keeps no peak itself.
    While installed, every CuPy allocation goes through ``malloc`` here.
    """

    def __init__(self):
        import cupy

        self.cupy, self.pool = cupy, cupy.get_default_memory_pool()
        self.base = self.peak = 0

    def malloc(self, size: int):
        mem = self.pool.malloc(size)
        self.peak = max(self.peak, self.pool.used_bytes() - self.base)
        return mem

    def reset(self) -> None:
        self.base, self.peak = self.pool.used_bytes(), 0

    def __enter__(self):
        self.cupy.cuda.set_allocator(self.malloc)
        return self

    def __exit__(self, *exc):
        self.cupy.cuda.set_allocator(self.pool.malloc)


def _memory_point(impl: str, q, k, v, causal: bool, tracker: CupyPeak) -> dict:
    """Peak memory and time of one forward (inputs included in both implementations)."""
    import torch

    if impl == "cuflash":
        import cuflash

        def fn():
            return cuflash.attention_forward(q, k, v, causal=causal)
    else:
        def fn():
            return naive_attention(q, k, v, causal)
    try:
        with torch.no_grad():
            fn()  # first call: compile; its allocations are not the measured ones
            torch.cuda.synchronize()
            _release_memory()
            torch.cuda.reset_peak_memory_stats()
            tracker.reset()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            torch_peak, cupy_peak = torch.cuda.max_memory_allocated(), tracker.peak
            del out
            timing = _time(Runner(lambda i: fn()), 1, Timing(warmup=1, min_reps=3, max_reps=10,
                                                             target_s=0.05, cap_s=3.0),
                           est_ms=start.elapsed_time(end))
    except Exception as exc:
        rec = _failure(impl, exc)
        _release_memory()
        return rec
    return {"status": "ok", "peak_bytes": torch_peak + cupy_peak, "torch_peak_bytes": torch_peak,
            "cupy_peak_bytes": cupy_peak, "cupy_pool_total_bytes": tracker.pool.total_bytes(),
            **timing}


def _memory_step(seqlen: int, alive: dict, causal: bool, args, tracker) -> list[dict]:
    """Every implementation still going at one seqlen; OOM or the time cap retires one."""
    import torch

    b, h, d = MEMORY_SHAPE["batch"], MEMORY_SHAPE["heads"], MEMORY_SHAPE["head_dim"]
    _release_memory()
    rows = []
    try:
        q, k, v = (torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
    except Exception as exc:  # not even the inputs fit: everything stops here
        for impl in [i for i, on in alive.items() if on]:
            rows.append({"seqlen": seqlen, "impl": impl, **_failure(impl, exc)})
            alive[impl] = False
        return rows
    for impl in [i for i, on in alive.items() if on]:
        rec = {"seqlen": seqlen, "impl": impl, "input_bytes": 3 * q.numel() * q.element_size(),
               **_memory_point(impl, q, k, v, causal, tracker)}
        if rec["status"] != "ok":
            alive[impl] = False
        elif rec["ms_median"] * 4e-3 > args.memory_call_cap:  # 2x seqlen: ~4x time
            alive[impl] = False
            rec["note"] = f"stopped: the next length would take over {args.memory_call_cap:g} s"
        rows.append(rec)
    return rows


def run_memory(args) -> int:
    meta = _environment(args, "memory")
    causal = args.causal != "0"
    path = args.out_dir / f"memory_{meta['device_slug']}_{meta['date'][:10]}.json"
    alive = {i: True for i in ("cuflash", "naive") if i in args.impls}
    print(f"cuflash bench --memory: {meta['device']}; batch 1, heads 16, head_dim 128, bf16, "
          f"{'causal' if causal else 'non-causal'}; seqlen x2 from 1k to "
          f"{_k(args.memory_max_seqlen)}; results -> {path}", flush=True)
    rows, start, seqlen = [], time.perf_counter(), 1024
    payload = {**meta, "shape": MEMORY_SHAPE, "causal": causal, "method": MEMORY_METHOD}
    with CupyPeak() as tracker:
        while seqlen <= args.memory_max_seqlen and any(alive.values()):
            if time.perf_counter() - start > args.time_budget:
                rows += [{"seqlen": seqlen, "impl": i, "status": "skipped",
                          "error": f"time budget {args.time_budget:g} s"}
                         for i, on in alive.items() if on]
                break
            step = _memory_step(seqlen, alive, causal, args, tracker)
            rows += step
            for r in step:
                print(f"  {_k(seqlen):>5} {r['impl']:<8} {_memory_cell(r)}", flush=True)
            _write_json(path, {**payload, "rows": rows,
                               "elapsed_s": round(time.perf_counter() - start, 2)})
            seqlen *= 2
    _release_memory()
    png = None if args.no_plot else _plot("plot_memory", path)
    print(f"\nJSON: {path}" + (f"\nPNG:  {png}" if png else ""))
    print("peak = torch max_memory_allocated + CuPy pool peak, inputs included; "
          "ms = median forward time")
    print("\n".join(_memory_table(rows)))
    return 0


# -- output ----------------------------------------------------------------------------------

CELL = {"unsupported": "n/s", "oom": "oom", "error": "err", "skipped": "skip"}
SHORT = {"cuflash": "cuflash", "flash": "flash", "cudnn": "cudnn", "efficient": "effic",
         "naive": "naive"}


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _cell(rec: dict | None) -> str:
    if rec is None:
        return "skip"
    if rec.get("status") == "ok":
        return f"{rec['tflops']:.1f}"
    return CELL.get(rec.get("status"), "?")


def _progress_line(row: dict, elapsed: float) -> str:
    cfg = Config(row["dtype"], row["head_dim"], row["seqlen"], row["causal"], row["batch"],
                 row["heads"])
    cells = "  ".join(f"{i} {_cell(r)}" for i, r in row["impls"].items())
    val = row.get("validation") or {}
    check = ""
    if val.get("max_abs_diff") is not None:
        check = f"  err {val['max_abs_diff']:.1e} vs float64 {val['status']}"
    elif val:
        check = f"  {val['status']}"
    extra = f"  ERROR {row['error']}" if row.get("error") else ""
    return (f"[{elapsed:5.0f}s] {cfg.label} {row['direction']}  {cells}{check}{extra}  "
            f"{row['spec']}  ({row['seconds']:.1f} s)")


def _table_key(row: dict):
    return (row["dtype"] != "bf16", row["head_dim"], row["causal"], row["direction"] != "fwd",
            row["seqlen"])


def _table(rows: list[dict], impls) -> list[str]:
    """The compact table: one row per configuration, TFLOP/s per implementation."""
    head = (f"{'dtype':<5} {'d':>3} {'seqlen':>6} {'causal':>6} {'dir':<3} |"
            + "".join(f"{SHORT[i]:>8}" for i in impls)
            + f" | {'cf/fa':>5} {'cf/cudnn':>8} | {'max|diff|':>9}  note")
    lines = ["", "TFLOP/s (higher is better)", head, "-" * len(head)]
    for r in sorted(rows, key=_table_key):
        texts = [_cell(r["impls"].get(i)) if r["impls"] else CELL.get(r["status"], "-")
                 for i in impls]
        cells = "".join(f"{t:>8}" for t in texts)
        ratio = {p: (f"{r['ratios'][p]:.2f}" if p in r.get("ratios", {}) else "-")
                 for p in ("cuflash/flash", "cuflash/cudnn")}
        val = r.get("validation") or {}
        diff = val.get("max_abs_diff")
        note = {"INVALID": "INVALID (over the cuflash.testing bound)",
                "error": f"error: {r.get('error')}",
                "skipped": f"skipped: {r.get('error')}"}.get(r["status"], "")
        if not note and val.get("status") == "not validated":
            note = f"not validated ({val.get('reason')})"
        lines.append(f"{r['dtype']:<5} {r['head_dim']:>3} {r['seqlen']:>6} {int(r['causal']):>6} "
                     f"{r['direction']:<3} |{cells} | {ratio['cuflash/flash']:>5} "
                     f"{ratio['cuflash/cudnn']:>8} | "
                     f"{'-' if diff is None else f'{diff:.1e}':>9}  {note}".rstrip())
    means = _geomeans(rows)
    if means:
        lines.append("geomean over valid rows: " + ", ".join(f"{k} {v:.2f}"
                                                            for k, v in means.items()))
    return lines


def _print_notes(rows: list[dict], path: Path, png: Path | None) -> None:
    """Why implementations did not run (first line of each distinct error), files written."""
    reasons: dict[tuple[str, str, str], int] = {}
    for r in rows:
        for impl, rec in r["impls"].items():
            if rec.get("status") not in (None, "ok"):
                why = rec.get("error", "")
                if rec.get("warnings"):
                    why += " | " + " / ".join(rec["warnings"][:2])
                key = (impl, rec["status"], why)
                reasons[key] = reasons.get(key, 0) + 1
    print("\nnot run (n/s = unsupported, oom, err = error, skip = naive size limit or time "
          "budget):" if reasons else "")
    for (impl, status, why), n in sorted(reasons.items()):
        print(f"  {impl:<9} {status:<11} x{n:<3} {why[:230]}")
    print(f"cf/fa = cuflash / torch flash, cf/cudnn = cuflash / cuDNN (> 1: cuflash faster); "
          f"FLOPs: {FLOP_FORMULA}; median of CUDA-event times after warm-up; backward = "
          f"backward alone (SDPA: autograd.grad, kernels + autograd overhead)")
    print(f"JSON: {path}" + (f"\nPNG:  {png}" if png else ""))


def _memory_cell(r: dict) -> str:
    if r.get("status") != "ok":
        return CELL.get(r.get("status"), "?") + f" ({r.get('error', '')[:80]})"
    return (f"{r['peak_bytes'] / GIB:8.3f} GiB {r['ms_median']:9.2f} ms"
            + (f"  ({r['note']})" if r.get("note") else ""))


def _memory_table(rows: list[dict]) -> list[str]:
    by = {(r["seqlen"], r["impl"]): r for r in rows}
    head = (f"{'seqlen':>7} | {'cuflash GiB':>11} {'naive GiB':>10} | {'cuflash ms':>10} "
            f"{'naive ms':>9} | {'inputs GiB':>10}")
    lines = ["", head, "-" * len(head)]
    for s in sorted({r["seqlen"] for r in rows}):
        cf, nv = by.get((s, "cuflash"), {}), by.get((s, "naive"), {})

        def cell(r, key, scale, fmt):
            if not r:
                return "-"
            return format(r[key] / scale, fmt) if r.get("status") == "ok" else CELL.get(
                r.get("status"), "?")
        inputs = (cf or nv).get("input_bytes")
        lines.append(f"{s:>7} | {cell(cf, 'peak_bytes', GIB, '.3f'):>11} "
                     f"{cell(nv, 'peak_bytes', GIB, '.3f'):>10} | "
                     f"{cell(cf, 'ms_median', 1, '.2f'):>10} {cell(nv, 'ms_median', 1, '.2f'):>9}"
                     f" | {'-' if inputs is None else f'{inputs / GIB:.3f}':>10}")
    return lines


def _write_json(path: Path, payload: dict) -> None:
    """Written after every row (a run cut short still leaves its results), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=1))
    tmp.replace(path)


def _finite(x):
    """NaN / inf -> None, so the file is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _plot(function: str, json_path: Path) -> Path | None:
    """plot_results.py's ``function`` on the JSON; a note instead when it cannot run."""
    png = json_path.with_suffix(".png")
    try:
        import plot_results  # beside this file: bench/ is on sys.path when this file runs

        getattr(plot_results, function)(json_path, png)
    except ImportError as exc:
        print(f"plot skipped ({exc}); later: python bench/plot_results.py {json_path}")
        return None
    except Exception as exc:
        print(f"plot failed: {_first_line(exc)}")
        return None
    return png


# -- environment, arguments, main ------------------------------------------------------------

def _environment(args, kind: str) -> dict:
    import torch

    import cuflash

    try:
        import cupy

        cupy_version = cupy.__version__
    except Exception as exc:
        cupy_version = f"not importable ({_first_line(exc)})"
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    name = torch.cuda.get_device_name(dev)
    return {
        "kind": kind, "device": name,
        "device_slug": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
        "capability": f"sm_{props.major}{props.minor}", "sm_count": props.multi_processor_count,
        "total_memory_bytes": props.total_memory,
        "l2_bytes": getattr(props, "L2_cache_size", 50 * 2**20),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "cupy": cupy_version,
        "cuflash": cuflash.__version__, "python": platform.python_version(),
        "argv": args.argv, "flop_formula": FLOP_FORMULA, "timing": asdict(args.timing),
        "validation": VALIDATED, "impls": list(args.impls),
    }


def _release_memory() -> None:
    """Hand cached blocks back: torch's and CuPy's pools cache separately, and one's cache
    would starve the other (naive attention takes tens of GiB)."""
    gc.collect()
    import torch

    torch.cuda.empty_cache()
    try:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    except Exception:
        pass


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _length(text: str) -> int:
    """'4096', '4k' or '4K' -> 4096."""
    text = text.strip().lower()
    try:
        return int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a length like 4096 or 4k, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/attention_sweep.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="cuflash vs torch SDPA (flash, cuDNN, efficient) and naive attention: "
                    "TFLOP/s sweep, or peak memory with --memory. Needs a CUDA GPU and torch.",
        epilog="default sweep: bf16 fp16 x head_dim 64 128 256 x seqlen 1k..16k x causal 0 1 x "
               "fwd bwd,\n  batch*seqlen = --tokens, heads*head_dim = --hidden (~3 min on an "
               "H100)\n--quick: bf16 x head_dim 64 128 x seqlen 1k 4k 16k (~1 min)\n"
               "results: <out-dir>/attention_<device>_<date>.json and .png (memory_... with "
               "--memory)\nexit status 1 when a row is INVALID or cuflash errored")
    p.add_argument("--quick", action="store_true", help="the short sweep (see below)")
    p.add_argument("--memory", action="store_true",
                   help="peak memory of cuflash's forward vs naive as seqlen doubles, batch 1, "
                        "16 heads, head_dim 128, bf16 (instead of the sweep)")
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), help="bf16 and/or fp16")
    p.add_argument("--head-dim", nargs="+", type=int, help="e.g. 64 128 256")
    p.add_argument("--seqlen", nargs="+", type=_length, help="e.g. 1k 4k 16k")
    p.add_argument("--causal", choices=("0", "1", "both"), default="both",
                   help="sweep: which masks (default both); --memory: causal unless 0")
    p.add_argument("--direction", choices=("fwd", "bwd", "both"), default="both")
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="implementations to time (cuflash is still validated against flash/cudnn)")
    p.add_argument("--deterministic", action="store_true",
                   help="cuflash backward with deterministic=True (torch backends unchanged)")
    p.add_argument("--tokens", type=_length, default=16384, help="batch * seqlen (default 16k)")
    p.add_argument("--hidden", type=int, default=2048, help="heads * head_dim (default 2048)")
    p.add_argument("--naive-max-gib", type=float, default=8.0,
                   help="skip naive when one score matrix (batch*heads*seqlen^2) is larger")
    p.add_argument("--memory-max-seqlen", type=_length, default=262144, help="default 256k")
    p.add_argument("--memory-call-cap", type=float, default=10.0,
                   help="--memory: stop an implementation when its next call would take longer "
                        "(seconds, default 10)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop launching new rows past this (default 240; 75 with --quick)")
    p.add_argument("--warmup", type=int, default=Timing.warmup, help="untimed calls (default 3)")
    p.add_argument("--min-reps", type=int, default=Timing.min_reps,
                   help="timed calls at least (default 5; more for fast rows, ~0.1 s each)")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--no-plot", action="store_true", help="JSON only")
    return p


def _finish_args(args, argv: list[str]) -> None:
    sweep = QUICK_SWEEP if args.quick else FULL_SWEEP
    args.dtypes = tuple(args.dtype or sweep["dtypes"])
    args.head_dims = tuple(args.head_dim or sweep["head_dims"])
    args.seqlens = tuple(args.seqlen or sweep["seqlens"])
    args.directions = ("fwd", "bwd") if args.direction == "both" else (args.direction,)
    args.impls = tuple(i for i in IMPLS if i in args.impl)  # table order
    if args.time_budget is None:
        args.time_budget = DEFAULT_BUDGET_S["memory" if args.memory else
                                            "quick" if args.quick else "full"]
    args.timing = Timing(warmup=max(1, args.warmup), min_reps=max(1, args.min_reps))
    args.argv = list(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 0
    _finish_args(args, argv)
    try:
        import torch
    except ImportError:
        print("cuflash bench: needs torch with CUDA (pip install torch)")
        return 2
    if not torch.cuda.is_available():
        print("cuflash bench: needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    return run_memory(args) if args.memory else run_sweep(args)


if __name__ == "__main__":  # python bench/attention_sweep.py ARGS (or python -m cuflash bench)
    sys.exit(main())

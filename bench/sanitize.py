"""Run every kernel family once on tiny shapes, for NVIDIA compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 1 python bench/sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python bench/sanitize.py
    compute-sanitizer --tool initcheck --error-exitcode 1 python bench/sanitize.py --no-poison
    compute-sanitizer --tool synccheck --error-exitcode 1 python bench/sanitize.py

Cases: for each head-dim bucket (32 ... 256), bfloat16 and float32: the forward, the backward
with dQ by atomics and the deterministic backward (flash_bwd + flash_bwd_dq), on batch 1,
seqlen_q 150, seqlen_k 300, 2 query heads sharing 1 kv head. Then bfloat16 with head_dim
bucket - 8 (the padded columns), and one causal case (200 queries over 130 keys: the first
70 rows see no key). Each case prints one line: the specs it ran, the largest error against
the float64 reference relative to its bound (the package's rule, cuflash.testing),
and the time.

The shapes are small on purpose: racecheck instruments every shared-memory access, and a
handful of blocks per launch keeps the whole run to a few minutes. They are not smaller:
every block must loop over at least 3 key tiles (block_n is at most 128) and the backward
over at least 2 query tiles, or the hazards between pipeline stages and loop iterations
(cp.async double buffering, reuse of a shared tile) never happen.

Allocators: CuPy's memory pool is switched off and torch's caching allocator disabled, so
every array is its own cudaMalloc and memcheck sees a read past an array's end, instead of a
read that lands in a neighbour inside one pooled block. Outputs are NaN-poisoned
(CUFLASH_POISON=1) unless --no-poison (use that with initcheck, which would otherwise see
every output as initialized by the poison fill).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")  # before torch is imported
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # a source checkout; the tests' error rule

import numpy as np  # noqa: E402

import gpu_helpers as gh  # noqa: E402  (inputs, transfers and the error rule of the GPU tests)

SHAPE = dict(batch=1, seqlen_q=150, seqlen_k=300, heads=2, heads_kv=1)
CAUSAL_SEQLENS = (200, 130)  # seqlen_q > seqlen_k: 70 rows that see no key


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="bfloat16,float32",
                   help="comma-separated dtypes (default: bfloat16,float32)")
    p.add_argument("--head-dims", default="32,64,96,128,160,192,224,256",
                   help="comma-separated head-dim buckets (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="skip the padded head_dim and causal cases")
    p.add_argument("--no-poison", action="store_true",
                   help="do not NaN-fill outputs first (for --tool initcheck)")
    p.add_argument("--smem-kib", type=int, default=None,
                   help="plan tiles for this shared-memory budget in KiB (default: the device's)")
    return p.parse_args(argv)


def cases(args):
    """(dtype, head_dim, causal) in run order."""
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    buckets = [int(d) for d in args.head_dims.split(",") if d.strip()]
    out = [(dtype, d, False) for d in buckets for dtype in dtypes]
    if not args.quick:
        out += [("bfloat16", d - 8, False) for d in buckets]  # columns head_dim..bucket padded
        out.append(("bfloat16", 128, True))  # causal, GQA, rows without keys
    return out


def seqlens(causal: bool) -> tuple[int, int]:
    return CAUSAL_SEQLENS if causal else (SHAPE["seqlen_q"], SHAPE["seqlen_k"])


def plan_labels(q, k, dtype: str, causal: bool) -> str:
    """The kernels the case ran, from the plans the library ran them by (cuflash.plan)."""
    from cuflash import launch

    shape = launch.shape_of(q, k, dtype, causal)
    labels = list(launch.forward_plan(shape, 0).labels)
    for deterministic in (False, True):
        labels += [x for x in launch.backward_plan(shape, 0, deterministic).labels
                   if x not in labels]
    return " ".join(labels)


def run_case(dtype: str, head_dim: int, causal: bool) -> tuple[bool, str]:
    """Forward, backward (atomic), backward (deterministic); -> (ok, summary line)."""
    import cupy

    import cuflash
    from cuflash import reference, testing

    rng = gh.rng_for()
    sq, sk = seqlens(causal)
    q, k, v = gh.random_qkv(rng, batch=SHAPE["batch"], seqlen_q=sq, seqlen_k=sk,
                            heads=SHAPE["heads"], heads_kv=SHAPE["heads_kv"],
                            head_dim=head_dim, dtype=dtype)
    do = gh.randn(rng, q.shape, dtype)
    gq, gk, gv, gdo = (gh.to_gpu(x) for x in (q, k, v, do))

    start = time.perf_counter()
    o, stats = cuflash.attention_forward(gq, gk, gv, causal=causal)
    grads = {det: cuflash.attention_backward(gdo, gq, gk, gv, o, stats, causal=causal,
                                             deterministic=det) for det in (False, True)}
    cupy.cuda.Device().synchronize()  # sanitizer reports land on this case
    seconds = time.perf_counter() - start

    o_host = gh.to_host(o, dtype)
    o_ref = reference.attention_reference(q, k, v, causal=causal)[0]
    o_naive = reference.attention_naive(q, k, v, causal=causal, dtype=gh.np_dtype(dtype))
    reports = [testing.judge("o", o_host, o_ref, o_naive, dtype=dtype)]
    refs, naives, allowances = testing.backward_references(do, q, k, v, o_host, dtype=dtype,
                                                           causal=causal)
    scale = testing.magnitude(*refs)
    for det, got in grads.items():
        mode = "det" if det else "atomic"
        for name, g, r, n, a in zip(("dq", "dk", "dv"), got, refs, naives, allowances):
            reports.append(testing.judge(f"{name}/{mode}", gh.to_host(g, dtype), r, n,
                                         dtype=dtype, scale=scale, allowance=a))
    ok = all(r.ok for r in reports)
    worst = max(reports, key=lambda r: np.inf if not r.ok else r.err / r.bound)
    line = (f"{'ok  ' if ok else 'FAIL'} {dtype:8s} d{head_dim:<3d} "
            f"{'causal' if causal else 'full  '} {seconds:6.2f}s  worst {worst}  "
            f"[{plan_labels(q, k, dtype, causal)}]")
    if not ok:
        line += "\n     " + "\n     ".join(str(r) for r in reports if not r.ok)
    return ok, line


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.no_poison:
        os.environ.pop("CUFLASH_POISON", None)
    else:
        os.environ["CUFLASH_POISON"] = "1"
    import cupy

    from cuflash import specs

    cupy.cuda.set_allocator(None)  # one cudaMalloc per array (see the module docstring)
    specs.set_smem_budget(None if args.smem_kib is None else args.smem_kib * specs.KIB)
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"cuflash sanitize run on {name}: batch {SHAPE['batch']}, (seqlen_q, seqlen_k) "
          f"{seqlens(False)}, causal {seqlens(True)}, heads {SHAPE['heads']}/"
          f"{SHAPE['heads_kv']}, smem budget {args.smem_kib or 'device'}", flush=True)
    failed = 0
    for dtype, head_dim, causal in cases(args):
        try:
            ok, line = run_case(dtype, head_dim, causal)
        except Exception as exc:  # keep going: the sanitizer log should cover every case
            ok = False
            line = f"ERROR {dtype} d{head_dim} causal={causal}: {type(exc).__name__}: {exc}"
        failed += not ok
        print(line, flush=True)
    print(f"{len(cases(args)) - failed} ok, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

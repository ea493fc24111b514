"""Run every kernel family once on tiny shapes, for NVIDIA compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 1 python bench/sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python bench/sanitize.py
    compute-sanitizer --tool initcheck --error-exitcode 1 python bench/sanitize.py --no-poison
    compute-sanitizer --tool synccheck --error-exitcode 1 python bench/sanitize.py

Cases: for each head-dim bucket (32 ... 256), bfloat16 and float32: the forward, the backward
with dQ by atomics and the deterministic backward (flash_bwd + flash_bwd_dq), on batch 1,
seqlen_q 150, seqlen_k 300, 2 query heads sharing 1 kv head. Then bfloat16 with head_dim
bucket - 8 (the padded columns), and one causal case (200 queries over 130 keys: the first
70 rows see no key). Then the paths the dense cases do not reach: every score modifier at
once (window, softcap, ALiBi per batch entry, sinks with their gradient), packed variable
lengths (three causal sequences), a block mask (every loop skips a tile), and decode (a
paged cache with an append, GQA, three splits and the combine; then 16 query heads per kv
head, the tensor-core split). Run it once
more with CUFLASH_DISABLE_WGMMA=1 for the portable 16-bit kernels on a Hopper GPU.
Each case prints one line: the specs it ran, the largest error against
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
from cuflash import reference, testing  # noqa: E402  (no GPU at import; gh imports them too)

SHAPE = dict(batch=1, seqlen_q=150, seqlen_k=300, heads=2, heads_kv=1)
CAUSAL_SEQLENS = (200, 130)  # seqlen_q > seqlen_k: 70 rows that see no key


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="bfloat16,float32",
                   help="comma-separated dtypes (default: bfloat16,float32)")
    p.add_argument("--head-dims", default="32,64,96,128,160,192,224,256",
                   help="comma-separated head-dim buckets (default: all)")
    p.add_argument("--seqlen-k", type=int, default=None,
                   help="keys of the dense cases (default 300, 3 tiles of 128; the "
                        "warp-specialized forward's 3-stage ring first reuses a stage at 4)")
    p.add_argument("--quick", action="store_true",
                   help="skip the padded head_dim and causal cases")
    p.add_argument("--warm", action="store_true",
                   help="only compile every case's kernels, in parallel, and exit: run this "
                        "outside the sanitizer first (it would otherwise compile one by one)")
    p.add_argument("--no-poison", action="store_true",
                   help="do not NaN-fill outputs first (for --tool initcheck)")
    p.add_argument("--kinds", default=None,
                   help="comma-separated case kinds to run (dense, modifiers, varlen, sparse, "
                        "decode; default: all)")
    p.add_argument("--boxed", default=None, metavar="FLAG",
                   help="the forward and backward with ModFlags FLAG on (varlen, "
                        "block_sparse, ...) loading with bulk tensor copies whether or not "
                        "the selection does (specs.boxed_where): e.g. --boxed varlen --kinds "
                        "varlen, their zeroed tails; --boxed block_sparse --kinds sparse")
    p.add_argument("--decode-fused", action="store_true",
                   help="decode cases with decode.FUSED_COMBINE (the split kernel's last "
                        "block merges the splits; a candidate)")
    p.add_argument("--smem-kib", type=int, default=None,
                   help="plan tiles for this shared-memory budget in KiB (default: the device's)")
    return p.parse_args(argv)


def cases(args):
    """(kind, dtype, head_dim, causal) in run order; kind picks the runner (RUNNERS)."""
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    buckets = [int(d) for d in args.head_dims.split(",") if d.strip()]
    out = [("dense", dtype, d, False) for d in buckets for dtype in dtypes]
    if not args.quick:
        out += [("dense", "bfloat16", d - 8, False) for d in buckets]  # padded columns
        out.append(("dense", "bfloat16", 128, True))  # causal, GQA, rows without keys
    extra_dims = (64, 128) if args.quick else (64, 128, 256)
    out += [("modifiers", dtype, d, False) for d in extra_dims for dtype in dtypes]
    out += [("varlen", dtype, 128, True) for dtype in dtypes]
    out += [("sparse", dtype, d, False) for d in extra_dims for dtype in dtypes]
    out.append(("sparse", "bfloat16", 128, True))
    out += [("decode", dtype, 128, True) for dtype in dtypes]
    if args.kinds:
        kinds = {x.strip() for x in args.kinds.split(",")}
        out = [case for case in out if case[0] in kinds]
    return out


def seqlens(causal: bool) -> tuple[int, int]:
    return CAUSAL_SEQLENS if causal else (SHAPE["seqlen_q"], SHAPE["seqlen_k"])


def case_plans(q, k, dtype: str, causal: bool, mods: dict | None = None,
               varlen: bool = False, sparse: bool = False) -> list:
    """The forward plan and both backward plans of a case, as the library makes them."""
    from dataclasses import replace

    from cuflash import launch, plan

    mods = mods or {}
    flags = plan.mod_flags(mods.get("window"), mods.get("softcap"), mods.get("alibi_slopes"),
                           mods.get("sinks"), causal, sparse)
    if varlen:  # packed (total, heads, head_dim): the planner needs only the flag and head_dim
        flags = replace(flags, varlen=True)
        q, k = q[None], k[None]
    shape = launch.shape_of(q, k, dtype, causal, flags)
    return [launch.forward_plan(shape, 0)] + [launch.backward_plan(shape, 0, deterministic)
                                              for deterministic in (False, True)]


def plan_labels(q, k, dtype: str, causal: bool, mods: dict | None = None,
                varlen: bool = False, sparse: bool = False) -> str:
    """The kernels the case ran, from the plans the library ran them by (cuflash.plan)."""
    labels = []
    for p in case_plans(q, k, dtype, causal, mods, varlen, sparse):
        labels += [x for x in p.labels if x not in labels]
    return " ".join(labels)


def warm(args) -> int:
    """Compile the kernels of every dense, modifier and varlen case in parallel (decode's
    few compile during the run)."""
    from cuflash import aot

    specs_by_name = {}
    for kind, dtype, head_dim, causal in cases(args):
        if kind == "decode":
            continue
        sq, sk = seqlens(causal)
        batch = 2 if kind == "modifiers" else 1
        q = np.empty((batch, sq, SHAPE["heads"], head_dim), np.float32)
        k = np.empty((batch, sk, SHAPE["heads_kv"], head_dim), np.float32)
        mods = modifier_args(gh.rng_for()) if kind == "modifiers" else None
        if kind == "varlen":
            q, k = q[0], k[0]
        for p in case_plans(q, k, dtype, causal, mods, kind == "varlen", kind == "sparse"):
            for x in (getattr(p, f, None) for f in ("kernel", "pre", "main", "dq", "dq_convert",
                                                     "kv_convert")):
                if x is not None:
                    specs_by_name[x.spec.name] = x.spec
    work = [(spec, 0) for spec in specs_by_name.values()]
    aot.run_parallel(aot.warm_one, work, os.cpu_count() or 2, f"warming {len(work)} kernels")
    print(f"{len(work)} kernels compiled", flush=True)
    return 0


def run_dense(dtype: str, head_dim: int, causal: bool) -> tuple[bool, str]:
    """Forward, backward (atomic), backward (deterministic); -> (ok, summary line)."""
    import cupy

    import cuflash

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
    return _summary("dense", dtype, head_dim, causal, seconds, reports,
                    plan_labels(q, k, dtype, causal))


def _summary(kind: str, dtype: str, head_dim: int, causal: bool, seconds: float, reports,
             labels: str) -> tuple[bool, str]:
    ok = all(r.ok for r in reports)
    worst = max(reports, key=lambda r: np.inf if not r.ok else r.err / max(r.bound, 1e-300))
    line = (f"{'ok  ' if ok else 'FAIL'} {kind:9s} {dtype:8s} d{head_dim:<3d} "
            f"{'causal' if causal else 'full  '} {seconds:6.2f}s  worst {worst}  [{labels}]")
    if not ok:
        line += "\n     " + "\n     ".join(str(r) for r in reports if not r.ok)
    return ok, line


def _judge_grads(reports, mode, dtype, grads, refs, naives) -> None:
    """dq, dk, dv (and dsinks) against the float64 truth given the forward's stored o."""
    scale = testing.magnitude(*refs[:3])
    for name, got, ref, naive in zip(("dq", "dk", "dv", "dsinks"), grads, refs, naives):
        host = gh.to_host(got) if name == "dsinks" else gh.to_host(got, dtype)
        s = testing.magnitude(ref) if name == "dsinks" else scale
        reports.append(testing.judge(f"{name}/{mode}", host, ref, naive, dtype=dtype,
                                              scale=s))


def modifier_args(rng) -> dict:
    """Every modifier at once: window (60, 20), softcap 4, ALiBi per (batch entry, head) of a
    batch of 2, sinks."""
    return dict(window=(60, 20), softcap=4.0,
                alibi_slopes=rng.uniform(0.0, 0.5, (2, SHAPE["heads"])).astype(np.float32),
                sinks=rng.normal(0.0, 2.0, (SHAPE["heads"],)).astype(np.float32))


def run_modifiers(dtype: str, head_dim: int, causal: bool) -> tuple[bool, str]:
    """Window (60, 20), softcap 4, ALiBi per (batch, head), sinks: forward, both backwards."""
    rng = gh.rng_for()
    return _run_with_extras("modifiers", rng, dtype, head_dim, causal, 2, modifier_args(rng))


def _run_with_extras(kind: str, rng, dtype: str, head_dim: int, causal: bool, batch: int,
                     extras: dict, sparse: bool = False) -> tuple[bool, str]:
    """Forward and both backwards with ``extras`` (modifiers or a block mask: host arrays,
    sent to the GPU for the call), judged against the reference given the same extras."""
    import cupy

    import cuflash

    sq, sk = seqlens(causal)
    q, k, v = gh.random_qkv(rng, batch=batch, seqlen_q=sq, seqlen_k=sk, heads=SHAPE["heads"],
                            heads_kv=SHAPE["heads_kv"], head_dim=head_dim, dtype=dtype)
    do = gh.randn(rng, q.shape, dtype)
    gextras = {n: cupy.asarray(x) if isinstance(x, np.ndarray) else x
               for n, x in extras.items()}
    gq, gk, gv, gdo = (gh.to_gpu(x) for x in (q, k, v, do))
    start = time.perf_counter()
    o, stats = cuflash.attention_forward(gq, gk, gv, causal=causal, **gextras)
    grads = {det: cuflash.attention_backward(gdo, gq, gk, gv, o, stats, causal=causal,
                                             deterministic=det, **gextras)
             for det in (False, True)}
    cupy.cuda.Device().synchronize()
    seconds = time.perf_counter() - start
    o_host = gh.to_host(o, dtype)
    reports = [testing.judge("o", o_host, reference.attention_reference(
        q, k, v, causal=causal, **extras)[0], reference.attention_naive(
        q, k, v, causal=causal, dtype=gh.np_dtype(dtype), **extras), dtype=dtype)]
    refs = reference.attention_backward_reference(do, q, k, v, causal=causal, o=o_host,
                                                  **extras)
    naives = reference.attention_backward_naive(do, q, k, v, causal=causal,
                                                dtype=gh.np_dtype(dtype), **extras)
    for det, got in grads.items():
        _judge_grads(reports, "det" if det else "atomic", dtype, got, refs, naives)
    mods = None if sparse else extras
    return _summary(kind, dtype, head_dim, causal, seconds, reports,
                    plan_labels(q, k, dtype, causal, mods, sparse=sparse))


# A block mask of 128 x 128 blocks over the dense shape (150 x 300, or causal 200 x 130):
# per head, hidden blocks in every block row and column, so every loop skips a tile.
SPARSE_BLOCKS = np.array([[[[1, 0, 1], [0, 1, 1]], [[0, 1, 1], [1, 0, 1]]]], dtype=bool)


def run_sparse(dtype: str, head_dim: int, causal: bool) -> tuple[bool, str]:
    """A block mask (docs/block_sparse.md): forward, both backwards."""
    sq, sk = seqlens(causal)
    mask = SPARSE_BLOCKS[:, :SHAPE["heads"], :-(-sq // 128), :-(-sk // 128)]
    return _run_with_extras("sparse", gh.rng_for(), dtype, head_dim, causal, SHAPE["batch"],
                            dict(block_mask=mask, block_size=(128, 128)), sparse=True)


VARLEN_Q, VARLEN_K = (37, 150, 64), (64, 300, 64)  # packed sequences (causal: bottom-right)


def run_varlen(dtype: str, head_dim: int, causal: bool) -> tuple[bool, str]:
    """Three packed sequences: forward, both backwards (cu_seqlens on the device)."""
    import cupy

    import cuflash

    rng = gh.rng_for()
    h, hk = SHAPE["heads"], SHAPE["heads_kv"]
    q = gh.randn(rng, (sum(VARLEN_Q), h, head_dim), dtype)
    k, v = (gh.randn(rng, (sum(VARLEN_K), hk, head_dim), dtype) for _ in range(2))
    do = gh.randn(rng, q.shape, dtype)
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
                  for n in (VARLEN_Q, VARLEN_K))
    gq, gk, gv, gdo = (gh.to_gpu(x) for x in (q, k, v, do))
    gcu_q, gcu_k = cupy.asarray(cu_q), cupy.asarray(cu_k)
    lens = (max(VARLEN_Q), max(VARLEN_K))
    start = time.perf_counter()
    o, stats = cuflash.attention_varlen_forward(gq, gk, gv, gcu_q, gcu_k, *lens, causal=causal)
    grads = {det: cuflash.attention_varlen_backward(gdo, gq, gk, gv, o, stats, gcu_q, gcu_k,
                                                    *lens, causal=causal, deterministic=det)
             for det in (False, True)}
    cupy.cuda.Device().synchronize()
    seconds = time.perf_counter() - start
    o_host = gh.to_host(o, dtype)
    reports = [testing.judge("o", o_host, reference.attention_varlen_reference(
        q, k, v, cu_q, cu_k, causal=causal)[0], reference.attention_varlen_naive(
        q, k, v, cu_q, cu_k, causal=causal, dtype=gh.np_dtype(dtype)), dtype=dtype)]
    refs = reference.attention_varlen_backward_reference(do, q, k, v, cu_q, cu_k,
                                                         causal=causal, o=o_host)
    naives = reference.attention_varlen_backward_naive(do, q, k, v, cu_q, cu_k, causal=causal,
                                                       dtype=gh.np_dtype(dtype))
    for det, got in grads.items():
        _judge_grads(reports, "det" if det else "atomic", dtype, got, refs, naives)
    return _summary("varlen", dtype, head_dim, causal, seconds, reports,
                    plan_labels(q, k, dtype, causal, varlen=True))


# Decode: a paged cache with an append, GQA 4, three splits and the combine, softcap and
# ALiBi; then 16 query heads on one kv head (16 rows: the tensor-core split), one split.
DECODE_CASES = (
    dict(batch=2, q_len=2, heads=4, heads_kv=1, seqlen_cache=300, cache_seqlens=[150, 290],
         seqlen_new=2, page_size=32, num_splits=3, softcap=5.0, alibi="heads"),
    dict(batch=1, q_len=1, heads=16, heads_kv=1, seqlen_cache=300, cache_seqlens=None,
         num_splits=None),
    # pages of one tile (64 keys at head_dim 128: the paged stepped loop with P = 1) and of a
    # quarter tile (16: P = 4), ragged lengths, two splits
    dict(batch=2, q_len=1, heads=8, heads_kv=2, seqlen_cache=512, cache_seqlens=[500, 130],
         page_size=64, num_splits=2),
    dict(batch=2, q_len=1, heads=8, heads_kv=2, seqlen_cache=512, cache_seqlens=[500, 130],
         page_size=16, num_splits=2),
)


def run_decode(dtype: str, head_dim: int, causal: bool) -> tuple[bool, str]:
    """attention_with_kvcache on DECODE_CASES: o and lse against the float64 truth."""
    import cupy

    import cuflash
    import decode_helpers as dh

    from cuflash import decode

    reports, seconds, labels = [], 0.0, []
    planned_before = set(decode._plans)  # the plans this case adds name its kernels
    for n, fixed in enumerate(DECODE_CASES):
        case = dict(head_dim=head_dim, causal=causal, dtype=dtype, softmax_scale=None,
                    seed=1234 + n, **fixed)
        kw, truth = dh.make_kvcache_inputs(case)
        dev = {name: (dh.to_device(x) if isinstance(x, np.ndarray) else x)
               for name, x in kw.items()}
        start = time.perf_counter()
        o, lse = cuflash.attention_with_kvcache(**dev, causal=causal,
                                                num_splits=case["num_splits"],
                                                return_softmax_lse=True)
        cupy.cuda.Device().synchronize()
        seconds += time.perf_counter() - start
        labels += [x for key, p in decode._plans.items() if key not in planned_before
                   for x in p.labels if x not in labels]
        mods = {m: truth[m] for m in ("window", "softcap", "alibi_slopes") if m in truth}
        o_ref, _, o_naive = dh.references(kw["q"], truth["k"], truth["v"], truth["lens"],
                                          causal=causal, softmax_scale=None, dtype=dtype,
                                          **mods)
        reports.append(testing.judge(f"o/decode{n}", dh.to_host(o), o_ref, o_naive,
                                     dtype=dtype))
    return _summary("decode", dtype, head_dim, causal, seconds, reports, " ".join(labels))


RUNNERS = {"dense": run_dense, "modifiers": run_modifiers, "varlen": run_varlen,
           "sparse": run_sparse, "decode": run_decode}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.no_poison:
        os.environ.pop("CUFLASH_POISON", None)
    else:
        os.environ["CUFLASH_POISON"] = "1"
    import cupy

    from cuflash import specs

    if args.seqlen_k:
        SHAPE["seqlen_k"] = args.seqlen_k
    cupy.cuda.set_allocator(None)  # one cudaMalloc per array (see the module docstring)
    specs.set_smem_budget(None if args.smem_kib is None else args.smem_kib * specs.KIB)
    if args.decode_fused:
        from cuflash import decode

        decode.FUSED_COMBINE = True
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"cuflash sanitize run on {name}: batch {SHAPE['batch']}, (seqlen_q, seqlen_k) "
          f"{seqlens(False)}, causal {seqlens(True)}, heads {SHAPE['heads']}/"
          f"{SHAPE['heads_kv']}, smem budget {args.smem_kib or 'device'}", flush=True)
    if args.boxed:
        import contextlib

        from cuflash import fastpath

        stack = contextlib.ExitStack()
        for name in ("select_forward", "select_backward"):
            stack.enter_context(fastpath.selector_patched(name, specs.boxed_where(args.boxed)))
    if args.warm:
        return warm(args)
    failed = 0
    for kind, dtype, head_dim, causal in cases(args):
        try:
            ok, line = RUNNERS[kind](dtype, head_dim, causal)
        except Exception as exc:  # keep going: the sanitizer log should cover every case
            ok = False
            line = (f"ERROR {kind} {dtype} d{head_dim} causal={causal}: "
                    f"{type(exc).__name__}: {exc}")
        failed += not ok
        print(line, flush=True)
    print(f"{len(cases(args)) - failed} ok, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m cuflash``: info, check, compile, warmup, bench.

Commands import only what they use (``info`` imports no framework), so the CLI answers fast.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from . import __version__, environment, specs


def _gpu_available() -> bool:
    return environment.gpu_unavailable_reason() is None


# -- info ----------------------------------------------------------------------------------

def cmd_info(args) -> int:
    import numpy

    from .compiler import kernels_dir

    print(f"cuflash {__version__}  python {platform.python_version()}  numpy {numpy.__version__}")
    for module in ("cupy", "torch", "jax"):
        print(f"{module:>6}: {environment.installed_version(module) or 'not installed'}")
    print(f"kernels: {kernels_dir()}")
    print(f"NVRTC: {environment.nvrtc_unavailable_reason() or _nvrtc_version()}")
    reason = environment.gpu_unavailable_reason()
    if reason:
        print(f"GPU: none usable: {reason}. CPU arrays run the NumPy path.")
        return 0
    import cupy

    from .launch import device_facts

    device_id = cupy.cuda.Device().id
    facts = device_facts(device_id)
    print(f"GPU {device_id}: {facts.name} {facts.arch}, {facts.sm_count} SMs, "
          f"{facts.smem_optin // 1024} KB opt-in shared memory per block"
          + (" (budget override)" if specs.smem_budget_override() else ""))
    print(f"dtypes: {', '.join(specs.arch_dtypes(facts.arch))}; Hopper (wgmma) kernels: "
          f"{'yes' if specs.uses_wgmma(facts) else 'no'}")
    print(f"kernel cache: {environment.kernel_cache_dir()} "
          f"(fill it with: python -m cuflash warmup)")
    if args.load:
        from .compiler import get_kernel
        from .launch import forward_plan
        from .plan import Shape

        shape = Shape(batch=1, seqlen_q=1, seqlen_k=1, heads=1, heads_kv=1, head_dim=128,
                      dtype=specs.arch_dtypes(facts.arch)[0], causal=False)
        spec = forward_plan(shape, device_id).kernel.spec
        loaded = get_kernel(spec, device_id)
        print(f"first load of {spec.name}: {loaded.seconds:.2f} s "
              f"(compile, or a hit in the disk cache)")
    return 0


def _nvrtc_version() -> str:
    from cupy_backends.cuda.libs import nvrtc

    major, minor = nvrtc.getVersion()
    return f"{major}.{minor}"


# -- check ---------------------------------------------------------------------------------

# (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, causal): odd lengths, GQA,
# seqlen_q > seqlen_k with causal (rows that see no key), a large head_dim.
CHECK_SHAPES = [
    (2, 97, 97, 4, 4, 64, False),
    (1, 130, 77, 4, 2, 128, True),
    (2, 64, 200, 2, 1, 40, True),
    (1, 70, 70, 2, 2, 256, False),
]


def _check_rows(xp_name: str, dtype_name: str, shape, rng):
    """Run one shape forward + backward; return the ErrorReports of o, dq, dk, dv."""
    import numpy as np

    import cuflash

    from .reference import attention_naive, attention_reference
    from .testing import backward_references, judge, magnitude

    batch, sq, sk, h, hkv, d, causal = shape
    dtype = {"float32": np.float32, "float16": np.float16}.get(dtype_name)
    if dtype is None:
        import ml_dtypes

        dtype = ml_dtypes.bfloat16
    q, k, v, do = (rng.standard_normal(s).astype(dtype)
                   for s in ((batch, sq, h, d), (batch, sk, hkv, d), (batch, sk, hkv, d),
                             (batch, sq, h, d)))
    args = dict(causal=causal)
    o, stats = cuflash.attention_forward(*_to_device(xp_name, q, k, v), **args)
    grads = cuflash.attention_backward(*_to_device(xp_name, do, q, k, v), o, stats, **args)
    o, *grads = (_to_host(x) for x in (o, *grads))
    ref_o, _, _ = attention_reference(q, k, v, **args)
    naive_o = attention_naive(q, k, v, dtype=dtype, **args)
    ref_g, naive_g, allowances = backward_references(do, q, k, v, o, dtype=dtype_name, **args)
    scale = magnitude(*ref_g)  # one slack for dq, dk, dv: their noise comes from the same P, dP
    reports = [judge("o", o, ref_o, naive_o, dtype=dtype_name)]
    reports += [judge(n, g, r, nv, dtype=dtype_name, scale=scale, allowance=a)
                for n, g, r, nv, a in zip(("dq", "dk", "dv"), grads, ref_g, naive_g, allowances)]
    return reports


def _to_device(xp_name, *arrays):
    if xp_name == "numpy":
        return arrays
    import torch

    out = []
    for a in arrays:
        if a.dtype.name == "bfloat16":
            import numpy as np

            out.append(torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).cuda())
        else:
            out.append(torch.from_numpy(a).cuda())
    return out


def _to_host(x):
    import numpy as np

    if type(x).__module__.startswith("torch"):
        import ml_dtypes
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def cmd_check(args) -> int:
    import numpy as np

    on_gpu = not args.cpu and _gpu_available()
    if on_gpu:
        try:
            import torch  # noqa: F401  (CUDA tensors are built through torch for the check)
        except ImportError:
            print("check: a GPU is present but torch is not installed; checking the CPU path")
            on_gpu = False
    path = "cuda" if on_gpu else "cpu"
    print(f"cuflash check on the {path} path: error vs float64 reference "
          f"<= 2 x naive same-dtype error + atol (cuflash.testing)")
    print(f"{'dtype':<9} {'shape (b,sq,sk,h,hkv,d,causal)':<34} {'out':<3} "
          f"{'error':>10} {'bound':>10} {'naive':>10}  ok")
    rng = np.random.default_rng()
    failures = 0
    start = time.perf_counter()
    for dtype_name in ("float32", "float16", "bfloat16"):
        for shape in CHECK_SHAPES:
            for r in _check_rows("torch" if on_gpu else "numpy", dtype_name, shape, rng):
                failures += not r.ok
                print(f"{dtype_name:<9} {str(shape):<34} {r.name:<3} {r.err:>10.3e} "
                      f"{r.bound:>10.3e} {r.naive_err:>10.3e}  {'yes' if r.ok else 'NO'}")
    verdict = "PASS" if failures == 0 else f"FAIL ({failures} outputs over the bound)"
    print(f"{verdict} in {time.perf_counter() - start:.1f} s")
    return 0 if failures == 0 else 1


# -- compile: every spec of an arch through NVRTC, no GPU ----------------------------------------

def cmd_compile(args) -> int:
    from . import aot

    reason = environment.nvrtc_unavailable_reason()
    if reason:
        print(f"compile: {reason}", file=sys.stderr)
        return 2
    archs = _archs(args.arch)
    if archs is None:
        return 2
    try:
        work = aot.compile_work(archs, args.all_budgets, args.dtype, args.head_dim,
                                varlen=args.varlen, block_sparse=args.block_sparse,
                                dropout=args.dropout, device_rng=args.device_rng)
    except ValueError as exc:  # a head_dim outside 8..256
        print(f"compile: {exc}", file=sys.stderr)
        return 2
    if not work:
        print(f"compile: no kernel for {', '.join(args.dtype)} on {', '.join(archs)}",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = aot.run_parallel(aot.report_one, work, args.jobs,
                               f"compiling {len(work)} specs for {', '.join(archs)}")
    reports = [r for batch in results for r in batch]
    failed = [r for r in reports if isinstance(r, aot.CompileFailure)]
    reports = [r for r in reports if not isinstance(r, aot.CompileFailure)]
    for f in failed:
        print(f"{f.arch} {f.spec}: FAILED to compile\n{f.error}")
    bad = [r for r in reports if _over_limits(r)]
    if args.verbose or bad:
        _print_table(reports if args.verbose else bad)
    print(f"{len(work)} specs, {len(reports)} kernels compiled for {', '.join(archs)} in "
          f"{time.perf_counter() - start:.0f} s; max {max((r.registers for r in reports), default=0)}"
          f" registers; " + ("zero spills, all within shared memory" if not (bad or failed)
                             else f"{len(bad) + len(failed)} FAILED"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in reports], f, indent=1)
    return 1 if bad or failed else 0


def _archs(requested: list[str] | None) -> list[str] | None:
    """--arch values (``all``: every known arch); without any, the GPU's own arch."""
    if requested:
        return list(specs.ARCH_SMEM_OPTIN) if "all" in requested else list(dict.fromkeys(requested))
    reason = environment.gpu_unavailable_reason()
    if reason:
        print(f"compile: give --arch ({', '.join(specs.ARCH_SMEM_OPTIN)} or all); there is no "
              f"GPU to take it from: {reason}", file=sys.stderr)
        return None
    import cupy

    return [f"sm_{cupy.cuda.Device().compute_capability}"]


def _over_limits(r) -> bool:
    return (r.spills > 0 or r.stack_bytes > 0
            or r.dynamic_smem + r.static_smem > specs.ARCH_SMEM_OPTIN[r.arch])


def _print_table(reports) -> None:
    print(f"{'arch':<6} {'spec':<52} {'function':<22} {'regs':>4} {'stack':>5} "
          f"{'spill':>5} {'smem':>7}")
    for r in reports:
        print(f"{r.arch:<6} {r.spec:<52} {r.function:<22} {r.registers:>4} {r.stack_bytes:>5} "
              f"{r.spills:>5} {r.dynamic_smem + r.static_smem:>7}"
              + ("  <-- FAIL" if _over_limits(r) else ""))


# -- warmup: fill the kernel caches this GPU's first calls read -----------------------------------

def cmd_warmup(args) -> int:
    from . import aot

    reason = environment.gpu_unavailable_reason() or environment.nvrtc_unavailable_reason()
    if reason:
        print(f"warmup: needs a usable GPU: {reason}", file=sys.stderr)
        return 2
    import cupy

    from .launch import device_facts

    device_id = cupy.cuda.Device().id
    facts = device_facts(device_id)
    try:
        for dtype in args.dtype or ():
            specs.check_dtype(facts, dtype)
        work = aot.selected_specs(facts, args.dtype, args.head_dim)
    except ValueError as exc:
        print(f"warmup: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    seconds = aot.run_parallel(aot.warm_one, [(spec, device_id) for spec in work], args.jobs,
                               f"compiling {len(work)} kernels for {facts.name} ({facts.arch})")
    print(f"{len(work)} kernels ready for {facts.name} in {time.perf_counter() - start:.0f} s "
          f"({sum(s < 0.5 for s in seconds)} loaded in under 0.5 s: already cached) in "
          f"{environment.kernel_cache_dir()}")
    return 0


# -- bench: the benchmark of the source tree --------------------------------------------------

def bench_dir() -> Path | None:
    """``bench/`` beside the package in a source checkout (the benchmark does not ship)."""
    path = Path(__file__).resolve().parent.parent / "bench"
    return path if (path / "attention_sweep.py").is_file() else None


def run_bench(argv: list[str]) -> int:
    """``bench/attention_sweep.py`` with ``argv``, when run from a checkout."""
    where = bench_dir()
    if where is None:
        print("python -m cuflash bench: the benchmark ships with the source tree only "
              "(bench/attention_sweep.py in a clone of the repository); this cuflash is "
              f"installed at {Path(__file__).resolve().parent} without it", file=sys.stderr)
        return 2
    sys.path.insert(0, str(where))  # the sweep imports plot_results.py beside it
    import attention_sweep

    return attention_sweep.main(argv)


# -- the parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cuflash",
        description="cuflash: exact FlashAttention forward and backward for any DLPack array.")
    parser.add_argument("--version", action="version", version=f"cuflash {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="command")
    p = sub.add_parser("info", help="versions, the GPU (or why none is usable), kernel cache")
    p.add_argument("--load", action="store_true", help="also time the first load of one kernel")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("check", help="forward + backward vs the float64 reference")
    p.add_argument("--cpu", action="store_true", help="check the CPU path even with a GPU")
    p.set_defaults(fn=cmd_check)
    jobs = dict(type=int, default=os.cpu_count() or 1,
                help="parallel NVRTC processes (default: one per CPU)")
    p = sub.add_parser("compile", help="compile every kernel spec for an arch with NVRTC and "
                                       "check for spills (no GPU needed)")
    p.add_argument("--arch", action="append", choices=[*specs.ARCH_SMEM_OPTIN, "all"],
                   help="repeatable; default: the GPU's own")
    p.add_argument("--all-budgets", action="store_true",
                   help="also the specs of every smaller shared-memory budget (48K..)")
    p.add_argument("--dtype", action="append", choices=specs.DTYPES, help="repeatable; default: all")
    p.add_argument("--head-dim", action="append", type=int, help="repeatable; default: all")
    p.add_argument("-j", "--jobs", **jobs)
    p.add_argument("-v", "--verbose", action="store_true", help="print every kernel's row")
    p.add_argument("--json", help="write every kernel's row as JSON here")
    p.add_argument("--varlen", action="store_true",
                   help="the same specs compiled for packed sequences (CF_VARLEN, no decode)")
    p.add_argument("--block-sparse", action="store_true",
                   help="the same specs compiled for block masks (CF_BLOCK_SPARSE, no decode)")
    p.add_argument("--dropout", action="store_true",
                   help="the same specs compiled for dropout (CF_DROPOUT, no decode)")
    p.add_argument("--device-rng", action="store_true",
                   help="dropout with the seed read from device memory (CF_DROP_RNG_PTR)")
    p.set_defaults(fn=cmd_compile)
    p = sub.add_parser("warmup", help="compile the kernels this GPU selects into the cache "
                                      "its first calls read")
    p.add_argument("--dtype", action="append", choices=specs.DTYPES, help="repeatable; default: all")
    p.add_argument("--head-dim", action="append", type=int, help="repeatable; default: all")
    p.add_argument("-j", "--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="parallel processes, each with a CUDA context (default: up to 8)")
    p.set_defaults(fn=cmd_warmup)
    sub.add_parser("bench", help="benchmark against torch SDPA (GPU; from a source checkout: "
                                 "bench/attention_sweep.py); bench --help for flags")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark owns its flags (python -m cuflash bench --help)
        return run_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_help()
        return 0
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

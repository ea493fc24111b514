"""``python -m cuflash``: info, check, compile, bench."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


# -- info ----------------------------------------------------------------------------------

def cmd_info(args) -> int:
    import numpy

    import cuflash

    from .compiler import kernels_dir

    print(f"cuflash {cuflash.__version__}  python {platform.python_version()}  "
          f"numpy {numpy.__version__}")
    for mod in ("cupy", "torch", "jax"):
        try:
            version = __import__(mod).__version__
        except Exception:
            version = "not installed"
        print(f"{mod:>6}: {version}")
    print(f"kernels: {kernels_dir()}")
    if not _gpu_available():
        print("GPU: none usable; CPU arrays run the NumPy path")
        return 0
    import cupy

    from . import specs
    from .compiler import get_kernel
    from .launch import device_facts

    # CuPy's documented default; CuPy 14 no longer exposes a getter for it.
    cache = os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))
    print(f"kernel cache: {cache}")
    facts = device_facts(cupy.cuda.Device().id)
    print(f"GPU: {facts.name} {facts.arch}, {facts.sm_count} SMs, "
          f"{facts.smem_optin // 1024} KB opt-in shared memory per block"
          + (" (budget override)" if specs.smem_budget_override() else ""))
    spec = specs.select_forward(facts, "bfloat16", 128, False)
    loaded = get_kernel(spec, cupy.cuda.Device().id)
    print(f"first load of {spec.name}: {loaded.seconds:.2f} s "
          f"(compile, or a hit in CuPy's disk cache)")
    return 0


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

    from .reference import (attention_backward_naive, attention_backward_reference,
                            attention_naive, attention_reference, compare, default_atol)

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
    ref_g = attention_backward_reference(do, q, k, v, **args)
    naive_g = attention_backward_naive(do, q, k, v, dtype=dtype, **args)
    atol = default_atol(dtype)
    reports = [compare("o", o, ref_o, naive_o, atol=atol)]
    reports += [compare(n, g, r, nv, atol=atol)
                for n, g, r, nv in zip(("dq", "dk", "dv"), grads, ref_g, naive_g)]
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

    on_gpu = _gpu_available() and not args.cpu
    if on_gpu:
        try:
            import torch  # noqa: F401  (CUDA tensors are built through torch for the check)
        except ImportError:
            print("check: a GPU is present but torch is not installed; checking the CPU path")
            on_gpu = False
    path = "cuda" if on_gpu else "cpu"
    print(f"cuflash check on the {path} path: error vs float64 reference "
          f"<= 2 x naive same-dtype error + atol")
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


# -- compile -------------------------------------------------------------------------------

def _report_one(item):
    from .compiler import compile_report

    spec, arch = item
    return compile_report(spec, arch)


def cmd_compile(args) -> int:
    from concurrent.futures import ProcessPoolExecutor

    from . import specs

    archs = args.arch or ["sm_80", "sm_86", "sm_89", "sm_90"]
    work = []
    for arch in archs:
        budgets = [None] if not args.all_budgets else [
            b * specs.KIB for b in specs.BUDGETS_KIB if b * specs.KIB <= specs.ARCH_SMEM_OPTIN[arch]]
        seen = set()
        for budget in budgets:
            for spec in specs.all_specs(specs.facts_for_arch(arch, budget)):
                if spec.name not in seen:
                    seen.add(spec.name)
                    work.append((spec, arch))
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        reports = [r for batch in pool.map(_report_one, work) for r in batch]
    bad = 0
    print(f"{'arch':<6} {'spec':<52} {'function':<22} {'regs':>4} {'stack':>5} "
          f"{'spill':>5} {'smem':>7}")
    for r in reports:
        over = r.dynamic_smem + r.static_smem > specs.ARCH_SMEM_OPTIN[r.arch]
        flag = r.spills > 0 or r.stack_bytes > 0 or over
        bad += flag
        print(f"{r.arch:<6} {r.spec:<52} {r.function:<22} {r.registers:>4} {r.stack_bytes:>5} "
              f"{r.spills:>5} {r.dynamic_smem + r.static_smem:>7}" + ("  <-- FAIL" if flag else ""))
    print(f"{len(work)} specs, {len(reports)} kernels compiled for {', '.join(archs)} in "
          f"{time.perf_counter() - start:.0f} s; "
          + ("zero spills, all within shared memory" if not bad else f"{bad} FAILED"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in reports], f, indent=1)
    return 1 if bad else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark owns its flags (python -m cuflash bench --help)
        from .benchmark import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m cuflash")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, GPU facts, kernel cache").set_defaults(fn=cmd_info)
    p = sub.add_parser("check", help="forward + backward vs the float64 reference")
    p.add_argument("--cpu", action="store_true", help="check the CPU path even with a GPU")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("compile", help="compile every kernel spec with NVRTC (no GPU needed)")
    p.add_argument("--arch", action="append", help="sm_80, sm_86, sm_89, sm_90 (repeatable)")
    p.add_argument("--all-budgets", action="store_true",
                   help="also the specs of every smaller shared-memory budget (48K..)")
    p.add_argument("-j", "--jobs", type=int, default=2)
    p.add_argument("--json", help="write the table as JSON here")
    p.set_defaults(fn=cmd_compile)
    sub.add_parser("bench", help="benchmark against torch SDPA (GPU); bench --help for flags")
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

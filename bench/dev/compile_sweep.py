"""Compile kernel configurations with NVRTC and report registers, spills and stack (no GPU).

One sweep for every kernel family (it replaces compile_fwd_sweep.py, compile_bwd_sweep.py and
compile_fp32_sweep.py): each configuration is a ``KernelSpec`` built by keyword and compiled by
``cuflash.compiler.compile_report``, the same options and sources a run uses.

    python bench/dev/compile_sweep.py                           # the registry's tiles, sm_80 + sm_90
    python bench/dev/compile_sweep.py --kind bwd --grid wide --arch sm_90 --head-dim 128
    python bench/dev/compile_sweep.py --kind bwd --define CF_BWD_MSUB=16 --json out.json

Grids: ``registry`` (default) is every candidate tile cuflash.registry lists (the ones the
selector can reach on some budget); ``wide`` is a tuning grid around it for the portable
kernels (warps x block x stages, 16-bit; warps x block_m x block_n, float32) that honours the
kernels' geometry (16 rows or keys per warp; float32 blocks multiples of 8 and of 4 x warps).
A configuration a kernel refuses at compile time (a ``static_assert``, e.g. flash_bwd.cu's
split layout outside its shapes) is listed as refused, not as a failure. Modes: causal with dQ
atomics (the largest code) unless --all-modes. Exit status 1 when a configuration that
compiles spills or has a stack frame, or fails for another reason.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's cuflash

from cuflash import aot, registry, specs  # noqa: E402
from cuflash.specs import KernelSpec  # noqa: E402

KINDS = ("fwd", "fwd90", "bwd", "bwd90", "bwd_dq")


def _modes(kind: str, all_modes: bool):
    """(causal, dq_atomic) pairs: the largest code unless all_modes."""
    atomics = (True, False) if kind in ("bwd", "bwd90") and all_modes else (kind in ("bwd", "bwd90"),)
    causals = (True, False) if all_modes else (True,)
    return list(itertools.product(causals, atomics))


def _tiles(variant, bucket: int, grid: str):
    """(warps, block_m, block_n, stages, dchunk) of one variant and bucket."""
    dchunks = [variant.dchunk(variant.dtypes[0], "sm_80", bucket)] if variant.dchunk else [0]
    if grid == "registry" or variant.wgmma:
        return [(t.warps, t.block_m, t.block_n, t.stages, c)
                for t in variant.tiles.get(bucket, ()) for c in dchunks]
    warps = (1, 2, 4, 8)
    if variant.dtypes == registry.FLOAT:
        return [(w, m, n, 1, c) for w in warps for m in (8, 16, 32, 64, 128)
                for n in (8, 16, 32, 64) for c in dchunks if m % (4 * w) == 0 and n % 8 == 0
                and m % 8 == 0]
    if variant.kind == "bwd":
        chunks = sorted({*dchunks, 64} if bucket > 64 else set(dchunks))
        return [(w, m, 16 * w, s, c) for w in warps for m in (16, 32, 64, 128) for s in (1, 2)
                for c in chunks]
    return [(w, 16 * w, n, s, 0) for w in warps for n in (16, 32, 64, 128) for s in (1, 2)]


def work(args) -> list[tuple[KernelSpec, str]]:
    knobs = dict(d.split("=") for d in args.define)
    out = []
    for variant in registry.VARIANTS:
        if variant.kind not in args.kind or not set(variant.dtypes) & set(args.dtype):
            continue
        for dtype in (d for d in variant.dtypes if d in args.dtype):
            for bucket in args.head_dim:
                for (w, m, n, s, c), (causal, atomic) in itertools.product(
                        _tiles(variant, bucket, args.grid), _modes(variant.kind, args.all_modes)):
                    spec = KernelSpec(kind=variant.kind, dtype=dtype, head_dim=bucket, block_m=m,
                                      block_n=n, warps=w, stages=s, causal=causal,
                                      dq_atomic=atomic, dchunk=c)
                    spec = spec.with_knobs(**{k: int(v) for k, v in knobs.items()})
                    for arch in args.arch:
                        if variant.wgmma and arch not in specs.WGMMA_ARCHS:
                            continue
                        if spec.smem_bytes <= specs.ARCH_SMEM_OPTIN[arch]:
                            out.append((spec, arch))
    return list(dict.fromkeys(out))


def _refused(failure) -> bool:
    return "static assert" in failure.error or "static_assert" in failure.error


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--dtype", nargs="+", choices=specs.DTYPES, default=list(specs.DTYPES))
    p.add_argument("--head-dim", nargs="+", type=int, default=list(specs.HEAD_DIM_BUCKETS),
                   help="head-dim buckets (default: all)")
    p.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"],
                   choices=list(specs.ARCH_SMEM_OPTIN))
    p.add_argument("--grid", choices=("registry", "wide"), default="registry")
    p.add_argument("--all-modes", action="store_true", help="every causal x dq_atomic mode")
    p.add_argument("--define", action="append", default=[], metavar="CF_NAME=VALUE",
                   help="a kernel knob, as KernelSpec knobs (in the spec's name)")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", help="write every kernel's row here")
    args = p.parse_args(argv)
    items = work(args)
    results = [r for batch in aot.run_parallel(aot.report_one, items, args.jobs,
                                               f"compiling {len(items)} configurations")
               for r in batch]
    failures = [r for r in results if isinstance(r, aot.CompileFailure)]
    reports = [r for r in results if not isinstance(r, aot.CompileFailure)]
    refused = [f for f in failures if _refused(f)]
    broken = [f for f in failures if not _refused(f)]
    bad = [r for r in reports if r.spills or r.stack_bytes]
    for r in sorted(reports, key=lambda r: (r.arch, r.spec)):
        print(f"{r.arch:<6} {r.spec:<56} {r.function:<22} {r.registers:>4} regs "
              f"{r.stack_bytes:>4} B stack {r.spills:>4} B spills"
              + ("  <-- SPILLS" if r in bad else ""))
    for f in refused:
        print(f"{f.arch:<6} {f.spec:<56} refused by the kernel (static_assert)")
    for f in broken:
        print(f"{f.arch} {f.spec}: FAILED\n{f.error[-1500:]}")
    print(f"{len(items)} configurations: {len(reports)} kernels, {len(bad)} spill or use a "
          f"stack frame, {len(refused)} refused, {len(broken)} failed")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in reports], indent=1))
    return 1 if bad or broken else 0


if __name__ == "__main__":
    sys.exit(main())

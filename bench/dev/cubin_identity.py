"""Do kernel-source edits change the machine code? Hash every spec's cubin, then compare.

    python bench/dev/cubin_identity.py save before.json [--archs sm_80 sm_90] [--jobs 2]
    ... edit kernels_cu/ (a refactor: split a file, move defaults into a header) ...
    python bench/dev/cubin_identity.py compare before.json [--archs ...]

Every (spec, arch) that the selectors can pick at the device's shared memory (and at
``--budgets``), with no modifier, each modifier alone, softcap with ALiBi, and all of them,
plus the decode kernels, is compiled with NVRTC exactly as
for a GPU (compiler._nvrtc_cubin's options) and its cubin hashed with SHA-256. ``compare``
lists the specs whose cubin changed, appeared or vanished (by spec name) and exits 1 if
any did. A refactor that should not change any kernel must come out empty: then it needs no
GPU A/B. CF_SOURCE_HASH (a cache key, unused by the code) is held fixed so that editing a
source does not change every option list.

Edits that only move lines (a comment added above the kernel) still change the cubins' bytes,
though not their machine code (2026-12-02: a comment block and an unused #define added to
flash_bwd_sm90_ws.cu changed the bytes of its d128 cubin, whose SASS stayed the same): after
such an edit, compare the disassembly (`nvdisasm -c`, addresses stripped).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

DEFAULT_ARCHS = ("sm_80", "sm_90")


def _work(archs, budgets=()) -> list:
    from cuflash import aot

    return aot.modifier_work(archs, budgets)


def hash_one(item) -> tuple[str, str, str]:
    """A worker: (spec name, arch, sha256 of its cubin)."""
    from cuflash import compiler

    spec, arch = item
    target = compiler.compile_arch(spec, arch)
    opts = [o for o in compiler.nvrtc_options(spec) if not o.startswith("-DCF_SOURCE_HASH")]
    opts += [f"--gpu-architecture={target}", "-ftz=true"]
    try:
        _, cubin = compiler._nvrtc_compile(spec, target, opts)
    except RuntimeError as exc:
        return spec.name, arch, "FAILED: " + str(exc).splitlines()[0]
    return spec.name, arch, hashlib.sha256(cubin).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("save", "compare"))
    ap.add_argument("path", type=Path)
    ap.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--sources", nargs="*", default=[],
                    help="only specs built from these kernels_cu files (default: all)")
    ap.add_argument("--budgets", type=int, nargs="*", default=[],
                    help="also these shared-memory budgets (KiB), e.g. 99 64")
    args = ap.parse_args(argv)
    from cuflash import aot

    work = _work(args.archs, args.budgets)
    if args.sources:
        work = [(s, a) for s, a in work if s.source in args.sources]
    hashes = {f"{n}@{a}": h for n, a, h in aot.run_parallel(hash_one, work, args.jobs, "cubins")}
    if args.action == "save":
        args.path.write_text(json.dumps(hashes, indent=0, sort_keys=True))
        print(f"{len(hashes)} cubins hashed -> {args.path}")
        return 0
    before = json.loads(args.path.read_text())
    if args.sources:  # the saved hashes of specs from other files are not compared
        names = {f"{s.name}@{a}" for s, a in work}
        before = {k: v for k, v in before.items() if k in names}
    changed = sorted(k for k in hashes.keys() & before.keys() if hashes[k] != before[k])
    new, gone = sorted(hashes.keys() - before.keys()), sorted(before.keys() - hashes.keys())
    for label, names in (("changed", changed), ("new", new), ("gone", gone)):
        for n in names:
            print(f"{label}: {n}")
    print(f"{len(hashes)} cubins: {len(changed)} changed, {len(new)} new, {len(gone)} gone")
    return 1 if changed or new or gone else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile what the selector picks for score-modifier sets on several archs; list the spills.

    python bench/dev/modifier_spill_audit.py sm_90,sm_80 [--singles]

For each arch and each modifier set (the pairs that have spilled a selected tile, then each
alone; --singles: only those), every spec the selector picks (aot.selected_specs: each dtype,
head-dim bucket, causal or not, every kernel a call runs) is compiled by NVRTC (no GPU). Prints each spec that spills, then the count. tests/test_kernel_modifiers.py does
the same for sm_80 and sm_90 in CI; this covers the archs CI does not (bench/dev/NOTES.md,
"Modifier spills audit").
"""

from __future__ import annotations

import sys

from cuflash import aot, specs
from cuflash.specs import ModFlags

PAIRS = [dict(softcap=True, varlen=True), dict(window=True, softcap=True),
         dict(window=True, alibi=True), dict(alibi=True, varlen=True),
         dict(softcap=True, sinks=True), dict(window=True, varlen=True)]
SINGLES = [dict(softcap=True), dict(alibi=True)]


def selected(arch: str, sets) -> list:
    """(spec, arch) for every spec the selector picks on ``arch`` for any of ``sets``."""
    facts = specs.facts_for_arch(arch)
    picked = {spec.name: spec for kw in sets
              for spec in aot.selected_specs(facts, mods=ModFlags(**kw))}
    return [(spec, arch) for spec in picked.values()]


def main() -> int:
    archs = sys.argv[1].split(",")
    sets = SINGLES if "--singles" in sys.argv else PAIRS + SINGLES
    work = [item for arch in archs for item in selected(arch, sets)]
    results = aot.run_parallel(aot.report_one, work, 2, f"{len(work)} specs")
    bad = [r for batch in results for r in batch
           if isinstance(r, aot.CompileFailure) or r.spills or r.stack_bytes]
    for r in bad:
        print(r.arch, r.spec, getattr(r, "spills", None), getattr(r, "error", "")[:200])
    print(f"{len(bad)} kernels spilled or failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

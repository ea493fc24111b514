"""Compile what the selector picks for score-modifier sets on several archs; list the spills.

    python bench/dev/modifier_spill_audit.py sm_90,sm_80 [--singles]

For each arch, head-dim bucket, causal or not, and dtype the arch runs, and for each modifier
set (the pairs that have spilled a selected tile, then each alone; --singles: only those),
the forward, backward (both dQ modes) and dQ specs the selector picks are compiled by NVRTC
(no GPU). Prints each spec that spills, then the count. tests/test_kernel_modifiers.py does
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


def selected(arch: str, sets) -> dict:
    facts = specs.facts_for_arch(arch)
    out = {}
    for kw in sets:
        mods = ModFlags(**kw)
        for bucket in specs.HEAD_DIM_BUCKETS:
            for causal in (False, True):
                for dtype in specs.arch_dtypes(arch):
                    for spec in (specs.select_forward(facts, dtype, bucket, causal, mods=mods),
                                 specs.select_backward(facts, dtype, bucket, causal, False,
                                                       mods=mods),
                                 specs.select_backward(facts, dtype, bucket, causal, True,
                                                       mods=mods),
                                 specs.select_backward_dq(facts, dtype, bucket, causal,
                                                          mods=mods)):
                        out.setdefault((spec.name, arch), spec)
    return out


def main() -> int:
    archs = sys.argv[1].split(",")
    sets = SINGLES if "--singles" in sys.argv else PAIRS + SINGLES
    work = [(spec, arch) for arch in archs for (_, arch), spec in selected(arch, sets).items()]
    results = aot.run_parallel(aot.report_one, work, 2, f"{len(work)} specs")
    bad = [r for batch in results for r in batch
           if isinstance(r, aot.CompileFailure) or r.spills or r.stack_bytes]
    for r in bad:
        print(r.arch, r.spec, getattr(r, "spills", None), getattr(r, "error", "")[:200])
    print(f"{len(bad)} kernels spilled or failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

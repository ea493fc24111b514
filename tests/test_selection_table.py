"""The selector picks the same spec as it did when the table was written.

``tests/data/selected_specs.json`` maps (arch, budget, wgmma switch, dtype, head-dim bucket,
causal) to the names of the forward, backward (dQ by atomics), deterministic backward, its
dQ pass and the preprocess kernel, or to the error raised. It was generated from the
selector before the registry rewrite (issue #11), so any change of selection shows here;
a deliberate change regenerates it: ``python tests/test_selection_table.py --write``.
Names are the compile-cache key and the label in result files: they must not drift.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

if __name__ == "__main__":  # run as a script: this checkout's cuflash, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuflash import specs  # noqa: E402

TABLE = Path(__file__).parent / "data" / "selected_specs.json"
ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")
HEAD_DIMS = tuple(range(8, 257, 8))


def _wgmma_settings(arch: str) -> tuple[bool, ...]:
    return (True, False) if arch in specs.WGMMA_ARCHS else (True,)


def _selections(facts, dtype: str, head_dim: int, causal: bool, wgmma: bool) -> list:
    """The five selections for one problem, each a KernelSpec or the ValueError raised."""
    calls = (lambda: specs.select_forward(facts, dtype, head_dim, causal, wgmma=wgmma),
             lambda: specs.select_backward(facts, dtype, head_dim, causal, False, wgmma=wgmma),
             lambda: specs.select_backward(facts, dtype, head_dim, causal, True, wgmma=wgmma),
             lambda: specs.select_backward_dq(facts, dtype, head_dim, causal),
             lambda: specs.select_backward_pre(dtype, facts))
    out = []
    for call in calls:
        try:
            out.append(call())
        except ValueError as exc:
            out.append(exc)
    return out


def _names(facts, dtype: str, head_dim: int, causal: bool, wgmma: bool) -> list[str]:
    """Each selection's spec name, or ``!ErrorType``."""
    return [f"!{type(x).__name__}" if isinstance(x, Exception) else x.name
            for x in _selections(facts, dtype, head_dim, causal, wgmma)]


def _key(arch, budget_kib, wgmma, dtype, bucket, causal) -> str:
    return (f"{arch}/{budget_kib}K/{'wgmma' if wgmma else 'no_wgmma'}/{dtype}/d{bucket}/"
            f"{'causal' if causal else 'full'}")


def _problems():
    for arch in ARCHS:
        for budget_kib in specs.BUDGETS_KIB:
            facts = specs.facts_for_arch(arch, budget_kib * specs.KIB)
            for wgmma in _wgmma_settings(arch):
                for dtype in specs.DTYPES:
                    for causal in (False, True):
                        yield arch, budget_kib, wgmma, dtype, causal, facts


def current_table() -> dict[str, list[str]]:
    return {_key(arch, kib, wgmma, dtype, bucket, causal):
            _names(facts, dtype, bucket, causal, wgmma)
            for arch, kib, wgmma, dtype, causal, facts in _problems()
            for bucket in specs.HEAD_DIM_BUCKETS}


@pytest.mark.parametrize("arch", ARCHS)
def test_selection_matches_the_recorded_table(arch):
    table = json.loads(TABLE.read_text())
    mismatches = []
    for a, kib, wgmma, dtype, causal, facts in _problems():
        if a != arch:
            continue
        for head_dim in HEAD_DIMS:  # every head_dim, judged by its bucket's row
            key = _key(a, kib, wgmma, dtype, specs.head_dim_bucket(head_dim), causal)
            got = _names(facts, dtype, head_dim, causal, wgmma)
            if got != table[key]:
                mismatches.append(f"{key} (head_dim {head_dim}): {got} != {table[key]}")
    assert not mismatches, "\n".join(mismatches[:20])


PROPERTIES = TABLE.parent / "spec_properties.json"


def _properties(spec, arch: str) -> dict:
    """What the compiler and the launcher take from a spec (target: sm_90a or the device's)."""
    target = specs.compile_arch(spec, arch)
    return dict(source=spec.source, entry=spec.entry, threads=spec.threads,
                smem_bytes=spec.smem_bytes, defines=spec.defines,
                target="device" if target == arch else target)


def test_selected_specs_keep_their_source_entry_target_and_defines():
    recorded = json.loads(PROPERTIES.read_text())
    for arch, kib, wgmma, dtype, causal, facts in _problems():
        for bucket in specs.HEAD_DIM_BUCKETS:
            for spec in _selections(facts, dtype, bucket, causal, wgmma):
                if isinstance(spec, Exception):
                    continue
                assert _properties(spec, arch) == recorded[spec.name], (arch, spec.name)


def _write(path: Path, rows: dict) -> None:
    """One key per line, so a change of selection reads as a small diff."""
    lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
                       for k, v in sorted(rows.items()))
    path.write_text("{\n" + lines + "\n}\n")


def current_properties() -> dict[str, dict]:
    found = {}
    for arch, kib, wgmma, dtype, causal, facts in _problems():
        for bucket in specs.HEAD_DIM_BUCKETS:
            for spec in _selections(facts, dtype, bucket, causal, wgmma):
                if not isinstance(spec, Exception):
                    found.setdefault(spec.name, _properties(spec, arch))
    return found


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_selection_table.py --write")
    _write(TABLE, current_table())
    _write(PROPERTIES, current_properties())
    print(f"wrote {TABLE} and {PROPERTIES}")

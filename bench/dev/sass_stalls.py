"""Where a kernel's warps wait, instruction by instruction: summarise the CSV of ncu's
source page (SASS) from a report collected with the SourceCounters section.

    ncu --clock-control none -k regex:flash_bwd_sm90 -s 2 -c 1 --section SourceCounters \
        --section WarpStateStats -o OUT/bwd python bench/dev/bwd_profile.py --head-dim 256
    ncu -i OUT/bwd.ncu-rep --page source --csv --print-source sass > OUT/bwd_sass.csv
    python bench/dev/sass_stalls.py OUT/bwd_sass.csv

Prints the columns found, the instructions with the most warp-stall samples (their share of
all samples and their SASS), and the samples summed by opcode. Column names differ between
ncu versions, so the sample column is found by its name's prefix.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def _opcode(sass: str) -> str:
    """The SASS mnemonic without its predicate and modifiers: '@!P0 BRA ...' -> 'BRA'."""
    words = sass.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def _rows(path: str) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        lines = [line for line in f if line.strip()]
    # ncu may print lines before the table; the header is the first with a Source column
    start = next((i for i, line in enumerate(lines) if '"Source"' in line or "Source," in line), 0)
    table = list(csv.reader(lines[start:]))
    return table[0], table[1:]


def summarise(path: str, top: int) -> int:
    header, rows = _rows(path)
    print("columns:", " | ".join(header))
    source = header.index("Source") if "Source" in header else 1
    sampled = [i for i, name in enumerate(header) if name.startswith("Warp Stall Sampling (All")]
    if not sampled:
        print("no 'Warp Stall Sampling (All Samples)' column: was SourceCounters collected?")
        return 1
    col = sampled[0]
    not_issued = next((i for i, name in enumerate(header)
                       if name.startswith("Warp Stall Sampling (Not")), None)
    samples = [(_number(r[col]), r) for r in rows if len(r) > col]
    total = sum(s for s, _ in samples) or 1.0
    print(f"instructions {len(samples)}, samples {total:.0f}")
    print(f"\n-- the {top} instructions with the most samples (share, not-issued share, SASS)")
    for s, r in sorted(samples, key=lambda x: -x[0])[:top]:
        ni = _number(r[not_issued]) / total if not_issued is not None else float("nan")
        print(f"{100 * s / total:6.2f}% {100 * ni:6.2f}%  {r[0]:>6}  {r[source].strip()[:90]}")
    by_op: Counter[str] = Counter()
    for s, r in samples:
        by_op[_opcode(r[source])] += s
    print("\n-- samples by opcode")
    for op, s in by_op.most_common(25):
        print(f"{100 * s / total:6.2f}%  {op}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=60)
    args = parser.parse_args(argv)
    return summarise(args.csv, args.top)


if __name__ == "__main__":
    sys.exit(main())

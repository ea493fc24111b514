#!/usr/bin/env python3
"""CPU check of the index math of TileLoader (kernels_cu/cf_fwd.cuh), no GPU needed.

Mirrors the loader's C++ expressions line by line for every (CHUNKS, THREADS, ROWS) the forward
kernel can instantiate and checks that each 16-byte chunk of a tile is written exactly once, at
swizzle_chunk(row, col) * 16 (cf_common.cuh), from source row `row`, column chunk `col`.
Keep it in step with TileLoader when either changes.
"""
import sys


def swizzle_chunk(chunks, row, chunk):
    if chunks % 8 == 0:
        return row * chunks + (chunk ^ (row & 7))
    return row * chunks + (chunk ^ ((row >> 1) & 3))


def check(chunks, threads, rows):
    pow2 = chunks & -chunks
    tpr = pow2 if pow2 < threads // 8 else threads // 8  # kTpr
    group = 8 if chunks % 8 == 0 else 4                 # kGroup
    rep = 1 if tpr >= group else group // tpr           # kRep
    per_row, step = chunks // tpr, threads // tpr       # kPerRow, kStep
    passes = (rows + step - 1) // step
    assert tpr >= 4 and threads % tpr == 0 and step % 8 == 0 and per_row % rep == 0
    written = {}
    for tid in range(threads):
        row0, c0 = tid // tpr, tid % tpr
        key = (row0 & 7) if group == 8 else ((row0 >> 1) & 3)
        dst = [(row0 * chunks + ((c0 + tpr * r) ^ key)) * 16 for r in range(rep)]
        for p in range(passes):
            row = row0 + p * step
            if not (rows % step == 0 or row < rows):
                continue
            for k in range(per_row):
                d = dst[k % rep] + (p * step * chunks + tpr * rep * (k // rep)) * 16
                col = c0 + tpr * k  # the source is g + kTpr * k * 8 elements, g at row `row`
                if d in written or d != swizzle_chunk(chunks, row, col) * 16:
                    return f"chunk ({row}, {col}) of thread {tid} lands at byte {d}"
                written[d] = (row, col)
    if len(written) != rows * chunks:
        return f"{rows * chunks - len(written)} chunks never written"
    return None


def main():
    failed = 0
    # rows: the BLOCK_N values and BLOCK_M = 16 * warps = threads / 2
    configs = [(c, t, r) for c in (4, 8, 12, 16, 20, 24, 28, 32) for t in (32, 64, 128, 256)
               for r in sorted({16, 32, 64, 128, t // 2})]
    for c, t, r in configs:
        err = check(c, t, r)
        if err:
            failed += 1
            print(f"FAIL chunks={c} threads={t} rows={r}: {err}")
    print(f"{len(configs) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""A model of flash_bwd_sm90_hsplit.cu's shared-memory layouts and operand addressing, to find
an index bug before a GPU does.

    python bench/dev/hsplit_layout_model.py

Shared memory is an array of 16-bit slots. Tiles land in cf_sm90.cuh's panel layout
(sm90_offset); the wgmma operands are read back through the descriptors the kernel builds
(sm90_desc_kmajor / sm90_desc_mnmajor: start address, LBO, SBO), with the 128-byte swizzle
applied to the final byte address (PTX ISA, matrix descriptors: canonical layouts); P and dS
leave their C fragments by stmatrix .trans as the PTX ISA describes it (lanes 8i .. 8i + 7
address matrix i's rows; with .trans a row receives a fragment column); the accumulators are
scattered to (warp, lane) by the C-fragment layout and gathered by the kernel's epilogue index
map. For one block and one query tile, at head_dim 256 (80 keys, 2 warpgroups) and 192 (96
keys, 3), S, dP, P^T, dS^T, dV^T, dK^T, dQ and dK must then equal NumPy's. The same model
first reads the role split's (flash_bwd_sm90.cu, run on GPUs since 2026-12-01) S^T and dQ
operands, so its reading of the descriptors is the one those kernels were measured with.
The offsets below are the kernel's, transcribed: keep them in step with the .cu file. Last,
ordered dQ's turns: cf_mask.cuh's key-tile range of a query tile and query-tile range of a key
tile, transcribed, must be each other's inverse for the split's tiles (drawn lengths, causal
or windowed).
"""

from __future__ import annotations

import numpy as np


def sm90_offset(rows: int, row: int, col: int) -> int:
    """cf_sm90.cuh's byte offset of (row, col) in a panel-layout tile of `rows` rows."""
    return (col >> 6) * (rows * 128) + row * 128 + ((((col >> 3) & 7) ^ (row & 7)) << 4) + \
        (col & 7) * 2


def swizzle(addr: int) -> int:
    """The 128-byte swizzle on a byte address: bits 4-6 XOR bits 7-9."""
    return addr ^ (((addr >> 7) & 7) << 4)


class Smem:
    def __init__(self, nbytes: int):
        self.slots = np.full(nbytes // 2, np.nan)

    def store_tile(self, base: int, x: np.ndarray) -> None:
        rows, cols = x.shape
        for r in range(rows):
            for c in range(cols):
                self.slots[(base + sm90_offset(rows, r, c)) // 2] = x[r, c]

    def load_tile(self, base: int, rows: int, cols: int) -> np.ndarray:
        return np.array([[self.slots[(base + sm90_offset(rows, r, c)) // 2]
                          for c in range(cols)] for r in range(rows)])

    def at(self, addr: int) -> float:
        return self.slots[swizzle(addr) // 2]


# -- descriptors (cf_sm90.cuh) and one wgmma k-step ------------------------------------------

def desc_kmajor(rows: int, tile: int, kk: int) -> tuple[int, int, int]:
    return (tile + (kk >> 2) * (rows * 128) + (kk & 3) * 32, 16, 1024)


def desc_mnmajor(rows: int, tile: int, kk: int) -> tuple[int, int, int]:
    return (tile + kk * 16 * 128, rows * 128, 1024)


def operand(smem: Smem, desc, n: int, mn_major: bool) -> np.ndarray:
    """The n x 16 block (row index: M or N, column: k) the descriptor addresses."""
    start, lbo, sbo = desc
    out = np.empty((n, 16))
    for r in range(n):
        for k in range(16):
            if mn_major:  # r contiguous in 64-element runs, k in rows of 128 bytes
                addr = start + (r // 64) * lbo + (k // 8) * sbo + (k % 8) * 128 + (r % 64) * 2
            else:  # k contiguous, r in rows of 128 bytes, 8-row groups SBO apart
                addr = start + (r // 8) * sbo + (r % 8) * 128 + k * 2
            out[r, k] = smem.at(addr)
    return out


def wgmma(smem: Smem, acc: np.ndarray, da, db, tnsp_a: bool, tnsp_b: bool) -> None:
    """acc (64 x N) += A (64 x 16) B^T (N x 16), one k-step."""
    a = operand(smem, da, 64, tnsp_a)
    b = operand(smem, db, acc.shape[1], tnsp_b)
    acc += a @ b.T


# -- fragments -------------------------------------------------------------------------------

def fragment_rows_cols(warp: int, lane: int, t: int, e: int) -> tuple[int, int]:
    """Element e of n-tile t of a warpgroup's m64 accumulator held by (warp % 4, lane)."""
    return 16 * (warp % 4) + lane // 4 + 8 * (e >> 1), 8 * t + 2 * (lane % 4) + (e & 1)


def stmatrix_trans(smem: Smem, addrs, regs) -> None:
    """regs[lane][i] = (lo, hi) of matrix i; addrs[lane]: the row address lane gives."""
    for i in range(len(regs[0])):
        for r in range(8):  # memory row r of matrix i: fragment column r
            addr = addrs[8 * i + r]
            for j in range(8):  # fragment row j, held by lanes 4j .. 4j + 3
                smem.slots[(addr + 2 * j) // 2] = regs[4 * j + r // 2][i][r % 2]


# -- the role split's reads (flash_bwd_sm90.cu: measured kernels) -----------------------------

def check_role_split(rng) -> None:
    d, bm, bn = 256, 64, 64
    q, k, ds_t = (rng.standard_normal(s) for s in ((bm, d), (bn, d), (bn, bm)))
    smem = Smem(3 * 64 * 1024)
    sk, sq, sds = 0, bn * d * 2, bn * d * 2 + bm * d * 2
    smem.store_tile(sk, k)
    smem.store_tile(sq, q)
    smem.store_tile(sds, ds_t)
    for wg in range(2):  # S^T = K Q^T over the warpgroup's 32 queries (scores_t)
        acc = np.zeros((64, 32))
        for kk in range(d // 16):
            wgmma(smem, acc, desc_kmajor(bn, sk, kk), desc_kmajor(bm, sq + 32 * wg * 128, kk),
                  False, False)
        assert np.allclose(acc, k @ q[32 * wg:32 * wg + 32].T), "role split S^T"
    for panel in range(4):  # dQ = dS K, panel of K (both MN-major)
        acc = np.zeros((64, 64))
        for kk in range(bn // 16):
            wgmma(smem, acc, desc_mnmajor(bn, sds, kk), desc_mnmajor(bn, sk + panel * bn * 128,
                                                                     kk), True, True)
        assert np.allclose(acc, ds_t.T @ k[:, 64 * panel:64 * panel + 64]), "role split dQ"


# -- the head-dim split (flash_bwd_sm90_hsplit.cu) --------------------------------------------

def check_hsplit(d: int, rng) -> None:
    bm = 64
    bn, wgs = (80, 2) if d == 256 else (96, 3)
    wg_keys, panels, do_stages = bn // wgs, d // 64 // wgs, 1 if d == 256 else 2
    st_n = wg_keys // 8  # kST
    tile_q, tile_k, tile_p = bm * d * 2, bn * d * 2, bn * bm * 2
    q, do = rng.standard_normal((bm, d)), rng.standard_normal((bm, d))
    k, v = rng.standard_normal((bn, d)), rng.standard_normal((bn, d))
    st = 1  # the second stage, so the stage offsets count
    smem = Smem(2 * tile_k + (2 + do_stages) * tile_q + 2 * tile_p)
    base = 0
    sk, sv, q_tile = base, base + tile_k, base + 2 * tile_k + st * tile_q
    sdo = base + 2 * tile_k + 2 * tile_q + (st if do_stages == 2 else 0) * tile_q
    sp = base + 2 * tile_k + (2 + do_stages) * tile_q
    sds = sp + tile_p
    smem.store_tile(sk, k)
    smem.store_tile(sv, v)
    smem.store_tile(q_tile, q)
    smem.store_tile(sdo, do)
    s_ref, dp_ref = q @ k.T, do @ v.T
    p = np.tanh(s_ref)  # any values: the model checks where they land, not softmax
    ds = p * dp_ref

    for wg in range(wgs):
        s = np.zeros((64, wg_keys))
        dp = np.zeros((64, wg_keys))
        for kk in range(d // 16):
            wgmma(smem, s, desc_kmajor(bm, q_tile, kk),
                  desc_kmajor(bn, sk + wg * wg_keys * 128, kk), False, False)
            wgmma(smem, dp, desc_kmajor(bm, sdo, kk),
                  desc_kmajor(bn, sv + wg * wg_keys * 128, kk), False, False)
        keys = slice(wg * wg_keys, (wg + 1) * wg_keys)
        assert np.allclose(s, s_ref[:, keys]), f"d{d} S, warpgroup {wg}"
        assert np.allclose(dp, dp_ref[:, keys]), f"d{d} dP, warpgroup {wg}"
        for tile, x in ((sp, p), (sds, ds)):  # store_pds_t, warp by warp
            for w in range(4):
                def pk(lane, t, h):  # x[t][h] = pack2(elements e = 2h, 2h + 1)
                    return tuple(x[fragment_rows_cols(w, lane, t, 2 * h + c)[0],
                                   wg * wg_keys + fragment_rows_cols(w, lane, t, 2 * h + c)[1]]
                                 for c in range(2))
                addr = [tile + sm90_offset(bn, wg * wg_keys + 8 * ((lane >> 3) >> 1) +
                                           (lane & 7), 16 * w + 8 * ((lane >> 3) & 1))
                        for lane in range(32)]
                for t in range(0, st_n - 1, 2):
                    stmatrix_trans(smem, [a + t * 1024 for a in addr],
                                   [[pk(lane, t, 0), pk(lane, t, 1), pk(lane, t + 1, 0),
                                     pk(lane, t + 1, 1)] for lane in range(32)])
                if st_n % 2:
                    t = st_n - 1
                    stmatrix_trans(smem, [a + t * 1024 for a in addr[:16]],
                                   [[pk(lane, t, 0), pk(lane, t, 1)] for lane in range(32)])
    assert np.array_equal(smem.load_tile(sp, bn, bm), p.T), f"d{d} P^T in shared memory"
    assert np.array_equal(smem.load_tile(sds, bn, bm), ds.T), f"d{d} dS^T in shared memory"

    dk_out = np.full((bn, d), np.nan)
    for wg in range(wgs):
        for mb in range(panels):
            panel = panels * wg + mb
            cols = slice(64 * panel, 64 * panel + 64)
            dvt, dkt = np.zeros((64, bn)), np.zeros((64, bn))
            for kq in range(bm // 16):  # issue_dkv_t
                wgmma(smem, dvt, desc_mnmajor(bm, sdo + panel * bm * 128, kq),
                      desc_kmajor(bn, sp, kq), True, False)
                wgmma(smem, dkt, desc_mnmajor(bm, q_tile + panel * bm * 128, kq),
                      desc_kmajor(bn, sds, kq), True, False)
            assert np.allclose(dvt, (p.T @ do)[:, cols].T), f"d{d} dV^T panel {panel}"
            assert np.allclose(dkt, (ds.T @ q)[:, cols].T), f"d{d} dK^T panel {panel}"
            dq = np.zeros((64, 64))
            for kk in range(bn // 16):  # issue_dq
                wgmma(smem, dq, desc_mnmajor(bn, sds, kk),
                      desc_mnmajor(bn, sk + panel * bn * 128, kk), True, True)
            assert np.allclose(dq, (ds @ k)[:, cols]), f"d{d} dQ panel {panel}"
            for w in range(4):  # store_t's map from the fragments
                for lane in range(32):
                    row = 16 * w + lane // 4
                    for t in range(bn // 8):
                        for e in range(4):
                            r, c = fragment_rows_cols(w, lane, t, e)
                            col = 64 * panel + row + 8 * (e >> 1)
                            key = 8 * t + 2 * (lane % 4) + (e & 1)
                            dk_out[key, col] = dkt[r, c]
    assert np.allclose(dk_out, ds.T @ q), f"d{d} dK from store_t's map"


# -- ordered dQ's turns: the key tiles a query tile waits for are those that visit it ---------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_turn_ranges(seqlen_q, seqlen_k, block_n, block_m, causal, left, right) -> None:
    """cf_mask.cuh's key_tiles_of (the key tiles OrderedTurns counts for a query tile) and
    query_tiles_of (the query tiles a key tile's block visits), transcribed: one must be the
    other's inverse, or a turn would wait for a block that never comes. Window: left, right
    >= 0 (the host makes an unbounded side the sequence's length)."""
    local = not causal
    off = seqlen_k - seqlen_q
    m_tiles, n_tiles = _cdiv(seqlen_q, block_m), _cdiv(seqlen_k, block_n)

    def key_tiles(m):
        q0, q_last = m * block_m, min(m * block_m + block_m, seqlen_q) - 1
        last_key = (q_last + off + 1 if causal else q_last + off + right + 1) - 1
        end = min(n_tiles, 0 if last_key < 0 else last_key // block_n + 1)
        begin = min(max(0, q0 + off - left) // block_n, end) if local else 0
        return begin, end

    def query_tiles(j):
        n0, n_last = j * block_n, min(j * block_n + block_n, seqlen_k) - 1
        i_min = n0 - off if causal else n0 - off - right
        first = m_tiles if i_min >= seqlen_q else (i_min // block_m if i_min > 0 else 0)
        end = m_tiles
        if local:
            end = max(first, _cdiv(min(seqlen_q, max(0, n_last - off + left + 1)), block_m))
        return first, end

    for m in range(m_tiles):
        begin, end = key_tiles(m)
        for j in range(n_tiles):
            first, last = query_tiles(j)
            assert (begin <= j < end) == (first <= m < last), (
                f"turns: query tile {m}, key tile {j} ({seqlen_q}, {seqlen_k}, {block_n} x "
                f"{block_m}, {'causal' if causal else f'window {left}, {right}'})")


def main() -> int:
    rng = np.random.default_rng(0)
    check_role_split(rng)
    for d in (256, 192):
        check_hsplit(d, rng)
    for _ in range(2000):
        check_turn_ranges(int(rng.integers(1, 600)), int(rng.integers(1, 600)),
                          int(rng.choice([80, 96, 128])), 64, bool(rng.integers(2)),
                          int(rng.integers(0, 300)), int(rng.integers(0, 300)))
    print("role split reads, head-dim split d256 / d192: every product and layout as NumPy's;"
          " ordered dQ's key-tile and query-tile ranges are inverses")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

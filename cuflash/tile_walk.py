"""How many persistent blocks the Hopper forward gets, and whether they pay (pure, NumPy).

flash_fwd_sm90_ws.cu's persistent blocks (``CF_FWD_PERSISTENT``, its ``TileWalk``) split
the (batch entry, query tile, head) triples among themselves statically: block g of N takes
triples g, 2N - 1 - g, 2N + g, ... in the one-per-block grid's order (entry by entry; causal:
heaviest query tile first, heads fastest). A one-per-block grid is balanced by the hardware,
which starts a block wherever one finished. A static split is balanced only when each
block's triples add up to about the same work, which causal problems with a few batch
entries can miss by a quarter (4 entries of 32 query tiles x 16 heads on 132 blocks: the
busiest block gets 1.29x the mean, and the kernel ran 0.81x the one-per-block grid on an H200,
2026-12-04). So the planner prices the split before it takes it: work is counted in key
tiles visited, plus one per query tile for its prologue and epilogue.
"""

from __future__ import annotations

import numpy as np

# A persistent grid keeps at least this share of the SMs busy (it may leave the rest idle
# to divide the work more evenly, or to keep whole blocks per batch entry).
MIN_FILL = 0.95
# ... and it must finish within this factor of the one-per-block grid's estimate.
SLACK = 1.0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triple_costs(batch: int, heads: int, seqlen_q: int, seqlen_k: int, block_m: int,
                 block_n: int, causal: bool) -> np.ndarray:
    """Each triple's work in the walk's order: its key tiles (causal: bottom-right aligned,
    as the kernels' masks) plus one."""
    tiles = _cdiv(seqlen_q, block_m)
    n_k = _cdiv(seqlen_k, block_n)
    if not causal:
        return np.full(batch * tiles * heads, n_k + 1, dtype=np.int64)
    m = np.arange(tiles - 1, -1, -1)  # heaviest first
    last_row = np.minimum((m + 1) * block_m, seqlen_q) - 1
    keys = np.clip(last_row + 1 + (seqlen_k - seqlen_q), 0, seqlen_k)
    per_tile = -(-keys // block_n) + 1
    return np.tile(np.repeat(per_tile, heads), batch)


def static_makespan(costs: np.ndarray, blocks: int) -> int:
    """The busiest block's work when ``blocks`` blocks walk ``costs`` back and forth."""
    rounds = _cdiv(len(costs), blocks)
    grid = np.zeros(rounds * blocks, dtype=np.int64)
    grid[:len(costs)] = costs
    grid = grid.reshape(rounds, blocks)
    grid[1::2] = grid[1::2, ::-1]
    return int(grid.sum(axis=0).max())


def persistent_blocks(batch: int, heads: int, seqlen_q: int, seqlen_k: int, block_m: int,
                      block_n: int, causal: bool, sm_count: int) -> int:
    """Blocks per batch entry for the persistent grid, or 0 where the one-per-block grid
    should run: the count with the least busy block among those that keep at least
    MIN_FILL of the SMs busy, if its busiest block beats the one-per-block grid's estimate
    (the mean work per SM plus one triple of the heaviest kind, the hardware's tail)."""
    per_entry_max = sm_count // batch if batch else 0
    if per_entry_max < 1:
        return 0
    costs = triple_costs(batch, heads, seqlen_q, seqlen_k, block_m, block_n, causal)
    pairs = len(costs) // batch
    if pairs <= per_entry_max:  # a block per triple: nothing to walk
        return pairs
    one_per_block = costs.sum() / sm_count + costs.max()
    best, best_g = None, 0
    for g in range(per_entry_max, 0, -1):
        if g * batch < MIN_FILL * sm_count:
            break
        span = static_makespan(costs, g * batch)
        if best is None or span < best:
            best, best_g = span, g
    return best_g if best is not None and best <= SLACK * one_per_block else 0

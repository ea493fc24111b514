"""The persistent forward's static split, priced on the CPU (cuflash/tile_walk.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cuflash import tile_walk


def _walk(total: int, blocks: int) -> list[list[int]]:
    """Which triples each block takes: flash_fwd_sm90_ws.cu's TileWalk, spelled out."""
    taken = [[] for _ in range(blocks)]
    r = 0
    while r * blocks < total:
        for g in range(blocks):
            linear = r * blocks + (blocks - 1 - g if r & 1 else g)
            if linear < total:
                taken[g].append(linear)
        r += 1
    return taken


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 3000), blocks=st.integers(1, 140), seed=st.integers(0, 99))
def test_makespan_is_the_busiest_block_of_the_walk(total, blocks, seed):
    costs = np.random.default_rng(seed).integers(1, 40, total)
    taken = _walk(total, blocks)
    assert sorted(t for block in taken for t in block) == list(range(total))  # each once
    assert tile_walk.static_makespan(costs, blocks) == max(sum(costs[t] for t in b)
                                                           for b in taken)


def test_causal_costs_heaviest_first_with_heads_fastest():
    costs = tile_walk.triple_costs(2, 3, 300, 300, 128, 128, causal=True)
    # query tiles 2, 1, 0 see 3, 2, 1 key tiles (+1 each), three heads, two entries
    assert costs.tolist() == [4, 4, 4, 3, 3, 3, 2, 2, 2] * 2
    assert tile_walk.triple_costs(1, 2, 300, 500, 128, 128, False).tolist() == [5] * 6


def test_uneven_causal_split_falls_back():
    # 4 entries x 32 query tiles x 16 heads: 132 blocks leave the busiest 1.29x the mean
    costs = tile_walk.triple_costs(4, 16, 4096, 4096, 128, 128, causal=True)
    assert tile_walk.static_makespan(costs, 132) > 1.25 * costs.sum() / 132
    assert tile_walk.persistent_blocks(4, 16, 4096, 4096, 128, 128, True, 132) == 32
    # 8 entries x 11 query tiles of 192 x 16 heads: no count from 126 to 128 splits evenly
    assert tile_walk.persistent_blocks(8, 16, 2048, 2048, 192, 128, True, 132) == 0
    assert tile_walk.persistent_blocks(8, 16, 2048, 2048, 192, 128, False, 132) == 16


@settings(max_examples=150, deadline=None)
@given(batch=st.integers(1, 140), heads=st.integers(1, 48), seqlen=st.integers(1, 20000),
       block_m=st.sampled_from([128, 192]), causal=st.booleans(),
       sms=st.sampled_from([4, 16, 78, 114, 132]))
def test_persistent_blocks_keep_the_sms_busy_or_decline(batch, heads, seqlen, block_m, causal,
                                                        sms):
    """A count either gives each triple its own block, or keeps at least MIN_FILL of the SMs
    busy with whole blocks per entry and a busiest block within the one-block-per-tile
    estimate; 0 otherwise."""
    g = tile_walk.persistent_blocks(batch, heads, seqlen, seqlen, block_m, 128, causal, sms)
    costs = tile_walk.triple_costs(batch, heads, seqlen, seqlen, block_m, 128, causal)
    pairs = len(costs) // batch
    if g == 0:
        return
    assert g * batch <= sms
    if g == pairs:
        return
    assert g * batch >= tile_walk.MIN_FILL * sms
    assert tile_walk.static_makespan(costs, g * batch) <= costs.sum() / sms + costs.max()

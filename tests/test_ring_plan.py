"""The ring's plan (cuflash.distributed.plan) and the ring algorithm, in one process.

* Every (query, key) pair the global mask allows is computed by exactly one (rank, step)
  block, and nothing else is; zig-zag gives every rank equal causal work at every step.
* shard_sequence / gather_sequence / shard_positions agree and invert each other.
* A serial ring: every rank's steps run one after another in NumPy with the plan's blocks,
  cuflash.attention_forward / attention_backward and merge_attention, exactly the arithmetic
  the torch and JAX rings do between their sends; judged against the float64 reference. The
  multi-process tests (test_ring_torch.py, test_ring_jax.py) then only add the transport.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash.distributed import gather_sequence, shard_positions, shard_sequence
from cuflash.distributed.plan import Source, ring_source, source_of, visible_block

try:
    from ring_helpers import RingCase, assert_ring_matches
except ImportError:  # run from the repository root as a package
    from tests.ring_helpers import RingCase, assert_ring_matches


def _blocks(rank, world_size, seqlen, causal, layout, seqlen_kv=None):
    """(step, source, block) of every step of ``rank``."""
    q_len, kv_len = seqlen // world_size, (seqlen_kv or seqlen) // world_size
    for step in range(world_size):
        source = ring_source(rank, step, world_size)
        yield step, source, visible_block(source_of(rank, source), q_len, kv_len,
                                          causal=causal, layout=layout)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_blocks_cover_the_mask_exactly_once(world_size, causal, layout):
    seqlen = 2 * world_size * 3
    covered = np.zeros((seqlen, seqlen), dtype=int)
    for rank in range(world_size):
        q_pos = shard_positions(rank, world_size, seqlen, layout=layout)
        for _, source, block in _blocks(rank, world_size, seqlen, causal, layout):
            if block is None:
                continue
            k_pos = shard_positions(source, world_size, seqlen, layout=layout)
            qs, ks = q_pos[block.q_rows], k_pos[block.kv_rows]
            seen = np.ones((len(qs), len(ks)), dtype=int)
            if block.causal:
                seen = np.tril(seen, len(ks) - len(qs))
            covered[np.ix_(qs, ks)] += seen
    want = np.tril(np.ones_like(covered)) if causal else np.ones_like(covered)
    np.testing.assert_array_equal(covered, want)


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_zigzag_balances_causal_work(world_size):
    """At every step past the diagonal each rank computes the same c x 2c pairs."""
    seqlen = 2 * world_size * 4
    for step in range(1, world_size):
        areas = set()
        for rank in range(world_size):
            block = dict((s, b) for s, _, b in
                         _blocks(rank, world_size, seqlen, True, "zigzag"))[step]
            rows = block.q_rows.stop - block.q_rows.start
            areas.add(rows * (block.kv_rows.stop - block.kv_rows.start))
        assert areas == {4 * 8}


def test_plan_refuses_what_it_cannot_shard():
    with pytest.raises(ValueError, match="layout: expected one of"):
        visible_block(Source.SELF, 4, 4, causal=True, layout="striped")
    with pytest.raises(ValueError, match="even shard length, got 3"):
        visible_block(Source.LATER, 3, 3, causal=True, layout="zigzag")
    with pytest.raises(ValueError, match="equal length, got 4 and 6"):
        visible_block(Source.SELF, 4, 6, causal=True, layout="zigzag")
    with pytest.raises(ValueError, match="needs a multiple of 8, got 12"):
        shard_positions(0, 4, 12, layout="zigzag")


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_shard_and_gather_invert_each_other(layout):
    x = np.arange(2 * 24 * 3).reshape(2, 24, 3)
    shards = [shard_sequence(x, r, 3, layout=layout) for r in range(3)]
    for r, shard in enumerate(shards):
        np.testing.assert_array_equal(shard, x[:, shard_positions(r, 3, 24, layout=layout)])
    np.testing.assert_array_equal(gather_sequence(shards, layout=layout), x)
    torch = pytest.importorskip("torch")
    t_shards = [shard_sequence(torch.from_numpy(x), r, 3, layout=layout) for r in range(3)]
    assert all(isinstance(s, torch.Tensor) and s.is_contiguous() for s in t_shards)
    np.testing.assert_array_equal(gather_sequence(t_shards, layout=layout).numpy(), x)


def test_zigzag_positions():
    assert shard_positions(0, 2, 8).tolist() == [0, 1, 6, 7]
    assert shard_positions(1, 2, 8).tolist() == [2, 3, 4, 5]


# -- the ring, serially ------------------------------------------------------------------------


def _serial_ring(case: RingCase):
    """Full-sequence (o, dq, dk, dv) from running every rank's ring steps in turn."""
    W, layout = case.world_size, case.layout
    q, k, v, do = (
        [shard_sequence(x, r, W, layout=layout) for r in range(W)] for x in case.inputs())
    outs, lses = [], []
    for r in range(W):
        o_acc = lse_acc = None
        for _, src, block in _blocks(r, W, case.seqlen, case.causal, layout, case.seqlen_kv):
            if block is None:
                continue
            rows = block.q_rows
            o_b, stats = cuflash.attention_forward(q[r][:, rows], k[src][:, block.kv_rows],
                                                   v[src][:, block.kv_rows],
                                                   causal=block.causal)
            if o_acc is None:
                o_acc, lse_acc = o_b.astype(np.float32), stats.lse
            else:
                o_acc[:, rows], lse_acc[:, :, rows] = cuflash.merge_attention(
                    [o_acc[:, rows], o_b], [lse_acc[:, :, rows], stats.lse])
        outs.append(o_acc.astype(q[r].dtype))
        lses.append(lse_acc)
    dq = [np.zeros(x.shape, np.float32) for x in q]
    dk = [np.zeros(x.shape, np.float32) for x in k]
    dv = [np.zeros(x.shape, np.float32) for x in v]
    for r in range(W):
        for _, src, block in _blocks(r, W, case.seqlen, case.causal, layout, case.seqlen_kv):
            if block is None:
                continue
            rows, keys = block.q_rows, block.kv_rows
            lse = np.ascontiguousarray(lses[r][:, :, rows])
            stats = cuflash.SoftmaxStats(lse, np.isfinite(lse).astype(np.float32))
            g = cuflash.attention_backward(do[r][:, rows], q[r][:, rows], k[src][:, keys],
                                           v[src][:, keys], outs[r][:, rows], stats,
                                           causal=block.causal)
            dq[r][:, rows] += g[0]
            dk[src][:, keys] += g[1]
            dv[src][:, keys] += g[2]
    dtype = q[0].dtype
    return tuple(gather_sequence([x.astype(dtype) for x in xs], layout=layout)
                 for xs in (outs, dq, dk, dv))


@st.composite
def ring_cases(draw):
    world_size, causal = draw(st.integers(1, 4)), draw(st.booleans())
    heads_kv = draw(st.sampled_from([1, 2]))
    return RingCase(
        world_size=world_size, seqlen=2 * world_size * draw(st.integers(2, 6)),
        causal=causal, layout=draw(st.sampled_from(["zigzag", "contiguous"])),
        dtype=draw(st.sampled_from(["fp32", "fp16", "bf16"])), batch=draw(st.integers(1, 2)),
        heads=heads_kv * draw(st.sampled_from([1, 2])), heads_kv=heads_kv,
        head_dim=draw(st.sampled_from([8, 32])), seed=draw(st.integers(0, 2**16)),
        seqlen_kv=None if causal else 2 * world_size * draw(st.integers(1, 6)))


@settings(max_examples=40)
@given(ring_cases())
def test_serial_ring_matches_reference(case):
    assert_ring_matches(case, *_serial_ring(case))

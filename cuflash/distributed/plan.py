"""The plan of a ring: who holds which tokens, and which block each ring step computes.

A sequence of ``seqlen`` tokens is split over ``world_size`` ranks. Every rank keeps its
query shard; the K/V shards travel round the ring, so at step s rank r holds the K/V shard
of rank ``(r - s) mod world_size`` (its *source*). Which (query, key) pairs of that meeting
are visible depends only on where the source sits relative to r, so a step's work is one
of three ``Block``s, computed once here and used by the torch and the JAX ring alike.

Layouts (``c`` = one chunk of seqlen / (2 * world_size) tokens, ``W`` = world_size):

    contiguous: rank r holds tokens [r * 2c, (r + 1) * 2c)
    zigzag:     rank r holds chunk r and chunk 2W - 1 - r (each c tokens), in that order

    W = 2, zigzag      chunks: 0 1 2 3        causal work per step (q rows x kv rows)
        rank 0 holds   0 . . 3                source = self:    2c x 2c, causal diagonal
        rank 1 holds   . 1 2 .                source earlier:   2c x c  (kv front chunk)
                                              source later:      c x 2c (q back chunk)

With a causal mask a contiguous layout leaves rank 0 idle for all but one step while the
last rank works every step; zig-zag gives every rank the same number of visible pairs at
every step (each non-diagonal step is c x 2c), so no rank waits on another. Without a mask
every step is the full 2c x 2c block in either layout.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

LAYOUTS = ("zigzag", "contiguous")


class Source(enum.Enum):
    """Where the owner of the visiting K/V shard sits in the sequence relative to this rank."""

    SELF = "self"
    EARLIER = "earlier"  # lower rank: its contiguous shard (zig-zag: its front chunk) is earlier
    LATER = "later"


@dataclass(frozen=True)
class Block:
    """One step's attention: local query rows ``q_rows`` against the visiting shard's key rows
    ``kv_rows``, with a causal (bottom-right, here equal-length diagonal) mask or none."""

    q_rows: slice
    kv_rows: slice
    causal: bool


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return layout


def ring_source(rank: int, step: int, world_size: int) -> int:
    """The rank whose K/V shard rank ``rank`` holds at ``step`` (K/V move to rank + 1)."""
    return (rank - step) % world_size


def source_of(rank: int, source: int) -> Source:
    if source == rank:
        return Source.SELF
    return Source.EARLIER if source < rank else Source.LATER


def visible_block(source: Source, q_len: int, kv_len: int, *, causal: bool,
                  layout: str) -> Block | None:
    """The block a rank computes against a K/V shard from ``source``; None when no query of
    this rank sees any of its keys. ``q_len`` / ``kv_len``: tokens per shard (equal when
    causal: the ring then runs self-attention over one sharded sequence)."""
    check_layout(layout)
    every_q, every_kv = slice(0, q_len), slice(0, kv_len)
    if not causal:
        return Block(every_q, every_kv, causal=False)
    if q_len != kv_len:
        raise ValueError(f"causal ring attention shards one sequence: expected q and k/v "
                         f"shards of equal length, got {q_len} and {kv_len}")
    if source is Source.SELF:
        # both shards list the same positions in increasing order: an ordinary causal square
        return Block(every_q, every_kv, causal=True)
    if layout == "contiguous":
        return Block(every_q, every_kv, causal=False) if source is Source.EARLIER else None
    if q_len % 2:
        raise ValueError(f"zigzag shards hold two equal chunks: expected an even shard "
                         f"length, got {q_len}")
    half = q_len // 2
    if source is Source.EARLIER:
        # source chunks s < r and 2W-1-s > 2W-1-r: all our queries see its front chunk only
        return Block(every_q, slice(0, half), causal=False)
    # source chunks s > r and 2W-1-s < 2W-1-r: only our back chunk sees them, all of them
    return Block(slice(half, q_len), every_kv, causal=False)


def check_shards(q_len: int, kv_len: int, world_size: int, *, causal: bool, layout: str) -> None:
    """Raise the plan's ValueError now, before any transfer, if some step of a ring of
    ``world_size`` could not be planned for shards of these lengths."""
    sources = [Source.SELF] if world_size == 1 else list(Source)
    for source in sources:
        visible_block(source, q_len, kv_len, causal=causal, layout=layout)


# -- sharding a sequence ------------------------------------------------------------------


def _check_split(seqlen: int, world_size: int, layout: str) -> None:
    check_layout(layout)
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    parts = 2 * world_size if layout == "zigzag" else world_size
    if seqlen % parts:
        raise ValueError(f"seqlen: {layout} over {world_size} ranks needs a multiple of "
                         f"{parts}, got {seqlen}")


def _chunk_ranges(rank: int, world_size: int, seqlen: int, layout: str) -> list[tuple[int, int]]:
    _check_split(seqlen, world_size, layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < {world_size}, got {rank}")
    if layout == "contiguous":
        n = seqlen // world_size
        return [(rank * n, (rank + 1) * n)]
    c = seqlen // (2 * world_size)
    back = 2 * world_size - 1 - rank
    return [(rank * c, (rank + 1) * c), (back * c, (back + 1) * c)]


def shard_positions(rank: int, world_size: int, seqlen: int, *, layout: str = "zigzag"
                    ) -> np.ndarray:
    """Global token positions (int64) held by ``rank``, in shard order: use them for
    position embeddings (RoPE) of a sharded sequence."""
    ranges = _chunk_ranges(rank, world_size, seqlen, layout)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])


def shard_sequence(x: Any, rank: int, world_size: int, *, layout: str = "zigzag",
                   axis: int = 1) -> Any:
    """``rank``'s shard of a full-sequence array (NumPy, CuPy, torch or JAX), sequence on
    ``axis`` (1 for cuflash's (batch, seqlen, heads, head_dim)); a new contiguous array."""
    ranges = _chunk_ranges(rank, world_size, x.shape[axis], layout)
    parts = [_take(x, a, b, axis) for a, b in ranges]
    return _concatenate(parts, axis)


def gather_sequence(shards: Sequence[Any], *, layout: str = "zigzag", axis: int = 1) -> Any:
    """The full sequence from every rank's shard (``shards[r]`` from rank r): the inverse of
    ``shard_sequence``."""
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("shards: expected one shard per rank, got none")
    shard_len = shards[0].shape[axis]
    seqlen = shard_len * world_size
    pieces = []
    for rank, shard in enumerate(shards):
        start = 0
        for a, b in _chunk_ranges(rank, world_size, seqlen, layout):
            pieces.append((a, _take(shard, start, start + b - a, axis)))
            start += b - a
    return _concatenate([p for _, p in sorted(pieces, key=lambda item: item[0])], axis)


def _take(x: Any, start: int, stop: int, axis: int) -> Any:
    index = [slice(None)] * len(x.shape)
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def _concatenate(parts: list, axis: int) -> Any:
    from ..interop import array_namespace

    xp = array_namespace(parts[0], "x", tracers=True)
    if xp.__name__ == "torch":
        return xp.cat(parts, dim=axis).contiguous()
    return xp.concatenate(parts, axis=axis)

"""Block-sparse attention masks (issue #15, docs/block_sparse.md): checks and tile views.

A block mask is a bool array of shape (batch or 1, heads or 1, n_q_blocks, n_k_blocks) with
``n_q_blocks = ceil(seqlen_q / block_m)`` and ``n_k_blocks = ceil(seqlen_k / block_n)`` at
``block_size = (block_m, block_n)``: query i may see key j only if
``block_mask[b, h, i // block_m, j // block_n]`` (h a query head), on top of causal and the
window. A masked block contributes nothing; a tiled path never loads it.
"""

from __future__ import annotations

import numbers

import numpy as np

# The documented default: the kernels' usual forward tile (block_m = block_n = 128), so one
# mask entry is one kernel tile and a masked entry is one skipped K/V load.
BLOCK_SIZE = (128, 128)


def n_blocks(length: int, block: int) -> int:
    return -(-length // block)


def check_block_size(block_size) -> tuple[int, int]:
    """A pair (block_m, block_n) of positive ints."""
    expected = "a pair (block_m, block_n) of positive ints"
    if not isinstance(block_size, (tuple, list)) or len(block_size) != 2 or any(
            isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral)
            for x in block_size):
        raise TypeError(f"block_size: expected {expected}, got {block_size!r}")
    block_m, block_n = (int(x) for x in block_size)
    if block_m < 1 or block_n < 1:
        raise ValueError(f"block_size: expected {expected}, got {(block_m, block_n)!r}")
    return block_m, block_n


def check_block_mask(block_mask, block_size, batch: int, heads: int, seqlen_q: int,
                     seqlen_k: int):
    """A bool array of shape (batch|1, heads|1, n_q_blocks, n_k_blocks); returns it. Any
    framework's array (or a JAX tracer) is checked by its shape and dtype alone, in place;
    anything else goes through ``np.asarray``."""
    block_m, block_n = check_block_size(block_size)
    mask = block_mask if hasattr(block_mask, "shape") and hasattr(block_mask, "dtype") \
        else np.asarray(block_mask)
    dtype = str(mask.dtype).split(".")[-1]  # torch.bool -> bool
    if dtype != "bool":
        raise TypeError(f"block_mask: expected dtype bool, got {dtype}")
    shape = tuple(mask.shape)
    blocks = (n_blocks(seqlen_q, block_m), n_blocks(seqlen_k, block_n))
    if (len(shape) != 4 or shape[0] not in (1, batch) or shape[1] not in (1, heads)
            or shape[2:] != blocks):
        raise ValueError(f"block_mask: expected shape ({batch} or 1, {heads} or 1, {blocks[0]}, "
                         f"{blocks[1]}) (batch, heads, ceil(seqlen_q / {block_m}), "
                         f"ceil(seqlen_k / {block_n})), got {shape}")
    return mask


def expand(block_mask: np.ndarray, block_size, rows, cols) -> np.ndarray:
    """bool (batch|1, heads|1, len(rows), len(cols)): the block mask at query rows ``rows``
    and key columns ``cols`` (ranges or int arrays), one entry per element."""
    block_m, block_n = block_size
    bi = np.asarray(rows, dtype=np.int64) // block_m
    bj = np.asarray(cols, dtype=np.int64) // block_n
    return block_mask[:, :, bi[:, None], bj[None, :]]


class TileMask:
    """The block mask as a tiled path sees it: per (query tile, key block), skip it, run it
    unmasked, or apply an element mask in the CPU path's row order (GQA rows r = i * group +
    g for query i and head kv * group + g)."""

    def __init__(self, block_mask: np.ndarray, block_size, heads_kv: int, group: int):
        self.mask = block_mask
        self.block_m, self.block_n = block_size
        self.heads_kv, self.group = heads_kv, group

    def _blocks(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        return self.mask[:, :, i0 // self.block_m:(i1 - 1) // self.block_m + 1,
                         j0 // self.block_n:(j1 - 1) // self.block_n + 1]

    def skips(self, i0: int, i1: int, j0: int, j1: int) -> bool:
        """No (batch, head) sees any pair of the tile: never load it."""
        return not self._blocks(i0, i1, j0, j1).any()

    def rows_mask(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray | None:
        """None when every pair of the tile is visible, else bool (batch|1, heads_kv|1,
        (i1 - i0) * group, j1 - j0): True where row r sees key j0 + c."""
        if self._blocks(i0, i1, j0, j1).all():
            return None
        m = expand(self.mask, (self.block_m, self.block_n), range(i0, i1), range(j0, j1))
        b, h, ni, nj = m.shape
        if h == 1:  # one mask for every head: rows i * group + g all take query i's row
            return np.repeat(m, self.group, axis=2)
        m = m.reshape(b, self.heads_kv, self.group, ni, nj).transpose(0, 1, 3, 2, 4)
        return m.reshape(b, self.heads_kv, ni * self.group, nj)

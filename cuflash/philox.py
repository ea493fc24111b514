"""Philox4x32-10 and the dropout mask it defines: the spec the kernels' cf_philox.cuh follows.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) maps a
128-bit counter and a 64-bit key to 128 random bits with ten rounds of two 32x32->64-bit
multiplies. Counter-based: any element's bits are a pure function of its coordinates, so a
kernel tile, the CPU path's tiles and the backward all regenerate the same mask without
storing it or sharing state.

The dropout layout (docs/dropout.md has the picture and the kernel's side of it). For the
element (b, h, i, j) -- batch, query head, query row, key column -- of a call with
``heads`` query heads:

    quad(x) = 4 * (x >> 4) + ((x >> 1) & 3)      slot(x) = (x & 1) + 2 * ((x >> 3) & 1)
    key     = (seed mod 2^32, seed >> 32)
    counter = (quad(j), quad(i), b * heads + h, offset)
    byte    = byte slot(j) of word slot(i) of philox4x32_10(counter, key)
    kept    = byte >= t,   t = keep_threshold(dropout_p) = round(256 * dropout_p) (1..255)

so one Philox call gives the 16 bytes of a 4 x 4 block of (query, key) pairs: the rows
{16a + 2u, + 1, + 8, + 9} and likewise the columns. That block is what two lanes of an mma
warp (xor 4) hold of a C fragment across two adjacent 16 x 8 pieces, for S (queries as rows:
the forward) and S^T (keys as rows: the backward) alike, so each lane makes one call per 16
of its elements and the pair swaps halves. Eight bits per element make dropout_p a multiple
of 1/256 (as FlashAttention-2's byte comparison does): the kept ones are scaled by
``keep_scale`` = 256 / (256 - t), the inverse of the true keep probability.
"""

from __future__ import annotations

import numpy as np

# Philox4x32 multipliers and Weyl key increments (Random123's PHILOX_M4x32_0/1, PHILOX_W32_0/1).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
ROUNDS = 10

_U32 = np.uint32
_U64 = np.uint64
_MASK32 = _U64(0xFFFFFFFF)


def _mulhilo(a: int, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) 32-bit halves of the exact 64-bit product a * b (b uint32, any shape)."""
    product = _U64(a) * b.astype(_U64)
    return (product >> _U64(32)).astype(_U32), (product & _MASK32).astype(_U32)


def philox4x32_10(counter, key) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four 32-bit output words of Philox4x32-10, elementwise.

    counter: four uint32 arrays (broadcasting) c0..c3; key: two uint32 values (k0, k1).
    Returns four uint32 arrays of the broadcast shape. Exact integer arithmetic throughout.
    """
    c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(c, dtype=_U32) for c in counter))
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    with np.errstate(over="ignore"):
        for _ in range(ROUNDS):
            hi0, lo0 = _mulhilo(PHILOX_M0, c0)
            hi1, lo1 = _mulhilo(PHILOX_M1, c2)
            c0, c1, c2, c3 = hi1 ^ c1 ^ _U32(k0), lo1, hi0 ^ c3 ^ _U32(k1), lo0
            k0, k1 = (k0 + PHILOX_W0) & 0xFFFFFFFF, (k1 + PHILOX_W1) & 0xFFFFFFFF
    return c0, c1, c2, c3


# -- the dropout layout ------------------------------------------------------------------------

MAX_SEED = 2**64 - 1
MAX_OFFSET = 2**32 - 1


def keep_threshold(dropout_p: float) -> int:
    """The byte threshold t: an element is kept iff its random byte is >= t, i.e. with
    probability 1 - t / 256. t = round(256 * dropout_p), at least 1 when dropout_p > 0 and
    at most 255, so the effective dropout_p is within 1/512 of the one asked for."""
    p = float(dropout_p)
    if p <= 0:
        return 0
    return min(max(int(np.floor(p * 256.0 + 0.5)), 1), 255)


def effective_p(dropout_p: float) -> float:
    """The dropout probability the mask has: keep_threshold(dropout_p) / 256."""
    return keep_threshold(dropout_p) / 256.0


def keep_scale(dropout_p: float) -> float:
    """The factor of the kept probabilities, 1 / (1 - effective_p): E[P Z scale] = P."""
    return 256.0 / (256 - keep_threshold(dropout_p))


def quad(x):
    """The 4-index group of x: {16a + 2u, 16a + 2u + 1, 16a + 2u + 8, 16a + 2u + 9}."""
    return 4 * (x >> 4) + ((x >> 1) & 3)


def slot(x):
    """x's place in its group: (x & 1) + 2 * ((x >> 3) & 1)."""
    return (x & 1) + 2 * ((x >> 3) & 1)


def dropout_bytes(b, h, i, j, *, heads: int, seed: int, offset: int = 0) -> np.ndarray:
    """uint8 random bytes of the elements (b, h, i, j) (integer arrays, broadcasting).

    The layout of the module docstring: a 4 x 4 block of (i, j) per Philox call."""
    b, h, i, j = (np.asarray(x, dtype=np.int64) for x in (b, h, i, j))
    key = (seed & 0xFFFFFFFF, seed >> 32)
    counter = (quad(j).astype(_U32), quad(i).astype(_U32), (b * heads + h).astype(_U32),
               _U32(offset))
    words = philox4x32_10(counter, key)
    word = np.choose(np.broadcast_to(slot(i), words[0].shape), words)
    return ((word >> (8 * slot(j)).astype(_U32)) & _U32(0xFF)).astype(np.uint8)


def keep_mask_tile(batch: int, heads: int, rows: range, cols: range, *, dropout_p: float,
                   seed: int, offset: int = 0, first_batch: int = 0) -> np.ndarray:
    """bool (batch, heads, len(rows), len(cols)): True where element (b, h, i, j) is kept,
    b counted from ``first_batch`` (a varlen call's sequence b: its own batch index).

    As ``dropout_bytes`` of every element, but with one Philox call per 4 x 4 block rather
    than per element (16 times fewer: the float64 references draw whole masks)."""
    i, j = (np.asarray(x, dtype=np.int64).reshape(-1) for x in (rows, cols))
    row_quads, row_at = np.unique(quad(i), return_inverse=True)
    col_quads, col_at = np.unique(quad(j), return_inverse=True)
    bh = ((first_batch + np.arange(batch))[:, None, None, None] * heads
          + np.arange(heads)[None, :, None, None])
    counter = (col_quads[None, None, None, :].astype(_U32),
               row_quads[None, None, :, None].astype(_U32), bh.astype(_U32), _U32(offset))
    words = np.stack(philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32)), axis=2)
    # words: (batch, heads, 4, row blocks, column blocks); each element's word, then byte
    word = words[:, :, slot(i)[:, None], row_at[:, None], col_at[None, :]]
    values = (word >> (8 * slot(j)).astype(_U32)) & _U32(0xFF)
    return values >= keep_threshold(dropout_p)


def seed_offset_of_words(words) -> tuple[int, int]:
    """(seed, offset) of three 32-bit words (seed low, seed high, offset), as the frameworks
    draw them on a device (cuflash.jax.dropout_words, cuflash.torch.dropout_words) and the
    kernels read them (CF_DROP_RNG_PTR); signed int32 words are read as their bits."""
    words = [int(w) & 0xFFFFFFFF for w in words]
    if len(words) != 3:
        raise ValueError(f"dropout words: expected 3 (seed low, seed high, offset), got "
                         f"{len(words)}")
    lo, hi, offset = words
    return lo | hi << 32, offset


def dropout_mask(batch: int, heads: int, seqlen_q: int, seqlen_k: int, *, dropout_p: float,
                 seed: int, offset: int = 0) -> np.ndarray:
    """The kept-mask of a whole attention call, bool (batch, heads, seqlen_q, seqlen_k).

    True where the probability P[b, h, i, j] is kept (and scaled by ``keep_scale``),
    False where it is dropped: exactly the elements every cuflash path keeps for this
    (dropout_p, seed, offset). Materialises batch * heads * seqlen_q * seqlen_k booleans, so
    it is for tests and small shapes; the attention paths regenerate it tile by tile.
    """
    for name, value in (("batch", batch), ("heads", heads), ("seqlen_q", seqlen_q),
                        ("seqlen_k", seqlen_k)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    check_dropout(dropout_p, seed, offset)
    return keep_mask_tile(batch, heads, range(seqlen_q), range(seqlen_k),
                          dropout_p=dropout_p, seed=seed, offset=offset)


def check_dropout(dropout_p, seed, offset) -> float:
    """Validate (dropout_p, seed, offset); return dropout_p as a float.

    dropout_p: a real in [0, 1) (TypeError if not a real, ValueError if out of range);
    seed: an int in [0, 2^64) (required when dropout_p > 0); offset: an int in [0, 2^32)."""
    import numbers

    if isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a real number in [0, 1), "
                        f"got {type(dropout_p).__name__} {dropout_p!r}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p: expected a real number in [0, 1), got {p!r}")
    for name, value, limit, required in (("dropout_seed", seed, MAX_SEED, p > 0),
                                         ("dropout_offset", offset, MAX_OFFSET, False)):
        if value is None and not required:
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}: expected an int from 0 to {limit}"
                            f"{' (dropout_p > 0 needs one)' if required else ''}, "
                            f"got {type(value).__name__} {value!r}")
        if not 0 <= int(value) <= limit:
            raise ValueError(f"{name}: expected an int from 0 to {limit}, got {int(value)}")
    return p

// cf_drop_ring.cuh -- dropout's kept flags drawn by the forward's idle producer warps into a
// ring of shared-memory slots, which the consumers read (a knob of the warp-specialized Hopper
// forward, CF_DROP_RING = the slots; issue #15's dropout cost).
//
// Why: with TMA one producer thread issues every copy and the producer's other three warps
// have nothing to do, while the consumers spend most of dropout's cost in the Philox rounds
// (session 30's ncu: the forward's instructions double at the same issue rate, so its time
// follows its instruction count). Drawn by those warps, the rounds fill issue slots the
// consumers leave idle while they wait on their products, and a consumer's share of dropout
// is a 16-byte shared load and 16 byte selects a 32-column step, where cf_drop_packed draws a
// Philox block, compares it and swaps halves with its partner lane.
//
// A slot holds one key tile's flags, one byte an element: for consumer warp w, k-step pair kp
// (32 columns) and lane L = 4g + t, 16 bytes at ((w * KP + kp) * 32 + L) * 16:
//   (A_lo, B_lo, A_hi, B_hi), X_lo / X_hi: cf_keep_top of block X's word for the lane's rows
//   r0 = q0 + 16w + g and r0 + 8 (words g & 1 and (g & 1) + 2), where A and B are the Philox
//   blocks of k-steps 2kp and 2kp + 1 (column quads quad(c0 + 2t) + 8kp and + 4).
// Lanes 4g + t and 4(g ^ 1) + t share both blocks (rows g, g ^ 1 lie in one row quad), so a
// drawing thread computes A and B once for the pair (g = 2u, 2u + 1) and stores both lanes'
// words. The consumer's loads of a step are 512 contiguous bytes a warp (no bank conflict).
// The bits are cf_drop_packed's: tests/test_drop_packed_host.py compares the two on the CPU.
#pragma once

#include "cf_drop_packed.cuh"

// The stream's key words passed through a shuffle: ptxas cannot see through it, so it makes
// the twenty round keys in the loop that uses them rather than holding them all live across
// it (they spilled the drawing warps' registers). Every lane of the warp calls it.
__device__ __forceinline__ cf_dropout cf_opaque_key(const cf_dropout& d) {
#ifdef __CUDA_ARCH__
  return cf_dropout{__shfl_sync(0xffffffffu, d.k0, 0), __shfl_sync(0xffffffffu, d.k1, 0),
                    d.offset, d.threshold};
#else
  return d;
#endif
}

// A slot's bytes for a ROWS x BLOCK_N tile (one per element).
template <int ROWS, int BLOCK_N>
struct DropRingTile {
  static_assert(ROWS % 16 == 0 && BLOCK_N % 32 == 0, "16-row warps, 32-column k-step pairs");
  enum : int { kPairs = BLOCK_N / 32, kUnits = ROWS / 16 * kPairs * 16, kBytes = ROWS * BLOCK_N };
};

// Thread `worker` of `workers` fills a slot with the flags of the tile whose first query row is
// q0 and first key column c0 (a multiple of 16), head bh: units n = worker, worker + workers,
// ... of (warp w, pair kp, row pair u, column quad t). Whole warps call it (shuffles).
template <int ROWS, int BLOCK_N>
__device__ __forceinline__ void cf_drop_ring_fill(const Dropout& drop, unsigned char* slot,
                                                  unsigned int bh, int q0, int c0, int worker,
                                                  int workers) {
  using Tile = DropRingTile<ROWS, BLOCK_N>;
  const cf_dropout words = drop.stream();
  const unsigned int low7x4 = (drop.d.threshold & 0x7fu) * 0x01010101u;
  const unsigned int small = drop.d.threshold < 128u ? ~0u : 0u;
  const unsigned int col_quad0 = cf_quad((unsigned int)c0);
#pragma unroll 1
  for (int first = 0; first < Tile::kUnits; first += workers) {  // (whole warps: shuffles)
    const bool stores = first + worker < Tile::kUnits;  // past the last unit: drawn, not stored
    const int n = stores ? first + worker : Tile::kUnits - 1;
    const int t = n & 3, u = (n >> 2) & 3, wk = n >> 4;  // wk = w * kPairs + kp
    const int w = wk / Tile::kPairs, kp = wk % Tile::kPairs;
    const unsigned int row_quad = cf_quad((unsigned int)(q0 + 16 * w + 2 * u));
    const unsigned int col_quad = col_quad0 + (unsigned int)(t + 8 * kp);
    unsigned char* pair = slot + (wk * 32 + 8 * u + t) * 16;  // lane 4(2u) + t; + 64: 4(2u + 1) + t
    // blocks A (x = 0) and B (x = 1) one after the other, each's round keys made for it
#pragma unroll 1
    for (int x = 0; x < 2; ++x) {
      const cf_philox_words w4 =
          cf_dropout_block(cf_opaque_key(words), bh, row_quad, col_quad + 4u * x);
      unsigned int* even = reinterpret_cast<unsigned int*>(pair) + x;  // X_lo; + 2: X_hi
      unsigned int* odd = reinterpret_cast<unsigned int*>(pair + 64) + x;
      if (stores) {
        even[0] = cf_keep_top(w4.x, low7x4, small);
        even[2] = cf_keep_top(w4.z, low7x4, small);
        odd[0] = cf_keep_top(w4.y, low7x4, small);
        odd[2] = cf_keep_top(w4.w, low7x4, small);
      }
    }
  }
}

// A consumer lane's P of a whole tile (NK k-steps, as cf_drop_packed takes it) masked by the
// flags of its warp in a filled slot (`warp_flags`: the slot + w * KP * 512).
template <int NK>
__device__ __forceinline__ void cf_drop_ring_apply(unsigned int (&a)[NK][4],
                                                   const unsigned char* warp_flags, int lane) {
  static_assert(NK % 2 == 0, "k-steps in pairs");
#pragma unroll
  for (int kp = 0; kp < NK / 2; ++kp) {
    const uint4 f = *reinterpret_cast<const uint4*>(warp_flags + (kp * 32 + lane) * 16);
    // (A, B) as prmt's (low, high) words: k-step 2kp's masks from A's bytes, 2kp + 1's from B's
    cf_drop_kstep(a[2 * kp], f.x, f.y, f.z, f.w, 0x9988u);
    cf_drop_kstep(a[2 * kp + 1], f.x, f.y, f.z, f.w, 0xddccu);
  }
}

// -- the backward's ring (keys as rows, S^T) ----------------------------------------------
// A slot holds a key tile's flags against a query tile as the consumers read them: for
// consumer warp w (keys n0 + 16w ..) and lane L = 4g + t, the 64-bit word that
// Dropout::keep_bits<NT, true>(bh, n0 + 16w + g, m0 + 2t) returns, at (w * 32 + L) * 8. Its
// 16-bit pass p holds cf_keep8 of the lane's row words (row slot g & 1) of the Philox blocks
// at query quads quad(m0 + 2t) + 8p and + 4 (one pair of fragments of 8 queries each).

// Thread `worker` of `workers` fills such a slot for WARPS consumer warps and NT fragments:
// units n = worker, worker + workers, ... of (warp w, row pair u, column quad t, pass p).
// Whole warps call it (shuffles).
template <int WARPS, int NT>
__device__ __forceinline__ void cf_drop_ring_fill_keys(const Dropout& drop, unsigned char* slot,
                                                       unsigned int bh, int n0, int m0,
                                                       int worker, int workers) {
  static_assert(NT % 4 == 0 && NT <= 16, "whole passes, 64 bits");
  enum : int { kPasses = NT / 4, kUnits = WARPS * 16 * kPasses };
  const cf_dropout words = drop.stream();
  const unsigned int low7x4 = (drop.d.threshold & 0x7fu) * 0x01010101u;
  const unsigned int small = drop.d.threshold < 128u ? ~0u : 0u;
  const unsigned int col_quad0 = cf_quad((unsigned int)m0);
#pragma unroll 1
  for (int first = 0; first < kUnits; first += workers) {  // (whole warps: shuffles)
    const cf_dropout keyed = cf_opaque_key(words);
    const int n = first + worker;
    if (n >= kUnits) continue;
    const int p = n % kPasses, t = (n / kPasses) & 3, u = (n / kPasses >> 2) & 3;
    const int w = n / (kPasses * 16);
    const unsigned int row_quad = cf_quad((unsigned int)(n0 + 16 * w + 2 * u));
    const unsigned int col_quad = col_quad0 + (unsigned int)(t + 8 * p);
    unsigned int even = 0, odd = 0;  // lanes 4(2u) + t (row slot 0) and 4(2u + 1) + t (slot 1)
#pragma unroll 1
    for (int x = 0; x < 2; ++x) {  // the pass's two blocks, one Philox chain at a time
      const cf_philox_words b4 = cf_dropout_block(keyed, bh, col_quad + 4u * x, row_quad);
      unsigned int lo, hi;
      cf_row_words<true>(b4, 0u, lo, hi);
      even |= cf_keep8(lo, hi, low7x4, small) << (8 * x);
      cf_row_words<true>(b4, 1u, lo, hi);
      odd |= cf_keep8(lo, hi, low7x4, small) << (8 * x);
    }
    unsigned short* pass = reinterpret_cast<unsigned short*>(slot + (w * 32 + 8 * u + t) * 8) + p;
    pass[0] = (unsigned short)even;
    pass[16] = (unsigned short)odd;  // 4 lanes on: 32 bytes
  }
}

// cf_drop_packed.cuh -- dropout applied to P after packing (a knob of the warp-specialized
// Hopper forward, CF_DROP_PACKED=1; issue #15's dropout cost).
//
// The forward packs P to 16 bits as the P V product's A fragment (sm90_pack_kstep: a[k] holds
// fragments 2k, 2k + 1 of rows r0 and r0 + 8, two elements a word). Those four words are one
// Philox block's columns (c0 + 16k, + 1, + 8, + 9) in rows r0 and r0 + 8 (cf_philox.cuh's
// layout), so each row word's compare leaves an element's kept flag in its byte's top bit,
// and prmt's sign replication turns those bits into 16-bit masks: about two instructions an
// element pair, where Dropout::keep_bits' packing and drop_p's tests and selects on the
// floats take about three an element (SASS, bench/dev/NOTES.md, sessions 28 and 37). The
// same bits as dropping the floats before packing: tests/test_drop_packed_host.py checks
// that on the CPU (this header compiled for the host), tests/test_gpu_fwd_drop_early.py on a
// GPU.
#pragma once

#include "cf_philox.cuh"

// Kept flags of four bytes in their top bits (byte >= threshold; the other bits are not
// flags): cf_keep8's compare without its packing.
__device__ __forceinline__ unsigned int cf_keep_top(unsigned int x, unsigned int low7x4,
                                                    unsigned int small) {
  const unsigned int dx = (x | 0x80808080u) - low7x4;
  return (x & dx) | ((x | dx) & small);
}

// PTX prmt in its default mode: result byte i is byte (nibble i & 7) of (hi4, lo4), or that
// byte's top bit over all eight when nibble i & 8 (the C form for the host check).
__device__ __forceinline__ unsigned int cf_prmt(unsigned int lo4, unsigned int hi4,
                                                unsigned int sel) {
#ifdef __CUDA_ARCH__
  unsigned int r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(lo4), "r"(hi4), "r"(sel));
  return r;
#else
  const unsigned long long both = (unsigned long long)hi4 << 32 | lo4;
  unsigned int r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned int nib = sel >> (4 * i) & 15u, byte = both >> (8 * (nib & 7u)) & 0xffu;
    r |= (nib & 8u ? (byte & 0x80u ? 0xffu : 0u) : byte) << (8 * i);
  }
  return r;
#endif
}

// One k-step's four words masked by the flags of rows r0 (lo words) and r0 + 8 (hi), the
// step's bytes picked by `sel` (cf_drop_packed) from (own, partner's).
__device__ __forceinline__ void cf_drop_kstep(unsigned int (&a)[4], unsigned int own_lo,
                                              unsigned int got_lo, unsigned int own_hi,
                                              unsigned int got_hi, unsigned int sel) {
  a[0] &= cf_prmt(own_lo, got_lo, sel);  // columns c, c + 1: slots 0, 1
  a[1] &= cf_prmt(own_hi, got_hi, sel);
  a[2] &= cf_prmt(own_lo, got_lo, sel + 0x2222u);  // columns c + 8, c + 9: slots 2, 3
  a[3] &= cf_prmt(own_hi, got_hi, sel + 0x2222u);
}

// P of NK k-steps (rows r0, r0 + 8 queries; c0 = a multiple of 16 + 2 * (lane % 4)) with the
// dropped elements made 0. The passes are unrolled (constant indices into `a`); every lane of
// the warp calls it (shuffles): a lane draws one block of a pair of k-steps, its partner
// lane ^ 4 the other, and they swap the halves, as keep_bits does.
template <int NK>
__device__ __forceinline__ void cf_drop_packed(const Dropout& drop, unsigned int (&a)[NK][4],
                                               unsigned int bh, int r0, int c0) {
  if constexpr (CF_DROPOUT) {
    static_assert(NK % 2 == 0, "k-steps in pairs");
    const unsigned int s = r0 & 1, row_quad = cf_quad(r0);
    const unsigned int col_quad0 = cf_quad((unsigned int)c0);
    const unsigned int low7x4 = (drop.d.threshold & 0x7fu) * 0x01010101u;
    const unsigned int small = drop.d.threshold < 128u ? ~0u : 0u;
    // prmt selectors over (own flags, the partner's): the lane with s = 0 drew k-step k
    // (bytes 0-3), s = 1 drew k + 1, so k-step k's flags are bytes 4-7 there. Nibble 8 + b
    // copies byte b's top bit over a byte: 0x9988 makes column slots 0, 1's masks, + 0x2222
    // slots 2, 3's, ^ 0x4444 the other word's.
    const unsigned int sel_k = s ? 0xddccu : 0x9988u, sel_k1 = sel_k ^ 0x4444u;
    const cf_dropout words = drop.stream();
#pragma unroll
    for (int k = 0; k < NK; k += 2) {  // this lane draws k-step k + s
      const cf_philox_words w = cf_dropout_block(words, bh, row_quad, col_quad0 + 4u * (k + s));
      const unsigned int own_lo = cf_keep_top(s ? w.y : w.x, low7x4, small);
      const unsigned int own_hi = cf_keep_top(s ? w.w : w.z, low7x4, small);
      const unsigned int got_lo =
          __shfl_xor_sync(0xffffffffu, cf_keep_top(s ? w.x : w.y, low7x4, small), 4);
      const unsigned int got_hi =
          __shfl_xor_sync(0xffffffffu, cf_keep_top(s ? w.z : w.w, low7x4, small), 4);
      cf_drop_kstep(a[k], own_lo, got_lo, own_hi, got_hi, sel_k);
      cf_drop_kstep(a[k + 1], own_lo, got_lo, own_hi, got_hi, sel_k1);
    }
  }
}

// cf_philox.cuh -- Philox4x32-10 and the dropout mask of issue #15 (docs/dropout.md).
//
// The device side of cuflash/philox.py, bit for bit: the NumPy version is the spec, tests/
// test_dropout_device.py compiles this header with NVRTC (CPU) and compares its bits with
// NumPy's on a GPU. The kernels take it through `Dropout` (CF_DROPOUT, below).
//
// Layout, for element (b, h, i, j) -- batch, query head, query row, key column -- of a call
// with `heads` query heads, seed (64 bits) and offset (32 bits):
//   quad(x) = 4 * (x >> 4) + ((x >> 1) & 3),  slot(x) = (x & 1) + 2 * ((x >> 3) & 1)
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (quad(j), quad(i), b * heads + h, offset)
//   byte    = byte slot(j) of word slot(i) of philox4x32_10(counter, key)
//   kept    = byte >= threshold,  threshold = round(256 * dropout_p) (host-computed, 1..255)
// One call gives a 4 x 4 block of (i, j): rows {16a + 2u, + 1, + 8, + 9}, columns likewise.
// An mma.sync / wgmma C fragment gives lane (g = lane / 4, t = lane % 4) rows {g, g + 8} and
// columns {2t, 2t + 1} of each 16 x 8 piece: lanes L and L ^ 4 (rows g, g ^ 1) together
// hold one such block across two adjacent pieces, whether the rows are queries (the
// forward's S) or keys (the backward's S^T). So each lane computes one block per two pairs
// of pieces and the pair swaps halves (`Dropout::keep_bits`): one Philox call per 16
// elements of a lane.
#pragma once

#ifndef CF_PHILOX_ROUNDS
#define CF_PHILOX_ROUNDS 10
#endif

// Philox4x32 multipliers and Weyl key increments (Random123's PHILOX_M4x32_0/1, PHILOX_W32_0/1).
#define CF_PHILOX_M0 0xD2511F53u
#define CF_PHILOX_M1 0xCD9E8D57u
#define CF_PHILOX_W0 0x9E3779B9u
#define CF_PHILOX_W1 0xBB67AE85u

struct cf_philox_words {
  unsigned int x, y, z, w;
};

__device__ __forceinline__ cf_philox_words cf_philox4x32_10(cf_philox_words c, unsigned int k0,
                                                             unsigned int k1) {
#pragma unroll
  for (int round = 0; round < CF_PHILOX_ROUNDS; ++round) {
    // -- one round: two 32 x 32 -> 64-bit products, halves crossed with the key
    const unsigned int hi0 = __umulhi(CF_PHILOX_M0, c.x), lo0 = CF_PHILOX_M0 * c.x;
    const unsigned int hi1 = __umulhi(CF_PHILOX_M1, c.z), lo1 = CF_PHILOX_M1 * c.z;
    c = cf_philox_words{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += CF_PHILOX_W0;  // the Weyl key bump (unsigned: wraps mod 2^32)
    k1 += CF_PHILOX_W1;
  }
  return c;
}

// The dropout stream of one call: key and offset, fixed for a whole launch.
struct cf_dropout {
  unsigned int k0, k1;      // seed & 0xffffffff, seed >> 32
  unsigned int offset;      // the call's offset (counter word 3)
  unsigned int threshold;   // kept iff the element's byte >= threshold (0..255)
};

__device__ __forceinline__ unsigned int cf_quad(unsigned int x) {
  return ((x >> 4) << 2) | ((x >> 1) & 3u);
}
__device__ __forceinline__ unsigned int cf_slot(unsigned int x) {
  return (x & 1u) | ((x >> 2) & 2u);
}

// The 4 x 4 block of query quad qi and key quad qj for head bh = b * heads + h.
__device__ __forceinline__ cf_philox_words cf_dropout_block(const cf_dropout& d, unsigned int bh,
                                                            unsigned int qi, unsigned int qj) {
  return cf_philox4x32_10(cf_philox_words{qj, qi, bh, d.offset}, d.k0, d.k1);
}

__device__ __forceinline__ unsigned int cf_word(const cf_philox_words& w, unsigned int n) {
  return n == 0 ? w.x : n == 1 ? w.y : n == 2 ? w.z : w.w;
}

// The random byte of one element (the reference form; a kernel uses Dropout::keep_bits).
__device__ __forceinline__ unsigned int cf_dropout_byte(const cf_dropout& d, unsigned int bh,
                                                        unsigned int i, unsigned int j) {
  const cf_philox_words w = cf_dropout_block(d, bh, cf_quad(i), cf_quad(j));
  return (cf_word(w, cf_slot(i)) >> (8u * cf_slot(j))) & 0xffu;
}

// Kept flags of eight bytes (two words: a fragment's rows g and g + 8), packed in a byte:
// bit 2k + 1 for byte k of `lo`, bit 2k for byte k of `hi`. Four bytes at a time: the low
// seven bits compare by a subtraction that cannot borrow across bytes, and the top bits
// decide with the threshold's top bit: x >= t is x7 | d7 when t < 128, x7 & d7 otherwise,
// i.e. majority(x7, d7, t < 128).
__device__ __forceinline__ unsigned int cf_keep8(unsigned int lo, unsigned int hi,
                                                 unsigned int low7x4, unsigned int small) {
  const unsigned int h = 0x80808080u;
  const unsigned int dl = (lo | h) - low7x4, dh = (hi | h) - low7x4;
  const unsigned int gl = ((lo & dl) | ((lo | dl) & small)) & h;
  const unsigned int gh = ((hi & dh) | ((hi | dh) & small)) & h;
  const unsigned int pairs = (gl | (gh >> 1)) >> 6;  // byte k: bit 8k + 1 lo, 8k hi
  return (pairs * 0x01041040u) >> 24;                 // the four 2-bit groups side by side
}

// The two row words of a lane for row slot s (rows s and s | 2 of the block): byte k of
// each is the element in column slot k. Queries as rows: words s and s | 2. Keys as rows
// (S^T): byte s (and s | 2) of each of the four words, a byte transpose.
template <bool KEYS_AS_ROWS>
__device__ __forceinline__ void cf_row_words(const cf_philox_words& w, unsigned int s,
                                             unsigned int& lo, unsigned int& hi) {
  if (!KEYS_AS_ROWS) {
    lo = s ? w.y : w.x;
    hi = s ? w.w : w.z;
  } else {
    const unsigned int sel = s | ((s + 4u) << 4) | ((s + 2u) << 8) | ((s + 6u) << 12);
    const unsigned int a = __byte_perm(w.x, w.y, sel), b = __byte_perm(w.z, w.w, sel);
    lo = __byte_perm(a, b, 0x5410);
    hi = __byte_perm(a, b, 0x7632);
  }
}

// -- the kernels' side (CF_DROPOUT; docs/dropout.md) ---------------------------------------
// Dropout kernels take CF_DROP_PARAMS after CF_BSP_PARAMS (nothing when off, so other kernels
// keep their parameters and code):
//   unsigned int drop_k0, drop_k1     the seed's low and high words
//   unsigned int drop_offset          counter word 3
//   unsigned int drop_threshold       kept iff the element's byte >= threshold
//   float drop_scale                  256 / (256 - threshold): 1 / the keep probability
//   int drop_bh0                      b0 * heads for a launch over batch entries b0 ..
// With CF_DROP_RNG_PTR=1 the first three are read from device memory when the kernel runs
// (a CUDA graph replays the launch, or XLA holds the words in its buffer, and the words
// change between runs):
//   const unsigned int* drop_rng      {seed low, seed high, offset}
#ifndef CF_DROPOUT
#define CF_DROPOUT 0
#endif
#ifndef CF_DROP_RNG_PTR
#define CF_DROP_RNG_PTR 0
#endif
#if CF_DROPOUT && CF_DROP_RNG_PTR
#define CF_DROP_PARAMS                                                                    \
  , const unsigned int *__restrict__ drop_rng, unsigned int drop_threshold,               \
      float drop_scale, int drop_bh0
#define CF_DROP \
  Dropout { cf_dropout{0u, 0u, 0u, drop_threshold}, drop_scale, drop_bh0, drop_rng }
#elif CF_DROPOUT
#define CF_DROP_PARAMS                                                                    \
  , unsigned int drop_k0, unsigned int drop_k1, unsigned int drop_offset,                 \
      unsigned int drop_threshold, float drop_scale, int drop_bh0
#define CF_DROP \
  Dropout { cf_dropout{drop_k0, drop_k1, drop_offset, drop_threshold}, drop_scale, drop_bh0 }
#else
#define CF_DROP_PARAMS
#define CF_DROP \
  Dropout {}
#endif

// A launch's dropout: which elements the fragments keep (every lane of the warp calls
// keep_bits / drop_p: shuffles), and the scale of the kept ones. Without CF_DROPOUT everything is kept
// and the scale is 1, as constants.
struct Dropout {
  cf_dropout d;
  float scale_;
  int bh0;
#if CF_DROP_RNG_PTR
  // the words, loaded where a mask is made rather than held in registers for the whole
  // kernel (three more live registers spilled the d256 Hopper forward)
  const unsigned int* rng;
#endif
  // the stream's key and offset (and the threshold)
  __device__ __forceinline__ cf_dropout stream() const {
#if CF_DROP_RNG_PTR
    return cf_dropout{__ldg(rng), __ldg(rng + 1), __ldg(rng + 2), d.threshold};
#else
    return d;
#endif
  }
  // the Philox head index of (b, h), b within the launch's batch slice
  __device__ __forceinline__ unsigned int head(int b, int h, int heads) const {
    return (unsigned int)(bh0 + b * heads + h);
  }
  __device__ __forceinline__ float scale() const { return CF_DROPOUT ? scale_ : 1.f; }
  // One element (query i, key j): the float32 SIMT kernels' form (a Philox call each).
  __device__ __forceinline__ bool kept(unsigned int bh, int i, int j) const {
    return !CF_DROPOUT || cf_dropout_byte(stream(), bh, i, j) >= d.threshold;
  }
  // The kept flags of NT fragments side by side: rows r0 = (a multiple of 16) + g and
  // r0 + 8, fragment t's columns c0 + 8t, + 1 (c0 = a multiple of 16 + 2 * (lane % 4)).
  // KEYS_AS_ROWS: rows are keys and columns queries (S^T). Read them with bit(). Every lane
  // of the warp calls it (shuffles). A rolled loop: one Philox chain in registers at a time
  // (side by side they spilled the Hopper kernels); each pass makes two blocks (a lane
  // computes one, its partner lane ^ 4 the other, and they swap the halves).
  template <int NT, bool KEYS_AS_ROWS = false>
  __device__ __forceinline__ unsigned long long keep_bits(unsigned int bh, int r0,
                                                          int c0) const {
    static_assert(NT == 2 || (NT % 4 == 0 && NT <= 16), "whole blocks, 64 bits");
    if (!CF_DROPOUT) return ~0ull;
    const unsigned int s = r0 & 1, row_quad = cf_quad(r0);
    const unsigned int col_quad0 = ((unsigned int)c0 >> 4 << 2) | (((unsigned int)c0 >> 1) & 3u);
    const unsigned int low7x4 = (d.threshold & 0x7fu) * 0x01010101u;
    const unsigned int small = d.threshold < 128u ? ~0u : 0u;
    const cf_dropout words = stream();
    const auto block = [&](unsigned int col_quad) {
      return KEYS_AS_ROWS ? cf_dropout_block(words, bh, col_quad, row_quad)
                          : cf_dropout_block(words, bh, row_quad, col_quad);
    };
    if (NT == 2) {  // one block for the pair: both lanes compute it
      unsigned int lo, hi;
      cf_row_words<KEYS_AS_ROWS>(block(col_quad0), s, lo, hi);
      return cf_keep8(lo, hi, low7x4, small);
    }
    unsigned long long bits = 0;
#pragma unroll 1
    for (int m = 0; m < NT / 2; m += 2) {  // blocks m (lane with even row) and m + 1 (odd)
      unsigned int own_lo, own_hi, give_lo, give_hi;
      const cf_philox_words w = block(col_quad0 + 4u * (m + s));
      cf_row_words<KEYS_AS_ROWS>(w, s, own_lo, own_hi);
      cf_row_words<KEYS_AS_ROWS>(w, s ^ 1u, give_lo, give_hi);
      const unsigned int got_lo = __shfl_xor_sync(0xffffffffu, give_lo, 4);
      const unsigned int got_hi = __shfl_xor_sync(0xffffffffu, give_hi, 4);
      const unsigned int first = s ? cf_keep8(got_lo, got_hi, low7x4, small)
                                   : cf_keep8(own_lo, own_hi, low7x4, small);
      const unsigned int second = s ? cf_keep8(own_lo, own_hi, low7x4, small)
                                    : cf_keep8(got_lo, got_hi, low7x4, small);
      bits = (bits >> 16) | (unsigned long long)(first | second << 8) << 48;
    }
    return NT == 16 ? bits : bits >> (64 - 4 * NT);
  }
  // x Z / (1 - p) for an element kept or not: the backward's dV operand (x = P) and its dP
  // in dS = P (dP Z / (1 - p) - delta). x itself without CF_DROPOUT.
  __device__ __forceinline__ float apply(bool kept, float x) const {
    return !CF_DROPOUT ? x : kept ? x * scale_ : 0.f;
  }
  // A backward's staged statistics with 1 / (1 - p) folded in (p_ds_fragment<true>): P from
  // lse2 - log2(1 / (1 - p)) is P / (1 - p), and dS = P (dP Z / (1 - p) - delta)
  // = P / (1 - p) (dP Z - delta (1 - p)). Returns (mul, add) for staged = x * mul + add,
  // of lse2 (LSE) or of delta; the identity without CF_DROPOUT.
  template <bool LSE>
  __device__ __forceinline__ float2 fold() const {
    if (!CF_DROPOUT) return make_float2(1.f, 0.f);
    const float keep = (float)(256u - d.threshold) * (1.f / 256.f);  // 1 - p, exactly
    return LSE ? make_float2(1.f, log2f(keep)) : make_float2(keep, 0.f);
  }
  // Element e of fragment t in keep_bits' word: e = 0, 1 row r0, columns c0 + 8t, + 1;
  // e = 2, 3 row r0 + 8 (cf_keep8's order: column parity, then row r0 above r0 + 8).
  __device__ __forceinline__ static bool bit(unsigned long long bits, int t, int e) {
    return (bits >> (4 * t + 2 * (e & 1) + 1 - (e >> 1))) & 1;
  }
  // P of NT fragments in place (rows = queries r0, r0 + 8; fragment t: keys c0 + 8t, + 1):
  // the dropped elements become 0, the kept ones keep their value (the forward scales O once,
  // at the end).
  template <int NT>
  __device__ __forceinline__ void drop_p(float (&p)[NT][4], unsigned int bh, int r0,
                                         int c0) const {
    if constexpr (CF_DROPOUT) {  // (keep_bits<NT> is not instantiated without: NT may be 22)
      drop_p_with(p, keep_bits<NT>(bh, r0, c0));
    }
  }
  // The same with the flags made earlier (keep_bits<NT>(bh, r0, c0)): a kernel draws them
  // while its products run and applies them after the softmax.
  template <int NT>
  __device__ __forceinline__ static void drop_p_with(float (&p)[NT][4],
                                                     unsigned long long bits) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[t][e] = bit(bits, t, e) ? p[t][e] : 0.f;
  }
};

// Test entries (compiled by tests/test_dropout_device.py): bytes[n] for element n of a
// (batch, heads, rows, cols) grid, row-major; keep[n] from Dropout::keep_bits for a grid of
// `rows` queries x `cols` keys, one warp per 16 x (8 nt) block of fragments (nt = 2, 4 or
// 16), queries as fragment rows (rows % 16 == 0, cols % (8 nt) == 0) or keys (the reverse),
// written query-major.
#ifdef CF_PHILOX_TEST
extern "C" __global__ void cf_philox_test_bytes(unsigned int* bytes, int batch, int heads,
                                                int rows, int cols, unsigned int seed_lo,
                                                unsigned int seed_hi, unsigned int offset) {
  const long long n = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const long long total = (long long)batch * heads * rows * cols;
  if (n >= total) return;
  const unsigned int j = n % cols, i = (n / cols) % rows;
  const unsigned int bh = (unsigned int)(n / ((long long)cols * rows));  // b * heads + h
  const cf_dropout d{seed_lo, seed_hi, offset, 0u};
  bytes[n] = cf_dropout_byte(d, bh, i, j);
}

template <int NT, bool KEYS_AS_ROWS>
__device__ void cf_philox_test_keep_block(unsigned char* keep, int rows, int cols,
                                          const Dropout& drop) {
  const int frag_cols = KEYS_AS_ROWS ? rows : cols;  // blockIdx.x: a 16 x 8NT block
  const int row0 = (blockIdx.x / (frag_cols / (8 * NT))) * 16;
  const int col0 = (blockIdx.x % (frag_cols / (8 * NT))) * 8 * NT;
  const int g = threadIdx.x / 4, t = threadIdx.x % 4;
  const unsigned long long bits =
      drop.keep_bits<NT, KEYS_AS_ROWS>(blockIdx.y, row0 + g, col0 + 2 * t);
  unsigned char* base = keep + (long long)blockIdx.y * rows * cols;
  for (int f = 0; f < NT; ++f)
    for (int e = 0; e < 4; ++e) {
      const int r = row0 + g + 8 * (e >> 1), c = col0 + 8 * f + 2 * t + (e & 1);
      base[KEYS_AS_ROWS ? c * cols + r : r * cols + c] = Dropout::bit(bits, f, e);
    }
}

extern "C" __global__ void cf_philox_test_keep(unsigned char* keep, int rows, int cols,
                                               unsigned int seed_lo, unsigned int seed_hi,
                                               unsigned int offset, unsigned int threshold,
                                               int keys_as_rows, int nt) {
  const Dropout drop{cf_dropout{seed_lo, seed_hi, offset, threshold}, 1.f, 0};
  if (keys_as_rows) {
    if (nt == 2) cf_philox_test_keep_block<2, true>(keep, rows, cols, drop);
    if (nt == 4) cf_philox_test_keep_block<4, true>(keep, rows, cols, drop);
    if (nt == 16) cf_philox_test_keep_block<16, true>(keep, rows, cols, drop);
  } else {
    if (nt == 2) cf_philox_test_keep_block<2, false>(keep, rows, cols, drop);
    if (nt == 4) cf_philox_test_keep_block<4, false>(keep, rows, cols, drop);
    if (nt == 16) cf_philox_test_keep_block<16, false>(keep, rows, cols, drop);
  }
}
#endif

// cf_philox.cuh -- Philox4x32-10 and the dropout mask of issue #15 (docs/dropout.md).
//
// The device side of cuflash/philox.py, bit for bit: the NumPy version is the spec, tests/
// test_dropout_device.py compiles this header with NVRTC (CPU) and compares its bits with
// NumPy's on a GPU. The kernels take it through `Dropout` (CF_DROPOUT, below).
//
// Layout, for element (b, h, i, j) -- batch, query head, query row, key column -- of a call
// with `heads` query heads, seed (64 bits) and offset (32 bits):
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (j >> 1, i >> 1, b * heads + h, offset)
//   bits    = philox4x32_10(counter, key).word[2 * (i & 1) + (j & 1)]
//   kept    = bits >= threshold,  threshold = floor(dropout_p * 2^32) (host-computed)
// One call covers a 2 x 2 square of (i, j). An mma.sync / wgmma C fragment gives lane
// (g = lane / 4, t = lane % 4) rows {g, g + 8} and columns {2t, 2t + 1} of each 16 x 8 piece;
// the square of row g is shared with lane ^ 4 (row g ^ 1): one lane computes the square of
// its row g, the other the square of its row g + 8, and they swap two words
// (`cf_dropout_keep4_rows`). The backward's S^T fragment (keys as rows) is the same picture with
// i and j exchanged, which the symmetric square keeps at one call per four elements.
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
  unsigned int threshold;   // kept iff bits >= threshold
};

// The four words of the 2 x 2 square holding (i, j) for head bh = b * heads + h:
// word 2 * (i & 1) + (j & 1) belongs to (i, j).
__device__ __forceinline__ cf_philox_words cf_dropout_square(const cf_dropout& d, unsigned int bh,
                                                             unsigned int i, unsigned int j) {
  return cf_philox4x32_10(cf_philox_words{j >> 1, i >> 1, bh, d.offset}, d.k0, d.k1);
}

// The random bits of one element (the reference form; a kernel uses Dropout::keep_bits).
__device__ __forceinline__ unsigned int cf_dropout_bits(const cf_dropout& d, unsigned int bh,
                                                        unsigned int i, unsigned int j) {
  const cf_philox_words s = cf_dropout_square(d, bh, i, j);
  const unsigned int word = 2u * (i & 1u) + (j & 1u);
  return word == 0 ? s.x : word == 1 ? s.y : word == 2 ? s.z : s.w;
}

// Kept flags of a C fragment's four elements with one Philox call per lane. The fragment's
// rows r0 = row0 + g and r0 + 8, columns c0 = col0 + 2t and c0 + 1; keep[0], keep[1]: (r0, c0),
// (r0, c0 + 1); keep[2], keep[3]: (r0 + 8, ...). KEYS_AS_ROWS: rows are keys and columns
// queries (the backward's S^T), else rows are queries (S). Lane pairs (g, g ^ 1) are lanes
// (L, L ^ 4): the lane with even g computes the square of rows (g, g + 1) at r0, the odd one
// the square of rows (g + 7, g + 8) at r0 + 8; each sends the other the two words of the
// partner's row. row0 is a multiple of 16 and col0 of 2; every lane of the warp must call it
// (shuffle).
template <bool KEYS_AS_ROWS>
__device__ __forceinline__ void cf_dropout_keep4_rows(const cf_dropout& d, unsigned int bh,
                                                      unsigned int r0, unsigned int c0,
                                                      bool keep[4]) {
  const bool odd = r0 & 1u;
  const unsigned int mine_row = odd ? r0 + 8u : r0;  // the row whose square this lane computes
  const cf_philox_words s = KEYS_AS_ROWS ? cf_dropout_square(d, bh, c0, mine_row)
                                         : cf_dropout_square(d, bh, mine_row, c0);
  // word 2 * (i & 1) + (j & 1) of the square: rows of parity `rp`, columns of parity cp
  const auto word = [&s](bool rp, bool cp) {
    const unsigned int w = KEYS_AS_ROWS ? 2u * cp + rp : 2u * rp + cp;
    return w == 0 ? s.x : w == 1 ? s.y : w == 2 ? s.z : s.w;
  };
  const unsigned int own0 = word(odd, 0), own1 = word(odd, 1);     // row mine_row
  const unsigned int give0 = word(!odd, 0), give1 = word(!odd, 1);  // row mine_row ^ 1
  const unsigned int got0 = __shfl_xor_sync(0xffffffffu, give0, 4);
  const unsigned int got1 = __shfl_xor_sync(0xffffffffu, give1, 4);
  // even lane: own = row r0, got = row r0 + 8 (partner computed rows r0 + 7 / r0 + 8);
  // odd lane: own = row r0 + 8, got = row r0 (partner computed rows r0 - 1 / r0)
  const unsigned int a0 = odd ? got0 : own0, a1 = odd ? got1 : own1;  // row r0
  const unsigned int b0 = odd ? own0 : got0, b1 = odd ? own1 : got1;  // row r0 + 8
  keep[0] = a0 >= d.threshold;
  keep[1] = a1 >= d.threshold;
  keep[2] = b0 >= d.threshold;
  keep[3] = b1 >= d.threshold;
}

// -- the kernels' side (CF_DROPOUT; docs/dropout.md) ---------------------------------------
// Dropout kernels take CF_DROP_PARAMS after CF_BSP_PARAMS (nothing when off, so other kernels
// keep their parameters and code):
//   unsigned int drop_k0, drop_k1     the seed's low and high words
//   unsigned int drop_offset          counter word 3
//   unsigned int drop_threshold       kept iff bits >= threshold
//   float drop_scale                  1 / (1 - dropout_p)
//   int drop_bh0                      b0 * heads for a launch over batch entries b0 ..
#ifndef CF_DROPOUT
#define CF_DROPOUT 0
#endif
#if CF_DROPOUT
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
  // the Philox head index of (b, h), b within the launch's batch slice
  __device__ __forceinline__ unsigned int head(int b, int h, int heads) const {
    return (unsigned int)(bh0 + b * heads + h);
  }
  __device__ __forceinline__ float scale() const { return CF_DROPOUT ? scale_ : 1.f; }
  // One element (query i, key j): the float32 SIMT kernels' form (a Philox call each).
  __device__ __forceinline__ bool kept(unsigned int bh, int i, int j) const {
    return !CF_DROPOUT || cf_dropout_bits(d, bh, i, j) >= d.threshold;
  }
  // The kept flags of NT fragments side by side (fragment t: columns c0 + 8t, + 1), bit
  // 4t + e for element e. A loop the compiler keeps rolled: one Philox chain at a time in
  // registers, where NT unrolled chains side by side spilled the Hopper kernels.
  template <int NT, bool KEYS_AS_ROWS = false>
  __device__ __forceinline__ unsigned long long keep_bits(unsigned int bh, int r0,
                                                          int c0) const {
    static_assert(NT <= 16, "64 bits: 16 fragments of 4");
    if (!CF_DROPOUT) return ~0ull;
    unsigned long long bits = 0;
#pragma unroll 1
    for (int t = 0; t < NT; ++t) {
      bool keep[4];
      cf_dropout_keep4_rows<KEYS_AS_ROWS>(d, bh, r0, c0 + 8 * t, keep);
      const unsigned int four = keep[0] | keep[1] << 1 | keep[2] << 2 | keep[3] << 3;
      bits |= (unsigned long long)four << (4 * t);
    }
    return bits;
  }
  // x Z / (1 - p) for an element kept or not: the backward's dV operand (x = P) and its dP
  // in dS = P (dP Z / (1 - p) - delta). x itself without CF_DROPOUT.
  __device__ __forceinline__ float apply(bool kept, float x) const {
    return !CF_DROPOUT ? x : kept ? x * scale_ : 0.f;
  }
  // Element e of fragment t in keep_bits' word.
  __device__ __forceinline__ static bool bit(unsigned long long bits, int t, int e) {
    return (bits >> (4 * t + e)) & 1;
  }
  // P of NT fragments in place (rows = queries r0, r0 + 8; fragment t: keys c0 + 8t, + 1):
  // the dropped elements become 0, the kept ones keep their value (the forward scales O once,
  // at the end).
  template <int NT>
  __device__ __forceinline__ void drop_p(float (&p)[NT][4], unsigned int bh, int r0,
                                         int c0) const {
    if (!CF_DROPOUT) return;
    const unsigned long long bits = keep_bits<NT>(bh, r0, c0);
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[t][e] = bit(bits, t, e) ? p[t][e] : 0.f;
  }
};

// Test entries (compiled by tests/test_dropout_device.py): bits[n] for element n of a
// (batch, heads, rows, cols) grid, row-major; keep4[n] the fragment form for a grid of
// `rows` queries x `cols` keys, one warp per 16 x 8 piece, queries as fragment rows (rows % 16
// == 0, cols % 8 == 0) or keys (cols % 16 == 0, rows % 8 == 0), written query-major.
#ifdef CF_PHILOX_TEST
extern "C" __global__ void cf_philox_test_bits(unsigned int* bits, int batch, int heads, int rows,
                                               int cols, unsigned int seed_lo,
                                               unsigned int seed_hi, unsigned int offset) {
  const long long n = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const long long total = (long long)batch * heads * rows * cols;
  if (n >= total) return;
  const unsigned int j = n % cols, i = (n / cols) % rows;
  const unsigned int bh = (unsigned int)(n / ((long long)cols * rows));  // b * heads + h
  const cf_dropout d{seed_lo, seed_hi, offset, 0u};
  bits[n] = cf_dropout_bits(d, bh, i, j);
}

extern "C" __global__ void cf_philox_test_keep4(unsigned char* keep, int rows, int cols,
                                                unsigned int seed_lo, unsigned int seed_hi,
                                                unsigned int offset, unsigned int threshold,
                                                int keys_as_rows) {
  // blockIdx.x = a 16 x 8 piece of the fragment grid (16 fragment rows: queries, or keys
  // with keys_as_rows), blockIdx.y = b * heads + h; 32 threads; keep is query-major
  const int frag_cols = keys_as_rows ? rows : cols;
  const unsigned int row0 = (blockIdx.x / (frag_cols / 8)) * 16;
  const unsigned int col0 = (blockIdx.x % (frag_cols / 8)) * 8;
  const unsigned int g = threadIdx.x / 4, t = threadIdx.x % 4;
  const unsigned int r0 = row0 + g, c0 = col0 + 2 * t;
  const cf_dropout d{seed_lo, seed_hi, offset, threshold};
  bool k[4];
  if (keys_as_rows) cf_dropout_keep4_rows<true>(d, blockIdx.y, r0, c0, k);
  else cf_dropout_keep4_rows<false>(d, blockIdx.y, r0, c0, k);
  unsigned char* base = keep + (long long)blockIdx.y * rows * cols;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const unsigned int r = r0 + 8 * (e >> 1), c = c0 + (e & 1);  // fragment row, column
    base[keys_as_rows ? c * cols + r : r * cols + c] = k[e];
  }
}
#endif

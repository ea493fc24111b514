// cf_fwd.cuh -- building blocks of the 16-bit forward kernel (flash_fwd.cu): swizzled tile
// loads, the warp-level S = Q K^T and O += P V products on tensor cores, masking, the
// online-softmax update and the O epilogue.
//
// Macro-free on purpose: every shape is a template argument, so a later kernel (decode,
// split-KV) can reuse these with its own tiles. Conventions, for every helper:
// - A tile in shared memory holds rows of CHUNKS 16-byte chunks (CHUNKS = head_dim / 8), no
//   padding; chunk c of row r sits at swizzle_chunk<CHUNKS>(r, c) (cf_common.cuh). The
//   swizzle depends only on r % 8, so any band of rows starting at a multiple of 8 can be
//   addressed with band-relative row numbers.
// - A warp owns a band of 16 query rows. In the mma C layout (lane = 4 * group + tig) a thread
//   holds rows `group` (index 0 of [2] arrays, C elements 0, 1) and `group + 8` (index 1,
//   C elements 2, 3); S n-tile t holds keys 8t + 2tig, 8t + 2tig + 1.
// - Scores and the running max m_i are in log2 units (scores * scale_log2).
#pragma once
#include "cf_common.cuh"

#if CF_DTYPE != 2

// -- global -> shared: ROWS x CHUNKS chunks, swizzled, zero-filled past the edges -------------
// Thread `tid` of THREADS copies chunks tid, tid + THREADS, ... (consecutive threads take
// consecutive chunks of a row: coalesced). Rows >= rows_valid and columns >= head_dim become
// zeros; their (unread) source address falls back to `g`, the tile's row 0, which the caller
// guarantees is a real row (rows_valid >= 1).
template <int ROWS, int CHUNKS, int THREADS>
__device__ __forceinline__ void load_tile_async(unsigned char* tile, const elem_t* g,
                                                cf_i64 stride_row, int rows_valid, int head_dim,
                                                int tid) {
  constexpr int kTotal = ROWS * CHUNKS;
  constexpr int kIters = (kTotal + THREADS - 1) / THREADS;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int i = tid + it * THREADS;
    if (kTotal % THREADS == 0 || i < kTotal) {
      int row, chunk;
      if (THREADS % CHUNKS == 0) {  // a thread keeps its column: no division per chunk
        row = tid / CHUNKS + it * (THREADS / CHUNKS);
        chunk = tid % CHUNKS;
      } else {
        row = i / CHUNKS;
        chunk = i % CHUNKS;
      }
      const bool valid = row < rows_valid && chunk * 8 < head_dim;
      const elem_t* src = valid ? g + row * stride_row + chunk * 8 : g;
      cp_async_16(tile + swizzle_chunk<CHUNKS>(row, chunk) * 16, src, valid);
    }
  }
}

// -- per-lane ldmatrix addressing -------------------------------------------------------------
// Every ldmatrix_x4 here reads a 16 x 16 block (16 rows of a band, 2 chunks 2c and 2c + 1)
// with one lane mapping: lane L gives row (L & 15), chunk 2c + (L >> 4), so the 4 registers
// hold the 8x8 matrices
//   r0 = (rows 0-7, chunk 2c)   r1 = (rows 8-15, chunk 2c)
//   r2 = (rows 0-7, chunk 2c+1) r3 = (rows 8-15, chunk 2c+1).
// The swizzled chunk (2c + hi) ^ key(row) equals (2c & ~(G-1)) + (((2c & (G-1)) | hi) ^ key)
// for the swizzle group G (8 or 4 chunks), so a lane needs only G/2 precomputed offsets;
// the compile-time part (2c & ~(G-1)) is folded into the address by the unrolled loops.
template <int CHUNKS>
struct LdsmLane {
  static constexpr int kGroup = (CHUNKS % 8 == 0) ? 8 : 4;  // swizzle group (chunks)
  static constexpr int kRowBytes = CHUNKS * 16;
  int off[kGroup / 2];  // byte offset of (row L & 15, pair index i) from the band start

  __device__ __forceinline__ explicit LdsmLane(int lane) {
    const int row = lane & 15, hi = lane >> 4;
    const int key = (kGroup == 8) ? (row & 7) : ((row >> 1) & 3);  // as in swizzle_chunk
#pragma unroll
    for (int i = 0; i < kGroup / 2; ++i) off[i] = row * kRowBytes + (((2 * i) | hi) ^ key) * 16;
  }
  // Byte offset of this lane's address for chunk pair c (c a compile-time constant).
  __device__ __forceinline__ int operator()(int c) const {
    return ((2 * c) & ~(kGroup - 1)) * 16 + off[c % (kGroup / 2)];
  }
};

// -- Q fragments: the warp's 16 x (16 * KSTEPS) band as mma A operands --------------------------
template <int KSTEPS, int CHUNKS>
__device__ __forceinline__ void load_q_frags(cf_u32 (&qf)[KSTEPS][4], const unsigned char* q_band,
                                             const LdsmLane<CHUNKS>& ln) {
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    // r0..r3 = Q (rows 0-7, d 16kk..+7), (rows 8-15, 16kk..+7), (rows 0-7, 16kk+8..+15),
    // (rows 8-15, 16kk+8..+15) = A fragment a0..a3 of k-step kk.
    ldmatrix_x4(qf[kk], q_band + ln(kk));
  }
}

// -- S = Q K^T: 16 rows x (8 * NT) keys, fp32, C layout ------------------------------------------
// Q comes from registers (Q_REGS, qf[KSTEPS][4]) or is re-read from the band in shared memory
// each k-step (qf unused) to save KSTEPS * 4 registers at large head_dim.
template <int NT, int KSTEPS, bool Q_REGS, int CHUNKS, int QF>
__device__ __forceinline__ void warp_qk(float (&s)[NT][4], const cf_u32 (&qf)[QF][4],
                                        const unsigned char* q_band, const unsigned char* k_tile,
                                        const LdsmLane<CHUNKS>& ln) {
  static_assert(NT % 2 == 0, "key tiles are multiples of 16");
#pragma unroll
  for (int t = 0; t < NT; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    cf_u32 a[4];
    if (Q_REGS) {
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = qf[Q_REGS ? kk : 0][i];
    } else {
      ldmatrix_x4(a, q_band + ln(kk));  // A fragment a0..a3 of k-step kk, as in load_q_frags
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      // K rows are keys with head_dim contiguous, i.e. B (k = d, n = key) stored column-major,
      // so no .trans: r0 = (keys 16np+0-7, d 16kk..+7) = b0 of n-tile 2np,
      // r1 = (keys 16np+8-15, d 16kk..+7) = b0 of n-tile 2np+1, r2 = (keys 16np+0-7,
      // d 16kk+8..+15) = b1 of n-tile 2np, r3 = (keys 16np+8-15, d 16kk+8..+15) = b1 of 2np+1.
      cf_u32 b[4];
      ldmatrix_x4(b, k_tile + np * 16 * LdsmLane<CHUNKS>::kRowBytes + ln(kk));
      mma_16816(s[2 * np], a, b[0], b[2]);
      mma_16816(s[2 * np + 1], a, b[1], b[3]);
    }
  }
}

// -- O += P V: P (16 x 8 * NT, from the S registers) times V (8 * NT keys x 8 * DT dims) ---------
template <int NT, int DT, int CHUNKS>
__device__ __forceinline__ void warp_pv(float (&acc)[DT][4], const float (&p)[NT][4],
                                        const unsigned char* v_tile, const LdsmLane<CHUNKS>& ln) {
  static_assert(DT % 2 == 0, "head_dim buckets are multiples of 16");
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    // The C fragments of S n-tiles 2kk, 2kk+1 are exactly the A fragment of k-step kk:
    // a0 = (group, keys 16kk + 2tig..+1), a1 = (group+8, same), a2/a3 = the same 8 keys later.
    const cf_u32 a[4] = {pack2(p[2 * kk][0], p[2 * kk][1]), pack2(p[2 * kk][2], p[2 * kk][3]),
                         pack2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                         pack2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < DT / 2; ++dp) {
      // V rows are keys (= the k dimension) with d contiguous, so .trans: r0 = (keys 16kk+0-7,
      // d 16dp..+7)^T = b0 of n-tile 2dp, r1 = (keys 16kk+8-15, d 16dp..+7)^T = b1 of 2dp,
      // r2 = (keys 16kk+0-7, d 16dp+8..+15)^T = b0 of 2dp+1, r3 = (keys 16kk+8-15, ...)^T = b1.
      cf_u32 b[4];
      ldmatrix_x4_trans(b, v_tile + kk * 16 * LdsmLane<CHUNKS>::kRowBytes + ln(dp));
      mma_16816(acc[2 * dp], a, b[0], b[1]);
      mma_16816(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// -- scores to log2 units -----------------------------------------------------------------------
// Scaled before the max so that any sign of scale_log2 is handled; masking comes after.
template <int NT>
__device__ __forceinline__ void scale_scores(float (&s)[NT][4], float scale_log2) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[t][e] *= scale_log2;
}

// -- mask: a key is visible to row r iff key < lim[r] ----------------------------------------------
// `key0` is the key index of this thread's column 0 in n-tile 0 (tile start + 2 * tig);
// lim[r] = seqlen_k, or min(seqlen_k, row + seqlen_k - seqlen_q + 1) when causal.
template <int NT>
__device__ __forceinline__ void mask_scores(float (&s)[NT][4], int key0, const int (&lim)[2]) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int key = key0 + 8 * t + e;
      if (key >= lim[0]) s[t][e] = -CF_INF;
      if (key >= lim[1]) s[t][2 + e] = -CF_INF;
    }
}

// -- online softmax (FA-2 Alg. 1 lines 8-10), in place: s becomes P ---------------------------------
// m_new = max(m_i, rowmax(s)); P = exp2(s - m_new); l_i = l_i * exp2(m_i - m_new) + rowsum(P);
// acc *= exp2(m_i - m_new). m_i is identical across the 4 lanes of a row (quad_max); l_i is
// this lane's partial row sum (its 2 * NT columns), reduced across the quad once, at the end.
// A row with no visible key yet keeps m_new = -inf: 0 is then used as the subtraction base,
// so P = exp2(-inf) = 0 and the rescale factor is 0 instead of NaN.
template <int NT, int DT>
__device__ __forceinline__ void online_softmax(float (&s)[NT][4], float (&m_i)[2],
                                               float (&l_i)[2], float (&acc)[DT][4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float m_new = m_i[r];
#pragma unroll
    for (int t = 0; t < NT; ++t) m_new = fmaxf(m_new, fmaxf(s[t][2 * r], s[t][2 * r + 1]));
    m_new = quad_max(m_new);
    const float base = (m_new == -CF_INF) ? 0.f : m_new;
    const float alpha = fast_exp2(m_i[r] - base);  // 0 when m_i was -inf
    m_i[r] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      s[t][2 * r] = fast_exp2(s[t][2 * r] - base);
      s[t][2 * r + 1] = fast_exp2(s[t][2 * r + 1] - base);
      sum += s[t][2 * r] + s[t][2 * r + 1];
    }
    l_i[r] = l_i[r] * alpha + sum;
    // -- rescale acc by exp2(m_old - m_new)
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      acc[d][2 * r] *= alpha;
      acc[d][2 * r + 1] *= alpha;
    }
  }
}

// -- epilogue: O = acc * inv_l through the warp's own 16-row band of shared memory ---------------
// The band (the warp's Q rows, no longer read) is rewritten with the O values in the same
// swizzled layout, then read back as 16-byte chunks for coalesced 16-byte global stores of
// rows < rows_valid and columns < head_dim. Only this warp touches the band: __syncwarp
// orders the lanes' shared-memory accesses.
template <int DT, int CHUNKS>
__device__ __forceinline__ void store_o_band(elem_t* o_band, cf_i64 stride_om, int rows_valid,
                                             int head_dim, unsigned char* band,
                                             const float (&acc)[DT][4], const float (&inv_l)[2],
                                             int lane) {
  static_assert(DT == CHUNKS, "one C n-tile per 16-byte chunk");
  const int group = lane >> 2, tig = lane & 3;
  __syncwarp();  // every lane is past its last read of the band
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // C element (row group + 8r, cols 8dt + 2tig..+1): bytes 4tig..+3 of chunk dt
      const cf_u32 v = pack2(acc[dt][2 * r] * inv_l[r], acc[dt][2 * r + 1] * inv_l[r]);
      *reinterpret_cast<cf_u32*>(band + swizzle_chunk<CHUNKS>(group + 8 * r, dt) * 16 +
                                 4 * tig) = v;
    }
  __syncwarp();
#pragma unroll
  for (int it = 0; it < CHUNKS / 2; ++it) {  // 16 * CHUNKS chunks over 32 lanes
    const int i = lane + 32 * it;
    const int row = i / CHUNKS, chunk = i % CHUNKS;
    const uint4 v = *reinterpret_cast<const uint4*>(band + swizzle_chunk<CHUNKS>(row, chunk) * 16);
    if (row < rows_valid && chunk * 8 < head_dim)
      *reinterpret_cast<uint4*>(o_band + row * stride_om + chunk * 8) = v;
  }
}

#endif  // CF_DTYPE != 2

// cf_fwd.cuh -- building blocks of the 16-bit forward kernels (flash_fwd.cu, flash_fwd_sm90.cu):
// swizzled tile loads, the warp-level S = Q K^T and O += P V products on tensor cores, the
// query tile (the key tiles it visits, which of them are masked), the online-softmax update
// and the epilogue.
//
// Every shape is a template argument (the one tuning macro is CF_FWD_LDSM_AHEAD; the query
// tile and the epilogue follow the mask and modifier defines through cf_mask.cuh), so a later
// kernel (decode, split-KV) can reuse these with its own tiles. Conventions:
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
#include "cf_mask.cuh"
#include "cf_seq.cuh"

#if CF_DTYPE != 2

// -- shared-memory addressing ---------------------------------------------------------------------
// ldmatrix on 32-bit shared-space addresses. The compile-time parts of an address are added to
// a base that the compiler cannot see through (cf_opaque), so they stay `add`s that ptxas folds
// into the LDSM immediate; otherwise NVVM proves the bits disjoint, emits `or`, and every
// ldmatrix costs an extra integer instruction.
__device__ __forceinline__ cf_u32 cf_opaque(cf_u32 x) {
  asm("" : "+r"(x));
  return x;
}
// A 64-bit pointer computed once and kept in registers: without this the compiler recomputes
// the loaders' per-head pointers from the kernel parameters inside the K/V loop (~40 extra
// instructions per tile).
template <typename T>
__device__ __forceinline__ T* cf_pinned(T* p) {
  asm volatile("" : "+l"(p));
  return p;
}
__device__ __forceinline__ void ldsm_x4(cf_u32 (&r)[4], cf_u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(cf_u32 (&r)[4], cf_u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// ldmatrix fragments are requested this many (ldmatrix, 2 x mma) steps before their mma, so
// the ~30-cycle shared-memory latency overlaps tensor-core work of the same warp. (The mma
// and ldmatrix asm statements are volatile: their order in the code is their order in PTX.)
#ifndef CF_FWD_LDSM_AHEAD
#define CF_FWD_LDSM_AHEAD 2  // tuning knob, not part of the ABI
#endif
constexpr int kLdsmAhead = CF_FWD_LDSM_AHEAD;

// -- global -> shared: tiles of ROWS x CHUNKS 16-byte chunks, swizzled, zero-filled ---------------
// kTpr threads share a row: the largest power of two that divides CHUNKS and leaves at least
// 8 rows per pass (kTpr <= THREADS / 8), so 4 to 32. Each thread keeps the kPerRow columns
// c0 + kTpr * k and steps down kStep rows per pass; a warp reads whole 64..512-byte row
// segments (coalesced). Because kStep % 8 == 0, a thread's rows all share one swizzle key, and
// the swizzled chunk of column c0 + kTpr * k is kTpr * kRep * (k / kRep) + xo[k % kRep] with
// kRep = max(1, G / kTpr) per-thread offsets xo (G, the swizzle group, is 8 or 4 chunks; the
// XOR only touches the low log2(G) bits): destinations are compile-time offsets from one
// per-thread base, which keeps small blocks (1-2 warps copying many chunks each) from holding
// one address per chunk. The source pointer is computed once; a tile costs one 64-bit multiply.
template <int ROWS, int CHUNKS, int THREADS>
struct TileLoader {
  static constexpr int kPow2 = CHUNKS & -CHUNKS;
  static constexpr int kTpr = kPow2 < THREADS / 8 ? kPow2 : THREADS / 8;
  static constexpr int kGroup = (CHUNKS % 8 == 0) ? 8 : 4;
  static constexpr int kRep = kTpr >= kGroup ? 1 : kGroup / kTpr;
  static constexpr int kPerRow = CHUNKS / kTpr;
  static constexpr int kStep = THREADS / kTpr;
  static constexpr int kPasses = (ROWS + kStep - 1) / kStep;
  static constexpr int kRowBytes = CHUNKS * 16;
  static_assert(kTpr >= 4 && THREADS % kTpr == 0 && kStep % 8 == 0 && kPerRow % kRep == 0,
                "loader layout");

  const elem_t* src;       // row row0, column chunk c0, of row 0 of the tensor (this head)
  const elem_t* fallback;  // row 0 of the tensor: a mapped address for zero-fill copies
  cf_i64 stride;           // elements between rows
  int row0;
  cf_u32 dst[kRep];  // byte offset in a tile of (row0, swizzled column c0 + kTpr * r)
  unsigned col_ok;   // bit k: chunk c0 + kTpr * k starts below head_dim
  bool full_width;   // head_dim fills the whole tile row (block-uniform)

  __device__ __forceinline__ TileLoader(const elem_t* base, cf_i64 stride_row, int head_dim,
                                        int tid)
      : fallback(base), stride(stride_row), row0(tid / kTpr), col_ok(0),
        full_width(head_dim >= CHUNKS * 8) {
    const int c0 = tid % kTpr;
    const int key = (kGroup == 8) ? (row0 & 7) : ((row0 >> 1) & 3);  // as in swizzle_chunk
    src = cf_pinned(base + row0 * stride_row + c0 * 8);
    fallback = cf_pinned(fallback);
#pragma unroll
    for (int r = 0; r < kRep; ++r) dst[r] = (row0 * CHUNKS + ((c0 + kTpr * r) ^ key)) * 16;
#pragma unroll
    for (int k = 0; k < kPerRow; ++k) col_ok |= (unsigned)((c0 + kTpr * k) * 8 < head_dim) << k;
  }

  // Copies tensor rows first_row .. first_row + ROWS - 1 into `tile`; rows at or past
  // first_row + rows_valid and columns >= head_dim become zeros. The caller guarantees
  // that row 0 of the tensor exists (the fallback source of zero-fill copies).
  // A full tile (every row and column in range: all K/V tiles but the last when head_dim is
  // the bucket) takes the unpredicated path: each copy is one LDGSTS with immediate offsets.
  __device__ __forceinline__ void load(unsigned char* tile, int first_row, int rows_valid) const {
    const elem_t* g = src + first_row * stride;
    if (full_width && rows_valid >= ROWS) {
#pragma unroll
      for (int p = 0; p < kPasses; ++p) {
        if (ROWS % kStep == 0 || row0 + p * kStep < ROWS) {
#pragma unroll
          for (int k = 0; k < kPerRow; ++k) {
            const int fixed = (p * kStep * CHUNKS + kTpr * kRep * (k / kRep)) * 16;
            cp_async_16(tile + dst[k % kRep] + fixed, g + kTpr * k * 8, true);
          }
        }
        g += kStep * stride;
      }
      return;
    }
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int row = row0 + p * kStep;
      if (ROWS % kStep == 0 || row < ROWS) {
        const bool row_ok = row < rows_valid;
#pragma unroll
        for (int k = 0; k < kPerRow; ++k) {
          const bool valid = row_ok && ((col_ok >> k) & 1u);
          const int fixed = (p * kStep * CHUNKS + kTpr * kRep * (k / kRep)) * 16;
          cp_async_16(tile + dst[k % kRep] + fixed, valid ? g + kTpr * k * 8 : fallback, valid);
        }
      }
      g += kStep * stride;
    }
  }
};

// -- per-lane ldmatrix addressing -----------------------------------------------------------------
// Every ldmatrix_x4 here reads a 16 x 16 block: 16 rows of a band (a multiple of 8 from the
// tile start) and chunks 2c, 2c + 1. Lane L gives the address of one row and one of the two
// chunks (half = 0 or 1); two orders of the four 8x8 matrices are used:
//   ROW_MAJOR4 (Q as A, V as B with .trans): lane L -> row L & 15, half L >> 4:
//     r0 = (rows 0-7, chunk 2c) r1 = (rows 8-15, 2c) r2 = (rows 0-7, 2c+1) r3 = (rows 8-15, 2c+1)
//   !ROW_MAJOR4 (K as B, no .trans): lane L -> row (L & 7) + 8 (L >> 4), half (L >> 3) & 1:
//     r0 = (rows 0-7, chunk 2c) r1 = (rows 0-7, 2c+1) r2 = (rows 8-15, 2c) r3 = (rows 8-15, 2c+1)
// so that each mma's two B registers are adjacent (no register moves).
// The swizzled chunk (2c + half) ^ key(row) equals (2c & ~(G-1)) + (((2c & (G-1)) | half) ^ key)
// for the swizzle group G (8 or 4 chunks): a lane needs only G/2 offsets, off[c % (G/2)], and
// the rest, fixed(c) = (2c & ~(G-1)) * 16, is a compile-time constant in the unrolled loops.
template <int CHUNKS, bool ROW_MAJOR4>
struct LdsmLane {
  static constexpr int kGroup = (CHUNKS % 8 == 0) ? 8 : 4;  // swizzle group (chunks)
  static constexpr int kOffs = kGroup / 2;
  static constexpr int kRowBytes = CHUNKS * 16;
  cf_u32 off[kOffs];  // byte offset of (this lane's row, chunk pair i) from the band start

  __device__ __forceinline__ explicit LdsmLane(int lane) {
    const int row = ROW_MAJOR4 ? (lane & 15) : ((lane & 7) | ((lane >> 4) << 3));
    const int half = ROW_MAJOR4 ? (lane >> 4) : ((lane >> 3) & 1);
    const int key = (kGroup == 8) ? (row & 7) : ((row >> 1) & 3);  // as in swizzle_chunk
#pragma unroll
    for (int i = 0; i < kOffs; ++i)
      off[i] = cf_opaque(row * kRowBytes + (((2 * i) | half) ^ key) * 16);
  }
  static __device__ __forceinline__ cf_u32 fixed(int c) { return ((2 * c) & ~(kGroup - 1)) * 16; }
};

// -- Q fragments: the warp's 16 x (16 * KSTEPS) band as mma A operands ----------------------------
template <int KSTEPS, int CHUNKS>
__device__ __forceinline__ void load_q_frags(cf_u32 (&qf)[KSTEPS][4], cf_u32 q_band,
                                             const LdsmLane<CHUNKS, true>& ln) {
  typedef LdsmLane<CHUNKS, true> Lane;
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    // r0..r3 = Q (rows 0-7, d 16kk..+7), (rows 8-15, 16kk..+7), (rows 0-7, 16kk+8..+15),
    // (rows 8-15, 16kk+8..+15) = A fragment a0..a3 of k-step kk.
    ldsm_x4(qf[kk], q_band + ln.off[kk % Lane::kOffs] + Lane::fixed(kk));
  }
}

// -- S = Q K^T: 16 rows x (8 * NT) keys, fp32, C layout -------------------------------------------
// Q comes from registers (Q_REGS, qf[KSTEPS][4]) or is re-read from the band in shared memory
// each k-step (qf unused) to save KSTEPS * 4 registers at large head_dim. Steps x = kk * NP + np
// (k-step kk, key pair np) each take one K ldmatrix_x4 and two mma; loads run kLdsmAhead ahead.
template <int NT, int KSTEPS, bool Q_REGS, int CHUNKS, int QF>
__device__ __forceinline__ void warp_qk(float (&s)[NT][4], const cf_u32 (&qf)[QF][4],
                                        cf_u32 q_band, cf_u32 k_tile,
                                        const LdsmLane<CHUNKS, true>& lq,
                                        const LdsmLane<CHUNKS, false>& lk) {
  static_assert(NT % 2 == 0, "key tiles are multiples of 16");
  typedef LdsmLane<CHUNKS, true> LaneQ;
  typedef LdsmLane<CHUNKS, false> LaneK;
  constexpr int kNP = NT / 2, kSteps = KSTEPS * kNP;
  cf_u32 kb[LaneK::kOffs];
#pragma unroll
  for (int i = 0; i < LaneK::kOffs; ++i) kb[i] = cf_opaque(k_tile + lk.off[i]);
  cf_u32 a[KSTEPS][4];  // Q A fragments: copies of qf (Q_REGS) or re-read from shared memory
  cf_u32 b[kSteps][4];  // K B fragments; registers only while in flight
  if (Q_REGS) {
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) a[kk][i] = qf[Q_REGS ? kk : 0][i];
  }

  auto load_step = [&](int x) {
    const int kk = x / kNP, np = x % kNP;
    if (!Q_REGS && np == 0) {  // A fragment a0..a3 of k-step kk, as in load_q_frags
      ldsm_x4(a[kk], q_band + lq.off[kk % LaneQ::kOffs] + LaneQ::fixed(kk));
    }
    // K rows are keys with head_dim contiguous, i.e. B (k = d, n = key) stored column-major,
    // so no .trans: r0 = (keys 16np+0-7, d 16kk..+7) = b0 of n-tile 2np, r1 = (keys
    // 16np+0-7, d 16kk+8..+15) = b1 of n-tile 2np, r2 = (keys 16np+8-15, d 16kk..+7) = b0 of
    // n-tile 2np+1, r3 = (keys 16np+8-15, d 16kk+8..+15) = b1 of n-tile 2np+1.
    ldsm_x4(b[x], kb[kk % LaneK::kOffs] + np * 16 * LaneK::kRowBytes + LaneK::fixed(kk));
  };

#pragma unroll
  for (int t = 0; t < NT; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
  for (int x = 0; x < kLdsmAhead && x < kSteps; ++x) load_step(x);
#pragma unroll
  for (int x = 0; x < kSteps; ++x) {
    if (x + kLdsmAhead < kSteps) load_step(x + kLdsmAhead);
    const int kk = x / kNP, np = x % kNP;
    mma_16816(s[2 * np], a[kk], b[x][0], b[x][1]);
    mma_16816(s[2 * np + 1], a[kk], b[x][2], b[x][3]);
  }
}

// -- O += P V: P (16 x 8 * NT, from the S registers) times V (8 * NT keys x 8 * DT dims) ----------
// Steps x = kk * DP + dp (k-step kk of 16 keys, d pair dp) each take one V ldmatrix_x4 and
// two mma; loads run kLdsmAhead ahead.
template <int NT, int DT, int CHUNKS>
__device__ __forceinline__ void warp_pv(float (&acc)[DT][4], const float (&p)[NT][4],
                                        cf_u32 v_tile, const LdsmLane<CHUNKS, true>& lv) {
  static_assert(DT % 2 == 0, "head_dim buckets are multiples of 16");
  typedef LdsmLane<CHUNKS, true> Lane;
  constexpr int kDP = DT / 2, kSteps = (NT / 2) * kDP;
  cf_u32 vb[Lane::kOffs];
#pragma unroll
  for (int i = 0; i < Lane::kOffs; ++i) vb[i] = cf_opaque(v_tile + lv.off[i]);

  // The C fragments of S n-tiles 2kk, 2kk+1 are exactly the A fragment of k-step kk:
  // a0 = (group, keys 16kk + 2tig..+1), a1 = (group+8, same keys), a2 / a3 = keys + 8.
  cf_u32 a[NT / 2][4];
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    a[kk][0] = pack2(p[2 * kk][0], p[2 * kk][1]);
    a[kk][1] = pack2(p[2 * kk][2], p[2 * kk][3]);
    a[kk][2] = pack2(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[kk][3] = pack2(p[2 * kk + 1][2], p[2 * kk + 1][3]);
  }
  cf_u32 b[kSteps][4];  // V B fragments; registers only while in flight
  auto load_step = [&](int x) {
    const int kk = x / kDP, dp = x % kDP;
    // V rows are keys (= the k dimension) with d contiguous, so .trans: r0 = (keys 16kk+0-7,
    // d 16dp..+7)^T = b0 of n-tile 2dp, r1 = (keys 16kk+8-15, d 16dp..+7)^T = b1 of 2dp,
    // r2 = (keys 16kk+0-7, d 16dp+8..+15)^T = b0 of 2dp+1, r3 = (keys 16kk+8-15, ...)^T = b1.
    ldsm_x4_trans(b[x], vb[dp % Lane::kOffs] + kk * 16 * Lane::kRowBytes + Lane::fixed(dp));
  };
#pragma unroll
  for (int x = 0; x < kLdsmAhead && x < kSteps; ++x) load_step(x);
#pragma unroll
  for (int x = 0; x < kSteps; ++x) {
    if (x + kLdsmAhead < kSteps) load_step(x + kLdsmAhead);
    const int kk = x / kDP, dp = x % kDP;
    mma_16816(acc[2 * dp], a[kk], b[x][0], b[x][1]);
    mma_16816(acc[2 * dp + 1], a[kk], b[x][2], b[x][3]);
  }
}

// -- one query tile: the key tiles it visits, which of them are masked, this thread's rows -------
// Rows q0 .. q0 + BLOCK_M - 1 of one (batch entry, head), warp w owning rows 16w .. 16w + 15.
// The mainloop visits key tiles [tiles.begin, tiles.end) of BLOCK_N keys (key_tiles), last
// first. Keys [full_begin, full_end) are visible to every row: a tile inside them needs no mask.
template <int BLOCK_M, int BLOCK_N>
struct FwdQueryTile {
  SeqInfo seq;
  int h, q0, q_last;
  MaskPolicy mask;
  KeyTiles tiles;
  int full_end, full_begin;
  int row0, tig;  // this thread's rows: row0 and row0 + 8; its key columns: 2 * tig ..
  ScoreMods mods;

  // group = lane >> 2, tig = lane & 3 (the C layout).
  __device__ __forceinline__ FwdQueryTile(const SeqInfo& seq_, int b, int h_, int q0_, int warp,
                                          int group, int tig_, CF_MOD_PARAMS)
      : seq(seq_), h(h_), q0(q0_), q_last(min(q0_ + BLOCK_M, seq_.seqlen_q) - 1),
        mask(seq_.seqlen_q, seq_.seqlen_k, window_left, window_right),
        tiles(key_tiles<BLOCK_N>(mask, q0, q_last)),
        full_end(mask.key_end(q0)), full_begin(mask.key_begin(q_last)),
        row0(q0 + warp * 16 + group), tig(tig_),
        mods(CF_MOD_ARGS, b, h_, seq_.seqlen_q, seq_.seqlen_k) {}

  __device__ __forceinline__ int n_tiles() const { return tiles.end - tiles.begin; }
  // Key tile j straddles an edge of the visible keys.
  __device__ __forceinline__ bool needs_mask(int j) const {
    return (j + 1) * BLOCK_N > full_end || (CF_LOCAL && j * BLOCK_N < full_begin);
  }
  // The raw scores of key tile j (C layout): modified, then masked where needed. rows: the
  // caller's RowBounds(mask, row0), kept out of this struct: its arrays, indexed in loops not
  // yet unrolled, would keep the whole struct in memory until late and change the code.
  // Returns the rows' offsets (RowOffsets), for softmax_rows.
  template <int NT>
  __device__ __forceinline__ RowOffsets modify_and_mask(float (&s)[NT][4], int j,
                                                        const RowBounds& rows) const {
    const RowOffsets off = modify_s(s, mods, row0, j * BLOCK_N + 2 * tig);
    if (needs_mask(j)) mask_s(s, j * BLOCK_N + 2 * tig, rows);
    // a literal without ALiBi: the PTX of those kernels stays as measured
    return CF_ALIBI ? off : RowOffsets{{0.f, 0.f}};
  }
};

// The softmax state of this thread's two rows before the first key tile.
template <int DT>
__device__ __forceinline__ void init_rows(float (&acc)[DT][4], float (&m_i)[2], float (&l_i)[2]) {
#pragma unroll
  for (int d = 0; d < DT; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
  m_i[0] = -CF_INF;
  m_i[1] = -CF_INF;
  l_i[0] = 0.f;
  l_i[1] = 0.f;
}

// -- online softmax (FA-2 Alg. 1 lines 8-10), in place: raw scores S become P ---------------------
// In log2 units, s = S * scale_log2:
//   m_new = max(m_i, rowmax(s)); P = exp2(s - m_new); l_i = l_i * exp2(m_i - m_new) + rowsum(P);
//   acc *= exp2(m_i - m_new).
// As in FlashAttention-2 the max is taken on the raw scores and scaled once, and s - m_new is
// one FFMA (S * scale_log2 - m_new): this needs scale_log2 > 0 (the host guarantees it).
// m_i is identical across the 4 lanes of a row (quad_max); l_i is this lane's partial row sum
// (its 2 * NT columns), reduced across the quad once, at the end. A row with no visible key
// yet keeps m_new = -inf: 0 is then used as the subtraction base, so P = exp2(-inf) = 0 and
// the rescale factor is 0 instead of NaN.
// The acc rescale is unconditional: skipping it behind a warp vote when every factor is 1
// measured ~10% slower on an H100 (the branch splits the FMULs from the P V mma stream).
//
// CF_EXP2_FMA (0-8): of every 8 scores of a row in a lane (4 n-tiles), this many take
// fma_exp2 (FMA pipe) instead of the SFU's ex2 (cf_common.cuh says when that pays).
//
// softmax_rows: the row update, in place (S becomes P); returns the rescale factors in alpha.
// With ALiBi the scores are s + off.v[r] (modify_s): the offset joins this lane's row max
// before the quad's max, and the exponent's FFMA as its addend, off * scale_log2 - base.
template <int NT>
__device__ __forceinline__ void softmax_rows(float (&s)[NT][4], float (&m_i)[2], float (&l_i)[2],
                                             float (&alpha)[2], float scale_log2,
                                             const RowOffsets& off) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -CF_INF;
#pragma unroll
    for (int t = 0; t < NT; ++t) mx = fmaxf(mx, fmaxf(s[t][2 * r], s[t][2 * r + 1]));
    if (CF_ALIBI) mx += off.v[r];  // -inf stays -inf
    const float m_new = fmaxf(m_i[r], quad_max(mx) * scale_log2);
    const float base = (m_new == -CF_INF) ? 0.f : m_new;
    alpha[r] = fast_exp2(m_i[r] - base);  // 0 when m_i was -inf
    m_i[r] = m_new;
    const float shift = CF_ALIBI ? fmaf(off.v[r], scale_log2, -base) : -base;
    float sum = 0.f;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#if CF_EXP2_FMA  // (its own loop: the measured kernels' PTX stays as it was)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float x = fmaf(s[t][2 * r + c], scale_log2, shift);
        s[t][2 * r + c] = ((t % 4) * 2 + c < CF_EXP2_FMA) ? fma_exp2(x) : fast_exp2(x);
      }
#else
      s[t][2 * r] = fast_exp2(fmaf(s[t][2 * r], scale_log2, shift));
      s[t][2 * r + 1] = fast_exp2(fmaf(s[t][2 * r + 1], scale_log2, shift));
#endif
      sum += s[t][2 * r] + s[t][2 * r + 1];
    }
    l_i[r] = l_i[r] * alpha[r] + sum;
  }
}

// rescale_acc: acc *= exp2(m_old - m_new), row by row.
template <int DT>
__device__ __forceinline__ void rescale_acc(float (&acc)[DT][4], const float (&alpha)[2]) {
#pragma unroll
  for (int d = 0; d < DT; ++d) {
    acc[d][0] *= alpha[0];
    acc[d][1] *= alpha[0];
    acc[d][2] *= alpha[1];
    acc[d][3] *= alpha[1];
  }
}

template <int NT, int DT>
__device__ __forceinline__ void online_softmax(float (&s)[NT][4], float (&m_i)[2],
                                               float (&l_i)[2], float (&acc)[DT][4],
                                               float scale_log2, const RowOffsets& off) {
  float alpha[2];
  softmax_rows(s, m_i, l_i, alpha, scale_log2, off);
  rescale_acc(acc, alpha);
}

// -- epilogue: O = acc * inv_l through the warp's own 16-row band of shared memory ----------------
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

// The same band stored from the C fragments: a thread's two 16-bit values of a row are one
// 4-byte store, a warp's store covers 8 rows x 16 bytes. For a kernel whose Q tile already
// holds the next tile's rows (the persistent forward).
template <int DT>
__device__ __forceinline__ void store_o_fragments(elem_t* o_band, cf_i64 stride_om,
                                                  int rows_valid, int head_dim,
                                                  const float (&acc)[DT][4],
                                                  const float (&inv_l)[2], int lane) {
  const int group = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (group + 8 * r >= rows_valid) continue;
    elem_t* row = o_band + (group + 8 * r) * stride_om + 2 * tig;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      if (8 * dt + 2 * tig < head_dim)
        *reinterpret_cast<cf_u32*>(row + 8 * dt) =
            pack2(acc[dt][2 * r] * inv_l[r], acc[dt][2 * r + 1] * inv_l[r]);
  }
}

// -- the forward's epilogue: O = acc / l, and m and l per row ------------------------------------
// o: row 0 of the tensor. s_q: the Q tile, no longer read by any warp; the warp's own 16 rows
// stage its O band (store_o_band). With sinks the sink joins m and l first (fold_sink). A row
// that saw no key (l == 0 exactly) gets o = 0; a NaN l (from a NaN score the row sees) gives a
// NaN o, as in cpu.py. o_scale: dropout's 1 / (1 - p) (m and l stay those of the undropped P),
// else 1.
// STAGED = false: O goes from the registers to global memory without s_q (store_o_fragments).
template <int DT, int CHUNKS, bool STAGED = true, int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ void store_forward_epilogue(
    const FwdQueryTile<BLOCK_M, BLOCK_N>& tile, float (&acc)[DT][4], float (&m_i)[2],
    const float (&l_i)[2], const float* sinks, elem_t* o, long long stride_ob,
    long long stride_om, long long stride_oh, float* m_out, float* l_out, int head_dim,
    unsigned char* s_q, int warp, int lane, float o_scale) {
  float l_row[2], inv_l[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) l_row[r] = quad_sum(l_i[r]);
  if (CF_SINKS) fold_sink(m_i, l_row, acc, sinks[tile.h]);
#pragma unroll
  for (int r = 0; r < 2; ++r) inv_l[r] = l_row[r] != 0.f ? __frcp_rn(l_row[r]) * o_scale : 0.f;
  const int band_q0 = tile.q0 + warp * 16;
  unsigned char* band = s_q + warp * 16 * CHUNKS * 16;
  const cf_i64 o_band = tile.seq.q_offset(stride_ob, stride_om) + (cf_i64)band_q0 * stride_om;
  if constexpr (STAGED) {
    store_o_band<DT, CHUNKS>(o + o_band + tile.h * stride_oh, stride_om,
                             tile.seq.seqlen_q - band_q0, head_dim, band, acc, inv_l, lane);
  } else {
    store_o_fragments<DT>(o + o_band + tile.h * stride_oh, stride_om,
                          tile.seq.seqlen_q - band_q0, head_dim, acc, inv_l, lane);
  }
  if (tile.tig == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = tile.row0 + 8 * r;
      if (row < tile.seq.seqlen_q) {
        const cf_i64 idx = tile.seq.stats(tile.h) + row;
        m_out[idx] = m_i[r] * CF_LN2;  // log2 units -> natural log; -inf stays -inf
        l_out[idx] = l_row[r];
      }
    }
  }
}

#endif  // CF_DTYPE != 2

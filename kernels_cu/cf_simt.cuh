// cf_simt.cuh -- float32 SIMT (FFMA) building blocks of the exact-fp32 kernels
// (flash_fwd_fp32.cu, flash_bwd_fp32.cu, flash_bwd_dq_fp32.cu).
//
// TF32 tensor cores do not meet the fp32 error rule, so the fp32 path multiplies with plain
// FFMA out of shared memory, register-blocked like a SIMT SGEMM:
//   * every tile (Q, K, V, dO of width CF_HEAD_DIM; P, dS, P^T, dS^T) lives in shared memory
//     row-major with a row stride of its width + 4 floats (`simt_ld`); the extra 16 bytes put
//     8 consecutive rows in 8 different 16-byte bank groups, so float4 reads of 8 different
//     rows are conflict-free;
//   * a product tile is split over the threads by a `SimtTile` layout (below); a thread owns
//     a TM x TN block of outputs whose rows and columns are strided across the lanes;
//   * two products cover every GEMM of attention:
//       simt_mm_nt  acc[i][j]      += sum_k A[row_i][k] * B[col_j][k]      (S = Q K^T, dP = dO V^T)
//       simt_mm_nn  acc[i][4q + e] += sum_k A[row_i][k] * B[k][4 chunk_q + e]  (O += P V, dQ, dK, dV)
//     A is always read as float4 along k, B as float4 along k (nt) or along columns (nn);
//   * accuracy: sums are two-level everywhere (blocks of 8 products inside a dot over head_dim,
//     per-tile sums merged into the accumulators across tiles: simt_mm_nn_merge), because one
//     running fp32 sum over head_dim or over thousands of keys is several times less accurate
//     than the blocked sums of a BLAS "naive" reference, which the error rule compares against;
//   * exp2 is `simt_exp2`, a < 1 ulp software exp2 (CUDA's exp2f is ex2.approx.f32, 2 ulp).
// Shared-memory pointers handed to these helpers must point into the kernel's dynamic shared
// memory (the helpers are force-inlined, so the compiler emits LDS).
#pragma once

// The float32 files include this header first, so a standalone compile of one is float32
// (cf_config.cuh's default is bfloat16).
#ifndef CF_DTYPE
#define CF_DTYPE 2
#endif
#include "cf_common.cuh"  // and cf_config.cuh
#include "cf_mask.cuh"
#include "cf_seq.cuh"
#include "cf_tile_order.cuh"

static_assert(CF_DTYPE == 2, "the SIMT kernels are the float32 ones (CF_DTYPE = 2)");
static_assert(CF_STAGES == 1, "the float32 kernels take only CF_STAGES = 1");
static_assert(CF_HEAD_DIM % 32 == 0 && CF_HEAD_DIM >= 32 && CF_HEAD_DIM <= 256,
              "CF_HEAD_DIM must be a multiple of 32 in [32, 256]");

#ifndef CF_FP32_MIN_BLOCKS
#define CF_FP32_MIN_BLOCKS 1  // __launch_bounds__ min blocks per SM of the fp32 kernels
#endif
#ifndef CF_SIMT_UNROLL_NT
#define CF_SIMT_UNROLL_NT 1
#endif
#ifndef CF_SIMT_UNROLL_NN
#define CF_SIMT_UNROLL_NN 1
#endif
// Unroll factors of the k loops (enumerators: nvcc does not macro-expand #pragma unroll).
enum : int { SIMT_UNROLL_NT = CF_SIMT_UNROLL_NT, SIMT_UNROLL_NN = CF_SIMT_UNROLL_NN };

// Row stride (floats) in shared memory of a tile `width` floats wide (width a multiple of 8):
// 4 floats of padding keep rows 16-byte aligned and put 8 consecutive rows in 8 different
// 16-byte bank groups. Every fp32 shared-memory formula is built from this.
__host__ __device__ constexpr int simt_ld(int width) { return width + 4; }

// The knobs every float32 kernel is built on; each kernel's namespace adds its own.
namespace simt_cfg {
enum : int {
  BM = CF_BLOCK_M,
  BN = CF_BLOCK_N,
  D = CF_HEAD_DIM,
  WARPS = CF_WARPS,
  NT = 32 * WARPS,
  LDH = simt_ld(D),  // row stride of the head_dim-wide tiles (Q, K, V, dO)
};
}  // namespace simt_cfg

// -- thread layout of a product tile ------------------------------------------------------
// A tile of ROWS x COLS outputs (COLS counted in UNITs: scalars for S-shaped tiles, float4
// chunks for head_dim-shaped ones) computed by WARPS warps. Warps form a WR x WC grid (WR
// along rows), the lanes of a warp an RL x CL grid (lane = rl * CL + cl). The thread
// (wr, wc, rl, cl) owns
//   rows  row0 + RL * i,  i < TM,   row0 = wr * (ROWS / WR) + rl
//   cols  col0 + CL * j,  j < TN,   col0 = wc * (COLS / WC) + cl
// so every output belongs to exactly one thread. The layout is chosen at compile time to
// minimise shared-memory loads per k step (TM + UNIT * TN float4 loads for 4 * TM * TN * UNIT
// FFMA); FIXED_RL > 0 forces all warps onto rows with RL = FIXED_RL (the forward pass needs
// a row's lanes inside one warp for its shuffle reductions).
__host__ __device__ constexpr int simt_layout_cost(int rows, int cols, int unit, int warps, int wr, int rl) {
  return (warps % wr != 0 || rows % (wr * rl) != 0 || cols % ((warps / wr) * (32 / rl)) != 0)
             ? -1
             : rows / (wr * rl) + unit * (cols / ((warps / wr) * (32 / rl)));
}
// Returns wr * 64 + rl of the cheapest layout (ties: more warps on rows, then the first RL
// in the order 4, 8, 2, 16, 1, 32, which keeps >= 8 lanes on columns when it can), 0 if none.
__host__ __device__ constexpr int simt_pick_layout(int rows, int cols, int unit, int warps, int fixed_rl) {
  int best = 0, best_cost = 1 << 30;
  const int rls[6] = {4, 8, 2, 16, 1, 32};
  for (int wr = warps; wr >= 1; --wr) {
    if (fixed_rl > 0 && wr != warps) continue;
    for (int t = 0; t < 6; ++t) {
      const int rl = rls[t];
      if (fixed_rl > 0 && rl != fixed_rl) continue;
      const int c = simt_layout_cost(rows, cols, unit, warps, wr, rl);
      if (c >= 0 && c < best_cost) {
        best_cost = c;
        best = wr * 64 + rl;
      }
    }
  }
  return best;
}

template <int ROWS, int COLS, int UNIT, int WARPS, int FIXED_RL = 0>
struct SimtTile {
  enum : int { CODE = simt_pick_layout(ROWS, COLS, UNIT, WARPS, FIXED_RL) };
  static_assert(CODE != 0, "no SIMT thread layout fits this tile: check the tile-size constraints");
  enum : int {
    WR = CODE / 64,
    RL = CODE % 64,
    WC = WARPS / WR,
    CL = 32 / RL,
    TM = ROWS / (WR * RL),  // rows per thread
    TN = COLS / (WC * CL),  // columns (UNITs) per thread
  };
  __device__ __forceinline__ static int row0(int warp, int lane) {
    return (warp / WC) * (ROWS / WR) + lane / CL;
  }
  __device__ __forceinline__ static int col0(int warp, int lane) {
    return (warp % WC) * (COLS / WC) + lane % CL;
  }
};

// -- products out of shared memory ----------------------------------------------------------
__device__ __forceinline__ float simt_f4_at(const float4& v, int e) {
  return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w;  // e is a constant after unrolling
}

// acc[i][j] += sum_{k < kdim} a[i * a_step + k] * b[j * b_step + k]; kdim a multiple of 8.
// `a` points at the thread's row 0 of A, `b` at its column 0 of B (a row of the B tile).
// Accuracy: every 8 consecutive products are summed on their own and then added to acc
// (two-level summation), so the rounding error grows like (8 + kdim / 8) ulp instead of the
// kdim ulp of one running sum; this keeps S and dP as accurate as a blocked BLAS dot.
template <int TM, int TN>
__device__ __forceinline__ void simt_mm_nt(float (&acc)[TM][TN], const float* a, int a_step,
                                           const float* b, int b_step, int kdim) {
#pragma unroll SIMT_UNROLL_NT
  for (int k = 0; k < kdim; k += 8) {
    float t[TM][TN];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float4 av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i)
        av[i] = *reinterpret_cast<const float4*>(a + i * a_step + k + 4 * half);
#pragma unroll
      for (int j = 0; j < TN; ++j)
        bv[j] = *reinterpret_cast<const float4*>(b + j * b_step + k + 4 * half);
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          t[i][j] = half == 0 ? av[i].x * bv[j].x : fmaf(av[i].x, bv[j].x, t[i][j]);
          t[i][j] = fmaf(av[i].y, bv[j].y, t[i][j]);
          t[i][j] = fmaf(av[i].z, bv[j].z, t[i][j]);
          t[i][j] = fmaf(av[i].w, bv[j].w, t[i][j]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] += t[i][j];
  }
}

// acc[i][4q + e] += sum_{k < KDIM} a[i * a_step + k] * b[k * ldb + q * b_step + e]; KDIM % 4 == 0.
// `a` points at the thread's row 0 of A, `b` at its first float4 column chunk of B's row 0.
// One running sum per output: use it on a fresh (zeroed) acc, or through simt_mm_nn_merge.
template <int TM, int TQ, int KDIM>
__device__ __forceinline__ void simt_mm_nn(float (&acc)[TM][4 * TQ], const float* a, int a_step,
                                           const float* b, int ldb, int b_step) {
  static_assert(KDIM % 4 == 0, "the reduction length must be a multiple of 4");
#pragma unroll SIMT_UNROLL_NN
  for (int k = 0; k < KDIM; k += 4) {
    float4 av[TM];
#pragma unroll
    for (int i = 0; i < TM; ++i) av[i] = *reinterpret_cast<const float4*>(a + i * a_step + k);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      float4 bv[TQ];
#pragma unroll
      for (int q = 0; q < TQ; ++q)
        bv[q] = *reinterpret_cast<const float4*>(b + (k + kk) * ldb + q * b_step);
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const float ai = simt_f4_at(av[i], kk);
#pragma unroll
        for (int q = 0; q < TQ; ++q) {
          acc[i][4 * q + 0] = fmaf(ai, bv[q].x, acc[i][4 * q + 0]);
          acc[i][4 * q + 1] = fmaf(ai, bv[q].y, acc[i][4 * q + 1]);
          acc[i][4 * q + 2] = fmaf(ai, bv[q].z, acc[i][4 * q + 2]);
          acc[i][4 * q + 3] = fmaf(ai, bv[q].w, acc[i][4 * q + 3]);
        }
      }
    }
  }
}

// Largest divisor qp of tq with tm * 4 * qp <= max_regs (at least 1): the float4 chunks that
// simt_mm_nn_merge sums per pass.
__host__ __device__ constexpr int simt_pass_chunks(int tm, int tq, int max_regs) {
  int best = 1;
  for (int qp = 1; qp <= tq; ++qp)
    if (tq % qp == 0 && tm * 4 * qp <= max_regs) best = qp;
  return best;
}

// acc[i][4q + e] = acc[i][4q + e] * scale[i] (SCALED) + sum_{k < KDIM} a[i][k] * b[k][chunk q]
// with a, b as in simt_mm_nn. The product of one call (one tile) is summed in a fresh register
// block, QP chunks per pass, and merged into acc with one rounding: acc becomes a sum of
// per-tile sums (two-level summation), so its error no longer grows with the number of tiles
// (a single running sum over 4096 keys is ~3x less accurate than a blocked BLAS product).
// The A rows are re-read once per pass.
template <int TM, int TQ, int KDIM, int QP, bool SCALED>
__device__ __forceinline__ void simt_mm_nn_merge(float (&acc)[TM][4 * TQ], const float (&scale)[TM],
                                                 const float* a, int a_step, const float* b,
                                                 int ldb, int b_step) {
  static_assert(TQ % QP == 0, "passes must cover the chunks exactly");
#pragma unroll
  for (int q0 = 0; q0 < TQ; q0 += QP) {
    float t[TM][4 * QP];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int e = 0; e < 4 * QP; ++e) t[i][e] = 0.f;
    simt_mm_nn<TM, QP, KDIM>(t, a, a_step, b + q0 * b_step, ldb, b_step);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int e = 0; e < 4 * QP; ++e)
        acc[i][4 * q0 + e] = SCALED ? fmaf(acc[i][4 * q0 + e], scale[i], t[i][e])
                                    : acc[i][4 * q0 + e] + t[i][e];
  }
}

template <int TM, int TN>
__device__ __forceinline__ void simt_zero(float (&acc)[TM][TN]) {
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
}

// acc = A B^T on the thread's block of a Tile (S = Q K^T, dP = dO V^T): A and B are
// head_dim-wide tiles, row0 / col0 the thread's first row of A / of B.
template <class Tile, int D>
__device__ __forceinline__ void simt_mm_nt_tile(float (&acc)[Tile::TM][Tile::TN], const float* a,
                                                const float* b, int row0, int col0,
                                                int head_dim) {
  simt_zero(acc);
  simt_mm_nt<Tile::TM, Tile::TN>(acc, a + row0 * simt_ld(D), Tile::RL * simt_ld(D),
                                 b + col0 * simt_ld(D), Tile::CL * simt_ld(D), head_dim);
}

// -- global -> shared tile copy --------------------------------------------------------------
__host__ __device__ constexpr int simt_pow2_ceil(int x) { return x <= 1 ? 1 : 2 * simt_pow2_ceil((x + 1) / 2); }

// Copies rows [0, ROWS) x columns [0, HEAD_DIM) of a row-major global tile (`g` = its row 0,
// rows `g_stride` floats apart, columns contiguous) into shared memory (`s`, row stride `lds`)
// with cp.async, 16 bytes per request. Rows >= valid_rows and columns >= head_dim are
// zero-filled (head_dim is a multiple of 8, so a 4-float chunk is all in or all out); an
// out-of-range request reads nothing and points at `safe`, any mapped address. Commit the
// group yourself.
// Mapping: a row's chunks are padded to a power of two (CPR2); TPC consecutive threads cover
// one row's chunks (CITERS passes when CPR2 > NT), NT / TPC rows are copied per pass. Each
// thread keeps one column and walks rows, so few addresses stay live across the key loop.
template <int ROWS, int HEAD_DIM, int NT>
__device__ __forceinline__ void simt_load_tile(float* s, int lds, const float* g, cf_i64 g_stride,
                                               int valid_rows, int head_dim, const float* safe,
                                               int tid) {
  constexpr int CPR = HEAD_DIM / 4;  // 16-byte chunks per row
  constexpr int CPR2 = simt_pow2_ceil(CPR);
  constexpr int TPC = CPR2 < NT ? CPR2 : NT;  // threads along a row (both powers of two)
  constexpr int CITERS = CPR2 / TPC;
  constexpr int RSTEP = NT / TPC;  // rows per pass
  constexpr int RITERS = (ROWS + RSTEP - 1) / RSTEP;
  static_assert(NT % TPC == 0 && CPR2 % TPC == 0, "copy layout");
  const int c_first = tid % TPC, r_first = tid / TPC;
  const float* g_row = g + (cf_i64)r_first * g_stride;
  const cf_i64 g_step = RSTEP * g_stride;
#pragma unroll
  for (int ri = 0; ri < RITERS; ++ri, g_row += g_step) {
    const int r = r_first + ri * RSTEP;
    if (ROWS % RSTEP == 0 || r < ROWS) {
#pragma unroll
      for (int ci = 0; ci < CITERS; ++ci) {
        const int c = c_first + ci * TPC;
        if (CPR == CPR2 || c < CPR) {
          const bool valid = r < valid_rows && 4 * c < head_dim;
          cp_async_16(s + r * lds + 4 * c, valid ? g_row + 4 * c : safe, valid);
        }
      }
    }
  }
}

// One head of a (batch, seq, heads, head_dim) operand: row r at head + r * stride_m, rows
// [0, rows) in the sequence; `base` is the tensor (the address a zero-filling copy points at).
struct SimtRows {
  const float* head;
  const float* base;
  cf_i64 stride_m;
  int rows;
};
__device__ __forceinline__ SimtRows simt_q_rows(const float* t, const SeqInfo& seq,
                                                long long stride_b, long long stride_m,
                                                long long stride_h, int h) {
  return SimtRows{t + seq.q_offset(stride_b, stride_m) + h * stride_h, t, stride_m, seq.seqlen_q};
}
__device__ __forceinline__ SimtRows simt_k_rows(const float* t, const SeqInfo& seq,
                                                long long stride_b, long long stride_m,
                                                long long stride_h, int hk) {
  return SimtRows{t + seq.k_offset(stride_b, stride_m) + hk * stride_h, t, stride_m, seq.seqlen_k};
}

// Rows r0 .. r0 + ROWS - 1 of g into a head_dim-wide shared tile (simt_load_tile).
template <int ROWS, int D, int NT>
__device__ __forceinline__ void simt_load_rows(float* s, const SimtRows& g, int r0, int head_dim,
                                               int tid) {
  simt_load_tile<ROWS, D, NT>(s, simt_ld(D), g.head + (cf_i64)r0 * g.stride_m, g.stride_m,
                              g.rows - r0, head_dim, g.base, tid);
}

// -- accurate exp2 ---------------------------------------------------------------------------
// 2^x with < 1 ulp error over the whole float range (checked against float64 on 3.2M
// points, max 0.94 ulp), correct 0 / subnormal / inf results, NaN in -> NaN out.
// exp2(-inf) = +0, which masking relies on; exp2(0) = 1 exactly.
// x = j + f with j = rint(x), |f| <= 1/2; 2^f = 1 + f * poly(f) (degree-5 minimax fit of
// (2^f - 1) / f, approximation error 2e-9 relative); 2^j is applied as two exact powers of
// two so that subnormal results round once.
__device__ __forceinline__ float simt_exp2(float x) {
  x = x < -151.f ? -151.f : x;  // 2^-151 rounds to 0 (comparisons keep NaN)
  x = x > 129.f ? 129.f : x;    // 2^129 overflows to inf
  const float magic = 12582912.0f;  // 1.5 * 2^23: x + magic rounds x to an integer (ties to even)
  const float t = x + magic;
  const int j = __float_as_int(t) - __float_as_int(magic);
  const float f = x - (t - magic);  // exact, |f| <= 0.5
  float p = 1.5353362e-04f;
  p = fmaf(p, f, 1.3398875e-03f);
  p = fmaf(p, f, 9.6184369e-03f);
  p = fmaf(p, f, 5.5503324e-02f);
  p = fmaf(p, f, 2.4022648e-01f);
  p = fmaf(p, f, 6.9314718e-01f);
  p = fmaf(p, f, 1.0f);
  const int j1 = j >> 1, j2 = j - j1;  // both in [-76, 65]: normal powers of two
  return (p * __int_as_float((j1 + 127) << 23)) * __int_as_float((j2 + 127) << 23);
}

// -- kernel setup ----------------------------------------------------------------------------
// The kernel's dynamic shared memory, handed out in order; traps unless the launch gave it
// `bytes` (the kernel's formula).
struct SimtSmem {
  float* next;
  __device__ __forceinline__ explicit SimtSmem(cf_u32 bytes) {
    CF_REQUIRE_SMEM(bytes);
    extern __shared__ __align__(16) unsigned char smem[];
    next = reinterpret_cast<float*>(smem);
  }
  __device__ __forceinline__ float* take(int floats) {
    float* p = next;
    next += floats;
    return p;
  }
};

// A backward block's shared memory: the query tile (Q, dO: BM rows) and the key tile (K, V:
// BN rows) first, then what the kernel takes.
template <int BM, int BN, int D>
struct SimtBwdSmem : SimtSmem {
  float *q, *dout, *k, *v;
  __device__ __forceinline__ explicit SimtBwdSmem(cf_u32 bytes)
      : SimtSmem(bytes), q(take(BM * simt_ld(D))), dout(take(BM * simt_ld(D))),
        k(take(BN * simt_ld(D))), v(take(BN * simt_ld(D))) {}
};

// A block of the forward or the dQ pass: one query tile of one head. Grid (query tiles, heads,
// batch), the longest tile first when causal (cf_tile_order.cuh). It walks the kv head's K and
// V rows over the key tiles its rows see: n_tiles tiles of BN keys from key n_first.
template <int BM, int BN>
struct SimtQueryBlock {
  int m0, h, b, hk;
  SeqInfo seq;
  SimtRows k_rows, v_rows;
  MaskPolicy mask;
  KeyTiles tiles;
  KeptKeyTiles<BN> kept;  // under a block mask, the kept ones of tiles
  int n_tiles, n_first;
  ScoreMods mods;
  __device__ __forceinline__ SimtQueryBlock(int heads, int heads_per_kv, int max_q, int max_k,
                                            const float* k, long long stride_kb,
                                            long long stride_kn, long long stride_kh,
                                            const float* v, long long stride_vb,
                                            long long stride_vn, long long stride_vh,
                                            CF_MOD_PARAMS, CF_SEQ_PARAMS, const BlockMask& bm)
      : m0(query_tile_longest_first() * BM), h(blockIdx.y), b(blockIdx.z),
        hk(h / heads_per_kv),
        seq(b, heads, max_q, max_k, CF_SEQ_ARGS),
        k_rows(simt_k_rows(k, seq, stride_kb, stride_kn, stride_kh, hk)),
        v_rows(simt_k_rows(v, seq, stride_vb, stride_vn, stride_vh, hk)),
        mask(seq.seqlen_q, seq.seqlen_k, window_left, window_right),
        tiles(key_tiles<BN>(mask, m0, min(m0 + BM, seq.seqlen_q) - 1)),
        kept(bm, b, h, m0, tiles),
        n_tiles(kept.count()),
        n_first(tiles.begin * BN),
        mods(CF_MOD_ARGS, b, h, seq.seqlen_q, seq.seqlen_k) {}
  // A varlen tile past its sequence (the grid covers the longest one): the block exits.
  __device__ __forceinline__ bool idle() const { return CF_VARLEN && m0 >= seq.seqlen_q; }
};

// -- backward: P and dS of one score ---------------------------------------------------------
// lse2 and delta of query row r: +inf and 0 past seqlen_q (row_ok false), so P = dS = 0 there.
struct SimtRowStats {
  float lse2, delta;
};
__device__ __forceinline__ SimtRowStats simt_row_stats(const float* lse2_bh, const float* delta_bh,
                                                       int r, bool row_ok) {
  return SimtRowStats{row_ok ? lse2_bh[r] : CF_INF, row_ok ? delta_bh[r] : 0.f};
}

// P and dS of score x = q.k of query i, key j (seen: visible): P = exp2(x' * scale_log2 - lse2),
// x' with the score modifiers, or 0; dS = P * (dP - delta) * softcap'(x). The exponent is one
// FFMA and x the same simt_mm_nt sum as the forward's (flash_fwd_fp32.cu, softmax_tile, says
// why): at large logits a per-element difference between the two P is amplified in dQ.
// Masked keys take P = 0 by a select, so a NaN score a row does not see is never used.
// Dropout (docs/dropout.md; bh the Philox head): dS = P (dP Z / (1 - p) - delta), and the
// returned p, dV's operand, is P Z / (1 - p).
struct SimtPdS {
  float p, ds;
};
__device__ __forceinline__ SimtPdS simt_p_ds(float x, float dp, bool seen, int i, int j,
                                             const SimtRowStats& st, const ScoreMods& mods,
                                             float scale_log2, const Dropout& drop,
                                             unsigned int bh) {
  float t = 0.f;
  if (CF_SCORE_MODS) x = mods.apply(x, i, j, t);  // softcap, ALiBi (cf_mask.cuh)
  const float p = seen ? simt_exp2(fmaf(x, scale_log2, -st.lse2)) : 0.f;
  const bool kept = drop.kept(bh, i, j);  // true without CF_DROPOUT
  return SimtPdS{drop.apply(kept, p), p * (drop.apply(kept, dp) - st.delta) * softcap_grad(t)};
}

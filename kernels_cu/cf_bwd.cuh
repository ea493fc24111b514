// cf_bwd.cuh -- tensor-core helpers shared by the fp16/bf16 backward kernels
// (flash_bwd.cu and flash_bwd_split.cu: dK, dV and atomic dQ; flash_bwd_dq.cu: deterministic dQ).
//
// Vocabulary. A "D-tile" is a shared-memory tile of ROWS rows x CF_HEAD_DIM 16-bit columns,
// row-major, each row made of CF_HEAD_DIM / 8 16-byte chunks placed by `swizzle_chunk`
// (cf_common.cuh). Chunk c of row r holds columns 8c .. 8c+7. Every ldmatrix helper below
// takes a *logical* (row, chunk) position and applies the swizzle itself.
//
// ldmatrix recap (cf_common.cuh): lane L supplies the address of row L % 8 of 8x8 matrix
// L / 8; register j receives matrix j, element (row = L / 4, cols 2 (L % 4) .. +1), or the
// same element of the transposed matrix with .trans. With lane = 4 * group + tig this is
// (group, 2 tig .. +1), exactly the mma fragment element of cf_common.cuh's layout table.
//
// Two lane -> address patterns cover every operand of the backward:
//   pattern X: row = row0 + (L & 7) + 8 * ((L >> 3) & 1), chunk = chunk0 + (L >> 4)
//              -> matrices (rows 0-7, c0) (rows 8-15, c0) (rows 0-7, c0+1) (rows 8-15, c0+1)
//   pattern Y: row = row0 + (L & 7) + 8 * (L >> 4),       chunk = chunk0 + ((L >> 3) & 1)
//              -> matrices (rows 0-7, c0) (rows 0-7, c0+1) (rows 8-15, c0) (rows 8-15, c0+1)
#pragma once

#include "cf_common.cuh"

#if CF_DTYPE == 2
#error "cf_bwd.cuh is the fp16/bf16 tensor-core path; float32 uses cf_simt.cuh"
#endif

// -- the tile a kernel is compiled for ---------------------------------------------------------
// Enumerators, not constexpr variables: NVRTC would emit namespace-scope ones as .global data.
// Each kernel's namespace adds its own constants (`using namespace bwd_tile` inside it).
namespace bwd_tile {
enum : int {
  kBM = CF_BLOCK_M,
  kBN = CF_BLOCK_N,
  kD = CF_HEAD_DIM,
  kWarps = CF_WARPS,
  kThreads = 32 * CF_WARPS,
  kStages = CF_STAGES,
  kCPR = kD / 8,  // 16-byte chunks per D-tile row
};
}  // namespace bwd_tile

// -- swizzle of any tile whose rows hold CPR 16-byte chunks -------------------------------------
// CPR % 4 == 0: cf_common's swizzle_chunk. CPR == 2 (the 16-column dS^T tile of block_m = 16,
// 32-byte rows, 4 rows per 128-byte bank line): XOR bit 0 of the chunk with bit 2 of the row,
// so the 8 rows of one ldmatrix phase at one logical chunk hit 8 different 16-byte bank groups
// (row r sits in group 2 (r & 3) + (chunk ^ ((r >> 2) & 1))).
template <int CPR>
__device__ __forceinline__ int bwd_swizzle(int row, int chunk) {
  static_assert(CPR == 2 || CPR % 4 == 0, "tile rows must be 32 bytes or a multiple of 64");
  if constexpr (CPR == 2) return row * 2 + (chunk ^ ((row >> 2) & 1));
  else return swizzle_chunk<CPR>(row, chunk);
}

// Element offset of (row, col) in a swizzled tile of CPR chunks per row; col may be any
// column (its chunk is swizzled, its position inside the chunk kept).
template <int CPR>
__device__ __forceinline__ int swz_elem(int row, int col) {
  return bwd_swizzle<CPR>(row, col >> 3) * 8 + (col & 7);
}

// -- global -> shared D-tile load, zero-filling rows >= rows_valid and columns >= head_dim -----
// ROWS x CF_HEAD_DIM tile; NT threads, consecutive threads take consecutive 16-byte chunks of
// a row (coalesced). `g` points at row 0 of the tile in global memory (row stride
// `stride_row` elements). Commits nothing: the caller groups copies.
template <int ROWS, int NT>
__device__ __forceinline__ void load_tile_async(elem_t* s, const elem_t* g, cf_i64 stride_row,
                                                int rows_valid, int head_dim, int tid) {
  constexpr int CPR = CF_HEAD_DIM / 8;
  constexpr int TOTAL = ROWS * CPR;
  // Not unrolled: unrolled, the swizzled shared offsets are loop invariants of the caller's
  // tile loop and ptxas keeps them all live, which costs the accumulators their registers.
#pragma unroll 1
  for (int base = 0; base < TOTAL; base += NT) {
    const int idx = base + tid;
    if (TOTAL % NT == 0 || idx < TOTAL) {
      const int r = idx / CPR, c = idx - (idx / CPR) * CPR;
      const bool valid = r < rows_valid && c * 8 < head_dim;
      const elem_t* src = valid ? g + (cf_i64)r * stride_row + c * 8 : g;
      cp_async_16(s + swizzle_chunk<CPR>(r, c) * 8, src, valid);
    }
  }
}

// -- ldmatrix wrappers on swizzled tiles (CPR chunks per row) ----------------------------------
// Preconditions, which let the lane-dependent part of every address be a loop invariant of a
// few registers instead of one register per (row, chunk) the caller touches:
//  * row0 / krow0 % 8 == 0: every swizzle depends on row & 7 only, so the tile's row0 part is
//    a plain offset of row0 * CPR * 8 elements;
//  * a column shift may be folded into `tile` (pass tile + col_base, chunk index relative to
//    it) when col_base / 8 is a multiple of 8 chunks (of 4 when CPR % 8 == 4, of 2 when
//    CPR == 2): the swizzle XORs only the low 3 (2, 1) bits of the chunk index, so
//    (B + j) ^ f == B + (j ^ f) for such a B.

// A operand (16 x 16, row-major) = tile rows row0..+15 (the M dimension), chunks kc, kc+1
// (the K dimension). Pattern X, non-trans:
//   r[0] = (rows 0-7, k 0-7) = a0, r[1] = (rows 8-15, k 0-7) = a1,
//   r[2] = (rows 0-7, k 8-15) = a2, r[3] = (rows 8-15, k 8-15) = a3.
template <int CPR>
__device__ __forceinline__ void ldsm_a(cf_u32 r[4], const elem_t* tile, int row0, int kc,
                                       int lane) {
  const int row = (lane & 7) + ((lane >> 3) & 1) * 8;
  ldmatrix_x4(r, tile + row0 * (CPR * 8) + bwd_swizzle<CPR>(row, kc + (lane >> 4)) * 8);
}

// B operands of two n8 tiles from tile rows row0..+15 stored as (n, k): row = n, chunks kc,
// kc+1 = k. Pattern Y, non-trans:
//   r[0] = (n 0-7, k 0-7) = b0 of n-tile 0, r[1] = (n 0-7, k 8-15) = b1 of n-tile 0,
//   r[2] = (n 8-15, k 0-7) = b0 of n-tile 1, r[3] = (n 8-15, k 8-15) = b1 of n-tile 1.
template <int CPR>
__device__ __forceinline__ void ldsm_b(cf_u32 r[4], const elem_t* tile, int row0, int kc,
                                       int lane) {
  const int row = (lane & 7) + (lane >> 4) * 8;
  ldmatrix_x4(r, tile + row0 * (CPR * 8) + bwd_swizzle<CPR>(row, kc + ((lane >> 3) & 1)) * 8);
}

// B operands of two n8 tiles from tile rows krow0..+15 stored as (k, n): row = k, chunks
// nc, nc+1 = n. Pattern X, .trans (each 8x8 (k, n) block arrives as its (n, k) transpose):
//   r[0] = (k 0-7, n 0-7) = b0 of n-tile 0, r[1] = (k 8-15, n 0-7) = b1 of n-tile 0,
//   r[2] = (k 0-7, n 8-15) = b0 of n-tile 1, r[3] = (k 8-15, n 8-15) = b1 of n-tile 1.
template <int CPR>
__device__ __forceinline__ void ldsm_b_trans(cf_u32 r[4], const elem_t* tile, int krow0,
                                             int nc, int lane) {
  const int row = (lane & 7) + ((lane >> 3) & 1) * 8;
  ldmatrix_x4_trans(r, tile + krow0 * (CPR * 8) + bwd_swizzle<CPR>(row, nc + (lane >> 4)) * 8);
}

// A operand (16 x 16) from a tile stored transposed, rows krow0..+15 = K, chunks mc, mc+1 = M.
// Pattern Y, .trans:
//   r[0] = (k 0-7, m 0-7)^T = a0, r[1] = (k 0-7, m 8-15)^T = a1,
//   r[2] = (k 8-15, m 0-7)^T = a2, r[3] = (k 8-15, m 8-15)^T = a3.
template <int CPR>
__device__ __forceinline__ void ldsm_a_trans(cf_u32 r[4], const elem_t* tile, int krow0, int mc,
                                             int lane) {
  const int row = (lane & 7) + (lane >> 4) * 8;
  ldmatrix_x4_trans(r,
                    tile + krow0 * (CPR * 8) + bwd_swizzle<CPR>(row, mc + ((lane >> 3) & 1)) * 8);
}

// -- fragments ---------------------------------------------------------------------------------
// Two fp32 C tiles (16 x 8 each, columns 0-7 and 8-15 of a 16 x 16 block) -> the A fragment of
// that block: a0 = (g, 2t..) = lo[0..1], a1 = (g+8, 2t..) = lo[2..3], a2 = (g, 8+2t..) =
// hi[0..1], a3 = (g+8, 8+2t..) = hi[2..3].
__device__ __forceinline__ void c_to_a(cf_u32 a[4], const float lo[4], const float hi[4]) {
  a[0] = pack2(lo[0], lo[1]);
  a[1] = pack2(lo[2], lo[3]);
  a[2] = pack2(hi[0], hi[1]);
  a[3] = pack2(hi[2], hi[3]);
}

// One 16 x 16 A fragment (rows row0 + g, +8 x columns col0 + 2 t, +8) to / from a swizzled
// tile of CPR chunks per row, at its elements' positions: one 4-byte access per register. A
// lane reads back exactly what it stored.
template <int CPR>
__device__ __forceinline__ void store_frag(elem_t* tile, const cf_u32 a[4], int row0, int col0,
                                           int lane) {
  const int row = row0 + (lane >> 2), col = col0 + 2 * (lane & 3);
  *reinterpret_cast<cf_u32*>(tile + swz_elem<CPR>(row, col)) = a[0];
  *reinterpret_cast<cf_u32*>(tile + swz_elem<CPR>(row + 8, col)) = a[1];
  *reinterpret_cast<cf_u32*>(tile + swz_elem<CPR>(row, col + 8)) = a[2];
  *reinterpret_cast<cf_u32*>(tile + swz_elem<CPR>(row + 8, col + 8)) = a[3];
}
template <int CPR>
__device__ __forceinline__ void load_frag(cf_u32 a[4], const elem_t* tile, int row0, int col0,
                                          int lane) {
  const int row = row0 + (lane >> 2), col = col0 + 2 * (lane & 3);
  a[0] = *reinterpret_cast<const cf_u32*>(tile + swz_elem<CPR>(row, col));
  a[1] = *reinterpret_cast<const cf_u32*>(tile + swz_elem<CPR>(row + 8, col));
  a[2] = *reinterpret_cast<const cf_u32*>(tile + swz_elem<CPR>(row, col + 8));
  a[3] = *reinterpret_cast<const cf_u32*>(tile + swz_elem<CPR>(row + 8, col + 8));
}

// Zero an accumulator array of N C tiles.
template <int N>
__device__ __forceinline__ void zero_acc(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// -- two products of one warp in one loop: S = A B^T and dP = A' B'^T ---------------------------
// 16 rows arow0.. of the tiles a (K or Q) and a2 (V or dO) against N rows brow0.. of b (Q or K)
// and b2 (dO or V), all D-tiles, contracted over head_dim: s = a b^T and dp = a2 b2^T, each
// 16 x N (N / 2 floats per thread). The 16-column k-steps stop at head_dim (columns >= head_dim
// are zero-filled, so a partial last step is exact); no register array is indexed by kk, so
// the loop is only partly unrolled (UNROLL). Used transposed by flash_bwd.cu (S^T = K Q^T,
// dP^T = V dO^T) and as written by flash_bwd_dq.cu (S = Q K^T, dP = dO V^T).
template <int N, int UNROLL>
__device__ __forceinline__ void scores_and_dp(float (&s)[N / 8][4], float (&dp)[N / 8][4],
                                              const elem_t* a, const elem_t* a2, int arow0,
                                              const elem_t* b, const elem_t* b2, int brow0,
                                              int head_dim, int lane) {
  constexpr int CPR = CF_HEAD_DIM / 8;
  zero_acc(s);
  zero_acc(dp);
  const int ksteps = (head_dim + 15) >> 4;
#pragma unroll UNROLL
  for (int kk = 0; kk < ksteps; ++kk) {
    cf_u32 fa[4], fa2[4];
    // A fragments, rows arow0..+15, cols 16kk..+15: regs = (r0-7,c0-7) (r8-15,c0-7)
    // (r0-7,c8-15) (r8-15,c8-15)
    ldsm_a<CPR>(fa, a, arow0, 2 * kk, lane);
    ldsm_a<CPR>(fa2, a2, arow0, 2 * kk, lane);
#pragma unroll
    for (int j = 0; j < N / 16; ++j) {
      cf_u32 fb[4], fb2[4];
      // B fragments, rows brow0+16j..+15 (n), cols 16kk..+15 (k): regs =
      // (n0-7,k0-7) (n0-7,k8-15) -> n-tile 2j; (n8-15,k0-7) (n8-15,k8-15) -> n-tile 2j+1
      ldsm_b<CPR>(fb, b, brow0 + 16 * j, 2 * kk, lane);
      mma_16816(s[2 * j], fa, fb[0], fb[1]);
      mma_16816(s[2 * j + 1], fa, fb[2], fb[3]);
      ldsm_b<CPR>(fb2, b2, brow0 + 16 * j, 2 * kk, lane);
      mma_16816(dp[2 * j], fa2, fb2[0], fb2[1]);
      mma_16816(dp[2 * j + 1], fa2, fb2[2], fb2[3]);
    }
  }
}

// -- a warp's C tiles out ---------------------------------------------------------------------
// The 16 x (8 N) C tiles of one warp as column pairs: put(row, col, x, y) for rows row0 + g and
// row0 + g + 8 below rows_valid, columns col0 + 8 n + 2 t .. +1 below head_dim (a multiple of
// 8, so a pair is whole or out). put scales x, y itself: after its address (atomics) or before
// (a store's right-hand side), as the kernels always had it (the cubins depend on the order).
template <int N, class Put>
__device__ __forceinline__ void put_acc(const float (&acc)[N][4], int row0, int rows_valid,
                                        int col0, int head_dim, int lane, Put put) {
  const int grp = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    const int col = col0 + 8 * n + 2 * tig;
    if (col >= head_dim) continue;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + grp + 8 * half;
      if (row < rows_valid) put(row, col, acc[n][2 * half], acc[n][2 * half + 1]);
    }
  }
}

// put_acc times `scale` as elem_t into `g` (row 0, column 0 of the output block; row stride
// `stride_row` elements): each pair one 4-byte store (row starts 16-byte aligned, columns even).
template <int N>
__device__ __forceinline__ void store_acc(elem_t* g, cf_i64 stride_row, const float (&acc)[N][4],
                                          float scale, int row0, int rows_valid, int col0,
                                          int head_dim, int lane) {
  put_acc(acc, row0, rows_valid, col0, head_dim, lane, [&](int row, int col, float x, float y) {
    *reinterpret_cast<cf_u32*>(g + (cf_i64)row * stride_row + col) = pack2(x * scale, y * scale);
  });
}

// -- dQ atomics: a column pair added to the float dq_accum --------------------------------------
// red.global.add.v2.f32 on sm_90+ (one vector reduction), two scalar atomics before. p is
// 8-byte aligned: head_dim and the column are even.
__device__ __forceinline__ void atomic_add2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(x), "f"(y) : "memory");
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}

// put_acc times `scale` added into the float `g` (dq_accum; row stride `stride_row` floats).
template <int N>
__device__ __forceinline__ void atomic_acc(float* g, cf_i64 stride_row, const float (&acc)[N][4],
                                           float scale, int row0, int rows_valid, int col0,
                                           int head_dim, int lane) {
  put_acc(acc, row0, rows_valid, col0, head_dim, lane, [&](int row, int col, float x, float y) {
    atomic_add2(g + (cf_i64)row * stride_row + col, x * scale, y * scale);
  });
}

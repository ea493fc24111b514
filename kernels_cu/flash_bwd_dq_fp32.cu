// flash_bwd_dq_fp32.cu -- exact float32 attention backward, deterministic dQ (no atomics):
// the dQ half of FlashAttention-2 Algorithm 2, one block per query tile, on FFMA
// (helpers in cf_simt.cuh; exp2 is the < 1 ulp simt_exp2).
//
// Algorithm (one block = BLOCK_M query rows of head h, kv head h / heads_per_kv):
//   acc = 0                                     (BLOCK_M x CF_HEAD_DIM, registers)
//   for each key tile K_j, V_j (causal: only tiles that hold a key some row of the tile sees):
//     dP = dO V_j^T,  S = Q K_j^T
//     P  = exp2(S * scale_log2 - lse2)          (0 where masked: key >= seqlen_k, causal,
//                                                query >= seqlen_q; lse2 = +inf rows give 0)
//     dS = P * (dP - delta)
//     acc += dS K_j                               (summed alone per tile, then merged)
//   dq = softmax_scale * acc for rows < seqlen_q, columns < head_dim (0 for rows that see no key).
// Keys are visited in a fixed order, so dq is bitwise reproducible.
//
// Grid: (ceil(seqlen_q / BLOCK_M), heads, batch); blockIdx.x = query tile (reversed when causal,
// so the tiles with the most keys start first), .y = head, .z = batch.
// Block = 32 * CF_WARPS threads.
// Layouts: q, dout, dq (batch, seqlen_q, heads, head_dim); k, v (batch, seqlen_k, heads_kv,
// head_dim); element strides, head_dim contiguous, rows 16-byte aligned. lse2, delta
// (batch, heads, seqlen_q) contiguous, log2 units. Offsets are 64-bit.
//
// Tiles (shared memory, float32, row stride = width + 4 floats, see simt_ld):
//   sQ, sdO [BLOCK_M][CF_HEAD_DIM+4]  resident for the whole key loop
//   sK      [BLOCK_N][CF_HEAD_DIM+4]  K_j; K_{j+1} is prefetched after dS K_j, under dO V^T
//   sV      [BLOCK_N][CF_HEAD_DIM+4]  V_j; V_{j+1} is prefetched after dO V_j^T, under the rest
//   sdS     [BLOCK_M][BLOCK_N+4]      dS of the current tile
// Shared memory (bytes) = 4 * (2 * (BLOCK_M + BLOCK_N) * (CF_HEAD_DIM + 4) + BLOCK_M * (BLOCK_N + 4))
// (CF_BWD_DQ_FP32_SMEM_BYTES; head_dim 256 fits 48 KB with BLOCK_M = BLOCK_N = 8: 33664 B).
//
// Thread mapping: two SimtTile layouts (cf_simt.cuh), exchanging dS through shared memory
// behind __syncthreads:
//   Tile1  S, dP, P, dS   BLOCK_M x BLOCK_N scalars
//   TileQ  acc, dq        BLOCK_M x CF_HEAD_DIM / 4 float4 chunks (registers for the whole block)
// The per-row lse2 and delta of the thread's Tile1 rows are loaded once.
//
// Constraints: CF_DTYPE = 2; CF_STAGES = 1; CF_HEAD_DIM % 32 == 0, <= 256; CF_BLOCK_M % 8 == 0,
// CF_BLOCK_N % 8 == 0; each Tile must have a layout (holds when BLOCK_M and BLOCK_N are
// multiples of 4 * CF_WARPS).
//
// Masking (causal or a local window, tile ranges) and score modifiers (softcap, ALiBi):
// cf_mask.cuh (docs/masks.md); tanh is the accurate tanhf here.

#include "cf_simt.cuh"  // first: float32 defaults, the float32 constraints
#include "cf_mask.cuh"
#include "cf_seq.cuh"
#include "cf_params.cuh"
#include "cf_tile_order.cuh"

static_assert(CF_BLOCK_M % 8 == 0 && CF_BLOCK_N % 8 == 0,
              "flash_bwd_dq_fp32: CF_BLOCK_M and CF_BLOCK_N must be multiples of 8");

#define CF_BWD_DQ_FP32_SMEM_BYTES \
  (4 * (2 * (CF_BLOCK_M + CF_BLOCK_N) * (CF_HEAD_DIM + 4) + CF_BLOCK_M * (CF_BLOCK_N + 4)))

namespace bwd_dq32 {
enum : int {
  BM = CF_BLOCK_M,
  BN = CF_BLOCK_N,
  D = CF_HEAD_DIM,
  WARPS = CF_WARPS,
  NT = 32 * WARPS,
  LDH = simt_ld(D),   // row stride of sQ, sdO, sK, sV
  LDS = simt_ld(BN),  // row stride of sdS
};
using Tile1 = SimtTile<BM, BN, 1, WARPS>;     // S, dP, P, dS
using TileQ = SimtTile<BM, D / 4, 4, WARPS>;  // acc, dq
// acc chunks per merge pass (<= 32 registers of per-tile sums)
enum : int { QPQ = simt_pass_chunks(TileQ::TM, TileQ::TN, 32) };
static_assert(4 * (2 * (BM + BN) * LDH + BM * LDS) == CF_BWD_DQ_FP32_SMEM_BYTES, "smem formula");
}  // namespace bwd_dq32

extern "C" __global__ void __launch_bounds__(bwd_dq32::NT, CF_FP32_MIN_BLOCKS)
    flash_bwd_dq(CF_BWD_DQ_PARAMS, CF_MOD_PARAMS, CF_SEQ_PARAMS) {
  using namespace bwd_dq32;
  CF_REQUIRE_SMEM(CF_BWD_DQ_FP32_SMEM_BYTES);
  extern __shared__ __align__(16) unsigned char smem[];
  float* sQ = reinterpret_cast<float*>(smem);
  float* sdO = sQ + BM * LDH;
  float* sK = sdO + BM * LDH;
  float* sV = sK + BN * LDH;
  float* sdS = sV + BN * LDH;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m_tile = query_tile_longest_first();  // cf_tile_order.cuh
  const int m0 = m_tile * BM, h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq(b, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;  // this sequence's
  if (CF_VARLEN && m0 >= seqlen_q) return;  // the grid covers the longest sequence
  const int hk = h / heads_per_kv;
  const elem_t* k_head = k + seq.k_offset(stride_kb, stride_kn) + hk * stride_kh;
  const elem_t* v_head = v + seq.k_offset(stride_vb, stride_vn) + hk * stride_vh;

  // -- key range (cf_mask.cuh): tiles [tiles.begin, tiles.end); hidden tiles are skipped
  const MaskPolicy mask(seqlen_q, seqlen_k, window_left, window_right);
  const KeyTiles tiles = key_tiles<BN>(mask, m0, min(m0 + BM, seqlen_q) - 1);
  const int n_tiles = tiles.end - tiles.begin;
  const int n_first = tiles.begin * BN;
  const ScoreMods mods(CF_MOD_ARGS, b, h, seqlen_q, seqlen_k);

  // -- the thread's Tile1 rows: lse2 (+inf past seqlen_q -> P = 0), delta, visible keys
  const int r1 = Tile1::row0(warp, lane), c1 = Tile1::col0(warp, lane);
  float lse[Tile1::TM], dlt[Tile1::TM];
  int first_key[Tile1::TM], end_key[Tile1::TM];
  {
    const cf_i64 bh = seq.stats(h);
#pragma unroll
    for (int i = 0; i < Tile1::TM; ++i) {
      const int r = m0 + r1 + Tile1::RL * i;
      const bool row_ok = r < seqlen_q;
      lse[i] = row_ok ? lse2[bh + r] : CF_INF;
      dlt[i] = row_ok ? delta[bh + r] : 0.f;
      // a row past seqlen_q sees nothing
      first_key[i] = mask.key_begin(r);
      end_key[i] = !row_ok ? 0 : mask.key_end(r);
    }
  }

  const int rq = TileQ::row0(warp, lane), cq = TileQ::col0(warp, lane);
  float acc[TileQ::TM][4 * TileQ::TN];
  simt_zero(acc);
  float no_scale[TileQ::TM];  // unused by the unscaled merge
#pragma unroll
  for (int i = 0; i < TileQ::TM; ++i) no_scale[i] = 1.f;

  // -- prologue: group {Q, dO, V_0}, group {K_0}
  simt_load_tile<BM, D, NT>(sQ, LDH, q + seq.q_offset(stride_qb, stride_qm) +
                                         h * stride_qh + (cf_i64)m0 * stride_qm,
                            stride_qm, seqlen_q - m0, head_dim, q, tid);
  simt_load_tile<BM, D, NT>(sdO, LDH,
                            dout + seq.q_offset(stride_dob, stride_dom) +
                                h * stride_doh + (cf_i64)m0 * stride_dom,
                            stride_dom, seqlen_q - m0, head_dim, dout, tid);
  if (n_tiles > 0)
    simt_load_tile<BN, D, NT>(sV, LDH, v_head + (cf_i64)n_first * stride_vn, stride_vn,
                              seqlen_k - n_first, head_dim, v, tid);
  cp_async_commit();
  if (n_tiles > 0)
    simt_load_tile<BN, D, NT>(sK, LDH, k_head + (cf_i64)n_first * stride_kn, stride_kn,
                              seqlen_k - n_first, head_dim, k, tid);
  cp_async_commit();

  // Invariant at the top of iteration t: the two newest cp.async groups are {V_t} (with Q, dO
  // when t = 0) and {K_t}; every commit below happens on every iteration (maybe empty).
  for (int t = 0; t < n_tiles; ++t) {
    const int n0 = n_first + t * BN;
    cp_async_wait<1>();  // V_t (and Q, dO) landed; K_t may still be in flight
    __syncthreads();

    // -- dP = dO V_t^T
    float dp[Tile1::TM][Tile1::TN];
    simt_zero(dp);
    simt_mm_nt<Tile1::TM, Tile1::TN>(dp, sdO + r1 * LDH, Tile1::RL * LDH, sV + c1 * LDH,
                                     Tile1::CL * LDH, head_dim);
    __syncthreads();  // every warp is done with sV
    if (t + 1 < n_tiles)
      simt_load_tile<BN, D, NT>(sV, LDH, v_head + (cf_i64)(n0 + BN) * stride_vn, stride_vn,
                                seqlen_k - (n0 + BN), head_dim, v, tid);
    cp_async_commit();

    cp_async_wait<1>();  // K_t landed (V_{t+1} may still be in flight)
    __syncthreads();

    // -- S = Q K_t^T; P = exp2(S * scale_log2 - lse2); dS = P * (dP - delta) to sdS
    // (the same S sum and the same one-FFMA exponent as the forward: see flash_bwd_fp32.cu)
    {
      float s[Tile1::TM][Tile1::TN];
      simt_zero(s);
      simt_mm_nt<Tile1::TM, Tile1::TN>(s, sQ + r1 * LDH, Tile1::RL * LDH, sK + c1 * LDH,
                                       Tile1::CL * LDH, head_dim);
#pragma unroll
      for (int i = 0; i < Tile1::TM; ++i) {
#pragma unroll
        for (int j = 0; j < Tile1::TN; ++j) {
          const int key = n0 + c1 + Tile1::CL * j;
          const bool ok = key < end_key[i] && (!CF_LOCAL || key >= first_key[i]);
          float x = s[i][j], th = 0.f;
          if (CF_SCORE_MODS) x = mods.apply(x, m0 + r1 + Tile1::RL * i, key, th);
          const float p = ok ? simt_exp2(fmaf(x, scale_log2, -lse[i])) : 0.f;
          sdS[(r1 + Tile1::RL * i) * LDS + c1 + Tile1::CL * j] =
              p * (dp[i][j] - dlt[i]) * softcap_grad(th);
        }
      }
    }
    __syncthreads();  // sdS complete

    // -- acc += dS K_t (the tile's sum is formed on its own, then merged)
    simt_mm_nn_merge<TileQ::TM, TileQ::TN, BN, QPQ, false>(acc, no_scale, sdS + rq * LDS,
                                                           TileQ::RL * LDS, sK + 4 * cq, LDH,
                                                           4 * TileQ::CL);
    __syncthreads();  // every warp is done with sK and sdS
    if (t + 1 < n_tiles)
      simt_load_tile<BN, D, NT>(sK, LDH, k_head + (cf_i64)(n0 + BN) * stride_kn, stride_kn,
                                seqlen_k - (n0 + BN), head_dim, k, tid);
    cp_async_commit();
  }
  cp_async_wait<0>();

  // -- epilogue: dq = softmax_scale * acc
#pragma unroll
  for (int i = 0; i < TileQ::TM; ++i) {
    const int r = m0 + rq + TileQ::RL * i;
    if (r < seqlen_q) {
      elem_t* dq_row = dq + seq.q_offset(stride_dqb, stride_dqm) +
                           h * stride_dqh + (cf_i64)r * stride_dqm;
#pragma unroll
      for (int qc = 0; qc < TileQ::TN; ++qc) {
        const int col = 4 * (cq + TileQ::CL * qc);
        if (col < head_dim)
          *reinterpret_cast<float4*>(dq_row + col) =
              make_float4(softmax_scale * acc[i][4 * qc + 0], softmax_scale * acc[i][4 * qc + 1],
                          softmax_scale * acc[i][4 * qc + 2], softmax_scale * acc[i][4 * qc + 3]);
      }
    }
  }
}

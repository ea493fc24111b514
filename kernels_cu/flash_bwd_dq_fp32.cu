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
#include "cf_params.cuh"

static_assert(CF_BLOCK_M % 8 == 0 && CF_BLOCK_N % 8 == 0,
              "flash_bwd_dq_fp32: CF_BLOCK_M and CF_BLOCK_N must be multiples of 8");

#define CF_BWD_DQ_FP32_SMEM_BYTES \
  (4 * (2 * (CF_BLOCK_M + CF_BLOCK_N) * (CF_HEAD_DIM + 4) + CF_BLOCK_M * (CF_BLOCK_N + 4)))

namespace bwd_dq32 {
using namespace simt_cfg;
enum : int { LDS = simt_ld(BN) };  // row stride of sdS
using Tile1 = SimtTile<BM, BN, 1, WARPS>;     // S, dP, P, dS
using TileQ = SimtTile<BM, D / 4, 4, WARPS>;  // acc, dq
// acc chunks per merge pass (<= 32 registers of per-tile sums)
enum : int { QPQ = simt_pass_chunks(TileQ::TM, TileQ::TN, 32) };
static_assert(4 * (2 * (BM + BN) * LDH + BM * LDS) == CF_BWD_DQ_FP32_SMEM_BYTES, "smem formula");
}  // namespace bwd_dq32

extern "C" __global__ void __launch_bounds__(bwd_dq32::NT, CF_FP32_MIN_BLOCKS)
    flash_bwd_dq(CF_BWD_DQ_PARAMS, CF_MOD_PARAMS, CF_SEQ_PARAMS CF_BSP_PARAMS CF_DROP_PARAMS) {
  using namespace bwd_dq32;
  // -- query tile, sequence, key range and modifiers (cf_simt.cuh, cf_mask.cuh)
  const SimtQueryBlock<BM, BN> blk(heads, heads_per_kv, max_seqlen_q, max_seqlen_k, k, stride_kb,
                                   stride_kn, stride_kh, v, stride_vb, stride_vn, stride_vh,
                                   CF_MOD_ARGS, CF_SEQ_ARGS, CF_BSP_MASK);
  const KeptSteps<KeptKeyTiles<BN>> key_tile(blk.kept, blk.kept.begin);  // iteration t's tile
  const Dropout drop = CF_DROP;  // keeps everything without CF_DROPOUT
  const unsigned int drop_bh = drop.head(blk.b, blk.h, heads);
  const int first0 = CF_BLOCK_SPARSE ? key_tile(0) * BN : blk.n_first;  // its keys
  if (blk.idle()) return;
  SimtBwdSmem<BM, BN, D> smem(CF_BWD_DQ_FP32_SMEM_BYTES);
  float *sQ = smem.q, *sdO = smem.dout, *sK = smem.k, *sV = smem.v;
  float* sdS = smem.take(BM * LDS);

  const int m0 = blk.m0, h = blk.h;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  // -- the thread's Tile1 rows: lse2, delta and visible keys (none past seqlen_q: P = 0)
  const int r1 = Tile1::row0(warp, lane), c1 = Tile1::col0(warp, lane);
  SimtRowStats stats[Tile1::TM];
  KeyRange keys[Tile1::TM];
  {
    const cf_i64 bh = blk.seq.stats(h);
#pragma unroll
    for (int i = 0; i < Tile1::TM; ++i) {
      const int r = m0 + r1 + Tile1::RL * i;
      const bool row_ok = r < blk.seq.seqlen_q;
      stats[i] = simt_row_stats(lse2 + bh, delta + bh, r, row_ok);
      keys[i] = key_range(blk.mask, r, row_ok);
    }
  }

  const int rq = TileQ::row0(warp, lane), cq = TileQ::col0(warp, lane);
  float acc[TileQ::TM][4 * TileQ::TN];
  simt_zero(acc);
  float no_scale[TileQ::TM];  // unused by the unscaled merge
#pragma unroll
  for (int i = 0; i < TileQ::TM; ++i) no_scale[i] = 1.f;

  // -- prologue: group {Q, dO, V_0}, group {K_0}
  simt_load_rows<BM, D, NT>(sQ, simt_q_rows(q, blk.seq, stride_qb, stride_qm, stride_qh, h), m0,
                            head_dim, tid);
  simt_load_rows<BM, D, NT>(sdO, simt_q_rows(dout, blk.seq, stride_dob, stride_dom, stride_doh, h),
                            m0, head_dim, tid);
  if (blk.n_tiles > 0) simt_load_rows<BN, D, NT>(sV, blk.v_rows, first0, head_dim, tid);
  cp_async_commit();
  if (blk.n_tiles > 0) simt_load_rows<BN, D, NT>(sK, blk.k_rows, first0, head_dim, tid);
  cp_async_commit();

  // Invariant at the top of iteration t: the two newest cp.async groups are {V_t} (with Q, dO
  // when t = 0) and {K_t}; every commit below happens on every iteration (maybe empty).
  for (int t = 0; t < blk.n_tiles; ++t) {
    const int n0 = CF_BLOCK_SPARSE ? key_tile(t) * BN : blk.n_first + t * BN;
    const int next0 = CF_BLOCK_SPARSE && t + 1 < blk.n_tiles ? key_tile(t + 1) * BN : n0 + BN;
    cp_async_wait<1>();  // V_t (and Q, dO) landed; K_t may still be in flight
    __syncthreads();

    // -- dP = dO V_t^T
    float dp[Tile1::TM][Tile1::TN];
    simt_mm_nt_tile<Tile1, D>(dp, sdO, sV, r1, c1, head_dim);
    __syncthreads();  // every warp is done with sV
    if (t + 1 < blk.n_tiles) simt_load_rows<BN, D, NT>(sV, blk.v_rows, next0, head_dim, tid);
    cp_async_commit();

    cp_async_wait<1>();  // K_t landed (V_{t+1} may still be in flight)
    __syncthreads();

    // -- S = Q K_t^T; P = exp2(S * scale_log2 - lse2); dS = P * (dP - delta) to sdS
    // (the same S sum and one-FFMA exponent as the forward: simt_p_ds)
    {
      float s[Tile1::TM][Tile1::TN];
      simt_mm_nt_tile<Tile1, D>(s, sQ, sK, r1, c1, head_dim);
#pragma unroll
      for (int i = 0; i < Tile1::TM; ++i) {
#pragma unroll
        for (int j = 0; j < Tile1::TN; ++j) {
          const int key = n0 + c1 + Tile1::CL * j;
          sdS[(r1 + Tile1::RL * i) * LDS + c1 + Tile1::CL * j] =
              simt_p_ds(s[i][j], dp[i][j], keys[i].contains(key), m0 + r1 + Tile1::RL * i, key,
                        stats[i], blk.mods, scale_log2, drop, drop_bh).ds;
        }
      }
    }
    __syncthreads();  // sdS complete

    // -- acc += dS K_t (the tile's sum is formed on its own, then merged)
    simt_mm_nn_merge<TileQ::TM, TileQ::TN, BN, QPQ, false>(acc, no_scale, sdS + rq * LDS,
                                                           TileQ::RL * LDS, sK + 4 * cq, LDH,
                                                           4 * TileQ::CL);
    __syncthreads();  // every warp is done with sK and sdS
    if (t + 1 < blk.n_tiles) simt_load_rows<BN, D, NT>(sK, blk.k_rows, next0, head_dim, tid);
    cp_async_commit();
  }
  cp_async_wait<0>();

  // -- epilogue: dq = softmax_scale * acc
#pragma unroll
  for (int i = 0; i < TileQ::TM; ++i) {
    const int r = m0 + rq + TileQ::RL * i;
    if (r < blk.seq.seqlen_q) {
      elem_t* dq_row = dq + blk.seq.q_offset(stride_dqb, stride_dqm) +
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

// flash_bwd_fp32.cu -- exact float32 attention backward, dK dV (and atomic dQ):
// FlashAttention-2 Algorithm 2 on FFMA (helpers in cf_simt.cuh; exp2 is the < 1 ulp simt_exp2).
//
// Algorithm (one block = BLOCK_N keys of kv head hk, head_dim columns [c0, c0 + CF_DCHUNK)):
//   dK_c = 0, dV_c = 0                      (BLOCK_N x DCHUNK, registers)
//   for each query head h of the group (h = hk * heads_per_kv + g), for each query tile Q_i
//   that sees one of the keys (causal: rows i >= n0 - (seqlen_k - seqlen_q)):
//     S  = Q_i K^T,  dP = dO_i V^T          (full head_dim; recomputed by every chunk)
//     P  = exp2(S * scale_log2 - lse2_i)    (0 where masked: key >= seqlen_k, causal,
//                                            query >= seqlen_q; lse2 = +inf rows give 0)
//     dS = P * (dP - delta_i)
//     dV_c += P^T dO_i[:, c],  dK_c += dS^T Q_i[:, c]   (each tile summed alone, then merged)
//     CF_DQ_ATOMIC: dq_accum[:, c] += softmax_scale * dS K[:, c]   (float atomics)
//   dK = softmax_scale * dK_c, dV = dV_c written for every key row < seqlen_k, every column
//   of the chunk < head_dim (zeros where no query sees the key).
//
// Grid: (ceil(seqlen_k / BLOCK_N), heads_kv, batch * n_chunks), n_chunks = ceil(head_dim /
// CF_DCHUNK); blockIdx.z = b * n_chunks + chunk (chunk fastest). Block = 32 * CF_WARPS.
// Layouts: q, dout (batch, seqlen_q, heads, head_dim); k, v, dk, dv (batch, seqlen_k, heads_kv,
// head_dim), element strides, head_dim contiguous, rows 16-byte aligned. lse2, delta
// (batch, heads, seqlen_q) contiguous, log2 units. dq_accum (batch, seqlen_q, heads, head_dim)
// contiguous float32, zeroed by the launcher. Offsets are 64-bit.
//
// Tiles (shared memory, float32, row stride = width + 4 floats, see simt_ld):
//   sQ, sdO  [BLOCK_M][CF_HEAD_DIM+4]  the current query tile; the next one is prefetched
//                                      (cp.async) while the dQ atomics of this one run
//   sK, sV   [BLOCK_N][CF_HEAD_DIM+4]  resident for the whole block
//   sPt, sdSt [BLOCK_N][BLOCK_M+4]     P^T and dS^T (A operands of dV and dK)
//   sdS      [BLOCK_M][BLOCK_N+4]      dS (A operand of dQ; allocated for any CF_DQ_ATOMIC)
// Shared memory (bytes) = 4 * (2 * (BLOCK_M + BLOCK_N) * (CF_HEAD_DIM + 4)
//                              + 2 * BLOCK_N * (BLOCK_M + 4) + BLOCK_M * (BLOCK_N + 4))
// (CF_BWD_FP32_SMEM_BYTES; head_dim 256 fits 48 KB with BLOCK_M = BLOCK_N = 8: 34432 B).
//
// Thread mapping: three products, each split over the threads by its own SimtTile layout
// (chosen at compile time to minimise shared-memory loads; a thread owns rows row0 + RL i and
// columns col0 + CL j); they exchange data only through shared memory behind __syncthreads.
//   Tile1  S, dP, P, dS      BLOCK_M x BLOCK_N scalars
//   Tile2  dK, dV            BLOCK_N x DCHUNK / 4 float4 chunks (registers for the whole block)
//   Tile3  dQ                BLOCK_M x DCHUNK / 4 float4 chunks (per query tile)
// Registers: dK + dV hold 2 * BLOCK_N * DCHUNK / (32 * WARPS) floats per thread.
//
// Constraints: CF_DTYPE = 2; CF_STAGES = 1; CF_HEAD_DIM % 32 == 0, <= 256; CF_DCHUNK % 8 == 0
// and CF_HEAD_DIM % CF_DCHUNK == 0 (so a chunk never leaves the tile); CF_BLOCK_M % 8 == 0,
// CF_BLOCK_N % 8 == 0; each Tile must have a layout (a static_assert says which failed; it holds
// when BLOCK_M and BLOCK_N are multiples of 4 * CF_WARPS, and DCHUNK / 4 of 8).
//
// Masking (causal or a local window, tile ranges) and score modifiers (softcap, ALiBi):
// cf_mask.cuh (docs/masks.md); tanh is the accurate tanhf here.

#include "cf_simt.cuh"  // first: float32 defaults, the float32 constraints
#include "cf_config_bwd.cuh"
#include "cf_params.cuh"

static_assert(CF_DCHUNK % 8 == 0 && CF_HEAD_DIM % CF_DCHUNK == 0,
              "flash_bwd_fp32: CF_DCHUNK must be a multiple of 8 that divides CF_HEAD_DIM");
static_assert(CF_BLOCK_M % 8 == 0 && CF_BLOCK_N % 8 == 0,
              "flash_bwd_fp32: CF_BLOCK_M and CF_BLOCK_N must be multiples of 8");

#define CF_BWD_FP32_SMEM_BYTES                                         \
  (4 * (2 * (CF_BLOCK_M + CF_BLOCK_N) * (CF_HEAD_DIM + 4) +           \
        2 * CF_BLOCK_N * (CF_BLOCK_M + 4) + CF_BLOCK_M * (CF_BLOCK_N + 4)))

namespace bwd32 {
using namespace simt_cfg;
enum : int {
  DC = CF_DCHUNK,
  DQ_ATOMIC = CF_DQ_ATOMIC,  // phase 3: also add dQ into dq_accum (0: flash_bwd_dq does)
  LDT = simt_ld(BM),         // row stride of sPt, sdSt (rows = keys)
  LDS = simt_ld(BN),         // row stride of sdS (rows = queries)
};
using Tile1 = SimtTile<BM, BN, 1, WARPS>;      // S, dP, P, dS
using Tile2 = SimtTile<BN, DC / 4, 4, WARPS>;  // dK, dV chunk
using Tile3 = SimtTile<BM, DC / 4, 4, WARPS>;  // dQ chunk
// dK, dV chunks per merge pass (<= 32 registers of per-tile sums)
enum : int { QP2 = simt_pass_chunks(Tile2::TM, Tile2::TN, 32) };
static_assert(4 * (2 * (BM + BN) * LDH + 2 * BN * LDT + BM * LDS) == CF_BWD_FP32_SMEM_BYTES,
              "smem formula");

// -- P = exp2(S * scale_log2 - lse2), dS = P * (dP - delta), masked; to sPt, sdSt, sdS ---------
// s, dp: the thread's Tile1 block; q_row / k_col: global query row / key of its (0, 0);
// r_loc / c_loc: the same in tile coordinates. P and dS of one score: simt_p_ds (cf_simt.cuh);
// a row whose lse2 is NaN (a NaN score it sees) gets NaN P on the keys it sees.
__device__ __forceinline__ void p_ds_tile(const float (&s)[Tile1::TM][Tile1::TN],
                                          const float (&dp)[Tile1::TM][Tile1::TN],
                                          const float* lse2_bh, const float* delta_bh,
                                          float* sPt, float* sdSt, float* sdS, int q_row,
                                          int k_col, int r_loc, int c_loc,
                                          const MaskPolicy& mask, const ScoreMods& mods,
                                          float scale_log2, const Dropout& drop,
                                          unsigned int bh) {
#pragma unroll
  for (int i = 0; i < Tile1::TM; ++i) {
    const int r = q_row + Tile1::RL * i;
    const bool row_ok = r < mask.seqlen_q;
    const SimtRowStats st = simt_row_stats(lse2_bh, delta_bh, r, row_ok);
    const KeyRange keys = key_range(mask, r, row_ok);
    const int rr = r_loc + Tile1::RL * i;
#pragma unroll
    for (int j = 0; j < Tile1::TN; ++j) {
      const int key = k_col + Tile1::CL * j;
      const SimtPdS pds =
          simt_p_ds(s[i][j], dp[i][j], keys.contains(key), r, key, st, mods, scale_log2, drop,
                    bh);
      const int cc = c_loc + Tile1::CL * j;
      sPt[cc * LDT + rr] = pds.p;
      sdSt[cc * LDT + rr] = pds.ds;
      sdS[rr * LDS + cc] = pds.ds;
    }
  }
}
}  // namespace bwd32

extern "C" __global__ void __launch_bounds__(bwd32::NT, CF_FP32_MIN_BLOCKS)
    flash_bwd(CF_BWD_PARAMS, CF_MOD_PARAMS, CF_SEQ_PARAMS CF_BSP_PARAMS CF_DROP_PARAMS) {
  using namespace bwd32;
  SimtBwdSmem<BM, BN, D> smem(CF_BWD_FP32_SMEM_BYTES);
  float *sQ = smem.q, *sdO = smem.dout, *sK = smem.k, *sV = smem.v;
  float *sPt = smem.take(BN * LDT), *sdSt = smem.take(BN * LDT);  // P^T, dS^T
  float* sdS = smem.take(BM * LDS);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int n_chunks = (head_dim + DC - 1) / DC;
  const int chunk = blockIdx.z % n_chunks, b = blockIdx.z / n_chunks;
  const Dropout drop = CF_DROP;  // keeps everything without CF_DROPOUT
  const int c0 = chunk * DC;  // first head_dim column of this block's dK, dV (and dQ)
  const int n0 = blockIdx.x * BN, hk = blockIdx.y;
  const SeqInfo seq(b, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;  // this sequence's
  if (CF_VARLEN && n0 >= seqlen_k) return;  // the grid covers the longest sequence

  // -- query tiles that see a key of this block: [mt_begin, qt.end) (cf_mask.cuh)
  const MaskPolicy mask(seqlen_q, seqlen_k, window_left, window_right);
  const QueryTiles qt = query_tiles_of<BM, BN>(mask, n0);
  const int mt_begin = qt.first;
  const int tiles_per_head = max(0, qt.end - mt_begin);
  // (g, query tile) pairs, g slowest; under a block mask the kept ones (cf_mask.cuh)
  const KeptQueryTiles<BM> kept(CF_BSP_MASK, b, hk * heads_per_kv, n0, qt, heads_per_kv);
  const int n_iters = CF_BLOCK_SPARSE ? kept.count() : heads_per_kv * tiles_per_head;
  const KeptSteps<KeptQueryTiles<BM>> walk_index(kept, 0);  // iteration it's pair
  // query head and first query row of iteration it
  auto head_of = [&](int it) { return hk * heads_per_kv + walk_index(it) / tiles_per_head; };
  auto row_of = [&](int it) { return (mt_begin + walk_index(it) % tiles_per_head) * BM; };
  auto load_query_tile = [&](int it) {  // Q, dO of iteration it
    const int h = head_of(it), m0 = row_of(it);
    simt_load_rows<BM, D, NT>(sQ, simt_q_rows(q, seq, stride_qb, stride_qm, stride_qh, h), m0,
                              head_dim, tid);
    simt_load_rows<BM, D, NT>(sdO, simt_q_rows(dout, seq, stride_dob, stride_dom, stride_doh, h),
                              m0, head_dim, tid);
  };

  // -- prologue: one group {K, V, Q_0, dO_0}
  simt_load_rows<BN, D, NT>(sK, simt_k_rows(k, seq, stride_kb, stride_kn, stride_kh, hk), n0,
                            head_dim, tid);
  simt_load_rows<BN, D, NT>(sV, simt_k_rows(v, seq, stride_vb, stride_vn, stride_vh, hk), n0,
                            head_dim, tid);
  if (n_iters > 0) load_query_tile(0);
  cp_async_commit();

  const int r1 = Tile1::row0(warp, lane), c1 = Tile1::col0(warp, lane);
  const int r2 = Tile2::row0(warp, lane), q2 = Tile2::col0(warp, lane);  // key row, chunk
  float dk_acc[Tile2::TM][4 * Tile2::TN], dv_acc[Tile2::TM][4 * Tile2::TN];
  simt_zero(dk_acc);
  simt_zero(dv_acc);
  float no_scale[Tile2::TM];  // unused by the unscaled merge
#pragma unroll
  for (int i = 0; i < Tile2::TM; ++i) no_scale[i] = 1.f;

  for (int it = 0; it < n_iters; ++it) {
    const int h = head_of(it), m0 = row_of(it);
    cp_async_wait<0>();  // Q_it, dO_it (and K, V) landed
    __syncthreads();     // ... for every thread; the previous dQ pass is done with sdS

    // -- phase 1: S = Q K^T, dP = dO V^T over the true head_dim; P, dS to shared memory
    {
      float s[Tile1::TM][Tile1::TN], dp[Tile1::TM][Tile1::TN];
      simt_mm_nt_tile<Tile1, D>(s, sQ, sK, r1, c1, head_dim);
      simt_mm_nt_tile<Tile1, D>(dp, sdO, sV, r1, c1, head_dim);
      const cf_i64 bh = seq.stats(h);
      const ScoreMods mods(CF_MOD_ARGS, b, h, seqlen_q, seqlen_k);  // per query head (ALiBi)
      p_ds_tile(s, dp, lse2 + bh, delta + bh, sPt, sdSt, sdS, m0 + r1, n0 + c1, r1, c1, mask, mods,
                scale_log2, drop, drop.head(b, h, heads));
    }
    __syncthreads();  // sPt, sdSt, sdS complete

    // -- phase 2: dV += P^T dO[:, chunk], dK += dS^T Q[:, chunk] (per-tile sums, then merged)
    simt_mm_nn_merge<Tile2::TM, Tile2::TN, BM, QP2, false>(
        dv_acc, no_scale, sPt + r2 * LDT, Tile2::RL * LDT, sdO + c0 + 4 * q2, LDH, 4 * Tile2::CL);
    simt_mm_nn_merge<Tile2::TM, Tile2::TN, BM, QP2, false>(
        dk_acc, no_scale, sdSt + r2 * LDT, Tile2::RL * LDT, sQ + c0 + 4 * q2, LDH, 4 * Tile2::CL);
    __syncthreads();  // every warp is done with sQ, sdO

    // -- prefetch the next query tile (overlaps the dQ pass)
    if (it + 1 < n_iters) load_query_tile(it + 1);
    cp_async_commit();

    // -- phase 3: dq_accum[:, chunk] += softmax_scale * dS K[:, chunk]
    if constexpr (DQ_ATOMIC) {
      const int r3 = Tile3::row0(warp, lane), q3 = Tile3::col0(warp, lane);
      float dq[Tile3::TM][4 * Tile3::TN];
      simt_zero(dq);
      simt_mm_nn<Tile3::TM, Tile3::TN, BN>(dq, sdS + r3 * LDS, Tile3::RL * LDS, sK + c0 + 4 * q3,
                                           LDH, 4 * Tile3::CL);
#pragma unroll
      for (int i = 0; i < Tile3::TM; ++i) {
        const int r = m0 + r3 + Tile3::RL * i;
        if (r < seqlen_q) {
          float* dq_row = dq_accum + ((seq.row_q() + r) * heads + h) * head_dim;
#pragma unroll
          for (int qc = 0; qc < Tile3::TN; ++qc) {
            const int col = c0 + 4 * (q3 + Tile3::CL * qc);
            if (col < head_dim) {
#pragma unroll
              for (int e = 0; e < 4; ++e) atomicAdd(dq_row + col + e, softmax_scale * dq[i][4 * qc + e]);
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // nothing may still be landing in shared memory when the block exits

  // -- epilogue: dK = softmax_scale * dK_c, dV = dV_c (zeros where no query saw the key)
#pragma unroll
  for (int i = 0; i < Tile2::TM; ++i) {
    const int n = n0 + r2 + Tile2::RL * i;
    if (n < seqlen_k) {
      elem_t* dk_row = dk + seq.k_offset(stride_dkb, stride_dkn) +
                           hk * stride_dkh + (cf_i64)n * stride_dkn;
      elem_t* dv_row = dv + seq.k_offset(stride_dvb, stride_dvn) +
                           hk * stride_dvh + (cf_i64)n * stride_dvn;
#pragma unroll
      for (int qc = 0; qc < Tile2::TN; ++qc) {
        const int col = c0 + 4 * (q2 + Tile2::CL * qc);
        if (col < head_dim) {
          *reinterpret_cast<float4*>(dk_row + col) =
              make_float4(softmax_scale * dk_acc[i][4 * qc + 0], softmax_scale * dk_acc[i][4 * qc + 1],
                          softmax_scale * dk_acc[i][4 * qc + 2], softmax_scale * dk_acc[i][4 * qc + 3]);
          *reinterpret_cast<float4*>(dv_row + col) =
              make_float4(dv_acc[i][4 * qc + 0], dv_acc[i][4 * qc + 1], dv_acc[i][4 * qc + 2],
                          dv_acc[i][4 * qc + 3]);
        }
      }
    }
  }
}

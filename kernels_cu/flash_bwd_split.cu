// flash_bwd_split.cu -- FlashAttention-2 backward (Dao 2023, Algorithm 2), fp16 / bf16 on tensor
// cores, in FlashAttention-2's work split: dK and dV for one block of 128 keys, and
// (CF_DQ_ATOMIC = 1) dQ accumulated with float atomics. The registry picks this file for
// 8 warps with the whole head_dim <= 128 in one chunk (registry.bwd_split_layout); every
// other backward tile runs flash_bwd.cu, whose header states the algorithm (S^T, P^T, dP^T,
// dS^T, all transposed so that keys are the M dimension of every mma), the layouts, the mask
// and the host contract: this kernel has the same entry point, parameters and contract.
//
// Why a second layout. Owning 16 keys per warp (flash_bwd.cu), every Q / dO fragment feeds
// only 2 mma and the kernel is shared-memory bound (bench/dev/NOTES.md). Here warp w = 2 wk + wh
// works in three phases per query tile:
//   1. S^T, P^T, dP^T, dS^T for keys 32 wk .. +31 x queries (M/2) wh .. (4 x 2 warps over
//      (keys, queries), M = CF_BLOCK_M; at M = 64 4 ldmatrix.x4 per 8 mma); P^T and dS^T go to
//      shared memory (sP, sdS).
//   2. (barrier) dV += P^T dO, dK += dS^T Q for keys 32 wk .. +31 x columns (D/2) wh .. of all
//      M queries: 4 x 2 warps over (keys, columns), A from sP / sdS; at D = 128 6 ldmatrix.x4
//      per 16 mma. dK + dV accumulators: D floats per thread.
//   3. dQ += dS K * scale: warps over (query rows, columns) of the tile (2 x 4 when D % 64 == 0,
//      else 4 x 2), A from sdS (.trans), B from sK, then red.global.add.v2 (cf_bwd.cuh).
// 128 keys per block halve the dQ atomics per FLOP against 64. P^T is rounded to elem_t before
// dS^T = P^T (dP^T - delta) is formed (the packed P^T is what fits in the registers beside dK,
// dV; it is also the P^T that dV uses).
//
// Grid (ceil(seqlen_k / 128), heads_kv, batch): blockIdx.x = key block (keys n0 = 128 x ..),
// blockIdx.y = kv head, blockIdx.z = batch (one chunk: head_dim <= CF_DCHUNK). The block loops
// over the query heads of its GQA group and the query tiles of CF_BLOCK_M rows that can see
// its keys, as flash_bwd.cu does.
//
// Shared memory (bytes), all dynamic, in this order:
//   sK, sV   CF_BLOCK_N x CF_HEAD_DIM each            (resident, loaded once)
//   sQ, sdO  CF_STAGES x CF_BLOCK_M x CF_HEAD_DIM each (streamed, cp.async pipeline)
//   sP, sdS  CF_BLOCK_N x CF_BLOCK_M each              (P^T, dS^T of the current query tile)
//   sLse, sDelta  CF_STAGES x CF_BLOCK_M floats each
//   SMEM = (2*CF_BLOCK_N*CF_HEAD_DIM + 2*CF_STAGES*CF_BLOCK_M*CF_HEAD_DIM
//           + 2*CF_BLOCK_N*CF_BLOCK_M) * 2 + 2*CF_STAGES*CF_BLOCK_M*4
//   (164864 B at head_dim 128 with 2 stages: fits the A100's 163 KB, one block per SM.)
//   Swizzles as in flash_bwd.cu (sP rows like sdS rows).
// Barriers per query tile: the pipeline's top one, and one between phases 1 and 2.
//
// Registers per thread: dK + dV accumulators CF_HEAD_DIM floats, S^T or dP^T 2 x kQW / 2
// floats, packed P^T 16 registers unless reloaded (CF_BWD_SPLIT_P_RELOAD): no spills (NVRTC
// 13.5, sm_80 and sm_90; bench/dev/compile_sweep.py checks every configuration).

#ifndef CF_WARPS
#define CF_WARPS 8  // the split layout is 8 warps (cf_config.cuh defaults to 4)
#endif
#ifndef CF_BLOCK_M
#define CF_BLOCK_M 64
#endif
#include "cf_config_bwd.cuh"  // the other ABI defaults (the registry passes them all)
// Tuning knobs (the host never sets them; the smem formula does not depend on them; the
// timings behind their defaults: bench/dev/bwd_variants.md):
// CF_BWD_SPLIT_PIPE = how split_scores walks head_dim (kPipe* below): 1 fully unrolled with the
// next step's fragments loaded ahead of the current step's mma; 3 the same in a rolled
// two-step loop (head_dim 128, where 1 spills in some modes); 0 a plain loop unrolled
// CF_BWD_SPLIT_KUNROLL times, for the score modifiers (cf_mask.cuh), which take registers too
// (ALiBi with softcap spilled up to 268 B with 1 or 3).
// CF_BWD_SPLIT_P_RELOAD = 1: P^T is read back from sP to form dS^T instead of being kept packed
// in 16 registers while dP^T accumulates; what lets the pipelined walks fit beside the 128
// accumulators of head_dim 128 without spilling.
// CF_BWD_SPLIT_QGD = warps across the dQ columns (the other 8 / QGD across its rows).
#ifndef CF_BWD_SPLIT_PIPE
#if CF_SOFTCAP || CF_ALIBI
#define CF_BWD_SPLIT_PIPE 0
#else
#define CF_BWD_SPLIT_PIPE (CF_HEAD_DIM > 96 ? 3 : 1)
#endif
#endif
#ifndef CF_BWD_SPLIT_KUNROLL
#define CF_BWD_SPLIT_KUNROLL 2
#endif
#ifndef CF_BWD_SPLIT_P_RELOAD
#define CF_BWD_SPLIT_P_RELOAD (CF_HEAD_DIM > 96 || CF_SOFTCAP || CF_ALIBI)
#endif
#ifndef CF_BWD_SPLIT_QGD
#define CF_BWD_SPLIT_QGD (CF_HEAD_DIM % 64 == 0 ? 4 : 2)
#endif

#include "cf_bwd_stream.cuh"  // and cf_bwd.cuh, cf_mask.cuh, cf_seq.cuh
#include "cf_params.cuh"

namespace bwd {
using namespace bwd_tile;  // kBM, kBN, kD, kWarps, kThreads, kStages, kCPR
enum : int {
  kSCPR = kBM / 8,  // 16-byte chunks per sP / sdS row
  // warp w = 2 wk + wh
  kKW = 32,  // keys per warp (rows kKW wk ..): S^T, dP^T, dK, dV
  kQW = kBM / 2,  // queries per warp in S^T / dP^T (columns kQW wh ..)
  kDW = kD / 2,  // dK / dV columns per warp (kDW wh ..)
  kQGD = CF_BWD_SPLIT_QGD,  // dQ: warps across the columns ...
  kQR = kBM / (8 / kQGD),  // ... each owning kQR query rows
  kQC = kD / kQGD,  // ... x kQC columns
  kSplitKUnroll = CF_BWD_SPLIT_KUNROLL,  // a name: nvcc does not expand macros in #pragma unroll
  // split_scores' walk over head_dim (CF_BWD_SPLIT_PIPE)
  kPipePlain = 0,  // a loop of split_scores_step
  kPipeAhead = 1,  // fully unrolled, step kk + 1's fragments loaded before step kk's mma
  kPipeAheadRolled = 3,  // the same in a rolled loop of two steps
  kPipe = CF_BWD_SPLIT_PIPE,
  kPReload = CF_BWD_SPLIT_P_RELOAD,
};

static_assert(kWarps == 8 && kBN == 128, "flash_bwd_split: 8 warps over 128 keys");
static_assert(kBM == 64 || kBM == 128, "flash_bwd_split: CF_BLOCK_M is 64 or 128");
static_assert(kD % 32 == 0 && kD <= 128 && CF_DCHUNK >= kD,
              "flash_bwd_split: the whole head_dim (a multiple of 32 up to 128) in one chunk");
static_assert(kStages == 1 || kStages == 2, "flash_bwd_split: CF_STAGES is 1 or 2");
static_assert(kPipe == kPipePlain || kPipe == kPipeAhead || kPipe == kPipeAheadRolled,
              "flash_bwd_split: CF_BWD_SPLIT_PIPE is 0, 1 or 3");
using Smem = KeyBlockSmem<kBM, kBN, kStages, 2>;  // sP, sdS after sQ, sdO
}  // namespace bwd


// The two elem_t of a packed pair as floats (.x = bits 0..15, as pack2 puts them).
__device__ __forceinline__ float2 unpack2(cf_u32 r) {
  return make_float2(elem_to_float((elem_t)(r & 0xffffu)), elem_to_float((elem_t)(r >> 16)));
}

// -- acc = X Y^T for one warp: kKW rows krow0.. of the resident sX (K or V) against kQW rows
// qrow0.. of the query tile tY (Q or dO), contracted over the whole bucket (columns >= head_dim
// are zero in both tiles). Per 16-column step: 2 + kQW / 16 ldmatrix.x4 feed 2 * kQW / 8 mma.
// Three walks over the steps (kPipe); the plain one is a loop of split_scores_step.
__device__ __forceinline__ void split_scores_step(float (&acc)[2][bwd::kQW / 8][4],
                                                  const elem_t* sX, const elem_t* tY, int krow0,
                                                  int qrow0, int kk, int lane) {
  using namespace bwd;
  cf_u32 a[2][4];  // A = X rows krow0 + 16 mi .. +15, columns 16 kk .. +15
  ldsm_a<kCPR>(a[0], sX, krow0, 2 * kk, lane);
  ldsm_a<kCPR>(a[1], sX, krow0 + 16, 2 * kk, lane);
#pragma unroll
  for (int j = 0; j < kQW / 16; ++j) {
    cf_u32 bq[4];  // B = Y^T: rows qrow0 + 16 j .. +15 (n), columns 16 kk .. +15 (k)
    ldsm_b<kCPR>(bq, tY, qrow0 + 16 * j, 2 * kk, lane);
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      mma_16816(acc[mi][2 * j], a[mi], bq[0], bq[1]);
      mma_16816(acc[mi][2 * j + 1], a[mi], bq[2], bq[3]);
    }
  }
}

// The fragments of step kk into one register buffer of the pipelined walks.
__device__ __forceinline__ void split_scores_load(cf_u32 (&a)[2][4],
                                                  cf_u32 (&bq)[bwd::kQW / 16][4],
                                                  const elem_t* sX, const elem_t* tY, int krow0,
                                                  int qrow0, int kk, int lane) {
  using namespace bwd;
  ldsm_a<kCPR>(a[0], sX, krow0, 2 * kk, lane);
  ldsm_a<kCPR>(a[1], sX, krow0 + 16, 2 * kk, lane);
#pragma unroll
  for (int j = 0; j < kQW / 16; ++j) ldsm_b<kCPR>(bq[j], tY, qrow0 + 16 * j, 2 * kk, lane);
}

// The mma of one step from one register buffer.
__device__ __forceinline__ void split_scores_mma(float (&acc)[2][bwd::kQW / 8][4],
                                                 const cf_u32 (&a)[2][4],
                                                 const cf_u32 (&bq)[bwd::kQW / 16][4]) {
  using namespace bwd;
#pragma unroll
  for (int j = 0; j < kQW / 16; ++j) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      mma_16816(acc[mi][2 * j], a[mi], bq[j][0], bq[j][1]);
      mma_16816(acc[mi][2 * j + 1], a[mi], bq[j][2], bq[j][3]);
    }
  }
}

__device__ __forceinline__ void split_scores(float (&acc)[2][bwd::kQW / 8][4], const elem_t* sX,
                                             const elem_t* tY, int krow0, int qrow0, int lane) {
  using namespace bwd;
  zero_acc(acc[0]);
  zero_acc(acc[1]);
  if constexpr (kPipe == kPipeAheadRolled) {
    // Two fragment buffers in a rolled loop of two steps: step kk + 1's fragments load while
    // step kk's mma run (kD / 16 is even for every bucket).
    cf_u32 a[2][2][4], bq[2][kQW / 16][4];
    split_scores_load(a[0], bq[0], sX, tY, krow0, qrow0, 0, lane);
#pragma unroll 1
    for (int kk = 0; kk < kD / 16; kk += 2) {
      split_scores_load(a[1], bq[1], sX, tY, krow0, qrow0, kk + 1, lane);
      split_scores_mma(acc, a[0], bq[0]);
      if (kk + 2 < kD / 16) split_scores_load(a[0], bq[0], sX, tY, krow0, qrow0, kk + 2, lane);
      split_scores_mma(acc, a[1], bq[1]);
    }
  } else if constexpr (kPipe == kPipeAhead) {
    // Fragments of step kk + 1 are loaded before the mma of step kk (two register buffers),
    // so the ldmatrix latency hides behind the previous step's mma.
    cf_u32 a[2][2][4], bq[2][kQW / 16][4];
    split_scores_load(a[0], bq[0], sX, tY, krow0, qrow0, 0, lane);
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      if (kk + 1 < kD / 16)
        split_scores_load(a[(kk + 1) & 1], bq[(kk + 1) & 1], sX, tY, krow0, qrow0, kk + 1, lane);
      split_scores_mma(acc, a[kk & 1], bq[kk & 1]);
    }
  } else {
#pragma unroll kSplitKUnroll
    for (int kk = 0; kk < kD / 16; ++kk) split_scores_step(acc, sX, tY, krow0, qrow0, kk, lane);
  }
}

// -- phase 1, one warp: S^T, P^T, dP^T, dS^T for keys krow0..+31 of the block x queries
// qcol0..+kQW-1 of the tile; P^T and dS^T (elem_t) to sP / sdS. key0 = n0 + krow0 and
// q0 = m0 + qcol0 are absolute. A block whose P^T is all zero (tails, causal) writes zeros.
__device__ __forceinline__ void split_p_ds(const elem_t* sK, const elem_t* sV, const elem_t* tQ,
                                           const elem_t* tdO, const float* tLse,
                                           const float* tDelta, elem_t* sP, elem_t* sdS,
                                           int krow0, int qcol0, int key0, int q0, int seqlen_q,
                                           int seqlen_k, const MaskPolicy& mask,
                                           const ScoreMods& mods, float scale_log2, int lane) {
  using namespace bwd;
  const int grp = lane >> 2, tig = lane & 3;
  const bool active = q0 < seqlen_q && key0 < seqlen_k &&
                      mask.any(q0, q0 + kQW - 1, key0, key0 + kKW - 1);
  if (!active) {
    const cf_u32 zero[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
      for (int ks = 0; ks < kQW / 16; ++ks) {
        store_frag<kSCPR>(sP, zero, krow0 + 16 * mi, qcol0 + 16 * ks, lane);
        store_frag<kSCPR>(sdS, zero, krow0 + 16 * mi, qcol0 + 16 * ks, lane);
      }
    }
    return;
  }

  // -- S^T = K Q^T; P^T = exp2(S^T scale_log2 - lse2_q), masked. C element e of tile (mi, n):
  // key = key0 + 16 mi + grp + 8 (e >> 1), query = q0 + 8 n + 2 tig + (e & 1).
  float s[2][kQW / 8][4];
  split_scores(s, sK, tQ, krow0, qcol0, lane);
  const bool need_mask = !mask.full(q0, q0 + kQW - 1, key0, key0 + kKW - 1);
  // softcap: 1 - tanh^2 per element waits in sdS (rounded to elem_t, as P^T is) where this
  // lane later writes dS^T: no registers held across the dP^T products
#pragma unroll
  for (int n = 0; n < kQW / 8; ++n) {
    const float2 lse = *reinterpret_cast<const float2*>(tLse + qcol0 + 8 * n + 2 * tig);
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      float t[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + 16 * mi + grp + 8 * (e >> 1);
        const int qi = q0 + 8 * n + 2 * tig + (e & 1);
        if (CF_SCORE_MODS) s[mi][n][e] = mods.apply(s[mi][n][e], qi, key, t[e]);
        float p = fast_exp2(fmaf(s[mi][n][e], scale_log2, -((e & 1) ? lse.y : lse.x)));
        if (need_mask && !mask.visible(qi, key)) p = 0.f;
        s[mi][n][e] = p;
      }
      if (CF_SOFTCAP) {
        const int row = krow0 + 16 * mi + grp, col = qcol0 + 8 * n + 2 * tig;
        *reinterpret_cast<cf_u32*>(sdS + swz_elem<kSCPR>(row, col)) =
            pack2(softcap_grad(t[0]), softcap_grad(t[1]));
        *reinterpret_cast<cf_u32*>(sdS + swz_elem<kSCPR>(row + 8, col)) =
            pack2(softcap_grad(t[2]), softcap_grad(t[3]));
      }
    }
  }
  // P^T leaves registers as elem_t pairs (the A-fragment packing): 16 registers instead of 32
  // while dP^T is accumulated, the difference between fitting beside dK / dV and spilling.
  cf_u32 pa[2][kQW / 16][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int ks = 0; ks < kQW / 16; ++ks) {
      c_to_a(pa[mi][ks], s[mi][2 * ks], s[mi][2 * ks + 1]);
      store_frag<kSCPR>(sP, pa[mi][ks], krow0 + 16 * mi, qcol0 + 16 * ks, lane);
    }
  }

  // -- dP^T = V dO^T; dS^T = P^T (dP^T - delta_q), with P^T as rounded to elem_t (the same P^T
  // that dV uses; 0 wherever masked, so dS^T is too)
  float dp[2][kQW / 8][4];
  split_scores(dp, sV, tdO, krow0, qcol0, lane);
  if constexpr (kPReload) {
    // P^T back from sP (each lane reads only what it stored: no barrier): the 16 registers of
    // the packed P^T are then free while dP^T is accumulated.
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ks = 0; ks < kQW / 16; ++ks)
        load_frag<kSCPR>(pa[mi][ks], sP, krow0 + 16 * mi, qcol0 + 16 * ks, lane);
  }
#pragma unroll
  for (int n = 0; n < kQW / 8; ++n) {
    const float2 dlt = *reinterpret_cast<const float2*>(tDelta + qcol0 + 8 * n + 2 * tig);
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      // C tile n = columns 8 (n & 1).. of A fragment n >> 1: rows g in register 2 (n & 1),
      // rows g + 8 in register 2 (n & 1) + 1
      const float2 p_lo = unpack2(pa[mi][n >> 1][2 * (n & 1)]);
      const float2 p_hi = unpack2(pa[mi][n >> 1][2 * (n & 1) + 1]);
      dp[mi][n][0] = p_lo.x * (dp[mi][n][0] - dlt.x);
      dp[mi][n][1] = p_lo.y * (dp[mi][n][1] - dlt.y);
      dp[mi][n][2] = p_hi.x * (dp[mi][n][2] - dlt.x);
      dp[mi][n][3] = p_hi.y * (dp[mi][n][3] - dlt.y);
      if (CF_SOFTCAP) {  // dS^T *= 1 - tanh^2 (the factors rounded to elem_t, as P^T is)
        const int row = krow0 + 16 * mi + grp, col = qcol0 + 8 * n + 2 * tig;
        const float2 g_lo =
            unpack2(*reinterpret_cast<const cf_u32*>(sdS + swz_elem<kSCPR>(row, col)));
        const float2 g_hi =
            unpack2(*reinterpret_cast<const cf_u32*>(sdS + swz_elem<kSCPR>(row + 8, col)));
        dp[mi][n][0] *= g_lo.x;
        dp[mi][n][1] *= g_lo.y;
        dp[mi][n][2] *= g_hi.x;
        dp[mi][n][3] *= g_hi.y;
      }
    }
  }
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int ks = 0; ks < kQW / 16; ++ks) {
      cf_u32 dsa[4];
      c_to_a(dsa, dp[mi][2 * ks], dp[mi][2 * ks + 1]);
      store_frag<kSCPR>(sdS, dsa, krow0 + 16 * mi, qcol0 + 16 * ks, lane);
    }
  }
}

// -- phase 2, one warp: dV += P^T dO, dK += dS^T Q for keys krow0..+31 x columns dcol0..
// +kDW-1, contracted over the tile's queries 16 ks_lo .. 16 ks_hi - 1 (the others have P^T =
// dS^T = 0). A operands from sP / sdS (every warp's phase 1 is behind a barrier), B from the
// query tile. Per 16 queries: 2 + kDW / 16 ldmatrix.x4 feed kDW / 4 mma, for each of dV, dK.
__device__ __forceinline__ void split_dkdv(const elem_t* sP, const elem_t* sdS, const elem_t* tQ,
                                           const elem_t* tdO, float (&acc_dk)[2][bwd::kDW / 8][4],
                                           float (&acc_dv)[2][bwd::kDW / 8][4], int krow0,
                                           int dcol0, int ks_lo, int ks_hi, int lane) {
  using namespace bwd;
#pragma unroll
  for (int ks = 0; ks < kBM / 16; ++ks) {
    if (ks < ks_lo || ks >= ks_hi) continue;
    cf_u32 pa[2][4];  // A = P^T: keys krow0 + 16 mi .. +15 x queries 16 ks .. +15
    ldsm_a<kSCPR>(pa[0], sP, krow0, 2 * ks, lane);
    ldsm_a<kSCPR>(pa[1], sP, krow0 + 16, 2 * ks, lane);
#pragma unroll
    for (int jj = 0; jj < kDW / 16; ++jj) {
      cf_u32 ob[4];  // B = dO: queries 16 ks .. +15 (k) x columns dcol0 + 16 jj .. +15 (n)
      ldsm_b_trans<kCPR>(ob, tdO, 16 * ks, dcol0 / 8 + 2 * jj, lane);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        mma_16816(acc_dv[mi][2 * jj], pa[mi], ob[0], ob[1]);
        mma_16816(acc_dv[mi][2 * jj + 1], pa[mi], ob[2], ob[3]);
      }
    }
    cf_u32 dsa[2][4];  // A = dS^T, same positions
    ldsm_a<kSCPR>(dsa[0], sdS, krow0, 2 * ks, lane);
    ldsm_a<kSCPR>(dsa[1], sdS, krow0 + 16, 2 * ks, lane);
#pragma unroll
    for (int jj = 0; jj < kDW / 16; ++jj) {
      cf_u32 qb[4];  // B = Q, as dO above
      ldsm_b_trans<kCPR>(qb, tQ, 16 * ks, dcol0 / 8 + 2 * jj, lane);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        mma_16816(acc_dk[mi][2 * jj], dsa[mi], qb[0], qb[1]);
        mma_16816(acc_dk[mi][2 * jj + 1], dsa[mi], qb[2], qb[3]);
      }
    }
  }
}

// -- phase 3, one warp: dQ[m0 + qr0 .. +kQR-1, qc0 .. +kQC-1] += dS K * softmax_scale, with
// atomics into dq_accum; warp w owns rows kQR (w / kQGD) and columns kQC (w % kQGD) of the
// tile. dS from sdS (.trans), K from sK. Per 16 keys: kQR / 16 + kQC / 16 ldmatrix.x4 feed
// kQR kQC / 128 mma. dq_rows as in bwd_dq_atomic.
__device__ __forceinline__ void split_dq(const elem_t* sdS, const elem_t* sK, float* dq_rows,
                                         cf_i64 dq_row_stride, int m0, int n0, int seqlen_q,
                                         int head_dim, const MaskPolicy& mask,
                                         float softmax_scale, int warp, int lane) {
  using namespace bwd;
  const int qr0 = kQR * (warp / kQGD), qc0 = kQC * (warp % kQGD);
  if (m0 + qr0 >= seqlen_q || qc0 >= head_dim) return;
  // the key steps that can hold a nonzero dS (cf_mask.cuh)
  const KeySteps<16> steps = key_steps<16>(mask, n0, n0 + kBN, m0 + qr0 + kQR - 1);
  if (!steps.any()) return;
  const int nks = steps.end();
  float acc[kQR / 16][kQC / 8][4];
#pragma unroll
  for (int mi = 0; mi < kQR / 16; ++mi) zero_acc(acc[mi]);
#pragma unroll
  for (int ks = 0; ks < kBN / 16; ++ks) {
    if (ks >= nks) break;
    cf_u32 a[kQR / 16][4];  // A = dS: rows qr0 + 16 mi .. +15 x keys 16 ks .. +15, from dS^T
#pragma unroll
    for (int mi = 0; mi < kQR / 16; ++mi)
      ldsm_a_trans<kSCPR>(a[mi], sdS, 16 * ks, qr0 / 8 + 2 * mi, lane);
#pragma unroll
    for (int jj = 0; jj < kQC / 16; ++jj) {
      cf_u32 kb[4];  // B = K: keys 16 ks .. +15 (k) x columns qc0 + 16 jj .. +15 (n)
      ldsm_b_trans<kCPR>(kb, sK, 16 * ks, qc0 / 8 + 2 * jj, lane);
#pragma unroll
      for (int mi = 0; mi < kQR / 16; ++mi) {
        mma_16816(acc[mi][2 * jj], a[mi], kb[0], kb[1]);
        mma_16816(acc[mi][2 * jj + 1], a[mi], kb[2], kb[3]);
      }
    }
  }
#pragma unroll
  for (int mi = 0; mi < kQR / 16; ++mi)
    atomic_acc(dq_rows, dq_row_stride, acc[mi], softmax_scale, m0 + qr0 + 16 * mi, seqlen_q, qc0,
               head_dim, lane);
}

extern "C" __global__ void __launch_bounds__(bwd::kThreads, 1)
    flash_bwd(CF_BWD_PARAMS, CF_MOD_PARAMS, CF_SEQ_PARAMS CF_BSP_PARAMS CF_DROP_PARAMS) {
  static_assert(!CF_DROPOUT, "the split layout has no dropout (the registry skips it)");
  using namespace bwd;
  extern __shared__ __align__(16) unsigned char cf_smem[];
  const Smem sm(cf_smem);
  elem_t* sP = sm.sS;               // kBN x kBM: P^T of the current query tile
  elem_t* sdS = sm.sS + kBN * kBM;  // kBN x kBM: dS^T

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.z;  // one chunk: head_dim <= CF_DCHUNK
  const int kvh = blockIdx.y;
  const int n0 = blockIdx.x * kBN;
  const SeqInfo seq(b, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;  // this sequence's
  if (CF_VARLEN && n0 >= seqlen_k) return;  // the grid covers the longest sequence
  const MaskPolicy mask(seqlen_q, seqlen_k, window_left, window_right);

  // -- the query tiles that see keys n0.., for each head of the group (cf_bwd_stream.cuh)
  const QueryOperands qops = CF_BWD_QUERY_ARGS;
  const QueryTileWalk<kBM> walk(query_tiles_of<kBM, kBN>(mask, n0), kvh, heads_per_kv,
                                CF_BSP_MASK, b, n0);
  const QueryStream<kBM, kBN, kThreads, kStages, Smem> stream(walk, qops, seq, sm, head_dim, tid);
  const int n_iter = walk.n_iter;

  // Warp w = 2 wk + wh: keys krow0 = 32 wk .. +31 of the block in every phase; queries
  // kQW wh .. of the tile in phase 1; dK / dV columns kDW wh .. in phase 2.
  const int wk = warp >> 1, wh = warp & 1;
  const int krow0 = kKW * wk, key0 = n0 + krow0;
  float acc_dk[2][kDW / 8][4], acc_dv[2][kDW / 8][4];
  zero_acc(acc_dk[0]);
  zero_acc(acc_dk[1]);
  zero_acc(acc_dv[0]);
  zero_acc(acc_dv[1]);

  stream.begin(CF_BWD_KEY_ARGS, kvh, n0);  // K, V and query tile 0

  // The top barrier of each iteration also guarantees that every warp is done reading sP / sdS
  // of iteration it-1.
#pragma unroll 1
  for (int it = 0; it < n_iter; ++it) {
    const QueryStage t = stream.top(it);

    // -- phase 1: P^T, dS^T of this warp's 32 keys x kQW queries into sP, sdS
    const ScoreMods mods(CF_MOD_ARGS, b, t.h, seqlen_q, seqlen_k);  // per query head (ALiBi)
    split_p_ds(sm.sK, sm.sV, t.q, t.dout, t.lse, t.delta, sP, sdS, krow0, kQW * wh, key0,
               t.m0 + kQW * wh, seqlen_q, seqlen_k, mask, mods, scale_log2, lane);
    __syncthreads();  // sP, sdS complete

    // -- phase 2: dK, dV over the query steps that see this warp's keys (cf_mask.cuh)
    const QuerySteps qs = query_steps<16, kBM>(mask, t.m0, key0, key0 + kKW - 1);
    split_dkdv(sP, sdS, t.q, t.dout, acc_dk, acc_dv, krow0, kDW * wh, qs.lo, qs.hi, lane);

    // -- phase 3: dQ
    if (CF_DQ_ATOMIC) {
      float* dq_rows = dq_accum + (seq.row_q() * heads + t.h) * head_dim;
      split_dq(sdS, sm.sK, dq_rows, (cf_i64)heads * head_dim, t.m0, n0, seqlen_q, head_dim, mask,
               softmax_scale, warp, lane);
    }
    stream.refill(it);
  }

  // -- epilogue: dK = acc_dk * softmax_scale, dV = acc_dv, rows < seqlen_k, cols < head_dim
  const KeyGrads grads = CF_BWD_GRAD_ARGS;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
    store_dk_dv(grads, seq, kvh, acc_dk[mi], acc_dv[mi], softmax_scale, key0 + 16 * mi, kDW * wh,
                head_dim, lane);
}

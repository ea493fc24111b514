// flash_bwd_dq.cu -- deterministic dQ of the FlashAttention-2 backward, fp16 / bf16 on tensor
// cores. No atomics: each block owns its dQ rows and sums over key tiles in a fixed order, so
// the result is bitwise identical run to run. Used with flash_bwd compiled CF_DQ_ATOMIC = 0.
//
// Algorithm (FlashAttention-2 Algorithm 2, the dQ half, looped the forward's way round):
// for the query rows i of this block, over the key tiles j that they can see:
//   S  = Q K^T                          (raw scores, fp32)
//   P  = exp2(S * scale_log2 - lse2_i)  (log2 units; lse2 = +inf makes the row's P 0)
//   dP = dO V^T
//   dS = P * (dP - delta_i)
//   dQ += dS K
// and at the end dq = dQ * softmax_scale, stored as elem_t.
//
// Grid (ceil(seqlen_q / CF_BLOCK_M), heads, batch): blockIdx.x = query tile (rows m0 = x *
// CF_BLOCK_M ..), blockIdx.y = query head h (reads kv head h / heads_per_kv: GQA by index
// mapping), blockIdx.z = batch.
//
// Tiles. CF_BLOCK_M = 16 * CF_WARPS; warp w owns query rows m0 + 16 w .. +15 for the whole
// kernel, its dQ accumulator is 16 x CF_HEAD_DIM (CF_HEAD_DIM / 2 floats per thread). Key tiles
// of CF_BLOCK_N rows are processed in sub-tiles of NSUB = min(CF_BLOCK_N, CF_BWD_NSUB) keys so S
// and dP take NSUB / 2 floats per thread each. The Q and dO tiles stay in shared memory (their
// A fragments are re-read per 16-column step); K and V stream through CF_STAGES stages.
//
// Shared memory (bytes), all dynamic, in this order:
//   sQ, sdO  CF_BLOCK_M x CF_HEAD_DIM each                 (resident)
//   sK, sV   CF_STAGES x CF_BLOCK_N x CF_HEAD_DIM each      (streamed, cp.async pipeline)
//   SMEM = (2*CF_BLOCK_M + 2*CF_STAGES*CF_BLOCK_N) * CF_HEAD_DIM * 2
//   (head_dim 256, 1 warp, block_n 16, 1 stage: 32768 B.) Tiles are row-major with 16-byte
//   chunks swizzled by swizzle_chunk<CF_HEAD_DIM / 8>; rows past seqlen_q / seqlen_k and
//   columns past head_dim are zero-filled.
//
// Registers per thread: dQ accumulator CF_HEAD_DIM / 2 floats, S + dP NSUB floats; at
// head_dim 256 that is 128 + 32 (+ addresses): ~225 registers, no spills (NVRTC 13.5, sm_80
// and sm_90; bench/dev/compile_sweep.py checks every configuration).
//
// Pipeline (per key tile `it`): wait for its cp.async group, __syncthreads (publishes it and
// frees the other stage), issue tile it+1 into the other stage (2 stages), compute; 1 stage:
// a second __syncthreads after the compute, then tile it+1 is issued.
//
// Layouts: q, dout, dq (batch, seqlen_q, heads, head_dim); k, v (batch, seqlen_k, heads_kv,
// head_dim); strides in elements, head_dim contiguous. lse2, delta float32 (batch, heads,
// seqlen_q), lse2 in log2 units (+inf for a row that sees no key, so its dq is 0).
// Causal is bottom-right aligned: query i sees key j iff j <= i + seqlen_k - seqlen_q. The
// mask (causal or a local window), the query / key tile ranges and the score modifiers
// (softcap with its 1 - tanh^2 in dS, ALiBi) come from cf_mask.cuh (docs/masks.md).
// Every dq element of a row < seqlen_q, column < head_dim is written.
//
// Host contract (docs/kernel_abi.md): head_dim a multiple of 8 with 8 <= head_dim <=
// CF_HEAD_DIM; row starts of q, k, v, dout 16-byte aligned and of dq 4-byte aligned;
// heads == heads_kv * heads_per_kv; seqlen_q + seqlen_k < 2^31.

#include "cf_config.cuh"  // the ABI defaults (the registry passes them all)
// Internal tuning knobs (the host never sets them; the smem formula does not depend on them):
// CF_BWD_NSUB = keys of S / dP held in registers at once (NSUB / 2 floats each per thread);
// CF_BWD_KUNROLL = unroll factor of the head_dim k-loop of S / dP; 1 from head_dim 192, where
// the dQ accumulator alone is 96-128 floats (unroll 2 costs ~20 registers there).
#ifndef CF_BWD_NSUB
#define CF_BWD_NSUB 32
#endif
#ifndef CF_BWD_KUNROLL
#define CF_BWD_KUNROLL (CF_HEAD_DIM >= 192 ? 1 : 2)
#endif

#include "cf_bwd_stream.cuh"  // and cf_bwd.cuh, cf_mask.cuh, cf_seq.cuh
#include "cf_params.cuh"

namespace bwd_dq {
using namespace bwd_tile;  // kBM, kBN, kD, kWarps, kThreads, kStages, kCPR
enum : int {
  kNS = CF_BLOCK_N < CF_BWD_NSUB ? CF_BLOCK_N : CF_BWD_NSUB,
  kKUnroll = CF_BWD_KUNROLL,  // a name: nvcc does not expand macros in #pragma unroll
  kSmemBytes = (2 * kBM + 2 * kStages * kBN) * kD * 2,
};

static_assert(kBM == 16 * kWarps, "flash_bwd_dq: CF_BLOCK_M must be 16 * CF_WARPS");
static_assert(kBN % 16 == 0 && kBN >= 16, "flash_bwd_dq: CF_BLOCK_N a multiple of 16");
static_assert(kNS % 16 == 0 && kBN % kNS == 0, "flash_bwd_dq: CF_BWD_NSUB must divide CF_BLOCK_N");
static_assert(kD % 32 == 0 && kD <= 256, "flash_bwd_dq: CF_HEAD_DIM a multiple of 32 up to 256");
static_assert(kStages == 1 || kStages == 2, "flash_bwd_dq: CF_STAGES is 1 or 2");
}  // namespace bwd_dq

// -- one key sub-tile for one warp: S, dP, P, dS, then acc += dS K ----------------------------
// tK / tV: this key tile's stage; ns: first row of the sub-tile inside the tile, key0 = n0 + ns
// its absolute key; row0 = m0 + 16 * warp the warp's first query row, sqrow0 = 16 * warp its
// row in sQ / sdO. lse[h] / dlt[h]: lse2 and delta of rows row0 + grp + 8 h.
__device__ __forceinline__ void dq_subtile(const elem_t* sQ, const elem_t* sdO, const elem_t* tK,
                                           const elem_t* tV, float (&acc)[bwd_dq::kD / 8][4],
                                           const float lse[2], const float dlt[2], int ns,
                                           int key0, int row0, int sqrow0, int seqlen_k,
                                           int head_dim, const MaskPolicy& mask,
                                           const ScoreMods& mods, float scale_log2,
                                           const Dropout& drop, unsigned int bh, int lane) {
  using namespace bwd_dq;
  const int grp = lane >> 2, tig = lane & 3;
  // Skip when the warp's 16 x kNS block of P is all 0: keys past seqlen_k, or no visible
  // pair (cf_mask.cuh).
  if (key0 >= seqlen_k || !mask.any(row0, row0 + 15, key0, key0 + kNS - 1)) return;

  // -- S = Q K^T, dP = dO V^T over the whole head_dim (16 x kNS per warp)
  float s[kNS / 8][4], dp[kNS / 8][4];
  scores_and_dp<kNS, kKUnroll>(s, dp, sQ, sdO, sqrow0, tK, tV, ns, head_dim, lane);

  // -- S modified (cf_mask.cuh); P = exp2(S scale_log2 - lse2_i), masked;
  // dS = P (dP - delta_i) (times softcap's 1 - tanh^2)
  // C element e of n-tile n: row = row0 + grp + 8 (e >> 1), key = key0 + 8 n + 2 tig + (e & 1).
  const bool need_mask = !mask.full(row0, row0 + 15, key0, key0 + kNS - 1);
  // dropout (docs/dropout.md): dS = P (dP Z / (1 - p) - delta)
  const unsigned long long keep = drop.keep_bits<kNS / 8>(bh, row0 + grp, key0 + 2 * tig);
#pragma unroll
  for (int n = 0; n < kNS / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = row0 + grp + 8 * (e >> 1);
      const int key = key0 + 8 * n + 2 * tig + (e & 1);
      float t = 0.f;
      if (CF_SCORE_MODS) s[n][e] = mods.apply(s[n][e], row, key, t);
      float p = fast_exp2(fmaf(s[n][e], scale_log2, -lse[e >> 1]));
      if (need_mask && !mask.visible(row, key)) p = 0.f;
      const float dpz = drop.apply(Dropout::bit(keep, n, e), dp[n][e]);
      dp[n][e] = p * (dpz - dlt[e >> 1]) * softcap_grad(t);
    }
  }

  // -- acc += dS K: contraction over the sub-tile's keys
#pragma unroll
  for (int ks = 0; ks < kNS / 16; ++ks) {
    cf_u32 dsa[4];  // A fragment: rows row0..+15 x keys ns+16ks..+15
    c_to_a(dsa, dp[2 * ks], dp[2 * ks + 1]);
#pragma unroll
    for (int jj = 0; jj < kD / 16; ++jj) {
      if (16 * jj < head_dim) {
        cf_u32 kb[4];
        // kb: B = K, keys ns+16ks..+15 (k) x cols 16jj..+15 (n), .trans: regs =
        // (k0-7,n0-7) (k8-15,n0-7) -> n-tile 2jj; (k0-7,n8-15) (k8-15,n8-15) -> n-tile 2jj+1
        ldsm_b_trans<kCPR>(kb, tK, ns + 16 * ks, 2 * jj, lane);
        mma_16816(acc[2 * jj], dsa, kb[0], kb[1]);
        mma_16816(acc[2 * jj + 1], dsa, kb[2], kb[3]);
      }
    }
  }
}

// minBlocksPerSM = 1 lets ptxas use up to 255 registers: without it ptxas sometimes aims at
// 168 (three 128-thread blocks per SM) and spills a few bytes (seen at head_dim 32, 192, 224).
extern "C" __global__ void __launch_bounds__(bwd_dq::kThreads, 1)
    flash_bwd_dq(CF_BWD_DQ_PARAMS, CF_MOD_PARAMS, CF_SEQ_PARAMS CF_BSP_PARAMS CF_DROP_PARAMS) {
  using namespace bwd_dq;
  CF_REQUIRE_SMEM(kSmemBytes);
  extern __shared__ __align__(16) unsigned char cf_smem[];
  elem_t* sQ = reinterpret_cast<elem_t*>(cf_smem);
  elem_t* sdO = sQ + kBM * kD;
  elem_t* sK = sdO + kBM * kD;            // kStages x kBN x kD
  elem_t* sV = sK + kStages * kBN * kD;   // kStages x kBN x kD

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int grp = lane >> 2;
  const int m0 = blockIdx.x * kBM, h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq(b, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;  // this sequence's
  if (CF_VARLEN && m0 >= seqlen_q) return;  // the grid covers the longest sequence
  const int kvh = h / heads_per_kv;
  const int row0 = m0 + 16 * warp;

  // -- key tiles this query tile can see: [tiles.begin, tiles.end) (cf_mask.cuh)
  const MaskPolicy mask(seqlen_q, seqlen_k, window_left, window_right);
  const KeyTiles tiles = key_tiles_of<kBN, kBM>(mask, m0);
  const KeptKeyTiles<kBN> kept(CF_BSP_MASK, b, h, m0, tiles);  // all: no block mask
  const int n_tiles = kept.count();
  const KeptSteps<KeptKeyTiles<kBN>> key_tile(kept, kept.begin);  // iteration it's key tile
  const ScoreMods mods(CF_MOD_ARGS, b, h, seqlen_q, seqlen_k);
  const Dropout drop = CF_DROP;  // keeps everything without CF_DROPOUT

  // lse2 and delta of this thread's two rows (+inf and 0 past seqlen_q: P = dS = 0 there)
  float lse[2], dlt[2];
  {
    const cf_i64 stat = seq.stats(h);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + grp + 8 * half;
      lse[half] = row < seqlen_q ? lse2[stat + row] : CF_INF;
      dlt[half] = row < seqlen_q ? delta[stat + row] : 0.f;
    }
  }

  const elem_t* k_head = k + seq.k_offset(stride_kb, stride_kn) + kvh * stride_kh;
  const elem_t* v_head = v + seq.k_offset(stride_vb, stride_vn) + kvh * stride_vh;
  auto load_kv_tile = [&](int it, int st) {
    const int n0 = key_tile(it) * kBN;
    load_tile_async<kBN, kThreads>(sK + st * kBN * kD, k_head + n0 * stride_kn, stride_kn,
                                   seqlen_k - n0, head_dim, tid);
    load_tile_async<kBN, kThreads>(sV + st * kBN * kD, v_head + n0 * stride_vn, stride_vn,
                                   seqlen_k - n0, head_dim, tid);
  };

  float acc[kD / 8][4];  // this warp's 16 query rows x all head_dim columns of dQ
  zero_acc(acc);

  // -- prologue: Q, dO (resident) and key tile 0 in one cp.async group
  if (n_tiles > 0) {
    load_tile_async<kBM, kThreads>(sQ, q + seq.q_offset(stride_qb, stride_qm) +
                                           h * stride_qh + m0 * stride_qm,
                                   stride_qm, seqlen_q - m0, head_dim, tid);
    load_tile_async<kBM, kThreads>(sdO, dout + seq.q_offset(stride_dob, stride_dom) +
                                            h * stride_doh + m0 * stride_dom,
                                   stride_dom, seqlen_q - m0, head_dim, tid);
    load_kv_tile(0, 0);
    cp_async_commit();
  }

  // The key tiles stream through the stages (cf_bwd_stream.cuh).
#pragma unroll 1
  for (int it = 0; it < n_tiles; ++it) {
    const int st = stream_top<kStages>(it, n_tiles, load_kv_tile);
    const elem_t* tK = sK + st * kBN * kD;
    const elem_t* tV = sV + st * kBN * kD;
    if (row0 < seqlen_q) {
#pragma unroll 1
      for (int ns = 0; ns < kBN; ns += kNS)
        dq_subtile(sQ, sdO, tK, tV, acc, lse, dlt, ns, key_tile(it) * kBN + ns, row0,
                   16 * warp, seqlen_k, head_dim, mask, mods, scale_log2, drop,
                   drop.head(b, h, heads), lane);
    }
    stream_refill<kStages>(it, n_tiles, load_kv_tile);
  }

  // -- epilogue: dq = acc * softmax_scale, rows < seqlen_q, cols < head_dim (all of them:
  // a row that sees no key gets zeros)
  store_acc(dq + seq.q_offset(stride_dqb, stride_dqm) +
                h * stride_dqh, stride_dqm, acc, softmax_scale, row0, seqlen_q,
            0, head_dim, lane);
}

// flash_bwd.cu -- FlashAttention-2 backward (Dao 2023, Algorithm 2), fp16 / bf16 on tensor cores:
// dK and dV for one block of keys, 16 keys per warp, and (CF_DQ_ATOMIC = 1) dQ accumulated with
// float atomics.
//
// Algorithm. For the keys j of this block and every query i that can see them:
//   S^T = K Q^T                                   (raw scores q_i . k_j, fp32)
//   P^T = exp2(S^T * scale_log2 - lse2_i)         (log2 units; lse2 = +inf makes P = 0)
//   dP^T = V dO^T
//   dS^T = P^T * (dP^T - delta_i)                 (delta_i = rowsum(dO_i * O_i), preprocess)
//   dV += P^T dO          dK += dS^T Q            (this block's head-dim chunk of columns)
//   dQ += dS K * softmax_scale                    (atomics into float dq_accum, chunk columns)
// and at the end dK *= softmax_scale. Everything is computed transposed (keys are the M
// dimension of every mma) so that P^T and dS^T are A operands straight from the C fragments.
//
// Grid (ceil(seqlen_k / CF_BLOCK_N), heads_kv, batch * n_chunks):
//   blockIdx.x = key block (keys n0 = x * CF_BLOCK_N .. +CF_BLOCK_N-1), blockIdx.y = kv head,
//   blockIdx.z = batch * n_chunks + chunk, n_chunks = ceil(head_dim / CF_DCHUNK); the block owns
//   dK, dV (and its dQ contributions) for columns c0 = chunk * CF_DCHUNK .. +CF_DCHUNK-1.
//   S and dP contract over the full head_dim, so every chunk recomputes them: chunking trades
//   recomputation for registers (dK + dV accumulators are CF_DCHUNK floats per thread).
//   The block loops over the query heads h = kvh * heads_per_kv + g of its GQA group (GQA by
//   index mapping, the dK/dV sums stay on chip) and over the query tiles of CF_BLOCK_M rows
//   that can see its keys (causal: from the tile holding the first row i with
//   i + seqlen_k - seqlen_q >= n0).
//
// Tiles. CF_BLOCK_N = 16 * CF_WARPS; warp w owns key rows 16 w .. 16 w + 15 of the block for the
// whole kernel (S^T, dP^T rows, dK and dV rows). Query tiles are processed in sub-tiles of
// MSUB = min(CF_BLOCK_M, CF_BWD_MSUB) columns so S^T and dP^T take MSUB / 2 floats per thread
// each; a warp skips a sub-tile whose P^T block is all zero (causal, tails). dQ: after a query
// tile, every warp's dS^T rows sit in shared memory; the CF_BLOCK_M x CF_DCHUNK dQ update is
// cut into pieces of 16 query rows x PW columns (PW = 64, or 32 when the chunk is not a
// multiple of 64 columns) dealt round-robin to the warps, each piece added to dq_accum with
// red.global.add.v2.f32 (sm_90; two scalar atomics before).
//
// The split layout (8 warps over 128 keys, FlashAttention-2's work split across three
// phases) is its own kernel, flash_bwd_split.cu; the registry picks it for 8 warps with the
// whole head_dim <= 128 in one chunk (registry.bwd_split_layout), this file for the rest.
//
// Registers per thread: dK + dV accumulators min(CF_DCHUNK, CF_HEAD_DIM) floats, S^T + dP^T
// MSUB floats, a dQ piece PW / 2 floats (not live at the same time as S^T / dP^T). With
// chunk 128 this is 128 + 32 (+ addresses): 230-250 registers, no spills (NVRTC 13.5, sm_80
// and sm_90; bench/dev/compile_sweep.py checks every configuration).
//
// Pipeline (per query tile `it`, cf_bwd_stream.cuh): wait for its cp.async group,
// __syncthreads (publishes it and frees the other stage), issue tile it+1 into the other stage
// (2 stages), compute, and with CF_DQ_ATOMIC a second __syncthreads before the dQ pieces read
// sdS. 1 stage: tile it+1 is issued after the last read of stage 0 (after the second barrier,
// or a barrier of its own).
//
// Shared memory (bytes), all dynamic, in this order:
//   sK, sV   CF_BLOCK_N x CF_HEAD_DIM each            (resident, loaded once)
//   sQ, sdO  CF_STAGES x CF_BLOCK_M x CF_HEAD_DIM each (streamed, cp.async pipeline)
//   sdS      CF_BLOCK_N x CF_BLOCK_M                   (dS^T of the current query tile)
//   sLse, sDelta  CF_STAGES x CF_BLOCK_M floats each
//   SMEM = (2*CF_BLOCK_N*CF_HEAD_DIM + 2*CF_STAGES*CF_BLOCK_M*CF_HEAD_DIM
//           + CF_BLOCK_N*CF_BLOCK_M) * 2 + 2*CF_STAGES*CF_BLOCK_M*4
//   (head_dim 256, block_n 16, block_m 16, 1 stage: 33408 B, under the 48 KB floor.)
//   D-tiles are row-major with 16-byte chunks swizzled by swizzle_chunk<CF_HEAD_DIM / 8>;
//   sdS rows hold CF_BLOCK_M / 8 chunks, swizzled by bwd_swizzle (cf_bwd.cuh). Rows past
//   seqlen_q / seqlen_k and columns past head_dim are zero-filled on load; query rows past
//   seqlen_q get lse2 = +inf and delta = 0 so their P and dS are exactly 0.
//
// Layouts: q, dout (batch, seqlen_q, heads, head_dim); k, v, dk, dv (batch, seqlen_k,
// heads_kv, head_dim), strides in elements, head_dim contiguous. lse2, delta float32
// (batch, heads, seqlen_q), lse2 in log2 units. dq_accum float32 contiguous (batch, seqlen_q,
// heads, head_dim), zeroed by the launcher, receives dQ already times softmax_scale.
// Causal is bottom-right aligned: query i sees key j iff j <= i + seqlen_k - seqlen_q. The
// mask (causal or a local window), the query / key tile ranges and the score modifiers
// (softcap with its 1 - tanh^2 in dS, ALiBi) come from cf_mask.cuh (docs/masks.md).
// Every dk / dv element of a row < seqlen_k is written (zeros for keys no query sees).
//
// Host contract (docs/kernel_abi.md): head_dim a multiple of 8 with 8 <= head_dim <=
// CF_HEAD_DIM; row starts of q, k, v, dout 16-byte aligned and of dk, dv 4-byte aligned;
// CF_DCHUNK a multiple of 64 unless it covers the whole bucket (the host's 64 or
// min(CF_HEAD_DIM, 128)); heads == heads_kv * heads_per_kv; dq_accum zeroed when
// CF_DQ_ATOMIC (it may be null otherwise); seqlen_q, seqlen_k >= 1 and their sum < 2^31.

#include "cf_config_bwd.cuh"  // the ABI defaults (the registry passes them all)
// Internal tuning knobs (the host never sets them; the smem formula does not depend on them):
// CF_BWD_MSUB = query columns of S^T / dP^T held in registers at once (MSUB / 2 floats each per
// thread). 32 when the dK + dV accumulators are large (a chunk of >= 96 columns), else 64:
// with 64 at chunk 128, ptxas (NVRTC 13.5) needs all 255 registers and spills a few.
// CF_BWD_KUNROLL = unroll factor of the head_dim k-loop of S^T / dP^T.
#ifndef CF_BWD_MSUB
#define CF_BWD_MSUB ((CF_DCHUNK < CF_HEAD_DIM ? CF_DCHUNK : CF_HEAD_DIM) >= 96 ? 32 : 64)
#endif
#ifndef CF_BWD_KUNROLL
#define CF_BWD_KUNROLL 2
#endif

#include "cf_bwd_stream.cuh"  // and cf_bwd.cuh, cf_mask.cuh, cf_seq.cuh
#include "cf_params.cuh"

namespace bwd {
using namespace bwd_tile;  // kBM, kBN, kD, kWarps, kThreads, kStages, kCPR
enum : int {
  kDC = CF_DCHUNK < CF_HEAD_DIM ? CF_DCHUNK : CF_HEAD_DIM,  // chunk columns held
  kMS = CF_BLOCK_M < CF_BWD_MSUB ? CF_BLOCK_M : CF_BWD_MSUB,
  kSCPR = kBM / 8,  // 16-byte chunks per sdS row
  kKUnroll = CF_BWD_KUNROLL,  // a name: nvcc does not expand macros in #pragma unroll
  kPW = kDC % 64 == 0 ? 64 : 32,  // dQ piece width
};
using Smem = KeyBlockSmem<kBM, kBN, kStages, 1>;  // sdS after sQ, sdO

static_assert(kBN == 16 * kWarps, "flash_bwd: CF_BLOCK_N must be 16 * CF_WARPS");
static_assert(kBM % 16 == 0 && kBM >= 16 && kBM <= 128, "flash_bwd: CF_BLOCK_M in 16..128");
static_assert(kMS % 16 == 0 && kBM % kMS == 0, "flash_bwd: CF_BWD_MSUB must divide CF_BLOCK_M");
static_assert(kD % 32 == 0 && kD <= 256, "flash_bwd: CF_HEAD_DIM a multiple of 32 up to 256");
static_assert(CF_DCHUNK % 32 == 0 && CF_DCHUNK <= 128, "flash_bwd: CF_DCHUNK in {32,64,96,128}");
// c0 = chunk * CF_DCHUNK is then 0 or a multiple of 64 columns, which the column-shifted
// ldmatrix addressing relies on (cf_bwd.cuh); the dQ pieces start at multiples of kPW columns.
static_assert(CF_DCHUNK % 64 == 0 || CF_DCHUNK >= CF_HEAD_DIM,
              "flash_bwd: a chunk narrower than head_dim must be a multiple of 64 columns");
static_assert(kStages == 1 || kStages == 2, "flash_bwd: CF_STAGES is 1 or 2");
}  // namespace bwd

// -- one query sub-tile for one warp: S^T, dP^T, P^T, dS^T; dV, dK updates; dS^T to smem -----
// tQ / tdO / tLse / tDelta: this query tile's stage; qs: first column of the sub-tile inside
// the tile, q0 = m0 + qs its absolute query row; krow0 = 16 * warp (row in sK, sV, sdS),
// key0 = n0 + krow0 (absolute key).
__device__ __forceinline__ void bwd_subtile(
    const elem_t* sK, const elem_t* sV, const elem_t* tQ, const elem_t* tdO, const float* tLse,
    const float* tDelta, elem_t* sdS, float (&acc_dk)[bwd::kDC / 8][4],
    float (&acc_dv)[bwd::kDC / 8][4], int qs, int q0, int krow0, int key0, int c0,
    int seqlen_q, int seqlen_k, int head_dim, const MaskPolicy& mask, const ScoreMods& mods,
    float scale_log2, const Dropout& drop, unsigned int bh, int lane) {
  using namespace bwd;
  const int grp = lane >> 2, tig = lane & 3;
  // Skip when every P^T entry of this warp's 16 x kMS block is 0: queries all past seqlen_q,
  // keys all past seqlen_k, or no visible pair (cf_mask.cuh).
  const bool active = q0 < seqlen_q && key0 < seqlen_k &&
                      mask.any(q0, q0 + kMS - 1, key0, key0 + 15);
  if (!active) {
    if (CF_DQ_ATOMIC) {  // the dQ pieces read every row of sdS: leave zeros
      const cf_u32 zero[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int ks = 0; ks < kMS / 16; ++ks) store_frag<kSCPR>(sdS, zero, krow0, qs + 16 * ks, lane);
    }
    return;
  }

  // -- S^T = K Q^T and dP^T = V dO^T over the whole head_dim (16 x kMS per warp)
  float s[kMS / 8][4], dp[kMS / 8][4];
  scores_and_dp<kMS, kKUnroll>(s, dp, sK, sV, krow0, tQ, tdO, qs, head_dim, lane);

  // -- S^T modified (cf_mask.cuh); P^T = exp2(S^T scale_log2 - lse2_q), masked;
  // dS^T = P^T (dP^T - delta_q) (times softcap's 1 - tanh^2); dropout (docs/dropout.md):
  // dP^T Z / (1 - p) in dS^T, P^T Z / (1 - p) for dV.
  // C element e of n-tile n: key = key0 + grp + 8 (e >> 1), query = q0 + 8 n + 2 tig + (e & 1).
  const bool need_mask = !mask.full(q0, q0 + kMS - 1, key0, key0 + 15);
  const unsigned long long keep = drop.keep_bits<kMS / 8, true>(bh, key0 + grp, q0 + 2 * tig);
#pragma unroll
  for (int n = 0; n < kMS / 8; ++n) {
    const float2 lse = *reinterpret_cast<const float2*>(tLse + qs + 8 * n + 2 * tig);
    const float2 dlt = *reinterpret_cast<const float2*>(tDelta + qs + 8 * n + 2 * tig);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = key0 + grp + 8 * (e >> 1);
      const int qi = q0 + 8 * n + 2 * tig + (e & 1);
      float t = 0.f;
      if (CF_SCORE_MODS) s[n][e] = mods.apply(s[n][e], qi, key, t);
      float p = fast_exp2(fmaf(s[n][e], scale_log2, -((e & 1) ? lse.y : lse.x)));
      if (need_mask && !mask.visible(qi, key)) p = 0.f;
      const bool kept = Dropout::bit(keep, n, e);
      s[n][e] = drop.apply(kept, p);
      dp[n][e] = p * (drop.apply(kept, dp[n][e]) - ((e & 1) ? dlt.y : dlt.x)) * softcap_grad(t);
    }
  }

  // -- dV += P^T dO[:, chunk], dK += dS^T Q[:, chunk]; contraction over the sub-tile's queries
#pragma unroll
  for (int ks = 0; ks < kMS / 16; ++ks) {
    cf_u32 pa[4], dsa[4];  // A fragments: keys krow0..+15 x queries qs+16ks..+15
    c_to_a(pa, s[2 * ks], s[2 * ks + 1]);
    c_to_a(dsa, dp[2 * ks], dp[2 * ks + 1]);
#pragma unroll
    for (int jj = 0; jj < kDC / 16; ++jj) {
      if (c0 + 16 * jj < head_dim) {
        cf_u32 ob[4], qb[4];
        // ob / qb: B = dO / Q, queries qs+16ks..+15 (k) x cols c0+16jj..+15 (n), .trans: regs =
        // (k0-7,n0-7) (k8-15,n0-7) -> n-tile 2jj; (k0-7,n8-15) (k8-15,n8-15) -> n-tile 2jj+1
        ldsm_b_trans<kCPR>(ob, tdO + c0, qs + 16 * ks, 2 * jj, lane);
        mma_16816(acc_dv[2 * jj], pa, ob[0], ob[1]);
        mma_16816(acc_dv[2 * jj + 1], pa, ob[2], ob[3]);
        ldsm_b_trans<kCPR>(qb, tQ + c0, qs + 16 * ks, 2 * jj, lane);
        mma_16816(acc_dk[2 * jj], dsa, qb[0], qb[1]);
        mma_16816(acc_dk[2 * jj + 1], dsa, qb[2], qb[3]);
      }
    }
    if (CF_DQ_ATOMIC)  // dS^T (elem_t) to smem, A-fragment element positions
      store_frag<kSCPR>(sdS, dsa, krow0, qs + 16 * ks, lane);
  }
}

// -- dQ[m0.., c0..] += dS K[:, chunk] * softmax_scale, atomics into dq_accum -------------------
// Needs every warp's dS^T rows in sdS (a __syncthreads before). Pieces of 16 query rows x kPW
// columns, piece p -> warp p % kWarps. dq_rows = dq_accum at (batch b, query row 0, head h,
// column 0); consecutive query rows are heads * head_dim floats apart.
__device__ __forceinline__ void bwd_dq_atomic(const elem_t* sdS, const elem_t* sK, float* dq_rows,
                                              cf_i64 dq_row_stride, int m0, int n0, int c0,
                                              int seqlen_q, int head_dim,
                                              const MaskPolicy& mask, float softmax_scale,
                                              int warp, int lane) {
  using namespace bwd;
  constexpr int kNPC = kDC / kPW;               // pieces per row band
  constexpr int kPieces = (kBM / 16) * kNPC;
  for (int p = warp; p < kPieces; p += kWarps) {
    const int pr = p / kNPC;
    const int qr0 = m0 + 16 * pr, col0 = c0 + kPW * (p - pr * kNPC);
    if (qr0 >= seqlen_q || col0 >= head_dim) continue;
    float acc[kPW / 8][4];
    zero_acc(acc);
    // dS is 0 from the first key step that the piece's rows cannot see on (cf_mask.cuh)
    for_key_steps<16, kBN / 16>(mask, n0, qr0 + 15, [&](int ks) {
      cf_u32 a[4];
      // a: A = dS, queries qr0..+15 (m) x keys 16ks..+15 (k), from dS^T rows 16ks..+15, .trans:
      // regs = (k0-7,m0-7)^T (k0-7,m8-15)^T (k8-15,m0-7)^T (k8-15,m8-15)^T = a0 a1 a2 a3
      ldsm_a_trans<kSCPR>(a, sdS, 16 * ks, 2 * pr, lane);
#pragma unroll
      for (int jj = 0; jj < kPW / 16; ++jj) {
        if (col0 + 16 * jj < head_dim) {
          cf_u32 kb[4];
          // kb: B = K, keys 16ks..+15 (k) x cols col0+16jj..+15 (n), .trans: regs =
          // (k0-7,n0-7) (k8-15,n0-7) -> n-tile 2jj; (k0-7,n8-15) (k8-15,n8-15) -> 2jj+1
          ldsm_b_trans<kCPR>(kb, sK + col0, 16 * ks, 2 * jj, lane);
          mma_16816(acc[2 * jj], a, kb[0], kb[1]);
          mma_16816(acc[2 * jj + 1], a, kb[2], kb[3]);
        }
      }
    });
    atomic_acc(dq_rows, dq_row_stride, acc, softmax_scale, qr0, seqlen_q, col0, head_dim, lane);
  }
}

// minBlocksPerSM = 1 lets ptxas use up to 255 registers: without it ptxas sometimes aims at
// 168 (three 128-thread blocks per SM) and spills a few bytes (seen at head_dim 32, 192, 224).
extern "C" __global__ void __launch_bounds__(bwd::kThreads, 1)
    flash_bwd(CF_BWD_PARAMS, CF_MOD_PARAMS, CF_SEQ_PARAMS CF_BSP_PARAMS CF_DROP_PARAMS) {
  using namespace bwd;
  extern __shared__ __align__(16) unsigned char cf_smem[];
  const Smem sm(cf_smem);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n_chunks = (head_dim + CF_DCHUNK - 1) / CF_DCHUNK;
  const int chunk = blockIdx.z % n_chunks, b = blockIdx.z / n_chunks;
  const int kvh = blockIdx.y;
  const int n0 = blockIdx.x * kBN;
  const SeqInfo seq(b, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;  // this sequence's
  if (CF_VARLEN && n0 >= seqlen_k) return;  // the grid covers the longest sequence
  const int c0 = chunk * CF_DCHUNK;
  const MaskPolicy mask(seqlen_q, seqlen_k, window_left, window_right);
  const Dropout drop = CF_DROP;  // keeps everything without CF_DROPOUT

  // -- the query tiles that see keys n0.., for each head of the group (cf_bwd_stream.cuh)
  const QueryOperands qops = CF_BWD_QUERY_ARGS;
  const QueryTileWalk<kBM> walk(query_tiles_of<kBM, kBN>(mask, n0), kvh, heads_per_kv,
                                CF_BSP_MASK, b, n0);
  const QueryStream<kBM, kBN, kThreads, kStages, Smem> stream(walk, qops, seq, sm, head_dim, tid);
  const int n_iter = walk.n_iter;

  float acc_dk[kDC / 8][4], acc_dv[kDC / 8][4];  // this warp's 16 keys x kDC chunk columns
  zero_acc(acc_dk);
  zero_acc(acc_dv);

  stream.begin(CF_BWD_KEY_ARGS, kvh, n0);  // K, V and query tile 0

  // With CF_DQ_ATOMIC the one stage is refilled after the barrier that the dQ pieces need
  // anyway.
#pragma unroll 1
  for (int it = 0; it < n_iter; ++it) {
    const QueryStage t = stream.top(it);
    const ScoreMods mods(CF_MOD_ARGS, b, t.h, seqlen_q, seqlen_k);  // per query head (ALiBi)
#pragma unroll 1
    for (int qs = 0; qs < kBM; qs += kMS)
      bwd_subtile(sm.sK, sm.sV, t.q, t.dout, t.lse, t.delta, sm.sS, acc_dk, acc_dv, qs, t.m0 + qs,
                  16 * warp, n0 + 16 * warp, c0, seqlen_q, seqlen_k, head_dim, mask, mods,
                  scale_log2, drop, drop.head(b, t.h, heads), lane);

    if (CF_DQ_ATOMIC) {
      __syncthreads();  // sdS complete; the Q / dO stage is no longer read in this iteration
      if (kStages == 1 && it + 1 < n_iter) {
        stream(it + 1, 0);
        cp_async_commit();
      }
      float* dq_rows = dq_accum + (seq.row_q() * heads + t.h) * head_dim;
      bwd_dq_atomic(sm.sS, sm.sK, dq_rows, (cf_i64)heads * head_dim, t.m0, n0, c0, seqlen_q,
                    head_dim, mask, softmax_scale, warp, lane);
      // sdS is rewritten only after the next iteration's top barrier.
    } else {
      stream.refill(it);
    }
  }

  // -- epilogue: dK = acc_dk * softmax_scale, dV = acc_dv, rows < seqlen_k, cols < head_dim
  store_dk_dv(CF_BWD_GRAD_ARGS, seq, kvh, acc_dk, acc_dv, softmax_scale, n0 + 16 * warp, c0,
              head_dim, lane);
}

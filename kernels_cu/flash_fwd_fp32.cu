// flash_fwd_fp32.cu -- exact float32 attention forward: FlashAttention-2 Algorithm 1 on FFMA.
//
// Why not tensor cores: TF32 misses the fp32 error rule, so every product here is a plain
// fp32 FFMA out of shared memory (helpers in cf_simt.cuh), exp2 is the < 1 ulp simt_exp2.
//
// Algorithm (per query tile; m_i in log2 units, S raw q.k):
//   m_i = -inf, l_i = 0, acc = 0
//   for each key tile K_j, V_j (causal: only tiles that hold a key some row of the tile sees):
//     S = Q K_j^T, masked (key >= seqlen_k, causal j > i + seqlen_k - seqlen_q) to -inf
//     m_new = max(m_i, rowmax S * scale_log2); base = m_new, or 0 while m_new = -inf (no NaN
//     from -inf - -inf)
//     P = exp2(fmaf(S, scale_log2, -base)) (one rounding: the backward's exponent, see
//     softmax_tile); alpha = exp2(m_i - base); l_i = l_i * alpha + rowsum P
//     acc = acc * alpha + P V_j; m_i = m_new  (P V_j summed on its own, then merged: two-level)
//   O = acc / l_i (0 when l_i == 0, NaN when l_i is: a NaN score the row sees); m_out = m_i * LN2
//   (natural log, -inf for a row that sees no key); l_out = l_i * exp2(m_i - m_out * LOG2E),
//   i.e. l relative to the stored m (see the epilogue).
//
// Grid: (ceil(seqlen_q / BLOCK_M), heads, batch); blockIdx.x = query tile (reversed when causal,
// so the tiles with the most keys start first), .y = query head h (kv head h / heads_per_kv),
// .z = batch. Block = 32 * CF_WARPS threads.
// Layouts: q, k, v, o (batch, seq, heads, head_dim) with element strides; head_dim contiguous,
// rows 16-byte aligned. m_out, l_out (batch, heads, seqlen_q) contiguous. Offsets are 64-bit.
//
// Tiles (shared memory, all float32, row stride = width + 4 floats, see simt_ld):
//   sQ [BLOCK_M][CF_HEAD_DIM+4]  resident for the whole key loop
//   sK [BLOCK_N][CF_HEAD_DIM+4]  K_j; K_{j+1} is prefetched (cp.async) while softmax and P V run
//   sV [BLOCK_N][CF_HEAD_DIM+4]  V_j; V_{j+1} is prefetched while the next Q K^T runs
//   sP [BLOCK_M][BLOCK_N+4]      P of the current tile
// Shared memory (bytes) = 4 * ((BLOCK_M + 2 * BLOCK_N) * (CF_HEAD_DIM + 4) + BLOCK_M * (BLOCK_N + 4))
// (CF_FWD_FP32_SMEM_BYTES; head_dim 256 fits 48 KB with BLOCK_M = 16, BLOCK_N = 8: 34048 B).
//
// Thread mapping: warp w owns query rows [w * BLOCK_M / WARPS, (w + 1) * BLOCK_M / WARPS);
// its lanes form 4 row groups (rl = lane / 8) of 8 lanes (cl = lane % 8). A thread owns rows
// row0 + 4 i (i < TM = BLOCK_M / (4 WARPS)), row0 = w * BLOCK_M / WARPS + rl; of S/P the
// columns cl + 8 j (j < BLOCK_N / 8); of acc/O the float4 column chunks cl + 8 q
// (q < CF_HEAD_DIM / 32). Row max and row sum are reduced over the 8 lanes of a row group with
// shuffles; l_i is kept per thread (its own columns) and reduced once at the end.
//
// Constraints: CF_DTYPE = 2; CF_STAGES = 1 (separate K and V buffers already overlap each load
// with half an iteration of math); CF_HEAD_DIM % 32 == 0, <= 256; CF_BLOCK_N % 8 == 0;
// CF_BLOCK_M % (4 * CF_WARPS) == 0. head_dim (runtime) a multiple of 8, <= CF_HEAD_DIM.
//
// Masking (causal or a local window, tile ranges) and score modifiers (softcap, ALiBi, sinks):
// cf_mask.cuh (docs/masks.md); tanh is the accurate tanhf here.

#include "cf_simt.cuh"  // first: float32 defaults, the float32 constraints
#include "cf_params.cuh"

static_assert(CF_BLOCK_N % 8 == 0, "flash_fwd_fp32: CF_BLOCK_N must be a multiple of 8");
static_assert(CF_BLOCK_M % (4 * CF_WARPS) == 0,
              "flash_fwd_fp32: CF_BLOCK_M must be a multiple of 4 * CF_WARPS");

#define CF_FWD_FP32_SMEM_BYTES \
  (4 * ((CF_BLOCK_M + 2 * CF_BLOCK_N) * (CF_HEAD_DIM + 4) + CF_BLOCK_M * (CF_BLOCK_N + 4)))

namespace fwd32 {
using namespace simt_cfg;
enum : int { LDP = simt_ld(BN) };  // row stride of sP
// All warps on rows, 4 x 8 lanes: the same thread owns the same rows of S and of acc.
using TileS = SimtTile<BM, BN, 1, WARPS, 4>;     // S, P: BM x BN scalars
using TileO = SimtTile<BM, D / 4, 4, WARPS, 4>;  // acc, O: BM x (D / 4) float4 chunks
enum : int {
  TM = TileS::TM,
  TN = TileS::TN,
  TQ = TileO::TN,
  RL = TileS::RL,
  CL = TileS::CL,
  QP = simt_pass_chunks(TM, TQ, 32),  // acc chunks per P V pass (<= 32 registers of tile sums)
};
static_assert((int)TileS::WR == (int)WARPS && (int)TileO::WR == (int)WARPS &&
                  (int)TileO::RL == (int)RL && (int)TileO::TM == (int)TM,
              "S and acc must share their row layout");
static_assert(4 * ((BM + 2 * BN) * LDH + BM * LDP) == CF_FWD_FP32_SMEM_BYTES, "smem formula");

// -- mask S, online-softmax update in log2 units, P -> shared memory -----------------------------
// s: the thread's raw q.k; q_row: global query row of its row 0; k_col: global key of its col 0;
// p_out: sP at (row 0, col 0) of the thread. Returns in alpha the factor exp2(m_old - m_new)
// that acc must be rescaled by (done by the P V merge).
//
// The exponent is ONE FFMA, fmaf(s, scale_log2, -base), as in the float32 backward's simt_p_ds
// (fmaf(s, scale_log2, -lse2)) and the 16-bit kernels; the row max is taken on the raw scores
// and scaled once (needs scale_log2 > 0, which the host guarantees). Why it must match
// (issue #9 item 7): dQ = softmax_scale * sum_j dS_j k_j, and at large logits every k_j
// shares a large component (max|logit| / |q|), which cancels only if sum_j dS_j = 0, i.e. if
// delta = rowsum(dO * O) (from the forward's P) equals sum_j P_j dP_j with the backward's P.
// A row-constant factor on P cancels there; a per-element mismatch does not. This kernel used
// to round s * scale_log2 first and then subtract base (two roundings), while the backward
// rounds once: the exponents then differ per element by up to half an ulp of |s * scale_log2|,
// i.e. a relative error of |s| * 2^-24 in P (6e-4 at |s| = 1e4), which the shared component
// amplifies: dq came out 2.55 / 450 / 3.4e4 relative (torch float32: 0.0029 / 0.022 / 0.27)
// at max|logit| 1e4 / 1e5 / 1e6 on an H200. An emulation of these kernels' float32
// operations in NumPy reproduced those three numbers to 3 digits; with the one-FFMA exponent
// (and the stats fixes in the epilogue and flash_bwd_pre) it gives dq within 1.6x of torch
// float32 at all three. The S products themselves are already bit-identical: forward and
// backward both sum q.k with simt_mm_nt over the same head_dim order.
// NaN: fmaxf drops a NaN score from the row max (m is the max of the row's other scores,
// as in cpu.py and the reference), but exp2(NaN) makes P, l_i and acc NaN; the epilogue then
// writes o = NaN (only l_i == 0 means "sees no key"). Masked scores are replaced by -inf
// before use, so a NaN the row does not see is never used.
__device__ __forceinline__ void softmax_tile(float (&s)[TM][TN], float (&alpha)[TM],
                                             float (&m_i)[TM], float (&l_i)[TM], float* p_out,
                                             int q_row, int k_col, const MaskPolicy& mask,
                                             const ScoreMods& mods, float scale_log2,
                                             const Dropout& drop, unsigned int bh) {
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int r = q_row + RL * i;
    const KeyRange keys = key_range(mask, r);
    float mx = -CF_INF;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int key = k_col + CL * j;
      if (CF_SCORE_MODS) s[i][j] = mods.apply(s[i][j], r, key);  // softcap, ALiBi
      s[i][j] = keys.contains(key) ? s[i][j] : -CF_INF;
      mx = fmaxf(mx, s[i][j]);
    }
#pragma unroll
    for (int off = 1; off < CL; off *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float m_new = fmaxf(m_i[i], mx * scale_log2);
    const float base = (m_new == -CF_INF) ? 0.f : m_new;  // row saw no key yet: P = 0, no NaN
    alpha[i] = simt_exp2(m_i[i] - base);                 // 0 when m_i = -inf
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const float p = simt_exp2(fmaf(s[i][j], scale_log2, -base));
      sum += p;  // l: the undropped sum
      p_out[(RL * i) * LDP + CL * j] = drop.kept(bh, r, k_col + CL * j) ? p : 0.f;
    }
    l_i[i] = fmaf(l_i[i], alpha[i], sum);
    m_i[i] = m_new;
  }
}
}  // namespace fwd32

extern "C" __global__ void __launch_bounds__(fwd32::NT, CF_FP32_MIN_BLOCKS)
    flash_fwd(CF_FWD_PARAMS(__restrict__), CF_MOD_PARAMS, const float* sinks,
              CF_SEQ_PARAMS CF_BSP_PARAMS CF_DROP_PARAMS) {
  using namespace fwd32;
  // -- query tile, sequence, key range and modifiers (cf_simt.cuh, cf_mask.cuh)
  const SimtQueryBlock<BM, BN> blk(heads, heads_per_kv, max_seqlen_q, max_seqlen_k, k, stride_kb,
                                   stride_kn, stride_kh, v, stride_vb, stride_vn, stride_vh,
                                   CF_MOD_ARGS, CF_SEQ_ARGS, CF_BSP_MASK);
  if (blk.idle()) return;
  SimtSmem smem(CF_FWD_FP32_SMEM_BYTES);
  float* sQ = smem.take(BM * LDH);
  float *sK = smem.take(BN * LDH), *sV = smem.take(BN * LDH);
  float* sP = smem.take(BM * LDP);

  const int m0 = blk.m0, h = blk.h, seqlen_q = blk.seq.seqlen_q;
  const int n_tiles = blk.n_tiles, n_first = blk.n_first;  // hidden key tiles are skipped
  const KeptSteps<KeptKeyTiles<BN>> key_tile(blk.kept, blk.kept.begin);  // iteration t's tile
  const int first0 = CF_BLOCK_SPARSE ? key_tile(0) * BN : n_first;  // the first tile's keys
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int row0 = TileS::row0(warp, lane);  // tile row of the thread's row i = 0 (step RL)
  const int col0 = TileS::col0(warp, lane);  // S column / acc chunk of j, q = 0 (step CL)
  const Dropout drop = CF_DROP;  // keeps everything without CF_DROPOUT
  const unsigned int bh = drop.head(blk.b, h, heads);

  float acc[TM][4 * TQ];
  float m_i[TM], l_i[TM];  // running max (log2 units); this thread's share of the row sum
  simt_zero(acc);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    m_i[i] = -CF_INF;
    l_i[i] = 0.f;
  }

  // -- prologue: group {Q, K_0}, group {V_0}
  simt_load_rows<BM, D, NT>(sQ, simt_q_rows(q, blk.seq, stride_qb, stride_qm, stride_qh, h), m0,
                            head_dim, tid);
  if (n_tiles > 0) simt_load_rows<BN, D, NT>(sK, blk.k_rows, first0, head_dim, tid);
  cp_async_commit();
  if (n_tiles > 0) simt_load_rows<BN, D, NT>(sV, blk.v_rows, first0, head_dim, tid);
  cp_async_commit();

  // Invariant at the top of iteration t: the two newest cp.async groups are {K_t} (with Q
  // when t = 0) and {V_t}; every commit below happens on every iteration (maybe empty).
  for (int t = 0; t < n_tiles; ++t) {
    const int n0 = CF_BLOCK_SPARSE ? key_tile(t) * BN : n_first + t * BN;
    const int next0 = CF_BLOCK_SPARSE && t + 1 < n_tiles ? key_tile(t + 1) * BN : n0 + BN;
    cp_async_wait<1>();  // K_t (and Q) landed; V_t may still be in flight
    __syncthreads();

    // -- S = Q K_t^T over the true head_dim
    float s[TM][TN];
    simt_mm_nt_tile<TileS, D>(s, sQ, sK, row0, col0, head_dim);
    __syncthreads();  // every warp is done with sK
    if (t + 1 < n_tiles) simt_load_rows<BN, D, NT>(sK, blk.k_rows, next0, head_dim, tid);
    cp_async_commit();

    float alpha[TM];
    softmax_tile(s, alpha, m_i, l_i, sP + row0 * LDP + col0, m0 + row0, n0 + col0, blk.mask,
                 blk.mods, scale_log2, drop, bh);

    cp_async_wait<1>();  // V_t landed (K_{t+1} may still be in flight)
    __syncthreads();     // ... for every thread; sP complete

    // -- acc = acc * alpha + P V_t (the tile's sum is formed on its own, then merged)
    simt_mm_nn_merge<TM, TQ, BN, QP, true>(acc, alpha, sP + row0 * LDP, RL * LDP, sV + 4 * col0,
                                           LDH, 4 * CL);
    __syncthreads();  // every warp is done with sV and sP
    if (t + 1 < n_tiles) simt_load_rows<BN, D, NT>(sV, blk.v_rows, next0, head_dim, tid);
    cp_async_commit();
  }
  cp_async_wait<0>();

  // -- epilogue: l = sum over the row's lanes; O = acc / l (0 for a row that saw no key, l == 0;
  // NaN where l is NaN: a NaN score the row sees). The stored m is m_i * LN2 rounded, and the
  // backward rebuilds lse2 = m * LOG2E + log2(l) from it; storing l relative to that m,
  // l * exp2(m_i - m * LOG2E) (the difference is one FFMA, exact product), makes lse2 equal
  // m_i + log2(l) up to its own final rounding: at max|logit| 1e6 the round trip alone put a
  // row-constant error of up to ~5% on the backward's P (dk 1.55x torch float32's error in
  // the emulation, 0.89x with this). It is also what the API promises: l = sum exp(score - m).
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    float l = l_i[i];
#pragma unroll
    for (int off = 1; off < CL; off *= 2) l += __shfl_xor_sync(0xffffffffu, l, off);
    float sink_scale = 1.f;  // sinks: the sink joins m and l, acc scales (cf_mask.cuh)
    if (CF_SINKS) {
      const float sink2 = sinks[h] * CF_LOG2E, m_new = fmaxf(m_i[i], sink2);
      sink_scale = simt_exp2(m_i[i] - m_new);  // 0 for a row that saw no key
      l = fmaf(l, sink_scale, simt_exp2(sink2 - m_new));
      m_i[i] = m_new;
    }
    const int r = m0 + row0 + RL * i;
    if (r < seqlen_q) {
      elem_t* o_row = o + blk.seq.q_offset(stride_ob, stride_om) +
                          h * stride_oh + (cf_i64)r * stride_om;
      const bool seen = l != 0.f;  // NaN l is seen
      const float o_scale = sink_scale * drop.scale();  // dropout: 1 / (1 - p)
#pragma unroll
      for (int qc = 0; qc < TQ; ++qc) {
        const int col = 4 * (col0 + CL * qc);
        if (col < head_dim) {
          float4 out = make_float4(0.f, 0.f, 0.f, 0.f);
          if (seen)
            out = make_float4(acc[i][4 * qc + 0] * o_scale / l,
                              acc[i][4 * qc + 1] * o_scale / l,
                              acc[i][4 * qc + 2] * o_scale / l,
                              acc[i][4 * qc + 3] * o_scale / l);
          *reinterpret_cast<float4*>(o_row + col) = out;
        }
      }
      if (col0 == 0) {
        const cf_i64 stat = blk.seq.stats(h) + r;
        const float m = m_i[i] * CF_LN2;  // log2 units -> natural log; -inf stays -inf
        m_out[stat] = m;
        // a row that saw no key (m = -inf) keeps l = 0 (-inf - -inf would be NaN)
        l_out[stat] = seen ? l * simt_exp2(fmaf(-m, CF_LOG2E, m_i[i])) : 0.f;
      }
    }
  }
}

// flash_bwd_sm90.cu -- FlashAttention-2 backward (dK, dV, and dQ by float atomics) for
// float16 / bfloat16 on Hopper warpgroup MMA (wgmma, sm_90a). A drop-in for flash_bwd.cu with
// CF_DQ_ATOMIC = 1 and one head-dim chunk: same parameters, grid, inputs (lse2, delta from
// flash_bwd_pre.cu) and outputs; read that file's header for the algorithm and contract.
//
// Block: 2 warpgroups (256 threads) own CF_BLOCK_N = 128 keys; warpgroup g the keys
// n0 + 64g .. + 63 (S^T, dP^T, dK, dV rows), warp w of it the 16 keys 16w .. of those.
// Grid (ceil(seqlen_k / 128), heads_kv, batch * kv_splits). The block loops over its share of
// the query heads of its GQA group (all of them when kv_splits = 1; heads_per_kv / kv_splits
// of them otherwise) and over the query tiles of CF_BLOCK_M rows (64; 128 at head_dim 64) that
// can see its keys; per tile:
//   S^T  = K Q^T      wgmma m64n(CF_BLOCK_M), K and Q from shared memory (K-major)
//   dP^T = V dO^T     wgmma m64n(CF_BLOCK_M), V and dO from shared memory (K-major)
//   P^T  = exp2(S^T * scale_log2 - lse2), dS^T = P^T * (dP^T - delta)   (registers)
//   dV  += P^T dO     wgmma m64n(D), P^T from registers, dO MN-major from shared memory
//   dK  += dS^T Q     wgmma m64n(D), dS^T from registers, Q MN-major
//   dQ   = dS K       wgmma m64n64 with dS^T stored to shared memory (both operands MN-major):
//                     CF_BLOCK_M 128 (head_dim 64): warpgroup g computes query rows 64g ..;
//                     head_dim 128: warpgroup g computes dQ columns 64g .. over all 128 keys;
//                     head_dim 64, CF_BLOCK_M 64: warpgroup g computes all columns over its
//                     own 64 keys (both add to dq_accum);
//                     then red.global.add into dq_accum (times softmax_scale).
// and at the end dK *= softmax_scale. dK, dV accumulate on chip over the whole loop; with
// kv_splits = 1 the block writes dk, dv, otherwise it adds them into the float32 dk_accum,
// dv_accum (batch, seqlen_k, heads_kv, head_dim), which flash_bwd_dq_convert then writes out.
// The split keeps GQA from starving the SMs (one block per kv head would serialize a group's
// query heads); the launcher picks kv_splits (plan.kv_head_splits), a divisor of heads_per_kv.
//
// Shared memory (the panel layout of cf_sm90.cuh; base 1024-byte aligned):
//   sK, sV      128 x CF_HEAD_DIM each (resident)
//   sQ, sdO     2 stages x CF_BLOCK_M x CF_HEAD_DIM each (cp.async double buffer)
//   sdS         128 keys x CF_BLOCK_M queries (dS^T; panels of 64 queries)
//   sLse, sDelta  2 stages x CF_BLOCK_M floats each
//   SMEM = (2 * 128 * D + 2 * 2 * M * D + 128 * M) * 2 + 2 * 2 * M * 4 bytes
// The host's formula is specs.smem_bytes (kind "bwd90").
//
// head_dim 256 (the role split): dK and dV of 64 keys x 256 columns are 128 floats per thread
// each, too many for one warpgroup to hold both, so the block owns CF_BLOCK_N = 64 keys and
// the warpgroups split the queries for the scores and the roles for the accumulators:
//   both:         S^T, dP^T for the 64 keys x the warpgroup's 32 queries (wgmma m64n32),
//                 P^T and dS^T to shared memory (sP, sdS: row = key, column = query)
//   warpgroup 0:  dK += dS^T Q      warpgroup 1:  dV += P^T dO   (acc holds dK or dV)
//   both:         dQ = dS K, warpgroup g columns 128g .. in two wgmma of 64 columns
// Shared memory: 2 x 32 (K, V) + 2 x 2 x 32 (Q, dO) + 8 (dS^T) + 8 (P^T) + 1 KB = 209 KB.
//
// v's own head_dim (issue #15; DeepSeek's (192, 128)): in the role split CF_HEAD_DIM_V < 192 /
// 256 (whole panels) sets V's and dO's tiles, dP^T's k-steps and warpgroup 1's dV (its first
// CF_HEAD_DIM_V / 8 accumulator n-tiles; warpgroup 0 still takes dK at CF_HEAD_DIM). The two
// products then differ in width, so the warpgroups branch to them: on a warp-uniform value
// (a shuffle), or ptxas serializes every wgmma (C7519). dv_accum rows are CF_HEAD_DIM_V wide.
// SMEM = (64 * (D + DV) + 2 * M * (D + DV) + 2 * 64 * M) * 2 + 2 * 2 * M * 4 there.
//
// Supported: CF_HEAD_DIM 64, 128 (one panel set, keys split over warpgroups) and 256 (the role
// split); 192 (the role split, warpgroup 1 computing one dQ panel) compiles but is not yet in
// the registry (not run on a GPU); others use flash_bwd.cu.
//
// Masking and score modifiers: cf_mask.cuh (query_tiles, MaskPolicy::visible, ScoreMods;
// docs/masks.md), as in flash_bwd.cu.

#ifndef CF_WARPS
#define CF_WARPS 8  // two warpgroups of 64 keys (cf_config.cuh defaults to 4)
#endif
#ifndef CF_BWD_DQ_FIRST  // 1: head_dim 192 / 256 issue a dQ panel before dK / dV (the role
#define CF_BWD_DQ_FIRST 0  // split, below; selected: registry.BWD90_DQ_FIRST)
#endif
#ifndef CF_BWD_DQ_BALANCE  // 1: with v narrower than q (the role split's pairs), warpgroup 1
#define CF_BWD_DQ_BALANCE 0  // (dV) takes more dQ panels than warpgroup 0 (dK): see below
#endif
#ifndef CF_BLOCK_M
#define CF_BLOCK_M 64  // 128 only at head_dim 64 (cf_config.cuh: 16 rows per warp)
#endif
#include "cf_config_bwd.cuh"

#include "cf_common.cuh"
#include "cf_sm90.cuh"
#include "cf_mask.cuh"
#include "cf_seq.cuh"
#include "cf_params.cuh"
#include "cf_tile_order.cuh"
#include "cf_bwd90.cuh"

static_assert(CF_DTYPE == 0 || CF_DTYPE == 1, "flash_bwd_sm90.cu is a 16-bit kernel");
static_assert(CF_HEAD_DIM == 64 || CF_HEAD_DIM == 128 || CF_HEAD_DIM == 192 ||
                  CF_HEAD_DIM == 256,
              "head-dim bucket 64, 128, 192 or 256");
static_assert(CF_HEAD_DIM >= 192  // the role split
                  ? (CF_BLOCK_M == 64 && CF_BLOCK_N == 64)
                  : ((CF_BLOCK_M == 64 || (CF_BLOCK_M == 128 && CF_HEAD_DIM == 64)) &&
                     CF_BLOCK_N == 128),
              "tiles: 64 queries (128 at head_dim 64) x 128 keys; 64 x 64 at head_dim 192, 256");
static_assert(CF_WARPS == 8 && CF_STAGES == 2, "2 warpgroups, 2 stages");
static_assert(CF_DQ_ATOMIC == 1 && CF_DCHUNK >= CF_HEAD_DIM, "dQ by atomics, one chunk");
#if defined(CF_DQ_ORDERED) && CF_DQ_ORDERED
#error "ordered dQ (the deterministic mode) is flash_bwd_sm90_ws.cu's"
#endif

namespace bwd90 {
enum : int {
  kD = CF_HEAD_DIM,
  kDV = CF_HEAD_DIM_V,     // v's, dO's and dV's (the role split may take another: header)
  kBM = CF_BLOCK_M,
  kBN = CF_BLOCK_N,
  kThreads = 32 * CF_WARPS,
  kChunks = kD / 8,
  kChunksV = kDV / 8,
  kKSteps = kD / 16,       // k-steps of S^T, dP^T (over head_dim)
  kQSteps = kBM / 16,      // k-steps of dV, dK (over the tile's queries)
  kNT = kBM / 8,           // S^T n-tiles per thread (8 queries each)
  kDT = kD / 8,            // dK, dV n-tiles per thread
  kDTV = kDV / 8,          // the role split's dV n-tiles (warpgroup 1)
  kTileQ = kBM * kD * 2,   // bytes of one Q stage
  kTileDO = kBM * kDV * 2, // ... of one dO stage
  kTileK = kBN * kD * 2,   // bytes of K
  kTileV = kBN * kDV * 2,  // ... of V
  kRoleSplit = kD >= 192,  // the head_dim 256 layout (header): the warpgroups split the roles
  kWgKeys = kRoleSplit ? 0 : 64,  // keys before warpgroup 1's (the role split: they share)
  kSmemBytes = (kBN * (kD + kDV) + 2 * kBM * (kD + kDV) + (kRoleSplit ? 2 : 1) * kBN * kBM) * 2 +
               2 * 2 * kBM * 4,
};
static_assert(kDV == kD || (kRoleSplit && kDV % 64 == 0 && kDV <= 256),
              "v's own head_dim: the role split only, whole panels");

// dQ's panels in the role split. Each warpgroup's products per tile are its accumulator's
// (dK: kD / 64 panels of 64 columns; dV: kDV / 64) and its dQ panels. By default warpgroup 0
// takes dQ panels 0, 1 and warpgroup 1 the rest (at (192, 192): 3 + 2 against 3 + 1). With
// v narrower, CF_BWD_DQ_BALANCE=1 gives warpgroup 0 only kDqSplit of them, so both carry
// about as many: (192, 128) 3 + 1 against 2 + 2 instead of 3 + 2 against 2 + 1; (256, 128)
// 4 + 1 against 2 + 3 instead of 4 + 2 against 2 + 2. (Written 2026-12-05, not run on a GPU.)
enum : int {  // (enumerators: namespace-scope constexpr variables would land in the PTX)
  kDqBalanced = CF_BWD_DQ_BALANCE && kDV < kD,
  kDqSplit = (kDV / 64 + 1) / 2,  // warpgroup 0's dQ panels when balanced
};
static_assert(!CF_BWD_DQ_BALANCE || kRoleSplit, "CF_BWD_DQ_BALANCE: the role split's");

// The role split's accumulator product: warpgroup 0 dK += dS^T Q (kD columns), warpgroup 1
// dV += P^T dO (kDV columns, in the first of acc's registers). A K-major (queries contiguous),
// B MN-major (head_dim contiguous); the tile's 64 queries are the contraction.
__device__ __forceinline__ void issue_dk_or_dv(float (&acc)[kDT][4], int wg, cf_u32 sdS,
                                               cf_u32 sP, cf_u32 q_tile, cf_u32 do_tile) {
  if constexpr (kDV == kD) {  // one product for both (the PTX of these kernels is unchanged)
#pragma unroll
    for (int kq = 0; kq < kQSteps; ++kq)
      wgmma_ss_kmn_acc(acc, sm90_desc_kmajor<kBN>(wg == 0 ? sdS : sP, kq),
                       sm90_desc_mnmajor<kBM>(wg == 0 ? q_tile : do_tile, kq), 1);
  } else if (__shfl_sync(0xffffffffu, wg, 0) == 0) {  // (warp-uniform, as ptxas must see)
#pragma unroll
    for (int kq = 0; kq < kQSteps; ++kq)
      wgmma_ss_kmn_acc(acc, sm90_desc_kmajor<kBN>(sdS, kq), sm90_desc_mnmajor<kBM>(q_tile, kq), 1);
  } else {
#pragma unroll
    for (int kq = 0; kq < kQSteps; ++kq)
      wgmma_ss_kmn_acc(acc_prefix<kDTV>(acc), sm90_desc_kmajor<kBN>(sP, kq),
                       sm90_desc_mnmajor<kBM>(do_tile, kq), 1);
  }
}
// The balanced forms' dQ panel `panel` (64 columns of dQ over the tile's 64 keys), issued
// and committed: dq = dS K[:, 64 panel ..].
__device__ __forceinline__ void issue_dq_panel(float (&dq)[8][4], cf_u32 sdS, cf_u32 sK,
                                               int panel) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk)
    wgmma_ss_mn_n64(dq, sm90_desc_mnmajor<kBN>(sdS, kk),
                    sm90_desc_mnmajor<kBN>(sK + panel * kBN * 128, kk), kk > 0);
  wgmma_commit();
}
}  // namespace bwd90

extern "C" __global__ void __launch_bounds__(bwd90::kThreads, 1)
    flash_bwd_sm90(CF_BWD_PARAMS, int kv_splits, float* __restrict__ dk_accum,
                   float* __restrict__ dv_accum, int* __restrict__ dq_semaphore, CF_MOD_PARAMS,
                   CF_SEQ_PARAMS CF_BSP_PARAMS CF_DROP_PARAMS) {
  using namespace bwd90;
  (void)dq_semaphore;  // ordered dQ is flash_bwd_sm90_ws.cu's
  extern __shared__ __align__(1024) unsigned char smem[];
  CF_REQUIRE_SMEM(kSmemBytes);
  sm90_require_aligned(smem);
  unsigned char* sK = smem;
  unsigned char* sV = sK + kTileK;
  unsigned char* sQ = sV + kTileV;       // 2 stages
  unsigned char* sdO = sQ + 2 * kTileQ;  // 2 stages
  unsigned char* sdS = sdO + 2 * kTileDO;
  unsigned char* sP = sdS + kBN * kBM * 2;  // role split: P^T, laid out like dS^T
  float* sLse = reinterpret_cast<float*>(sP + (kRoleSplit ? kBN * kBM * 2 : 0));  // 2 x kBM
  float* sDelta = sLse + 2 * kBM;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int group = lane >> 2, tig = lane & 3, wg = warp >> 2;
  // Causal: the key tiles seen by the most queries (the first ones) start first
  // (cf_tile_order.cuh); a kv head's blocks stream Q, dO (16-bit) and dQ (float32 atomics)
  // of its query heads.
  const TileOrder order = causal_tile_order(
      (long long)max_seqlen_q * head_dim * (2 * sizeof(elem_t) + 4) * (heads_per_kv / kv_splits));
  const int key_tile = CF_CAUSAL ? order.tile_rank : (int)blockIdx.x;
  const int kvh = CF_CAUSAL ? order.head : (int)blockIdx.y;
  const int b = blockIdx.z / kv_splits, n0 = key_tile * kBN;
  // v's (dO's, dV's) columns: head_dim's, or the spec's own width (specs.KernelSpec.head_dim_v)
  const int head_dim_v = kDV == kD ? head_dim : kDV;
  const SeqInfo seq(b, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;  // this sequence's
  if (CF_VARLEN && n0 >= seqlen_k) return;  // the grid covers the longest sequence
  const int split_heads = heads_per_kv / kv_splits;  // query heads of the group this block owns
  const int h_first = kvh * heads_per_kv + (blockIdx.z % kv_splits) * split_heads;
  const MaskPolicy mask(seqlen_q, seqlen_k, window_left, window_right);
  const Dropout drop = CF_DROP;  // keeps everything without CF_DROPOUT

  // -- the query tiles that see keys n0..: [m_first, qt.end) per query head (cf_mask.cuh)
  const QueryTiles qt = query_tiles_of<kBM, kBN>(mask, n0);
  const int m_first = qt.first;
  const int tiles_per_head = qt.end - qt.first;
  // Walk index t = g * tiles_per_head + i: head h_first + g, query tile m_first + i; under a
  // block mask the kept ones only.
  const KeptQueryTiles<kBM> kept(CF_BSP_MASK, b, h_first, n0, qt, split_heads);
  const int n_iter = kept.count();

  typedef PanelLoader<kBN, kChunks, kThreads> KVLoad;
  typedef PanelLoader<kBM, kChunks, kThreads> QLoad;
  typedef PanelLoader<kBN, kChunksV, kThreads> VLoad;
  typedef PanelLoader<kBM, kChunksV, kThreads> DOLoad;
  const elem_t* k_head = k + seq.k_offset(stride_kb, stride_kn) + kvh * stride_kh;
  const elem_t* v_head = v + seq.k_offset(stride_vb, stride_vn) + kvh * stride_vh;

  // Issue walk index t's copies into stage st: Q and dO tiles, lse2 and delta (cp.async; past
  // seqlen_q they become 0, harmless: those Q and dO rows are zeros).
  auto load_query_tile = [&](int t, int st) {
    const int g = t / tiles_per_head;
    const int m0 = (m_first + t - g * tiles_per_head) * kBM;
    const int h = h_first + g;
    const QLoad lq(q + seq.q_offset(stride_qb, stride_qm) +
                       h * stride_qh, stride_qm, head_dim, tid);
    lq.load(sQ + st * kTileQ, m0, seqlen_q - m0);
    const DOLoad ldo(dout + seq.q_offset(stride_dob, stride_dom) +
                         h * stride_doh, stride_dom, head_dim_v, tid);
    ldo.load(sdO + st * kTileDO, m0, seqlen_q - m0);
    if (tid < 2 * kBM) {  // asynchronous too: a plain load here stalled warpgroup 0 (and, at
      // the next barrier, the block) for a global-memory latency every tile
      const int r = tid % kBM, row = m0 + r;
      const float* stats = (tid < kBM ? lse2 : delta) + seq.stats(h);
      cp_async_4_zfill((tid < kBM ? sLse : sDelta) + st * kBM + r,
                       stats + (row < seqlen_q ? row : 0), row < seqlen_q);
    }
  };

  const cf_u32 sK_sa = smem_addr(sK), sV_sa = smem_addr(sV), sQ_sa = smem_addr(sQ);
  const cf_u32 sdO_sa = smem_addr(sdO), sdS_sa = smem_addr(sdS), sP_sa = smem_addr(sP);
  // role split: acc, dK (warpgroup 0) or dV (warpgroup 1); key split: acc_dk and acc_dv. The
  // other layout's are never touched (no registers).
  float acc[kDT][4], acc_dk[kDT][4], acc_dv[kDT][4];
  if constexpr (kRoleSplit) {
#pragma unroll
    for (int d = 0; d < kDT; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
  } else {
#pragma unroll
    for (int d = 0; d < kDT; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[d][e] = acc_dv[d][e] = 0.f;
  }
  const int key_row = n0 + wg * kWgKeys + (warp & 3) * 16 + group;  // this thread's keys: +0, +8

  int t_cur = kept.above(-1);  // the walk index of iteration it
  if (n_iter > 0) {  // prologue: [K, V, Q(0), dO(0)]
    const KVLoad lk(k_head, stride_kn, head_dim, tid);
    lk.load(sK, n0, seqlen_k - n0);
    const VLoad lv(v_head, stride_vn, head_dim_v, tid);
    lv.load(sV, n0, seqlen_k - n0);
    load_query_tile(t_cur, 0);
    cp_async_commit();
  }

#pragma unroll 1
  for (int it = 0; it < n_iter; ++it) {
    const int st = it & 1;
    const int t_next = kept.above(t_cur);
    const int g = t_cur / tiles_per_head;
    const int m0 = (m_first + t_cur - g * tiles_per_head) * kBM;
    const int h = h_first + g;
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // tile it is visible; stage st ^ 1 and sdS are free
    if (it + 1 < n_iter) load_query_tile(t_next, st ^ 1);
    cp_async_commit();

    const cf_u32 q_tile = sQ_sa + st * kTileQ, do_tile = sdO_sa + st * kTileDO;
    if constexpr (kRoleSplit) {
      // -- S^T = K Q^T and dP^T = V dO^T for this warpgroup's 32 queries (all 64 keys)
      const int qw = 32 * wg;
      float x[4][4], dp[4][4];
      scores_t<kBN, kBM>(x, dp, sK_sa, sV_sa, 0, q_tile, do_tile, qw * 128);
      // -- P^T and dS^T (rounded to 16 bits) to sP and sdS: row = key, column = query
      const float* lse_t = sLse + st * kBM;
      const float* delta_t = sDelta + st * kBM;
      // Masked: some pair of the block hidden by the mask (cf_mask.cuh), or the keys tail.
      const bool masked = !mask.full(m0, m0 + kBM - 1, n0, n0 + kBN - 1);
      const ScoreMods mods(CF_MOD_ARGS, b, h, seqlen_q, seqlen_k);  // per query head (ALiBi)
      const int r = (warp & 3) * 16 + group;
      const unsigned long long keep =  // dropout's kept flags (S^T: keys as rows)
          drop.keep_bits<4, true>(drop.head(b, h, heads), key_row, m0 + qw + 2 * tig);
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int col = qw + 8 * t + 2 * tig;
        const float2 lse = *reinterpret_cast<const float2*>(lse_t + col);
        const float2 dl = *reinterpret_cast<const float2*>(delta_t + col);
        float p[4], ds[4];
        p_ds_fragment(x[t], dp[t], lse, dl, key_row, m0 + col, masked, mask, mods, scale_log2,
                      p, ds, (unsigned int)(keep >> 4 * t) & 15u, drop);
        *reinterpret_cast<cf_u32*>(sP + sm90_offset<kBN>(r, col)) = pack2(p[0], p[1]);
        *reinterpret_cast<cf_u32*>(sP + sm90_offset<kBN>(r + 8, col)) = pack2(p[2], p[3]);
        *reinterpret_cast<cf_u32*>(sdS + sm90_offset<kBN>(r, col)) = pack2(ds[0], ds[1]);
        *reinterpret_cast<cf_u32*>(sdS + sm90_offset<kBN>(r + 8, col)) = pack2(ds[2], ds[3]);
      }
      fence_proxy_async();  // the P^T, dS^T stores, for the wgmma after the barrier
      __syncthreads();
      if constexpr (kDqBalanced) {
        // dQ panels [first, first + count) of this warpgroup (kDqSplit, above); with
        // CF_BWD_DQ_FIRST the first is issued before dK / dV, as below
        float* dq_head = dq_accum + (seq.row_q() * heads + h) * head_dim;
        const int first = wg == 0 ? 0 : kDqSplit;
        const int count = wg == 0 ? kDqSplit : kD / 64 - kDqSplit;
        const int dq_row = m0 + (warp & 3) * 16 + group;
        float dq[8][4];
        int c = 0;
        if constexpr (CF_BWD_DQ_FIRST) {
          issue_dq_panel(dq, sdS_sa, sK_sa, first);
          issue_dk_or_dv(acc, wg, sdS_sa, sP_sa, q_tile, do_tile);
          wgmma_commit();
          wgmma_wait<1>();  // the dQ panel; dK / dV may still run
          wgmma_fence_regs(dq);
          add_dq(dq, dq_head, dq_row, 64 * first, tig, seqlen_q, heads, head_dim,
                 softmax_scale);
          c = 1;
        } else {
          wgmma_fence();
          issue_dk_or_dv(acc, wg, sdS_sa, sP_sa, q_tile, do_tile);
          wgmma_commit();
        }
#pragma unroll 1
        for (; c < count; ++c) {
          issue_dq_panel(dq, sdS_sa, sK_sa, first + c);
          wgmma_wait<0>();
          wgmma_fence_regs(dq);
          add_dq(dq, dq_head, dq_row, 64 * (first + c), tig, seqlen_q, heads, head_dim,
                 softmax_scale);
        }
        wgmma_wait<0>();  // dK / dV (already done unless this warpgroup had one panel)
        wgmma_fence_regs(acc);
      } else {
#if CF_BWD_DQ_FIRST
        // The first dQ panel is issued before dK / dV, so its adds to dq_accum run while the
        // tensor cores work on dK / dV (in the order below they waited for both products).
        float* dq_head = dq_accum + (seq.row_q() * heads + h) * head_dim;
        const bool second = kD >= 256 || 2 * wg + 1 < kD / 64;  // head_dim 192: wg 0 only
        {
          float dq[8][4];
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < kBN / 16; ++kk)
            wgmma_ss_mn_n64(dq, sm90_desc_mnmajor<kBN>(sdS_sa, kk),
                            sm90_desc_mnmajor<kBN>(sK_sa + 2 * wg * kBN * 128, kk), kk > 0);
          wgmma_commit();
          issue_dk_or_dv(acc, wg, sdS_sa, sP_sa, q_tile, do_tile);
          wgmma_commit();
          wgmma_wait<1>();  // the dQ panel; dK / dV may still run
          wgmma_fence_regs(dq);
          add_dq(dq, dq_head, m0 + (warp & 3) * 16 + group, 128 * wg, tig, seqlen_q, heads,
                 head_dim, softmax_scale);
        }
        if (second) {
          float dq[8][4];
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < kBN / 16; ++kk)
            wgmma_ss_mn_n64(dq, sm90_desc_mnmajor<kBN>(sdS_sa, kk),
                            sm90_desc_mnmajor<kBN>(sK_sa + (2 * wg + 1) * kBN * 128, kk), kk > 0);
          wgmma_commit();
          wgmma_wait<0>();
          wgmma_fence_regs(dq);
          add_dq(dq, dq_head, m0 + (warp & 3) * 16 + group, 128 * wg + 64, tig, seqlen_q, heads,
                 head_dim, softmax_scale);
        } else {
          wgmma_wait<0>();
        }
        wgmma_fence_regs(acc);
#else
        // -- warpgroup 0: dK += dS^T Q; warpgroup 1: dV += P^T dO (A K-major: queries contiguous;
        // B MN-major: head_dim contiguous; the 64 queries are the contraction)
        wgmma_fence();
        issue_dk_or_dv(acc, wg, sdS_sa, sP_sa, q_tile, do_tile);
        wgmma_commit();
        // -- dQ = dS K: warpgroup wg, columns 128 wg + 64 c (panel 2 wg + c of K), all 64 keys
        // (head_dim 192: warpgroup 1 has the third panel only)
        float* dq_head = dq_accum + (seq.row_q() * heads + h) * head_dim;
#pragma unroll 1
        for (int c = 0; c < 2; ++c) {
          if (kD < 256 && 2 * wg + c >= kD / 64) break;  // d256: never (its cubin unchanged)
          float dq[8][4];
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < kBN / 16; ++kk)
            wgmma_ss_mn_n64(dq, sm90_desc_mnmajor<kBN>(sdS_sa, kk),
                            sm90_desc_mnmajor<kBN>(sK_sa + (2 * wg + c) * kBN * 128, kk), kk > 0);
          wgmma_commit();
          wgmma_wait<0>();
          wgmma_fence_regs(dq);
          add_dq(dq, dq_head, m0 + (warp & 3) * 16 + group, 128 * wg + 64 * c, tig, seqlen_q, heads,
                 head_dim, softmax_scale);
        }
        wgmma_fence_regs(acc);
#endif
      }
    } else {
      // -- S^T = K Q^T and dP^T = V dO^T for this warpgroup's 64 keys
      float s[kNT][4], dp[kNT][4];
      scores_t<kBN, kBM>(s, dp, sK_sa, sV_sa, wg * 64 * 128, q_tile, do_tile, 0);

      // -- P^T and dS^T in registers; column t holds queries m0 + 8t + 2tig, +1
      const float* lse_t = sLse + st * kBM;
      const float* delta_t = sDelta + st * kBM;
      // Masked: some pair of the block hidden by the mask (cf_mask.cuh), or the keys tail (zero
      // K rows give S = 0 but P = exp2(-lse2), which must not reach dQ).
      const bool masked = !mask.full(m0, m0 + kBM - 1, n0, n0 + kBN - 1);
      const ScoreMods mods(CF_MOD_ARGS, b, h, seqlen_q, seqlen_k);  // per query head (ALiBi)
      cf_u32 pa[kQSteps][4], dsa[kQSteps][4];
      const unsigned long long keep =  // dropout's kept flags (S^T: keys as rows)
          drop.keep_bits<kNT, true>(drop.head(b, h, heads), key_row, m0 + 2 * tig);
#pragma unroll
      for (int t = 0; t < kNT; ++t) {
        const int col = 8 * t + 2 * tig;
        const float2 lse = *reinterpret_cast<const float2*>(lse_t + col);
        const float2 dl = *reinterpret_cast<const float2*>(delta_t + col);
        float p[4], ds[4];
        p_ds_fragment(s[t], dp[t], lse, dl, key_row, m0 + col, masked, mask, mods, scale_log2,
                      p, ds, (unsigned int)(keep >> 4 * t) & 15u, drop);
        // C fragment of n-tile t -> half of the A fragment of query step t / 2
        const int kq = t >> 1, hi = (t & 1) * 2;
        pa[kq][hi] = pack2(p[0], p[1]);
        pa[kq][hi + 1] = pack2(p[2], p[3]);
        dsa[kq][hi] = pack2(ds[0], ds[1]);
        dsa[kq][hi + 1] = pack2(ds[2], ds[3]);
        // dS^T to shared memory (row = key in the block, column = query) for the dQ product
        const int r = wg * 64 + (warp & 3) * 16 + group;
        *reinterpret_cast<cf_u32*>(sdS + sm90_offset<kBN>(r, col)) = dsa[kq][hi];
        *reinterpret_cast<cf_u32*>(sdS + sm90_offset<kBN>(r + 8, col)) = dsa[kq][hi + 1];
      }
      fence_proxy_async();  // the dS^T stores, for the dQ wgmma after the barrier

      // -- dV += P^T dO, dK += dS^T Q (queries are the contraction dim: dO, Q are MN-major)
      wgmma_fence();
#pragma unroll
      for (int kq = 0; kq < kQSteps; ++kq) {
        wgmma_rs_acc(acc_dv, pa[kq], sm90_desc_mnmajor<kBM>(do_tile, kq), 1);
        wgmma_rs_acc(acc_dk, dsa[kq], sm90_desc_mnmajor<kBM>(q_tile, kq), 1);
      }
      wgmma_commit();
      __syncthreads();  // every warpgroup's dS^T is in shared memory

      // -- dQ = dS K: A = dS (M = queries, contiguous in sdS), B = K (N = head_dim, contiguous)
      float dq[8][4];
      int dq_col0 = 0, dq_row0 = m0;
      if constexpr (kBM == 128) {
        // warpgroup wg: queries 64 wg .. (panel wg of sdS), all 64 columns, all 128 keys
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk)
          wgmma_ss_mn_n64(dq, sm90_desc_mnmajor<kBN>(sdS_sa + wg * kBN * 128, kk),
                          sm90_desc_mnmajor<kBN>(sK_sa, kk), kk > 0);
        dq_row0 = m0 + 64 * wg;
      } else if constexpr (kD == 128) {
        // warpgroup wg: columns 64 wg .. (panel wg of K), all 128 keys (8 k-steps)
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk)
          wgmma_ss_mn_n64(dq, sm90_desc_mnmajor<kBN>(sdS_sa, kk),
                          sm90_desc_mnmajor<kBN>(sK_sa + wg * kBN * 128, kk), kk > 0);
        dq_col0 = 64 * wg;
      } else {
        // warpgroup wg: all 64 columns, over its own 64 keys (4 k-steps); both add to dq_accum
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          wgmma_ss_mn_n64(dq, sm90_desc_mnmajor<kBN>(sdS_sa + wg * 64 * 128, kk),
                          sm90_desc_mnmajor<kBN>(sK_sa + wg * 64 * 128, kk), kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_regs(dq);
      wgmma_fence_regs(acc_dv);
      wgmma_fence_regs(acc_dk);

      // dq rows: this warp's 16 queries (warp & 3) from dq_row0, columns dq_col0 + 8t + 2tig
      // dq_accum is (batch, seqlen_q, heads, head_dim) with the true head_dim
      float* dq_head = dq_accum + (seq.row_q() * heads + h) * head_dim;
      add_dq(dq, dq_head, dq_row0 + (warp & 3) * 16 + group, dq_col0, tig, seqlen_q, heads,
             head_dim, softmax_scale);
    }
    t_cur = t_next;
  }
  cp_async_wait<0>();

  if constexpr (kRoleSplit) {
    // -- warpgroup 0 writes dK (times softmax_scale), warpgroup 1 dV; rows key_row, key_row + 8
    const float out_scale = wg == 0 ? softmax_scale : 1.f;
    const int width = wg == 0 ? head_dim : head_dim_v;  // dk_accum / dv_accum rows too
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int row = key_row + 8 * rr;
      if (row < seqlen_k && kv_splits > 1) {
        const cf_i64 at = ((seq.row_k() + row) * (heads / heads_per_kv) + kvh) * width;
        float* dst = (wg == 0 ? dk_accum : dv_accum) + at;
#pragma unroll
        for (int t = 0; t < kDT; ++t) {
          const int col = 8 * t + 2 * tig;
          if (col < width)
            red_add2(dst + col, acc[t][2 * rr] * out_scale, acc[t][2 * rr + 1] * out_scale);
        }
      } else if (row < seqlen_k) {
        elem_t* dst = wg == 0 ? dk + seq.k_offset(stride_dkb, stride_dkn) +
                                    kvh * stride_dkh + (cf_i64)row * stride_dkn
                              : dv + seq.k_offset(stride_dvb, stride_dvn) +
                                    kvh * stride_dvh + (cf_i64)row * stride_dvn;
#pragma unroll
        for (int t = 0; t < kDT; ++t) {
          const int col = 8 * t + 2 * tig;
          if (col < width)
            *reinterpret_cast<cf_u32*>(dst + col) =
                pack2(acc[t][2 * rr] * out_scale, acc[t][2 * rr + 1] * out_scale);
        }
      }
    }
  } else {
    store_dk_dv(acc_dk, acc_dv, key_row, tig, seq, seqlen_k, heads / heads_per_kv, kvh, head_dim,
                kv_splits, dk_accum, dv_accum, dk, stride_dkb, stride_dkn, stride_dkh, dv,
                stride_dvb, stride_dvn, stride_dvh, softmax_scale);
  }
}

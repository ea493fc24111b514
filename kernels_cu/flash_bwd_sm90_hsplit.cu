// flash_bwd_sm90_hsplit.cu -- the Hopper backward at head_dim 192 and 256 with 96- / 80-key
// tiles: the warpgroups split head_dim (not keys, not roles) for dK and dV. Same entry point,
// parameters, grid, inputs and outputs as flash_bwd_sm90.cu (read its header for the algorithm
// and the contract); a candidate beside that file's role split (64 x 64), not selected until
// timed.
//
// Why: a block's dK and dV (2 x keys x head_dim floats) must fit its warpgroups' registers,
// which caps a block at 80 keys at head_dim 256 (two warpgroups) and 96 at 192 (three); the
// role split holds 64. Every query tile a block visits streams Q and dO in and adds dQ out,
// so those bytes per FLOP fall as 1 / keys: 80 keys move 20% less through L2 than 64, 96 keys
// a third less (at 64 keys and ~260 TFLOP/s that traffic is about 3 TB/s, dQ's float atomics
// half of it). FlashAttention-3's public launch table uses these tiles on sm_90 (64 x 80 on
// two MMA warpgroups at head_dim 256, 64 x 96 on three at 192); the code here is ours and
// keeps this library's ABI, panel layout and cp.async loads.
//
// Block: kWgs warpgroups (head_dim 256: 2, 192: 3) own keys n0 .. n0 + kBN - 1; grid
// (ceil(seqlen_k / kBN), heads_kv, batch * kv_splits), the query heads and tiles of
// flash_bwd_sm90.cu. Per query tile of 64 rows, warpgroup g (products in the orientation that
// keeps every M a multiple of 64; kWgKeys = kBN / kWgs = 40 or 32 keys, kPanels = head_dim /
// 64 / kWgs = 2 or 1 head-dim panels a warpgroup):
//   S  = Q K_g^T      wgmma m64n(kWgKeys): the tile's 64 queries x the warpgroup's keys
//   dP = dO V_g^T     (A: Q / dO K-major; B: K / V rows K-major)
//   P = exp2(S scale_log2 - lse2) while the tensor cores work on dP, then dS = P (dP - delta):
//   two rows a thread, so two lse2 and two delta values, not one per query column as in the
//   S^T orientation
//   P^T, dS^T (16-bit) to shared memory, row = key, column = query: one 128-byte panel a
//   row, the layout both operands below read
//   dV^T[panels of g] += dO^T P     wgmma m64n(kBN) a panel, A = dO MN-major,
//   dK^T[panels of g] += Q^T dS     B = P^T / dS^T K-major; k = the 64 queries
//   dQ[:, panels of g] = dS K       wgmma m64n64 a panel; A = dS^T MN-major, B = K MN-major;
//                                   k = the block's keys; red.global.add as flash_bwd_sm90.cu
// Accumulators a thread: dK^T and dV^T 2 x kPanels x kBN / 2 (160 at 256, 96 at 192) for the
// whole loop, S and dP 2 x kWgKeys / 2, a dQ panel 32.
//
// Shared memory (panel layout of cf_sm90.cuh; 80- and 96-row tiles are whole 1024-byte groups):
//   sK, sV        kBN x head_dim each (resident)
//   sQ            2 stages x 64 x head_dim
//   sdO           kDoStages x 64 x head_dim (256: 1 stage, 192: 2)
//   sP, sdS       kBN x 64 each (P^T, dS^T)
//   sLse, sDelta  2 stages x 64 floats each
//   SMEM = (2 kBN D + (2 + kDoStages) 64 D + 2 kBN 64) 2 + 2 x 2 x 64 x 4: 201,728 bytes at
//   256 (two dO stages would need 234,496; the device allows 232,448), 197,632 at 192;
//   CF_DQ_BULK adds kWgs x 8 KB (218,112 / 222,208)
// With one dO stage the next tile's dO is loaded once every warpgroup's dV^T product has read
// this one, under dQ, dK^T and the next tile's S. The host's formula is registry._smem_bwd90.
//
// Supported: buckets 192 and 256, 16-bit, causal, windows, softcap, ALiBi, sinks (nothing
// here: lse2 carries them), packed sequences, GQA splits; some combinations spill (the
// host declines them: registry.BWD90_HSPLIT's spills_when). Not: dropout, block masks (the
// tiles divide no block size the host accepts), v's own head_dim.
//
// dQ by float atomics, or with CF_DQ_ORDERED (the deterministic mode; no window, as in
// flash_bwd_sm90_ws.cu) in a fixed key-tile order: before a query tile's first dQ add, thread
// 0 waits until that (head, tile)'s semaphore shows this key tile's turn (cf_bwd90.cuh's
// OrderedTurns: ascending key tiles, or descending under causal, where the blocks then start
// with the last key tile), the block adds all its panels, and thread 0 passes the turn on
// after a fence. A block waits only for blocks of its head that started before it.
//
// dQ by bulk reduce-adds (CF_DQ_BULK, atomic mode only; specs.with_bulk_dq): each warpgroup
// stages half of a dQ panel (64 rows x 32 columns, 8 KB at the end of shared memory; a whole
// 16 KB piece a warpgroup would not fit at 256) in the tiled accumulator's order (cf_common.cuh's
// dq_piece_index, where that half is contiguous) and its leader adds it with one
// cp.reduce.async.bulk, in place of 16 red.global.add.v2 a thread a panel; the staging is
// reused once the leader's previous add has read it. The convert applies softmax_scale.
//
// First written 2026-12-05 without a GPU: compiled (NVRTC 13.0 and 13.5, sm_90a), never run.
// Registers: 242-255 at 256, 164-168 at 192. P^T and dS^T leave the registers by stmatrix
// .trans (with 16-bit stores, 40 a thread, their addresses held registers that the causal and
// modified forms then spilled, and P could not be formed under the dP product: 40-56 B); dK,
// dV leave by per-element stores at the end (once per block).

#ifndef CF_WARPS
#define CF_WARPS (CF_HEAD_DIM == 192 ? 12 : 8)
#endif
#ifndef CF_BLOCK_M
#define CF_BLOCK_M 64
#endif
#include "cf_config_bwd.cuh"

#include "cf_common.cuh"
#include "cf_sm90.cuh"
#include "cf_mask.cuh"
#include "cf_seq.cuh"
#include "cf_params.cuh"
#include "cf_tile_order.cuh"
#include "cf_bwd90.cuh"

static_assert(CF_DTYPE == 0 || CF_DTYPE == 1, "flash_bwd_sm90_hsplit.cu is a 16-bit kernel");
static_assert((CF_HEAD_DIM == 256 && CF_BLOCK_N == 80 && CF_WARPS == 8) ||
                  (CF_HEAD_DIM == 192 && CF_BLOCK_N == 96 && CF_WARPS == 12),
              "head_dim 256: 80 keys, 2 warpgroups; 192: 96 keys, 3 warpgroups");
static_assert(CF_HEAD_DIM_V == CF_HEAD_DIM && CF_BLOCK_M == 64 && CF_STAGES == 2,
              "v's head_dim q's; 64 queries; 2 Q stages");
static_assert(CF_DQ_ATOMIC == 1 && CF_DCHUNK >= CF_HEAD_DIM, "dQ by atomics, one chunk");
static_assert(!CF_DROPOUT && !CF_BLOCK_SPARSE, "no dropout, no block masks (header)");
#ifndef CF_DQ_ORDERED
#define CF_DQ_ORDERED 0
#endif
static_assert(!(CF_DQ_ORDERED && CF_LOCAL), "ordered dQ: no window (as flash_bwd_sm90_ws.cu)");
#ifndef CF_DQ_BULK
#define CF_DQ_BULK 0
#endif
static_assert(!(CF_DQ_BULK && CF_DQ_ORDERED), "bulk dQ adds: the atomic mode only");
// dQ into the tiled accumulator by vector reductions from registers (a knob, CF_DQ_RED4=1 on
// top of CF_DQ_BULK; cf_bwd90.cuh's red_dq_piece): eight red.global.add.v4.f32 a thread a
// panel, in place of staging each half panel for a bulk reduce-add. Session 40's ncu source
// counters (H100, 16k, bf16) put about a third of the selected kernel's warp samples in the
// staging loop: its barriers and the leader's wait for each 8 KB add to be read before the
// next half could be staged.
// With CF_DQ_RED4=2 the last dQ panel of a tile is added after the next tile's first block
// barrier, not before it: that barrier's proxy fence (MEMBAR.ALL.CTA in SASS) waited for the
// reductions just issued (the same profile with =1: about 5% of the samples at the MEMBAR
// alone), so they now go out after it, under the next tile's loads and products; the panel's
// 32 accumulators stay live across the barrier.
#ifndef CF_DQ_RED4
#define CF_DQ_RED4 0
#endif
static_assert(!CF_DQ_RED4 || CF_DQ_BULK, "vector reductions: the tiled accumulator (CF_DQ_BULK)");
static_assert(CF_DQ_RED4 >= 0 && CF_DQ_RED4 <= 2, "CF_DQ_RED4: 0, 1, or 2 (the last panel late)");
// One dO stage (head_dim 256): each warpgroup loads its own head-dim panels of the next tile's
// dO once its dV^T product has read them (a knob, CF_HSPLIT_DO_OWN=1), instead of every thread
// waiting at a block barrier for both warpgroups' dV^T. A warpgroup's panels have no other
// reader by then: both dP products (all columns) ended before the barrier after the P^T /
// dS^T stores. Session 40's source counters put about 7% of the samples after that barrier.
#ifndef CF_HSPLIT_DO_OWN
#define CF_HSPLIT_DO_OWN 0
#endif
static_assert(!CF_HSPLIT_DO_OWN || CF_HEAD_DIM == 256, "own dO panels: the one-stage tile (256)");

namespace hsplit {
enum : int {
  kD = CF_HEAD_DIM,
  kBM = CF_BLOCK_M,
  kBN = CF_BLOCK_N,
  kWgs = CF_WARPS / 4,
  kWgKeys = kBN / kWgs,    // a warpgroup's keys in S, dP
  kPanels = kD / 64 / kWgs,  // a warpgroup's head-dim panels of dK^T, dV^T, dQ
  kThreads = 32 * CF_WARPS,
  kChunks = kD / 8,
  kKSteps = kD / 16,       // k-steps of S, dP (head_dim)
  kQSteps = kBM / 16,      // k-steps of dV^T, dK^T (queries)
  kNSteps = kBN / 16,      // k-steps of dQ (keys)
  kST = kWgKeys / 8,       // S, dP n-tiles a thread
  kDT = kBN / 8,           // dK^T, dV^T n-tiles (keys)
  kDoStages = kD == 256 ? 1 : 2,
  kTileQ = kBM * kD * 2,   // bytes of one Q (dO) stage
  kTileK = kBN * kD * 2,   // bytes of K (V)
  kTileP = kBN * kBM * 2,  // bytes of P^T (dS^T)
  kHalfPiece = kDqPieceBytes / 2,  // CF_DQ_BULK: a warpgroup's staging, 32 columns of a piece
  kOffStaging = (2 * kTileK + (2 + kDoStages) * kTileQ + 2 * kTileP) + 2 * 2 * kBM * 4,
  kSmemBytes = kOffStaging + (CF_DQ_BULK ? kWgs * kHalfPiece : 0),
};
static_assert(kPanels * kWgs * 64 == kD && kWgKeys % 8 == 0, "whole panels, 8-key n-tiles");

__device__ __forceinline__ void red_add1(float* p, float x) {
  asm volatile("red.global.add.f32 [%0], %1;" ::"l"(p), "f"(x) : "memory");
}

// The S, dP product of this warpgroup's keys (m64n40 or m64n32).
template <int T>
__device__ __forceinline__ void wgmma_scores(float (&d)[T][4], cf_u64 desc_a, cf_u64 desc_b,
                                             int scale_d) {
  if constexpr (T == 5) wgmma_ss_n40(d, desc_a, desc_b, scale_d);
  else wgmma_ss_n32(d, desc_a, desc_b, scale_d);
}
// X^T += A^T B over the tile's 64 queries, m64n(kBN), head-dim panel `panel` of the tile A
// (MN-major: the Q or dO stage) and B (K-major: P^T or dS^T).
template <int T>
__device__ __forceinline__ void wgmma_dkv_t(float (&d)[T][4], cf_u64 desc_a, cf_u64 desc_b) {
  if constexpr (T == 10) wgmma_ss_mnk_n80(d, desc_a, desc_b, 1);
  else wgmma_ss_mnk_n96(d, desc_a, desc_b, 1);
}
__device__ __forceinline__ void issue_dkv_t(float (&acc)[kPanels][kDT][4], cf_u32 a_tile,
                                            cf_u32 b_t, int wg) {
#pragma unroll
  for (int mb = 0; mb < kPanels; ++mb)
#pragma unroll
    for (int kq = 0; kq < kQSteps; ++kq)
      wgmma_dkv_t(acc[mb], sm90_desc_mnmajor<kBM>(a_tile + (kPanels * wg + mb) * kBM * 128, kq),
                  sm90_desc_kmajor<kBN>(b_t, kq));
}

// 8 x 8 matrices of 16-bit values to shared memory, transposed: matrix i of the fragments
// (row lane / 4, columns 2 (lane % 4) .. +1 in register i) lands as its columns, one per
// memory row, at the row addresses lanes 8i .. 8i + 7 give.
__device__ __forceinline__ void stmatrix_x4_trans(cf_u32 addr, cf_u32 r0, cf_u32 r1, cf_u32 r2,
                                                  cf_u32 r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(
                   addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}
__device__ __forceinline__ void stmatrix_x2_trans(cf_u32 addr, cf_u32 r0, cf_u32 r1) {
  asm volatile("stmatrix.sync.aligned.m8n8.x2.trans.shared.b16 [%0], {%1, %2};" ::"r"(addr),
               "r"(r0), "r"(r1)
               : "memory");
}
// This warp's P or dS fragments (n-tile t: keys 8t .. of the warpgroup's, rows 16 (warp % 4)
// + 8h .., packed in x[t][h]) into the P^T / dS^T tile at `tile` (row = key, column = query).
// Matrix i of a four-matrix store is (n-tile t0 + i / 2, half i % 2): lane l gives the row of
// key 8 (t0 + (l / 8) / 2) + l % 8 at query column 16 (warp % 4) + 8 ((l / 8) % 2). Eight keys
// on are eight rows on: 1024 bytes, the same swizzle phase.
template <int T>
__device__ __forceinline__ void store_pds_t(const cf_u32 (&x)[T][2], cf_u32 tile, int wg,
                                            int warp, int lane) {
  const int i = lane >> 3;
  const cf_u32 addr = tile + sm90_offset<kBN>(wg * kWgKeys + 8 * (i >> 1) + (lane & 7),
                                              16 * (warp & 3) + 8 * (i & 1));
#pragma unroll
  for (int t = 0; t + 1 < T; t += 2)
    stmatrix_x4_trans(addr + t * 1024, x[t][0], x[t][1], x[t + 1][0], x[t + 1][1]);
  if constexpr (T % 2)  // lanes 0-15's addresses: n-tile T - 1
    stmatrix_x2_trans(addr + (T - 1) * 1024, x[T - 1][0], x[T - 1][1]);
}

// dQ's panel `panel` (64 columns) over the block's keys: dS (A, from dS^T, MN-major) times K
// (B, MN-major), issued and committed.
__device__ __forceinline__ void issue_dq(float (&dq)[8][4], cf_u32 sdS, cf_u32 sK, int panel) {
#pragma unroll
  for (int kk = 0; kk < kNSteps; ++kk)
    wgmma_ss_mn_n64(dq, sm90_desc_mnmajor<kBN>(sdS, kk),
                    sm90_desc_mnmajor<kBN>(sK + panel * kBN * 128, kk), kk > 0);
  wgmma_commit();
}

// dK (times softmax_scale) or dV from this warpgroup's X^T accumulators: element (e) of n-tile
// t of panel mb is head-dim column 64 (kPanels wg + mb) + row (+ 8 (e >> 1)), key n0 + 8t +
// 2tig + (e & 1). Written to out (kv_splits = 1) or added to the float32 accum (a split's
// share).
__device__ __forceinline__ void store_t(const float (&acc)[kPanels][kDT][4], float scale, int wg,
                                        int row, int tig, int n0, int seqlen_k, int head_dim,
                                        bool add, float* accum_head, cf_i64 accum_row,
                                        elem_t* out_head, cf_i64 out_row) {
#pragma unroll
  for (int mb = 0; mb < kPanels; ++mb)
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int col = 64 * (kPanels * wg + mb) + row + 8 * e2;
      if (col >= head_dim) continue;
#pragma unroll
      for (int t = 0; t < kDT; ++t)
#pragma unroll
        for (int e1 = 0; e1 < 2; ++e1) {
          const int key = n0 + 8 * t + 2 * tig + e1;
          const float x = acc[mb][t][2 * e2 + e1] * scale;
          if (key >= seqlen_k) continue;
          if (add)
            red_add1(accum_head + key * accum_row + col, x);
          else
            out_head[key * out_row + col] = float_to_elem(x);
        }
    }
}
}  // namespace hsplit

extern "C" __global__ void __launch_bounds__(hsplit::kThreads, 1)
    flash_bwd_sm90(CF_BWD_PARAMS, int kv_splits, float* __restrict__ dk_accum,
                   float* __restrict__ dv_accum, int* __restrict__ dq_semaphore, CF_MOD_PARAMS,
                   CF_SEQ_PARAMS CF_BSP_PARAMS CF_DROP_PARAMS) {
  using namespace hsplit;
  extern __shared__ __align__(1024) unsigned char smem[];
  CF_REQUIRE_SMEM(kSmemBytes);
  sm90_require_aligned(smem);
  unsigned char* sK = smem;
  unsigned char* sV = sK + kTileK;
  unsigned char* sQ = sV + kTileK;       // 2 stages
  unsigned char* sdO = sQ + 2 * kTileQ;  // kDoStages
  unsigned char* sP = sdO + kDoStages * kTileQ;  // P^T: row = key, column = query
  unsigned char* sdS = sP + kTileP;      // dS^T, the same layout
  float* sLse = reinterpret_cast<float*>(sdS + kTileP);  // 2 x kBM
  float* sDelta = sLse + 2 * kBM;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int group = lane >> 2, tig = lane & 3, wg = warp >> 2;
  const TileOrder order = causal_tile_order(
      (long long)max_seqlen_q * head_dim * (2 * sizeof(elem_t) + 4) * (heads_per_kv / kv_splits));
  // Ordered dQ, causal: the lightest key tile (the last) first, adding in descending order
  // (cf_bwd90.cuh's OrderedTurns; flash_bwd_sm90_ws.cu's header has why)
  const int key_tile = !CF_CAUSAL       ? (int)blockIdx.x
                       : CF_DQ_ORDERED ? (int)gridDim.x - 1 - order.tile_rank
                                       : order.tile_rank;
  const int kvh = CF_CAUSAL ? order.head : (int)blockIdx.y;
  const int b = blockIdx.z / kv_splits, n0 = key_tile * kBN;
  const SeqInfo seq(b, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
  if (CF_VARLEN && n0 >= seqlen_k) return;
  const int split_heads = heads_per_kv / kv_splits;
  const int h_first = kvh * heads_per_kv + (blockIdx.z % kv_splits) * split_heads;
  const MaskPolicy mask(seqlen_q, seqlen_k, window_left, window_right);

  const QueryTiles qt = query_tiles_of<kBM, kBN>(mask, n0);
  const int m_first = qt.first;
  const int tiles_per_head = qt.end - qt.first;
  const KeptQueryTiles<kBM> kept(CF_BSP_MASK, b, h_first, n0, qt, split_heads);
  const int n_iter = kept.count();
  // ordered dQ: one turn a (head, query tile) for the whole block, on the semaphore of the
  // first half (the host's two a tile; the warpgroups add together)
  const int q_tiles = (max_seqlen_q + kBM - 1) / kBM;
  const OrderedTurns turns{mask, key_tile, m_first, tiles_per_head, (int)gridDim.x, q_tiles,
                           false, dq_semaphore + (cf_i64)b * heads * q_tiles * 2};

  typedef PanelLoader<kBN, kChunks, kThreads> KVLoad;
  typedef PanelLoader<kBM, kChunks, kThreads> QLoad;
  const elem_t* k_head = k + seq.k_offset(stride_kb, stride_kn) + kvh * stride_kh;
  const elem_t* v_head = v + seq.k_offset(stride_vb, stride_vn) + kvh * stride_vh;

  auto tile_of = [&](int t, int& m0, int& h) {
    const int g = t / tiles_per_head;
    m0 = (m_first + t - g * tiles_per_head) * kBM;
    h = h_first + g;
  };
  // The loaders' per-thread offsets, recomputed at each call from a value the compiler cannot
  // see through: kept across the loop, they took registers the accumulators need (spills).
  auto opaque_tid = [&]() {
    int t = tid;
    asm volatile("" : "+r"(t));
    return t;
  };
  auto opaque_seq = [&]() {  // so are the batch entry's offsets
    SeqInfo sq = seq;
    asm volatile("" : "+r"(sq.b), "+r"(sq.q_begin));
    return sq;
  };
  // Walk index t's Q tile, lse2 and delta into stage st (cp.async; rows past seqlen_q: zeros)
  auto load_q = [&](int t, int st) {
    int m0, h;
    tile_of(t, m0, h);
    const int tid = opaque_tid();
    const SeqInfo sq = opaque_seq();
    const QLoad lq(q + sq.q_offset(stride_qb, stride_qm) + h * stride_qh, stride_qm, head_dim,
                   tid);
    lq.load(sQ + st * kTileQ, m0, seqlen_q - m0);
    if (tid < 2 * kBM) {
      const int r = tid % kBM, row = m0 + r;
      const float* stats = (tid < kBM ? lse2 : delta) + sq.stats(h);
      cp_async_4_zfill((tid < kBM ? sLse : sDelta) + st * kBM + r,
                       stats + (row < seqlen_q ? row : 0), row < seqlen_q);
    }
  };
  // CF_HSPLIT_DO_OWN: this warpgroup's kPanels head-dim panels of walk index t's dO, by its
  // 128 threads
  auto load_do_own = [&](int t) {
    int m0, h;
    tile_of(t, m0, h);
    typedef PanelLoader<kBM, kChunks / kWgs, 128> OwnLoad;
    const int col0 = 64 * kPanels * wg;
    const OwnLoad ldo(dout + opaque_seq().q_offset(stride_dob, stride_dom) + h * stride_doh +
                          col0,
                      stride_dom, head_dim - col0, opaque_tid() & 127);
    ldo.load(sdO + kPanels * wg * kBM * 128, m0, seqlen_q - m0);
  };
  auto load_do = [&](int t, int st) {
    int m0, h;
    tile_of(t, m0, h);
    const QLoad ldo(dout + opaque_seq().q_offset(stride_dob, stride_dom) + h * stride_doh,
                    stride_dom, head_dim, opaque_tid());
    ldo.load(sdO + (kDoStages == 2 ? st : 0) * kTileQ, m0, seqlen_q - m0);
  };

  const cf_u32 smem_sa = smem_addr(smem);
  float dkt[kPanels][kDT][4], dvt[kPanels][kDT][4];  // dK^T, dV^T: this warpgroup's panels
#pragma unroll
  for (int mb = 0; mb < kPanels; ++mb)
#pragma unroll
    for (int t = 0; t < kDT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) dkt[mb][t][e] = dvt[mb][t][e] = 0.f;
  const int row = (warp & 3) * 16 + group;  // this thread's query rows row, row + 8 (S, dP)

  // dQ of a panel; CF_DQ_RED4=2: the last panel of the previous tile (rows pm0, head ph)
  // until it is added after this tile's first barrier
  constexpr bool kDeferLast = CF_DQ_RED4 == 2;
  float dq[8][4];
  int pm0 = 0, ph = 0;
  const auto red_last_panel = [&](int rows, int head) {
    const int col0 = 64 * (kPanels * wg + kPanels - 1);
    red_dq_piece(dq, opaque_seq().dq_piece(dq_accum, head, rows, col0, max_seqlen_q, kD),
                 warp & 3, lane);
  };
  int t_cur = kept.above(-1);
  if (n_iter > 0) {  // prologue: [K, V, Q(0), dO(0)]
    const KVLoad lk(k_head, stride_kn, head_dim, tid);
    lk.load(sK, n0, seqlen_k - n0);
    const KVLoad lv(v_head, stride_vn, head_dim, tid);
    lv.load(sV, n0, seqlen_k - n0);
    load_q(t_cur, 0);
    load_do(t_cur, 0);
    cp_async_commit();
  }

#pragma unroll 1
  for (int it = 0; it < n_iter; ++it) {
    const int st = it & 1;
    const int t_next = kept.above(t_cur);
    int m0, h;
    tile_of(t_cur, m0, h);
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // Q(it), dO(it) landed; sP, sdS and stage st ^ 1 free
    if (kDeferLast && it > 0) red_last_panel(pm0, ph);
    if (it + 1 < n_iter) {
      load_q(t_next, st ^ 1);
      if (kDoStages == 2) load_do(t_next, st ^ 1);
    }
    cp_async_commit();
    // Shared addresses, opaque to the compiler each tile: hoisted out of the loop, the
    // descriptors of every k-step took registers the accumulators need (spills).
    cf_u32 base = smem_sa;
    asm volatile("" : "+r"(base));
    const cf_u32 sK_sa = base, sV_sa = base + kTileK, q_tile = base + 2 * kTileK + st * kTileQ;
    const cf_u32 sdO_sa = base + 2 * kTileK + 2 * kTileQ + (kDoStages == 2 ? st : 0) * kTileQ;
    const cf_u32 sP_sa = base + 2 * kTileK + (2 + kDoStages) * kTileQ, sdS_sa = sP_sa + kTileP;

    // -- S = Q K_g^T, dP = dO V_g^T: 64 queries x this warpgroup's keys; P is formed (exp2 on
    // the multi-function unit) and stored while the tensor cores work on dP
    float s[kST][4], dp[kST][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk)
      wgmma_scores(s, sm90_desc_kmajor<kBM>(q_tile, kk),
                   sm90_desc_kmajor<kBN>(sK_sa + wg * kWgKeys * 128, kk), kk > 0);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk)
      wgmma_scores(dp, sm90_desc_kmajor<kBM>(sdO_sa, kk),
                   sm90_desc_kmajor<kBN>(sV_sa + wg * kWgKeys * 128, kk), kk > 0);
    wgmma_commit();
    wgmma_wait<1>();
    wgmma_fence_regs(s);

    // -- P, then dS, rounded to 16 bits, transposed into sP, sdS (row = key, column = query)
    // by stmatrix .trans. Masked: some pair of the tile hidden, or the keys' tail (zero K rows
    // give S = 0 but P = exp2(-lse2), which must not reach dQ or dK).
    {
      const bool masked = !mask.full(m0, m0 + kBM - 1, n0, n0 + kBN - 1);
      const ScoreMods mods(CF_MOD_ARGS, b, h, seqlen_q, seqlen_k);
      const float* lse_t = sLse + st * kBM;
      const float lse[2] = {lse_t[row], lse_t[row + 8]};
      cf_u32 pk[kST][2];  // n-tile t, rows row / row + 8: two keys each
#pragma unroll
      for (int t = 0; t < kST; ++t) {
        float p[4];
        const float dist0 =  // ALiBi's i + off - j at e = 0 (ScoreMods::apply_at); one
            CF_ALIBI  // conversion an n-tile (one a tile held a register: 8 B spilled at 192)
                ? (float)(m0 + row + mods.off - (n0 + wg * kWgKeys + 8 * t + 2 * tig))
                : 0.f;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = m0 + row + 8 * (e >> 1);
          const int key = n0 + wg * kWgKeys + 8 * t + 2 * tig + (e & 1);
          float x = s[t][e], th = 0.f;
          if (CF_SCORE_MODS) x = mods.apply_at(x, dist0 + (8.f * (e >> 1) - (e & 1)), th);
          p[e] = fast_exp2(fmaf(x, scale_log2, -lse[e >> 1]));
          if (masked && !mask.visible(qi, key)) p[e] = 0.f;
          s[t][e] = p[e] * softcap_grad(th);  // dS = this (dP - delta)
        }
        pk[t][0] = pack2(p[0], p[1]);
        pk[t][1] = pack2(p[2], p[3]);
      }
      store_pds_t(pk, sP_sa, wg, warp, lane);
      wgmma_wait<0>();
      wgmma_fence_regs(dp);
      const float* delta_t = sDelta + st * kBM;
      const float dl[2] = {delta_t[row], delta_t[row + 8]};
#pragma unroll
      for (int t = 0; t < kST; ++t) {
        float ds[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
          ds[e] = s[t][e] * (dp[t][e] - dl[e >> 1]);
        pk[t][0] = pack2(ds[0], ds[1]);
        pk[t][1] = pack2(ds[2], ds[3]);
      }
      store_pds_t(pk, sdS_sa, wg, warp, lane);
    }
    fence_proxy_async();  // the stores, for the wgmma after the barrier
    __syncthreads();      // every warpgroup's keys are in sP, sdS

    // -- dV^T += dO^T P (group 1), dQ's first panel (group 2), dK^T += Q^T dS (group 3), then
    // the other panel (head_dim 256)
    // dQ panel `panel` (64 columns) of this tile into dq_accum: float atomics (times
    // softmax_scale), or (CF_DQ_BULK) staged 32 columns at a time and added by the
    // warpgroup's leader with one bulk reduce-add each into the tiled accumulator (unscaled:
    // the convert scales), after its previous add has read the staging
    auto add_dq_panel = [&](const float (&dq)[8][4], int panel) {
      if constexpr (CF_DQ_RED4) {
        red_dq_piece(dq, opaque_seq().dq_piece(dq_accum, h, m0, 64 * panel, max_seqlen_q, kD),
                     warp & 3, lane);
      } else if constexpr (CF_DQ_BULK) {
        const bool leader = (tid & 127) == 0;
        float* dst = opaque_seq().dq_piece(dq_accum, h, m0, 64 * panel, max_seqlen_q, kD);
        const cf_u32 buf = base + kOffStaging + wg * kHalfPiece;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          if (leader) bulk_wait_read_all();
          named_bar_sync(1 + wg, 128);  // the staging is free
          stage_dq_half(dq, buf, hf, warp & 3, lane);
          fence_proxy_async();  // the stores, for the bulk copy's (async proxy) reads
          named_bar_sync(1 + wg, 128);
          if (leader) {
            bulk_reduce_add_f32(dst + hf * (kHalfPiece / 4), buf, kHalfPiece);
            bulk_commit();
          }
        }
      } else {
        add_dq(dq, dq_accum + (opaque_seq().row_q() * heads + h) * head_dim, m0 + row,
               64 * panel, tig, seqlen_q, heads, head_dim, softmax_scale);
      }
    };
    wgmma_fence();
    issue_dkv_t(dvt, sdO_sa, sP_sa, wg);
    wgmma_commit();
    issue_dq(dq, sdS_sa, sK_sa, kPanels * wg);
    issue_dkv_t(dkt, q_tile, sdS_sa, wg);
    wgmma_commit();
    if constexpr (kDoStages == 1) {
      wgmma_wait<2>();  // this warpgroup's dV^T has read dO
      if constexpr (CF_HSPLIT_DO_OWN) {
        named_bar_sync(1 + wg, 128);  // every warp's: its panels are free
        if (it + 1 < n_iter) load_do_own(t_next);
      } else {
        __syncthreads();  // and the others': the next tile's dO may land
        if (it + 1 < n_iter) load_do(t_next, 0);
      }
      cp_async_commit();
    }
    wgmma_wait<1>();
    wgmma_fence_regs(dq);
    int* sem = nullptr;  // ordered dQ: after the key tiles before this one, then pass it on
    int turn = 0;
    if constexpr (CF_DQ_ORDERED) {
      turn = turns.turn(m0);
      sem = turns.semaphore(m0, h, 0);
      if (tid == 0) wait_for_turn(sem, turn);
      __syncthreads();
    }
    if (!kDeferLast || kPanels > 1) add_dq_panel(dq, kPanels * wg);
#pragma unroll
    for (int c = 1; c < kPanels; ++c) {
      wgmma_fence();
      issue_dq(dq, sdS_sa, sK_sa, kPanels * wg + c);
      wgmma_wait<0>();
      wgmma_fence_regs(dq);
      if (!kDeferLast || c + 1 < kPanels) add_dq_panel(dq, kPanels * wg + c);
    }
    if constexpr (CF_DQ_ORDERED) {
      __syncthreads();  // every thread's adds, before the leader's fence
      if (tid == 0) fence_and_release(sem, turn + 1);
    }
    wgmma_wait<0>();
#pragma unroll
    for (int mb = 0; mb < kPanels; ++mb) {
      wgmma_fence_regs(dkt[mb]);
      wgmma_fence_regs(dvt[mb]);
    }
    pm0 = m0;
    ph = h;
    t_cur = t_next;
  }
  if (kDeferLast && n_iter > 0) red_last_panel(pm0, ph);
  cp_async_wait<0>();
  // the bulk adds performed before the block ends
  if (CF_DQ_BULK && !CF_DQ_RED4 && (tid & 127) == 0) bulk_wait_all();

  // -- dK (times softmax_scale) and dV: written, or a split's share added to the accumulators
  const int heads_kv = heads / heads_per_kv;
  const bool add = kv_splits > 1;
  store_t(dkt, softmax_scale, wg, row, tig, n0, seqlen_k, head_dim, add,
          dk_accum + (seq.row_k() * heads_kv + kvh) * head_dim, (cf_i64)heads_kv * head_dim,
          dk + seq.k_offset(stride_dkb, stride_dkn) + kvh * stride_dkh, stride_dkn);
  store_t(dvt, 1.f, wg, row, tig, n0, seqlen_k, head_dim, add,
          dv_accum + (seq.row_k() * heads_kv + kvh) * head_dim, (cf_i64)heads_kv * head_dim,
          dv + seq.k_offset(stride_dvb, stride_dvn) + kvh * stride_dvh, stride_dvn);
}

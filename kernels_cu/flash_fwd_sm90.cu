// flash_fwd_sm90.cu -- FlashAttention-2 forward for float16 / bfloat16 on Hopper warpgroup MMA
// (wgmma, sm_90a). Same algorithm, outputs, masking and host contract as flash_fwd.cu (read
// its header); what differs is how the two products run:
//   S = Q K^T: wgmma m64n(CF_BLOCK_N)k16 with Q and K read by the tensor cores straight from
//              shared memory (descriptors), no ldmatrix;
//   O += P V:  wgmma m64n(CF_HEAD_DIM)k16 with P from registers (the S accumulators rounded to
//              16 bits are already the A fragments) and V from shared memory, transposed.
//
// Grid: as flash_fwd.cu, (ceil(seqlen_q / CF_BLOCK_M), heads, batch), q tiles reversed when
// causal. Block: CF_WARPS = 4 * warpgroups threads x 32; CF_BLOCK_M = 64 * warpgroups: warpgroup
// g owns query rows 64g .. 64g + 63 of the tile, and within it warp w (of 4) rows 16w .. 16w+15,
// so the per-thread softmax state is exactly flash_fwd.cu's (cf_fwd.cuh is reused).
//
// Shared memory: [Q | K stage 0..S-1 | V stage 0..S-1], the same total as flash_fwd.cu:
//   (CF_BLOCK_M + 2 * CF_STAGES * CF_BLOCK_N) * CF_HEAD_DIM * 2 bytes (a third V stage with
//   CF_FWD_OVERLAP, below),
// but each tile is stored in the 64-column panel layout of cf_sm90.cuh (wgmma's 128-byte
// swizzle), which the tensor cores read through descriptors: Q and K as K-major operands
// (head_dim contiguous), V as the MN-major B of O += P V (N = head_dim contiguous).
//
// Pipeline: K and V tiles stream through CF_STAGES = 2 stages with cp.async, as in
// flash_fwd.cu; the cp.async writes reach the tensor cores' (async) proxy through
// fence.proxy.async before the barrier that publishes a stage. The two warpgroups run their
// wgmma and softmax phases independently between barriers, so one's softmax overlaps the
// other's matrix products.
//
// Supported buckets: CF_HEAD_DIM in {64, 128, 192, 256} (whole panels); others use
// flash_fwd.cu. The registry selects this file at 192 and 256, and at 64 / 128 where the
// warp-specialized kernel (flash_fwd_sm90_ws.cu) does not fit or spills.
//
// v's own head_dim (issue #15; DeepSeek's (192, 128)): CF_HEAD_DIM_V, a whole number of
// panels, sets the V stages, the P V product's width, O's registers and its epilogue; Q and K
// keep CF_HEAD_DIM. v and o then have exactly CF_HEAD_DIM_V columns (no zero-padded copies).
// V stages are CF_BLOCK_N * CF_HEAD_DIM_V * 2 bytes (registry._smem_fwd90).
//
// Masking and score modifiers: cf_mask.cuh, exactly as in flash_fwd.cu.

#ifndef CF_WARPS
#define CF_WARPS 8  // two warpgroups (cf_config.cuh defaults to 4)
#endif
#include "cf_config.cuh"

#include "cf_common.cuh"
#include "cf_fwd.cuh"
#include "cf_sm90.cuh"
#include "cf_mask.cuh"
#include "cf_seq.cuh"
#include "cf_params.cuh"
#include "cf_tile_order.cuh"

static_assert(CF_DTYPE == 0 || CF_DTYPE == 1, "flash_fwd_sm90.cu is a 16-bit kernel");
static_assert(CF_HEAD_DIM == 64 || CF_HEAD_DIM == 128 || CF_HEAD_DIM == 192 ||
                  CF_HEAD_DIM == 256,
              "head-dim bucket: whole 64-column panels");
static_assert(CF_WARPS % 4 == 0 && CF_BLOCK_M == 16 * CF_WARPS, "64 query rows per warpgroup");
static_assert(CF_BLOCK_N == 64 || CF_BLOCK_N == 128 || CF_BLOCK_N == 256, "wgmma widths");
static_assert(CF_STAGES == 2, "2 K/V stages");
static_assert(CF_HEAD_DIM_V % 64 == 0 && CF_HEAD_DIM_V <= 256, "v's head_dim: whole panels");

// CF_FWD_OVERLAP 1 / 2 (selected at head_dim 192 / 256 since session 19, by modifier set:
// registry.FWD90_OVERLAP): each warpgroup issues tile j's S = Q K^T and tile j-1's O += P V
// together, and runs tile j's softmax while the P V product is still in the tensor cores (P
// of tile j-1 held packed in registers); O is rescaled once that product has landed. V takes
// a ring of 3 stages so the loads of tile j+1 can start in iteration j while V(j-1) is still
// read; 2 issues those loads after the wgmma rather than before. Why: in the plain loop each
// warpgroup waits for every product before its softmax, so the tensor cores idle during it
// except for what the other warpgroup fills (d256: 454-498 -> 546-601 TFLOP/s on an H200).
#ifndef CF_FWD_OVERLAP
#define CF_FWD_OVERLAP 0
#endif
// With CF_FWD_OVERLAP 1 / 2: O rescaled by the previous tile's row scale between issuing
// S = Q K^T and O += P V, under the S product, instead of after P V lands (a knob,
// CF_FWD_RESCALE_EARLY=1, a candidate): at head_dim 256 that is 128 multiplies a thread off
// the path from the softmax to the next barrier (flash_fwd_sm90_ws.cu says the same).
// Measured, not selected (H100, bf16, 2026-12-07, 16k tokens): d256 587.8 -> 573.7 TFLOP/s
// at 16k, 591.6 -> 584.0 at 4k, causal 542.9 -> 532.0 / 563.3 -> 563.3: the tail it moves
// was not what idles the tensor cores (ncu: tensor pipe 64%, 0.53 eligible warps of 2).
#ifndef CF_FWD_RESCALE_EARLY
#define CF_FWD_RESCALE_EARLY 0
#endif
static_assert(!CF_FWD_RESCALE_EARLY || CF_FWD_OVERLAP == 1 || CF_FWD_OVERLAP == 2,
              "rescaling early: the overlapped loop");

namespace sm90 {
enum : int {
  kThreads = 32 * CF_WARPS,
  kChunks = CF_HEAD_DIM / 8,  // 16-byte chunks per tile row (Q, K)
  kChunksV = CF_HEAD_DIM_V / 8,  // ... of V and O
  kPanels = CF_HEAD_DIM / 64,
  kNT = CF_BLOCK_N / 8,   // S n-tiles per thread
  kDT = CF_HEAD_DIM_V / 8,  // O n-tiles per thread
  kKSteps = CF_HEAD_DIM / 16,
  kVStages = CF_FWD_OVERLAP ? 3 : CF_STAGES,
  kTiles = ((CF_BLOCK_M + CF_STAGES * CF_BLOCK_N) * CF_HEAD_DIM +
            kVStages * CF_BLOCK_N * CF_HEAD_DIM_V) * 2,
  kSmemBytes = kTiles + (CF_FWD_OVERLAP == 3 ? 128 : 0),  // value 3: 10 stage mbarriers
  kTileKV = CF_BLOCK_N * CF_HEAD_DIM * 2,  // bytes of one K stage
  kTileV = CF_BLOCK_N * CF_HEAD_DIM_V * 2,  // ... of one V stage
};
}  // namespace sm90

template <int ROWS>
using Sm90Loader = PanelLoader<ROWS, sm90::kChunks, sm90::kThreads>;
using Sm90LoaderV = PanelLoader<CF_BLOCK_N, sm90::kChunksV, sm90::kThreads>;

extern "C" __global__ void __launch_bounds__(32 * CF_WARPS, 1)
    flash_fwd_sm90(CF_FWD_PARAMS(/* no __restrict__ */), CF_MOD_PARAMS, const float* sinks,
                   CF_SEQ_PARAMS CF_BSP_PARAMS CF_DROP_PARAMS) {
  using namespace sm90;
  extern __shared__ __align__(1024) unsigned char smem[];
  CF_REQUIRE_SMEM(kSmemBytes);
  sm90_require_aligned(smem);
  unsigned char* s_q = smem;
  unsigned char* s_k = smem + CF_BLOCK_M * CF_HEAD_DIM * 2;
  unsigned char* s_v = s_k + CF_STAGES * kTileKV;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int group = lane >> 2, tig = lane & 3, wg = warp >> 2;
  // Causal: the query tiles with the most keys start first, over all heads
  // (cf_tile_order.cuh says why the forward takes one chunk).
  const TileOrder order = causal_tile_order_all_heads();
  const int tile_m = CF_CAUSAL ? (int)gridDim.x - 1 - order.tile_rank : (int)blockIdx.x;
  const int h = CF_CAUSAL ? order.head : (int)blockIdx.y;
  const int b = blockIdx.z, h_kv = h / heads_per_kv;
  // v's (and o's) columns: head_dim's, or the spec's own width (specs.KernelSpec.head_dim_v)
  const int head_dim_v = CF_HEAD_DIM_V == CF_HEAD_DIM ? head_dim : CF_HEAD_DIM_V;
  const int q0 = tile_m * CF_BLOCK_M;
  const SeqInfo seq(b, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;  // this sequence's
  if (CF_VARLEN && q0 >= seqlen_q) return;  // the grid covers the longest sequence

  const elem_t* q_head = q + seq.q_offset(stride_qb, stride_qm) + h * stride_qh;
  const elem_t* k_head = k + seq.k_offset(stride_kb, stride_kn) + h_kv * stride_kh;
  const elem_t* v_head = v + seq.k_offset(stride_vb, stride_vn) + h_kv * stride_vh;

  const FwdQueryTile<CF_BLOCK_M, CF_BLOCK_N> tile(seq, b, h, q0, warp, group, tig,
                                                  CF_MOD_ARGS);
  const RowBounds rows(tile.mask, tile.row0);  // for mask_s
  const KeyTiles tiles = tile.tiles;  // visited last first
  const KeptKeyTiles<CF_BLOCK_N> kept(CF_BSP_MASK, b, h, q0, tiles);  // all: no block mask
  const int n_tiles = kept.count();
  const Dropout drop = CF_DROP;  // keeps everything without CF_DROPOUT
  const unsigned int bh = drop.head(b, h, heads);

  float acc[kDT][4], m_i[2], l_i[2];
  init_rows(acc, m_i, l_i);

  const cf_u32 q_wg = smem_addr(s_q) + wg * 64 * 128;  // this warpgroup's rows in panel 0
  const cf_u32 s_k_sa = smem_addr(s_k), s_v_sa = smem_addr(s_v);
  const Sm90Loader<CF_BLOCK_N> load_k(k_head, stride_kn, head_dim, tid);
  const Sm90LoaderV load_v(v_head, stride_vn, head_dim_v, tid);

  // The tile each iteration computes: last first (dense: spelled as before the block mask,
  // whose loop-carried form cost d256 3% on an H200)
  int j_kept = kept.below(tiles.end);
#if CF_FWD_OVERLAP == 3  // the stage mbarriers (below)
  // K stage s holds tiles s, s + 2, ...: tile t is that stage's use t / 2; V: t % 3, t / 3.
  const cf_u32 bars = smem_addr(smem + kTiles);
  const auto k_full = [&](int t) { return bars + 8 * (t & 1); };
  const auto v_full = [&](int t) { return bars + 16 + 8 * (t % 3); };
  const auto k_empty = [&](int t) { return bars + 40 + 8 * (t & 1); };
  const auto v_empty = [&](int t) { return bars + 56 + 8 * (t % 3); };
  const auto wait_full = [](cf_u32 bar, int use) {
    mbar_wait(bar, use & 1);
    fence_proxy_async();  // the copies landed through the generic proxy; wgmma reads async
  };
  const auto release = [lane](cf_u32 bar) {  // this warp's part of the product has landed
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };
  if (tid == 0) {
    for (int t = 0; t < 3; ++t) {
      if (t < 2) mbar_init(k_full(t), kThreads);
      if (t < 2) mbar_init(k_empty(t), CF_WARPS);
      mbar_init(v_full(t), kThreads);
      mbar_init(v_empty(t), CF_WARPS);
    }
    mbar_fence_init();
  }
  __syncthreads();
#endif
  if (n_tiles > 0) {  // prologue: one group [Q + K(last) + V(last)]
    const int j = CF_BLOCK_SPARSE ? j_kept : tiles.end - 1;
    const Sm90Loader<CF_BLOCK_M> load_q(q_head, stride_qm, head_dim, tid);
    load_q.load(s_q, q0, seqlen_q - q0);
    load_k.load(s_k, j * CF_BLOCK_N, seqlen_k - j * CF_BLOCK_N);
#if CF_FWD_OVERLAP == 3
    mbar_arrive_cp_async(k_full(0));  // Q and K(last)
#endif
    load_v.load(s_v, j * CF_BLOCK_N, seqlen_k - j * CF_BLOCK_N);
#if CF_FWD_OVERLAP == 3
    mbar_arrive_cp_async(v_full(0));
#endif
    cp_async_commit();
  }

#if CF_FWD_OVERLAP == 3
  // Value 3 (written in session 19, first run and selected at head_dim 192 in session 42:
  // H100 bf16 +3-8%; at 256 it lost 6% where not causal): value 2 with the per-tile
  // __syncthreads replaced by mbarriers, so a warpgroup waits only for what it reads (a
  // stage's copies: k_full / v_full, every thread arriving when its own cp.async land) and,
  // before it loads into a stage, for both warpgroups to have read it (k_empty / v_empty, one
  // arrival per warp once its product has landed). The two warpgroups may then drift up to
  // a tile apart, each one's softmax under the other's products, as the warp-specialized
  // kernel's turns do.
  cf_u32 p_prev[CF_BLOCK_N / 16][4];  // P of the tile before, packed: its P V is issued late
  if (n_tiles > 0) {
    int j = CF_BLOCK_SPARSE ? j_kept : tiles.end - 1;
#pragma unroll 1
    for (int it = 0; it < n_tiles; ++it) {
      const int next = CF_BLOCK_SPARSE ? kept.below(j) : j - 1;
      wait_full(k_full(it), it >> 1);
      if (it > 0) wait_full(v_full(it - 1), (it - 1) / 3);
      float s[kNT][4];
      wgmma_fence();
      sm90_qk<CF_BLOCK_M, CF_BLOCK_N, CF_HEAD_DIM>(s, q_wg, s_k_sa + (it & 1) * kTileKV);
      wgmma_commit();
      if (it > 0) {
        sm90_pv_packed<CF_BLOCK_N, CF_HEAD_DIM_V>(acc, p_prev,
                                                  s_v_sa + ((it + 2) % 3) * kTileV);
      }
      wgmma_commit();  // (empty at it = 0: the waits below count the same groups)
      if (next >= tiles.begin) {  // tile it + 1, into the stages tiles it - 1 / it - 2 had
        const int next_row = next * CF_BLOCK_N;
        if (it >= 1) mbar_wait(k_empty(it + 1), (it - 1) >> 1);
        load_k.load(s_k + ((it + 1) & 1) * kTileKV, next_row, seqlen_k - next_row);
        mbar_arrive_cp_async(k_full(it + 1));
        if (it >= 2) mbar_wait(v_empty(it + 1), (it - 2) / 3);
        load_v.load(s_v + ((it + 1) % 3) * kTileV, next_row, seqlen_k - next_row);
        mbar_arrive_cp_async(v_full(it + 1));
      }
      wgmma_wait<1>();  // S landed; tile it - 1's P V may still run
      wgmma_fence_regs(s);
      release(k_empty(it));
      const RowOffsets row_off = tile.modify_and_mask(s, j, rows);
      float alpha[2];
      softmax_rows(s, m_i, l_i, alpha, scale_log2, row_off);
      wgmma_wait<0>();  // the P V landed: acc holds it
      wgmma_fence_regs(acc);
      if (it > 0) release(v_empty(it - 1));
      rescale_acc(acc, alpha);  // at it = 0 acc is zero and alpha 0 or 1
      drop.drop_p(s, bh, tile.row0, j * CF_BLOCK_N + 2 * tig);  // after l_i: m, l undropped
      sm90_pack_p<CF_BLOCK_N>(p_prev, s);
      j = next;
    }
    wait_full(v_full(n_tiles - 1), (n_tiles - 1) / 3);
    wgmma_fence();  // the last tile's P V
    sm90_pv_packed<CF_BLOCK_N, CF_HEAD_DIM_V>(acc, p_prev,
                                              s_v_sa + ((n_tiles - 1) % 3) * kTileV);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_regs(acc);
  }
  cp_async_commit();  // this thread's copies as one group, for the wait below
#elif CF_FWD_OVERLAP
  // Iteration 0 is peeled: no wgmma or wait sits on a path ptxas may see as divergent (it
  // then serializes every wgmma, C7519; the packed-sequence build did with an if inside).
  cf_u32 p_prev[CF_BLOCK_N / 16][4];  // P of the tile before, packed: its P V is issued late
  // Tile it (key tile j) has landed for everyone; tile it + 1's loads start (K(it - 1) and
  // V(it - 2), whose stages they take, are no longer read by either warpgroup).
  // CF_FWD_OVERLAP 2: the loads are issued after the tile's wgmma, so the tensor cores start
  // right after the barrier.
  auto wait_tile = [&]() {
    cp_async_wait<0>();   // tile j landed (this thread's copies) ...
    fence_proxy_async();  // ... and is visible to the tensor cores' proxy
    __syncthreads();      // everyone's copies
  };
  auto load_next = [&](int it, int next) {
    if (next >= tiles.begin) {
      const int next_row = next * CF_BLOCK_N;
      load_k.load(s_k + ((it + 1) & 1) * kTileKV, next_row, seqlen_k - next_row);
      load_v.load(s_v + ((it + 1) % 3) * kTileV, next_row, seqlen_k - next_row);
    }
    cp_async_commit();
  };
  auto next_tile = [&](int it, int j) {
    const int next = CF_BLOCK_SPARSE ? kept.below(j) : j - 1;
    wait_tile();
    if (CF_FWD_OVERLAP == 1) load_next(it, next);
    return next;
  };
  if (n_tiles > 0) {
    int j = CF_BLOCK_SPARSE ? j_kept : tiles.end - 1;
    float alpha_last[2] = {1.f, 1.f};  // CF_FWD_RESCALE_EARLY: the scale acc still owes
    {
      const int next = next_tile(0, j);
      float s[kNT][4];
      wgmma_fence();
      sm90_qk<CF_BLOCK_M, CF_BLOCK_N, CF_HEAD_DIM>(s, q_wg, s_k_sa);
      wgmma_commit();
      if (CF_FWD_OVERLAP == 2) load_next(0, next);
      wgmma_wait<0>();
      wgmma_fence_regs(s);
      const RowOffsets row_off = tile.modify_and_mask(s, j, rows);
      float alpha[2];  // acc is still zero: no rescale
      softmax_rows(s, m_i, l_i, alpha, scale_log2, row_off);
      drop.drop_p(s, bh, tile.row0, j * CF_BLOCK_N + 2 * tig);  // after l_i: m, l undropped
      sm90_pack_p<CF_BLOCK_N>(p_prev, s);
      j = next;
    }
#pragma unroll 1
    for (int it = 1; it < n_tiles; ++it) {
      const int next = next_tile(it, j);
      float s[kNT][4];
      wgmma_fence();
      sm90_qk<CF_BLOCK_M, CF_BLOCK_N, CF_HEAD_DIM>(s, q_wg, s_k_sa + (it & 1) * kTileKV);
      wgmma_commit();
      if constexpr (CF_FWD_RESCALE_EARLY) {  // under S; acc is not in flight
        rescale_acc(acc, alpha_last);
        wgmma_fence();  // the multiplies' registers before the product that accumulates them
      }
      sm90_pv_packed<CF_BLOCK_N, CF_HEAD_DIM_V>(acc, p_prev,
                                                s_v_sa + ((it + 2) % 3) * kTileV);
      wgmma_commit();
      if (CF_FWD_OVERLAP == 2) load_next(it, next);
      wgmma_wait<1>();  // S landed; tile it - 1's P V may still run
      wgmma_fence_regs(s);
      const RowOffsets row_off = tile.modify_and_mask(s, j, rows);
      float alpha[2];
      softmax_rows(s, m_i, l_i, alpha, scale_log2, row_off);
      wgmma_wait<0>();  // the P V landed: acc holds it
      wgmma_fence_regs(acc);
      if constexpr (CF_FWD_RESCALE_EARLY) {
        alpha_last[0] = alpha[0], alpha_last[1] = alpha[1];
      } else {
        rescale_acc(acc, alpha);
      }
      drop.drop_p(s, bh, tile.row0, j * CF_BLOCK_N + 2 * tig);
      sm90_pack_p<CF_BLOCK_N>(p_prev, s);
      j = next;
    }
    if constexpr (CF_FWD_RESCALE_EARLY) rescale_acc(acc, alpha_last);
    wgmma_fence();  // the last tile's P V
    sm90_pv_packed<CF_BLOCK_N, CF_HEAD_DIM_V>(acc, p_prev,
                                              s_v_sa + ((n_tiles - 1) % 3) * kTileV);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_regs(acc);
  }
#else
#pragma unroll 1
  for (int it = 0; it < n_tiles; ++it) {
    const int j = CF_BLOCK_SPARSE ? j_kept : tiles.end - 1 - it;
    const int next = CF_BLOCK_SPARSE ? kept.below(j) : j - 1;
    const int stage = it & 1;
    const cf_u32 k_cur = s_k_sa + stage * kTileKV, v_cur = s_v_sa + stage * kTileV;

    cp_async_wait<0>();   // tile j landed (this thread's copies) ...
    fence_proxy_async();  // ... and is visible to the tensor cores' proxy
    __syncthreads();      // everyone's copies; and tile j+1's stage is free again
    if (next >= tiles.begin) {
      const int next_row = next * CF_BLOCK_N;
      load_k.load(s_k + (stage ^ 1) * kTileKV, next_row, seqlen_k - next_row);
      load_v.load(s_v + (stage ^ 1) * kTileV, next_row, seqlen_k - next_row);
    }
    cp_async_commit();

    float s[kNT][4];
    wgmma_fence();
    sm90_qk<CF_BLOCK_M, CF_BLOCK_N, CF_HEAD_DIM>(s, q_wg, k_cur);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_regs(s);

    const RowOffsets row_off = tile.modify_and_mask(s, j, rows);
    online_softmax(s, m_i, l_i, acc, scale_log2, row_off);
    drop.drop_p(s, bh, tile.row0, j * CF_BLOCK_N + 2 * tig);  // after l_i: m, l undropped

    wgmma_fence();
    sm90_pv<CF_BLOCK_N, CF_HEAD_DIM_V>(acc, s, v_cur);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_regs(acc);
    j_kept = next;
  }
#endif
  cp_async_wait<0>();
  __syncthreads();  // both warpgroups are done reading Q: its space becomes the O staging band
                    // (wider than Q when head_dim_v > head_dim: it runs on into the K stages)

  store_forward_epilogue<kDT, kChunksV>(tile, acc, m_i, l_i, sinks, o, stride_ob, stride_om,
                                       stride_oh, m_out, l_out, head_dim_v, s_q, warp, lane,
                                      drop.scale());
}

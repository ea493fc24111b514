// flash_fwd.cu -- FlashAttention-2 forward for float16 / bfloat16 on tensor cores.
//
// Algorithm: FlashAttention-2 forward (Dao 2023, Algorithm 1). One thread block owns one tile
// of CF_BLOCK_M query rows of one (batch, head); it streams the K and V tiles that the tile
// can see and keeps O, the running row max m_i and the running row sum l_i on chip:
//   S = Q K^T (mma.sync m16n8k16, fp32 accumulate), s = S * scale_log2 (log2 units),
//   m_new = max(m_i, rowmax(s)), P = exp2(s - m_new), l_i = l_i * exp2(m_i - m_new) + rowsum(P),
//   acc = acc * exp2(m_i - m_new) + P V;  at the end O = acc / l_i.
//
// Grid: (ceil(seqlen_q / CF_BLOCK_M), heads, batch); blockIdx.x = q tile (reversed when causal,
// so the tiles with the most keys start first), blockIdx.y = query head h (reads kv head
// h / heads_per_kv), blockIdx.z = batch. Block: 32 * CF_WARPS threads; CF_BLOCK_M = 16 *
// CF_WARPS: warp w owns query rows 16w .. 16w + 15 of the tile for the whole kernel.
//
// Tiles: Q is CF_BLOCK_M x CF_HEAD_DIM, loaded once and resident (and, for CF_HEAD_DIM <= 128,
// also held as mma A fragments in registers); K and V are CF_BLOCK_N x CF_HEAD_DIM each,
// streamed through CF_STAGES shared-memory stages with cp.async:
//   CF_STAGES == 2: tile j-1 (K and V) is prefetched into the other stage while tile j is
//                   computed; one __syncthreads per tile.
//   CF_STAGES == 1: K(j-1) is loaded while P V(j) runs and V(j-1) while Q K(j-1)^T runs.
// Key tiles are visited from the last to the first, so the masked ones (the causal diagonal,
// the seqlen_k tail) come first and the rest of the loop runs unmasked. Within a tile each warp
// requests its K / V ldmatrix fragments two mma steps ahead (cf_fwd.cuh, kLdsmAhead).
//
// Shared memory (dynamic, bytes), laid out as [Q | K stage 0..S-1 | V stage 0..S-1]:
//   (CF_BLOCK_M + 2 * CF_STAGES * CF_BLOCK_N) * CF_HEAD_DIM * 2
// Every tile row is CF_HEAD_DIM * 2 bytes of CF_HEAD_DIM / 8 16-byte chunks, no padding;
// chunk c of row r sits at swizzle_chunk<CF_HEAD_DIM / 8>(r, c) (cf_common.cuh), which makes
// every ldmatrix phase and every 16-byte store conflict-free. Columns >= head_dim and rows past
// seqlen are zero-filled on load.
//
// Registers per thread: acc = CF_HEAD_DIM / 2 floats, S / P = CF_BLOCK_N / 2 floats, Q fragments
// = CF_HEAD_DIM / 4 words when held (CF_HEAD_DIM <= 128).
//
// Masking and score modifiers come from cf_mask.cuh (CF_MASK none / causal / local window,
// CF_SOFTCAP, CF_ALIBI, CF_SINKS; docs/masks.md): keys >= seqlen_k; causal is bottom-right
// aligned (query i sees key j iff j <= i + seqlen_k - seqlen_q). Key tiles no row of the tile
// sees are never visited; only tiles that straddle an edge are masked (cf_fwd.cuh's
// FwdQueryTile). With sinks the epilogue folds the sink into m and l (fold_sink).
//
// Outputs: o (batch, seqlen_q, heads, head_dim) = acc / l_i (0 where l_i == 0); m_out and
// l_out, float32 (batch, heads, seqlen_q): m_out = m_i * LN2 in natural-log units (max_j of
// softmax_scale * q_i . k_j; -inf for a row that sees no key), l_out = l_i = sum_j exp(score -
// m). A row that sees no key gets o = 0, m = -inf, l = 0.
//
// Host contract (docs/kernel_abi.md): q, k, v, o rows start 16-byte aligned (o is written with
// 16-byte stores), head_dim is a multiple of 8 with 8 <= head_dim <= CF_HEAD_DIM, head_dim
// contiguous; heads % heads_per_kv == 0; scale_log2 > 0 and finite (the row max is taken on
// raw scores, as in FlashAttention-2); seqlen_q >= 1 (no launch for an empty grid), seqlen_k
// >= 0; seqlen_q + seqlen_k < 2^31; dynamic shared memory >= the formula above (else __trap).
//
// Measured (H100 SXM, bf16, 16k tokens, hidden 2048, TFLOP/s; PyTorch's FA-2 SDPA beside):
// d128 non-causal seqlen 16k: n128 w8 343 (FA-2 337), n64 w8 328, n64 w4 322; seqlen 1k:
// n64 w4 283 (FA-2 312). d128 causal 16k: n128 w8 338 (FA-2 312). d256 16k: n64 w8 331 (FA-2
// 321). Details in bench/dev/NOTES.md (the script that measured them, check_fwd_gpu.py,
// is retired).

#include "cf_config.cuh"
// Tuning knobs of this file only (not part of the ABI; the launcher never sets them). Both
// defaults won on an H100: d128 w4 n64 with Q re-read and 2 blocks/SM, or with 3 to 4 blocks
// of fewer registers (MIN_BLOCKS 3 / 4), all ran 2-10% slower than the defaults.
#ifndef CF_FWD_Q_IN_REGS
#define CF_FWD_Q_IN_REGS (CF_HEAD_DIM <= 128)  // hold Q as A fragments, else re-read per tile
#endif
#ifndef CF_FWD_MIN_BLOCKS
#define CF_FWD_MIN_BLOCKS 1  // __launch_bounds__ min blocks per SM (caps registers)
#endif

#include "cf_common.cuh"
#include "cf_fwd.cuh"
#include "cf_mask.cuh"
#include "cf_seq.cuh"
#include "cf_params.cuh"
#include "cf_tile_order.cuh"

static_assert(CF_DTYPE == 0 || CF_DTYPE == 1, "flash_fwd.cu is the 16-bit kernel");
static_assert(CF_HEAD_DIM % 32 == 0 && CF_HEAD_DIM >= 32 && CF_HEAD_DIM <= 256,
              "head-dim bucket: a multiple of 32 from 32 to 256");
static_assert(CF_BLOCK_M == 16 * CF_WARPS, "a warp owns 16 query rows");
static_assert(CF_BLOCK_N % 16 == 0 && CF_BLOCK_N >= 16, "key tiles are multiples of 16");
static_assert(CF_STAGES == 1 || CF_STAGES == 2, "1 or 2 K/V stages");

namespace {
constexpr int kThreads = 32 * CF_WARPS;
constexpr int kChunks = CF_HEAD_DIM / 8;      // 16-byte chunks per tile row
constexpr int kRowBytes = CF_HEAD_DIM * 2;    // bytes per tile row
constexpr int kKSteps = CF_HEAD_DIM / 16;     // k-steps of S = Q K^T
constexpr int kNT = CF_BLOCK_N / 8;           // S n-tiles (8 keys each) per warp
constexpr int kDT = CF_HEAD_DIM / 8;          // O n-tiles (8 dims each) per warp
constexpr bool kQInRegs = CF_FWD_Q_IN_REGS;  // else Q is re-read from shared memory
constexpr int kSmemBytes = (CF_BLOCK_M + 2 * CF_STAGES * CF_BLOCK_N) * CF_HEAD_DIM * 2;
constexpr int kTileK = CF_BLOCK_N * kRowBytes;  // bytes of one K (or V) stage
}  // namespace

extern "C" __global__ void __launch_bounds__(32 * CF_WARPS, CF_FWD_MIN_BLOCKS)
    flash_fwd(CF_FWD_PARAMS(/* no __restrict__ */), CF_MOD_PARAMS, const float* sinks,
              CF_SEQ_PARAMS CF_BSP_PARAMS CF_DROP_PARAMS) {
  extern __shared__ __align__(128) unsigned char smem[];
  CF_REQUIRE_SMEM(kSmemBytes);
  unsigned char* s_q = smem;                                   // CF_BLOCK_M rows
  unsigned char* s_k = smem + CF_BLOCK_M * kRowBytes;          // CF_STAGES x CF_BLOCK_N rows
  unsigned char* s_v = s_k + CF_STAGES * kTileK;               // CF_STAGES x CF_BLOCK_N rows

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int group = lane >> 2, tig = lane & 3;
  const int tile_m = query_tile_longest_first();  // cf_tile_order.cuh
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / heads_per_kv;
  const int q0 = tile_m * CF_BLOCK_M;
  const SeqInfo seq(b, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;  // this sequence's
  if (CF_VARLEN && q0 >= seqlen_q) return;  // the grid covers the longest sequence

  const elem_t* q_head = q + seq.q_offset(stride_qb, stride_qm) + h * stride_qh;  // row 0
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

  const LdsmLane<kChunks, true> lane_qv(lane);   // Q (A) and V (B, .trans) fragments
  const LdsmLane<kChunks, false> lane_k(lane);   // K (B) fragments
  unsigned char* q_band = s_q + warp * 16 * kRowBytes;  // this warp's 16 Q rows
  const cf_u32 q_band_sa = smem_addr(q_band);           // ... as a shared-space address
  const cf_u32 s_k_sa = smem_addr(s_k), s_v_sa = smem_addr(s_v);
  cf_u32 qf[kQInRegs ? kKSteps : 1][4];                 // Q A fragments (kQInRegs only)

  typedef TileLoader<CF_BLOCK_N, kChunks, kThreads> KVLoader;
  const KVLoader load_k(k_head, stride_kn, head_dim, tid);
  const KVLoader load_v(v_head, stride_vn, head_dim, tid);

  // -- prologue: groups [Q + K(last)], [V(last)]
  // The key tile each iteration computes: last first (dense: spelled as before the block
  // mask, without the loop-carried cursor)
  int j_kept = kept.below(tiles.end);
  if (n_tiles > 0) {
    const int j = CF_BLOCK_SPARSE ? j_kept : tiles.end - 1;
    const TileLoader<CF_BLOCK_M, kChunks, kThreads> load_q(q_head, stride_qm, head_dim, tid);
    load_q.load(s_q, q0, seqlen_q - q0);
    load_k.load(s_k, j * CF_BLOCK_N, seqlen_k - j * CF_BLOCK_N);
    cp_async_commit();
    load_v.load(s_v, j * CF_BLOCK_N, seqlen_k - j * CF_BLOCK_N);
    cp_async_commit();
    if (kQInRegs) {
      cp_async_wait<1>();  // Q + K(last) landed
      __syncthreads();
      load_q_frags(qf, q_band_sa, lane_qv);  // the Q tile stays in registers for the K/V loop
    }
  }

#pragma unroll 1
  for (int it = 0; it < n_tiles; ++it) {
    const int j = CF_BLOCK_SPARSE ? j_kept : tiles.end - 1 - it;
    const int next = CF_BLOCK_SPARSE ? kept.below(j) : j - 1;  // loaded when >= tiles.begin
    const int stage = (CF_STAGES == 2) ? (it & 1) : 0;
    const cf_u32 k_cur = s_k_sa + stage * kTileK, v_cur = s_v_sa + stage * kTileK;
    const int next_row = next * CF_BLOCK_N;
    const int next_valid = seqlen_k - next_row;

    // -- wait for K(j) (STAGES 2: and V(j)); the barrier also frees the stage written next
    if (CF_STAGES == 2) cp_async_wait<0>();  // in flight: [K(j) + V(j)]
    else cp_async_wait<1>();                  // in flight: [K(j)], [V(j)]
    __syncthreads();
    if (CF_STAGES == 2) {  // prefetch tile j-1 into the other stage (read by tile j+1: done)
      if (next >= tiles.begin) {
        load_k.load(s_k + (stage ^ 1) * kTileK, next_row, next_valid);
        load_v.load(s_v + (stage ^ 1) * kTileK, next_row, next_valid);
      }
      cp_async_commit();  // always, so that every iteration sees one group in flight
    }

    // -- S = Q K(j)^T, modified, masked, then P = exp2(S * scale_log2 - m_new)
    float s[kNT][4];
    warp_qk<kNT, kKSteps, kQInRegs>(s, qf, q_band_sa, k_cur, lane_qv, lane_k);
    const RowOffsets row_off = tile.modify_and_mask(s, j, rows);
    online_softmax(s, m_i, l_i, acc, scale_log2, row_off);
    drop.drop_p(s, bh, tile.row0, j * CF_BLOCK_N + 2 * tig);  // after l_i: m, l undropped

    if (CF_STAGES == 1) {
      cp_async_wait<0>();  // V(j) landed
      __syncthreads();     // ... and every warp is done with K(j): load K(j-1) in its place
      if (next >= tiles.begin) load_k.load(s_k, next_row, next_valid);
      cp_async_commit();
    }

    // -- O += P V(j)
    warp_pv(acc, s, v_cur, lane_qv);

    if (CF_STAGES == 1) {
      __syncthreads();  // every warp is done with V(j): load V(j-1) in its place
      if (next >= tiles.begin) load_v.load(s_v, next_row, next_valid);
      cp_async_commit();
    }
    j_kept = next;
  }
  cp_async_wait<0>();  // only empty groups can be left; keeps the Q band safe to reuse

  store_forward_epilogue<kDT, kChunks>(tile, acc, m_i, l_i, sinks, o, stride_ob, stride_om,
                                      stride_oh, m_out, l_out, head_dim, s_q, warp, lane,
                                      drop.scale());
}

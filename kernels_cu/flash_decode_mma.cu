// flash_decode_mma.cu -- the split-KV decode kernel on tensor cores, for blocks of 3 to 64
// query rows (q_len x the query heads of one kv group), fp16 / bf16 only. The append and
// combine kernels, DecodeParams, DecodeBlock (which keys and rows a block owns), RowScores
// (softcap, ALiBi, causal / window mask) and the block epilogue come from flash_decode.cu,
// so the two split kernels share one plan (cuflash/decode.py), one scratch layout and one
// combine. The NumPy mirror of the math is cuflash/decode_cpu.py.
//
// Why: the SIMT split kernel spends 2 x 8 x rows FMAs per 16-byte K chunk and its V chunk per
// lane; from 4 rows up it is issue-bound (H200, bf16 d128: GQA group 4 at 2.9-3.1 TB/s
// against 4.24 for one row). With mma.sync m16n8k16 a warp does 16 rows x 16 keys x 16
// columns in one instruction: per 16 keys and head_dim 128 a warp issues 32 mma, about
// 24 ldmatrix and ~60 softmax instructions for 8 KB of K+V, where an H200 SM has ~500
// clocks (16.5 B / clock) to take those bytes in: the loads, not the issue slots, bound it.
//
// flash_decode_split  grid (batch * heads_kv * row_tiles, num_splits), CF_WARPS warps, as the
//   SIMT kernel: blockIdx.x = (b * heads_kv + h_kv) * row_tiles + row tile (CF_ROWS rows
//   each, row r = i * group + g; padded rows are zero and see no key), blockIdx.y = split.
//   -- Keys [key_begin, key_end) of the split go through shared memory in tiles of
//   CF_BLOCK_N keys, CF_STAGES tiles in a ring filled by cp.async (16 B per copy, zeros past
//   key_end and past head_dim): while tile t is computed, tiles t + 1 .. t + stages - 1 are
//   in flight. That ring is what keeps HBM busy (FlashAttention-2's multistage mainloop).
//   -- The rows are kBands = CF_ROWS / 16 bands of 16 (one mma M). Warp w computes band
//   w % kBands against keys part w / kBands of every tile (kWarpKeys = block_n * kBands /
//   warps keys), and keeps its own m_i, l_i, acc (16 rows x D, fp32, mma C layout):
//   S = Q K^T (Q read from shared memory by ldmatrix, never scaled in 16 bits: the fp32
//   scores are), the RowScores terms and mask, the online softmax (log2 units,
//   FlashAttention-2 Alg. 1), P rounded to 16 bits, acc += P V. No barrier between warps
//   inside a tile; one __syncthreads per tile guards the ring. The key parts are merged at
//   the end through shared memory (write_block_rows). K and V are read from HBM once per
//   block whatever the band count: 64 rows (MQA, or a group of 8 at q_len 8) cost no more
//   bytes than 16.
//
// Bytes in flight (H200: 132 SMs, ~4.3 TB/s copy, ~1 us loaded latency: Little's law wants
// ~33 KB per SM): a tile is CF_BLOCK_N x D x 2 (K, V) x 2 bytes, 32 KB for the default
// (64 keys at D 128); with 2 stages one tile is always loading, and ptxas / shared memory
// allow CF_MIN_BLOCKS (3 at D <= 128) blocks per SM: ~96 KB per SM, three times the need,
// so a block that is computing does not starve the SM. bench/dev/decode_variants.py --mma
// times the other tiles / stages / warps.
//
// Shared memory (dynamic): max(Q CF_ROWS x D + K and V rings 2 x stages x block_n x D, in
// 16-bit, swizzled rows of D / 8 16-byte chunks; merge: key parts x CF_ROWS x (D + 2)
// floats): 68 KB at D 128, 16 rows, 64 keys, 2 stages (cuflash/decode.py's
// DecodeMmaSpec.smem_bytes is the same formula).

#include "cf_config.cuh"  // CF_DTYPE, CF_HEAD_DIM, CF_WARPS, CF_BLOCK_N, CF_STAGES
#ifndef CF_MIN_BLOCKS
#define CF_MIN_BLOCKS 3
#endif
#ifndef CF_ROWS
#define CF_ROWS 16  // rows per block: 16, 32 or 64, bands of one mma M (16 rows) each
#endif
// Knobs (issue 16; cuflash/decode.py selects CF_STEP_ADDR for contiguous caches and CF_PAGE_IDS
// with CF_PAGED_STEP for paged ones; the others were timed and not kept, docs/decode.md):
#ifndef CF_L2_AHEAD  // tiles past the ring's newest one whose K/V lines are prefetched to L2
#define CF_L2_AHEAD 0
#endif
#ifndef CF_PAGE_IDS  // 1: block_table loads branch-free a tile ahead, the row finished at use
#define CF_PAGE_IDS 0
#endif
#ifndef CF_STEP_ADDR  // 1: contiguous caches' copy addresses advance a tile's stride at a time
#define CF_STEP_ADDR 0
#endif
#ifndef CF_WHOLE_TILES  // 1: a warp's keys that every row of it sees skip the per-score mask
#define CF_WHOLE_TILES 0
#endif
#ifndef CF_PAGED_STEP  // with CF_PAGE_IDS, a mask of P in {1, 2, 4}: tiles of P whole pages (or
#define CF_PAGED_STEP 0  // of one page) copy from P page bases a tile (key_loop_stepped)
#endif
#define CF_DECODE_MMA 1
#include "flash_decode.cu"

#if CF_DTYPE == 2
#error "the tensor-core decode takes fp16 / bf16; float32 runs the SIMT split kernel"
#endif

namespace mma_decode {
enum : int {
  kDim = CF_HEAD_DIM,
  kChunks = kDim / 8,  // 16-byte chunks per row
  kBlockN = CF_BLOCK_N,
  kStages = CF_STAGES,
  kWarps = CF_WARPS,
  kThreads = 32 * kWarps,
  kTileRows = CF_ROWS,
  kBands = kTileRows / 16,  // 16-row bands: warp w computes band w % kBands ...
  kKeyParts = kWarps / kBands,  // ... for keys part w / kBands of every tile
  kWarpKeys = kBlockN / kKeyParts,  // keys of a tile each warp owns
  kNT = kWarpKeys / 8,  // n8 score tiles per warp
  kDT = kDim / 8,  // n8 accumulator tiles
  kTileBytes = kBlockN * kDim * 2,  // one of K or V, one stage
  kQBytes = kTileRows * kDim * 2,
  kRingBytes = 2 * kStages * kTileBytes,
  kMergeBytes = kKeyParts * kTileRows * (kDim + 2) * 4,
  kSmemBytes = kQBytes + kRingBytes > kMergeBytes ? kQBytes + kRingBytes : kMergeBytes,
  kRowsPerPass = kThreads / kChunks,  // tile rows the block copies per pass
  kLoads = kBlockN / kRowsPerPass,  // K (and V) copies per thread per tile
  kL2Ahead = CF_L2_AHEAD,
  kLineElems = 128 / 2,  // 16-bit elements per 128-byte L2 line
  kRowLines = (kDim + kLineElems - 1) / kLineElems,  // lines per K (or V) row
  kPageIds = CF_PAGE_IDS,
  kStepAddr = CF_STEP_ADDR,
  kPagedStep = CF_PAGED_STEP,
  kWholeTiles = CF_WHOLE_TILES,
};
static_assert(kTileRows % 16 == 0 && kWarps % kBands == 0, "CF_ROWS: bands of 16 over warps");
static_assert(kWarpKeys % 16 == 0, "CF_BLOCK_N: 16 keys per warp at least (one mma K step)");
static_assert(kThreads % kChunks == 0 && kBlockN % kRowsPerPass == 0, "tile copy shape");
static_assert(kStages >= 2, "CF_STAGES: a ring of at least two tiles");
}  // namespace mma_decode

// -- K / V tiles: cp.async from the cache rows into the swizzled ring --------------------------
// Thread t copies chunk t % kChunks of rows t / kChunks + n * kRowsPerPass. Its cache rows
// (block_table loads when paged) are looked up a tile ahead, while copies are in flight.
__device__ __forceinline__ void tile_rows(int (&row)[mma_decode::kLoads], const CacheRows& cache,
                                          int key0, int key_end) {
  using namespace mma_decode;
#pragma unroll
  for (int n = 0; n < kLoads; ++n) {
    const int j = key0 + threadIdx.x / kChunks + n * kRowsPerPass;
    row[n] = j < key_end ? cache.row(j) : 0;
  }
}

__device__ __forceinline__ void load_tile(unsigned char* k_tile, unsigned char* v_tile,
                                          const int (&row)[mma_decode::kLoads],
                                          const elem_t* k_head, const elem_t* v_head,
                                          long long stride_kn, long long stride_vn, int key0,
                                          int key_end, int head_dim) {
  using namespace mma_decode;
  const int ch = threadIdx.x % kChunks;
  const bool col_ok = ch * 8 < head_dim;
#pragma unroll
  for (int n = 0; n < kLoads; ++n) {
    const int r = threadIdx.x / kChunks + n * kRowsPerPass;
    const bool ok = col_ok && key0 + r < key_end;
    const int off = swizzle_chunk<kChunks>(r, ch) * 16;
    // a false copy writes zeros and reads nothing; its source is still a mapped address
    cp_async_16(k_tile + off, ok ? k_head + (long long)row[n] * stride_kn + ch * 8 : k_head, ok);
    cp_async_16(v_tile + off, ok ? v_head + (long long)row[n] * stride_vn + ch * 8 : v_head, ok);
  }
}

// The block's kTileRows Q rows (zeros for padded rows and columns), unscaled.
__device__ __forceinline__ void load_q(unsigned char* q_tile, const DecodeParams& p,
                                       const DecodeBlock& blk) {
  using namespace mma_decode;
  for (int c = threadIdx.x; c < kTileRows * kChunks; c += kThreads) {
    const int r = c / kChunks, ch = c % kChunks;
    const bool ok = blk.row_valid(r) && ch * 8 < p.head_dim;
    const elem_t* src = p.q + blk.b * p.stride_qb + (long long)blk.query(r) * p.stride_qm +
                        (long long)blk.head(r) * p.stride_qh + ch * 8;
    cp_async_16(q_tile + swizzle_chunk<kChunks>(r, ch) * 16, ok ? src : p.q, ok);
  }
}

// -- one warp, one tile: S = Q K^T, masked online softmax, acc += P V ---------------------------
// Warp w: rows band * 16 .. +15 (band = w % kBands), keys part * kWarpKeys .. of the tile
// (part = w / kBands). Lane = 4 * group + tig holds band rows group (r = 0) and group + 8
// (r = 1) of the C fragments.
template <bool kMods>
__device__ __forceinline__ void warp_tile(const unsigned char* q_tile, const unsigned char* k_tile,
                                          const unsigned char* v_tile, int key0, int key_end,
                                          const RowScores<2>& rs, float scale_q, float (&m_i)[2],
                                          float (&l_i)[2], float (&acc)[mma_decode::kDT][4]) {
  using namespace mma_decode;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int band_row = (warp % kBands) * 16, wkey = (warp / kBands) * kWarpKeys;
  const int mat = lane >> 3, mrow = lane & 7;  // the 8x8 matrix and row this lane addresses
  const int tig = lane & 3;
  // -- S = Q K^T: Q matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15) are a0..a3; K matrices
  // (keys 0-7 | 8-15) x (cols 0-7 | 8-15) give b0, b1 of keys 0-7, then of keys 8-15
  float s[kNT][4];
#pragma unroll
  for (int j = 0; j < kNT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kDim / 16; ++kk) {
    cf_u32 a[4];
    const int q_row = band_row + (mat & 1) * 8 + mrow;
    ldmatrix_x4(a, q_tile + swizzle_chunk<kChunks>(q_row, 2 * kk + (mat >> 1)) * 16);
#pragma unroll
    for (int np = 0; np < kWarpKeys / 16; ++np) {
      cf_u32 b[4];
      const int key = wkey + 16 * np + (mat >> 1) * 8 + mrow;
      ldmatrix_x4(b, k_tile + swizzle_chunk<kChunks>(key, 2 * kk + (mat & 1)) * 16);
      mma_16816(s[2 * np], a, b[0], b[1]);
      mma_16816(s[2 * np + 1], a, b[2], b[3]);
    }
  }
  // -- scores in log2 units, modifiers, mask (keys past the split's end: -inf). CF_WHOLE_TILES:
  // where every row of the warp sees all of its keys of the tile (a vote; padded rows see
  // every key, see open_padded_rows), no per-score range test.
  bool whole = false;
  if constexpr (kWholeTiles) {
    const int k_lo = key0 + wkey, k_hi = k_lo + kWarpKeys;
    whole = __all_sync(0xffffffffu, k_hi <= key_end && rs.lo[0] <= k_lo && k_hi <= rs.hi[0] &&
                                        rs.lo[1] <= k_lo && k_hi <= rs.hi[1]);
  }
  if (whole) {
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[j][e] = rs.template modify<kMods>(s[j][e] * scale_q,
                                            key0 + wkey + 8 * j + 2 * tig + (e & 1), e >> 1);
  } else {
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + wkey + 8 * j + 2 * tig + (e & 1);
        s[j][e] = key < key_end ? rs.template apply<kMods>(s[j][e] * scale_q, key, e >> 1)
                                : -CF_INF;
      }
    }
  }
  // -- online softmax per row: the row's max over the quad, rescale l_i and acc
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float m_new = m_i[r];
#pragma unroll
    for (int j = 0; j < kNT; ++j) m_new = fmaxf(m_new, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    m_new = quad_max(m_new);
    const float m_safe = m_new == -CF_INF ? 0.f : m_new;  // no key seen yet: no -inf - -inf
    const float alpha = exp2f(m_i[r] - m_safe);
    float rowsum = 0.f;  // this lane's share; the quad's shares are summed at the end
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      s[j][2 * r] = exp2f(s[j][2 * r] - m_safe);
      s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - m_safe);
      rowsum += s[j][2 * r] + s[j][2 * r + 1];
    }
    l_i[r] = alpha * l_i[r] + rowsum;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      acc[dt][2 * r] *= alpha;
      acc[dt][2 * r + 1] *= alpha;
    }
    m_i[r] = m_new;
  }
  // -- acc += P V: P's C fragments of keys 16 kk .. +15 are the A fragment; V matrices
  // (keys 0-7 | 8-15) x (cols 0-7 | 8-15), transposed, give b0, b1 of two column tiles
#pragma unroll
  for (int kk = 0; kk < kWarpKeys / 16; ++kk) {
    const cf_u32 a[4] = {pack2(s[2 * kk][0], s[2 * kk][1]), pack2(s[2 * kk][2], s[2 * kk][3]),
                         pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                         pack2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
    const int key = wkey + 16 * kk + (mat & 1) * 8 + mrow;
#pragma unroll
    for (int dp = 0; dp < kDim / 16; ++dp) {
      cf_u32 b[4];
      ldmatrix_x4_trans(b, v_tile + swizzle_chunk<kChunks>(key, 2 * dp + (mat >> 1)) * 16);
      mma_16816(acc[2 * dp], a, b[0], b[1]);
      mma_16816(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// The split's key loop: tiles of kBlockN keys through the cp.async ring.
template <bool kMods>
__device__ __forceinline__ void key_loop(const DecodeParams& p, const DecodeBlock& blk,
                                         const RowScores<2>& rs, unsigned char* smem,
                                         float (&m_i)[2], float (&l_i)[2],
                                         float (&acc)[mma_decode::kDT][4]) {
  using namespace mma_decode;
  const unsigned char* q_tile = smem;
  unsigned char* k_ring = smem + kQBytes;
  unsigned char* v_ring = k_ring + kStages * kTileBytes;
  const CacheRows cache = cache_rows(p, blk.b);
  const elem_t* k_head = p.k + entry_offset(p, blk.b, p.stride_kb) + blk.h_kv * p.stride_kh;
  const elem_t* v_head = p.v + entry_offset(p, blk.b, p.stride_vb) + blk.h_kv * p.stride_vh;
  const int begin = blk.key_begin, end = blk.key_end;
  const int tiles = end > begin ? (end - begin + kBlockN - 1) / kBlockN : 0;  // block-uniform
  int row[kLoads];
  // -- prologue: tiles 0 .. stages - 2 in flight (Q's copies ride in the first group)
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < tiles) {
      tile_rows(row, cache, begin + t * kBlockN, end);
      load_tile(k_ring + t * kTileBytes, v_ring + t * kTileBytes, row, k_head, v_head,
                p.stride_kn, p.stride_vn, begin + t * kBlockN, end, p.head_dim);
    }
    cp_async_commit();
  }
  tile_rows(row, cache, begin + (kStages - 1) * kBlockN, end);
  int slot = 0, next_slot = kStages - 1;
  for (int t = 0; t < tiles; ++t) {
    cp_async_wait<kStages - 2>();  // tile t has landed (this thread's copies) ...
    __syncthreads();  // ... everyone's; and every warp is done with tile t - 1's slot
    // -- refill the slot tile t - 1 used with tile t + stages - 1
    const int next = t + kStages - 1;
    if (next < tiles)
      load_tile(k_ring + next_slot * kTileBytes, v_ring + next_slot * kTileBytes, row, k_head,
                v_head, p.stride_kn, p.stride_vn, begin + next * kBlockN, end, p.head_dim);
    cp_async_commit();  // an empty group past the end keeps the wait count right
    if (next + 1 < tiles) tile_rows(row, cache, begin + (next + 1) * kBlockN, end);
    warp_tile<kMods>(q_tile, k_ring + slot * kTileBytes, v_ring + slot * kTileBytes,
                     begin + t * kBlockN, end, rs, p.scale_q, m_i, l_i, acc);
    slot = slot + 1 == kStages ? 0 : slot + 1;
    next_slot = next_slot + 1 == kStages ? 0 : next_slot + 1;
  }
}

// -- candidate key loop (CF_PAGE_IDS, CF_L2_AHEAD): the ring above, two changes ---------------
// Why CF_PAGE_IDS: tile_rows finishes each row from its block_table load at once, in a branch
// per row, so every warp sits out kLoads dependent loads between issuing a tile and computing
// the previous one; with 8 warps per SM nothing hides that (paged GQA at 78-85% of contiguous,
// H200 session 3, where the SIMT kernel's 16-20 warps per SM lose 1-2% with the same lookups
// per byte). PageIdLookup issues the loads branch-free (the key clamped into the split) and
// keeps the raw page ids; the row is finished when the tile is issued, a whole tile of compute
// later. Power-of-two page sizes (every usual one) divide by a shift.
// Why CF_L2_AHEAD: one block keeps one 32 KB tile loading whatever it computes (the ring's
// other slot is being read), 64 KB per SM at 2 blocks; a prefetch.global.L2 of the lines of
// tile t + kL2Ahead costs no register, no shared memory and no wait, so the DRAM sees more
// bytes requested while the ring (and the carveout) stay as they are.

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Rows of the cache for a tile, from the cache map at once (the measured kernel's way).
struct RowLookup {
  CacheRows cache;
  int row[mma_decode::kLoads];
  __device__ __forceinline__ void look(int key0, int key_end) {
    tile_rows(row, cache, key0, key_end);
  }
  __device__ __forceinline__ int at(int n, int) const { return row[n]; }
};

// Raw block_table entries a tile ahead; rows finished at use (contiguous: the key itself).
struct PageIdLookup {
  CacheRows cache;
  int shift;  // log2(page_size), or -1 when it is not a power of two
  int id[mma_decode::kLoads];

  __device__ __forceinline__ int page_of(int j) const {
    return shift >= 0 ? j >> shift : j / cache.page_size;
  }
  __device__ __forceinline__ void look(int key0, int key_end) {
    using namespace mma_decode;
    if (cache.table == nullptr || key0 >= key_end) return;  // block-uniform
#pragma unroll
    for (int n = 0; n < kLoads; ++n) {  // every load first, none used here
      const int j = min(key0 + (int)threadIdx.x / kChunks + n * kRowsPerPass, key_end - 1);
      id[n] = __ldg(cache.table + page_of(j));
    }
  }
  __device__ __forceinline__ int at(int n, int j) const {
    if (cache.table == nullptr) return j;
    const int page = min(max(id[n], 0), cache.num_pages - 1);
    const int offset = shift >= 0 ? j & (cache.page_size - 1) : j % cache.page_size;
    return page * cache.page_size + offset;
  }
};

__device__ __forceinline__ PageIdLookup page_id_lookup(const CacheRows& cache) {
  PageIdLookup l;
  l.cache = cache;
  const int ps = cache.page_size;
  l.shift = cache.table != nullptr && ps > 0 && (ps & (ps - 1)) == 0 ? __ffs(ps) - 1 : -1;
  return l;
}

// load_tile with the rows of a lookup. Not folded into load_tile (which could call it with
// a lookup of its row array): that changes the measured kernels' SASS (session 16: 22 of
// 22 tensor-core specs differ, 44 fewer instructions at d128), not yet timed on a GPU.
template <class Lookup>
__device__ __forceinline__ void load_tile_at(unsigned char* k_tile, unsigned char* v_tile,
                                             const Lookup& rows, const elem_t* k_head,
                                             const elem_t* v_head, long long stride_kn,
                                             long long stride_vn, int key0, int key_end,
                                             int head_dim) {
  using namespace mma_decode;
  const int ch = threadIdx.x % kChunks;
  const bool col_ok = ch * 8 < head_dim;
#pragma unroll
  for (int n = 0; n < kLoads; ++n) {
    const int r = threadIdx.x / kChunks + n * kRowsPerPass;
    const bool ok = col_ok && key0 + r < key_end;
    const long long row = rows.at(n, key0 + r);
    const int off = swizzle_chunk<kChunks>(r, ch) * 16;
    cp_async_16(k_tile + off, ok ? k_head + row * stride_kn + ch * 8 : k_head, ok);
    cp_async_16(v_tile + off, ok ? v_head + row * stride_vn + ch * 8 : v_head, ok);
  }
}

// The K and V lines of the tile at key0 into L2 (contiguous caches only: a paged tile's rows
// are not known that early). Lines past head_dim are not touched.
__device__ __forceinline__ void prefetch_tile(const elem_t* k_head, const elem_t* v_head,
                                              long long stride_kn, long long stride_vn, int key0,
                                              int key_end, int head_dim) {
  using namespace mma_decode;
  constexpr int kLines = kBlockN * kRowLines;  // of K (and of V) per tile
#pragma unroll
  for (int u = 0; u < (kLines + kThreads - 1) / kThreads; ++u) {
    const int i = threadIdx.x + u * kThreads;
    const int j = key0 + i / kRowLines, col = (i % kRowLines) * kLineElems;
    if (i < kLines && j < key_end && col < head_dim) {
      prefetch_l2(k_head + (long long)j * stride_kn + col);
      prefetch_l2(v_head + (long long)j * stride_vn + col);
    }
  }
}

template <bool kMods, class Lookup>
__device__ __forceinline__ void key_loop_candidate(const DecodeParams& p, const DecodeBlock& blk,
                                                   const RowScores<2>& rs, unsigned char* smem,
                                                   Lookup rows, float (&m_i)[2], float (&l_i)[2],
                                                   float (&acc)[mma_decode::kDT][4]) {
  using namespace mma_decode;
  const unsigned char* q_tile = smem;
  unsigned char* k_ring = smem + kQBytes;
  unsigned char* v_ring = k_ring + kStages * kTileBytes;
  const elem_t* k_head = p.k + entry_offset(p, blk.b, p.stride_kb) + blk.h_kv * p.stride_kh;
  const elem_t* v_head = p.v + entry_offset(p, blk.b, p.stride_vb) + blk.h_kv * p.stride_vh;
  const int begin = blk.key_begin, end = blk.key_end;
  const int tiles = end > begin ? (end - begin + kBlockN - 1) / kBlockN : 0;  // block-uniform
  const bool prefetch = kL2Ahead > 0 && p.block_table == nullptr;
  const auto tile_at = [&](int t) { return begin + t * kBlockN; };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < tiles) {
      rows.look(tile_at(t), end);
      load_tile_at(k_ring + t * kTileBytes, v_ring + t * kTileBytes, rows, k_head, v_head,
                   p.stride_kn, p.stride_vn, tile_at(t), end, p.head_dim);
    }
    cp_async_commit();
  }
#pragma unroll
  for (int a = 0; a < kL2Ahead; ++a) {  // the tiles the loop would prefetch before its start
    if (prefetch && kStages - 1 + a < tiles)
      prefetch_tile(k_head, v_head, p.stride_kn, p.stride_vn, tile_at(kStages - 1 + a), end,
                    p.head_dim);
  }
  rows.look(tile_at(kStages - 1), end);
  int slot = 0, next_slot = kStages - 1;
  for (int t = 0; t < tiles; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = t + kStages - 1;
    if (next < tiles)
      load_tile_at(k_ring + next_slot * kTileBytes, v_ring + next_slot * kTileBytes, rows,
                   k_head, v_head, p.stride_kn, p.stride_vn, tile_at(next), end, p.head_dim);
    cp_async_commit();
    if (prefetch && next + kL2Ahead < tiles)
      prefetch_tile(k_head, v_head, p.stride_kn, p.stride_vn, tile_at(next + kL2Ahead), end,
                    p.head_dim);
    if (next + 1 < tiles) rows.look(tile_at(next + 1), end);
    warp_tile<kMods>(q_tile, k_ring + slot * kTileBytes, v_ring + slot * kTileBytes,
                     tile_at(t), end, rs, p.scale_q, m_i, l_i, acc);
    slot = slot + 1 == kStages ? 0 : slot + 1;
    next_slot = next_slot + 1 == kStages ? 0 : next_slot + 1;
  }
}

// -- CF_STEP_ADDR (contiguous specs since session 18): copy addresses stepped ---------------
// Why: tile_rows and load_tile rebuild each copy's 64-bit source from its row index (a row
// select, a 64-bit multiply, a select against the head pointer), kLoads x 2 copies a tile.
// In the SASS of the d128 split (sm_90, NVRTC 13.0, session 17; the loop without score
// modifiers, built for contiguous caches only) a warp issues 617 instructions a tile at 16
// rows (16 copies) and 456 at 32 rows (8), ahead of the tile's mma in every warp's path.
// Here each thread keeps the source of its first row and steps it by a tile's stride, with
// fixed shared-memory offsets, and whole tiles skip the bounds tests: 359 and 321. Paged
// caches keep key_loop.
struct SteppedCopies {
  const elem_t* k;  // this thread's chunk of its first row in the next tile to issue
  const elem_t* v;
  long long k_pass, v_pass;  // elements between its copies of one tile (kRowsPerPass rows)
  long long k_step, v_step;  // elements per tile (kBlockN rows)
  int keys_left;  // keys of the split from the next tile on (block-uniform)
  int r0, ch;  // its first row of a tile, its 16-byte chunk of a row
  bool col_ok;  // its chunk lies inside head_dim

  // Issue the next tile into (k_tile, v_tile) and step to the one after. A whole tile
  // inside the split (all but the last) needs no bounds test or source select a copy.
  __device__ __forceinline__ void issue(unsigned char* k_tile, unsigned char* v_tile,
                                        const elem_t* k_head, const elem_t* v_head) {
    using namespace mma_decode;
    if (col_ok && keys_left >= kBlockN) {
#pragma unroll
      for (int n = 0; n < kLoads; ++n) {
        cp_async_16(k_tile + offset(n), k + n * k_pass, true);
        cp_async_16(v_tile + offset(n), v + n * v_pass, true);
      }
    } else {
#pragma unroll
      for (int n = 0; n < kLoads; ++n) {
        const bool ok = col_ok && r0 + n * kRowsPerPass < keys_left;
        // a false copy writes zeros and reads nothing; its source is still a mapped address
        cp_async_16(k_tile + offset(n), ok ? k + n * k_pass : k_head, ok);
        cp_async_16(v_tile + offset(n), ok ? v + n * v_pass : v_head, ok);
      }
    }
    k += k_step;
    v += v_step;
    keys_left -= kBlockN;
  }
  // The same for a paged tile at key0: copy n from its page slot's base (TilePages).
  template <class Pages>
  __device__ __forceinline__ void issue_paged(unsigned char* k_tile, unsigned char* v_tile,
                                              const elem_t* k_head, const elem_t* v_head,
                                              const Pages& pages, int key0, long long stride_kn,
                                              long long stride_vn) {
    using namespace mma_decode;
    constexpr int kSlots = Pages::kSlots;
    const elem_t* k_base[kSlots];
    const elem_t* v_base[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const long long row = pages.slot_row(s, key0) + r0;
      k_base[s] = k_head + row * stride_kn + ch * 8;
      v_base[s] = v_head + row * stride_vn + ch * 8;
    }
    constexpr int kSlotRows = kBlockN / kSlots;
    const bool whole = col_ok && keys_left >= kBlockN;
#pragma unroll
    for (int n = 0; n < kLoads; ++n) {
      const int s = n * kRowsPerPass / kSlotRows, rows_in = n * kRowsPerPass % kSlotRows;
      const bool ok = whole || (col_ok && r0 + n * kRowsPerPass < keys_left);
      cp_async_16(k_tile + offset(n), ok ? k_base[s] + rows_in * stride_kn : k_head, ok);
      cp_async_16(v_tile + offset(n), ok ? v_base[s] + rows_in * stride_vn : v_head, ok);
    }
    keys_left -= kBlockN;
  }
  // Byte offset of copy n in a ring slot: rows 8 apart share a swizzle phase, so the
  // offsets then step by a constant.
  __device__ __forceinline__ int offset(int n) const {
    using namespace mma_decode;
    return kRowsPerPass % 8 == 0
               ? swizzle_chunk<kChunks>(r0, ch) * 16 + n * kRowsPerPass * kChunks * 16
               : swizzle_chunk<kChunks>(r0 + n * kRowsPerPass, ch) * 16;
  }
};

// -- CF_PAGED_STEP (paged specs since session 18): SteppedCopies on a paged cache ----------
// A tile of P pages (P = kBlockN / page_size; 1 when page_size is a multiple of kBlockN) whose
// first key starts a page (P > 1) or whose keys lie in one page (P = 1): copy n of a thread
// (row r0 + n * kRowsPerPass, r0 < kRowsPerPass) then sits in page slot n * kRowsPerPass /
// (kBlockN / P) at a fixed row of that page whenever page_size is a multiple of kRowsPerPass.
// So a tile needs P block_table loads (issued a tile ahead, as CF_PAGE_IDS does) and P bases
// per operand; the copies are the bases plus fixed row offsets, where PageIdLookup finishes
// every copy's row from its own page id. Other page sizes and unaligned splits (a window can
// clip a split's first key) keep CF_PAGE_IDS's loop.
template <int P>
struct TilePages {
  enum : int { kPaged = 1, kSlots = P, kPageRows = mma_decode::kBlockN / P };  // slot rows
  CacheRows cache;
  int shift;  // log2(page_size), or -1
  int id[P];  // raw block_table entries of the next tile to issue

  // Whether a block's split can take this loop (block-uniform).
  __device__ __forceinline__ static bool fits(const CacheRows& c, int begin) {
    using namespace mma_decode;
    const int ps = c.page_size;
    if (ps % kRowsPerPass != 0) return false;
    return P == 1 ? ps % kBlockN == 0 && begin % kBlockN == 0 : ps == kPageRows && begin % ps == 0;
  }
  __device__ __forceinline__ int page_of(int key) const {
    return shift >= 0 ? key >> shift : key / cache.page_size;
  }
  __device__ __forceinline__ void look(int key0, int key_end) {
#pragma unroll
    for (int s = 0; s < P; ++s) id[s] = __ldg(cache.table + page_of(min(key0 + s * kPageRows,
                                                                        key_end - 1)));
  }
  // The cache row of slot s's first tile row (tile starting at key0).
  __device__ __forceinline__ long long slot_row(int s, int key0) const {
    const int page = min(max(id[s], 0), cache.num_pages - 1);
    const int in_page = P > 1 ? 0 : (shift >= 0 ? key0 & (cache.page_size - 1)
                                                : key0 % cache.page_size);
    return (long long)page * cache.page_size + in_page;
  }
};

// Contiguous caches: SteppedCopies steps its own sources.
struct NoPages {
  enum : int { kPaged = 0 };
};

// Its set-up and ring loop mirror key_loop's. Sharing them through one helper changed the PTX
// of 24 measured decode specs (session 17), so the fold waits until a GPU can time both.
// Pages: NoPages (contiguous) or TilePages<P>, whose bases are set before each tile's copies.
template <bool kMods, class Pages>
__device__ __forceinline__ void key_loop_stepped(const DecodeParams& p, const DecodeBlock& blk,
                                                 const RowScores<2>& rs, unsigned char* smem,
                                                 Pages pages, float (&m_i)[2], float (&l_i)[2],
                                                 float (&acc)[mma_decode::kDT][4]) {
  using namespace mma_decode;
  constexpr bool kPaged = Pages::kPaged != 0;
  const unsigned char* q_tile = smem;
  unsigned char* k_ring = smem + kQBytes;
  unsigned char* v_ring = k_ring + kStages * kTileBytes;
  const elem_t* k_head = p.k + entry_offset(p, blk.b, p.stride_kb) + blk.h_kv * p.stride_kh;
  const elem_t* v_head = p.v + entry_offset(p, blk.b, p.stride_vb) + blk.h_kv * p.stride_vh;
  const int begin = blk.key_begin, end = blk.key_end;
  const int tiles = end > begin ? (end - begin + kBlockN - 1) / kBlockN : 0;  // block-uniform
  const int ch = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;
  SteppedCopies copies;
  copies.k = k_head + (long long)(begin + r0) * p.stride_kn + ch * 8;
  copies.v = v_head + (long long)(begin + r0) * p.stride_vn + ch * 8;
  copies.k_pass = kRowsPerPass * p.stride_kn;
  copies.v_pass = kRowsPerPass * p.stride_vn;
  copies.k_step = kBlockN * p.stride_kn;
  copies.v_step = kBlockN * p.stride_vn;
  copies.keys_left = end - begin;
  copies.r0 = r0;
  copies.ch = ch;
  copies.col_ok = ch * 8 < p.head_dim;
  // The next tile u's copies into (k_tile, v_tile); paged: its page bases first, then the
  // page ids of tile u + 1 requested (used a tile of compute later).
  const auto issue = [&](int u, unsigned char* k_tile, unsigned char* v_tile) {
    if constexpr (kPaged) {
      const int key0 = begin + u * kBlockN;
      copies.issue_paged(k_tile, v_tile, k_head, v_head, pages, key0, p.stride_kn, p.stride_vn);
      if (u + 1 < tiles) pages.look(key0 + kBlockN, end);
    } else {
      copies.issue(k_tile, v_tile, k_head, v_head);
    }
  };
  if constexpr (kPaged) {
    if (tiles > 0) pages.look(begin, end);
  }
  // -- prologue: tiles 0 .. stages - 2 in flight (Q's copies ride in the first group)
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < tiles) issue(t, k_ring + t * kTileBytes, v_ring + t * kTileBytes);
    cp_async_commit();
  }
  int slot = 0, next_slot = kStages - 1;
  for (int t = 0; t < tiles; ++t) {
    cp_async_wait<kStages - 2>();  // tile t has landed (this thread's copies) ...
    __syncthreads();  // ... everyone's; and every warp is done with tile t - 1's slot
    if (t + kStages - 1 < tiles)  // refill the slot tile t - 1 used
      issue(t + kStages - 1, k_ring + next_slot * kTileBytes, v_ring + next_slot * kTileBytes);
    cp_async_commit();  // an empty group past the end keeps the wait count right
    warp_tile<kMods>(q_tile, k_ring + slot * kTileBytes, v_ring + slot * kTileBytes,
                     begin + t * kBlockN, end, rs, p.scale_q, m_i, l_i, acc);
    slot = slot + 1 == kStages ? 0 : slot + 1;
    next_slot = next_slot + 1 == kStages ? 0 : next_slot + 1;
  }
}

// The key loop the knobs ask for: the measured one when all are 0.
template <bool kMods>
__device__ __forceinline__ void run_key_loop(const DecodeParams& p, const DecodeBlock& blk,
                                             const RowScores<2>& rs, unsigned char* smem,
                                             float (&m_i)[2], float (&l_i)[2],
                                             float (&acc)[mma_decode::kDT][4]) {
  using namespace mma_decode;
  const CacheRows cache = cache_rows(p, blk.b);
  if constexpr (kPageIds) {
    if constexpr (kPagedStep != 0) {  // block-uniform choices; P = 4 / 2 / 1 pages a tile
      if (cache.table != nullptr) {
        const int shift = (cache.page_size & (cache.page_size - 1)) == 0 && cache.page_size > 0
                              ? __ffs(cache.page_size) - 1 : -1;
        if ((kPagedStep & 4) && TilePages<4>::fits(cache, blk.key_begin))
          return key_loop_stepped<kMods>(p, blk, rs, smem, TilePages<4>{cache, shift}, m_i, l_i,
                                         acc);
        if ((kPagedStep & 2) && TilePages<2>::fits(cache, blk.key_begin))
          return key_loop_stepped<kMods>(p, blk, rs, smem, TilePages<2>{cache, shift}, m_i, l_i,
                                         acc);
        if ((kPagedStep & 1) && TilePages<1>::fits(cache, blk.key_begin))
          return key_loop_stepped<kMods>(p, blk, rs, smem, TilePages<1>{cache, shift}, m_i, l_i,
                                         acc);
      }
    }
    key_loop_candidate<kMods>(p, blk, rs, smem, page_id_lookup(cache), m_i, l_i, acc);
  } else if constexpr (kStepAddr) {
    if (cache.table == nullptr)  // block-uniform
      key_loop_stepped<kMods>(p, blk, rs, smem, NoPages{}, m_i, l_i, acc);
    else
      key_loop<kMods>(p, blk, rs, smem, m_i, l_i, acc);
  } else if constexpr (kL2Ahead > 0) {
    RowLookup rows;
    rows.cache = cache;
    key_loop_candidate<kMods>(p, blk, rs, smem, rows, m_i, l_i, acc);
  } else {
    key_loop<kMods>(p, blk, rs, smem, m_i, l_i, acc);
  }
}

// CF_WHOLE_TILES: padded rows (past the problem's rows; their Q is zero and they are never
// written) see every key, so they never keep a tile from being whole. As is otherwise.
__device__ __forceinline__ RowScores<2> open_padded_rows(RowScores<2> rs, const DecodeBlock& blk,
                                                         const int (&rows)[2]) {
  if constexpr (mma_decode::kWholeTiles) {
#pragma unroll
    for (int n = 0; n < 2; ++n)
      if (!blk.row_valid(rows[n])) {
        rs.lo[n] = 0;
        rs.hi[n] = 0x7fffffff;
      }
  }
  return rs;
}

extern "C" __global__ void __launch_bounds__(mma_decode::kThreads, CF_MIN_BLOCKS)
flash_decode_split(const DecodeParams p) {
  using namespace mma_decode;
  if (CF_DECODE_PDL) pdl_launch_dependents();  // flash_decode.cu's CF_DECODE_PDL
  // (named apart from the combine kernel's `smem`: one translation unit; both start at the
  // block's dynamic shared memory)
  extern __shared__ __align__(128) unsigned char tiles_smem[];
  unsigned char* smem = tiles_smem;
  CF_REQUIRE_SMEM(kSmemBytes);
  const DecodeBlock blk = decode_block(p);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = lane >> 2, tig = lane & 3;
  const int band_row = (warp % kBands) * 16, part = warp / kBands;
  const int lane_rows[2] = {band_row + group, band_row + group + 8};
  const RowScores<2> rs = open_padded_rows(row_scores(p, blk, lane_rows), blk, lane_rows);

  load_q(smem, p, blk);  // committed with the first tile's copies
  float m_i[2] = {-CF_INF, -CF_INF}, l_i[2] = {0.f, 0.f}, acc[kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;

  // -- the key loop, without the softcap / ALiBi terms unless one is on (block-uniform)
  if (rs.modified())
    run_key_loop<true>(p, blk, rs, smem, m_i, l_i, acc);
  else
    run_key_loop<false>(p, blk, rs, smem, m_i, l_i, acc);

  // -- merge the key parts through shared memory (over the ring): [part][row] acc, m_i, l_i
  cp_async_wait<0>();
  __syncthreads();
  float* sm_acc = reinterpret_cast<float*>(smem);
  float* sm_m = sm_acc + kKeyParts * kTileRows * kDim;
  float* sm_l = sm_m + kKeyParts * kTileRows;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = part * kTileRows + lane_rows[r];
    const float l = quad_sum(l_i[r]);
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
      *reinterpret_cast<float2*>(sm_acc + row * kDim + 8 * dt + 2 * tig) =
          make_float2(acc[dt][2 * r], acc[dt][2 * r + 1]);
    if (tig == 0) {
      sm_m[row] = m_i[r];
      sm_l[row] = l;
    }
  }
  __syncthreads();
  write_block_rows<kKeyParts, kTileRows>(p, blk, sm_acc, sm_m, sm_l, kThreads);
#if CF_FUSED_COMBINE
  merge_splits_if_last<kTileRows>(p, sm_acc, kThreads);
#endif
}

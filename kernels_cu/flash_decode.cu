// flash_decode.cu -- split-KV attention for decoding: a few query rows against a long K/V
// cache (Flash-Decoding: FlashAttention-2's online softmax, with the key axis split over
// thread blocks and the partial results merged by their log-sum-exp), every CF_DTYPE
// (0 fp16, 1 bf16, 2 fp32). The NumPy mirror is cuflash/decode_cpu.py.
//
// Decoding reads the whole cache once per step, so it is bound by memory bandwidth, and the
// parallelism comes from the key axis. Three kernels, all taking one DecodeParams:
//
//   flash_decode_append   (only with k_new / v_new) grid (ceil(batch * seqlen_new * heads_kv
//     * head_dim / 8 / kThreads)), one thread per 8 elements: copies k_new[b, t], v_new[b, t]
//     into the cache at position cache_seqlens[b] + t (through block_table when paged),
//     before the split kernel on the same stream reads it.
//   flash_decode_split    grid (batch * heads_kv * row_tiles, num_splits), CF_WARPS warps.
//     blockIdx.x = (b * heads_kv + h_kv) * row_tiles + row tile, blockIdx.y = split.
//     One block streams keys [split * keys_per_split, +keys_per_split) of kv head h_kv of
//     batch entry b (clipped to that entry's valid length and to the keys its rows can see)
//     for CF_ROWS query rows: the query heads of the kv group times the q_len queries, row
//     r = i * group + g (query i, head h_kv * group + g), so K/V are read once per group.
//     rows = q_len * group; more than CF_ROWS rows take several row tiles (each re-reads
//     the key range). Writes o and lse directly when num_splits == 1; else the normalized
//     partial o (float32) and its lse for the combine; with CF_FUSED_COMBINE the last
//     block of a row tile merges them itself (merge_splits_if_last) and there is no combine.
//   flash_decode_combine  grid (batch * q_len * heads), one block of CF_COMBINE_WARPS warps
//     per query row: lse = log(sum_s exp(lse_s)), o = sum_s exp(lse_s - lse) * o_s (the
//     math of cuflash.merge_attention), o in elem_t, lse float32.
//
// Inside a split block (CF_HEAD_DIM = D, a power of two from 32 to 256):
//   kLanes = D / 8 lanes share one key row, each holding 8 consecutive columns (one 16-byte
//   load for 16-bit data, two for float32); a warp covers 32 / kLanes key rows per load, the
//   block kGroups = CF_WARPS * 32 / kLanes "key groups". Per step each group loads CF_KEYS K
//   rows and CF_KEYS V rows (all issued before any is used), group g taking keys
//   step + c * kGroups + g. With CF_STAGES 2 the loads of step n + 1 are issued before step
//   n is computed (register double buffering): specs with many rows spend long enough on
//   the arithmetic of a step that, without it, their warps would stop loading meanwhile.
//   Scores are dot products reduced over the kLanes lanes by shuffles; every group keeps
//   its own m_i, l_i, acc per row (online softmax, FlashAttention-2 Alg. 1, in log2 units:
//   q is pre-multiplied by softmax_scale * LOG2E and scores exponentiated with exp2). The
//   groups are merged at the end through shared memory.
//
// Scores (docs/masks.md, FlashAttention's order: scale, softcap, ALiBi, mask), per row r of
// query i with the diagonal key diag = L - q_len + i (L: the entry's valid length):
//   s = softcap * tanh(scale * q.k / softcap)    (q pre-scaled by scale / softcap)
//   s -= slope_h * |diag - j|                    (alibi_slopes)
//   visible iff lo_r <= j < hi_r: causal hi = diag + 1; window (left, right) lo = diag - left,
//   hi = diag + right + 1 (-1: unbounded); always 0 <= j < L.
//
// Shared memory (dynamic, split kernel): kGroups * CF_ROWS * (D + 2) floats (every group's
// acc, m_i and l_i for the final merge): at most 34 KB at 4 warps. Combine kernel:
// CF_COMBINE_WARPS * (head_dim + 2) floats (each warp's acc, m and l).
//
// Layouts (strides in elements, head_dim contiguous, rows 16-byte aligned):
//   q, o       (batch, q_len, heads, head_dim)
//   k, v       contiguous: (batch, seqlen_cache, heads_kv, head_dim), any strides;
//              paged: (num_pages, page_size, heads_kv, head_dim) with stride_kb ==
//              page_size * stride_kn, so cache row page * page_size + offset is one index
//   block_table int32 (batch, max_pages) or null: position j of entry b is row
//              block_table[b, j / page_size] * page_size + j % page_size (page ids clamped
//              to [0, num_pages), never checked on the device)
//   k_new, v_new (batch, seqlen_new, heads_kv, head_dim) appended at cache_seqlens[b]
//   cache_seqlens int32 (batch,) or null (every entry holds seqlen_cache keys); the valid
//              length is cache_seqlens[b] + seqlen_new, clamped to [0, seqlen_cache] (never
//              checked on the device: no host sync)
//   alibi_slopes float32 (heads,) or (batch, heads) (alibi_stride_b 0 or heads), or null
//   lse        float32 (batch, heads, q_len), natural log; -inf for a row that sees no key
//   o_part     float32 (num_splits, batch, q_len, heads, head_dim), contiguous
//   lse_part   float32 (num_splits, batch, heads, q_len), contiguous
//   split_counters int32 (batch * heads_kv * row_tiles): one a split block's row tile, zero
//              at the launch (CF_FUSED_COMBINE; null without it, or where the plan keeps the
//              combine kernel)
// A row that sees no key: o = 0, lse = -inf.

#include "cf_config.cuh"  // CF_DTYPE, CF_HEAD_DIM (32, 64, 128 or 256), CF_WARPS, CF_STAGES
#ifndef CF_ROWS
#define CF_ROWS 1  // query rows per block: 1, 2, 4 or 8
#endif
#ifndef CF_KEYS
#define CF_KEYS 4  // key rows per group per step
#endif
#ifndef CF_MIN_BLOCKS  // resident blocks per SM asked of ptxas (see kMinBlocks)
#define CF_MIN_BLOCKS (CF_ROWS == 1 ? 4 : CF_ROWS <= 4 ? 3 : 2)
#endif
#ifndef CF_DECODE_MMA  // 1: included by flash_decode_mma.cu, which brings its own split kernel
#define CF_DECODE_MMA 0
#endif

#define CF_COMBINE_WARPS 8
#define CF_COMBINE_BATCH 4  // splits per warp whose partial o are loaded before any is used
#ifndef CF_COMBINE_ROWS  // 1: at most kCombineBatch splits, one warp a row (combine_by_warps)
#define CF_COMBINE_ROWS 0
#endif
// 1 (a candidate, sm_90 and newer; decode.py's `pdl`): the split's blocks let the combine,
// launched as its programmatic dependent (cuflash/pdl.py), start as they begin, and the
// combine waits for the split's writes: its launch and its blocks' start-up overlap the
// split's last wave instead of following it.
#ifndef CF_DECODE_PDL
#define CF_DECODE_PDL 0
#endif

#include "cf_common.cuh"  // elem_t, float_to_elem, CF_LOG2E; the tensor-core split
                           // (flash_decode_mma.cu) takes its mma / cp.async wrappers from it
#include "cf_mask.cuh"    // RuntimeMask: the visible keys of a row

namespace decode {
// Compile-time constants as enumerators (NVRTC would emit namespace-scope constexpr
// variables as .global data).
enum : int {
  kDim = CF_HEAD_DIM,
  kRows = CF_ROWS,
  kKeys = CF_KEYS,
  kStages = CF_STAGES,
  kThreads = 32 * CF_WARPS,
  kLanes = kDim / 8,  // lanes per key row
  kGroups = kThreads / kLanes,  // key rows per block per load
  kStep = kGroups * kKeys,  // keys per block per step
  // Resident blocks per SM asked of ptxas: a register cap of 65536 / (kMinBlocks * kThreads)
  // (128, 170, 256). Without a minimum ptxas picked 56-80 registers for one row and spilled
  // (NVRTC 13.5, sm_80 / sm_120); two rows with 8 keys spill at 128 since the mask and
  // ALiBi terms (RowScores) joined; eight rows need about 250. decode.select_decode picks
  // it (the split heuristic counts on it); the default here is the same formula.
  kMinBlocks = CF_MIN_BLOCKS,
};
static_assert(kDim == 32 || kDim == 64 || kDim == 128 || kDim == 256, "CF_HEAD_DIM");
#if !CF_DECODE_MMA
static_assert(kRows == 1 || kRows == 2 || kRows == 4 || kRows == 8, "CF_ROWS");
static_assert(kStages == 1 || kStages == 2, "CF_STAGES");
#endif
}  // namespace decode

// Every argument of the three kernels; decode.py's _PARAMS builds the same C layout.
struct DecodeParams {
  const elem_t* q;
  elem_t* k;  // written only by flash_decode_append
  elem_t* v;
  const elem_t* k_new;
  const elem_t* v_new;
  const int* cache_seqlens;
  const int* block_table;
  const float* alibi_slopes;
  elem_t* o;
  float* lse;
  float* o_part;
  float* lse_part;
  int* split_counters;  // CF_FUSED_COMBINE: a ticket counter a row tile, zeroed; else null
  int batch, q_len, heads, heads_kv, head_dim;
  int seqlen_cache;  // keys an entry can hold (paged: max_pages * page_size)
  int seqlen_new;  // keys appended by this call (0: none)
  int page_size, num_pages, max_pages;
  int num_splits, keys_per_split, row_tiles;
  int causal, window_left, window_right;  // -1: that side unbounded
  int alibi_stride_b;  // 0: slopes (heads,); heads: (batch, heads)
  long long stride_qb, stride_qm, stride_qh;
  long long stride_kb, stride_kn, stride_kh;  // paged: stride_kb is the page stride
  long long stride_vb, stride_vn, stride_vh;
  long long stride_ob, stride_om, stride_oh;
  long long stride_knb, stride_knm, stride_knh;  // k_new
  long long stride_vnb, stride_vnm, stride_vnh;  // v_new
  float scale_q;  // q multiplier: softmax_scale * LOG2E, or softmax_scale / softcap
  float softcap_log2;  // softcap * LOG2E; 0: no softcap
};

// -- 8 consecutive elements: raw load (kept raw while in flight), then floats ------------------
#if CF_DTYPE == 2
struct Chunk8 { float4 lo, hi; };
#else
struct Chunk8 { uint4 u; };
#endif

__device__ __forceinline__ uint4 ldg_nc_v4(const void* p) {
  uint4 r;
  asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// K and V are read once: non-coherent loads; zeros where `ok` is false.
__device__ __forceinline__ Chunk8 load_chunk(const elem_t* p, bool ok) {
  Chunk8 c;
#if CF_DTYPE == 2
  c.lo = c.hi = make_float4(0.f, 0.f, 0.f, 0.f);
  if (ok) {
    uint4 a = ldg_nc_v4(p), b = ldg_nc_v4(p + 4);
    c.lo = make_float4(__uint_as_float(a.x), __uint_as_float(a.y), __uint_as_float(a.z),
                       __uint_as_float(a.w));
    c.hi = make_float4(__uint_as_float(b.x), __uint_as_float(b.y), __uint_as_float(b.z),
                       __uint_as_float(b.w));
  }
#else
  c.u = make_uint4(0u, 0u, 0u, 0u);
  if (ok) c.u = ldg_nc_v4(p);
#endif
  return c;
}

__device__ __forceinline__ float half_bits_to_float(cf_u32 bits) {
#if CF_DTYPE == 0
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((cf_u16)bits));
  return f;
#else
  return __uint_as_float(bits << 16);  // bf16 is the top half of a float32
#endif
}

__device__ __forceinline__ void chunk_to_float(const Chunk8& c, float f[8]) {
#if CF_DTYPE == 2
  f[0] = c.lo.x; f[1] = c.lo.y; f[2] = c.lo.z; f[3] = c.lo.w;
  f[4] = c.hi.x; f[5] = c.hi.y; f[6] = c.hi.z; f[7] = c.hi.w;
#else
  const cf_u32 w[4] = {c.u.x, c.u.y, c.u.z, c.u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = half_bits_to_float(w[i] & 0xffffu);
    f[2 * i + 1] = half_bits_to_float(w[i] >> 16);
  }
#endif
}

// Raw copy of 8 elements (the append kernel): 16 bytes, 32 for float32.
__device__ __forceinline__ void copy_chunk(elem_t* dst, const elem_t* src) {
  uint4* d = reinterpret_cast<uint4*>(dst);
  d[0] = ldg_nc_v4(src);
#if CF_DTYPE == 2
  d[1] = ldg_nc_v4(src + 4);
#endif
}

// -- where cache position j of batch entry b lives ---------------------------------------------
// Contiguous: row j of the entry (the caller adds b * stride_kb). Paged: row
// page * page_size + j % page_size of the (num_pages * page_size)-row cache.
struct CacheRows {
  const int* table;  // block_table[b, :], or null (contiguous)
  int page_size, num_pages;

  __device__ __forceinline__ int row(int j) const {
    if (table == nullptr) return j;
    const int page = min(max(__ldg(table + j / page_size), 0), num_pages - 1);
    return page * page_size + j % page_size;
  }
};

__device__ __forceinline__ CacheRows cache_rows(const DecodeParams& p, int b) {
  CacheRows c;
  c.table = p.block_table ? p.block_table + (long long)b * p.max_pages : nullptr;
  c.page_size = p.page_size;
  c.num_pages = p.num_pages;
  return c;
}

// Offset (elements) of entry b's cache in k / v: 0 when paged (the rows say where).
__device__ __forceinline__ long long entry_offset(const DecodeParams& p, int b, long long stride_b) {
  return p.block_table ? 0 : (long long)b * stride_b;
}

// -- which keys and rows a block owns, and the mask policy -----------------------------------
struct DecodeBlock {
  int b, h_kv, group, q_len, row0, rows;  // rows of the whole (b, h_kv) problem
  int seqlen;  // valid keys of entry b, appended ones included
  int key_begin, key_end;  // this split's keys, clipped to the keys its rows can see
  RuntimeMask mask;  // which keys a row sees (cf_mask.cuh)

  __device__ __forceinline__ bool row_valid(int r) const { return row0 + r < rows; }
  __device__ __forceinline__ int query(int r) const { return (row0 + r) / group; }
  __device__ __forceinline__ int head(int r) const { return h_kv * group + (row0 + r) % group; }
  // the key on query i's diagonal: bottom-right alignment within the valid keys
  __device__ __forceinline__ int diag(int r) const { return seqlen - q_len + query(r); }
  // keys row r sees: [row_key_begin, row_key_end) (cf_mask.cuh)
  __device__ __forceinline__ int row_key_begin(int r) const { return mask.key_begin(diag(r)); }
  __device__ __forceinline__ int row_key_end(int r) const {
    return row_valid(r) ? mask.key_end(diag(r)) : 0;
  }
};

__device__ __forceinline__ DecodeBlock decode_block(const DecodeParams& p) {
  DecodeBlock blk;
  const int bh = blockIdx.x / p.row_tiles;
  blk.b = bh / p.heads_kv;
  blk.h_kv = bh % p.heads_kv;
  blk.group = p.heads / p.heads_kv;
  blk.q_len = p.q_len;
  blk.rows = p.q_len * blk.group;
  blk.row0 = (blockIdx.x % p.row_tiles) * decode::kRows;
  const int len = (p.cache_seqlens ? p.cache_seqlens[blk.b] : p.seqlen_cache) + p.seqlen_new;
  blk.seqlen = max(0, min(len, p.seqlen_cache));
  blk.mask = RuntimeMask{blk.seqlen, p.causal, p.window_left, p.window_right};
  // -- the split's keys, clipped to the union of what the rows see (a window skips the rest)
  int lo = blk.seqlen, hi = 0;
#pragma unroll
  for (int r = 0; r < decode::kRows; ++r) {
    if (blk.row_valid(r) && blk.row_key_begin(r) < blk.row_key_end(r)) {
      lo = min(lo, blk.row_key_begin(r));
      hi = max(hi, blk.row_key_end(r));
    }
  }
  const int begin = blockIdx.y * p.keys_per_split;
  blk.key_begin = max(begin, lo);
  blk.key_end = min(min(begin + p.keys_per_split, blk.seqlen), hi);
  return blk;
}

// Score terms of kN rows kept in registers: the visible key range, ALiBi's slope and
// diagonal. The SIMT split holds every row of its block (kN = CF_ROWS); a tensor-core lane
// holds the two rows of its mma C fragment (kN = 2).
template <int kN>
struct RowScores {
  int lo[kN], hi[kN], diag[kN];
  float slope_log2[kN];  // 0 without ALiBi
  float softcap_log2;  // 0: no softcap
  bool alibi;

  // -- s = softcap * tanh(x / softcap) - slope * |diag - j|, in log2 units; hidden: -inf.
  // kMods false: neither softcap nor ALiBi is on (the key loop is instantiated for both, so
  // plain attention pays for neither test per score).
  template <bool kMods>
  __device__ __forceinline__ float apply(float dot, int j, int r) const {
    float s = dot;
    if (kMods) {
      // tanhf, not tanh.approx: its 2^-11 relative error would show in float32 outputs
      if (softcap_log2 != 0.f) s = softcap_log2 * tanhf(dot);
      if (alibi) s -= slope_log2[r] * fabsf((float)(diag[r] - j));
    }
    return (j >= lo[r] && j < hi[r]) ? s : -CF_INF;
  }
  // The terms alone, for a key every row sees (the tensor-core split's whole tiles; apply's
  // first half, not shared with it: that changed the measured kernels' PTX).
  template <bool kMods>
  __device__ __forceinline__ float modify(float dot, int j, int r) const {
    float s = dot;
    if (kMods) {
      // tanhf, not tanh.approx: its 2^-11 relative error would show in float32 outputs
      if (softcap_log2 != 0.f) s = softcap_log2 * tanhf(dot);
      if (alibi) s -= slope_log2[r] * fabsf((float)(diag[r] - j));
    }
    return s;
  }
  __device__ __forceinline__ bool modified() const { return softcap_log2 != 0.f || alibi; }
};

// The terms of block rows rows[0..kN) (indices into the block's row tile).
template <int kN>
__device__ __forceinline__ RowScores<kN> row_scores(const DecodeParams& p, const DecodeBlock& blk,
                                                    const int (&rows)[kN]) {
  RowScores<kN> rs;
  rs.softcap_log2 = p.softcap_log2;
  rs.alibi = p.alibi_slopes != nullptr;
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    const int r = rows[n];
    rs.lo[n] = blk.row_key_begin(r);
    rs.hi[n] = blk.row_key_end(r);
    rs.diag[n] = blk.diag(r);
    rs.slope_log2[n] = rs.alibi && blk.row_valid(r)
        ? p.alibi_slopes[(long long)blk.b * p.alibi_stride_b + blk.head(r)] * CF_LOG2E : 0.f;
  }
  return rs;
}

// -- warp reductions (the split kernels' own merge of the splits) ---------------------------
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// -- the block's rows out: merge the partial (m_i, l_i, acc) of kParts parts -----------------
// Shared memory holds, per part g and tile row r: acc at sm_acc[(g * kTileRows + r) * kDim],
// m_i at sm_m[g * kTileRows + r], l_i at sm_l[...] (log2 units). Each thread finishes
// (row, column) elements: O = acc / l, lse in natural log; written to o / lse with one split,
// else to the float32 partials of the combine.
template <int kParts, int kTileRows>
__device__ __forceinline__ void write_block_rows(const DecodeParams& p, const DecodeBlock& blk,
                                                 const float* sm_acc, const float* sm_m,
                                                 const float* sm_l, int threads) {
  using namespace decode;
  const int split = blockIdx.y;
  for (int idx = threadIdx.x; idx < kTileRows * kDim; idx += threads) {
    const int r = idx / kDim, d = idx % kDim;
    if (!blk.row_valid(r) || d >= p.head_dim) continue;
    float m = -CF_INF;
    for (int g = 0; g < kParts; ++g) m = fmaxf(m, sm_m[g * kTileRows + r]);
    const float m_safe = m == -CF_INF ? 0.f : m;
    float l = 0.f, a = 0.f;
    for (int g = 0; g < kParts; ++g) {
      const float w = exp2f(sm_m[g * kTileRows + r] - m_safe);
      l += w * sm_l[g * kTileRows + r];
      a += w * sm_acc[(g * kTileRows + r) * kDim + d];
    }
    // __fdividef: no IEEE-division subroutine call (its ABI spills registers); l <= seqlen
    // is far below 2^126, where it would flush to 0. A NaN l (a NaN score) stays NaN.
    const float out = l == 0.f ? 0.f : __fdividef(a, l);
    const float row_lse = l == 0.f ? -CF_INF : (m_safe + log2f(l)) * CF_LN2;
    const int i = blk.query(r), h = blk.head(r);
    if (p.num_splits == 1) {
      p.o[blk.b * p.stride_ob + (long long)i * p.stride_om + (long long)h * p.stride_oh + d] =
          float_to_elem(out);
      if (d == 0) p.lse[((long long)blk.b * p.heads + h) * p.q_len + i] = row_lse;
    } else {
      const long long prow = ((long long)split * p.batch + blk.b) * p.q_len + i;  // (s, b, i)
      p.o_part[(prow * p.heads + h) * p.head_dim + d] = out;
      if (d == 0)
        p.lse_part[(((long long)split * p.batch + blk.b) * p.heads + h) * p.q_len + i] = row_lse;
    }
  }
}

// -- CF_FUSED_COMBINE: the last split block of a row tile merges the splits -------------------
// Why: a split call is otherwise two kernels, and the combine's ~2 us (its launch, then the
// latency of its dependent loads, H200 session 18) follow the split kernel's last block; here
// only the row tile that finishes last pays for a merge, the others' merges run under the
// streaming of the rest. Each block writes its partial rows as without the knob, then takes a
// ticket on its row tile's counter (zeroed by a memset before the call, decode.py's plan); the
// block that draws num_splits - 1 reads every split's lse and partial o back from L2 (the
// threadFenceReduction pattern: stores, fence, barrier, atomic; then fence, .cg loads) and
// writes o and lse. Weights w_s = exp2(lse_s - m) / sum_s' exp2(lse_s' - m) (log2 units),
// o = sum_s w_s o_s: cuflash.merge_attention's math. Shared memory: tile rows x splits weights
// over the block's own (the plan fuses only where they fit). A candidate, not selected: 0.7-15%
// slower on an H100 (session 41; one wave of blocks ends together, so the merges are the tail).
#ifndef CF_FUSED_COMBINE
#define CF_FUSED_COMBINE 0
#endif
#if CF_FUSED_COMBINE
#ifndef CF_MERGE_BATCH  // splits whose partial o a thread loads before using any
#define CF_MERGE_BATCH 8  // (16 spilled the fp32 one-row specs on sm_120, NVRTC 13)
#endif
enum : int { kMergeBatch = CF_MERGE_BATCH };
template <int kTileRows>
__device__ __forceinline__ void merge_splits_if_last(const DecodeParams& p, float* sm_w,
                                                     int threads) {
  const int n = p.num_splits;
  if (n == 1 || p.split_counters == nullptr) return;  // no counters: the combine kernel merges
  __shared__ int last;
  __threadfence();  // this block's partial o and lse, device-wide before its ticket
  __syncthreads();  // (also: write_block_rows is done with the shared memory sm_w reuses)
  if (threadIdx.x == 0) last = atomicAdd(p.split_counters + blockIdx.x, 1) == n - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // the other blocks' partials were fenced before their tickets
  // the row tile again from blockIdx and p (decode_block's): nothing of the split's loop is
  // kept live for this tail (keeping its DecodeBlock spilled two specs, NVRTC 13.0 sm_90)
  const int bh = blockIdx.x / p.row_tiles, b = bh / p.heads_kv, group = p.heads / p.heads_kv;
  const int row0 = (blockIdx.x % p.row_tiles) * kTileRows, h0 = (bh % p.heads_kv) * group;
  const int rows = min(kTileRows, p.q_len * group - row0);  // valid rows of the tile
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = threads >> 5;
  const long long lse_stride = (long long)p.batch * p.heads * p.q_len;  // one split's lse
  // -- a warp a row: lse_s (log2 units) into sm_w, then the normalized weights over them
  for (int r = warp; r < rows; r += warps) {
    const int i = (row0 + r) / group, h = h0 + (row0 + r) % group;  // DecodeBlock's query / head
    const long long lse_row = ((long long)b * p.heads + h) * p.q_len + i;
    float m = -CF_INF;
    for (int s = lane; s < n; s += 32) {
      const float x = __ldcg(p.lse_part + s * lse_stride + lse_row) * CF_LOG2E;
      sm_w[r * n + s] = x;
      m = fmaxf(m, x);
    }
    m = warp_max(m);
    const float m_safe = m == -CF_INF ? 0.f : m;  // no split saw a key
    float l = 0.f;
    for (int s = lane; s < n; s += 32) l += exp2f(sm_w[r * n + s] - m_safe);
    l = warp_sum(l);
    const float inv = l == 0.f ? 0.f : __fdividef(1.f, l);  // l <= num_splits
    for (int s = lane; s < n; s += 32) sm_w[r * n + s] = exp2f(sm_w[r * n + s] - m_safe) * inv;
    if (lane == 0) p.lse[lse_row] = l == 0.f ? -CF_INF : (m_safe + log2f(l)) * CF_LN2;
  }
  __syncthreads();
  // -- a thread (row, 4 columns): o = sum_s w_s o_s, kMergeBatch splits' loads in flight
  const int quads = p.head_dim / 4;  // head_dim % 8 == 0
  const long long part_stride = (long long)p.batch * p.q_len * p.heads * p.head_dim;
  for (int idx = threadIdx.x; idx < rows * quads; idx += threads) {
    const int r = idx / quads, d = 4 * (idx % quads);
    const int i = (row0 + r) / group, h = h0 + (row0 + r) % group;
    const float* part = p.o_part + (((long long)b * p.q_len + i) * p.heads + h) * p.head_dim + d;
    const float* w = sm_w + r * n;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < n; s0 += kMergeBatch) {
      float4 x[kMergeBatch];
#pragma unroll
      for (int u = 0; u < kMergeBatch; ++u)
        x[u] = s0 + u < n ? __ldcg(reinterpret_cast<const float4*>(part + (s0 + u) * part_stride))
                          : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int u = 0; u < kMergeBatch; ++u) {
        const float ws = s0 + u < n ? w[s0 + u] : 0.f;
        acc.x = fmaf(ws, x[u].x, acc.x);
        acc.y = fmaf(ws, x[u].y, acc.y);
        acc.z = fmaf(ws, x[u].z, acc.z);
        acc.w = fmaf(ws, x[u].w, acc.w);
      }
    }
    elem_t* out = p.o + b * p.stride_ob + (long long)i * p.stride_om +
                  (long long)h * p.stride_oh + d;
    out[0] = float_to_elem(acc.x);
    out[1] = float_to_elem(acc.y);
    out[2] = float_to_elem(acc.z);
    out[3] = float_to_elem(acc.w);
  }
}
#endif

#if !CF_DECODE_MMA  // -- the SIMT split kernel -----------------------------------------------

// Sum over the kLanes lanes that share a key row (aligned groups of a power of two).
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int off = decode::kLanes / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// -- online softmax: fold kKeys scores of each row into (m_i, l_i, acc) ------------------------
// s[c][r] holds scores in log2 units (-inf where masked); on return it holds p.
__device__ __forceinline__ void softmax_update(float s[decode::kKeys][decode::kRows],
                                               float m_i[decode::kRows], float l_i[decode::kRows],
                                               float acc[decode::kRows][8]) {
  using namespace decode;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float m_new = m_i[r];
#pragma unroll
    for (int c = 0; c < kKeys; ++c) m_new = fmaxf(m_new, s[c][r]);  // NaN-ignoring, like fmax
    const float m_safe = m_new == -CF_INF ? 0.f : m_new;  // no key seen yet: no -inf - -inf
    // -- rescale l_i and acc by exp2(m_old - m_new)
    const float alpha = exp2f(m_i[r] - m_safe);
    float rowsum = 0.f;
#pragma unroll
    for (int c = 0; c < kKeys; ++c) {
      s[c][r] = exp2f(s[c][r] - m_safe);
      rowsum += s[c][r];
    }
    l_i[r] = alpha * l_i[r] + rowsum;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] *= alpha;
    m_i[r] = m_new;
  }
}

// -- one step of keys: step + c * kGroups + grp for c < kKeys -----------------------------------
struct KeyStep {
  Chunk8 k[decode::kKeys], v[decode::kKeys];
};

// The cache rows of a step's keys (0 past key_end). Paged, these are block_table loads: they
// are issued one step ahead, while the previous step's K/V loads are in flight.
__device__ __forceinline__ void key_rows(int row[decode::kKeys], const CacheRows& cache, int step,
                                         int key_end, int grp) {
#pragma unroll
  for (int c = 0; c < decode::kKeys; ++c) {
    const int j = step + c * decode::kGroups + grp;
    row[c] = j < key_end ? cache.row(j) : 0;
  }
}

// Issue every K and V load of a step before any is used.
__device__ __forceinline__ void load_step(KeyStep& st, const int row[decode::kKeys],
                                          const elem_t* k_base, const elem_t* v_base,
                                          long long stride_kn, long long stride_vn, int step,
                                          int key_end, int grp, bool col_ok) {
#pragma unroll
  for (int c = 0; c < decode::kKeys; ++c) {
    const bool ok = step + c * decode::kGroups + grp < key_end && col_ok;
    st.k[c] = load_chunk(k_base + (long long)row[c] * stride_kn, ok);
    st.v[c] = load_chunk(v_base + (long long)row[c] * stride_vn, ok);
  }
}

template <bool kMods>
__device__ __forceinline__ void compute_step(const KeyStep& st, int step, int key_end, int grp,
                                             const float qf[decode::kRows][8],
                                             const RowScores<decode::kRows>& rs,
                                             float m_i[decode::kRows],
                                             float l_i[decode::kRows],
                                             float acc[decode::kRows][8]) {
  using namespace decode;
  // -- s = q . k in log2 units, reduced over the row's lanes; hidden keys -> -inf
  float s[kKeys][kRows];
#pragma unroll
  for (int c = 0; c < kKeys; ++c) {
    float kf[8];
    chunk_to_float(st.k[c], kf);
    const int j = step + c * kGroups + grp;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) dot = fmaf(qf[r][e], kf[e], dot);
      dot = row_sum(dot);
      s[c][r] = j < key_end ? rs.template apply<kMods>(dot, j, r) : -CF_INF;
    }
  }
  softmax_update(s, m_i, l_i, acc);  // s now holds p
  // -- acc += p @ V
#pragma unroll
  for (int c = 0; c < kKeys; ++c) {
    float vf[8];
    chunk_to_float(st.v[c], vf);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(s[c][r], vf[e], acc[r][e]);
    }
  }
}

// The split block's key loop: keys [blk.key_begin, blk.key_end) folded into m_i, l_i, acc.
template <bool kMods>
__device__ __forceinline__ void key_loop(const DecodeParams& p, const DecodeBlock& blk,
                                         const RowScores<decode::kRows>& rs,
                                         const float qf[decode::kRows][8],
                                         int col, int grp, bool col_ok,
                                         float m_i[decode::kRows], float l_i[decode::kRows],
                                         float acc[decode::kRows][8]) {
  using namespace decode;
  const CacheRows cache = cache_rows(p, blk.b);
  const elem_t* k_base = p.k + entry_offset(p, blk.b, p.stride_kb) +
                         (long long)blk.h_kv * p.stride_kh + col;
  const elem_t* v_base = p.v + entry_offset(p, blk.b, p.stride_vb) +
                         (long long)blk.h_kv * p.stride_vh + col;
  const int begin = blk.key_begin, end = blk.key_end;
  int row[kKeys];
  key_rows(row, cache, begin, end, grp);
  if constexpr (kStages == 1) {
    for (int step = begin; step < end; step += kStep) {  // block-uniform
      KeyStep st;
      load_step(st, row, k_base, v_base, p.stride_kn, p.stride_vn, step, end, grp, col_ok);
      key_rows(row, cache, step + kStep, end, grp);  // next step's rows, behind this step's loads
      compute_step<kMods>(st, step, end, grp, qf, rs, m_i, l_i, acc);
    }
  } else {
    // -- two steps in flight: step n + 1 is loading while step n is computed
    KeyStep a, b;
    load_step(a, row, k_base, v_base, p.stride_kn, p.stride_vn, begin, end, grp, col_ok);
    key_rows(row, cache, begin + kStep, end, grp);
    for (int step = begin; step < end; step += 2 * kStep) {  // block-uniform
      load_step(b, row, k_base, v_base, p.stride_kn, p.stride_vn, step + kStep, end, grp, col_ok);
      key_rows(row, cache, step + 2 * kStep, end, grp);
      compute_step<kMods>(a, step, end, grp, qf, rs, m_i, l_i, acc);
      if (step + kStep >= end) break;
      load_step(a, row, k_base, v_base, p.stride_kn, p.stride_vn, step + 2 * kStep, end, grp,
                col_ok);
      key_rows(row, cache, step + 3 * kStep, end, grp);
      compute_step<kMods>(b, step + kStep, end, grp, qf, rs, m_i, l_i, acc);
    }
  }
}

extern "C" __global__ void __launch_bounds__(decode::kThreads, decode::kMinBlocks)
flash_decode_split(const DecodeParams p) {
  using namespace decode;
  if (CF_DECODE_PDL) pdl_launch_dependents();
  extern __shared__ __align__(16) float smem[];  // float4 stores below
  const DecodeBlock blk = decode_block(p);
  int tile_rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) tile_rows[r] = r;
  const RowScores<kRows> rs = row_scores(p, blk, tile_rows);
  const int lane = threadIdx.x & 31;
  const int col = (lane % kLanes) * 8;  // this thread's 8 columns
  const int grp = (threadIdx.x >> 5) * (32 / kLanes) + lane / kLanes;  // its key group
  const bool col_ok = col < p.head_dim;

  // -- the Q rows (times scale_q) stay in registers for the whole key loop
  float qf[kRows][8];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const bool ok = blk.row_valid(r) && col_ok;
    const elem_t* ptr = p.q + blk.b * p.stride_qb + (long long)blk.query(r) * p.stride_qm +
                        (long long)blk.head(r) * p.stride_qh + col;
    chunk_to_float(load_chunk(ptr, ok), qf[r]);
#pragma unroll
    for (int e = 0; e < 8; ++e) qf[r][e] *= p.scale_q;
  }

  float m_i[kRows], l_i[kRows], acc[kRows][8];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m_i[r] = -CF_INF;
    l_i[r] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;
  }

  // -- the key loop, without the softcap / ALiBi terms unless one is on (block-uniform)
  if (rs.modified())
    key_loop<true>(p, blk, rs, qf, col, grp, col_ok, m_i, l_i, acc);
  else
    key_loop<false>(p, blk, rs, qf, col, grp, col_ok, m_i, l_i, acc);

  // -- merge the key groups through shared memory: [group][row] acc (D floats), m_i, l_i
  float* sm_acc = smem;
  float* sm_m = smem + kGroups * kRows * kDim;
  float* sm_l = sm_m + kGroups * kRows;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float4* dst = reinterpret_cast<float4*>(sm_acc + (grp * kRows + r) * kDim + col);
    dst[0] = make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    dst[1] = make_float4(acc[r][4], acc[r][5], acc[r][6], acc[r][7]);
    if (lane % kLanes == 0) {
      sm_m[grp * kRows + r] = m_i[r];
      sm_l[grp * kRows + r] = l_i[r];
    }
  }
  __syncthreads();

  write_block_rows<kGroups, kRows>(p, blk, sm_acc, sm_m, sm_l, kThreads);
#if CF_FUSED_COMBINE
  merge_splits_if_last<kRows>(p, smem, kThreads);
#endif
}
#endif  // !CF_DECODE_MMA

// -- combine: one warp per (b, i, h) row ------------------------------------------------------
// The combine is a short kernel after a long one: its time is the latency of its dependent
// loads. So each of a block's warps takes every CF_COMBINE_WARPS-th split and issues the lse
// and partial-o loads of kCombineBatch of its splits before using any (one round trip up
// to CF_COMBINE_WARPS x kCombineBatch = 32 splits at D <= 128), folding them into its own running
// (m, l, acc); the warps' states are then merged through shared memory. (One warp per row,
// reading the lse first and the partial o in batches after, took 4.6-5.6 us for 16-32
// splits, H200, 2026-12-01: a tenth of a 32k-key GQA decode.)
// Lane owns the 4 columns lane * 4 + 128 c of each chunk c (head_dim % 8 == 0); with two
// chunks (head_dim 256) a batch is half as many splits: 16 floats a lane in flight either way
// (8 warps of 4 splits, not 4 of 8: ptxas (NVRTC 13) capped the kernel at 56-72 registers for
// sm_75 / sm_120 and the larger batch spilled there).
enum : int {
  kCombineChunks = (CF_HEAD_DIM + 127) / 128,
  kCombineBatch = CF_COMBINE_BATCH / kCombineChunks,
};

// CF_COMBINE_ROWS (every tensor-core spec since session 19): with at most
// kCombineBatch splits, one warp takes a whole row in one round trip of loads and a block
// takes CF_COMBINE_WARPS rows (the plan launches rows / CF_COMBINE_WARPS blocks): no shared
// memory, no barrier. The block-a-row layout leaves all but n of its warps idle there; at
// (8, 8k, 8 kv heads), 2-4 splits, it took 5.7 / 9.7 us for q_len 4 / 8 (1024 / 2048 rows)
// against 2.4 us at q_len 1, next to a 72-75 us split kernel (H200, session 18, call 10);
// rows a warp took q_len 8 there from 3.20 to 3.50 TB/s (session 19, call 1).
__device__ __forceinline__ void combine_by_warps(const DecodeParams& p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = p.num_splits;
  const long long rows = (long long)p.batch * p.q_len * p.heads;
  const int row = blockIdx.x * CF_COMBINE_WARPS + warp;
  if (row >= rows) return;
  const int h = row % p.heads, i = (row / p.heads) % p.q_len, b = row / (p.heads * p.q_len);
  const long long lse_row = ((long long)b * p.heads + h) * p.q_len + i;
  const long long lse_stride = (long long)p.batch * p.heads * p.q_len;  // one split's lse
  const long long part_stride = rows * p.head_dim;  // one split's o
  const float* part_row = p.o_part + (long long)row * p.head_dim;
  float lse[kCombineBatch];
  float4 x[kCombineBatch][kCombineChunks];
#pragma unroll
  for (int s = 0; s < kCombineBatch; ++s) {  // every load first
    lse[s] = s < n ? __ldg(p.lse_part + s * lse_stride + lse_row) * CF_LOG2E : -CF_INF;
#pragma unroll
    for (int c = 0; c < kCombineChunks; ++c) {
      const int d = 128 * c + 4 * lane;
      x[s][c] = s < n && d < p.head_dim
                    ? __ldg(reinterpret_cast<const float4*>(part_row + s * part_stride + d))
                    : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  float m = -CF_INF;
#pragma unroll
  for (int s = 0; s < kCombineBatch; ++s) m = fmaxf(m, lse[s]);
  const float m_safe = m == -CF_INF ? 0.f : m;  // no split saw a key
  float l = 0.f;
  float4 acc[kCombineChunks];
#pragma unroll
  for (int c = 0; c < kCombineChunks; ++c) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int s = 0; s < kCombineBatch; ++s) {
    const float w = fast_exp2(lse[s] - m_safe);  // 0 for a split that saw no key
    l += w;
#pragma unroll
    for (int c = 0; c < kCombineChunks; ++c) {
      acc[c].x = fmaf(w, x[s][c].x, acc[c].x);
      acc[c].y = fmaf(w, x[s][c].y, acc[c].y);
      acc[c].z = fmaf(w, x[s][c].z, acc[c].z);
      acc[c].w = fmaf(w, x[s][c].w, acc[c].w);
    }
  }
  const float inv = l == 0.f ? 0.f : __fdividef(1.f, l);  // l <= num_splits
  elem_t* out = p.o + b * p.stride_ob + (long long)i * p.stride_om + (long long)h * p.stride_oh;
#pragma unroll
  for (int c = 0; c < kCombineChunks; ++c) {
    const int d = 128 * c + 4 * lane;
    if (d < p.head_dim) {  // head_dim % 8 == 0: all four columns are inside
      out[d] = float_to_elem(acc[c].x * inv);
      out[d + 1] = float_to_elem(acc[c].y * inv);
      out[d + 2] = float_to_elem(acc[c].z * inv);
      out[d + 3] = float_to_elem(acc[c].w * inv);
    }
  }
  if (lane == 0) p.lse[lse_row] = l == 0.f ? -CF_INF : (m_safe + __log2f(l)) * CF_LN2;
}

// (min blocks 1: without it ptxas (NVRTC 13, sm_90) held the head_dim 256 combine to 48
// registers and spilled)
extern "C" __global__ void __launch_bounds__(32 * CF_COMBINE_WARPS, 1)
flash_decode_combine(const DecodeParams p) {
  if (CF_DECODE_PDL) pdl_wait();  // the split's partial o and lse
#if CF_COMBINE_ROWS
  if (p.num_splits <= kCombineBatch) return combine_by_warps(p);  // (the plan's grid agrees)
#endif
  extern __shared__ __align__(16) float smem[];  // [warp][head_dim] acc, [warp] m, [warp] l
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = p.num_splits;
  const long long rows = (long long)p.batch * p.q_len * p.heads;
  const int row = blockIdx.x;  // (b, i, h); 32-bit: a 64-bit division is a called routine
  const int h = row % p.heads, i = (row / p.heads) % p.q_len, b = row / (p.heads * p.q_len);
  const long long lse_row = ((long long)b * p.heads + h) * p.q_len + i;
  const long long lse_stride = (long long)p.batch * p.heads * p.q_len;  // one split's lse
  const long long part_stride = rows * p.head_dim;  // one split's o
  const float* part_row = p.o_part + (long long)row * p.head_dim;

  // -- this warp's splits warp, warp + W, ...: running max m (log2 units), sum l, acc
  float m = -CF_INF, l = 0.f;
  float4 acc[kCombineChunks];
#pragma unroll
  for (int c = 0; c < kCombineChunks; ++c) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s0 = warp; s0 < n; s0 += CF_COMBINE_WARPS * kCombineBatch) {
    float lse[kCombineBatch];
    float4 x[kCombineBatch][kCombineChunks];
#pragma unroll
    for (int u = 0; u < kCombineBatch; ++u) {  // every load of the batch first
      const int s = s0 + u * CF_COMBINE_WARPS;
      lse[u] = s < n ? __ldg(p.lse_part + s * lse_stride + lse_row) * CF_LOG2E : -CF_INF;
#pragma unroll
      for (int c = 0; c < kCombineChunks; ++c) {
        const int d = 128 * c + 4 * lane;
        x[u][c] = s < n && d < p.head_dim
                      ? __ldg(reinterpret_cast<const float4*>(part_row + s * part_stride + d))
                      : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
    float m_new = m;
#pragma unroll
    for (int u = 0; u < kCombineBatch; ++u) m_new = fmaxf(m_new, lse[u]);
    const float m_safe = m_new == -CF_INF ? 0.f : m_new;  // no split saw a key yet
    const float keep = fast_exp2(m - m_safe);
    l *= keep;
#pragma unroll
    for (int c = 0; c < kCombineChunks; ++c) {
      acc[c].x *= keep, acc[c].y *= keep, acc[c].z *= keep, acc[c].w *= keep;
    }
#pragma unroll
    for (int u = 0; u < kCombineBatch; ++u) {
      const float w = fast_exp2(lse[u] - m_safe);  // 0 for a split that saw no key
      l += w;
#pragma unroll
      for (int c = 0; c < kCombineChunks; ++c) {
        acc[c].x = fmaf(w, x[u][c].x, acc[c].x);
        acc[c].y = fmaf(w, x[u][c].y, acc[c].y);
        acc[c].z = fmaf(w, x[u][c].z, acc[c].z);
        acc[c].w = fmaf(w, x[u][c].w, acc[c].w);
      }
    }
    m = m_new;
  }

  // -- the warps' (m, l, acc) through shared memory; thread t writes columns t, t + threads
  float* sm_acc = smem;
  float* sm_m = smem + CF_COMBINE_WARPS * p.head_dim;
  float* sm_l = sm_m + CF_COMBINE_WARPS;
#pragma unroll
  for (int c = 0; c < kCombineChunks; ++c) {
    const int d = 128 * c + 4 * lane;
    if (d < p.head_dim)
      *reinterpret_cast<float4*>(sm_acc + warp * p.head_dim + d) = acc[c];
  }
  if (lane == 0) sm_m[warp] = m, sm_l[warp] = l;
  __syncthreads();
  float m_all = -CF_INF;
#pragma unroll
  for (int w = 0; w < CF_COMBINE_WARPS; ++w) m_all = fmaxf(m_all, sm_m[w]);
  const float m_safe = m_all == -CF_INF ? 0.f : m_all;
  float f[CF_COMBINE_WARPS], total = 0.f;
#pragma unroll
  for (int w = 0; w < CF_COMBINE_WARPS; ++w) {
    f[w] = fast_exp2(sm_m[w] - m_safe);
    total += f[w] * sm_l[w];
  }
  // __fdividef: total <= num_splits, far from the range where it flushes
  const float inv = total == 0.f ? 0.f : __fdividef(1.f, total);
  elem_t* out = p.o + b * p.stride_ob + (long long)i * p.stride_om + (long long)h * p.stride_oh;
  for (int d = threadIdx.x; d < p.head_dim; d += 32 * CF_COMBINE_WARPS) {
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < CF_COMBINE_WARPS; ++w) a = fmaf(f[w], sm_acc[w * p.head_dim + d], a);
    out[d] = float_to_elem(a * inv);
  }
  if (threadIdx.x == 0)
    p.lse[lse_row] = total == 0.f ? -CF_INF : (m_safe + __log2f(total)) * CF_LN2;
}

// -- append: k_new / v_new into the cache at cache_seqlens[b] + t ------------------------------
// Runs before flash_decode_split on the same stream, so the split kernel's (non-coherent)
// loads see the new keys. Positions outside [0, seqlen_cache) are skipped (the split kernel
// clamps the length the same way).
extern "C" __global__ void __launch_bounds__(decode::kThreads)
flash_decode_append(const DecodeParams p) {
  const int chunks = p.head_dim / 8;
  const long long total = (long long)p.batch * p.seqlen_new * p.heads_kv * chunks;
  const long long idx = (long long)blockIdx.x * decode::kThreads + threadIdx.x;
  if (idx >= total) return;
  const int c = (int)(idx % chunks);
  long long rest = idx / chunks;
  const int h = (int)(rest % p.heads_kv);
  rest /= p.heads_kv;
  const int t = (int)(rest % p.seqlen_new);
  const int b = (int)(rest / p.seqlen_new);
  const int pos = p.cache_seqlens[b] + t;
  if (pos < 0 || pos >= p.seqlen_cache) return;
  const long long row = cache_rows(p, b).row(pos);
  const int col = c * 8;
  copy_chunk(p.k + entry_offset(p, b, p.stride_kb) + row * p.stride_kn + h * p.stride_kh + col,
             p.k_new + b * p.stride_knb + t * p.stride_knm + h * p.stride_knh + col);
  copy_chunk(p.v + entry_offset(p, b, p.stride_vb) + row * p.stride_vn + h * p.stride_vh + col,
             p.v_new + b * p.stride_vnb + t * p.stride_vnm + h * p.stride_vnh + col);
}

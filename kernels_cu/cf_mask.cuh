// cf_mask.cuh -- which (query, key) pairs a kernel visits and how their scores are modified:
// the block range of a tile, the mask policy and the score modifiers, in one place for every
// attention kernel (docs/masks.md is the spec; cuflash/cpu.py's _Tiling and _Scores mirror it).
//
// Compile-time knobs (part of the spec's name, so the cache key; docs/kernel_abi.md):
//   CF_MASK     0 none, 1 causal, 2 local (a sliding window; with causal the host passes
//               right = 0). Causal: query i sees key j iff j <= i + off; local iff
//               i + off - left <= j <= i + off + right, off = seqlen_k - seqlen_q.
//   CF_SOFTCAP  1: s = softcap * tanh(x / softcap) on the scaled score x (docs/masks.md)
//   CF_ALIBI    1: s -= slope_h * |i + off - j|
//   CF_SINKS    1: the forward folds a per-head sink logit into m and l (cf_fwd.cuh)
// With all of them 0 (or CF_MASK 1) every helper reduces to the code the kernels had before:
// the extra terms are `if (CF_...)` on constants and vanish.
//
// Runtime arguments (every attention kernel takes them after its own, in this order):
//   int window_left, int window_right   local only: both >= 0 (the host replaces an unbounded
//                                       side by seqlen_q + seqlen_k, which bounds nothing)
//   float softcap_raw                   softcap / softmax_scale (raw q.k units), CF_SOFTCAP
//   float softcap_inv                   softmax_scale / softcap: from the parameter bank, not
//                                       a register (1 / softcap_raw in-kernel spilled bwd90)
//   float raw_per_score                 1 / softmax_scale: a slope in raw units, CF_ALIBI
//   const float* alibi_slopes           (batch, heads) or (heads,) float32, CF_ALIBI
//   long long stride_alibi_b            0 for (heads,)
// Scores stay in raw units (q.k) until the kernels multiply by scale_log2, as before, so the
// online softmax, lse2 and P = exp2(S * scale_log2 - lse2) do not change.
#pragma once
#include "cf_common.cuh"  // and cf_config.cuh: CF_MASK, CF_SOFTCAP, CF_ALIBI, CF_SINKS
#include "cf_philox.cuh"  // dropout (CF_DROPOUT): the kernels' other per-element mask

#define CF_CAUSAL (CF_MASK == 1)  // spelled out for the kernels' tile orders (longest first)
#define CF_LOCAL (CF_MASK == 2)
#define CF_SCORE_MODS (CF_SOFTCAP || CF_ALIBI)

// The modifier parameters of every attention entry point (kernel_abi.md), and their names for
// the constructors below.
#define CF_MOD_PARAMS                                                                   \
  int window_left, int window_right, float softcap_raw, float softcap_inv,             \
      float raw_per_score,                                                              \
      const float *alibi_slopes, long long stride_alibi_b
#define CF_MOD_ARGS window_left, window_right, softcap_raw, softcap_inv, raw_per_score, \
      alibi_slopes, stride_alibi_b

// -- mask policy and block ranges ------------------------------------------------------------
// Query i sees keys [key_begin(i), key_end(i)) (key_end includes the seqlen_k edge); key j is
// seen by queries [query_begin(j), query_end(j)). A tile of rows r0..r1 x keys k0..k1 needs no
// mask iff every pair is visible (full()). Ranges may be empty (end <= begin).
struct MaskPolicy {
  int seqlen_q, seqlen_k, off, left, right;

  __device__ __forceinline__ MaskPolicy(int sq, int sk, int wl, int wr)
      : seqlen_q(sq), seqlen_k(sk), off(sk - sq), left(wl), right(wr) {}

  __device__ __forceinline__ bool visible(int i, int j) const {
    return !(j >= seqlen_k || (CF_CAUSAL && j > i + off) ||
             (CF_LOCAL && (j > i + off + right || j < i + off - left)));
  }
  __device__ __forceinline__ int key_begin(int i) const {
    return CF_LOCAL ? max(0, i + off - left) : 0;
  }
  // May be negative (no key): callers that need a count clamp it.
  __device__ __forceinline__ int key_end(int i) const {
    return CF_CAUSAL ? min(seqlen_k, i + off + 1)
           : CF_LOCAL ? min(seqlen_k, i + off + right + 1)
                      : seqlen_k;
  }
  // key_end(i) before the seqlen_k clip (no clip at all without a right bound: INT_MAX).
  __device__ __forceinline__ int key_limit(int i) const {
    return CF_CAUSAL ? i + off + 1 : CF_LOCAL ? i + off + right + 1 : 0x7fffffff;
  }
  __device__ __forceinline__ int query_begin(int j) const {
    return CF_CAUSAL ? max(0, j - off) : CF_LOCAL ? max(0, j - off - right) : 0;
  }
  __device__ __forceinline__ int query_end(int j) const {
    return CF_LOCAL ? min(seqlen_q, max(0, j - off + left + 1)) : seqlen_q;
  }
  // Every (i, j) in rows r0..r1 x keys k0..k1 (inclusive) visible: no mask needed.
  __device__ __forceinline__ bool full(int r0, int r1, int k0, int k1) const {
    // k1 < key_end(r0) && k0 >= key_begin(r1). Plain and causal are spelled as the kernels
    // had them (the min() form cost the sm_120 backward 12 B of spills); local keeps the
    // min() / max() form (the spelled-out one spilled 8 B in the sm_90 backward). ptxas.
    return !(k1 >= seqlen_k || (CF_CAUSAL && k1 > r0 + off) ||
             (CF_LOCAL && !(k1 < key_end(r0) && k0 >= key_begin(r1))));
  }
  // Some (i, j) in rows r0..r1 x keys k0..k1 visible (a tile worth computing). Conservative
  // at the seqlen edges (the caller bounds rows and keys by the lengths itself).
  __device__ __forceinline__ bool any(int r0, int r1, int k0, int k1) const {
    return (!CF_CAUSAL || k0 <= r1 + off) &&
           (!CF_LOCAL || (k0 <= r1 + off + right && k1 >= r0 + off - left));
  }
};

// The keys query row i sees, [lo, hi): contains(j) is visible(i, j) for every key j >= 0.
// A row past seqlen_q (row_ok false) sees none (hi = 0).
struct KeyRange {
  int lo, hi;
  __device__ __forceinline__ bool contains(int j) const {
    return j < hi && (!CF_LOCAL || j >= lo);
  }
};
__device__ __forceinline__ KeyRange key_range(const MaskPolicy& mask, int i, bool row_ok = true) {
  return KeyRange{mask.key_begin(i), row_ok ? mask.key_end(i) : 0};
}

// The key tiles a query tile visits: [tile_begin, tile_end) of block_n keys each, for rows
// q0..q_last (q_last the tile's last row below seqlen_q).
struct KeyTiles {
  int begin, end;
};
template <int BLOCK_N>
__device__ __forceinline__ KeyTiles key_tiles(const MaskPolicy& mask, int q0, int q_last) {
  const int kv_begin = mask.key_begin(q0);
  KeyTiles t;
  t.end = (mask.seqlen_k + BLOCK_N - 1) / BLOCK_N;
  if (CF_CAUSAL || CF_LOCAL) {  // up to the tile of the last row's last visible key
    const int last_key = mask.key_limit(q_last) - 1;
    t.end = min(t.end, last_key < 0 ? 0 : last_key / BLOCK_N + 1);
  }
  t.begin = CF_LOCAL ? min(kv_begin / BLOCK_N, t.end) : 0;
  return t;
}

// The query tiles (of BLOCK_M rows) that see a key of n0..n_last: [first, end).
struct QueryTiles {
  int first, end;
};
template <int BLOCK_M>
__device__ __forceinline__ QueryTiles query_tiles(const MaskPolicy& mask, int n0, int n_last) {
  const int m_tiles = (mask.seqlen_q + BLOCK_M - 1) / BLOCK_M;
  QueryTiles t;
  t.first = 0;
  t.end = m_tiles;
  if (CF_CAUSAL || CF_LOCAL) {
    const int i_min = CF_CAUSAL ? n0 - mask.off : n0 - mask.off - mask.right;
    t.first = i_min >= mask.seqlen_q ? m_tiles : i_min > 0 ? i_min / BLOCK_M : 0;
  }
  if (CF_LOCAL) t.end = max(t.first, (mask.query_end(n_last) + BLOCK_M - 1) / BLOCK_M);
  return t;
}

// The same two ranges for a whole tile: query tile m0 (BLOCK_M rows) and key block n0
// (BLOCK_N keys); the rows / keys past seqlen_q / seqlen_k take no part.
template <int BLOCK_N, int BLOCK_M>
__device__ __forceinline__ KeyTiles key_tiles_of(const MaskPolicy& mask, int m0) {
  return key_tiles<BLOCK_N>(mask, m0, min(m0 + BLOCK_M, mask.seqlen_q) - 1);
}
template <int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ QueryTiles query_tiles_of(const MaskPolicy& mask, int n0) {
  return query_tiles<BLOCK_M>(mask, n0, min(n0 + BLOCK_N, mask.seqlen_k) - 1);
}

// -- block-sparse attention (CF_BLOCK_SPARSE; docs/block_sparse.md) ----------------------------
// One byte per block of block_m queries x block_n keys, per (batch, query head): 0 hides the
// block. The host picks kernels whose tiles divide the blocks (block_m a multiple of the
// query tile, block_n of the key tile), so a tile is kept or skipped whole: no element mask,
// and a skipped tile is never loaded. The kernels take CF_BSP_PARAMS right after
// CF_SEQ_PARAMS (nothing when off, so dense kernels keep their parameters and code):
//   const unsigned char* block_mask   (batch | 1, heads | 1, n_q_blocks, n_k_blocks), rows
//                                     contiguous; at batch entry b0 for a batch slice
//   long long bsp_stride_b, bsp_stride_h   bytes; 0 for an axis of length 1 (broadcast)
//   int bsp_stride_row                n_k_blocks
//   int bsp_block_m, bsp_block_n      the block size
// The tile cursors below are warp-collective (a ballot over 32 tiles a step): every lane of
// the warp calls them with the same arguments.
struct BlockMask {
  const unsigned char* base;
  long long stride_b, stride_h;
  int stride_row, block_m, block_n;
};
#if CF_BLOCK_SPARSE
#define CF_BSP_PARAMS                                                                 \
  , const unsigned char *__restrict__ block_mask, long long bsp_stride_b,             \
      long long bsp_stride_h, int bsp_stride_row, int bsp_block_m, int bsp_block_n
#define CF_BSP_MASK \
  BlockMask{block_mask, bsp_stride_b, bsp_stride_h, bsp_stride_row, bsp_block_m, bsp_block_n}
#else
#define CF_BSP_PARAMS
#define CF_BSP_MASK BlockMask{nullptr, 0, 0, 0, 1, 1}
#endif

// A cursor's ballots: how many t in [begin, end) are kept, and the first kept one after t
// (or end), 32 at a time (warp-collective; Kept: kept(t)).
template <class Kept>
__device__ __forceinline__ int warp_count_kept(const Kept& k, int begin, int end) {
  const int lane = threadIdx.x & 31;
  int n = 0;
#pragma unroll 1
  for (int t0 = begin; t0 < end; t0 += 32) {
    const int t = t0 + lane;
    n += __popc(__ballot_sync(0xffffffffu, t < end && k.kept(t)));
  }
  return n;
}
template <class Kept>
__device__ __forceinline__ int warp_next_kept(const Kept& k, int t, int end) {
  const int lane = threadIdx.x & 31;
#pragma unroll 1
  for (++t; t < end; t += 32) {
    const int u = t + lane;
    const unsigned hit = __ballot_sync(0xffffffffu, u < end && k.kept(u));
    if (hit) return t + __ffs(hit) - 1;
  }
  return end;
}

// The kept key tiles of one query tile (rows q0 ..) of head h within [begin, end): without a
// block mask, all of them.
template <int BLOCK_N>
struct KeptKeyTiles {
  const unsigned char* row;  // the query block's row of the mask
  int block_n, begin, end;

  __device__ __forceinline__ KeptKeyTiles(const BlockMask& bm, int b, int h, int q0,
                                          const KeyTiles& t)
      : row(CF_BLOCK_SPARSE ? bm.base + b * bm.stride_b + h * bm.stride_h +
                                  (long long)(q0 / bm.block_m) * bm.stride_row
                            : nullptr),
        block_n(bm.block_n),
        begin(t.begin),
        end(t.end) {}
  __device__ __forceinline__ bool kept(int j) const {
    return !CF_BLOCK_SPARSE || row[j * BLOCK_N / block_n] != 0;
  }
  // How many (warp-collective).
  __device__ __forceinline__ int count() const {
    return CF_BLOCK_SPARSE ? warp_count_kept(*this, begin, end) : end - begin;
  }
  // The last kept tile below j, or begin - 1 (warp-collective): below(end) is the first one
  // a kernel visiting last first runs.
  __device__ __forceinline__ int below(int j) const {
    if (!CF_BLOCK_SPARSE) return j - 1;
    const int lane = threadIdx.x & 31;
#pragma unroll 1
    for (; j > begin; j -= 32) {
      const int t = j - 1 - lane;  // lane l looks at j - 1 - l: the lowest hit is the highest tile
      const unsigned hit = __ballot_sync(0xffffffffu, t >= begin && kept(t));
      if (hit) return j - __ffs(hit);
    }
    return begin - 1;
  }
  // The first kept tile above j, or end (warp-collective): above(begin - 1) starts an
  // ascending visit.
  __device__ __forceinline__ int above(int j) const {
    return CF_BLOCK_SPARSE ? warp_next_kept(*this, j, end) : j + 1;
  }
};

// The index of iteration it among the kept ones (KeptKeyTiles, KeptQueryTiles), first to
// last, for pipelines that ask for iteration it and, to prefetch, it + 1: a cursor keeps
// the two latest answers, so callers ask for it or it + 1 of the last asked-for iteration
// (warp-collective). Without a block mask, first + it.
template <class Kept>
struct KeptSteps {
  Kept kept;
  int first;
  mutable int last_it, last_t, prev_t;

  __device__ __forceinline__ KeptSteps(const Kept& k, int first_)
      : kept(k), first(first_), last_it(-1), last_t(first_ - 1), prev_t(first_ - 1) {}
  __device__ __forceinline__ int operator()(int it) const {
    if (!CF_BLOCK_SPARSE) return first + it;
    if (it == last_it + 1) {
      prev_t = last_t;
      last_t = kept.above(last_t);
      last_it = it;
    }
    return it == last_it ? last_t : prev_t;
  }
};

// The kept (query head, query tile) pairs of one key tile (keys n0 ..) in a backward's walk:
// index t = g * per_head + i is head h_first + g, query tile first + i, for t in [0, n).
template <int BLOCK_M>
struct KeptQueryTiles {
  const unsigned char* col;  // the key block's column of head h_first's mask
  int stride_h;              // < 2^31: one head's blocks (the host checks the mask's size)
  int stride_row, block_m, first, per_head, n;

  __device__ __forceinline__ KeptQueryTiles(const BlockMask& bm, int b, int h_first, int n0,
                                            const QueryTiles& qt, int heads)
      : col(CF_BLOCK_SPARSE ? bm.base + b * bm.stride_b + h_first * bm.stride_h + n0 / bm.block_n
                            : nullptr),
        stride_h((int)bm.stride_h),
        stride_row(bm.stride_row),
        block_m(bm.block_m),
        first(qt.first),
        per_head(qt.end - qt.first),
        n(heads * (qt.end - qt.first)) {}
  __device__ __forceinline__ bool kept(int t) const {
    if (!CF_BLOCK_SPARSE) return true;
    const int g = t / per_head, m = first + t - g * per_head;
    return col[g * stride_h + (m * BLOCK_M / block_m) * stride_row] != 0;
  }
  // Index t's query head offset g (from h_first) and first row m0.
  __device__ __forceinline__ void tile(int t, int& m0, int& g) const {
    g = t / per_head;
    m0 = (first + t - g * per_head) * BLOCK_M;
  }
  __device__ __forceinline__ int count() const {
    return CF_BLOCK_SPARSE ? warp_count_kept(*this, 0, n) : n;
  }
  // The first kept index above t, or n (warp-collective): above(-1) is the first visited.
  __device__ __forceinline__ int above(int t) const {
    return CF_BLOCK_SPARSE ? warp_next_kept(*this, t, n) : t + 1;
  }
};

// -- steps inside a tile: the slices of keys or queries worth computing ------------------------
// The key steps of STEP keys from n0 end at the first one that rows up to q_last cannot see:
// past seqlen_k or (causal, window) past the last row's last visible key (keys before a
// window's first visible key are not counted out). Two spellings, each the code its kernel had
// (a rolled loop that tests every step; a count for an unrolled loop): for_key_steps calls
// body(s) for s = 0 .. < STEPS up to there.
template <int STEP, int STEPS, class Body>
__device__ __forceinline__ void for_key_steps(const MaskPolicy& mask, int n0, int q_last,
                                              Body body) {
#pragma unroll 1
  for (int s = 0; s < STEPS; ++s) {
    if (n0 + STEP * s >= mask.seqlen_k) break;
    if ((CF_CAUSAL || CF_LOCAL) && n0 + STEP * s >= mask.key_limit(q_last)) break;
    body(s);
  }
}
// key_steps: the steps s < end() of keys n0 .. n_end - 1 (none when !any()).
template <int STEP>
struct KeySteps {
  int n0, last_key;
  __device__ __forceinline__ bool any() const { return last_key >= n0; }
  __device__ __forceinline__ int end() const { return (last_key - n0) / STEP + 1; }
};
template <int STEP>
__device__ __forceinline__ KeySteps<STEP> key_steps(const MaskPolicy& mask, int n0, int n_end,
                                                    int q_last) {
  int last_key = min(mask.seqlen_k, n_end) - 1;
  if (CF_CAUSAL || CF_LOCAL) last_key = min(last_key, mask.key_limit(q_last) - 1);
  return KeySteps<STEP>{n0, last_key};
}

// The query steps m0 + STEP s .. of the ROWS-row query tile at m0 that see one of keys
// k0 .. k_last: lo <= s < hi (none when k0 >= seqlen_k; rows past seqlen_q count out).
struct QuerySteps {
  int lo, hi;
};
template <int STEP, int ROWS>
__device__ __forceinline__ QuerySteps query_steps(const MaskPolicy& mask, int m0, int k0,
                                                  int k_last) {
  QuerySteps s{0, 0};
  if (k0 < mask.seqlen_k) {
    s.hi = min(ROWS / STEP, (mask.seqlen_q - m0 + STEP - 1) / STEP);
    if (CF_CAUSAL || CF_LOCAL) s.lo = max(0, (mask.query_begin(k0) - m0) / STEP);
    if (CF_LOCAL) s.hi = min(s.hi, (mask.query_end(k_last) - m0 + STEP - 1) / STEP);
  }
  return s;
}

// -- S tiles in the mma C layout ---------------------------------------------------------------
// A warp's 16 rows x 8 * NT keys: this thread holds rows row0 (elements 0, 1) and row0 + 8
// (2, 3) of n-tile t, keys key0 + 8 t + {0, 1} (key0 = tile start + 2 * tig). The 16-bit
// forwards (mma.sync and wgmma) and the dQ kernel share it.

// Visible keys of the thread's two rows: [lo[r], hi[r]) (hi may be negative).
struct RowBounds {
  int lo[2], hi[2];
  __device__ __forceinline__ RowBounds(const MaskPolicy& mask, int row0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      lo[r] = mask.key_begin(row0 + 8 * r);
      hi[r] = mask.key_end(row0 + 8 * r);
    }
  }
};

// Masked scores become -inf (the forward's softmax turns them into P = 0).
template <int NT>
__device__ __forceinline__ void mask_s(float (&s)[NT][4], int key0, const RowBounds& rb) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int key = key0 + 8 * t + e;
#pragma unroll
      for (int r = 0; r < 2; ++r)
        if (key >= rb.hi[r] || (CF_LOCAL && key < rb.lo[r])) s[t][2 * r + e] = -CF_INF;
    }
}

// -- score modifiers -------------------------------------------------------------------------
// On a raw score S = q.k, keeping raw units: with c = softcap / softmax_scale,
//   softcap: S' = c tanh(S / c)          (= softcap tanh(x / softcap) / softmax_scale)
//   ALiBi:   S' -= (slope / softmax_scale) |i + off - j|
// tanh: float32 kernels, tanhf. 16-bit kernels, tanh.approx.f32: one SFU op (the softmax's
// exp2 is the other), where 1 - 2 / (2^(2x log2 e) + 1) took two (ex2, rcp) and made a softcap
// forward about 2x plain attention on an H200 (the SFU, not the tensor cores, set the pace).
// Its relative error, about 2^-11, moves the capped score by at most softcap * 2^-11: a quarter
// of the 16-bit rounding of that score (2^-9 relative) which any 16-bit pipeline incurs.
__device__ __forceinline__ float cf_tanh(float x) {
#if CF_DTYPE == 2
  return tanhf(x);
#else
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

struct ScoreMods {
  float cap, inv_cap, slope;
  int off;

  __device__ __forceinline__ ScoreMods(CF_MOD_PARAMS, int b, int h, int seqlen_q, int seqlen_k)
      : cap(softcap_raw), inv_cap(0.f), slope(0.f), off(seqlen_k - seqlen_q) {
    (void)window_left;
    (void)window_right;
    if (CF_SOFTCAP) inv_cap = softcap_inv;
    if (CF_ALIBI) slope = alibi_slopes[b * stride_alibi_b + h] * raw_per_score;
  }
  // S' for query i, key j; tanh_out = tanh(S / c) for the backward's derivative 1 - t^2.
  __device__ __forceinline__ float apply(float s, int i, int j, float& tanh_out) const {
    if (CF_SOFTCAP) s = capped(s, tanh_out);
    if (CF_ALIBI) s -= slope * (float)abs(i + off - j);
    return s;
  }
  __device__ __forceinline__ float apply(float s, int i, int j) const {
    float t;
    return apply(s, i, j, t);
  }
  // Softcap alone (modify_s adds ALiBi itself); tanh_out as apply's.
  __device__ __forceinline__ float capped(float s, float& tanh_out) const {
    tanh_out = cf_tanh(s * inv_cap);
    return cap * tanh_out;
  }
  // apply's form at a float distance i + off - j (exact below 2^24), which the Hopper
  // backwards form from one conversion a fragment or tile: the int-to-float conversion a score
  // of apply is a quarter-rate op, as the exp2 beside it.
  __device__ __forceinline__ float apply_at(float s, float distance, float& tanh_out) const {
    if (CF_SOFTCAP) s = capped(s, tanh_out);
    if (CF_ALIBI) s -= slope * fabsf(distance);
    return s;
  }
};

// Softcap's derivative factor for dS: 1 - tanh^2 (1 without softcap).
__device__ __forceinline__ float softcap_grad(float tanh_s) {
  return CF_SOFTCAP ? 1.f - tanh_s * tanh_s : 1.f;
}

// A lane's offsets of a modified tile's rows: element e of n-tile t scores s[t][e] + v[e >> 1]
// (modify_s moves ALiBi's per-row term here; 0 without ALiBi). The softmax adds them to the
// row maxima and folds them into its exponent's FFMA, so they cost nothing a score.
struct RowOffsets {
  float v[2];
};

// Score modifiers on a C-layout S tile (see mask_s). ALiBi: the distance i + off - j of
// element (t, e) is dist0 + 8 (e >> 1) - 8 t - (e & 1), dist0 this lane's (t, e) = (0, 0).
// When every one of the lane's keys lies on one side of its rows' diagonal (all but the tiles
// near it), |d| = sign (dist0 + 8 r) - sign (8 t + (e & 1)): the row's term goes to the row
// offsets and the key's is one FFMA a score with an immediate. Near the diagonal, the
// distance by one float add (integers, exact below 2^24) and |.| as an operand modifier: two
// ops a score, where the float positions of before took 2.5 and int-to-float conversions
// (a quarter-rate op) a score before them (an H200 d128 4k causal forward: 1.16x -> 1.12x
// plain with float positions).
template <int NT>
__device__ __forceinline__ RowOffsets modify_s(float (&s)[NT][4], const ScoreMods& mods, int row0,
                                               int key0) {
  RowOffsets off{{0.f, 0.f}};
  if (!CF_SCORE_MODS) return off;
  if (CF_SOFTCAP) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float th;  // the forward has no use for it
        s[t][e] = mods.capped(s[t][e], th);
      }
  }
  if (CF_ALIBI) {
    const int dist0 = row0 + mods.off - key0;
    if (!CF_ALIBI_ABS_ONLY && (dist0 >= 8 * (NT - 1) + 1 || dist0 <= -8)) {  // one side
      const float signed_slope = dist0 > 0 ? mods.slope : -mods.slope;
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[t][e] = fmaf(signed_slope, 8.f * t + (e & 1), s[t][e]);
#pragma unroll
      for (int r = 0; r < 2; ++r) off.v[r] = -signed_slope * (float)(dist0 + 8 * r);
    } else {
      const float d0 = (float)dist0;
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s[t][e] -= mods.slope * fabsf(d0 + (8.f * (e >> 1) - 8.f * t - (e & 1)));
    }
  }
  return off;
}

// -- attention sinks (forward epilogue) --------------------------------------------------------
// After a row's last key tile the sink joins m and l as one more score with a zero value
// (docs/masks.md): m = max(m, sink), l = l * exp2(m_old - m) + exp2(sink - m); acc is scaled by
// the returned exp2(m_old - m). m2 in log2 units (scaled scores), sink a natural-log logit.
// A row that saw no key (m2 = -inf) gets m = sink, l = 1, acc = 0.
__device__ __forceinline__ float fold_sink_row(float& m2, float& l, float sink) {
  const float sink2 = sink * CF_LOG2E;
  const float m_new = fmaxf(m2, sink2);
  const float alpha = fast_exp2(m2 - m_new);
  l = l * alpha + fast_exp2(sink2 - m_new);
  m2 = m_new;
  return alpha;
}

// The C-layout rows (see mask_s): l holds the quad-reduced row sums.
template <int DT>
__device__ __forceinline__ void fold_sink(float (&m_i)[2], float (&l)[2], float (&acc)[DT][4],
                                          float sink) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float alpha = fold_sink_row(m_i[r], l[r], sink);
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      acc[d][2 * r] *= alpha;
      acc[d][2 * r + 1] *= alpha;
    }
  }
}

// -- the mask chosen at run time (decode) -----------------------------------------------------
// One decode kernel serves every mask: its blocks hold a few rows and compute their key range
// once, so the mode costs nothing per key. The same visibility as MaskPolicy, for a query
// whose diagonal key (i + off) is d: causal keys <= d; window d - left <= j <= d + right
// (-1: that side unbounded); always 0 <= j < seqlen_k.
struct RuntimeMask {
  int seqlen_k, causal, left, right;

  __device__ __forceinline__ int key_begin(int d) const {
    return left >= 0 ? max(0, d - left) : 0;
  }
  // >= 0; may be <= key_begin (no key)
  __device__ __forceinline__ int key_end(int d) const {
    int end = seqlen_k;
    if (causal) end = min(end, d + 1);
    if (right >= 0) end = min(end, d + right + 1);
    return max(0, end);
  }
};

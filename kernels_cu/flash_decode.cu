// flash_decode.cu -- split-KV attention for decoding: a few query rows against a long K/V
// cache (Flash-Decoding: FlashAttention-2's online softmax, with the key axis split over
// thread blocks and the partial results merged by their log-sum-exp), every CF_DTYPE
// (0 fp16, 1 bf16, 2 fp32). The NumPy mirror is cuflash/decode_cpu.py.
//
// Decoding reads the whole cache once per step, so it is bound by memory bandwidth, and the
// parallelism comes from the key axis. Two kernels:
//
//   flash_decode_split    grid (batch * heads_kv * row_tiles, num_splits), CF_WARPS warps.
//     blockIdx.x = (b * heads_kv + h_kv) * row_tiles + row tile, blockIdx.y = split.
//     One block streams keys [split * keys_per_split, +keys_per_split) of kv head h_kv of
//     batch entry b (clipped to that entry's cache_seqlens[b]) for CF_ROWS query rows: the
//     query heads of the kv group times the q_len queries, row r = i * group + g (query i,
//     head h_kv * group + g), so K/V are read once per group. rows = q_len * group; more
//     than CF_ROWS rows take several row tiles (each re-reads the key range).
//     Writes o and lse directly when num_splits == 1; else the normalized partial o
//     (float32) and its lse for the combine.
//   flash_decode_combine  grid (ceil(batch * q_len * heads / CF_COMBINE_WARPS)), one warp
//     per query row: lse = log(sum_s exp(lse_s)), o = sum_s exp(lse_s - lse) * o_s (the
//     math of cuflash.merge_attention), o in elem_t, lse float32.
//
// Inside a split block (CF_HEAD_DIM = D, a power of two from 32 to 256):
//   kLanes = D / 8 lanes share one key row, each holding 8 consecutive columns (one 16-byte
//   load for 16-bit data, two for float32); a warp covers 32 / kLanes key rows per load, the
//   block kGroups = CF_WARPS * 32 / kLanes "key groups". Per step each group loads CF_KEYS K
//   rows and CF_KEYS V rows (all issued before any is used: 2 * CF_KEYS independent 16-byte
//   loads per thread in flight), group g taking keys step + c * kGroups + g. Scores are dot
//   products reduced over the kLanes lanes by shuffles; every group keeps its own m_i, l_i,
//   acc per row (online softmax, FlashAttention-2 Alg. 1, in log2 units: scores are
//   multiplied by scale_log2 = softmax_scale * LOG2E and exponentiated with exp2). The
//   groups are merged at the end through shared memory.
//
// Shared memory (dynamic, split kernel): kGroups * CF_ROWS * (D + 2) floats (every group's
// acc, m_i and l_i for the final merge): at most 34 KB at 4 warps. Combine kernel:
// CF_COMBINE_WARPS * num_splits floats (the split weights of each warp's row).
//
// Layouts (strides in elements, head_dim contiguous, rows 16-byte aligned):
//   q, o       (batch, q_len, heads, head_dim)
//   k, v       (batch, seqlen_cache, heads_kv, head_dim)
//   cache_seqlens int32 (batch,) or null (every entry holds seqlen_cache keys); values are
//              clamped to [0, seqlen_cache] (never checked on the device: no host sync)
//   lse        float32 (batch, heads, q_len), natural log; -inf for a row that sees no key
//   o_part     float32 (num_splits, batch, q_len, heads, head_dim), contiguous
//   lse_part   float32 (num_splits, batch, heads, q_len), contiguous
// Causal (bottom-right within each entry's valid length L = cache_seqlens[b]): query i sees
// key j iff j <= L - q_len + i. A row that sees no key: o = 0, lse = -inf.

#ifndef CF_DTYPE
#define CF_DTYPE 1
#endif
#ifndef CF_HEAD_DIM
#define CF_HEAD_DIM 128  // bucket: 32, 64, 128 or 256
#endif
#ifndef CF_ROWS
#define CF_ROWS 1  // query rows per block: 1, 2, 4 or 8
#endif
#ifndef CF_KEYS
#define CF_KEYS 4  // key rows per group per step
#endif
#ifndef CF_WARPS
#define CF_WARPS 4
#endif
#ifndef CF_SOURCE_HASH
#define CF_SOURCE_HASH 0  // cache key only
#endif

#define CF_COMBINE_WARPS 4

typedef unsigned short dec_u16;
typedef unsigned int dec_u32;

#define DEC_LOG2E 1.4426950408889634f
#define DEC_LN2 0.6931471805599453f
#define DEC_INF __int_as_float(0x7f800000)

#if CF_DTYPE == 2
typedef float elem_t;
#else
typedef dec_u16 elem_t;  // raw fp16 / bf16 bits
#endif
#if CF_DTYPE == 1 && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "bfloat16 needs compute capability 8.0"
#endif

namespace decode {
// Compile-time constants as enumerators (NVRTC would emit namespace-scope constexpr
// variables as .global data).
enum : int {
  kDim = CF_HEAD_DIM,
  kRows = CF_ROWS,
  kKeys = CF_KEYS,
  kThreads = 32 * CF_WARPS,
  kLanes = kDim / 8,  // lanes per key row
  kGroups = kThreads / kLanes,  // key rows per block per load
  kStep = kGroups * kKeys,  // keys per block per step
  // Resident blocks per SM asked of ptxas: a register cap of 65536 / (kMinBlocks * kThreads)
  // (128, 170, 256). Without a minimum ptxas picked 56-80 registers for one row and spilled
  // (NVRTC 13.5, sm_80 / sm_120); eight rows need about 250.
  kMinBlocks = kRows <= 2 ? 4 : kRows == 4 ? 3 : 2,
};
static_assert(kDim == 32 || kDim == 64 || kDim == 128 || kDim == 256, "CF_HEAD_DIM");
static_assert(kRows == 1 || kRows == 2 || kRows == 4 || kRows == 8, "CF_ROWS");
}  // namespace decode

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

__device__ __forceinline__ float half_bits_to_float(dec_u32 bits) {
#if CF_DTYPE == 0
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((dec_u16)bits));
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
  const dec_u32 w[4] = {c.u.x, c.u.y, c.u.z, c.u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = half_bits_to_float(w[i] & 0xffffu);
    f[2 * i + 1] = half_bits_to_float(w[i] >> 16);
  }
#endif
}

__device__ __forceinline__ elem_t float_to_elem(float f) {
#if CF_DTYPE == 0
  dec_u16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
#elif CF_DTYPE == 1
  dec_u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
#else
  return f;
#endif
}

// -- which keys and rows a block owns ---------------------------------------------------------
struct DecodeBlock {
  int b, h_kv, group, q_len, row0, rows;  // rows of the whole (b, h_kv) problem
  int seqlen;  // valid keys of entry b
  int key_begin, key_end;  // this split's keys, clipped to seqlen
  bool causal;

  __device__ __forceinline__ bool row_valid(int r) const { return row0 + r < rows; }
  __device__ __forceinline__ int query(int r) const { return (row0 + r) / group; }
  __device__ __forceinline__ int head(int r) const { return h_kv * group + (row0 + r) % group; }
  // end (exclusive) of the keys row r sees: the mask policy, bottom-right within seqlen
  __device__ __forceinline__ int row_key_end(int r) const {
    if (!row_valid(r)) return 0;
    if (!causal) return seqlen;
    return max(0, min(seqlen, seqlen - q_len + query(r) + 1));
  }
};

__device__ __forceinline__ DecodeBlock decode_block(const int* cache_seqlens, int q_len,
                                                    int heads, int heads_kv, int seqlen_cache,
                                                    int keys_per_split, int row_tiles,
                                                    int causal) {
  DecodeBlock blk;
  const int bh = blockIdx.x / row_tiles;
  blk.b = bh / heads_kv;
  blk.h_kv = bh % heads_kv;
  blk.group = heads / heads_kv;
  blk.q_len = q_len;
  blk.rows = q_len * blk.group;
  blk.row0 = (blockIdx.x % row_tiles) * decode::kRows;
  int len = cache_seqlens ? cache_seqlens[blk.b] : seqlen_cache;
  blk.seqlen = max(0, min(len, seqlen_cache));
  blk.key_begin = blockIdx.y * keys_per_split;
  blk.key_end = min(blk.key_begin + keys_per_split, blk.seqlen);
  blk.causal = causal != 0;
  return blk;
}

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
    const float m_safe = m_new == -DEC_INF ? 0.f : m_new;  // no key seen yet: no -inf - -inf
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

extern "C" __global__ void __launch_bounds__(decode::kThreads, decode::kMinBlocks)
flash_decode_split(const elem_t* __restrict__ q, const elem_t* __restrict__ k,
                   const elem_t* __restrict__ v, const int* __restrict__ cache_seqlens,
                   elem_t* __restrict__ o, float* __restrict__ lse,
                   float* __restrict__ o_part, float* __restrict__ lse_part,
                   int batch, int q_len, int heads, int heads_kv, int head_dim,
                   int seqlen_cache, int num_splits, int keys_per_split, int row_tiles,
                   int causal,
                   long long stride_qb, long long stride_qm, long long stride_qh,
                   long long stride_kb, long long stride_kn, long long stride_kh,
                   long long stride_vb, long long stride_vn, long long stride_vh,
                   long long stride_ob, long long stride_om, long long stride_oh,
                   float scale_log2) {
  using namespace decode;
  extern __shared__ __align__(16) float smem[];  // float4 stores below
  const DecodeBlock blk = decode_block(cache_seqlens, q_len, heads, heads_kv, seqlen_cache,
                                       keys_per_split, row_tiles, causal);
  const int lane = threadIdx.x & 31;
  const int col = (lane % kLanes) * 8;  // this thread's 8 columns
  const int grp = (threadIdx.x >> 5) * (32 / kLanes) + lane / kLanes;  // its key group
  const bool col_ok = col < head_dim;

  // -- the Q rows (times scale_log2) and each row's key end stay in registers
  float qf[kRows][8];
  int row_end[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const bool ok = blk.row_valid(r) && col_ok;
    const elem_t* p = q + blk.b * stride_qb + (long long)blk.query(r) * stride_qm +
                      (long long)blk.head(r) * stride_qh + col;
    chunk_to_float(load_chunk(p, ok), qf[r]);
#pragma unroll
    for (int e = 0; e < 8; ++e) qf[r][e] *= scale_log2;
    row_end[r] = blk.row_key_end(r);
  }

  float m_i[kRows], l_i[kRows], acc[kRows][8];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m_i[r] = -DEC_INF;
    l_i[r] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;
  }

  const elem_t* k_base = k + blk.b * stride_kb + (long long)blk.h_kv * stride_kh + col;
  const elem_t* v_base = v + blk.b * stride_vb + (long long)blk.h_kv * stride_vh + col;
  for (int step = blk.key_begin; step < blk.key_end; step += kStep) {  // block-uniform
    // -- issue every K and V load of the step before using any
    Chunk8 kc[kKeys], vc[kKeys];
#pragma unroll
    for (int c = 0; c < kKeys; ++c) {
      const int j = step + c * kGroups + grp;
      const bool ok = j < blk.key_end && col_ok;
      kc[c] = load_chunk(k_base + (long long)j * stride_kn, ok);
      vc[c] = load_chunk(v_base + (long long)j * stride_vn, ok);
    }
    // -- s = q . k in log2 units, reduced over the row's lanes; hidden keys -> -inf
    float s[kKeys][kRows];
#pragma unroll
    for (int c = 0; c < kKeys; ++c) {
      float kf[8];
      chunk_to_float(kc[c], kf);
      const int j = step + c * kGroups + grp;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(qf[r][e], kf[e], dot);
        dot = row_sum(dot);
        s[c][r] = (j < blk.key_end && j < row_end[r]) ? dot : -DEC_INF;
      }
    }
    softmax_update(s, m_i, l_i, acc);  // s now holds p
    // -- acc += p @ V
#pragma unroll
    for (int c = 0; c < kKeys; ++c) {
      float vf[8];
      chunk_to_float(vc[c], vf);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(s[c][r], vf[e], acc[r][e]);
      }
    }
  }

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

  // -- epilogue: each thread finishes (row, column) elements; O = acc / l, lse in natural log
  const int split = blockIdx.y;
  for (int idx = threadIdx.x; idx < kRows * kDim; idx += kThreads) {
    const int r = idx / kDim, d = idx % kDim;
    if (!blk.row_valid(r) || d >= head_dim) continue;
    float m = -DEC_INF;
    for (int g = 0; g < kGroups; ++g) m = fmaxf(m, sm_m[g * kRows + r]);
    const float m_safe = m == -DEC_INF ? 0.f : m;
    float l = 0.f, a = 0.f;
    for (int g = 0; g < kGroups; ++g) {
      const float w = exp2f(sm_m[g * kRows + r] - m_safe);
      l += w * sm_l[g * kRows + r];
      a += w * sm_acc[(g * kRows + r) * kDim + d];
    }
    // __fdividef: no IEEE-division subroutine call (its ABI spills registers); l <= seqlen
    // is far below 2^126, where it would flush to 0. A NaN l (a NaN score) stays NaN.
    const float out = l == 0.f ? 0.f : __fdividef(a, l);
    const float row_lse = l == 0.f ? -DEC_INF : (m_safe + log2f(l)) * DEC_LN2;
    const int i = blk.query(r), h = blk.head(r);
    if (num_splits == 1) {
      o[blk.b * stride_ob + (long long)i * stride_om + (long long)h * stride_oh + d] =
          float_to_elem(out);
      if (d == 0) lse[((long long)blk.b * heads + h) * q_len + i] = row_lse;
    } else {
      const long long row = ((long long)split * batch + blk.b) * q_len + i;  // (s, b, i)
      o_part[(row * heads + h) * head_dim + d] = out;
      if (d == 0)
        lse_part[(((long long)split * batch + blk.b) * heads + h) * q_len + i] = row_lse;
    }
  }
}

// -- combine: one warp per (b, i, h) row ------------------------------------------------------
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

extern "C" __global__ void __launch_bounds__(32 * CF_COMBINE_WARPS)
flash_decode_combine(const float* __restrict__ o_part, const float* __restrict__ lse_part,
                     elem_t* __restrict__ o, float* __restrict__ lse,
                     int batch, int q_len, int heads, int head_dim, int num_splits,
                     long long stride_ob, long long stride_om, long long stride_oh) {
  extern __shared__ __align__(16) float smem[];  // float4 stores below
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long rows = (long long)batch * q_len * heads;
  const long long row = (long long)blockIdx.x * CF_COMBINE_WARPS + warp;  // (b, i, h)
  if (row >= rows) return;  // warp-uniform; no block barrier below
  const int h = (int)(row % heads), i = (int)((row / heads) % q_len);
  const int b = (int)(row / ((long long)heads * q_len));
  const long long lse_row = ((long long)b * heads + h) * q_len + i;
  const long long lse_stride = (long long)batch * heads * q_len;  // one split's lse
  float* w = smem + warp * num_splits;

  // -- m = max_s lse_s; w_s = exp(lse_s - m); total = sum_s w_s
  float m = -DEC_INF;
  for (int s = lane; s < num_splits; s += 32) m = fmaxf(m, lse_part[s * lse_stride + lse_row]);
  m = warp_max(m);
  const float m_safe = m == -DEC_INF ? 0.f : m;  // every split saw no key: weights 0
  float total = 0.f;
  for (int s = lane; s < num_splits; s += 32) {
    w[s] = exp2f((lse_part[s * lse_stride + lse_row] - m_safe) * DEC_LOG2E);
    total += w[s];
  }
  total = warp_sum(total);
  __syncwarp();
  const float inv = total == 0.f ? 0.f : __fdividef(1.f, total);  // total <= num_splits

  // -- o = sum_s w_s * o_s / total, lse = m + log(total)
  const long long part_stride = rows * head_dim;  // one split's o
  for (int d = lane; d < head_dim; d += 32) {
    float a = 0.f;
    const float* part = o_part + row * head_dim + d;
    for (int s = 0; s < num_splits; ++s) a = fmaf(w[s], part[s * part_stride], a);
    o[b * stride_ob + (long long)i * stride_om + (long long)h * stride_oh + d] =
        float_to_elem(a * inv);
  }
  if (lane == 0) lse[lse_row] = total == 0.f ? -DEC_INF : m_safe + logf(total);
}

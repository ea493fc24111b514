// flash_bwd_pre.cu -- the two elementwise kernels around the FlashAttention-2 backward
// (Dao 2023, Algorithm 2), for every CF_DTYPE (0 fp16, 1 bf16, 2 fp32):
//
//   flash_bwd_preprocess:  delta[b, h, i] = sum_d float(dO[b, i, h, d]) * float(O[b, i, h, d])
//                          (compensated: as accurate as a dot product in twice float32's
//                          precision rounded once, see dot2_step)
//                          lse2[b, h, i]  = m[b, h, i] * LOG2E + log2(l[b, h, i])   (log2 units)
//                                           or +inf when l == 0 (a row that sees no key), so
//                                           the backward's P = exp2(score * scale_log2 - lse2)
//                                           is 0 there.
//                          dq_zero[b, i, h, :] = 0 when dq_zero is given: the dQ accumulator
//                          (float32, contiguous, the true head_dim) starts at zero here, in
//                          the pass that reads those rows anyway, instead of by a memset.
//                          dq_tile_d > 0: the tiled accumulator of that head-dim bucket
//                          (cf_common.cuh's dq_piece_index; packed sequences' layout there
//                          too): the block's 64 rows are whole pieces, contiguous, zeroed by
//                          16-byte stores (a float2 per element pair at its position ran the
//                          kernel at twice its time).
//   (CF_SINKS = 1)         dsinks[h] -= sum_{b, i} exp2(sinks[h] * LOG2E - lse2[b, h, i]) *
//                          delta[b, h, i]  (docs/masks.md: the sink's P times its dP - delta,
//                          dP_sink = 0), one float atomic per warp; dsinks zeroed by the host.
//   flash_bwd_dq_convert:  dq[b, i, h, d] = elem_t(dq_accum[b, i, h, d])  (dq_accum already
//                          holds dQ times softmax_scale; it is float32, contiguous); tile_d
//                          > 0: elem_t(scale * the tiled accumulator's element (b, h, i, d)).
//
// Grid (ceil(seqlen_q / 64), heads, batch) for both, 128 threads, no shared memory.
// blockIdx.x = tile of 64 query rows, blockIdx.y = head, blockIdx.z = batch. 8 threads share a
// row (one 16-byte-or-more vector each, consecutive threads on consecutive vectors, so a row is
// read in 128-byte pieces), 16 rows per pass, 4 passes. m, l, delta, lse2 are float32
// contiguous (batch, heads, seqlen_q); m in natural-log units. O, dO, dq are (batch, seqlen_q,
// heads, head_dim) with strides in elements, head_dim (a multiple of 8) contiguous and every
// row start 16-byte aligned. CF_VARLEN (cf_seq.cuh): the rows of entry b are packed at
// cu_seqlens_q[b] (the convert's cu_seqlens: q's for dQ, k's for dK, dV), the statistics are
// (heads, total_q), and seqlen_q is the grid's max length.

#include "cf_config.cuh"  // CF_DTYPE, CF_SINKS, CF_VARLEN
#include "cf_common.cuh"
#include "cf_seq.cuh"  // CF_VARLEN: packed rows, statistics (heads, total_q)

namespace bwd_pre {
// Compile-time constants as enumerators: NVRTC would emit namespace-scope constexpr
// variables as .global data.
enum : int {
  kThreads = 128,
  kRows = 64,  // rows per block
  kLanesPerRow = 8,  // threads sharing one row
  kRowsPerPass = kThreads / kLanesPerRow,
  kVec = 8,  // elements per thread per step (head_dim % 8 == 0)
};
// The block's row of pass `pass` for thread slot `slot`; the first column of a lane's vector
// v (lanes interleave: consecutive lanes on consecutive 8-element vectors of a row).
__device__ __forceinline__ int lane_row(int pass, int slot) {
  return blockIdx.x * kRows + pass * kRowsPerPass + slot;
}
__device__ __forceinline__ int lane_col(int v, int sub) { return (v * kLanesPerRow + sub) * kVec; }
}  // namespace bwd_pre
// Passes of rows whose loads a lane issues together (at most; 8 vectors a lane in all): more
// loads in flight per thread against more registers, so fewer blocks per SM. One pass (64
// registers, 8 blocks of 128 threads per SM) beat two and four (93-94 registers, 5 blocks) on
// every shape of bench/dev/pre_variants.py (H200, 2026-12-03): at the GQA training layer 23.3
// against 27.9 us, at (16, 16, 1024, d128) 75.0 against 84.9. A tuning knob.
#ifndef CF_PRE_PASSES
#define CF_PRE_PASSES 1
#endif
// The same for the row-major convert (dK, dV of split kv heads; atomic dQ): not yet measured
// below 4 (its grids are often small, where more loads a thread may pay).
#ifndef CF_CONVERT_PASSES
#define CF_CONVERT_PASSES 4
#endif
static_assert(bwd_pre::kRows == 64, "a block's rows are one row of tiled dQ pieces");

// 8 consecutive elements in their storage form (16-bit: one 16-byte vector; float32: two).
// The preprocess loads all of a lane's vectors first and converts them after, so every load
// of the lane is in flight at once: the kernel is bound by memory latency, not arithmetic.
struct Raw8 {
#if CF_DTYPE == 2
  float4 a, b;
#else
  uint4 a;
#endif
};

__device__ __forceinline__ Raw8 load_raw8(const elem_t* p) {
  Raw8 r;
#if CF_DTYPE == 2
  r.a = reinterpret_cast<const float4*>(p)[0];
  r.b = reinterpret_cast<const float4*>(p)[1];
#else
  r.a = *reinterpret_cast<const uint4*>(p);
#endif
  return r;
}

__device__ __forceinline__ void unpack8(float out[8], const Raw8& r) {
#if CF_DTYPE == 2
  out[0] = r.a.x; out[1] = r.a.y; out[2] = r.a.z; out[3] = r.a.w;
  out[4] = r.b.x; out[5] = r.b.y; out[6] = r.b.z; out[7] = r.b.w;
#else
  const cf_u32 w[4] = {r.a.x, r.a.y, r.a.z, r.a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = elem_to_float((elem_t)(w[i] & 0xffffu));
    out[2 * i + 1] = elem_to_float((elem_t)(w[i] >> 16));
  }
#endif
}

// 8 floats to 8 consecutive elements (16-bit: one 16-byte store; float32: two).
__device__ __forceinline__ void store8(elem_t* p, const float x[8]) {
#if CF_DTYPE == 2
  reinterpret_cast<float4*>(p)[0] = make_float4(x[0], x[1], x[2], x[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(x[4], x[5], x[6], x[7]);
#else
  *reinterpret_cast<uint4*>(p) =
      make_uint4(pack2(x[0], x[1]), pack2(x[2], x[3]), pack2(x[4], x[5]), pack2(x[6], x[7]));
#endif
}

// -- delta in twice the working precision (Ogita, Rump, Oishi 2005, "Dot2") ------------------
// Why: dQ = softmax_scale * sum_j dS_j k_j with dS_j = P_j (dP_j - delta). When every key
// shares a large component (max|logit| large), that component multiplies sum_j dS_j =
// sum_j P_j dP_j - delta, which is 0 only if delta equals the backward's sum_j P_j dP_j; any
// rounding error of delta itself is amplified by max|logit| / |q| (issue #9 item 7). A plain
// fp32 sum of head_dim products carries ~head_dim / 8 ulp; this one ~1 ulp, for a few more
// flops in a memory-bound kernel. At max|logit| 1e6 (tests/test_edges_accuracy.py) an
// emulation of the fp32 kernels gave dq 1.74x torch float32's error with the plain sum and
// 1.35x with this one.
// (hi, lo) += x * y: p + pe = x * y exactly (FMA), s + se = hi + p exactly (TwoSum); the
// intrinsics keep the compiler from contracting or reordering any of it.
__device__ __forceinline__ void dot2_step(float& hi, float& lo, float x, float y) {
  const float p = __fmul_rn(x, y);
  const float pe = fmaf(x, y, -p);
  const float s = __fadd_rn(hi, p);
  const float bb = __fsub_rn(s, hi);
  const float se = __fadd_rn(__fsub_rn(hi, __fsub_rn(s, bb)), __fsub_rn(p, bb));
  hi = s;
  lo = __fadd_rn(lo, __fadd_rn(pe, se));
}
// (hi, lo) += (hi2, lo2)
__device__ __forceinline__ void dot2_merge(float& hi, float& lo, float hi2, float lo2) {
  const float s = __fadd_rn(hi, hi2);
  const float bb = __fsub_rn(s, hi);
  const float se = __fadd_rn(__fsub_rn(hi, __fsub_rn(s, bb)), __fsub_rn(hi2, bb));
  hi = s;
  lo = __fadd_rn(lo, __fadd_rn(lo2, se));
}

// One preprocess block's rows: the kernel's arguments resolved to its head and sequence.
struct PreRows {
  const elem_t* o_head;
  const elem_t* do_head;
  long long stride_om, stride_dom;
  const float* m;
  const float* l;
  float* delta;
  float* lse2;
  float* dq_zero_head;  // the row-major dQ accumulator's (row 0, this head), or null
  cf_i64 stat;          // (this head, row 0) in m, l, delta, lse2
  int seqlen_q, head_dim, heads;
  float sink2;          // sinks[h] in log2 units (CF_SINKS)
};

// The block's 64 rows, P passes of 16 rows at a time; lane `sub` of a row holds its vectors
// v = 0 .. V-1 (columns (8 v + sub) 8 .. +7, head_dim <= 64 V). All 2 P V loads are issued
// before any arithmetic: one vector per lane in flight (a loop over columns that computed
// between loads) ran the kernel at 1.6 TB/s, well under the device's copy rate. P: at most
// CF_PRE_PASSES. Returns the lane's share of dsinks[h] (CF_SINKS).
template <int V>
__device__ __forceinline__ float preprocess_rows(const PreRows& a, int sub, int slot) {
  using namespace bwd_pre;
  enum : int { kWords = CF_DTYPE == 2 ? 2 : 1, kP0 = 8 / (V * kWords),
              P = kP0 < CF_PRE_PASSES ? kP0 : CF_PRE_PASSES };
  static_assert(P >= 1 && (kRows / kRowsPerPass) % P == 0, "passes come in whole groups");
  float dsink = 0.f;
#pragma unroll
  for (int pass0 = 0; pass0 < kRows / kRowsPerPass; pass0 += P) {
    Raw8 xo[P][V], xd[P][V];
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int i = lane_row(pass0 + p, slot);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int c = lane_col(v, sub);
        xo[p][v] = xd[p][v] = Raw8{};
        if (i < a.seqlen_q && c < a.head_dim) {
          xo[p][v] = load_raw8(a.o_head + i * a.stride_om + c);
          xd[p][v] = load_raw8(a.do_head + i * a.stride_dom + c);
          if (a.dq_zero_head) {
            float* z = a.dq_zero_head + (cf_i64)i * a.heads * a.head_dim + c;
            reinterpret_cast<float4*>(z)[0] = make_float4(0.f, 0.f, 0.f, 0.f);
            reinterpret_cast<float4*>(z)[1] = make_float4(0.f, 0.f, 0.f, 0.f);
          }
        }
      }
    }
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int i = lane_row(pass0 + p, slot);
      // -- delta_i = rowsum(dO_i * O_i): each lane's columns in order, then a 3-step
      // butterfly, each lane and each merge keeping the sum as an unevaluated pair hi + lo
      // (zero vectors past head_dim or seqlen_q add exact zeros)
      float hi = 0.f, lo = 0.f;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float x[8], y[8];
        unpack8(x, xo[p][v]);
        unpack8(y, xd[p][v]);
#pragma unroll
        for (int e = 0; e < 8; ++e) dot2_step(hi, lo, x[e], y[e]);
      }
#pragma unroll
      for (int off = 1; off < kLanesPerRow; off *= 2)
        dot2_merge(hi, lo, __shfl_xor_sync(0xffffffffu, hi, off),
                   __shfl_xor_sync(0xffffffffu, lo, off));
      // an inf product makes lo NaN (inf - inf); keep hi then, as a plain sum would
      const float acc = fabsf(hi) < CF_INF ? hi + lo : hi;
      if (i < a.seqlen_q) {
        if (sub == 0) a.delta[a.stat + i] = acc;
        // -- lse2_i = m_i log2(e) + log2(l_i), +inf for a row that sees no key
        if (sub == 1) {
          const float li = a.l[a.stat + i];
          const float lse = li == 0.f ? CF_INF : fmaf(a.m[a.stat + i], CF_LOG2E, log2f(li));
          a.lse2[a.stat + i] = lse;
          if (CF_SINKS) dsink -= exp2f(a.sink2 - lse) * acc;  // P_sink (0 - delta_i)
        }
      }
    }
  }
  return dsink;
}

extern "C" __global__ void __launch_bounds__(bwd_pre::kThreads) flash_bwd_preprocess(
    const elem_t* __restrict__ o, const elem_t* __restrict__ dout, const float* __restrict__ m,
    const float* __restrict__ l, float* __restrict__ delta, float* __restrict__ lse2,
    int max_seqlen_q, int heads, int head_dim, long long stride_ob, long long stride_om,
    long long stride_oh, long long stride_dob, long long stride_dom, long long stride_doh,
    const float* __restrict__ sinks, float* __restrict__ dsinks, float* __restrict__ dq_zero,
    int dq_tile_d, CF_SEQ_PARAMS) {
  using namespace bwd_pre;
  const int sub = threadIdx.x % kLanesPerRow;  // position inside the row's lane group
  const int slot = threadIdx.x / kLanesPerRow;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq(b, heads, max_seqlen_q, 0, CF_SEQ_ARGS);  // (the keys are unused)
  // the tiled dQ accumulator: this block's pieces, contiguous (packed sequences: only a
  // sequence's own rows have pieces)
  if (dq_zero && dq_tile_d && (!CF_VARLEN || blockIdx.x * kRows < seq.seqlen_q)) {
    float4* pieces = reinterpret_cast<float4*>(
        seq.dq_piece(dq_zero, h, blockIdx.x * kRows, 0, max_seqlen_q, dq_tile_d));
    for (int k = threadIdx.x; k < (dq_tile_d / 64) * (kDqPieceBytes / 16); k += kThreads)
      pieces[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  PreRows rows;
  rows.o_head = o + seq.q_offset(stride_ob, stride_om) + h * stride_oh;
  rows.do_head = dout + seq.q_offset(stride_dob, stride_dom) + h * stride_doh;
  rows.stride_om = stride_om;
  rows.stride_dom = stride_dom;
  rows.m = m;
  rows.l = l;
  rows.delta = delta;
  rows.lse2 = lse2;
  rows.dq_zero_head =
      dq_zero && !dq_tile_d ? dq_zero + (seq.row_q() * heads + h) * head_dim : nullptr;
  rows.stat = seq.stats(h);
  rows.seqlen_q = seq.seqlen_q;
  rows.head_dim = head_dim;
  rows.heads = heads;
  rows.sink2 = CF_SINKS ? sinks[h] * CF_LOG2E : 0.f;
  float dsink;  // this thread's share of dsinks[h] (CF_SINKS)
  switch ((head_dim + kLanesPerRow * kVec - 1) / (kLanesPerRow * kVec)) {  // uniform
    case 1: dsink = preprocess_rows<1>(rows, sub, slot); break;
    case 2: dsink = preprocess_rows<2>(rows, sub, slot); break;
    case 3: dsink = preprocess_rows<3>(rows, sub, slot); break;
    default: dsink = preprocess_rows<4>(rows, sub, slot); break;  // head_dim <= 256
  }
  if (CF_SINKS) {  // -- dsinks[h] += the warp's sum (every lane takes part in the shuffles)
#pragma unroll
    for (int off = 16; off > 0; off /= 2) dsink += __shfl_xor_sync(0xffffffffu, dsink, off);
    if ((threadIdx.x & 31) == 0) atomicAdd(dsinks + h, dsink);
  }
}

// The tiled dQ accumulator to dq, scaled: the block's 64 rows, one 16 KB
// piece (64 columns) at a time. The piece stores a row pair (r, r + 8), columns 8 t .. 8 t + 7
// as 64 contiguous bytes (four float4 of consecutive C-fragment lanes; cf_common.cuh's
// dq_piece_index); such a group is a thread's unit, t fastest across the threads, so each
// thread reads whole sectors and eight threads write 128 contiguous bytes of a row. (A thread
// per 8 columns of one row, reading float2 pairs at their indices, ran at 1.5 TB/s.)
// q_begin: packed sequences' (CF_VARLEN) first row of this entry.
__device__ __forceinline__ void convert_tiled(const float* __restrict__ accum, elem_t* dq_head,
                                              long long stride_dqm, int seqlen_q, int max_seqlen,
                                              int q_begin, int heads, int head_dim, int tile_d,
                                              float scale) {
  using namespace bwd_pre;
  enum : int { kGroups = kDqPieceBytes / 64, kGroupsPerThread = kGroups / kThreads };
  const int b = blockIdx.z, h = blockIdx.y, row0 = blockIdx.x * kRows;
  if (row0 >= seqlen_q) return;  // (packed: past this sequence, no pieces)
  for (int c0 = 0; c0 < tile_d && c0 < head_dim; c0 += 64) {
    const float4* piece = reinterpret_cast<const float4*>(
        CF_VARLEN ? dq_tile_piece_packed(accum, q_begin, b, h, row0, c0, heads, tile_d)
                  : dq_tile_piece(accum, b, h, row0, c0, heads, max_seqlen, tile_d));
    float4 f[kGroupsPerThread][4];
#pragma unroll
    for (int g = 0; g < kGroupsPerThread; ++g) {
      const int k = threadIdx.x + g * kThreads;
      const int t = k % 8, w = (k / 8) % 4, r7 = k / 32;
#pragma unroll
      for (int j = 0; j < 4; ++j) f[g][j] = piece[(t * 4 + w) * 32 + r7 * 4 + j];
    }
#pragma unroll
    for (int g = 0; g < kGroupsPerThread; ++g) {
      const int k = threadIdx.x + g * kThreads;
      const int t = k % 8, w = (k / 8) % 4, r7 = k / 32;
      const int c = c0 + 8 * t, r = row0 + 16 * w + r7;
      if (c >= head_dim) continue;
      // float4 j: (r, c + 2 j), (r, c + 2 j + 1), (r + 8, c + 2 j), (r + 8, c + 2 j + 1)
      float top[8], bottom[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        top[2 * j] = f[g][j].x * scale;
        top[2 * j + 1] = f[g][j].y * scale;
        bottom[2 * j] = f[g][j].z * scale;
        bottom[2 * j + 1] = f[g][j].w * scale;
      }
      if (r < seqlen_q) store8(dq_head + r * stride_dqm + c, top);
      if (r + 8 < seqlen_q) store8(dq_head + (r + 8) * stride_dqm + c, bottom);
    }
  }
}

// The row-major accumulator (dQ, or dK / dV of split kv heads) to dq's rows: as the
// preprocess, all of a lane's loads for P passes first (V vectors of 8 floats per row,
// head_dim <= 64 V; P keeps them at 64 registers), then the conversions and stores.
template <int V>
__device__ __forceinline__ void convert_rows(const float* __restrict__ accum_head,
                                             elem_t* dq_head, long long stride_dqm,
                                             int seqlen_q, int heads, int head_dim, int sub,
                                             int slot) {
  using namespace bwd_pre;
  enum : int { kP0 = 8 / V, P = kP0 > CF_CONVERT_PASSES ? CF_CONVERT_PASSES : kP0 };
#pragma unroll
  for (int pass0 = 0; pass0 < kRows / kRowsPerPass; pass0 += P) {
    float4 f[P * V][2];  // element e: pass pass0 + e / V, vector e % V
#pragma unroll
    for (int e = 0; e < P * V; ++e) {
      const int i = lane_row(pass0 + e / V, slot), c = lane_col(e % V, sub);
      if (i < seqlen_q && c < head_dim) {
        const float4* src =
            reinterpret_cast<const float4*>(accum_head + (cf_i64)i * heads * head_dim + c);
        f[e][0] = src[0];
        f[e][1] = src[1];
      }
    }
#pragma unroll
    for (int e = 0; e < P * V; ++e) {
      const int i = lane_row(pass0 + e / V, slot), c = lane_col(e % V, sub);
      const float x[8] = {f[e][0].x, f[e][0].y, f[e][0].z, f[e][0].w,
                          f[e][1].x, f[e][1].y, f[e][1].z, f[e][1].w};
      if (i < seqlen_q && c < head_dim) store8(dq_head + i * stride_dqm + c, x);
    }
  }
}

extern "C" __global__ void __launch_bounds__(bwd_pre::kThreads) flash_bwd_dq_convert(
    const float* __restrict__ dq_accum, elem_t* __restrict__ dq, int max_seqlen, int heads,
    int head_dim, long long stride_dqb, long long stride_dqm, long long stride_dqh,
    const int* __restrict__ cu_seqlens, int tile_d, float scale) {
  using namespace bwd_pre;
  const int sub = threadIdx.x % kLanesPerRow;
  const int slot = threadIdx.x / kLanesPerRow;
  const int h = blockIdx.y, b = blockIdx.z;
  // this entry's rows (varlen: cu_seqlens[b] .. cu_seqlens[b + 1], whole: the convert of dK,
  // dV also writes the zeros of keys past seqused_k) and its row 0 in the packed accumulator
  const int seqlen_q = CF_VARLEN ? cu_seqlens[b + 1] - cu_seqlens[b] : max_seqlen;
  const cf_i64 row0 = CF_VARLEN ? (cf_i64)cu_seqlens[b] : (cf_i64)b * max_seqlen;
  elem_t* dq_head = dq + (CF_VARLEN ? row0 * stride_dqm : b * stride_dqb) + h * stride_dqh;
  if (CF_DTYPE != 2 && tile_d) {  // the tiled dQ accumulator (16-bit dQ only), scaled here
    convert_tiled(dq_accum, dq_head, stride_dqm, seqlen_q, max_seqlen, (int)row0, heads,
                  head_dim, tile_d, scale);
    return;
  }
  // the row-major accumulator; float32 dQ is a copy through store8 (its own loop of float4
  // copies spilled 16 B on sm_100 / sm_103 with packed sequences, NVRTC 13, 2026-12-03)
  const float* accum_head = dq_accum + (row0 * heads + h) * head_dim;
  switch ((head_dim + kLanesPerRow * kVec - 1) / (kLanesPerRow * kVec)) {  // uniform
    case 1: convert_rows<1>(accum_head, dq_head, stride_dqm, seqlen_q, heads, head_dim, sub,
                            slot); break;
    case 2: convert_rows<2>(accum_head, dq_head, stride_dqm, seqlen_q, heads, head_dim, sub,
                            slot); break;
    default: convert_rows<4>(accum_head, dq_head, stride_dqm, seqlen_q, heads, head_dim, sub,
                             slot); break;  // head_dim <= 256
  }
}

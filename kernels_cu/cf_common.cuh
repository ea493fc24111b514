// cf_common.cuh -- device helpers shared by every cuflash kernel family.
//
// Everything here is header-free on purpose: NVRTC compiles it with no CUDA include
// directory (no cuda_fp16.h / cuda_bf16.h), so 16-bit values are kept as raw bits
// (`unsigned short`) and converted with PTX `cvt`. Compile-time configuration comes from
// -D defines that Python sets (see docs/kernel_abi.md); cf_config.cuh's defaults let a file
// compile standalone with `nvcc -arch=sm_90 -c kernels_cu/flash_fwd.cu`.
#pragma once

#include "cf_config.cuh"  // CF_DTYPE picks elem_t below

typedef unsigned short cf_u16;
typedef unsigned int cf_u32;
typedef long long cf_i64;

#define CF_LOG2E 1.4426950408889634f  // log2(e): scores are kept in log2 units on chip
#define CF_LN2 0.6931471805599453f    // ln(2): converts a log2-unit max back to natural log
#define CF_INF __int_as_float(0x7f800000)

// -- architecture ----------------------------------------------------------------------------
// The kernels are written for sm_80 (cp.async, mma.sync m16n8k16, bf16). Turing (sm_75) has
// ldmatrix and the fp16 mma.sync m16n8k8 but none of those three, so CF_TURING swaps in the
// few wrappers below (cp.async -> a synchronous copy, m16n8k16 -> two m16n8k8, a scalar
// f16x2 pack); no kernel body changes. bfloat16 is refused on the host (specs.arch_dtypes).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define CF_TURING 1
#else
#define CF_TURING 0
#endif
#if CF_TURING && CF_DTYPE == 1
#error "bfloat16 needs compute capability 8.0 (Turing has no bf16 tensor cores or conversions)"
#endif

#if CF_DTYPE == 2
typedef float elem_t;
#else
typedef cf_u16 elem_t;  // raw fp16 / bf16 bits
#endif

// -- scalar conversions -------------------------------------------------------------
__device__ __forceinline__ float elem_to_float(elem_t x) {
#if CF_DTYPE == 0
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
  return f;
#elif CF_DTYPE == 1
  return __uint_as_float(((cf_u32)x) << 16);  // bf16 is the top half of a float32
#else
  return x;
#endif
}

__device__ __forceinline__ elem_t float_to_elem(float f) {
#if CF_DTYPE == 0
  cf_u16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
#elif CF_DTYPE == 1
  cf_u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
#else
  return f;
#endif
}

#if CF_DTYPE != 2
// Pack two floats into one 32-bit register of two 16-bit values: `lo` in bits 0..15.
// This is the register format of mma.sync A/B fragments (lower column index in the low half).
__device__ __forceinline__ cf_u32 pack2(float lo, float hi) {
  cf_u32 r;
#if CF_DTYPE == 0 && CF_TURING  // the paired cvt is sm_80+
  cf_u16 l16, h16;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(l16) : "f"(lo));
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h16) : "f"(hi));
  asm("mov.b32 %0, {%1, %2};" : "=r"(r) : "h"(l16), "h"(h16));
#elif CF_DTYPE == 0
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
  return r;
}

// -- tensor cores: D = A * B + D, m16n8k16, fp32 accumulate ---------------------------
// Fragment layouts (lane = 4 * group + tig):
//   A (16x16, row): a0 = (group,   2tig..+1)  a1 = (group+8, 2tig..+1)
//                   a2 = (group, 8+2tig..+1)  a3 = (group+8, 8+2tig..+1)
//   B (16x8, col):  b0 = (k = 2tig..+1, n = group)   b1 = (k = 8+2tig..+1, n = group)
//   C (16x8 fp32):  c0,c1 = (group, 2tig..+1)  c2,c3 = (group+8, 2tig..+1)
__device__ __forceinline__ void mma_16816(float c[4], const cf_u32 a[4], const cf_u32 b0,
                                          const cf_u32 b1) {
#if CF_TURING  // k = 0..7 (a0, a1, b0), then k = 8..15 (a2, a3, b1): the same C fragment
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(b0));
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[2]), "r"(a[3]), "r"(b1));
#elif CF_DTYPE == 0
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
#endif  // CF_DTYPE != 2

// -- shared-memory addressing ------------------------------------------------------------
__device__ __forceinline__ cf_u32 smem_addr(const void* p) {
  return (cf_u32)__cvta_generic_to_shared(p);
}

// ldmatrix: lane L supplies the address of row (L % 8) of 8x8 matrix (L / 8); register j
// receives matrix j, element (row = L / 4, cols 2 * (L % 4) .. +1), or the transpose with .trans.
__device__ __forceinline__ void ldmatrix_x4(cf_u32 r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(cf_u32 r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2(cf_u32 r[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(cf_u32 r[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

// -- asynchronous global -> shared copies (sm_80+) ---------------------------------------
// Copies 16 bytes, or writes 16 zero bytes when `valid` is false (tails, head_dim padding);
// a false copy reads nothing from `src`, but `src` must still be a mapped address.
// On Turing the copy is synchronous (load, then store to shared memory) and the group
// commit / wait are no-ops: a copy that lands at issue is one of the orders an asynchronous
// copy may take, and every kernel already puts a __syncthreads between a wait and the reads
// of other threads. The asm is volatile like ldmatrix's, so it keeps its place among them.
#if CF_TURING
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  cf_u32 x = 0, y = 0, z = 0, w = 0;
  if (valid)
    asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(x), "=r"(y), "=r"(z), "=r"(w) : "l"(src));
  asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};"
               ::"r"(smem_addr(dst)), "r"(x), "r"(y), "r"(z), "r"(w));
}
__device__ __forceinline__ void cp_async_commit() {}
template <int N>
__device__ __forceinline__ void cp_async_wait() {}
#else
// The same to a shared-memory address (the Hopper producers keep addresses, not pointers).
__device__ __forceinline__ void cp_async_16_to(cf_u32 dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  cp_async_16_to(smem_addr(dst), src, valid);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}
#endif

// -- 4-byte asynchronous copy (lse2 / delta rows are not 16-byte aligned) ----------------------
// (synchronous on Turing, as cp_async_16). cp_async_4_zfill: a false copy writes 0 and reads
// nothing from `src` (still a mapped address).
__device__ __forceinline__ void cp_async_4(void* dst, const void* src) {
#if CF_TURING
  cf_u32 x;
  asm volatile("ld.global.u32 %0, [%1];" : "=r"(x) : "l"(src));
  asm volatile("st.shared.u32 [%0], %1;" ::"r"(smem_addr(dst)), "r"(x));
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(dst)), "l"(src));
#endif
}
__device__ __forceinline__ void cp_async_4_zfill(void* dst, const void* src, bool valid) {
#if CF_TURING
  cf_u32 x = 0;
  if (valid) asm volatile("ld.global.u32 %0, [%1];" : "=r"(x) : "l"(src));
  asm volatile("st.shared.u32 [%0], %1;" ::"r"(smem_addr(dst)), "r"(x));
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
#endif
}

// -- swizzled tile layout -----------------------------------------------------------------
// A tile row of `chunks_per_row` 16-byte chunks (head_dim / 8 for 16-bit data). The chunk
// index is XORed with a function of the row so that the 8 rows one ldmatrix phase reads
// land in 8 different 16-byte bank groups: with row & 7 when chunks_per_row % 8 == 0, with
// (row >> 1) & 3 when chunks_per_row % 8 == 4 (rows then alternate between two halves of
// the 128-byte bank line). Both keep a chunk inside its aligned group of 8 (or 4) chunks.
// Returns the chunk's offset in 16-byte units from the tile start.
template <int CHUNKS_PER_ROW>
__device__ __forceinline__ int swizzle_chunk(int row, int chunk) {
  static_assert(CHUNKS_PER_ROW % 4 == 0, "tile rows must be a multiple of 64 bytes");
  if (CHUNKS_PER_ROW % 8 == 0) return row * CHUNKS_PER_ROW + (chunk ^ (row & 7));
  return row * CHUNKS_PER_ROW + (chunk ^ ((row >> 1) & 3));
}

// -- arithmetic -----------------------------------------------------------------------------
// 2^x through the SFU; ex2(-inf) = +0, which masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 2^x for x <= 0 on the FMA and integer pipes, no SFU: x = n + f with n = floor(x) and f in
// [0, 1); 2^f by a cubic with p(0) = 1 (a relative minimax fit, max relative error 8.6e-5 =
// 2^-13.5 in float32, under a 16-bit P's rounding, 2^-9 / 2^-11); n added to p's exponent
// field. x is clamped at -127 first (-inf included), where the exponent field comes out 0:
// a denormal or +0, read as zero by every ftz op after it, so masked scores still give P = 0
// and l = 0. Eight instructions in place of one SFU op: the forward's softmax takes it for
// some of its scores (CF_EXP2_FMA) where the SFU, not the tensor cores, sets the pace
// (FlashAttention-4 emulates part of its exp2s the same way on Blackwell).
__device__ __forceinline__ float fma_exp2(float x) {
  x = fmaxf(x, -127.f);
  const float j = __fadd_rd(x, 12582912.f);  // 1.5 * 2^23 + floor(x): the low bits hold n
  const float f = x - (j - 12582912.f);      // [0, 1), exact
  const float p = fmaf(fmaf(fmaf(0.07706635445356369f, f, 0.22764573991298676f), f,
                            0.6951166391372681f), f, 1.f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(j) << 23));  // p * 2^n
}

// Reductions over the 4 lanes of a quad (lanes sharing a `group`): the lanes that hold
// one accumulator row in the mma C layout.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Size of the dynamic shared memory this launch was given, for a cheap guard against a
// host-side formula that disagrees with the kernel's own layout.
__device__ __forceinline__ cf_u32 dynamic_smem_size() {
  cf_u32 r;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
}
#define CF_REQUIRE_SMEM(bytes)                                          \
  do {                                                                  \
    if (threadIdx.x == 0 && dynamic_smem_size() < (cf_u32)(bytes)) __trap(); \
  } while (0)

// -- the tiled dQ accumulator (flash_bwd_sm90_ws.cu with CF_DQ_BULK; flash_bwd_pre.cu) ------
// The dQ accumulator is then laid out in pieces of 64 query rows x 64 columns, 16 KB each,
// the order a warpgroup's m64n64 result leaves its registers in: piece (b, h, r / 64, c / 64)
// of (batch, heads, ceil(max_seqlen_q / 64), head_dim bucket / 64), inside it element (r, c)
// (r, c mod 64) at float dq_piece_index(r, c). So a warpgroup stages its tile's dQ with eight
// 16-byte stores a thread (no bank conflicts) and one thread adds all of it with one
// cp.reduce.async.bulk, instead of 16 float atomics a thread (docs/kernel_abi.md). The rows
// past seqlen_q and the columns past head_dim of a piece collect what they collect: nothing
// reads them. flash_bwd_pre.cu zeroes and converts this layout (dq_tile_d).
//   the m64n64 C fragment: thread `lane` of warp w, n-tile t, element e holds row
//   16 w + lane / 4 + 8 (e >> 1), column 8 t + 2 (lane % 4) + (e & 1)
__host__ __device__ __forceinline__ int dq_piece_index(int r, int c) {
  const int w = r >> 4, lane = (r & 7) * 4 + ((c >> 1) & 3), t = c >> 3;
  return ((t * 4 + w) * 32 + lane) * 4 + 2 * ((r >> 3) & 1) + (c & 1);
}
enum : int { kDqPieceBytes = 64 * 64 * 4 };
// The piece holding row i, column c of batch entry b, head h in a tiled accumulator of
// head-dim bucket tile_d (rows of max_seqlen rounded up to 64).
template <typename T>
__device__ __forceinline__ T* dq_tile_piece(T* accum, int b, int h, int i, int c, int heads,
                                            int max_seqlen, int tile_d) {
  const long long row64s = (max_seqlen + 63) / 64;
  return accum + ((((long long)b * heads + h) * row64s + i / 64) * (tile_d / 64) + c / 64) *
                     (kDqPieceBytes / 4);
}
// Packed sequences (cf_seq.cuh's CF_VARLEN): sequence b's rows, packed from row q_begin, own
// the piece rows q_begin / 64 + b + i / 64, laid out (piece row, head, head-dim piece). A
// sequence of n rows needs ceil(n / 64) piece rows and the next one starts at least that many
// later, so no two sequences share a piece; total_q / 64 + batch + 1 piece rows hold a batch
// (cuflash/plan.py's tiled_dq_bytes). b must be the batch entry's index in the whole batch.
template <typename T>
__device__ __forceinline__ T* dq_tile_piece_packed(T* accum, int q_begin, int b, int h, int i,
                                                   int c, int heads, int tile_d) {
  const long long piece_row = q_begin / 64 + b + i / 64;
  return accum + ((piece_row * heads + h) * (tile_d / 64) + c / 64) * (kDqPieceBytes / 4);
}

// Programmatic dependent launch (cuflash/pdl.py; sm_90 and newer, nothing below): a kernel
// lets the stream's next kernel, launched as its dependent, start early
// (pdl_launch_dependents); the dependent waits there for this kernel to end and for its writes
// to be visible (pdl_wait) before it reads them. A kernel launched normally passes pdl_wait
// at once.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

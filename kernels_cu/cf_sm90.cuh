// cf_sm90.cuh -- shared-memory tiles for the Hopper (wgmma, sm_90a) kernels: the 64-column
// panel layout with wgmma's 128-byte swizzle, its descriptors, and the global -> shared loader.
//
// Panel layout: a ROWS x head_dim tile is stored as head_dim / 64 panels of 64 columns
// (128-byte rows): panel p holds columns 64p .. 64p + 63 of every row, row r at r * 128 bytes,
// its 16-byte chunk c at (c ^ (r % 8)) * 16. This is wgmma's 128-byte swizzle (address bits
// 4-6 XOR bits 7-9) when each panel starts 1024-byte aligned (tiles of a multiple of 8 rows
// in a 1024-byte aligned dynamic shared memory base; the kernels check the base).
// Descriptors (PTX ISA, "matrix descriptor"; 128-byte swizzle):
//   K-major operand (the contraction dim contiguous, e.g. Q or K as A/B of Q K^T): 8-row core
//   groups are 1024 bytes apart (SBO); a k-step of 16 columns moves the start address 32 bytes
//   inside the panel (the swizzle applies to the final address), the next panel every 4 steps.
//   MN-major operand (M or N contiguous, e.g. V as B of P V): LBO = the panel stride (the next
//   64 columns of M / N), SBO = 1024 (the next 8 rows of K); a k-step of 16 rows moves the
//   start address 16 * 128 bytes.
#pragma once
#include "cf_common.cuh"
#include "cf_wgmma.cuh"

__device__ __forceinline__ cf_u64 sm90_desc(cf_u32 saddr, cf_u32 lbo_bytes, cf_u32 sbo_bytes) {
  return (cf_u64)((saddr & 0x3FFFF) >> 4) | ((cf_u64)(lbo_bytes >> 4) << 16) |
         ((cf_u64)(sbo_bytes >> 4) << 32) | (1ull << 62);
}
// The descriptor of `tile` + `offset` bytes (a k-step's start inside the tile). CF_DESC_ADD
// (session 42; registry.DESC_ADD selects it): the tile's descriptor plus offset / 16 in its
// low word, the same bits (both are multiples of 16 and their sum stays below 2^18, so the
// 14-bit start field never carries), so that in an unrolled k loop each step costs one add
// to a descriptor built once, where masking and shifting every step's address took four
// instructions a wgmma (the 8-warp d256 forward, SASS under ncu: about 80 of ~640 a warp's
// tile). tests/test_desc_add.py checks the identity, test_gpu_desc_add.py the outputs.
#ifndef CF_DESC_ADD
#define CF_DESC_ADD 0
#endif
__device__ __forceinline__ cf_u64 sm90_desc_at(cf_u32 tile, cf_u32 offset, cf_u32 lbo_bytes,
                                               cf_u32 sbo_bytes) {
#if CF_DESC_ADD
  const cf_u32 lo = (((tile & 0x3FFFF) >> 4) | ((lbo_bytes >> 4) << 16)) + (offset >> 4);
  return ((cf_u64)((sbo_bytes >> 4) | (1u << 30)) << 32) | lo;
#else
  return sm90_desc(tile + offset, lbo_bytes, sbo_bytes);
#endif
}
// K-major operand: k-step kk of a tile of ROWS rows starting at `tile` (+ a row offset).
template <int ROWS>
__device__ __forceinline__ cf_u64 sm90_desc_kmajor(cf_u32 tile, int kk) {
  return sm90_desc_at(tile, (kk >> 2) * (ROWS * 128) + (kk & 3) * 32, 16, 1024);
}
// MN-major operand: k-step kk (rows 16kk ..) of a tile of ROWS rows (panel stride ROWS * 128).
template <int ROWS>
__device__ __forceinline__ cf_u64 sm90_desc_mnmajor(cf_u32 tile, int kk) {
  return sm90_desc_at(tile, kk * 16 * 128, ROWS * 128, 1024);
}

// Writes done by the generic proxy (cp.async, st.shared) visible to wgmma's async proxy.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Traps unless the dynamic shared memory starts 1024-byte aligned (the swizzle needs it).
__device__ __forceinline__ void sm90_require_aligned(const void* smem) {
  if (threadIdx.x == 0 && (smem_addr(smem) & 1023u) != 0) __trap();
}

// Byte offset of element (row, col) of a panel-layout tile of ROWS rows.
template <int ROWS>
__device__ __forceinline__ cf_u32 sm90_offset(int row, int col) {
  return (col >> 6) * (ROWS * 128) + row * 128 + ((((col >> 3) & 7) ^ (row & 7)) << 4) +
         (col & 7) * 2;
}

// -- global -> shared: ROWS x (8 * CHUNKS) tile into panels, cp.async, zero-filled ------------
// kTpr threads share a row (all CHUNKS of it when they divide THREADS, else THREADS / 8 so a
// pass covers 8 rows, else 8: head_dim 192's 24 chunks); thread
// t copies chunks c0 + k * kTpr (c0 = t % kTpr) of rows t / kTpr + p * kStep. kStep and kTpr
// are multiples of 8, so all of a thread's chunks share one swizzle key and all its
// destinations are compile-time offsets from one base. Rows >= rows_valid and columns >=
// head_dim become zeros.
template <int ROWS, int CHUNKS, int THREADS>
struct PanelLoader {
  enum : int {
    kTpr = CHUNKS <= THREADS / 8 && THREADS % CHUNKS == 0 ? CHUNKS
           : CHUNKS % (THREADS / 8) == 0                     ? THREADS / 8
                                                            : 8,
    kPerRow = CHUNKS / kTpr,
    kStep = THREADS / kTpr,
    kPasses = (ROWS + kStep - 1) / kStep
  };
  static_assert(kStep % 8 == 0 && kTpr % 8 == 0 && CHUNKS % kTpr == 0,
                "rows per pass and chunks per thread must keep the swizzle key");
  const elem_t* src;  // (row0, c0) of row 0 of this head
  const elem_t* fallback;
  cf_i64 stride;
  int row0;
  cf_u32 dst;  // byte offset of (row0, c0) in a tile
  bool col_ok;   // this thread's first chunk lies inside head_dim
  int col_room;  // head_dim - 8 * c0: chunk k lies inside when 8 * k * kTpr < col_room

  __device__ __forceinline__ PanelLoader(const elem_t* base, cf_i64 stride_row, int head_dim,
                                         int tid)
      : fallback(base), stride(stride_row), row0(tid / kTpr) {
    const int c0 = tid % kTpr;
    src = base + row0 * stride_row + c0 * 8;
    asm volatile("" : "+l"(src));  // keep the pointer in registers (see cf_pinned)
    dst = (c0 >> 3) * (ROWS * 128) + row0 * 128 + (((c0 & 7) ^ (row0 & 7)) << 4);
    col_ok = c0 * 8 < head_dim;
    if (kPerRow > 1) col_room = head_dim - c0 * 8;
  }

  __device__ __forceinline__ void load(unsigned char* tile, int first_row, int rows_valid) const {
    const elem_t* g = src + first_row * stride;
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int row = row0 + p * kStep;
      if (ROWS % kStep == 0 || row < ROWS) {
#pragma unroll
        for (int k = 0; k < kPerRow; ++k) {
          const bool valid = (k == 0 ? col_ok : 8 * k * kTpr < col_room) && row < rows_valid;
          cp_async_16(tile + dst + p * kStep * 128 + k * (kTpr / 8) * (ROWS * 128),
                      valid ? g + k * kTpr * 8 : fallback, valid);
        }
      }
      g += kStep * stride;
    }
  }
};

// -- the forward's two products for one warpgroup's 64 query rows --------------------------
#if CF_DTYPE != 2
// S = Q K^T: HEAD_DIM / 16 wgmma of 16 columns; Q (Q_ROWS rows) and K in panel layout.
template <int Q_ROWS, int BLOCK_N, int HEAD_DIM>
__device__ __forceinline__ void sm90_qk(float (&s)[BLOCK_N / 8][4], cf_u32 q_wg, cf_u32 k_tile) {
#pragma unroll
  for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
    const cf_u64 da = sm90_desc_kmajor<Q_ROWS>(q_wg, kk);
    const cf_u64 db = sm90_desc_kmajor<BLOCK_N>(k_tile, kk);
    wgmma_ss<BLOCK_N>(s, da, db, kk > 0);
  }
}

// K-step kk of P packed to 16 bits as a wgmma A fragment: the S accumulators' C layout is
// the A layout.
template <int NT>
__device__ __forceinline__ void sm90_pack_kstep(cf_u32 (&a)[4], const float (&p)[NT][4],
                                                int kk) {
  a[0] = pack2(p[2 * kk][0], p[2 * kk][1]);
  a[1] = pack2(p[2 * kk][2], p[2 * kk][3]);
  a[2] = pack2(p[2 * kk + 1][0], p[2 * kk + 1][1]);
  a[3] = pack2(p[2 * kk + 1][2], p[2 * kk + 1][3]);
}

// All of P packed, for a P V product issued later (the registers must outlive it).
template <int BLOCK_N>
__device__ __forceinline__ void sm90_pack_p(cf_u32 (&a)[BLOCK_N / 16][4],
                                            const float (&p)[BLOCK_N / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < BLOCK_N / 16; ++kk) sm90_pack_kstep(a[kk], p, kk);
}

// O += P V: BLOCK_N / 16 wgmma with P from registers (packed) and V (MN-major) from shared.
template <int BLOCK_N, int HEAD_DIM>
__device__ __forceinline__ void sm90_pv_packed(float (&acc)[HEAD_DIM / 8][4],
                                               const cf_u32 (&a)[BLOCK_N / 16][4], cf_u32 v_tile) {
#pragma unroll
  for (int kk = 0; kk < BLOCK_N / 16; ++kk)
    wgmma_rs<HEAD_DIM>(acc, a[kk], sm90_desc_mnmajor<BLOCK_N>(v_tile, kk), 1);  // keys 16kk ..
}

// O += P V with P the S registers, packed one k-step at a time.
template <int BLOCK_N, int HEAD_DIM>
__device__ __forceinline__ void sm90_pv(float (&acc)[HEAD_DIM / 8][4],
                                        const float (&p)[BLOCK_N / 8][4], cf_u32 v_tile) {
#pragma unroll
  for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
    cf_u32 a[4];
    sm90_pack_kstep(a, p, kk);
    const cf_u64 db = sm90_desc_mnmajor<BLOCK_N>(v_tile, kk);  // keys 16kk ..
    wgmma_rs<HEAD_DIM>(acc, a, db, 1);
  }
}
#endif  // CF_DTYPE != 2

// -- warp specialization: mbarriers, named barriers, register reallocation ----------------
// An mbarrier (8 bytes of shared memory) completes a phase when `count` arrivals have come;
// waiting on a phase's parity acquires what the arriving threads released before arriving.
__device__ __forceinline__ void mbar_init(cf_u32 bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(cf_u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(cf_u32 bar, int parity) {
  cf_u32 done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
}
// Arrives on `bar` once every cp.async this thread issued so far has landed (the barrier's
// count includes this arrival: .noinc).
__device__ __forceinline__ void mbar_arrive_cp_async(cf_u32 bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}
// mbarrier.init visible to the other threads (and to the async proxy) before first use.
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// A barrier among `threads` threads only (ids 1..15; __syncthreads is barrier 0).
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// The warpgroup's registers per thread from here on (a multiple of 8 in 24..256; the
// kernel's __launch_bounds__ must give ptxas the entry count, or it ignores these).
template <int REGS>
__device__ __forceinline__ void regs_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void regs_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(REGS));
}

// -- bulk tensor copies (TMA) ------------------------------------------------------------
// A tensor map (the driver's CUtensorMap: 128 opaque bytes, 64-byte aligned), built on the
// host by cuflash/tensor_map.py (cuTensorMapEncodeTiled) and passed by value as a
// `const __grid_constant__` parameter: the copy engine reads it where it lies, in the
// kernel's parameter space, so the kernel takes its address and never copies it.
struct alignas(64) cf_tensor_map {
  unsigned long long opaque[16];
};

// One arrival on `bar` that also expects `bytes` more to land on it (the copies' count).
__device__ __forceinline__ void mbar_arrive_expect_tx(cf_u32 bar, cf_u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

// The box of `map` at coordinates (c0 innermost .. c3) into shared memory at `dst`; its bytes
// count down `bar`'s transaction count as they land. Boxes of 64 two-byte columns with the
// 128-byte swizzle land in the panel layout above (dst 1024-byte aligned): row r at r * 128,
// chunk c at (c ^ (r % 8)) * 16. Elements outside the tensor land as zeros.
__device__ __forceinline__ void tma_load_4d(cf_u32 dst, const cf_tensor_map* map, int c0,
                                            int c1, int c2, int c3, cf_u32 bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(dst),
      "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(bar)
      : "memory");
}

// A ROWS x (64 * PANELS) tile of a (column, row, head, batch) tensor map: one box per
// 64-column panel, at rows row0 .., into a panel-layout tile at `dst`.
template <int ROWS, int PANELS>
__device__ __forceinline__ void tma_load_tile(cf_u32 dst, const cf_tensor_map* map, int row0,
                                              int head, int batch, cf_u32 bar) {
#pragma unroll
  for (int p = 0; p < PANELS; ++p) tma_load_4d(dst + p * ROWS * 128, map, 64 * p, row0, head,
                                               batch, bar);
}

// Zeroes rows `from` .. ROWS - 1 of a panel-layout tile at `tile` (PANELS panels of ROWS
// 128-byte rows), thread t of `threads` taking every threads-th 16-byte chunk: the swizzle
// moves chunks within their row only, so whole rows are contiguous lines whatever it does.
template <int ROWS, int PANELS>
__device__ __forceinline__ void zero_rows_past(unsigned char* tile, int from, int t,
                                               int threads) {
  const int chunks = (ROWS - from) * 8;  // of one panel
#pragma unroll
  for (int p = 0; p < PANELS; ++p)
#pragma unroll 1
    for (int c = t; c < chunks; c += threads)
      *reinterpret_cast<uint4*>(tile + p * ROWS * 128 + from * 128 + c * 16) =
          make_uint4(0u, 0u, 0u, 0u);
}

// -- clusters: two CTAs sharing K / V boxes (multicast) ------------------------------------
__device__ __forceinline__ cf_u32 cluster_rank() {
  cf_u32 r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
// Every thread of every CTA of the cluster (exited ones count as arrived), with release /
// acquire: the mbarrier inits before any CTA touches a peer's barriers.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;"
               ::: "memory");
}
// One arrival (release, cluster scope) on the mbarrier at `bar`'s offset in CTA `rank`.
__device__ __forceinline__ void mbar_arrive_in(cf_u32 bar, cf_u32 rank) {
  cf_u32 remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(bar), "r"(rank));
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(remote)
               : "memory");
}
// tma_load_4d's box into the same offset `dst` of every CTA in `cta_mask`, counting down the
// mbarrier at `bar`'s offset in each of them.
__device__ __forceinline__ void tma_load_4d_multicast(cf_u32 dst, const cf_tensor_map* map,
                                                      int c0, int c1, int c2, int c3,
                                                      cf_u32 bar, unsigned short cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3, %4, %5}], [%6], %7;" ::"r"(dst),
      "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(bar), "h"(cta_mask)
      : "memory");
}
// A ROWS x (64 * PANELS) tile shared by a cluster of two: this CTA (`rank`) boxes the panels
// of its parity into both CTAs; the peer boxes the others. Each CTA's `bar` expects the
// whole tile.
template <int ROWS, int PANELS>
__device__ __forceinline__ void tma_load_tile_pair(cf_u32 dst, const cf_tensor_map* map,
                                                   int row0, int head, int batch, cf_u32 bar,
                                                   cf_u32 rank) {
  static_assert(PANELS % 2 == 0, "the panels split evenly over the pair");
#pragma unroll
  for (int p = 0; p < PANELS; p += 2)
    tma_load_4d_multicast(dst + (p + rank) * ROWS * 128, map, 64 * (p + (int)rank), row0, head,
                          batch, bar, 0x3);
}

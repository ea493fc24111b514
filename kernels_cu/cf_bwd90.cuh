// cf_bwd90.cuh -- pieces the Hopper backward kernels share (flash_bwd_sm90.cu, its
// warp-specialized form flash_bwd_sm90_ws.cu, its head-dim split flash_bwd_sm90_hsplit.cu):
// the wgmma shapes by accumulator size, the two score products, P and dS of a fragment, dQ
// atomics, ordered dQ's turns, and the dK, dV epilogue of the layout where each warpgroup
// owns 64 keys. Read flash_bwd_sm90.cu's header for the algorithm.
#pragma once
#include "cf_common.cuh"
#include "cf_sm90.cuh"
#include "cf_mask.cuh"
#include "cf_seq.cuh"

__device__ __forceinline__ void red_add2(float* p, float x, float y) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(x), "f"(y) : "memory");
}

// dK, dV products by accumulator shape (m64nN, N = 8 x n-tiles): both layouts' code then
// type-checks at every head-dim bucket, so `if constexpr (kRoleSplit)` can pick one in this
// plain kernel. The shapes no bucket issues are declared only (named in the discarded layout).
__device__ __forceinline__ void wgmma_rs_acc(float (&d)[8][4], const cf_u32 (&a)[4],
                                             cf_u64 desc_b, int scale_d) {
  wgmma_rs_n64(d, a, desc_b, scale_d);
}
__device__ __forceinline__ void wgmma_rs_acc(float (&d)[16][4], const cf_u32 (&a)[4],
                                             cf_u64 desc_b, int scale_d) {
  wgmma_rs_n128(d, a, desc_b, scale_d);
}
template <int T>
__device__ void wgmma_rs_acc(float (&d)[T][4], const cf_u32 (&a)[4], cf_u64 desc_b, int scale_d);
__device__ __forceinline__ void wgmma_ss_kmn_acc(float (&d)[8][4], cf_u64 desc_a, cf_u64 desc_b,
                                                 int scale_d) {
  wgmma_ss_kmn_n64(d, desc_a, desc_b, scale_d);
}
__device__ __forceinline__ void wgmma_ss_kmn_acc(float (&d)[16][4], cf_u64 desc_a, cf_u64 desc_b,
                                                 int scale_d) {
  wgmma_ss_kmn_n128(d, desc_a, desc_b, scale_d);
}
__device__ __forceinline__ void wgmma_ss_kmn_acc(float (&d)[24][4], cf_u64 desc_a, cf_u64 desc_b,
                                                 int scale_d) {
  wgmma_ss_kmn_n192(d, desc_a, desc_b, scale_d);
}
__device__ __forceinline__ void wgmma_ss_kmn_acc(float (&d)[32][4], cf_u64 desc_a, cf_u64 desc_b,
                                                 int scale_d) {
  wgmma_ss_kmn_n256(d, desc_a, desc_b, scale_d);
}
template <int T>
__device__ void wgmma_ss_kmn_acc(float (&d)[T][4], cf_u64 desc_a, cf_u64 desc_b, int scale_d);

// The first T2 n-tiles of an accumulator: the role split's dV of v's own, narrower head_dim
// in the registers of dK (flash_bwd_sm90.cu; the indices stay compile-time constants, so the
// view stays in registers).
template <int T2, int T>
__device__ __forceinline__ float (&acc_prefix(float (&acc)[T][4]))[T2][4] {
  static_assert(T2 <= T, "a prefix of the accumulator");
  return *reinterpret_cast<float(*)[T2][4]>(&acc);
}

// S^T and dP^T by accumulator shape: m64n32 (the role split's 32 queries), n64, n128.
__device__ __forceinline__ void wgmma_ss_acc(float (&d)[4][4], cf_u64 desc_a, cf_u64 desc_b,
                                             int scale_d) {
  wgmma_ss_n32(d, desc_a, desc_b, scale_d);
}
__device__ __forceinline__ void wgmma_ss_acc(float (&d)[8][4], cf_u64 desc_a, cf_u64 desc_b,
                                             int scale_d) {
  wgmma_ss_n64(d, desc_a, desc_b, scale_d);
}
__device__ __forceinline__ void wgmma_ss_acc(float (&d)[16][4], cf_u64 desc_a, cf_u64 desc_b,
                                             int scale_d) {
  wgmma_ss_n128(d, desc_a, desc_b, scale_d);
}

// Issues X^T = A B^T over WIDTH columns (head_dim) for 64 rows of A (a K-major tile of A_ROWS
// rows, from byte a_off) and the B_ROWS-row tile at b (from byte b_off): S^T = K Q^T,
// dP^T = V dO^T (over v's head_dim).
template <int A_ROWS, int B_ROWS, int WIDTH = CF_HEAD_DIM, int T>
__device__ __forceinline__ void issue_scores_t(float (&x)[T][4], cf_u32 a, cf_u32 a_off, cf_u32 b,
                                               cf_u32 b_off) {
#pragma unroll
  for (int kk = 0; kk < WIDTH / 16; ++kk)
    wgmma_ss_acc(x, sm90_desc_kmajor<A_ROWS>(a + a_off, kk), sm90_desc_kmajor<B_ROWS>(b + b_off, kk),
                 kk > 0);
}

// S^T = K Q^T and dP^T = V dO^T (both layouts of flash_bwd_sm90.cu): the keys at byte k_off of
// sK / sV (K-major panels of KEY_ROWS rows), the queries at q_off of the Q / dO stage (Q_ROWS
// rows); done and fenced.
template <int KEY_ROWS, int Q_ROWS, int T>
__device__ __forceinline__ void scores_t(float (&s)[T][4], float (&dp)[T][4], cf_u32 sK, cf_u32 sV,
                                         cf_u32 k_off, cf_u32 q, cf_u32 dout, cf_u32 q_off) {
  wgmma_fence();
  issue_scores_t<KEY_ROWS, Q_ROWS>(s, sK, k_off, q, q_off);
  issue_scores_t<KEY_ROWS, Q_ROWS, CF_HEAD_DIM_V>(dp, sV, k_off, dout, q_off);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_regs(s);
  wgmma_fence_regs(dp);
}

// dq_accum += softmax_scale * one m64n64 dQ result (both layouts): this thread's rows row,
// row + 8, columns col0 + 8t + 2tig, +1; dq_head is the head's (batch entry's) row 0.
__device__ __forceinline__ void add_dq(const float (&dq)[8][4], float* dq_head, int row, int col0,
                                       int tig, int seqlen_q, int heads, int head_dim,
                                       float softmax_scale) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    if (row + 8 * rr < seqlen_q) {
      float* dst = dq_head + (cf_i64)(row + 8 * rr) * heads * head_dim + col0 + 2 * tig;
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        if (col0 + 8 * t + 2 * tig < head_dim)
          red_add2(dst + 8 * t, dq[t][2 * rr] * softmax_scale, dq[t][2 * rr + 1] * softmax_scale);
      }
    }
  }
}

// -- dQ by bulk reduce-adds (flash_bwd_sm90_ws.cu with CF_DQ_BULK; the layout: cf_common.cuh's
// dq_piece_index) ---------------------------------------------------------------------------
// Half hf (columns 32 hf .. 32 hf + 31: n-tiles 4 hf .. 4 hf + 3, contiguous in the piece
// order) of this thread's m64n64 result into 8 KB at shared address `half` (`warp`: within
// the warpgroup).
__device__ __forceinline__ void stage_dq_half(const float (&dq)[8][4], cf_u32 half, int hf,
                                              int warp, int lane) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(
                     half + (cf_u32)(((j * 4 + warp) * 32 + lane) * 16)),
                 "f"(dq[4 * hf + j][0]), "f"(dq[4 * hf + j][1]), "f"(dq[4 * hf + j][2]),
                 "f"(dq[4 * hf + j][3])
                 : "memory");
}
// This thread's 32 values of the m64n64 result into the piece at shared address `piece`.
// (Not two stage_dq_half: in flash_bwd_sm90_ws.cu these offsets fold into immediates, which
// they did not through the halves: more adds in the PTX of the selected kernel.)
__device__ __forceinline__ void stage_dq_piece(const float (&dq)[8][4], cf_u32 piece, int warp,
                                               int lane) {
#pragma unroll
  for (int t = 0; t < 8; ++t)
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(
                     piece + (cf_u32)(((t * 4 + warp) * 32 + lane) * 16)),
                 "f"(dq[t][0]), "f"(dq[t][1]), "f"(dq[t][2]), "f"(dq[t][3])
                 : "memory");
}
// This thread's 32 values of the m64n64 result added straight into the piece at global
// `piece` (`warp`: within the warpgroup) with eight red.global.add.v4.f32: the piece is in
// fragment order, so each warp's instruction covers 512 contiguous bytes (CF_DQ_RED4, a knob
// on the tiled accumulator: no staging stores, barriers, or waits for a bulk copy's reads).
__device__ __forceinline__ void red_dq_piece(const float (&dq)[8][4], float* piece, int warp,
                                             int lane) {
  float* p = piece + (warp * 32 + lane) * 4;
#pragma unroll
  for (int t = 0; t < 8; ++t)
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p + t * 4 * 32 * 4),
                 "f"(dq[t][0]), "f"(dq[t][1]), "f"(dq[t][2]), "f"(dq[t][3])
                 : "memory");
}
// global dst[0 .. bytes / 4) += the floats at shared src (the TMA unit's reduce-add; issued by
// one thread after the writers' fence.proxy.async and a barrier), in this thread's bulk group.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, cf_u32 src, int bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(
                   dst), "r"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
// This thread's bulk groups done reading shared memory (the source may be rewritten).
__device__ __forceinline__ void bulk_wait_read_all() {
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}
// ... and their writes performed (before the block exits).
__device__ __forceinline__ void bulk_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// Ordered dQ: the turn of key tile key_tile at query tile pm0 (its place among the key tiles
// that see it) and the semaphore of (head ph, tile pm0, warpgroup g's half). Each warpgroup
// adds its own half of the tile (columns or rows), so each half has its own semaphore and the
// warpgroups do not wait for each other.
struct OrderedTurns {
  MaskPolicy mask;
  int key_tile, m_first, tiles_per_head, n_k, q_tiles;
  bool rotate;
  int* head_semaphores;  // batch entry b's, head 0

  __device__ __forceinline__ int turn(int pm0) const {
    const KeyTiles seen_by = key_tiles_of<CF_BLOCK_N, CF_BLOCK_M>(mask, pm0);
    // causal, or a window (whose blocks start with the last key tile too): descending
    if (CF_CAUSAL || CF_LOCAL) return seen_by.end - 1 - key_tile;
    if (rotate) {  // after the key tiles from the last one starting at or before it
      const int q = pm0 / CF_BLOCK_M - m_first;
      const int first_in = ((q + 1) * n_k + tiles_per_head - 1) / tiles_per_head - 1;
      return first_in - key_tile + (first_in < key_tile ? n_k : 0);
    }
    return key_tile - seen_by.begin;
  }
  __device__ __forceinline__ int* semaphore(int pm0, int ph, int g) const {
    return head_semaphores + ((cf_i64)ph * q_tiles + pm0 / CF_BLOCK_M) * 2 + g;
  }
};

// Spins until *sem == turn (acquire: the adds of the turns before are visible). After about
// ten seconds it stops waiting rather than hang the GPU (a turn that never comes would be a
// bug; the sums stay right, only their order would vary). A trap here costs the consumers
// 1.3-1.8 KB of spills (NVRTC 13.5).
__device__ __forceinline__ int load_acquire(const int* sem) {
  int now;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(now) : "l"(sem) : "memory");
  return now;
}
__device__ __forceinline__ void wait_for_turn(const int* sem, int turn) {
  for (int spins = 0; spins < (1 << 27); ++spins) {
    if (load_acquire(sem) == turn) return;
    __nanosleep(64);
  }
}
// After a barrier that ordered the warpgroup's adds before this thread: the adds are
// performed at gpu scope before sem becomes value.
__device__ __forceinline__ void fence_and_release(int* sem, int value) {
  asm volatile("fence.acq_rel.gpu;\n\tst.relaxed.gpu.global.b32 [%0], %1;" ::"l"(sem),
               "r"(value)
               : "memory");
}

// P^T and dS^T of one S^T C fragment (both layouts): element e is key key_row + 8 (e >> 1),
// query q_col + (e & 1). Score modifiers, P = exp2(S * scale_log2 - lse2), the mask, then
// dS = P (dP - delta) times the softcap's derivative. Dropout (docs/dropout.md): `keep`, the
// four bits of this fragment from Dropout::keep_bits (read with Dropout::bit); dP becomes
// dP Z / (1 - p) and the returned p, dV's operand, P Z / (1 - p). FOLDED: the caller staged
// lse2 - log2(1 / (1 - p)) and delta (1 - p) (Dropout::fold), so P here is
// already P / (1 - p) and dS = P' (dP Z - delta'): flags select, no multiplies.
template <bool FOLDED = false>
__device__ __forceinline__ void p_ds_fragment(float (&s)[4], const float (&dp)[4], float2 lse,
                                              float2 dl, int key_row, int q_col, bool masked,
                                              const MaskPolicy& mask, const ScoreMods& mods,
                                              float scale_log2, float (&p)[4], float (&ds)[4],
                                              unsigned int keep, const Dropout& drop) {
  const float dist0 = CF_ALIBI ? (float)(q_col + mods.off - key_row) : 0.f;  // e = 0
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int key = key_row + 8 * (e >> 1), qi = q_col + (e & 1);
    float th = 0.f;
    if (CF_SCORE_MODS) s[e] = mods.apply_at(s[e], dist0 + ((e & 1) - 8.f * (e >> 1)), th);
    p[e] = fast_exp2(fmaf(s[e], scale_log2, -((e & 1) ? lse.y : lse.x)));
    if (masked && !mask.visible(qi, key)) p[e] = 0.f;
    const bool kept = Dropout::bit(keep, 0, e);  // keep: fragment t's four bits, at t = 0
    const float dpz = FOLDED ? (kept ? dp[e] : 0.f) : drop.apply(kept, dp[e]);
    ds[e] = p[e] * (dpz - ((e & 1) ? dl.y : dl.x)) * softcap_grad(th);
    p[e] = FOLDED ? (kept ? p[e] : 0.f) : drop.apply(kept, p[e]);
  }
}

// The key-split layout's dK (times softmax_scale) and dV, this thread's rows key_row,
// key_row + 8, columns 8t + 2tig, +1: written to dk, dv (kv_splits = 1), or added into the
// float32 dk_accum, dv_accum (batch, seqlen_k, heads_kv, head_dim) that a split shares.
template <int DT>
__device__ __forceinline__ void store_dk_dv(const float (&acc_dk)[DT][4],
                                            const float (&acc_dv)[DT][4], int key_row, int tig,
                                            const SeqInfo& seq, int seqlen_k, int heads_kv,
                                            int kvh, int head_dim, int kv_splits,
                                            float* dk_accum, float* dv_accum, elem_t* dk,
                                            cf_i64 stride_dkb, cf_i64 stride_dkn,
                                            cf_i64 stride_dkh, elem_t* dv, cf_i64 stride_dvb,
                                            cf_i64 stride_dvn, cf_i64 stride_dvh,
                                            float softmax_scale) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int row = key_row + 8 * rr;
    if (row < seqlen_k && kv_splits > 1) {  // add this block's share into the accumulators
      const cf_i64 at = ((seq.row_k() + row) * heads_kv + kvh) * head_dim;
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        const int col = 8 * t + 2 * tig;
        if (col < head_dim) {
          red_add2(dk_accum + at + col, acc_dk[t][2 * rr] * softmax_scale,
                   acc_dk[t][2 * rr + 1] * softmax_scale);
          red_add2(dv_accum + at + col, acc_dv[t][2 * rr], acc_dv[t][2 * rr + 1]);
        }
      }
    } else if (row < seqlen_k) {
      elem_t* dk_row = dk + seq.k_offset(stride_dkb, stride_dkn) + kvh * stride_dkh +
                       (cf_i64)row * stride_dkn;
      elem_t* dv_row = dv + seq.k_offset(stride_dvb, stride_dvn) + kvh * stride_dvh +
                       (cf_i64)row * stride_dvn;
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        const int col = 8 * t + 2 * tig;
        if (col < head_dim) {
          *reinterpret_cast<cf_u32*>(dk_row + col) =
              pack2(acc_dk[t][2 * rr] * softmax_scale, acc_dk[t][2 * rr + 1] * softmax_scale);
          *reinterpret_cast<cf_u32*>(dv_row + col) =
              pack2(acc_dv[t][2 * rr], acc_dv[t][2 * rr + 1]);
        }
      }
    }
  }
}

// cf_seq.cuh -- where batch entry b's rows live: the sequence info every attention kernel
// (and the preprocess / convert) builds once, so dense and variable-length batches differ in
// this header only (docs/varlen.md is the spec; cuflash/varlen_cpu.py mirrors it).
//
// Compile-time knob (part of the spec's name: `_varlen`; docs/kernel_abi.md):
//   CF_VARLEN 0: dense. Batch entry b owns rows b * stride_b + i of q (k, v), i < seqlen_q
//                (seqlen_k); statistics (batch, heads, seqlen_q).
//             1: packed (FlashAttention-2's varlen layout). Entry b owns q rows
//                cu_seqlens_q[b] + i, i < cu_seqlens_q[b + 1] - cu_seqlens_q[b], and k, v rows
//                cu_seqlens_k[b] + j, j < seqused_k[b] if seqused_k is given, else
//                cu_seqlens_k[b + 1] - cu_seqlens_k[b]; statistics (heads, total_q). The
//                kernel's seqlen_q / seqlen_k arguments are the max lengths that size the grid;
//                tiles past a sequence's own length exit at once.
// With CF_VARLEN 0 every member is the dense expression of the kernels before this header
// (the pointer arguments are unused), so plain specs compile to the same code.
//
// Runtime arguments (every attention kernel takes them last, after its own and the modifiers'):
//   const int* cu_seqlens_q, const int* cu_seqlens_k   int32 (batch + 1,), CF_VARLEN
//   const int* seqused_k                              int32 (batch,) or null, CF_VARLEN
//   int total_q                                       rows of q (the statistics' head stride)
#pragma once
#include "cf_common.cuh"  // and cf_config.cuh: CF_VARLEN

#define CF_SEQ_PARAMS \
  const int *cu_seqlens_q, const int *cu_seqlens_k, const int *seqused_k, int total_q
#define CF_SEQ_ARGS cu_seqlens_q, cu_seqlens_k, seqused_k, total_q

// One batch entry: its lengths, the packed row of its row 0 and its statistics. The dense
// expressions are spelled exactly as the kernels had them (same code, same registers).
struct SeqInfo {
  int seqlen_q, seqlen_k;  // this sequence's own lengths (the mask aligns bottom-right on them)
  int b, heads;            // dense: the batch entry and the heads (statistics (b, h, row))
  int q_begin, k_begin;    // varlen: cu_seqlens_q[b], cu_seqlens_k[b]
  int total_q;             // varlen: the statistics' head stride

  // max_q, max_k: the kernel's seqlen arguments (dense: the lengths; varlen: the grid's).
  __device__ __forceinline__ SeqInfo(int b_, int heads_, int max_q, int max_k, CF_SEQ_PARAMS)
      : b(b_), heads(heads_), q_begin(0), k_begin(0), total_q(total_q) {
    if (CF_VARLEN) {
      q_begin = cu_seqlens_q[b];
      k_begin = cu_seqlens_k[b];
      seqlen_q = cu_seqlens_q[b + 1] - q_begin;
      seqlen_k = seqused_k ? seqused_k[b] : cu_seqlens_k[b + 1] - k_begin;
    } else {
      (void)cu_seqlens_q, (void)cu_seqlens_k, (void)seqused_k;
      seqlen_q = max_q;
      seqlen_k = max_k;
    }
  }
  // Index of (head h, row 0) in m, l, delta, lse2: (heads, total_q) or (batch, heads, seqlen_q).
  __device__ __forceinline__ cf_i64 stats(int h) const {
    return CF_VARLEN ? (cf_i64)h * total_q + q_begin : ((cf_i64)b * heads + h) * seqlen_q;
  }
  // Row 0 in a packed, contiguous (rows, heads, head_dim) array (dq_accum, dk_accum, dv_accum).
  __device__ __forceinline__ cf_i64 row_q() const {
    return CF_VARLEN ? (cf_i64)q_begin : (cf_i64)b * seqlen_q;
  }
  __device__ __forceinline__ cf_i64 row_k() const {
    return CF_VARLEN ? (cf_i64)k_begin : (cf_i64)b * seqlen_k;
  }
  // Element offset of row 0 of this entry in a q-side (o, dO, dq) or k-side (v, dk, dv)
  // operand with batch stride stride_b and row stride stride_m.
  __device__ __forceinline__ cf_i64 q_offset(long long stride_b, long long stride_m) const {
    return CF_VARLEN ? q_begin * stride_m : b * stride_b;
  }
  __device__ __forceinline__ cf_i64 k_offset(long long stride_b, long long stride_m) const {
    return CF_VARLEN ? k_begin * stride_m : b * stride_b;
  }
  // The 64 x 64 piece of a tiled dQ accumulator (bucket tile_d) holding this entry's query
  // row i, column c, head h (cf_common.cuh: dense and packed layouts).
  template <typename T>
  __device__ __forceinline__ T* dq_piece(T* accum, int h, int i, int c, int max_seqlen_q,
                                         int tile_d) const {
    return CF_VARLEN ? dq_tile_piece_packed(accum, q_begin, b, h, i, c, heads, tile_d)
                     : dq_tile_piece(accum, b, h, i, c, heads, max_seqlen_q, tile_d);
  }
};

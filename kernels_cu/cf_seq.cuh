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
#include "cf_common.cuh"

#ifndef CF_VARLEN
#define CF_VARLEN 0
#endif

#define CF_SEQ_PARAMS \
  const int *cu_seqlens_q, const int *cu_seqlens_k, const int *seqused_k, int total_q
#define CF_SEQ_ARGS cu_seqlens_q, cu_seqlens_k, seqused_k, total_q

// One batch entry: its lengths, the packed row of its row 0 and its statistics.
struct SeqInfo {
  int seqlen_q, seqlen_k;  // this sequence's own lengths (the mask aligns bottom-right on them)
  cf_i64 row_q, row_k;     // row 0 in a packed (rows, heads, head_dim) array: dense b * seqlen
  cf_i64 stats0;           // index of (head 0, row 0) in m, l, delta, lse2
  int stats_h;             // ... and the step from one head to the next

  // max_q, max_k: the kernel's seqlen arguments (dense: the lengths; varlen: the grid's).
  __device__ __forceinline__ SeqInfo(int b, int heads, int max_q, int max_k, CF_SEQ_PARAMS) {
    if (CF_VARLEN) {
      const int q_begin = cu_seqlens_q[b], k_begin = cu_seqlens_k[b];
      seqlen_q = cu_seqlens_q[b + 1] - q_begin;
      seqlen_k = seqused_k ? seqused_k[b] : cu_seqlens_k[b + 1] - k_begin;
      row_q = q_begin;
      row_k = k_begin;
      stats0 = q_begin;  // (heads, total_q)
      stats_h = total_q;
    } else {
      (void)cu_seqlens_q, (void)cu_seqlens_k, (void)seqused_k, (void)total_q;
      seqlen_q = max_q;
      seqlen_k = max_k;
      row_q = (cf_i64)b * max_q;
      row_k = (cf_i64)b * max_k;
      stats0 = (cf_i64)b * heads * max_q;  // (batch, heads, seqlen_q)
      stats_h = max_q;
    }
  }
  // Index of (head h, row 0) in m, l, delta, lse2.
  __device__ __forceinline__ cf_i64 stats(int h) const { return stats0 + (cf_i64)h * stats_h; }
  // Element offset of row 0 of this entry in a q-side (o, dO, dq) or k-side (v, dk, dv)
  // operand with batch stride stride_b and row stride stride_m.
  __device__ __forceinline__ cf_i64 q_offset(int b, long long stride_b,
                                             long long stride_m) const {
    return CF_VARLEN ? row_q * stride_m : (cf_i64)b * stride_b;
  }
  __device__ __forceinline__ cf_i64 k_offset(int b, long long stride_b,
                                             long long stride_m) const {
    return CF_VARLEN ? row_k * stride_m : (cf_i64)b * stride_b;
  }
};

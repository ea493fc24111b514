// cf_bwd_stream.cuh -- the tile streams of the fp16/bf16 backward kernels: which tile an
// iteration loads, into which stage, and the barriers that hand the stages over.
//
// Each backward block keeps one pair of tiles resident (K, V in flash_bwd.cu and
// flash_bwd_split.cu; Q, dO in flash_bwd_dq.cu) and streams the other side through CF_STAGES
// (1 or 2) shared-memory stages with cp.async, one cp.async group per tile:
//   prologue: the resident pair and streamed tile 0 in one group;
//   iteration it: stream_top (wait for tile it, barrier, issue tile it + 1 into the other
//   stage when there are two), compute, stream_refill (one stage: barrier, then tile it + 1
//   into stage 0 once every warp is done reading it).
// Invariant: at the top of iteration `it` the only group in flight holds tile `it`; the barrier
// after the wait both publishes it and guarantees that every warp is done with iteration it-1.
//
// For the dK/dV kernels (a block of keys against the query tiles that can see it) the header
// also owns which query tile iteration `it` is (QueryTileWalk: heads of the GQA group x query
// tiles) and the loads of both sides (load_key_block: resident K, V; load_query_stage: Q, dO,
// lse2, delta of one query tile). Address arithmetic is spelled as the kernels had it, in the
// same order, so moving it here left every cubin bit-identical.
#pragma once

#include "cf_bwd.cuh"
#include "cf_mask.cuh"
#include "cf_seq.cuh"

// -- the pipeline ---------------------------------------------------------------------------------
// `load(it, st)` issues the copies of tile `it` into stage `st` (and commits nothing).
// Returns the stage that holds tile `it`.
template <int STAGES, class Load>
__device__ __forceinline__ int stream_top(int it, int n_tiles, Load& load) {
  cp_async_wait<0>();
  __syncthreads();
  if (STAGES == 2 && it + 1 < n_tiles) {
    load(it + 1, (it + 1) & 1);
    cp_async_commit();
  }
  return STAGES == 2 ? (it & 1) : 0;
}

// After the last read of the stage in iteration `it` (one stage only; two refill in stream_top).
template <int STAGES, class Load>
__device__ __forceinline__ void stream_refill(int it, int n_tiles, Load& load) {
  if (STAGES == 1) {
    __syncthreads();  // every warp is done with stage 0
    if (it + 1 < n_tiles) {
      load(it + 1, 0);
      cp_async_commit();
    }
  }
}

// -- the query tiles a key block visits (the dK/dV kernels) ---------------------------------------
// Iteration it = g * per_head + t: query head kvh * heads_per_kv + g of the block's GQA group
// (GQA by index mapping: the dK / dV sums stay on chip), query tile first + t of those that can
// see keys n0 .. n_last (cf_mask.cuh's query_tiles).
template <int BM>
struct QueryTileWalk {
  int first, per_head, n_iter, kvh, heads_per_kv;

  __device__ __forceinline__ QueryTileWalk(const MaskPolicy& mask, int n0, int n_last, int kvh_,
                                           int heads_per_kv_) {
    const QueryTiles qt = query_tiles<BM>(mask, n0, n_last);
    first = qt.first;
    per_head = qt.end - qt.first;
    kvh = kvh_;
    heads_per_kv = heads_per_kv_;
    n_iter = heads_per_kv * per_head;
  }
  // iteration it's query head and the first row of its tile
  __device__ __forceinline__ void tile(int it, int& m0, int& h) const {
    const int g = it / per_head;
    m0 = (first + it - g * per_head) * BM;
    h = kvh * heads_per_kv + g;
  }
};

// -- the resident key block (the dK/dV kernels) ---------------------------------------------------
// The key side of a dK/dV kernel's parameters: k, v (batch, seqlen_k, heads_kv, head_dim).
struct KeyOperands {
  const elem_t* k;
  const elem_t* v;
  long long stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh;
};

// K and V rows n0 .. n0 + BN - 1 of kv head kvh (rows past seqlen_k zero-filled) into sK / sV.
// NT threads; commits nothing.
template <int BN, int NT>
__device__ __forceinline__ void load_key_block(const KeyOperands& g, const SeqInfo& seq, int kvh,
                                               int n0, elem_t* sK, elem_t* sV, int head_dim,
                                               int tid) {
  load_tile_async<BN, NT>(sK, g.k + seq.k_offset(g.stride_kb, g.stride_kn) +
                                  kvh * g.stride_kh + n0 * g.stride_kn,
                          g.stride_kn, seq.seqlen_k - n0, head_dim, tid);
  load_tile_async<BN, NT>(sV, g.v + seq.k_offset(g.stride_vb, g.stride_vn) +
                                  kvh * g.stride_vh + n0 * g.stride_vn,
                          g.stride_vn, seq.seqlen_k - n0, head_dim, tid);
}

// -- one query tile into a stage (the dK/dV kernels) ----------------------------------------------
// The query side of a dK/dV kernel's parameters: q, dout (batch, seqlen_q, heads, head_dim),
// lse2 and delta (cf_seq.cuh's statistics layout).
struct QueryOperands {
  const elem_t* q;
  const elem_t* dout;
  const float* lse2;
  const float* delta;
  long long stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh;
};

// Q and dO rows m0 .. m0 + BM - 1 of query head h (rows past seqlen_q zero-filled) into stage
// st of sQ / sdO, and their lse2 and delta into stage st of sLse / sDelta: +inf and 0 past
// seqlen_q, so those rows' P and dS are exactly 0. NT threads; commits nothing. (The addresses
// are formed in the order the kernels always had: the same code, the same registers.)
template <int BM, int NT>
__device__ __forceinline__ void load_query_stage(const QueryOperands& g, const SeqInfo& seq,
                                                 int h, int m0, elem_t* sQ, elem_t* sdO,
                                                 float* sLse, float* sDelta, int st,
                                                 int head_dim, int tid) {
  const int seqlen_q = seq.seqlen_q;
  load_tile_async<BM, NT>(sQ + st * BM * CF_HEAD_DIM,
                          g.q + seq.q_offset(g.stride_qb, g.stride_qm) + h * g.stride_qh +
                              m0 * g.stride_qm,
                          g.stride_qm, seqlen_q - m0, head_dim, tid);
  load_tile_async<BM, NT>(sdO + st * BM * CF_HEAD_DIM,
                          g.dout + seq.q_offset(g.stride_dob, g.stride_dom) + h * g.stride_doh +
                              m0 * g.stride_dom,
                          g.stride_dom, seqlen_q - m0, head_dim, tid);
  const cf_i64 stat = seq.stats(h) + m0;
  for (int i = tid; i < BM; i += NT) {
    if (m0 + i < seqlen_q) {
      cp_async_4(sLse + st * BM + i, g.lse2 + stat + i);
      cp_async_4(sDelta + st * BM + i, g.delta + stat + i);
    } else {
      sLse[st * BM + i] = CF_INF;
      sDelta[st * BM + i] = 0.f;
    }
  }
}

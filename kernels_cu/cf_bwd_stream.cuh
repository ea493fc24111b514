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
// tiles), the loads of both sides (load_key_block: resident K, V; load_query_stage: Q, dO,
// lse2, delta of one query tile), the shared-memory layout (KeyBlockSmem), the walk through
// the stages (QueryStream) and the dK, dV stores (store_dk_dv): each kernel keeps only its
// mainloop. Address arithmetic is spelled as the kernels had it, in the same order, so moving
// it here left every cubin bit-identical.
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
// (GQA by index mapping: the dK / dV sums stay on chip), query tile qt.first + t of those that
// see the block's keys (cf_mask.cuh's query_tiles_of).
template <int BM>
struct QueryTileWalk {
  int first, per_head, n_iter, kvh, heads_per_kv;
  // Under a block mask (CF_BLOCK_SPARSE) iteration it is the it-th kept pair of the walk
  // (cf_mask.cuh's KeptSteps: callers ask for it or it + 1, as the streams below do).
  KeptSteps<KeptQueryTiles<BM>> steps;

  __device__ __forceinline__ QueryTileWalk(const QueryTiles& qt, int kvh_, int heads_per_kv_,
                                           const BlockMask& bm, int b, int n0)
      : steps(KeptQueryTiles<BM>(bm, b, kvh_ * heads_per_kv_, n0, qt, heads_per_kv_), 0) {
    first = qt.first;
    per_head = qt.end - qt.first;
    kvh = kvh_;
    heads_per_kv = heads_per_kv_;
    n_iter = CF_BLOCK_SPARSE ? steps.kept.count() : heads_per_kv * per_head;
  }
  // iteration it's query head and the first row of its tile
  __device__ __forceinline__ void tile(int it, int& m0, int& h) const {
    const int t = steps(it);
    const int g = t / per_head;
    m0 = (first + t - g * per_head) * BM;
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
// ... from the kernel's parameters (CF_BWD_PARAMS), as CF_MOD_ARGS / CF_SEQ_ARGS
#define CF_BWD_KEY_ARGS \
  KeyOperands{k, v, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh}

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
#define CF_BWD_QUERY_ARGS                                                                 \
  QueryOperands{q, dout, lse2, delta, stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, \
                stride_doh}

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

// -- a dK/dV kernel's shared memory ---------------------------------------------------------------
// In this order: sK, sV (BN x D each, resident); sQ, sdO (STAGES x BM x D each, streamed); NS
// tiles of BN x BM (the score tiles of the current query tile: dS^T, after P^T when NS = 2);
// sLse, sDelta (STAGES x BM floats each). kBytes is the kernel header's SMEM formula, checked
// against the launch's dynamic shared memory.
template <int BM, int BN, int STAGES, int NS>
struct KeyBlockSmem {
  enum : int {
    kBytes = (2 * BN * CF_HEAD_DIM + 2 * STAGES * BM * CF_HEAD_DIM + NS * BN * BM) * 2 +
             2 * STAGES * BM * 4,
  };
  elem_t *sK, *sV, *sQ, *sdO, *sS;
  float *sLse, *sDelta;

  __device__ __forceinline__ explicit KeyBlockSmem(unsigned char* base)
      : sK(reinterpret_cast<elem_t*>(base)),
        sV(sK + BN * CF_HEAD_DIM),
        sQ(sV + BN * CF_HEAD_DIM),
        sdO(sQ + STAGES * BM * CF_HEAD_DIM),
        sS(sdO + STAGES * BM * CF_HEAD_DIM),
        sLse(reinterpret_cast<float*>(sS + NS * BN * BM)),
        sDelta(sLse + STAGES * BM) {
    CF_REQUIRE_SMEM(kBytes);
  }
};

// -- the query side of a dK/dV kernel: the walk through the stages --------------------------------
// Iteration it's tile in its stage: query head h, first row m0, and the stage's Q, dO, lse2, delta.
struct QueryStage {
  int m0, h;
  const elem_t* q;
  const elem_t* dout;
  const float* lse;
  const float* delta;
};

// The tiles of `walk` streamed through the stages of `sm`: begin() issues the prologue group,
// top(it) / refill(it) are stream_top / stream_refill, and (it, st) issues iteration it's
// copies into stage st. It holds references, as the lambda it replaced did: holding copies of
// the walk and the operands changed 14 split-layout cubins.
template <int BM, int BN, int NT, int STAGES, class Smem>
struct QueryStream {
  const QueryTileWalk<BM>& walk;
  const QueryOperands& g;
  const SeqInfo& seq;
  const Smem& sm;
  int head_dim, tid;

  __device__ __forceinline__ QueryStream(const QueryTileWalk<BM>& walk_, const QueryOperands& g_,
                                         const SeqInfo& seq_, const Smem& sm_, int head_dim_,
                                         int tid_)
      : walk(walk_),
        g(g_),
        seq(seq_),
        sm(sm_),
        head_dim(head_dim_),
        tid(tid_) {}

  __device__ __forceinline__ void operator()(int it, int st) const {
    int m0, h;
    walk.tile(it, m0, h);
    load_query_stage<BM, NT>(g, seq, h, m0, sm.sQ, sm.sdO, sm.sLse, sm.sDelta, st, head_dim, tid);
  }
  // The prologue: K, V rows n0.. of kv head kvh (resident) and query tile 0 in one cp.async
  // group; nothing when no query tile sees the block.
  __device__ __forceinline__ void begin(const KeyOperands& kops, int kvh, int n0) const {
    if (walk.n_iter > 0) {
      load_key_block<BN, NT>(kops, seq, kvh, n0, sm.sK, sm.sV, head_dim, tid);
      (*this)(0, 0);
      cp_async_commit();
    }
  }
  __device__ __forceinline__ QueryStage top(int it) const {
    const int st = stream_top<STAGES>(it, walk.n_iter, *this);
    QueryStage t;
    walk.tile(it, t.m0, t.h);
    t.q = sm.sQ + st * BM * CF_HEAD_DIM;
    t.dout = sm.sdO + st * BM * CF_HEAD_DIM;
    t.lse = sm.sLse + st * BM;
    t.delta = sm.sDelta + st * BM;
    return t;
  }
  __device__ __forceinline__ void refill(int it) const {
    stream_refill<STAGES>(it, walk.n_iter, *this);
  }
};

// -- the key side's outputs -----------------------------------------------------------------------
// dk, dv (batch, seqlen_k, heads_kv, head_dim).
struct KeyGrads {
  elem_t* dk;
  elem_t* dv;
  long long stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh;
};
#define CF_BWD_GRAD_ARGS \
  KeyGrads{dk, dv, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh}

// dK = acc_dk * softmax_scale, dV = acc_dv of one warp's 16 keys row0.. x columns col0..
// of kv head kvh (rows < seqlen_k, columns < head_dim).
template <int N>
__device__ __forceinline__ void store_dk_dv(const KeyGrads& g, const SeqInfo& seq, int kvh,
                                            const float (&acc_dk)[N][4],
                                            const float (&acc_dv)[N][4], float softmax_scale,
                                            int row0, int col0, int head_dim, int lane) {
  store_acc(g.dk + seq.k_offset(g.stride_dkb, g.stride_dkn) + kvh * g.stride_dkh, g.stride_dkn,
            acc_dk, softmax_scale, row0, seq.seqlen_k, col0, head_dim, lane);
  store_acc(g.dv + seq.k_offset(g.stride_dvb, g.stride_dvn) + kvh * g.stride_dvh, g.stride_dvn,
            acc_dv, 1.f, row0, seq.seqlen_k, col0, head_dim, lane);
}

// cf_params.cuh -- the attention entry points' parameter lists, one definition each
// (docs/kernel_abi.md). cuflash/launch.py's _SIGNATURES packs the same parameters in the same
// order, letter by letter; tests/test_plan.py reads these macros to check that they agree.
// Every entry then takes CF_MOD_PARAMS (cf_mask.cuh) and CF_SEQ_PARAMS (cf_seq.cuh).
#pragma once

// The forward: q, k, v in, o and the float32 statistics (batch, heads, seqlen_q) out.
// R: __restrict__ or nothing, as each kernel was built and measured (it changes the code).
#define CF_FWD_PARAMS(R)                                                                  \
  const elem_t* R q, const elem_t* R k, const elem_t* R v, elem_t* R o, float* R m_out,   \
      float* R l_out, int max_seqlen_q, int max_seqlen_k, int heads, int heads_per_kv,      \
      int head_dim, long long stride_qb, long long stride_qm, long long stride_qh,          \
      long long stride_kb, long long stride_kn, long long stride_kh, long long stride_vb,   \
      long long stride_vn, long long stride_vh, long long stride_ob, long long stride_om,   \
      long long stride_oh, float scale_log2

// The backward's dK, dV pass (and dQ by atomics into dq_accum): the preprocess's lse2 and
// delta in, dk and dv out.
#define CF_BWD_PARAMS                                                                       \
  const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v, \
      const elem_t* __restrict__ dout, const float* __restrict__ lse2,                      \
      const float* __restrict__ delta, float* __restrict__ dq_accum,                        \
      elem_t* __restrict__ dk, elem_t* __restrict__ dv, int max_seqlen_q,                   \
      int max_seqlen_k, int heads, int heads_per_kv, int head_dim, long long stride_qb,     \
      long long stride_qm, long long stride_qh, long long stride_kb, long long stride_kn,   \
      long long stride_kh, long long stride_vb, long long stride_vn, long long stride_vh,   \
      long long stride_dob, long long stride_dom, long long stride_doh,                     \
      long long stride_dkb, long long stride_dkn, long long stride_dkh,                     \
      long long stride_dvb, long long stride_dvn, long long stride_dvh, float scale_log2,   \
      float softmax_scale

// The deterministic backward's dQ pass (no atomics): dq out.
#define CF_BWD_DQ_PARAMS                                                                    \
  const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v, \
      const elem_t* __restrict__ dout, const float* __restrict__ lse2,                      \
      const float* __restrict__ delta, elem_t* __restrict__ dq, int max_seqlen_q,           \
      int max_seqlen_k, int heads, int heads_per_kv, int head_dim, long long stride_qb,     \
      long long stride_qm, long long stride_qh, long long stride_kb, long long stride_kn,   \
      long long stride_kh, long long stride_vb, long long stride_vn, long long stride_vh,   \
      long long stride_dob, long long stride_dom, long long stride_doh,                     \
      long long stride_dqb, long long stride_dqm, long long stride_dqh, float scale_log2,   \
      float softmax_scale

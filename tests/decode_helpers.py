"""Shared pieces of the decode tests (CPU and GPU): drawn problems, the float64 truth per
batch entry, and FlashAttention's acceptance rule ``err <= 2 * err(naive same dtype) + atol``.

Nothing here touches a GPU at import time.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from cuflash import reference

NP_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float32": np.dtype(np.float32)}
# The rule's atol: reference.default_atol plus a slack of ULP_SLACK epsilons at the output's
# magnitude, the values and the reasons of tests/gpu_helpers.py (ULP_SLACK): a max over few
# elements sometimes finds the naive result lucky.
ULP_SLACK = {"float32": 64.0, "float16": 0.5, "bfloat16": 0.5}
# lse is a float32 function of the scores (never rounded to 16 bits on the way), compared
# directly with the float64 truth: |got - ref| <= rtol * max(1, |ref|); -inf must match.
LSE_RTOL = {"float16": 1e-3, "bfloat16": 1e-3, "float32": 1e-4}


@st.composite
def decode_cases(draw, max_cache: int = 300, head_dims=(8, 16, 40, 64, 72, 128, 136, 256)):
    """A decode problem: shapes, lengths (zeros and lengths that are multiples of nothing),
    flags, dtype, num_splits and a seed for fresh data."""
    batch = draw(st.integers(1, 3))
    seqlen_cache = draw(st.integers(0, max_cache))
    lens = draw(st.one_of(st.none(), st.lists(st.integers(0, seqlen_cache), min_size=batch,
                                              max_size=batch)))
    heads_kv = draw(st.integers(1, 3))
    return dict(batch=batch, q_len=draw(st.integers(1, 8)), heads_kv=heads_kv,
                heads=heads_kv * draw(st.sampled_from([1, 2, 3, 4, 8])),
                head_dim=draw(st.sampled_from(head_dims)), seqlen_cache=seqlen_cache,
                cache_seqlens=lens, causal=draw(st.booleans()),
                dtype=draw(st.sampled_from(sorted(NP_DTYPES))),
                num_splits=draw(st.sampled_from([None, 0, 1, 2, 3, 7, 64])),
                softmax_scale=draw(st.sampled_from([None, 0.3, 1.0])),
                seed=draw(st.integers(0, 2**32 - 1)))


def make_inputs(case: dict):
    """Host (q, k_cache, v_cache, cache_seqlens or None), standard normal in the dtype."""
    rng = np.random.default_rng(case["seed"])
    dt = NP_DTYPES[case["dtype"]]
    b, d = case["batch"], case["head_dim"]
    q = rng.standard_normal((b, case["q_len"], case["heads"], d), np.float32).astype(dt)
    kv_shape = (b, case["seqlen_cache"], case["heads_kv"], d)
    k = rng.standard_normal(kv_shape, np.float32).astype(dt)
    v = rng.standard_normal(kv_shape, np.float32).astype(dt)
    lens = case["cache_seqlens"]
    return q, k, v, None if lens is None else np.asarray(lens, np.int32)


def references(q, k, v, lens, *, causal: bool, softmax_scale, dtype: str):
    """(o truth float64, lse truth float64 (batch, heads, q_len), o naive in dtype), each
    entry b against its own valid keys k[b, :lens[b]] (bottom-right causal within them)."""
    kw = dict(causal=causal, softmax_scale=softmax_scale)
    outs, lses, naives = [], [], []
    for b in range(q.shape[0]):
        n = k.shape[1] if lens is None else int(lens[b])
        qb, kb, vb = q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n]
        o, m, l = reference.attention_reference(qb, kb, vb, **kw)
        with np.errstate(divide="ignore"):
            lses.append(np.where(l == 0, -np.inf, m + np.log(np.where(l == 0, 1, l))))
        outs.append(o)
        naives.append(reference.attention_naive(qb, kb, vb, dtype=NP_DTYPES[dtype], **kw))
    return np.concatenate(outs), np.concatenate(lses), np.concatenate(naives)


def assert_decode_matches(o, lse, q, k, v, lens, *, causal: bool, softmax_scale, dtype: str,
                          label: str) -> None:
    """o by the rule, lse by LSE_RTOL, against the float64 truth (host arrays)."""
    o_ref, lse_ref, o_naive = references(q, k, v, lens, causal=causal,
                                         softmax_scale=softmax_scale, dtype=dtype)
    o = np.asarray(o)
    assert o.shape == o_ref.shape and o.dtype == NP_DTYPES[dtype], (o.shape, o.dtype, label)
    magnitude = float(np.abs(o_ref).max()) if o_ref.size else 0.0
    eps = float(ml_dtypes.finfo(NP_DTYPES[dtype]).eps)
    atol = reference.default_atol(NP_DTYPES[dtype]) + ULP_SLACK[dtype] * eps * max(1.0, magnitude)
    report = reference.compare("o", o, o_ref, o_naive, atol=atol)
    assert report.ok, f"{report} [{label}; atol {atol:.3g}]"
    lse = np.asarray(lse, dtype=np.float64)
    assert lse.shape == lse_ref.shape, (lse.shape, lse_ref.shape, label)
    assert not np.isnan(lse).any(), f"lse: NaN [{label}]"
    same = lse == lse_ref
    with np.errstate(invalid="ignore"):
        rel = np.where(same, 0.0, np.abs(lse - lse_ref) / np.maximum(1.0, np.abs(lse_ref)))
    err = float(np.nan_to_num(rel, nan=math.inf).max()) if rel.size else 0.0
    assert err <= LSE_RTOL[dtype], f"lse: relative err {err:.3g} vs {LSE_RTOL[dtype]} [{label}]"


def describe(case: dict) -> str:
    c = case
    return (f"{c['dtype']} b{c['batch']} q_len{c['q_len']} h{c['heads']}/{c['heads_kv']} "
            f"d{c['head_dim']} cache{c['seqlen_cache']} lens={c['cache_seqlens']} "
            f"causal={c['causal']} splits={c['num_splits']} scale={c['softmax_scale']}")


# -- host <-> device (imported lazily; nothing here runs on a CPU-only machine) ----------------


def to_device(a: np.ndarray, framework: str = "cupy"):
    """A host array (bf16 included) as a CUDA cupy array or torch tensor."""
    a = np.ascontiguousarray(a)
    if framework == "torch":
        import torch

        if a.dtype == NP_DTYPES["bfloat16"]:  # torch.from_numpy does not know ml_dtypes
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).cuda()
        return torch.from_numpy(a).cuda()
    import cupy

    try:
        return cupy.asarray(a)
    except Exception:  # a CuPy without ml_dtypes.bfloat16: through torch and DLPack
        return cupy.from_dlpack(to_device(a, "torch"))


def to_host(x) -> np.ndarray:
    root = type(x).__module__.split(".")[0]
    if root == "torch":
        import torch

        t = x.detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).cpu().numpy().view(NP_DTYPES["bfloat16"])
        return t.cpu().numpy()
    if root == "cupy":
        import cupy

        try:
            return cupy.asnumpy(x)
        except Exception:
            return cupy.asnumpy(x.view(cupy.uint16)).view(NP_DTYPES["bfloat16"])
    return np.asarray(x)

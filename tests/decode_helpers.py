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


def references(q, k, v, lens, *, causal: bool, softmax_scale, dtype: str, window=None,
               softcap=None, alibi_slopes=None):
    """(o truth float64, lse truth float64 (batch, heads, q_len), o naive in dtype), each
    entry b against its own valid keys k[b, :lens[b]] (bottom-right causal within them;
    window, softcap and ALiBi as docs/masks.md with that entry's offset)."""
    outs, lses, naives = [], [], []
    for b in range(q.shape[0]):
        n = k.shape[1] if lens is None else int(lens[b])
        slopes = None if alibi_slopes is None else np.asarray(alibi_slopes)
        slopes = slopes[b] if slopes is not None and slopes.ndim == 2 else slopes
        kw = dict(causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap,
                  alibi_slopes=slopes)
        qb, kb, vb = q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n]
        o, m, l = reference.attention_reference(qb, kb, vb, **kw)
        with np.errstate(divide="ignore"):
            lses.append(np.where(l == 0, -np.inf, m + np.log(np.where(l == 0, 1, l))))
        outs.append(o)
        naives.append(reference.attention_naive(qb, kb, vb, dtype=NP_DTYPES[dtype], **kw))
    return np.concatenate(outs), np.concatenate(lses), np.concatenate(naives)


def assert_decode_matches(o, lse, q, k, v, lens, *, causal: bool, softmax_scale, dtype: str,
                          label: str, **modifiers) -> None:
    """o by the rule, lse by LSE_RTOL, against the float64 truth (host arrays). ``k``, ``v``:
    each entry's logical cache (after any append, pages gathered); ``modifiers``: window,
    softcap, alibi_slopes."""
    o_ref, lse_ref, o_naive = references(q, k, v, lens, causal=causal,
                                         softmax_scale=softmax_scale, dtype=dtype, **modifiers)
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


# -- paged caches, appends and score modifiers -----------------------------------------------


@st.composite
def kvcache_cases(draw, max_cache: int = 200, head_dims=(8, 16, 64, 72, 128)):
    """A decode_cases problem plus, each drawn independently: a paged cache (page size a
    multiple of 16), an append of 1-4 keys, a window, a softcap, ALiBi slopes."""
    case = draw(decode_cases(max_cache=max_cache, head_dims=head_dims))
    case["page_size"] = draw(st.sampled_from([None, 16, 32, 48, 64]))
    case["seqlen_new"] = draw(st.sampled_from([0, 0, 1, 2, 4]))
    if case["seqlen_new"]:  # the appended keys must fit after every entry's length
        room = case["seqlen_cache"] - case["seqlen_new"]
        if room < 0:
            case["seqlen_new"] = 0
        else:
            case["cache_seqlens"] = draw(st.lists(st.integers(0, room), min_size=case["batch"],
                                                  max_size=case["batch"]))
    side = st.sampled_from([-1, 0, 1, 3, 17, 100])
    case["window"] = draw(st.one_of(st.none(), st.tuples(side, side)))
    case["softcap"] = draw(st.sampled_from([None, None, 0.7, 5.0, 30.0]))
    case["alibi"] = draw(st.sampled_from([None, None, "heads", "batch_heads"]))
    return case


def make_kvcache_inputs(case: dict):
    """(kwargs for attention_with_kvcache, truth): host arrays in the dtype. truth holds the
    logical caches each entry should attend to (the append done, pages gathered) and their
    lengths, and the modifiers for the reference."""
    q, k, v, lens = make_inputs(case)
    rng = np.random.default_rng(case["seed"] + 1)
    dt = NP_DTYPES[case["dtype"]]
    b, hk, d, n = case["batch"], case["heads_kv"], case["head_dim"], case.get("seqlen_new", 0)
    kw = dict(q=q, cache_seqlens=lens)
    truth_k, truth_v, truth_lens = k.copy(), v.copy(), lens
    if n:
        k_new = rng.standard_normal((b, n, hk, d), np.float32).astype(dt)
        v_new = rng.standard_normal((b, n, hk, d), np.float32).astype(dt)
        kw.update(k_new=k_new, v_new=v_new)
        for i in range(b):
            truth_k[i, lens[i]:lens[i] + n], truth_v[i, lens[i]:lens[i] + n] = k_new[i], v_new[i]
        truth_lens = lens + n
    page = case.get("page_size")
    if page:
        kw["k_cache"], kw["v_cache"], kw["block_table"] = paged(k, v, page, rng)
        cap = kw["block_table"].shape[1] * page  # seqlen_cache grows to whole pages
        if truth_lens is None:  # every entry full: its length is the old seqlen_cache
            kw["cache_seqlens"] = truth_lens = np.full(b, k.shape[1], np.int32)
        pad = ((0, 0), (0, cap - k.shape[1]), (0, 0), (0, 0))
        truth_k, truth_v = np.pad(truth_k, pad), np.pad(truth_v, pad)
    else:
        kw["k_cache"], kw["v_cache"] = k, v
    mods = dict(window=case.get("window"), softcap=case.get("softcap"))
    alibi = case.get("alibi")
    if alibi:
        shape = (case["heads"],) if alibi == "heads" else (b, case["heads"])
        mods["alibi_slopes"] = rng.uniform(0, 1, shape).astype(np.float32)
    kw.update(mods)
    return kw, dict(k=truth_k, v=truth_v, lens=truth_lens, **mods)


def paged(k, v, page_size: int, rng):
    """A contiguous (batch, seqlen, h, d) cache as shuffled pages: (k_pages, v_pages,
    block_table) with one unused page, so page ids are not the identity."""
    b, seqlen, h, d = k.shape
    max_pages = max(1, -(-seqlen // page_size))
    num_pages = b * max_pages + 1
    order = rng.permutation(num_pages)[:b * max_pages]
    table = order.reshape(b, max_pages).astype(np.int32)
    pad = ((0, 0), (0, max_pages * page_size - seqlen), (0, 0), (0, 0))
    k_pages = rng.standard_normal((num_pages, page_size, h, d), np.float32).astype(k.dtype)
    v_pages = rng.standard_normal((num_pages, page_size, h, d), np.float32).astype(k.dtype)
    k_pages[table.ravel()] = np.pad(k, pad).reshape(b * max_pages, page_size, h, d)
    v_pages[table.ravel()] = np.pad(v, pad).reshape(b * max_pages, page_size, h, d)
    return k_pages, v_pages, table


def describe(case: dict) -> str:
    c = case
    return (f"{c['dtype']} b{c['batch']} q_len{c['q_len']} h{c['heads']}/{c['heads_kv']} "
            f"d{c['head_dim']} cache{c['seqlen_cache']} lens={c['cache_seqlens']} "
            f"causal={c['causal']} splits={c['num_splits']} scale={c['softmax_scale']}"
            + "".join(f" {name}={c[name]}" for name in ("page_size", "seqlen_new", "window",
                                                        "softcap", "alibi") if c.get(name)))


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


def logical(cache, block_table):
    """A cache as (batch, positions, h, d): paged ones gathered through the table."""
    if block_table is None:
        return cache
    b, pages = block_table.shape
    return cache[block_table].reshape(b, pages * cache.shape[1], *cache.shape[2:])

"""Dropout in variable-length attention (docs/dropout.md, docs/varlen.md) on the CPU path:
sequence b's element (h, i, j) is dropped as element (b, h, i, j) of a dense call, i and j
counted within the sequence.

* Forward and backward against the float64 reference (each sequence's mask drawn for its
  batch index), hypothesis-drawn layouts: empty sequences, sequences without keys,
  seqused_k, GQA, causal, every dtype.
* Equal lengths give the dense API's o and gradients (the same mask, batch entry for
  sequence); the backward refuses another mask; bad values raise naming the argument.
CUDA: tests/test_gpu_varlen.py's dropout cases.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import reference, testing
from test_varlen import DTYPES, Case, sequences

SEED = st.integers(0, 2**64 - 1)


def _drop(p, seed, offset) -> dict:
    return dict(dropout_p=p, dropout_seed=seed, dropout_offset=offset)


def check(case: Case, drop: dict):
    q, k, v, do, mods = case.inputs()
    args, kw = case.call_args()
    o, stats = cuflash.attention_varlen_forward(q, k, v, *args, **kw, **mods, **drop)
    ref_args, ref_kw = case.ref_kwargs()
    o_ref = reference.attention_varlen_reference(q, k, v, *ref_args, **ref_kw, **mods,
                                                 **drop)[0]
    o_nv = reference.attention_varlen_naive(q, k, v, *ref_args, **ref_kw, **mods, **drop,
                                            dtype=case.dtype)
    name = np.dtype(case.dtype).name
    report = testing.judge("o", o, o_ref, o_nv, dtype=name)
    assert report.ok, str(report)
    grads = cuflash.attention_varlen_backward(do, q, k, v, o, stats, *args, **kw, **mods,
                                              **drop)
    refs = reference.attention_varlen_backward_reference(do, q, k, v, *ref_args, **ref_kw,
                                                         **mods, **drop, o=o)
    naives = reference.attention_varlen_backward_naive(do, q, k, v, *ref_args, **ref_kw,
                                                       **mods, **drop, dtype=case.dtype)
    scale = testing.magnitude(*refs[:3])
    for nm, got, ref, naive in zip(("dq", "dk", "dv"), grads, refs, naives):
        report = testing.judge(nm, got, ref, naive, dtype=name, scale=scale)
        assert report.ok, str(report)
    return o, grads


@settings(deadline=None, max_examples=60)
@given(lengths=sequences(), heads_kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]),
       head_dim=st.sampled_from([8, 16, 40]), causal=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1),
       p=st.floats(0.05, 0.9), drop_seed=SEED, offset=st.integers(0, 2**32 - 1))
def test_forward_and_backward_match_the_reference(lengths, heads_kv, group, head_dim, causal,
                                                  dtype, seed, p, drop_seed, offset):
    case = Case(lengths, heads_kv, group, head_dim, causal, head_dim ** -0.5, dtype, seed)
    check(case, _drop(p, drop_seed, offset))


def test_with_modifiers_and_seqused_k():
    case = Case(((37, 53, 40), (0, 9, None), (20, 20, None)), 2, 2, 32, True, 0.2,
                DTYPES[0], 5, window=(11, 3), softcap=3.0, alibi="batch", sinks=False)
    check(case, _drop(0.25, 2**63 + 17, 3))


def test_equal_lengths_give_the_dense_calls_mask():
    """Three sequences of one length are the dense batch of three: the same o and
    gradients (sequence b draws batch entry b's mask)."""
    case = Case(((29, 41, None),) * 3, 2, 2, 16, True, 0.25, DTYPES[0], 8)
    q, k, v, do, _ = case.inputs()
    args, kw = case.call_args()
    drop = _drop(0.3, 99, 4)
    o, stats = cuflash.attention_varlen_forward(q, k, v, *args, **kw, **drop)
    grads = cuflash.attention_varlen_backward(do, q, k, v, o, stats, *args, **kw, **drop)

    def dense(x, n):
        return x.reshape(3, n, *x.shape[1:])

    dense_kw = dict(causal=True, softmax_scale=0.25, **drop)
    o_d, stats_d = cuflash.attention_forward(dense(q, 29), dense(k, 41), dense(v, 41),
                                             **dense_kw)
    grads_d = cuflash.attention_backward(dense(do, 29), dense(q, 29), dense(k, 41),
                                         dense(v, 41), o_d, stats_d, **dense_kw)
    np.testing.assert_allclose(o, o_d.reshape(o.shape), rtol=1e-6, atol=1e-7)
    for g, g_d in zip(grads, grads_d):
        np.testing.assert_allclose(g, g_d.reshape(g.shape), rtol=1e-5, atol=1e-6)
    plain = cuflash.attention_varlen(q, k, v, *args, **kw)
    assert not np.allclose(o, plain)


def test_the_backward_regenerates_the_forwards_mask():
    case = Case(((12, 15, None), (7, 3, None)), 1, 2, 8, False, 0.3, DTYPES[0], 2)
    q, k, v, do, _ = case.inputs()
    args, kw = case.call_args()
    o, stats = cuflash.attention_varlen_forward(q, k, v, *args, **kw, **_drop(0.2, 1, 0))
    for other, name in ((_drop(0.0, None, 0), "dropout_p"), (_drop(0.2, 2, 0), "dropout_seed"),
                        (_drop(0.2, 1, 5), "dropout_offset")):
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            cuflash.attention_varlen_backward(do, q, k, v, o, stats, *args, **kw, **other)


@pytest.mark.parametrize("drop, err, match", [
    (_drop(0.2, None, 0), TypeError, "dropout_seed: expected an int"),
    (_drop(1.0, 3, 0), ValueError, "dropout_p: expected a real number in"),
    (_drop(0.2, 3, 2**32), ValueError, "dropout_offset: expected an int from 0"),
])
def test_bad_values_are_named(drop, err, match):
    case = replace(Case(((5, 6, None),), 1, 1, 8, False, 0.3, DTYPES[0], 1))
    q, k, v, _, _ = case.inputs()
    args, kw = case.call_args()
    with pytest.raises(err, match=match):
        cuflash.attention_varlen_forward(q, k, v, *args, **kw, **drop)


def test_torch_varlen_draws_from_torchs_generator():
    """cuflash.torch.flash_attention_varlen(dropout_p=) draws the seed and offset from
    torch's generator (torch.manual_seed reproduces them): the core call with those values,
    forward and gradients."""
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    case = Case(((13, 20, None), (0, 4, None), (9, 9, None)), 2, 2, 16, True, 0.25,
                DTYPES[0], 3)
    q, k, v, do, _ = case.inputs()
    (cu_q, cu_k, max_q, max_k), kw = case.call_args()
    torch.manual_seed(4)
    seed, offset = ct.philox_seed_offset(torch.device("cpu"))
    torch.manual_seed(4)
    leaves = [torch.from_numpy(x).requires_grad_() for x in (q, k, v)]
    o = ct.flash_attention_varlen(*leaves, torch.from_numpy(cu_q), torch.from_numpy(cu_k),
                                  max_q, max_k, causal=True, softmax_scale=0.25,
                                  dropout_p=0.2)
    o.backward(torch.from_numpy(do))
    drop = _drop(0.2, seed, offset)
    o_api, stats = cuflash.attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, **kw,
                                                    **drop)
    grads = cuflash.attention_varlen_backward(do, q, k, v, o_api, stats, cu_q, cu_k, max_q,
                                              max_k, **kw, **drop)
    np.testing.assert_array_equal(o.detach().numpy(), o_api)
    for leaf, g in zip(leaves, grads):
        np.testing.assert_array_equal(leaf.grad.numpy(), g)

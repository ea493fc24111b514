"""Any head_dim from 1 to 256 and head_dim_v != head_dim (issue #15) on the CPU path and API.

q and k have head_dim, v and o head_dim_v. The CPU path against the float64 reference,
forward and backward, for hypothesis-drawn head dims and pairs (every value 1..256 is
reachable), plus the named pairs of the issue ((192, 128): DeepSeek's multi-head latent
attention; (64, 128)). Validation accepts them for CPU arrays and refuses, on CUDA, a
head_dim that is not a multiple of 8 or a head_dim_v that differs. GPU tests: the refusal
on a real device, and, once the kernels take them, the same sizes on the GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import api, reference, validate
from cuflash.interop import Framework, Imported
from issue15_helpers import DTYPES, Case, check_backward, check_forward

HEAD_DIM = st.integers(1, 256)


@st.composite
def head_dim_cases(draw) -> Case:
    head_dim = draw(HEAD_DIM)
    head_dim_v = draw(st.one_of(st.just(head_dim), HEAD_DIM))
    length = st.one_of(st.integers(1, 5), st.integers(1, 40))
    return Case(batch=draw(st.integers(1, 2)), seqlen_q=draw(length), seqlen_k=draw(length),
                heads_kv=draw(st.sampled_from([1, 2])), group=draw(st.sampled_from([1, 2])),
                head_dim=head_dim, head_dim_v=head_dim_v, causal=draw(st.booleans()),
                dtype=draw(st.sampled_from(DTYPES)),
                block_m=draw(st.sampled_from([8, 16, 64])),
                block_n=draw(st.sampled_from([8, 16, 32])), seed=draw(st.integers(0, 2**31)))


@settings(max_examples=200)
@given(case=head_dim_cases())
def test_forward_matches_reference(case):
    check_forward(case)


@settings(max_examples=200)
@given(case=head_dim_cases())
def test_backward_matches_reference(case):
    check_backward(case)


PAIRS = [(192, 128), (64, 128), (128, 64), (59, 59), (111, 111), (1, 1), (256, 256),
         (3, 200)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim, head_dim_v", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_named_pairs(head_dim, head_dim_v, dtype):
    case = Case(batch=2, seqlen_q=67, seqlen_k=91, heads_kv=2, group=2, head_dim=head_dim,
                head_dim_v=head_dim_v, causal=True, dtype=dtype, block_m=32, block_n=32,
                seed=head_dim * 1000 + head_dim_v)
    check_forward(case)
    check_backward(case)


def test_api_head_dim_v():
    rng = np.random.default_rng(2)
    q, k = (rng.standard_normal((1, 30, 4, 192)).astype(np.float32),
            rng.standard_normal((1, 35, 2, 192)).astype(np.float32))
    v, do = (rng.standard_normal((1, 35, 2, 128)).astype(np.float32),
             rng.standard_normal((1, 30, 4, 128)).astype(np.float32))
    o, stats = cuflash.attention_forward(q, k, v, causal=True)
    assert o.shape == (1, 30, 4, 128)
    o_ref, _, _ = reference.attention_reference(q, k, v, causal=True)
    np.testing.assert_allclose(o, o_ref, atol=2e-6)
    dq, dk, dv = cuflash.attention_backward(do, q, k, v, o, stats, causal=True)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    refs = reference.attention_backward_reference(do, q, k, v, causal=True, o=o)
    for got, want in zip((dq, dk, dv), refs):
        np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match=r"^o: expected shape \(1, 30, 4, 128\) \(q's with "
                                         r"v's head_dim_v\), got \(1, 30, 4, 192\)"):
        cuflash.attention_backward(do, q, k, v, q, stats, causal=True)


def _as_cuda(x) -> Imported:
    return Imported(array=x, framework=Framework.CUPY, device=("cuda", 0))


@pytest.mark.parametrize("head_dim, head_dim_v, pattern", [
    (60, 60, r"^q: expected head_dim a multiple of 8 from 8 to 256 on CUDA .*got 60"),
    (192, 128, r"^v: expected head_dim 192 like q on CUDA \(head_dim_v != head_dim is not yet "
               r"supported by the CUDA kernels \(issue #15\); CPU arrays run it\), got 128"),
])
def test_cuda_refuses_what_the_kernels_cannot(head_dim, head_dim_v, pattern):
    q = np.zeros((1, 16, 2, head_dim), np.float16)
    v = np.zeros((1, 16, 2, head_dim_v), np.float16)
    with pytest.raises(ValueError, match=pattern):
        validate.check_forward(_as_cuda(q), _as_cuda(q), _as_cuda(v), causal=False,
                               softmax_scale=None)
    validate.check_forward(q, q, v, causal=False, softmax_scale=None)  # the CPU takes it


def test_cuda_refusal_through_the_api(monkeypatch):
    q = np.zeros((1, 16, 2, 60), np.float16)
    monkeypatch.setattr(api, "import_array", lambda x, name: _as_cuda(x))
    monkeypatch.setattr(api, "_fast_backend", lambda *a: None)
    with pytest.raises(ValueError, match=r"^q: expected head_dim a multiple of 8"):
        cuflash.attention_forward(q, q, q)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, head_dim_v", [(60, 60), (192, 128)])
def test_cuda_refuses_on_a_gpu(head_dim, head_dim_v):
    """Today's contract on a real device (fastpath included): ValueError, nothing launched.
    When the kernels take these sizes this test becomes their accuracy test."""
    import cupy

    q = cupy.zeros((1, 16, 2, head_dim), cupy.float16)
    v = cupy.zeros((1, 16, 2, head_dim_v), cupy.float16)
    with pytest.raises(ValueError, match=r"^(q|v): expected head_dim"):
        cuflash.attention_forward(q, q, v)

"""Any head_dim from 1 to 256 and head_dim_v != head_dim (issue #15) on the CPU path and API.

q and k have head_dim, v and o head_dim_v. The CPU path against the float64 reference,
forward and backward, for hypothesis-drawn head dims and pairs (every value 1..256 is
reachable), plus the named pairs of the issue ((192, 128): DeepSeek's multi-head latent
attention; (64, 128)). On CUDA the API runs the kernels on zero-padded copies
(cuflash/head_pad.py): a CPU test replaces the kernels by the CPU path and checks what they
receive and what comes back; the GPU tests draw the same sizes on a GPU (hypothesis), CuPy
arrays and cuflash.torch. The fast paths keep refusing dims the kernels lack.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import api, head_pad, reference, validate
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
    (60, 60, r"^q: expected head_dim a multiple of 8 from 8 to 256 on this CUDA path .*got 60"),
    (192, 128, r"^v: expected head_dim 192 like q on this CUDA path .*got 128"),
])
def test_kernel_paths_refuse_what_the_kernels_cannot(head_dim, head_dim_v, pattern):
    """The fast paths and the JAX adapter validate without padding: the kernels' own dims."""
    q = np.zeros((1, 16, 2, head_dim), np.float16)
    v = np.zeros((1, 16, 2, head_dim_v), np.float16)
    with pytest.raises(ValueError, match=pattern):
        validate.check_forward(_as_cuda(q), _as_cuda(q), _as_cuda(v), causal=False,
                               softmax_scale=None)
    validate.check_forward(_as_cuda(q), _as_cuda(q), _as_cuda(v), causal=False,
                           softmax_scale=None, padded_ok=True)  # the API's general path
    validate.check_forward(q, q, v, causal=False, softmax_scale=None)  # the CPU takes it


def test_backward_widens_to_a_hopper_kernel():
    """plan.backward_head_dim: on an H200 16-bit head dims whose own bucket runs the portable
    backward widen to the next Hopper width within 2x; the Hopper widths, float32, the
    deterministic 136..224 (no ordered Hopper kernel at 192 or 256) and an A100 stay."""
    from cuflash import plan, specs

    h200 = specs.DeviceFacts("H200", "sm_90", 132, 227 * specs.KIB)
    a100 = specs.DeviceFacts("A100", "sm_80", 108, 163 * specs.KIB)

    def width(facts, head_dim, dtype="bfloat16", deterministic=False):
        shape = plan.Shape(1, 512, 512, 4, 4, head_dim, dtype, True)
        return plan.backward_head_dim(shape, facts, deterministic)

    assert [width(h200, d) for d in (32, 64, 96, 128, 160, 192, 224, 256)] == [
        64, 64, 128, 128, 192, 192, 256, 256]
    assert width(h200, 192, "float32") == 192 and width(h200, 16) == 16  # 64 > 2 x 16
    assert width(h200, 192, deterministic=True) == 192
    assert [width(a100, d) for d in (32, 96, 192)] == [32, 96, 192]


def test_padding_arithmetic():
    assert not head_pad.needed(64, 64) and head_pad.needed(60, 60)
    assert head_pad.needed(192, 128) and head_pad.needed(128, 192)
    assert [head_pad.kernel_dim(*p) for p in ((1, 1), (59, 59), (192, 128), (64, 128),
                                                (3, 200), (256, 255))] == [8, 64, 192, 128,
                                                                          200, 256]


@pytest.mark.parametrize("head_dim, head_dim_v, widen", [
    (59, 59, None), (192, 128, None), (64, 128, None), (3, 17, None),
    (160, 160, 192),  # the Hopper backward at 192 (plan.backward_head_dim) for a 160 call
    (59, 40, 128)])
def test_cuda_calls_run_the_kernels_on_padded_copies(monkeypatch, head_dim, head_dim_v, widen):
    """The API's CUDA branch with the kernels replaced by the CPU path: they receive q, k, v
    (and do, o) padded to one multiple of 8 (the backward: to the planner's wider width
    when it gives one), the caller's softmax_scale, and the results cut back match the
    reference of the unpadded call."""
    from cuflash import cpu, launch

    seen = []
    monkeypatch.setenv("CUFLASH_HEAD_DIM_V_NATIVE", "0")  # the copies (no pair lookup)

    def fake_fwd(q, k, v, *, dtype, causal, softmax_scale, **kw):
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1], softmax_scale))
        return cpu.flash_forward_cpu(q, k, v, causal=causal, softmax_scale=softmax_scale)

    def fake_bwd(do, q, k, v, o, m, l, *, dtype, causal, softmax_scale, deterministic, **kw):
        seen.append((do.shape[-1], q.shape[-1], v.shape[-1], o.shape[-1]))
        return cpu.flash_backward_cpu(do, q, k, v, o, m, l, causal=causal,
                                      softmax_scale=softmax_scale)

    monkeypatch.setattr(launch, "backward_head_dim",
                        lambda shape, device_id, deterministic: widen or shape.head_dim)
    monkeypatch.setattr(launch, "flash_forward_gpu", fake_fwd)
    monkeypatch.setattr(launch, "flash_backward_gpu", fake_bwd)
    monkeypatch.setattr(api, "import_array", lambda x, name: _as_cuda(x))
    monkeypatch.setattr(api, "caller_stream", lambda iq: contextlib.nullcontext())
    monkeypatch.setattr(api, "export_array", lambda x, like: x)
    rng = np.random.default_rng(head_dim)
    q, k = (rng.standard_normal((2, n, 4, head_dim)).astype(np.float32) for n in (21, 34))
    v = rng.standard_normal((2, 34, 4, head_dim_v)).astype(np.float32)
    do = rng.standard_normal((2, 21, 4, head_dim_v)).astype(np.float32)
    o, stats = cuflash.attention_forward(q, k, v, causal=True)
    grads = cuflash.attention_backward(do, q, k, v, o, stats, causal=True)
    width = head_pad.kernel_dim(head_dim, head_dim_v)
    if head_pad.needed(head_dim, head_dim_v):
        assert seen[0] == (width, width, width, 1 / np.sqrt(head_dim))
    else:  # the forward runs the caller's arrays
        assert seen[0] == (head_dim, head_dim, head_dim_v, 1 / np.sqrt(head_dim))
    assert seen[1] == (widen or width,) * 4
    assert o.shape == (2, 21, 4, head_dim_v) and o.flags.c_contiguous
    o_ref, _, _ = reference.attention_reference(q, k, v, causal=True)
    np.testing.assert_allclose(o, o_ref, atol=2e-6)
    refs = reference.attention_backward_reference(do, q, k, v, causal=True, o=o)
    for got, want, x in zip(grads, refs, (q, k, v)):
        assert got.shape == x.shape and got.flags.c_contiguous
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_torch_compile_over_several_head_dims():
    """A compiled cuflash.torch.flash_attention called with head dims that vary (dynamo then
    makes them symbolic): padded pairs and the kernels' own widths, values and gradient
    shapes like eager (CPU tensors)."""
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    compiled = torch.compile(ct.flash_attention)
    for head_dim, head_dim_v in ((192, 128), (59, 59), (64, 64), (32, 32)):
        gen = torch.Generator().manual_seed(head_dim)
        q = torch.randn(1, 20, 2, head_dim, generator=gen)
        k = torch.randn(1, 30, 2, head_dim, generator=gen)
        v = torch.randn(1, 30, 2, head_dim_v, generator=gen)
        outs = []
        for fn in (ct.flash_attention, compiled):
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            o = fn(*leaves, causal=True)
            o.sum().backward()
            outs.append([o.detach()] + [x.grad for x in leaves])
        for eager, comp in zip(*outs):
            torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)

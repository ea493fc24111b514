"""cuflash.torch on CPU tensors: gradients against torch's own SDPA, opcheck, torch.compile.

Truth is ``torch.nn.functional.scaled_dot_product_attention`` (math backend) on float64
copies; the same call in the test dtype gives the noise floor, and the rule is
``err(ours) <= 2 * err(torch in the same dtype) + atol`` (cuflash.reference.compare).
GQA references expand the kv heads with ``repeat_interleave``; bottom-right causal masks
(seqlen_q != seqlen_k) are passed to torch as an explicit boolean ``attn_mask``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import cuflash.api  # noqa: E402
import cuflash.torch as ct  # noqa: E402
from cuflash.reference import compare, default_atol  # noqa: E402

_NP_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _atol(dtype: torch.dtype, ref: np.ndarray) -> float:
    """``default_atol`` is for values of order 1; dK and dV sum over a GQA group and over many
    query rows and reach ~10, where float32 summation-order noise is a few ulps of 10, so it is
    scaled by the reference's magnitude."""
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == torch.bfloat16 else np.dtype("float32")
    return default_atol(np_dtype) * max(1.0, float(np.abs(ref).max(initial=0.0)))


def _inputs(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, heads, head_dim, generator=g)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, generator=g)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, generator=g)
    do = torch.randn(batch, seqlen_q, heads, head_dim, generator=g)
    return tuple(t.to(dtype) for t in (q, k, v, do))


def _torch_attention(q, k, v, causal):
    """torch SDPA on (b, s, h, d) tensors, kv heads repeated, bottom-right causal mask."""
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    mask = None
    if causal:
        i = torch.arange(seqlen_q)[:, None]
        j = torch.arange(seqlen_k)[None, :]
        mask = j <= i + (seqlen_k - seqlen_q)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(1, 2)


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return (o, q.grad, k.grad, v.grad)


def _f64(t):
    return t.detach().double().numpy()


SHAPES = [  # (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim)
    pytest.param((2, 37, 37, 4, 4, 32), id="mha-37"),
    pytest.param((1, 45, 150, 4, 2, 24), id="gqa-45x150"),
    pytest.param((2, 70, 33, 4, 1, 16), id="mqa-70x33"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_torch_sdpa(shape, causal, dtype):
    q, k, v, do = _inputs(*shape, dtype=dtype, seed=hash((shape, causal)) % 2**31)
    ours = _grads(lambda q, k, v: ct.flash_attention(q, k, v, causal=causal), q, k, v, do)
    naive = _grads(lambda q, k, v: _torch_attention(q, k, v, causal), q, k, v, do)
    truth = _grads(lambda q, k, v: _torch_attention(q, k, v, causal),
                   *(t.double() for t in (q, k, v, do)))
    for name, got, nv, ref in zip(("o", "dq", "dk", "dv"), ours, naive, truth):
        assert got.dtype == dtype and got.shape == ref.shape
        report = compare(name, _f64(got), _f64(ref), _f64(nv), atol=_atol(dtype, _f64(ref)))
        assert report.ok, str(report)


def test_expanded_gradient_is_accepted():
    """``o.sum()`` sends back a gradient with all strides 0; the adapter copies it."""
    q, k, v, _ = _inputs(1, 20, 20, 2, 2, 16, torch.float32, seed=3)
    q2, k2, v2 = (t.clone().requires_grad_(True) for t in (q, k, v))
    ct.flash_attention(q2, k2, v2).sum().backward()
    ref = _grads(lambda q, k, v: ct.flash_attention(q, k, v), q, k, v, torch.ones_like(q))
    for got, want in zip((q2.grad, k2.grad, v2.grad), ref[1:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_statistics_are_not_differentiable():
    q, k, v, _ = _inputs(1, 9, 9, 2, 2, 8, torch.float32, seed=4)
    q.requires_grad_(True)
    o, m, l = torch.ops.cuflash.flash_fwd(q, k, v, False, 0.3)
    assert o.requires_grad and not m.requires_grad and not l.requires_grad
    assert m.dtype == l.dtype == torch.float32 and m.shape == (1, 2, 9)


OPCHECK_CASES = [
    pytest.param(torch.float32, False, (1, 17, 17, 2, 2, 16), id="fp32-full"),
    pytest.param(torch.bfloat16, True, (2, 13, 29, 4, 2, 32), id="bf16-causal-gqa"),
]


@pytest.mark.parametrize("dtype,causal,shape", OPCHECK_CASES)
def test_opcheck(dtype, causal, shape):
    q, k, v, do = _inputs(*shape, dtype=dtype, seed=5)
    scale = 0.2
    torch.library.opcheck(torch.ops.cuflash.flash_fwd.default, (q, k, v, causal, scale))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(torch.ops.cuflash.flash_fwd.default, (qg, kg, vg, causal, scale))
    o, m, l = torch.ops.cuflash.flash_fwd(q, k, v, causal, scale)
    torch.library.opcheck(torch.ops.cuflash.flash_bwd.default,
                          (do, q, k, v, o, m, l, causal, scale, False))


def _loss(q, k, v, w):
    o = ct.flash_attention(q, k, v, causal=True)
    return (torch.tanh(o) * w).sum()  # pointwise ops around the custom op, for the compiler


NO_CXX = shutil.which("g++") is None and shutil.which("c++") is None


@pytest.mark.parametrize("backend", [
    pytest.param("inductor", marks=pytest.mark.skipif(NO_CXX, reason="inductor needs a C++ "
                                                      "compiler on the CPU")),
    "aot_eager"])
def test_torch_compile_fullgraph(backend):
    """fullgraph=True fails on any graph break; inductor needs a C++ compiler (gcc here).

    Inductor compiles in this process (compile_threads=1): no worker pool to start on a
    2-core CI machine. A cold inductor cache costs ~15-40 s here, a warm one ~3 s.
    """
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    q, k, v, w = _inputs(2, 40, 56, 4, 2, 16, torch.float32, seed=6)
    eager = _grads(lambda q, k, v: _loss(q, k, v, w), q, k, v, torch.tensor(1.0))
    compiled = torch.compile(lambda q, k, v: _loss(q, k, v, w), fullgraph=True,
                             backend=backend)
    with inductor_config.patch(compile_threads=1):
        got = _grads(compiled, q, k, v, torch.tensor(1.0))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_graph_breaks():
    torch._dynamo.reset()
    q, k, v, w = _inputs(1, 16, 16, 2, 2, 8, torch.float32, seed=7)
    explanation = torch._dynamo.explain(lambda q, k, v: _loss(q, k, v, w))(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("head_dim, head_dim_v", [(24, 16), (59, 59), (13, 40)])
def test_head_dims_the_kernels_lack_compile_without_graph_breaks(head_dim, head_dim_v):
    """head_dim_v != head_dim (DeepSeek-style), or a head_dim not a multiple of 8: under
    torch.compile(fullgraph=True) the operators take them (their implementations run the API,
    which pads on CUDA), o is (..., head_dim_v), and the gradients match the eager call."""
    from cuflash import reference

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(head_dim * 100 + head_dim_v)
    q, k = (torch.randn(1, n, 2, head_dim, generator=g) for n in (21, 30))
    v, do = torch.randn(1, 30, 2, head_dim_v, generator=g), torch.randn(1, 21, 2, head_dim_v,
                                                                       generator=g)
    fn = lambda q, k, v: ct.flash_attention(q, k, v, causal=True)  # noqa: E731
    explanation = torch._dynamo.explain(fn)(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    assert o.shape == (1, 21, 2, head_dim_v)
    o.backward(do)
    arrays = [x.numpy() for x in (q, k, v)]
    want = [reference.attention_reference(*arrays, causal=True)[0],
            *reference.attention_backward_reference(do.numpy(), *arrays, causal=True)]
    for got, ref in zip([o.detach(), *(x.grad for x in leaves)], want):
        np.testing.assert_allclose(got.numpy(), ref, rtol=2e-4, atol=2e-5)


def test_cuda_kernels_are_registered_directly():
    """The operators' CUDA kernels sit on the dispatcher's CUDA key (cuflash.torch
    registers them without custom_op's checking wrapper); CPU tensors take custom_op's
    kernel, and both keep the fake (Meta) kernel and the autograd formula."""
    for name in ("cuflash::flash_fwd", "cuflash::flash_bwd"):
        for key in ("CUDA", "Meta", "CompositeExplicitAutograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("cuflash::flash_fwd", "Autograd")
    assert "cuflash/torch.py" in torch._C._dispatch_dump("cuflash::flash_fwd").split(
        "CUDA: registered at ")[1].split("\n")[0]


def test_sdpa_entry_point_is_zero_copy(monkeypatch):
    """(b, h, s, d) in and out; the pure API sees transposed views of the caller's tensors."""
    batch, heads, heads_kv, seqlen_q, seqlen_k, head_dim = 2, 4, 2, 24, 40, 16
    g = torch.Generator().manual_seed(8)
    query = torch.randn(batch, heads, seqlen_q, head_dim, generator=g)
    key = torch.randn(batch, heads_kv, seqlen_k, head_dim, generator=g)
    value = torch.randn(batch, heads_kv, seqlen_k, head_dim, generator=g)
    seen = []
    real_forward = cuflash.api.attention_forward

    def spy(q, k, v, **kwargs):
        seen.extend((t.data_ptr(), t.stride()) for t in (q, k, v))
        return real_forward(q, k, v, **kwargs)

    monkeypatch.setattr(cuflash.api, "attention_forward", spy)
    out = ct.scaled_dot_product_attention(query, key, value, scale=0.3, enable_gqa=True)
    for (ptr, strides), t in zip(seen, (query, key, value)):
        assert ptr == t.data_ptr()
        assert strides == t.transpose(1, 2).stride()
    assert out.shape == (batch, heads, seqlen_q, head_dim)
    assert out.stride() == (seqlen_q * heads * head_dim, head_dim, heads * head_dim, 1)
    assert out._base is not None  # a view of cuflash's (b, s, h, d) output
    ref = F.scaled_dot_product_attention(query, key, value, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sdpa_causal_square_matches_torch():
    g = torch.Generator().manual_seed(9)
    query, key, value = (torch.randn(1, 2, 33, 16, generator=g) for _ in range(3))
    out = ct.scaled_dot_product_attention(query, key, value, is_causal=True)
    ref = F.scaled_dot_product_attention(query, key, value, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sdpa_causal_rectangular_refuses():
    query = torch.randn(1, 2, 8, 16)
    key = value = torch.randn(1, 2, 12, 16)
    with pytest.raises(ValueError, match="top-left"):
        ct.scaled_dot_product_attention(query, key, value, is_causal=True)
    ct.scaled_dot_product_attention(query, key, value)  # non-causal is fine


def test_errors_reach_the_caller():
    q = torch.randn(1, 8, 2, 264)  # head_dim above 256 (the CPU takes any from 1 to 256)
    with pytest.raises(ValueError, match="head_dim"):
        ct.flash_attention(q, q, q)


def test_import_cuflash_imports_no_framework():
    code = ("import sys, cuflash; bad = {'torch', 'jax'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

"""cuflash.torch.flash_attention_varlen: autograd on CPU tensors against the float64 varlen
reference (q, k, v and the sinks' gradient), the lse it returns, validation, and the same
on CUDA tensors (a ``gpu`` test)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cuflash.torch as cft  # noqa: E402
from cuflash import reference, testing  # noqa: E402
from cuflash.interop import import_array  # noqa: E402

CU_Q, CU_K = [0, 37, 37, 82, 91], [0, 70, 90, 90, 130]  # an empty sequence, one without keys
MAX_Q, MAX_K = 45, 70


def _host(t: torch.Tensor) -> np.ndarray:
    return import_array(t.detach(), "t").array


def _inputs(dtype, heads=4, heads_kv=2, head_dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(CU_Q[-1], heads, head_dim, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(CU_K[-1], heads_kv, head_dim, generator=gen).to(dtype).requires_grad_()
            for _ in range(2))
    do = torch.randn(q.shape, generator=gen).to(dtype)
    sinks = torch.randn(heads, generator=gen).requires_grad_()
    return q, k, v, do, sinks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mods", [dict(causal=True), dict(causal=True, window=(16, -1),
                                                          softcap=4.0, sinks=True),
                                  dict(window=(5, 9), seqused_k=True)],
                         ids=["causal", "window-softcap-sinks", "window-seqused"])
def test_autograd_matches_reference(dtype, mods):
    q, k, v, do, sinks = _inputs(dtype)
    mods = dict(mods)
    use_sinks = mods.pop("sinks", False)
    used = torch.tensor([60, 11, 0, 25], dtype=torch.int32) if mods.pop("seqused_k", False) \
        else None
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in (CU_Q, CU_K))
    o, lse = cft.flash_attention_varlen(q, k, v, cu_q, cu_k, MAX_Q, MAX_K, seqused_k=used,
                                        sinks=sinks if use_sinks else None, return_lse=True,
                                        **mods)
    o.backward(do)
    arrays = [_host(x) for x in (q, k, v, do)]
    kw = dict(seqused_k=None if used is None else used.numpy(), **mods,
              sinks=_host(sinks) if use_sinks else None)
    np_dtype = arrays[0].dtype
    o_ref, m_ref, l_ref = reference.attention_varlen_reference(*arrays[:3], CU_Q, CU_K, **kw)
    o_nv = reference.attention_varlen_naive(*arrays[:3], CU_Q, CU_K, **kw, dtype=np_dtype)
    name = np.dtype(np_dtype).name
    assert testing.judge("o", _host(o), o_ref, o_nv, dtype=name).ok
    with np.errstate(divide="ignore"):
        lse_ref = m_ref + np.log(l_ref)
    assert lse.dtype == torch.float32 and not lse.requires_grad
    np.testing.assert_allclose(lse.numpy(), lse_ref, rtol=1e-4, atol=1e-4)
    refs = reference.attention_varlen_backward_reference(arrays[3], *arrays[:3], CU_Q, CU_K,
                                                         **kw, o=_host(o))
    naives = reference.attention_varlen_backward_naive(arrays[3], *arrays[:3], CU_Q, CU_K,
                                                       **kw, dtype=np_dtype)
    scale = testing.magnitude(*refs[:3])
    for label, x, ref, naive in zip(("dq", "dk", "dv"), (q, k, v), refs, naives):
        assert x.grad.dtype == dtype and x.grad.shape == x.shape
        report = testing.judge(label, _host(x.grad), ref, naive, dtype=name, scale=scale)
        assert report.ok, str(report)
    if use_sinks:
        report = testing.judge("dsinks", sinks.grad.numpy(), refs[3], naives[3], dtype=name)
        assert report.ok, str(report)
    else:
        assert sinks.grad is None


def test_bad_arguments_are_named():
    q, k, v, _, _ = _inputs(torch.float32)
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in (CU_Q, CU_K))
    with pytest.raises(TypeError, match="^cu_seqlens_k: expected a torch.Tensor"):
        cft.flash_attention_varlen(q, k, v, cu_q, np.int32(CU_K), MAX_Q, MAX_K)
    with pytest.raises(TypeError, match="^cu_seqlens_q: expected dtype int32, got int64"):
        cft.flash_attention_varlen(q, k, v, cu_q.long(), cu_k, MAX_Q, MAX_K)
    with pytest.raises(ValueError, match="^max_seqlen_k: expected an int >= the longest"):
        cft.flash_attention_varlen(q, k, v, cu_q, cu_k, MAX_Q, MAX_K - 1)
    with pytest.raises(TypeError, match="^return_lse: expected a bool"):
        cft.flash_attention_varlen(q, k, v, cu_q, cu_k, MAX_Q, MAX_K, return_lse=None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_autograd_matches_reference(dtype):
    """CUDA tensors through autograd (the varlen kernels, through cuflash.varlen_fastpath
    from the second call of a layout on): outputs, lse and gradients, sinks included."""
    q, k, v, do, sinks = _inputs(dtype, head_dim=64)
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in (CU_Q, CU_K))
    mods = dict(causal=True, window=(16, -1), softcap=4.0)
    arrays = [_host(x) for x in (q, k, v, do)]
    kw = dict(mods, sinks=_host(sinks))
    np_dtype, name = arrays[0].dtype, str(dtype).removeprefix("torch.")
    o_ref = reference.attention_varlen_reference(*arrays[:3], CU_Q, CU_K, **kw)[0]
    o_nv = reference.attention_varlen_naive(*arrays[:3], CU_Q, CU_K, **kw, dtype=np_dtype)
    for call in range(2):  # the first call validates and records the layout, the second replays
        gq, gk, gv, gs = (x.detach().cuda().requires_grad_() for x in (q, k, v, sinks))
        o = cft.flash_attention_varlen(gq, gk, gv, cu_q.cuda(), cu_k.cuda(), MAX_Q, MAX_K,
                                       sinks=gs, **mods)
        o.backward(do.cuda())
        assert o.is_cuda and o.dtype == dtype
        report = testing.judge("o", _host(o.cpu()), o_ref, o_nv, dtype=name)
        assert report.ok, f"call {call}: {report}"
        o_host = _host(o.cpu())
        refs = reference.attention_varlen_backward_reference(arrays[3], *arrays[:3], CU_Q,
                                                             CU_K, **kw, o=o_host)
        naives = reference.attention_varlen_backward_naive(arrays[3], *arrays[:3], CU_Q,
                                                           CU_K, **kw, dtype=np_dtype)
        scale = testing.magnitude(*refs[:3])
        for label, x, ref, naive in zip(("dq", "dk", "dv"), (gq, gk, gv), refs, naives):
            report = testing.judge(label, _host(x.grad.cpu()), ref, naive, dtype=name,
                                   scale=scale)
            assert report.ok, f"call {call}: {report}"
        report = testing.judge("dsinks", gs.grad.cpu().numpy(), refs[3], naives[3], dtype=name)
        assert report.ok, f"call {call}: {report}"


def test_operators_pass_opcheck():
    q, k, v, do, sinks = (x.detach() for x in _inputs(torch.float32, head_dim=16))
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in (CU_Q, CU_K))
    scalars = (MAX_Q, MAX_K, True, 0.25, 16, -1, 4.0, False)
    args = (q, k, v, cu_q, cu_k, None, None, sinks, *scalars)
    torch.library.opcheck(torch.ops.cuflash.varlen_fwd.default, args)
    o, m, l = torch.ops.cuflash.varlen_fwd(*args)
    torch.library.opcheck(torch.ops.cuflash.varlen_bwd.default,
                          (do, q, k, v, o, m, l, cu_q, cu_k, None, None, sinks, *scalars))


def test_torch_compile_fullgraph_matches_eager():
    """The operators under torch.compile(fullgraph=True) (a graph break fails it): output,
    lse and gradients (sinks included) equal the eager autograd.Function's."""
    torch._dynamo.reset()
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in (CU_Q, CU_K))
    used = torch.tensor([60, 11, 0, 25], dtype=torch.int32)

    def loss(q, k, v, sinks):
        o, lse = cft.flash_attention_varlen(q, k, v, cu_q, cu_k, MAX_Q, MAX_K, seqused_k=used,
                                            causal=True, window=(16, -1), softcap=4.0,
                                            sinks=sinks, return_lse=True)
        return (torch.tanh(o) * 1.5).sum() + torch.nan_to_num(lse, neginf=0.0).sum()

    def grads(fn):
        q, k, v, _, sinks = _inputs(torch.float32, head_dim=16, seed=3)
        value = fn(q, k, v, sinks)
        value.backward()
        return [value.detach(), q.grad, k.grad, v.grad, sinks.grad]

    eager = grads(loss)
    q, k, v, _, sinks = _inputs(torch.float32, head_dim=16, seed=3)
    explanation = torch._dynamo.explain(loss)(q, k, v, sinks)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert "cuflash.varlen_fwd" in explanation.graphs[0].code  # the operator, traced
    torch._dynamo.reset()
    compiled = grads(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

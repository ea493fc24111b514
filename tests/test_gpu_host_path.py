"""The fast host path on the GPU (``gpu`` tests): CUDA graphs, torch's allocator, plan splits.

* ``torch.cuda.graph`` captures cuflash.torch's forward and forward+backward; replays with
  new inputs copied into the static buffers match eager calls bitwise (same kernels, same
  inputs; the deterministic backward so atomics' order cannot differ).
* ``torch.compile(mode="reduce-overhead")`` (CUDA graphs under the compiler) runs a model
  using cuflash.torch and matches eager.
* Outputs come from torch's caching allocator (``torch.cuda.memory_allocated`` counts them).
* A repeated call reuses the memoized plan and still validates what changes per call (the
  data pointer's alignment).
* Plans that split work: GQA backward with the query heads of a group divided over blocks,
  and a batch past CUDA's 65535 grid limit divided over launches, against the reference.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import plan as planning

try:
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", autouse=True)
def gpu_env():
    yield from gh.gpu_module_env()


def _randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def test_graph_capture_forward_and_backward_replays_like_eager():
    import cuflash.torch as ct

    shape = (2, 300, 8, 128)
    static = [_randn(*shape).requires_grad_() for _ in range(3)]
    static_do = _randn(*shape)

    def step():
        o = ct.flash_attention(*static, causal=True, deterministic=True) \
            if "deterministic" in ct.flash_attention.__code__.co_varnames \
            else ct.flash_attention(*static, causal=True)
        return (o, *torch.autograd.grad(o, static, static_do))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: compile, plan, allocator
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(3):
        fresh = [_randn(*shape) for _ in range(3)]
        fresh_do = _randn(*shape)
        with torch.no_grad():
            for s, f in zip(static, fresh):
                s.copy_(f)
            static_do.copy_(fresh_do)
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for name, got, want in zip(("o", "dq", "dk", "dv"), captured, eager):
            assert torch.equal(got, want), f"{name}: graph replay differs from eager"


def test_reduce_overhead_compile_matches_eager():
    import cuflash.torch as ct

    lin = torch.nn.Linear(128, 3 * 128, device="cuda", dtype=torch.bfloat16)

    def model(x):
        q, k, v = lin(x).view(2, 256, 3, 4, 32).unbind(2)
        return ct.flash_attention(q, k, v, causal=True).float().square().mean()

    compiled = torch.compile(model, mode="reduce-overhead")
    for _ in range(4):
        x = _randn(2, 256, 128)
        want = model(x)
        got = compiled(x)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)


def test_outputs_come_from_torchs_allocator():
    import cuflash.torch as ct

    q, k, v = (_randn(4, 1024, 8, 64) for _ in range(3))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    o = ct.flash_attention(q, k, v)
    assert torch.cuda.memory_allocated() - before >= o.numel() * o.element_size()
    o2, stats = cuflash.attention_forward(q, k, v)
    assert isinstance(o2, torch.Tensor) and torch.equal(o, o2)


def test_repeated_call_checks_the_pointer_each_time():
    q, k, v = (_randn(1, 64, 2, 64) for _ in range(3))
    cuflash.attention_forward(q, k, v)  # the layout is now memoized
    buf = _randn(1 * 64 * 2 * 64 + 4)
    shifted = buf[4:].view(1, 64, 2, 64)  # same layout, pointer 8 bytes off a boundary
    with pytest.raises(ValueError, match=r"^q: expected a data pointer aligned to 16 bytes"):
        cuflash.attention_forward(shifted, k, v)


def test_eager_lane_without_gradients_equals_the_autograd_call():
    """Plain CUDA tensors without gradients skip the autograd node; the output equals the
    autograd call's bitwise, and repeated calls of a layout replay one recorded call."""
    import cuflash.torch as ct
    from cuflash import fastpath

    q, k, v = (_randn(2, 200, 8, 64) for _ in range(3))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    fastpath._forward_calls.clear()
    plain = ct.flash_attention(q, k, v, causal=True)
    tracked = ct.flash_attention(qg, kg, vg, causal=True)
    with torch.no_grad():
        under_no_grad = ct.flash_attention(qg, kg, vg, causal=True)
    assert plain.grad_fn is None and under_no_grad.grad_fn is None
    assert tracked.grad_fn is not None
    assert torch.equal(plain, tracked.detach()) and torch.equal(plain, under_no_grad)
    for _ in range(3):
        again = ct.flash_attention(q.clone(), k.clone(), v.clone(), causal=True)
    assert torch.equal(again, plain) and len(fastpath._forward_calls) == 1


def test_backward_after_forward_reuses_the_forward_call():
    """The autograd pair's backward looks up only dO's layout on the forward's call; its
    gradients equal the core API's backward on the same tensors bitwise (deterministic)."""
    import cuflash.torch as ct

    q, k, v = (_randn(1, 300, 8, 128).requires_grad_() for _ in range(3))
    do = _randn(1, 300, 8, 128)
    for _ in range(2):  # the first call records, the second replays
        for x in (q, k, v):
            x.grad = None
        o = ct.flash_attention(q, k, v, causal=True, deterministic=True)
        o.backward(do)
        with torch.no_grad():
            o_api, stats = cuflash.attention_forward(q.detach(), k.detach(), v.detach(),
                                                     causal=True)
            want = cuflash.attention_backward(do, q.detach(), k.detach(), v.detach(), o_api,
                                              stats, causal=True, deterministic=True)
        for got, ref in zip((q.grad, k.grad, v.grad), want):
            assert torch.equal(got, ref)


@pytest.mark.parametrize("heads,heads_kv", [(16, 4), (16, 1), (12, 4)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gqa_backward_with_split_query_heads(heads, heads_kv, dtype):
    """Shapes whose Hopper plan splits each kv head's query heads over blocks."""
    problem = dict(batch=1, seqlen_q=700, seqlen_k=650, heads=heads, heads_kv=heads_kv,
                   head_dim=128, dtype=dtype)
    rng = gh.rng_for()
    q, k, v = gh.random_qkv(rng, **problem)
    do = gh.randn(rng, q.shape, dtype)
    shape = planning.Shape(1, 700, 650, heads, heads_kv, 128, dtype, True)
    from cuflash import launch

    p = launch.backward_plan(shape, 0, deterministic=False)
    gq, gk, gv, gdo = (gh.to_gpu(x) for x in (q, k, v, do))
    o, stats = cuflash.attention_forward(gq, gk, gv, causal=True)
    dq, dk, dv = cuflash.attention_backward(gdo, gq, gk, gv, o, stats, causal=True)
    gh.assert_backward_matches_reference(do, q, k, v, gh.to_host(o, dtype),
                                         *(gh.to_host(x, dtype) for x in (dq, dk, dv)),
                                         dtype=dtype, causal=True, deterministic=False,
                                         label=f"kv_splits={p.kv_splits}")


def test_batch_past_the_grid_limit():
    """batch 40000 at head_dim 256: the backward's grid z would be 80000 (two head-dim
    chunks) on the portable kernel; the plan splits it over launches."""
    dtype = "bfloat16"
    rng = gh.rng_for()
    q, k, v = gh.random_qkv(rng, batch=40000, seqlen_q=3, seqlen_k=5, heads=1, heads_kv=1,
                            head_dim=256, dtype=dtype)
    do = gh.randn(rng, q.shape, dtype)
    gq, gk, gv, gdo = (gh.to_gpu(x) for x in (q, k, v, do))
    o, stats = cuflash.attention_forward(gq, gk, gv)
    dq, dk, dv = cuflash.attention_backward(gdo, gq, gk, gv, o, stats, deterministic=True)
    o_host = gh.to_host(o, dtype)
    gh.assert_forward_matches_reference(q, k, v, o_host, gh.to_host(stats.m),
                                        gh.to_host(stats.l), dtype=dtype, causal=False)
    gh.assert_backward_matches_reference(do, q, k, v, o_host,
                                         *(gh.to_host(x, dtype) for x in (dq, dk, dv)),
                                         dtype=dtype, causal=False, deterministic=True)
    dq2, dk2, dv2 = cuflash.attention_backward(gdo, gq, gk, gv, o, stats)  # atomic mode
    gh.assert_backward_matches_reference(do, q, k, v, o_host,
                                         *(gh.to_host(x, dtype) for x in (dq2, dk2, dv2)),
                                         dtype=dtype, causal=False, deterministic=False)
    assert np.isfinite(gh.to_host(dq2, dtype).astype(np.float32)).all()

"""Any head_dim from 1 to 256 and head_dim_v != head_dim on CUDA (issue #15, ``gpu`` tests):
the API and cuflash.torch run the kernels on zero-padded copies (cuflash/head_pad.py).

CuPy arrays through the API against the float64 reference, forward and backward
(hypothesis over head dims that pad to a dozen kernel widths, the named pairs of
tests/test_head_dims.py in every dtype, and the kernel widths whose backward widens to a
Hopper kernel), outputs NaN-poisoned, cuflash.testing's rule; and
cuflash.torch.flash_attention with (192, 128) and 59, eagerly and under torch.compile.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import head_pad, reference, testing

try:
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu

PAIRS = [(192, 128), (64, 128), (128, 64), (59, 59), (111, 111), (1, 1), (256, 256),
         (3, 200)]


# GPU: the widths the drawn dims pad to are compiled ahead, in parallel (on demand, one by
# one, the kernels of a dozen widths would take minutes).
GPU_DIMS = (1, 3, 13, 59, 77, 111, 128, 200, 255)
GPU_DTYPES = ("bfloat16", "float16", "float32")
# kernel widths whose backward an H200 widens to a Hopper kernel (plan.backward_head_dim)
WIDENED = (32, 96, 160, 192, 224)


def _module_specs():
    from cuflash import config, launch, plan

    facts, cfg = launch.device_facts(0), config.Config()
    pairs = {(a, b) for a in GPU_DIMS for b in GPU_DIMS} | set(PAIRS) | {
        (d, d) for d in WIDENED}
    widths = {head_pad.kernel_dim(a, b) for a, b in pairs}
    out = []
    for width in sorted(widths):
        for dtype in GPU_DTYPES:
            for causal in (False, True):
                shape = plan.Shape(1, 1, 1, 1, 1, width, dtype, causal)
                out += gh.shape_specs(shape, facts, cfg, backward=())
                for deterministic in (False, True):  # the backward at the width it runs
                    wide = plan.backward_head_dim(shape, facts, deterministic, cfg)
                    shape_b = plan.Shape(1, 1, 1, 1, 1, wide, dtype, causal)
                    out += gh.shape_specs(shape_b, facts, cfg, forward=False,
                                          backward=(deterministic,))
    return out


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


def _gpu_check(head_dim, head_dim_v, dtype, causal, seqlen_q, seqlen_k, seed,
               deterministic=False):
    """CuPy arrays through the API against the float64 reference (the GPU test rule)."""
    rng = gh.rng_for(seed)
    q = gh.randn(rng, (2, seqlen_q, 4, head_dim), dtype)
    k = gh.randn(rng, (2, seqlen_k, 2, head_dim), dtype)
    v = gh.randn(rng, (2, seqlen_k, 2, head_dim_v), dtype)
    do = gh.randn(rng, (2, seqlen_q, 4, head_dim_v), dtype)
    label = f"d{head_dim}/{head_dim_v} {dtype} causal={causal} {seqlen_q}x{seqlen_k}"
    gq, gk, gv, gdo = (gh.to_gpu(x) for x in (q, k, v, do))
    o, stats = cuflash.attention_forward(gq, gk, gv, causal=causal)
    o_host = gh.to_host(o, dtype)
    o_ref, _, _ = reference.attention_reference(q, k, v, causal=causal)
    o_nv = reference.attention_naive(q, k, v, causal=causal, dtype=gh.np_dtype(dtype))
    gh.assert_matches_reference("o", o_host, o_ref, o_nv, dtype=dtype, label=label)
    refs = reference.attention_backward_reference(do, q, k, v, causal=causal, o=o_host)
    naives = reference.attention_backward_naive(do, q, k, v, causal=causal,
                                                dtype=gh.np_dtype(dtype))
    scale = testing.magnitude(*refs)
    grads = cuflash.attention_backward(gdo, gq, gk, gv, o, stats, causal=causal,
                                       deterministic=deterministic)
    for name, got, ref, naive, x in zip(("dq", "dk", "dv"), grads, refs, naives, (q, k, v)):
        assert got.shape == x.shape, (name, got.shape, label)
        gh.assert_matches_reference(name, gh.to_host(got, dtype), ref, naive, dtype=dtype,
                                    scale=scale, label=label)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("head_dim", WIDENED)
def test_gpu_widened_backward(head_dim, dtype, causal, deterministic):
    """The kernels' own widths whose backward runs wider (zero columns) on a Hopper kernel,
    through the CuPy API (its fast path declines them) and both backward modes."""
    _gpu_check(head_dim, head_dim, dtype, causal, 200, 333, None, deterministic)


@settings(max_examples=60, deadline=None)
@given(head_dim=st.sampled_from(GPU_DIMS),
       head_dim_v=st.one_of(st.none(), st.sampled_from(GPU_DIMS)),
       dtype=st.sampled_from(GPU_DTYPES), causal=st.booleans(),
       seqlen_q=st.integers(1, 300), seqlen_k=st.integers(1, 300),
       seed=st.integers(0, 2**31))
def test_gpu_any_head_dims(head_dim, head_dim_v, dtype, causal, seqlen_q, seqlen_k, seed):
    _gpu_check(head_dim, head_dim if head_dim_v is None else head_dim_v, dtype, causal,
               seqlen_q, seqlen_k, seed)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("head_dim, head_dim_v", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_gpu_named_pairs(head_dim, head_dim_v, dtype):
    _gpu_check(head_dim, head_dim_v, dtype, True, 333, 517, None)


def test_gpu_torch_autograd_head_dim_v():
    """cuflash.torch.flash_attention with (192, 128), 59 and 192: o and gradients like the
    reference (the general path pads), eagerly and under torch.compile (a graph break)."""
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    for head_dim, head_dim_v in ((192, 128), (59, 59), (192, 192)):
        rng = gh.rng_for()
        q = gh.randn(rng, (1, 200, 4, head_dim), "bfloat16")
        k = gh.randn(rng, (1, 300, 2, head_dim), "bfloat16")
        v = gh.randn(rng, (1, 300, 2, head_dim_v), "bfloat16")
        do = gh.randn(rng, (1, 200, 4, head_dim_v), "bfloat16")
        refs = reference.attention_backward_reference(do, q, k, v, causal=True)
        o_ref, _, _ = reference.attention_reference(q, k, v, causal=True)
        for fn in (ct.flash_attention, torch.compile(ct.flash_attention)):
            leaves = [gh.to_gpu(x, "torch").requires_grad_() for x in (q, k, v)]
            o = fn(*leaves, causal=True)
            o.backward(gh.to_gpu(do, "torch"))
            assert o.shape == (1, 200, 4, head_dim_v)
            got = [gh.to_host(o.detach(), "bfloat16")] + [gh.to_host(x.grad, "bfloat16")
                                                          for x in leaves]
            for name, g, want in zip(("o", "dq", "dk", "dv"), got, [o_ref, *refs]):
                err = np.abs(g.astype(np.float64) - want).max() / np.abs(want).max()
                assert err < 2e-2, (name, head_dim, head_dim_v, err)


@pytest.mark.parametrize("head_dim, head_dim_v", [(192, 128), (59, 59), (64, 128)])
def test_gpu_jax_jit_head_dims(head_dim, head_dim_v):
    """cuflash.jax under jax.jit on GPU arrays: the head dims the kernels lack are padded in
    JAX before the CUDA targets; o and the gradients like the reference."""
    jax = pytest.importorskip("jax")
    import cuflash.jax as cj

    rng = gh.rng_for()
    q = gh.randn(rng, (2, 150, 4, head_dim), "bfloat16")
    k = gh.randn(rng, (2, 211, 2, head_dim), "bfloat16")
    v = gh.randn(rng, (2, 211, 2, head_dim_v), "bfloat16")
    do = gh.randn(rng, (2, 150, 4, head_dim_v), "bfloat16")
    step = jax.jit(lambda q, k, v, do: jax.vjp(
        lambda q, k, v: cj.flash_attention(q, k, v, causal=True), q, k, v))
    o, vjp = step(*(gh.to_gpu(x, "jax") for x in (q, k, v, do)))
    grads = jax.jit(vjp)(gh.to_gpu(do, "jax"))
    assert o.shape == (2, 150, 4, head_dim_v)
    label = f"jax jit d{head_dim}/{head_dim_v}"
    o_ref, _, _ = reference.attention_reference(q, k, v, causal=True)
    o_nv = reference.attention_naive(q, k, v, causal=True, dtype=gh.np_dtype("bfloat16"))
    gh.assert_matches_reference("o", gh.to_host(o, "bfloat16"), o_ref, o_nv,
                                dtype="bfloat16", label=label)
    refs = reference.attention_backward_reference(do, q, k, v, causal=True)
    naives = reference.attention_backward_naive(do, q, k, v, causal=True,
                                                dtype=gh.np_dtype("bfloat16"))
    scale = testing.magnitude(*refs)
    for name, got, ref, naive in zip(("dq", "dk", "dv"), grads, refs, naives):
        gh.assert_matches_reference(name, gh.to_host(got, "bfloat16"), ref, naive,
                                    dtype="bfloat16", scale=scale, label=label)

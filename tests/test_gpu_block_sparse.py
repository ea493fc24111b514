"""Block-sparse attention (docs/block_sparse.md) in the CUDA kernels against the float64
reference with the mask expanded (``gpu`` tests).

Every kernel family: the Hopper wgmma kernels (wgmma on; the warp-specialized ones at
head_dim 64 / 128, the others at 256), the portable 16-bit kernels (wgmma off, and at a
100 KiB budget, which picks smaller tiles), the float32 SIMT kernels; each backward in both
deterministic modes (deterministic runs the portable dK/dV kernel and the dQ pass). Random
masks with rows and key blocks that see nothing, batch and head axes broadcast or not, GQA,
causal, the score modifiers on top, odd lengths. Outputs are NaN-poisoned; the rule is
cuflash.testing's ``err <= 2 * err(naive same dtype) + atol``.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import reference, specs, testing

try:
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu

FAMILIES = [("own", None, True), ("portable", None, False), ("100k", 100, False)]
# (name, causal, block_size, mask axes (batch, heads) kept or broadcast, density, modifiers)
CASES = [
    ("dense_axes", False, (128, 128), (True, True), 0.5, {}),
    ("causal", True, (128, 128), (True, True), 0.6, {}),
    ("broadcast", False, (128, 256), (False, False), 0.4, {}),
    ("heads_only", True, (256, 128), (False, True), 0.5, {}),
    ("window+alibi", False, (128, 128), (True, True), 0.6,
     {"window": (300, 90), "alibi_slopes": "heads"}),
    ("softcap+sinks", True, (128, 128), (True, False), 0.5, {"softcap": 4.0, "sinks": True}),
]
# (seqlen_q, seqlen_k): odd lengths, both orders, several blocks each way
LENGTHS = [(389, 389), (300, 777), (777, 260)]


def _mask(rng, shape, density):
    """A random mask with at least one hidden block and one kept block per (batch, head)."""
    mask = rng.random(shape) < density
    mask[..., 0, -1] = False
    mask[..., -1, 0] = True
    return mask


def _inputs(rng, case, dtype, seqlen_q, seqlen_k, head_dim=64, batch=2, heads=6, heads_kv=2):
    _, causal, block_size, (per_batch, per_head), density, extra = case
    q, k, v = gh.random_qkv(rng, batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                            heads=heads, heads_kv=heads_kv, head_dim=head_dim, dtype=dtype)
    do = gh.randn(rng, q.shape, dtype)
    blocks = (-(-seqlen_q // block_size[0]), -(-seqlen_k // block_size[1]))
    mask = _mask(rng, (batch if per_batch else 1, heads if per_head else 1, *blocks), density)
    mods = {"window": extra.get("window"), "softcap": extra.get("softcap")}
    if extra.get("alibi_slopes"):
        mods["alibi_slopes"] = rng.uniform(0.01, 0.3, (heads,)).astype(np.float32)
    if extra.get("sinks"):
        mods["sinks"] = rng.normal(0.0, 2.0, (heads,)).astype(np.float32)
    return q, k, v, do, causal, mask, block_size, mods


def _module_specs():
    from cuflash import config, launch, plan

    facts, out = launch.device_facts(0), []
    for _, kib, wgmma in FAMILIES:
        f = facts.with_budget(kib * specs.KIB if kib else None)
        cfg = config.Config(wgmma=wgmma)
        for case in CASES:
            extra = case[5]
            flags = plan.mod_flags(extra.get("window"), extra.get("softcap"),
                                   extra.get("alibi_slopes"), extra.get("sinks"), case[1],
                                   block_sparse=True)
            for dtype in ("float16", "bfloat16", "float32"):
                for head_dim in (64, 128, 256):
                    shape = plan.Shape(1, 1, 1, 1, 1, head_dim, dtype, case[1], flags)
                    out += gh.shape_specs(shape, f, cfg)
    # the wide boxed d64 causal backward (a candidate: test_causal_d64_backward_on_...)
    wide = specs.with_wide_boxed_backward(facts)
    for case in CASES:
        extra = case[5]
        flags = plan.mod_flags(extra.get("window"), extra.get("softcap"),
                               extra.get("alibi_slopes"), extra.get("sinks"), case[1],
                               block_sparse=True)
        for dtype in ("float16", "bfloat16"):
            out.append(wide(specs.select_backward(facts, dtype, 64, case[1], False,
                                                  mods=flags)))
    return out


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)
family = gh.family_fixture(FAMILIES)


def _on_gpu(mods: dict) -> dict:
    import cupy

    return {n: cupy.asarray(x) if isinstance(x, np.ndarray) else x for n, x in mods.items()}


def _check(family, case, dtype, seqlen_q, seqlen_k, head_dim):
    import cupy

    rng = gh.rng_for()
    q, k, v, do, causal, mask, block_size, mods = _inputs(rng, case, dtype, seqlen_q, seqlen_k,
                                                          head_dim=head_dim)
    label = f"{family} {case[0]} {gh.describe(q, k, dtype, causal, None)} bs={block_size}"
    sparse = dict(block_mask=mask, block_size=block_size)
    gpu_sparse = dict(block_mask=cupy.asarray(mask), block_size=block_size)
    gh.assert_call_matches_reference(q, k, v, do, causal=causal, dtype=dtype, label=label,
                                     host_kwargs={**mods, **sparse},
                                     gpu_kwargs={**_on_gpu(mods), **gpu_sparse})


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_backward_match_reference(family, case, dtype, seqlen_q, seqlen_k):
    if dtype == "float32" and family != "own":
        pytest.skip("float32 has one kernel family (the SIMT kernels)")
    _check(family, case, dtype, seqlen_q, seqlen_k, 64)


@pytest.fixture
def wide_boxed():
    """The backward selected through specs.with_wide_boxed_backward (registry.BWD90_BOXED_ONLY,
    off until this test passes on a GPU)."""
    from cuflash import launch

    knob = specs.with_wide_boxed_backward(launch.device_facts(0))
    yield from gh.hopper_selector_with_knob("select_backward", knob,
                                            "the 12-warp backward is a Hopper kernel")


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", [c for c in CASES if c[1]], ids=[c[0] for c in CASES if c[1]])
def test_causal_d64_backward_on_the_wide_boxed_tile(wide_boxed, case, dtype, seqlen_q,
                                                    seqlen_k):
    """The causal cases at head_dim 64 with the backward on the 12-warp tile boxed (its
    consumers at 240 registers, flash_bwd_sm90_ws.cu's kWideConsumers) against the float64
    reference; the selection under the knob is checked to be that tile first."""
    from cuflash import launch, plan

    extra = case[5]
    flags = plan.mod_flags(extra.get("window"), extra.get("softcap"), extra.get("alibi_slopes"),
                           extra.get("sinks"), True, block_sparse=True)
    picked = specs.select_backward(launch.device_facts(0), dtype, 64, True, False, mods=flags)
    assert picked.warps == 12 and specs.loads_with_tma(picked), picked.name
    _check("own", case, dtype, seqlen_q, seqlen_k, 64)


@pytest.mark.parametrize("head_dim", [32, 128, 256])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=[CASES[1][0], CASES[4][0]])
def test_head_dims(family, case, head_dim):
    _check(family, case, "bfloat16", 300, 555, head_dim)


def test_a_full_mask_equals_dense():
    """Every block kept: the same bits as the dense call (the kernels differ only by the
    tile cursor, which then visits every tile in the same order)."""
    import cupy

    rng = gh.rng_for()
    q, k, v = (gh.to_gpu(x) for x in gh.random_qkv(rng, batch=1, seqlen_q=700, seqlen_k=700,
                                                   heads=4, heads_kv=4, head_dim=128,
                                                   dtype="bfloat16"))
    mask = cupy.ones((1, 1, 6, 6), dtype=bool)
    dense, _ = cuflash.attention_forward(q, k, v, causal=True)
    sparse, _ = cuflash.attention_forward(q, k, v, causal=True, block_mask=mask)
    assert cupy.array_equal(dense.view(cupy.uint16), sparse.view(cupy.uint16))


def test_block_size_that_splits_a_tile_is_refused():
    import cupy

    q = cupy.asarray(gh.randn(gh.rng_for(), (1, 256, 2, 64), "float16"))
    mask = cupy.ones((1, 1, 8, 8), dtype=bool)
    with pytest.raises(ValueError, match=r"^block_size: expected multiples of the kernel's tile"):
        cuflash.attention_forward(q, q, q, block_mask=mask, block_size=(32, 32))


def test_torch_tensors_float16_and_float32():
    torch = pytest.importorskip("torch")
    rng = gh.rng_for()
    q, k, v = (gh.to_gpu(x, "torch") for x in gh.random_qkv(
        rng, batch=1, seqlen_q=300, seqlen_k=300, heads=2, heads_kv=2, head_dim=64,
        dtype="float16"))
    mask = torch.rand((1, 2, 3, 3), device="cuda") < 0.5
    mask[..., -1, 0] = True
    o, _ = cuflash.attention_forward(q, k, v, block_mask=mask)
    assert isinstance(o, torch.Tensor) and o.shape == q.shape
    o_ref, _, _ = reference.attention_reference(*(gh.to_host(x, "float16") for x in (q, k, v)),
                                                block_mask=mask.cpu().numpy())
    assert np.abs(gh.to_host(o, "float16") - o_ref).max() < 2e-2
    o32, _ = cuflash.attention_forward(q.float(), k.float(), v.float(), block_mask=mask)
    assert np.abs(gh.to_host(o32) - o_ref).max() < 1e-3


def _framework_inputs(mask_shape, seqlen_q, seqlen_k):
    """bf16 q, k, v, do (batch 2, heads 4 / 2, head_dim 64) and a mask of mask_shape."""
    rng = gh.rng_for()
    q, k, v = gh.random_qkv(rng, batch=2, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads=4,
                            heads_kv=2, head_dim=64, dtype="bfloat16")
    return q, k, v, gh.randn(rng, q.shape, "bfloat16"), _mask(rng, mask_shape, 0.5)


def _assert_like_reference(q, k, v, do, mask, causal, o, grads, label):
    """o and (dq, dk, dv), host bf16, against the reference with the mask expanded."""
    bf16 = gh.np_dtype("bfloat16")
    sparse = dict(block_mask=mask, block_size=(128, 128))
    o_ref, _, _ = reference.attention_reference(q, k, v, causal=causal, **sparse)
    o_nv = reference.attention_naive(q, k, v, causal=causal, dtype=bf16, **sparse)
    gh.assert_matches_reference("o", o, o_ref, o_nv, dtype="bfloat16", label=label)
    refs = reference.attention_backward_reference(do, q, k, v, causal=causal, o=o, **sparse)
    naives = reference.attention_backward_naive(do, q, k, v, causal=causal, dtype=bf16,
                                                **sparse)
    scale = testing.magnitude(*refs)
    for name, got, ref, naive in zip(("dq", "dk", "dv"), grads, refs, naives):
        gh.assert_matches_reference(name, got, ref, naive, dtype="bfloat16", scale=scale,
                                    label=label)


@pytest.mark.parametrize("causal", [False, True])
def test_torch_autograd(causal):
    """cuflash.torch.flash_attention with a block mask: output and gradients of q, k, v
    against the reference, through autograd."""
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    q, k, v, do, mask = _framework_inputs((2, 1, 3, 3), 333, 300)
    tq, tk, tv = (gh.to_gpu(x, "torch").requires_grad_() for x in (q, k, v))
    o = ct.flash_attention(tq, tk, tv, causal=causal,
                           block_mask=torch.from_numpy(mask).cuda())
    o.backward(gh.to_gpu(do, "torch"))
    _assert_like_reference(q, k, v, do, mask, causal, gh.to_host(o.detach(), "bfloat16"),
                           [gh.to_host(t.grad, "bfloat16") for t in (tq, tk, tv)], "torch")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_jax_grad(jit):
    """cuflash.jax.flash_attention with a block mask, eagerly and under jax.jit: the output
    and the gradients of q, k, v against the reference."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import cuflash.jax as cj

    q, k, v, do, mask = _framework_inputs((1, 4, 3, 3), 300, 333)
    jq, jk, jv, jdo = (gh.to_gpu(x, "jax") for x in (q, k, v, do))
    jmask = jax.device_put(mask, gh.jax_gpu_device())

    def loss(q_, k_, v_):
        o_ = cj.flash_attention(q_, k_, v_, causal=True, block_mask=jmask)
        return jnp.sum(o_.astype(jnp.float32) * jdo.astype(jnp.float32)), o_

    step = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, o), grads = (jax.jit(step) if jit else step)(jq, jk, jv)
    _assert_like_reference(q, k, v, do, mask, True, gh.to_host(o, "bfloat16"),
                           [gh.to_host(g, "bfloat16") for g in grads], f"jax jit={jit}")

"""The Hopper kernels' wgmma descriptors built by one add a k-step (``CF_DESC_ADD``,
cf_sm90.cuh; registry.DESC_ADD selects it by kind and bucket) hold the same bits as the
masked form, so every output the kernels write in a fixed order is bit for bit the same
with and without it: o, m, l, dK and dV (dQ is added by atomics in no fixed order, so it is
checked against the float64 reference instead). Both forms run on every fwd90 / bwd90
spec the selectors return, whichever way the registry chose."""

from __future__ import annotations

import numpy as np
import pytest

try:
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu

# (nothing compiled ahead: the module's specs are those the selectors return either way)
gpu_env, test_module_specs_compile = gh.module_setup(lambda: [])


def _form(added: bool):
    def knob(spec):
        if spec.kind not in ("fwd90", "bwd90"):
            return spec
        plain = spec.without_knob("CF_DESC_ADD")
        return plain.with_knobs(CF_DESC_ADD=1) if added else plain
    return knob


def _run(added, q, k, v, do, causal, deterministic):
    import cuflash
    from cuflash import fastpath

    with fastpath.selector_patched("select_forward", _form(added)), \
            fastpath.selector_patched("select_backward", _form(added)):
        o, stats = cuflash.attention_forward(q, k, v, causal=causal)
        grads = cuflash.attention_backward(do, q, k, v, o, stats, causal=causal,
                                           deterministic=deterministic)
    return [gh.to_host(x) for x in (o, stats.m, stats.l, *grads)]


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(300, 555), (257, 129)])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128, 192, 256])
def test_descriptor_forms_agree_bit_for_bit(head_dim, causal, deterministic, seqlen_q,
                                            seqlen_k):
    import cupy

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("wgmma descriptors: Hopper")
    rng = gh.rng_for()
    q, k, v = gh.random_qkv(rng, batch=2, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads=4,
                            heads_kv=2, head_dim=head_dim, dtype="bfloat16")
    do = gh.randn(rng, q.shape, "bfloat16")
    gpu = [gh.to_gpu(x, "torch") for x in (q, k, v, do)]
    masked = _run(False, *gpu, causal, deterministic)
    added = _run(True, *gpu, causal, deterministic)
    for name, a, b in zip(("o", "m", "l", "dq", "dk", "dv"), masked, added):
        if name == "dq" and not deterministic:  # atomics: no fixed order of the adds
            continue
        assert np.array_equal(a, b, equal_nan=True), f"{name} differs (d{head_dim})"
    o, m, l, dq, dk, dv = added
    label = f"CF_DESC_ADD d{head_dim}"
    gh.assert_forward_matches_reference(q, k, v, o, m, l, dtype="bfloat16", causal=causal,
                                        label=label)
    gh.assert_backward_matches_reference(do, q, k, v, o, dq, dk, dv, dtype="bfloat16",
                                         causal=causal, deterministic=deterministic,
                                         label=label)

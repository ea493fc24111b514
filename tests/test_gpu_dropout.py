"""Dropout (docs/dropout.md) in the CUDA kernels (``gpu`` tests).

* The kept set, exactly: with q = 0 every visible probability is the same, so with v the
  identity over a chunk of keys o shows which (query, key) pairs the forward kept, and with
  dO the identity over a chunk of queries dV shows the backward's; both must equal
  ``cuflash.dropout_mask`` element for element (several tiles each way, batch and heads, GQA
  groups of one, causal), per kernel family and in both deterministic modes.
* Against the float64 reference given the same seed and offset, forward and backward
  (dq, dk, dv, dsinks), per family: the Hopper wgmma kernels, the portable 16-bit kernels
  (wgmma off, and at a 100 KiB budget), the float32 SIMT kernels; GQA, causal, the score
  modifiers, a block mask; odd lengths. Outputs NaN-poisoned; cuflash.testing's rule.
* The same (seed, offset) reproduces the output bit for bit; another offset changes it.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import plan, specs

try:
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu

FAMILIES = [("own", None, True), ("portable", None, False), ("100k", 100, False)]
P = 0.17
# (name, causal, heads, heads_kv, modifiers, block mask)
CASES = [
    ("plain", False, 4, 4, {}, False),
    ("causal_gqa", True, 6, 2, {}, False),
    ("window+alibi", False, 6, 2, {"window": (300, 90), "alibi_slopes": True}, False),
    ("softcap+sinks", True, 4, 2, {"softcap": 4.0, "sinks": True}, False),
    ("block_mask", True, 6, 2, {}, True),
]
LENGTHS = [(389, 389), (300, 777), (777, 260)]


def mod_flags(case) -> specs.ModFlags:
    """A case's ModFlags (dropout on): what the selectors are asked with."""
    _, causal, _, _, extra, sparse = case
    return plan.mod_flags(extra.get("window"), extra.get("softcap"), extra.get("alibi_slopes"),
                          extra.get("sinks"), causal, block_sparse=sparse, dropout=True)


def _module_specs():
    from cuflash import config, launch

    facts, out = launch.device_facts(0), []
    for _, kib, wgmma in FAMILIES:
        f = facts.with_budget(kib * specs.KIB if kib else None)
        cfg = config.Config(wgmma=wgmma)
        for case in CASES:
            causal, flags = case[1], mod_flags(case)
            for dtype in ("float16", "bfloat16", "float32"):
                for head_dim in (64, 128, 192, 256):
                    shape = plan.Shape(1, 1, 1, 1, 1, head_dim, dtype, causal, flags)
                    out += gh.shape_specs(shape, f, cfg)
    return out


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)
family = gh.family_fixture(FAMILIES)


def _seed(rng) -> dict:
    return dict(dropout_p=P, dropout_seed=int(rng.integers(0, 2**63)) * 2 + 1,
                dropout_offset=int(rng.integers(0, 2**32)))


# -- the kept set, exactly -----------------------------------------------------------------

def _identity_chunks(length: int, head_dim: int, dtype: str):
    """(c0, x): x (length, head_dim) is the identity on rows c0 .. c0 + head_dim - 1 and zero
    elsewhere, for each chunk of ``length`` rows."""
    for c0 in range(0, length, head_dim):
        x = np.zeros((length, head_dim), np.float32)
        n = min(head_dim, length - c0)
        x[c0 + np.arange(n), np.arange(n)] = 1.0
        yield c0, n, x.astype(gh.np_dtype(dtype))


def _broadcast(x, batch, heads):
    """(s, d) -> (batch, s, heads, d)."""
    return np.ascontiguousarray(np.broadcast_to(x[None, :, None, :], (batch,) + x.shape[:1]
                                                + (heads,) + x.shape[1:]))


def hopper_selections(head_dims):
    """(facts, dtype, head_dim, causal, flags) for every case of CASES, both 16-bit dtypes and
    ``head_dims`` on device 0, if a Hopper GPU (none otherwise): the candidates' module specs."""
    from cuflash import launch

    facts = launch.device_facts(0)
    if facts.arch != "sm_90":
        return
    for case in CASES:
        for dtype in ("float16", "bfloat16"):
            for d in head_dims:
                yield facts, dtype, d, case[1], mod_flags(case)


def check_forward_bitwise(case, head_dim: int, seqlen_q: int, seqlen_k: int, baseline, knob,
                          knob_name: str, knob_value, label: str):
    """The forward with every spec passed through ``knob`` (each spec it ran must have
    ``knob_name`` at ``knob_value``, the baseline's none) bit for bit the forward through
    ``baseline`` (o, m, l; bf16): the candidates that draw the same flags another way. Returns
    the specs the candidate ran, or None where none took the knob (the caller skips)."""
    import cupy

    rng = gh.rng_for()
    q, k, v, _, causal, mods, issue15 = _inputs(rng, case, "bfloat16", seqlen_q, seqlen_k,
                                                head_dim)
    kwargs = _on_gpu({**mods, **issue15})
    q, k, v = (gh.to_gpu(x) for x in (q, k, v))
    want_o, want_stats, before = gh.forward_planned(q, k, v, causal, kwargs, baseline)
    got_o, got_stats, ran = gh.forward_planned(q, k, v, causal, kwargs, knob)
    if not any(dict(s.knobs).get(knob_name) for s in ran):
        return None
    assert [dict(s.knobs).get(knob_name) for s in ran] == [knob_value], (ran, label)
    assert not any(dict(s.knobs).get(knob_name) for s in before), (before, label)
    assert cupy.array_equal(got_o.view(cupy.uint16), want_o.view(cupy.uint16)), label
    for name in ("m", "l"):
        assert cupy.array_equal(getattr(got_stats, name), getattr(want_stats, name)), \
            f"{name}: {label}"
    return ran


def check_kept_set_under(knob, knob_name: str, knob_value, head_dim: int, causal: bool) -> None:
    """With q = 0 and v the identity over a chunk of keys, o shows the kept set: the forward
    with every spec passed through ``knob`` (each spec it ran must have ``knob_name`` at
    ``knob_value``) against ``cuflash.dropout_mask`` (bf16; the candidates' test files)."""
    rng = gh.rng_for()
    batch, heads, seqlen_q, seqlen_k = 2, 3, 300, 2 * head_dim + 40
    drop = _seed(rng)
    want = cuflash.dropout_mask(batch, heads, seqlen_q, seqlen_k, dropout_p=P,
                                seed=drop["dropout_seed"], offset=drop["dropout_offset"])
    if causal:
        want &= np.tril(np.ones((seqlen_q, seqlen_k), bool), seqlen_k - seqlen_q)
    q = gh.to_gpu(np.zeros((batch, seqlen_q, heads, head_dim), gh.np_dtype("bfloat16")))
    k = gh.to_gpu(gh.randn(rng, (batch, seqlen_k, heads, head_dim), "bfloat16"))
    kept = np.zeros_like(want)
    for c0, n, eye in _identity_chunks(seqlen_k, head_dim, "bfloat16"):
        v = gh.to_gpu(_broadcast(eye, batch, heads))
        o, _, ran = gh.forward_planned(q, k, v, causal, drop, knob)
        assert [dict(s.knobs).get(knob_name) for s in ran] == [knob_value], ran
        kept[..., c0:c0 + n] = (gh.to_host(o, "bfloat16") != 0).transpose(0, 2, 1, 3)[..., :n]
    np.testing.assert_array_equal(kept, want, err_msg=f"kept set d{head_dim} causal={causal}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kept_set_is_dropout_mask(family, dtype, causal):
    if dtype == "float32" and family != "own":
        pytest.skip("float32 has one kernel family (the SIMT kernels)")
    import cupy

    rng = gh.rng_for()
    batch, heads, seqlen_q, seqlen_k, head_dim = 2, 3, 300, 200, 64
    drop = _seed(rng)
    want = cuflash.dropout_mask(batch, heads, seqlen_q, seqlen_k, dropout_p=P,
                                seed=drop["dropout_seed"], offset=drop["dropout_offset"])
    visible = np.tril(np.ones((seqlen_q, seqlen_k), bool), seqlen_k - seqlen_q) if causal \
        else np.ones((seqlen_q, seqlen_k), bool)
    want = want & visible
    q = gh.to_gpu(np.zeros((batch, seqlen_q, heads, head_dim), gh.np_dtype(dtype)))
    k = gh.to_gpu(gh.randn(rng, (batch, seqlen_k, heads, head_dim), dtype))
    label = f"{family} {dtype} causal={causal} {drop}"

    kept_fwd = np.zeros_like(want)
    o = stats = None
    for c0, n, eye in _identity_chunks(seqlen_k, head_dim, dtype):
        v = gh.to_gpu(_broadcast(eye, batch, heads))
        o, stats = cuflash.attention_forward(q, k, v, causal=causal, **drop)
        kept_fwd[..., c0:c0 + n] = (gh.to_host(o, dtype) != 0).transpose(0, 2, 1, 3)[..., :n]
    np.testing.assert_array_equal(kept_fwd, want, err_msg=f"forward kept set, {label}")

    v = gh.to_gpu(gh.randn(rng, (batch, seqlen_k, heads, head_dim), dtype))
    o, stats = cuflash.attention_forward(q, k, v, causal=causal, **drop)
    for deterministic in (False, True):
        kept_bwd = np.zeros_like(want)
        for c0, n, eye in _identity_chunks(seqlen_q, head_dim, dtype):
            do = gh.to_gpu(_broadcast(eye, batch, heads))
            _, _, dv = cuflash.attention_backward(do, q, k, v, o, stats, causal=causal,
                                                  deterministic=deterministic, **drop)
            # dv[b, j, h, i - c0] = P_ij Z_ij / (1 - p): nonzero exactly where kept
            dv_host = gh.to_host(dv, dtype).transpose(0, 2, 3, 1)  # (b, h, i - c0, j)
            kept_bwd[:, :, c0:c0 + n, :] = dv_host[:, :, :n, :] != 0
        np.testing.assert_array_equal(kept_bwd, want,
                                      err_msg=f"backward kept set det={deterministic}, {label}")
    cupy.cuda.Device().synchronize()


# -- against the reference ------------------------------------------------------------------

def _inputs(rng, case, dtype, seqlen_q, seqlen_k, head_dim, batch=2):
    _, causal, heads, heads_kv, extra, sparse = case
    q, k, v = gh.random_qkv(rng, batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                            heads=heads, heads_kv=heads_kv, head_dim=head_dim, dtype=dtype)
    do = gh.randn(rng, q.shape, dtype)
    mods = {"window": extra.get("window"), "softcap": extra.get("softcap")}
    if extra.get("alibi_slopes"):
        mods["alibi_slopes"] = rng.uniform(0.01, 0.3, (heads,)).astype(np.float32)
    if extra.get("sinks"):
        mods["sinks"] = rng.normal(0.0, 2.0, (heads,)).astype(np.float32)
    issue15 = _seed(rng)
    if sparse:
        blocks = (-(-seqlen_q // 128), -(-seqlen_k // 128))
        mask = rng.random((batch, heads, *blocks)) < 0.6
        mask[..., -1, 0] = True
        issue15.update(block_mask=mask, block_size=(128, 128))
    return q, k, v, do, causal, mods, issue15


def _on_gpu(kw: dict) -> dict:
    import cupy

    return {n: cupy.asarray(x) if isinstance(x, np.ndarray) else x for n, x in kw.items()}


def _check(family, case, dtype, seqlen_q, seqlen_k, head_dim):
    rng = gh.rng_for()
    q, k, v, do, causal, mods, issue15 = _inputs(rng, case, dtype, seqlen_q, seqlen_k,
                                                 head_dim)
    label = (f"{family} {case[0]} {gh.describe(q, k, dtype, causal, None)} "
             f"seed={issue15['dropout_seed']} offset={issue15['dropout_offset']}")
    gh.assert_call_matches_reference(q, k, v, do, causal=causal, dtype=dtype, label=label,
                                     host_kwargs={**mods, **issue15},
                                     gpu_kwargs=_on_gpu({**mods, **issue15}))


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_backward_match_reference(family, case, dtype, seqlen_q, seqlen_k):
    if dtype == "float32" and family != "own":
        pytest.skip("float32 has one kernel family (the SIMT kernels)")
    _check(family, case, dtype, seqlen_q, seqlen_k, 64)


# 192 / 256: the Hopper forward's overlapped loop (CF_FWD_OVERLAP 3 / 2, 1 or none by the set)
@pytest.mark.parametrize("head_dim", [128, 192, 256])
@pytest.mark.parametrize("case", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_head_dims(family, case, head_dim):
    _check(family, case, "bfloat16", 300, 555, head_dim)


def test_same_seed_is_bit_for_bit_and_offset_changes_it():
    import cupy

    rng = gh.rng_for()
    q, k, v = (gh.to_gpu(x) for x in gh.random_qkv(rng, batch=2, seqlen_q=700, seqlen_k=700,
                                                   heads=4, heads_kv=2, head_dim=128,
                                                   dtype="bfloat16"))
    drop = _seed(rng)
    a, _ = cuflash.attention_forward(q, k, v, causal=True, **drop)
    b, stats = cuflash.attention_forward(q, k, v, causal=True, **drop)
    assert cupy.array_equal(a.view(cupy.uint16), b.view(cupy.uint16))
    c, _ = cuflash.attention_forward(q, k, v, causal=True,
                                     **{**drop, "dropout_offset": drop["dropout_offset"] ^ 1})
    assert not cupy.array_equal(a.view(cupy.uint16), c.view(cupy.uint16))
    do = gh.to_gpu(gh.randn(rng, q.shape, "bfloat16"))
    first = cuflash.attention_backward(do, q, k, v, a, stats, causal=True, deterministic=True,
                                       **drop)
    again = cuflash.attention_backward(do, q, k, v, a, stats, causal=True, deterministic=True,
                                       **drop)
    for x, y in zip(first, again):
        assert cupy.array_equal(x.view(cupy.uint16), y.view(cupy.uint16))


def test_zero_p_runs_the_dense_kernels():
    import cupy

    q = gh.to_gpu(gh.randn(gh.rng_for(), (1, 200, 2, 64), "float16"))
    dense, _ = cuflash.attention_forward(q, q, q)
    off, _ = cuflash.attention_forward(q, q, q, dropout_p=0.0)
    assert cupy.array_equal(dense.view(cupy.uint16), off.view(cupy.uint16))

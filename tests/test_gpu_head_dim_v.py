"""v's own head_dim on the Hopper kernels (issue #15's pairs, ``gpu`` tests; sm_90 only):
the forward (flash_fwd_sm90.cu with CF_HEAD_DIM_V) and the backward's role split
(flash_bwd_sm90.cu) take head_dim_v != head_dim as it is (the default;
``CUFLASH_HEAD_DIM_V_NATIVE=0`` keeps the padded copies).

Each call goes through the API on CuPy arrays against the float64 reference, outputs
NaN-poisoned, cuflash.testing's rule, and checks that no zero-padded copy was made where a
kernel takes the pair (``head_pad.pad`` is watched). The deterministic backward keeps the
copies (the role split has no ordered mode), and is checked too.
"""

from __future__ import annotations

import numpy as np
import pytest

from cuflash import head_pad, launch, plan, specs

try:
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu

# (head_dim, head_dim_v): DeepSeek's (192, 128) first; forward and backward native where q's
# bucket is 192 or 256 and v narrower, forward only otherwise
PAIRS = [(192, 128), (256, 128), (192, 64), (176, 128), (128, 64), (64, 128), (128, 256)]
MOD_SETS = {
    "plain": {},
    "window_softcap": {"window": (40, 7), "softcap": 20.0},
    "alibi": {"alibi_slopes": "heads"},
    "sinks": {"sinks": "heads"},
}


def _hopper() -> bool:
    return launch.device_facts(0).arch in specs.WGMMA_ARCHS


def _module_specs():
    if not _hopper():
        return []
    facts = launch.device_facts(0)
    out = []
    for d, dv in PAIRS:
        for dtype in ("bfloat16", "float16"):
            for causal in (False, True):
                for name in MOD_SETS:
                    mods = plan.mod_flags(MOD_SETS[name].get("window"),
                                          MOD_SETS[name].get("softcap"),
                                          MOD_SETS[name].get("alibi_slopes"),
                                          MOD_SETS[name].get("sinks"), causal)
                    shape = plan.Shape(1, 1, 1, 1, 1, d, dtype, causal, mods, head_dim_v=dv)
                    out += gh.shape_specs(shape, facts, plan.Config(), backward=(False,))
    return out


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


@pytest.fixture
def native(monkeypatch):
    """The native pairs on, and a count of the zero-padded copies made."""
    if not _hopper():
        pytest.skip("the pair kernels are Hopper's (sm_90)")
    monkeypatch.setenv("CUFLASH_HEAD_DIM_V_NATIVE", "1")
    copies = []
    real_pad = head_pad.pad

    def counting_pad(x, width):
        copies.append((tuple(x.shape), width))
        return real_pad(x, width)

    monkeypatch.setattr(head_pad, "pad", counting_pad)
    return copies


def _arrays(rng, d, dv, dtype, batch, seqlen_q, seqlen_k, heads, heads_kv):
    q = gh.randn(rng, (batch, seqlen_q, heads, d), dtype)
    k = gh.randn(rng, (batch, seqlen_k, heads_kv, d), dtype)
    v = gh.randn(rng, (batch, seqlen_k, heads_kv, dv), dtype)
    do = gh.randn(rng, (batch, seqlen_q, heads, dv), dtype)
    return q, k, v, do


def _kwargs(name, heads):
    host, gpu = {}, {}
    for key, value in MOD_SETS[name].items():
        if value == "heads":  # a float32 (heads,) array: ALiBi slopes or sink logits
            rng = np.random.default_rng(7)
            arr = (rng.uniform(0.05, 0.5, heads) if key == "alibi_slopes"
                   else rng.normal(size=heads)).astype(np.float32)
            host[key], gpu[key] = arr, gh.to_gpu(arr)
        else:
            host[key] = gpu[key] = value
    return host, gpu


def _native_spec_names(d, dv, dtype, causal, name, batch, seqlen_q, seqlen_k, heads,
                       heads_kv) -> tuple[str, str | None]:
    """The forward's and the atomic backward's main spec for this call (None: padded)."""
    host, _ = _kwargs(name, heads)
    mods = plan.mod_flags(host.get("window"), host.get("softcap"), host.get("alibi_slopes"),
                          host.get("sinks"), causal)
    shape = plan.Shape(batch, seqlen_q, seqlen_k, heads, heads_kv, d, dtype, causal, mods,
                       head_dim_v=dv)
    fwd = launch.forward_plan(shape, 0).kernel.spec.name
    try:
        bwd = launch.backward_plan(shape, 0, False).main.spec.name
    except ValueError:
        bwd = None
    return fwd, bwd


@pytest.mark.parametrize("name", list(MOD_SETS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("pair", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_gpu_pair_matches_reference(native, pair, dtype, causal, name):
    """Forward and both backward modes against the reference, odd lengths, GQA 4/2; the
    forward (and the atomic backward where q's bucket is 192 / 256) with no copies."""
    d, dv = pair
    rng = gh.rng_for()
    dims = dict(batch=2, seqlen_q=157, seqlen_k=301, heads=4, heads_kv=2)
    q, k, v, do = _arrays(rng, d, dv, dtype, **dims)
    host, gpu = _kwargs(name, dims["heads"])
    fwd, bwd = _native_spec_names(d, dv, dtype, causal, name, **dims)
    assert f"_v{dv}_" in fwd, fwd
    label = f"d{d}/{dv} {dtype} causal={causal} {name} [{fwd}; {bwd}]"
    gh.assert_call_matches_reference(q, k, v, do, causal=causal, dtype=dtype, label=label,
                                     host_kwargs=host, gpu_kwargs=gpu)
    # the deterministic backward pads: q, k, v, o, dO once; every other call none
    padded_calls = 1 if bwd is not None else 2
    assert len(native) == 5 * padded_calls, (label, native)


BALANCE = "CF_BWD_DQ_BALANCE"


@pytest.fixture(params=[0, 1], ids=["dq_first0", "dq_first1"])
def balanced(request, native):
    """The pair backward with dQ's panels balanced (CF_BWD_DQ_BALANCE=1, a candidate), its
    first panel issued before dK / dV or not; the copies counted as ``native``'s."""
    def knob(spec):
        return spec.with_knobs(**{BALANCE: 1, "CF_BWD_DQ_FIRST": request.param})

    gen = gh.selector_with_knob("select_backward_pair", knob)
    next(gen)
    yield native
    next(gen, None)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pair", [(192, 128), (256, 128), (192, 64)],
                         ids=["192-128", "256-128", "192-64"])
def test_gpu_pair_balanced_dq_panels(balanced, pair, causal):
    """The role split with dQ's panels balanced over the warpgroups (warpgroup 1 takes 2 or
    3 of them) against the reference; GQA 4/2 at odd lengths, and at (192, 128) GQA 16/2,
    whose kv heads split over blocks."""
    d, dv = pair
    dims = dict(batch=2, seqlen_q=157, seqlen_k=301, heads=4, heads_kv=2)
    if pair == (192, 128):
        dims = dict(batch=1, seqlen_q=384, seqlen_k=384, heads=16, heads_kv=2)
    shape = plan.Shape(dims["batch"], dims["seqlen_q"], dims["seqlen_k"], dims["heads"],
                       dims["heads_kv"], d, "bfloat16", causal, head_dim_v=dv)
    assert (BALANCE, 1) in launch.backward_plan(shape, 0, False).main.spec.knobs
    rng = gh.rng_for()
    q, k, v, do = _arrays(rng, d, dv, "bfloat16", **dims)
    gh.assert_call_matches_reference(q, k, v, do, causal=causal, dtype="bfloat16",
                                     label=f"d{d}/{dv} balanced dQ", host_kwargs={},
                                     gpu_kwargs={})
    assert len(balanced) == 5, balanced  # the deterministic backward's copies only


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_pair_split_kv_heads(native, causal):
    """GQA 16/2 at a small batch: the backward splits a kv head's query heads over blocks
    (plan.kv_head_splits > 1), so dV goes through the float32 accumulator of v's width."""
    d, dv, dtype = 192, 128, "bfloat16"
    dims = dict(batch=1, seqlen_q=384, seqlen_k=384, heads=16, heads_kv=2)
    shape = plan.Shape(1, 384, 384, 16, 2, d, dtype, causal, head_dim_v=dv)
    assert launch.backward_plan(shape, 0, False).kv_splits > 1
    rng = gh.rng_for()
    q, k, v, do = _arrays(rng, d, dv, dtype, **dims)
    gh.assert_call_matches_reference(q, k, v, do, causal=causal, dtype=dtype,
                                     label=f"d{d}/{dv} split kv heads causal={causal}",
                                     host_kwargs={}, gpu_kwargs={})


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_pair_varlen(native, causal):
    """Packed sequences (the path transformers takes for padded batches) with (192, 128):
    the varlen kernels take the pair as it is (no copies in the atomic mode)."""
    import cupy

    import cuflash
    from cuflash import reference, testing

    cu_q, cu_k = np.int32([0, 137, 137, 382, 391]), np.int32([0, 270, 290, 410, 410])
    rng = gh.rng_for()
    q = gh.randn(rng, (1, 391, 4, 192), "bfloat16")[0]
    k = gh.randn(rng, (1, 410, 2, 192), "bfloat16")[0]
    v = gh.randn(rng, (1, 410, 2, 128), "bfloat16")[0]
    do = gh.randn(rng, (1, 391, 4, 128), "bfloat16")[0]
    gq, gk, gv, gdo = (gh.to_gpu(x[None])[0] for x in (q, k, v, do))
    args = (cupy.asarray(cu_q), cupy.asarray(cu_k), 245, 270)
    o, stats = cuflash.attention_varlen_forward(gq, gk, gv, *args, causal=causal)
    o_host = gh.to_host(o[None], "bfloat16")[0]
    o_ref = reference.attention_varlen_reference(q, k, v, cu_q, cu_k, causal=causal)[0]
    o_nv = reference.attention_varlen_naive(q, k, v, cu_q, cu_k, causal=causal, dtype=q.dtype)
    gh.assert_matches_reference("o", o_host, o_ref, o_nv, dtype="bfloat16", label="varlen")
    refs = reference.attention_varlen_backward_reference(do, q, k, v, cu_q, cu_k,
                                                         causal=causal, o=o_host)
    naives = reference.attention_varlen_backward_naive(do, q, k, v, cu_q, cu_k, causal=causal,
                                                       dtype=q.dtype)
    grads = cuflash.attention_varlen_backward(gdo, gq, gk, gv, o, stats, *args, causal=causal)
    scale = testing.magnitude(*refs)
    for name, got, ref, naive in zip(("dq", "dk", "dv"), grads, refs, naives):
        gh.assert_matches_reference(name, gh.to_host(got[None], "bfloat16")[0], ref, naive,
                                    dtype="bfloat16", scale=scale, label="varlen")
    assert native == [], native  # no padded copies


def test_gpu_pair_copies_with_the_switch_off(monkeypatch):
    """CUFLASH_HEAD_DIM_V_NATIVE=0: the copies run (the kernels above are the default)."""
    monkeypatch.setenv("CUFLASH_HEAD_DIM_V_NATIVE", "0")
    assert not head_pad.native_pairs()

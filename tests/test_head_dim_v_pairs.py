"""v's own head_dim on the Hopper kernels (issue #15's pairs): the selection, the specs'
defines and shared memory, the plan's workspace, and the switch that keeps them off until
their GPU tests have run. No GPU (the kernels: tests/test_gpu_head_dim_v.py; their
compilation: tests/test_compile.py)."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import pytest

import cuflash
from cuflash import api, cpu, head_pad, launch, plan, reference, specs, validate
from cuflash.interop import Framework, Imported

H100 = specs.facts_for_arch("sm_90")


@pytest.mark.parametrize("head_dim, head_dim_v, bucket", [
    (192, 128, 192), (176, 128, 192), (256, 128, 256), (128, 64, 128), (64, 128, 64),
    (128, 256, 128), (192, 64, 192)])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_pair_spec(head_dim, head_dim_v, bucket, causal):
    spec = specs.select_forward_pair(H100, "bfloat16", head_dim, head_dim_v, causal)
    assert (spec.kind, spec.warps, spec.head_dim, spec.head_dim_v) == (
        "fwd90", 8, bucket, head_dim_v)
    assert spec.defines["CF_HEAD_DIM_V"] == head_dim_v
    assert f"_d{bucket}_v{head_dim_v}_" in spec.name
    overlap = dict(spec.knobs).get("CF_FWD_OVERLAP", 0)
    v_stages = 2 + (1 if overlap else 0)
    # flash_fwd_sm90.cu's kTiles: Q, two K stages at q's width, the V stages at v's (and
    # value 3's stage mbarriers)
    assert spec.smem_bytes == 2 * (128 * bucket + 2 * 64 * bucket + v_stages * 64 * head_dim_v) \
        + (128 if overlap == 3 else 0)
    assert spec.smem_bytes <= H100.smem_optin


@pytest.mark.parametrize("head_dim, head_dim_v", [(192, 128), (192, 64), (256, 128),
                                                  (256, 192)])
def test_backward_pair_spec(head_dim, head_dim_v):
    spec = specs.select_backward_pair(H100, "float16", head_dim, head_dim_v, True, False)
    assert (spec.kind, spec.warps, spec.block_m, spec.block_n) == ("bwd90", 8, 64, 64)
    assert spec.dq_atomic and not spec.dq_ordered and spec.head_dim_v == head_dim_v
    d, dv = head_dim, head_dim_v
    # flash_bwd_sm90.cu's kSmemBytes (the role split: dS^T and P^T)
    assert spec.smem_bytes == (64 * (d + dv) + 2 * 64 * (d + dv) + 2 * 64 * 64) * 2 + 2 * 2 * 64 * 4


@pytest.mark.parametrize("why, call", [
    ("not Hopper", lambda: specs.select_forward_pair(specs.facts_for_arch("sm_80"), "bfloat16",
                                                     192, 128, False)),
    ("float32", lambda: specs.select_forward_pair(H100, "float32", 192, 128, False)),
    ("no wgmma", lambda: specs.select_forward_pair(H100, "bfloat16", 192, 128, False,
                                                   wgmma=False)),
    ("v at q's bucket", lambda: specs.select_forward_pair(H100, "bfloat16", 120, 128, False)),
    ("v not whole panels", lambda: specs.select_forward_pair(H100, "bfloat16", 192, 96, False)),
    ("q's bucket not whole panels", lambda: specs.select_forward_pair(H100, "bfloat16", 96, 128,
                                                                      False)),
    ("backward below 192", lambda: specs.select_backward_pair(H100, "bfloat16", 128, 64, False,
                                                              False)),
    ("backward v wider", lambda: specs.select_backward_pair(H100, "bfloat16", 192, 256, False,
                                                            False)),
    ("deterministic", lambda: specs.select_backward_pair(H100, "bfloat16", 192, 128, False,
                                                         True)),
])
def test_pairs_no_kernel_takes(why, call):
    with pytest.raises(ValueError, match="head_dim"):
        call()


def test_other_specs_keep_their_names_and_defines():
    """A spec with v at q's width has no head_dim_v: names (cache keys) and -D lists as
    before, so those kernels' code is unchanged."""
    for spec in specs.all_specs(H100):
        assert spec.head_dim_v == 0 and "CF_HEAD_DIM_V" not in spec.defines
        assert spec.dv == spec.head_dim


def test_plans_of_a_pair():
    shape = plan.Shape(1, 384, 384, 16, 2, 192, "bfloat16", True, head_dim_v=128)
    assert shape.dv == 128 and plan.Shape(1, 1, 1, 1, 1, 64, "bfloat16", False).dv == 64
    forward = plan.plan_forward(shape, H100)
    assert forward.kernel.spec.head_dim_v == 128
    backward = plan.plan_backward(shape, H100, False)
    assert backward.main.spec.head_dim_v == 128
    ws = backward.scratch
    if backward.kv_splits > 1:  # dK at q's width, dV at v's
        assert ws.dv_accum - ws.dk_accum >= 4 * 384 * 2 * 192
        assert ws.zeroed_bytes - ws.dv_accum >= 4 * 384 * 2 * 128
    with pytest.raises(ValueError, match="deterministic"):
        plan.plan_backward(shape, H100, True)


def test_native_pairs_switch(monkeypatch):
    monkeypatch.delenv("CUFLASH_HEAD_DIM_V_NATIVE", raising=False)
    assert head_pad.native_pairs()  # on by default
    monkeypatch.setenv("CUFLASH_HEAD_DIM_V_NATIVE", "0")
    assert not head_pad.native_pairs()
    problem = validate.Problem(batch=1, seqlen_q=8, seqlen_k=8, heads=2, heads_kv=2,
                               head_dim=192, dtype="bfloat16", causal=False,
                               softmax_scale=0.1, device=("cuda", 0))
    assert not api._pair_runs(problem, 128, validate.NO_MODIFIERS, None)  # off: no lookup
    monkeypatch.setenv("CUFLASH_HEAD_DIM_V_NATIVE", "1")
    assert head_pad.native_pairs()


def _kernels_on_the_cpu(monkeypatch, seen: list) -> None:
    """The API's CUDA branch with the switch on, the kernels replaced by the CPU path (each
    call's widths recorded in ``seen``) and the plans by an H100's (no device)."""

    def fake_fwd(q, k, v, *, dtype, causal, softmax_scale, **kw):
        seen.append(("fwd", q.shape[-1], k.shape[-1], v.shape[-1]))
        return cpu.flash_forward_cpu(q, k, v, causal=causal, softmax_scale=softmax_scale)

    def fake_bwd(do, q, k, v, o, m, l, *, dtype, causal, softmax_scale, deterministic, **kw):
        seen.append(("bwd", do.shape[-1], q.shape[-1], v.shape[-1]))
        return cpu.flash_backward_cpu(do, q, k, v, o, m, l, causal=causal,
                                      softmax_scale=softmax_scale)

    def takes_pair(shape, device_id, deterministic=None):  # as launch's, on an H100's facts
        try:
            if deterministic is None:
                plan.plan_forward(replace(shape, dtype="bfloat16"), H100)
            else:
                plan.plan_backward(replace(shape, dtype="bfloat16"), H100, deterministic)
        except ValueError:
            return False
        return True

    monkeypatch.setenv("CUFLASH_HEAD_DIM_V_NATIVE", "1")
    monkeypatch.setattr(launch, "takes_pair", takes_pair)
    monkeypatch.setattr(launch, "backward_head_dim",
                        lambda shape, device_id, deterministic: shape.head_dim)
    monkeypatch.setattr(launch, "flash_forward_gpu", fake_fwd)
    monkeypatch.setattr(launch, "flash_backward_gpu", fake_bwd)
    monkeypatch.setattr(api, "import_array",
                        lambda x, name: Imported(x, Framework.CUPY, ("cuda", 0)))
    monkeypatch.setattr(api, "caller_stream", lambda iq: contextlib.nullcontext())
    monkeypatch.setattr(api, "export_array", lambda x, like: x)


@pytest.mark.parametrize("head_dim, head_dim_v, backward_native", [
    (192, 128, True), (256, 64, True), (64, 128, False), (59, 40, False)])
def test_native_dispatch(monkeypatch, head_dim, head_dim_v, backward_native):
    """The forward gets the caller's q, k, v (v narrower or wider) where a Hopper kernel
    takes the pair, the atomic backward too where one does, the deterministic backward
    padded copies; results like the reference."""
    seen = []
    _kernels_on_the_cpu(monkeypatch, seen)
    rng = np.random.default_rng(head_dim + head_dim_v)
    q, k = (rng.standard_normal((1, n, 2, head_dim)).astype(np.float32) for n in (21, 34))
    v = rng.standard_normal((1, 34, 2, head_dim_v)).astype(np.float32)
    do = rng.standard_normal((1, 21, 2, head_dim_v)).astype(np.float32)
    o, stats = cuflash.attention_forward(q, k, v, causal=True)
    grads = [cuflash.attention_backward(do, q, k, v, o, stats, causal=True,
                                              deterministic=det) for det in (False, True)]
    width = head_pad.kernel_dim(head_dim, head_dim_v)
    forward_native = head_dim % 64 == 0  # q's bucket whole panels
    assert seen[0] == (("fwd", head_dim, head_dim, head_dim_v) if forward_native
                       else ("fwd", width, width, width))
    assert seen[1] == (("bwd", head_dim_v, head_dim, head_dim_v) if backward_native
                       else ("bwd", width, width, width))
    assert seen[2] == ("bwd", width, width, width)  # deterministic: copies
    np.testing.assert_allclose(o, reference.attention_reference(q, k, v, causal=True)[0],
                               atol=2e-6)
    refs = reference.attention_backward_reference(do, q, k, v, causal=True, o=o)
    for got in grads:
        for g, want in zip(got, refs):
            np.testing.assert_allclose(g, want, atol=1e-5)


def test_a_misaligned_pair_runs_on_copies(monkeypatch):
    """The pair kernels read the caller's arrays in place: a v whose rows are not on 16-byte
    boundaries goes to the padded copies (which are) instead, forward and backward."""
    seen = []
    _kernels_on_the_cpu(monkeypatch, seen)
    rng = np.random.default_rng(7)
    q, k = (rng.standard_normal((1, n, 2, 192)).astype(np.float32) for n in (21, 34))
    flat = rng.standard_normal(34 * 2 * 128 + 1).astype(np.float32)
    v = flat[1:].reshape(1, 34, 2, 128)  # 4 bytes past the buffer's start
    assert v.ctypes.data % 16
    do = rng.standard_normal((1, 21, 2, 128)).astype(np.float32)
    o, stats = cuflash.attention_forward(q, k, v)
    cuflash.attention_backward(do, q, k, v, o, stats)
    assert seen == [("fwd", 192, 192, 192), ("bwd", 192, 192, 192)]
    seen.clear()
    v = v.copy()  # a new buffer: aligned
    o, stats = cuflash.attention_forward(q, k, v)
    cuflash.attention_backward(do, q, k, v, o, stats)
    assert seen == [("fwd", 192, 192, 128), ("bwd", 128, 192, 128)]

"""One NaN rule for the CPU path, the kernels and the reference (issue #9 item 8).

A NaN in a score that a row sees shows in that row's o and l and flows into the gradients:
the row's dq, and dk, dv of every key the row sees (as torch's float32 autograd computes
them). A NaN in a score the row does not see (causally hidden) changes nothing. Before,
the CPU path took such a row for one that "sees no key" (m = -inf, l = 0) and gave finite
dV where the reference and torch give NaN.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import reference

from gpu_helpers import to_gpu, to_host

CASES = [  # (id, which input gets a NaN, index, causal)
    ("q-row", "q", (0, 3, 1, 5), False),
    ("k-key-causal", "k", (1, 6, 0, 2), True),  # only queries that see key 6 go NaN
    ("k-last-key-causal", "k", (0, 10, 1, 0), True),
    ("v-value", "v", (0, 2, 1, 7), False),
]
SHAPE_Q, SHAPE_KV = (2, 9, 4, 8), (2, 11, 2, 8)  # GQA, seqlen_q != seqlen_k


def inputs(which, index, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"q": rng.standard_normal(SHAPE_Q), "k": rng.standard_normal(SHAPE_KV),
              "v": rng.standard_normal(SHAPE_KV), "do": rng.standard_normal(SHAPE_Q)}
    arrays = {name: a.astype(np.float32) for name, a in arrays.items()}
    arrays[which][index] = np.nan
    return arrays


def expected(a, causal):
    o, _, l = reference.attention_reference(a["q"], a["k"], a["v"], causal=causal)
    grads = reference.attention_backward_reference(a["do"], a["q"], a["k"], a["v"],
                                                   causal=causal)
    return (o, l, *grads)


def assert_same_nan_rule(got, want, names=("o", "l", "dq", "dk", "dv")):
    for name, g, w in zip(names, got, want):
        g = np.asarray(g, dtype=np.float64)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=f"{name}: NaN pattern")
        finite = ~np.isnan(w)
        np.testing.assert_allclose(g[finite], w[finite], rtol=2e-4, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("case_id, which, index, causal", CASES, ids=[c[0] for c in CASES])
def test_cpu_path_follows_the_nan_rule(case_id, which, index, causal):
    a = inputs(which, index)
    o, stats = cuflash.attention_forward(a["q"], a["k"], a["v"], causal=causal)
    grads = cuflash.attention_backward(a["do"], a["q"], a["k"], a["v"], o, stats, causal=causal)
    want = expected(a, causal)
    assert np.isnan(want[0]).any() and np.isnan(want[2]).any()  # the case reaches o and dq
    assert not np.isnan(want[0]).all()  # and leaves other rows alone
    assert_same_nan_rule((o, stats.l, *grads), want)


@pytest.mark.parametrize("case_id, which, index, causal", CASES, ids=[c[0] for c in CASES])
def test_nan_rule_matches_torch_autograd(case_id, which, index, causal):
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    a = inputs(which, index)
    q, k, v = (torch.from_numpy(a[n]).requires_grad_(True) for n in "qkv")
    ct.flash_attention(q, k, v, causal=causal).backward(torch.from_numpy(a["do"]))
    ours = [t.grad.numpy().copy() for t in (q, k, v)]
    # torch's float32 math: heads_kv repeated, bottom-right mask
    q2, k2, v2 = (torch.from_numpy(a[n]).requires_grad_(True) for n in "qkv")
    group = SHAPE_Q[2] // SHAPE_KV[2]
    kr, vr = (t.repeat_interleave(group, dim=2) for t in (k2, v2))
    s = torch.einsum("bihd,bjhd->bhij", q2, kr) / np.sqrt(SHAPE_Q[3])
    if causal:
        i, j = torch.arange(SHAPE_Q[1])[:, None], torch.arange(SHAPE_KV[1])[None, :]
        s = s.masked_fill(j > i + SHAPE_KV[1] - SHAPE_Q[1], float("-inf"))
    torch.einsum("bhij,bjhd->bihd", s.softmax(-1), vr).backward(torch.from_numpy(a["do"]))
    for name, got, t in zip(("dq", "dk", "dv"), ours, (q2, k2, v2)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(t.grad.numpy()), err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case_id, which, index, causal", CASES, ids=[c[0] for c in CASES])
def test_gpu_follows_the_nan_rule(case_id, which, index, causal, deterministic):
    """float32: the SIMT kernels. The q-row and causal k cases failed on an H200 (2026-12-01):
    the fp32 forward's epilogue took "not l > 0" for "sees no key" and wrote o = 0 where l was
    NaN; it now tests l == 0, as cpu.py does."""
    a = inputs(which, index)
    g = {name: to_gpu(x) for name, x in a.items()}
    o, stats = cuflash.attention_forward(g["q"], g["k"], g["v"], causal=causal)
    grads = cuflash.attention_backward(g["do"], g["q"], g["k"], g["v"], o, stats, causal=causal,
                                       deterministic=deterministic)
    got = [to_host(x) for x in (o, stats.l, *grads)]
    assert_same_nan_rule(got, expected(a, causal))


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("head_dim", [8, 64])  # 64: on Hopper the wgmma forward and backward
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case_id, which, index, causal", CASES, ids=[c[0] for c in CASES])
def test_gpu_16bit_kernels_follow_the_nan_pattern(case_id, which, index, causal, dtype, head_dim,
                                                  deterministic):
    """The tensor-core kernels: the same NaN pattern as the float64 reference on the same
    (16-bit) inputs. Only the pattern: their finite values are judged by the accuracy tests."""
    from gpu_helpers import np_dtype

    shapes = {"q": SHAPE_Q[:3] + (head_dim,), "do": SHAPE_Q[:3] + (head_dim,),
              "k": SHAPE_KV[:3] + (head_dim,), "v": SHAPE_KV[:3] + (head_dim,)}
    rng = np.random.default_rng(1)
    a = {name: rng.standard_normal(shape).astype(np_dtype(dtype)) for name, shape in shapes.items()}
    a[which][index] = np.nan
    g = {name: to_gpu(x) for name, x in a.items()}
    o, stats = cuflash.attention_forward(g["q"], g["k"], g["v"], causal=causal)
    grads = cuflash.attention_backward(g["do"], g["q"], g["k"], g["v"], o, stats, causal=causal,
                                       deterministic=deterministic)
    got = [to_host(o, dtype), to_host(stats.l)] + [to_host(x, dtype) for x in grads]
    want = expected({name: x.astype(np.float32) for name, x in a.items()}, causal)
    for name, gx, w in zip(("o", "l", "dq", "dk", "dv"), got, want):
        np.testing.assert_array_equal(np.isnan(np.asarray(gx, dtype=np.float64)), np.isnan(w),
                                      err_msg=f"{name}: NaN pattern ({dtype})")

"""Block-sparse attention (issue #15, docs/block_sparse.md) on the CPU path and the API.

* The CPU path against the float64 reference with the block mask expanded (hypothesis:
  densities from empty to full, batch / heads broadcast, block sizes that do and do not
  divide the lengths or the CPU tiles, GQA, causal and window, dropout, head_dim_v).
* Tiles that every (batch, head) has masked are never visited, in both loops; the visited
  work scales with the density.
* A row whose blocks are all masked follows the no-key convention: o = 0, m = -inf, l = 0,
  zero gradients.
* The API: bad masks raise TypeError / ValueError naming block_mask or block_size; CUDA
  arrays are refused before anything is allocated.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import api, block_sparse, cpu, dropout_sparse_checks, reference
from cuflash.interop import Framework, Imported
from issue15_helpers import DTYPES, Case, check_backward, check_forward

SIDE = st.one_of(st.just(-1), st.integers(0, 40))


@st.composite
def sparse_cases(draw) -> Case:
    head_dim = draw(st.sampled_from([8, 16, 40]))
    length = st.one_of(st.integers(1, 5), st.integers(1, 80))
    return Case(batch=draw(st.integers(1, 2)), seqlen_q=draw(length), seqlen_k=draw(length),
                heads_kv=draw(st.sampled_from([1, 2])), group=draw(st.sampled_from([1, 2])),
                head_dim=head_dim, head_dim_v=draw(st.sampled_from([head_dim, 24])),
                causal=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
                block_m=draw(st.sampled_from([8, 16, 64])),
                block_n=draw(st.sampled_from([8, 16, 32])), seed=draw(st.integers(0, 2**31)),
                block_size=(draw(st.sampled_from([4, 8, 16, 24])),
                            draw(st.sampled_from([4, 8, 16, 20]))),
                density=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])),
                mask_heads=draw(st.booleans()),
                window=draw(st.one_of(st.none(), st.tuples(SIDE, SIDE))),
                dropout_p=draw(st.sampled_from([0.0, 0.0, 0.3])),
                dropout_seed=draw(st.integers(0, 2**64 - 1)),
                softcap=draw(st.sampled_from([None, None, 5.0])), alibi=draw(st.booleans()),
                sinks=draw(st.booleans()))


@settings(max_examples=150)
@given(case=sparse_cases())
def test_forward_matches_reference(case):
    check_forward(case)


@settings(max_examples=150)
@given(case=sparse_cases())
def test_backward_matches_reference(case):
    check_backward(case)


BASE = Case(batch=2, seqlen_q=100, seqlen_k=130, heads_kv=2, group=2, head_dim=32,
            head_dim_v=32, causal=False, dtype=np.dtype(np.float32), block_m=16, block_n=16,
            seed=5, block_size=(16, 16), density=0.3)


@pytest.mark.parametrize("extra", [dict(), dict(causal=True), dict(window=(40, 10)),
                                   dict(mask_heads=False), dict(block_size=(32, 16)),
                                   dict(block_m=64, block_n=32), dict(dropout_p=0.2,
                                                                       dropout_seed=3)],
                         ids=["plain", "causal", "window", "heads-broadcast", "32x16",
                              "cpu-tiles-64x32", "dropout"])
def test_composes_with_masks_and_tiles(extra):
    case = replace(BASE, **extra)
    check_forward(case)
    check_backward(case)


def test_masked_tiles_are_never_visited(monkeypatch):
    """With CPU tiles equal to the mask's blocks, the forward and backward visit exactly the
    blocks some (batch, head) keeps."""
    case = replace(BASE, mask_heads=False, batch=1, density=0.25)
    mask = case.block_mask()
    visited = []
    real = cpu._Tiling.mask_tile

    def record(self, s, i0, i1, j0, j1):
        visited.append((i0 // 16, j0 // 16))
        return real(self, s, i0, i1, j0, j1)

    monkeypatch.setattr(cpu._Tiling, "mask_tile", record)
    q, k, v, do = case.inputs()
    opts = case.options()
    o, m, l = cpu.flash_forward_cpu(q, k, v, **opts, **case.tiles())
    kept = {(int(a), int(b)) for a, b in zip(*np.nonzero(mask[0, 0]))}
    assert sorted(visited) == sorted(kept)
    visited.clear()
    cpu.flash_backward_cpu(do, q, k, v, o, m, l, **opts, **case.tiles())
    assert sorted(visited) == sorted(kept)


def test_rows_with_every_block_masked_see_no_key():
    case = replace(BASE, density=1.0, mask_heads=True)
    mask = case.block_mask()
    mask[0, 1, 2, :] = False  # batch 0, head 1: query rows 32..47 see nothing
    q, k, v, do = case.inputs()
    opts = {**case.options(), "block_mask": mask}
    o, m, l = cpu.flash_forward_cpu(q, k, v, **opts, **case.tiles())
    assert (o[0, 32:48, 1] == 0).all()
    assert np.isneginf(m[0, 1, 32:48]).all() and (l[0, 1, 32:48] == 0).all()
    assert np.isfinite(m[0, 0]).all()
    dq, _, _ = cpu.flash_backward_cpu(do, q, k, v, o, m, l, **opts, **case.tiles())
    assert (dq[0, 32:48, 1] == 0).all()
    o_ref, m_ref, _ = reference.attention_reference(q, k, v, **opts)
    assert (o_ref[0, 32:48, 1] == 0).all() and np.isneginf(m_ref[0, 1, 32:48]).all()


def test_empty_mask_gives_zero_output_and_gradients():
    case = replace(BASE, density=0.0)
    q, k, v, do = case.inputs()
    o, m, l = cpu.flash_forward_cpu(q, k, v, **case.options(), **case.tiles())
    assert (o == 0).all() and np.isneginf(m).all() and (l == 0).all()
    grads = cpu.flash_backward_cpu(do, q, k, v, o, m, l, **case.options(), **case.tiles())
    assert all((g == 0).all() for g in grads)


def test_full_mask_equals_dense():
    case = replace(BASE, density=1.0)
    q, k, v, _ = case.inputs()
    o, m, l = cpu.flash_forward_cpu(q, k, v, **case.options(), **case.tiles())
    o0, m0, l0 = cpu.flash_forward_cpu(q, k, v, causal=False, softmax_scale=case.scale,
                                      **case.tiles())
    for got, want in ((o, o0), (m, m0), (l, l0)):
        np.testing.assert_array_equal(got, want)


# -- the API --------------------------------------------------------------------------------


def _arrays():
    rng = np.random.default_rng(9)
    return (rng.standard_normal((2, 40, 4, 16)).astype(np.float32),
            rng.standard_normal((2, 50, 2, 16)).astype(np.float32),
            rng.standard_normal((2, 50, 2, 16)).astype(np.float32),
            rng.standard_normal((2, 40, 4, 16)).astype(np.float32))


def test_api_matches_reference():
    q, k, v, do = _arrays()
    mask = np.random.default_rng(1).random((2, 1, 3, 4)) < 0.6
    kw = dict(block_mask=mask, block_size=(16, 16), causal=True)
    o, stats = cuflash.attention_forward(q, k, v, **kw)
    o_ref, _, _ = reference.attention_reference(q, k, v, **kw)
    np.testing.assert_allclose(o, o_ref, atol=2e-6)
    grads = cuflash.attention_backward(do, q, k, v, o, stats, **kw)
    for got, want in zip(grads, reference.attention_backward_reference(do, q, k, v, **kw,
                                                                       o=o)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    torch = pytest.importorskip("torch")
    o_t = cuflash.attention(*(torch.from_numpy(x) for x in (q, k, v)),
                            block_mask=torch.from_numpy(mask), block_size=(16, 16),
                            causal=True)
    np.testing.assert_array_equal(o_t.numpy(), o)


BAD = [
    (dict(block_mask=np.ones((2, 4, 3, 4), np.float32)), TypeError,
     r"^block_mask: expected dtype bool, got float32"),
    (dict(block_mask=np.ones((2, 4, 3, 3), bool)), ValueError,
     r"^block_mask: expected shape \(2 or 1, 4 or 1, 3, 4\) .*got \(2, 4, 3, 3\)"),
    (dict(block_mask=np.ones((3, 4, 3, 4), bool)), ValueError, r"^block_mask: expected shape"),
    (dict(block_mask=np.ones((2, 2, 3, 4), bool)), ValueError, r"^block_mask: expected shape"),
    (dict(block_mask=np.ones((3, 4), bool)), ValueError, r"^block_mask: expected shape"),
    (dict(block_mask=np.ones((2, 4, 3, 4), bool), block_size=(16, 0)), ValueError,
     r"^block_size: expected a pair \(block_m, block_n\) of positive ints, got \(16, 0\)"),
    (dict(block_mask=np.ones((2, 4, 3, 4), bool), block_size=16), TypeError,
     r"^block_size: expected a pair"),
    (dict(block_mask=np.ones((2, 4, 3, 4), bool), block_size=(16.0, 16)), TypeError,
     r"^block_size: expected a pair"),
]


@pytest.mark.parametrize("kw, err, pattern", BAD, ids=[b[2][:30] + str(i)
                                                       for i, b in enumerate(BAD)])
def test_api_rejects_bad_masks_and_writes_nothing(kw, err, pattern):
    q, k, v, do = _arrays()
    kw = {"block_size": (16, 16), **kw}
    o, stats = cuflash.attention_forward(q, k, v)
    arrays = [q, k, v, do, o, stats.m, stats.l]
    before = [a.copy() for a in arrays]
    with pytest.raises(err, match=pattern):
        cuflash.attention_forward(q, k, v, **kw)
    with pytest.raises(err, match=pattern):
        cuflash.attention_backward(do, q, k, v, o, stats, **kw)
    for after, bits in zip(arrays, before):
        np.testing.assert_array_equal(after, bits)


def test_api_rejects_a_mask_of_another_framework():
    torch = pytest.importorskip("torch")
    q, k, v, _ = _arrays()
    mask = torch.ones((2, 4, 3, 4), dtype=torch.bool)
    with pytest.raises(TypeError, match=r"^block_mask: expected a numpy array like q, got torch"):
        cuflash.attention_forward(q, k, v, block_mask=mask, block_size=(16, 16))


def test_cuda_checks_the_mask_before_allocating(monkeypatch):
    """On CUDA the mask stays on the device (the kernels read it); its shape is checked
    first, before anything is allocated or launched."""
    q, k, v, _ = _arrays()

    def forbidden(*args, **kwargs):
        raise AssertionError("reached the compute path")

    monkeypatch.setattr(api, "import_array",
                        lambda x, name: Imported(array=x, framework=Framework.CUPY,
                                                 device=("cuda", 0)))
    monkeypatch.setattr(api, "_flash_fwd", forbidden)
    monkeypatch.setattr(api, "_fast_backend", lambda *args: None)  # the general path
    monkeypatch.setattr(dropout_sparse_checks, "import_array",
                        lambda x, name: Imported(array=x, framework=Framework.CUPY,
                                                 device=("cuda", 0)))
    with pytest.raises(ValueError, match=r"^block_mask: expected shape \(2 or 1, 4 or 1, 1, 1\)"):
        cuflash.attention_forward(q, k, v, block_mask=np.ones((2, 4, 2, 2), bool))


def test_expand_and_block_count():
    mask = np.array([[[[True, False], [False, True]]]])
    full = block_sparse.expand(mask, (2, 3), range(4), range(5))
    assert full.shape == (1, 1, 4, 5)
    assert full[0, 0].astype(int).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0],
                                               [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    assert block_sparse.n_blocks(129, 128) == 2 and block_sparse.n_blocks(0, 128) == 0

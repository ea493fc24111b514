"""cuflash.validate: every bad input gets its own error, naming the argument, before anything
is computed or written; the zero-size semantics documented in cuflash/validate.py hold.

Each case runs twice: against ``validate.check_forward`` / ``check_backward`` directly and
through the public ``cuflash.attention_forward`` / ``attention_backward``, where the inputs
must come back unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cuflash
from cuflash import validate
from cuflash.interop import Framework, Imported, import_array

B, SQ, SK, H, HKV, D = 2, 128, 100, 8, 4, 64  # GQA: 2 query heads per kv head
BF16 = np.dtype(ml_dtypes.bfloat16)


def rand(shape, dtype="float16", seed=0) -> np.ndarray:
    """Fresh random data, never zeros."""
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) + 0.25
    return data.astype(np.dtype(dtype))


@dataclass
class Call:
    """One set of arguments: q, k, v (and for the backward do, o, m, l) plus keywords."""

    q: Any = None
    k: Any = None
    v: Any = None
    do: Any = None
    o: Any = None
    m: Any = None
    l: Any = None
    kw: dict = field(default_factory=lambda: {"causal": False, "softmax_scale": None})

    def arrays(self) -> list:
        return [x for x in (self.q, self.k, self.v, self.do, self.o, self.m, self.l)
                if x is not None]


def good(dtype="float16", shape_q=(B, SQ, H, D), shape_kv=(B, SK, HKV, D)) -> Call:
    b, sq, h, _ = shape_q
    return Call(q=rand(shape_q, dtype, 1), k=rand(shape_kv, dtype, 2), v=rand(shape_kv, dtype, 3),
                do=rand(shape_q, dtype, 4), o=rand(shape_q, dtype, 5),
                m=rand((b, h, sq), "float32", 6), l=np.abs(rand((b, h, sq), "float32", 7)) + 1)


def _torch():
    return pytest.importorskip("torch")


def edit(**changes) -> Callable[[], Call]:
    """A case builder: a good call with some arguments (or keywords) replaced."""

    def build() -> Call:
        call = good()
        for key, value in changes.items():
            value = value(call) if callable(value) else value
            if key in ("causal", "softmax_scale"):
                call.kw[key] = value
            else:
                setattr(call, key, value)
        return call

    return build


def _torch_k(call: Call):
    return _torch().from_numpy(call.k)


# (id, builder, exception, regex on the message): forward arguments.
FORWARD_CASES = [
    ("q-not-array", edit(q=lambda c: c.q.tolist()), TypeError,
     r"^q: expected an array supporting DLPack \(numpy, cupy, torch, jax\), got list"),
    ("v-none", edit(v=None), TypeError, r"^v: expected an array .*got NoneType"),
    ("q-3d", edit(q=lambda c: c.q[0]), ValueError,
     r"^q: expected a 4-D array \(batch, seqlen, heads, head_dim\), got 3-D with shape "
     r"\(128, 8, 64\)"),
    ("k-5d", edit(k=lambda c: c.k[None]), ValueError, r"^k: expected a 4-D array.*got 5-D"),
    ("k-batch", edit(k=lambda c: rand((B + 1, SK, HKV, D)), v=lambda c: rand((B + 1, SK, HKV, D))),
     ValueError, r"^k: expected batch 2 like q .*got 3"),
    ("v-batch", edit(v=lambda c: rand((B + 1, SK, HKV, D))), ValueError,
     r"^v: expected batch 2 like q .*got 3"),
    ("k-head-dim", edit(k=lambda c: rand((B, SK, HKV, 32))), ValueError,
     r"^k: expected head_dim 64 like q .*got 32"),
    # v may have its own head_dim_v from 1 to 256 on the CPU (issue #15; CUDA: tests/
    # test_head_dims.py)
    ("v-head-dim", edit(v=lambda c: rand((B, SK, HKV, 264))), ValueError,
     r"^v: expected head_dim_v from 1 to 256, got 264"),
    ("v-seqlen", edit(v=lambda c: rand((B, SK + 1, HKV, D))), ValueError,
     r"^v: expected shape \(2, 100, 4, head_dim_v\) like k .*got \(2, 101, 4, 64\)"),
    ("v-heads", edit(v=lambda c: rand((B, SK, HKV * 2, D))), ValueError,
     r"^v: expected shape \(2, 100, 4, head_dim_v\) like k .*got \(2, 100, 8, 64\)"),
    ("heads-not-divisible", edit(k=lambda c: rand((B, SK, 3, D)), v=lambda c: rand((B, SK, 3, D))),
     ValueError, r"^k: expected heads_kv dividing q's 8 heads .*got 3"),
    ("heads-kv-more", edit(k=lambda c: rand((B, SK, 16, D)), v=lambda c: rand((B, SK, 16, D))),
     ValueError, r"^k: expected heads_kv dividing q's 8 heads .*got 16"),
    ("heads-kv-zero", edit(k=lambda c: rand((B, SK, 0, D)), v=lambda c: rand((B, SK, 0, D))),
     ValueError, r"^k: expected heads_kv >= 1 dividing q's 8 heads, got 0"),
    ("float64", edit(q=lambda c: c.q.astype(np.float64), k=lambda c: c.k.astype(np.float64),
                     v=lambda c: c.v.astype(np.float64)),
     TypeError, r"^q: expected dtype float16, bfloat16 or float32, got float64"),
    ("int32", edit(q=lambda c: c.q.astype(np.int32)), TypeError,
     r"^q: expected dtype float16, bfloat16 or float32, got int32"),
    ("mixed-k", edit(k=lambda c: c.k.astype(np.float32)), TypeError,
     r"^k: expected dtype float16 like q, got float32"),
    ("mixed-v-bf16", edit(v=lambda c: c.v.astype(BF16)), TypeError,
     r"^v: expected dtype float16 like q, got bfloat16"),
    ("mixed-framework", edit(k=_torch_k), TypeError,
     r"^k: expected a numpy array like q, got torch"),
    *[(f"head-dim-{d}",
       edit(q=rand((B, SQ, H, d)), k=rand((B, SK, HKV, d)), v=rand((B, SK, HKV, d))),
       ValueError, rf"^q: expected head_dim from 1 to 256, got {d}\b")
      for d in (0, 264, 512)],  # any from 1 to 256 on the CPU (issue #15)
    *[(f"scale-{name}", edit(softmax_scale=value), TypeError,
       r"^softmax_scale: expected a finite positive real number or None, got " + got)
      for name, value, got in [("bool", True, "bool"), ("str", "0.1", "str"),
                               ("complex", 0.1j, "complex"), ("list", [0.1], "list"),
                               ("array", np.array([0.1]), "ndarray")]],
    *[(f"scale-{name}", edit(softmax_scale=value), ValueError,
       r"^softmax_scale: expected a finite positive real number, got " + got)
      for name, value, got in [("zero", 0.0, "0.0"), ("negative", -0.125, "-0.125"),
                               ("nan", math.nan, "nan"), ("inf", math.inf, "inf"),
                               ("np-neg", np.float32(-1), "-1.0")]],
    *[(f"causal-{name}", edit(causal=value), TypeError, r"^causal: expected a bool, got " + got)
      for name, value, got in [("int", 1, "int 1"), ("none", None, "NoneType None"),
                               ("str", "yes", "str 'yes'")]],
    ("q-strided-last-axis", edit(q=lambda c: rand((B, SQ, H, 2 * D))[..., ::2]), ValueError,
     r"^q: the last axis must be contiguous .*strides \(131072, 1024, 128, 2\)"),
]


def _needs_torch(case_id: str) -> None:
    if case_id == "mixed-framework":
        _torch()


@pytest.mark.parametrize("case_id, build, exc, pattern", FORWARD_CASES,
                         ids=[c[0] for c in FORWARD_CASES])
def test_check_forward_rejects(case_id, build, exc, pattern):
    _needs_torch(case_id)
    call = build()
    with pytest.raises(exc, match=pattern):
        validate.check_forward(call.q, call.k, call.v, **call.kw)


def _bits(x) -> np.ndarray | None:
    """The raw bytes of a numpy array or torch tensor (a copy); None for anything else."""
    if hasattr(x, "detach"):
        x = x.detach().numpy()
    if not isinstance(x, np.ndarray):
        return None
    return np.ascontiguousarray(x).view(np.uint8).copy()


def _snapshot(arrays) -> list:
    return [_bits(x) for x in arrays]


def _assert_unchanged(arrays, before) -> None:
    for x, copy in zip(arrays, before):
        if copy is not None:
            np.testing.assert_array_equal(_bits(x), copy)


@pytest.mark.parametrize("case_id, build, exc, pattern", FORWARD_CASES,
                         ids=[c[0] for c in FORWARD_CASES])
def test_attention_forward_rejects_and_writes_nothing(case_id, build, exc, pattern):
    _needs_torch(case_id)
    call = build()
    before = _snapshot(call.arrays())
    with pytest.raises(exc, match=pattern):
        cuflash.attention_forward(call.q, call.k, call.v, **call.kw)
    _assert_unchanged(call.arrays(), before)


# Backward-only arguments: do, o like q; stats m, l float32 (batch, heads, seqlen_q).
STATS = r"\(2, 8, 128\)"
BACKWARD_CASES = [
    ("do-not-array", edit(do=3.0), TypeError, r"^do: expected an array .*got float"),
    ("do-shape", edit(do=lambda c: c.do[:, :64]), ValueError,
     r"^do: expected shape \(2, 128, 8, 64\) like q, got \(2, 64, 8, 64\)"),
    ("o-shape", edit(o=lambda c: c.o[:, :, :4]), ValueError,
     r"^o: expected shape \(2, 128, 8, 64\) like q, got \(2, 128, 4, 64\)"),
    ("do-dtype", edit(do=lambda c: c.do.astype(np.float32)), TypeError,
     r"^do: expected dtype float16 like q, got float32"),
    ("o-dtype", edit(o=lambda c: c.o.astype(BF16)), TypeError,
     r"^o: expected dtype float16 like q, got bfloat16"),
    ("o-framework", edit(o=lambda c: _torch().from_numpy(c.o)), TypeError,
     r"^o: expected a numpy array like q, got torch"),
    ("m-dtype", edit(m=lambda c: c.m.astype(np.float16)), TypeError,
     r"^stats\.m: expected float32 \(2, 8, 128\), got float16 \(2, 8, 128\)$"),
    ("l-dtype", edit(l=lambda c: c.l.astype(np.float64)), TypeError,
     r"^stats\.l: expected float32 " + STATS + r", got float64 " + STATS + "$"),
    ("m-shape", edit(m=lambda c: c.m.transpose(0, 2, 1).copy()), ValueError,
     r"^stats\.m: expected float32 " + STATS + r", got float32 \(2, 128, 8\)$"),
    ("l-ndim", edit(l=lambda c: c.l[0]), ValueError,
     r"^stats\.l: expected float32 " + STATS + r", got float32 \(8, 128\)$"),
    ("m-not-contiguous", edit(m=lambda c: np.repeat(c.m, 2, axis=1)[:, ::2]), ValueError,
     r"^stats\.m: expected a C-contiguous float32 " + STATS + r" .*got strides \(2048, 256, 1\)"),
    ("m-transposed", edit(m=lambda c: np.ascontiguousarray(c.m.transpose(0, 2, 1))
                          .transpose(0, 2, 1)), ValueError,
     r"^stats\.m: the last axis must be contiguous .*strides \(1024, 1, 8\)"),
    ("l-list", edit(l=lambda c: c.l.tolist()), TypeError,
     r"^stats\.l: expected an array .*got list"),
    ("m-framework", edit(m=lambda c: _torch().from_numpy(c.m)), TypeError,
     r"^stats\.m: expected a numpy array like q, got torch"),
]
# The forward's checks apply to the backward too.
BACKWARD_CASES += [c for c in FORWARD_CASES
                   if c[0] in ("q-3d", "v-seqlen", "heads-not-divisible", "mixed-k",
                               "head-dim-264", "scale-nan", "causal-int", "q-strided-last-axis")]


def _needs_torch_bwd(case_id: str) -> None:
    if case_id in ("o-framework", "m-framework", "mixed-framework"):
        _torch()


@pytest.mark.parametrize("case_id, build, exc, pattern", BACKWARD_CASES,
                         ids=[c[0] for c in BACKWARD_CASES])
def test_check_backward_rejects(case_id, build, exc, pattern):
    _needs_torch_bwd(case_id)
    c = build()
    with pytest.raises(exc, match=pattern):
        validate.check_backward(c.do, c.q, c.k, c.v, c.o, c.m, c.l, **c.kw)


@pytest.mark.parametrize("case_id, build, exc, pattern", BACKWARD_CASES,
                         ids=[c[0] for c in BACKWARD_CASES])
def test_attention_backward_rejects_and_writes_nothing(case_id, build, exc, pattern):
    _needs_torch_bwd(case_id)
    c = build()
    before = _snapshot(c.arrays())
    with pytest.raises(exc, match=pattern):
        cuflash.attention_backward(c.do, c.q, c.k, c.v, c.o, cuflash.SoftmaxStats(c.m, c.l),
                                   **c.kw)
    _assert_unchanged(c.arrays(), before)


# -- devices and alignment (the CUDA-only checks run on host arrays posing as CUDA ones) ----


def as_cuda(x: np.ndarray, index: int = 0) -> Imported:
    """A host array labelled as a CuPy array on cuda:index, to reach the CUDA-only checks."""
    return Imported(array=x, framework=Framework.CUPY, device=("cuda", index))


def test_arrays_on_different_devices_are_rejected():
    c = good()
    with pytest.raises(ValueError, match=r"^v: expected an array on cuda:0 like q, got cuda:1"):
        validate.check_forward(as_cuda(c.q), as_cuda(c.k), as_cuda(c.v, 1), causal=False,
                               softmax_scale=None)
    with pytest.raises(ValueError, match=r"^stats\.l: expected an array on cuda:0 like q, got "
                                         r"cuda:2"):
        validate.check_backward(*(as_cuda(x) for x in (c.do, c.q, c.k, c.v, c.o, c.m)),
                                as_cuda(c.l, 2), causal=True, softmax_scale=0.1)
    with pytest.raises(TypeError, match=r"^k: expected a cupy array like q, got numpy"):
        validate.check_forward(as_cuda(c.q), c.k, c.v, causal=False, softmax_scale=None)


def _misaligned_pointer(shape, dtype="float16") -> np.ndarray:
    flat = rand(int(np.prod(shape)) + 8, dtype)
    start = 1 if flat.ctypes.data % 16 == 0 else 0  # one element past a 16-byte boundary
    return flat[start:start + int(np.prod(shape))].reshape(shape)


def _misaligned_rows(shape, dtype="float16") -> np.ndarray:
    """head_dim 8 of a row of 12 elements: head stride 24 bytes."""
    return rand(shape[:3] + (12,), dtype)[..., :8]


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_cuda_rows_must_be_16_byte_aligned(which):
    shape_q, shape_kv = (2, 16, 4, 8), (2, 24, 2, 8)
    arrays = {"q": rand(shape_q), "k": rand(shape_kv), "v": rand(shape_kv)}
    validate.check_forward(*(as_cuda(a) for a in arrays.values()), causal=False,
                           softmax_scale=None)
    for bad, pattern in [(_misaligned_pointer, r"data pointer aligned to 16 bytes"),
                         (_misaligned_rows, r"heads stride to be a multiple of 16 bytes.*"
                                            r"\(24 bytes on axis 2\)")]:
        args = dict(arrays, **{which: bad(arrays[which].shape)})
        with pytest.raises(ValueError, match=rf"^{which}: expected .*{pattern}"):
            validate.check_forward(*(as_cuda(a) for a in args.values()), causal=False,
                                   softmax_scale=None)
        # The host path has no alignment need.
        validate.check_forward(*args.values(), causal=False, softmax_scale=None)


def test_cuda_alignment_of_do_and_o():
    c = good()
    c.o = _misaligned_pointer(c.o.shape)
    with pytest.raises(ValueError, match=r"^o: expected a data pointer aligned to 16 bytes"):
        validate.check_backward(*(as_cuda(x) for x in (c.do, c.q, c.k, c.v, c.o, c.m, c.l)),
                                causal=False, softmax_scale=None)
    validate.check_backward(c.do, c.q, c.k, c.v, c.o, c.m, c.l, causal=False,
                            softmax_scale=None)


def test_alignment_ignores_unit_axes_and_empty_arrays():
    one_row = rand((1, 1, 1, 24))[..., :8]  # odd strides, but on axes of length 1
    validate.check_alignment(one_row, "q")
    validate.check_alignment(_misaligned_pointer((0, 4, 2, 8)), "q")
    validate.check_alignment(rand((2, 3, 4, 8), "float32").transpose(0, 2, 1, 3), "q")


def test_cuda_limits():
    """heads is a grid axis; lengths stop at 2^30 (int32 tile arithmetic); batch has no
    limit (the plan splits its launches, tests/test_plan.py)."""
    big_batch = np.empty((65536, 1, 1, 8), np.float16)
    validate.check_forward(*(as_cuda(big_batch),) * 3, causal=False, softmax_scale=None)
    heads = np.empty((1, 1, 65536, 8), np.float16)
    with pytest.raises(ValueError, match=r"^q: expected heads <= 65535 on CUDA"):
        validate.check_forward(*(as_cuda(heads),) * 3, causal=False, softmax_scale=None)
    validate.check_forward(heads, heads, heads, causal=False, softmax_scale=None)  # the host
    row = np.empty((1, 1, 1, 8), np.float16)
    long_k = np.lib.stride_tricks.as_strided(row, (1, 2**30, 1, 8), (0, 0, 0, 2))
    with pytest.raises(ValueError, match=r"^q: expected seqlen_k <= 1073741823 on CUDA "
                                         r"\(int32 tile arithmetic"):
        validate.check_forward(as_cuda(row), as_cuda(long_k), as_cuda(long_k), causal=False,
                               softmax_scale=None)


# -- accepted inputs: the Problem ------------------------------------------------------------


@pytest.mark.parametrize("dtype", validate.SUPPORTED_DTYPES)
def test_problem_fields(dtype):
    c = good(dtype)
    p = validate.check_forward(c.q, c.k, c.v, causal=True, softmax_scale=None)
    assert p == validate.Problem(batch=B, seqlen_q=SQ, seqlen_k=SK, heads=H, heads_kv=HKV,
                                 head_dim=D, dtype=dtype, causal=True,
                                 softmax_scale=1 / math.sqrt(D), device=("cpu", 0))
    assert p.heads_per_kv == H // HKV
    assert validate.check_backward(c.do, c.q, c.k, c.v, c.o, c.m, c.l, causal=True,
                                   softmax_scale=None) == p


@pytest.mark.parametrize("scale", [1, 0.5, np.float32(0.25), np.float64(2.0), np.int64(3)])
def test_real_scales_are_accepted_as_float(scale):
    c = good()
    p = validate.check_forward(c.q, c.k, c.v, causal=np.True_, softmax_scale=scale)
    assert type(p.softmax_scale) is float and p.softmax_scale == float(scale)
    assert p.causal is True


def test_supported_sets():
    assert validate.SUPPORTED_DTYPES == ("float16", "bfloat16", "float32")
    assert validate.SUPPORTED_HEAD_DIMS == tuple(range(8, 257, 8))


def test_imported_and_plain_arrays_give_the_same_problem():
    torch = _torch()
    c = good("bfloat16")
    tq, tk, tv = (torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) for x in (c.q, c.k, c.v))
    direct = validate.check_forward(tq, tk, tv, causal=False, softmax_scale=0.1)
    imported = validate.check_forward(import_array(tq, "q"), import_array(tk, "k"),
                                      import_array(tv, "v"), causal=False, softmax_scale=0.1)
    assert direct == imported and direct.dtype == "bfloat16"


@given(batch=st.integers(0, 3), seqlen_q=st.integers(0, 70), seqlen_k=st.integers(0, 70),
       heads_kv=st.integers(0, 4), group=st.integers(1, 3), head_dim=st.integers(0, 264),
       dtype=st.sampled_from(validate.SUPPORTED_DTYPES))
def test_shapes_property(batch, seqlen_q, seqlen_k, heads_kv, group, head_dim, dtype):
    heads = heads_kv * group
    q = np.empty((batch, seqlen_q, heads, head_dim), dtype)
    k = np.empty((batch, seqlen_k, heads_kv, head_dim), dtype)
    if not 1 <= head_dim <= 256:  # any head_dim on the CPU (issue #15)
        with pytest.raises(ValueError, match=rf"^q: expected head_dim .*got {head_dim}\b"):
            validate.check_forward(q, k, k, causal=False, softmax_scale=None)
        return
    p = validate.check_forward(q, k, k, causal=bool(group % 2), softmax_scale=None)
    assert (p.batch, p.seqlen_q, p.seqlen_k, p.heads, p.heads_kv, p.head_dim) == (
        batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim)
    assert p.heads_per_kv == (group if heads_kv else 1)
    assert p.softmax_scale == pytest.approx(head_dim ** -0.5)


# -- zero-size dimensions, through the public API (semantics in validate's docstring) -------


ZERO_SIZE = [  # (id, shape_q, shape_kv)
    ("batch-0", (0, 5, 4, 16), (0, 7, 2, 16)),
    ("seqlen_q-0", (2, 0, 4, 16), (2, 7, 2, 16)),
    ("heads-0", (2, 5, 0, 16), (2, 7, 0, 16)),
    ("heads-0-kv-2", (2, 5, 0, 16), (2, 7, 2, 16)),
    ("seqlen_k-0", (2, 5, 4, 16), (2, 0, 2, 16)),
    ("seqlen_k-0-causal", (2, 5, 4, 16), (2, 0, 2, 16)),
]


@pytest.mark.parametrize("case_id, shape_q, shape_kv", ZERO_SIZE, ids=[z[0] for z in ZERO_SIZE])
@pytest.mark.parametrize("dtype", validate.SUPPORTED_DTYPES)
def test_zero_size_dimensions(case_id, shape_q, shape_kv, dtype):
    b, sq, h, d = shape_q
    c = good(dtype, shape_q, shape_kv)
    causal = case_id.endswith("causal")
    o, stats = cuflash.attention_forward(c.q, c.k, c.v, causal=causal)
    assert o.shape == shape_q and o.dtype == c.q.dtype
    assert stats.m.shape == stats.l.shape == (b, h, sq) and stats.m.dtype == np.float32
    if shape_kv[1] == 0:  # every row sees no key
        assert (o.astype(np.float32) == 0).all()
        assert np.isneginf(stats.m).all() and (stats.l == 0).all()
    dq, dk, dv = cuflash.attention_backward(c.do, c.q, c.k, c.v, o, stats, causal=causal)
    assert dq.shape == shape_q and dk.shape == dv.shape == shape_kv
    for g in (dq, dk, dv):
        assert g.dtype == c.q.dtype and (g.astype(np.float32) == 0).all()

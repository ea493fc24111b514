"""Variable-length attention (issue #14, docs/varlen.md) through the public API on the CPU.

* ``cuflash.attention_varlen_forward`` / ``attention_varlen_backward`` against the float64
  varlen reference under the acceptance rule: hypothesis draws the packed layout (odd
  lengths, seqlen_q != seqlen_k per sequence, empty sequences, sequences without keys,
  seqused_k), GQA, dtypes, causal and any combination of the score modifiers.
* The varlen reference itself: finite differences of its forward against its backward,
  and equal-length sequences against the dense reference.
* Validation: every bad argument raises TypeError / ValueError naming it; CUDA arrays go
  to the kernels (tests/test_gpu_varlen.py runs them); a backward with another layout is
  refused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import reference, testing, varlen
from cuflash.constants import default_softmax_scale
from cuflash.interop import Imported

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BF16)
MIN_KEYS = 16  # as tests/test_masks.py: fewer visible keys per row -> a relative bound
FEW_KEYS_RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 4 * 2.0**-10,
                 BF16: 4 * 2.0**-7}


@dataclass(frozen=True)
class Case:
    lengths: tuple  # ((n_q, n_k, n_used_k or None), ...) per sequence
    heads_kv: int
    group: int
    head_dim: int
    causal: bool
    scale: float
    dtype: np.dtype
    seed: int
    window: tuple[int, int] | None = None
    softcap: float | None = None
    alibi: str | None = None  # None, "heads" or "batch"
    sinks: bool = False

    @property
    def heads(self) -> int:
        return self.heads_kv * self.group

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def offsets(self):
        n_q = [s[0] for s in self.lengths]
        n_k = [s[1] for s in self.lengths]
        cu_q = np.concatenate([[0], np.cumsum(n_q)]).astype(np.int32)
        cu_k = np.concatenate([[0], np.cumsum(n_k)]).astype(np.int32)
        used = None
        if any(s[2] is not None for s in self.lengths):
            used = np.array([s[1] if s[2] is None else s[2] for s in self.lengths], np.int32)
        return cu_q, cu_k, max(n_q, default=0), max(n_k, default=0), used

    def inputs(self):
        rng = np.random.default_rng(self.seed)
        cu_q, cu_k, *_ = self.offsets()
        d, h = self.head_dim, self.heads

        def normal(*shape):
            return rng.standard_normal(shape).astype(self.dtype)

        q, do = normal(int(cu_q[-1]), h, d), normal(int(cu_q[-1]), h, d)
        k, v = normal(int(cu_k[-1]), self.heads_kv, d), normal(int(cu_k[-1]), self.heads_kv, d)
        slopes = {None: None, "heads": (h,), "batch": (self.batch, h)}[self.alibi]
        mods = dict(window=self.window, softcap=self.softcap,
                    alibi_slopes=None if slopes is None
                    else (2.0 ** -rng.uniform(0, 8, slopes)).astype(np.float32),
                    sinks=(rng.standard_normal(h) * 2).astype(np.float32) if self.sinks
                    else None)
        return q, k, v, do, mods

    def call_args(self):
        cu_q, cu_k, max_q, max_k, used = self.offsets()
        return (cu_q, cu_k, max_q, max_k), dict(seqused_k=used, causal=self.causal,
                                                softmax_scale=self.scale)

    def ref_kwargs(self):
        cu_q, cu_k, _, _, used = self.offsets()
        return (cu_q, cu_k), dict(seqused_k=used, causal=self.causal, softmax_scale=self.scale)

    def few_keys(self) -> bool:
        """Some row sees between 1 and MIN_KEYS - 1 keys (see tests/test_masks.py)."""
        for n_q, n_k, used in self.lengths:
            visible = reference._visible(n_q, n_k if used is None else used, self.causal,
                                         self.window)
            counts = visible.sum(axis=1)
            if ((counts > 0) & (counts < MIN_KEYS)).any():
                return True
        return False


SIDE = st.one_of(st.just(-1), st.integers(0, 3), st.integers(0, 40))


@st.composite
def sequences(draw):
    """1 to 4 sequences: odd lengths, empty ones, ones without keys, some with seqused_k."""
    length = st.one_of(st.just(0), st.integers(1, 5), st.integers(1, 60))
    out = []
    for _ in range(draw(st.integers(1, 4))):
        n_q, n_k = draw(length), draw(length)
        used = draw(st.one_of(st.none(), st.integers(0, n_k)))
        out.append((n_q, n_k, used))
    return tuple(out)


@st.composite
def cases(draw) -> Case:
    head_dim = draw(st.sampled_from([8, 16, 40, 64, 128]))
    return Case(
        lengths=draw(sequences()),
        heads_kv=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 2, 3])),
        head_dim=head_dim,
        causal=draw(st.booleans()),
        scale=default_softmax_scale(head_dim) * draw(st.floats(0.5, 2.0)),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**32 - 1)),
        window=draw(st.one_of(st.none(), st.tuples(SIDE, SIDE))),
        softcap=draw(st.sampled_from([None, 0.5, 2.0, 20.0])),
        alibi=draw(st.sampled_from([None, "heads", "batch"])),
        sinks=draw(st.booleans()),
    )


def _judge(name, got, ref, naive, dtype, scale=None):
    report = testing.judge(name, got, ref, naive, dtype=np.dtype(dtype).name, scale=scale)
    assert report.ok, str(report)


def check_forward(case: Case):
    q, k, v, _, mods = case.inputs()
    args, kw = case.call_args()
    o, stats = cuflash.attention_varlen_forward(q, k, v, *args, **kw, **mods)
    ref_args, ref_kw = case.ref_kwargs()
    o_ref, m_ref, l_ref = reference.attention_varlen_reference(q, k, v, *ref_args, **ref_kw,
                                                               **mods)
    o_nv = reference.attention_varlen_naive(q, k, v, *ref_args, **ref_kw, **mods,
                                            dtype=case.dtype)
    assert isinstance(stats, cuflash.VarlenStats)
    assert o.shape == q.shape and o.dtype == case.dtype
    _judge("o", o, o_ref, o_nv, case.dtype)
    for name, got, ref in (("m", stats.m, m_ref), ("l", stats.l, l_ref)):
        assert got.dtype == np.float32 and got.shape == (case.heads, q.shape[0])
        report = testing.judge_stats(name, got, ref, dtype=np.dtype(case.dtype).name)
        assert report.ok, str(report)
    return o, stats


def check_backward(case: Case):
    q, k, v, do, mods = case.inputs()
    args, kw = case.call_args()
    o, stats = cuflash.attention_varlen_forward(q, k, v, *args, **kw, **mods)
    grads = cuflash.attention_varlen_backward(do, q, k, v, o, stats, *args, **kw, **mods)
    ref_args, ref_kw = case.ref_kwargs()
    refs = reference.attention_varlen_backward_reference(do, q, k, v, *ref_args, **ref_kw,
                                                         **mods, o=o)
    naives = reference.attention_varlen_backward_naive(do, q, k, v, *ref_args, **ref_kw,
                                                       **mods, dtype=case.dtype)
    assert len(grads) == len(refs) == len(naives) == (4 if case.sinks else 3)
    magnitude = testing.magnitude(*refs[:3])
    few = case.few_keys()
    for name, got, ref, naive, like in zip(("dq", "dk", "dv", "dsinks"), grads, refs, naives,
                                           (q, k, v, None)):
        if like is None:
            assert got.dtype == np.float32 and got.shape == (case.heads,)
        else:
            assert got.shape == like.shape and got.dtype == case.dtype, name
        scale = testing.magnitude(ref) if like is None else magnitude
        if few:
            err = np.abs(got.astype(np.float64) - ref).max(initial=0.0)
            bound = max(FEW_KEYS_RTOL[np.dtype(case.dtype)] * max(1.0, scale),
                        testing.judge(name, got, ref, naive, dtype=np.dtype(case.dtype).name,
                                      scale=scale).bound)
            assert err <= bound, f"{name}: err {err:.3g} vs bound {bound:.3g} (few keys)"
        else:
            _judge(name, got, ref, naive, case.dtype, scale)


@settings(deadline=None, max_examples=300)
@given(case=cases())
def test_forward_matches_reference(case: Case):
    check_forward(case)


@settings(deadline=None, max_examples=300)
@given(case=cases())
def test_backward_matches_reference(case: Case):
    check_backward(case)


# One layout with every kind of sequence: odd lengths, seqlen_q < and > seqlen_k, an empty
# sequence, one with queries but no keys, one with keys but no queries, seqused_k < n_k.
LAYOUT = ((37, 70, None), (0, 0, None), (45, 20, None), (9, 0, None), (0, 11, None),
          (50, 64, 41))
ALONE = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(9, 4)),
    "window-causal": dict(window=(12, 3), causal=True),
    "softcap": dict(softcap=1.0),
    "alibi-heads": dict(alibi="heads"),
    "alibi-batch": dict(alibi="batch", causal=True),
    "sinks": dict(sinks=True),
    "all": dict(window=(30, 5), softcap=3.0, alibi="batch", sinks=True, causal=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", ALONE, ids=list(ALONE))
def test_each_modifier_on_a_mixed_layout(which, dtype):
    case = Case(lengths=LAYOUT, heads_kv=2, group=2, head_dim=32, causal=False, scale=0.25,
                dtype=dtype, seed=5)
    case = replace(case, **ALONE[which])
    check_forward(case)
    check_backward(case)


def test_rows_without_keys_and_unused_keys():
    """A sequence with no keys: o = 0, m = -inf, l = 0, dq = 0; keys past seqused_k and
    sequences without queries get dk = dv = 0."""
    case = Case(lengths=LAYOUT, heads_kv=1, group=2, head_dim=16, causal=True, scale=0.3,
                dtype=np.dtype(np.float32), seed=2)
    q, k, v, do, _ = case.inputs()
    args, kw = case.call_args()
    o, stats = cuflash.attention_varlen_forward(q, k, v, *args, **kw)
    no_keys = slice(82, 91)  # sequence 3: queries 82..90, no keys
    assert np.all(o[no_keys] == 0) and np.all(stats.l[:, no_keys] == 0)
    assert np.all(stats.m[:, no_keys] == -np.inf)
    dq, dk, dv = cuflash.attention_varlen_backward(do, q, k, v, o, stats, *args, **kw)
    assert np.all(dq[no_keys] == 0)
    unused = np.r_[90:101, 142:165]  # sequence 4's keys (no queries), sequence 5's tail
    assert np.all(dk[unused] == 0) and np.all(dv[unused] == 0)
    assert np.abs(dk).max() > 0 and np.isfinite(dq).all()


def test_equal_lengths_match_the_dense_api():
    """batch sequences of one length packed == the dense call on (batch, seqlen, ...)."""
    rng = np.random.default_rng(3)
    b, sq, sk, h, hkv, d = 3, 33, 47, 4, 2, 16
    q = rng.standard_normal((b, sq, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, sk, hkv, d)).astype(np.float32) for _ in range(2))
    do = rng.standard_normal(q.shape).astype(np.float32)
    sinks = rng.standard_normal(h).astype(np.float32)
    kw = dict(causal=True, window=(20, -1), softcap=5.0, sinks=sinks)
    o, stats = cuflash.attention_forward(q, k, v, **kw)
    grads = cuflash.attention_backward(do, q, k, v, o, stats, **kw)
    cu_q, cu_k = (np.arange(b + 1, dtype=np.int32) * n for n in (sq, sk))
    packed = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v, do)]
    o_v, stats_v = cuflash.attention_varlen_forward(*packed[:3], cu_q, cu_k, sq, sk, **kw)
    grads_v = cuflash.attention_varlen_backward(packed[3], *packed[:3], o_v, stats_v, cu_q,
                                                cu_k, sq, sk, **kw)
    np.testing.assert_allclose(o_v, o.reshape(o_v.shape), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats_v.m, stats.m.transpose(1, 0, 2).reshape(h, -1), rtol=1e-6)
    np.testing.assert_allclose(stats_v.l, stats.l.transpose(1, 0, 2).reshape(h, -1), rtol=1e-5)
    for got, want in zip(grads_v, grads):
        np.testing.assert_allclose(got, want.reshape(got.shape), rtol=1e-4, atol=1e-5)


def test_reference_gradients_match_finite_differences():
    """The varlen spec's backward is the derivative of its forward (float64, central
    differences), including dsinks and the zero gradient of keys past seqused_k."""
    rng = np.random.default_rng(4)
    cu_q, cu_k = np.int32([0, 3, 3, 7]), np.int32([0, 4, 6, 11])
    used = np.int32([4, 2, 3])
    q = rng.standard_normal((7, 2, 8))
    k, v = rng.standard_normal((11, 1, 8)), rng.standard_normal((11, 1, 8))
    do = rng.standard_normal(q.shape)
    kw = dict(seqused_k=used, causal=True, softcap=2.0, alibi_slopes=np.float32([[0.5, 0.25]] * 3),
              sinks=np.array([0.3, -0.7]), window=(2, -1))

    def loss(q, k, v, sinks):
        o = reference.attention_varlen_reference(q, k, v, cu_q, cu_k, **{**kw, "sinks": sinks})[0]
        return float((o * do).sum())

    grads = reference.attention_varlen_backward_reference(do, q, k, v, cu_q, cu_k, **kw)
    inputs = [q, k, v, kw["sinks"]]
    eps = 1e-6
    for which, (x, g) in enumerate(zip(inputs, grads)):
        fd = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            for sign in (1, -1):
                shifted = [y.copy() for y in inputs]
                shifted[which][idx] += sign * eps
                fd[idx] += sign * loss(*shifted) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-7)
    assert np.all(grads[1][4:6] == 0) and np.all(grads[1][9:] == 0)  # unused keys


# -- validation ----------------------------------------------------------------------------


def _good():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((10, 4, 16)).astype(np.float32)
    k = rng.standard_normal((8, 2, 16)).astype(np.float32)
    return dict(q=q, k=k, v=k.copy(), cu_seqlens_q=np.int32([0, 3, 3, 10]),
                cu_seqlens_k=np.int32([0, 5, 6, 8]), max_seqlen_q=7, max_seqlen_k=5)


BAD = [
    ("q", dict(q=np.zeros((1, 10, 4, 16), np.float32)), ValueError, "3-D"),
    ("k", dict(k=np.zeros((8, 2, 16), np.float16), v=np.zeros((8, 2, 16), np.float16)),
     TypeError, "float32"),
    ("v", dict(v=np.zeros((9, 2, 16), np.float32)), ValueError, "like k"),
    ("k", dict(k=np.zeros((8, 3, 16), np.float32), v=np.zeros((8, 3, 16), np.float32)),
     ValueError, "dividing"),
    ("cu_seqlens_q", dict(cu_seqlens_q=np.int64([0, 3, 3, 10])), TypeError, "int32"),
    ("cu_seqlens_q", dict(cu_seqlens_q=np.int32([[0, 3, 3, 10]])), ValueError, "shape"),
    ("cu_seqlens_q", dict(cu_seqlens_q=np.int32([1, 3, 3, 10])), ValueError, "first"),
    ("cu_seqlens_q", dict(cu_seqlens_q=np.int32([0, 5, 3, 10])), ValueError, "non-decreasing"),
    ("cu_seqlens_q", dict(cu_seqlens_q=np.int32([0, 3, 3, 9])), ValueError, "last offset"),
    ("cu_seqlens_k", dict(cu_seqlens_k=np.int32([0, 5, 8])), ValueError, "(4,)"),
    ("cu_seqlens_k", dict(cu_seqlens_k=np.int32([0, 5, 6, 7])), ValueError, "last offset"),
    ("max_seqlen_q", dict(max_seqlen_q=6), ValueError, "longest"),
    ("max_seqlen_k", dict(max_seqlen_k=True), TypeError, "int"),
    ("max_seqlen_k", dict(max_seqlen_k=4.0), TypeError, "int"),
    ("seqused_k", dict(seqused_k=np.int32([5, 2, 2])), ValueError, "b = 1"),
    ("seqused_k", dict(seqused_k=np.int32([5, 1])), ValueError, "shape"),
    ("seqused_k", dict(seqused_k=np.float32([5, 1, 2])), TypeError, "int32"),
    ("causal", dict(causal=1), TypeError, "bool"),
    ("softmax_scale", dict(softmax_scale=-1.0), ValueError, "positive"),
    ("window", dict(window=(3,)), TypeError, "pair"),
    ("alibi_slopes", dict(alibi_slopes=np.ones((2, 4), np.float32)), ValueError, "shape"),
    ("sinks", dict(sinks=np.ones(4, np.float64)), TypeError, "float32"),
]


@pytest.mark.parametrize("name, change, err, words", BAD,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments_are_named(name, change, err, words):
    args = {**_good(), **change}
    with pytest.raises(err) as info:
        cuflash.attention_varlen_forward(**args)
    assert str(info.value).startswith(name + ":"), str(info.value)
    assert words in str(info.value), str(info.value)


def test_cuda_arrays_go_to_the_kernels_not_the_cpu_path(monkeypatch):
    """CUDA arrays (simulated: every import reports device cuda:0) are validated without
    reading the offsets (no host sync) and handed to varlen_gpu; the CPU path never runs."""
    from cuflash import varlen_gpu

    real = varlen.import_array
    seen, drops = [], []

    def on_cuda(x, name):
        imported = real(x, name)
        return Imported(imported.array, imported.framework, ("cuda", 0))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the CPU path ran for CUDA arrays")

    def gpu_forward(call, dropout=None):
        seen.append(call)
        drops.append(dropout)
        q = call.q.array
        stats = np.zeros((q.shape[1], q.shape[0]), np.float32)
        return np.zeros_like(q), stats, stats

    monkeypatch.setattr(varlen, "import_array", on_cuda)
    monkeypatch.setattr(varlen.validate, "import_array", on_cuda)  # the offsets' import
    monkeypatch.setattr(varlen, "varlen_forward_cpu", must_not_run)
    monkeypatch.setattr(varlen_gpu, "varlen_forward_gpu", gpu_forward)
    monkeypatch.setattr(varlen, "export_array", lambda x, like: x)
    monkeypatch.setattr(varlen, "caller_stream", lambda imported: contextlib.nullcontext())
    good = _good()
    cuflash.attention_varlen_forward(**good)
    (call,) = seen
    assert call.offsets[0] is good["cu_seqlens_q"] and call.offsets[2] is None
    assert call.seqlens is None and call.record[0] == "device"  # never read on the host
    assert (call.problem.batch, call.problem.seqlen_q, call.problem.seqlen_k) == (3, 7, 5)
    # the CUDA checks that need no values: max lengths >= 1 when there are rows, alignment
    with pytest.raises(ValueError, match="^max_seqlen_q: expected an int >= the longest"):
        cuflash.attention_varlen_forward(**{**good, "max_seqlen_q": 0})
    with pytest.raises(ValueError, match="^cu_seqlens_k: expected shape"):
        cuflash.attention_varlen_forward(**{**good, "cu_seqlens_k": np.int32([0, 8])})
    # dropout's validated values reach the kernels' launcher
    cuflash.attention_varlen_forward(**good, dropout_p=0.1, dropout_seed=5, dropout_offset=2)
    assert drops == [{}, dict(dropout_p=0.1, dropout_seed=5, dropout_offset=2)]


def test_backward_refuses_another_layout_or_dense_stats():
    args = _good()
    o, stats = cuflash.attention_varlen_forward(**args)
    do = np.ones_like(args["q"])
    positional = [args[n] for n in ("q", "k", "v")]
    rest = [args[n] for n in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
    cuflash.attention_varlen_backward(do, *positional, o, stats, *rest)  # the same: fine
    other = [rest[0], np.int32([0, 4, 6, 8]), *rest[2:]]
    with pytest.raises(ValueError, match="^cu_seqlens_k: expected the sequence layout"):
        cuflash.attention_varlen_backward(do, *positional, o, stats, *other)
    with pytest.raises(ValueError, match="^seqused_k: expected the sequence layout"):
        cuflash.attention_varlen_backward(do, *positional, o, stats, *rest,
                                          seqused_k=np.int32([4, 1, 2]))
    with pytest.raises(ValueError, match="^causal: expected False"):
        cuflash.attention_varlen_backward(do, *positional, o, stats, *rest, causal=True)
    with pytest.raises(ValueError, match="^stats.m: expected float32 \\(4, 10\\)"):
        cuflash.attention_varlen_backward(do, *positional, o,
                                          cuflash.SoftmaxStats(stats.m[:, :5], stats.l),
                                          *rest)
    with pytest.raises(TypeError, match="^stats: expected the VarlenStats"):
        cuflash.attention_varlen_backward(do, *positional, o, (stats.m, stats.l), *rest)


@pytest.mark.gpu
def test_cupy_arrays_run_on_the_device():
    """CuPy arrays (an empty sequence among them) take the CUDA kernels and come back as CuPy
    arrays on the same device, matching the float64 reference by the 2x-naive rule."""
    import cupy

    args = _good()
    q, k, v = (args[n].astype(np.float16) for n in ("q", "k", "v"))
    rest = {n: args[n] for n in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")}
    device_rest = {n: cupy.asarray(x) if isinstance(x, np.ndarray) else x
                   for n, x in rest.items()}
    o, stats = cuflash.attention_varlen_forward(cupy.asarray(q), cupy.asarray(k),
                                                cupy.asarray(v), **device_rest)
    assert isinstance(o, cupy.ndarray) and isinstance(stats.m, cupy.ndarray)
    assert o.device.id == stats.l.device.id == cupy.cuda.Device().id
    ref_args = (rest["cu_seqlens_q"], rest["cu_seqlens_k"])
    o_ref = reference.attention_varlen_reference(q, k, v, *ref_args)[0]
    o_naive = reference.attention_varlen_naive(q, k, v, *ref_args, dtype=np.float16)
    report = testing.judge("o", cupy.asnumpy(o), o_ref, o_naive, dtype="float16")
    assert report.ok, str(report)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim, head_dim_v", [(24, 16), (16, 40)])
def test_head_dim_v_against_reference(head_dim, head_dim_v, causal):
    """v (and o, dO, dv) with their own head_dim_v (DeepSeek-style packed batches), through
    the CPU path; CUDA runs it on padded copies (tests/test_gpu_varlen.py)."""
    cu_q, cu_k = np.int32([0, 5, 5, 17, 20]), np.int32([0, 9, 12, 12, 30])
    rng = np.random.default_rng(head_dim + head_dim_v + causal)
    q = rng.standard_normal((20, 4, head_dim)).astype(np.float32)
    k = rng.standard_normal((30, 2, head_dim)).astype(np.float32)
    v = rng.standard_normal((30, 2, head_dim_v)).astype(np.float32)
    do = rng.standard_normal((20, 4, head_dim_v)).astype(np.float32)
    o, stats = cuflash.attention_varlen_forward(q, k, v, cu_q, cu_k, 12, 18, causal=causal)
    assert o.shape == (20, 4, head_dim_v)
    o_ref, _, _ = reference.attention_varlen_reference(q, k, v, cu_q, cu_k, causal=causal)
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
    grads = cuflash.attention_varlen_backward(do, q, k, v, o, stats, cu_q, cu_k, 12, 18,
                                              causal=causal)
    want = reference.attention_varlen_backward_reference(do, q, k, v, cu_q, cu_k,
                                                         causal=causal)
    for got, ref in zip(grads, want):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)

"""Score modifiers (issue #14, docs/masks.md) on the CPU path and through the API.

* The blockwise CPU path (cuflash.cpu) against the float64 reference under the acceptance
  rule, forward (o, m, l) and backward (dq, dk, dv, dsinks): hypothesis draws shapes (odd
  lengths, seqlen_q != seqlen_k, GQA, causal), dtypes, tiles and any combination of
  window, softcap, ALiBi and sinks; one parametrized case per modifier alone.
* The windowed CPU path visits exactly the tiles that intersect the window, in both loops.
* Validation: every bad modifier raises TypeError / ValueError naming it, nothing written;
  SoftmaxStats refuses a backward with other modifiers; CUDA arrays are refused before any
  allocation; calls with modifiers never take fastpath.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import api, cpu, reference, testing, validate
from cuflash.constants import default_softmax_scale
from cuflash.interop import Framework, Imported

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BF16)
NAMES = ("window", "softcap", "alibi_slopes", "sinks")


@dataclass(frozen=True)
class Case:
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_kv: int
    group: int
    head_dim: int
    causal: bool
    scale: float
    dtype: np.dtype
    block_m: int
    block_n: int
    seed: int
    window: tuple[int, int] | None = None
    softcap: float | None = None
    alibi: str | None = None  # None, "heads" or "batch": the shape of alibi_slopes
    sinks: bool = False
    mods: dict = field(default_factory=dict, compare=False)

    @property
    def heads(self) -> int:
        return self.heads_kv * self.group

    def inputs(self):
        rng = np.random.default_rng(self.seed)
        b, d, h = self.batch, self.head_dim, self.heads

        def normal(*shape):
            return rng.standard_normal(shape).astype(self.dtype)

        q, do = normal(b, self.seqlen_q, h, d), normal(b, self.seqlen_q, h, d)
        k, v = normal(b, self.seqlen_k, self.heads_kv, d), normal(b, self.seqlen_k,
                                                                   self.heads_kv, d)
        slopes = {None: None, "heads": (h,), "batch": (b, h)}[self.alibi]
        mods = dict(window=self.window, softcap=self.softcap,
                    alibi_slopes=None if slopes is None
                    else (2.0 ** -rng.uniform(0, 8, slopes)).astype(np.float32),
                    sinks=(rng.standard_normal(h) * 2).astype(np.float32) if self.sinks
                    else None)
        return q, k, v, do, mods

    def kwargs(self) -> dict:
        return dict(causal=self.causal, softmax_scale=self.scale)


SIDE = st.one_of(st.just(-1), st.integers(0, 3), st.integers(0, 40))


@st.composite
def cases(draw, max_len: int = 70, **fixed) -> Case:
    head_dim = draw(st.sampled_from([8, 16, 40, 64, 128]))
    length = st.one_of(st.integers(1, 5), st.integers(1, max_len))
    case = Case(
        batch=draw(st.integers(1, 2)),
        seqlen_q=draw(length),
        seqlen_k=draw(length),
        heads_kv=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 2, 3])),
        head_dim=head_dim,
        causal=draw(st.booleans()),
        scale=default_softmax_scale(head_dim) * draw(st.floats(0.5, 2.0)),
        dtype=draw(st.sampled_from(DTYPES)),
        block_m=draw(st.sampled_from([8, 16, 64])),
        block_n=draw(st.sampled_from([8, 16, 32])),
        seed=draw(st.integers(0, 2**32 - 1)),
        window=draw(st.one_of(st.none(), st.tuples(SIDE, SIDE))),
        softcap=draw(st.sampled_from([None, 0.5, 2.0, 20.0])),
        alibi=draw(st.sampled_from([None, "heads", "batch"])),
        sinks=draw(st.booleans()),
    )
    return replace(case, **fixed)


def _judge(name, got, ref, naive, dtype, scale=None):
    report = testing.judge(name, got, ref, naive, dtype=np.dtype(dtype).name, scale=scale)
    assert report.ok, str(report)


def _few_keys(case: Case) -> bool:
    """Some row sees between 1 and MIN_KEYS - 1 keys: there the naive backward cancels
    (almost) exactly and "2 x naive" measures luck (tests/test_cpu_numerics.py, MIN_KEYS)."""
    visible = reference._visible(case.seqlen_q, case.seqlen_k, case.causal, case.window)
    counts = visible.sum(axis=1)
    return bool(((counts > 0) & (counts < MIN_KEYS)).any())


def check_forward(case: Case) -> None:
    q, k, v, _, mods = case.inputs()
    o, m, l = cpu.flash_forward_cpu(q, k, v, **case.kwargs(), **mods, block_m=case.block_m,
                                    block_n=case.block_n)
    o_ref, m_ref, l_ref = reference.attention_reference(q, k, v, **case.kwargs(), **mods)
    o_nv = reference.attention_naive(q, k, v, **case.kwargs(), **mods, dtype=case.dtype)
    assert o.shape == q.shape and o.dtype == case.dtype
    _judge("o", o, o_ref, o_nv, case.dtype)
    dtype = np.dtype(case.dtype).name
    for name, got, ref in (("m", m, m_ref), ("l", l, l_ref)):
        assert got.dtype == np.float32 and got.shape == (case.batch, case.heads, case.seqlen_q)
        report = testing.judge_stats(name, got, ref, dtype=dtype)
        assert report.ok, str(report)


# Fewer keys per row than this: the backward gets FEW_KEYS_RTOL * max(1, |ref|) instead of
# the rule (the reason is in tests/test_cpu_numerics.py above its MIN_KEYS).
MIN_KEYS = 16
FEW_KEYS_RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 4 * 2.0**-10,
                 BF16: 4 * 2.0**-7}


def check_backward(case: Case) -> None:
    q, k, v, do, mods = case.inputs()
    blocks = dict(block_m=case.block_m, block_n=case.block_n)
    o, m, l = cpu.flash_forward_cpu(q, k, v, **case.kwargs(), **mods, **blocks)
    grads = cpu.flash_backward_cpu(do, q, k, v, o, m, l, **case.kwargs(), **mods, **blocks)
    refs = reference.attention_backward_reference(do, q, k, v, **case.kwargs(), **mods, o=o)
    naives = reference.attention_backward_naive(do, q, k, v, **case.kwargs(), **mods,
                                                dtype=case.dtype)
    assert len(grads) == len(refs) == len(naives) == (4 if case.sinks else 3)
    magnitude = testing.magnitude(*refs[:3])
    few = _few_keys(case)
    for name, got, ref, naive, like in zip(("dq", "dk", "dv", "dsinks"), grads, refs, naives,
                                           (q, k, v, None)):
        if like is None:  # dsinks: float32 (heads,), its own magnitude
            assert got.dtype == np.float32 and got.shape == (case.heads,)
        else:
            assert got.shape == like.shape and got.dtype == case.dtype, name
        scale = testing.magnitude(ref) if like is None else magnitude
        if few:
            err = np.abs(got.astype(np.float64) - ref).max(initial=0.0)
            bound = FEW_KEYS_RTOL[np.dtype(case.dtype)] * max(1.0, scale)
            bound = max(bound, testing.judge(name, got, ref, naive, dtype=np.dtype(
                case.dtype).name, scale=scale).bound)
            assert err <= bound, f"{name}: err {err:.3g} vs bound {bound:.3g} (few keys)"
        else:
            _judge(name, got, ref, naive, case.dtype, scale)


@settings(deadline=None, max_examples=400)
@given(case=cases())
def test_forward_matches_reference(case: Case):
    check_forward(case)


@settings(deadline=None, max_examples=400)
@given(case=cases())
def test_backward_matches_reference(case: Case):
    check_backward(case)


ALONE = {
    "window": dict(window=(9, 4)),
    "window-left": dict(window=(20, -1)),
    "window-causal": dict(window=(12, 3), causal=True),
    "softcap": dict(softcap=1.0),
    "alibi-heads": dict(alibi="heads"),
    "alibi-batch": dict(alibi="batch"),
    "sinks": dict(sinks=True),
    "all": dict(window=(30, 5), softcap=3.0, alibi="batch", sinks=True, causal=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", ALONE, ids=list(ALONE))
def test_each_modifier(which, dtype):
    """Each modifier alone (and all together) on one GQA shape with odd lengths."""
    case = Case(batch=2, seqlen_q=45, seqlen_k=77, heads_kv=2, group=2, head_dim=32,
                causal=False, scale=0.25, dtype=dtype, block_m=16, block_n=16, seed=11)
    case = replace(case, **ALONE[which])
    check_forward(case)
    check_backward(case)


def test_sinks_on_rows_that_see_no_key():
    """A row that sees no key still has its sink: o = 0, m = sink, l = 1, dq = 0."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 9, 2, 8)).astype(np.float32)
    k = v = rng.standard_normal((1, 4, 1, 8)).astype(np.float32)
    sinks = np.float32([0.5, -2.0])
    for kw in (dict(causal=True), dict(causal=False, window=(0, 0))):
        o, m, l = cpu.flash_forward_cpu(q, k, v, softmax_scale=0.3, sinks=sinks, **kw)
        dead = slice(0, 5)  # rows 0..4 sit left of key 0's diagonal
        assert np.all(o[:, dead] == 0) and np.all(l[:, :, dead] == 1)
        np.testing.assert_array_equal(m[0, :, dead], np.repeat(sinks[:, None], 5, axis=1))
        dq, _, _, dsinks = cpu.flash_backward_cpu(q, q, k, v, o, m, l, softmax_scale=0.3,
                                                  sinks=sinks, **kw)
        assert np.all(dq[:, dead] == 0) and np.isfinite(dsinks).all()
    empty = np.zeros((1, 0, 1, 8), np.float32)  # seqlen_k == 0
    o, m, l = cpu.flash_forward_cpu(q, empty, empty, causal=False, softmax_scale=0.3,
                                    sinks=sinks)
    assert np.all(o == 0) and np.all(l == 1) and np.all(m == sinks[None, :, None])


# -- the window's tiles: visited iff they intersect it --------------------------------------


def _intersecting(sq, sk, causal, window, bm, bn) -> set:
    visible = reference._visible(sq, sk, causal, window)
    return {(i0, j0) for i0 in range(0, sq, bm) for j0 in range(0, sk, bn)
            if visible[i0:i0 + bm, j0:j0 + bn].any()}


def _spy(monkeypatch, method: str, visited: list) -> None:
    """Record the (query tile, key block) pairs _Tiling's loop ranges hand out."""
    real = getattr(cpu._Tiling, method)

    def record(self, a, b):
        starts = real(self, a, b)
        visited.extend((a, s) if method == "key_blocks" else (s, a) for s in starts)
        return starts

    monkeypatch.setattr(cpu._Tiling, method, record)


@pytest.mark.parametrize("sq, sk, causal, window, bm, bn", [
    (200, 200, False, (16, 16), 16, 16),
    (200, 200, True, (40, -1), 32, 16),
    (61, 203, False, (5, 0), 8, 32),   # seqlen_q < seqlen_k: the diagonal sits on the right
    (203, 61, True, (-1, 7), 16, 8),    # seqlen_q > seqlen_k: early rows see nothing
    (97, 97, False, (0, 0), 8, 8),      # a window of one key per row
    (97, 130, False, (-1, 3), 16, 8),
    (64, 64, False, (200, 300), 16, 16),  # wider than the sequence: every tile
])
def test_window_visits_only_intersecting_tiles(monkeypatch, sq, sk, causal, window, bm, bn):
    rng = np.random.default_rng(1)
    q, do = (rng.standard_normal((1, sq, 2, 8)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((1, sk, 1, 8)).astype(np.float32) for _ in range(2))
    kw = dict(causal=causal, softmax_scale=0.3, window=window, block_m=bm, block_n=bn)
    forward, backward = [], []
    _spy(monkeypatch, "key_blocks", forward)
    _spy(monkeypatch, "query_tiles", backward)
    o, m, l = cpu.flash_forward_cpu(q, k, v, **kw)
    cpu.flash_backward_cpu(do, q, k, v, o, m, l, **kw)
    want = _intersecting(sq, sk, causal, window, bm, bn)
    assert len(forward) == len(set(forward)) and set(forward) == want
    assert len(backward) == len(set(backward)) and set(backward) == want


def test_window_work_scales_with_the_window(monkeypatch):
    """A (w, 0) window over n keys visits about n / block_m * (w / block_n + 2) tiles."""
    n, w, b = 2048, 64, 64
    visited = []
    _spy(monkeypatch, "key_blocks", visited)
    x = np.random.default_rng(2).standard_normal((1, n, 1, 8)).astype(np.float32)
    cpu.flash_forward_cpu(x, x, x, causal=True, softmax_scale=0.3, window=(w, -1),
                          block_m=b, block_n=b)
    assert len(visited) == n // b * 2 - 1  # the diagonal block and the one before it
    tiling = cpu._Tiling.of(n, n, 1, causal=True, window=(w, -1), block_m=b, block_n=b)
    masked = sum(tiling.needs_mask(i0, i0 + b, j0, j0 + b) for i0, j0 in visited)
    assert masked == len(visited)  # every visited tile straddles an edge of the window


def test_visible_is_the_policy():
    """_Tiling.visible agrees with the reference's mask (causal and window intersect)."""
    for sq, sk in [(7, 12), (12, 7), (9, 9)]:
        for causal in (False, True):
            for window in [None, (0, 0), (2, -1), (-1, 1), (3, 2)]:
                tiling = cpu._Tiling.of(sq, sk, 1, causal=causal, window=window, block_m=4,
                                        block_n=4)
                i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
                want = reference._visible(sq, sk, causal, window)
                np.testing.assert_array_equal(np.broadcast_to(tiling.visible(i, j), want.shape),
                                              want)


# -- the API: validation, recorded modifiers, CUDA, fastpath ---------------------------------


B, SQ, SK, H, HKV, D = 2, 24, 20, 4, 2, 16


def _arrays(dtype=np.float16, seed=0):
    rng = np.random.default_rng(seed)
    q, do = (rng.standard_normal((B, SQ, H, D)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((B, SK, HKV, D)).astype(dtype) for _ in range(2))
    return q, k, v, do


GOOD = dict(window=(3, 1), softcap=2.0, alibi_slopes=np.float32([0.5, 0.25, 0.125, 0.0625]),
            sinks=np.float32([0.1, -0.2, 0.3, 1.0]))

BAD = [  # (id, keywords, exception, regex)
    ("window-int", dict(window=3), TypeError, r"^window: expected a pair \(left, right\)"),
    ("window-triple", dict(window=(1, 2, 3)), TypeError, r"^window: expected a pair"),
    ("window-float", dict(window=(1.0, 2)), TypeError, r"^window: .*got float 1\.0"),
    ("window-bool", dict(window=(True, 2)), TypeError, r"^window: .*got bool True"),
    ("window-below", dict(window=(-2, 0)), ValueError, r"^window: expected .*got \(-2, 0\)"),
    ("softcap-str", dict(softcap="1"), TypeError, r"^softcap: expected a real number >= 0"),
    ("softcap-bool", dict(softcap=True), TypeError, r"^softcap: expected a real number"),
    ("softcap-neg", dict(softcap=-1.0), ValueError, r"^softcap: expected 0 \(off\) or a finite"),
    ("softcap-nan", dict(softcap=float("nan")), ValueError, r"^softcap: .*got nan"),
    ("softcap-inf", dict(softcap=float("inf")), ValueError, r"^softcap: .*got inf"),
    ("alibi-list", dict(alibi_slopes=[0.5] * H), TypeError, r"^alibi_slopes: expected an array"),
    ("alibi-f16", dict(alibi_slopes=np.float16([0.5] * H)), TypeError,
     r"^alibi_slopes: expected dtype float32, got float16"),
    ("alibi-shape", dict(alibi_slopes=np.ones((H, B), np.float32)), ValueError,
     r"^alibi_slopes: expected shape \(4,\) or \(2, 4\) .*got \(4, 2\)"),
    ("alibi-kv-heads", dict(alibi_slopes=np.ones(HKV, np.float32)), ValueError,
     r"^alibi_slopes: expected shape .*got \(2,\)"),
    ("alibi-inf", dict(alibi_slopes=np.float32([0.5, np.inf, 0.1, 0.1])), ValueError,
     r"^alibi_slopes: expected finite values, got 1 that are not \(first: inf\)"),
    ("sinks-f64", dict(sinks=np.zeros(H)), TypeError,
     r"^sinks: expected dtype float32, got float64"),
    ("sinks-shape", dict(sinks=np.zeros((1, H), np.float32)), ValueError,
     r"^sinks: expected shape \(4,\) \(heads\), got \(1, 4\)"),
    ("sinks-nan", dict(sinks=np.float32([0, 0, np.nan, 0])), ValueError,
     r"^sinks: expected finite values"),
]


def _bits(arrays) -> list:
    return [np.ascontiguousarray(x).view(np.uint8).copy() for x in arrays]


@pytest.mark.parametrize("case_id, kw, exc, pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_modifiers_raise_and_write_nothing(case_id, kw, exc, pattern):
    q, k, v, do = _arrays()
    o, stats = cuflash.attention_forward(q, k, v)
    arrays = [q, k, v, do, o, stats.m, stats.l]
    before = _bits(arrays)
    with pytest.raises(exc, match=pattern):
        cuflash.attention_forward(q, k, v, **kw)
    with pytest.raises(exc, match=pattern):
        cuflash.attention_backward(do, q, k, v, o, cuflash.SoftmaxStats(stats.m, stats.l), **kw)
    for after, bits in zip(_bits(arrays), before):
        np.testing.assert_array_equal(after, bits)


def test_off_values_are_off():
    """window (-1, -1) and softcap 0 are no modifier: the same result as without them."""
    q, k, v, _ = _arrays(np.float32)
    o, stats = cuflash.attention_forward(q, k, v, causal=True)
    o2, stats2 = cuflash.attention_forward(q, k, v, causal=True, window=(-1, -1), softcap=0)
    np.testing.assert_array_equal(o, o2)
    assert stats2.window is None and stats2.softcap is None


def test_api_round_trip_with_modifiers():
    """attention / attention_forward / attention_backward run the CPU path with all four
    and record them; the backward returns dsinks float32 (heads,)."""
    q, k, v, do = _arrays(np.float32)
    o, stats = cuflash.attention_forward(q, k, v, causal=True, **GOOD)
    np.testing.assert_array_equal(cuflash.attention(q, k, v, causal=True, **GOOD), o)
    scale = default_softmax_scale(D)
    o_cpu, m, l = cpu.flash_forward_cpu(q, k, v, causal=True, softmax_scale=scale, **GOOD)
    np.testing.assert_array_equal(o, o_cpu)
    np.testing.assert_array_equal(stats.m, m)
    assert stats.window == (3, 1) and stats.softcap == 2.0
    assert stats.sinks == ((H,), tuple(GOOD["sinks"].tolist()))
    grads = cuflash.attention_backward(do, q, k, v, o, stats, causal=True, **GOOD)
    assert len(grads) == 4 and grads[3].dtype == np.float32 and grads[3].shape == (H,)
    want = cpu.flash_backward_cpu(do, q, k, v, o, m, l, causal=True, softmax_scale=scale,
                                  **GOOD)
    for got, ref in zip(grads, want):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name, other", [
    ("window", None), ("window", (3, 0)), ("softcap", None), ("softcap", 2.5),
    ("alibi_slopes", None), ("alibi_slopes", GOOD["alibi_slopes"][None].repeat(B, 0) * 2),
    ("sinks", None), ("sinks", GOOD["sinks"] + 1),
])
def test_backward_refuses_other_modifiers(name, other):
    q, k, v, do = _arrays(np.float32)
    o, stats = cuflash.attention_forward(q, k, v, **GOOD)
    kw = dict(GOOD, **{name: other})
    with pytest.raises(ValueError, match=rf"^{name}: expected .*forward pass that made stats"):
        cuflash.attention_backward(do, q, k, v, o, stats, **kw)
    plain_o, plain_stats = cuflash.attention_forward(q, k, v)  # and the other way round
    with pytest.raises(ValueError, match=r"^window: expected None as in the forward"):
        cuflash.attention_backward(do, q, k, v, plain_o, plain_stats, **GOOD)
    bare = cuflash.SoftmaxStats(stats.m, stats.l)  # hand-built: not checked
    assert len(cuflash.attention_backward(do, q, k, v, o, bare, **kw)) in (3, 4)


def _as_cuda(x, index: int = 0) -> Imported:
    """A host array labelled as a CuPy array on cuda:index (as tests/test_validation.py)."""
    return Imported(array=x, framework=Framework.CUPY, device=("cuda", index))


@pytest.mark.parametrize("given_names", [("window",), ("softcap",), ("alibi_slopes",),
                                         ("sinks",), ("softcap", "sinks"), NAMES])
def test_cuda_validation_accepts_modifiers(given_names):
    """The CUDA kernels run the modifiers (issue #14): validation passes them through; a
    kernel family that lacks one refuses it when the call is planned (tests/
    test_kernel_modifiers.py)."""
    q, k, v, _ = _arrays()
    kw = {name: GOOD[name] for name in given_names}
    problem = validate.check_forward(_as_cuda(q), _as_cuda(k), _as_cuda(v), causal=False,
                                     softmax_scale=None)
    labelled = {n: (_as_cuda(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    mods = validate.check_modifiers(_as_cuda(q), problem, **labelled)
    assert mods.first == given_names[0]


def test_cuda_off_values_are_not_refused():
    q, k, v, _ = _arrays()
    problem = validate.check_forward(_as_cuda(q), _as_cuda(k), _as_cuda(v), causal=True,
                                     softmax_scale=None)
    mods = validate.check_modifiers(_as_cuda(q), problem, window=(-1, -1), softcap=0.0)
    assert mods.first is None


def test_modifier_arrays_join_the_fast_path_check(monkeypatch):
    """Calls with modifiers may take fastpath too (CUDA torch / CuPy arrays); the slopes and
    sinks are among the arrays that must all be of the fast framework, and NumPy arrays (for
    which _fast_backend says None) take the general path and get the CPU's results."""
    calls = []
    monkeypatch.setattr(api, "_fast_backend", lambda arrays, *a: calls.append(arrays))
    q, k, v, do = _arrays(np.float32)
    for name in NAMES:
        o, stats = cuflash.attention_forward(q, k, v, **{name: GOOD[name]})
        cuflash.attention_backward(do, q, k, v, o, stats, **{name: GOOD[name]})
        given = GOOD[name] if isinstance(GOOD[name], np.ndarray) else None
        forward, backward = calls[-2:]
        assert len(forward) == 3 + (given is not None) and len(backward) == 7 + (given is not None)
        if given is not None:
            assert forward[-1] is given and backward[-1] is given
        assert o.shape == q.shape  # the general path ran


def test_torch_cpu_tensors():
    """torch CPU tensors run the CPU path; dsinks comes back as a torch tensor; per-head
    arrays must be of q's framework."""
    torch = pytest.importorskip("torch")
    q, k, v, do = (torch.from_numpy(x) for x in _arrays(np.float32))
    mods = dict(GOOD, alibi_slopes=torch.from_numpy(GOOD["alibi_slopes"]),
                sinks=torch.from_numpy(GOOD["sinks"]))
    o, stats = cuflash.attention_forward(q, k, v, **mods)
    grads = cuflash.attention_backward(do, q, k, v, o, stats, **mods)
    assert all(isinstance(g, torch.Tensor) for g in grads) and grads[3].shape == (H,)
    with pytest.raises(TypeError, match=r"^sinks: expected a torch array like q, got numpy"):
        cuflash.attention_forward(q, k, v, sinks=GOOD["sinks"])

"""The score modifiers in the CUDA kernels (issue #14), what the CPU can check: spec names and
defines, plan selection, the run-time arguments, refusal by a family that lacks a modifier,
and that every modifier spec compiles with zero spills (NVRTC, sm_80 and sm_90). The numbers
are checked on the GPU by tests/test_gpu_modifiers.py.
"""

import os
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cuflash import launch, plan, specs
from cuflash.config import Config
from cuflash.specs import ModFlags

A100 = specs.facts_for_arch("sm_80")
H100 = specs.facts_for_arch("sm_90")
ALL = ModFlags(window=True, softcap=True, alibi=True, sinks=True)


def shape(**kw) -> plan.Shape:
    base = dict(batch=2, seqlen_q=300, seqlen_k=333, heads=8, heads_kv=2, head_dim=128,
                dtype="bfloat16", causal=False)
    mods = kw.pop("mods", specs.NO_MODS)
    return plan.Shape(**{**base, **kw}, mods=mods)


# -- names and defines ---------------------------------------------------------------------------

def test_names_and_defines_say_which_modifiers():
    spec = specs.select_forward(A100, "bfloat16", 128, False, mods=ALL)
    assert spec.name.endswith("_local_softcap_alibi_sinks")
    d = spec.defines
    assert (d["CF_MASK"], d["CF_SOFTCAP"], d["CF_ALIBI"], d["CF_SINKS"]) == (2, 1, 1, 1)
    causal = specs.select_forward(A100, "bfloat16", 128, True, mods=ModFlags(softcap=True))
    assert causal.name.endswith("_causal_softcap") and causal.defines["CF_MASK"] == 1


def test_plain_specs_keep_their_names_and_defines():
    """The plain and causal specs compile as before: no modifier define is set at all."""
    for causal in (False, True):
        spec = specs.select_forward(A100, "float16", 64, causal)
        assert not {"CF_SOFTCAP", "CF_ALIBI", "CF_SINKS"} & set(spec.defines)
        assert spec.defines["CF_MASK"] == int(causal)
        assert spec.name.endswith("_causal") == causal and "local" not in spec.name


def test_each_direction_compiles_only_what_it_reads():
    bwd = specs.select_backward(A100, "bfloat16", 128, False, False, mods=ALL)
    assert bwd.mods == ModFlags(window=True, softcap=True, alibi=True)  # lse2 holds the sink
    dq = specs.select_backward_dq(A100, "bfloat16", 128, False, mods=ALL)
    assert dq.mods == bwd.mods
    pre = specs.select_backward_pre("bfloat16", A100, mods=ALL)
    assert pre.mods == ModFlags(sinks=True) and pre.name == "bwd_pre_bf16_sinks"


def test_window_is_the_local_mode_even_with_causal():
    spec = specs.select_forward(A100, "bfloat16", 64, True, mods=ModFlags(window=True))
    assert not spec.causal and spec.defines["CF_MASK"] == 2


@pytest.mark.parametrize("window, causal, expected", [
    (None, False, None), ((-1, -1), True, None), ((-1, 5), True, None), ((7, 5), True, (7, 0)),
    ((7, -1), False, (7, -1)), ((-1, 0), False, (-1, 0)), ((0, 0), False, (0, 0)),
])
def test_effective_window_folds_causal_in(window, causal, expected):
    assert plan.effective_window(window, causal) == expected
    assert plan.mod_flags(window, None, None, None, causal).window == (expected is not None)


# -- selection -----------------------------------------------------------------------------------

def test_hopper_and_portable_families_take_every_modifier():
    s = shape(mods=ALL)
    assert plan.plan_forward(s, H100).kernel.spec.kind == "fwd90"
    assert plan.plan_forward(s, H100, Config(wgmma=False)).kernel.spec.kind == "fwd"
    back = plan.plan_backward(replace(s, head_dim=64), H100, False)
    assert back.main.spec.kind == "bwd90" and back.pre.spec.mods.sinks
    # head_dim 128 with softcap + ALiBi too (it spilled before tanh.approx; tests compile it)
    assert plan.plan_backward(s, H100, False).main.spec.kind == "bwd90"
    det = plan.plan_backward(s, H100, True)  # ordered dQ, a window too (registry._ordered_dq)
    assert det.main.spec.kind == "bwd90" and det.main.spec.dq_ordered and det.dq is None
    assert det.main.spec.mods.window and det.main.spec.mods.softcap, det.main.spec.name
    masked = plan.plan_backward(replace(s, mods=replace(ALL, block_sparse=True)), H100, True)
    assert masked.main.spec.kind == "bwd" and masked.dq.spec.mods.softcap  # the dQ pass
    for kib in specs.BUDGETS_KIB:  # every shared-memory budget has a tile
        small = plan.plan_forward(s, A100, Config(smem_budget=kib * specs.KIB)).kernel.spec
        assert small.mods == ALL and small.smem_bytes <= kib * specs.KIB


def test_float32_family_takes_every_modifier():
    for deterministic in (False, True):
        p = plan.plan_backward(shape(dtype="float32", mods=ALL), A100, deterministic)
        assert p.main.spec.mods == ModFlags(window=True, softcap=True, alibi=True)
    assert plan.plan_forward(shape(dtype="float32", mods=ALL), A100).kernel.spec.mods == ALL


@pytest.mark.parametrize("name", ["window", "softcap", "alibi", "sinks"])
def test_a_family_without_a_modifier_refuses_naming_both(monkeypatch, name):
    """Every family has every modifier today; one that lacks one (a new family, say) must
    refuse with ValueError naming modifier and family, not fall back to another family."""
    from dataclasses import replace

    from cuflash import registry

    lacking = tuple(replace(v, modifiers=tuple(m for m in v.modifiers if m != name))
                    if v.source == "flash_fwd_fp32.cu" else v for v in registry.VARIANTS)
    monkeypatch.setattr(specs, "VARIANTS", lacking)
    with pytest.raises(ValueError, match=rf"^{name}: not supported by the fwd kernel for "
                                         r"float32 \(flash_fwd_fp32.cu\)"):
        specs.select_forward(A100, "float32", 64, False, mods=ModFlags(**{name: True}))
    specs.select_forward(A100, "float32", 64, False)  # without it: fine


def test_plans_differ_by_modifiers():
    plain, mods = shape(), shape(mods=ModFlags(alibi=True))
    assert plain != mods
    a = plan.plan_forward(plain, A100).kernel.spec
    b = plan.plan_forward(mods, A100).kernel.spec
    assert a.name != b.name and b.name == a.name + "_alibi"


# -- run-time arguments --------------------------------------------------------------------------

def test_mod_args():
    s = shape(seqlen_q=10, seqlen_k=20, causal=True)
    m = launch.mod_args(s, (3, 5), 30.0, 0.125, alibi=0x1000, stride_alibi_b=8, sinks=0x2000)
    assert (m.window_left, m.window_right) == (3, 0)  # causal: right = 0
    assert m.softcap_raw == 240.0 and m.raw_per_score == 8.0
    assert m.kernel_args(0) == (3, 0, 240.0, 1 / 240.0, 8.0, 0x1000, 8)
    assert m.kernel_args(2)[5] == 0x1000 + 2 * 8 * 4  # a batch slice's slopes
    wide = launch.mod_args(shape(seqlen_q=10, seqlen_k=20), (-1, 4), None, 1.0)
    assert (wide.window_left, wide.window_right, wide.softcap_raw) == (30, 4, 0.0)
    assert launch.mod_args(shape(seqlen_q=10, seqlen_k=20), (100, 2), 0, 1.0).window_left == 30


# -- compile: every modifier spec, zero spills ---------------------------------------------------

try:
    from cupy_backends.cuda.libs import nvrtc  # noqa: F401
    HAVE_NVRTC = True
except ImportError:
    HAVE_NVRTC = bool(os.environ.get("CI"))  # CI must not skip (it then fails the import)

# all; each alone; and the pairs that spilled a selected tile where all four did not (the
# warp-specialized forward: causal softcap or ALiBi, softcap on packed sequences, a window
# with softcap or ALiBi; the Hopper backward: causal ALiBi on packed sequences)
COMBOS = (ALL, ModFlags(softcap=True, alibi=True), ModFlags(window=True),
          ModFlags(softcap=True), ModFlags(alibi=True), ModFlags(sinks=True),
          ModFlags(softcap=True, varlen=True), ModFlags(alibi=True, varlen=True),
          ModFlags(window=True, softcap=True), ModFlags(window=True, alibi=True))


def _modifier_specs(arch: str) -> list:
    facts = specs.facts_for_arch(arch)
    out = {}
    budgets = [None] + [kib * specs.KIB for kib in specs.BUDGETS_KIB]
    for budget in budgets:
        f = facts.with_budget(budget)
        combos = COMBOS if budget is None else COMBOS[:1]  # small budgets: the tiles only
        for mods in combos:
            for bucket in specs.HEAD_DIM_BUCKETS:
                for causal in (False, True):
                    kw = dict(mods=mods)
                    for dtype in ("bfloat16", "float32"):
                        for spec in (
                                specs.select_forward(f, dtype, bucket, causal, **kw),
                                specs.select_backward(f, dtype, bucket, causal, False, **kw),
                                specs.select_backward(f, dtype, bucket, causal, True, **kw),
                                specs.select_backward_dq(f, dtype, bucket, causal, **kw)):
                            out.setdefault(spec.name, spec)
        for dtype in ("bfloat16", "float32"):
            spec = specs.select_backward_pre(dtype, f, mods=ALL)
            out.setdefault(spec.name, spec)
    return list(out.values())


@pytest.mark.skipif(not HAVE_NVRTC, reason="CuPy's NVRTC is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_modifier_specs_compile_without_spills(arch):
    try:
        from test_compile import _assert_compiled_without_spills
    except ImportError:  # tests/ collected as a package
        from tests.test_compile import _assert_compiled_without_spills
    _assert_compiled_without_spills([(spec, arch) for spec in _modifier_specs(arch)],
                                    f"modifier {arch}")


# -- the block-range arithmetic of cf_mask.cuh, transcribed, against the reference's mask ---------
# The kernels cannot run here; their range formulas can. These mirror MaskPolicy, key_tiles and
# query_tiles line by line (every division there has a non-negative dividend, so // is C's /).

class _Mask:
    def __init__(self, mode, sq, sk, left, right):
        self.mode, self.sq, self.sk, self.off = mode, sq, sk, sk - sq
        self.left, self.right = left, right

    def visible(self, i, j):
        causal, local = self.mode == 1, self.mode == 2
        return not (j >= self.sk or (causal and j > i + self.off) or
                    (local and (j > i + self.off + self.right or j < i + self.off - self.left)))

    def key_begin(self, i):
        return max(0, i + self.off - self.left) if self.mode == 2 else 0

    def key_end(self, i):
        return (min(self.sk, i + self.off + 1) if self.mode == 1 else
                min(self.sk, i + self.off + self.right + 1) if self.mode == 2 else self.sk)

    def key_limit(self, i):
        return (i + self.off + 1 if self.mode == 1 else
                i + self.off + self.right + 1 if self.mode == 2 else 2**31 - 1)

    def query_end(self, j):
        return min(self.sq, max(0, j - self.off + self.left + 1)) if self.mode == 2 else self.sq

    def full(self, r0, r1, k0, k1):
        causal, local = self.mode == 1, self.mode == 2
        return not (k1 >= self.sk or (causal and k1 > r0 + self.off) or
                    (local and (k1 > r0 + self.off + self.right
                                or k0 < r1 + self.off - self.left)))

    def any(self, r0, r1, k0, k1):
        return ((self.mode != 1 or k0 <= r1 + self.off) and
                (self.mode != 2 or (k0 <= r1 + self.off + self.right
                                    and k1 >= r0 + self.off - self.left)))

    def key_tiles(self, bn, q0, q_last):
        end = (self.sk + bn - 1) // bn
        if self.mode in (1, 2):
            last_key = self.key_limit(q_last) - 1
            end = min(end, 0 if last_key < 0 else last_key // bn + 1)
        begin = min(self.key_begin(q0) // bn, end) if self.mode == 2 else 0
        return begin, end

    def query_tiles(self, bm, n0, n_last):
        m_tiles = (self.sq + bm - 1) // bm
        first, end = 0, m_tiles
        if self.mode in (1, 2):
            i_min = n0 - self.off - (self.right if self.mode == 2 else 0)
            first = m_tiles if i_min >= self.sq else i_min // bm if i_min > 0 else 0
        if self.mode == 2:
            end = max(first, (self.query_end(n_last) + bm - 1) // bm)
        return first, end


def _kernel_mask(sq, sk, causal, window):
    """The mask mode and run-time bounds the launcher passes (plan / launch.mod_args)."""
    effective = plan.effective_window(window, causal)
    if effective is None:
        return _Mask(1 if causal else 0, sq, sk, 0, 0)
    args = launch.mod_args(shape(seqlen_q=sq, seqlen_k=sk, causal=causal), window, None, 1.0)
    return _Mask(2, sq, sk, args.window_left, args.window_right)


@settings(deadline=None, max_examples=300)
@given(sq=st.integers(1, 90), sk=st.integers(1, 90), causal=st.booleans(),
       window=st.one_of(st.none(), st.tuples(st.integers(-1, 40), st.integers(-1, 40))),
       bm=st.sampled_from([16, 32, 64]), bn=st.sampled_from([16, 32, 64]))
def test_tile_ranges_cover_every_visible_pair(sq, sk, causal, window, bm, bn):
    from cuflash import reference

    visible = reference._visible(sq, sk, causal, window)
    mask = _kernel_mask(sq, sk, causal, window)
    for i in range(sq):
        for j in range(sk):
            assert mask.visible(i, j) == bool(visible[i, j]), (i, j)
    for q0 in range(0, sq, bm):  # forward / dQ: the key tiles of a query tile
        q_last = min(q0 + bm, sq) - 1
        begin, end = mask.key_tiles(bn, q0, q_last)
        for j in np.nonzero(visible[q0:q_last + 1].any(axis=0))[0]:
            assert begin <= j // bn < end, (q0, j)
        for t in range(begin, end):
            k0, k1 = t * bn, t * bn + bn - 1
            if mask.full(q0, q_last, k0, k1):  # no mask applied: every pair must be visible
                assert visible[q0:q_last + 1, k0:k1 + 1].all() and k1 < sk
    for n0 in range(0, sk, bn):  # backward: the query tiles of a key block
        n_last = min(n0 + bn, sk) - 1
        first, end = mask.query_tiles(bm, n0, n_last)
        for i in np.nonzero(visible[:, n0:n_last + 1].any(axis=1))[0]:
            assert first <= i // bm < end, (n0, i)
        for r0 in range(0, sq, 16):  # a warp's sub-tile skipped by any() sees nothing
            r1 = min(r0 + 16, sq) - 1
            if not mask.any(r0, r1, n0, n_last):
                assert not visible[r0:r1 + 1, n0:n_last + 1].any()


@settings(deadline=None, max_examples=300)
@given(sq=st.integers(1, 300), sk=st.integers(1, 300), causal=st.booleans(),
       bm=st.sampled_from([64, 128]), bn=st.sampled_from([64, 128]))
def test_ordered_dq_turns_number_the_visiting_key_tiles(sq, sk, causal, bm, bn):
    """Ordered dQ (flash_bwd_sm90_ws.cu, deterministic mode, no window): key tile t adds into
    query tile q at turn t - begin (ascending) or end - 1 - t (causal, descending), with
    [begin, end) = key_tiles(q). The turns are a permutation of 0 .. count - 1 only if the key
    tiles whose query range holds q are exactly that range: a gap would leave a turn that never
    comes, an extra tile a turn taken twice."""
    mask = _kernel_mask(sq, sk, causal, None)
    for q0 in range(0, sq, bm):
        begin, end = mask.key_tiles(bn, q0, min(q0 + bm, sq) - 1)
        visiting = [n0 // bn for n0 in range(0, sk, bn)
                    if q0 // bm in range(*mask.query_tiles(bm, n0, min(n0 + bn, sk) - 1))]
        assert visiting == list(range(begin, end)), (q0, visiting, begin, end)
        turns = sorted((end - 1 - t) if causal else (t - begin) for t in visiting)
        assert turns == list(range(len(visiting)))


@settings(deadline=None, max_examples=300)
@given(n_q=st.integers(1, 160), n_k=st.integers(1, 64))
def test_rotated_ordered_dq_turns_follow_the_walks(n_q, n_k):
    """Ordered dQ, not causal (flash_bwd_sm90_ws.cu): key tile j walks the query tiles from
    j n_q / n_k on, wrapping around, and adds into query tile q at turn
    (first_in - j) mod n_k, first_in the last key tile that starts at or before q. The turns
    must number the key tiles in the order their walks reach q (with all key tiles running,
    each then waits only for a tile that got there at an earlier step), and each walk must
    reach every query tile once."""
    assume(n_q >= n_k)  # the kernel keeps the ascending order otherwise
    start = [j * n_q // n_k for j in range(n_k)]
    walks = [[(s + i) % n_q for i in range(n_q)] for s in start]
    for q in range(n_q):
        first_in = ((q + 1) * n_k + n_q - 1) // n_q - 1
        turns = [first_in - j + (n_k if first_in < j else 0) for j in range(n_k)]
        steps = [walks[j].index(q) for j in range(n_k)]
        assert sorted(turns) == list(range(n_k))
        by_step = sorted(range(n_k), key=lambda j: steps[j])
        assert [turns[j] for j in by_step] == list(range(n_k))
    assert all(sorted(w) == list(range(n_q)) for w in walks)

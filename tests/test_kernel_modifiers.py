"""The score modifiers in the CUDA kernels (issue #14), what the CPU can check: spec names and
defines, plan selection, the run-time arguments, refusal by a family that lacks a modifier,
and that every modifier spec compiles with zero spills (NVRTC, sm_80 and sm_90). The numbers
are checked on the GPU by tests/test_gpu_modifiers.py.
"""

import os

import pytest

from cuflash import aot, launch, plan, specs
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
    back = plan.plan_backward(s, H100, False)
    assert back.main.spec.kind == "bwd90" and back.pre.spec.mods.sinks
    det = plan.plan_backward(s, H100, True)
    assert det.main.spec.kind == "bwd" and det.dq.spec.mods.softcap
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

COMBOS = (ALL, ModFlags(softcap=True, alibi=True), ModFlags(window=True))


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
    work = [(spec, arch) for spec in _modifier_specs(arch)]
    results = aot.run_parallel(aot.report_one, work, 2, f"{len(work)} modifier specs, {arch}")
    reports = [r for batch in results for r in batch]
    failed = [f"{r.spec}: {r.error}" for r in reports if isinstance(r, aot.CompileFailure)]
    assert not failed, "\n".join(failed)
    bad = [f"{r.spec}/{r.function}: {r.registers} regs, {r.spills} B spilled, "
           f"{r.stack_bytes} B stack" for r in reports if r.spills or r.stack_bytes]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("kw", [dict(window=(3, 0)), dict(softcap=2.0),
                                dict(alibi_slopes="ones"), dict(sinks="zeros")])
def test_jax_adapter_refuses_modifiers_by_name(kw):
    jnp = pytest.importorskip("jax.numpy")
    import cuflash.jax as cj

    q = jnp.ones((1, 8, 2, 16))
    kw = {n: (getattr(jnp, x)(2) if isinstance(x, str) else x) for n, x in kw.items()}
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"^{name}: cuflash.jax.flash_attention does not"):
        cj.flash_attention(q, q, q, **kw)
    assert cj.flash_attention(q, q, q, window=(-1, -1), softcap=0).shape == q.shape

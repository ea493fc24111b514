"""Every decode spec (flash_decode.cu: append + split + combine; flash_decode_mma.cu: its
tensor-core split with the same append and combine) compiles through NVRTC for sm_75, sm_80,
sm_90 and sm_120 with zero register spills and no stack. SIMT specs fit 48 KB of shared
memory; tensor-core specs (sm_80 and newer) the arch's opt-in limit (all_decode_specs lists
only those), and a deeper ring than 99 KB (sm_86 / sm_89 / sm_120's limit) has its two-tile
twin in the list (the spec select_decode takes there, tested in test_decode.py).

No GPU needed; about 210 small compilations (bfloat16 is not built for sm_75, which has
none), a minute or two on 2 cores.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from cuflash import compiler, decode
from cuflash.archs import ARCH_SMEM_OPTIN

try:
    from nvrtc_required import require_nvrtc
except ImportError:  # tests/ collected as a package
    from tests.nvrtc_required import require_nvrtc

nvrtc = require_nvrtc()

ARCHS = ["sm_75", "sm_80", "sm_90", "sm_120"]
SMEM_OPTIN_SM120 = ARCH_SMEM_OPTIN["sm_120"]  # 99 KB, as sm_86 / sm_89


def _dtypes(arch):
    return ("float16", "float32") if arch == "sm_75" else ("float16", "bfloat16", "float32")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_decode_spec_compiles_without_spills(arch):
    work = decode.all_decode_specs(_dtypes(arch), arch)
    assert any(isinstance(s, decode.DecodeMmaSpec) for s in work) == (arch != "sm_75")
    with ThreadPoolExecutor(2) as pool:  # NVRTC runs outside the GIL
        reports = [r for batch in pool.map(lambda s: compiler.compile_report(s, arch), work)
                   for r in batch]
    functions = {(r.spec, r.function) for r in reports}
    assert len(functions) == 3 * len(work)  # flash_decode_append, _split and _combine
    names = {s.name for s in work}
    for s in work:
        if isinstance(s, decode.DecodeMmaSpec) and s.smem_bytes > SMEM_OPTIN_SM120:
            assert replace(s, stages=2).name in names, s.name
    smem_cap = {s.name: (ARCH_SMEM_OPTIN[arch] if isinstance(s, decode.DecodeMmaSpec)
                         else 48 * 1024) for s in work}
    bad = [f"{r.spec}/{r.function}: {r.registers} regs, {r.spills} B spilled, "
           f"{r.stack_bytes} B stack, {r.dynamic_smem + r.static_smem} B smem"
           for r in reports
           if r.spills or r.stack_bytes or r.dynamic_smem + r.static_smem > smem_cap[r.spec]]
    assert not bad, "\n".join(bad)


def test_params_struct_matches_the_launch_signature():
    """flash_decode.cu's DecodeParams, field by field, against decode._PARAMS_SIGNATURE (the
    launch packs the struct from it; a mismatch would shift every later argument)."""
    import re

    src = (compiler.kernels_dir() / "flash_decode.cu").read_text()
    body = src[src.index("struct DecodeParams {"):]
    body = re.sub(r"//[^\n]*", "", body[:body.index("};")])
    codes = []
    for decl in body.split(";")[:-1]:
        decl = decl.strip().split("{", 1)[-1].strip()
        kind = ("p" if "*" in decl else "q" if decl.startswith("long long") else
                "i" if decl.startswith("int") else "f" if decl.startswith("float") else "?")
        names = decl.split(",")
        codes += [kind] * len(names)
    assert "".join(codes) == decode._PARAMS_SIGNATURE


def _candidate_specs():
    """Issue 16's candidate knobs (DecodeMmaSpec.l2_ahead / page_ids, not yet selected) on the
    selected tensor-core tiles of every head_dim, and the 3-blocks-per-SM variant at D 128."""
    from dataclasses import replace

    base = [decode.mma_spec(dtype, d, r) for dtype in ("float16", "bfloat16")
            for d in decode.HEAD_DIM_BUCKETS for r in decode.MMA_ROW_BUCKETS
            if (d, r) in decode._MMA_TILES]
    knobs = [dict(l2_ahead=1), dict(l2_ahead=2), dict(page_ids=True),
             dict(l2_ahead=1, page_ids=True)]
    extra = [decode.DecodeMmaSpec(dtype, 128, 64, 2, 4, 3, 16, l2_ahead=1)
             for dtype in ("float16", "bfloat16")]
    return [replace(s, **k) for s in base for k in knobs] + extra


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_120"])
def test_candidate_knobs_compile_without_spills(arch):
    _assert_splits_compile_without_spills(_candidate_specs(), arch)


def _assert_splits_compile_without_spills(work, arch):
    """The split kernel of every spec in ``work``: no spill, no stack (NVRTC for ``arch``)."""
    with ThreadPoolExecutor(2) as pool:
        reports = [r for batch in pool.map(lambda s: compiler.compile_report(s, arch), work)
                   for r in batch if r.function == "flash_decode_split"]
    bad = [f"{r.spec}: {r.registers} regs, {r.spills} B spilled, {r.stack_bytes} B stack"
           for r in reports if r.spills or r.stack_bytes]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_120"])
def test_fused_merge_specs_compile_without_spills(arch, monkeypatch):
    """With decode.FUSED_COMBINE (the split kernel's last block merges the splits,
    CF_FUSED_COMBINE; a candidate) every spec all_decode_specs then lists, fused where
    decode._FUSED_SPILLS allows, compiles without spills or stack (16-bit specs in bf16 only
    off sm_90: fp16 builds the same code with another conversion)."""
    monkeypatch.setattr(decode, "FUSED_COMBINE", True)
    dtypes = ("float16", "bfloat16", "float32") if arch == "sm_90" else ("bfloat16", "float32")
    work = decode.all_decode_specs(dtypes, arch)
    assert sum(s.fused_combine for s in work) >= len(work) - 2
    _assert_splits_compile_without_spills(work, arch)

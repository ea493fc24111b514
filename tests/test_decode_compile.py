"""Every decode spec (flash_decode.cu: append + split + combine) compiles through NVRTC for sm_75,
sm_80, sm_90 and sm_120 with zero register spills, no stack, and fits 48 KB of shared memory.

No GPU needed; 176 small compilations (bfloat16 is not built for sm_75, which has none),
about a minute on 2 cores.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from cuflash import compiler, decode

try:
    from cupy_backends.cuda.libs import nvrtc  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("CuPy's NVRTC is not installed (extra 'cuda13' or 'cuda12')",
                allow_module_level=True)

ARCHS = ["sm_75", "sm_80", "sm_90", "sm_120"]


def _dtypes(arch):
    return ("float16", "float32") if arch == "sm_75" else ("float16", "bfloat16", "float32")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_decode_spec_compiles_without_spills(arch):
    work = decode.all_decode_specs(_dtypes(arch))
    with ThreadPoolExecutor(2) as pool:  # NVRTC runs outside the GIL
        reports = [r for batch in pool.map(lambda s: compiler.compile_report(s, arch), work)
                   for r in batch]
    functions = {(r.spec, r.function) for r in reports}
    assert len(functions) == 3 * len(work)  # flash_decode_append, _split and _combine
    bad = [f"{r.spec}/{r.function}: {r.registers} regs, {r.spills} B spilled, "
           f"{r.stack_bytes} B stack, {r.dynamic_smem + r.static_smem} B smem"
           for r in reports
           if r.spills or r.stack_bytes or r.dynamic_smem + r.static_smem > 48 * 1024]
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

"""The launcher's parameter buffer against the parameter tables ptxas writes into each cubin.

No GPU needed: NVRTC compiles the kernels that take tensor maps (the TMA forward, its cluster
form, the TMA backward, the GPU tests' probe) and one kernel of every entry point and
parameter extension, and each cubin's ``.nv.info.<entry>`` section says at which byte offset
the kernel reads each parameter (EIATTR_KPARAM_INFO) and how many bytes it takes in all
(EIATTR_PARAM_CBANK). A map at the wrong offset is an illegal
instruction on the GPU and a buffer larger than the kernel's is refused at launch, so both
must match exactly.
"""

import re
import struct
from pathlib import Path

import pytest

from cuflash import compiler, launch, specs

try:
    from nvrtc_required import require_nvrtc
except ImportError:  # tests/ collected as a package
    from tests.nvrtc_required import require_nvrtc

nvrtc = require_nvrtc()

_KPARAM_INFO, _PARAM_CBANK = 0x17, 0x19  # EIATTR codes of the cubin's info records
_FORMAT_SVAL, _FORMAT_HVAL = 4, 3  # a record with a sized body / with a 16-bit value


def cubin_parameters(cubin: bytes) -> dict:
    """{entry: (offsets by ordinal, parameter bytes)} from the cubin's ``.nv.info.*``."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * entsize) for i in range(count)]
    names_at = sections[names_index][4]
    tables = {}
    for name, _, _, _, offset, size in sections:
        title = cubin[names_at + name:cubin.index(b"\0", names_at + name)].decode()
        if not title.startswith(".nv.info."):
            continue
        at, offsets, total = offset, {}, None
        while at < offset + size:
            kind, attr, value = struct.unpack_from("<BBH", cubin, at)
            if kind == _FORMAT_SVAL:
                if attr == _KPARAM_INFO:
                    _, ordinal, param_offset = struct.unpack_from("<IHH", cubin, at + 4)
                    offsets[ordinal] = param_offset
                at += 4 + value
            else:
                if attr == _PARAM_CBANK and kind == _FORMAT_HVAL:
                    total = value
                at += 4
        tables[title.removeprefix(".nv.info.")] = (tuple(offsets[i] for i in sorted(offsets)),
                                                   total)
    return tables


def _cubin(source: str, name: str, opts: list, arch: str = "sm_90a") -> bytes:
    program = nvrtc.createProgram(source, name, [], [])
    try:
        nvrtc.compileProgram(program, [*opts, f"-arch={arch}"])
        return nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)


def _tma_specs() -> list:
    facts = specs.facts_for_arch("sm_90")
    forward = specs.select_forward(facts, "bfloat16", 128, False)
    backward = specs.select_backward(facts, "bfloat16", 64, False, False)
    found = [specs.with_forward_tma(forward), specs.with_forward_cluster(forward),
             specs.with_backward_tma(backward)]
    assert all(found), [s and s.name for s in found]
    return found


@pytest.mark.parametrize("spec", _tma_specs(), ids=lambda s: s.name)
def test_tensor_map_kernels_read_their_parameters_where_the_launcher_packs_them(spec):
    signature = launch.signature_of(spec)
    assert "T" in signature
    cubin = _cubin(compiler.read_source(spec), spec.source, compiler.nvrtc_options(spec))
    (offsets, total), = cubin_parameters(cubin).values()
    assert offsets == launch.param_offsets(signature)
    assert total == launch.param_packer(signature).size


def test_the_gpu_tests_tma_probe_takes_its_map_at_a_bank_aligned_offset():
    """The probe's map follows 20 bytes of scalars: at buffer offset 48, whose address in
    the constant bank (0x210 + 48) is 64-byte aligned; 176 bytes in all, not 192."""
    text = (Path(__file__).parent / "test_gpu_tma.py").read_text()
    probe = re.search(r'_PROBE = r"""(.*?)"""', text, re.S).group(1)
    cubin = _cubin(probe, "probe.cu", ["--std=c++17", f"-I{compiler.kernels_dir()}",
                                       "-DCF_DTYPE=1", "-DPROBE_ROWS=128", "-DPROBE_PANELS=2"])
    (offsets, total), = cubin_parameters(cubin).values()
    assert offsets == launch.param_offsets("piiiT") == (0, 8, 12, 16, 48)
    assert total == launch.param_packer("piiiT").size == 176


def test_buffers_without_maps_keep_the_c_layout():
    spec = specs.without_tma(specs.select_forward(specs.facts_for_arch("sm_90"), "bfloat16",
                                                  128, False))
    signature = launch.signature_of(spec)
    offsets = launch.param_offsets(signature)
    assert offsets[0] == 0 and list(offsets) == sorted(offsets)
    assert launch.param_packer(signature).size == offsets[-1] + 4  # the last is an int


def _entry_specs() -> list:
    """One spec per entry point and parameter extension: the portable and Hopper forwards and
    backwards, the head-dim split, the dQ pass, the preprocess, and the kernels that take a
    block mask's or dropout's parameters or packed sequences."""
    hopper, ampere = specs.facts_for_arch("sm_90"), specs.facts_for_arch("sm_80")
    mods = specs.ModFlags
    found = [specs.select_forward(ampere, "float16", 64, False),
             specs.select_forward(hopper, "bfloat16", 128, True),
             specs.select_forward(hopper, "bfloat16", 128, False,
                                  mods=mods(varlen=True, window=True)),
             specs.select_forward(hopper, "bfloat16", 64, False, mods=mods(block_sparse=True)),
             specs.select_forward(hopper, "bfloat16", 64, False, mods=mods(dropout=True)),
             specs.select_backward(ampere, "float16", 64, False, False),
             specs.select_backward(ampere, "float16", 64, False, True),
             specs.select_backward_dq(ampere, "float16", 64, False),
             specs.select_backward_pre("bfloat16", hopper),
             specs.select_backward(hopper, "bfloat16", 128, False, True),
             specs.select_backward(hopper, "bfloat16", 256, True, False),
             specs.select_backward(hopper, "bfloat16", 64, False, False,
                                   mods=mods(dropout=True, softcap=True))]
    return list({spec.name: spec for spec in found}.values())


@pytest.mark.parametrize("spec", _entry_specs(), ids=lambda s: s.name)
def test_every_entry_point_reads_its_parameters_where_the_launcher_packs_them(spec):
    arch = "sm_90a" if spec.kind in ("fwd90", "bwd90") else "sm_80"
    signature = launch.signature_of(spec)
    tables = cubin_parameters(_cubin(compiler.read_source(spec), spec.source,
                                     compiler.nvrtc_options(spec), arch))
    entries = [t for name, t in tables.items() if len(t[0]) == len(signature)]
    assert entries, (spec.name, {n: len(t[0]) for n, t in tables.items()}, len(signature))
    for offsets, total in entries:
        assert offsets == launch.param_offsets(signature), spec.name
        assert total == launch.param_packer(signature).size, spec.name

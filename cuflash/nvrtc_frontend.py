"""Compile kernel specs to PTX through a given NVRTC library (its path), not CuPy's own.

CuPy loads one NVRTC, the newest a fresh install brings; users run older ones (the extras
allow NVRTC 13.0 and 12.8 up), and an older front end can refuse code a newer one accepts:
NVRTC 13.0 took a generic lambda in flash_fwd_sm90_ws.cu for a host function and refused
every warp-specialized forward, while 13.5 compiled them (2026-12-05). This module calls the
library through ctypes, so any installed libnvrtc.so.12 or .so.13 can be checked on a machine
without a GPU: ``front_end_failures(lib, work)``. PTX only: ptxas (spills, registers) is the
compile report's job (cuflash.aot), under CuPy's NVRTC.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

from . import specs
from .compiler import nvrtc_options, read_source
from .specs import KernelSpec


class Nvrtc:
    """The few NVRTC entry points a PTX compile needs, from the library at ``path``."""

    def __init__(self, path: str):
        # the library opens its builtins by name at the first compile: load the ones beside
        # it first (a wheel's lib folder is on no search path)
        for builtins in sorted(Path(path).parent.glob("libnvrtc-builtins.so.*")):
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(path)
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version")
        self.version = (major.value, minor.value)

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"nvrtc {what}: {self.lib.nvrtcGetErrorString(status).decode()}")

    def compile_log(self, source: str, name: str, options: Sequence[str]) -> tuple[bool, str]:
        """(compiled, log) of one program."""
        program = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(),
                                                name.encode(), 0, None, None), "create")
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            status = self.lib.nvrtcCompileProgram(program, len(options), opts)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)), "log size")
            log = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(program, log), "log")
            return status == 0, log.value.decode(errors="replace")
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(program))


def ptx_options(spec: KernelSpec, arch: str) -> list[str]:
    """The runtime build's options for ``spec`` on ``arch``, aimed at its virtual arch."""
    target = specs.compile_arch(spec, arch)  # e.g. sm_90a for the wgmma kernels
    return nvrtc_options(spec) + [f"--gpu-architecture=compute_{target[3:]}"]


def front_end_failures(path: str, work: Sequence[tuple[KernelSpec, str]]) -> list[str]:
    """"name@arch: the log's errors" for each (spec, arch) of ``work`` that the NVRTC at
    ``path`` does not compile to PTX."""
    nvrtc = Nvrtc(path)
    failed = []
    for spec, arch in work:
        ok, log = nvrtc.compile_log(read_source(spec), spec.source, ptx_options(spec, arch))
        if not ok:
            errors = [line for line in log.splitlines() if "error" in line] or [log[:300]]
            failed.append(f"{spec.name}@{arch} (NVRTC {nvrtc.version}): " + " | ".join(errors))
    return failed


def representative_work() -> list[tuple[KernelSpec, str]]:
    """One (spec, arch) for each distinct front-end path: per source, target arch (sm_75,
    sm_80, sm_90 / sm_90a, sm_120), modifier set (aot.modifier_work's, dropout and block masks
    too), causal or not, knobs, v's own head_dim or not, and float32 or 16-bit; tile sizes
    and head_dim buckets only change constants. About 570 specs."""
    from . import aot

    combos = (*aot.MOD_COMBOS, specs.ModFlags(dropout=True), specs.ModFlags(block_sparse=True))
    seen, work = set(), []
    for spec, arch in aot.modifier_work(("sm_90", "sm_80", "sm_75", "sm_120"), combos=combos,
                                        pairs=True):
        key = (spec.source, specs.compile_arch(spec, arch), getattr(spec, "mods", None),
               spec.causal, getattr(spec, "knobs", ()), bool(getattr(spec, "head_dim_v", 0)),
               spec.dtype == "float32")
        if key not in seen:
            seen.add(key)
            work.append((spec, arch))
    facts = specs.facts_for_arch("sm_90")  # candidates' sources: TMA loads (CF_FWD_TMA)
    for mods in (specs.NO_MODS, specs.ModFlags(block_sparse=True)):
        work.append((specs.with_forward_tma(specs.select_forward(facts, "bfloat16", 128, True,
                                                                 mods=mods)), "sm_90"))
    for d, causal, det, mods in ((256, False, False, specs.NO_MODS),
                                 (256, True, True, specs.ModFlags(varlen=True)),
                                 (192, False, False, specs.ModFlags(window=True, softcap=True))):
        # the head_dim 192 / 256 backward's head-dim split (flash_bwd_sm90_hsplit.cu), atomic
        # and ordered dQ, and dQ by bulk reduce-adds
        split = specs.with_backward_head_dim_split(specs.select_backward(
            facts, "float16", d, causal, det, mods=mods))
        work.append((split, "sm_90"))
        if not det:
            work.append((specs.with_bulk_dq(split, facts), "sm_90"))
    return work

"""Which kernel runs: one table of tile shapes, chosen from the device's facts.

``select_*`` are pure functions of (``DeviceFacts``, problem) -> ``KernelSpec``; nothing here
touches a GPU, so the whole table is tested on the CPU for every shared-memory budget. A
``KernelSpec`` has one canonical name (``fwd_bf16_d128_m128_n64_w8_s2_causal``) that is the
compile-cache key, the log label, the benchmark label and the pytest id.

The shared-memory budget is the device's opt-in maximum per block, or less when the caller
asks for less (``CUFLASH_SMEM_BUDGET`` in bytes or with a K suffix, or
``set_smem_budget``), so the tiles a 48 KB, 64 KB, 99 KB or 163 KB GPU would get can all be
run on a larger one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Iterator

KIB = 1024

# Opt-in shared memory per block of the GPUs we plan for (CUDA programming guide, table of
# technical specifications): T4 / RTX 20xx (sm_75) 64 KB; A100 (sm_80) and Jetson Orin (sm_87)
# 163 KB; RTX 30xx / A10 (sm_86) and RTX 40xx / L4 (sm_89) 99 KB; H100 / H200 (sm_90) and
# B200 / GB300 (sm_100, sm_103) 227 KB; RTX 50xx / RTX PRO 6000 (sm_120) and DGX Spark
# (sm_121) 99 KB. 48 KB is the limit without opt-in, the floor every kernel must fit.
BUDGETS_KIB = (48, 64, 99, 163, 227)
ARCH_SMEM_OPTIN = {
    "sm_75": 64 * KIB,
    "sm_80": 163 * KIB,
    "sm_86": 99 * KIB,
    "sm_87": 163 * KIB,
    "sm_89": 99 * KIB,
    "sm_90": 227 * KIB,
    "sm_100": 227 * KIB,
    "sm_103": 227 * KIB,
    "sm_120": 99 * KIB,
    "sm_121": 99 * KIB,
}

DTYPES = ("float16", "bfloat16", "float32")
DTYPE_CODE = {"float16": 0, "bfloat16": 1, "float32": 2}
DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
HEAD_DIM_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)

KINDS = ("fwd", "fwd90", "bwd", "bwd90", "bwd_dq", "bwd_pre")
# Hopper-only kinds: wgmma code, compiled for the arch-specific target (sm_90a), one source
# file for both 16-bit dtypes.
SM90_KINDS = {"fwd90": "flash_fwd_sm90.cu", "bwd90": "flash_bwd_sm90.cu"}
ENTRY = {
    "fwd": "flash_fwd",
    "fwd90": "flash_fwd_sm90",
    "bwd90": "flash_bwd_sm90",
    "bwd": "flash_bwd",
    "bwd_dq": "flash_bwd_dq",
    "bwd_pre": "flash_bwd_preprocess",
}

# Rows per block of the two elementwise backward kernels (preprocess, dQ convert).
PRE_ROWS = 64
PRE_THREADS = 128


@dataclass(frozen=True)
class DeviceFacts:
    """What the selector needs to know about a GPU."""

    name: str
    arch: str  # "sm_90"
    sm_count: int
    smem_optin: int  # bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin

    def with_budget(self, budget: int | None) -> "DeviceFacts":
        """The same device, planning for at most ``budget`` bytes of shared memory."""
        if budget is None:
            return self
        return replace(self, smem_optin=min(self.smem_optin, budget))


@dataclass(frozen=True)
class KernelSpec:
    """One compiled kernel: a kind, a dtype, a head-dim bucket and its tiles."""

    kind: str
    dtype: str
    head_dim: int = 0  # bucket: a multiple of 32; 0 for the elementwise bwd_pre kernels
    block_m: int = 0
    block_n: int = 0
    warps: int = 4
    stages: int = 1
    causal: bool = False
    dq_atomic: bool = False  # bwd only
    dchunk: int = 0  # bwd only: head-dim columns of dK/dV per block

    @property
    def name(self) -> str:
        parts = [self.kind, DTYPE_SHORT[self.dtype]]
        if self.kind != "bwd_pre":
            parts += [f"d{self.head_dim}", f"m{self.block_m}", f"n{self.block_n}",
                      f"w{self.warps}", f"s{self.stages}"]
        if self.kind in ("bwd", "bwd90"):
            parts += [f"c{self.dchunk}", "atomic" if self.dq_atomic else "nodq"]
        if self.causal:
            parts.append("causal")
        return "_".join(parts)

    @property
    def entry(self) -> str:
        return ENTRY[self.kind]

    @property
    def source(self) -> str:
        """The ``kernels_cu`` file that holds this kernel."""
        if self.kind == "bwd_pre":
            return "flash_bwd_pre.cu"
        if self.kind in SM90_KINDS:
            return SM90_KINDS[self.kind]
        base = {"fwd": "flash_fwd", "bwd": "flash_bwd", "bwd_dq": "flash_bwd_dq"}[self.kind]
        return base + ("_fp32.cu" if self.dtype == "float32" else ".cu")

    @property
    def threads(self) -> int:
        return PRE_THREADS if self.kind == "bwd_pre" else 32 * self.warps

    @property
    def smem_bytes(self) -> int:
        return smem_bytes(self)

    @property
    def defines(self) -> dict[str, int]:
        """The -D values the kernel source is compiled with (docs/kernel_abi.md)."""
        d = {"CF_DTYPE": DTYPE_CODE[self.dtype]}
        if self.kind != "bwd_pre":
            d.update(CF_HEAD_DIM=self.head_dim, CF_BLOCK_M=self.block_m,
                     CF_BLOCK_N=self.block_n, CF_WARPS=self.warps, CF_STAGES=self.stages,
                     CF_CAUSAL=int(self.causal))
        if self.kind in ("bwd", "bwd90"):
            d.update(CF_DQ_ATOMIC=int(self.dq_atomic), CF_DCHUNK=self.dchunk)
        return d


def smem_bytes(spec: KernelSpec) -> int:
    """Dynamic shared memory of one block; each formula is the one in the kernel's header."""
    m, n, d, s = spec.block_m, spec.block_n, spec.head_dim, spec.stages
    if spec.kind == "bwd_pre":
        return 0
    if spec.dtype == "float32":
        return _smem_fp32(spec)
    if spec.kind in ("fwd", "fwd90"):  # Q tile + K and V tiles per stage, 2-byte elements
        return (m + 2 * s * n) * d * 2
    if spec.kind == "bwd":  # K, V tiles; Q, dO stages; dS^T (+ P^T) tile; lse2, delta per stage
        return (2 * n * d + 2 * s * m * d + (2 if bwd_split_layout(spec) else 1) * n * m) * 2 \
            + 2 * s * m * 4
    if spec.kind == "bwd90":  # K, V; Q, dO stages; dS^T; lse2, delta per stage
        return (2 * n * d + 2 * s * m * d + n * m) * 2 + 2 * s * m * 4
    if spec.kind == "bwd_dq":  # Q, dO tiles + K and V tiles per stage
        return (2 * m + 2 * s * n) * d * 2
    raise ValueError(f"unknown kernel kind {spec.kind!r}")


def bwd_split_layout(spec: KernelSpec) -> bool:
    """flash_bwd.cu's CF_BWD_SPLIT: 8 warps, one chunk of head_dim <= 128 (16-bit only)."""
    return (spec.kind == "bwd" and spec.dtype != "float32" and spec.warps == 8
            and spec.dchunk >= spec.head_dim and spec.head_dim <= 128)


def _smem_fp32(spec: KernelSpec) -> int:
    """The float32 SIMT kernels pad each shared row by 4 floats against bank conflicts."""
    m, n, d = spec.block_m, spec.block_n, spec.head_dim
    if spec.kind == "fwd":  # Q, K, V tiles + the P tile
        return 4 * ((m + 2 * n) * (d + 4) + m * (n + 4))
    if spec.kind == "bwd":  # Q, dO, K, V tiles + P^T, dS^T + dS
        return 4 * (2 * (m + n) * (d + 4) + 2 * n * (m + 4) + m * (n + 4))
    if spec.kind == "bwd_dq":  # Q, dO, K, V tiles + dS
        return 4 * (2 * (m + n) * (d + 4) + m * (n + 4))
    raise ValueError(f"unknown kernel kind {spec.kind!r}")


# -- the budget override ---------------------------------------------------------------------

_budget_override: int | None = None


def set_smem_budget(budget: int | None) -> None:
    """Plan tiles for at most ``budget`` bytes of shared memory per block (None: the device's)."""
    global _budget_override
    if budget is not None and (not isinstance(budget, int) or budget < 48 * KIB):
        raise ValueError(f"smem budget: expected an int of at least {48 * KIB} bytes or None, "
                         f"got {budget!r}")
    _budget_override = budget


def smem_budget_override() -> int | None:
    """The override in force: ``set_smem_budget`` first, then ``CUFLASH_SMEM_BUDGET``."""
    if _budget_override is not None:
        return _budget_override
    raw = os.environ.get("CUFLASH_SMEM_BUDGET", "").strip()
    if not raw:
        return None
    try:
        value = int(raw[:-1]) * KIB if raw[-1] in "kK" else int(raw)
    except ValueError:
        raise ValueError(f"CUFLASH_SMEM_BUDGET: expected bytes or e.g. '99K', got {raw!r}") from None
    if value < 48 * KIB:
        raise ValueError(f"CUFLASH_SMEM_BUDGET: expected at least 48K, got {raw!r}")
    return value


def head_dim_bucket(head_dim: int) -> int:
    """The compiled head-dim the kernel pads ``head_dim`` to (a multiple of 32)."""
    if head_dim % 8 == 0 and 8 <= head_dim <= 256:
        return next(b for b in HEAD_DIM_BUCKETS if head_dim <= b)
    raise ValueError(f"head_dim: expected a multiple of 8 from 8 to 256, got {head_dim}")


# -- tile tables -----------------------------------------------------------------------------
# Candidates are tried in order; the first that fits the budget wins. Each is
# (warps, block_n, stages) for fwd / bwd_dq (block_m = 16 * warps: a warp owns 16 query
# rows) and (warps, block_m, stages) for bwd (block_n = 16 * warps: a warp owns 16 keys).

# fwd, 16-bit. S holds block_n/2 floats per thread and O holds head_dim/2, so wide key tiles
# only for small head_dim. 128x64 at d128 leaves room for 2 blocks/SM on a 227 KB H100.
_FWD16 = {
    "small": [(8, 128, 2), (8, 64, 2), (4, 64, 2), (4, 32, 2), (4, 32, 1), (2, 32, 1),
              (1, 16, 1)],  # head_dim <= 64
    "mid": [(8, 64, 2), (4, 64, 2), (4, 32, 2), (4, 32, 1), (2, 32, 1), (2, 16, 1),
            (1, 16, 1)],  # head_dim <= 128
    "large": [(8, 64, 2), (8, 32, 2), (4, 32, 2), (4, 32, 1), (2, 32, 1), (2, 16, 1),
              (1, 16, 1)],  # head_dim <= 256
}
# bwd, 16-bit: (warps, block_m, stages). 8 warps (block_n 128) at head_dim <= 128 is the split
# layout of flash_bwd.cu (S^T / dP^T by 4 x 2 warps over (keys, queries), P^T and dS^T through
# shared memory, dK / dV by 4 x 2 warps over (keys, columns)); the others own 16 keys per warp.
# H100 bf16 16k (2026-11-23, bench/dev/NOTES.md): d128 split m64 218 TFLOP/s vs 139 for w4 m64
# s2; d64 split m128 210, split m64 191, w4 m64 147 (FA-2: 306, 287). Split needs 161 KB at
# d128 (m64) and at d64 (m128), 97 KB at d64 (m64): smaller budgets fall through.
_BWD16 = [(4, 64, 2), (4, 64, 1), (4, 32, 1), (2, 32, 1), (2, 16, 1), (1, 16, 1)]
_BWD16_SPLIT = {64: [(8, 128, 2), (8, 64, 2)], 128: [(8, 64, 2)]}  # by bucket, before _BWD16
# Tiles one arch's ptxas spills (NVRTC 13.5, tests/test_compile.py), by (arch, head-dim
# bucket); the selector skips them there. Both are reached only under the arch's own shared
# memory (CUFLASH_SMEM_BUDGET), and both spill in the causal dQ-atomic variant at 255 registers.
_BWD16_SPILLS = {
    ("sm_75", 64): [(4, 64, 1)],  # 24 B spilled (sm_75 takes ~10 registers more than sm_80)
    ("sm_120", 128): [(2, 32, 1)],  # 12 B spilled (sm_80 and sm_90: none)
    ("sm_121", 128): [(2, 32, 1)],  # sm_120's instruction set and ptxas
}
# bwd_dq, 16-bit: (warps, block_n, stages).
_BWDDQ16 = [(4, 64, 2), (4, 64, 1), (4, 32, 1), (2, 32, 1), (2, 16, 1), (1, 16, 1)]
# float32 (SIMT, one stage): (warps, block_m, block_n). The kernels need block_m and block_n
# multiples of 8 and of 4 * warps; the last entry of each fits head_dim 256 in 48 KB.
_FWD32 = [(4, 64, 32), (4, 32, 16), (2, 16, 16), (1, 16, 8)]
_BWD32 = [(4, 32, 32), (2, 16, 16), (1, 8, 16), (1, 8, 8)]
_BWDDQ32 = [(4, 32, 32), (4, 16, 16), (2, 16, 8), (1, 8, 8)]


# fwd90 (Hopper wgmma, flash_fwd_sm90.cu), 16-bit, by head-dim bucket: (warps, block_n, stages);
# block_m = 16 * warps = 64 query rows per warpgroup. Buckets without an entry, and budgets
# where none fits, use the portable mma.sync kernel.
_FWD90 = {64: [(8, 128, 2), (8, 64, 2)], 128: [(8, 128, 2), (8, 64, 2)], 256: [(8, 64, 2)]}

# bwd90 (Hopper wgmma, flash_bwd_sm90.cu), 16-bit, dQ by atomics: block_m candidates by
# head-dim bucket; 128 keys, 2 warpgroups, 2 stages (the deterministic mode and the other
# buckets use flash_bwd.cu). 128 queries per tile only at head_dim 64 (registers).
_BWD90 = {64: (128, 64), 128: (64,)}

# Architectures with wgmma (compute capability 9.0 exactly: sm_90a code runs nowhere else).
WGMMA_ARCHS = ("sm_90",)


def uses_wgmma(facts: DeviceFacts) -> bool:
    """Whether Hopper-only kernels are picked (``CUFLASH_DISABLE_WGMMA=1`` turns them off)."""
    return facts.arch in WGMMA_ARCHS and os.environ.get("CUFLASH_DISABLE_WGMMA", "") != "1"

# -- which GPUs ------------------------------------------------------------------------------
# The portable kernels need ldmatrix and mma.sync: compute capability 7.5 (Turing) or newer.
# 8.0 and later (Blackwell included) run them as written; Turing runs them through the
# CF_TURING wrappers of cf_common.cuh (two m16n8k8 per m16n8k16, synchronous copies), which
# have no bfloat16.
MIN_ARCH = 75
TURING_DTYPES = ("float16", "float32")


def arch_number(arch: str) -> int:
    """"sm_90" -> 90 (the compute capability as major * 10 + minor)."""
    if not (arch.startswith("sm_") and arch[3:].isdigit()):
        raise ValueError(f"arch: expected 'sm_' and a compute capability such as 'sm_90', "
                         f"got {arch!r}")
    return int(arch[3:])


def arch_unsupported_reason(arch: str) -> str | None:
    """None when cuflash's kernels run on ``arch``, else why not (one sentence)."""
    if arch_number(arch) < MIN_ARCH:
        return (f"{arch} is older than Turing: cuflash's kernels need tensor cores with "
                f"ldmatrix and mma.sync, compute capability 7.5 or newer")
    return None


def arch_dtypes(arch: str) -> tuple[str, ...]:
    """The dtypes cuflash's GPU kernels take on ``arch``: Turing has no bfloat16."""
    return TURING_DTYPES if arch_number(arch) < 80 else DTYPES


def check_dtype(facts: DeviceFacts, dtype: str) -> None:
    """Raise ``ValueError`` with the reason when ``facts``' GPU has no kernel for ``dtype``."""
    if dtype not in arch_dtypes(facts.arch):
        raise ValueError(f"dtype: {dtype} needs compute capability 8.0 or newer; {facts.name} "
                         f"is {facts.arch} (Turing), which runs "
                         f"{' and '.join(arch_dtypes(facts.arch))}")


def forced_arch() -> str | None:
    """``CUFLASH_FORCE_ARCH`` (e.g. "sm_75"): plan and build as on that GPU (testing aid)."""
    raw = os.environ.get("CUFLASH_FORCE_ARCH", "").strip()
    if not raw:
        return None
    if raw not in ARCH_SMEM_OPTIN:
        raise ValueError(f"CUFLASH_FORCE_ARCH: expected one of {', '.join(ARCH_SMEM_OPTIN)}, "
                         f"got {raw!r}")
    return raw


def usable_facts(facts: DeviceFacts) -> DeviceFacts:
    """The facts cuflash plans with on this GPU; raises ``RuntimeError`` if it cannot run.

    With ``CUFLASH_FORCE_ARCH`` set, an older arch's: its name, its shared memory (the smaller
    of the two) and, in ``compiler.get_kernel``, its kernels, built as PTX for that arch and
    JIT-compiled by the driver. Only an older, non-arch-specific target can run that way, so
    forcing a newer arch or sm_90 (whose wgmma kernels are sm_90a) on another GPU raises.
    """
    reason = arch_unsupported_reason(facts.arch)
    if reason:
        raise RuntimeError(f"cuflash cannot use {facts.name}: {reason}")
    forced = forced_arch()
    if forced is None or forced == facts.arch:
        return facts
    if arch_number(forced) > arch_number(facts.arch) or forced in WGMMA_ARCHS:
        raise RuntimeError(f"CUFLASH_FORCE_ARCH={forced} cannot run on {facts.name} "
                           f"({facts.arch}): only an older arch other than sm_90 can be forced")
    return replace(facts, name=f"{facts.name} as {forced}", arch=forced,
                   smem_optin=min(facts.smem_optin, ARCH_SMEM_OPTIN[forced]))


def compile_arch(spec: KernelSpec, arch: str) -> str:
    """The NVRTC target for ``spec`` on ``arch``: the arch-specific sm_90a for wgmma kernels."""
    return arch + "a" if spec.kind in SM90_KINDS else arch


def _size_class(head_dim: int) -> str:
    return "small" if head_dim <= 64 else "mid" if head_dim <= 128 else "large"


def _first_fitting(candidates: Iterator[KernelSpec], budget: int, what: str) -> KernelSpec:
    tried = []
    for spec in candidates:
        if spec.smem_bytes <= budget:
            return spec
        tried.append(f"{spec.name} ({spec.smem_bytes} B)")
    raise ValueError(f"{what}: no tile configuration fits {budget} bytes of shared memory; "
                     f"tried {', '.join(tried)}")


def select_forward(facts: DeviceFacts, dtype: str, head_dim: int, causal: bool) -> KernelSpec:
    check_dtype(facts, dtype)
    bucket = head_dim_bucket(head_dim)
    if dtype != "float32" and uses_wgmma(facts) and bucket in _FWD90:
        for w, n, s in _FWD90[bucket]:  # Hopper first; else the portable kernel below
            spec = KernelSpec("fwd90", dtype, bucket, 16 * w, n, w, s, causal)
            if spec.smem_bytes <= facts.smem_optin:
                return spec
    if dtype == "float32":
        candidates = (KernelSpec("fwd", dtype, bucket, m, n, w, 1, causal)
                      for w, m, n in _FWD32)
    else:
        candidates = (KernelSpec("fwd", dtype, bucket, 16 * w, n, w, s, causal)
                      for w, n, s in _FWD16[_size_class(bucket)])
    return _first_fitting(candidates, facts.smem_optin, f"forward {dtype} head_dim {head_dim}")


def select_backward(facts: DeviceFacts, dtype: str, head_dim: int, causal: bool,
                    deterministic: bool) -> KernelSpec:
    """The dK/dV kernel (which also accumulates dQ with atomics unless deterministic)."""
    check_dtype(facts, dtype)
    bucket = head_dim_bucket(head_dim)
    if dtype != "float32" and not deterministic and uses_wgmma(facts) and bucket in _BWD90:
        for block_m in _BWD90[bucket]:  # Hopper first; else the portable kernels below
            spec = KernelSpec("bwd90", dtype, bucket, block_m, 128, 8, 2, causal,
                              dq_atomic=True, dchunk=bucket)
            if spec.smem_bytes <= facts.smem_optin:
                return spec
    # dK + dV accumulators hold dchunk floats per thread, so at most 128 columns per block;
    # S and dP are recomputed once per chunk. The tensor-core kernel takes chunks of 128
    # (the last one partial: 160 -> 128 + 32); the fp32 kernel needs a divisor (160 -> 2 x 80).
    dchunk = bucket // -(-bucket // 128) if dtype == "float32" else min(bucket, 128)
    if dtype != "float32" and arch_number(facts.arch) < 80 and bucket > 128 and bucket % 64:
        # Turing: where the last chunk of 128 would be 32 or 96 columns (160 -> 128 + 32,
        # 224 -> 128 + 96) sm_75's ptxas spills 8-16 bytes at 255 registers (NVRTC 13.5);
        # chunks of 64 take 200.
        dchunk = 64
    if dtype == "float32":
        specs = (KernelSpec("bwd", dtype, bucket, m, n, w, 1, causal,
                            dq_atomic=not deterministic, dchunk=dchunk) for w, m, n in _BWD32)
    else:
        split = next((t for limit, t in _BWD16_SPLIT.items() if bucket <= limit), [])
        tiles = split + _BWD16
        spills = _BWD16_SPILLS.get((facts.arch, bucket), [])
        tiles = [t for t in tiles if t not in spills]
        specs = (KernelSpec("bwd", dtype, bucket, m, 16 * w, w, s, causal,
                            dq_atomic=not deterministic, dchunk=dchunk) for w, m, s in tiles)
    return _first_fitting(specs, facts.smem_optin, f"backward {dtype} head_dim {head_dim}")


def select_backward_dq(facts: DeviceFacts, dtype: str, head_dim: int,
                       causal: bool) -> KernelSpec:
    """The deterministic dQ pass."""
    check_dtype(facts, dtype)
    bucket = head_dim_bucket(head_dim)
    if dtype == "float32":
        specs = (KernelSpec("bwd_dq", dtype, bucket, m, n, w, 1, causal)
                 for w, m, n in _BWDDQ32)
    else:
        specs = (KernelSpec("bwd_dq", dtype, bucket, 16 * w, n, w, s, causal)
                 for w, n, s in _BWDDQ16)
    return _first_fitting(specs, facts.smem_optin, f"backward dq {dtype} head_dim {head_dim}")


def select_backward_pre(dtype: str, facts: DeviceFacts | None = None) -> KernelSpec:
    """The elementwise preprocess / dQ-convert kernels (no tiles)."""
    if facts is not None:
        check_dtype(facts, dtype)
    return KernelSpec("bwd_pre", dtype)


def all_specs(facts: DeviceFacts) -> list[KernelSpec]:
    """Every spec the selector can pick on this device, for ahead-of-time compile checks."""
    specs: dict[str, KernelSpec] = {}
    for dtype in arch_dtypes(facts.arch):
        specs.setdefault(f"pre{dtype}", select_backward_pre(dtype, facts))
        for bucket in HEAD_DIM_BUCKETS:
            for causal in (False, True):
                for spec in (select_forward(facts, dtype, bucket, causal),
                             select_backward(facts, dtype, bucket, causal, False),
                             select_backward(facts, dtype, bucket, causal, True),
                             select_backward_dq(facts, dtype, bucket, causal)):
                    specs.setdefault(spec.name, spec)
    return list(specs.values())


def facts_for_arch(arch: str, budget: int | None = None) -> DeviceFacts:
    """Facts of a hypothetical GPU of this arch, for compiling without one."""
    if arch not in ARCH_SMEM_OPTIN:
        raise ValueError(f"arch: expected one of {', '.join(ARCH_SMEM_OPTIN)}, got {arch!r}")
    return DeviceFacts(name=arch, arch=arch, sm_count=0,
                       smem_optin=ARCH_SMEM_OPTIN[arch]).with_budget(budget)

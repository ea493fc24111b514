"""What cuflash knows about each GPU architecture: shared memory, dtypes, wgmma."""

from __future__ import annotations

from .constants import DTYPES, KIB

# Opt-in shared memory per block of the GPUs we plan for (CUDA programming guide, table of
# technical specifications): T4 / RTX 20xx (sm_75) 64 KB; A100 (sm_80) and Jetson Orin (sm_87)
# 163 KB; RTX 30xx / A10 (sm_86) and RTX 40xx / L4 (sm_89) 99 KB; H100 / H200 (sm_90) and
# B200 / GB300 (sm_100, sm_103) 227 KB; RTX 50xx / RTX PRO 6000 (sm_120) and DGX Spark
# (sm_121) 99 KB. The floor every kernel must fit is constants.SMEM_FLOOR (48 KB).
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

# The portable kernels need ldmatrix and mma.sync: compute capability 7.5 (Turing) or newer.
# 8.0 and later (Blackwell included) run them as written; Turing runs them through the
# CF_TURING wrappers of cf_common.cuh (two m16n8k8 per m16n8k16, synchronous copies), which
# have no bfloat16.
MIN_ARCH = 75
TURING_DTYPES = ("float16", "float32")

# Architectures with wgmma (compute capability 9.0 exactly: sm_90a code runs nowhere else).
WGMMA_ARCHS = ("sm_90",)


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

"""Numbers the kernels, the CPU path, validation and the selector must agree on, defined once."""

from __future__ import annotations

import math

KIB = 1024

# log2(e): the kernels keep scores in log2 units (exp2 of scale * log2(e) * s), as does the
# CPU path that mirrors them.
LOG2E = 1.4426950408889634

# The dtypes of q, k, v (and o) every path takes, in this order everywhere.
DTYPES = ("float16", "bfloat16", "float32")

# Bytes every data pointer and row stride must be a multiple of: the kernels' vector loads
# (cp.async of 16 B, ldmatrix rows).
ROW_ALIGNMENT = 16

# Shared memory per block a kernel may use without opting in (cudaFuncSetAttribute); every
# GPU has it, so every head_dim must have a tile that fits in it.
SMEM_FLOOR = 48 * KIB


def default_softmax_scale(head_dim: int) -> float:
    """1 / sqrt(head_dim); 1.0 for head_dim 0, where every score is 0 anyway."""
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0

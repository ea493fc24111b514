"""Validation of the issue #15 arguments of the public API: dropout and the block mask.

``check`` runs after ``validate.check_forward`` / ``check_backward`` (so the shapes are
known) and before anything is allocated. Scalars first (TypeError / ValueError naming the
argument), then the block mask's array (on CUDA it stays on the device: the kernels read it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import block_sparse, philox
from .interop import Imported, import_array


def is_off(dropout_p: Any, block_mask: Any) -> bool:
    """Neither dropout nor a block mask was asked for (0 / 0.0 / None); anything else,
    including a wrongly typed value, goes through ``check``."""
    no_dropout = dropout_p is None or (type(dropout_p) in (int, float) and dropout_p == 0)
    return no_dropout and block_mask is None


def check(q: Imported, problem: Any, *, dropout_p=0.0, dropout_seed=None, dropout_offset=0,
          block_mask=None, block_size=block_sparse.BLOCK_SIZE) -> dict:
    """The keyword arguments of ``cpu.flash_forward_cpu`` / ``flash_backward_cpu`` (or, on
    CUDA, of ``launch.flash_forward_gpu`` / ``flash_backward_gpu``) for these arguments;
    raises on bad values."""
    p = philox.check_dropout(0.0 if dropout_p is None else dropout_p, dropout_seed,
                             dropout_offset)
    size = block_sparse.check_block_size(block_size)
    kwargs = {}
    if p > 0:
        kwargs.update(dropout_p=p, dropout_seed=int(dropout_seed),
                      dropout_offset=int(dropout_offset or 0))
    if block_mask is not None:
        checked = _device_block_mask if q.is_cuda else _host_block_mask
        kwargs.update(block_mask=checked(block_mask, q, problem, size), block_size=size)
    return kwargs


def dropout_record(kwargs: dict) -> tuple | None:
    """``SoftmaxStats.dropout`` of a call with ``check``'s kwargs: (p, seed, offset) or None."""
    if "dropout_p" not in kwargs:
        return None
    return (kwargs["dropout_p"], kwargs["dropout_seed"], kwargs["dropout_offset"])


def _imported_mask(block_mask: Any, q: Imported) -> Imported:
    imported = block_mask if isinstance(block_mask, Imported) else import_array(
        block_mask, "block_mask")
    if imported.framework is not q.framework:
        raise TypeError(f"block_mask: expected a {q.framework.value} array like q, got "
                        f"{imported.framework.value}")
    if imported.device != q.device:
        raise ValueError(f"block_mask: expected an array on {q.device[0]}:{q.device[1]} like "
                         f"q, got {imported.device[0]}:{imported.device[1]}")
    return imported


def _device_block_mask(block_mask: Any, q: Imported, problem: Any, size):
    """The mask as a C-contiguous uint8 CuPy array on q's device (a copy only when the
    caller's is not contiguous: one byte per block), checked like the host one."""
    mask = block_sparse.check_block_mask(_imported_mask(block_mask, q).array, size,
                                         problem.batch, problem.heads, problem.seqlen_q,
                                         problem.seqlen_k)
    import cupy

    return cupy.ascontiguousarray(mask).view(cupy.uint8)


def _host_block_mask(block_mask: Any, q: Imported, problem: Any, size) -> np.ndarray:
    imported = _imported_mask(block_mask, q)
    return block_sparse.check_block_mask(np.asarray(imported.array), size, problem.batch,
                                         problem.heads, problem.seqlen_q, problem.seqlen_k)

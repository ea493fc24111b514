"""The softmax statistics the forward pass hands to the backward pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SoftmaxStats:
    """Row statistics of ``softmax(softmax_scale * q @ k^T)``.

    ``m``: float32 (batch, heads, seqlen_q), the row max of the scaled scores over the keys
    the row may see (natural-log units; ``-inf`` for a row that sees no key).
    ``l``: float32 (batch, heads, seqlen_q), ``sum_j exp(score_j - m)`` (0 for such a row).
    Both are arrays of the caller's type and device.
    """

    m: Any
    l: Any

    @property
    def lse(self) -> Any:
        """Log-sum-exp ``m + log(l)`` per row, for libraries that keep that instead."""
        from .interop import xp_log

        return self.m + xp_log(self.l)

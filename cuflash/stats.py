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

    The other fields record the forward call the statistics came from, so that
    ``attention_backward`` can refuse a call that does not match it (another ``causal``,
    ``softmax_scale`` or k / v shape would silently give wrong gradients).
    ``attention_forward`` fills them in; ``SoftmaxStats(m, l)`` built by hand leaves them
    ``None``, which means "not known, not checked".

    ``causal``: the forward's flag. ``softmax_scale``: its resolved scale (the default
    ``1 / sqrt(head_dim)`` written out). ``shape_q``, ``shape_kv``: the shapes of q and of
    k / v, (batch, seqlen, heads, head_dim).

    Score modifiers (docs/masks.md), recorded the same way; in stats made by
    ``attention_forward`` ``None`` means the modifier was off. ``window``: (left, right);
    ``softcap``: a float; ``alibi_slopes``, ``sinks``: (shape, values) of the float32 arrays.
    With sinks, ``m`` and ``l`` include the sink as one more logit of each row (``m`` is
    at least the sink, ``l`` counts ``exp(sink - m)``), so ``lse`` normalizes over it too.

    ``dropout``: (dropout_p, dropout_seed, dropout_offset) of a forward with dropout
    (docs/dropout.md), ``None`` when it had none: the backward must regenerate that mask.
    """

    m: Any
    l: Any
    causal: bool | None = None
    softmax_scale: float | None = None
    shape_q: tuple[int, ...] | None = None
    shape_kv: tuple[int, ...] | None = None
    window: tuple[int, int] | None = None
    softcap: float | None = None
    alibi_slopes: tuple | None = None
    sinks: tuple | None = None
    dropout: tuple | None = None

    @classmethod
    def with_record(cls, m, l, record: dict) -> "SoftmaxStats":
        """Stats with ``record`` (every field but m and l) as their fields. Sets the instance
        dict directly, as the frozen ``__init__`` does field by field: the host path of a
        repeated call builds one of these per forward."""
        stats = object.__new__(cls)
        stats.__dict__.update(record, m=m, l=l)
        return stats

    @property
    def recorded(self) -> bool:
        """Made by ``attention_forward`` (its call recorded), not built by hand."""
        return self.causal is not None

    @property
    def lse(self) -> Any:
        """Log-sum-exp ``m + log(l)`` per row, for libraries that keep that instead."""
        from .interop import xp_log

        return self.m + xp_log(self.l)

"""Variable-length attention on the CPU: the blockwise dense path, one sequence at a time.

Packed layout (docs/varlen.md): sequence b's queries are rows ``cu_q[b] : cu_q[b + 1]`` of
q (total_q, heads, head_dim), its keys rows ``cu_k[b] : cu_k[b] + used_k[b]`` of k and v
(total_k, heads_kv, head_dim). Each sequence is an independent dense problem, so this is
``cpu.flash_forward_cpu`` / ``flash_backward_cpu`` on (1, seqlen, heads, head_dim) views,
with causal, window and ALiBi aligned bottom-right within the sequence, as a varlen kernel
does it with per-sequence base pointers and lengths (one "sequence info" per block).
The statistics are packed (heads, total_q), FlashAttention-2's varlen layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cpu import flash_backward_cpu, flash_forward_cpu

_F32 = np.float32


@dataclass(frozen=True)
class Seqlens:
    """Validated host copies of the sequence offsets: cu_q, cu_k int64 (batch + 1,),
    used_k int64 (batch,), the keys each sequence attends to (seqused_k or its length)."""

    cu_q: np.ndarray
    cu_k: np.ndarray
    used_k: np.ndarray

    @property
    def batch(self) -> int:
        return len(self.cu_q) - 1

    def spans(self):
        """(b, query rows, key rows) of each sequence with at least one query."""
        for b in range(self.batch):
            q0, q1, k0 = int(self.cu_q[b]), int(self.cu_q[b + 1]), int(self.cu_k[b])
            if q1 > q0:
                yield b, slice(q0, q1), slice(k0, k0 + int(self.used_k[b]))

    def record(self) -> tuple:
        """Hashable: what the statistics remember of the layout (see ``VarlenStats``)."""
        return tuple(self.cu_q.tolist()), tuple(self.cu_k.tolist()), tuple(self.used_k.tolist())


def _sequence_modifiers(modifiers: dict, b: int) -> dict:
    """Sequence b's modifiers: (batch, heads) ALiBi slopes -> its row (heads,); dropout's
    mask that of batch entry b (the kernels' Philox head index b * heads + h)."""
    slopes = modifiers.get("alibi_slopes")
    if slopes is not None and slopes.ndim == 2:
        modifiers = {**modifiers, "alibi_slopes": slopes[b]}
    if modifiers.get("dropout_p"):
        modifiers = {**modifiers, "dropout_batch0": b}
    return modifiers


def varlen_forward_cpu(q, k, v, seqlens: Seqlens, *, causal: bool, softmax_scale: float,
                       **modifiers):
    """(o, m, l): o like q (total_q, heads, head_dim), float32 m, l (heads, total_q).

    Rows of a sequence that see no key (and every row of a sequence with no keys) get
    o = 0, m = -inf, l = 0 (with sinks: m = sink, l = 1), as in the dense path.
    """
    total_q, heads, _ = q.shape
    o = np.zeros(q.shape[:2] + v.shape[2:], dtype=q.dtype)  # v's head_dim_v
    m = np.full((heads, total_q), -np.inf, dtype=_F32)
    l = np.zeros((heads, total_q), dtype=_F32)
    for b, rq, rk in seqlens.spans():
        o_b, m_b, l_b = flash_forward_cpu(q[None, rq], k[None, rk], v[None, rk], causal=causal,
                                          softmax_scale=softmax_scale,
                                          **_sequence_modifiers(modifiers, b))
        o[rq], m[:, rq], l[:, rq] = o_b[0], m_b[0], l_b[0]
    return o, m, l


def varlen_backward_cpu(do, q, k, v, o, m, l, seqlens: Seqlens, *, causal: bool,
                        softmax_scale: float, center_keys: bool = False, **modifiers):
    """(dq, dk, dv), and float32 dsinks (heads,) with sinks, summed over the sequences.

    Keys past a sequence's ``used_k`` and rows between sequences get zero gradients.
    ``center_keys`` as in ``cpu.flash_backward_cpu`` (m, l are the forward's own).
    """
    dq, dk, dv = (np.zeros(x.shape, dtype=x.dtype) for x in (q, k, v))
    with_sinks = modifiers.get("sinks") is not None
    dsinks = np.zeros(q.shape[1], dtype=np.float64) if with_sinks else None
    for b, rq, rk in seqlens.spans():
        grads = flash_backward_cpu(do[None, rq], q[None, rq], k[None, rk], v[None, rk],
                                   o[None, rq], np.ascontiguousarray(m[None, :, rq]),
                                   np.ascontiguousarray(l[None, :, rq]), causal=causal,
                                   softmax_scale=softmax_scale, center_keys=center_keys,
                                   **_sequence_modifiers(modifiers, b))
        dq[rq], dk[rk], dv[rk] = grads[0][0], grads[1][0], grads[2][0]
        if with_sinks:
            dsinks += grads[3]
    if not with_sinks:
        return dq, dk, dv
    return dq, dk, dv, dsinks.astype(_F32)

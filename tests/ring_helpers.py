"""Shared by the ring-attention tests: cases, inputs, and the float64 acceptance rule.

A ``RingCase`` names one problem (full-sequence shapes, dtype, causal, layout, world size);
``inputs`` draws fresh normal q, k, v, dO for it; ``assert_ring_matches`` judges a ring's
gathered o, dq, dk, dv by FlashAttention's rule (``err <= 2 * err(naive) + atol``, atol scaled
by max|ref|) against the float64 reference, the backward given the o it returned (as in
tests/test_cpu_numerics.py), and also checks o against the one-device cuflash result.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import ml_dtypes
import numpy as np

import cuflash
from cuflash.reference import (
    attention_backward_naive,
    attention_backward_reference,
    attention_naive,
    attention_reference,
    compare,
    default_atol,
)

DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16),
          "bf16": np.dtype(ml_dtypes.bfloat16)}


@dataclass(frozen=True)
class RingCase:
    world_size: int
    seqlen: int  # of the whole sequence; a multiple of 2 * world_size for zigzag
    causal: bool
    layout: str = "zigzag"
    dtype: str = "fp32"
    batch: int = 1
    heads: int = 4
    heads_kv: int = 2
    head_dim: int = 16
    seed: int = 0
    seqlen_kv: int | None = None  # keys, when not ``seqlen`` (no mask only)

    @property
    def name(self) -> str:
        mask = "causal" if self.causal else "full"
        kv = f"x{self.seqlen_kv}" if self.seqlen_kv else ""
        return (f"w{self.world_size}_{self.layout}_{mask}_{self.dtype}_s{self.seqlen}{kv}"
                f"_h{self.heads}x{self.heads_kv}_d{self.head_dim}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RingCase":
        return cls(**json.loads(text))

    def inputs(self):
        """(q, k, v, do) NumPy arrays of the whole sequence in the case's dtype."""
        rng = np.random.default_rng(self.seed)
        dtype = DTYPES[self.dtype]
        b, d, s_kv = self.batch, self.head_dim, self.seqlen_kv or self.seqlen

        def draw(seqlen, heads):
            return rng.standard_normal((b, seqlen, heads, d)).astype(dtype)

        return (draw(self.seqlen, self.heads), draw(s_kv, self.heads_kv),
                draw(s_kv, self.heads_kv), draw(self.seqlen, self.heads))


def _assert_rule(name, got, ref, naive, dtype, block_roundings: int = 0) -> None:
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    atol = default_atol(dtype) * scale
    # A ring's gradient is a float32 sum of per-block gradients that attention_backward has
    # already rounded to the input dtype: each adds at most one unit roundoff of its size
    # (<= about max|ref|) beyond what one call on the whole sequence rounds. In float32 this
    # is nothing; in bf16 it is 4e-3 * max|ref| per block (see docs/distributed.md).
    atol += block_roundings * float(ml_dtypes.finfo(dtype).eps) / 2 * scale
    report = compare(name, got, ref, naive, atol=atol)
    assert report.ok, str(report)


def assert_ring_matches(case: RingCase, o, dq=None, dk=None, dv=None, lse=None) -> None:
    """Judge the ring's full-sequence results (NumPy, the case's dtype; lse float32 (batch,
    heads, seqlen)) for ``case``."""
    q, k, v, do = case.inputs()
    dtype = DTYPES[case.dtype]
    where = f"[{case.name}] "
    assert o.dtype == dtype, where + f"o dtype {o.dtype}"
    o_ref, m_ref, l_ref = attention_reference(q, k, v, causal=case.causal)
    if lse is not None:  # float32 statistics merged in float32: a few ulp of float32
        np.testing.assert_allclose(lse, m_ref + np.log(l_ref), rtol=1e-5, atol=1e-5,
                                   err_msg=where + "lse")
    _assert_rule(where + "o", o, o_ref, attention_naive(q, k, v, causal=case.causal,
                                                        dtype=dtype), dtype)
    o_one, _ = cuflash.attention_forward(q, k, v, causal=case.causal)  # one device
    # same kernels, other summation order: a few units of the dtype's eps apart
    slack = 8 * float(ml_dtypes.finfo(dtype).eps) * max(1.0, float(np.abs(o_ref).max()))
    np.testing.assert_allclose(o.astype(np.float32), o_one.astype(np.float32), atol=slack,
                               rtol=0, err_msg=where + "o vs one device")
    if dq is None:
        return
    refs = attention_backward_reference(do, q, k, v, causal=case.causal, o=o)
    naives = attention_backward_naive(do, q, k, v, causal=case.causal, dtype=dtype)
    extra = case.world_size if case.world_size > 1 else 0  # W rounded blocks, then one more
    for name, got, ref, naive in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, naives):
        assert got.dtype == dtype, where + f"{name} dtype {got.dtype}"
        _assert_rule(where + name, got, ref, naive, dtype, block_roundings=extra)

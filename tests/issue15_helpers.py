"""Shared cases and checks of issue #15's CPU tests: dropout, block-sparse masks and head dims.

A ``Case`` is one problem: shapes (head_dim_v may differ from head_dim), dtype, CPU tiles,
and the issue's options (dropout, a block mask) plus the score modifiers of docs/masks.md.
``check_forward`` / ``check_backward`` run the blockwise CPU path and judge it against the
float64 reference under the project's rule (cuflash.testing), the naive same-dtype
computation given the same options (the same dropout mask) as the noise floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from cuflash import cpu, reference, testing

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BF16)

# Fewer visible keys per row than this: the backward gets FEW_KEYS_RTOL * max(1, |ref|)
# besides the rule (tests/test_cpu_numerics.py, above its MIN_KEYS, says why).
MIN_KEYS = 16
FEW_KEYS_RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 4 * 2.0**-10,
                 BF16: 4 * 2.0**-7}


@dataclass(frozen=True)
class Case:
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_kv: int
    group: int
    head_dim: int
    head_dim_v: int
    causal: bool
    dtype: np.dtype
    block_m: int
    block_n: int
    seed: int
    dropout_p: float = 0.0
    dropout_seed: int = 0
    dropout_offset: int = 0
    block_size: tuple[int, int] | None = None  # None: no block mask
    density: float = 0.5  # of the block mask
    mask_heads: bool = True  # the block mask has a heads axis (else 1: broadcast)
    window: tuple[int, int] | None = None
    softcap: float | None = None
    alibi: bool = False  # (heads,) slopes
    sinks: bool = False  # (heads,) sink logits

    @property
    def heads(self) -> int:
        return self.heads_kv * self.group

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    def block_mask(self) -> np.ndarray | None:
        if self.block_size is None:
            return None
        rng = np.random.default_rng(self.seed + 1)
        bm, bn = self.block_size
        shape = (self.batch, self.heads if self.mask_heads else 1,
                 -(-self.seqlen_q // bm), -(-self.seqlen_k // bn))
        return rng.random(shape) < self.density

    def options(self) -> dict:
        """Keyword arguments shared by the CPU path and the reference."""
        opts = dict(causal=self.causal, softmax_scale=self.scale, window=self.window,
                    softcap=self.softcap)
        rng = np.random.default_rng(self.seed + 2)
        if self.alibi:
            opts["alibi_slopes"] = (2.0 ** -rng.uniform(0, 8, self.heads)).astype(np.float32)
        if self.sinks:
            opts["sinks"] = (rng.standard_normal(self.heads) * 2).astype(np.float32)
        if self.dropout_p:
            opts.update(dropout_p=self.dropout_p, dropout_seed=self.dropout_seed,
                        dropout_offset=self.dropout_offset)
        if self.block_size is not None:
            opts.update(block_mask=self.block_mask(), block_size=self.block_size)
        return opts

    def inputs(self):
        """Fresh random (q, k, v, do) in the case's dtype, never zeros."""
        rng = np.random.default_rng(self.seed)
        b, h, hk = self.batch, self.heads, self.heads_kv

        def normal(*shape):
            return rng.standard_normal(shape).astype(self.dtype)

        return (normal(b, self.seqlen_q, h, self.head_dim),
                normal(b, self.seqlen_k, hk, self.head_dim),
                normal(b, self.seqlen_k, hk, self.head_dim_v),
                normal(b, self.seqlen_q, h, self.head_dim_v))

    def tiles(self) -> dict:
        return dict(block_m=self.block_m, block_n=self.block_n)

    def visible(self) -> np.ndarray:
        """bool (batch|1, heads|1, seqlen_q, seqlen_k): what the masks let each row see."""
        mods = reference._modifiers(self.window, None, None, None,
                                    block_mask=self.block_mask(),
                                    block_size=self.block_size or (128, 128))
        q = np.empty((self.batch, self.seqlen_q, self.heads, 1))
        k = np.empty((self.batch, self.seqlen_k, self.heads_kv, 1))
        return reference._visible_all(q, k, self.causal, mods)


def judge(name, got, ref, naive, dtype, scale=None) -> None:
    report = testing.judge(name, got, ref, naive, dtype=np.dtype(dtype).name, scale=scale)
    assert report.ok, str(report)


def check_forward(case: Case) -> tuple:
    """CPU forward against the reference (o by the rule, m and l by STATS_RTOL); returns
    the CPU path's (o, m, l)."""
    q, k, v, _ = case.inputs()
    opts = case.options()
    o, m, l = cpu.flash_forward_cpu(q, k, v, **opts, **case.tiles())
    o_ref, m_ref, l_ref = reference.attention_reference(q, k, v, **opts)
    o_nv = reference.attention_naive(q, k, v, **opts, dtype=case.dtype)
    assert o.shape == q.shape[:3] + (case.head_dim_v,) and o.dtype == case.dtype
    judge("o", o, o_ref, o_nv, case.dtype)
    for name, got, ref in (("m", m, m_ref), ("l", l, l_ref)):
        assert got.dtype == np.float32 and got.shape == (case.batch, case.heads, case.seqlen_q)
        report = testing.judge_stats(name, got, ref, dtype=np.dtype(case.dtype).name)
        assert report.ok, str(report)
    return o, m, l


def check_backward(case: Case) -> None:
    """CPU backward (from the CPU forward's o, m, l) against the reference given that o."""
    q, k, v, do = case.inputs()
    opts = case.options()
    o, m, l = cpu.flash_forward_cpu(q, k, v, **opts, **case.tiles())
    grads = cpu.flash_backward_cpu(do, q, k, v, o, m, l, **opts, **case.tiles())
    refs = reference.attention_backward_reference(do, q, k, v, **opts, o=o)
    naives = reference.attention_backward_naive(do, q, k, v, **opts, dtype=case.dtype)
    assert len(grads) == len(refs) == len(naives) == (4 if case.sinks else 3)
    magnitude = testing.magnitude(*refs[:3])
    counts = np.broadcast_to(case.visible(), (case.batch, case.heads, case.seqlen_q,
                                              case.seqlen_k)).sum(axis=-1)
    few = bool(((counts > 0) & (counts < MIN_KEYS)).any())
    for name, got, ref, naive, like in zip(("dq", "dk", "dv", "dsinks"), grads, refs, naives,
                                           (q, k, v, None)):
        if like is None:  # dsinks: float32 (heads,), judged at its own magnitude
            assert got.dtype == np.float32 and got.shape == (case.heads,)
        else:
            assert got.shape == like.shape and got.dtype == case.dtype, name
        scale = testing.magnitude(ref) if like is None else magnitude
        bound = testing.judge(name, got, ref, naive, dtype=np.dtype(case.dtype).name,
                              scale=scale).bound
        if few:
            bound = max(bound, FEW_KEYS_RTOL[np.dtype(case.dtype)] * max(1.0, scale))
        err = np.abs(got.astype(np.float64) - ref).max(initial=0.0)
        assert err <= bound, f"{name}: err {err:.3g} vs bound {bound:.3g} ({case})"

"""The acceptance rule: when an output of cuflash counts as correct. Defined here, once.

FlashAttention's rule, per output: ``err(ours) <= 2 * err(naive in the same dtype) + atol``,
both errors max |x - ref| against the float64 reference (cuflash.reference), NaN never
passing. ``atol`` is ``default_atol(dtype)`` plus a slack of ``ULP_SLACK`` units at the
outputs' magnitude (``rule_atol``), plus, for the backward, the error the stored o puts into
delta by design (``stored_o_allowance``). The softmax statistics m and l are judged by
``STATS_RTOL`` instead. ``judge`` and ``judge_stats`` apply it; the CLI's check, the GPU
tests (tests/gpu_helpers.py), bench/sanitize.py, bench/attention_sweep.py and the bench/dev
checks use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .constants import DTYPES, default_softmax_scale

_NP_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float32": np.dtype(np.float32)}


def np_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype of a dtype name (ml_dtypes' for bfloat16)."""
    return _NP_DTYPES[dtype]


# -- outputs against the float64 reference -------------------------------------------

def default_atol(dtype) -> float:
    """Absolute slack of the rule for outputs of order 1 (scale it by max(1, max|ref|)).

    atol only matters where the naive error is (near) zero by luck, so it stays far below
    the noise floor of 16-bit types and never hides a real error there:
    fp16: ulp(1) = 9.8e-4, atol 1e-4 is a tenth of it; bf16: ulp(1) = 7.8e-3, atol 1e-3.
    fp32 is different: the naive float32 baseline and a FlashAttention path both accumulate
    in float32 with different orders, and the backward's dS = P * (dP - delta) cancels two
    dot products of size ~sqrt(head_dim) (delta = rowsum(dO * O) replaces rowsum(P * dP)).
    With one key the naive dS is exactly 0 (P = 1) while ours is a few ulps of |dP| ~ 16,
    i.e. ~1e-6 absolute. 1e-5 covers that (about 80 ulp at 1, still 1e-5 relative).
    """
    import ml_dtypes

    table = {
        np.dtype(np.float32): 1e-5,
        np.dtype(np.float16): 1e-4,
        np.dtype(ml_dtypes.bfloat16): 1e-3,
    }
    dtype = np.dtype(dtype)
    if dtype not in table:
        raise TypeError(f"no default atol for {dtype}")
    return table[dtype]


@dataclass(frozen=True)
class ErrorReport:
    """One comparison under the rule ``err <= 2 * naive_err + atol`` (NaN never passes)."""

    name: str
    err: float
    naive_err: float
    bound: float
    ok: bool

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{self.name}: err {self.err:.3g} vs bound {self.bound:.3g} "
            f"(naive {self.naive_err:.3g}) {verdict}"
        )


def _max_abs_diff(x: np.ndarray, ref: np.ndarray) -> float:
    """max |x - ref| in float64; equal infinities count as 0, NaN in x gives NaN."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: {x.shape} vs reference {ref.shape}")
    if x.size == 0:
        return 0.0
    with np.errstate(invalid="ignore"):
        diff = np.where(x == ref, 0.0, np.abs(x - ref))
    if np.isnan(x).any():
        return math.nan
    return float(diff.max())


def compare(name: str, got, ref, naive, *, atol: float) -> ErrorReport:
    """Judge got against the float64 ref relative to the naive same-dtype result."""
    err = _max_abs_diff(got, ref)
    naive_err = _max_abs_diff(naive, ref)
    bound = 2.0 * naive_err + atol
    ok = bool(err <= bound) and not np.isnan(np.asarray(got, dtype=np.float64)).any()
    return ErrorReport(name=name, err=err, naive_err=naive_err, bound=bound, ok=ok)


# Slack added to the rule's atol, in units of the dtype's epsilon at the outputs' magnitude:
# atol = default_atol(dtype) + ULP_SLACK[dtype] * eps(dtype) * max(1, magnitude), where the
# magnitude is max|ref| over the outputs of the call (o; or dq, dk and dv together, since
# their rounding noise comes from the same P and dP: dK of a single key is 0 in truth, yet
# carries noise at the scale of dV).
# Why: "2 x naive" compares two random errors, and on small problems (a few keys or query
# rows, so a max over few elements) or steep softmaxes (softmax_scale 1 with head_dim 256:
# logits ~ +-50) the naive result is sometimes lucky. Running cuflash's CPU path (the same
# blockwise algorithm, exp2 with scale * log2(e), delta = rowsum(dO * O)) on 800 drawn
# problems failed the bare rule in ~1% of them: float32 outputs up to 2.8x naive (needing up
# to 17 eps * magnitude of slack; e.g. dk of a single key, which is 0 in truth, where naive
# is exactly 0 and ours carries the delta identity's cancellation noise), and one bf16 dq at
# 1.1x naive. The slack is far below what any real defect produces (a missed tile, a wrong
# mask or rescale, a race, bf16 accumulation: errors of 1e-3 to 1 relative): 64 eps * |ref|
# is 8e-6 relative in float32, and half a bf16 / fp16 unit at the output's magnitude is the
# rounding every stored output carries anyway (FlashAttention-3's tests add a similar term).
ULP_SLACK = {"float32": 64.0, "float16": 0.5, "bfloat16": 0.5}
EPS = {name: float(ml_dtypes.finfo(np_dtype(name)).eps) for name in DTYPES}


def magnitude(*refs) -> float:
    """max |x| over the given arrays (0 for empty ones)."""
    return max([float(np.abs(r).max()) for r in refs if np.size(r)], default=0.0)


def rule_atol(dtype: str, scale: float) -> float:
    """The atol of ``err <= 2 * naive_err + atol`` for outputs of magnitude ``scale``."""
    return default_atol(np_dtype(dtype)) + ULP_SLACK[dtype] * EPS[dtype] * max(1.0, scale)


def judge(name: str, got, ref, naive, *, dtype: str, scale: float | None = None,
          allowance: float = 0.0) -> ErrorReport:
    """The rule for one output: ``compare`` with ``rule_atol(dtype, scale) + allowance``.

    ``scale``: the outputs' magnitude for the slack (default max|ref|; see ULP_SLACK).
    ``allowance``: an error the algorithm has by design (``stored_o_allowance``).
    """
    atol = rule_atol(dtype, magnitude(ref) if scale is None else scale) + allowance
    return compare(name, got, ref, naive, atol=atol)


def judge_stats(name: str, got, ref, *, dtype: str) -> ErrorReport:
    """m or l against the float64 reference: relative error <= STATS_RTOL[dtype]."""
    err, rtol = stats_error(got, ref), STATS_RTOL[dtype]
    return ErrorReport(name=name, err=err, naive_err=math.nan, bound=rtol,
                       ok=bool(err <= rtol))


# -- the softmax statistics -----------------------------------------------------------

# m and l are float32 functions of the scores. The kernels compute every score in float32
# from the (exactly representable) products of the 16-bit inputs and never round scores or
# P to 16 bits before taking the max and the sum, so, unlike o, the stats carry no 16-bit
# rounding: their error is float32 accumulation order plus ex2.approx, ~1e-6 relative.
# The naive same-dtype baseline does round its scores to 16 bits, so "2 x naive" would be a
# far looser bound than needed; we compare m and l directly with the float64 reference:
# |got - ref| <= rtol * max(1, |ref|), rtol 1e-3 for 16-bit inputs and 1e-4 for float32, both
# two orders above the expected error. A real bug (a missed key tile, a wrong rescale, a
# wrong mask) moves l or m by far more than 1e-3; -inf / 0 of key-less rows must match exactly.
STATS_RTOL = {"float16": 1e-3, "bfloat16": 1e-3, "float32": 1e-4}


def stats_error(got, ref) -> float:
    """max |got - ref| / max(1, |ref|); equal values (including infinities) count 0,
    an infinity on one side only counts inf, NaN in got gives NaN."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.size == 0:
        return 0.0
    if np.isnan(got).any():
        return math.nan
    with np.errstate(invalid="ignore"):
        rel = np.abs(got - ref) / np.maximum(1.0, np.abs(ref))
    rel = np.where(np.isinf(got) | np.isinf(ref), np.inf, rel)
    return float(np.where(got == ref, 0.0, rel).max())


# -- the backward's allowance for the stored o -----------------------------------------

def stored_o_allowance(do, q, k, v, o, *, causal: bool, softmax_scale=None):
    """max |dX(FlashAttention, exact arithmetic, given the stored o) - dX(truth)| for dq, dk, dv.

    FlashAttention's backward takes ``delta_i = sum_d dO_id * O_id`` from the o that the
    forward stored (rounded to the dtype), where the truth has ``sum_j P_ij dP_ij``. The naive
    baseline never forms delta, so this error is not in its noise floor, and it is not small
    where the softmax is peaked: with few keys, softmax_scale 1 and head_dim 216, fp16 dq
    came out 9x naive from it (in the CPU path). By design, so it is added to atol, computed
    exactly: ``dS`` shifts by ``-P_ij * ddelta_i`` with ``ddelta = rowsum(dO * (o - o_true))``,
    hence ``dq_i`` by ``-scale * ddelta_i * sum_j P_ij k_j`` (attention with v = k) and ``dk``
    by ``-scale * P^T (ddelta * q)`` (what the reference returns as dv for dO = ddelta * q).
    dv does not involve delta. ``o``: the forward's output (host, in the dtype).
    """
    from . import reference

    kw = dict(causal=causal, softmax_scale=softmax_scale)
    scale = default_softmax_scale(q.shape[3]) if softmax_scale is None else softmax_scale
    o_true = reference.attention_reference(q, k, v, **kw)[0]
    ddelta = np.sum(do.astype(np.float64) * (o.astype(np.float64) - o_true), axis=-1,
                    keepdims=True)  # (b, s_q, h, 1)
    dq_shift = scale * ddelta * reference.attention_reference(q, k, k, **kw)[0]
    dk_shift = scale * reference.attention_backward_reference(ddelta * q.astype(np.float64),
                                                              q, k, v, **kw)[2]
    return magnitude(dq_shift), magnitude(dk_shift), 0.0


def backward_references(do, q, k, v, o, *, dtype: str, causal: bool, softmax_scale=None):
    """(truth, naive, allowance): float64 (dq, dk, dv), the same in dtype computed naively,
    and ``stored_o_allowance`` for the forward's output o (all host arrays)."""
    from . import reference

    kw = dict(causal=causal, softmax_scale=softmax_scale)
    return (reference.attention_backward_reference(do, q, k, v, **kw),
            reference.attention_backward_naive(do, q, k, v, dtype=np_dtype(dtype), **kw),
            stored_o_allowance(do, q, k, v, o, **kw))

"""Ring attention for JAX: call ``ring_attention`` inside ``jax.shard_map`` over one mesh axis.

Each device holds a shard of one sequence (``cuflash.distributed.plan``: zig-zag or
contiguous). K/V shards move one device along the axis per step with ``lax.ppermute``; the
shift for the next step is issued before the current block computes, so XLA may overlap
them. Each block is cuflash's forward (an XLA FFI custom call under ``jax.jit``, the same call
``cuflash.jax.flash_attention`` makes) and the parts are merged in float32 by their
log-sum-exp (``cuflash.merge_attention``). A ``custom_vjp`` runs the backward ring:
per-block ``attention_backward`` with the global output and lse (statistics m = lse, l = 1),
dQ kept, a float32 dK/dV accumulator travelling with its K/V shard and a last hop home.

The device's place in the ring, ``lax.axis_index``, is a traced value, so the causal steps
past the first choose their block (kv front chunk, or q back chunk) with ``lax.cond``; each
branch returns full-size results (zeros / -inf on rows it does not touch) so the merge is
one shape. Only jit-compiled use is supported (shard_map traces its body).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from .. import jax as cuflash_jax
from ..constants import default_softmax_scale
from ..merge import merge_attention
from .plan import Block, Source, check_layout, check_shards, visible_block

__all__ = ["ring_attention"]


# -- one block, padded to the whole shard --------------------------------------------------


def _varying_axes(a) -> frozenset:
    """The mesh axes ``a`` varies over inside shard_map (JAX 0.10 keeps them in the aval's
    ``manual_axis_type``; earlier releases in ``vma``)."""
    aval = jax.typeof(a)
    if hasattr(aval, "manual_axis_type"):
        return aval.manual_axis_type.varying
    return getattr(aval, "vma", None) or frozenset()


def _varying_like(x, like):
    """x typed as varying over the mesh axes ``like`` varies over. Inside shard_map an
    ffi_call's results (and fresh zeros) carry no varying axes, while the custom VJP and the
    two branches of lax.cond must agree with the inputs' type."""
    missing = tuple(_varying_axes(like) - _varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x


def _block_forward(block: Block | None, q, k, v, scale: float):
    """(o float32, lse) of all local queries; rows outside the block: o = 0, lse = -inf."""
    o = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, jnp.float32)
    if block is not None:
        r, c = block.q_rows, block.kv_rows
        o_b, m, l = cuflash_jax._forward(q[:, r], k[:, c], v[:, c], block.causal, scale)
        o, lse = o.at[:, r].set(o_b.astype(jnp.float32)), lse.at[:, :, r].set(m + jnp.log(l))
    return _varying_like(o, q), _varying_like(lse, q)


def _block_backward(block: Block | None, do, q, k, v, o, m, l, scale: float):
    """float32 (dq, dk, dv) of the whole local / visiting shards; zero outside the block."""
    grads = [jnp.zeros(x.shape, jnp.float32) for x in (q, k, v)]
    if block is not None:
        r, c = block.q_rows, block.kv_rows
        dq, dk, dv = cuflash_jax._backward(do[:, r], q[:, r], k[:, c], v[:, c], o[:, r],
                                           m[:, :, r], l[:, :, r], block.causal, scale, False)
        grads = [grads[0].at[:, r].set(dq.astype(jnp.float32)),
                 grads[1].at[:, c].set(dk.astype(jnp.float32)),
                 grads[2].at[:, c].set(dv.astype(jnp.float32))]
    return tuple(_varying_like(g, x) for g, x in zip(grads, (q, k, v)))


def _at_step(step: int, rank, run, q_len: int, kv_len: int, causal: bool, layout: str):
    """``run(block)`` for this device's block at ``step``: a Python choice when every device
    meets the same kind of source, a ``lax.cond`` on the traced rank when not."""

    def block(source: Source):
        return visible_block(source, q_len, kv_len, causal=causal, layout=layout)

    if step == 0:
        return run(block(Source.SELF))
    earlier, later = block(Source.EARLIER), block(Source.LATER)
    if earlier == later:  # no mask: every step is the full block
        return run(earlier)
    # at step s the source is rank - s (mod W): an earlier rank iff rank >= s
    return lax.cond(rank >= step, lambda: run(earlier), lambda: run(later))


# -- the rings ---------------------------------------------------------------------------------


def _shift(xs, axis_name: str, world_size: int):
    """Every device's ``xs`` moves to the next device on the axis."""
    perm = [(i, (i + 1) % world_size) for i in range(world_size)]
    return lax.ppermute(xs, axis_name, perm)


def _ring_forward(q, k, v, axis_name, causal, scale, layout):
    world_size, rank = lax.axis_size(axis_name), lax.axis_index(axis_name)
    kv, o, lse = (k, v), None, None
    for step in range(world_size):
        incoming = _shift(kv, axis_name, world_size) if step + 1 < world_size else None
        o_b, lse_b = _at_step(step, rank, lambda b: _block_forward(b, q, *kv, scale),
                              q.shape[1], k.shape[1], causal, layout)
        o, lse = (o_b, lse_b) if o is None else merge_attention([o, o_b], [lse, lse_b])
        kv = incoming
    return o.astype(q.dtype), lse


def _ring_backward(do, q, k, v, o, lse, axis_name, causal, scale, layout):
    world_size, rank = lax.axis_size(axis_name), lax.axis_index(axis_name)
    # the global probabilities exp(s - lse): m = lse, l = 1 (0 where no key was seen)
    m, l = lse, jnp.isfinite(lse).astype(jnp.float32)
    kv, dq, dkv = (k, v), jnp.zeros(q.shape, jnp.float32), None
    for step in range(world_size):
        incoming = _shift(kv, axis_name, world_size) if step + 1 < world_size else None
        dq_b, dk_b, dv_b = _at_step(
            step, rank, lambda b: _block_backward(b, do, q, *kv, o, m, l, scale),
            q.shape[1], k.shape[1], causal, layout)
        dq = dq + dq_b
        # the visiting shard's dK, dV: the devices before us, plus ours; then pass it on
        dkv = (dk_b, dv_b) if dkv is None else (dkv[0] + dk_b, dkv[1] + dv_b)
        dkv = _shift(dkv, axis_name, world_size)  # after the last step: home to its owner
        kv = incoming
    return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _ring(q, k, v, axis_name, causal, scale, layout):
    return _ring_forward(q, k, v, axis_name, causal, scale, layout)


def _ring_fwd(q, k, v, axis_name, causal, scale, layout):
    o, lse = _ring_forward(q, k, v, axis_name, causal, scale, layout)
    return (o, lse), (q, k, v, o, lse)


def _ring_bwd(axis_name, causal, scale, layout, residuals, cotangents):
    do, _ = cotangents  # lse is an output for callers that combine further; no gradient
    return _ring_backward(do, *residuals, axis_name, causal, scale, layout)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, *, axis_name: str, causal: bool = False,
                   softmax_scale: float | None = None, layout: str = "zigzag",
                   return_lse: bool = False):
    """Exact attention over a sequence sharded along mesh axis ``axis_name``.

    Call it inside ``jax.shard_map`` (under ``jax.jit``) with the sequence axis of q, k, v
    sharded over ``axis_name`` in the order of ``layout``
    (``cuflash.distributed.shard_sequence`` / ``shard_positions`` give the order).

    Args:
        q: the local query shard (batch, shard_len, heads, head_dim), float16, bfloat16 or
            float32.
        k, v: the local key / value shards (batch, shard_len_kv, heads_kv, head_dim); heads
            a multiple of heads_kv (GQA). Causal: shard_len_kv == shard_len.
        axis_name: the mesh axis the sequence is sharded over; its devices form the ring.
        causal: causal mask over global sequence positions. A Python bool (static).
        softmax_scale: default 1 / sqrt(head_dim). A Python float (static).
        layout: ``"zigzag"`` (balanced causal work; shard_len even) or ``"contiguous"``.
        return_lse: also return the float32 (batch, heads, shard_len) log-sum-exp.

    Returns:
        o like q (the local rows of the output); with ``return_lse``, ``(o, lse)``.
        Differentiable in q, k, v through a custom VJP (the backward ring).
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a Python bool (static), got {type(causal).__name__}")
    check_layout(layout)
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name}: expected a 4-D array (batch, shard_len, heads, "
                             f"head_dim), got shape {jnp.shape(x)}")
    check_shards(q.shape[1], k.shape[1], lax.axis_size(axis_name), causal=causal,
                 layout=layout)  # errors at trace time, before any collective
    scale = (default_softmax_scale(q.shape[-1]) if softmax_scale is None
             else float(softmax_scale))
    o, lse = _ring(q, k, v, axis_name, causal, scale, layout)
    return (o, lse) if return_lse else o

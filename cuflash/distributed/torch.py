"""Ring attention on ``torch.distributed``: each rank holds a shard of one sequence.

Every rank calls ``ring_attention`` with its own shard of q, k, v (see
``cuflash.distributed.plan`` for the layouts and ``shard_sequence`` to cut them). K/V shards
move one rank forward per step (isend / irecv of the next shard are posted before the current
block computes), each step runs ``cuflash.attention_forward`` on the block the plan names,
and the partial results are merged in float32 by their log-sum-exp
(``cuflash.merge_attention``).

The backward runs the ring again: each step calls ``cuflash.attention_backward`` on the same
block with the *global* output and log-sum-exp, so the recomputed probabilities are the
global ones (``P = exp(score - lse)``, i.e. statistics m = lse, l = 1). dQ stays on its rank;
a float32 dK/dV accumulator travels with each K/V shard, gaining every rank's contribution,
and a last hop hands it back to the shard's owner.

Works on any backend with point-to-point ops: gloo on the CPU (tested), NCCL on GPUs. On
CUDA all compute runs on torch's current stream (cuflash's kernels and the float32 merges);
torch.distributed orders its communication against that stream, so nothing here waits on
the host. Every rank must pass shards of the same shape and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import api
from ..constants import default_softmax_scale
from ..merge import merge_attention
from ..stats import SoftmaxStats
from .plan import Block, check_layout, check_shards, ring_source, source_of, visible_block

__all__ = ["ring_attention"]

# gloo matches messages between a pair of ranks by tag: K/V and dK/dV traffic is kept apart
_KV_TAG, _DKV_TAG = 0, 1


# -- the ring of processes ---------------------------------------------------------------


class _Pending:
    """Posted sends and receives; ``wait`` returns the received tensors. Holds the sent
    tensors until then so they cannot be freed mid-transfer."""

    def __init__(self, works, sent, received):
        self._works, self._sent, self._received = works, sent, received

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._sent = None
        return self._received


@dataclass(frozen=True)
class _Ring:
    group: object
    rank: int
    world_size: int
    next_rank: int  # global ranks of the neighbours, as P2POp wants them
    prev_rank: int

    @classmethod
    def of(cls, group) -> "_Ring":
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ring_attention needs torch.distributed initialised "
                               "(dist.init_process_group)")
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)

        def global_rank(r: int) -> int:
            return r if group is None else dist.get_global_rank(group, r)

        return cls(group, rank, world_size, global_rank((rank + 1) % world_size),
                   global_rank((rank - 1) % world_size))

    def shift(self, tensors: list[torch.Tensor], tag: int) -> _Pending:
        """Send ``tensors`` to the next rank and receive the previous rank's, asynchronously."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group, tag) for t in received]
        return _Pending(dist.batch_isend_irecv(ops), tensors, received)

    def block(self, step: int, q_len: int, kv_len: int, causal: bool,
              layout: str) -> Block | None:
        source = ring_source(self.rank, step, self.world_size)
        return visible_block(source_of(self.rank, source), q_len, kv_len, causal=causal,
                             layout=layout)


# -- forward and backward rings ------------------------------------------------------------


def _ring_forward(q, k, v, ring: _Ring, causal: bool, scale: float, layout: str):
    """(o in q's dtype, lse float32) of this rank's queries over the whole sequence."""
    kv = [k, v]
    o_acc = lse_acc = None  # float32; step 0 (own shard) always covers every row
    for step in range(ring.world_size):
        incoming = ring.shift(kv, _KV_TAG) if step + 1 < ring.world_size else None
        block = ring.block(step, q.shape[1], k.shape[1], causal, layout)
        if block is not None:
            rows = block.q_rows
            o_b, stats = api.attention_forward(q[:, rows], kv[0][:, block.kv_rows],
                                               kv[1][:, block.kv_rows], causal=block.causal,
                                               softmax_scale=scale)
            if o_acc is None:
                o_acc, lse_acc = o_b.float(), stats.lse
            else:
                o_acc[:, rows], lse_acc[:, :, rows] = merge_attention(
                    [o_acc[:, rows], o_b], [lse_acc[:, :, rows], stats.lse])
        if incoming is not None:
            kv = incoming.wait()
    return o_acc.to(q.dtype), lse_acc


def _global_stats(lse: torch.Tensor) -> SoftmaxStats:
    """Statistics that make the backward recompute the global probabilities exp(s - lse):
    m = lse, l = 1; rows that saw no key keep m = -inf, l = 0 (their P and gradients are 0)."""
    return SoftmaxStats(lse, torch.isfinite(lse).to(torch.float32))


def _ring_backward(do, q, k, v, o, lse, ring: _Ring, causal: bool, scale: float,
                   layout: str, deterministic: bool):
    """(dq, dk, dv) of this rank's shards."""
    stats = _global_stats(lse)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv, dkv_incoming = [k, v], None
    for step in range(ring.world_size):
        kv_incoming = ring.shift(kv, _KV_TAG) if step + 1 < ring.world_size else None
        block = ring.block(step, q.shape[1], k.shape[1], causal, layout)
        grads = None
        if block is not None:
            r = block.q_rows
            block_stats = SoftmaxStats(stats.m[:, :, r].contiguous(),
                                       stats.l[:, :, r].contiguous())
            grads = api.attention_backward(
                do[:, r], q[:, r], kv[0][:, block.kv_rows], kv[1][:, block.kv_rows], o[:, r],
                block_stats, causal=block.causal, softmax_scale=scale,
                deterministic=deterministic)
            dq[:, r] += grads[0]
        # the visiting shard's float32 dK, dV: what the ranks before us added, plus ours
        if dkv_incoming is None:
            dkv = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in kv]
        else:
            dkv = dkv_incoming.wait()
        if grads is not None:
            dkv[0][:, block.kv_rows] += grads[1]
            dkv[1][:, block.kv_rows] += grads[2]
        # after the last step this hop brings each rank its own shard's total
        dkv_incoming = ring.shift(dkv, _DKV_TAG) if ring.world_size > 1 else None
        if kv_incoming is not None:
            kv = kv_incoming.wait()
    dk, dv = dkv_incoming.wait() if dkv_incoming is not None else dkv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, causal, scale, layout, deterministic):
        o, lse = _ring_forward(q, k, v, ring, causal, scale, layout)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.options = (ring, causal, scale, layout, deterministic)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        # autograd picks dO's layout (o.sum() gives stride 0); the kernels need a unit last stride
        dq, dk, dv = _ring_backward(do.contiguous(), q, k, v, o, lse, *ctx.options)
        return dq, dk, dv, None, None, None, None, None


# -- public function -------------------------------------------------------------------------


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   softmax_scale: float | None = None, layout: str = "zigzag", group=None,
                   deterministic: bool = False, return_lse: bool = False):
    """Exact attention over a sequence sharded across the ranks of a process group.

    Args:
        q: this rank's query shard (batch, shard_len, heads, head_dim), float16, bfloat16 or
            float32, on the CPU (gloo) or this rank's CUDA device (NCCL).
        k, v: this rank's key / value shards (batch, shard_len_kv, heads_kv, head_dim); heads
            a multiple of heads_kv (GQA). Causal: shard_len_kv == shard_len.
        causal: causal mask over the *global* sequence positions of the layout.
        softmax_scale: default 1 / sqrt(head_dim).
        layout: how the sequence is spread over ranks (``cuflash.distributed.plan``):
            ``"zigzag"`` (rank r holds chunks r and 2W-1-r: balanced causal work, shard_len
            even) or ``"contiguous"``. Without a mask the two compute the same thing.
        group: the process group (default: the world); its ranks in order form the ring.
        deterministic: passed to each block's ``attention_backward``.
        return_lse: also return the float32 (batch, heads, shard_len) log-sum-exp.

    Returns:
        o like q (this rank's rows of the output); with ``return_lse``, ``(o, lse)``.
        Differentiable in q, k, v (lse is not).
    """
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D torch.Tensor (batch, shard_len, heads, "
                             f"head_dim), got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    check_layout(layout)
    ring = _Ring.of(group)
    check_shards(q.shape[1], k.shape[1], ring.world_size, causal=causal, layout=layout)
    scale = (default_softmax_scale(q.shape[-1]) if softmax_scale is None
             else float(softmax_scale))
    # torch.distributed sends whole buffers: a strided view is copied once here
    k, v = k.contiguous(), v.contiguous()
    o, lse = _RingAttention.apply(q, k, v, ring, causal, scale, layout, deterministic)
    return (o, lse) if return_lse else o

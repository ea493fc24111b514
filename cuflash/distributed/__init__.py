"""Ring attention: attention over a sequence sharded across devices, K/V passed round a ring.

* ``cuflash.distributed.plan``: which block of each step is computed, and the zig-zag /
  contiguous sequence layouts (framework-neutral, pure Python; shared by both rings).
* ``cuflash.distributed.torch``: ``ring_attention`` on ``torch.distributed`` (gloo, NCCL).
* ``cuflash.distributed.jax``: ``ring_attention`` for ``jax.shard_map`` over a mesh axis.

Import the framework module you need; this package imports no framework. docs/distributed.md
explains the algorithm.
"""

from .plan import LAYOUTS, Block, gather_sequence, shard_positions, shard_sequence

__all__ = ["LAYOUTS", "Block", "gather_sequence", "shard_positions", "shard_sequence"]

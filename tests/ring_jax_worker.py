"""The JAX ring tests' subprocess: ``python ring_jax_worker.py CASES OUT``.

Runs with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set by the test, so the
pytest process keeps its single CPU device). For every case in the JSON-lines file CASES it
lays the case's inputs out in the ring's order, shards them over a 1-D mesh of
``world_size`` CPU devices, runs ``cuflash.distributed.jax.ring_attention`` under
``jax.jit(jax.shard_map(...))`` forward and, through ``jax.vjp``, backward, and writes each
device's shard of o, dq, dk, dv (float32) and lse to ``OUT/<case>_r<rank>.npz`` as the torch worker
does.
"""

from __future__ import annotations

import faulthandler
import os
import sys

import numpy as np

faulthandler.dump_traceback_later(300, exit=True)  # a hung collective fails with a traceback

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ring_helpers import RingCase  # noqa: E402

from cuflash.distributed import shard_sequence  # noqa: E402
from cuflash.distributed.jax import ring_attention  # noqa: E402

AXIS = "seq"


def _ring_order(x: np.ndarray, case: RingCase) -> np.ndarray:
    """The full sequence reordered so that device r's contiguous slice is its shard."""
    return np.concatenate([shard_sequence(x, r, case.world_size, layout=case.layout)
                           for r in range(case.world_size)], axis=1)


def run_case(case: RingCase, out_dir: str) -> None:
    mesh = jax.make_mesh((case.world_size,), (AXIS,), devices=jax.devices()[:case.world_size])
    spec = P(None, AXIS)

    def attention(q, k, v):
        return ring_attention(q, k, v, axis_name=AXIS, causal=case.causal, layout=case.layout,
                              return_lse=True)

    lse_spec = P(None, None, AXIS)  # (batch, heads, seqlen)
    sharded = jax.shard_map(attention, mesh=mesh, in_specs=(spec,) * 3,
                            out_specs=(spec, lse_spec))

    @jax.jit
    def forward_backward(q, k, v, do):
        (o, lse), vjp = jax.vjp(sharded, q, k, v)
        return (o, *vjp((do, jnp.zeros_like(lse))), lse)

    placement = NamedSharding(mesh, spec)
    args = [jax.device_put(_ring_order(x, case), placement) for x in case.inputs()]
    results = [np.asarray(x.astype(np.float32)) for x in forward_backward(*args)]
    for rank in range(case.world_size):
        shards = {name: np.split(x, case.world_size, axis=2 if name == "lse" else 1)[rank]
                  for name, x in zip(("o", "dq", "dk", "dv", "lse"), results)}
        np.savez(os.path.join(out_dir, f"{case.name}_r{rank}.npz"), **shards)


def main() -> None:
    cases_path, out_dir = sys.argv[1:]
    with open(cases_path) as f:
        for line in f:
            run_case(RingCase.from_json(line), out_dir)


if __name__ == "__main__":
    main()

"""One rank of the torch ring tests: ``python ring_torch_worker.py RANK WORLD INIT CASES OUT``.

Joins a gloo process group (``INIT``, a file:// or tcp:// URL), then for every case in the
JSON-lines file ``CASES`` cuts its shard of the case's inputs, runs
``cuflash.distributed.torch.ring_attention`` forward and backward, and writes its shard of
o, dq, dk, dv (as float32, exact for every input dtype) and lse to ``OUT/<case>_r<rank>.npz``.
A case whose world_size is smaller than WORLD runs on world / world_size disjoint strided
subgroups at once (ranks g, g + n, g + 2n, ...), so rings over non-world groups are tested;
each rank writes under its rank within its subgroup plus ``_g<group>``.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ring_helpers import RingCase  # noqa: E402

from cuflash.distributed import shard_sequence  # noqa: E402
from cuflash.distributed.torch import ring_attention  # noqa: E402


def _to_torch(x: np.ndarray) -> torch.Tensor:
    if x.dtype.name == "bfloat16":  # torch.from_numpy does not know ml_dtypes' bfloat16
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def _group_for(case: RingCase, rank: int, world: int):
    """(process group or None, rank within it, group index) for this case."""
    if case.world_size == world:
        return None, rank, 0
    n_groups = world // case.world_size
    mine = None
    for g in range(n_groups):  # every rank creates every group, in the same order
        members = list(range(g, world, n_groups))
        group = dist.new_group(members)
        if rank in members:
            mine = (group, members.index(rank), g)
    return mine


def run_case(case: RingCase, rank: int, world: int, out_dir: str) -> None:
    group, ring_rank, g = _group_for(case, rank, world)
    shards = [shard_sequence(x, ring_rank, case.world_size, layout=case.layout)
              for x in case.inputs()]
    q, k, v, do = (_to_torch(x) for x in shards)
    for x in (q, k, v):
        x.requires_grad_()
    o, lse = ring_attention(q, k, v, causal=case.causal, layout=case.layout, group=group,
                            return_lse=True)
    o.backward(do)
    results = {name: t.detach().float().numpy() for name, t in
               (("o", o), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad), ("lse", lse))}
    suffix = "" if group is None else f"_g{g}"
    np.savez(os.path.join(out_dir, f"{case.name}_r{ring_rank}{suffix}.npz"), **results)


def main() -> None:
    rank, world, init, cases_path, out_dir = sys.argv[1:]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        with open(cases_path) as f:
            for line in f:
                run_case(RingCase.from_json(line), rank, world, out_dir)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""cuflash.distributed.torch.ring_attention in real process groups: gloo on the CPU.

Each world size is one launch of WORLD processes (tests/ring_torch_worker.py, rendezvous
through a file:// URL in a temporary directory, so no port is needed) that runs every case
of that size in turn; the tests then gather the shards each rank wrote and judge o, dq, dk, dv
against the float64 reference (tests/ring_helpers.py: FlashAttention's 2 x naive rule) and o
against one-device cuflash. One launch per world size keeps the cost at one torch import
per process (a few seconds on two cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from cuflash.distributed import gather_sequence  # noqa: E402

try:
    from ring_helpers import DTYPES, RingCase, assert_ring_matches
except ImportError:
    from tests.ring_helpers import DTYPES, RingCase, assert_ring_matches

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORKER = Path(__file__).with_name("ring_torch_worker.py")
ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 180

CASES = {
    2: [
        RingCase(2, 24, causal=True, dtype="fp32"),
        RingCase(2, 20, causal=True, dtype="bf16", heads=4, heads_kv=1, seed=1),
        RingCase(2, 18, causal=True, layout="contiguous", dtype="fp32", seed=2),
        RingCase(2, 16, causal=False, dtype="bf16", head_dim=32, seed=3),
        RingCase(2, 16, causal=False, dtype="fp32", seqlen_kv=28, seed=9),  # cross lengths
    ],
    4: [
        RingCase(4, 32, causal=True, dtype="fp32", seed=4),
        RingCase(4, 40, causal=True, dtype="bf16", batch=2, seed=5),
        RingCase(4, 24, causal=True, layout="contiguous", dtype="bf16", seed=6),
        RingCase(4, 16, causal=False, dtype="fp16", heads=2, heads_kv=2, seed=7),
        RingCase(4, 24, causal=False, dtype="bf16", seqlen_kv=40, seed=10),
        # two rings of 2 inside a world of 4: ranks {0, 2} and {1, 3} (process subgroups)
        RingCase(2, 24, causal=True, dtype="fp32", heads=6, heads_kv=2, seed=8),
    ],
}


def _launch(world: int, cases: list[RingCase], tmp: Path) -> None:
    cases_file = tmp / "cases.jsonl"
    cases_file.write_text("".join(c.to_json() + "\n" for c in cases))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}  # W processes share the machine's cores
    init = f"file://{tmp / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), init,
                               str(cases_file), str(tmp)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [(r, p.returncode, log) for r, (p, log) in enumerate(zip(procs, logs))
              if p.returncode]
    assert not failed, "\n".join(f"rank {r} exited {rc}:\n{log[-3000:]}" for r, rc, log in failed)


@pytest.fixture(scope="module", params=sorted(CASES), ids=lambda w: f"world{w}")
def launched(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"ring_torch_w{world}")
    _launch(world, CASES[world], tmp)
    return world, tmp


def _gathered(tmp: Path, case: RingCase, suffix: str = ""):
    shards = [np.load(tmp / f"{case.name}_r{r}{suffix}.npz") for r in range(case.world_size)]
    dtype = DTYPES[case.dtype]
    results = [gather_sequence([s[name] for s in shards], layout=case.layout).astype(dtype)
               for name in ("o", "dq", "dk", "dv")]
    return results + [gather_sequence([s["lse"] for s in shards], layout=case.layout, axis=2)]


def test_ring_matches_reference(launched):
    world, tmp = launched
    for case in CASES[world]:
        groups = world // case.world_size
        for suffix in ([""] if groups == 1 else [f"_g{g}" for g in range(groups)]):
            assert_ring_matches(case, *_gathered(tmp, case, suffix))


def test_errors_without_a_process_group():
    import torch

    from cuflash.distributed.torch import ring_attention

    x = torch.zeros(1, 4, 1, 8)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
            ring_attention(x, x, x)
    with pytest.raises(ValueError, match="q: expected a 4-D torch.Tensor"):
        ring_attention(x[0], x, x)
    with pytest.raises(ValueError, match="layout: expected one of"):
        ring_attention(x, x, x, layout="striped")


@pytest.fixture
def world_of_one(tmp_path):
    """A one-process gloo group inside the test process, destroyed afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("causal", [False, True])
def test_world_of_one_is_flash_attention(world_of_one, causal):
    import torch

    from cuflash.distributed.torch import ring_attention
    from cuflash.torch import flash_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 11, h, 16) for h in (4, 2, 2))  # odd length: fine with one rank
    do = torch.randn(2, 11, 4, 16)
    grads = []
    for fn in (ring_attention, flash_attention):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = fn(*leaves, causal=causal)
        o.backward(do)
        grads.append([o.detach()] + [x.grad for x in leaves])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_shapes_the_plan_cannot_split_are_refused(world_of_one):
    import torch

    from cuflash.distributed.torch import ring_attention

    q, k = torch.zeros(1, 4, 2, 8), torch.zeros(1, 6, 2, 8)
    with pytest.raises(ValueError, match="equal length, got 4 and 6"):
        ring_attention(q, k, k, causal=True)
    with pytest.raises(TypeError, match="causal: expected a bool"):
        ring_attention(q, q, q, causal=1)
    ring_attention(q, k, k, causal=False)  # cross lengths without a mask are fine

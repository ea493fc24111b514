"""GPU checks for issue #9's edges (run on a GPU machine: ``pytest -m gpu``).

* deterministic=: bitwise-equal gradients over repeated runs through cuflash.torch (explicit
  and through torch.use_deterministic_algorithms) and cuflash.jax (eager and jitted, i.e.
  through the FFI attribute). The shapes make many key blocks add into each dQ row, which
  is where atomics would reorder sums.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpu_helpers import random_qkv, randn, rng_for, to_gpu, to_host

pytestmark = pytest.mark.gpu

SHAPE = dict(batch=2, seqlen_q=1024, seqlen_k=1536, heads=8, heads_kv=2, head_dim=64)
RUNS = 4


def _host_inputs(dtype="bfloat16", seed=11):
    rng = rng_for(seed)
    q, k, v = random_qkv(rng, dtype=dtype, **SHAPE)
    return q, k, v, randn(rng, q.shape, dtype)


def _assert_bitwise_equal(runs, label):
    first = runs[0]
    for i, later in enumerate(runs[1:], 1):
        for name, a, b in zip(("dq", "dk", "dv"), first, later):
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), \
                f"{label}: {name} of run {i} differs bitwise from run 0"


def _torch_grads(q, k, v, do, **kw):
    import cuflash.torch as ct

    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ct.flash_attention(qg, kg, vg, causal=True, **kw).backward(do)
    return [to_host(t.grad).copy() for t in (qg, kg, vg)]


@pytest.mark.parametrize("via", ["argument", "use_deterministic_algorithms"])
def test_torch_deterministic_gradients_are_bitwise_equal(via):
    torch = pytest.importorskip("torch")
    q, k, v, do = (to_gpu(x, "torch") for x in _host_inputs())
    was = torch.are_deterministic_algorithms_enabled()
    kw = {"deterministic": True} if via == "argument" else {}
    try:
        torch.use_deterministic_algorithms(via != "argument", warn_only=True)
        runs = [_torch_grads(q, k, v, do, **kw) for _ in range(RUNS)]
    finally:
        torch.use_deterministic_algorithms(was)
    _assert_bitwise_equal(runs, f"torch via {via}")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_jax_deterministic_gradients_are_bitwise_equal(jit):
    jax = pytest.importorskip("jax")
    import cuflash.jax as cj

    q, k, v, do = (to_gpu(x, "jax") for x in _host_inputs())

    def grads(q, k, v):
        _, vjp = jax.vjp(lambda q, k, v: cj.flash_attention(q, k, v, causal=True,
                                                            deterministic=True), q, k, v)
        return vjp(do)

    fn = jax.jit(grads) if jit else grads
    runs = [[np.asarray(g).copy() for g in fn(q, k, v)] for _ in range(RUNS)]
    _assert_bitwise_equal(runs, f"jax {'jit' if jit else 'eager'}")

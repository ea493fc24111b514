"""Child process of tests/test_edges_xla_ffi.py: 8 threads make their first jitted cuflash
call at the same moment (so they race to register the XLA FFI targets). Exit 0 when every
call returned the right result, 1 (with the errors printed) otherwise."""

import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

import cuflash.jax as cj

THREADS = 8
barrier = threading.Barrier(THREADS)
errors: list[str] = []
q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 2, 8)), jnp.float32)
expected = np.asarray(cj.flash_attention(q, q, q))  # eager: registers nothing


def first_jitted_call(i: int) -> None:
    f = jax.jit(lambda q: cj.flash_attention(q, q, q) * (i + 1))  # a fresh trace per thread
    barrier.wait()
    try:
        np.testing.assert_allclose(np.asarray(f(q)), expected * (i + 1), rtol=1e-5, atol=1e-6)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        errors.append(f"thread {i}: {type(exc).__name__}: {str(exc)[:300]}")


threads = [threading.Thread(target=first_jitted_call, args=(i,)) for i in range(THREADS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("\n".join(errors))
sys.exit(1 if errors else 0)

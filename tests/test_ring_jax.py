"""cuflash.distributed.jax.ring_attention on several host devices: jit(shard_map), ppermute.

One subprocess (tests/ring_jax_worker.py) runs with four forced host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``: set in the child only, so the rest
of the session keeps JAX's single CPU device) and meshes of 1, 2 and 4 of them; the test
gathers each device's shard and judges o, dq, dk, dv as the torch ring tests do
(tests/ring_helpers.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from cuflash.distributed import gather_sequence  # noqa: E402

try:
    from ring_helpers import DTYPES, RingCase, assert_ring_matches
except ImportError:
    from tests.ring_helpers import DTYPES, RingCase, assert_ring_matches

WORKER = Path(__file__).with_name("ring_jax_worker.py")
ROOT = Path(__file__).resolve().parents[1]

CASES = [
    RingCase(1, 12, causal=True, dtype="fp32", seed=20),
    RingCase(2, 24, causal=True, dtype="fp32", seed=21),
    RingCase(2, 20, causal=True, dtype="bf16", heads=4, heads_kv=1, seed=22),
    RingCase(2, 16, causal=False, dtype="fp32", head_dim=32, seed=23),
    RingCase(2, 16, causal=False, dtype="fp32", seqlen_kv=28, seed=28),
    RingCase(4, 32, causal=True, dtype="fp32", seed=24),
    RingCase(4, 40, causal=True, dtype="bf16", batch=2, seed=25),
    RingCase(4, 24, causal=True, layout="contiguous", dtype="fp32", seed=26),
    RingCase(4, 16, causal=False, dtype="bf16", heads=2, heads_kv=2, seed=27),
]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ring_jax")
    cases_file = tmp / "cases.jsonl"
    cases_file.write_text("".join(c.to_json() + "\n" for c in CASES))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, str(WORKER), str(cases_file), str(tmp)], env=env,
                         capture_output=True, text=True, timeout=360)
    assert run.returncode == 0, f"worker exited {run.returncode}:\n{run.stdout[-2000:]}" \
                                f"\n{run.stderr[-4000:]}"
    return tmp


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ring_matches_reference(launched, case):
    shards = [np.load(launched / f"{case.name}_r{r}.npz") for r in range(case.world_size)]
    results = [gather_sequence([s[name] for s in shards], layout=case.layout)
               .astype(DTYPES[case.dtype]) for name in ("o", "dq", "dk", "dv")]
    lse = gather_sequence([s["lse"] for s in shards], layout=case.layout, axis=2)
    assert_ring_matches(case, *results, lse=lse)


def test_bad_arguments_are_refused_at_trace_time():
    import jax.numpy as jnp

    from cuflash.distributed.jax import ring_attention

    mesh = jax.make_mesh((1,), ("seq",))
    x = jnp.zeros((1, 4, 1, 8))

    def call(**kw):
        body = jax.shard_map(lambda q: ring_attention(q, q, q, axis_name="seq", **kw),
                             mesh=mesh, in_specs=jax.P(), out_specs=jax.P())
        return jax.jit(body)(x)

    with pytest.raises(TypeError, match="causal: expected a Python bool"):
        call(causal=1)
    with pytest.raises(ValueError, match="layout: expected one of"):
        call(layout="striped")

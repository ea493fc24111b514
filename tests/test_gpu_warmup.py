"""``python -m cuflash warmup`` fills exactly the caches a first call reads (``gpu``).

Warm up one (dtype, head_dim) into an empty ``CUPY_CACHE_DIR``, then run a forward and a
backward of that shape in a fresh process: if the call compiled anything, a new file would
appear in the cache (cuflash's cubins, every kernel's), so the file set must not change.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

CALL = """
import cupy, numpy as np, cuflash
rng = np.random.default_rng(0)
q, k, v, do = (cupy.asarray(rng.standard_normal((1, 200, 2, {d})).astype(np.{dtype}))
               for _ in range(4))
for causal in (False, True):
    for deterministic in (False, True):
        o, stats = cuflash.attention_forward(q, k, v, causal=causal)
        cuflash.attention_backward(do, q, k, v, o, stats, causal=causal,
                                   deterministic=deterministic)
cupy.cuda.Device().synchronize()
"""


def _files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root)
            for d, _, names in os.walk(root) for f in names if not f.endswith(".tmp")}


@pytest.mark.parametrize("dtype, head_dim", [("float16", 128), ("float32", 64)])
def test_warmup_leaves_nothing_for_the_first_call_to_compile(tmp_path, dtype, head_dim):
    env = dict(os.environ, CUPY_CACHE_DIR=str(tmp_path))
    env.pop("CUFLASH_FORCE_ARCH", None)
    env.pop("CUFLASH_SMEM_BUDGET", None)
    # poisoning (CUFLASH_POISON=1, as the GPU suite runs) fills outputs with CuPy's own fill
    # kernels, which CuPy compiles into the same cache: not cuflash's kernels, not warmup's
    env.pop("CUFLASH_POISON", None)
    warm = subprocess.run([sys.executable, "-m", "cuflash", "warmup", "--dtype", dtype,
                           "--head-dim", str(head_dim)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert "kernels ready" in warm.stdout
    before = _files(tmp_path)
    assert before, "warmup wrote nothing into CUPY_CACHE_DIR"
    call = subprocess.run([sys.executable, "-c", CALL.format(d=head_dim, dtype=dtype)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert call.returncode == 0, call.stderr
    assert _files(tmp_path) == before, (
        f"the first call compiled {sorted(_files(tmp_path) - before)} that warmup did not")

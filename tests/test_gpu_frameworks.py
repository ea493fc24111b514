"""Stream ordering on the GPU: cuflash launches on the caller's current stream (``gpu`` tests).

Each test queues a long chain of matmuls on a non-default stream, then, on the same stream,
writes the final values into q's buffer and calls attention. Launched on that stream, the
kernel reads the final q; launched on any other stream it runs while the chain is still
busy and reads the old q (or its output is overwritten by the poison fill queued on the
right stream), so a wrong stream shows up as a wrong result.

The streams are created non-blocking on purpose: a blocking stream is synchronized with the
legacy default stream, which would hide a launch on stream 0.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import reference

try:
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu

SHAPE = dict(batch=2, seqlen_q=200, seqlen_k=180, heads=4, heads_kv=2, head_dim=64)
MATMUL_N = 4096  # one fp32 4096^3 matmul is ~2-3 ms on an H100; the chain is ~100 ms
CHAIN = 40


@pytest.fixture(scope="module", autouse=True)
def gpu_env():
    yield from gh.gpu_module_env()


def _inputs(dtype):
    rng = gh.rng_for()
    q_old, k, v = gh.random_qkv(rng, dtype=dtype, **SHAPE)
    q_final = gh.randn(rng, q_old.shape, dtype)
    return rng, q_old, q_final, k, v


def _assert_final(o, q_final, k, v, dtype, what):
    o_ref = reference.attention_reference(q_final, k, v)[0]
    o_naive = reference.attention_naive(q_final, k, v, dtype=gh.np_dtype(dtype))
    gh.assert_matches_reference("o", gh.to_host(o, dtype), o_ref, o_naive, dtype=dtype,
                                label=f"{gh.forward_spec_name(dtype, 64, False)}; {what}: "
                                      "the kernel did not run after the stream's earlier work")


def test_cupy_non_default_stream():
    import cupy

    dtype = "float32"
    rng, q_old, q_final, k, v = _inputs(dtype)
    gq, gk, gv = (gh.to_gpu(x) for x in (q_old, k, v))
    q_final_dev = cupy.asarray(q_final)
    a = cupy.asarray(rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)) / 64
    cuflash.attention(gq, gk, gv)  # compile and load now, not inside the timed window
    (a @ a).sum()  # cuBLAS handle and workspace ready
    cupy.cuda.Device().synchronize()

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        x = a
        for _ in range(CHAIN):
            x = a @ x
        gq[...] = q_final_dev  # ordered after the chain on this stream
        o = cuflash.attention(gq, gk, gv)
    stream.synchronize()
    _assert_final(o, q_final, k, v, dtype, "cupy stream")


def test_torch_non_default_stream():
    torch = pytest.importorskip("torch")
    dtype = "bfloat16"
    rng, q_old, q_final, k, v = _inputs(dtype)
    gq, gk, gv, q_final_dev = (gh.to_gpu(x, "torch") for x in (q_old, k, v, q_final))
    a = torch.randn(MATMUL_N, MATMUL_N, device=gq.device) / 64
    cuflash.attention(gq, gk, gv)  # compile and load now
    (a @ a).sum()
    torch.cuda.synchronize()

    stream = torch.cuda.Stream()  # torch's pool streams are non-blocking
    with torch.cuda.stream(stream):
        x = a
        for _ in range(CHAIN):
            x = a @ x
        gq.copy_(q_final_dev)
        o = cuflash.attention(gq, gk, gv)
    stream.synchronize()
    assert isinstance(o, torch.Tensor) and o.device == gq.device
    _assert_final(o, q_final, k, v, dtype, "torch stream")

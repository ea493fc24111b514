"""cuflash.jax.flash_attention_varlen on a CUDA GPU (``gpu`` tests; skipped without a GPU or
a CUDA-enabled JAX): eagerly (the API on JAX GPU arrays) and under ``jax.jit`` with traced
offsets (the XLA FFI targets of ``cuflash.jax_varlen`` on XLA's stream), forward and VJP in
bf16 and fp32, sinks' gradient included, against the float64 varlen reference with the
acceptance rule of ``cuflash.testing``. Outputs are NaN-poisoned (CUFLASH_POISON=1)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cuflash import jax_varlen, reference, testing

try:
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

CU_Q, CU_K = [0, 37, 37, 82, 91], [0, 70, 90, 90, 130]  # an empty sequence, one without keys
MAX_Q, MAX_K = 45, 70


@pytest.fixture(scope="module", autouse=True)
def gpu_env():
    yield from gh.gpu_module_env()


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("mods", [dict(causal=True),
                                  dict(causal=True, window=(16, -1), softcap=4.0, sinks=True)],
                         ids=["causal", "window-softcap-sinks"])
def test_jax_varlen_matches_reference_gpu(dtype, mods, jit):
    jax = pytest.importorskip("jax")
    device = gh.jax_gpu_device()
    import cuflash.jax as cj

    rng = gh.rng_for()
    np_dtype = gh.np_dtype(dtype)
    q = rng.standard_normal((CU_Q[-1], 4, 64), dtype=np.float32).astype(np_dtype)
    k, v = (rng.standard_normal((CU_K[-1], 2, 64), dtype=np.float32).astype(np_dtype)
            for _ in range(2))
    do = rng.standard_normal(q.shape, dtype=np.float32).astype(np_dtype)
    mods = dict(mods)
    sinks = rng.standard_normal(4).astype(np.float32) if mods.pop("sinks", False) else None

    def run(q, k, v, do, cu_q, cu_k, s):
        if s is None:
            o, vjp = jax.vjp(lambda q, k, v: cj.flash_attention_varlen(
                q, k, v, cu_q, cu_k, MAX_Q, MAX_K, **mods), q, k, v)
        else:
            o, vjp = jax.vjp(lambda q, k, v, s: cj.flash_attention_varlen(
                q, k, v, cu_q, cu_k, MAX_Q, MAX_K, sinks=s, **mods), q, k, v, s)
        return (o, *vjp(do))

    put = lambda x: None if x is None else jax.device_put(x, device)  # noqa: E731
    args = [put(x) for x in (q, k, v, do, np.int32(CU_Q), np.int32(CU_K), sinks)]
    fn = run
    if jit:
        fn = jax.jit(run)
        assert jax_varlen.BACKWARD_TARGET in fn.lower(*args).as_text()
    got = fn(*args)
    assert list(got[0].devices())[0] == device
    label = f"jax varlen {'jit' if jit else 'eager'} {dtype} {sorted(mods)}"
    kw = dict(mods, sinks=sinks)
    o_host = gh.to_host(got[0], dtype)
    o_ref = reference.attention_varlen_reference(q, k, v, CU_Q, CU_K, **kw)[0]
    o_nv = reference.attention_varlen_naive(q, k, v, CU_Q, CU_K, **kw, dtype=np_dtype)
    gh.assert_matches_reference("o", o_host, o_ref, o_nv, dtype=dtype, label=label)
    refs = reference.attention_varlen_backward_reference(do, q, k, v, CU_Q, CU_K, **kw,
                                                         o=o_host)
    naives = reference.attention_varlen_backward_naive(do, q, k, v, CU_Q, CU_K, **kw,
                                                       dtype=np_dtype)
    scale = testing.magnitude(*refs[:3])
    for name, g, ref, naive in zip(("dq", "dk", "dv", "dsinks"), got[1:], refs, naives):
        dsinks = name == "dsinks"
        report = testing.judge(name, gh.to_host(g) if dsinks else gh.to_host(g, dtype), ref,
                               naive, dtype="float32" if dsinks else dtype,
                               scale=testing.magnitude(ref) if dsinks else scale)
        assert report.ok, f"{label}: {report}"

"""The Turing (sm_75) kernels, run on a newer GPU through CUFLASH_FORCE_ARCH=sm_75 (``gpu``).

With the variable set, cuflash plans as on a T4 (64 KB of shared memory, no bfloat16) and
builds each kernel as compute_75 PTX, which the driver JIT-compiles for the GPU present: the
arithmetic is the CF_TURING code of cf_common.cuh (two m16n8k8 per m16n8k16, synchronous
global -> shared copies). Forward and backward, fp16 and fp32, are judged against the float64
reference as in test_gpu_forward.py / test_gpu_backward.py, at 64 KB and at 48 KB.

Kernels already loaded natively by other modules would be reused under the same spec name, so
the module starts from an empty in-process kernel table and puts the old one back after.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import compiler, specs

try:
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu

KIB = specs.KIB
TURING_DTYPES = ("float16", "float32")
# Every bucket; 40 and 136 sit below their bucket; 160 and 224 take Turing's 64-column chunks.
HEAD_DIMS = (32, 40, 64, 96, 128, 136, 160, 192, 224, 256)


def _module_specs():
    """The specs the plans run as on a T4 (the fixture has forced sm_75), budgets 64K and 48K."""
    from cuflash import config, launch

    cfg = config.current()
    out = []
    for kib in (64, 48):
        facts = launch.device_facts(0).with_budget(kib * KIB)
        for dtype in TURING_DTYPES:
            for d in HEAD_DIMS:
                for causal in (False, True):
                    out += gh.planned_specs(facts, cfg, dtype, d, causal)
    return out


PRECOMPILE_FAILURES: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def turing_env():
    """CUFLASH_FORCE_ARCH=sm_75, an empty kernel table, then the usual GPU module setup."""
    saved = dict(compiler._loaded)
    compiler._loaded.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUFLASH_FORCE_ARCH", "sm_75")
        yield from gh.gpu_module_env(_module_specs, PRECOMPILE_FAILURES)
    compiler._loaded.clear()
    compiler._loaded.update(saved)


def test_planned_and_built_as_turing():
    from cupy.cuda.function import Module

    from cuflash import launch

    facts = launch.device_facts(0)
    assert facts.arch == "sm_75", (
        f"launch.device_facts gave {facts.arch}: it must pass its facts through "
        f"specs.usable_facts, which applies CUFLASH_FORCE_ARCH")
    assert facts.smem_optin == 64 * KIB and facts.name.endswith("as sm_75")
    gh.assert_precompiled(PRECOMPILE_FAILURES)
    native = [name for name, k in compiler._loaded.items()
              if k.module is not None and not isinstance(k.module, Module)]
    assert not native, f"loaded natively, not from compute_75 PTX: {native}"


@pytest.mark.parametrize("budget_kib", [64, 48], ids=lambda b: f"smem{b}K")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", TURING_DTYPES, ids=gh.short)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_forward_backward(smem_budget, budget_kib, causal, dtype, head_dim):
    # 131 queries, 141 keys: partial tiles both ways; GQA with 2 query heads per kv head.
    smem_budget(budget_kib)
    rng = gh.rng_for()
    q, k, v = gh.random_qkv(rng, batch=2, seqlen_q=131, seqlen_k=141, heads=2, heads_kv=1,
                            head_dim=head_dim, dtype=dtype)
    do = gh.randn(rng, q.shape, dtype)
    o, stats, o_host, m, l = gh.run_forward(q, k, v, dtype=dtype, causal=causal)
    label = gh.describe(q, k, dtype, causal, None, smem=f"{budget_kib}K", arch="sm_75")
    gh.assert_forward_matches_reference(q, k, v, o_host, m, l, dtype=dtype, causal=causal,
                                        label=label)
    gq, gk, gv, gdo = (gh.to_gpu(x) for x in (q, k, v, do))
    references = gh.backward_references(do, q, k, v, o_host, dtype=dtype, causal=causal)
    for deterministic in (False, True):
        grads = cuflash.attention_backward(gdo, gq, gk, gv, o, stats, causal=causal,
                                           deterministic=deterministic)
        dq, dk, dv = (gh.to_host(g, dtype) for g in grads)
        gh.assert_backward_matches_reference(
            do, q, k, v, o_host, dq, dk, dv, dtype=dtype, causal=causal,
            deterministic=deterministic, label=f"{label} deterministic={deterministic}",
            references=references)


def test_bfloat16_is_refused_with_the_reason():
    q = gh.to_gpu(gh.randn(gh.rng_for(), (1, 16, 2, 64), "bfloat16"))
    with pytest.raises(ValueError, match="bfloat16 needs compute capability 8.0"):
        cuflash.attention_forward(q, q, q)


def test_rows_without_keys_on_turing():
    """Causal, seqlen_q > seqlen_k: the first rows see no key (o = 0, zero gradients)."""
    rng = gh.rng_for()
    q, k, v = gh.random_qkv(rng, batch=1, seqlen_q=70, seqlen_k=20, heads=2, heads_kv=2,
                            head_dim=64, dtype="float16")
    o, stats, o_host, m, l = gh.run_forward(q, k, v, dtype="float16", causal=True)
    assert np.all(o_host[:, :50] == 0) and np.all(np.isneginf(m[:, :, :50]))
    gh.assert_forward_matches_reference(q, k, v, o_host, m, l, dtype="float16", causal=True)

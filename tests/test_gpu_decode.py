"""The CUDA split-KV decode kernels (flash_decode.cu) against the float64 reference (``gpu``).

Outputs start as NaN (CUFLASH_POISON=1 for the module), so an element the kernels do not
write fails. o is judged by ``err <= 2 * err(naive same dtype) + atol``, lse by a float32-tight
relative check (tests/decode_helpers.py), each batch entry against its own valid keys.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import cuflash
from cuflash import decode

try:
    import decode_helpers as dh
except ImportError:  # tests/ collected as a package
    from tests import decode_helpers as dh

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def poison_and_precompile():
    """Outputs poisoned with NaN; every decode spec of the device compiled on a thread pool
    (NVRTC runs outside the GIL) before hypothesis draws them."""
    from cuflash import compiler, launch, specs

    old = os.environ.get("CUFLASH_POISON")
    os.environ["CUFLASH_POISON"] = "1"
    arch = launch.device_facts(0).arch
    work = decode.all_decode_specs(specs.arch_dtypes(arch), arch)
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda s: compiler.get_kernel(s, 0), work))
    yield
    if old is None:
        os.environ.pop("CUFLASH_POISON", None)
    else:
        os.environ["CUFLASH_POISON"] = old


def _dtypes_here():
    from cuflash import launch, specs

    return specs.arch_dtypes(launch.device_facts(0).arch)


def _run(case, framework="cupy", **extra):
    q, k, v, lens = dh.make_inputs(case)
    dev = [dh.to_device(x, framework) for x in (q, k, v)]
    dlens = None if lens is None else dh.to_device(lens, framework)
    o, lse = cuflash.attention_with_kvcache(
        *dev, cache_seqlens=dlens, causal=case["causal"], softmax_scale=case["softmax_scale"],
        num_splits=case["num_splits"], return_softmax_lse=True, **extra)
    dh.assert_decode_matches(dh.to_host(o), dh.to_host(lse), q, k, v, lens,
                             causal=case["causal"], softmax_scale=case["softmax_scale"],
                             dtype=case["dtype"], label=dh.describe(case))
    return o, lse


@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(dh.decode_cases(max_cache=700))
def test_gpu_matches_float64_reference(case):
    if case["dtype"] not in _dtypes_here():
        return
    _run(case)


# Long caches: the automatic split count (several splits on any GPU with more than a few SMs),
# the layouts at small batch, GQA groups of 1, 4 and 8 and q_len 1 and 4.
LONG = [(1, 1, 5000, 8, 8, 128), (2, 1, 4099, 8, 2, 128), (1, 4, 3000, 16, 2, 64),
        (3, 1, 2500, 8, 1, 256), (2, 2, 6001, 4, 4, 64)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("batch, q_len, cache, heads, heads_kv, head_dim", LONG)
def test_gpu_long_caches(batch, q_len, cache, heads, heads_kv, head_dim, causal, dtype):
    if dtype not in _dtypes_here():
        pytest.skip(f"{dtype} not on this GPU")
    rng = np.random.default_rng()
    lens = [int(x) for x in rng.integers(0, cache + 1, batch)]
    lens[0] = cache  # one full entry
    case = dict(batch=batch, q_len=q_len, heads=heads, heads_kv=heads_kv, head_dim=head_dim,
                seqlen_cache=cache, cache_seqlens=lens, causal=causal, dtype=dtype,
                num_splits=None, softmax_scale=None, seed=int(rng.integers(2**32)))
    _run(case)


# The tensor-core split (flash_decode_mma.cu): 16-bit rows from 3 to 128 per kv head (bands
# of 16, one to four per warp set; 128 rows take two row tiles), every head_dim bucket,
# lengths that are not multiples of the 64-key tiles, the automatic split count.
MMA_ROWS = [(3, 1), (1, 4), (2, 4), (4, 4), (8, 4), (1, 32), (3, 8), (8, 8), (8, 16)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("head_dim", [32, 64, 72, 128, 256])
@pytest.mark.parametrize("q_len, group", MMA_ROWS, ids=[f"q{q}g{g}" for q, g in MMA_ROWS])
def test_gpu_tensor_core_rows(q_len, group, head_dim, dtype):
    if dtype not in _dtypes_here():
        pytest.skip(f"{dtype} not on this GPU")
    rng = np.random.default_rng()
    heads_kv = 2
    case = dict(batch=2, q_len=q_len, heads=heads_kv * group, heads_kv=heads_kv,
                head_dim=head_dim, seqlen_cache=3001, cache_seqlens=[3001, 77], causal=True,
                dtype=dtype, num_splits=None, softmax_scale=None,
                seed=int(rng.integers(2**32)))
    shape = decode.DecodeShape(2, q_len, 3001, heads_kv * group, heads_kv, head_dim, dtype)
    plan = decode.decode_plan(shape, None, 0)
    assert isinstance(plan.spec, decode.DecodeMmaSpec), plan.spec.name
    _run(case)
    _run(dict(case, causal=False, num_splits=1, cache_seqlens=None))  # no combine


def test_gpu_tensor_core_and_simt_agree():
    """One problem on both split kernels (the SIMT spec pinned in the plan): the same rows
    within the rounding of P to 16 bits."""
    from cuflash import fastpath, launch

    torch = pytest.importorskip("torch")
    dtype = "bfloat16" if "bfloat16" in _dtypes_here() else "float16"
    case = dict(batch=2, q_len=2, heads=16, heads_kv=4, head_dim=128, seqlen_cache=2000,
                cache_seqlens=None, causal=True, dtype=dtype, num_splits=None,
                softmax_scale=None, seed=21)
    q, k, v, _ = dh.make_inputs(case)
    tq, tk, tv = (dh.to_device(x, "torch") for x in (q, k, v))
    backend = fastpath.torch_backend()
    flags = dict(causal=True, softmax_scale=None, window=None, softcap=None, num_splits=None)
    problem = decode._problem(backend, tq, tk, tv, {}, flags)
    sms = launch.device_facts(0).sm_count
    outs = []
    for spec in (decode.select_decode(dtype, 128, 8), decode.DecodeSpec(dtype, 128, 8, 1, 2)):
        plan = decode.plan_decode(problem.shape, sms, spec=spec)
        o = torch.full_like(tq, float("nan"))
        lse = torch.full((2, 16, 2), float("nan"), dtype=torch.float32, device="cuda")
        work = torch.empty(max(plan.workspace_bytes, 1), dtype=torch.uint8, device="cuda")
        ops = decode._operands(backend, tq, tk, tv, {}, o, lse, problem.shape)
        decode.run_decode(plan, problem, ops, work.data_ptr(), backend.stream(), 0)
        torch.cuda.synchronize()
        dh.assert_decode_matches(dh.to_host(o), dh.to_host(lse), q, k, v, None, causal=True,
                                 softmax_scale=None, dtype=dtype, label=spec.name)
        outs.append(o.float())
    assert float((outs[0] - outs[1]).abs().max()) <= 2e-2


def test_gpu_splits_agree_and_plan_splits():
    case = dict(batch=1, q_len=2, heads=8, heads_kv=2, head_dim=128, seqlen_cache=8000,
                cache_seqlens=None, causal=True, dtype="float32", num_splits=1,
                softmax_scale=None, seed=3)
    o1, l1 = _run(case)
    plan = decode.decode_plan(decode.DecodeShape(1, 2, 8000, 8, 2, 128, "float32"), None, 0)
    assert plan.num_splits > 1, plan  # the automatic plan splits this one
    for n in (None, 3, 64):
        o, lse = _run(dict(case, num_splits=n))
        np.testing.assert_allclose(dh.to_host(o), dh.to_host(o1), atol=2e-6, rtol=0)
        np.testing.assert_allclose(dh.to_host(lse), dh.to_host(l1), rtol=2e-6, atol=0)


def test_gpu_strided_views():
    """A (batch, heads, seq, dim) cache passed as .transpose(1, 2) is read in place."""
    cupy = pytest.importorskip("cupy")
    case = dict(batch=2, q_len=3, heads=4, heads_kv=2, head_dim=64, seqlen_cache=900,
                cache_seqlens=[900, 17], causal=True, dtype="float16", num_splits=None,
                softmax_scale=None, seed=5)
    q, k, v, lens = dh.make_inputs(case)
    gk = cupy.asarray(np.ascontiguousarray(k.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
    gv = cupy.asarray(np.ascontiguousarray(v.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
    o, lse = cuflash.attention_with_kvcache(cupy.asarray(q), gk, gv,
                                            cache_seqlens=cupy.asarray(lens), causal=True,
                                            return_softmax_lse=True)
    dh.assert_decode_matches(cupy.asnumpy(o), cupy.asnumpy(lse), q, k, v, lens, causal=True,
                             softmax_scale=None, dtype="float16", label="strided")


def captured(torch, call):
    """(graph, its outputs): ``call`` warmed up on a side stream (compile, plan, layouts off
    the capture), then captured once in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    return graph, out


def test_gpu_torch_and_cuda_graph():
    """torch tensors: torch's allocator and stream, no host sync: capturable in a graph."""
    torch = pytest.importorskip("torch")
    dtype = "bfloat16" if "bfloat16" in _dtypes_here() else "float16"
    case = dict(batch=4, q_len=1, heads=16, heads_kv=4, head_dim=128, seqlen_cache=4096,
                cache_seqlens=[4096, 1000, 1, 0], causal=True, dtype=dtype, num_splits=None,
                softmax_scale=None, seed=7)
    _run(case, "torch")  # eager, against the reference
    q, k, v, lens = dh.make_inputs(case)
    tq, tk, tv, tl = (dh.to_device(x, "torch") for x in (q, k, v, lens))
    graph, (o_graph, lse_graph) = captured(torch, lambda: cuflash.attention_with_kvcache(
        tq, tk, tv, cache_seqlens=tl, causal=True, return_softmax_lse=True))
    q2, _, _, _ = dh.make_inputs(dict(case, seed=8))
    tq.copy_(dh.to_device(q2, "torch"))
    tl.copy_(torch.tensor([10, 4096, 300, 2], dtype=torch.int32, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    lens2 = np.array([10, 4096, 300, 2], np.int32)
    dh.assert_decode_matches(dh.to_host(o_graph), dh.to_host(lse_graph), q2, k, v, lens2,
                             causal=True, softmax_scale=None, dtype=dtype, label="graph replay")


def test_gpu_jax_through_dlpack():
    jax = pytest.importorskip("jax")
    try:
        device = jax.devices("gpu")[0]
    except Exception as exc:
        pytest.skip(f"JAX has no GPU backend here ({exc})")
    case = dict(batch=2, q_len=1, heads=8, heads_kv=2, head_dim=64, seqlen_cache=1500,
                cache_seqlens=[1500, 700], causal=False, dtype="float32", num_splits=None,
                softmax_scale=None, seed=9)
    q, k, v, lens = dh.make_inputs(case)
    o, lse = cuflash.attention_with_kvcache(
        *(jax.device_put(x, device) for x in (q, k, v)),
        cache_seqlens=jax.device_put(lens, device), return_softmax_lse=True)
    dh.assert_decode_matches(np.asarray(o), np.asarray(lse), q, k, v, lens, causal=False,
                             softmax_scale=None, dtype="float32", label="jax")


# -- paged caches, in-place append, window / softcap / ALiBi on the kernels ---------------------


def _run_kvcache(case, framework="cupy"):
    """attention_with_kvcache on device copies of make_kvcache_inputs; checks o, lse and,
    with an append, that the device caches hold the new keys (and nothing else changed)."""
    kw, truth = dh.make_kvcache_inputs(case)
    dev = {n: (dh.to_device(x, framework) if isinstance(x, np.ndarray) else x)
           for n, x in kw.items()}
    o, lse = cuflash.attention_with_kvcache(
        **dev, causal=case["causal"], softmax_scale=case["softmax_scale"],
        num_splits=case["num_splits"], return_softmax_lse=True)
    mods = {n: truth[n] for n in ("window", "softcap", "alibi_slopes") if n in truth}
    dh.assert_decode_matches(dh.to_host(o), dh.to_host(lse), kw["q"], truth["k"], truth["v"],
                             truth["lens"], causal=case["causal"],
                             softmax_scale=case["softmax_scale"], dtype=case["dtype"],
                             label=dh.describe(case), **mods)
    if case.get("seqlen_new"):
        table = kw.get("block_table")
        for name, want in (("k_cache", truth["k"]), ("v_cache", truth["v"])):
            got = dh.logical(dh.to_host(dev[name]), table)
            for b, n in enumerate(truth["lens"]):  # every valid position, appended ones included
                np.testing.assert_array_equal(got[b, :n], want[b, :n], err_msg=name)
    return o, lse


@settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(dh.kvcache_cases(max_cache=600))
def test_gpu_kvcache_features_match_float64_reference(case):
    if case["dtype"] not in _dtypes_here():
        return
    _run_kvcache(case)


# Long paged caches with the automatic split count, every page size the docs promise.
@pytest.mark.parametrize("page_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("heads, heads_kv, q_len", [(8, 8, 1), (8, 2, 1), (8, 2, 3),
                                                   (16, 2, 8), (32, 1, 2)])
def test_gpu_paged_long_caches(page_size, heads, heads_kv, q_len):
    dtype = "bfloat16" if "bfloat16" in _dtypes_here() else "float16"
    rng = np.random.default_rng()
    case = dict(batch=3, q_len=q_len, heads=heads, heads_kv=heads_kv, head_dim=128,
                seqlen_cache=5000, cache_seqlens=[4998, int(rng.integers(0, 4998)), 1],
                causal=True, dtype=dtype, num_splits=None, softmax_scale=None,
                seed=int(rng.integers(2**32)), page_size=page_size, seqlen_new=2,
                window=None, softcap=None, alibi=None)
    _run_kvcache(case)


@pytest.mark.parametrize("mods", [dict(window=(300, 0)), dict(window=(-1, 5)),
                                  dict(softcap=30.0), dict(alibi="batch_heads"),
                                  dict(window=(1000, 0), softcap=5.0, alibi="heads")],
                         ids=["window-left", "window-right", "softcap", "alibi", "all"])
@pytest.mark.parametrize("q_len, heads", [(1, 4), (2, 16), (8, 32)],
                         ids=["simt", "mma16", "mma64"])  # rows 1, 8, 64 per kv head
def test_gpu_modifiers_on_long_caches(mods, q_len, heads):
    dtype = "bfloat16" if "bfloat16" in _dtypes_here() else "float16"
    case = dict(batch=2, q_len=q_len, heads=heads, heads_kv=4, head_dim=128,
                seqlen_cache=6000, cache_seqlens=[6000, 2500], causal=True, dtype=dtype,
                num_splits=None, softmax_scale=None, seed=11, page_size=None, seqlen_new=0,
                window=None, softcap=None, alibi=None)
    case.update(mods)
    _run_kvcache(case)


def test_gpu_torch_graph_with_append_and_pages():
    """A decode step as a serving loop runs it: append one token into a paged cache, attend,
    captured once in a CUDA graph and replayed with new q, k_new, v_new and lengths."""
    torch = pytest.importorskip("torch")
    dtype = "bfloat16" if "bfloat16" in _dtypes_here() else "float16"
    case = dict(batch=3, q_len=1, heads=16, heads_kv=4, head_dim=128, seqlen_cache=3000,
                cache_seqlens=[2000, 10, 0], causal=True, dtype=dtype, num_splits=None,
                softmax_scale=None, seed=12, page_size=64, seqlen_new=1, window=None,
                softcap=None, alibi=None)
    kw, _ = dh.make_kvcache_inputs(case)
    dev = {n: dh.to_device(x, "torch") for n, x in kw.items() if isinstance(x, np.ndarray)}
    call = lambda: cuflash.attention_with_kvcache(**dev, causal=True, return_softmax_lse=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compile, plan, layouts) off the capture
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph, lse_graph = call()
    # -- a new step: new inputs copied into the captured buffers, then one replay
    k_pages, v_pages = (dh.to_host(dev[n]) for n in ("k_cache", "v_cache"))
    rng = np.random.default_rng(13)
    step = {n: rng.standard_normal(kw[n].shape, np.float32).astype(kw[n].dtype)
            for n in ("q", "k_new", "v_new")}
    lens = np.array([2001, 2999, 5], np.int32)
    for n, x in step.items():
        dev[n].copy_(dh.to_device(x, "torch"))
    dev["cache_seqlens"].copy_(dh.to_device(lens, "torch"))
    graph.replay()
    torch.cuda.synchronize()
    table = kw["block_table"]
    want_k, want_v = dh.logical(k_pages, table).copy(), dh.logical(v_pages, table).copy()
    for b, n in enumerate(lens):
        want_k[b, n], want_v[b, n] = step["k_new"][b, 0], step["v_new"][b, 0]
    dh.assert_decode_matches(dh.to_host(o_graph), dh.to_host(lse_graph), step["q"], want_k,
                             want_v, lens + 1, causal=True, softmax_scale=None, dtype=dtype,
                             label="graph replay, paged append")


def test_gpu_torch_compiled_adapter():
    """cuflash.torch.attention_with_kvcache traced by torch.compile (fullgraph) on CUDA
    tensors: the mutating operator appends into the device caches."""
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    dtype = "bfloat16" if "bfloat16" in _dtypes_here() else "float16"
    case = dict(batch=2, q_len=2, heads=8, heads_kv=2, head_dim=64, seqlen_cache=1000,
                cache_seqlens=None, causal=True, dtype=dtype, num_splits=None,
                softmax_scale=None, seed=14, page_size=32, seqlen_new=2, window=None,
                softcap=None, alibi=None)
    case["cache_seqlens"] = [500, 998]
    kw, truth = dh.make_kvcache_inputs(case)
    t = {n: dh.to_device(x, "torch") for n, x in kw.items() if isinstance(x, np.ndarray)}
    step = torch.compile(lambda **a: ct.attention_with_kvcache(**a, causal=True,
                                                               return_softmax_lse=True),
                         fullgraph=True)
    o, lse = step(**t)
    dh.assert_decode_matches(dh.to_host(o), dh.to_host(lse), kw["q"], truth["k"], truth["v"],
                             truth["lens"], causal=True, softmax_scale=None, dtype=dtype,
                             label="torch.compile")
    got = dh.logical(dh.to_host(t["k_cache"]), kw["block_table"])
    for b, n in enumerate(truth["lens"]):
        np.testing.assert_array_equal(got[b, :n], truth["k"][b, :n])

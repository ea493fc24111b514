"""The warp-specialized Hopper forward loading Q, K and V with bulk tensor copies
(``CF_FWD_TMA=1``, specs.with_forward_tma; selected at head_dim 64 / 128 since session 30,
registry.FWD90_TMA), and the backward loading K, V, Q and dO so (``CF_BWD_TMA=1``, a
candidate: registry.BWD90_TMA), against the float64 reference (``gpu``). The forward:
head_dim 64 and 128 and widths inside those buckets (the boxes' columns past head_dim land
as zeros), every score modifier of test_gpu_modifiers, lengths that are not multiples of a
tile (rows past a sequence land as zeros), one block per tile, persistent blocks and the
pipeline across tiles, heads-first storage, block masks, and k / v broadcast over the batch
(which the copy engine cannot box: the cp.async tile runs). m and l too. The host side is
tests/test_tma_host.py, the plans these tests assert tests/test_tma_plans.py; times:
``gpu_suite.sh fwd_tma``.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import plan, reference, specs

try:
    import gpu_helpers as gh
    import test_gpu_block_sparse as sparse_tests
    import test_gpu_modifiers as mods_tests
except ImportError:  # tests/ collected as a package
    from tests import gpu_helpers as gh
    from tests import test_gpu_block_sparse as sparse_tests
    from tests import test_gpu_modifiers as mods_tests

pytestmark = pytest.mark.gpu

PLAIN = [("plain", False, None, None, None, False), ("plain+causal", True, None, None, None,
                                                      False)]
CASES = PLAIN + mods_tests.CASES
LENGTHS = [(131, 131), (257, 1029)]
# the loop as selected (one block per tile or persistent), and the pipeline across tiles
LOOPS = ("selected", "across")


def _tma(spec, loop, facts):
    if loop == "across":
        across = specs.with_forward_across_tiles(spec, facts)
        spec = across if across is not None else spec
    return specs.with_forward_tma(spec) or spec


def _forward_dtype(head_dim: int, seqlen_q: int) -> str:
    """test_forward_matches_reference's dtype (both, over the head_dims and lengths)."""
    return "bfloat16" if (head_dim + seqlen_q) % 3 else "float16"


def _module_specs():
    """What the tests below run, compiled ahead: not every dtype of every case (301 specs,
    which every xdist worker compiled before its first test; the file did not finish in a
    330-s GPU call, session 29)."""
    from cuflash import launch

    facts = launch.device_facts(0)
    if facts.arch != "sm_90":
        return []

    def forward(dtype, d, case):
        return specs.select_forward(facts, dtype, d, case[1], mods=mods_tests._flags(case))

    out = []
    for loop in LOOPS:
        for d in (64, 128):
            dtypes = {_forward_dtype(d, n) for n, _ in LENGTHS}
            out += [_tma(forward(t, d, c), loop, facts) for c in CASES for t in dtypes]
            out += [_tma(forward("bfloat16", d, c), loop, facts) for c in PLAIN]  # widths
            out += [_tma(forward("float16", d, PLAIN[1]), loop, facts)]  # heads-first
    # the backward tests: d64 bf16 every case, d128 plain / causal / all in both dtypes, both
    # deterministic modes, with the selected (cp.async) forward before them
    for d, dtypes, cases in ((64, ("bfloat16",), CASES),
                             (128, ("float16", "bfloat16"), D128_BACKWARD_CASES)):
        for dtype in dtypes:
            for case in cases:
                out.append(forward(dtype, d, case))
                for deterministic in (False, True):
                    back = specs.select_backward(facts, dtype, d, case[1], deterministic,
                                                 mods=mods_tests._flags(case))
                    out.append(specs.with_backward_tma(back) or back)
    for case in D256_CASES:
        spec = specs.select_forward(facts, "bfloat16", 256, case[1],
                                    mods=mods_tests._flags(case))
        out += [_ws_d256(spec, n, boxed) for n, boxed in D256_TILES]
    for case in CLUSTER_CASES:
        for d in (128, 256):
            spec = specs.select_forward(facts, "bfloat16", d, False, mods=mods_tests._flags(case))
            spec = _ws_d256(spec, 80, False) if d == 256 else spec
            paired = specs.with_forward_cluster(spec)
            out += [paired, specs.without_tma(paired)]  # and the unpaired fallback
    return out


gpu_env, test_module_specs_compile = gh.module_setup(_module_specs)


@pytest.fixture(params=LOOPS)
def tma(request):
    import cupy

    from cuflash import launch

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("a Hopper forward's loads")
    facts = launch.device_facts(0)
    for _ in gh.selector_with_knob("select_forward",
                                   lambda spec: _tma(spec, request.param, facts)):
        yield request.param


def _assert_planned_with_tma(seqlen_q, seqlen_k, head_dim, dtype, causal, flags=specs.NO_MODS):
    from cuflash import launch

    p = launch.forward_plan(plan.Shape(2, seqlen_q, seqlen_k, 6, 2, head_dim, dtype, causal,
                                       flags), 0)
    assert specs.loads_with_tma(p.kernel.spec), p.kernel.spec.name


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(tma, case, head_dim, seqlen_q, seqlen_k):
    dtype = _forward_dtype(head_dim, seqlen_q)
    _assert_planned_with_tma(seqlen_q, seqlen_k, head_dim, dtype, case[1],
                             mods_tests._flags(case))
    mods_tests.check_forward(case, dtype, seqlen_q, seqlen_k, head_dim, f"tma {tma}")


# widths of the warp-specialized buckets 64 and 128 (72 and 96 take the d96 bucket, which
# runs the 8-warp kernel: no TMA there; these were session 29's eight failures)
WIDTHS = [40, 56, 104, 120]


@pytest.mark.parametrize("head_dim", WIDTHS)
@pytest.mark.parametrize("causal", [False, True])
def test_widths_inside_a_bucket(tma, head_dim, causal):
    """Columns head_dim .. the bucket's end lie outside the map: zeros, as cp.async fills."""
    _assert_planned_with_tma(200, 333, head_dim, "bfloat16", causal)
    mods_tests.check_forward(PLAIN[int(causal)], "bfloat16", 200, 333, head_dim,
                             f"tma {tma}")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_heads_first_storage(tma, head_dim):
    """(batch, heads, seqlen, head_dim) storage read in place: the map's row stride is
    head_dim, its head stride seqlen * head_dim."""
    rng = gh.rng_for()
    q, k, v = gh.random_qkv(rng, batch=2, seqlen_q=190, seqlen_k=260, heads=4, heads_kv=2,
                            head_dim=head_dim, dtype="float16")
    _, _, o, m, l = gh.run_forward(q, k, v, dtype="float16", causal=True, heads_first=True)
    label = f"tma {tma} heads-first " + gh.describe(q, k, "float16", True, None)
    gh.assert_forward_matches_reference(q, k, v, o, m, l, dtype="float16", causal=True,
                                        label=label)


def test_kv_broadcast_over_the_batch_runs_the_cp_async_tile(tma):
    """k and v of stride 0 over the batch: no map can box them, the cp.async tile runs, and
    the result is the reference's."""
    import cupy

    rng = gh.rng_for()
    q, k, v = gh.random_qkv(rng, batch=3, seqlen_q=150, seqlen_k=210, heads=4, heads_kv=4,
                            head_dim=128, dtype="bfloat16")
    k[1:], v[1:] = k[0], v[0]
    gk, gv = (cupy.broadcast_to(gh.to_gpu(x[:1]), x.shape) for x in (k, v))
    o, stats = cuflash.attention_forward(gh.to_gpu(q), gk, gv)
    o_ref, m_ref, l_ref = reference.attention_reference(q, k, v)
    o_nv = reference.attention_naive(q, k, v, dtype=gh.np_dtype("bfloat16"))
    gh.assert_matches_reference("o", gh.to_host(o, "bfloat16"), o_ref, o_nv, dtype="bfloat16",
                                label="tma broadcast k / v")
    gh.assert_stats_match("m", gh.to_host(stats.m), m_ref, dtype="bfloat16",
                          label="tma broadcast k / v")


@pytest.mark.parametrize("case", [sparse_tests.CASES[1], sparse_tests.CASES[4]],
                         ids=[sparse_tests.CASES[1][0], sparse_tests.CASES[4][0]])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_block_masks(tma, case, head_dim):
    """The producer's tile cursor under a block mask boxes only the kept key tiles."""
    if tma == "across":
        pytest.skip("the pipeline across tiles takes every key tile (no block mask)")
    sparse_tests._check("own", case, "bfloat16", 389, 777, head_dim)


# -- head_dim 256 on the warp-specialized forward (candidates: FlashAttention-3's 128 x 80 tile,
# and 128 x 64), with and without TMA; the selection runs the 8-warp kernel there -----------

D256_TILES = [(64, False), (64, True), (80, False), (80, True)]
D256_CASES = PLAIN + [c for c in mods_tests.CASES if c[0] in ("window+causal", "softcap",
                                                               "alibi_batch", "sinks+window",
                                                               "all")]


def _ws_d256(spec, block_n, boxed):
    from dataclasses import replace

    if spec.kind != "fwd90" or spec.head_dim != 256:
        return spec
    ws = replace(spec, block_m=128, block_n=block_n, warps=12, stages=2, knobs=())
    return (specs.with_forward_tma(ws) or ws) if boxed else ws


@pytest.fixture(params=D256_TILES, ids=lambda t: f"n{t[0]}{'_tma' if t[1] else ''}")
def ws_d256(request):
    import cupy

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("a Hopper forward's tile")
    for _ in gh.selector_with_knob("select_forward",
                                   lambda spec: _ws_d256(spec, *request.param)):
        yield request.param


def _assert_d256_tile(case, seqlen_q, seqlen_k, block_n, boxed):
    from cuflash import launch

    p = launch.forward_plan(plan.Shape(2, seqlen_q, seqlen_k, 6, 2, 256, "bfloat16", case[1],
                                       mods_tests._flags(case)), 0)
    assert (p.kernel.spec.warps, p.kernel.spec.block_n) == (12, block_n), p.kernel.spec.name
    assert specs.loads_with_tma(p.kernel.spec) == boxed, p.kernel.spec.name


@pytest.mark.parametrize("seqlen_q, seqlen_k", LENGTHS)
@pytest.mark.parametrize("case", D256_CASES, ids=[c[0] for c in D256_CASES])
def test_d256_warp_specialized_forward(ws_d256, case, seqlen_q, seqlen_k):
    block_n, boxed = ws_d256
    _assert_d256_tile(case, seqlen_q, seqlen_k, block_n, boxed)
    mods_tests.check_forward(case, "bfloat16", seqlen_q, seqlen_k, 256,
                             f"d256 ws n{block_n} tma={boxed}")


# -- clusters of two sharing K / V boxes (CF_FWD_CLUSTER=2, specs.with_forward_cluster) ----------

CLUSTER_CASES = PLAIN[:1] + [c for c in mods_tests.CASES if c[0] in ("softcap", "alibi_batch",
                                                                       "sinks")]
# even numbers of 128-row query tiles (a pair per two); 131 rows leave most of the second
# tile past the sequence
CLUSTER_LENGTHS = [(131, 131), (256, 1029), (500, 333)]


@pytest.fixture(params=[128, 256], ids=lambda d: f"d{d}")
def cluster(request):
    import cupy

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("a Hopper forward's clusters")
    for _ in gh.selector_with_knob("select_forward", _cluster_knob):
        yield request.param


def _cluster_knob(spec):
    if spec.kind == "fwd90" and spec.head_dim == 256:
        spec = _ws_d256(spec, 80, False)
    return specs.with_forward_cluster(spec) or spec


def _assert_paired(case, seqlen_q, seqlen_k, head_dim):
    from cuflash import launch

    p = launch.forward_plan(plan.Shape(2, seqlen_q, seqlen_k, 6, 2, head_dim, "bfloat16", False,
                                       mods_tests._flags(case)), 0)
    assert specs.clustered(p.kernel.spec) and p.kernel.grid[0] % 2 == 0, p.kernel.spec.name


@pytest.mark.parametrize("seqlen_q, seqlen_k", CLUSTER_LENGTHS)
@pytest.mark.parametrize("case", CLUSTER_CASES, ids=[c[0] for c in CLUSTER_CASES])
def test_cluster_forward_matches_reference(cluster, case, seqlen_q, seqlen_k):
    _assert_paired(case, seqlen_q, seqlen_k, cluster)
    mods_tests.check_forward(case, "bfloat16", seqlen_q, seqlen_k, cluster,
                             f"cluster d{cluster}")


def test_cluster_with_an_odd_number_of_tiles_runs_unpaired(cluster):
    """Three query tiles cannot pair: the tile runs without TMA or clusters, correctly."""
    mods_tests.check_forward(PLAIN[0], "float16", 300, 400, cluster, "cluster, odd tiles")


# -- the backward (CF_BWD_TMA: K, V, Q and dO boxed; specs.with_backward_tma) ----------------


@pytest.fixture
def tma_bwd():
    import cupy

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("a Hopper backward's loads")
    for _ in gh.selector_with_knob("select_backward",
                                   lambda spec: specs.with_backward_tma(spec) or spec):
        yield


def _assert_backward_planned_with_tma(head_dim, dtype, causal, flags, deterministic):
    from cuflash import launch

    p = launch.backward_plan(plan.Shape(2, 300, 300, 6, 2, head_dim, dtype, causal, flags), 0,
                             deterministic)
    assert specs.loads_with_tma(p.main.spec), p.main.spec.name


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(131, 131), (257, 500)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_reference_d64(tma_bwd, case, seqlen_q, seqlen_k):
    """test_gpu_modifiers' forward + backward check (both deterministic modes) at head_dim 64
    with the TMA backward: every modifier, GQA 6 / 2. (The ordered d64 backward, causal or
    windowed, keeps cp.async: specs.with_backward_tma.)"""
    _assert_backward_planned_with_tma(64, "bfloat16", case[1], mods_tests._flags(case), False)
    mods_tests.test_forward_and_backward_match_reference("tma", case, "bfloat16", seqlen_q,
                                                         seqlen_k)


def _d128_boxed_mode(case) -> bool:
    """The deterministic mode whose plan must box: both modes run, but the deterministic one
    with a window asserts nothing (its ordered-dQ kernel boxes under this file's fixture; the
    selection keeps cp.async there, registry.BWD90_TMA), so there the atomic."""
    return case[2] is None


D128_BACKWARD_CASES = PLAIN + [mods_tests.CASES[-1]]


@pytest.mark.parametrize("case", D128_BACKWARD_CASES, ids=[c[0] for c in D128_BACKWARD_CASES])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_backward_matches_reference_d128(tma_bwd, case, dtype):
    rng = gh.rng_for()
    q, k, v, do, causal, mods = mods_tests._inputs(rng, case, dtype, 203, 389, head_dim=128)
    _assert_backward_planned_with_tma(128, dtype, causal, mods_tests._flags(case),
                                      _d128_boxed_mode(case))
    gh.assert_call_matches_reference(q, k, v, do, causal=causal, dtype=dtype,
                                     label=f"tma bwd {case[0]} d128 {dtype}",
                                     host_kwargs=mods, gpu_kwargs=mods_tests._on_gpu(mods))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_backward_block_masks(tma_bwd, head_dim):
    """The producer's walk under a block mask boxes only the kept query tiles."""
    sparse_tests._check("own", sparse_tests.CASES[0], "bfloat16", 389, 777, head_dim)


# -- the map and the swizzle alone: one tile through the copy engine, shared memory read out --

_PROBE = r"""
#include "cf_common.cuh"
#include "cf_sm90.cuh"
// One PROBE_ROWS x (64 * PROBE_PANELS) tile of `map` at (row0, head, batch) into shared
// memory by TMA (its mbarrier after it), then the tile's bytes, as they lie, to `out`.
extern "C" __global__ void tma_probe(unsigned char* out, int row0, int head, int batch,
                                     const __grid_constant__ cf_tensor_map map) {
  extern __shared__ __align__(1024) unsigned char smem[];
  sm90_require_aligned(smem);
  const cf_u32 b = smem_addr(smem + PROBE_ROWS * 128 * PROBE_PANELS);
  if (threadIdx.x == 0) {
    mbar_init(b, 1);
    mbar_fence_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbar_arrive_expect_tx(b, PROBE_ROWS * 128 * PROBE_PANELS);
    tma_load_tile<PROBE_ROWS, PROBE_PANELS>(smem_addr(smem), &map, row0, head, batch, b);
  }
  mbar_wait(b, 0);
  for (int i = threadIdx.x; i < PROBE_ROWS * 128 * PROBE_PANELS; i += blockDim.x) out[i] = smem[i];
}
"""


def _expected_panels(x: np.ndarray, rows: int, panels: int, row0: int, head: int,
                     batch: int) -> np.ndarray:
    """The panel layout (cf_sm90.cuh) of x[batch, row0 .. + rows, head, 0 .. 64 * panels]
    as uint16, elements outside x zero: row r of panel p at (p * rows + r) * 64 elements,
    its 8-element chunk c at chunk c ^ (r % 8)."""
    out = np.zeros(panels * rows * 64, np.uint16)
    seqlen, head_dim = x.shape[1], x.shape[3]
    for p in range(panels):
        for r in range(rows):
            if row0 + r >= seqlen:
                continue
            for c in range(8):
                col = 64 * p + 8 * c
                chunk = x[batch, row0 + r, head, col:min(col + 8, head_dim)]
                at = (p * rows + r) * 64 + 8 * (c ^ (r % 8))
                out[at:at + len(chunk)] = chunk
    return out


@pytest.mark.parametrize("rows, head_dim, seqlen, row0, heads_first", [
    (128, 128, 300, 128, False),
    (64, 64, 100, 64, False),     # rows 100 .. 127 past the sequence: zeros
    (192, 64, 500, 192, True),    # heads-first storage
    (128, 96, 200, 0, False),     # columns 96 .. 127 past head_dim: zeros
])
def test_box_lands_in_the_panel_layout(rows, head_dim, seqlen, row0, heads_first):
    """tensor_map's map of a (batch, seqlen, heads, head_dim) array and tma_load_tile land
    the tile exactly where the wgmma kernels' panel layout puts each element."""
    import cupy

    from cuflash import launch, tensor_map
    from cuflash.compiler import kernels_dir

    if cupy.cuda.Device(0).compute_capability != "90":
        pytest.skip("the copy engine's tensor maps need compute capability 9.0")
    panels = -(-head_dim // 64)
    batch, heads = 2, 3
    host = gh.rng_for().integers(1, 1 << 15, (batch, seqlen, heads, head_dim), np.uint16)
    dev = (cupy.asarray(host.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) if heads_first
           else cupy.asarray(host))
    module = cupy.RawModule(code=_PROBE, options=(
        "--std=c++17", f"-I{kernels_dir()}", "-DCF_DTYPE=1", f"-DPROBE_ROWS={rows}",
        f"-DPROBE_PANELS={panels}"))
    fn = module.get_function("tma_probe")
    tile = rows * 128 * panels
    fn.max_dynamic_shared_size_bytes = tile + 8
    out = cupy.full(tile, 0xAB, cupy.uint8)  # poisoned: every byte must be written
    strides = tuple(s // 2 for s in dev.strides[:3])
    tmap = tensor_map.tile_map(dev.data.ptr, "bfloat16", head_dim, seqlen, heads, batch,
                               strides, rows)
    launch.launch_function(fn.kernel.ptr if hasattr(fn, "kernel") else fn.ptr, (1, 1, 1), 128,
                           tile + 8, "piiiT", (out.data.ptr, row0, 2, 1, tmap), 0,
                           lambda: "tma_probe")
    cupy.cuda.Device().synchronize()
    got = cupy.asnumpy(out).view(np.uint16)
    want = _expected_panels(host, rows, panels, row0, 2, 1)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (f"{bad.size} of {got.size} elements misplaced; first at element "
                           f"{bad[0]}: got {got[bad[0]]:#x}, expected {want[bad[0]]:#x}")

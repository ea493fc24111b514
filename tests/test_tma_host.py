"""The host side of the TMA forward (CF_FWD_TMA, cuflash/tensor_map.py) on the CPU: the maps'
arguments for each layout, the parameter buffer's alignment, and the fast path's replays,
which make each call's maps from its own addresses. The driver's encoder is replaced by a
stand-in that writes its arguments into the 128 bytes, so a map that names the wrong array,
stride or box shows up as different bytes. (tests/test_gpu_tma.py runs the kernel.)"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from cuflash import fastpath, launch, specs, tensor_map, validate
from cuflash import plan as planning
from host_backend import NumpyBackend
from test_attention_host_path import _H200, _STREAM, _as_captured, _clear_memos, _inputs, \
    _operand, _patch_device


@pytest.fixture
def tma_device(monkeypatch):
    """The captured device of the host-path tests, the selector patched to the TMA forward
    (where it exists), and the driver's encoder replaced (``_patch_device``'s fake)."""
    captured, facts = [], {"facts": _H200}
    _patch_device(monkeypatch, captured, facts)
    plain = specs.select_forward
    monkeypatch.setattr(specs, "select_forward",
                        lambda *a, **k: specs.with_forward_tma(plain(*a, **k)) or plain(*a, **k))
    yield captured
    _clear_memos()


# -- the maps' arguments ------------------------------------------------------------------


def test_tile_map_of_a_contiguous_array():
    """(batch 2, 100 rows, 8 heads, head_dim 96), float16, boxes of 128 rows."""
    m = tensor_map.tile_map(4096, "float16", 96, 100, 8, 2, (100 * 8 * 96, 8 * 96, 96), 128)
    assert m.dims == (96, 100, 8, 2)
    assert m.strides == (8 * 96 * 2, 96 * 2, 100 * 8 * 96 * 2)  # rows, heads, batch: bytes
    assert m.box == (64, 128, 1, 1)
    assert tensor_map.layout_problem(m.dtype, m.dims, m.strides, m.box) is None


def test_tile_map_of_one_element_axes_takes_a_legal_stride():
    """A batch or head axis of one element may carry any stride (the validation allows
    it): the map gives it 16 bytes, never reads it."""
    m = tensor_map.tile_map(0, "bfloat16", 64, 300, 1, 1, (7, 64, 3), 64)
    assert m.strides == (128, 16, 16)
    assert tensor_map.layout_problem(m.dtype, m.dims, m.strides, m.box) is None


@pytest.mark.parametrize("dims, strides, box, why", [
    ((64, 10, 4, 2), (128, 0, 1280), (64, 64, 1, 1), "broadcast"),
    ((64, 10, 4, 2), (136, 128, 1280), (64, 64, 1, 1), "multiple of 16"),
    ((64, 10, 4, 2), (128, 128, 1280), (64, 257, 1, 1), "256"),
    ((64, 10, 4, 2), (128, 128, 1280), (32, 64, 1, 1), "64 two-byte columns"),
    ((64, 10, 4), (128, 128, 1280), (64, 64, 1), "rank"),
])
def test_layout_problem_names_the_rule(dims, strides, box, why):
    assert why in tensor_map.layout_problem("float16", dims, strides, box)
    with pytest.raises(ValueError, match="tensor map"):
        tensor_map.encode.__wrapped__(16, "float16", dims, strides, box)


def test_encode_refuses_float32_and_unaligned_addresses():
    assert "float16" in tensor_map.layout_problem("float32", (64, 8, 1, 1), (128, 16, 16),
                                                  (64, 8, 1, 1))
    with pytest.raises(ValueError, match="16-byte"):
        tensor_map.encode.__wrapped__(8, "float16", (64, 8, 1, 1), (128, 16, 16),
                                      (64, 8, 1, 1))


def test_parameter_buffer_aligns_each_map_in_the_constant_bank():
    """The TMA forward's signature ends in three maps: each starts where its address in
    sm_90's constant bank (parameters from 0x210) is 64-byte aligned, as ptxas lays them
    (tests/test_param_layout.py reads the cubins), and nothing follows the last one."""
    spec = specs.with_forward_tma(specs.select_forward(_H200, "bfloat16", 128, False))
    signature = launch.signature_of(spec)
    assert signature.endswith("TTT") and signature.count("T") == 3
    packer = launch.param_packer(signature)
    plain = launch.param_packer(signature[:-3])
    first = plain.size + (-(launch.PARAM_BANK_START + plain.size) % 64)
    assert (0x210 + first) % 64 == 0 and first % 64 == 48
    assert packer.size == first + 3 * 128
    assert launch.param_offsets(signature)[-3:] == (first, first + 128, first + 256)
    maps = [bytes([i + 1]) * 128 for i in range(3)]
    buffer = packer.pack(*([0] * len(signature[:-3])), *maps)
    for i, m in enumerate(maps):
        assert buffer[first + 128 * i:first + 128 * (i + 1)] == m
    # without the knob (the selection at d64 with causal + softcap:
    # registry.FWD90_TMA_OFF_WHEN) no map is taken
    plain_spec = specs.select_forward(_H200, "bfloat16", 64, True,
                                      mods=specs.ModFlags(softcap=True))
    assert "T" not in launch.signature_of(plain_spec)


# -- launches and replays ---------------------------------------------------------------------


def _direct(q, k, v, o, m, l, causal):
    problem = validate.check_forward(q, k, v, causal=causal, softmax_scale=None)
    plan = launch.forward_plan(planning.Shape.of(problem), 0)
    with launch.recording() as records:
        launch.run_forward(plan, *map(_operand, (q, k, v, o)), m.ctypes.data, l.ctypes.data,
                           problem.softmax_scale, _STREAM, 0)
    return plan, _as_captured(records)


def _map_words(blob: bytes) -> tuple:
    return struct.unpack("<13q", blob[:104])


def _overlapping(rng, shape):
    """A float16 (batch, seqlen, heads, head_dim) view whose entries start 128 bytes apart
    (each 16-byte aligned, as the checks ask): a huge batch in a small allocation."""
    batch, seqlen, heads, head_dim = shape
    base = rng.standard_normal(batch * 64 + seqlen * heads * head_dim).astype(np.float16)
    return np.lib.stride_tricks.as_strided(base, shape, (128, heads * head_dim * 2,
                                                         head_dim * 2, 2))


@pytest.mark.parametrize("shape_q, shape_kv, transposed_k, causal", [
    ((2, 100, 8, 64), (2, 130, 8, 64), False, True),
    ((1, 256, 16, 128), (1, 300, 4, 128), True, False),
    ((70000, 64, 1, 64), (70000, 64, 1, 64), False, False),  # the batch split over launches
])
def test_replays_make_each_calls_maps(tma_device, shape_q, shape_kv, transposed_k, causal):
    """Three calls of a layout, fresh arrays each: the replayed launches carry maps of the
    call's own q, k and v, equal to what the launch code makes for them directly."""
    captured = tma_device
    backend, rng = NumpyBackend(), np.random.default_rng(0)
    for call in range(3):
        if shape_q[0] > 1000:  # views whose batch entries overlap: a small allocation
            q, k, v = (_overlapping(rng, shape_q) for _ in range(3))
        else:
            q, k, v = _inputs(rng, shape_q, shape_kv, np.float16, transposed_k)
        captured.clear()
        o, m, l = fastpath.forward(backend, q, k, v, causal, None)
        plan, direct = _direct(q, k, v, o, m, l, causal)
        assert specs.loads_with_tma(plan.kernel.spec)
        assert captured == direct, f"call {call}"
        assert len(captured) > 1 or shape_q[0] < 1000
        b0 = 0
        for *_, args in captured:
            for blob, x, box in zip(args[-3:], (q, k, v),
                                    (plan.kernel.spec.block_m, *[plan.kernel.spec.block_n] * 2)):
                ptr, _, d, rows, heads, batch, *strides_box = _map_words(blob)
                item = x.itemsize
                assert ptr == x.ctypes.data + b0 * x.strides[0]
                assert (d, rows, heads, batch) == (x.shape[3], x.shape[1], x.shape[2],
                                                   x.shape[0] - b0)
                assert tuple(strides_box[3:]) == (64, box, 1, 1)
                assert strides_box[0] == x.strides[1] and strides_box[0] % 16 == 0
                assert item == 2
            b0 += plan.kernel.batch_per_launch


def test_a_broadcast_batch_axis_runs_the_cp_async_tile(tma_device):
    """k and v broadcast over the batch (stride 0) cannot be boxed: the same tile runs
    without TMA (no maps, the cp.async kernel), replayed alike."""
    captured = tma_device
    backend, rng = NumpyBackend(), np.random.default_rng(2)
    q = rng.standard_normal((3, 64, 4, 64)).astype(np.float16)
    k1, v1 = (rng.standard_normal((1, 80, 4, 64)).astype(np.float16) for _ in range(2))
    k, v = (np.broadcast_to(x, (3, 80, 4, 64)) for x in (k1, v1))
    for _ in range(2):
        captured.clear()
        o, m, l = fastpath.forward(backend, q, k, v, False, None)
        plan, direct = _direct(q, k, v, o, m, l, False)
        assert specs.loads_with_tma(plan.kernel.spec)  # planned with TMA ...
        assert captured == direct
        (launched,) = captured
        untiled = plan.kernel.spec.without_knob("CF_FWD_TMA")
        assert launched[0] == hash((untiled.name, False)) & 0xFFFFFF  # ... run without
        assert not any(isinstance(a, bytes) and len(a) == 128 for a in launched[4])


@pytest.fixture
def tma_bwd_device(tma_device, monkeypatch):
    """``tma_device`` with the backward's selector patched to the TMA backward too."""
    plain = specs.select_backward
    monkeypatch.setattr(specs, "select_backward",
                        lambda *a, **k: specs.with_backward_tma(plain(*a, **k)) or plain(*a, **k))
    yield tma_device


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape_q, shape_kv, transposed_k", [
    ((2, 100, 8, 64), (2, 130, 4, 64), False),
    ((1, 256, 16, 128), (1, 300, 4, 128), True),
])
def test_backward_replays_make_each_calls_maps(tma_bwd_device, shape_q, shape_kv, transposed_k,
                                               deterministic):
    """The backward's main kernel takes maps of the call's own q, k, v and dO (in that
    order, boxes of block_m query rows and block_n key rows), call after call, equal to the
    launch code's for the same arrays."""
    captured = tma_bwd_device
    backend, rng = NumpyBackend(), np.random.default_rng(3)
    for call in range(3):
        q, k, v = _inputs(rng, shape_q, shape_kv, np.float16, transposed_k)
        o, m, l = fastpath.forward(backend, q, k, v, False, None)
        do = rng.standard_normal(shape_q).astype(np.float16)
        captured.clear()
        dq, dk, dv = fastpath.backward(backend, do, q, k, v, o, m, l, False, None,
                                       deterministic)
        problem = validate.check_forward(q, k, v, causal=False, softmax_scale=None)
        plan = launch.backward_plan(planning.Shape.of(problem), 0, deterministic)
        assert specs.loads_with_tma(plan.main.spec), plan.main.spec.name
        main_fn = hash((plan.main.spec.name, False)) & 0xFFFFFF
        (main,) = [c for c in captured if c[0] == main_fn]
        blobs = main[4][-4:]
        for blob, x, box in zip(blobs, (q, k, v, do),
                                (plan.main.spec.block_m, plan.main.spec.block_n,
                                 plan.main.spec.block_n, plan.main.spec.block_m)):
            ptr, _, d, rows, heads, batch, stride_m, _, _, *box_dims = _map_words(blob)
            assert ptr == x.ctypes.data, f"call {call}"
            assert (d, rows, heads, batch) == (x.shape[3], x.shape[1], x.shape[2], x.shape[0])
            assert stride_m == x.strides[1] and tuple(box_dims) == (64, box, 1, 1)
        pre = next(c for c in captured if c[0] != "memset")
        workspace = pre[4][4] - planning.backward_workspace(plan).delta
        with launch.recording() as direct:
            launch.run_backward(plan, *map(_operand, (do, q, k, v, o)), m.ctypes.data,
                                l.ctypes.data, *map(_operand, (dq, dk, dv)),
                                problem.softmax_scale, workspace, _STREAM, 0)
        assert captured == _as_captured(direct), f"call {call}"


@pytest.mark.parametrize("seqlen_q, paired", [(256, True), (131, True), (300, False)])
def test_clusters_pair_even_tile_counts_and_run_odd_ones_unpaired(tma_device, monkeypatch,
                                                                  seqlen_q, paired):
    """A cluster of two needs an even number of query tiles: with one, the launch takes the
    clustered spec and its maps; with an odd number, the same tile without TMA or clusters."""
    captured = tma_device
    plain = specs.select_forward
    monkeypatch.setattr(specs, "select_forward",
                        lambda *a, **k: specs.with_forward_cluster(plain(*a, **k))
                        or plain(*a, **k))
    _clear_memos()
    backend, rng = NumpyBackend(), np.random.default_rng(4)
    q, k, v = _inputs(rng, (2, seqlen_q, 8, 128), (2, 400, 2, 128), np.float16)
    for _ in range(2):
        captured.clear()
        o, m, l = fastpath.forward(backend, q, k, v, False, None)
        plan, direct = _direct(q, k, v, o, m, l, False)
        assert specs.clustered(plan.kernel.spec)
        assert captured == direct
        (launched,) = captured
        ran = plan.kernel.spec if paired else specs.without_tma(plan.kernel.spec)
        assert launched[0] == hash((ran.name, False)) & 0xFFFFFF
        maps = [a for a in launched[4] if isinstance(a, bytes) and len(a) == 128]
        assert len(maps) == (3 if paired else 0)
        assert launched[1][0] % 2 == 0 or not paired


def test_a_tma_knob_on_a_kernel_without_tma_loads_changes_nothing():
    """A tuning run's knob set on every candidate (tile_sweep --variant CF_BWD_TMA=1) leaves
    the kernels that have no TMA loads with their own parameters."""
    facts = specs.facts_for_arch("sm_90")
    eight = specs.select_forward(facts, "bfloat16", 256, False)  # the 8-warp kernel
    assert eight.warps == 8
    assert specs.tma_maps(eight.with_knobs(CF_FWD_TMA=1)) == ()
    assert launch.signature_of(eight.with_knobs(CF_FWD_TMA=1)) == launch.signature_of(eight)
    ws = specs.select_backward(facts, "bfloat16", 128, False, False).without_knob("CF_BWD_TMA")
    assert specs.tma_maps(ws.with_knobs(CF_BWD_TMA=1)) == ("q", "k", "v", "do")
    assert specs.tma_maps(ws.with_knobs(CF_FWD_TMA=1)) == ()
    split = specs.select_backward(facts, "bfloat16", 256, False, False)  # the role split
    assert specs.tma_maps(split.with_knobs(CF_BWD_TMA=1)) == ()
    assert specs.without_tma(specs.with_forward_cluster(
        specs.select_forward(facts, "bfloat16", 128, False))).knobs == ()


def test_backward_with_broadcast_kv_runs_the_cp_async_tile(tma_bwd_device):
    captured = tma_bwd_device
    backend, rng = NumpyBackend(), np.random.default_rng(5)
    q = rng.standard_normal((3, 64, 4, 128)).astype(np.float16)
    k1, v1 = (rng.standard_normal((1, 96, 4, 128)).astype(np.float16) for _ in range(2))
    k, v = (np.broadcast_to(x, (3, 96, 4, 128)) for x in (k1, v1))
    o, m, l = fastpath.forward(backend, q, k, v, False, None)
    do = rng.standard_normal(q.shape).astype(np.float16)
    captured.clear()
    fastpath.backward(backend, do, q, k, v, o, m, l, False, None, False)
    problem = validate.check_forward(q, k, v, causal=False, softmax_scale=None)
    plan = launch.backward_plan(planning.Shape.of(problem), 0, False)
    assert specs.loads_with_tma(plan.main.spec)
    untiled = specs.without_tma(plan.main.spec)
    functions = [c[0] for c in captured]
    assert hash((untiled.name, False)) & 0xFFFFFF in functions
    assert hash((plan.main.spec.name, False)) & 0xFFFFFF not in functions


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_causal_block_mask_backward_wide_boxed_tile(dtype, monkeypatch):
    """registry.BWD90_BOXED_ONLY_WHEN: the d64 backward under causal + a block mask on the
    12-warp tile boxed (its consumers at 240 registers) where its cp.async form, which
    spills, gave way to the 8-warp tile. Selected since session 37 (registry.BWD90_BOXED_ONLY);
    the candidate knob it was (``specs.with_wide_boxed_backward``) gives the same spec from
    the selection without it. Packed sequences, dropout and the deterministic mode keep what
    they ran, and so does a budget the wide tile does not fit."""
    def pick(facts=_H200, deterministic=False, **mods):
        return specs.select_backward(facts, dtype, 64, True, deterministic,
                                     mods=specs.ModFlags(block_sparse=True, **mods))

    knob = specs.with_wide_boxed_backward(_H200)
    wide = pick()
    assert specs.bwd90_warp_specialized(wide) and specs.loads_with_tma(wide), wide.name
    assert wide.causal and wide.mods.block_sparse and "CF_DQ_BULK" in wide.defines
    with monkeypatch.context() as patched:
        patched.setattr(specs, "BWD90_BOXED_ONLY", False)
        before = pick()
        assert not specs.bwd90_warp_specialized(before) and before.warps == 8
        assert knob(before) == wide
    for mods in ({"softcap": True}, {"alibi": True}, {"sinks": True}):
        assert specs.loads_with_tma(pick(**mods)), mods
    for mods in ({"varlen": True}, {"dropout": True}):
        kept = pick(**mods)
        assert not specs.bwd90_warp_specialized(kept) and kept.warps == 8, kept.name
        assert knob(kept) == kept
    assert not specs.bwd90_warp_specialized(pick(deterministic=True))
    bare = specs.without_tma(wide).without_knob("CF_DQ_BULK")  # the tile's least
    small = launch.DeviceFacts(name="small", arch="sm_90", sm_count=132,
                               smem_optin=bare.smem_bytes - 1)
    assert not specs.bwd90_warp_specialized(pick(small))
    # the cp.async form itself stays out of the registry's candidates
    assert not specs.bwd90_warp_specialized(specs.select(
        "backward", _H200, dtype, 64, True, mods=specs.ModFlags(block_sparse=True)))
    # a plain causal call keeps its own selection
    plain = specs.select_backward(_H200, dtype, 64, True, False)
    assert knob(plain) == plain


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_tma_is_selected_where_measured(head_dim, causal):
    """registry.FWD90_TMA: the warp-specialized forward at head_dim 64 / 128 boxes its
    loads, with dropout, packed sequences and block masks too (block masks since session 36
    ran the issuer's warp fix); not d64 causal softcap, nor at head_dim 256. The backward
    (registry.BWD90_TMA) boxes with atomic dQ (the same modifiers); the deterministic mode
    (ordered dQ) keeps cp.async."""
    fwd = specs.select_forward(_H200, "bfloat16", head_dim, causal)
    assert specs.loads_with_tma(fwd), fwd.name
    for deterministic in (False, True):
        bwd = specs.select_backward(_H200, "bfloat16", head_dim, causal, deterministic)
        assert specs.loads_with_tma(bwd) == (not deterministic), bwd.name
        if not deterministic:
            assert "CF_DQ_BULK" in bwd.defines, bwd.name  # the pair that was timed
    for mods in (specs.ModFlags(dropout=True), specs.ModFlags(varlen=True),
                 specs.ModFlags(block_sparse=True),
                 specs.ModFlags(dropout=True, block_sparse=True)):
        assert specs.loads_with_tma(specs.select_forward(_H200, "bfloat16", head_dim, causal,
                                                         mods=mods))
        bwd = specs.select_backward(_H200, "bfloat16", head_dim, causal, False, mods=mods)
        # (a block mask's causal d64 backward runs a tile the copy engine does not serve)
        assert specs.loads_with_tma(bwd) or specs.with_backward_tma(bwd) is None, bwd.name
    softcap = specs.select_forward(_H200, "bfloat16", head_dim, causal,
                                   mods=specs.ModFlags(softcap=True))
    assert specs.loads_with_tma(softcap) == (head_dim == 128 or not causal), softcap.name
    assert not specs.loads_with_tma(specs.select_forward(_H200, "bfloat16", 256, causal))

"""The CUDA host path of attention (``cuflash.fastpath``) on the CPU, with NumPy arrays
standing in for a framework's CUDA arrays and the launches captured instead of run.

A call replays the launches recorded for its layout (``cuflash.replay``): they must be the
launches that the launch code makes when called directly with the call's own addresses
(every kernel, grid, scalar and address, the workspace memset included), call after call,
for every plan shape: one launch or a batch split over launches, atomics or deterministic
dQ, split kv heads with their converts, float32, and the score modifiers."""

from __future__ import annotations

import struct
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cuflash import fastpath, launch, replay, specs, tensor_map, validate
from cuflash import plan as planning
from host_backend import NumpyBackend

_H200 = launch.DeviceFacts(name="test", arch="sm_90", sm_count=132, smem_optin=227 * 1024)
_A100 = launch.DeviceFacts(name="test", arch="sm_80", sm_count=108, smem_optin=163 * 1024)
_STREAM = 1234


def fake_encode(ptr, dtype, dims, strides, box) -> bytes:
    """A tensor map's arguments packed as its 128 bytes (the driver's encoder needs a
    driver; the Hopper forward loads with TMA since session 30)."""
    words = (ptr, {"float16": 6, "bfloat16": 9}[dtype], *dims, *strides, *box)
    return struct.pack(f"<{len(words)}q", *words).ljust(tensor_map.MAP_BYTES, b"\0")


def _patch_device(mp, captured: list, facts: dict) -> None:
    """Launches and memsets captured as (function, grid, threads, smem, args) / (address,
    bytes); kernel addresses from the specs' names; tensor maps from ``fake_encode``; the
    device's facts from ``facts``; the memos emptied."""

    def packed(function, grid, threads, smem, packer, args, stream, what):
        assert stream == _STREAM
        packer.pack(*args)  # every argument fits its C type
        captured.append((function, tuple(grid), threads, smem, tuple(args)))

    class Runtime:  # the CUDA runtime's memset, captured (launch.memset_async records itself)
        @staticmethod
        def memsetAsync(ptr, value, nbytes, stream):
            assert stream == _STREAM and value == 0
            captured.append(("memset", ptr, nbytes))

    mp.setattr(launch, "launch_packed", packed)
    mp.setattr(launch, "_runtime", Runtime)
    mp.setattr(launch, "_function_ptr",
               lambda spec, index, convert: hash((spec.name, convert)) & 0xFFFFFF)
    mp.setattr(launch, "device_facts", lambda index: facts["facts"])
    mp.setattr(tensor_map, "encode", fake_encode)
    _clear_memos()


def _clear_memos() -> None:
    for cache in (fastpath._forward_calls, fastpath._backward_calls, fastpath._modified_calls,
                  planning._forward_plans, planning._backward_plans):
        cache.clear()


@pytest.fixture
def device(monkeypatch):
    captured, facts = [], {"facts": _H200}
    _patch_device(monkeypatch, captured, facts)
    yield captured, facts
    _clear_memos()


def _as_captured(records: list) -> list:
    """Recorded launches as ``_patch_device`` captures them, tensor maps made (what a direct
    launch passes)."""
    return [("memset", r.args[0], r.memset_bytes) if r.function is None else
            (r.function, r.grid, r.threads, r.smem,
             tuple(a.encoded() if isinstance(a, tensor_map.TensorMap) else a for a in r.args))
            for r in records]


def _operand(a) -> launch.Operand:
    return NumpyBackend().operand(a)


def _inputs(rng, shape_q, shape_kv, dtype, transposed_k=False):
    q = rng.standard_normal(shape_q).astype(dtype)
    k = rng.standard_normal(shape_kv).astype(dtype)
    if transposed_k:  # (batch, heads, seq, dim) storage read in place
        b, s, h, d = shape_kv
        k = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    v = rng.standard_normal(shape_kv).astype(dtype)
    return q, k, v


_CASES = [  # (facts, q shape, kv shape, dtype, causal, deterministic, transposed k)
    ("h200", (2, 100, 8, 64), (2, 130, 8, 64), np.float16, True, False, False),
    ("h200", (1, 256, 16, 128), (1, 256, 4, 128), np.float16, True, False, True),
    ("h200", (1, 64, 16, 128), (1, 512, 1, 128), np.float16, False, True, False),
    ("h200", (3, 40, 4, 32), (3, 40, 2, 32), np.float32, False, False, False),
    ("a100", (2, 70, 4, 256), (2, 90, 4, 256), np.float16, True, False, False),
    ("a100", (2, 70, 4, 96), (2, 90, 2, 96), np.float16, False, True, False),
    ("h200", (70000, 2, 1, 32), (70000, 2, 1, 32), np.float16, False, False, False),
]


@pytest.mark.parametrize("case", _CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_replayed_launches_are_the_direct_launches(device, case):
    _replay_case(device, case)
    assert len(fastpath._forward_calls) == len(fastpath._backward_calls) == 1


def _replay_case(device, case, calls: int = 3) -> None:
    """``calls`` calls of one layout, fresh arrays each: the first records the layout, the
    others replay it; each must launch what the launch code launches for its own arrays."""
    captured, facts = device
    name, shape_q, shape_kv, dtype, causal, deterministic, transposed = case
    facts["facts"] = _H200 if name == "h200" else _A100
    backend, rng = NumpyBackend(), np.random.default_rng(0)
    for call in range(calls):
        q, k, v = _inputs(rng, shape_q, shape_kv, dtype, transposed)
        captured.clear()
        o, m, l = fastpath.forward(backend, q, k, v, causal, None)
        problem = validate.check_forward(q, k, v, causal=causal, softmax_scale=None)
        plan = launch.forward_plan(planning.Shape.of(problem), 0)
        with launch.recording() as direct:
            launch.run_forward(plan, *map(_operand, (q, k, v, o)), m.ctypes.data,
                               l.ctypes.data, problem.softmax_scale, _STREAM, 0)
        assert captured == _as_captured(direct), f"forward, call {call}"
        if shape_q[0] > 1000:
            assert len(captured) > 1  # the grid's batch split over launches

        do = rng.standard_normal(shape_q).astype(dtype)
        captured.clear()
        dq, dk, dv = fastpath.backward(backend, do, q, k, v, o, m, l, causal, None,
                                       deterministic)
        plan = launch.backward_plan(planning.Shape.of(problem), 0, deterministic)
        workspace = _workspace_address(captured, plan)
        with launch.recording() as direct:
            launch.run_backward(plan, *map(_operand, (do, q, k, v, o)), m.ctypes.data,
                                l.ctypes.data, *map(_operand, (dq, dk, dv)),
                                problem.softmax_scale, workspace, _STREAM, 0)
        assert captured == _as_captured(direct), f"backward, call {call}"


@pytest.mark.parametrize("case", [_CASES[0], _CASES[6]], ids=["h200", "batch-split"])
def test_forward_output_launches_the_forward_with_one_stats_allocation(device, case):
    """``fastpath.forward_output`` (no statistics asked for) launches what ``forward`` does,
    with m and l the two halves of one scratch allocation (l = m + 4 * rows), in every
    launch of a batch split over several."""
    captured, facts = device
    _, shape_q, shape_kv, dtype, causal, _, transposed = case
    backend, rng = NumpyBackend(), np.random.default_rng(1)
    q, k, v = _inputs(rng, shape_q, shape_kv, dtype, transposed)
    for _ in range(2):  # recorded, then replayed
        captured.clear()
        o = fastpath.forward_output(backend, q, k, v, causal, None)
        m = captured[0][4][4]  # the fwd signature's m, l: its fifth and sixth parameters
        rows = shape_q[0] * shape_q[1] * shape_q[2]
        problem = validate.check_forward(q, k, v, causal=causal, softmax_scale=None)
        plan = launch.forward_plan(planning.Shape.of(problem), 0)
        with launch.recording() as direct:
            launch.run_forward(plan, *map(_operand, (q, k, v, o)), m, m + 4 * rows,
                               problem.softmax_scale, _STREAM, 0)
        assert captured == _as_captured(direct)
        assert all(args[5] - args[4] == 4 * rows for *_, args in captured)


@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), seqlen_q=st.integers(1, 160), seqlen_k=st.integers(1, 160),
       heads_kv=st.integers(1, 3), group=st.sampled_from([1, 2, 4]),
       head_dim=st.sampled_from([8, 32, 64, 72, 128, 256]),
       dtype=st.sampled_from([np.float16, np.float32]), causal=st.booleans(),
       deterministic=st.booleans(), facts=st.sampled_from(["h200", "a100"]),
       transposed=st.booleans())
def test_replays_equal_direct_launches_for_drawn_problems(batch, seqlen_q, seqlen_k, heads_kv,
                                                          group, head_dim, dtype, causal,
                                                          deterministic, facts, transposed):
    with pytest.MonkeyPatch.context() as mp:
        device = ([], {"facts": _H200})
        _patch_device(mp, *device)
        try:
            _replay_case(device, (facts, (batch, seqlen_q, heads_kv * group, head_dim),
                                  (batch, seqlen_k, heads_kv, head_dim), dtype, causal,
                                  deterministic, transposed), calls=2)
        finally:
            _clear_memos()


def _workspace_address(captured: list, plan) -> int:
    """The replay's workspace: the preprocess writes delta at its start (argument 4)."""
    pre = next(c for c in captured if c[0] != "memset")
    return pre[4][4] - planning.backward_workspace(plan).delta


def test_the_score_modifiers_replay_their_addresses(device):
    captured, _ = device
    backend, rng = NumpyBackend(), np.random.default_rng(1)
    mods = dict(window=(32, 0), softcap=None)
    for call in range(3):
        q, k, v = _inputs(rng, (2, 96, 8, 64), (2, 96, 4, 64), np.float16)
        slopes = rng.random((2, 8)).astype(np.float32)
        sinks = rng.standard_normal(8).astype(np.float32)
        captured.clear()
        o, m, l, checked = fastpath.forward_modified(backend, q, k, v, True, None,
                                                     alibi_slopes=slopes, sinks=sinks, **mods)
        problem = validate.check_forward(q, k, v, causal=True, softmax_scale=None)
        shape = planning.Shape.of(problem, planning.mod_flags(
            checked.window, checked.softcap, slopes, sinks, True))
        args = launch.modifiers_of(shape, checked.window, checked.softcap, slopes, sinks,
                                   problem.softmax_scale, ptr=lambda a: a.ctypes.data)
        with launch.recording() as direct:
            launch.run_forward(launch.forward_plan(shape, 0), *map(_operand, (q, k, v, o)),
                               m.ctypes.data, l.ctypes.data, problem.softmax_scale,
                               _STREAM, 0, args)
        assert captured == _as_captured(direct), f"forward, call {call}"

        do = rng.standard_normal(q.shape).astype(np.float16)
        captured.clear()
        dq, dk, dv, dsinks = fastpath.backward_modified(
            backend, do, q, k, v, o, m, l, True, None, False, alibi_slopes=slopes,
            sinks=sinks, **mods)
        plan = launch.backward_plan(shape, 0, False)
        pre = next(c for c in captured if c[0] != "memset")
        args = launch.modifiers_of(shape, checked.window, checked.softcap, slopes, sinks,
                                   problem.softmax_scale, dsinks, ptr=lambda a: a.ctypes.data)
        # the preprocess's dsinks (then dq_zero, dq_tile_d and the SEQ arguments): this call's
        assert pre[4][-7] == dsinks.ctypes.data
        with launch.recording() as direct:
            launch.run_backward(plan, *map(_operand, (do, q, k, v, o)), m.ctypes.data,
                                l.ctypes.data, *map(_operand, (dq, dk, dv)),
                                problem.softmax_scale, _workspace_address(captured, plan),
                                _STREAM, 0, args)
        assert captured == _as_captured(direct), f"backward, call {call}"
    assert len(fastpath._modified_calls) == 2


def test_a_block_mask_replays_its_address(device):
    """Block-sparse calls take the fast path: the replay reads each call's mask (the last
    pointer argument of the forward and the dK/dV kernel), as the direct launches do."""
    captured, _ = device
    backend, rng = NumpyBackend(), np.random.default_rng(2)
    for call in range(3):
        q, k, v = _inputs(rng, (2, 300, 4, 64), (2, 300, 2, 64), np.float16)
        mask = rng.random((2, 1, 3, 3)) < 0.5  # a fresh array each call: a new address
        captured.clear()
        o, m, l, _ = fastpath.forward_modified(backend, q, k, v, False, None, None, None,
                                               None, None, block_mask=mask)
        problem = validate.check_forward(q, k, v, causal=False, softmax_scale=None)
        shape = planning.Shape.of(problem, planning.mod_flags(None, None, None, None, False,
                                                              True))
        bsp = launch.block_mask_args(_HostMask(mask), (128, 128))
        args = launch.modifiers_of(shape, None, None, None, None, problem.softmax_scale)
        with launch.recording() as direct:
            launch.run_forward(launch.forward_plan(shape, 0), *map(_operand, (q, k, v, o)),
                               m.ctypes.data, l.ctypes.data, problem.softmax_scale,
                               _STREAM, 0, args, bsp=bsp)
        assert captured == _as_captured(direct), f"forward, call {call}"
        maps = len(specs.tma_maps(launch.forward_plan(shape, 0).kernel.spec))  # after it
        assert captured[0][4][-6 - maps] == mask.ctypes.data

        do = rng.standard_normal(q.shape).astype(np.float16)
        captured.clear()
        dq, dk, dv = fastpath.backward_modified(backend, do, q, k, v, o, m, l, False, None,
                                                False, None, None, None, None, block_mask=mask)
        plan = launch.backward_plan(shape, 0, False)
        with launch.recording() as direct:
            launch.run_backward(plan, *map(_operand, (do, q, k, v, o)), m.ctypes.data,
                                l.ctypes.data, *map(_operand, (dq, dk, dv)),
                                problem.softmax_scale, _workspace_address(captured, plan),
                                _STREAM, 0, args, bsp=bsp)
        assert captured == _as_captured(direct), f"backward, call {call}"
    assert len(fastpath._modified_calls) == 2


def test_dropout_words_on_the_device_replay_their_address(device):
    """Dropout with its words on the device (the torch adapter's CUDA graph path) takes the
    fast path: the replay passes each call's words address to the kernels that read it
    (specs.with_device_rng), as the direct launches do, forward and backward."""
    captured, _ = device
    backend, rng = NumpyBackend(), np.random.default_rng(3)
    for call in range(3):
        q, k, v = _inputs(rng, (2, 300, 4, 64), (2, 300, 2, 64), np.float16)
        words = rng.integers(0, 2**32, 3, dtype=np.uint64).astype(np.uint32)  # a new address
        captured.clear()
        o, m, l, _ = fastpath.forward_modified(backend, q, k, v, True, None, None, None,
                                               None, None, dropout_p=0.2, dropout_rng=words)
        problem = validate.check_forward(q, k, v, causal=True, softmax_scale=None)
        shape = planning.Shape.of(problem, planning.mod_flags(None, None, None, None, True,
                                                              False, True))
        drop = launch.dropout_args(0.2, None, 0, 4, rng=words.ctypes.data)
        args = launch.modifiers_of(shape, None, None, None, None, problem.softmax_scale)
        plan = launch.forward_plan(shape, 0)
        with launch.recording() as direct:
            launch.run_forward(plan, *map(_operand, (q, k, v, o)), m.ctypes.data,
                               l.ctypes.data, problem.softmax_scale, _STREAM, 0, args,
                               drop=drop)
        assert captured == _as_captured(direct), f"forward, call {call}"
        maps = len(specs.tma_maps(plan.kernel.spec))
        assert captured[0][4][-4 - maps] == words.ctypes.data

        do = rng.standard_normal(q.shape).astype(np.float16)
        captured.clear()
        dq, dk, dv = fastpath.backward_modified(backend, do, q, k, v, o, m, l, True, None,
                                                False, None, None, None, None, dropout_p=0.2,
                                                dropout_rng=words)
        plan = launch.backward_plan(shape, 0, False)
        with launch.recording() as direct:
            launch.run_backward(plan, *map(_operand, (do, q, k, v, o)), m.ctypes.data,
                                l.ctypes.data, *map(_operand, (dq, dk, dv)),
                                problem.softmax_scale, _workspace_address(captured, plan),
                                _STREAM, 0, args, drop=drop)
        assert captured == _as_captured(direct), f"backward, call {call}"
        assert any(words.ctypes.data in launched[4] for launched in captured
                   if launched[0] != "memset")
    assert len(fastpath._modified_calls) == 2
    with pytest.raises(ValueError, match="dropout_rng: expected 3 words"):
        fastpath.forward_modified(backend, q, k, v, True, None, None, None, None, None,
                                  dropout_p=0.2)


class _HostMask:
    """A host bool array with CuPy's ``data.ptr`` (launch.block_mask_args reads it)."""

    def __init__(self, a):
        self.shape, self.strides = a.shape, a.strides
        self.data = type("Data", (), {"ptr": a.ctypes.data})()


def test_a_stand_in_address_is_an_index_and_an_offset():
    a = replay.Address(3) + 16
    b = 8 + a + 4
    assert (b.index, b.offset) == (3, 28) and bool(replay.Address(0))
    with pytest.raises(TypeError):
        replay.Address(1) + 0.5



def test_the_cpu_host_profile_runs():
    """bench/dev/host_profile_cpu.py (the host path's Python cost without a GPU) runs, in its
    own process: it stubs the launcher for good."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    script = Path(__file__).resolve().parents[1] / "bench" / "dev" / "host_profile_cpu.py"
    done = subprocess.run([sys.executable, str(script), "--calls", "20", "--profile",
                           "varlen backward", "--rows", "3"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for case in ("fastpath forward", "decode_cuda", "varlen backward"):
        assert case in done.stdout


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_a_pair_replays_the_pair_kernels_launches(device, monkeypatch, causal):
    """v of its own head_dim (DeepSeek's (192, 128)) with the native pairs on: the fast path
    launches what the launch code launches for the pair's plan (o at v's width), call after
    call; a deterministic backward, which no pair kernel has, is declined (None) for the
    general path's copies, and so is a pair no forward kernel takes."""
    monkeypatch.setenv("CUFLASH_HEAD_DIM_V_NATIVE", "1")
    backend, rng = NumpyBackend(), np.random.default_rng(3)
    for call in range(3):
        q, k, _ = _inputs(rng, (2, 100, 4, 192), (2, 130, 2, 192), np.float16)
        v = rng.standard_normal((2, 130, 2, 128)).astype(np.float16)
        captured, _ = device
        captured.clear()
        o, m, l, fwd_call = fastpath.forward_with_call(backend, q, k, v, causal, None)
        assert o.shape == (2, 100, 4, 128)
        problem = validate.check_forward(q, k, v, causal=causal, softmax_scale=None,
                                         padded_ok=True)
        shape = replace(planning.Shape.of(problem), head_dim_v=128)
        plan = launch.forward_plan(shape, 0)
        assert plan.kernel.spec.head_dim_v == 128
        with launch.recording() as direct:
            launch.run_forward(plan, *map(_operand, (q, k, v, o)), m.ctypes.data,
                               l.ctypes.data, problem.softmax_scale, _STREAM, 0)
        assert captured and captured == _as_captured(direct), f"forward, call {call}"

        do = rng.standard_normal(o.shape).astype(np.float16)
        captured.clear()
        dq, dk, dv = fastpath.backward(backend, do, q, k, v, o, m, l, causal, None, False,
                                       forward_call=fwd_call)
        assert dv.shape == v.shape
        plan = launch.backward_plan(shape, 0, False)
        workspace = _workspace_address(captured, plan)
        with launch.recording() as direct:
            launch.run_backward(plan, *map(_operand, (do, q, k, v, o)), m.ctypes.data,
                                l.ctypes.data, *map(_operand, (dq, dk, dv)),
                                problem.softmax_scale, workspace, _STREAM, 0)
        assert captured and captured == _as_captured(direct), f"backward, call {call}"
        captured.clear()
        assert fastpath.backward(backend, do, q, k, v, o, m, l, causal, None, True) is None
        assert captured == []
    q64 = rng.standard_normal((1, 64, 2, 64)).astype(np.float16)
    k64 = rng.standard_normal((1, 64, 2, 64)).astype(np.float16)
    v32 = rng.standard_normal((1, 64, 2, 32)).astype(np.float16)  # 32: not a whole panel
    for _ in range(2):  # declined, then declined from the memo
        assert fastpath.forward_with_call(backend, q64, k64, v32, causal, None) is None
    assert fastpath.DECLINED in fastpath._forward_calls.values()


def test_the_api_offers_the_fast_path_pairs_only_with_the_switch(monkeypatch):
    from cuflash import api

    q, v = np.empty((1, 8, 2, 192), np.float16), np.empty((1, 8, 2, 128), np.float16)
    monkeypatch.setenv("CUFLASH_HEAD_DIM_V_NATIVE", "0")
    assert not api._fast_dims(q, v, plain=True)
    monkeypatch.delenv("CUFLASH_HEAD_DIM_V_NATIVE", raising=False)  # on by default
    assert api._fast_dims(q, v, plain=True)
    assert not api._fast_dims(q, v, plain=False)  # modifiers: the general path
    assert not api._fast_dims(q, np.empty((1, 8, 2, 100), np.float16), plain=True)
    assert api._fast_dims(q, np.empty((1, 8, 2, 192), np.float16), plain=False)

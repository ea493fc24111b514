"""The CUDA host path of varlen attention (``cuflash.varlen_fastpath``) on the CPU, with
NumPy arrays standing in for CUDA arrays and the launches captured instead of run (the
fixture of ``test_attention_host_path``): every call replays exactly the launches that the
launch code makes when called directly with that call's addresses, and the statistics it
returns carry this call's sequence layout."""

from __future__ import annotations

import numpy as np
import pytest

from cuflash import launch, varlen_fastpath
from cuflash.varlen import check_varlen
from cuflash.varlen_gpu import _shape
from host_backend import NumpyBackend
from test_attention_host_path import _STREAM, _as_captured, device  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def _fresh_memo():
    varlen_fastpath._calls.clear()
    yield
    varlen_fastpath._calls.clear()


def _packed(a) -> launch.Operand:
    item = a.itemsize
    return launch.Operand(a.ctypes.data, 0, a.strides[0] // item, a.strides[1] // item, item)


def _arrays(rng, lengths_q, lengths_k, heads, heads_kv, dim=64, dtype=np.float16):
    cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int32)
    q = rng.standard_normal((int(cu_q[-1]), heads, dim)).astype(dtype)
    k, v = (rng.standard_normal((int(cu_k[-1]), heads_kv, dim)).astype(dtype) for _ in "kv")
    return q, k, v, cu_q, cu_k


def _direct(q, k, v, layout, outputs, do=None, grads=None, workspace=0, dsinks=None,
            deterministic=False):
    """The launches of the general path's code for these arrays, recorded."""
    call = check_varlen(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k,
                        **layout.checked())
    shape = _shape(call)
    used = layout.seqused_k
    seq = launch.SeqArgs(layout.cu_q.ctypes.data, layout.cu_k.ctypes.data,
                         0 if used is None else used.ctypes.data, shape.total_q)
    mods = launch.modifiers_of(shape, call.modifiers.window, call.modifiers.softcap,
                               layout.alibi_slopes, layout.sinks, call.problem.softmax_scale,
                               dsinks, ptr=lambda a: a.ctypes.data)
    o, m, l = outputs
    with launch.recording() as records:
        if do is None:
            launch.run_forward(launch.forward_plan(shape, 0), *map(_packed, (q, k, v, o)),
                               m.ctypes.data, l.ctypes.data, call.problem.softmax_scale,
                               _STREAM, 0, mods, seq)
        else:
            plan = launch.backward_plan(shape, 0, deterministic)
            launch.run_backward(plan, *map(_packed, (do, q, k, v, o)), m.ctypes.data,
                                l.ctypes.data, *map(_packed, grads),
                                call.problem.softmax_scale, workspace, _STREAM, 0, mods, seq)
    return _as_captured(records)


_CASES = {
    "causal": dict(lengths_q=[37, 0, 130], lengths_k=[37, 5, 130], heads=4, heads_kv=4,
                   mods={}, causal=True, used=False),
    "gqa-seqused": dict(lengths_q=[8, 64, 3], lengths_k=[100, 64, 50], heads=8, heads_kv=2,
                        mods={}, causal=True, used=True),
    "modifiers": dict(lengths_q=[70, 20], lengths_k=[90, 20], heads=6, heads_kv=3,
                      mods=dict(window=(16, 0), softcap=None), causal=True, used=False,
                      alibi=True, sinks=True),
}


@pytest.mark.parametrize("name", sorted(_CASES))
@pytest.mark.parametrize("deterministic", [False, True])
def test_replayed_varlen_launches_are_the_direct_launches(device, name, deterministic):
    captured, _ = device
    case = _CASES[name]
    backend, rng = NumpyBackend(), np.random.default_rng(0)
    heads = case["heads"]
    for call in range(3):  # the first call records the layout; the others replay it
        q, k, v, cu_q, cu_k = _arrays(rng, case["lengths_q"], case["lengths_k"], heads,
                                      case["heads_kv"])
        used = (np.diff(cu_k) - 1).clip(0).astype(np.int32) if case["used"] else None
        slopes = rng.random((len(cu_q) - 1, heads)).astype(np.float32) if case.get(
            "alibi") else None
        sinks = rng.standard_normal(heads).astype(np.float32) if case.get("sinks") else None
        layout = varlen_fastpath.Layout(cu_q, cu_k, int(np.diff(cu_q).max()),
                                        int(np.diff(cu_k).max()), used, case["causal"], None,
                                        case["mods"].get("window"), case["mods"].get("softcap"),
                                        slopes, sinks)
        captured.clear()
        o, m, l, fields = varlen_fastpath.forward(backend, q, k, v, layout)
        assert captured == _direct(q, k, v, layout, (o, m, l)), f"forward, call {call}"
        assert fields["seqlens"] == ("device", cu_q.ctypes.data, cu_k.ctypes.data,
                                     None if used is None else used.ctypes.data,
                                     layout.max_q, layout.max_k)
        stats = _stats(m, l, fields)

        do = rng.standard_normal(q.shape).astype(q.dtype)
        captured.clear()
        grads = varlen_fastpath.backward(backend, do, q, k, v, o, stats, layout,
                                         deterministic)
        assert len(grads) == (4 if sinks is not None else 3)
        pre = next(c for c in captured if c[0] != "memset")
        plan = launch.backward_plan(_shape(check_varlen(
            q, k, v, cu_q, cu_k, layout.max_q, layout.max_k, **layout.checked())), 0,
            deterministic)
        from cuflash import plan as planning

        workspace = pre[4][4] - planning.backward_workspace(plan).delta
        want = _direct(q, k, v, layout, (o, m, l), do, grads[:3], workspace,
                       grads[3] if sinks is not None else None, deterministic)
        assert captured == want, f"backward, call {call}"
        if used is not None:  # keys past seqused_k: zeroed before the kernels
            assert not grads[1].any() and not grads[2].any()
    assert len(varlen_fastpath._calls) == 2


def _stats(m, l, fields):
    from cuflash.varlen import VarlenStats

    return VarlenStats(m, l, **fields)


def test_a_backward_with_another_layout_is_refused(device):
    backend, rng = NumpyBackend(), np.random.default_rng(1)
    q, k, v, cu_q, cu_k = _arrays(rng, [10, 20], [10, 20], 2, 2)
    layout = varlen_fastpath.Layout(cu_q, cu_k, 20, 20, None, False, None, None, None, None,
                                    None)
    o, m, l, fields = varlen_fastpath.forward(backend, q, k, v, layout)
    stats = _stats(m, l, fields)
    other = layout._replace(cu_q=cu_q.copy(), cu_k=cu_k.copy())  # same values, other arrays
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        varlen_fastpath.backward(backend, q.copy(), q, k, v, o, stats, other, False)
    with pytest.raises(ValueError, match="causal"):
        varlen_fastpath.backward(backend, q.copy(), q, k, v, o, stats,
                                 layout._replace(causal=True), False)


def test_calls_the_general_path_serves_are_left_to_it(device):
    backend, rng = NumpyBackend(), np.random.default_rng(2)
    q, k, v, cu_q, cu_k = _arrays(rng, [10, 20], [10, 20], 2, 2)
    layout = varlen_fastpath.Layout(cu_q, cu_k, 20, 20, None, False, None, None, None, None,
                                    None)
    for other in (layout._replace(max_q=np.int64(20)), layout._replace(window=5),
                  layout._replace(cu_q=np.repeat(cu_q, 2)[::2])):
        assert varlen_fastpath.forward(backend, q, k, v, other) is None
    assert not varlen_fastpath._calls
    with pytest.raises(ValueError, match="max_seqlen_q"):  # the general path's checks
        varlen_fastpath.forward(backend, q, k, v, layout._replace(max_q=5))


def test_a_remembered_layout_does_not_pass_a_value_the_checks_refuse(device):
    """softcap True equals 1.0 as a number; the memo key keeps them apart, so True still
    gets the checks' TypeError after a call with 1.0."""
    backend, rng = NumpyBackend(), np.random.default_rng(3)
    q, k, v, cu_q, cu_k = _arrays(rng, [10, 20], [10, 20], 2, 2)
    layout = varlen_fastpath.Layout(cu_q, cu_k, 20, 20, None, False, None, None, 1.0, None,
                                    None)
    assert varlen_fastpath.forward(backend, q, k, v, layout) is not None
    with pytest.raises(TypeError, match="^softcap: expected a real number"):
        varlen_fastpath.forward(backend, q, k, v, layout._replace(softcap=True))


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_pair_replays_the_pair_kernels_launches(device, monkeypatch, deterministic):
    """v of its own head_dim (192, 128) with the native pairs on: the forward replays the
    launches of the pair's plan (o at v's width); the backward too, or, deterministic (no
    pair kernel), is declined for the general path's copies, remembered as declined."""
    monkeypatch.setenv("CUFLASH_HEAD_DIM_V_NATIVE", "1")
    captured, _ = device
    backend, rng = NumpyBackend(), np.random.default_rng(5)
    for call in range(3):
        q, k, _, cu_q, cu_k = _arrays(rng, [37, 90], [50, 90], 4, 2, dim=192)
        v = rng.standard_normal((k.shape[0], 2, 128)).astype(np.float16)
        layout = varlen_fastpath.Layout(cu_q, cu_k, 90, 90, None, True, None, None, None,
                                        None, None)
        captured.clear()
        o, m, l, fields = varlen_fastpath.forward(backend, q, k, v, layout)
        assert o.shape == (q.shape[0], 4, 128)
        assert captured and captured == _direct(q, k, v, layout, (o, m, l)), f"call {call}"
        do = rng.standard_normal(o.shape).astype(o.dtype)
        captured.clear()
        grads = varlen_fastpath.backward(backend, do, q, k, v, o, _stats(m, l, fields), layout,
                                         deterministic)
        if deterministic:
            assert grads is None and captured == []
            continue
        assert grads[2].shape == v.shape
        pre = next(c for c in captured if c[0] != "memset")
        plan = launch.backward_plan(_shape(check_varlen(
            q, k, v, cu_q, cu_k, 90, 90, **layout.checked())), 0, False)
        assert plan.main.spec.head_dim_v == 128
        from cuflash import plan as planning

        workspace = pre[4][4] - planning.backward_workspace(plan).delta
        assert captured == _direct(q, k, v, layout, (o, m, l), do, grads, workspace)
    assert (varlen_fastpath.DECLINED in varlen_fastpath._calls.values()) == deterministic


def test_a_pair_is_left_to_the_general_path_with_the_switch_off(device, monkeypatch):
    monkeypatch.setenv("CUFLASH_HEAD_DIM_V_NATIVE", "0")
    backend, rng = NumpyBackend(), np.random.default_rng(6)
    q, k, _, cu_q, cu_k = _arrays(rng, [10, 20], [10, 20], 2, 2, dim=192)
    v = rng.standard_normal((k.shape[0], 2, 128)).astype(np.float16)
    layout = varlen_fastpath.Layout(cu_q, cu_k, 20, 20, None, False, None, None, None, None,
                                    None)
    assert varlen_fastpath.forward(backend, q, k, v, layout) is None
    assert not varlen_fastpath._calls


def _plain_layout(rng, case: dict):
    """(q, k, v, layout) of a _CASES entry without its score modifiers."""
    q, k, v, cu_q, cu_k = _arrays(rng, case["lengths_q"], case["lengths_k"], case["heads"],
                                  case["heads_kv"])
    used = (np.diff(cu_k) - 1).clip(0).astype(np.int32) if case["used"] else None
    layout = varlen_fastpath.Layout(cu_q, cu_k, int(np.diff(cu_q).max()),
                                    int(np.diff(cu_k).max()), used, case["causal"], None, None,
                                    None, None, None)
    return q, k, v, layout


@pytest.mark.parametrize("name", ["causal", "gqa-seqused"])
def test_packed_tma_forward_boxes_every_row_from_one_map(device, monkeypatch, name):
    """The TMA forward on packed sequences (a candidate: specs.with_forward_tma, not
    selected): its replays carry the direct launches' maps, one per array over all of its
    rows (batch 1, from the array's first row whatever the launch's first sequence); the
    kernel adds each sequence's first row."""
    from cuflash import specs
    from test_tma_host import _map_words

    captured, _ = device
    plain = specs.select_forward
    monkeypatch.setattr(specs, "select_forward",
                        lambda *a, **k: specs.with_forward_tma(plain(*a, **k)) or plain(*a, **k))
    backend, rng = NumpyBackend(), np.random.default_rng(2)
    for call in range(2):
        q, k, v, layout = _plain_layout(rng, _CASES[name])
        captured.clear()
        o, m, l, _ = varlen_fastpath.forward(backend, q, k, v, layout)
        assert captured == _direct(q, k, v, layout, (o, m, l)), f"call {call}"
        (function, grid, threads, smem, args), = captured
        for blob, x in zip(args[-3:], (q, k, v)):
            ptr, _, d, rows, heads, batch, *_ = _map_words(blob)
            assert (ptr, d, rows, heads, batch) == (x.ctypes.data, x.shape[2], x.shape[0],
                                                    x.shape[1], 1)


@pytest.mark.parametrize("name", ["causal", "gqa-seqused"])
def test_packed_tma_backward_boxes_every_row_from_one_map(device, monkeypatch, name):
    """The TMA backward on packed sequences (a candidate: specs.with_backward_tma, not
    selected): its replays carry the direct launches' four maps (q, k, v, dO), each over all
    of its array's rows (batch 1)."""
    from cuflash import plan as planning
    from cuflash import specs
    from test_tma_host import _map_words

    captured, _ = device
    plain = specs.select_backward
    monkeypatch.setattr(specs, "select_backward",
                        lambda *a, **k: specs.with_backward_tma(plain(*a, **k)) or plain(*a, **k))
    backend, rng = NumpyBackend(), np.random.default_rng(3)
    for call in range(2):
        q, k, v, layout = _plain_layout(rng, _CASES[name])
        cu_q, cu_k = layout.cu_q, layout.cu_k
        o, m, l, fields = varlen_fastpath.forward(backend, q, k, v, layout)
        do = rng.standard_normal(q.shape).astype(q.dtype)
        captured.clear()
        grads = varlen_fastpath.backward(backend, do, q, k, v, o, _stats(m, l, fields), layout,
                                         False)
        shape = _shape(check_varlen(q, k, v, cu_q, cu_k, layout.max_q, layout.max_k,
                                    **layout.checked()))
        plan = launch.backward_plan(shape, 0, False)
        assert specs.loads_with_tma(plan.main.spec), plan.main.spec.name
        pre = next(c for c in captured if c[0] != "memset")
        workspace = pre[4][4] - planning.backward_workspace(plan).delta
        assert captured == _direct(q, k, v, layout, (o, m, l), do, grads[:3], workspace), \
            f"call {call}"
        launches = [c for c in captured if c[0] != "memset"]
        main = max(launches, key=lambda c: len(c[4]))  # the dK / dV kernel: the most arguments
        for blob, x in zip(main[4][-4:], (q, k, v, do)):
            ptr, _, d, rows, heads, batch, *_ = _map_words(blob)
            assert (ptr, d, rows, heads, batch) == (x.ctypes.data, x.shape[2], x.shape[0],
                                                    x.shape[1], 1)

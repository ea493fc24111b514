"""The CUDA host path of attention_with_kvcache on the CPU, with a NumPy stand-in for the
framework backend and the launches recorded instead of run: a repeated layout (the bound
launch reused) must pack exactly the arguments a fresh plan packs, with the new call's
addresses, and a changed layout must be planned again."""

from __future__ import annotations

import numpy as np
import pytest

from cuflash import decode, launch
from host_backend import NumpyBackend


@pytest.fixture
def launches(monkeypatch):
    calls = []  # the replayed launches, packed but not run
    monkeypatch.setattr(launch, "launch_packed",
                        lambda fn, grid, threads, smem, packer, args, stream, what:
                        calls.append((fn, tuple(grid), threads, smem, tuple(args), stream)))
    monkeypatch.setattr(launch, "memset_async",  # the fused merge's counters: not run
                        lambda ptr, nbytes, stream: None)
    monkeypatch.setattr(decode, "_functions_of", lambda spec, device: (11, 22, 33))
    monkeypatch.setattr("cuflash.launch.device_facts", lambda index: _FACTS)
    decode.forget_plans()
    return calls


_FACTS = launch.DeviceFacts(name="test", arch="sm_90", sm_count=132, smem_optin=227 * 1024)


def _arrays(rng, batch, q_len, cache, heads, heads_kv, dim=64):
    q = rng.standard_normal((batch, q_len, heads, dim)).astype(np.float16)
    k = rng.standard_normal((batch, heads_kv, cache, dim)).astype(np.float16).transpose(0, 2, 1, 3)
    v = rng.standard_normal((batch, heads_kv, cache, dim)).astype(np.float16).transpose(0, 2, 1, 3)
    return q, k, v


def _expected(backend, q, k, v, given, flags, o, lse, workspace):
    problem = decode._problem(backend, q, k, v, given, flags)
    plan = decode.decode_plan(problem.shape, problem.num_splits, 0)
    ops = decode._operands(backend, q, k, v, given, o, lse, problem.shape)
    return plan, decode._params(plan, problem, ops, workspace)


@pytest.mark.parametrize("cache, splits", [(300, 1), (5000, None)])
def test_repeated_layout_packs_what_a_fresh_plan_packs(launches, cache, splits):
    rng = np.random.default_rng(0)
    backend = NumpyBackend()
    flags = dict(causal=True, softmax_scale=None, window=(64, 0), softcap=None,
                 num_splits=splits)
    lens = np.array([cache - 7, cache], dtype=np.int32)
    for call in range(3):  # the first call binds the layout, the others reuse it
        q, k, v = _arrays(rng, 2, 2, cache, 8, 2)
        given = {"cache_seqlens": lens, "block_table": None}
        launches.clear()
        o, lse = decode.decode_cuda(backend, q, k, v, given, flags)
        assert len(decode._bound) == 1
        split = next(c for c in launches if c[0] == 11)
        workspace = split[4][10]  # o_part: the scratch's address (0 without splits)
        plan, want = _expected(backend, q, k, v, {"cache_seqlens": lens}, flags, o, lse,
                               workspace)
        assert split[4] == want, f"call {call}"
        assert (split[1], split[2], split[3]) == (plan.grid, plan.spec.threads,
                                                  plan.spec.smem_bytes)
        assert split[5] == 1234
        assert [c[0] for c in launches] == [11] + ([22] if plan.combine_grid else [])
        assert o.shape == q.shape and lse.shape == (2, 8, 2)


def test_a_new_layout_is_planned_again(launches):
    rng = np.random.default_rng(1)
    backend = NumpyBackend()
    flags = dict(causal=False, softmax_scale=None, window=None, softcap=None, num_splits=None)
    for cache in (256, 257, 256):
        q, k, v = _arrays(rng, 1, 1, cache, 4, 4)
        launches.clear()
        o, lse = decode.decode_cuda(backend, q, k, v, {}, flags)
        plan, want = _expected(backend, q, k, v, {}, flags, o, lse, launches[0][4][10])
        assert launches[0][4] == want
    assert len(decode._bound) == 2


def test_a_misaligned_address_is_checked_again(launches, monkeypatch):
    """A hit skips the checks, so it must not skip the alignment they enforce (on CUDA
    arrays; host arrays are not checked for it, so here: the checks run again)."""
    rng = np.random.default_rng(2)
    backend = NumpyBackend()
    checked, real = [], decode._check
    monkeypatch.setattr(decode, "_check", lambda *a: checked.append(1) or real(*a))
    flags = dict(causal=False, softmax_scale=None, window=None, softcap=None, num_splits=None)
    q, k, v = _arrays(rng, 1, 1, 256, 4, 4)
    decode.decode_cuda(backend, q, k, v, {}, flags)
    decode.decode_cuda(backend, q.copy(), k, v, {}, flags)
    assert len(checked) == 1
    storage = np.empty(q.size + 8, dtype=q.dtype)
    start = next(i for i in range(8) if (storage[i:].ctypes.data % 16) == 2)
    shifted = storage[start:start + q.size].reshape(q.shape)  # same layout, 2 bytes off
    shifted[...] = q
    decode.decode_cuda(backend, shifted, k, v, {}, flags)
    assert len(checked) == 2


def _paged_append(rng):
    """q, paged k / v (6 pages of 16), and an append with a page table, ALiBi and lengths."""
    q = rng.standard_normal((2, 1, 8, 64)).astype(np.float16)
    k_pages, v_pages = (rng.standard_normal((6, 16, 2, 64)).astype(np.float16)
                        for _ in range(2))
    given = {"cache_seqlens": np.array([20, 30], np.int32),
             "block_table": rng.permutation(6).reshape(2, 3).astype(np.int32),
             "k_new": rng.standard_normal((2, 1, 2, 64)).astype(np.float16),
             "v_new": rng.standard_normal((2, 1, 2, 64)).astype(np.float16),
             "alibi_slopes": rng.random(8).astype(np.float32)}
    return q, k_pages, v_pages, given


@pytest.mark.parametrize("fused", [False, True], ids=["combine", "fused"])
def test_a_paged_append_replays_every_address(launches, monkeypatch, fused):
    """Append, page table, ALiBi slopes and cache lengths: each launch (append, split,
    combine) of a replay carries this call's addresses in every slot. With
    decode.FUSED_COMBINE there is no combine kernel: each replay zeroes this call's ticket
    counters (4 bytes a row tile at workspace + counter_offset, after the append, before the
    split), whose address the split gets as DecodeParams.split_counters."""
    memsets = []
    monkeypatch.setattr(launch, "memset_async",
                        lambda ptr, nbytes, stream: memsets.append((len(launches), ptr, nbytes)))
    monkeypatch.setattr(decode, "FUSED_COMBINE", fused)
    rng = np.random.default_rng(3)
    backend = NumpyBackend()
    flags = dict(causal=True, softmax_scale=None, window=None, softcap=None, num_splits=4)
    for call in range(3):
        q, k_pages, v_pages, given = _paged_append(rng)
        launches.clear(), memsets.clear()
        o, lse = decode.decode_cuda(backend, q, k_pages, v_pages, given, flags)
        workspace = next(c for c in launches if c[0] == 11)[4][10]
        plan, want = _expected(backend, q, k_pages, v_pages, given, flags, o, lse, workspace)
        assert plan.fuses == fused == (plan.combine_grid is None) and workspace != 0
        assert [c[0] for c in launches] == [33, 11] + ([] if fused else [22]), f"call {call}"
        assert all(c[4] == want for c in launches), f"call {call}"
        counters = workspace + plan.counter_offset if fused else 0
        assert want[12] == counters and counters % 16 == 0
        assert memsets == ([(1, counters, 4 * plan.grid[0])] if fused else []), f"call {call}"
        assert not fused or plan.counter_offset + 4 * plan.grid[0] == plan.workspace_bytes
    assert len(decode._bound) == 1

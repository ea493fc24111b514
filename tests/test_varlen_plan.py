"""Varlen in the kernels' plumbing, on the CPU: spec names and defines, selection, the pure
plan (grids over the max lengths, scratch over the total rows) and the launch arguments
(sequence offsets, batch slices), against docs/varlen.md and docs/kernel_abi.md."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cuflash import launch, plan, registry, specs
from cuflash.specs import ModFlags

VARLEN = ModFlags(varlen=True)
H100 = specs.DeviceFacts(name="H100", arch="sm_90", sm_count=132, smem_optin=227 * 1024)
A100 = specs.DeviceFacts(name="A100", arch="sm_80", sm_count=108, smem_optin=163 * 1024)


def _shape(batch=3, max_q=300, max_k=500, total_q=700, total_k=1000, causal=True,
           mods=VARLEN, heads=8, heads_kv=2, dtype="bfloat16"):
    return plan.Shape(batch, max_q, max_k, heads, heads_kv, 128, dtype, causal, mods,
                      total_q, total_k)


def _spills_packed(spec) -> bool:
    """The registry skips ``spec``'s tile on packed sequences with its knobs (spills_when)."""
    if spec.kind == "bwd_pre":
        return False
    knobs = {"varlen", *(("causal",) if spec.causal else ())}
    tile = next(t for t in spec.variant.tiles[spec.head_dim] if (t.warps, t.block_m, t.block_n,
                t.stages) == (spec.warps, spec.block_m, spec.block_n, spec.stages))
    return tile.spills(knobs)


def test_every_family_serves_varlen():
    assert all("varlen" in v.modifiers for v in registry.VARIANTS)


@pytest.mark.parametrize("facts", [H100, A100], ids=["sm_90", "sm_80"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_picks_the_dense_tiles_under_its_own_name(facts, dtype, causal):
    """The sequence layout changes no tile (unless the registry records that the dense tile
    spills on packed sequences): the same choice, `_varlen` in the name (the cache key) and
    CF_VARLEN=1 among the defines; dense specs do not define it at all."""
    for direction, kw in (("forward", {}), ("backward", dict(deterministic=False)),
                          ("backward", dict(deterministic=True)), ("backward_dq", {}),
                          ("backward_pre", {})):
        dense = specs.select(direction, facts, dtype, 128, causal, **kw)
        packed = specs.select(direction, facts, dtype, 128, causal, mods=VARLEN, **kw)
        if _spills_packed(dense):  # the next tile of the list, with the same layout rules
            assert (packed.kind, packed.dtype) == (dense.kind, dense.dtype)
            assert packed.name.endswith("_varlen") and packed.defines["CF_VARLEN"] == 1
            assert not _spills_packed(replace(packed, mods=dense.mods))
            continue
        assert replace(packed, mods=dense.mods) == dense
        assert packed.name == dense.name + "_varlen"
        assert packed.defines == {**dense.defines, "CF_VARLEN": 1}
        assert "CF_VARLEN" not in dense.defines


def test_hopper_backward_d64_causal_varlen_takes_the_tile_that_does_not_spill():
    dense = specs.select_backward(H100, "bfloat16", 64, True, False)
    packed = specs.select_backward(H100, "bfloat16", 64, True, False, mods=VARLEN)
    # the warp-specialized tile (12 warps) does not spill with either
    assert (dense.warps, dense.block_m) == (packed.warps, packed.block_m) == (12, 128)
    # behind it, the 8-warp 128-query tile (which spills on causal packed sequences) is
    # skipped for the 64-query one
    variant = specs.variant_of("bwd90", "bfloat16")
    eight = [t for t in variant.candidates(64, "sm_90", frozenset({"causal", "varlen"}))
             if t.warps == 8]
    assert eight[0].block_m == 64
    assert specs.select_backward(H100, "bfloat16", 64, False, False, mods=VARLEN).block_m == 128


def test_backward_pre_keeps_varlen_and_sinks():
    flags = ModFlags(window=True, softcap=True, sinks=True, varlen=True)
    assert flags.for_direction("backward_pre") == ModFlags(sinks=True, varlen=True)
    assert flags.for_direction("backward").varlen
    assert specs.select_backward_pre("float16", mods=flags).mods.varlen


def test_plan_grids_cover_the_longest_sequence_and_scratch_the_total_rows():
    shape = _shape()
    fwd = plan.plan_forward(shape, H100)
    spec = fwd.kernel.spec
    assert spec.mods.varlen and fwd.kernel.grid == (-(-300 // spec.block_m), 8, 3)
    bwd = plan.plan_backward(shape, H100, deterministic=False)
    assert bwd.main.grid[0] == -(-500 // bwd.main.spec.block_n)
    assert bwd.pre.grid == (-(-300 // specs.PRE_ROWS), 8, 3)
    ws = bwd.scratch
    assert ws.dq_accum == 0 and ws.delta >= 4 * 700 * 8 * 128  # dq_accum: (total_q, h, d)
    assert ws.total_bytes - ws.lse2 >= 4 * 8 * 700  # lse2: (heads, total_q)
    if bwd.kv_splits > 1:
        assert bwd.kv_convert.grid[0] == -(-500 // specs.PRE_ROWS)
        assert ws.dv_accum - ws.dk_accum >= 4 * 1000 * 2 * 128


def test_dense_workspace_is_unchanged():
    dense = plan.Shape(3, 300, 500, 8, 2, 128, "bfloat16", True)
    assert dense.rows_q == 900 and dense.rows_k == 1500
    ws = plan.workspace(dense, dq_accum=True, kv_accum=True)
    assert ws.dk_accum == plan._aligned(4 * 900 * 8 * 128)


def test_empty_varlen_shapes():
    assert _shape(total_q=0).empty
    assert _shape(total_k=0).empty and _shape(max_k=0, total_k=0).empty
    assert not _shape().empty


def test_kv_splits_count_the_real_key_tiles():
    """GQA on Hopper: the splits follow the sequences' key tiles, not batch * max_seqlen."""
    spec = specs.select_backward(H100, "bfloat16", 128, True, False, mods=VARLEN)
    few = _shape(batch=64, max_k=4096, total_k=64 * 128, heads=32, heads_kv=4)
    dense_like = replace(few, mods=specs.NO_MODS)
    assert plan.kv_head_splits(few, spec, 132) >= plan.kv_head_splits(dense_like, spec, 132)


def test_seq_args_move_only_the_offsets_in_a_batch_slice():
    seq = launch.SeqArgs(0x1000, 0x2000, 0x3000, 777)
    assert seq.varlen and seq.kernel_args() == (0x1000, 0x2000, 0x3000, 777)
    assert seq.kernel_args(5) == (0x1000 + 20, 0x2000 + 20, 0x3000 + 20, 777)
    assert launch.SeqArgs(0x1000, 0x2000, 0, 9).kernel_args(2) == (0x1008, 0x2008, 0, 9)
    assert not launch.DENSE.varlen and launch.DENSE.kernel_args(3) == (0, 0, 0, 0)


def test_forward_launch_arguments(monkeypatch):
    """Sliced varlen forward: q, k, v, o, m, l addresses stay put (stride_b 0, statistics
    addressed through the offsets), the offsets and slopes move by the slice's first entry."""
    calls = []
    monkeypatch.setattr(launch, "_launch", lambda kernel, dev, z, sig, args, stream, s:
                        calls.append((z, sig, args)))
    monkeypatch.setattr(plan, "MAX_GRID_YZ", 2)
    shape = _shape(batch=5)
    p = plan.plan_forward(shape, H100)
    ops = [launch.Operand(0x10000 * (i + 1), 0, 2048, 128, 2) for i in range(4)]
    mods = launch.ModArgs(alibi=0x9000, stride_alibi_b=8)
    seq = launch.SeqArgs(0x1000, 0x2000, 0, 700)
    launch.run_forward(p, *ops, 0x50000, 0x60000, 0.1, 0, 0, mods, seq)
    assert [z for z, _, _ in calls] == [2, 2, 1]
    for (z, sig, args), b0 in zip(calls, (0, 2, 4)):
        assert len(args) == len(sig)
        # the bulk-copy forward (registry.FWD90_TMA) ends with its tensor maps (T), built
        # once over the whole packed tensors: the slices move the offsets, not the maps
        maps = len(sig) - len(sig.rstrip("T"))
        assert len(sig) - maps == len(launch._SIGNATURES[p.kernel.spec.kind])
        assert maps == (3 if specs.loads_with_tma(p.kernel.spec) else 0)
        args = args[:len(args) - maps]
        assert args[:6] == (0x10000, 0x20000, 0x30000, 0x40000, 0x50000, 0x60000)
        assert args[-4:] == (0x1000 + 4 * b0, 0x2000 + 4 * b0, 0, 700)
        assert args[6:8] == (300, 500)  # the grid's lengths
        alibi_at = len(args) - 4 - 1 - 2  # ... slopes, stride, sinks, then the sequence args
        assert args[alibi_at] == 0x9000 + 4 * b0 * 8
    if maps:
        assert calls[0][2][-maps:] == calls[2][2][-maps:]


def test_backward_launch_arguments(monkeypatch):
    """Varlen backward: every kernel gets the sequence arguments; scratch is not offset per
    entry; the dQ convert takes cu_seqlens_q (and the tiled accumulator's bucket and the
    softmax scale where the main kernel adds dQ in pieces), the dK / dV convert cu_seqlens_k
    (row layout, scale 1)."""
    calls = []
    monkeypatch.setattr(launch, "_launch", lambda kernel, dev, z, sig, args, stream, s,
                        convert=False: calls.append((kernel.spec.kind, convert, sig, args)))

    class _Runtime:
        @staticmethod
        def memsetAsync(*args):
            pass

    import sys
    import types

    fake = types.ModuleType("cupy_backends.cuda.api.runtime")
    fake.memsetAsync = _Runtime.memsetAsync
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.api.runtime", fake)
    api = sys.modules.get("cupy_backends.cuda.api")
    if api is not None:
        monkeypatch.setattr(api, "runtime", fake, raising=False)
    shape = _shape(batch=4, heads=32, heads_kv=4)
    p = plan.plan_backward(shape, H100, deterministic=False)
    ops = [launch.Operand(0x10000 * (i + 1), 0, 4096, 128, 2) for i in range(8)]
    seq = launch.SeqArgs(0x1000, 0x2000, 0x3000, 700)
    launch.run_backward(p, *ops[:5], 0x70000, 0x80000, *ops[5:], 0.1, 0xA00000, 0, 0,
                        launch.PLAIN, seq)
    kinds = [(k, c) for k, c, _, _ in calls]
    assert kinds[0] == ("bwd_pre", False) and kinds[1][0] == p.main.spec.kind
    assert p.main.spec.dq_tiled  # (H100: the 12-warp backward, bulk dQ)
    tiled = (p.main.spec.head_dim, 0.1)
    for kind, convert, sig, args in calls:
        assert len(args) == len(sig)
        if convert:  # cu_seqlens, then tile_d and the scale
            assert args[-3] in (0x1000, 0x2000)
            assert args[-2:] == (tiled if args[-3] == 0x1000 else (0, 1.0))
        else:  # (a TMA kernel's tensor maps, signature letter T, come after them)
            maps = len(sig) - len(sig.rstrip("T"))
            assert args[len(args) - maps - 4:len(args) - maps] == (0x1000, 0x2000, 0x3000,
                                                                    700), kind
    converts = [args[-3] for _, c, _, args in calls if c]
    assert converts[0] == 0x1000 and all(c == 0x2000 for c in converts[1:])
    assert len(converts) == (3 if p.kv_splits > 1 else 1)

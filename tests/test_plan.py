"""The planner as a pure function: kernels, grids, batch slices, GQA splits, scratch layout."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuflash import plan, specs
from cuflash.plan import Shape

H200 = specs.DeviceFacts(name="H200", arch="sm_90", sm_count=132, smem_optin=227 * specs.KIB)
A100 = specs.DeviceFacts(name="A100", arch="sm_80", sm_count=108, smem_optin=163 * specs.KIB)


def shape(batch=1, seqlen_q=4096, seqlen_k=4096, heads=16, heads_kv=16, head_dim=128,
          dtype="bfloat16", causal=True) -> Shape:
    return Shape(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype, causal)


def test_forward_plan_names_the_selected_spec_and_grid():
    p = plan.plan_forward(shape(batch=3), H200)
    spec = specs.select_forward(H200, "bfloat16", 128, True)
    assert p.kernel.spec == spec and p.labels == (spec.name,)
    assert p.kernel.grid == (4096 // spec.block_m, 16, 3)
    assert p.kernel.batch_per_launch == 3


@pytest.mark.parametrize("batch, causal, blocks", [
    (1, True, 132), (2, False, 66), (4, False, 33), (4, True, 32), (16, True, 8), (7, False, 18)])
def test_persistent_forward_grid(batch, causal, blocks):
    """Whole blocks per batch entry, about one per SM, the count that splits the work most
    evenly (4 x 4k causal: 128 blocks split it in quarter entries, 132 would not)."""
    spec = specs.select_forward(H200, "bfloat16", 128, causal).with_knobs(CF_FWD_PERSISTENT=1)
    p = plan.plan_forward(shape(batch=batch, seqlen_q=16384 // min(batch, 16),
                                seqlen_k=16384 // min(batch, 16), causal=causal), H200,
                          spec=spec)
    assert p.kernel.spec == spec and p.kernel.grid == (blocks, 1, batch)


@pytest.mark.parametrize("batch", [40, 100, 133, 1000])
def test_persistent_forward_falls_back_where_sms_would_idle(batch):
    spec = specs.select_forward(H200, "bfloat16", 128, True).with_knobs(CF_FWD_PERSISTENT=1)
    p = plan.plan_forward(shape(batch=batch), H200, spec=spec)
    assert p.kernel.spec == spec.without_knob("CF_FWD_PERSISTENT")
    assert p.kernel.grid == (4096 // spec.block_m, 16, batch)


def test_persistent_forward_takes_one_block_per_pair_when_few():
    spec = specs.select_forward(H200, "bfloat16", 64, False).with_knobs(CF_FWD_PERSISTENT=1)
    p = plan.plan_forward(shape(batch=3, seqlen_q=300, head_dim=64, heads=4), H200, spec=spec)
    pairs = -(-300 // spec.block_m) * 4
    assert pairs < 132 // 3 and p.kernel.grid == (pairs, 1, 3)


def test_persistent_forward_only_on_the_warp_specialized_kernel():
    spec = specs.select_forward(H200, "bfloat16", 256, False).with_knobs(CF_FWD_PERSISTENT=1)
    p = plan.plan_forward(shape(head_dim=256, causal=False), H200, spec=spec)
    assert p.kernel.spec == spec.without_knob("CF_FWD_PERSISTENT")


@pytest.mark.parametrize("head_dim, causal, mods", [
    (64, False, ()), (128, False, ()), (128, False, ("softcap",)), (64, True, ()),
    (128, True, ()), (64, False, ("dropout",)), (128, False, ("alibi", "sinks"))])
def test_packed_sequences_of_one_length_plan_like_the_dense_call(head_dim, causal, mods):
    """Uniform packed lengths (total rows = batch x max) take the dense call's persistent
    blocks and grid where the tile is the same; other lengths keep one block per tile."""
    flags = specs.ModFlags(**{m: True for m in mods})
    dense = plan.plan_forward(plan.Shape(8, 1024, 1024, 16, 16, head_dim, "bfloat16", causal,
                                         flags), H200)
    varlen = replace(flags, varlen=True)
    uniform = plan.plan_forward(plan.Shape(8, 1024, 1024, 16, 16, head_dim, "bfloat16", causal,
                                           varlen, total_q=8 * 1024, total_k=8 * 1024), H200)
    ragged = plan.plan_forward(plan.Shape(8, 1024, 1024, 16, 16, head_dim, "bfloat16", causal,
                                          varlen, total_q=8 * 1024 - 5, total_k=8 * 1024), H200)
    persistent = dict(dense.kernel.spec.knobs).get(plan.PERSISTENT)
    tiles = lambda p: (p.kernel.spec.block_m, p.kernel.spec.warps)  # noqa: E731
    if tiles(dense) == tiles(uniform):
        assert dict(uniform.kernel.spec.knobs).get(plan.PERSISTENT) == persistent
        assert uniform.kernel.grid == dense.kernel.grid
    else:  # (causal d64 packs take two consumers: no persistent split priced for them)
        assert plan.PERSISTENT not in dict(uniform.kernel.spec.knobs)
    assert plan.PERSISTENT not in dict(ragged.kernel.spec.knobs)
    assert ragged.kernel.grid[1] == 16  # one block per (tile, head)
    if not causal and not mods and head_dim == 64:
        assert persistent  # the case this rule exists for (d128: one block per tile)


def test_backward_plan_stages():
    atomic = plan.plan_backward(shape(), H200, deterministic=False)
    assert atomic.main.spec.kind == "bwd90" and atomic.dq is None
    assert atomic.dq_convert is atomic.pre and atomic.labels[0].startswith("bwd_pre")
    det = plan.plan_backward(shape(), H200, deterministic=True)  # ordered dQ on Hopper
    assert det.main.spec.kind == "bwd90" and det.main.spec.dq_ordered and det.dq is None
    assert det.dq_convert is det.pre and det.kv_splits == 1
    assert det.scratch.dq_semaphore is not None
    portable = plan.plan_backward(shape(), A100, deterministic=True)
    assert portable.main.spec.kind == "bwd" and portable.dq.spec.kind == "bwd_dq"
    assert portable.dq_convert is None and portable.kv_splits == 1


@pytest.mark.parametrize("batch", [65535, 65536, 200_001])
def test_large_batches_are_split_over_launches(batch):
    """Grid z <= 65535 always; the launches together cover every batch entry (issue: a
    backward with head-dim chunks at batch > 32767 used to fail with a bare driver error)."""
    s = shape(batch=batch, seqlen_q=8, seqlen_k=8, heads=2, heads_kv=2, head_dim=256)
    fwd = plan.plan_forward(s, A100)
    bwd = plan.plan_backward(s, A100, deterministic=False)
    assert bwd.n_chunks == 2
    for launch, z_per_batch in ((fwd.kernel, 1), (bwd.main, bwd.n_chunks), (bwd.pre, 1)):
        assert launch.grid[2] <= plan.MAX_GRID_YZ
        assert launch.grid[2] == launch.batch_per_launch * z_per_batch
        covered = sum(min(launch.batch_per_launch, batch - b0)
                      for b0 in range(0, batch, launch.batch_per_launch))
        assert covered == batch


@pytest.mark.parametrize("heads,heads_kv,seqlen,expect", [
    (16, 4, 4096, 4),    # 32 key tiles x 4 kv heads = 128 blocks: split to one head each
    (16, 16, 4096, 1),   # MHA: nothing to split
    (32, 8, 16384, 1),   # 128 key tiles x 8 = 1024 blocks: already several waves
    (16, 1, 4096, 16),   # MQA: 32 blocks, split to 512
    (12, 4, 2048, 3),    # 16 x 4 = 64 blocks: the largest divisor of 3
])
def test_gqa_backward_splits_query_heads_until_waves(heads, heads_kv, seqlen, expect):
    s = shape(heads=heads, heads_kv=heads_kv, seqlen_q=seqlen, seqlen_k=seqlen)
    p = plan.plan_backward(s, H200, deterministic=False)
    assert p.kv_splits == expect
    assert (s.heads_per_kv % p.kv_splits) == 0
    assert p.main.grid[2] == s.batch * p.kv_splits
    assert (p.kv_convert is not None) == (expect > 1)


@pytest.mark.parametrize("heads_kv,causal,expect", [
    (4, True, 2),    # 32 key tiles x 4 kv heads x batch 4 = 512 blocks: four waves want 2
    (4, False, 1),   # the same blocks alike in length: two waves, no split
    (1, True, 8),    # MQA: 128 blocks, 8 splits for four waves
    (1, False, 4),
])
def test_causal_gqa_backward_splits_until_four_waves(heads_kv, causal, expect):
    """Causal blocks differ in length, so the split asks for four waves of them (session 39,
    bench/dev/gqa_backward.py --splits: 4k causal GQA 0.88 -> 0.94x MHA per FLOP, MQA 0.87
    -> 0.95x on an H100)."""
    s = shape(batch=4, heads=16, heads_kv=heads_kv, causal=causal)
    assert plan.plan_backward(s, H200, deterministic=False).kv_splits == expect


def test_gqa_split_only_on_the_hopper_kernel():
    s = shape(heads=16, heads_kv=4)
    assert plan.plan_backward(s, A100, deterministic=False).kv_splits == 1
    assert plan.plan_backward(s, H200, deterministic=True).kv_splits == 1


def test_workspace_layout():
    s = shape(batch=2, seqlen_q=100, seqlen_k=70, heads=8, heads_kv=2, head_dim=64)
    ws = plan.workspace(s, dq_accum=True, kv_accum=True)
    assert ws.dq_accum == 0
    assert ws.dk_accum >= 4 * 2 * 100 * 8 * 64 and ws.dv_accum >= ws.dk_accum + 4 * 2 * 70 * 2 * 64
    assert ws.zeroed_bytes == ws.delta and ws.lse2 >= ws.delta + 4 * 2 * 8 * 100
    assert all(x % plan.SCRATCH_ALIGN == 0 for x in (ws.dk_accum, ws.dv_accum, ws.delta, ws.lse2))
    det = plan.workspace(s, dq_accum=False, kv_accum=False)
    assert det.dq_accum is None and det.dq_semaphore is None and det.zeroed_bytes == 0
    ordered = plan.workspace(s, dq_accum=True, kv_accum=False, semaphore_tiles=64)
    assert ordered.dq_semaphore >= 4 * 2 * 100 * 8 * 64  # after dq_accum
    assert ordered.delta - ordered.dq_semaphore >= 4 * 2 * 8 * 2  # batch, heads, 2 tiles
    assert ordered.zeroed_bytes == ordered.delta  # the semaphores start at 0
    for deterministic in (False, True):
        bound = plan.workspace_bound(s, deterministic)
        for p in (plan.plan_backward(s, H200, deterministic),
                  plan.plan_backward(s, A100, deterministic)):
            assert plan.backward_workspace(p).total_bytes <= bound.total_bytes


def test_bulk_dq_in_the_warp_specialized_backward():
    """specs.with_bulk_dq: the H200's 12-warp backward at head_dim 64 and 128, atomic or
    deterministic (ordered), gets the tiled dQ accumulator, on fixed and packed lengths; the
    8-warp kernels (an A100's; the role split at head_dim 256 where the head-dim split does not
    serve), a budget without room for the two 16 KB pieces, and packed sequences whose batch
    needs several launches keep the atomics. (The head-dim split at 256 adds dQ in bulk
    too, half a piece a warpgroup.)"""
    def main(facts, head_dim=128, deterministic=False, mods=specs.NO_MODS, batch=1):
        s = Shape(batch, 4096, 4096, 16, 16, head_dim, "bfloat16", True, mods,
                  total_q=4096 * batch if mods.varlen else 0,
                  total_k=4096 * batch if mods.varlen else 0)
        return plan.plan_backward(s, facts, deterministic).main.spec

    varlen = specs.ModFlags(varlen=True)

    for head_dim in (64, 128):
        spec = main(H200, head_dim)
        assert spec.warps == 12 and spec.dq_tiled
        assert spec.smem_bytes == replace(spec, knobs=()).smem_bytes + 2 * 16384
        ordered = main(H200, head_dim, deterministic=True)
        assert ordered.dq_ordered and ordered.dq_tiled
        assert main(H200, head_dim, mods=varlen).dq_tiled
        sliced = main(H200, head_dim, mods=varlen, batch=plan.MAX_GRID_YZ + 1)
        assert sliced.warps == 12 and not sliced.dq_tiled
        assert main(H200, head_dim, mods=specs.ModFlags(dropout=True)).dq_tiled
    assert not main(H200, 256, mods=specs.ModFlags(dropout=True)).dq_tiled  # the role split
    assert main(H200, 256).dq_tiled and not main(A100).dq_tiled
    no_room = H200.with_budget(main(H200).smem_bytes - 1)
    spec = main(no_room)
    assert spec.warps == 12 and not spec.dq_tiled


def test_tiled_dq_workspace_covers_whole_pieces():
    """The tiled dQ accumulator: pieces of 64 rows x 64 columns over the rows rounded up to
    64 and the head-dim bucket, per batch entry; at least the row layout's size."""
    s = shape(batch=3, seqlen_q=130, seqlen_k=70, heads=8, heads_kv=2, head_dim=96)
    assert plan.tiled_dq_entry_bytes(s, 128) == 4 * 8 * 192 * 128
    tiled = plan.workspace(s, dq_accum=True, kv_accum=True, dq_tile_d=128)
    rows = plan.workspace(s, dq_accum=True, kv_accum=True)
    assert tiled.dq_accum_bytes >= 3 * plan.tiled_dq_entry_bytes(s, 128) > rows.dq_accum_bytes
    assert tiled.dk_accum >= tiled.dq_accum_bytes


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), min_size=1, max_size=9),
       heads=st.integers(1, 3), tile_d=st.sampled_from([64, 128, 192, 256]))
def test_packed_dq_pieces_never_overlap_and_fit(lengths, heads, tile_d):
    """Packed sequences' tiled dQ (cf_common.cuh's dq_tile_piece_packed, mirrored here):
    sequence b's rows own piece rows cu_seqlens_q[b] // 64 + b + i // 64. No two sequences
    share a piece, and every piece lies inside plan.tiled_dq_bytes."""
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    s = Shape(len(lengths), max(max(lengths), 1), 8, heads, heads, tile_d, "bfloat16", False,
              specs.ModFlags(varlen=True), total_q=int(cu[-1]), total_k=8 * len(lengths))
    piece_bytes = 64 * 64 * 4
    owner = {}
    for b, n in enumerate(lengths):
        for i in range(0, n, 64):
            for h in range(heads):
                for c in range(0, tile_d, 64):
                    row = cu[b] // 64 + b + i // 64
                    piece = (row * heads + h) * (tile_d // 64) + c // 64
                    assert owner.setdefault(piece, b) == b, (piece, owner[piece], b)
                    assert (piece + 1) * piece_bytes <= plan.tiled_dq_bytes(s, tile_d)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), seqlen_q=st.integers(1, 700), seqlen_k=st.integers(1, 700),
       heads_kv=st.integers(1, 3), group=st.sampled_from([1, 2, 4]),
       head_dim=st.sampled_from([8, 32, 64, 72, 96, 128, 192, 256]),
       dtype=st.sampled_from(["bfloat16", "float16", "float32"]), causal=st.booleans(),
       deterministic=st.booleans(), varlen=st.booleans())
def test_workspace_bound_holds_for_every_plan(batch, seqlen_q, seqlen_k, heads_kv, group,
                                             head_dim, dtype, causal, deterministic, varlen):
    """plan.workspace_bound (what the XLA FFI targets allocate before the device is known) is
    at least every plan's workspace, the tiled dQ accumulator's included (packed sequences:
    total rows below batch x the max lengths)."""
    mods = specs.ModFlags(varlen=varlen)
    totals = dict(total_q=batch * seqlen_q - (batch - 1), total_k=batch * seqlen_k - (batch - 1)
                  ) if varlen else {}
    s = Shape(batch, seqlen_q, seqlen_k, heads_kv * group, heads_kv, head_dim, dtype, causal,
              mods, **totals)
    bound = plan.workspace_bound(s, deterministic).total_bytes
    for facts in (H200, A100, H200.with_budget(99 * specs.KIB)):
        try:
            p = plan.plan_backward(s, facts, deterministic)
        except ValueError:  # no tile at this budget
            continue
        assert plan.backward_workspace(p).total_bytes <= bound, p.main.spec.name


def test_memoized_plans_follow_the_configuration(monkeypatch):
    facts_calls = []

    def facts_of(device_id):
        facts_calls.append(device_id)
        return H200.with_budget(specs.smem_budget_override())

    s = shape(seqlen_q=77, seqlen_k=77)
    first = plan.forward_plan(s, 0, facts_of)
    assert plan.forward_plan(s, 0, facts_of) is first and facts_calls == [0]
    monkeypatch.setenv("CUFLASH_DISABLE_WGMMA", "1")
    assert plan.forward_plan(s, 0, facts_of).kernel.spec.kind == "fwd"
    monkeypatch.delenv("CUFLASH_DISABLE_WGMMA")
    specs.set_smem_budget(48 * specs.KIB)
    try:
        small = plan.forward_plan(s, 0, facts_of)
        assert small.kernel.spec.smem_bytes <= 48 * specs.KIB
    finally:
        specs.set_smem_budget(None)


def test_parameter_buffers_end_at_the_last_parameter():
    """The driver refuses a parameter buffer longer than the kernel's parameters (it said
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES for the struct's 4 bytes of tail padding)."""
    from cuflash import launch

    fwd = launch.param_packer(launch._SIGNATURES["fwd"]).size
    # ints padded to the long longs' alignment; then the modifiers (iifff, p, q), sinks (p)
    # ... and the sequence layout (ppp, i)
    assert fwd == 6 * 8 + 5 * 4 + 4 + 12 * 8 + 4 + 5 * 4 + 8 + 8 + 8 + 3 * 8 + 4
    convert = launch.param_packer(launch._SIGNATURES["convert"]).size
    assert convert == 2 * 8 + 3 * 4 + 4 + 3 * 8 + 8 + 4 + 4  # + cu_seqlens, tile_d, scale


def launch_signatures() -> dict:
    from cuflash import decode, launch

    return {**launch._SIGNATURES, "decode": decode._PARAMS_SIGNATURE}


@pytest.mark.parametrize("kind", sorted(launch_signatures()))
def test_parameter_buffers_are_laid_out_as_c_structs(kind):
    """struct's native mode packs every entry point's parameters byte for byte as a C
    compiler lays out the same fields (ctypes.Structure): offsets, padding, values."""
    import ctypes

    from cuflash import launch

    signature = launch_signatures()[kind]
    types = {"p": ctypes.c_void_p, "i": ctypes.c_int, "q": ctypes.c_longlong,
             "f": ctypes.c_float}
    fields = [(f"a{i}", types[c]) for i, c in enumerate(signature)]
    as_c = type("Params", (ctypes.Structure,), {"_fields_": fields})
    values = [(i + 1) * (8 if c == "p" else 1) if c != "f" else 0.5 + i
              for i, c in enumerate(signature)]
    packer = launch.param_packer(signature)
    last = getattr(as_c, fields[-1][0])
    assert packer.size == last.offset + last.size
    assert packer.pack(*values) == bytes(as_c(*values))[:packer.size]



_ENTRY_FILES = [("fwd", "flash_fwd.cu"), ("fwd", "flash_fwd_fp32.cu"),
                ("fwd90", "flash_fwd_sm90.cu"), ("bwd", "flash_bwd.cu"),
                ("bwd", "flash_bwd_split.cu"), ("bwd", "flash_bwd_fp32.cu"),
                ("bwd90", "flash_bwd_sm90.cu"), ("bwd90", "flash_bwd_sm90_ws.cu"),
                ("bwd90", "flash_bwd_sm90_hsplit.cu"), ("bwd_dq", "flash_bwd_dq.cu"),
                ("bwd_dq", "flash_bwd_dq_fp32.cu"),
                ("bwd_pre", "flash_bwd_pre.cu"), ("convert", "flash_bwd_pre.cu")]
_ENTRY_NAMES = {"convert": "flash_bwd_dq_convert", "bwd_pre": "flash_bwd_preprocess"}


@pytest.mark.parametrize("kind,filename", _ENTRY_FILES)
def test_parameter_signatures_match_the_kernel_sources(kind, filename):
    """Each launcher signature, letter by letter, against the entry point's declaration."""
    import re

    from cuflash import compiler, launch, registry

    entry = _ENTRY_NAMES.get(kind) or next(v.entry for v in registry.VARIANTS if v.kind == kind
                                           and filename in v.sources)
    source = (compiler.kernels_dir() / filename).read_text()
    # the entry points' own parameter lists, as cf_params.cuh spells them (R: a qualifier)
    params_header = (compiler.kernels_dir() / "cf_params.cuh").read_text()
    for name, body in re.findall(r"#define (CF_\w+_PARAMS)(?:\(R\))?\s*\\\n(.*?)\n\n",
                                 params_header + "\n\n", re.S):
        body = re.sub(r"\\\n", " ", body).replace(" R ", " ")
        source = re.sub(rf"\b{name}\b(\([^)]*\))?", lambda _: body, source)
    # the modifier parameters every attention kernel takes, as cf_mask.cuh spells them
    mask_header = (compiler.kernels_dir() / "cf_mask.cuh").read_text()
    mod_params = re.search(r"#define CF_MOD_PARAMS\s*\\\n(.*?)\n#define", mask_header, re.S)
    source = source.replace("CF_MOD_PARAMS", re.sub(r"\\\n", " ", mod_params.group(1)))
    # ... and the sequence layout's (cf_seq.cuh)
    seq_header = (compiler.kernels_dir() / "cf_seq.cuh").read_text()
    seq_params = re.search(r"#define CF_SEQ_PARAMS\s*\\\n(.*?)\n", seq_header, re.S)
    source = source.replace("CF_SEQ_PARAMS", seq_params.group(1))
    match = re.search(rf"\b{entry}\(([^)]*)\)\s*{{", source)
    assert match, f"{entry} not found in {filename}"
    letters = ""
    for param in match.group(1).split(","):
        param = param.strip()
        letters += ("p" if "*" in param else "q" if "long long" in param
                    else "f" if param.startswith("float") else "i")
    assert letters == launch._SIGNATURES[kind]


def test_plans_take_the_configuration_and_a_pinned_spec():
    from cuflash.config import Config

    s = shape(seqlen_q=300, seqlen_k=300)
    assert plan.plan_forward(s, H200, Config(wgmma=False)).kernel.spec.kind == "fwd"
    small = plan.plan_forward(s, H200, Config(smem_budget=48 * specs.KIB)).kernel.spec
    assert small.smem_bytes <= 48 * specs.KIB
    pinned = specs.select_forward(A100, s.dtype, s.head_dim, s.causal).with_knobs(CF_FWD_MIN_BLOCKS=2)
    p = plan.plan_forward(s, H200, spec=pinned)
    assert p.kernel.spec is pinned and p.kernel.grid[0] == -(-300 // pinned.block_m)
    det = specs.select_backward(A100, s.dtype, s.head_dim, s.causal, True)
    assert plan.plan_backward(s, H200, True, spec=det).main.spec is det
    with pytest.raises(ValueError, match="deterministic"):
        plan.plan_backward(s, H200, False, spec=det)


def test_launch_packs_parameters_in_kernel_order(monkeypatch):
    """What reaches cuLaunchKernel, through a stand-in driver: the grid, the block, and a
    parameter buffer holding each argument at its C offset (pointers and long longs on
    8-byte boundaries) and ending at the last parameter."""
    import ctypes
    import struct

    from cuflash import launch

    seen = {}

    class FakeDriver:
        @staticmethod
        def launchKernel(f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
            words = (ctypes.c_void_p * 5).from_address(extra)
            size = ctypes.c_size_t.from_address(words[3]).value
            seen.update(f=f, grid=(gx, gy, gz), block=(bx, by, bz), smem=smem, stream=stream,
                        params=params, keys=(words[0], words[2], words[4]),
                        buffer=ctypes.string_at(words[1], size))

    monkeypatch.setattr(launch, "_driver", FakeDriver)
    args = (0x1000, 0x2000, 0x3000, 7, 9, 5)
    launch.launch_function(0xF00, (3, 2, 1), 128, 0, "ppp" "iii", args, 0x77, lambda: "x")
    assert seen["grid"] == (3, 2, 1) and seen["block"] == (128, 1, 1)
    assert seen["f"] == 0xF00 and seen["stream"] == 0x77 and seen["params"] == 0
    assert seen["keys"] == (1, 2, None)  # BUFFER_POINTER, BUFFER_SIZE, END
    assert seen["buffer"] == struct.pack("<QQQiii", *args)

    class RefusingDriver:
        @staticmethod
        def launchKernel(*_):
            raise RuntimeError("CUDA_ERROR_INVALID_VALUE")

    monkeypatch.setattr(launch, "_driver", RefusingDriver)
    with pytest.raises(launch.LaunchError, match=r"launching fwd_x for q \(1, 2, 3, 4\).*"
                                                 r"INVALID_VALUE"):
        launch.launch_function(1, (1, 1, 1), 32, 0, "i", (1,), 0,
                               lambda: "fwd_x for q (1, 2, 3, 4)")

"""Every kernel variant cuflash can run, as data: the one table selection reads.

A ``Variant`` is one entry point of one ``kernels_cu`` file: the direction it serves, the
dtypes and architectures it takes, its compile target, its shared-memory formula and, per
head-dim bucket, its candidate tiles in order of preference. Each ``Tile`` says ``why`` it is
there: the measurement that chose it (bench/dev/NOTES.md), or "fits only" (a smaller fallback
for smaller shared-memory budgets, never timed against its neighbours).

``specs.select`` walks ``VARIANTS`` in order and returns the first tile of the first variant
that serves the problem and fits the device's shared memory: a Hopper-only variant first, so
where none of its tiles fits (or wgmma is off) the portable kernel runs.

Geometry the kernels require: the 16-bit forward and dQ kernels own 16 query rows per warp
(block_m = 16 * warps), the 16-bit dK/dV kernel 16 keys per warp (block_n = 16 * warps); the
float32 SIMT kernels need block_m and block_n multiples of 8 and of 4 * warps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping

from .archs import WGMMA_ARCHS, arch_number
from .constants import DTYPES

HALF = ("float16", "bfloat16")
FLOAT = ("float32",)

# Rows per block of the two elementwise backward kernels (preprocess, dQ convert).
PRE_ROWS = 64
PRE_THREADS = 128


@dataclass(frozen=True)
class Tile:
    warps: int
    block_m: int
    block_n: int
    stages: int
    why: str
    # When ptxas spills this tile in this bucket (NVRTC 13.5, tests/test_compile.py,
    # tests/test_kernel_modifiers.py), the selector skips it: each entry a set of the call's
    # knobs and arch, all of which must hold (("causal", "varlen"); ("sm_120", "softcap");
    # ("sm_75",): always on sm_75).
    spills_when: tuple[tuple[str, ...], ...] = ()

    def spills(self, context) -> bool:
        """Whether one of ``spills_when``'s sets lies inside ``context`` (knobs and arch)."""
        return any_set_within(self.spills_when, context)


def any_set_within(whens, context) -> bool:
    """Whether every name of one of ``whens``' sets is in ``context`` (the call's knobs,
    modifiers and arch): how spills_when and the _WHEN / _OFF_WHEN tables below are read."""
    context = set(context)
    return any(context.issuperset(when) for when in whens)


@dataclass(frozen=True)
class Variant:
    kind: str  # the KernelSpec kind, the first word of its name
    direction: str  # "forward", "backward" (dK, dV; dQ by atomics or not), "backward_dq", "backward_pre"
    source: str  # the kernels_cu file
    entry: str  # its extern "C" entry point
    dtypes: tuple[str, ...]
    smem: Callable  # (spec) -> dynamic shared memory of one block, the kernel header's formula
    tiles: Mapping[int, tuple[Tile, ...]]  # by head-dim bucket; a bucket absent: not served
    wgmma: bool = False  # Hopper-only: compiled for sm_90a, runs on WGMMA_ARCHS alone
    # backward, how the deterministic mode runs. None: dK, dV without dQ, then the dQ pass
    # (backward_dq). A predicate (tile, knobs): dQ always by atomics, deterministic only on
    # the tiles it accepts, which add them in key-tile order (spec.dq_ordered).
    ordered_dq: Callable | None = None
    dchunk: Callable | None = None  # backward: (dtype, arch, bucket) -> dK/dV columns per block
    # The score modifiers (docs/masks.md) the kernel implements; asking a variant for another
    # one raises (never a silent fallback to a slower family).
    modifiers: tuple[str, ...] = ()
    # other layouts: (the tiles each takes, a predicate on the spec; the file of its kernel),
    # with the same entry point and parameters, the first that takes a spec wins; ``source``
    # holds every other tile
    layouts: tuple[tuple[Callable, str], ...] = ()

    def source_of(self, spec) -> str:
        """The kernels_cu file that holds ``spec``'s kernel: the tiles choose the layout."""
        return next((source for takes, source in self.layouts if takes(spec)), self.source)

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source, *(source for _, source in self.layouts))

    @property
    def target(self) -> str:
        """The NVRTC target: "sm_90a" (arch-specific wgmma code) or "device" (the GPU's arch)."""
        return "sm_90a" if self.wgmma else "device"

    def serves(self, direction: str, dtype: str, arch: str, bucket: int, wgmma: bool) -> bool:
        return (direction == self.direction and dtype in self.dtypes and bucket in self.tiles
                and (not self.wgmma or (wgmma and arch in WGMMA_ARCHS)))

    def candidates(self, bucket: int, arch: str, knobs: frozenset = frozenset(),
                   deterministic: bool = False) -> tuple[Tile, ...]:
        """The tiles to try, in order; ``knobs``: the call's ("causal", modifier names);
        ``deterministic``: only those with a deterministic mode (``ordered_dq``)."""
        context = knobs | {arch}
        return tuple(t for t in self.tiles[bucket]
                     if not t.spills(context)
                     and not (deterministic and self.ordered_dq
                              and not self.ordered_dq(t, knobs)))


# -- shared-memory formulas (each the one in its kernel's header) --------------------------

def _smem_fwd16(s) -> int:  # Q tile + K and V tiles per stage, 2-byte elements
    return (s.block_m + 2 * s.stages * s.block_n) * s.head_dim * 2


def _smem_fwd90(s) -> int:  # _smem_fwd16, + the stage mbarriers when warp-specialized
    # (+ a second Q tile with CF_FWD_PERSISTENT=2), + a third V stage with CF_FWD_OVERLAP (and
    # its value 3's mbarriers); V stages of v's own head_dim (s.dv)
    if fwd90_warp_specialized(s):
        second_q = s.block_m * s.head_dim * 2 if dict(s.knobs).get("CF_FWD_PERSISTENT") == 2 \
            else 0
        # dropout's flag slots (CF_DROP_RING), a byte an element, and their mbarriers
        slots = dict(s.knobs).get("CF_DROP_RING", 0) if s.mods.dropout else 0
        return _smem_fwd16(s) + second_q + 128 + (slots * s.block_m * s.block_n + 128
                                                  if slots else 0)
    overlap = dict(s.knobs).get("CF_FWD_OVERLAP", 0)
    v_stages = s.stages + (1 if overlap else 0)
    tiles = ((s.block_m + s.stages * s.block_n) * s.head_dim + v_stages * s.block_n * s.dv) * 2
    return tiles + (128 if overlap == 3 else 0)  # 3: stage mbarriers


def _smem_bwd16(s) -> int:  # K, V tiles; Q, dO stages; dS^T (+ P^T when split); lse2, delta
    m, n, d, st = s.block_m, s.block_n, s.head_dim, s.stages
    return (2 * n * d + 2 * st * m * d + (2 if bwd_split_layout(s) else 1) * n * m) * 2 \
        + 2 * st * m * 4


def _smem_bwd90(s) -> int:
    """K, V; Q, dO stages; dS^T (+ P^T at d192, d256); lse2, delta. Warp-specialized: two dS^T
    buffers and the mbarriers."""
    m, n, d, st = s.block_m, s.block_n, s.head_dim, s.stages
    if bwd90_head_dim_split(s):  # K, V; 2 Q stages, dO stages (256: 1, 192: 2); P^T, dS^T;
        do_stages = 1 if d == 256 else 2  # lse2, delta; bulk dQ: half a piece a warpgroup
        return ((2 * n * d + (2 + do_stages) * m * d + 2 * n * m) * 2 + 2 * 2 * m * 4
                + (s.warps // 4 * 64 * 32 * 4 if s.dq_tiled else 0))
    if bwd90_warp_specialized(s):  # + each stage's tile under a block mask, + two dQ pieces
        pieces = dict(s.knobs).get("CF_DQ_PIECES", 1)  # each warpgroup's (ordered bulk dQ: 2)
        # dropout's flag slots (CF_DROP_RING): a 64-bit word per consumer lane, two mbarriers
        slots = dict(s.knobs).get("CF_DROP_RING", 0) if s.mods.dropout else 0
        bars = -(-8 * (9 + 3 * st + 4 * (pieces - 1) + 2 * slots) // 128) * 128  # kBarBytes
        return ((2 * n * d + 2 * st * m * d + 2 * n * m) * 2 + 2 * st * m * 4 + bars
                + (8 * st if s.mods.block_sparse else 0)
                + (2 * pieces * 64 * 64 * 4 if s.dq_tiled else 0) + slots * 8 * 32 * 8)
    role_split = d >= 192  # flash_bwd_sm90.cu's kRoleSplit; V, dO of v's own head_dim (s.dv)
    dv = s.dv
    return ((n * (d + dv) + st * m * (d + dv) + (2 if role_split else 1) * n * m) * 2
            + 2 * st * m * 4)


def _smem_bwd_dq16(s) -> int:  # Q, dO tiles + K and V tiles per stage
    return (2 * s.block_m + 2 * s.stages * s.block_n) * s.head_dim * 2


# The float32 SIMT kernels pad each shared row by 4 floats against bank conflicts.
def _smem_fwd32(s) -> int:  # Q, K, V tiles + the P tile
    m, n, d = s.block_m, s.block_n, s.head_dim
    return 4 * ((m + 2 * n) * (d + 4) + m * (n + 4))


def _smem_bwd32(s) -> int:  # Q, dO, K, V tiles + P^T, dS^T + dS
    m, n, d = s.block_m, s.block_n, s.head_dim
    return 4 * (2 * (m + n) * (d + 4) + 2 * n * (m + 4) + m * (n + 4))


def _smem_bwd_dq32(s) -> int:  # Q, dO, K, V tiles + dS
    m, n, d = s.block_m, s.block_n, s.head_dim
    return 4 * (2 * (m + n) * (d + 4) + m * (n + 4))


def _smem_none(s) -> int:  # elementwise: registers only
    return 0


def fwd90_warp_specialized(spec) -> bool:
    """flash_fwd_sm90_ws.cu's tiles: a producer warpgroup beside 64-row consumers."""
    return spec.kind == "fwd90" and spec.block_m == 16 * (spec.warps - 4)


def bwd90_head_dim_split(spec) -> bool:
    """flash_bwd_sm90_hsplit.cu's tiles (BWD90_HSPLIT, the warpgroups split head_dim): 80 keys
    on two warpgroups at head_dim 256, 96 on three at 192."""
    tile = BWD90_HSPLIT.get(spec.head_dim)
    return (spec.kind == "bwd90" and tile is not None
            and (spec.warps, spec.block_n) == (tile.warps, tile.block_n))


def bwd90_warp_specialized(spec) -> bool:
    """flash_bwd_sm90_ws.cu's tiles: a producer warpgroup beside the two 64-key consumers."""
    return spec.kind == "bwd90" and spec.warps == 12 and not bwd90_head_dim_split(spec)


def bwd_split_layout(spec) -> bool:
    """flash_bwd_split.cu's tiles: 8 warps, one chunk of head_dim <= 128 (16-bit only)."""
    return (spec.kind == "bwd" and spec.dtype != "float32" and spec.warps == 8
            and spec.dchunk >= spec.head_dim and spec.head_dim <= 128)


# -- dK/dV columns per block ---------------------------------------------------------------
# dK + dV accumulators hold dchunk floats per thread, so at most 128 columns per block; S and
# dP are recomputed once per chunk.

def _dchunk_bwd16(dtype: str, arch: str, bucket: int) -> int:
    """Chunks of 128, the last one partial (160 -> 128 + 32)."""
    if arch_number(arch) < 80 and bucket > 128 and bucket % 64:
        # Turing: where the last chunk of 128 would be 32 or 96 columns (160 -> 128 + 32,
        # 224 -> 128 + 96) sm_75's ptxas spills 8-16 bytes at 255 registers (NVRTC 13.5);
        # chunks of 64 take 200.
        return 64
    return min(bucket, 128)


def _dchunk_bwd32(dtype: str, arch: str, bucket: int) -> int:
    """The fp32 kernel needs a divisor of the bucket (160 -> 2 x 80)."""
    return bucket // -(-bucket // 128)


def _dchunk_whole(dtype: str, arch: str, bucket: int) -> int:
    return bucket


# -- tiles ---------------------------------------------------------------------------------

BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)
FITS = "fits only"


def _by_limit(rows: Mapping[int, tuple[Tile, ...]]) -> dict[int, tuple[Tile, ...]]:
    """{largest bucket: tiles} -> tiles for every bucket up to that limit."""
    return {b: next(t for limit, t in sorted(rows.items()) if b <= limit) for b in BUCKETS}


def _only_on(archs, *knob_sets) -> tuple[tuple[str, ...], ...]:
    """spills_when entries: each knob set, on these archs only (no set: always there)."""
    return tuple((arch, *knobs) for arch in archs for knobs in (knob_sets or ((),)))


def _t(warps, block_m, block_n, stages, why=FITS, spills_on=()) -> Tile:
    return Tile(warps, block_m, block_n, stages, why, _only_on(spills_on))


def _also(tile: Tile, *spills_when: tuple[str, ...]) -> Tile:
    """``tile`` skipped under these sets too."""
    return replace(tile, spills_when=(*tile.spills_when, *spills_when))


_BLACKWELL = ("sm_100", "sm_103")
_BLACKWELL_CONSUMER = ("sm_120", "sm_121")  # one instruction set


def _fwd16(warps, block_n, stages, why=FITS) -> Tile:  # a warp owns 16 query rows
    return _t(warps, 16 * warps, block_n, stages, why)


def _bwd16(warps, block_m, stages, why=FITS, spills_on=()) -> Tile:  # a warp owns 16 keys
    return _t(warps, block_m, 16 * warps, stages, why, spills_on)


# fwd, 16-bit. S holds block_n/2 floats per thread and O holds head_dim/2, so wide key tiles
# only for small head_dim; block_n 128 spills at head_dim >= 192 (NOTES, forward tiles).
_FWD16_TAIL = (_fwd16(4, 32, 2), _fwd16(4, 32, 1), _fwd16(2, 32, 1))
FWD16 = _by_limit({
    64: (_fwd16(8, 128, 2, "widest key tile where S and O leave registers to spare; not timed "
                           "(NOTES' d64 row timed (4, 128, 2): 288 TFLOP/s, FA-2 305)"),
         _fwd16(8, 64, 2), _fwd16(4, 64, 2), *_FWD16_TAIL, _fwd16(1, 16, 1)),
    128: (_fwd16(8, 64, 2, "H100 bf16 d128 16k: 328 TFLOP/s (FA-2 337; (8, 128, 2) measured "
                           "343 on an older loader, NOTES' forward tiles); 128 x 64 leaves room "
                           "for 2 blocks/SM in 227 KB"),
          _fwd16(4, 64, 2, "H100 bf16 d128 4k: 325 TFLOP/s, 1k: 283 (NOTES' forward tiles)"),
          *_FWD16_TAIL, _fwd16(2, 16, 1), _fwd16(1, 16, 1)),
    # window + softcap or ALiBi, ALiBi on packed sequences, causal softcap on packed
    # sequences: 8-48 B spilled on sm_100 (bench/dev/NOTES.md, modifier spills audit); on
    # sm_103 any softcap, 8-16 B (NVRTC 13, 2026-12-03)
    256: (_also(_fwd16(8, 64, 2, "H100 bf16 d256 16k: 331 TFLOP/s, FA-2 321 (NOTES' forward "
                                 "tiles)"),
                *_only_on(_BLACKWELL, ("window", "softcap"), ("window", "alibi"),
                          ("alibi", "varlen"), ("causal", "softcap", "varlen")),
                *_only_on(("sm_103",), ("softcap",))),
          _fwd16(8, 32, 2), *_FWD16_TAIL, _fwd16(2, 16, 1), _fwd16(1, 16, 1)),
})

# fwd90 (Hopper wgmma): 2 warpgroups x 64 query rows. Buckets without an entry use the
# portable kernel. 12 warps: flash_fwd_sm90_ws.cu, a producer warpgroup beside the two
# (fwd90_warp_specialized), first where it fits; 8 warps: flash_fwd_sm90.cu.
_SWEEP = "bench/results/2026-12-02_h200/session2/fwd90_ws_sweep_call9.log"


def _ws(block_n, stages, why, consumers=2, spills_when=()) -> Tile:
    """A warp-specialized tile: a producer warpgroup and `consumers` of 64 query rows each.
    With two consumers no modifier set spills (NVRTC 13.5; causal calls with ALiBi or packed
    sequences give the producer 48 registers, kernel ws::kProducerRegs); a tile's own
    `spills_when` lists what does."""
    return _also(_t(4 + 4 * consumers, 64 * consumers, block_n, stages, why), *spills_when)


_FWD90_WIDE = _fwd16(8, 128, 2, "H100 bf16 d128 16k: 473 TFLOP/s, 1.16-1.48x FA-2 at 4k-16k "
                                "(NOTES' wgmma kernels)")
_SWEEP2 = "bench/results/2026-12-02_h200/session2/fwd90_ws_m192_sweep_call12.log"
_D192_LOG = "bench/results/2026-12-03_h200/session10/call1_fwd90_d192_speed.log"
FWD90 = {
    # three consumers at d64 (the softmax is a larger share of the work there): causal 1k
    # loses (219 TFLOP/s vs 271 for (8, 128, 64, 2)), every longer shape gains
    # Three consumers' 160 registers spill with causal softcap (44 B), ALiBi (24 B) or packed
    # sequences (24 B), softcap on packed sequences (12 B), a window with softcap (16-32 B) or
    # ALiBi (132-160 B) (NVRTC 13.5, 2026-12-02): two consumers take those calls.
    64: (_ws(128, 3, f"H200 bf16 d64 1k/4k/16k: 364/473/480 TFLOP/s, causal 219/381/426; "
                     f"(12, 128, 128, 3): 351/410/417, causal 237/345/381; (8, 128, 64, 2): "
                     f"353/379/380, causal 271/359/360 ({_SWEEP2})", consumers=3,
             spills_when=(("causal", "softcap"), ("causal", "alibi"), ("causal", "varlen"),
                          ("softcap", "varlen"), ("window", "softcap"), ("window", "alibi"),
                          # not a spill: its 192 query rows straddle 128-query mask blocks
                          ("block_sparse",),
                          # causal dropout: 92 B spilled (NVRTC 13.5, 2026-12-02)
                          ("causal", "dropout"))),
         _ws(128, 3, f"H200 bf16 d64 1k/4k/16k: 354/412/419 TFLOP/s, causal 238/345/384 "
                     f"({_SWEEP})"),
         _fwd16(8, 64, 2, f"H200 bf16 d64 causal 1k/4k/16k: 275/363/375 TFLOP/s vs 234/324/355 "
                          f"for (8, 128, 128, 2) ({_SWEEP})"),
         _FWD90_WIDE),
    # (12, 128, 128, 2), for smaller budgets: -4% to +7% against (8, 128, 128, 2): not listed;
    # (16, 192, 64, 3-4), three consumers: 0.81-1.02x of (12, 128, 128, 3) (_SWEEP2)
    128: (_ws(128, 3, f"H200 bf16 d128 1k/4k/16k: 522/608/579 TFLOP/s, causal 361/523/545; "
                      f"(8, 128, 128, 2): 422/473/476, causal 319/432/463 ({_SWEEP})"),
          _FWD90_WIDE, _fwd16(8, 64, 2)),
    # d192: three 64-column panels, P V as one m64n192 wgmma (first run 2026-12-03)
    192: (_fwd16(8, 64, 2, f"H200 bf16 d192 4k/16k: 461/455 TFLOP/s, causal 434/460; cuDNN "
                          f"692/712, 588/636 ({_D192_LOG}); the d256 kernel on zero-padded "
                          f"copies had run 3.5x slower than cuDNN at 4k (session 9)"),),
    # d256: the warp-specialized kernel (12, 128, 64, 2) measured 0.89-0.99x this one (_SWEEP)
    256: (_fwd16(8, 64, 2, "block_n 64 at d256: registers (NOTES' wgmma kernels)"),)}

# The 8-warp kernel's softmax beside its P V product (flash_fwd_sm90.cu's CF_FWD_OVERLAP),
# per head-dim bucket: 2 (the next tile's loads issued after the wgmma) where it was measured
# (H200 bf16, bench/results/2026-12-04_h200/session19/call3_fwd_overlap.log, TFLOP/s against
# the loop before: d256 4k GQA causal / full 546 / 550 against 454 / 485, 16k causal / full
# 601 / 574 against 491 / 498; d192 441 / 468 against 420 / 435, 16k 514 / 502 against 478 /
# 459). Sets of ("causal", modifier names), as in spills_when ("causal" includes a window),
# that take value 1 (loads before the wgmma) or none (the loop before) instead: where the
# registers ran out (NVRTC 13.5, sm_90, every set of up to three modifiers, causal or not,
# fp16 and bf16: at d256 value 2 spilled 8-96 B in most sets with ALiBi and dropout, causal
# and dropout, or causal varlen with ALiBi or a block mask; value 1 still spilled with a
# window and ALiBi, and beside causal dropout with ALiBi or varlen + block mask;
# bench/dev/NOTES.md, session 19), or where 1 ran faster (d192 softcap: 411 / 439 TFLOP/s
# against 391 / 412, causal / full). A budget without room for the third V stage keeps the
# loop before. 3 (value 2 with stage mbarriers in place of the per-tile block barrier) at 192:
# H100 bf16, 2026-12-07, session 42 (bench/results/2026-12-07_h100/session42), TFLOP/s 2 / 3:
# 4k GQA causal 455.3 / 476.5, full 470.1 / 507.6, 16k causal 514.0 / 530.1, full 509.6 /
# 523.6, softcap 410.5 / 421.3 and 427.9 / 441.4; at 256 it lost where not causal (16k 584.2
# / 550.3, 4k GQA 544.2 / 511.2; 16k causal 573.7 / 592.1).
FWD90_OVERLAP = {192: 3, 256: 2}
FWD90_OVERLAP_ONE_WHEN = {
    192: (("softcap",),),
    256: (("alibi", "dropout"), ("causal", "dropout"), ("causal", "alibi", "varlen"),
          ("causal", "varlen", "block_sparse"))}
FWD90_OVERLAP_OFF_WHEN = {
    256: (("window", "alibi"), ("causal", "alibi", "dropout"),
          ("causal", "varlen", "block_sparse", "dropout"))}

# wgmma descriptors built by one add a k-step (cf_sm90.cuh's CF_DESC_ADD: the same bits, fewer
# instructions), per kernel kind, the head-dim buckets where it ran faster. H100 bf16,
# 2026-12-07, session 42 (bench/results/2026-12-07_h100/session42/call6_desc_ab, two runs of
# bench/dev/desc_ab.py, 16k tokens at 4k / 16k, causal and not; o, m, l, dk, dv bit for bit
# the same): backward d192 +7.0-9.7% in every row, d256 +0.9-3.8%, d64 -0.3 to +2.9%; forward
# d192 -1.5 to +5.8% (four of six cells up); d128 backward -3.3 to +1.2% and the d256 forward
# -1.0 to -5.1% where not causal, so those keep the masked form.
DESC_ADD = {"fwd90": frozenset({192}), "bwd90": frozenset({64, 192, 256})}
# (kind, bucket): sets of modifiers that keep the masked form, where the knob spilled (NVRTC
# 13.5, sm_90, every selected spec with up to two modifiers, causal or not, deterministic or
# not, bf16 and fp16 for up to one: one of 292, 20 B; with three, bf16: one of 256, 20 B)
DESC_ADD_OFF_WHEN = {("bwd90", 192): (("window", "alibi"),),
                     ("bwd90", 64): (("window", "alibi", "dropout"),)}

# The warp-specialized forward's persistent blocks (flash_fwd_sm90_ws.cu's CF_FWD_PERSISTENT;
# plan.plan_forward sizes the grid and runs one block per tile where the static split would
# be uneven, cuflash/tile_walk.py), per head-dim bucket: True where causal calls take them too.
# H200 bf16, TFLOP/s one block per tile / persistent, same runs (bench/results/2026-12-04_h200/
# session20, call 3, with the planner's pricing; calls 1-2 before it):
#   d64, 16k tokens at seqlen 1k / 4k / 16k: 353 / 470 / 497 against 376 / 486 / 513; causal
#     215 / 405 / 501 against 230 / 394 / 512 (4k causal: +0.6%, 0% and -2.9% in three calls);
#     GQA 16/4 4k softcap causal 231 / 265, softcap 267 / 283.
#   d128: 473 / 607 / 631 against 468 / 614 / 624 (within +-3% across three calls, about
#     +1% on average); softcap GQA +2-4% in every call. Causal lost 1-2% at 1k and 4k even
#     with the split priced (call 3), so causal d128 keeps one block per tile.
# Not where a block's work is unknown ahead (packed sequences, block masks), not with dropout
# until it is timed (test_gpu_fwd_persistent's dropout, packed and block-mask tests passed on
# an H100, session 27: 1,399 tests), nor where the three-consumer d64 tile spills with it
# (NVRTC 13.5, every set of up to two modifiers: a window, softcap or dropout, 4-136 B).
# d128 left the list in session 42: with TMA loads (since session 31) one block per tile ran
# as fast or faster on an H100 (bf16, bench/results/2026-12-07_h100/session42, calls 2-4,
# TFLOP/s persistent / one block per tile, 16k tokens, 3 and 5 rounds): 1k x16 516.1 / 540.4
# and 519.2 / 547.7, 4k x4 643.1 / 657.5 and 642.4 / 658.2, 16k x1 674.9 / 689.1, 656.8 /
# 683.4, 676.1 / 674.8, 676.2 / 687.8; 4k GQA 16/4 611.0-613.3 either way, softcap 493.8 /
# 494.5, ALiBi 605.3 / 604.5. (Causal at 1k went the other way, 398-402 / 382-384, but
# even at 4k; causal d128 keeps one block per tile.) d64 still gains 2-13% in every row.
FWD90_PERSISTENT = {64: True}
FWD90_PERSISTENT_OFF_WHEN = (("varlen",), ("block_sparse",),
                             ("dropout",))  # tested, not timed (above)
FWD90_PERSISTENT_OFF_WHEN_M192 = (("window",), ("softcap",), ("dropout",))

# Bulk tensor copies (TMA) in the warp-specialized kernels at head_dim 64 / 128: the
# forward's Q, K, V (flash_fwd_sm90_ws.cu's CF_FWD_TMA) and the backward's K, V, Q, dO
# (flash_bwd_sm90_ws.cu's CF_BWD_TMA), one producer thread issuing boxes where 128 issued
# cp.async. bench/results/2026-12-06_h200/session30 (H200 bf16, TFLOP/s cp.async -> TMA, same
# process; cuDNN beside):
#   forward, 16k tokens: d64 1k / 4k / 16k 375 / 488 / 513 -> 405 / 518 / 540, causal
#     233 / 413 / 512 -> 253 / 433 / 537; d128 470 / 619 / 625 -> 552 / 646 / 663, causal
#     374 / 564 / 620 -> 397 / 601 / 663; GQA 4k +2-10%, softcap +4-5% except d64 causal
#     softcap (260 -> 252, the one loss: FWD90_TMA_OFF_WHEN). H100 (session 29): +1.5-11.4%.
#   backward (the selected 12-warp, two-stage tiles), 4k / 16k: d64 371 / 391 -> 393 / 419,
#     causal 323 / 366 -> 376 / 399; d128 414 / 425 -> 443 / 464, causal 378 / 412 -> 416 /
#     483; ordered dQ d128 369 / 374 -> 375 / 388, causal 315 / 352 -> 317 / 371.
#   Those tiles ran without bulk dQ, which the selection adds (specs.with_bulk_dq). With it
#   (bench/results/2026-12-06_h100/session31, H100 bf16, bulk dQ -> bulk dQ + TMA): d64 4k
#   causal 360 -> 397, 16k 460 -> 497, causal 426 -> 426; d128 4k 510 -> 541, causal 430 ->
#   457, 16k 502 -> 540, causal 499 -> 514 (cuDNN 419-559 beside). Ordered dQ (the
#   deterministic mode) gained at d64 4k causal (317 -> 329) and lost 1-4% elsewhere (d128
#   16k causal 394 -> 380): the deterministic mode keeps cp.async (specs.with_selected_tma).
# Tests: tests/test_gpu_tma.py, every modifier set of test_gpu_modifiers, both deterministic
# modes (the backward as selected, bulk dQ included), block masks, heads-first storage,
# widths inside a bucket, fp16 and bf16: none failed in two H200 runs (session 30: 253 of
# the file's 266 passed before the time limit; then 86 passed, 2 skipped of its 92
# backward, block-mask, layout, width and cluster tests), and memcheck on 16 forward cases
# (0 errors, H100 and H200).
# Packed sequences take one map over every row, so a box can run over into the rows after a
# sequence (the next one's, or a KV cache's unwritten rows past seqused_k): both kernels
# zero a box's rows past its sequence before any product (kTailZero: 0 * inf would reach O,
# and the backward's Q / dO rows past seqlen_q are unmasked). H100, 2026-12-06
# (bench/results/2026-12-06_h100/session33): test_gpu_varlen_tma 84 passed (isolation
# tests with NaN / inf outside the sequences included), then with it selected
# test_gpu_varlen + test_gpu_jax_varlen + test_gpu_varlen_tma 182 passed, 48 skipped, none
# failed; memcheck and racecheck clean; varlen / dense at 16k tokens, d128 bf16 0.989-1.018
# forward and backward (session 32 without boxes: 1.085-1.144 forward, 1.06-1.10 backward).
# Dropout (the same session, dropout_ab, bf16, 16k tokens): forward -3 to -11%, backward
# -3.5 to -8.6%, the step's dropout cost d64 +58-64% -> +48-55%, d128 +33-37% -> +26-31%;
# test_gpu_dropout_candidates' boxed cases passed but for the block-mask ones, which the
# time limit cut before they ran.
# Block masks keep cp.async (session 34, H100, the GPU suite in shards): each boxed forward
# case with a block mask that ran hung (test_gpu_tma's test_block_masks,
# test_gpu_block_sparse's Hopper family, the boxed dropout ones), since the one issuing
# thread ran the mask's tile cursor, a warp ballot, alone: the lanes that had left voted
# "hidden", so the producer counted fewer kept tiles than the consumers waited for. The
# issuer's warp now stays under a block mask (flash_fwd_sm90_ws.cu's kTmaWarp). Session 36
# (H100, bench/results/2026-12-06_h100/session36): gpu_suite block_mask_tma's 18 boxed
# block-mask tests passed, memcheck and racecheck clean; then with TMA_OFF_WHEN = ()
# test_gpu_block_sparse + test_gpu_fwd_persistent -k block 158 passed, 42 skipped, and
# shards 4, 7, 9, 10 (2,375 tests) passed whole. Block masks load with TMA.

FWD90_TMA = frozenset({64, 128})
FWD90_TMA_OFF_WHEN = {64: (("causal", "softcap"),), 128: ()}
BWD90_TMA = frozenset({64, 128})  # atomic dQ only (above)
TMA_OFF_WHEN = ()

# Sets of ("causal", modifier names) under which a warp-specialized backward tile that
# BWD90 skips for its spills is taken all the same where it loads with TMA: one thread then
# issues the producer's boxes, so the producer runs on 24 registers and each consumer gets
# 240 (flash_bwd_sm90_ws.cu's kWideConsumers). d64 causal under a block mask: 56-64 B
# spilled at 232 boxed (NVRTC 13.5, bf16 / fp16, with and without bulk dQ); none at 240 with
# any one or two of window, softcap, ALiBi, sinks. Not with packed sequences (their
# producer zeroes box tails with every thread: 24 B spilled at 24 registers) nor dropout
# (the producer folds 1 / (1 - p) into the statistics: 8 B spilled). The 8-warp
# tile it replaces ran the d64 causal block-sparse backward at 2.22x dense, against 5.09x
# non-causal (H100, session 36). A layout the copy engine cannot box (a broadcast axis:
# launch._without_tma) runs the tile's cp.async form, spills and all (24 B).
# Written in session 36; run in session 37 (H100, 2026-12-07, bench/results/2026-12-07_h100/
# session37): its tests passed (test_gpu_block_sparse -k wide_boxed: 18; memcheck clean),
# then with it selected test_gpu_block_sparse + test_gpu_fwd_persistent's block-mask tests
# (176 passed, 42 skipped); the d64 causal block-sparse backward at 16k, 10.8% of blocks
# kept, 1.303 -> 0.886 ms (2.34x -> 3.44x dense; bf16, the GPU's time).
BWD90_BOXED_ONLY = True
BWD90_BOXED_ONLY_WHEN = {64: (("causal", "block_sparse"),)}
BWD90_BOXED_ONLY_OFF_WHEN = (("varlen",), ("dropout",))

# Dropout's 1 / (1 - p) folded into the warp-specialized backward's staged lse2 and delta
# (flash_bwd_sm90_ws.cu's CF_BWD_DROP_FOLD) where the kernel otherwise scales P and dP in
# every element. tests/test_gpu_bwd_drop_fold.py passed (H100, 2026-12-06: 130 passed, the 6
# skips the 8-warp d64 causal block-mask tile, which has no fold); bench/dev/dropout_ab.py
# (H100 bf16, the same day, backward ms unfolded -> folded): d64 4k 2.170 -> 2.121, 16k
# 7.930 -> 7.698, causal 1.285 -> 1.270 / 4.450 -> 4.376; d128 4k 3.419 -> 3.253, 16k 12.916
# -> 12.486, causal 1.944 -> 1.891 / 6.392 -> 6.153 (bench/results/2026-12-06_h100/session31).
BWD90_DROP_FOLD = True

# Dropout applied to the warp-specialized forward's packed P by byte masks
# (flash_fwd_sm90_ws.cu's CF_DROP_PACKED, cf_drop_packed.cuh): the same bits as dropping the
# floats before packing, 488 instructions a 64-element step against 634 (SASS). H100,
# 2026-12-07 (session 37): tests/test_gpu_fwd_drop_early.py -k packed 74 passed (bitwise
# equal to the unpacked forward in every dropout case and length, persistent blocks too; the
# kept set; the float64 reference); bench/dev/dropout_ab.py forward ms, unpacked -> packed:
# d64 4k 1.208 -> 0.897, 16k 4.096 -> 3.248, causal 0.596 -> 0.496 / 2.185 -> 1.807; d128 4k
# 1.289 -> 1.158, 16k 5.073 -> 4.507, causal 0.705 -> 0.643 / 2.503 -> 2.286.
FWD90_DROP_PACKED = True

# Dropout's kept flags drawn by the warp-specialized kernels' idle producer warps into a ring
# of shared-memory slots, one tile a slot, read by the consumers (CF_DROP_RING,
# kernels_cu/cf_drop_ring.cuh; specs.with_drop_ring / with_backward_drop_ring): the slots, 0
# where not selected. The forward's warps 1-3 draw one byte an element (its tile kept; d128
# on two K / V stages), the backward's warps 1-2 each consumer lane's 64-bit keep_bits word
# (TMA and atomic dQ; no block mask or packed sequences). With the round keys through a
# shuffle (cf_opaque_key) the drawing warps fit the producer's 32 / 40 registers: zero
# spills over 68 forward and 28 backward sm_90 specs (NVRTC 13.0). The same bits: H200,
# 2026-12-07 (bench/results/2026-12-07_h200/session38), tests/test_gpu_drop_ring.py 181
# passed (forward bitwise, two and three slots, persistent too; backward dK / dV bitwise
# where one block sums them; the kept set; the float64 reference with both rings). Slower,
# so not selected: dropout_ab (bf16, p = 0.1, 16k tokens, 16 heads), forward ms consumers
# drawing -> ring d64 4x4k 0.899 -> 1.997, 1x16k 3.389 -> 7.504, d128 1.210 -> 2.228,
# 4.757 -> 8.652 (causal alike); backward d64 2.014 -> 2.701, 7.390 -> 10.262, d128 3.044 ->
# 3.548, 11.792 -> 13.350. Three warps, one Philox chain each, draw what twelve consumer
# warps drew between their products: latency-bound chains, too few warps to hide them.
FWD90_DROP_RING = 0
BWD90_DROP_RING = 0

# The Hopper backward's role split (head_dim 192 / 256) with its first dQ panel issued before
# dK / dV, whose product then runs under that panel's adds (flash_bwd_sm90.cu's
# CF_BWD_DQ_FIRST), per bucket. H200 bf16, session 19 calls 6 and 7, TFLOP/s with / without:
# d192 4k 247 / 221-223, causal 228-229 / 210-215, 16k 257-258 / 230-232, causal 259 / 239;
# d256 4k 259-260 / 257, causal 245-247 / 236-239, 16k 265-271 / 269-271, causal 275-279 /
# 270 (16k full is a wash, the rest gains).
BWD90_DQ_FIRST = frozenset({192, 256})

# The head-dim split (flash_bwd_sm90_hsplit.cu) adding dQ by vector reductions from registers
# into the tiled accumulator (CF_DQ_RED4, specs.with_dq_red4: =2 at 256, the tile's last panel
# after the next tile's first barrier; =1 at 192) in place of staging half panels for bulk
# reduce-adds, per bucket; and at 256 each warpgroup loading its own dO panels
# (CF_HSPLIT_DO_OWN, specs.with_selected_own_do). H100, 2026-12-07 session 40 (tile_sweep,
# cuDNN beside, bench/results/2026-12-07_h100/session40), TFLOP/s, staged -> =1 / =2 / =2 with
# own dO (cuDNN): bf16 d256 4k 298.1 -> 341.2 / 337.5 / 345.9 (350.9), causal 251.6 -> 295.3 /
# 290.8 / 302.2 (366.3), 16k 319.9 -> 359.2 / 364.7 / 367.8 (347.4), causal 303.0 -> 360.9 /
# 363.8 / 371.2 (382.0); fp16 d256 staged -> =2: 293.3 -> 337.4 (338.8), causal 251.6 ->
# 288.1 (355.8), 16k 317.9 -> 360.1 (337.2), causal 301.4 -> 357.6 (376.5); bf16 d192 staged
# -> =1 / =2: 4k 301.6 -> 339.1 / 338.5 (332.8), causal 282.5 -> 312.2 / 303.7 (316.6), 16k
# 347.0 -> 374.9 / 380.0 (296.0), causal 346.0 -> 372.9 / 363.0 (318.7). An earlier run (call
# 2) gave d256 bf16 staged -> =1 293.6 -> 342.4, 246.1 -> 298.3, 322.1 -> 359.5, 304.1 ->
# 363.4. The warp-specialized kernel (d64 / d128, whole pieces staged, one bulk add a tile
# waited a tile later) did not gain alike with =1 (-11% to +6%): not selected there.
BWD90_DQ_RED4 = frozenset({192, 256})
BWD90_HSPLIT_DO_OWN = True

# bwd, 16-bit. 8 warps (block_n 128) at head_dim <= 128 is the split layout, flash_bwd_split.cu
# (FA-2's work split, P^T and dS^T through shared memory); the others own 16 keys per warp
# (flash_bwd.cu).
# The split needs 161 KB at d128 (m64) and at d64 (m128), 97 KB at d64 (m64).
_BWD16_OWN = (_bwd16(4, 64, 2, "the 16-keys-per-warp kernel: H100 bf16 d128 16k 139.4 TFLOP/s, "
                               "d64 147.0 (NOTES' split layout, 'before')"),
              _bwd16(4, 64, 1), _bwd16(4, 32, 1), _bwd16(2, 32, 1), _bwd16(2, 16, 1),
              _bwd16(1, 16, 1))
_SPLIT_M128 = _bwd16(8, 128, 2, "split layout, H100 bf16 d64 16k: 209.6 TFLOP/s vs 190.6 (m64) "
                                "and 147.0 (w4 m64 s2) (NOTES' split layout)")
_SPLIT_M64 = _bwd16(8, 64, 2, "split layout, H100 bf16 d128 16k: 218.3 TFLOP/s vs 139.4 for "
                              "w4 m64 s2; d64: 190.6 (NOTES' split layout)")


def _bwd16_tiles(bucket: int) -> tuple[Tile, ...]:
    split = (_SPLIT_M128, _SPLIT_M64) if bucket <= 64 else (_SPLIT_M64,) if bucket <= 128 else ()
    own = list(_BWD16_OWN)
    if bucket == 64:  # 24 B spilled (sm_75 takes ~10 registers more than sm_80)
        own[1] = _bwd16(4, 64, 1, spills_on=("sm_75",))
    if bucket == 128:  # 12 B spilled on sm_120 (and sm_121, its instruction set); sm_80, sm_90: none
        own[3] = _bwd16(2, 32, 1, spills_on=("sm_120", "sm_121"))
        # Modifier spills, the tile skipped only there (bench/dev/NOTES.md, 2026-12-02):
        # softcap + ALiBi, 16-24 B on sm_90 since tanh is tanh.approx (the Hopper default,
        # bwd90, is clean: this is its deterministic mode); causal softcap 12 B on sm_120 since
        # tanh.approx; ALiBi 16-40 B on sm_75 (before it too); a window with softcap (sm_75,
        # sm_120) or ALiBi (sm_120), 12-24 B.
        split = (_also(_SPLIT_M64, ("sm_90", "softcap", "alibi")),)
        own[1] = _also(own[1], *_only_on(_BLACKWELL_CONSUMER, ("causal", "softcap"),
                                         ("window", "softcap"), ("window", "alibi")))
        own[2] = _also(own[2], *_only_on(("sm_75",), ("alibi",), ("window", "softcap")))
        own[3] = _also(own[3], *_only_on(("sm_75",), ("alibi",), ("window", "softcap")))
    # 12 B spilled on sm_120 with causal (255 registers) since the backward's helpers moved to
    # cf_bwd*.cuh (2026-12-02; before: 253 and 255 registers, no spill); sm_80, sm_90: cubins
    # unchanged
    if bucket == 160:
        own[1] = _bwd16(4, 64, 1, spills_on=("sm_120", "sm_121"))
    if bucket == 192:  # and ALiBi (16-40 B, before tanh.approx too), windowed softcap on sm_75
        own[3] = _also(_bwd16(2, 32, 1, spills_on=("sm_120", "sm_121")),
                       *_only_on(("sm_75",), ("alibi",), ("window", "softcap")))
    if bucket == 256:  # softcap: 12-20 B on sm_120 (causal 12 B before tanh.approx)
        own[3] = _also(own[3], *_only_on(_BLACKWELL_CONSUMER, ("softcap",)))
    if bucket in (192, 256):  # softcap: 12 B on sm_100; (4, 64, 1) too, 12 B on sm_100 and
        # sm_103 (d192 in the deterministic mode, d256 atomic; NVRTC 13, 2026-12-03)
        own[0] = _also(own[0], *_only_on(_BLACKWELL, ("softcap",)))
        own[1] = _also(own[1], *_only_on(_BLACKWELL, ("softcap",)))
    # dropout: the split layout reloads P^T (dV's operand) for dS^T, which needs the undropped
    # P^T as well; the 16-keys-per-warp kernel takes those calls
    split = tuple(_also(t, ("dropout",)) for t in split)
    # dropout on sm_120: 16-24 B spilled by (4, 64, 1) at d64 / d128, 8 B by (4, 64, 2) at d64
    # (NVRTC 13.5, 2026-12-03, the first layout); with the second (one Philox block per 16
    # elements, halves swapped) (2, 32, 1) spills 12 B at d160 / d224 and 8 B causal at d256
    if bucket in (64, 128):
        own[1] = _also(own[1], *_only_on(_BLACKWELL_CONSUMER, ("dropout",)))
    if bucket == 64:
        own[0] = _also(own[0], *_only_on(_BLACKWELL_CONSUMER, ("dropout",)))
    if bucket in (160, 224):
        own[3] = _also(own[3], *_only_on(_BLACKWELL_CONSUMER, ("dropout",)))
    if bucket == 256:
        own[3] = _also(own[3], *_only_on(_BLACKWELL_CONSUMER, ("causal", "dropout")))
    return (*split, *own)


BWD16 = {b: _bwd16_tiles(b) for b in BUCKETS}

# bwd90 (Hopper wgmma): 128 keys (64 at head_dim 256), 2 computing warpgroups, 2 stages; dQ
# by atomics. The deterministic mode: the warp-specialized tiles add dQ in key-tile order
# (spec.dq_ordered); elsewhere it runs the portable kernels (flash_bwd.cu, flash_bwd_split.cu
# and flash_bwd_dq.cu). 128 queries per tile only at head_dim 64 (registers).
# 12 warps: flash_bwd_sm90_ws.cu (bwd90_warp_specialized), a producer warpgroup beside the
# two; first where it fits (165 KB). Three stages: 0.98-1.02x of two (session 4's
# bwd90_ws_sweep_call4.log, before the turns; not timed since).
_BWD90_WS_LOG = "bench/results/2026-12-02_h200/session5/bwd90_sweep_bf16_call4.log"
_BWD_D192_LOG = "bench/results/2026-12-03_h200/session10/call1_bwd90_d192_speed.log"
BWD90 = {64: (_also(_t(12, 128, 128, 2, f"H200 bf16 d64 4k/16k: 379/388 TFLOP/s, causal "
                                        f"317/361; (8, 128, 128, 2): 303/316, causal 282/317 "
                                        f"({_BWD90_WS_LOG})"),
                    # causal under a block mask: 8 B spilled (NVRTC 13.5), with no modifier
                    # only; a 48-register producer left the consumers 224 and 60-76 B. Boxed
                    # it is taken all the same (BWD90_BOXED_ONLY_WHEN, below)
                    ("causal", "block_sparse")),
              replace(_t(8, 128, 128, 2, "H100 bf16 d64: 1.05-1.11x FA-2 with 128-query "
                                         "tiles, 0.74-0.77x with 64 (NOTES' wgmma kernels)"),
                      # causal varlen: 255 registers + 8 B spilled (its lengths and offsets
                      # live in registers where dense ones are constants); m64 has 199.
                      # (Softcap + ALiBi on packed sequences spilled 20 B until tanh became
                      # tanh.approx, 2026-12-02: now none.)
                      spills_when=(("causal", "varlen"),)),
              _t(8, 64, 128, 2)),
         # softcap + ALiBi spilled 8-48 B here (the portable kernel took those calls) until
         # tanh became tanh.approx (2026-12-02): now 255 registers, none spilled
         # causal ALiBi on packed sequences: 20 B spilled (the portable kernel takes it)
         128: (_t(12, 64, 128, 2, f"H200 bf16 d128 4k/16k: 412/430 TFLOP/s, causal 365/424; "
                                  f"(8, 64, 128, 2): 348/362, causal 305/351 ({_BWD90_WS_LOG})"),
               replace(_t(8, 64, 128, 2, "H100 bf16 d128: 331-351 TFLOP/s, 1.05-1.11x FA-2 "
                                         "(NOTES' wgmma kernels)"),
                       spills_when=(("causal", "alibi", "varlen"),)),),
         # d192: the role split as at 256 (warpgroup 1 also one dQ panel; 161 KB)
         192: (_t(8, 64, 64, 2, f"H200 bf16 d192 4k/16k: 222/232 TFLOP/s, causal 214/239; "
                                f"cuDNN 329/302, 313/314 ({_BWD_D192_LOG}); widened to the "
                                f"d256 kernel it had run about 189 per d192 FLOP"),),
         256: (_t(8, 64, 64, 2, "the role split (209 KB; 64 keys is what fits beside resident "
                                "K, V and two Q, dO stages): H200 bf16 d256 16k 252 TFLOP/s, "
                                "causal 260; 3.6x the portable kernel (70) (bench/results/"
                                "2026-12-01_h200/session2)"),)}

# flash_bwd_sm90_hsplit.cu's tiles (the warpgroups split head_dim; not in BWD90:
# specs.select_backward takes them through specs.with_backward_head_dim_split where they serve
# and fit). H100 bf16 2026-12-05 (bench/results/2026-12-05_h100/session26), TFLOP/s with bulk
# dQ / the role split above / cuDNN: d256 4k 295 / 249 / 341-351, causal 252 / 231 / 354-361;
# 16k 318 / 260 / 344-348, causal 301 / 263 / 377-380; d192 4k 304 / 237 / 317-319, causal
# 290 / 222 / 311-313; 16k 344 / 249 / 289-292, causal 346 / 242 / 316-320 (the split and the
# role split in two tile_sweep runs minutes apart on one machine, each beside cuDNN). Spills
# (255 registers at 256, 168 at 192, the cap at 384 threads; NVRTC 13.0 and 13.5, every
# combination of window / softcap / ALiBi / packed, causal or not, atomic or "ordered" dQ,
# fp16 and bf16, 2026-12-05: 4-128 B; "bulk": dQ by bulk reduce-adds, CF_DQ_BULK, 4 B;
# "red4": dQ by vector reductions, CF_DQ_RED4=1, NVRTC 13.0, 2026-12-07: 12 B; "do_own": own
# dO panels, CF_HSPLIT_DO_OWN with CF_DQ_RED4=2: 4 B).
BWD90_HSPLIT = {
    256: _also(_t(8, 64, 80, 2, "FlashAttention-3's d256 backward tile (64 x 80, two MMA "
                                "warpgroups); 201,728 B, one dO stage"), ("softcap", "alibi"),
               ("do_own", "softcap", "varlen")),
    192: _also(_t(12, 64, 96, 2, "FlashAttention-3's d192 backward tile (64 x 96, three MMA "
                                 "warpgroups); 197,632 B"),
               ("window", "softcap", "alibi"), ("window", "softcap", "varlen"),
               ("causal", "alibi"), ("causal", "softcap"), ("ordered", "softcap", "alibi"),
               ("bulk", "window", "varlen"), ("red4", "window", "alibi"))}

# v's own head_dim (issue #15's pairs, e.g. DeepSeek's (192, 128); specs.select_forward_pair /
# select_backward_pair): the widths of v a kernel takes as they are (whole 64-column panels),
# the forward's tile (flash_fwd_sm90.cu, 8 warps, at q's bucket: 64 to 256), and q's buckets
# whose backward (flash_bwd_sm90.cu's role split, BWD90's tile) takes a narrower v. NVRTC 13.5,
# sm_90, every single modifier, causal or not, CF_FWD_OVERLAP 0 / 1 / 2, CF_BWD_DQ_FIRST 0 / 1,
# pairs (192, 128), (256, 128), (128, 64), (64, 128), (128, 256), (192, 64): no spill, no
# C7519 (2026-12-05). Not yet run on a GPU: cuflash.head_pad.native_pairs() keeps them off.
PAIR_WIDTHS_V = (64, 128, 192, 256)
FWD90_PAIR = _fwd16(8, 64, 2, "the d192 / d256 tile; v's panels only narrow the P V product")
BWD90_PAIR_BUCKETS = (192, 256)

# bwd_dq, 16-bit: (warps, block_n, stages), 16 query rows per warp.
BWD_DQ16 = {b: (_fwd16(4, 64, 2), _fwd16(4, 64, 1), _fwd16(4, 32, 1), _fwd16(2, 32, 1),
                _fwd16(2, 16, 1), _fwd16(1, 16, 1)) for b in BUCKETS}

# float32 (SIMT, one stage). Not timed: the first of each is the largest tile that compiled
# without spills when the fp32 kernels landed (9e9994e; the cost-model proposals of the
# compile sweep of that commit were not adopted); the last fits head_dim 256 in 48 KB.
_FIRST32 = "largest spill-free tile when the fp32 kernels landed (9e9994e); not timed"
_LAST = "fits head_dim 256 in 48 KB"
FWD32 = {b: (_t(4, 64, 32, 1, _FIRST32), _t(4, 32, 16, 1), _t(2, 16, 16, 1), _t(1, 16, 8, 1, _LAST))
         for b in BUCKETS}
# d256 with softcap + ALiBi (+ window, sinks) on packed sequences: 255 registers + 8 B spilled
FWD32[256] = (_also(FWD32[256][0], ("softcap", "alibi", "varlen")),
              *FWD32[256][1:])
BWD32 = {b: (_t(4, 32, 32, 1, _FIRST32), _t(2, 16, 16, 1), _t(1, 8, 16, 1), _t(1, 8, 8, 1, _LAST))
         for b in BUCKETS}
# 8 B spilled on sm_75 (255 registers) since the float32 kernels' helpers moved to cf_simt.cuh
# (2026-12-02): Turing's d256 takes the 8-key tile after it
BWD32[256] = (*BWD32[256][:2], _also(BWD32[256][2], ("sm_75",)), BWD32[256][3])
BWD_DQ32 = {b: (_t(4, 32, 32, 1, _FIRST32), _t(4, 16, 16, 1), _t(2, 16, 8, 1),
                _t(1, 8, 8, 1, _LAST)) for b in BUCKETS}

def _ordered_dq(tile: Tile, knobs: frozenset) -> bool:
    """bwd90's tiles with ordered dQ (the deterministic mode): the warp-specialized ones,
    without a block mask (which skips tiles, and turns). A window's ordered mode walks its key
    tiles in descending order (bench/dev/ordered_turns_model.py): tests/test_gpu_ordered_window.py
    passed (97 tests, H100, 2026-12-06) and bench/dev/det_window.py took d64 / d128 windows from
    106-130 TFLOP/s on the portable kernels to 210-382, 0.85-0.92x the atomic mode
    (bench/results/2026-12-06_h100/session31)."""
    return tile.warps == 12 and "block_sparse" not in knobs


# The elementwise kernels: no head-dim bucket, no tiles (PRE_ROWS rows per block).
PRE = {0: (_t(4, 0, 0, 1, f"elementwise, {PRE_ROWS} rows per block"),)}


# -- the registry: selection order within each direction -------------------------------------
# Every modifier; the backward's main kernels need nothing for sinks (they read lse2), the
# preprocess computes dsinks. "varlen": packed sequences (cf_seq.cuh's CF_VARLEN).
ALL_MODS = ("window", "softcap", "alibi", "sinks", "varlen")
# Block masks (docs/block_sparse.md): the kernels whose tile loops skip masked tiles; dropout
# (docs/dropout.md): the kernels that drop P by a Philox mask (not on packed sequences yet).
TILE_MODS = (*ALL_MODS, "block_sparse", "dropout")

VARIANTS: tuple[Variant, ...] = (
    Variant("fwd90", "forward", "flash_fwd_sm90.cu", "flash_fwd_sm90", HALF, _smem_fwd90, FWD90,
            wgmma=True, modifiers=TILE_MODS,
            layouts=((fwd90_warp_specialized, "flash_fwd_sm90_ws.cu"),)),
    Variant("fwd", "forward", "flash_fwd.cu", "flash_fwd", HALF, _smem_fwd16, FWD16,
            modifiers=TILE_MODS),
    Variant("fwd", "forward", "flash_fwd_fp32.cu", "flash_fwd", FLOAT, _smem_fwd32, FWD32,
            modifiers=TILE_MODS),
    Variant("bwd90", "backward", "flash_bwd_sm90.cu", "flash_bwd_sm90", HALF, _smem_bwd90,
            BWD90, wgmma=True, dchunk=_dchunk_whole, modifiers=TILE_MODS,
            layouts=((bwd90_head_dim_split, "flash_bwd_sm90_hsplit.cu"),
                     (bwd90_warp_specialized, "flash_bwd_sm90_ws.cu")),
            ordered_dq=_ordered_dq),
    Variant("bwd", "backward", "flash_bwd.cu", "flash_bwd", HALF, _smem_bwd16, BWD16,
            dchunk=_dchunk_bwd16, modifiers=TILE_MODS,
            layouts=((bwd_split_layout, "flash_bwd_split.cu"),)),
    Variant("bwd", "backward", "flash_bwd_fp32.cu", "flash_bwd", FLOAT, _smem_bwd32, BWD32,
            dchunk=_dchunk_bwd32, modifiers=TILE_MODS),
    Variant("bwd_dq", "backward_dq", "flash_bwd_dq.cu", "flash_bwd_dq", HALF, _smem_bwd_dq16,
            BWD_DQ16, modifiers=TILE_MODS),
    Variant("bwd_dq", "backward_dq", "flash_bwd_dq_fp32.cu", "flash_bwd_dq", FLOAT,
            _smem_bwd_dq32, BWD_DQ32, modifiers=TILE_MODS),
    Variant("bwd_pre", "backward_pre", "flash_bwd_pre.cu", "flash_bwd_preprocess", DTYPES,
            _smem_none, PRE, modifiers=ALL_MODS),
)

KINDS = tuple(dict.fromkeys(v.kind for v in VARIANTS))
_BY_KIND_DTYPE = {(v.kind, dtype): v for v in VARIANTS for dtype in v.dtypes}


def variant_of(kind: str, dtype: str) -> Variant:
    """The registry row of a spec's (kind, dtype)."""
    try:
        return _BY_KIND_DTYPE[(kind, dtype)]
    except KeyError:
        raise ValueError(f"unknown kernel kind {kind!r} for {dtype}") from None

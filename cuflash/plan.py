"""What runs for one attention call: kernels, grids and scratch space, as plain data.

``plan_forward`` / ``plan_backward`` are pure functions of the call's shape facts
(:class:`Shape`), the device's facts (``specs.DeviceFacts``) and the configuration
(``config.Config``: budget, wgmma switch): no GPU, no arrays, no environment reads, so they
are tested on the CPU and anyone (API, framework adapters, tests, benchmarks) can ask which
specs a call runs (``ForwardPlan.labels``, ``BackwardPlan.labels``). ``forward_plan`` /
``backward_plan`` memoize them per (shape, device, raw configuration), so a repeated call
costs one dictionary lookup.

CUDA's grid limits are part of the plan: a grid axis over the batch that would exceed 65535
blocks is split into several launches over slices of the batch (``batch_per_launch``), so no
batch size that validation accepts can fail to launch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import config, specs, tile_walk
from .config import Config
from .specs import NO_MODS, DeviceFacts, KernelSpec, ModFlags

MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y and gridDim.z
SCRATCH_ALIGN = 256  # bytes; every scratch array starts on this boundary


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _aligned(nbytes: int) -> int:
    return _cdiv(nbytes, SCRATCH_ALIGN) * SCRATCH_ALIGN


@dataclass(frozen=True)
class Shape:
    """The facts of a call that decide its kernels and grids (strides and pointers do not).

    Varlen (``mods.varlen``, docs/varlen.md): ``batch`` sequences packed into ``total_q``
    query and ``total_k`` key rows; ``seqlen_q`` / ``seqlen_k`` are the max lengths, which
    size the grids (the kernels read each sequence's own from cu_seqlens)."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    heads_kv: int
    head_dim: int
    dtype: str
    causal: bool
    mods: ModFlags = NO_MODS  # the score modifiers that are on (their kernels' knobs)
    total_q: int = 0  # varlen only: rows of q and of k
    total_k: int = 0
    # v's own head_dim where it differs from q's and k's and a kernel takes the pair as it is
    # (issue #15, specs.select_forward_pair / select_backward_pair); 0: head_dim's
    head_dim_v: int = 0

    @classmethod
    def of(cls, problem, mods: ModFlags = NO_MODS) -> "Shape":
        """From a ``validate.Problem`` (or anything with the same attributes)."""
        return cls(problem.batch, problem.seqlen_q, problem.seqlen_k, problem.heads,
                   problem.heads_kv, problem.head_dim, problem.dtype, problem.causal, mods)

    @property
    def dv(self) -> int:
        """v's (o's, dO's, dV's) head_dim."""
        return self.head_dim_v or self.head_dim

    @property
    def heads_per_kv(self) -> int:
        return self.heads // self.heads_kv if self.heads_kv else 1

    @property
    def rows_q(self) -> int:
        """Rows of q over the whole batch (the statistics have heads * rows_q entries)."""
        return self.total_q if self.mods.varlen else self.batch * self.seqlen_q

    @property
    def rows_k(self) -> int:
        return self.total_k if self.mods.varlen else self.batch * self.seqlen_k

    @property
    def empty(self) -> bool:
        """Nothing for a kernel to do (every output is empty or a fixed fill)."""
        return 0 in (self.batch, self.seqlen_q, self.seqlen_k, self.heads, self.rows_q,
                     self.rows_k)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the spec, the grid for ``batch_per_launch`` batch entries."""

    spec: KernelSpec
    grid: tuple[int, int, int]
    batch_per_launch: int  # grid z covers this many batch entries (times z_per_batch)

    @property
    def label(self) -> str:
        return self.spec.name


def _launch(spec: KernelSpec, grid_xy: tuple[int, int], batch: int, z_per_batch: int = 1
            ) -> Launch:
    """Grid (x, y, batch * z_per_batch), the batch split so that grid z stays <= 65535."""
    per_launch = max(1, min(batch, MAX_GRID_YZ // z_per_batch))
    return Launch(spec, (grid_xy[0], grid_xy[1], per_launch * z_per_batch), per_launch)


@dataclass(frozen=True)
class ForwardPlan:
    shape: Shape
    kernel: Launch

    @property
    def labels(self) -> tuple[str, ...]:
        return (self.kernel.label,)


@dataclass(frozen=True)
class BackwardPlan:
    """preprocess -> main (dK, dV; dQ by atomics unless deterministic) -> dq pass or convert.

    ``kv_splits`` > 1 (Hopper kernel, GQA): the query heads of a kv head are divided among
    that many blocks, which add their dK, dV into float32 accumulators; ``kv_convert`` then
    writes dk, dv. Scratch (one workspace, ``scratch``): the zeroed accumulators first
    (dq_accum, then dk_accum, dv_accum), then delta and lse2.
    """

    shape: Shape
    deterministic: bool
    pre: Launch
    main: Launch
    dq: Launch | None  # the deterministic dQ pass
    dq_convert: Launch | None  # dq_accum -> dq
    kv_splits: int
    kv_convert: Launch | None  # dk_accum, dv_accum -> dk, dv
    scratch: "Workspace"  # laid out once with the plan, not on every call

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(x.label for x in (self.pre, self.main, self.dq) if x is not None)

    @property
    def n_chunks(self) -> int:
        return _cdiv(self.shape.head_dim, self.main.spec.dchunk)


@dataclass(frozen=True)
class Workspace:
    """Byte offsets into one scratch allocation (see ``BackwardPlan``)."""

    dq_accum: int | None
    dk_accum: int | None
    dv_accum: int | None
    dq_semaphore: int | None  # ordered dQ: two ints per (batch, head, query tile)
    delta: int
    lse2: int
    zeroed_bytes: int  # the accumulators, set to 0 before the main kernel
    total_bytes: int
    dq_accum_bytes: int = 0  # the dQ accumulator's share of them, from offset 0


def semaphores_per_entry(shape: Shape, block_m: int) -> int:
    """Ordered dQ's semaphores of one batch entry: one per (head, query tile of block_m rows
    of the longest sequence, half of the tile's dQ: each computing warpgroup adds its own), as
    the kernel indexes them."""
    return shape.heads * _cdiv(shape.seqlen_q, block_m) * 2


def tiled_dq_entry_bytes(shape: Shape, tile_d: int) -> int:
    """Bytes of one batch entry's tiled dQ accumulator (spec.dq_tiled; cf_common.cuh's
    dq_piece_index): pieces of 64 rows x 64 columns over the rows rounded up to 64 and the
    head-dim bucket ``tile_d``."""
    return 4 * shape.heads * _cdiv(shape.seqlen_q, 64) * 64 * tile_d


def tiled_dq_bytes(shape: Shape, tile_d: int) -> int:
    """Bytes of the whole batch's tiled dQ accumulator. Packed sequences (varlen): piece rows
    total_q // 64 + batch + 1, enough for cf_common.cuh's dq_tile_piece_packed, which starts
    sequence b at piece row cu_seqlens_q[b] // 64 + b."""
    if shape.mods.varlen:
        return 4 * shape.heads * (shape.total_q // 64 + shape.batch + 1) * 64 * tile_d
    return shape.batch * tiled_dq_entry_bytes(shape, tile_d)


def workspace(shape: Shape, *, dq_accum: bool, kv_accum: bool,
              semaphore_tiles: int = 0, dq_tile_d: int = 0) -> Workspace:
    """Layout of the backward's scratch: ``dq_accum``, ``kv_accum``: room for the dQ and the
    dK, dV accumulators; ``semaphore_tiles``: the query tile of ordered dQ's semaphores (0:
    none); ``dq_tile_d``: the dQ accumulator is tiled with that head-dim bucket (0: rows)."""
    rows_q, rows_k, h, hkv, d = (shape.rows_q, shape.rows_k, shape.heads, shape.heads_kv,
                                 shape.head_dim)
    offset = 0
    dq = dk = dv = semaphores = None
    dq_bytes = 0
    if dq_accum:
        dq_bytes = _aligned(tiled_dq_bytes(shape, dq_tile_d) if dq_tile_d
                            else 4 * rows_q * h * d)
        dq, offset = offset, offset + dq_bytes
    if kv_accum:
        dk, offset = offset, offset + _aligned(4 * rows_k * hkv * d)
        dv, offset = offset, offset + _aligned(4 * rows_k * hkv * shape.dv)
    if semaphore_tiles:
        semaphores = offset
        offset += _aligned(4 * shape.batch * semaphores_per_entry(shape, semaphore_tiles))
    zeroed = offset
    stats = _aligned(4 * h * rows_q)
    return Workspace(dq, dk, dv, semaphores, delta=zeroed, lse2=zeroed + stats,
                     zeroed_bytes=zeroed, total_bytes=zeroed + 2 * stats,
                     dq_accum_bytes=dq_bytes)


def workspace_bound(shape: Shape, deterministic: bool) -> Workspace:
    """The workspace for any plan of this shape on any device (room for the dK, dV
    accumulators whenever there is grouped-query attention; deterministic: for either mode,
    the ordered one's dQ accumulator and semaphores of the smallest query tile, 64): for
    callers that must size scratch before the device is known (the XLA FFI targets, at
    trace time)."""
    d = shape.head_dim  # (a shape the kernels take: a multiple of 8 up to 256)
    tile_d = specs.head_dim_bucket(d) if d % 8 == 0 and d <= 256 else 0
    return workspace(shape, dq_accum=True, kv_accum=shape.heads_per_kv > 1,
                     semaphore_tiles=64 if deterministic else 0, dq_tile_d=tile_d)


def backward_workspace(plan: BackwardPlan) -> Workspace:
    return plan.scratch


def effective_window(window, causal: bool) -> tuple[int, int] | None:
    """The window the kernels' local mask mode runs, with causal folded in (its right bound
    becomes 0, FlashAttention-2's ``causal = window (left, 0)``), or None when the window
    adds nothing (off, or unbounded on the left under causal: plain causal)."""
    if window is None or tuple(window) == (-1, -1):
        return None
    left, right = window
    if causal:
        return None if left < 0 else (left, 0)
    return (left, right)


def mod_flags(window, softcap, alibi_slopes, sinks, causal: bool,
              block_sparse: bool = False, dropout: bool = False) -> ModFlags:
    """The kernels' compile-time knobs of a call's modifiers (None / 0: off)."""
    return ModFlags(window=effective_window(window, causal) is not None,
                    softcap=bool(softcap), alibi=alibi_slopes is not None,
                    sinks=sinks is not None, block_sparse=block_sparse, dropout=dropout)


# -- the pure planners ---------------------------------------------------------------------

_DEFAULT = Config()


def plan_forward(shape: Shape, facts: DeviceFacts, cfg: Config = _DEFAULT, *,
                 spec: KernelSpec | None = None) -> ForwardPlan:
    """``spec``: run this kernel instead of the selector's choice (tuning runs, bench/dev)."""
    facts = facts.with_budget(cfg.smem_budget)
    if spec is None and shape.head_dim_v:
        spec = specs.select_forward_pair(facts, shape.dtype, shape.head_dim, shape.head_dim_v,
                                         shape.causal, wgmma=cfg.wgmma, mods=shape.mods)
    elif spec is None:
        spec = specs.select_forward(facts, shape.dtype, shape.head_dim, shape.causal,
                                    wgmma=cfg.wgmma, mods=shape.mods)
        spec = _persistent_like_dense(shape, spec, facts, cfg)
    spec, grid_xy = _forward_grid(shape, spec, facts)
    return ForwardPlan(shape, _launch(spec, grid_xy, shape.batch))


PERSISTENT = "CF_FWD_PERSISTENT"  # flash_fwd_sm90_ws.cu's persistent blocks


def uniform_lengths(shape: Shape) -> bool:
    """Packed sequences that all have the longest one's lengths (total rows = batch x max):
    the host knows each sequence's work without reading cu_seqlens."""
    return (shape.mods.varlen and shape.total_q == shape.batch * shape.seqlen_q
            and shape.total_k == shape.batch * shape.seqlen_k)


def _persistent_like_dense(shape: Shape, spec: KernelSpec, facts: DeviceFacts,
                           cfg: Config) -> KernelSpec:
    """Packed sequences of one length take persistent blocks where the same call on a dense
    batch would (the same tile): its static split is then as even as the dense one's.
    Sequences of different lengths keep one block per tile (registry.
    FWD90_PERSISTENT_OFF_WHEN), since the host cannot price their split."""
    if not uniform_lengths(shape) or PERSISTENT in dict(spec.knobs):
        return spec
    dense = specs.select_forward(facts, shape.dtype, shape.head_dim, shape.causal,
                                 wgmma=cfg.wgmma, mods=replace(shape.mods, varlen=False))
    value = dict(dense.knobs).get(PERSISTENT)
    same_tile = ((dense.kind, dense.block_m, dense.block_n, dense.warps, dense.stages) ==
                 (spec.kind, spec.block_m, spec.block_n, spec.warps, spec.stages))
    return spec.with_knobs(**{PERSISTENT: value}) if value and same_tile else spec


def _forward_grid(shape: Shape, spec: KernelSpec, facts: DeviceFacts
                  ) -> tuple[KernelSpec, tuple[int, int]]:
    """The forward's spec and grid (x, y) per batch entry: (query tiles, heads), or for a
    persistent spec (blocks per batch entry, 1), about one block per SM in all, the blocks
    walking the batch's (entry, tile, head) triples (flash_fwd_sm90_ws.cu's TileWalk). Where
    that static split would run longer than one block per tile (tile_walk.persistent_blocks),
    or the kernel is not that one, the spec without the knob."""
    tiles = _cdiv(shape.seqlen_q, spec.block_m)
    if PERSISTENT not in dict(spec.knobs):
        return spec, (tiles, shape.heads)
    blocks = 0
    if specs.fwd90_warp_specialized(spec):
        blocks = tile_walk.persistent_blocks(
            shape.batch, shape.heads, shape.seqlen_q, shape.seqlen_k, spec.block_m,
            spec.block_n, shape.causal and not shape.mods.window, facts.sm_count)
    if not blocks:
        return spec.without_knob(PERSISTENT), (tiles, shape.heads)
    return spec, (blocks, 1)


def kv_head_splits(shape: Shape, spec: KernelSpec, sm_count: int) -> int:
    """How many blocks share the query heads of one kv head in the Hopper backward.

    One block per (key tile, kv head) loops over every query head of its group, so GQA
    16/4 at batch 1 fills 128 blocks where MHA fills 512: too few for 132 SMs once causal
    rows thin out. Split the group until there are about two waves of blocks, four when
    causal (or one query head per block); each split costs one float32 add of its dK, dV
    tile. Why four: causal blocks differ in length (the first key tile sees every query
    tile), and a few long blocks started late set the end. H100, d128, 16 query heads,
    backward alone, TFLOP/s against MHA's (bench/dev/gqa_backward.py --splits, session 39):
    4k causal (batch 4) GQA 16/4 with 1 / 2 / 4 splits 0.88 / 0.94 / 0.94x (bf16), 0.94 /
    1.01 / 1.01x (fp16), MQA with 4 / 8 / 16 splits 0.87 / 0.95 / 0.97x, 0.94 / 1.02 /
    1.04x; 16k causal (batch 1) GQA 1 / 2 / 4 splits 0.95 / 0.97 / 0.94x, 0.96 / 0.99 /
    0.98x, MQA 4 / 8 / 16 splits 0.98 / 0.95 / 0.94x, 0.97 / 0.99 / 0.99x (the same spec
    timed twice differed by up to 3.5%). Two waves had taken 1 / 4 at 4k and 1 / 4 at 16k;
    four take 2 / 8 and 2 / 8.
    """
    if spec.kind != "bwd90" or shape.heads_per_kv == 1 or sm_count <= 0 or spec.dq_ordered:
        return 1  # (ordered dQ: the splits' float adds into dK, dV would not be)
    if shape.mods.varlen:  # the key tiles the sequences have, about (not the grid's)
        blocks = _cdiv(shape.total_k, spec.block_n) * shape.heads_kv
    else:
        blocks = _cdiv(shape.seqlen_k, spec.block_n) * shape.heads_kv * shape.batch
    waves = 4 if shape.causal else 2
    splits = 1
    for candidate in range(1, shape.heads_per_kv + 1):
        if shape.heads_per_kv % candidate:
            continue
        splits = candidate
        if blocks * candidate >= waves * sm_count:
            break
    return splits


def plan_backward(shape: Shape, facts: DeviceFacts, deterministic: bool,
                  cfg: Config = _DEFAULT, *, spec: KernelSpec | None = None) -> BackwardPlan:
    """``spec``: the dK/dV kernel to run instead of the selector's choice (tuning runs); its
    ``deterministic`` must match it (``spec.deterministic``)."""
    dtype, d, causal = shape.dtype, shape.head_dim, shape.causal
    if spec is not None and spec.deterministic != deterministic:
        raise ValueError(f"plan_backward: {spec.name} does not match deterministic={deterministic}")
    facts = facts.with_budget(cfg.smem_budget)
    pre_spec = specs.select_backward_pre(dtype, facts, mods=shape.mods)
    rows_grid = (_cdiv(shape.seqlen_q, specs.PRE_ROWS), shape.heads)
    pre = _launch(pre_spec, rows_grid, shape.batch)
    if spec is None and shape.head_dim_v:
        spec = specs.select_backward_pair(facts, dtype, d, shape.head_dim_v, causal,
                                          deterministic, wgmma=cfg.wgmma, mods=shape.mods)
    elif spec is None:
        spec = specs.select_backward(facts, dtype, d, causal, deterministic, wgmma=cfg.wgmma,
                                     mods=shape.mods)
    n_chunks = _cdiv(d, spec.dchunk)
    splits = kv_head_splits(shape, spec, facts.sm_count)
    main = _launch(spec, (_cdiv(shape.seqlen_k, spec.block_n), shape.heads_kv), shape.batch,
                   z_per_batch=n_chunks * splits)
    if spec.dq_tiled and shape.mods.varlen and main.batch_per_launch < shape.batch:
        # packed sequences' dQ pieces are placed by the batch index, which a launch over a
        # slice of the batch does not know: the row-major accumulator
        spec = spec.without_knob("CF_DQ_BULK")
        main = _launch(spec, main.grid[:2], shape.batch, z_per_batch=n_chunks * splits)
    dq = dq_convert = kv_convert = None
    if deterministic and not spec.dq_ordered:
        dq_spec = specs.select_backward_dq(facts, dtype, d, causal, mods=shape.mods)
        dq = _launch(dq_spec, (_cdiv(shape.seqlen_q, dq_spec.block_m), shape.heads),
                     shape.batch)
    else:
        dq_convert = pre
    if splits > 1:
        kv_convert = _launch(pre_spec, (_cdiv(shape.seqlen_k, specs.PRE_ROWS), shape.heads_kv),
                             shape.batch)
    return BackwardPlan(shape, deterministic, pre, main, dq, dq_convert, splits, kv_convert,
                        workspace(shape, dq_accum=dq is None, kv_accum=splits > 1,
                                  semaphore_tiles=spec.block_m if spec.dq_ordered else 0,
                                  dq_tile_d=spec.head_dim if spec.dq_tiled else 0))


# Widths with a Hopper backward (bwd90), and how far a backward may be widened to reach one:
# at head_dim 256 on an H200 it ran 252 TFLOP/s against the portable kernel's 70 (3.6x,
# registry.BWD90), and at 192 the portable one ran 58 (session 9): zero columns that at most
# double the FLOPs still leave it ahead. 192 has its own since session 10 (222-239 TFLOP/s).
HOPPER_BACKWARD_WIDTHS = (64, 128, 192, 256)
_MAX_WIDENING = 2


def backward_head_dim(shape: Shape, facts: DeviceFacts, deterministic: bool,
                      cfg: Config = _DEFAULT) -> int:
    """The head_dim the backward of ``shape`` runs at: its own, or a wider one whose dK/dV
    kernel is the Hopper one when its own width would run the portable one (the caller pads
    with zero columns, cuflash/head_pad.py). Pure, like the planners."""
    def main_kind(width: int) -> str | None:
        try:
            wider = Shape(shape.batch, shape.seqlen_q, shape.seqlen_k, shape.heads,
                          shape.heads_kv, width, shape.dtype, shape.causal, shape.mods)
            return plan_backward(wider, facts, deterministic, cfg).main.spec.kind
        except ValueError:  # no tile fits this budget, or modifiers the family lacks
            return None

    own = shape.head_dim
    if main_kind(own) == "bwd90":
        return own
    for width in HOPPER_BACKWARD_WIDTHS:
        if own < width <= _MAX_WIDENING * own and main_kind(width) == "bwd90":
            return width
    return own


# -- memoized, with the configuration that the environment may change ----------------------

_forward_plans: dict = {}
_backward_plans: dict = {}


def configuration() -> tuple:
    """What besides the device changes a plan, as the raw values (``config.raw``): read here,
    once per call, so the planners stay pure; parsed into a ``Config`` on a plan miss."""
    return config.raw()


def forward_plan(shape: Shape, device_id: int, facts_of) -> ForwardPlan:
    """``plan_forward`` memoized; ``facts_of(device_id)`` gives the device's facts on a miss."""
    raw = config.raw()
    key = (shape, device_id, raw)
    plan = _forward_plans.get(key)
    if plan is None:
        plan = _forward_plans[key] = plan_forward(shape, facts_of(device_id), config.parse(raw))
    return plan


_backward_widths: dict = {}


def backward_head_dim_for(shape: Shape, device_id: int, facts_of, deterministic: bool) -> int:
    """``backward_head_dim`` memoized like ``backward_plan``."""
    raw = config.raw()
    key = (shape, device_id, deterministic, raw)
    width = _backward_widths.get(key)
    if width is None:
        width = _backward_widths[key] = backward_head_dim(shape, facts_of(device_id),
                                                          deterministic, config.parse(raw))
    return width


def backward_plan(shape: Shape, device_id: int, facts_of, deterministic: bool) -> BackwardPlan:
    raw = config.raw()
    key = (shape, device_id, deterministic, raw)
    plan = _backward_plans.get(key)
    if plan is None:
        plan = _backward_plans[key] = plan_backward(shape, facts_of(device_id), deterministic,
                                                    config.parse(raw))
    return plan

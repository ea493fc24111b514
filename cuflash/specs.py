"""Which kernel runs: a ``KernelSpec`` chosen from the registry by the device's facts.

``select`` (and its four spellings ``select_forward`` ...) is a pure function of
(``DeviceFacts``, problem, the wgmma switch) -> ``KernelSpec``: it walks
``registry.VARIANTS`` and returns the first tile that fits the device's shared memory. It reads
no environment: the caller passes the shared-memory budget in the facts (``with_budget``) and
the wgmma switch (``config.Config``), so the whole table is tested on the CPU
(tests/test_selection_table.py pins every choice). A ``KernelSpec`` has one canonical name
(``fwd_bf16_d128_m128_n64_w8_s2_causal``) that is the compile-cache key, the log label, the
benchmark label and the pytest id.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from . import config
from .archs import (ARCH_SMEM_OPTIN, BUDGETS_KIB, MIN_ARCH, TURING_DTYPES,  # noqa: F401
                    WGMMA_ARCHS, arch_dtypes, arch_number, arch_unsupported_reason)
from .config import set_smem_budget  # noqa: F401  (documented as cuflash.specs.set_smem_budget)
from .constants import DTYPES, KIB  # noqa: F401
from .registry import (BUCKETS, BWD90, BWD90_BOXED_ONLY,  # noqa: F401
                       BWD90_BOXED_ONLY_OFF_WHEN, BWD90_BOXED_ONLY_WHEN, BWD90_DQ_FIRST,
                       BWD90_HSPLIT, BWD90_DQ_RED4, BWD90_HSPLIT_DO_OWN, BWD90_DROP_FOLD,
                       BWD90_PAIR_BUCKETS, BWD90_TMA,
                       BWD90_DROP_RING, FWD90_DROP_PACKED, FWD90_DROP_RING, FWD90_TMA,
                       FWD90_TMA_OFF_WHEN, TMA_OFF_WHEN,
                       FWD90_OVERLAP, FWD90_PAIR, PAIR_WIDTHS_V,
                       DESC_ADD, DESC_ADD_OFF_WHEN,
                       FWD90_OVERLAP_OFF_WHEN, FWD90_OVERLAP_ONE_WHEN, FWD90_PERSISTENT,
                       FWD90_PERSISTENT_OFF_WHEN, FWD90_PERSISTENT_OFF_WHEN_M192, KINDS, PRE_ROWS,
                       PRE_THREADS, VARIANTS, Variant, any_set_within, bwd90_head_dim_split,
                       bwd90_warp_specialized, bwd_split_layout, fwd90_warp_specialized,
                       variant_of)

DTYPE_CODE = {"float16": 0, "bfloat16": 1, "float32": 2}
DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
HEAD_DIM_BUCKETS = BUCKETS


@dataclass(frozen=True)
class DeviceFacts:
    """What the selector needs to know about a GPU."""

    name: str
    arch: str  # "sm_90"
    sm_count: int
    smem_optin: int  # bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin

    def with_budget(self, budget: int | None) -> "DeviceFacts":
        """The same device, planning for at most ``budget`` bytes of shared memory."""
        if budget is None:
            return self
        return replace(self, smem_optin=min(self.smem_optin, budget))


_CORE_DEFINES = ("CF_DTYPE", "CF_HEAD_DIM", "CF_HEAD_DIM_V", "CF_BLOCK_M", "CF_BLOCK_N",
                 "CF_WARPS", "CF_STAGES", "CF_MASK", "CF_SOFTCAP", "CF_ALIBI", "CF_SINKS",
                 "CF_VARLEN", "CF_BLOCK_SPARSE", "CF_DQ_ATOMIC", "CF_DCHUNK", "CF_SOURCE_HASH")


@dataclass(frozen=True)
class ModFlags:
    """Which score modifiers (docs/masks.md) a call uses: compile-time knobs of its kernels
    (their values, window bounds, softcap, slopes, sinks, are run-time arguments).
    ``window``: a sliding window, the kernels' local mask mode (with causal, right = 0).
    ``varlen``: packed sequences with cu_seqlens (docs/varlen.md; cf_seq.cuh's CF_VARLEN),
    not a score modifier but a knob of every kernel the same way. ``block_sparse``: a block
    mask skips whole tiles (docs/block_sparse.md; cf_mask.cuh's CF_BLOCK_SPARSE). ``dropout``:
    P is dropped by a Philox mask (docs/dropout.md; cf_philox.cuh's CF_DROPOUT)."""

    window: bool = False
    softcap: bool = False
    alibi: bool = False
    sinks: bool = False
    varlen: bool = False
    block_sparse: bool = False
    dropout: bool = False

    @property
    def on(self) -> tuple[str, ...]:
        return tuple(n for n in ("window", "softcap", "alibi", "sinks", "varlen", "block_sparse",
                                 "dropout") if getattr(self, n))

    def for_direction(self, direction: str) -> "ModFlags":
        """The flags a direction's kernel is compiled with: the backward's main and dQ
        kernels read lse2, so sinks change nothing there; the preprocess only needs sinks
        (for dsinks)."""
        if direction == "forward":
            return self
        if direction == "backward_pre":  # elementwise: no tiles to skip, delta undropped
            return ModFlags(sinks=self.sinks, varlen=self.varlen)
        return replace(self, sinks=False)


NO_MODS = ModFlags()


@dataclass(frozen=True, kw_only=True)
class KernelSpec:
    """One compiled kernel: a kind, a dtype, a head-dim bucket and its tiles.

    ``knobs``: extra ``-D`` defines for tuning runs (bench/dev), as sorted (name, value)
    pairs; they are part of the name, so the cache key and every label stay honest.
    """

    kind: str
    dtype: str
    head_dim: int = 0  # bucket: a multiple of 32; 0 for the elementwise bwd_pre kernels
    # v's (o's, dO's, dV's) own head_dim where it differs from q's and k's (issue #15's pairs,
    # docs/head_dims.md): exact, a multiple of 64; fwd90 8-warp and bwd90 role-split only. 0:
    # head_dim's (every other spec, whose name and defines it leaves as they were)
    head_dim_v: int = 0
    block_m: int = 0
    block_n: int = 0
    warps: int = 4
    stages: int = 1
    causal: bool = False
    dq_atomic: bool = False  # bwd only
    # bwd90 only, with dq_atomic: blocks add dQ in a fixed key-tile order (semaphores per query
    # tile, plan.semaphores_per_entry),
    # which makes the sums bitwise repeatable: the Hopper deterministic mode
    dq_ordered: bool = False
    dchunk: int = 0  # bwd only: head-dim columns of dK/dV per block
    mods: ModFlags = NO_MODS
    knobs: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.head_dim_v and self.kind not in ("fwd90", "bwd90"):
            raise ValueError(f"head_dim_v: only the fwd90 / bwd90 kernels take v's own "
                             f"head_dim, got kind {self.kind!r}")
        for key, value in self.knobs:
            if not key.startswith("CF_") or key in _CORE_DEFINES or not isinstance(value, int):
                raise ValueError(f"knobs: expected (CF_NAME, int) pairs other than the spec's "
                                 f"own defines, got {(key, value)!r}")

    def with_knobs(self, **defines: int) -> "KernelSpec":
        """The same kernel compiled with extra ``-D`` defines (e.g. ``CF_BWD_MSUB=16``)."""
        return replace(self, knobs=tuple(sorted({**dict(self.knobs), **defines}.items())))

    def without_knob(self, name: str) -> "KernelSpec":
        return replace(self, knobs=tuple(kv for kv in self.knobs if kv[0] != name))

    @cached_property
    def name(self) -> str:
        parts = [self.kind, DTYPE_SHORT[self.dtype]]
        if self.kind != "bwd_pre":
            parts += [f"d{self.head_dim}"] + ([f"v{self.head_dim_v}"] if self.head_dim_v else [])
            parts += [f"m{self.block_m}", f"n{self.block_n}", f"w{self.warps}",
                      f"s{self.stages}"]
        if self.kind in ("bwd", "bwd90"):
            parts += [f"c{self.dchunk}",
                      "ordered" if self.dq_ordered else "atomic" if self.dq_atomic else "nodq"]
        if self.causal:
            parts.append("causal")
        parts += ["local" if name == "window" else name for name in self.mods.on]
        parts += [f"{key[3:].lower()}{value}" for key, value in self.knobs]
        return "_".join(parts)

    @property
    def dv(self) -> int:
        """The width of v's tiles: ``head_dim_v``, or the bucket where v has q's head_dim."""
        return self.head_dim_v or self.head_dim

    @property
    def dq_tiled(self) -> bool:
        """bwd90 adding dQ by bulk reduce-adds into the tiled accumulator (the knob
        ``CF_DQ_BULK``; flash_bwd_sm90_ws.cu, cf_common.cuh's dq_piece_index)."""
        return self.kind == "bwd90" and ("CF_DQ_BULK", 1) in self.knobs

    @property
    def deterministic(self) -> bool:
        """A backward kernel whose sums are bitwise repeatable: no dQ atomics, or ordered ones."""
        return not self.dq_atomic or self.dq_ordered

    @cached_property
    def variant(self) -> Variant:
        return variant_of(self.kind, self.dtype)

    @property
    def entry(self) -> str:
        return self.variant.entry

    @property
    def source(self) -> str:
        """The ``kernels_cu`` file that holds this kernel."""
        return self.variant.source_of(self)

    @property
    def target(self) -> str:
        """"sm_90a" (arch-specific wgmma code) or "device" (the GPU's own arch)."""
        return self.variant.target

    @property
    def threads(self) -> int:
        return PRE_THREADS if self.kind == "bwd_pre" else 32 * self.warps

    @cached_property
    def smem_bytes(self) -> int:
        """Dynamic shared memory of one block (the registry's formula, the kernel header's)."""
        return self.variant.smem(self)

    @property
    def defines(self) -> dict[str, int]:
        """The -D values the kernel source is compiled with (docs/kernel_abi.md)."""
        d = {"CF_DTYPE": DTYPE_CODE[self.dtype]}
        if self.kind != "bwd_pre":
            mask = 2 if self.mods.window else 1 if self.causal else 0  # cf_mask.cuh
            d.update(CF_HEAD_DIM=self.head_dim, CF_BLOCK_M=self.block_m,
                     CF_BLOCK_N=self.block_n, CF_WARPS=self.warps, CF_STAGES=self.stages,
                     CF_MASK=mask)
            if self.head_dim_v:
                d["CF_HEAD_DIM_V"] = self.head_dim_v
        for name, define in (("softcap", "CF_SOFTCAP"), ("alibi", "CF_ALIBI"),
                             ("sinks", "CF_SINKS"), ("varlen", "CF_VARLEN"),
                             ("block_sparse", "CF_BLOCK_SPARSE"), ("dropout", "CF_DROPOUT")):
            if getattr(self.mods, name):  # only when on: plain specs keep their defines
                d[define] = 1
        if self.kind in ("bwd", "bwd90"):
            d.update(CF_DQ_ATOMIC=int(self.dq_atomic), CF_DCHUNK=self.dchunk)
            if self.dq_ordered:
                d["CF_DQ_ORDERED"] = 1
        d.update(self.knobs)
        return d


def smem_bytes(spec: KernelSpec) -> int:
    return spec.smem_bytes


def compile_arch(spec: KernelSpec, arch: str) -> str:
    """The NVRTC target for ``spec`` on ``arch``: the arch-specific sm_90a for wgmma kernels."""
    return arch + "a" if spec.target == "sm_90a" else arch


def head_dim_bucket(head_dim: int) -> int:
    """The compiled head-dim the kernel pads ``head_dim`` to (a multiple of 32)."""
    if head_dim % 8 == 0 and 8 <= head_dim <= 256:
        return next(b for b in HEAD_DIM_BUCKETS if head_dim <= b)
    raise ValueError(f"head_dim: expected a multiple of 8 from 8 to 256, got {head_dim}")


def check_dtype(facts: DeviceFacts, dtype: str) -> None:
    """Raise ``ValueError`` with the reason when ``facts``' GPU has no kernel for ``dtype``."""
    if dtype not in arch_dtypes(facts.arch):
        raise ValueError(f"dtype: {dtype} needs compute capability 8.0 or newer; {facts.name} "
                         f"is {facts.arch} (Turing), which runs "
                         f"{' and '.join(arch_dtypes(facts.arch))}")


# -- the selection loop ----------------------------------------------------------------------

_WHAT = {"forward": "forward", "backward": "backward", "backward_dq": "backward dq",
         "backward_pre": "backward preprocess"}


def select(direction: str, facts: DeviceFacts, dtype: str, head_dim: int, causal: bool = False,
           *, deterministic: bool = False, wgmma: bool = True,
           mods: ModFlags = NO_MODS) -> KernelSpec:
    """The first tile, of the first registry variant serving the problem, that fits
    ``facts.smem_optin``; ``wgmma=False`` leaves the Hopper-only variants out. A variant
    that serves the problem but not one of ``mods`` raises ``ValueError`` naming both."""
    check_dtype(facts, dtype)
    bucket = 0 if direction == "backward_pre" else head_dim_bucket(head_dim)
    mods = mods.for_direction(direction)
    tried = []
    for variant in VARIANTS:
        if not variant.serves(direction, dtype, facts.arch, bucket, wgmma):
            continue
        _check_modifiers(variant, mods, dtype)
        knobs = frozenset(mods.on + (("causal",) if causal else ()))
        for tile in variant.candidates(bucket, facts.arch, knobs, deterministic):
            spec = _spec(variant, tile, dtype, bucket, causal, deterministic, facts.arch, mods)
            if spec.smem_bytes <= facts.smem_optin:
                return spec
            tried.append(f"{spec.name} ({spec.smem_bytes} B)")
    raise ValueError(f"{_WHAT[direction]} {dtype} head_dim {head_dim}: no tile configuration "
                     f"fits {facts.smem_optin} bytes of shared memory; tried {', '.join(tried)}")


def _check_modifiers(variant: Variant, mods: ModFlags, dtype: str) -> None:
    missing = [name for name in mods.on if name not in variant.modifiers]
    if missing:
        name = {"block_sparse": "block_mask", "dropout": "dropout_p"}.get(missing[0], missing[0])
        issue = "#15" if missing[0] in ("block_sparse", "dropout") else "#14"
        raise ValueError(f"{name}: not supported by the {variant.kind} kernel for {dtype} "
                         f"({variant.source}) yet (issue {issue}); CPU arrays run it")


def _spec(variant: Variant, tile, dtype: str, bucket: int, causal: bool, deterministic: bool,
          arch: str, mods: ModFlags = NO_MODS) -> KernelSpec:
    if variant.direction == "backward_pre":
        return KernelSpec(kind=variant.kind, dtype=dtype, mods=mods)
    backward = variant.direction == "backward"
    ordered = variant.ordered_dq is not None  # its deterministic mode: ordered dQ atomics
    # A window is the local mask mode, which holds causal as right = 0 (cf_mask.cuh).
    return KernelSpec(kind=variant.kind, dtype=dtype, head_dim=bucket, block_m=tile.block_m,
                      block_n=tile.block_n, warps=tile.warps, stages=tile.stages,
                      causal=causal and not mods.window, mods=mods,
                      dq_atomic=backward and (not deterministic or ordered),
                      dq_ordered=backward and deterministic and ordered,
                      dchunk=variant.dchunk(dtype, arch, bucket) if backward else 0)


def select_forward(facts: DeviceFacts, dtype: str, head_dim: int, causal: bool, *,
                   wgmma: bool = True, mods: ModFlags = NO_MODS) -> KernelSpec:
    return with_desc_add(with_selected_drop_ring(with_packed_dropout(with_selected_tma(
        with_persistent_forward(with_forward_overlap(
            select("forward", facts, dtype, head_dim, causal, wgmma=wgmma, mods=mods),
            facts)))), facts))


def with_desc_add(spec: KernelSpec) -> KernelSpec:
    """``spec`` with its wgmma descriptors built by one add a k-step (``CF_DESC_ADD``) where
    registry.DESC_ADD lists its kind and head-dim bucket, unless DESC_ADD_OFF_WHEN names a
    set of its modifiers."""
    if spec.head_dim not in DESC_ADD.get(spec.kind, ()) or any_set_within(
            DESC_ADD_OFF_WHEN.get((spec.kind, spec.head_dim), ()), spec.mods.on):
        return spec
    return spec.with_knobs(CF_DESC_ADD=1)


def with_packed_dropout(spec: KernelSpec) -> KernelSpec:
    """``spec`` dropping P after packing it, by byte masks (``CF_DROP_PACKED``), where the
    warp-specialized Hopper forward drops and registry.FWD90_DROP_PACKED says so: the same
    bits, fewer instructions."""
    if not (FWD90_DROP_PACKED and spec.mods.dropout and spec.kind == "fwd90"
            and fwd90_warp_specialized(spec)):
        return spec
    return spec.with_knobs(CF_DROP_PACKED=1)


def with_drop_ring(spec: KernelSpec, facts: DeviceFacts,
                   slots: int = 2) -> KernelSpec | None:
    """The warp-specialized forward ``spec`` with dropout, loading with TMA, drawing its kept
    flags in the producer's three idle warps into ``slots`` key tiles of shared memory that
    the consumers read (``CF_DROP_RING``, kernels_cu/cf_drop_ring.cuh), with as many K/V
    stages as then fit ``facts``' shared memory; None where it does not apply or fit. The
    same bits as ``CF_DROP_PACKED``."""
    knobs = dict(spec.knobs)
    if not (spec.kind == "fwd90" and fwd90_warp_specialized(spec) and spec.mods.dropout
            and knobs.get("CF_FWD_TMA") == 1 and knobs.get("CF_FWD_PERSISTENT", 0) != 2
            and knobs.get("CF_FWD_CLUSTER", 1) == 1 and spec.block_n % 32 == 0
            and not knobs.get("CF_FWD_DROP_EARLY")):
        return None
    return _with_stages_that_fit(spec.with_knobs(CF_DROP_RING=slots), facts)


def with_backward_drop_ring(spec: KernelSpec, facts: DeviceFacts,
                            slots: int = 2) -> KernelSpec | None:
    """The warp-specialized backward ``spec`` with dropout, loading with TMA, drawing its kept
    flags in the producer's warps 1 and 2 into ``slots`` tiles of shared memory that the
    consumers read (``CF_DROP_RING``, kernels_cu/cf_drop_ring.cuh); None where it does not
    apply (ordered dQ, block masks, packed sequences) or fit ``facts``' shared memory."""
    knobs = dict(spec.knobs)
    if not (spec.kind == "bwd90" and bwd90_warp_specialized(spec) and spec.mods.dropout
            and knobs.get("CF_BWD_TMA") == 1 and not spec.dq_ordered
            and not spec.mods.block_sparse and not spec.mods.varlen):
        return None
    ringed = spec.with_knobs(CF_DROP_RING=slots)
    return ringed if ringed.smem_bytes <= facts.smem_optin else None


def with_selected_drop_ring(spec: KernelSpec, facts: DeviceFacts) -> KernelSpec:
    """``spec`` with its direction's flag ring (``with_drop_ring`` /
    ``with_backward_drop_ring``) where registry.FWD90_DROP_RING / BWD90_DROP_RING give the
    slots (0: not selected)."""
    slots, ring = ((FWD90_DROP_RING, with_drop_ring) if spec.kind == "fwd90"
                   else (BWD90_DROP_RING, with_backward_drop_ring))
    return (ring(spec, facts, slots) or spec) if slots else spec


def with_selected_tma(spec: KernelSpec) -> KernelSpec:
    """``spec`` loading with bulk tensor copies (``with_forward_tma`` / ``with_backward_tma``)
    where the warp-specialized Hopper kernel runs and registry.FWD90_TMA / BWD90_TMA list the
    bucket (the backward with atomic dQ only), unless a TMA_OFF_WHEN set of modifiers (or the
    forward's FWD90_TMA_OFF_WHEN) is on. The launcher still runs the cp.async tile where the
    copy engine cannot box a layout."""
    context = set(spec.mods.on) | ({"causal"} if spec.causal else set())
    if any_set_within(TMA_OFF_WHEN, context):
        return spec
    if spec.kind == "fwd90" and spec.head_dim in FWD90_TMA:
        if any_set_within(FWD90_TMA_OFF_WHEN[spec.head_dim], context):
            return spec
        return with_forward_tma(spec) or spec
    if spec.kind == "bwd90" and spec.head_dim in BWD90_TMA and not spec.dq_ordered:
        return with_backward_tma(spec) or spec
    return spec


def with_persistent_forward(spec: KernelSpec) -> KernelSpec:
    """``spec`` with persistent blocks (``CF_FWD_PERSISTENT``) where the warp-specialized
    forward runs and registry.FWD90_PERSISTENT lists the bucket (causal calls only where its
    value is True), unless an _OFF_WHEN set of modifiers is on; the planner may still run one
    block per tile (plan._forward_grid)."""
    causal_ok = FWD90_PERSISTENT.get(spec.head_dim)
    if spec.kind != "fwd90" or not fwd90_warp_specialized(spec) or causal_ok is None:
        return spec
    if (spec.causal or spec.mods.window) and not causal_ok:
        return spec
    off = FWD90_PERSISTENT_OFF_WHEN + (FWD90_PERSISTENT_OFF_WHEN_M192 if spec.block_m == 192
                                       else ())
    if any_set_within(off, spec.mods.on):
        return spec
    return spec.with_knobs(CF_FWD_PERSISTENT=1)


def with_forward_overlap(spec: KernelSpec, facts: DeviceFacts) -> KernelSpec:
    """``spec`` with the 8-warp Hopper forward's softmax beside its P V product
    (``CF_FWD_OVERLAP``, registry.FWD90_OVERLAP's value for the bucket; 1 where
    FWD90_OVERLAP_ONE_WHEN says, none where FWD90_OVERLAP_OFF_WHEN does) where its third V
    stage fits ``facts``' shared memory."""
    value = FWD90_OVERLAP.get(spec.head_dim, 0)
    if spec.kind != "fwd90" or fwd90_warp_specialized(spec) or not value:
        return spec
    context = set(spec.mods.on) | ({"causal"} if spec.causal or spec.mods.window else set())
    if any_set_within(FWD90_OVERLAP_OFF_WHEN.get(spec.head_dim, ()), context):
        return spec
    if any_set_within(FWD90_OVERLAP_ONE_WHEN.get(spec.head_dim, ()), context):
        value = 1
    overlapped = spec.with_knobs(CF_FWD_OVERLAP=value)
    return overlapped if overlapped.smem_bytes <= facts.smem_optin else spec


def with_forward_across_tiles(spec: KernelSpec, facts: DeviceFacts) -> KernelSpec | None:
    """The warp-specialized forward ``spec`` with ``CF_FWD_PERSISTENT=2`` (the consumers'
    pipeline runs across tiles; a second Q buffer), on two consumers (three spill with it)
    and as many K/V stages as then fit ``facts``' shared memory; None if none does. A
    candidate for tuning runs and tests, not selected; not under a block mask."""
    if spec.kind != "fwd90" or not fwd90_warp_specialized(spec) or spec.mods.block_sparse:
        return None
    return _with_stages_that_fit(
        replace(spec, block_m=128, warps=12).with_knobs(CF_FWD_PERSISTENT=2), facts)


def _with_stages_that_fit(spec: KernelSpec, facts: DeviceFacts) -> KernelSpec | None:
    """``spec`` with as many of its K / V stages (at least two) as fit ``facts``' shared
    memory; None if two do not."""
    for stages in range(spec.stages, 1, -1):
        fitted = replace(spec, stages=stages)
        if fitted.smem_bytes <= facts.smem_optin:
            return fitted
    return None


def with_forward_tma(spec: KernelSpec) -> KernelSpec | None:
    """The warp-specialized forward ``spec`` loading Q, K and V with bulk tensor copies
    (``CF_FWD_TMA=1``: one producer thread, tensor maps from cuflash/tensor_map.py); None
    for other kernels. Selected where registry.FWD90_TMA says (``with_selected_tma``); packed
    sequences too, whose boxes run over into the rows after a sequence (the mask keeps their
    scores out and the kernel zeroes their V)."""
    if spec.kind != "fwd90" or not fwd90_warp_specialized(spec):
        return None
    return spec.with_knobs(CF_FWD_TMA=1)


def with_forward_cluster(spec: KernelSpec) -> KernelSpec | None:
    """The warp-specialized forward ``spec`` on clusters of two blocks that share their K / V
    boxes (``CF_FWD_CLUSTER=2`` with TMA; one block per tile), where every query tile of a
    head sees every key tile: no causal mask, window, block mask or packed sequences, and
    head_dim 128 or 256 (the pair splits the panels). None elsewhere. A candidate for tests
    and tuning runs, not selected. A launch whose query tiles are odd in number runs the tile
    without TMA (``launch.launch_forward``)."""
    if (spec.kind != "fwd90" or not fwd90_warp_specialized(spec) or spec.causal
            or spec.mods.window or spec.mods.block_sparse or spec.mods.varlen
            or spec.head_dim % 128):
        return None
    return spec.without_knob("CF_FWD_PERSISTENT").with_knobs(CF_FWD_TMA=1, CF_FWD_CLUSTER=2)


def with_forward_rescale_early(spec: KernelSpec) -> KernelSpec | None:
    """The Hopper forward ``spec`` rescaling O under its S product (``CF_FWD_RESCALE_EARLY=1``):
    the warp-specialized kernel (not its pipeline across tiles) or the 8-warp kernel's
    overlapped loop (``CF_FWD_OVERLAP`` 1 / 2). None elsewhere. A candidate for tests and
    tuning runs, measured and not selected: 0-3.5% slower at head_dim 256, within 1% at 128
    (H100, bench/dev/NOTES.md, session 39)."""
    if spec.kind != "fwd90":
        return None
    knobs = dict(spec.knobs)
    if fwd90_warp_specialized(spec):
        if knobs.get("CF_FWD_PERSISTENT") == 2:
            return None
    elif knobs.get("CF_FWD_OVERLAP") not in (1, 2):
        return None
    return spec.with_knobs(CF_FWD_RESCALE_EARLY=1)


def clustered(spec: KernelSpec) -> bool:
    """Whether ``spec``'s blocks come in clusters of two (``with_forward_cluster``)."""
    return ("CF_FWD_CLUSTER", 2) in spec.knobs


def with_ordered_dq(spec: KernelSpec) -> KernelSpec | None:
    """The warp-specialized backward ``spec`` (the atomic mode's) with ordered dQ, where the
    selector's deterministic mode keeps the portable kernels: a candidate for windows
    (descending key tiles, bench/dev/ordered_turns_model.py; tests/test_gpu_ordered_window.py).
    None for another kernel."""
    if spec.kind != "bwd90" or not bwd90_warp_specialized(spec):
        return None
    return replace(spec, dq_ordered=True)


def with_backward_tma(spec: KernelSpec) -> KernelSpec | None:
    """The warp-specialized backward ``spec`` loading K, V, Q and dO with bulk tensor
    copies (``CF_BWD_TMA=1``); None for other kernels, and for packed sequences with ordered
    dQ (their zeroed tails take the turn agent's mbarriers). Selected where
    registry.BWD90_TMA says (``with_selected_tma``); packed sequences too, their boxes' rows
    past a sequence zeroed in the kernel."""
    if not bwd90_warp_specialized(spec) or (spec.mods.varlen and spec.dq_ordered):
        return None
    if spec.head_dim == 64 and spec.dq_ordered and (spec.causal or spec.mods.window):
        return None  # its consumers spill 24-44 B under NVRTC 13.5 (none under 13.0)
    return spec.with_knobs(CF_BWD_TMA=1)


def boxed_where(flag: str):
    """A candidate's selector knob (for ``fastpath.selector_patched``, tests and GPU stages):
    each spec with ModFlags ``flag`` on loading with bulk tensor copies, the forward through
    ``with_forward_tma``, the backward with atomic dQ through ``with_backward_tma``; every
    other spec unchanged. For modifiers registry.TMA_OFF_WHEN keeps off until measured."""
    def knob(spec: KernelSpec) -> KernelSpec:
        if not getattr(spec.mods, flag):
            return spec
        if spec.kind == "fwd90":
            return with_forward_tma(spec) or spec
        return spec if spec.dq_ordered else (with_backward_tma(spec) or spec)
    return knob


def with_dropout_on_two_consumers(spec: KernelSpec) -> KernelSpec:
    """A candidate: the 192-row warp-specialized forward with dropout on 128 query rows and
    two consumer warpgroups (12 warps, 232 registers each where three get 160: Philox's state
    and the kept flags may crowd 160); every other spec unchanged."""
    if spec.kind != "fwd90" or not spec.mods.dropout or spec.block_m != 192:
        return spec
    return replace(spec, block_m=128, warps=12)


def with_backward_head_dim_split(spec: KernelSpec) -> KernelSpec | None:
    """The head_dim 192 / 256 backward ``spec`` on flash_bwd_sm90_hsplit.cu's tiles
    (registry.BWD90_HSPLIT: 64 queries x 96 keys on three warpgroups at 192, x 80 on two at
    256, the warpgroups splitting head_dim); a deterministic ``spec`` (the portable kernels
    today) becomes its ordered-dQ form. None where that kernel does not serve (other buckets,
    dropout, block masks, v's own head_dim, float32; a window with ordered dQ), or where the
    tile spills (its spills_when, with "ordered" for ordered dQ). The role split's knobs
    (CF_BWD_DQ_FIRST) do not apply. select_backward takes it on Hopper where it fits."""
    tile = BWD90_HSPLIT.get(spec.head_dim)
    if (tile is None or spec.kind not in ("bwd", "bwd90") or spec.dtype == "float32"
            or spec.head_dim_v or spec.mods.dropout or spec.mods.block_sparse
            or (spec.deterministic and spec.mods.window)):
        return None
    if tile.spills(_tile_context(spec, *(("ordered",) if spec.deterministic else ()))):
        return None
    return KernelSpec(kind="bwd90", dtype=spec.dtype, head_dim=spec.head_dim,
                      block_m=tile.block_m, block_n=tile.block_n, warps=tile.warps,
                      stages=tile.stages, causal=spec.causal, dq_atomic=True,
                      dq_ordered=spec.deterministic, dchunk=spec.head_dim, mods=spec.mods)


# The tensor maps a TMA kernel takes after its other parameters, by knob (launch.py's
# forward_maps / backward_maps): q, k, v; and dout for the backward.
TMA_KNOBS = {"CF_FWD_TMA": ("q", "k", "v"), "CF_BWD_TMA": ("q", "k", "v", "do")}


def tma_maps(spec: KernelSpec) -> tuple[str, ...]:
    """The arrays whose tensor maps ``spec``'s kernel takes: none without a TMA knob, or
    where the knob reaches a kernel that has no such loads (a tuning run's knob on every
    candidate leaves the other kernels as they are)."""
    takes = {"CF_FWD_TMA": fwd90_warp_specialized, "CF_BWD_TMA": bwd90_warp_specialized}
    for knob, arrays in TMA_KNOBS.items():
        if (knob, 1) in spec.knobs and takes[knob](spec):
            return arrays
    return ()


def loads_with_tma(spec: KernelSpec) -> bool:
    """Whether ``spec``'s kernel loads with TMA (``with_forward_tma``, ``with_backward_tma``)."""
    return bool(tma_maps(spec))


def without_tma(spec: KernelSpec) -> KernelSpec:
    """The same tile loading with cp.async, one block at a time (for a layout the copy
    engine cannot box, or an odd number of query tiles for a cluster of two)."""
    for knob in (*TMA_KNOBS, "CF_FWD_CLUSTER"):
        spec = spec.without_knob(knob)
    return spec


def with_device_rng(spec: KernelSpec) -> KernelSpec:
    """The dropout kernel ``spec`` reading its seed and offset from device memory when it runs
    (``CF_DROP_RNG_PTR=1``: one pointer to three uint32 words in place of three values), for
    launches whose words live on the device: a CUDA graph replay, or XLA's buffer under
    ``jax.jit``. Other kernels as they are (they take no dropout arguments)."""
    return spec.with_knobs(CF_DROP_RNG_PTR=1) if spec.mods.dropout else spec


def device_rng(spec: KernelSpec) -> bool:
    """Whether ``spec`` reads dropout's words from device memory (``with_device_rng``)."""
    return ("CF_DROP_RNG_PTR", 1) in spec.knobs


def _pair_bucket(facts: DeviceFacts, dtype: str, head_dim: int, head_dim_v: int,
                 wgmma: bool) -> int:
    """q's head-dim bucket where a Hopper kernel can take v's own head_dim as it is; else a
    ValueError saying why (the API then runs zero-padded copies: cuflash/head_pad.py)."""
    check_dtype(facts, dtype)
    bucket = head_dim_bucket(head_dim)
    if not (wgmma and facts.arch in WGMMA_ARCHS and dtype in ("float16", "bfloat16")):
        raise ValueError(f"head_dim_v {head_dim_v} with head_dim {head_dim}: only the Hopper "
                         f"16-bit kernels take v's own head_dim ({facts.arch}, {dtype})")
    if head_dim_v not in PAIR_WIDTHS_V or head_dim_v == bucket or bucket % 64:
        raise ValueError(f"head_dim_v: expected one of {PAIR_WIDTHS_V} other than q's bucket "
                         f"{bucket} (head_dim {head_dim}), got {head_dim_v}")
    return bucket


def _pair_fits(spec: KernelSpec, facts: DeviceFacts, head_dim: int) -> KernelSpec:
    """``spec`` if its shared memory fits ``facts``, else a ValueError naming the pair."""
    if spec.smem_bytes > facts.smem_optin:
        raise ValueError(f"head_dim_v {spec.head_dim_v} with head_dim {head_dim}: {spec.name} "
                         f"needs {spec.smem_bytes} bytes of shared memory, {facts.smem_optin} "
                         f"fit")
    return spec


def select_forward_pair(facts: DeviceFacts, dtype: str, head_dim: int, head_dim_v: int,
                        causal: bool, *, wgmma: bool = True,
                        mods: ModFlags = NO_MODS) -> KernelSpec:
    """The 8-warp Hopper forward with v (and o) of their own head_dim (``head_dim_v``, exact;
    q's and k's ``head_dim`` runs in its bucket); ValueError where none takes the pair."""
    bucket = _pair_bucket(facts, dtype, head_dim, head_dim_v, wgmma)
    variant = variant_of("fwd90", dtype)
    mods = mods.for_direction("forward")
    _check_modifiers(variant, mods, dtype)
    spec = replace(_spec(variant, FWD90_PAIR, dtype, bucket, causal, False, facts.arch, mods),
                   head_dim_v=head_dim_v)
    return _pair_fits(with_desc_add(with_forward_overlap(spec, facts)), facts, head_dim)


def select_backward_pair(facts: DeviceFacts, dtype: str, head_dim: int, head_dim_v: int,
                         causal: bool, deterministic: bool, *, wgmma: bool = True,
                         mods: ModFlags = NO_MODS) -> KernelSpec:
    """The Hopper backward's role split (q's bucket 192 or 256) with v, dO and dV of their own,
    narrower head_dim; dQ by atomics (no deterministic mode). ValueError where none takes it."""
    bucket = _pair_bucket(facts, dtype, head_dim, head_dim_v, wgmma)
    if bucket not in BWD90_PAIR_BUCKETS or head_dim_v > bucket or deterministic:
        raise ValueError(f"head_dim_v {head_dim_v} with head_dim {head_dim}"
                         f"{', deterministic' if deterministic else ''}: the backward takes v's "
                         f"own head_dim only below q's bucket of {BWD90_PAIR_BUCKETS}, "
                         f"not deterministic")
    variant = variant_of("bwd90", dtype)
    mods = mods.for_direction("backward")
    _check_modifiers(variant, mods, dtype)
    spec = replace(_spec(variant, BWD90[bucket][0], dtype, bucket, causal, False, facts.arch,
                         mods), head_dim_v=head_dim_v)
    return _pair_fits(with_desc_add(with_dq_first(spec)), facts, head_dim)


def select_backward(facts: DeviceFacts, dtype: str, head_dim: int, causal: bool,
                    deterministic: bool, *, wgmma: bool = True,
                    mods: ModFlags = NO_MODS) -> KernelSpec:
    """The dK/dV kernel (which also accumulates dQ with atomics unless deterministic). On
    Hopper at head_dim 192 / 256, the head-dim split where it serves and fits (H100, bf16,
    2026-12-05 session 26: 1.09-1.43x the role split's TFLOP/s with bulk dQ; ordered, about
    3x the portable kernels of the deterministic mode before)."""
    spec = select("backward", facts, dtype, head_dim, causal, deterministic=deterministic,
                  wgmma=wgmma, mods=mods)
    if BWD90_BOXED_ONLY:
        spec = with_boxed_only_tile(spec, facts)
    if uses_wgmma(facts, wgmma):
        split = with_backward_head_dim_split(spec)
        if split is not None and split.smem_bytes <= facts.smem_optin:
            spec = split
    return with_desc_add(with_selected_drop_ring(with_dropout_fold(with_selected_tma(
        with_dq_first(with_selected_own_do(with_selected_dq_red4(with_bulk_dq(
            with_ordered_rotation(spec, facts), facts)))))), facts))


def with_boxed_only_tile(spec: KernelSpec, facts: DeviceFacts) -> KernelSpec:
    """The warp-specialized backward tile that registry.BWD90 skips under ``spec``'s
    modifiers for its cp.async form's spills, where registry.BWD90_BOXED_ONLY_WHEN takes it
    boxed (its consumers get the registers the TMA producer leaves): that tile, which
    ``with_selected_tma`` then boxes; ``spec`` itself elsewhere, and where the tile would
    not fit or not be boxed."""
    whens = BWD90_BOXED_ONLY_WHEN.get(spec.head_dim, ())
    context = set(spec.mods.on) | ({"causal"} if spec.causal else set())
    if (spec.kind != "bwd90" or spec.dq_ordered or bwd90_warp_specialized(spec)
            or not any_set_within(whens, context)
            or any_set_within(BWD90_BOXED_ONLY_OFF_WHEN, context)):
        return spec
    tile = BWD90[spec.head_dim][0]
    wide = replace(spec, block_m=tile.block_m, block_n=tile.block_n, warps=tile.warps,
                   stages=tile.stages)
    if (not bwd90_warp_specialized(wide) or wide.smem_bytes > facts.smem_optin
            or not loads_with_tma(with_selected_tma(wide))):
        return spec
    return wide


def with_wide_boxed_backward(facts: DeviceFacts):
    """A candidate selector knob (for ``fastpath.selector_patched``, tests and GPU stages)
    while registry.BWD90_BOXED_ONLY is off: each backward spec that ``with_boxed_only_tile``
    replaces becomes that tile with the selection's own knobs (bulk dQ, TMA); every other
    spec unchanged."""
    def knob(spec: KernelSpec) -> KernelSpec:
        wide = with_boxed_only_tile(spec, facts)
        if wide is spec:
            return spec
        return with_dropout_fold(with_selected_tma(with_dq_first(with_bulk_dq(wide, facts))))
    return knob


def with_dropout_fold(spec: KernelSpec) -> KernelSpec:
    """``spec`` with dropout's 1 / (1 - p) folded into its staged statistics
    (``CF_BWD_DROP_FOLD``) where the warp-specialized Hopper backward drops and
    registry.BWD90_DROP_FOLD says so: P leaves the exponential already scaled, two
    multiplies an element fewer."""
    if not (BWD90_DROP_FOLD and spec.mods.dropout and bwd90_warp_specialized(spec)):
        return spec
    return spec.with_knobs(CF_BWD_DROP_FOLD=1)


def with_dq_first(spec: KernelSpec) -> KernelSpec:
    """``spec`` with its first dQ panel issued before dK / dV (``CF_BWD_DQ_FIRST``) where the
    Hopper backward's role split runs and registry.BWD90_DQ_FIRST lists the bucket."""
    if (spec.kind != "bwd90" or spec.head_dim not in BWD90_DQ_FIRST
            or bwd90_head_dim_split(spec)):
        return spec
    return spec.with_knobs(CF_BWD_DQ_FIRST=1)


def _tile_context(spec: KernelSpec, *extra: str) -> set[str]:
    """The names a tile's spills_when sets are matched against: ``spec``'s modifiers,
    "causal", and the knobs being considered (``extra``: "bulk", "red4", ...)."""
    return {*extra, *spec.mods.on, *(("causal",) if spec.causal else ())}


def with_bulk_dq(spec: KernelSpec, facts: DeviceFacts) -> KernelSpec:
    """``spec`` adding dQ by bulk reduce-adds (``CF_DQ_BULK``, spec.dq_tiled) where the kernel
    has them and its staging fits ``facts``' shared memory: the warp-specialized Hopper
    backward, atomic or ordered (fixed or packed lengths; ordered: the turn agent issues the
    adds in turn), two 16 KB dQ pieces; the head-dim split's atomic mode, half a piece a
    warpgroup."""
    if spec.kind != "bwd90" or not spec.dq_atomic:
        return spec
    if bwd90_head_dim_split(spec):
        context = _tile_context(spec, "bulk")
        if spec.dq_ordered or BWD90_HSPLIT[spec.head_dim].spills(context):
            return spec
    elif not bwd90_warp_specialized(spec):
        return spec
    bulk = spec.with_knobs(CF_DQ_BULK=1)
    return bulk if bulk.smem_bytes <= facts.smem_optin else spec


def with_dq_red4(spec: KernelSpec) -> KernelSpec:
    """``spec`` adding dQ by vector reductions from registers into the tiled accumulator
    (``CF_DQ_RED4``: eight red.global.add.v4.f32 a thread per 64 x 64 piece, in place of
    staging the piece in shared memory for a bulk reduce-add) where the kernel has bulk dQ
    (the warp-specialized Hopper backward, atomic or ordered: then inside the turns; the
    head-dim split's atomic mode); other specs as they are."""
    if spec.kind != "bwd90" or not spec.dq_tiled:
        return spec
    if bwd90_head_dim_split(spec):  # the sets that spill with it keep the staging
        context = _tile_context(spec, "red4")
        if BWD90_HSPLIT[spec.head_dim].spills(context):
            return spec
        # 256: each tile's last panel added after the next tile's first barrier (the
        # kernel's header says why); at 192 (one panel a warpgroup) that measured no better
        return spec.with_knobs(CF_DQ_RED4=2 if spec.head_dim == 256 else 1)
    return spec.with_knobs(CF_DQ_RED4=1)


def with_selected_dq_red4(spec: KernelSpec) -> KernelSpec:
    """``with_dq_red4`` where the head-dim split runs ``spec`` and registry.BWD90_DQ_RED4
    lists its bucket (measured there); ``spec`` elsewhere."""
    if not bwd90_head_dim_split(spec) or spec.head_dim not in BWD90_DQ_RED4:
        return spec
    return with_dq_red4(spec)


def with_selected_own_do(spec: KernelSpec) -> KernelSpec:
    """``spec`` with each warpgroup loading its own head-dim panels of the next dO
    (``CF_HSPLIT_DO_OWN``) where the head-dim split runs it at 256 (one dO stage) and
    registry.BWD90_HSPLIT_DO_OWN says so, except the modifier sets where that spilled; only
    beside the vector dQ reductions' late panel (``CF_DQ_RED4=2``), the pair measured."""
    if (not BWD90_HSPLIT_DO_OWN or not bwd90_head_dim_split(spec) or spec.head_dim != 256
            or dict(spec.knobs).get("CF_DQ_RED4") != 2):
        return spec
    context = _tile_context(spec, "do_own")
    if BWD90_HSPLIT[256].spills(context):
        return spec
    return spec.with_knobs(CF_HSPLIT_DO_OWN=1)


def with_ordered_rotation(spec: KernelSpec, facts: DeviceFacts) -> KernelSpec:
    """``spec`` with this device's rotation limit where it applies: the warp-specialized
    kernel's ordered dQ, not causal, no window, no packed sequences, a known SM count (else
    ``spec`` as it is)."""
    limit = ordered_rotation_limit(facts)
    mods = spec.mods
    if (not spec.dq_ordered or not limit or spec.causal or mods.window or mods.varlen
            or bwd90_head_dim_split(spec)):
        return spec
    return spec.with_knobs(CF_DQ_ROTATE_KEY_TILES=limit)


def ordered_rotation_limit(facts: DeviceFacts) -> int:
    """Ordered dQ without a mask (flash_bwd_sm90_ws.cu): the most key tiles a head may have
    for its key tiles to start spread over the query tiles. They then wait for each other in
    a cycle, which ends only if all of them are resident at once: at most half the SMs that
    this device (or MIG instance) has, and 64 (measured on an H200). 0 (no SM count known):
    never (the kernel's default; the spec then carries no knob)."""
    return min(64, facts.sm_count // 2)


def select_backward_dq(facts: DeviceFacts, dtype: str, head_dim: int,
                       causal: bool, *, mods: ModFlags = NO_MODS) -> KernelSpec:
    """The deterministic dQ pass."""
    return select("backward_dq", facts, dtype, head_dim, causal, mods=mods)


def select_backward_pre(dtype: str, facts: DeviceFacts | None = None, *,
                        mods: ModFlags = NO_MODS) -> KernelSpec:
    """The elementwise preprocess / dQ-convert kernels (no tiles)."""
    if facts is None:
        return KernelSpec(kind="bwd_pre", dtype=dtype, mods=mods.for_direction("backward_pre"))
    return select("backward_pre", facts, dtype, 0, mods=mods)


def all_specs(facts: DeviceFacts, *, wgmma: bool = True,
              mods: ModFlags = NO_MODS) -> list[KernelSpec]:
    """Every spec the selector can pick on this device (for calls with ``mods``), for
    ahead-of-time compile checks."""
    specs: dict[str, KernelSpec] = {}
    m = mods
    for dtype in arch_dtypes(facts.arch):
        specs.setdefault(f"pre{dtype}", select_backward_pre(dtype, facts, mods=m))
        for bucket in HEAD_DIM_BUCKETS:
            for causal in (False, True):
                for spec in (select_forward(facts, dtype, bucket, causal, wgmma=wgmma, mods=m),
                             select_backward(facts, dtype, bucket, causal, False, wgmma=wgmma,
                                             mods=m),
                             select_backward(facts, dtype, bucket, causal, True, wgmma=wgmma,
                                             mods=m),
                             select_backward_dq(facts, dtype, bucket, causal, mods=m)):
                    specs.setdefault(spec.name, spec)
    return list(specs.values())


def facts_for_arch(arch: str, budget: int | None = None) -> DeviceFacts:
    """Facts of a hypothetical GPU of this arch, for compiling without one."""
    if arch not in ARCH_SMEM_OPTIN:
        raise ValueError(f"arch: expected one of {', '.join(ARCH_SMEM_OPTIN)}, got {arch!r}")
    return DeviceFacts(name=arch, arch=arch, sm_count=0,
                       smem_optin=ARCH_SMEM_OPTIN[arch]).with_budget(budget)


# -- the caller's side: facts and switches from the environment (config.py) ----------------------
# The selector above reads none of these; launch.device_facts, the CLI and tests do.

def smem_budget_override() -> int | None:
    """The budget in force: ``set_smem_budget`` first, then ``CUFLASH_SMEM_BUDGET``."""
    return config.current().smem_budget


def forced_arch() -> str | None:
    """``CUFLASH_FORCE_ARCH`` (e.g. "sm_75"): plan and build as on that GPU (testing aid)."""
    return config.current().forced_arch


def uses_wgmma(facts: DeviceFacts, wgmma: bool | None = None) -> bool:
    """Whether Hopper-only kernels are picked on ``facts``' GPU (``wgmma``: the switch,
    by default ``CUFLASH_DISABLE_WGMMA`` read now)."""
    switch = config.current().wgmma if wgmma is None else wgmma
    return facts.arch in WGMMA_ARCHS and switch


def usable_facts(facts: DeviceFacts, forced: str | None = ...) -> DeviceFacts:
    """The facts cuflash plans with on this GPU; raises ``RuntimeError`` if it cannot run.

    ``forced`` (default: ``CUFLASH_FORCE_ARCH`` read now): an older arch's facts instead:
    its name, its shared memory (the smaller of the two) and, in ``compiler.get_kernel``, its
    kernels, built as PTX for that arch and JIT-compiled by the driver. Only an older,
    non-arch-specific target can run that way, so forcing a newer arch or sm_90 (whose wgmma
    kernels are sm_90a) on another GPU raises.
    """
    reason = arch_unsupported_reason(facts.arch)
    if reason:
        raise RuntimeError(f"cuflash cannot use {facts.name}: {reason}")
    if forced is ...:
        forced = forced_arch()
    if forced is None or forced == facts.arch:
        return facts
    if arch_number(forced) > arch_number(facts.arch) or forced in WGMMA_ARCHS:
        raise RuntimeError(f"CUFLASH_FORCE_ARCH={forced} cannot run on {facts.name} "
                           f"({facts.arch}): only an older arch other than sm_90 can be forced")
    return replace(facts, name=f"{facts.name} as {forced}", arch=forced,
                   smem_optin=min(facts.smem_optin, ARCH_SMEM_OPTIN[forced]))

"""Decoding against a K/V cache: ``attention_with_kvcache``, its kernel specs, plan and launch.

Decoding one token reads the whole K/V cache once, so it is bound by memory bandwidth and
its parallelism has to come from the key axis (Flash-Decoding). ``flash_decode_split``
(kernels_cu/flash_decode.cu) runs one block per (batch entry, kv head, row tile, key
split): it streams its key range once for every query row of the kv group (the q_len
queries times the group's query heads), and writes a partial o and lse per split;
``flash_decode_combine`` merges the splits by their log-sum-exp (cuflash.merge_attention's
math). One split skips the combine. docs/decode.md has the layout and what is missing.

Layers, as in the rest of the package: ``select_decode`` and ``plan_decode`` are pure
functions of the problem and the device's facts (tested on the CPU); ``run_decode`` launches
a plan on raw pointers on a stream; ``attention_with_kvcache`` validates, picks the path
(CUDA torch / CuPy arrays: their own allocator and current stream, no host sync, so a torch
call can be captured in a CUDA graph; JAX on CUDA through DLPack and CuPy; host arrays: the
NumPy mirror in ``decode_cpu``) and hands back the caller's array type.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import config, validate
from .constants import DTYPES, LOG2E
from .api import _refuse_untracked_gradients
from .launch import launch_function, memset_async, poison_enabled
from .fastpath import typed
from .replay import Replay, addresses
# re-exported: the plan's names that tests, benchmarks and docs use from here
from .decode_checks import (MAX_Q_LEN, MAX_SPLITS, PAGE_MULTIPLE,  # noqa: F401
                            DecodeProblem, DecodeShape, check_decode)
from .interop import caller_stream, export_array, import_array
from .archs import ARCH_SMEM_OPTIN
from .specs import DeviceFacts

__all__ = ["attention_with_kvcache"]

# Below this many keys a split's fixed cost (Q load, the group merge, a partial o written
# and read back) is no longer small against its K/V bytes: 256 keys of bf16 head_dim 128 are
# 128 KB of K + V against 512 B of partial o. Not yet tuned on a GPU.
MIN_KEYS_PER_SPLIT = 256
# auto_splits stops adding splits once this fraction of the resident-block slots of the
# last wave is busy (see auto_splits).
WAVE_FILL = 0.95
WARPS = 4
COMBINE_WARPS = 8  # flash_decode.cu's CF_COMBINE_WARPS
COMBINE_BATCH = 4  # flash_decode.cu's CF_COMBINE_BATCH (splits a warp loads at once, D <= 128)
ROW_BUCKETS = (1, 2, 4, 8)
HEAD_DIM_BUCKETS = (32, 64, 128, 256)  # lanes per key row = bucket / 8: a power of two
# (keys, stages) each lane group loads per step, by rows per block: (16-bit, float32).
# Registers per thread grow with rows (q and acc: 16 floats per row) and with keys x stages
# (K and V in flight: 8 registers per key for 16-bit, 16 for float32); these keep every
# spec within its register cap (65536 / (min_blocks * 128)) with zero spills
# (tests/test_decode_compile.py). Reasoned first (below), then measured where noted:
# Why two stages from 4 rows up: one row costs a lane about 50 instructions per 16-byte K
# chunk (and its V chunk), four rows about 160: 8 + 8 conversions, 2 x 8 x rows FMAs (q.k
# and p.v), log2(head_dim / 8) shuffles and adds per row, the masked online softmax per row.
# An H200 SM must take in 16.5 bytes per clock (4.3 TB/s / 132 SMs / 1.98 GHz), one warp's
# 1 KB of K+V chunks every 62 clocks, 248 issue slots of its 4 schedulers: four rows keep
# them about 65% busy, so a warp that waits for its loads and then computes has loads in
# flight only a third of the time (the measured GQA row, group 4, ran at 1.91 TB/s against
# 4.13 for one row; the latency-bound combine of the time was the other suspect). Two
# stages issue step n + 1's loads before step n's arithmetic, so every warp always has a
# step in flight. Eight rows (about 320 slots) stay issue-bound in SIMT: tensor cores.
# Measured (H200, bf16 d128, bench/dev/decode_variants.py, 2026-12-01): at 4 rows (GQA 8,
# 8k, 8 kv heads) one stage of 4 keys at 3 blocks per SM beat the two-stage guess, 3.11 TB/s
# against 2.90 (the best of 18 spill-free variants; cuDNN 4.08); at 1 row (1, 32k, 32) keys
# 4 to 8 at 4 blocks all reach 4.24-4.30. A later run of the same (session 3): 1 row takes 4
# keys, 4.25 TB/s at (1, 32k, 32) and 4.51 at (64, 2k, 32) against 8 keys' 4.12 and 4.48.
_KEYS = {1: ((4, 1), (4, 1)), 2: ((8, 1), (4, 1)), 4: ((4, 1), (1, 2)), 8: ((1, 2), (1, 1))}
_DTYPE_CODE = {"float16": 0, "bfloat16": 1, "float32": 2}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
_DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- the kernel spec ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeSpec:
    """One compilation of flash_decode.cu (both of its kernels): what ``cuflash.compiler``
    needs of a spec (``name``, ``kind``, ``entry``, ``source``, ``defines``, ``smem_bytes``)."""

    dtype: str
    head_dim: int  # bucket: 32, 64, 128 or 256
    rows: int  # query rows per block (CF_ROWS)
    keys: int  # key rows per lane group per step (CF_KEYS)
    stages: int = 1  # steps of K/V loads in flight (CF_STAGES)
    min_blocks: int = 0  # resident blocks per SM asked of ptxas (CF_MIN_BLOCKS); 0: by rows
    warps: int = WARPS
    kind: str = "decode"
    entry: str = "flash_decode_split"
    source: str = "flash_decode.cu"
    causal: bool = False  # a run-time argument of this kernel; here for spec-table code
    target: str = "device"  # built for the GPU's own arch (specs.compile_arch)
    # a candidate (not timed; sm_90 and newer): the combine launched as the split's
    # programmatic dependent (CF_DECODE_PDL, cuflash/pdl.py)
    pdl: bool = False
    # a candidate (session 41, timed slower): the split's last block of a row tile merges
    # the splits (CF_FUSED_COMBINE; no combine kernel, a memset of its counters instead)
    fused_combine: bool = False

    @property
    def name(self) -> str:
        return (f"decode_{_DTYPE_SHORT[self.dtype]}_d{self.head_dim}_r{self.rows}"
                f"_k{self.keys}_s{self.stages}_b{self.min_blocks}_w{self.warps}"
                + ("_pdl" if self.pdl else "") + ("_fc" if self.fused_combine else ""))

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def key_groups(self) -> int:
        """Key rows the block loads at once (kGroups): head_dim / 8 lanes per row."""
        return self.threads // (self.head_dim // 8)

    @property
    def step(self) -> int:
        """Keys per block per loop step (kStep)."""
        return self.key_groups * self.keys

    def __post_init__(self):
        if not self.min_blocks:  # register cap 65536 / (min_blocks * 128): 128, 170, 256
            object.__setattr__(self, "min_blocks",
                               4 if self.rows == 1 else 3 if self.rows <= 4 else 2)

    @property
    def bytes_in_flight(self) -> int:
        """K and V bytes one block has requested and not yet used, at most: 8 elements per
        thread per key row, keys x stages steps."""
        return self.threads * 8 * _ITEMSIZE[self.dtype] * 2 * self.keys * self.stages

    @property
    def smem_bytes(self) -> int:
        """kGroups * CF_ROWS * (D + 2) floats: every key group's acc, m_i, l_i."""
        return 4 * self.key_groups * self.rows * (self.head_dim + 2)

    @property
    def defines(self) -> dict[str, int]:
        return {"CF_DTYPE": _DTYPE_CODE[self.dtype], "CF_HEAD_DIM": self.head_dim,
                "CF_ROWS": self.rows, "CF_KEYS": self.keys, "CF_STAGES": self.stages,
                "CF_MIN_BLOCKS": self.min_blocks, "CF_WARPS": self.warps,
                **({"CF_DECODE_PDL": 1} if self.pdl else {}),
                **({"CF_FUSED_COMBINE": 1} if self.fused_combine else {})}


@dataclass(frozen=True)
class DecodeMmaSpec:
    """One compilation of flash_decode_mma.cu: the split kernel on tensor cores (``rows`` per
    block in bands of 16, K/V tiles of ``block_n`` keys in a cp.async ring of ``stages``), with
    flash_decode.cu's append and combine. fp16 / bf16 only. Same duck type as DecodeSpec
    (the plan and the launch use ``rows``, ``step``, ``threads``, ``min_blocks``,
    ``smem_bytes``)."""

    dtype: str
    head_dim: int  # bucket: 32, 64, 128 or 256
    block_n: int  # keys per tile (CF_BLOCK_N): a multiple of 16 * key_parts
    stages: int = 2  # tiles in the ring (CF_STAGES)
    warps: int = WARPS
    min_blocks: int = 3  # resident blocks per SM asked of ptxas (CF_MIN_BLOCKS)
    rows: int = 16  # query rows per block (CF_ROWS): 16, 32 or 64, bands of one mma M
    kind: str = "decode"
    entry: str = "flash_decode_split"
    source: str = "flash_decode_mma.cu"
    causal: bool = False  # a run-time argument of this kernel; here for spec-table code
    target: str = "device"
    # Candidates (issue 16; timed in session 16, neither selected: docs/decode.md):
    l2_ahead: int = 0  # CF_L2_AHEAD: tiles past the ring prefetched into L2 (contiguous)
    page_ids: bool = False  # CF_PAGE_IDS: block_table loads a tile ahead, rows finished at use
    step_addr: bool = False  # CF_STEP_ADDR: contiguous caches' copy addresses stepped a tile
    paged_step: int = 0  # CF_PAGED_STEP (with page_ids): mask of P = 1 / 2 / 4 pages a tile
    whole_tiles: bool = False  # CF_WHOLE_TILES: keys every row sees skip the per-score mask
    combine_rows: bool = False  # CF_COMBINE_ROWS: few splits, the combine takes a row a warp
    pdl: bool = False  # CF_DECODE_PDL: as DecodeSpec's (a candidate, not timed)
    fused_combine: bool = False  # CF_FUSED_COMBINE: as DecodeSpec's

    def __post_init__(self):
        if self.l2_ahead < 0:
            raise ValueError(f"l2_ahead: expected >= 0, got {self.l2_ahead}")
        if self.dtype not in ("float16", "bfloat16"):
            raise ValueError(f"dtype: the tensor-core decode takes float16 or bfloat16, "
                             f"got {self.dtype}")
        if self.rows not in MMA_ROW_BUCKETS or self.warps % (self.rows // 16):
            raise ValueError(f"rows: expected one of {MMA_ROW_BUCKETS} with warps a multiple "
                             f"of rows / 16, got rows {self.rows}, warps {self.warps}")
        if self.block_n % (16 * self.key_parts):
            raise ValueError(f"block_n: expected a multiple of 16 * key_parts = "
                             f"{16 * self.key_parts}, got {self.block_n}")
        if self.stages < 2:
            raise ValueError(f"stages: expected at least 2 (a ring), got {self.stages}")
        if self.paged_step and not self.page_ids or not 0 <= self.paged_step <= 7:
            raise ValueError(f"paged_step: a mask of 1 / 2 / 4 on the page-id loop (page_ids "
                             f"on), got {self.paged_step} with page_ids {self.page_ids}")

    @property
    def name(self) -> str:
        return (f"decode_{_DTYPE_SHORT[self.dtype]}_d{self.head_dim}_r{self.rows}_n{self.block_n}"
                f"_s{self.stages}_b{self.min_blocks}_w{self.warps}_mma{self._knob_suffix}")

    @property
    def _knob_suffix(self) -> str:
        """The candidate knobs that are on (none: the measured kernel's name)."""
        return ((f"_l2a{self.l2_ahead}" if self.l2_ahead else "") +
                ("_pid" if self.page_ids else "") + ("_sa" if self.step_addr else "") +
                (f"_ps{self.paged_step}" if self.paged_step else "") +
                ("_wt" if self.whole_tiles else "") + ("_cr" if self.combine_rows else "") +
                ("_pdl" if self.pdl else "") + ("_fc" if self.fused_combine else ""))

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def key_parts(self) -> int:
        """Warps that share one 16-row band, each taking block_n / key_parts keys a tile."""
        return self.warps // (self.rows // 16)

    @property
    def step(self) -> int:
        """Keys per loop step: one tile (split boundaries are whole tiles)."""
        return self.block_n

    @property
    def tile_bytes(self) -> int:
        """K and V bytes of one tile."""
        return 2 * self.block_n * self.head_dim * 2

    @property
    def bytes_in_flight(self) -> int:
        """K and V bytes one block has requested and not yet used while it computes a
        tile: the other stages - 1 tiles of the ring."""
        return (self.stages - 1) * self.tile_bytes

    @property
    def smem_bytes(self) -> int:
        """max(Q (rows x D) + the K and V rings, the key parts' merge: key_parts x rows x
        (D + 2) floats), flash_decode_mma.cu's kSmemBytes."""
        ring = self.rows * self.head_dim * 2 + self.stages * self.tile_bytes
        return max(ring, 4 * self.key_parts * self.rows * (self.head_dim + 2))

    @property
    def defines(self) -> dict[str, int]:
        knobs = {"CF_L2_AHEAD": self.l2_ahead, "CF_PAGE_IDS": int(self.page_ids),
                 "CF_STEP_ADDR": int(self.step_addr), "CF_PAGED_STEP": self.paged_step,
                 "CF_WHOLE_TILES": int(self.whole_tiles),
                 "CF_COMBINE_ROWS": int(self.combine_rows), "CF_DECODE_PDL": int(self.pdl),
                 "CF_FUSED_COMBINE": int(self.fused_combine)}
        return {"CF_DTYPE": _DTYPE_CODE[self.dtype], "CF_HEAD_DIM": self.head_dim,
                "CF_ROWS": self.rows, "CF_BLOCK_N": self.block_n, "CF_STAGES": self.stages,
                "CF_MIN_BLOCKS": self.min_blocks, "CF_WARPS": self.warps,
                **{name: value for name, value in knobs.items() if value}}


# The tensor-core split from this many rows per block (q_len x group) up, for 16-bit data.
# One or two rows stay SIMT: they reach the copy ceiling there (H200, bf16 d128, 2026-12-01:
# 4.24-4.30 TB/s of 4.24). From four rows the SIMT kernel is issue-bound (3.11 TB/s at
# group 4, q_len 4 at 71% of q_len 1 per byte, q_len 8 at 36%); three rows take the same
# 160-odd instructions per chunk as four (the row bucket is 4). Not yet timed on a GPU.
MMA_MIN_ROWS = 3
MMA_ROW_BUCKETS = (16, 32, 64)  # rows per block; more rows take several row tiles
# (block_n, stages, warps, min_blocks) by (head_dim bucket, rows bucket). Reasoned, not yet
# timed (bench/dev/decode_variants.py --mma times the alternatives in one GPU call):
# * 32 KB of K + V per tile (block_n x D x 2 x 2 bytes) where a warp's share of the tile
#   stays <= 64 keys (its scores: 64 keys x 16 rows = 32 registers a lane); two stages keep
#   one 32 KB tile loading per block, three resident blocks ~96 KB per SM (Little's law wants
#   ~33 KB on an H200; the slack covers blocks that are computing). Where the warp's share
#   would pass 64 keys the tile shrinks and the ring deepens to keep >= 24 KB loading. D 128
#   at 32 rows takes 32-key tiles and 3 stages (16 keys a warp, 32 KB loading): 64-key tiles
#   spilled there on sm_120 at 168 registers (NVRTC 13).
# * warps split the rows into bands of 16, the rest of them split each tile's keys; D 256
#   at 16 rows takes two warps of 16 keys (acc alone is 128 registers a lane).
# * min_blocks 3 (170 registers a lane at 4 warps) except where a lane holds more: D 256 at
#   4 warps (235 registers), and 64 rows at D 64 / 128, where one warp takes all 64 keys of
#   a tile (they spilled at 168 registers on sm_90, NVRTC 13). D 256 stops at 32 rows (64
#   spilled at 255): its 64-row problems take two row tiles.
# * shared memory 44-96 KB: 2-5 blocks in an H100 / H200 SM (227 KB), 1-3 in an A100's
#   (164 KB), 1-2 in sm_86 / sm_89 / sm_120's (99 KB per block); Turing's 64 KB hold none,
#   so select_decode falls back to SIMT there.
# Measured (H200, bf16 d128, 16 rows = GQA group 4 at q_len 1-4, bench/dev/decode_variants.py
# --mma, 2026-12-01): 2 blocks per SM beat 3, because the split rule fills the larger wave
# with more, shorter splits: (64, 2k, 8 kv heads) 4.07 TB/s at 1 split vs 3.56 at 3; (1, 32k,
# 8) 2.93 at 32 splits vs 2.76 at 47; (8, 8k, 8) 3.65 either way (the SIMT kernel: 3.10).
# 32 rows (GQA group 4 at q_len 8, D 128) take 8 warps of 16 keys (two bands x four key
# parts) in one block per SM: 2.43 / 1.91 TB/s at (8, 8k, 8) / (1, 32k, 8) against 2.30-2.35
# / 1.68 for 32-key tiles in 3 stages at 3 blocks (bench/dev/decode_ab.py, session 3). A ring
# of 3 tiles there: 2.82 / 2.54 TB/s against 2 tiles' 2.75 / 2.43 (4 tiles 2.77 / 2.48;
# bench/dev/decode16.py, H200, 2026-12-04, session 17 call 1). Where 3 tiles do not fit
# (104 KB: sm_86 / sm_89 / sm_120), select_decode takes 2.
_MMA_TILES = {
    (32, 16): (256, 2, 4, 3), (32, 32): (128, 3, 4, 3), (32, 64): (64, 5, 4, 3),
    (64, 16): (128, 2, 4, 3), (64, 32): (128, 2, 4, 3), (64, 64): (64, 3, 4, 2),
    (128, 16): (64, 2, 4, 2), (128, 32): (64, 3, 8, 1), (128, 64): (64, 2, 4, 2),
    (256, 16): (32, 2, 2, 3), (256, 32): (32, 2, 4, 2),
}


# Rows per block at most, by head_dim bucket; more rows take several row tiles of that many,
# each re-reading its split's K/V, from L2 when the row tiles run side by side (they are
# neighbours in blockIdx.x). {128: 16} for GQA q_len 8 (32 rows at D 128 as two 16-row tiles)
# ran 2.25 TB/s against the 32-row block's 2.43 at (1, 32k, 8) (session 16). Empty: every row
# bucket of _MMA_TILES is used.
_MMA_MAX_ROWS: dict[int, int] = {}
# Knobs of every contiguous tensor-core spec: a contiguous cache's copy addresses stepped a
# tile at a time (CF_STEP_ADDR). H200, bf16 d128, 32 q heads, 8 kv heads, TB/s against the
# plain loop (bench/dev/decode16.py, session 18 call 1): q_len 1 at (1, 32k) / (8, 8k) /
# (32, 4k) / (64, 2k) 3.37 / 3.92 / 4.37 / 4.23 against 3.28 / 3.85 / 4.32 / 4.16; q_len 8
# at (8, 8k) / (1, 32k) 3.22 / 2.81 against 2.79 / 2.54; MHA rows (SIMT) unchanged. And with
# at most COMBINE_BATCH splits the combine takes a row a warp (CF_COMBINE_ROWS; session 19
# call 1, (8, 8k, 8): q_len 1 / 2 / 4 / 8 at 3.90 / 3.79 / 3.64 / 3.50 TB/s against 3.85 /
# 3.68 / 3.47 / 3.20 with a block a row; paged calls gain the same; rows with more splits,
# such as (1, 32k), are unchanged).
_MMA_KNOBS: dict = {"step_addr": True, "combine_rows": True}
# Buckets (head_dim, rows) that keep the plain loop: step_addr spilled 8 B at (64, 32) on
# sm_120 (3 blocks per SM, 168 registers; NVRTC 13.0), the only spill of any arch.
_MMA_PLAIN_LOOP = {(64, 32)}
# Resident blocks per SM for paged caches, where they differ from _MMA_TILES'. Empty since
# session 18: the page-id loop ran 3 blocks at (128, 16) to cover its page-table waits (H200,
# bf16 d128, (8, 8k, 8 kv heads) q_len 1, pages shuffled, session 16 call F: pages of 16 / 64
# / 256 at 3.17 / 3.45 / 3.41 TB/s against 2.96 / 3.17 / 3.19 with 2), and the paged stepped
# loop below runs best at 2 (mask 7 spills at 3; mask 1 at 3 ran 0.91-0.98x contiguous).
_MMA_PAGED_MIN_BLOCKS: dict = {}
# Knobs of every paged tensor-core spec: the page-table loads a tile ahead (CF_PAGE_IDS), and
# where the pages allow, a tile's copies from P page bases (CF_PAGED_STEP, a mask of P = 1 /
# 2 / 4: page_size a multiple of block_n, or block_n / 2 or block_n / 4, and a multiple of the
# rows a block copies a pass; other page sizes and window-clipped splits keep the page-id
# loop). H200, bf16 d128, (8, 8k, 8 kv heads) q_len 1, pages shuffled, 2 blocks per SM,
# session 18 call 3 (contiguous 3.77 TB/s): pages of 16 / 32 / 64 / 256 at 3.71 / 3.75 / 3.66
# / 3.69 (0.97-0.99x) with mask 7, against 3.49 / 3.52 / 3.48 / 3.50 (0.92-0.93x) for the
# page-id loop at 3 blocks, the selection until then. Session 17 call 3 had timed the page-id
# loads alone: 3.47 / 3.52 / 3.52 against 3.17 / 3.42 / 3.43 without.
# combine_rows as for contiguous caches (above).
_MMA_PAGED_KNOBS = {"page_ids": True, "combine_rows": True}
_MMA_PAGED_STEP_MASK = 7
# Buckets (head_dim, rows) whose mask is smaller, where mask 7 spilled on some arch (NVRTC
# 13.0, sm_80 / 86 / 89 / 90 / 120; the table is in docs/decode.md, session 18). 0: the
# page-id loop alone.
_MMA_PAGED_STEP_MASKS = {(64, 32): 0, (128, 64): 0, (256, 16): 3, (256, 32): 3}


def mma_spec(dtype: str, head_dim: int, rows: int, paged: bool = False) -> DecodeMmaSpec:
    """The tensor-core spec of ``_MMA_TILES`` for rows query rows per kv head (a paged
    cache: ``_MMA_PAGED_MIN_BLOCKS`` and ``_MMA_PAGED_KNOBS``): pure."""
    d = head_dim_bucket(head_dim)
    cap = _MMA_MAX_ROWS.get(d, MMA_ROW_BUCKETS[-1])
    buckets = [b for b in MMA_ROW_BUCKETS if (d, b) in _MMA_TILES and b <= cap]
    r = next((b for b in buckets if rows <= b), buckets[-1])
    block_n, stages, warps, min_blocks = _MMA_TILES[d, r]
    knobs = mma_knobs(d, r, paged)
    if paged:
        min_blocks = _MMA_PAGED_MIN_BLOCKS.get((d, r), min_blocks)
    return DecodeMmaSpec(dtype, d, block_n, stages, warps, min_blocks, r, **knobs)


def mma_knobs(head_dim_bucket: int, rows_bucket: int, paged: bool = False) -> dict:
    """The knobs a selected tensor-core spec carries: a paged cache's own
    (``_MMA_PAGED_KNOBS`` and the bucket's paged_step mask; step_addr is contiguous-only),
    else ``_MMA_KNOBS`` less step_addr where ``_MMA_PLAIN_LOOP`` says it spilled: pure."""
    if paged:
        mask = _MMA_PAGED_STEP_MASKS.get((head_dim_bucket, rows_bucket), _MMA_PAGED_STEP_MASK)
        return {**({"paged_step": mask} if mask else {}), **_MMA_PAGED_KNOBS}
    if (head_dim_bucket, rows_bucket) in _MMA_PLAIN_LOOP:
        return {k: v for k, v in _MMA_KNOBS.items() if k != "step_addr"}
    return dict(_MMA_KNOBS)


def head_dim_bucket(head_dim: int) -> int:
    return next(b for b in HEAD_DIM_BUCKETS if head_dim <= b)


def row_bucket(rows: int) -> int:
    """Rows per block for ``rows`` query rows per kv head (more than 8: several row tiles)."""
    return next((b for b in ROW_BUCKETS if rows <= b), ROW_BUCKETS[-1])


def _has_mma(arch: str | None) -> bool:
    """The tensor-core split is built for sm_80 and newer (cp.async, bf16 mma.sync)."""
    return arch is None or int(arch.removeprefix("sm_").rstrip("a")) >= 80


def select_decode(dtype: str, head_dim: int, rows: int,
                  facts: DeviceFacts | None = None,
                  paged: bool = False) -> DecodeSpec | DecodeMmaSpec:
    """The spec for (dtype, head_dim, q_len * heads_per_kv rows), ``paged`` for a paged
    cache: pure. 16-bit data with MMA_MIN_ROWS rows or more takes the tensor-core split, on
    sm_80 and newer where its shared memory fits the device's opt-in limit (``facts`` None:
    not checked)."""
    d = head_dim_bucket(head_dim)
    if dtype != "float32" and rows >= MMA_MIN_ROWS and (facts is None or _has_mma(facts.arch)):
        for spec in _with_two_stages(mma_spec(dtype, d, rows, paged)):
            if facts is None or spec.smem_bytes <= facts.smem_optin:
                return _with_launch_knobs(spec, facts)
    r = row_bucket(rows)
    keys, stages = _KEYS[r][1 if dtype == "float32" else 0]
    return _with_launch_knobs(DecodeSpec(dtype, d, r, keys, stages), facts)


# The combine launched as the split's programmatic dependent (CF_DECODE_PDL, cuflash/pdl.py)
# on sm_90 and newer: a candidate, written without a GPU; tests/test_gpu_decode_pdl.py and
# bench/dev/decode_knob_ab.py --knob PDL switch it on. What it could save: the combine's
# launch and start-up after the split's last wave, ~2 us of the ~40 at (1, 32k, 8 kv heads)
# (docs/decode.md). Measured within 0.7% either way (session 31).
PDL = False
# The splits merged by the split kernel's last block of each row tile (CF_FUSED_COMBINE,
# flash_decode.cu's merge_splits_if_last) instead of the combine kernel: a candidate of
# session 41; tests/test_gpu_decode_fused.py checks it and bench/dev/decode_knob_ab.py
# --knob FUSED_COMBINE times it (`gpu_suite.sh decode_fused`). It was to save the combine's
# ~2 us after the split's last block; measured (H100, session 41) it is 0.7-15% slower
# wherever it fuses ((1, 32k, 8 kv heads) 2.574 -> 2.413 TB/s): in one wave of blocks every
# row tile's last block finishes at the end, so the merges are the tail (docs/decode.md).
FUSED_COMBINE = False
# Tensor-core buckets (head_dim, rows, paged) that keep the combine kernel: with the fused
# merge the paged d32 16-row split (3 blocks per SM, 168 registers) spilled 24 B on sm_90
# (NVRTC 13.0; sm_80 / sm_86 / sm_120 compiled it without).
_FUSED_SPILLS = {(32, 16, True)}


def _fused(spec):
    """``spec`` with ``fused_combine`` where FUSED_COMBINE is on and its bucket compiles
    without spills."""
    paged = getattr(spec, "page_ids", False)
    if not FUSED_COMBINE or (isinstance(spec, DecodeMmaSpec)
                             and (spec.head_dim, spec.rows, paged) in _FUSED_SPILLS):
        return spec
    return replace(spec, fused_combine=True)


def _with_launch_knobs(spec, facts: DeviceFacts | None):
    """``spec`` with the module's candidate flags applied: FUSED_COMBINE, then PDL (sm_90+)."""
    spec = _fused(spec)
    if not PDL or facts is None or int(facts.arch.removeprefix("sm_").rstrip("a")) < 90:
        return spec
    return replace(spec, pdl=True)


# The least shared memory a block of a tensor-core arch can opt in to (sm_86 / 89 / 120).
_SMALLEST_MMA_SMEM = min(v for arch, v in ARCH_SMEM_OPTIN.items() if _has_mma(arch))


def _with_two_stages(spec: DecodeMmaSpec) -> tuple:
    """spec, then, if some arch's block cannot hold it, the same with a ring of two tiles:
    that keeps the tensor-core kernel there (not timed on such a device)."""
    if spec.stages == 2 or spec.smem_bytes <= _SMALLEST_MMA_SMEM:
        return (spec,)
    return spec, replace(spec, stages=2)


def all_decode_specs(dtypes=DTYPES, arch: str | None = None) -> list:
    """Every spec ``select_decode`` can return (for compile checks and warm-up); ``arch``:
    only those for that arch (no tensor-core split before sm_80, none above its opt-in
    shared memory)."""
    simt = [DecodeSpec(dtype, d, r, *_KEYS[r][1 if dtype == "float32" else 0])
            for dtype in dtypes for d in HEAD_DIM_BUCKETS for r in ROW_BUCKETS]
    mma = [spec for dtype in dtypes if dtype != "float32" and _has_mma(arch)
           for d in HEAD_DIM_BUCKETS for r in MMA_ROW_BUCKETS if (d, r) in _MMA_TILES
           for paged in (False, True) for spec in _with_two_stages(mma_spec(dtype, d, r, paged))]
    if arch is not None and arch in ARCH_SMEM_OPTIN:
        mma = [spec for spec in mma if spec.smem_bytes <= ARCH_SMEM_OPTIN[arch]]
    every = simt + list(dict.fromkeys(mma))  # a row cap maps several buckets to one spec
    return [_fused(s) for s in every]


# -- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodePlan:
    """Grids, splits and scratch. Scratch (``workspace_bytes``, only when num_splits > 1):
    float32 o_part (num_splits, batch, q_len, heads, head_dim), then at ``lse_offset``
    float32 lse_part (num_splits, batch, heads, q_len), then, where the split kernel merges
    the splits itself (``fuses``: no ``combine_grid``), at ``counter_offset`` one int32
    ticket counter a split block's row tile (``grid[0]`` of them), zeroed before the split."""

    shape: DecodeShape
    spec: DecodeSpec | DecodeMmaSpec
    row_tiles: int
    num_splits: int
    keys_per_split: int
    grid: tuple[int, int, int]
    combine_grid: tuple[int, int, int] | None
    append_grid: tuple[int, int, int] | None  # k_new / v_new into the cache, first
    lse_offset: int
    workspace_bytes: int
    counter_offset: int = 0  # 0: no counters (one split, or the combine kernel merges)

    @property
    def fuses(self) -> bool:
        """Whether the split kernel's last blocks merge the splits (CF_FUSED_COMBINE)."""
        return self.counter_offset > 0

    @property
    def labels(self) -> tuple[str, ...]:
        return ((("decode_append",) if self.append_grid else ()) + (self.spec.name,)
                + (("decode_combine",) if self.combine_grid else ()))


def combine_by_warps(spec, num_splits: int) -> bool:
    """Whether the combine takes one row a warp (CF_COMBINE_ROWS, and every split in one
    round trip of loads: flash_decode.cu's kCombineBatch), so its grid is rows / warps."""
    batch = COMBINE_BATCH // _cdiv(spec.head_dim, 128)
    return getattr(spec, "combine_rows", False) and num_splits <= batch


def fuses_splits(spec, num_splits: int) -> bool:
    """Whether the split kernel merges ``num_splits`` splits itself: its spec has
    ``fused_combine`` and the merge's weights (rows x splits floats) fit the block's shared
    memory (flash_decode.cu's merge_splits_if_last)."""
    return (num_splits > 1 and getattr(spec, "fused_combine", False)
            and 4 * spec.rows * num_splits <= spec.smem_bytes)


def split_keys(seqlen_cache: int, num_splits: int, step: int = 1) -> tuple[int, int]:
    """(splits, keys_per_split) for at most ``num_splits`` ranges of whole steps covering
    the cache; never an empty trailing range. Shared with the CPU path."""
    if seqlen_cache == 0:
        return 1, 0
    per = _cdiv(_cdiv(seqlen_cache, max(1, num_splits)), step) * step
    return _cdiv(seqlen_cache, per), per


def wave_fill(blocks: int, slots: int) -> float:
    """Busy fraction of the resident-block slots over the waves ``blocks`` take."""
    return blocks / (_cdiv(blocks, slots) * slots) if blocks and slots else 0.0


def auto_splits(base_blocks: int, seqlen_cache: int, step: int, sm_count: int,
                min_blocks: int) -> int:
    """The fewest key splits whose blocks fill WAVE_FILL of the last wave, each split at
    least MIN_KEYS_PER_SPLIT keys, at most MAX_SPLITS; the best-filling count if none does.

    Why waves of resident blocks, with the H200's numbers (132 SMs, 4.3 TB/s measured copy,
    about 1 us of loaded DRAM latency): Little's law wants 4.3 MB in flight, 33 KB per SM.
    A resident block keeps ``spec.bytes_in_flight`` requested (8-32 KB; ptxas guarantees
    ``spec.min_blocks`` of them per SM), so an SM with its min_blocks blocks is saturated,
    and one with fewer is not. Every block has the same bytes to read and the blocks of a
    wave share the bandwidth evenly, so they finish together: what is lost is the empty
    slots of the last wave (1 - wave_fill). The old rule (8 blocks per SM) gave (1, 32k, 32)
    1024 blocks, 1.94 waves of 528 slots, and (8, 8k, 32) 1280 blocks, 2.4 waves: a last
    wave 40% full, measured 4.13 TB/s against 4.43 for (32, 4k, 32)'s full waves. This rule
    gives (1, 32k, 32) 16 splits (512 blocks, 97% of one wave) and (8, 8k, 32) 2 splits.
    Fewer splits also mean less partial o written and merged by the combine kernel. If the
    GPU keeps more than min_blocks per SM resident, the grid is simply less than a wave and
    every SM still holds at least min_blocks - 1 blocks."""
    if sm_count <= 0 or base_blocks <= 0:
        return 1
    slots = sm_count * min_blocks
    most = max(1, min(MAX_SPLITS, seqlen_cache // MIN_KEYS_PER_SPLIT))
    best, best_fill, seen = 1, -1.0, set()
    for want in range(1, most + 1):
        splits = split_keys(seqlen_cache, want, step)[0]
        if splits in seen:
            continue
        seen.add(splits)
        fill = wave_fill(base_blocks * splits, slots)
        if fill >= WAVE_FILL:
            return splits
        if fill > best_fill + 1e-9:
            best, best_fill = splits, fill
    return best


def plan_decode(shape: DecodeShape, sm_count: int, num_splits: int | None = None,
                spec: DecodeSpec | DecodeMmaSpec | None = None,
                facts: DeviceFacts | None = None) -> DecodePlan:
    """Pure: the spec, grids and scratch of one call. ``num_splits`` None or 0: automatic
    (``auto_splits``, counting the spec's own blocks: 16 rows and ``min_blocks`` per SM for
    the tensor-core split); else at most that many (``split_keys``). ``spec``: pinned
    instead of ``select_decode``'s (bench/dev/decode_variants.py times candidates that way).
    ``facts``: the device's arch and shared-memory limit, for ``select_decode``."""
    s = shape
    spec = spec or select_decode(s.dtype, s.head_dim, s.rows, facts, paged=s.page_size > 0)
    row_tiles = _cdiv(s.rows, spec.rows)
    blocks = s.batch * s.heads_kv * row_tiles
    if num_splits:
        splits, per = split_keys(s.seqlen_cache, num_splits)
    else:
        want = auto_splits(blocks, s.seqlen_cache, spec.step, sm_count, spec.min_blocks)
        splits, per = split_keys(s.seqlen_cache, want, spec.step)
    combine_grid = lse_offset = workspace = None
    counter_offset = 0
    if splits > 1:
        rows_out = s.batch * s.q_len * s.heads
        lse_offset = _cdiv(4 * splits * rows_out * s.head_dim, 256) * 256
        workspace = lse_offset + 4 * splits * rows_out
        if fuses_splits(spec, splits):
            counter_offset = _cdiv(workspace, 16) * 16
            workspace = counter_offset + 4 * blocks
        else:  # a block a row, or (few splits) a warp a row
            combine_grid = (_cdiv(rows_out, COMBINE_WARPS) if combine_by_warps(spec, splits)
                            else rows_out, 1, 1)
    chunks = s.batch * s.seqlen_new * s.heads_kv * (s.head_dim // 8)  # one thread each
    append_grid = (_cdiv(chunks, spec.threads), 1, 1) if chunks else None
    return DecodePlan(s, spec, row_tiles, splits, per, (blocks, splits, 1), combine_grid,
                      append_grid, lse_offset or 0, workspace or 0, counter_offset)


# -- launching on raw pointers -----------------------------------------------------------------

# flash_decode.cu's DecodeParams: 13 pointers, 17 ints, 18 strides, 2 floats (328 bytes, no
# tail padding). Every kernel of the file takes it whole.
_POINTERS = 13  # DecodeParams begins with its arrays' addresses
_PARAMS_SIGNATURE = "p" * _POINTERS + "i" * 17 + "q" * 18 + "f" * 2
_functions: dict = {}  # (spec name, device, forced arch) -> (split, combine, append, keep)


def _functions_of(spec: DecodeSpec | DecodeMmaSpec, device_id: int) -> tuple[int, int, int]:
    from .compiler import get_kernel

    key = (spec.name, device_id, config.raw())  # a forced arch loads other code
    hit = _functions.get(key)
    if hit is None:
        loaded = get_kernel(spec, device_id)
        combine = loaded.module.get_function("flash_decode_combine")
        append = loaded.module.get_function("flash_decode_append")
        ptr = lambda f: int(getattr(f, "kernel", f).ptr)  # RawKernel or Function
        hit = _functions[key] = (ptr(loaded.function), ptr(combine), ptr(append),
                                 (loaded, combine, append))
    return hit[:3]


@dataclass(frozen=True)
class DecodeOperands:
    """Addresses (0: absent) and (batch, seq, head) element strides of one call's arrays.
    Paged caches: the "batch" stride of k / v is the page stride."""

    q: int
    k: int
    v: int
    o: int
    lse: int
    strides_q: tuple
    strides_k: tuple
    strides_v: tuple
    strides_o: tuple
    cache_seqlens: int = 0
    block_table: int = 0
    alibi_slopes: int = 0
    k_new: int = 0
    v_new: int = 0
    strides_k_new: tuple = (0, 0, 0)
    strides_v_new: tuple = (0, 0, 0)


def _params(plan: DecodePlan, problem: DecodeProblem, ops: DecodeOperands,
            workspace: int) -> tuple:
    """DecodeParams, field by field (flash_decode.cu's order)."""
    s = plan.shape
    o_part, lse_part = ((workspace, workspace + plan.lse_offset) if plan.num_splits > 1
                        else (0, 0))
    counters = workspace + plan.counter_offset if plan.fuses else 0
    left, right = problem.window or (-1, -1)
    if problem.softcap:  # q * scale / softcap; the kernel's tanh, then * softcap * LOG2E
        scale_q, softcap_log2 = problem.softmax_scale / problem.softcap, problem.softcap * LOG2E
    else:
        scale_q, softcap_log2 = problem.softmax_scale * LOG2E, 0.0
    max_pages = s.seqlen_cache // s.page_size if s.page_size else 0
    return (ops.q, ops.k, ops.v, ops.k_new, ops.v_new, ops.cache_seqlens, ops.block_table,
            ops.alibi_slopes, ops.o, ops.lse, o_part, lse_part, counters,
            s.batch, s.q_len, s.heads, s.heads_kv, s.head_dim, s.seqlen_cache, s.seqlen_new,
            s.page_size, problem.num_pages, max_pages, plan.num_splits, plan.keys_per_split,
            plan.row_tiles, int(problem.causal), left, right,
            s.heads if problem.alibi_per_batch else 0,
            *ops.strides_q, *ops.strides_k, *ops.strides_v, *ops.strides_o,
            *ops.strides_k_new, *ops.strides_v_new, scale_q, softcap_log2)


def run_decode(plan: DecodePlan, problem: DecodeProblem, ops: DecodeOperands, workspace: int,
               stream: int, device_id: int) -> None:
    """Enqueue the decode on ``stream``: append (with k_new), split, combine (more than one
    split). ``workspace``: the address of ``plan.workspace_bytes`` scratch bytes."""
    _enqueue(plan, _functions_of(plan.spec, device_id), _params(plan, problem, ops, workspace),
             stream)


def _enqueue(plan: DecodePlan, functions: tuple, args: tuple, stream: int) -> None:
    s, spec = plan.shape, plan.spec
    split_fn, combine_fn, append_fn = functions
    # a launch error's description, formatted only then (spec.name is built, not stored)
    what = lambda kernel: (lambda: f"{getattr(kernel, 'name', kernel)} for {s}")
    if plan.append_grid:
        launch_function(append_fn, plan.append_grid, spec.threads, 0, _PARAMS_SIGNATURE, args,
                        stream, what("flash_decode_append"))
    if s.empty:  # an append with no query rows
        return
    if plan.fuses:  # the ticket counters (DecodeParams.split_counters, args[12])
        memset_async(args[12], 4 * plan.grid[0], stream)
    launch_function(split_fn, plan.grid, spec.threads, spec.smem_bytes, _PARAMS_SIGNATURE, args,
                    stream, what(spec))
    if plan.combine_grid:  # (with `pdl`, launched while the split's last wave runs)
        launch_function(combine_fn, plan.combine_grid, 32 * COMBINE_WARPS,
                        4 * COMBINE_WARPS * (spec.head_dim + 2), _PARAMS_SIGNATURE, args, stream,
                        what("flash_decode_combine"), dependent=spec.pdl)


# -- the public function -----------------------------------------------------------------------

_CAUSAL_PICTURE = """
    Causal masks align to the bottom-right of each sequence's valid keys (FlashAttention-2),
    the appended ones included: with L = cache_seqlens[b] + seqlen_new, query i of q_len sees
    cache position j iff j <= L - q_len + i.

        q_len = 3, L = 6 (cache positions 6.. are never read)
          j: 0 1 2 3 4 5 | 6 7
        q0:  x x x x . . | . .
        q1:  x x x x x . | . .
        q2:  x x x x x x | . .
"""

_OPTIONAL = ("cache_seqlens", "block_table", "k_new", "v_new", "alibi_slopes")


def attention_with_kvcache(q, k_cache, v_cache, *, k_new=None, v_new=None, cache_seqlens=None,
                           block_table=None, causal: bool = False,
                           softmax_scale: float | None = None, window=None, softcap=None,
                           alibi_slopes=None, num_splits: int | None = None,
                           return_softmax_lse: bool = False):
    """Attention of a few new queries against a K/V cache (decoding), split over the keys.

    Args:
        q: (batch, q_len, heads, head_dim), q_len from 1 to 8; float16, bfloat16 or
            float32, head_dim a multiple of 8 up to 256, head_dim contiguous.
        k_cache, v_cache: (batch, seqlen_cache, heads_kv, head_dim), or with ``block_table``
            (num_pages, page_size, heads_kv, head_dim), page_size a multiple of 16; same
            dtype and device as q; heads a multiple of heads_kv (query head h reads kv head
            h // (heads // heads_kv)). Written only by an append.
        k_new, v_new: None, or (batch, seqlen_new, heads_kv, head_dim) keys and values
            written into the caches at positions [cache_seqlens[b], + seqlen_new) before
            attending (FlashAttention-2's ``k``, ``v``): the new keys are visible and causal
            aligns to the new length. Needs ``cache_seqlens``, which is not updated.
        cache_seqlens: None (every entry holds seqlen_cache keys) or an int32 (batch,) array
            of the framework and device of q: entry b attends to cache positions
            [0, cache_seqlens[b] + seqlen_new). Host values outside [0, seqlen_cache -
            seqlen_new] raise ValueError; on CUDA they are not checked (that would sync the
            host) and are clamped.
        block_table: None, or int32 (batch, max_pages): position j of entry b is row
            j % page_size of page block_table[b, j // page_size]; seqlen_cache is
            max_pages * page_size. Host page ids outside [0, num_pages) raise ValueError;
            on CUDA they are clamped.
        causal: bottom-right causal mask within each entry's valid length (below).
        softmax_scale: default 1 / sqrt(head_dim).
        window, softcap, alibi_slopes: docs/masks.md's score modifiers, with the offset
            cache_seqlens[b] + seqlen_new - q_len per entry.
        num_splits: None or 0 picks the number of key splits from the problem and the GPU
            (1 on the CPU); n >= 1 asks for at most n splits (1: no split, no combine).
        return_softmax_lse: also return the float32 (batch, heads, q_len) log-sum-exp.

    Returns:
        o like q (a new array of the caller's type, dtype and device), or (o, lse) with
        ``return_softmax_lse``. A row that sees no key (an empty entry, or causal with fewer
        valid keys than queries) gets o = 0 and lse = -inf.

    CUDA torch and CuPy arrays run on the framework's current stream with its allocator
    and no host sync (a torch call, append included, can be captured in a CUDA graph).
    """
    given = dict(zip(_OPTIONAL, (cache_seqlens, block_table, k_new, v_new, alibi_slopes)))
    named = [(q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache")]
    named += [(x, name) for name, x in given.items() if x is not None]
    _refuse_untracked_gradients(named)
    return_softmax_lse = validate.check_bool(return_softmax_lse, "return_softmax_lse")
    flags = dict(causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap,
                 num_splits=num_splits)
    fast = _fast_backend([x for x, _ in named])
    if fast is not None:
        o, lse = decode_cuda(fast, q, k_cache, v_cache, given, flags)
        return (o, lse) if return_softmax_lse else o
    imported = {name: import_array(x, name) for x, name in named}
    problem = _check(imported, flags)
    iq = imported["q"]
    with caller_stream(iq):
        arrays = {name: x.array for name, x in imported.items()}
        if iq.is_cuda:
            from . import fastpath

            o, lse = decode_cuda(fastpath.cupy_backend(), arrays.pop("q"),
                                 arrays.pop("k_cache"), arrays.pop("v_cache"), arrays, flags,
                                 problem)
        else:
            o, lse = _decode_cpu(problem, arrays)
        o = export_array(o, like=iq)
        return (o, export_array(lse, like=iq)) if return_softmax_lse else o


attention_with_kvcache.__doc__ += _CAUSAL_PICTURE


def _check(imported: dict, flags: dict) -> DecodeProblem:
    return check_decode(imported["q"], imported["k_cache"], imported["v_cache"],
                        imported.get("cache_seqlens"), block_table=imported.get("block_table"),
                        k_new=imported.get("k_new"), v_new=imported.get("v_new"),
                        alibi_slopes=imported.get("alibi_slopes"), **flags)


def _fast_backend(arrays):
    """fastpath's backend for CUDA torch / CuPy arrays of one type, else None."""
    if type(arrays[0]).__module__.split(".")[0] not in ("torch", "cupy"):
        return None
    from . import fastpath

    return fastpath.backend_for(arrays, False, None)


def _decode_cpu(problem: DecodeProblem, arrays: dict):
    from .decode_cpu import decode_forward_cpu

    s = problem.shape
    splits, per = split_keys(s.seqlen_cache, problem.num_splits or 1)
    return decode_forward_cpu(
        arrays["q"], arrays["k_cache"], arrays["v_cache"], arrays.get("cache_seqlens"),
        causal=problem.causal, softmax_scale=problem.softmax_scale, splits=splits,
        keys_per_split=per, block_table=arrays.get("block_table"), k_new=arrays.get("k_new"),
        v_new=arrays.get("v_new"), window=problem.window, softcap=problem.softcap,
        alibi_slopes=arrays.get("alibi_slopes"))


# -- CUDA: validated once per layout, then pointers and a launch --------------------------------

_problems: dict = {}
_plans: dict = {}
_MAX_LAYOUTS = 4096


def _flag_key(flags: dict) -> tuple:
    """Flags as a cache key that keeps 1 and True (and 1.0) apart (``fastpath.typed``), in
    the dict's order: the callers build it in one order, and another only misses the cache."""
    return tuple((name, typed(v)) for name, v in flags.items())


def _problem_key(backend, q, k, v, given: dict, flags: dict):
    """The memo key of a call's layout and flags, or None for an unhashable flag (say a dict
    window: validation says what is wrong)."""
    key = (_flag_key(flags), backend.layout(q), backend.layout(k), backend.layout(v),
           tuple((name, backend.layout(x)) for name, x in given.items()))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _aligned(backend, q, k, v, given: dict) -> bool:
    """Rows 16-byte aligned (a memo hit skips the checks that say so)."""
    return all(backend.ptr(x) % validate.ROW_ALIGNMENT == 0
               for x in (q, k, v, given.get("k_new"), given.get("v_new")) if x is not None)


def _problem(backend, q, k, v, given: dict, flags: dict) -> DecodeProblem:
    key = _problem_key(backend, q, k, v, given, flags)
    known = _problems.get(key) if key is not None else None
    if known is not None and _aligned(backend, q, k, v, given):
        return known
    named = {"q": q, "k_cache": k, "v_cache": v, **given}
    problem = _check({n: import_array(x, n) for n, x in named.items()}, flags)
    if len(_problems) >= _MAX_LAYOUTS:
        _problems.clear()
    if key is not None:
        _problems[key] = problem
    return problem


def decode_plan(shape: DecodeShape, num_splits: int | None, device_id: int) -> DecodePlan:
    """``plan_decode`` memoized per (shape, num_splits, device)."""
    key = (shape, num_splits, device_id)
    plan = _plans.get(key)
    if plan is None:
        from .launch import device_facts
        from .specs import check_dtype

        facts = device_facts(device_id)
        check_dtype(facts, shape.dtype)
        plan = _plans[key] = plan_decode(shape, facts.sm_count, num_splits,
                                         facts=facts)
    return plan


def _operands(backend, q, k, v, given: dict, o, lse, s: DecodeShape) -> DecodeOperands:
    strides = lambda x: tuple(backend.operand(x)[1:4])
    ptr = lambda name: backend.ptr(given[name]) if given.get(name) is not None else 0
    new = {}
    if given.get("k_new") is not None:
        new = dict(k_new=ptr("k_new"), v_new=ptr("v_new"),
                   strides_k_new=strides(given["k_new"]), strides_v_new=strides(given["v_new"]))
    return DecodeOperands(
        backend.ptr(q), backend.ptr(k), backend.ptr(v), backend.ptr(o), backend.ptr(lse),
        strides(q), strides(k), strides(v),
        (s.q_len * s.heads * s.head_dim, s.heads * s.head_dim, s.head_dim),
        cache_seqlens=ptr("cache_seqlens"), block_table=ptr("block_table"),
        alibi_slopes=ptr("alibi_slopes"), **new)


@dataclass(frozen=True)
class _Bound:
    """A validated layout's launches recorded on stand-in addresses (``cuflash.replay``):
    what a repeated call reuses."""

    problem: DecodeProblem
    plan: DecodePlan
    replay: Replay  # on (q, k, v, k_new, v_new, cache_seqlens, block_table, alibi, o, lse, scratch)
    lse_shape: tuple


_bound: dict = {}


def forget_plans() -> None:
    """Drop the memoized problems, plans and recorded launches: after a selection flag
    (FUSED_COMBINE, PDL, the knob tables) changes, which their keys do not hold."""
    for memo in (_problems, _plans, _bound):
        memo.clear()


_ARRAYS = ("q", "k", "v", "k_new", "v_new", "cache_seqlens", "block_table", "alibi_slopes")
_ABSENT = (0,) * (len(_ARRAYS) - 3)  # the optional arrays' addresses when none is given


def _bind(backend, q, k, v, given: dict, problem: DecodeProblem, index: int) -> _Bound:
    s = problem.shape
    plan = decode_plan(s, problem.num_splits, index)
    ops = _operands(backend, q, k, v, given, q, q, s)  # (o, lse: any array; addresses dropped)
    at = addresses(len(_ARRAYS) + 3)
    present = {"q", "k", "v", *given}  # absent arrays stay 0
    ptrs = {name: at[i] if name in present else 0 for i, name in enumerate(_ARRAYS)}
    ops = replace(ops, q=ptrs["q"], k=ptrs["k"], v=ptrs["v"], k_new=ptrs["k_new"],
                  v_new=ptrs["v_new"], cache_seqlens=ptrs["cache_seqlens"],
                  block_table=ptrs["block_table"], alibi_slopes=ptrs["alibi_slopes"],
                  o=at[8], lse=at[9])
    functions = _functions_of(plan.spec, index)
    args = _params(plan, problem, ops, at[10] if plan.workspace_bytes else 0)
    replay = Replay.record(lambda stream: _enqueue(plan, functions, args, stream))
    return _Bound(problem, plan, replay, (s.batch, s.heads, s.q_len))


def decode_cuda(backend, q, k, v, given: dict, flags: dict,
                problem: DecodeProblem | None = None):
    """(o, lse) on CUDA arrays of ``backend``'s framework, on its current stream. A layout
    seen before (same flags, shapes, strides, dtypes, device and configuration) skips the
    checks and the plan: only the addresses are new (the host time of a decode step)."""
    if given:
        given = {name: x for name, x in given.items() if x is not None}
    index = backend.device_index(q)
    key = bound = None
    if problem is None:
        key = _problem_key(backend, q, k, v, given, flags)
        if key is not None:
            key = (key, config.raw())
            bound = _bound.get(key)
            if bound is not None and not _aligned(backend, q, k, v, given):
                bound = None  # the checks say which row is misaligned
    if bound is None:
        problem = problem or _problem(backend, q, k, v, given, flags)
        with backend.on_device(index):
            bound = _bind(backend, q, k, v, given, problem, index)
        if key is not None:
            if len(_bound) >= _MAX_LAYOUTS:
                _bound.clear()
            _bound[key] = bound
    plan = bound.plan
    o = backend.empty(q.shape, None, q)
    lse = backend.empty(bound.lse_shape, backend.float32, q)
    if poison_enabled():
        backend.poison(o), backend.poison(lse)
    s = plan.shape
    if s.empty and not s.seqlen_new:
        return o, lse
    ptr = backend.ptr
    optional = (tuple(ptr(given[name]) if name in given else 0 for name in _ARRAYS[3:])
                if given else _ABSENT)
    with backend.on_device(index):
        workspace = scratch = 0
        if plan.workspace_bytes:  # held until the launches are enqueued
            scratch = backend.empty((plan.workspace_bytes,), backend.uint8, q)
            workspace = ptr(scratch)
        bound.replay((ptr(q), ptr(k), ptr(v), *optional, ptr(o), ptr(lse), workspace),
                     backend.stream())
    return o, lse

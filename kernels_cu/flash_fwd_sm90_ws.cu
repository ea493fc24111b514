// flash_fwd_sm90_ws.cu -- the Hopper forward, warp-specialized: one warpgroup copies K and V
// tiles into a ring of shared-memory stages while two others compute, and each computing
// warpgroup overlaps its softmax with its own tensor-core work (FlashAttention-3's producer /
// consumer split and intra-warpgroup pipelining; Shah et al. 2024). Same outputs, masks,
// modifiers and host contract as flash_fwd_sm90.cu (read its header); what differs:
//
// Block: a producer warpgroup and C = CF_BLOCK_M / 64 consumers (C = 2 or 3;
// CF_WARPS = 4 + 4C).
//   warpgroup 0, the producer: 40 registers a thread (32 when C = 3, 48 for some causal
//     calls; setmaxnreg, ws::kProducerRegs); copies Q once, then key tile after key tile,
//     last first, K and V of a tile into stage it % CF_STAGES with cp.async, each followed
//     by cp.async.mbarrier.arrive on the stage's k_full / v_full mbarrier (it completes when
//     every producer thread's copies have landed); before refilling a stage it waits on the
//     stage's empty mbarrier. A consumer that has waited on k_full / v_full fences the
//     generic proxy (cp.async's writes) against the async one (wgmma's reads).
//   warpgroups 1 .. C, the consumers: the registers left (232, 160 when C = 3, 224 beside a
//     48-register producer); rows 64(g - 1) .. + 63.
//     Step it issues S(it) = Q K(it)^T and O += P(it - 1) V(it - 1) back to back, then runs
//     the softmax of S(it) while the P V product is still on the tensor cores; only then it
//     waits for P V, rescales O by the new row max and releases the stage of it - 1.
//     They take turns issuing their products (ping-pong, round robin), so one's softmax runs
//     while another's products hold the tensor cores. No __syncthreads: the consumers meet
//     once, at a named barrier before the epilogue (the O staging bands overlap other
//     warpgroups' Q rows).
//
// Persistent blocks (CF_FWD_PERSISTENT=1, TileWalk): about one block per SM walks (batch
//   entry, query tile, head) triples. Both roles count the Q and K/V tiles loaded so far; a
//   stage's use number gives its mbarrier phases across tiles. The consumers release Q on
//   q_empty once their last S product is done, and the last stage after the last P V, so the
//   producer loads the next tile's Q and first stages under that P V and the epilogue, which
//   stores O from the registers (s_q may hold the next rows by then) and skips the
//   consumers' barrier. CF_FWD_PERSISTENT=2 also pipelines the consumers across tiles, with
//   a second Q buffer (the consumer loop marked "value 2" below).
//
// Bulk tensor copies (CF_FWD_TMA=1, selected at head_dim 64 / 128: registry.FWD90_TMA): one
//   producer thread issues Q, K and V as TMA boxes (cf_sm90.cuh's tma_load_tile; the tensor
//   maps are the last three parameters, cuflash/tensor_map.py) and arms each full mbarrier
//   with the tile's bytes; the other producer warps leave at once, and so do its warp's other
//   lanes unless the loop needs them (kTmaWarp: a block mask's tile cursor is a warp ballot,
//   and lanes that left vote "hidden"). The copies land through the async proxy that wgmma
//   reads, so the consumers need no proxy fence. Rows past a sequence land as zeros, like
//   cp.async's zero fill. Packed sequences (CF_VARLEN) take one map over all rows (batch 1),
//   boxes from the sequence's first row: a box past the sequence's end reads the rows after
//   it (the next sequence's, or whatever lies past seqused_k or cu_seqlens_k's last entry;
//   zeros past the tensor). The mask keeps those keys out (their scores become -inf by
//   select, P is 0) and the rows past seqlen_q are not stored, but P V would still carry a
//   non-finite value of such a V row into O as 0 * inf. So the key tile that ends a sequence
//   lands its V on a barrier of its own (StageBarriers::v_tail), the producer warp zeroes the
//   rows past the sequence and only then completes the stage's v_full (kTailZero).
//
// Clusters of two (CF_FWD_CLUSTER=2 with CF_FWD_TMA, a candidate: not selected; its tests
//   passed on an H200, session 30, not timed; head_dim 128 / 256, one block per tile, no causal mask, window, block mask or
//   packed sequences): the blocks of query tiles 2c and 2c + 1 of a head share each K / V
//   tile: each boxes half its panels into both blocks' shared memory (multicast), so L2 sends
//   K and V once per pair (FlashAttention-3 pairs its non-causal blocks so at head_dim >= 128).
//   A stage is refilled only when both blocks' consumers have released it: each consumer warp
//   arrives on its own block's empty mbarrier and on the peer's. The producer thread waits for
//   the last releases before it leaves, so no block exits while its peer may still arrive on
//   its barriers.
//
// Shared memory: [Q (two with value 2) | K stage 0..S-1 | V stage 0..S-1 | mbarriers], panel
//   layout (cf_sm90.cuh): (Q buffers * CF_BLOCK_M + 2 * CF_STAGES * CF_BLOCK_N) *
//   CF_HEAD_DIM * 2 + 128 bytes.

#include "cf_config.cuh"

#include "cf_common.cuh"
#include "cf_fwd.cuh"
#include "cf_sm90.cuh"
#include "cf_mask.cuh"
#include "cf_seq.cuh"
#include "cf_params.cuh"
#include "cf_tile_order.cuh"
#include "cf_drop_ring.cuh"

static_assert(CF_DTYPE == 0 || CF_DTYPE == 1, "flash_fwd_sm90_ws.cu is a 16-bit kernel");
static_assert(CF_HEAD_DIM_V == CF_HEAD_DIM, "v's own head_dim: flash_fwd_sm90.cu's");
static_assert(CF_HEAD_DIM == 64 || CF_HEAD_DIM == 128 || CF_HEAD_DIM == 256,
              "head-dim bucket: whole 64-column panels");
static_assert((CF_BLOCK_M == 128 || CF_BLOCK_M == 192) && CF_WARPS == 4 + CF_BLOCK_M / 16,
              "a producer and two or three 64-row consumers");
static_assert(CF_BLOCK_N == 64 || CF_BLOCK_N == 80 || CF_BLOCK_N == 128 || CF_BLOCK_N == 176 ||
                  CF_BLOCK_N == 256,
              "wgmma widths");
static_assert(CF_STAGES >= 2 && CF_STAGES <= 4, "2 to 4 K/V stages");

// The producer's registers (setmaxnreg; a knob, 0: ws::kProducerRegs's default); the
// consumers take what is left of the block's registers.
#ifndef CF_FWD_WS_PRODUCER_REGS
#define CF_FWD_WS_PRODUCER_REGS 0
#endif

#ifndef CF_FWD_PERSISTENT
#define CF_FWD_PERSISTENT 0
#endif
#ifndef CF_FWD_TMA
#define CF_FWD_TMA 0
#endif
#ifndef CF_FWD_CLUSTER
#define CF_FWD_CLUSTER 1
#endif
static_assert(CF_FWD_CLUSTER == 1 ||
                  (CF_FWD_CLUSTER == 2 && CF_FWD_TMA && !CF_FWD_PERSISTENT && CF_MASK == 0 &&
                   !CF_BLOCK_SPARSE && CF_HEAD_DIM % 128 == 0),
              "a pair shares every key tile: TMA, one block per tile, no mask, whole panel pairs");
#if CF_FWD_CLUSTER == 2
#define CF_CLUSTER_DIMS __cluster_dims__(2, 1, 1)
#else
#define CF_CLUSTER_DIMS
#endif
#if CF_FWD_TMA  // the tensor maps of q, k and v, after every other parameter
#define CF_TMA_PARAMS                                                                     \
  , const __grid_constant__ cf_tensor_map tm_q, const __grid_constant__ cf_tensor_map tm_k, \
      const __grid_constant__ cf_tensor_map tm_v
#else
#define CF_TMA_PARAMS
#endif
// Dropout's kept flags drawn by the producer's three idle warps into CF_DROP_RING slots of
// shared memory, one key tile a slot, and applied by the consumers to their packed P (a knob;
// cf_drop_ring.cuh). TMA only (one thread issues the copies; the others would leave), one
// block per key tile stream (not across tiles, not in a cluster).
#ifndef CF_DROP_RING
#define CF_DROP_RING 0
#endif
#ifndef CF_FWD_DROP_EARLY
#define CF_FWD_DROP_EARLY 0
#endif
namespace ws {
enum : int { kDropSlots = CF_DROPOUT && !CF_FWD_DROP_EARLY ? CF_DROP_RING : 0 };
static_assert(kDropSlots == 0 || (CF_FWD_TMA && CF_FWD_PERSISTENT != 2 && CF_FWD_CLUSTER == 1 &&
                                  CF_BLOCK_N % 32 == 0 && kDropSlots <= 4),
              "the flag ring: TMA, one pipeline a tile, 32-column steps, at most 4 slots");
enum : int {
  kConsumers = CF_BLOCK_M / 64,
  kProducerThreads = 128,
  kConsumerThreads = 128 * kConsumers,
  kChunks = CF_HEAD_DIM / 8,  // 16-byte chunks per tile row
  kNT = CF_BLOCK_N / 8,       // S n-tiles per thread
  kDT = CF_HEAD_DIM / 8,      // O n-tiles per thread
  kTileQ = CF_BLOCK_M * CF_HEAD_DIM * 2,
  kTileKV = CF_BLOCK_N * CF_HEAD_DIM * 2,  // bytes of one K (or V) stage
  kQBuffers = CF_FWD_PERSISTENT == 2 ? 2 : 1,  // across tiles: the next tile's Q beside
  kDropRing = kQBuffers * kTileQ + 2 * CF_STAGES * kTileKV,  // the flag slots (kDropSlots)
  kDropSlot = CF_BLOCK_M * CF_BLOCK_N,  // DropRingTile's bytes (instantiated with the ring only)
  kBarriers = kDropRing + kDropSlots * kDropSlot,
  kSmemBytes = kBarriers + (kDropSlots ? 256 : 128),  // the slots' mbarriers after the others
  kDrawThreads = 96,  // the producer's warps 1-3 draw the flags (kDropSlots)
  // what the launch gives the block: 65536 registers shared by its threads, in steps of 8
  kBlockRegs = 32 * CF_WARPS * (65536 / (32 * CF_WARPS) / 8 * 8),
  // the consumers take what the producer leaves (40 + 232 with two, 32 + 160 with three).
  // Causal with ALiBi or packed sequences: 48 + 224, where 40 spilled 24 B in the producer
  // (NVRTC 13.5) and the consumers fit 224 without a spill.
  // Under a block mask the producer's tile cursor needs 56 (48 spilled 8 B, 40 24 B at d128).
  kProducerRegs = CF_FWD_WS_PRODUCER_REGS ? CF_FWD_WS_PRODUCER_REGS
                  : kConsumers == 3                           ? 32
                  : CF_BLOCK_SPARSE                           ? 56
                  : CF_CAUSAL && (CF_ALIBI || CF_VARLEN)      ? 48
                                                              : 40,
  kConsumerRegsLeft = (kBlockRegs - 128 * kProducerRegs) / kConsumerThreads / 8 * 8,
  kConsumerRegs = kConsumerRegsLeft > 240 ? 240 : kConsumerRegsLeft,
  kConsumerBarrier = 1,  // the named barrier the consumers meet at
  kTurnBarrier = 2,      // 2 + g: consumer warpgroup g may issue its products
};
// Turn-taking of the consumer warpgroups (a knob: CF_FWD_PINGPONG=0 turns it off).
#ifndef CF_FWD_PINGPONG
#define CF_FWD_PINGPONG 1
#endif
constexpr bool kPingPong = CF_FWD_PINGPONG;
// O rescaled by the previous step's row scale between issuing S = Q K^T and O += P V, under
// the S product, instead of after P V lands and the softmax is done (a knob,
// CF_FWD_RESCALE_EARLY=1, a candidate for head_dim 256): there the rescale is 128 multiplies
// a thread on the path from the softmax to the next turn. FlashAttention-3's public sm90
// mainloop rescales early for head_dim > 128 (RescaleOBeforeGemm), with no turn-taking
// between its warpgroups at head_dim 256 (CF_FWD_PINGPONG=0 here). Not with value 2 of
// CF_FWD_PERSISTENT (its cross-tile product would need the same). Measured, not selected
// (H100, bf16, 2026-12-07): the 128 x 80 d256 tile with TMA 529.5 / 537.9 TFLOP/s at 4k /
// 16k, early 519.1 / 527.4, without turns 520.0 / 529.3, both 510.3 / 518.6; the selected
// d128 tiles within +-1%.
#ifndef CF_FWD_RESCALE_EARLY
#define CF_FWD_RESCALE_EARLY 0
#endif
enum : int { kRescaleEarly = CF_FWD_RESCALE_EARLY };  // (an enum: no PTX symbol)
static_assert(!CF_FWD_RESCALE_EARLY || CF_FWD_PERSISTENT != 2,
              "rescaling early: the one-tile pipeline");
// Persistent blocks (a knob, CF_FWD_PERSISTENT=1; TileWalk below): a block walks query tile
// after query tile, so the producer loads the next tile's Q and first K/V stages while the
// consumers finish the last P V and the epilogue, and no block waits for a launch.
// Value 2 also runs the consumers' pipeline across tiles: a tile's first S product is
// issued with the previous tile's last P V and its softmax runs under it; that tile's
// epilogue follows. Its Q then needs a second buffer (written in session 20, not yet run).
constexpr bool kPersistent = CF_FWD_PERSISTENT >= 1;
constexpr bool kAcrossTiles = CF_FWD_PERSISTENT == 2;
// Dropout's kept flags drawn while the tile's products run (a knob, CF_FWD_DROP_EARLY=1;
// the backward draws them there already), instead of after the softmax where the Philox
// rounds lengthen the turn the other warpgroup's products wait on. The same flags either way.
// (Every step; a tile's first key tile too, except in the across-tiles loop, value 2.)
#ifndef CF_FWD_DROP_EARLY
#define CF_FWD_DROP_EARLY 0
#endif
enum : int { kDropEarly = CF_DROPOUT && CF_FWD_DROP_EARLY };  // (an enum: no PTX symbol)
// Dropout applied to P after packing, by byte masks (CF_DROP_PACKED=1, selected:
// registry.FWD90_DROP_PACKED; cf_drop_packed.cuh): the same bits as dropping the floats first,
// fewer instructions.
#ifndef CF_DROP_PACKED
#define CF_DROP_PACKED 0
#endif
enum : int { kDropPacked = CF_DROPOUT && CF_DROP_PACKED && !CF_FWD_DROP_EARLY };
// Arrivals that complete a full mbarrier's phase: every producer thread's cp.async, or the
// one TMA thread's arrival (its boxes' bytes count separately). (Enums, not constexpr
// variables: those leave a symbol in the PTX.)
enum : int {
  kTma = CF_FWD_TMA,
  kTailZero = CF_FWD_TMA && CF_VARLEN,  // a sequence's last V tile zeroed past its end
  // the issuing thread's warp stays: it zeroes tails, or it counts kept tiles by ballot
  kTmaWarp = kTailZero || (CF_FWD_TMA && CF_BLOCK_SPARSE),
  kFullArrivals = CF_FWD_TMA ? 1 : kProducerThreads,
  kPanels = CF_HEAD_DIM / 64,
  kCluster = CF_FWD_CLUSTER,
  kEmptyArrivals = CF_FWD_CLUSTER * kConsumerThreads / 32  // a consumer warp of each block
};
}  // namespace ws

template <int ROWS>
using WsLoader = PanelLoader<ROWS, ws::kChunks, ws::kProducerThreads>;

// The mbarriers: q_full, then k_full, v_full and empty per stage, then q_empty (persistent),
// then (across tiles) the second Q buffer's q_full and q_empty.
struct StageBarriers {
  cf_u32 base;
  __device__ __forceinline__ cf_u32 q_full(int i = 0) const {
    return base + (i ? 8 * (2 + 3 * CF_STAGES) : 0);
  }
  __device__ __forceinline__ cf_u32 k_full(int s) const { return base + 8 * (1 + s); }
  __device__ __forceinline__ cf_u32 v_full(int s) const { return base + 8 * (1 + CF_STAGES + s); }
  __device__ __forceinline__ cf_u32 empty(int s) const {
    return base + 8 * (1 + 2 * CF_STAGES + s);
  }
  __device__ __forceinline__ cf_u32 q_empty(int i = 0) const {
    return base + 8 * (1 + 3 * CF_STAGES) + 16 * i;
  }
  // a sequence's last V box lands here (kTailZero), before the producer zeroes its tail
  __device__ __forceinline__ cf_u32 v_tail() const {
    return base + 8 * (2 * ws::kQBuffers + 3 * CF_STAGES);
  }
  // dropout's flag slot r is drawn / has been read (kDropSlots), in the second 128 bytes
  __device__ __forceinline__ cf_u32 drop_full(int r) const { return base + 128 + 8 * r; }
  __device__ __forceinline__ cf_u32 drop_empty(int r) const {
    return base + 128 + 8 * (ws::kDropSlots + r);
  }
};
static_assert(8 * (2 * ws::kQBuffers + 3 * CF_STAGES + ws::kTailZero) <= 128,
              "the mbarriers fit their 128 bytes");
static_assert(!ws::kAcrossTiles || !CF_BLOCK_SPARSE, "across tiles: every key tile of a tile");

// The (batch entry, query tile, head) triples a block works on, in the order it takes them.
//   One per block (CF_FWD_PERSISTENT=0): the grid is (query tiles, heads, batch); causal
//     grids read (x, y) through causal_tile_order_all_heads (heaviest tiles first).
//   Persistent: the grid is (blocks per batch entry, 1, batch) (plan.plan_forward: about one
//     block per SM in all), N blocks in all, block g = z * gridDim.x + x. The triples are
//     numbered entry by entry, within an entry as the one-per-block grid starts its blocks
//     ((tile, head) = (L % tiles, L / tiles); causal (tiles - 1 - L / heads, L % heads),
//     heaviest first), so the blocks at work share an entry's K and V in L2 (walking every
//     entry at once, d128 causal at 1k and 4k ran 7-14% slower, H200 2026-12-04). Block g
//     takes triples g, 2N - 1 - g, 2N + g, ...: back and forth, so that under the causal
//     order each block's sum of tiles comes out about equal.
struct TileWalk {
  int tiles, heads, round, linear;
  __device__ __forceinline__ TileWalk(int max_seqlen_q, int heads_)
      : tiles((max_seqlen_q + CF_BLOCK_M - 1) / CF_BLOCK_M), heads(heads_), round(0) {
    at_round();
  }
  __device__ __forceinline__ void at_round() {
    const int n = (int)(gridDim.x * gridDim.z), g = (int)(blockIdx.z * gridDim.x + blockIdx.x);
    linear = round * n + ((round & 1) ? n - 1 - g : g);
  }
  __device__ __forceinline__ bool more() const {
    return ws::kPersistent ? linear < tiles * heads * (int)gridDim.z : round == 0;
  }
  __device__ __forceinline__ void next() {
    ++round;
    at_round();
  }
  __device__ __forceinline__ int entry() const {
    return ws::kPersistent ? linear / (tiles * heads) : (int)blockIdx.z;
  }
  __device__ __forceinline__ int tile_m() const {
    if (!ws::kPersistent) {
      return CF_CAUSAL ? (int)gridDim.x - 1 - causal_tile_order_all_heads().tile_rank
                       : (int)blockIdx.x;
    }
    const int pair = linear % (tiles * heads);
    return CF_CAUSAL ? tiles - 1 - pair / heads : pair % tiles;
  }
  __device__ __forceinline__ int head() const {
    if (!ws::kPersistent) return CF_CAUSAL ? causal_tile_order_all_heads().head : (int)blockIdx.y;
    const int pair = linear % (tiles * heads);
    return CF_CAUSAL ? pair % heads : pair / tiles;
  }
};

extern "C" __global__ void __launch_bounds__(32 * CF_WARPS, 1) CF_CLUSTER_DIMS
    flash_fwd_sm90(CF_FWD_PARAMS(/* no __restrict__ */), CF_MOD_PARAMS, const float* sinks,
                   CF_SEQ_PARAMS CF_BSP_PARAMS CF_DROP_PARAMS CF_TMA_PARAMS) {
  using namespace ws;
  extern __shared__ __align__(1024) unsigned char smem[];
  CF_REQUIRE_SMEM(kSmemBytes);
  sm90_require_aligned(smem);
  unsigned char* s_q = smem;
  unsigned char* s_k = smem + kQBuffers * kTileQ;
  unsigned char* s_v = s_k + CF_STAGES * kTileKV;
  const StageBarriers bars{smem_addr(smem + kBarriers)};

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2;
  // Consumer warp w (0..7) owns rows 16w .. 16w + 15, as in flash_fwd_sm90.cu; the producer
  // uses the query tile only for its key range.
  const int cwarp = max(warp - 4, 0), group = lane >> 2, tig = lane & 3;
  if (!kPersistent && CF_VARLEN) {  // the grid covers the longest sequence
    const SeqInfo seq(blockIdx.z, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);
    if (TileWalk(max_seqlen_q, heads).tile_m() * CF_BLOCK_M >= seq.seqlen_q) return;
  }

  if (tid == 0) {
    mbar_init(bars.q_full(), kFullArrivals);
    for (int s = 0; s < CF_STAGES; ++s) {
      mbar_init(bars.k_full(s), kFullArrivals);
      mbar_init(bars.v_full(s), kFullArrivals);
      mbar_init(bars.empty(s), kEmptyArrivals);  // one arrival per consumer warp (per block)
    }
    for (int i = 0; i < (kPersistent ? kQBuffers : 0); ++i) {
      if (i) mbar_init(bars.q_full(i), kFullArrivals);
      mbar_init(bars.q_empty(i), kConsumerThreads / 32);
    }
    if (kTailZero) mbar_init(bars.v_tail(), 1);
    for (int r = 0; r < kDropSlots; ++r) {
      mbar_init(bars.drop_full(r), kDrawThreads);  // every drawing thread, after its stores
      mbar_init(bars.drop_empty(r), kConsumerThreads);  // every consumer thread, after its loads
    }
    mbar_fence_init();
  }
  if (kCluster == 2) {
    cluster_sync();  // the peer's barriers are ready before any box or arrival reaches them
  } else {
    __syncthreads();
  }

  // Both roles count the tiles loaded so far, Q tiles and K/V tiles (a stage's use number
  // gives its mbarriers' phase); one-per-block kernels fold them to 0.
  int q_loads = 0, kv_loads = 0;
  if (wg == 0) {  // ---- the producer ------------------------------------------------------
    regs_dealloc<kProducerRegs>();
    // warps 1-3 draw dropout's flags (kDropSlots): whole warps (a block mask's cursor votes)
    const bool drawer = kDropSlots && warp != 0;
    // TMA: one thread issues every box (its warp stays where the loop needs it: kTmaWarp)
    if (kTma && (kTmaWarp ? warp != 0 : tid != 0) && !drawer) return;
    if constexpr (kDropSlots > 0) {
      if (drawer) {  // each key tile's flags, in the order the consumers visit them
        const Dropout drop = CF_DROP;
        int drawn = 0;  // key tiles drawn so far (a slot's use number)
#pragma unroll 1
        for (TileWalk walk(max_seqlen_q, heads); walk.more(); walk.next()) {
          const int b = walk.entry(), q0 = walk.tile_m() * CF_BLOCK_M, h = walk.head();
          const SeqInfo seq(b, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);
          if (kPersistent && CF_VARLEN && q0 >= seq.seqlen_q) continue;
          const FwdQueryTile<CF_BLOCK_M, CF_BLOCK_N> tile(seq, b, h, q0, cwarp, group, tig,
                                                          CF_MOD_ARGS);
          const KeyTiles tiles = tile.tiles;  // visited last first, as the producer loads them
          const KeptKeyTiles<CF_BLOCK_N> kept(CF_BSP_MASK, b, h, q0, tiles);
          const int n_tiles = kept.count();
          const unsigned int bh = drop.head(b, h, heads);
          int j_kept = kept.below(tiles.end);
#pragma unroll 1
          for (int it = 0; it < n_tiles; ++it, ++drawn) {
            const int j = CF_BLOCK_SPARSE ? j_kept : tiles.end - 1 - it;
            if (CF_BLOCK_SPARSE) j_kept = kept.below(j);
            const int slot = drawn % kDropSlots, round = drawn / kDropSlots;
            if (round > 0) mbar_wait(bars.drop_empty(slot), (round - 1) & 1);
            unsigned char* flags = smem + kDropRing + slot * kDropSlot;
            cf_drop_ring_fill<CF_BLOCK_M, CF_BLOCK_N>(drop, flags, bh, q0, j * CF_BLOCK_N,
                                                      tid - 32, kDrawThreads);
            mbar_arrive(bars.drop_full(slot));
          }
        }
        return;
      }
    }
    const bool issuer = tid == 0;
    (void)issuer;
    const cf_u32 rank = kCluster == 2 ? cluster_rank() : 0;
    int loads_total = 0;  // K / V tiles, for the wait on the last releases (clusters)
    int tails = 0;        // V tails zeroed so far (v_tail's phase)
    (void)tails;
#pragma unroll 1
    for (TileWalk walk(max_seqlen_q, heads); walk.more(); walk.next()) {
      const int b = walk.entry(), q0 = walk.tile_m() * CF_BLOCK_M, h = walk.head();
      const int h_kv = h / heads_per_kv;
      const SeqInfo seq(b, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);
      const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;  // this sequence's
      // the maps' row and batch of this sequence's row 0 (packed: one map over every row)
      const int map_q0 = CF_VARLEN ? seq.q_begin : 0, map_k0 = CF_VARLEN ? seq.k_begin : 0;
      const int map_b = CF_VARLEN ? 0 : b;
      (void)map_q0, (void)map_k0, (void)map_b;
      if (kPersistent && CF_VARLEN && q0 >= seqlen_q) continue;
      const FwdQueryTile<CF_BLOCK_M, CF_BLOCK_N> tile(seq, b, h, q0, cwarp, group, tig,
                                                      CF_MOD_ARGS);
      const KeyTiles tiles = tile.tiles;  // visited last first
      const KeptKeyTiles<CF_BLOCK_N> kept(CF_BSP_MASK, b, h, q0, tiles);  // all: no mask
      const int n_tiles = kept.count();
      if (n_tiles == 0) continue;
#if !CF_FWD_TMA
      const elem_t* q_head = q + seq.q_offset(stride_qb, stride_qm) + h * stride_qh;
      const elem_t* k_head = k + seq.k_offset(stride_kb, stride_kn) + h_kv * stride_kh;
      const elem_t* v_head = v + seq.k_offset(stride_vb, stride_vn) + h_kv * stride_vh;
      const WsLoader<CF_BLOCK_N> load_k(k_head, stride_kn, head_dim, tid);
      const WsLoader<CF_BLOCK_N> load_v(v_head, stride_vn, head_dim, tid);
#endif
      {
        // the consumers release a Q buffer once their last S product of its tile is done
        const int buf = q_loads % kQBuffers, use = q_loads / kQBuffers;
        if (kPersistent && use > 0) mbar_wait(bars.q_empty(buf), (use - 1) & 1);
#if CF_FWD_TMA
        if (issuer) {
          mbar_arrive_expect_tx(bars.q_full(buf), kTileQ);
          tma_load_tile<CF_BLOCK_M, kPanels>(smem_addr(s_q + buf * kTileQ), &tm_q, map_q0 + q0,
                                             h, map_b, bars.q_full(buf));
        }
#else
        const WsLoader<CF_BLOCK_M> load_q(q_head, stride_qm, head_dim, tid);
        load_q.load(s_q + buf * kTileQ, q0, seqlen_q - q0);
        mbar_arrive_cp_async(bars.q_full(buf));
#endif
      }
      int j_kept = kept.below(tiles.end);  // dense: tiles.end - 1 - it, as before the mask
#pragma unroll 1
      for (int it = 0; it < n_tiles; ++it) {
        const int j = CF_BLOCK_SPARSE ? j_kept : tiles.end - 1 - it;
        if (CF_BLOCK_SPARSE) j_kept = kept.below(j);
        const int use = kv_loads + it;
        const int stage = use % CF_STAGES, round = use / CF_STAGES;
        if (round > 0) mbar_wait(bars.empty(stage), (round - 1) & 1);
        const int row = j * CF_BLOCK_N;
#if CF_FWD_TMA
#if CF_FWD_CLUSTER == 2  // half the panels, into both blocks of the pair (tid 0 alone here)
        mbar_arrive_expect_tx(bars.k_full(stage), kTileKV);
        mbar_arrive_expect_tx(bars.v_full(stage), kTileKV);
        tma_load_tile_pair<CF_BLOCK_N, kPanels>(smem_addr(s_k + stage * kTileKV), &tm_k,
                                                map_k0 + row, h_kv, map_b, bars.k_full(stage),
                                                rank);
        tma_load_tile_pair<CF_BLOCK_N, kPanels>(smem_addr(s_v + stage * kTileKV), &tm_v,
                                                map_k0 + row, h_kv, map_b, bars.v_full(stage),
                                                rank);
#else
        // packed: the tile that ends the sequence lands V on v_tail, zeroed past the end below
        const bool tail = kTailZero && row + CF_BLOCK_N > seqlen_k;
        if (issuer) {
          mbar_arrive_expect_tx(bars.k_full(stage), kTileKV);
          const cf_u32 v_bar = tail ? bars.v_tail() : bars.v_full(stage);
          mbar_arrive_expect_tx(v_bar, kTileKV);
          tma_load_tile<CF_BLOCK_N, kPanels>(smem_addr(s_k + stage * kTileKV), &tm_k,
                                             map_k0 + row, h_kv, map_b, bars.k_full(stage));
          tma_load_tile<CF_BLOCK_N, kPanels>(smem_addr(s_v + stage * kTileKV), &tm_v,
                                             map_k0 + row, h_kv, map_b, v_bar);
        }
        if (tail) {
          mbar_wait(bars.v_tail(), tails++ & 1);  // the box has landed
          zero_rows_past<CF_BLOCK_N, kPanels>(s_v + stage * kTileKV, max(seqlen_k - row, 0),
                                              lane, 32);
          fence_proxy_async();  // these stores before the tensor cores' reads
          __syncwarp();
          if (issuer) mbar_arrive(bars.v_full(stage));
        }
#endif
        (void)seqlen_k;  // the map knows the rows
#else
        load_k.load(s_k + stage * kTileKV, row, seqlen_k - row);
        mbar_arrive_cp_async(bars.k_full(stage));  // when this thread's copies have landed
        load_v.load(s_v + stage * kTileKV, row, seqlen_k - row);
        mbar_arrive_cp_async(bars.v_full(stage));
#endif
      }
      loads_total += n_tiles;
      if (kPersistent) ++q_loads, kv_loads += n_tiles;
    }
    if (kCluster == 2) {  // stay until both blocks have released every stage's last use
      for (int s = 0; s < CF_STAGES; ++s) {
        const int uses = (loads_total - s + CF_STAGES - 1) / CF_STAGES;
        if (uses > 0) mbar_wait(bars.empty(s), (uses - 1) & 1);
      }
    }
    (void)rank;
    if (!kTma) {
      cp_async_commit();  // leave with no copy in flight
      cp_async_wait<0>();
    }
    return;  // TMA: the block's shared memory outlives this thread; the consumers wait for it
  }

  // ---- the consumers ---------------------------------------------------------------------
  regs_alloc<kConsumerRegs>();
  const Dropout drop = CF_DROP;  // keeps everything without CF_DROPOUT
  // P packed as the P V product's A fragment, dropout's zeros in it (m, l undropped before);
  // `use`: the key tile's number in the block's stream (its flag slot, kDropSlots)
  const auto drop_and_pack = [&](cf_u32(&p16)[kNT / 2][4], float(&s)[kNT][4], unsigned int bh,
                                 int row0, int col0, int use) {
    (void)use;
    if constexpr (kDropSlots > 0) {
      sm90_pack_p<CF_BLOCK_N>(p16, s);
      const int slot = use % kDropSlots;
      mbar_wait(bars.drop_full(slot), (use / kDropSlots) & 1);
      cf_drop_ring_apply(p16, smem + kDropRing + slot * kDropSlot + cwarp * (CF_BLOCK_N / 32) * 512,
                         lane);
      mbar_arrive(bars.drop_empty(slot));
    } else if constexpr (kDropPacked) {
      sm90_pack_p<CF_BLOCK_N>(p16, s);
      cf_drop_packed(drop, p16, bh, row0, col0);
    } else {
      drop.drop_p(s, bh, row0, col0);
      sm90_pack_p<CF_BLOCK_N>(p16, s);
    }
  };
  const int me = wg - 1;                        // 0 .. kConsumers - 1
  const cf_u32 q_wg = smem_addr(s_q) + me * 64 * 128;  // this warpgroup's rows, panel 0
  const cf_u32 s_k_sa = smem_addr(s_k), s_v_sa = smem_addr(s_v);
  // cp.async copies land through the generic proxy; the tensor cores read through the async
  // one (TMA boxes land through it too).
  const auto wait_for = [](cf_u32 bar, int parity) {
    mbar_wait(bar, parity);
    if (!kTma) fence_proxy_async();
  };
  // A consumer warp's release of a stage (after __syncwarp): its block's empty mbarrier, and
  // in a cluster the peer's too (the peer's boxes refill both blocks' copies of the stage).
  const auto release = [lane](cf_u32 empty_bar) {
    if (lane == 0) {
      mbar_arrive(empty_bar);
      if (kCluster == 2) mbar_arrive_in(empty_bar, cluster_rank() ^ 1u);
    }
  };
  // Turns: a warpgroup issues its products once the previous one (round robin) has issued
  // its own; the last warpgroup opens the first turn. Each turn barrier counts two
  // warpgroups: the one that waits and the one that hands the turn over.
  const auto my_turn = [me] {
    if constexpr (kPingPong) named_bar_sync(kTurnBarrier + me, 256);
  };
  const auto their_turn = [me] {
    if constexpr (kPingPong) named_bar_arrive(kTurnBarrier + (me + 1) % kConsumers, 256);
  };
  // A stage's mbarrier phase: its use number (kv_loads + it) over the stages.
  const auto phase = [](int use) { return (use / CF_STAGES) & 1; };
  // One step of a tile's loop, both consumer loops below: S of key tile j (stage use `use`)
  // and P V of the step before issued together, the softmax of S while P V runs, then O
  // rescaled and the stage before released.
  // Concrete parameter types: NVRTC 13.0 takes a generic (auto) lambda here for a host
  // function and refuses it (13.5 accepts it).
  const auto step = [&](float(&acc)[kDT][4], cf_u32(&p16)[kNT / 2][4], float(&s)[kNT][4],
                        float(&m_i)[2], float(&l_i)[2], float(&alpha)[2],
                        const FwdQueryTile<CF_BLOCK_M, CF_BLOCK_N>& tile, const RowBounds& rows,
                        unsigned int bh, cf_u32 q_tile, int use, int j) {
    const int stage = use % CF_STAGES;
    const int prev = (use - 1) % CF_STAGES;
    wait_for(bars.k_full(stage), phase(use));
    wait_for(bars.v_full(prev), phase(use - 1));
    my_turn();
    wgmma_fence();
    sm90_qk<CF_BLOCK_M, CF_BLOCK_N, CF_HEAD_DIM>(s, q_tile, s_k_sa + stage * kTileKV);
    wgmma_commit();
    if constexpr (kRescaleEarly) {  // the last step's scale, under S; acc is not in flight
      rescale_acc(acc, alpha);
      wgmma_fence();  // the multiplies' registers before the product that accumulates them
    }
    sm90_pv_packed<CF_BLOCK_N, CF_HEAD_DIM>(acc, p16, s_v_sa + prev * kTileKV);
    wgmma_commit();
    their_turn();
    unsigned long long keep = ~0ull;
    if constexpr (kDropEarly) keep = drop.keep_bits<kNT>(bh, tile.row0, j * CF_BLOCK_N + 2 * tig);
    wgmma_wait<1>();  // S(it) is ready; P V of it - 1 may still run
    wgmma_fence_regs(s);
    const RowOffsets row_off = tile.modify_and_mask(s, j, rows);
    softmax_rows(s, m_i, l_i, alpha, scale_log2, row_off);
    wgmma_wait<0>();
    wgmma_fence_regs(acc);
    __syncwarp();
    release(bars.empty(prev));  // K and V of it - 1 are read
    if constexpr (!kRescaleEarly) rescale_acc(acc, alpha);
    if constexpr (kDropEarly) {
      Dropout::drop_p_with(s, keep);
      sm90_pack_p<CF_BLOCK_N>(p16, s);
    } else {
      drop_and_pack(p16, s, bh, tile.row0, j * CF_BLOCK_N + 2 * tig, use);
    }
  };

  if constexpr (kAcrossTiles) {  // ---- one pipeline across the block's tiles (value 2) ------
    float acc[kDT][4], m_i[2], l_i[2];
    init_rows(acc, m_i, l_i);
    cf_u32 p16[kNT / 2][4];  // P of the step before, the A operand of its P V product
    float s[kNT][4];
    float alpha[2];
    // The tile whose last P V is still to issue (`pending`), from stage use `pend_use`; its
    // epilogue follows that product. Built here only to have a value before the first tile.
    bool pending = false;
    int pend_use = 0;
    FwdQueryTile<CF_BLOCK_M, CF_BLOCK_N> pend(
        SeqInfo(0, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS), 0, 0, 0, cwarp, group, tig,
        CF_MOD_ARGS);
    const auto epilogue = [&](const FwdQueryTile<CF_BLOCK_M, CF_BLOCK_N>& t, float(&m)[2],
                              float(&l)[2]) {
      store_forward_epilogue<kDT, kChunks, false>(t, acc, m, l, sinks, o, stride_ob, stride_om,
                                                  stride_oh, m_out, l_out, head_dim, s_q, cwarp,
                                                  lane, drop.scale());
    };
    // The pending tile's last P V alone, then its epilogue (before a tile without keys, and
    // after the last tile).
    const auto flush = [&] {
      const int last = pend_use % CF_STAGES;
      wait_for(bars.v_full(last), phase(pend_use));
      my_turn();
      wgmma_fence();
      sm90_pv_packed<CF_BLOCK_N, CF_HEAD_DIM>(acc, p16, s_v_sa + last * kTileKV);
      wgmma_commit();
      their_turn();
      wgmma_wait<0>();
      wgmma_fence_regs(acc);
      __syncwarp();
      if (lane == 0) mbar_arrive(bars.empty(last));
      epilogue(pend, m_i, l_i);
      init_rows(acc, m_i, l_i);
      pending = false;
    };
#pragma unroll 1
    for (TileWalk walk(max_seqlen_q, heads); walk.more(); walk.next()) {
      const int b = walk.entry(), q0 = walk.tile_m() * CF_BLOCK_M, h = walk.head();
      const SeqInfo seq(b, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);
      if (CF_VARLEN && q0 >= seq.seqlen_q) continue;
      const FwdQueryTile<CF_BLOCK_M, CF_BLOCK_N> tile(seq, b, h, q0, cwarp, group, tig,
                                                      CF_MOD_ARGS);
      const int n_tiles = tile.tiles.end - tile.tiles.begin;  // visited last first
      const RowBounds rows(tile.mask, tile.row0);
      const unsigned int bh = drop.head(b, h, heads);
      if (n_tiles == 0) {  // rows that see no key: O = 0 and the statistics of nothing
        if (pending) flush();
        epilogue(tile, m_i, l_i);
        init_rows(acc, m_i, l_i);  // (a sink folded into m_i and l)
        continue;
      }
      if (kPingPong && me == kConsumers - 1 && q_loads == 0) their_turn();
      const int buf = q_loads % kQBuffers;
      const cf_u32 q_tile = smem_addr(s_q) + buf * kTileQ + me * 64 * 128;
      const int first = kv_loads % CF_STAGES;
      wait_for(bars.q_full(buf), (q_loads / kQBuffers) & 1);
      wait_for(bars.k_full(first), phase(kv_loads));
      if (pending) {  // S of this tile's first key tile beside the pending tile's last P V
        const int last = pend_use % CF_STAGES;
        wait_for(bars.v_full(last), phase(pend_use));
        my_turn();
        wgmma_fence();
        sm90_qk<CF_BLOCK_M, CF_BLOCK_N, CF_HEAD_DIM>(s, q_tile, s_k_sa + first * kTileKV);
        wgmma_commit();
        sm90_pv_packed<CF_BLOCK_N, CF_HEAD_DIM>(acc, p16, s_v_sa + last * kTileKV);
        wgmma_commit();
        their_turn();
        wgmma_wait<1>();
        wgmma_fence_regs(s);
        float m_prev[2] = {m_i[0], m_i[1]}, l_prev[2] = {l_i[0], l_i[1]};
        m_i[0] = m_i[1] = -CF_INF;
        l_i[0] = l_i[1] = 0.f;
        const RowOffsets row_off = tile.modify_and_mask(s, tile.tiles.end - 1, rows);
        softmax_rows(s, m_i, l_i, alpha, scale_log2, row_off);  // a fresh row: nothing to rescale
        wgmma_wait<0>();
        wgmma_fence_regs(acc);
        __syncwarp();
        if (lane == 0) mbar_arrive(bars.empty(last));
        epilogue(pend, m_prev, l_prev);
#pragma unroll
        for (int d = 0; d < kDT; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
      } else {
        my_turn();
        wgmma_fence();
        sm90_qk<CF_BLOCK_M, CF_BLOCK_N, CF_HEAD_DIM>(s, q_tile, s_k_sa + first * kTileKV);
        wgmma_commit();
        their_turn();
        wgmma_wait<0>();
        wgmma_fence_regs(s);
        const RowOffsets row_off = tile.modify_and_mask(s, tile.tiles.end - 1, rows);
        softmax_rows(s, m_i, l_i, alpha, scale_log2, row_off);  // acc is 0: nothing to rescale
      }
      drop_and_pack(p16, s, bh, tile.row0, (tile.tiles.end - 1) * CF_BLOCK_N + 2 * tig, kv_loads);
#pragma unroll 1
      for (int it = 1; it < n_tiles; ++it)
        step(acc, p16, s, m_i, l_i, alpha, tile, rows, bh, q_tile, kv_loads + it,
             tile.tiles.end - 1 - it);
      __syncwarp();
      if (lane == 0) mbar_arrive(bars.q_empty(buf));  // every S product of the tile is done
      pend = tile;
      pending = true;
      pend_use = kv_loads + n_tiles - 1;
      ++q_loads, kv_loads += n_tiles;
    }
    if (pending) flush();
    return;
  }

#pragma unroll 1
  for (TileWalk walk(max_seqlen_q, heads); walk.more(); walk.next()) {
    const int b = walk.entry(), q0 = walk.tile_m() * CF_BLOCK_M, h = walk.head();
    const SeqInfo seq(b, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);
    if (kPersistent && CF_VARLEN && q0 >= seq.seqlen_q) continue;
    const FwdQueryTile<CF_BLOCK_M, CF_BLOCK_N> tile(seq, b, h, q0, cwarp, group, tig,
                                                    CF_MOD_ARGS);
    const KeyTiles tiles = tile.tiles;  // visited last first
    const KeptKeyTiles<CF_BLOCK_N> kept(CF_BSP_MASK, b, h, q0, tiles);  // all: no block mask
    const int n_tiles = kept.count();
    const RowBounds rows(tile.mask, tile.row0);  // for mask_s
    const unsigned int bh = drop.head(b, h, heads);
    float acc[kDT][4], m_i[2], l_i[2];
    init_rows(acc, m_i, l_i);

    if (n_tiles > 0) {
      if (kPingPong && me == kConsumers - 1 && q_loads == 0) their_turn();
      cf_u32 p16[kNT / 2][4];  // P of the previous step, the A operand of its P V product
      float s[kNT][4];
      float alpha[2];
      wait_for(bars.q_full(), q_loads & 1);
      wait_for(bars.k_full(kv_loads % CF_STAGES), phase(kv_loads));
      my_turn();
      wgmma_fence();
      sm90_qk<CF_BLOCK_M, CF_BLOCK_N, CF_HEAD_DIM>(s, q_wg,
                                                   s_k_sa + kv_loads % CF_STAGES * kTileKV);
      wgmma_commit();
      their_turn();
      unsigned long long keep = ~0ull;
      if constexpr (kDropEarly) {
        const int j = CF_BLOCK_SPARSE ? kept.below(tiles.end) : tiles.end - 1;
        keep = drop.keep_bits<kNT>(bh, tile.row0, j * CF_BLOCK_N + 2 * tig);
      }
      wgmma_wait<0>();
      wgmma_fence_regs(s);
      int j_kept = kept.below(tiles.end);  // dense: tiles.end - 1 - it, as before the mask
      const RowOffsets row_off =
          tile.modify_and_mask(s, CF_BLOCK_SPARSE ? j_kept : tiles.end - 1, rows);
      softmax_rows(s, m_i, l_i, alpha, scale_log2, row_off);  // acc is 0: nothing to rescale
      if constexpr (kDropEarly) {  // after l_i: m, l undropped
        Dropout::drop_p_with(s, keep);
        sm90_pack_p<CF_BLOCK_N>(p16, s);
      } else {
        drop_and_pack(p16, s, bh, tile.row0,
                      (CF_BLOCK_SPARSE ? j_kept : tiles.end - 1) * CF_BLOCK_N + 2 * tig,
                      kv_loads);
      }

#pragma unroll 1
      for (int it = 1; it < n_tiles; ++it) {
        if (CF_BLOCK_SPARSE) j_kept = kept.below(j_kept);
        step(acc, p16, s, m_i, l_i, alpha, tile, rows, bh, q_wg, kv_loads + it,
             CF_BLOCK_SPARSE ? j_kept : tiles.end - 1 - it);
      }
      // Every S product is done: Q may take the next tile's rows while P V and the
      // epilogue of this one run.
      if (kPersistent) {
        __syncwarp();
        if (lane == 0) mbar_arrive(bars.q_empty());
      }
      const int use = kv_loads + n_tiles - 1, last = use % CF_STAGES;
      if constexpr (kRescaleEarly) rescale_acc(acc, alpha);  // the last softmax's scale
      wait_for(bars.v_full(last), phase(use));
      my_turn();
      wgmma_fence();
      sm90_pv_packed<CF_BLOCK_N, CF_HEAD_DIM>(acc, p16, s_v_sa + last * kTileKV);
      wgmma_commit();
      their_turn();
      wgmma_wait<0>();
      wgmma_fence_regs(acc);
      if (kPersistent) {
        __syncwarp();
        if (lane == 0) mbar_arrive(bars.empty(last));  // the next tile refills it
        ++q_loads, kv_loads += n_tiles;
      }
      if (kCluster == 2) {  // the producers wait for every release before they leave
        __syncwarp();
        release(bars.empty(last));
      }
    }
    if (!kPersistent) {  // both done reading Q: O staging next
      named_bar_sync(kConsumerBarrier, kConsumerThreads);
    }
    // persistent: O straight from the registers (s_q may already hold the next tile's Q)
    store_forward_epilogue<kDT, kChunks, !kPersistent>(
        tile, acc, m_i, l_i, sinks, o, stride_ob, stride_om, stride_oh, m_out, l_out, head_dim,
        s_q, cwarp, lane, drop.scale());
  }
}

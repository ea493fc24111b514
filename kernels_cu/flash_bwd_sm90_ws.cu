// flash_bwd_sm90_ws.cu -- the Hopper backward, warp-specialized: a producer warpgroup copies
// Q, dO and their statistics into a ring of stages, so the two computing warpgroups issue no
// copies and take turns on the tensor cores (FlashAttention-3's producer / consumer split
// and ping-pong; Shah et al. 2024). Same parameters, grid, outputs, masks and modifiers as
// flash_bwd_sm90.cu in its key-split layout (head_dim 64 with 128-query tiles, head_dim 128
// with 64): read its header for the algorithm. What differs:
//
// Block: 12 warps.
//   warpgroup 0, the producer (setmaxnreg: 40 registers a thread): warps 0 and 1 copy K
//     once, then per tile Q (q_full); warp 3 copies V once, then per tile dO (do_full); into
//     stage it % CF_STAGES with cp.async, each tile followed by cp.async.mbarrier.arrive, then
//     lse2 (delta) by plain loads and stores and an ordinary arrival. Before refilling a stage
//     they wait on its empty mbarrier, on which every consumer thread arrives (racecheck
//     reported the consumers' reads of the statistics as racing the refill while one lane a
//     warp arrived after __syncwarp; the statistics were cp.async copies then, and whether
//     those would pass now was not tested). Warp 2 keeps ordered dQ's turns (the turn
//     agent, below); otherwise it has nothing to do.
//   warpgroups 1, 2, the consumers (232 registers): warpgroup 1 + g owns keys n0 + 64g ..
//     + 63. Per tile it: S^T = K Q^T and dP^T = V dO^T issued and waited; P^T and
//     dS^T = P^T (dP^T - delta); dS^T to shared memory (buffer it & 1, once ds_empty says both
//     warpgroups have read it for dQ(it - 2)), then an arrival on ds_full; dV += P^T dO and
//     dK += dS^T Q issued; then dQ of the PREVIOUS tile, dS K from buffer (it - 1) & 1
//     (head_dim 128: warpgroup g columns 64g ..; head_dim 64: query rows 64g ..) once ds_full
//     says both halves are in; all waited; the stage released; dQ(it - 1) added into
//     dq_accum by float atomics, or staged for a bulk reduce-add (CF_DQ_BULK, below; with
//     CF_DQ_ORDERED, in a fixed key-tile order, issued by the turn agent). Deferring
//     dQ by a tile lets the warpgroups drift apart instead of meeting at a barrier every
//     tile, and they take turns issuing their products (CF_BWD_WS_PINGPONG), so one's
//     P^T / dS^T and atomics run under the other's products.
//   No __syncthreads after the prologue.
//   Bulk tensor copies (CF_BWD_TMA=1, selected with atomic dQ: registry.BWD90_TMA): lane
//     0 of warp 0 loads K once and Q per tile, lane 0 of warp 3 V once and dO per tile, as TMA
//     boxes (cf_sm90.cuh's tma_load_tile; the maps of q, k, v and dout are the last four
//     parameters, cuflash/tensor_map.py) with the bytes armed on the full mbarriers; the
//     statistics stay plain loads and stores by those warps. No proxy fence in the consumers.
//     Packed sequences (CF_VARLEN, selected with atomic dQ) take one map over all rows
//     (batch 1), boxes from the sequence's first row, so a tile that runs past the sequence
//     reads the rows after it. Unlike zeros, those rows would reach
//     the sums (Q and dO rows past seqlen_q are not masked: their lse2 and delta are 0; K and
//     V rows past seqlen_k are, but 0 * inf is not 0). So such a tile's box lands on a
//     barrier of its own (BwdBarriers::kv_landed / q_landed / do_landed), and the side's
//     producer threads zero its rows past the sequence before they arrive on the full
//     barrier (kTailZero).
//   Tried and not kept: dQ through shared memory and bulk reduce-adds (cp.reduce.async.bulk,
//   FlashAttention-3's way) was 0.75x the atomics on an H200 (bench/dev/bwd_variants.md).
//
// Shared memory (panel layout of cf_sm90.cuh; 1024-byte aligned base):
//   sK, sV (resident) | sQ, sdO: CF_STAGES stages each | sdS^T: 2 buffers | lse2, delta:
//   CF_STAGES x CF_BLOCK_M floats each | CF_DQ_BULK: a 16 KB dQ piece per consumer | 128
//   bytes of mbarriers (k_v_full; q_full, do_full, stage_empty per stage; ds_full, ds_empty
//   per dS^T buffer).
//   SMEM = (2 * 128 * D + 2 * S * M * D + 2 * 128 * M) * 2 + 2 * S * M * 4 + 128
//          (+ 32768 with CF_DQ_BULK)
//   (specs: registry._smem_bwd90)

#ifndef CF_WARPS
#define CF_WARPS 12  // a producer warpgroup and two consumers
#endif
#ifndef CF_BLOCK_M
#define CF_BLOCK_M 64  // 128 at head_dim 64
#endif
#include "cf_config_bwd.cuh"

#include "cf_common.cuh"
#include "cf_sm90.cuh"
#include "cf_mask.cuh"
#include "cf_seq.cuh"
#include "cf_params.cuh"
#include "cf_tile_order.cuh"
#include "cf_bwd90.cuh"
#include "cf_drop_ring.cuh"

static_assert(CF_DTYPE == 0 || CF_DTYPE == 1, "flash_bwd_sm90_ws.cu is a 16-bit kernel");
static_assert(CF_HEAD_DIM_V == CF_HEAD_DIM, "v's own head_dim: flash_bwd_sm90.cu's");
static_assert((CF_HEAD_DIM == 64 && CF_BLOCK_M == 128) || (CF_HEAD_DIM == 128 && CF_BLOCK_M == 64),
              "the key-split layout: head_dim 64 x 128 queries, head_dim 128 x 64");
static_assert(CF_BLOCK_N == 128 && CF_WARPS == 12 && CF_STAGES >= 2 && CF_STAGES <= 3 &&
                  8 * (5 + 3 * CF_STAGES) <= 128,
              "128 keys, a producer and two consumer warpgroups, 2 or 3 stages");
static_assert(CF_DQ_ATOMIC == 1 && CF_DCHUNK >= CF_HEAD_DIM, "dQ added into dq_accum, one chunk");

// Turn-taking of the two consumer warpgroups (a knob: CF_BWD_WS_PINGPONG=0 turns it off).
#ifndef CF_BWD_WS_PINGPONG
#define CF_BWD_WS_PINGPONG 1
#endif
// Reading the softmax statistics a fragment ahead of their use (a knob: 0 reads each where
// it is used).
#ifndef CF_BWD_STATS_AHEAD
#define CF_BWD_STATS_AHEAD 1
#endif
// Dropout's 1 / (1 - p) folded into the staged lse2 and delta (Dropout::fold), where the
// kernel would multiply P and dP by it in every element, two FMUL each (selected:
// registry.BWD90_DROP_FOLD; tests/test_gpu_bwd_drop_fold.py, bench/dev/dropout_ab.py).
#ifndef CF_BWD_DROP_FOLD
#define CF_BWD_DROP_FOLD 0
#endif
enum : int { kDropFold = CF_DROPOUT && CF_BWD_DROP_FOLD };  // (an enum: no PTX symbol)

// Ordered dQ (the deterministic mode, spec.dq_ordered): the key tiles that see a query tile
// add their dQ into it one after another, in a fixed key-tile order, through a semaphore per
// (batch entry, head, query tile, consumer warpgroup: each adds its own half of the tile) in
// the zeroed workspace: float sums in a fixed order, bitwise repeatable. A block only waits
// for blocks of its head that start before it, so the wait ends:
//   not causal: ascending key tiles (grid x);
//   causal: descending, and the blocks start lightest key tile first (the last key tile
//     first: the reverse of the atomic mode's order). Key tile j starts at its diagonal query
//     tile and walks up, so it reaches each query tile kBN / kBM steps after key tile j + 1
//     did: in descending order nobody waits. In ascending order each key tile waited those
//     steps for the one before, which idled about half the blocks (H200 d128 causal:
//     0.47-0.54x the atomic mode, 2026-12-02).
//   a window (the local mode; causal there is right = 0): descending too, the blocks of a
//     head starting with its last key tile. Key tile j's walk starts at the first query
//     tile that sees it, which is no earlier than key tile j - 1's, so j + 1 reaches each
//     query tile first and adds first; ascending, each would wait for the one before, a
//     wavefront of the head's key tiles (bench/dev/ordered_turns_model.py: 384 tile steps
//     against 67 for a 4096-key window at 16k, when the longest walk is 66).
//   not causal, no window, fixed lengths, n_k <= CF_DQ_ROTATE_KEY_TILES key tiles and at least
//     as many query tiles (n_q): key tile j starts its walk at query tile j n_q / n_k and wraps
//     around, so the key tiles reach a query tile at different steps; they add in the order
//     they reach it (descending j, cyclically, from the last key tile that starts at or
//     before it). In ascending order all key tiles met at query tile 0 and each waited for
//     the one before (a chain of n_k handoffs). Each tile now waits for one that reached the
//     query tile earlier, in a cycle that closes through the head's last key tile: it ends
//     only if all of a head's key tiles run at once, which blocks dispatched in index order
//     allow when n_k is well below the number of SMs: the host sets the bound from the
//     device's SM count (specs.ordered_rotation_limit; 0, the default, never rotates).
#ifndef CF_DQ_ROTATE_KEY_TILES
#define CF_DQ_ROTATE_KEY_TILES 0
#endif
#ifndef CF_DQ_ORDERED
#define CF_DQ_ORDERED 0
#endif
// Ordered bulk dQ's pieces per warpgroup (a knob, CF_DQ_PIECES=2, not selected): with two, a
// warpgroup stages a tile's dQ while the agent still adds the one before, and waits only for
// the piece it staged a tile and a half earlier (with one, half a tile). 32 KB more shared
// memory and a 256-byte barrier area (d128: 230,656 bytes). H200, session 16: the same speed
// as one piece (bench/dev/bwd_variants.md), so that wait was not where the time went.
#ifndef CF_DQ_PIECES
#define CF_DQ_PIECES 1
#endif
static_assert(!(CF_DQ_ORDERED && CF_BLOCK_SPARSE), "ordered dQ: every key tile passes its turn");

// dQ by bulk reduce-adds (a knob, CF_DQ_BULK=1; spec.dq_tiled): a warpgroup stages its dQ of a
// tile in shared memory (cf_bwd90.cuh's stage_dq_piece, 8 16-byte stores a thread) and one of
// its threads adds the 16 KB with one cp.reduce.async.bulk into the tiled dQ accumulator
// (cf_common.cuh's dq_piece_index), instead of 16 red.global.add.v2 a thread with their
// address and bounds arithmetic. The bulk add is issued after the next tile's first turn
// barrier (which orders every thread's stores before it) and is waited on, for reading,
// before the second (so the piece is free when the tile's dQ is staged); softmax_scale is
// applied by the convert. Packed sequences place their pieces by cf_seq.cuh's dq_piece.
// Session 4 tried one bulk add per row of a row-major accumulator (64 a tile): 0.75x the
// atomics.
// Ordered dQ with bulk adds (CF_DQ_BULK with CF_DQ_ORDERED): the consumers stage their
// pieces as above and the turn agent (below) issues each add when the piece is staged and
// its turn has come, waits for it to be performed, passes the turn on and frees the piece.
// The consumers never wait for a turn, only for their piece to be free a tile later. H200,
// bf16, same run: 1.06-1.13x the ordered atomics, 0.79-0.86x the atomic mode's bulk adds
// (2026-12-03, bench/dev/bwd_variants.md). (The leader issuing the add inside its turn and
// waiting for it had run at 0.80-0.86x the ordered atomics.)
#ifndef CF_DQ_BULK
#define CF_DQ_BULK 0
#endif
// dQ into the tiled accumulator by vector reductions from the consumers' registers (a knob,
// CF_DQ_RED4=1 on top of CF_DQ_BULK; cf_bwd90.cuh's red_dq_piece): eight
// red.global.add.v4.f32 a thread a tile, in place of staging a piece for a bulk reduce-add
// (no staging stores, piece barriers or waits for the add's reads; no piece in shared
// memory). With ordered dQ the consumers reduce inside their turn, as the ordered atomics
// do (the turn agent then only keeps the turns): each element still takes one add a key
// tile, in the turns' order.
#ifndef CF_DQ_RED4
#define CF_DQ_RED4 0
#endif
static_assert(!CF_DQ_RED4 || CF_DQ_BULK, "vector reductions: the tiled accumulator (CF_DQ_BULK)");

// Ordered dQ: how a warpgroup passes the turn on after its adds. Its threads meet at a named
// barrier, then one thread fences at gpu scope (cumulative: it covers the adds the barrier
// ordered before it, as CUTLASS's split-K semaphore relies on) and stores the next turn; a
// __threadfence by every thread before the barrier was slower (H200, bf16 d128 4k, ordered
// mode: 285 TFLOP/s with it, 328 without, in two sessions' runs).
// Passing the turn a tile later, after the next score products were issued, deadlocked: a
// warpgroup holding a turn could wait at the ping-pong barrier for its partner, which waited
// for that turn through another block.
// The turn agent (CF_DQ_TURN_AGENT, default 1): the producer's idle warp 2 keeps the turns,
// so no consumer spins on a semaphore or waits for a gpu-scope fence. It walks the same tiles
// as the consumers and, for each warpgroup g, waits for the turn and arrives on
// turn_granted(g); g's leader waits on that mbarrier, then g's barrier; every thread adds
// and arrives on dq_added(g); the agent waits there (acquiring the adds at block scope),
// fences at gpu scope and passes the turn on: the same release chain as the leader's
// barrier and fence above. The turn is passed right after the adds, as before, so blocks
// wait for each other as before; the fence's round trip and the spin leave the consumers'
// path. H200, bf16 d128, same run: +2.3% to +6.3% over the leader's turns (2026-12-03,
// bench/dev/bwd_variants.md).
#ifndef CF_DQ_TURN_AGENT
#define CF_DQ_TURN_AGENT 1
#endif
#ifndef CF_BWD_TMA
#define CF_BWD_TMA 0
#endif
#if CF_BWD_TMA  // the tensor maps of q, k, v and dout, after every other parameter
#define CF_BWD_TMA_PARAMS                                                                    \
  , const __grid_constant__ cf_tensor_map tm_q, const __grid_constant__ cf_tensor_map tm_k,    \
      const __grid_constant__ cf_tensor_map tm_v, const __grid_constant__ cf_tensor_map tm_do
#else
#define CF_BWD_TMA_PARAMS
#endif

// Dropout's kept flags drawn by the producer's warps 1 and 2 into CF_DROP_RING slots of shared
// memory, one tile's a slot (each consumer lane's 64-bit word, as Dropout::keep_bits gives
// it), which the consumers read instead of drawing them (a knob; cf_drop_ring.cuh). Warp 0
// alone then stores lse2. With TMA (one lane issues the boxes), atomic dQ (warp 2 keeps
// ordered dQ's turns), no block mask (the producer picks kept tiles) and no packed sequences.
#ifndef CF_DROP_RING
#define CF_DROP_RING 0
#endif

namespace bwd90ws {
constexpr bool kOrdered = CF_DQ_ORDERED;
constexpr bool kTurnAgent = CF_DQ_ORDERED && CF_DQ_TURN_AGENT;
constexpr bool kRotatable = CF_DQ_ORDERED && !CF_CAUSAL && !CF_LOCAL && !CF_VARLEN;
constexpr int kRotateMaxKeyTiles = CF_DQ_ROTATE_KEY_TILES;
constexpr bool kPingPong = CF_BWD_WS_PINGPONG;
constexpr bool kStatsAhead = CF_BWD_STATS_AHEAD;
enum : int { kRed4 = CF_DQ_RED4 != 0 };  // (an enum: a constexpr variable leaves a PTX symbol)
constexpr bool kBulk = CF_DQ_BULK && !kRed4;  // staged pieces, bulk reduce-adds
constexpr bool kAgentAdds = kTurnAgent && kBulk;  // ordered bulk dQ: the agent adds
constexpr int kPieces = CF_DQ_PIECES;  // per warpgroup: 1, or 2 with kAgentAdds
static_assert(kPieces == 1 || (kPieces == 2 && kAgentAdds), "two pieces: ordered bulk dQ");
static_assert(!(kBulk && kOrdered) || kTurnAgent, "ordered bulk dQ: the turn agent adds");
enum : int {
  kD = CF_HEAD_DIM,
  kBM = CF_BLOCK_M,
  kBN = CF_BLOCK_N,
  kChunks = kD / 8,
  kQSteps = kBM / 16,  // k-steps of dV, dK (over the tile's queries)
  kNT = kBM / 8,       // S^T n-tiles per thread
  kDT = kD / 8,        // dK, dV n-tiles per thread
  kTileQ = kBM * kD * 2,
  kTileK = kBN * kD * 2,
  kTileDS = kBN * kBM * 2,
  kStages = CF_STAGES,
  kConsumerThreads = 256,
  kOffV = kTileK,
  kOffQ = 2 * kTileK,
  kOffDO = kOffQ + kStages * kTileQ,
  kOffDS = kOffDO + kStages * kTileQ,
  kOffLse = kOffDS + 2 * kTileDS,
  kOffDelta = kOffLse + kStages * kBM * 4,
  kOffDqPiece = kOffDelta + kStages * kBM * 4,  // CF_DQ_BULK: a dQ piece per warpgroup
  kOffBar = kOffDqPiece + (kBulk ? 2 * kPieces * kDqPieceBytes : 0),
  // the mbarriers (BwdBarriers: 9 + 3 a stage, 4 more for a second piece), in 128-byte steps
  kDropSlots = CF_DROPOUT ? CF_DROP_RING : 0,
  kRingSlot = 8 * 32 * 8,  // a 64-bit word per consumer lane
  kBarBytes = (8 * (9 + 3 * kStages + 4 * (kPieces - 1) + 2 * kDropSlots) + 127) / 128 * 128,
  // under a block mask, each stage's (query rows, head), which the producer picks
  kOffTiles = kOffBar + kBarBytes,
  kOffRing = kOffTiles + (CF_BLOCK_SPARSE ? 8 * kStages : 0),  // the flag slots
  kSmemBytes = kOffRing + kDropSlots * kRingSlot,
  // 128 * 40 + 256 * 232 = 384 * 168, what the launch gives the block; 128 * 24 + 256 * 240
  // where the consumers need it and one thread issues the boxes (d64 causal under a block
  // mask: 56-64 B spilled at 232)
  kWideConsumers = CF_BWD_TMA && CF_CAUSAL && CF_BLOCK_SPARSE && !CF_VARLEN && !CF_DROPOUT &&
                   kD == 64,
  // (dropout's drawing warps, kDropSlots, fit 40: cf_opaque_key keeps the round keys out of
  // registers across their loop; 56 would leave the consumers 224, where d64 spilled 40 B)
  kProducerRegs = kWideConsumers ? 24 : 40,
  kConsumerRegs = kWideConsumers ? 240 : 232,
  kTma = CF_BWD_TMA,  // (an enum, not a constexpr variable: those leave a PTX symbol)
  kTailZero = CF_BWD_TMA && CF_VARLEN,  // tiles past a packed sequence zeroed there
  kPanels = kD / 64,
  kOrderBarrier = 1,  // 1 + g: warpgroup g alone (ordered dQ around its adds; bulk dQ)
  kTurnBarrier = 3,   // 3 + g: consumer warpgroup g may issue its products
  kDrawThreads = 64,  // warps 1 and 2 (kDropSlots)
};
static_assert(kDropSlots == 0 || (CF_BWD_TMA && !CF_DQ_ORDERED && !CF_BLOCK_SPARSE &&
                                  !CF_VARLEN && kDropSlots <= 3 && kNT % 4 == 0),
              "the flag ring: TMA, atomic dQ, no block mask or packed sequences, 3 slots");
}  // namespace bwd90ws

// The block's mbarriers.
struct BwdBarriers {
  cf_u32 base;
  __device__ __forceinline__ cf_u32 k_v_full() const { return base; }
  __device__ __forceinline__ cf_u32 q_full(int s) const { return base + 8 * (1 + s); }
  __device__ __forceinline__ cf_u32 do_full(int s) const {
    return base + 8 * (1 + CF_STAGES + s);
  }
  __device__ __forceinline__ cf_u32 stage_empty(int s) const {
    return base + 8 * (1 + 2 * CF_STAGES + s);
  }
  // dS^T buffer b (of two): both warpgroups have written their keys / read it for dQ
  __device__ __forceinline__ cf_u32 ds_full(int b) const {
    return base + 8 * (1 + 3 * CF_STAGES + b);
  }
  __device__ __forceinline__ cf_u32 ds_empty(int b) const {
    return base + 8 * (3 + 3 * CF_STAGES + b);
  }
  // ordered dQ's turn agent: warpgroup g may add / has issued its adds (kAgentAdds: g's dQ
  // piece is free again / is staged)
  __device__ __forceinline__ cf_u32 turn_granted(int g) const {
    return base + 8 * (5 + 3 * CF_STAGES + g);
  }
  __device__ __forceinline__ cf_u32 dq_added(int g) const {
    return base + 8 * (7 + 3 * CF_STAGES + g);
  }
  // CF_DQ_PIECES 2: the same for g's piece `slot` (slot 0: the ones above)
  __device__ __forceinline__ cf_u32 turn_granted(int g, int slot) const {
    return turn_granted(g) + 32 * slot;
  }
  __device__ __forceinline__ cf_u32 dq_added(int g, int slot) const {
    return dq_added(g) + 32 * slot;
  }
  // kTailZero (never with the turn agent: its slots): the boxes of a tile that runs past
  // the sequence land here, K and V (two boxes), then Q and dO per stage
  __device__ __forceinline__ cf_u32 kv_landed() const { return base + 8 * (5 + 3 * CF_STAGES); }
  __device__ __forceinline__ cf_u32 q_landed(int s) const {
    return base + 8 * (6 + 3 * CF_STAGES + s);
  }
  __device__ __forceinline__ cf_u32 do_landed(int s) const {
    return base + 8 * (6 + 4 * CF_STAGES + s);
  }
  // dropout's flag slot r is drawn / read (kDropSlots; after the turn agent's)
  __device__ __forceinline__ cf_u32 drop_full(int r) const {
    return base + 8 * (9 + 3 * CF_STAGES + 4 * (bwd90ws::kPieces - 1) + r);
  }
  __device__ __forceinline__ cf_u32 drop_empty(int r) const {
    return drop_full(r) + 8 * bwd90ws::kDropSlots;
  }
};
static_assert(!bwd90ws::kTailZero ||
                  (!bwd90ws::kTurnAgent && 8 * (6 + 5 * CF_STAGES) <= bwd90ws::kBarBytes),
              "the tails' mbarriers take the turn agent's slots, in the barrier area");

static_assert(!bwd90ws::kTurnAgent ||
                  8 * (9 + 3 * CF_STAGES + 4 * (bwd90ws::kPieces - 1)) <= bwd90ws::kBarBytes,
              "the turn agent's mbarriers fit the barrier area");

// Whether the phase of `parity` has completed (acquire, as mbar_wait), without waiting.
__device__ __forceinline__ bool mbar_ready(cf_u32 bar, int parity) {
  cf_u32 done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  return done != 0;
}
// Warpgroup g's n-th add in the block's walk (TileWalk's order: from m_start, wrapping, then
// the next head): its query rows and head, its semaphore and its turn there.
struct WalkAdd {
  int m0, h, turn;
  int* sem;
};
__device__ __forceinline__ WalkAdd walk_add(const OrderedTurns& turns, int n, int g, int m_first,
                                            int tiles_per_head, int m_start, int h_first) {
  WalkAdd a;
  a.m0 = (m_first + (m_start - m_first + n) % tiles_per_head) * CF_BLOCK_M;
  a.h = h_first + n / tiles_per_head;
  a.sem = turns.semaphore(a.m0, a.h, g);
  a.turn = turns.turn(a.m0);
  return a;
}

// Ordered dQ's turn agent (kTurnAgent): the whole warp runs it alike (its loads and waits
// give every lane the same values), lane 0 acts. Warpgroup g's n-th add is for the walk's
// n-th tile; the two warpgroups are served independently, each polled in turn, so one's
// late turn never holds the other's (that would couple their waits across blocks).
__device__ __forceinline__ void serve_turns(const OrderedTurns& turns, const BwdBarriers& bars,
                                            int n_iter, int m_first, int tiles_per_head,
                                            int m_start, int h_first, int lane) {
  int n[2] = {0, 0};  // the add each warpgroup is at
  bool granted[2] = {false, false};
  int idle = 0;  // polls without progress (a bound, as wait_for_turn's)
#pragma unroll 1
  while (n[0] < n_iter || n[1] < n_iter) {
    bool progressed = false;
#pragma unroll
    for (int g = 0; g < 2; ++g) {
      if (n[g] >= n_iter) continue;
      const WalkAdd add = walk_add(turns, n[g], g, m_first, tiles_per_head, m_start, h_first);
      if (!granted[g]) {
        // (after about 2^27 idle polls it goes on: a turn that never comes is a bug; the
        // sums stay right, their order not)
        if (load_acquire(add.sem) == add.turn || idle > (1 << 27)) {
          if (lane == 0) mbar_arrive(bars.turn_granted(g));
          granted[g] = true;
          progressed = true;
        }
      } else if (mbar_ready(bars.dq_added(g), n[g] & 1)) {  // its adds, acquired
        if (lane == 0) fence_and_release(add.sem, add.turn + 1);
        granted[g] = false;
        ++n[g];
        progressed = true;
      }
    }
    idle = progressed ? 0 : idle + 1;
    if (!progressed) __nanosleep(32);
  }
}

// Ordered bulk dQ's turn agent (kAgentAdds): as serve_turns, but the agent adds. For
// warpgroup g's n-th add it waits until the piece is staged (dq_added(g)) and the turn has
// come, adds the piece with one bulk reduce-add (lane 0), waits until the add is performed,
// passes the turn on and frees the piece (turn_granted(g)). pieces: the first piece's shared
// address; seq, dq_accum, seqlen_q, max_seqlen_q: where a piece goes (as the consumers'
// stage_dq).
__device__ __forceinline__ void serve_bulk_turns(const OrderedTurns& turns,
                                                 const BwdBarriers& bars, int n_iter,
                                                 int m_first, int tiles_per_head, int m_start,
                                                 int h_first, int lane, const SeqInfo& seq,
                                                 float* dq_accum, cf_u32 pieces,
                                                 int max_seqlen_q) {
  using namespace bwd90ws;
  int n[2] = {0, 0};  // the add each warpgroup is at
  int idle = 0;       // polls without progress (a bound, as wait_for_turn's)
#pragma unroll 1
  while (n[0] < n_iter || n[1] < n_iter) {
    bool progressed = false;
#pragma unroll
    for (int g = 0; g < 2; ++g) {
      // staged (kPieces 2: g's n-th add is of piece n & 1, its (n >> 1)-th use)
      const int slot = kPieces == 1 ? 0 : n[g] & 1;
      const cf_u32 staged = kPieces == 1 ? bars.dq_added(g) : bars.dq_added(g, slot);
      if (n[g] >= n_iter || !mbar_ready(staged, (kPieces == 1 ? n[g] : n[g] >> 1) & 1)) continue;
      const WalkAdd add = walk_add(turns, n[g], g, m_first, tiles_per_head, m_start, h_first);
      // not yet its turn (after about 2^27 idle polls it goes on: a turn that never comes
      // is a bug; the sums stay right, their order not)
      if (load_acquire(add.sem) != add.turn && idle <= (1 << 27)) continue;
      const int row0 = add.m0 + (kBM == 128 ? 64 * g : 0);
      if (lane == 0) {
        if (row0 < seq.seqlen_q) {  // (a piece wholly past seqlen_q has no place: no add)
          // the earlier turns' adds (async proxy, acquired above) before this one's
          asm volatile("fence.proxy.async.global;" ::: "memory");
          bulk_reduce_add_f32(seq.dq_piece(dq_accum, add.h, row0, kBM == 128 ? 0 : 64 * g,
                                           max_seqlen_q, kD),
                              pieces + (kPieces == 1 ? g : g + 2 * slot) * kDqPieceBytes,
                              kDqPieceBytes);
          bulk_commit();
          bulk_wait_all();  // performed, then ordered before the release below
          asm volatile("fence.proxy.async.global;" ::: "memory");
        }
        fence_and_release(add.sem, add.turn + 1);
        // the piece is free
        mbar_arrive(kPieces == 1 ? bars.turn_granted(g) : bars.turn_granted(g, slot));
      }
      __syncwarp();
      ++n[g];
      progressed = true;
    }
    idle = progressed ? 0 : idle + 1;
    if (!progressed) __nanosleep(32);
  }
}

// The tiles a block walks: query rows m0 of head h, the heads' tiles [first, end) in turn,
// each head's from tile `start` on, wrapping around to first.
struct TileWalk {
  int m0, h, m_begin, m_end, m_start;
  __device__ __forceinline__ TileWalk(int first, int end, int h_first, int start)
      : m0(start * CF_BLOCK_M),
        h(h_first),
        m_begin(first * CF_BLOCK_M),
        m_end(end * CF_BLOCK_M),
        m_start(start * CF_BLOCK_M) {}
  __device__ __forceinline__ void next() {
    m0 += CF_BLOCK_M;
    if (m0 >= m_end) m0 = m_begin;
    if (m0 == m_start) ++h;
  }
};

// A ROWS x head_dim tile of 16-bit rows (from row first_row of `rows`) into the panel layout
// at shared address `tile`, by `threads` threads (8 a row, a multiple of 32) with cp.async;
// rows past rows_valid and columns past head_dim become zeros. The passes are not unrolled:
// the producer has few registers.
template <int ROWS>
__device__ __forceinline__ void copy_tile(cf_u32 tile, const elem_t* rows, cf_i64 stride,
                                          int first_row, int rows_valid, int head_dim, int t,
                                          int threads) {
  const int c0 = t & 7, step = threads >> 3;
  int row = t >> 3;
  const elem_t* g = rows + (cf_i64)(first_row + row) * stride + c0 * 8;
#pragma unroll 1
  for (; row < ROWS; row += step, g += step * stride) {
    const cf_u32 dst = tile + row * 128 + ((c0 ^ (row & 7)) << 4);
#pragma unroll
    for (int k = 0; k < CF_HEAD_DIM / 64; ++k) {
      const bool ok = row < rows_valid && (c0 + 8 * k) * 8 < head_dim;
      cp_async_16_to(dst + k * ROWS * 128, ok ? g + 64 * k : rows, ok);
    }
  }
}

extern "C" __global__ void __launch_bounds__(32 * CF_WARPS, 1)
    flash_bwd_sm90(CF_BWD_PARAMS, int kv_splits, float* __restrict__ dk_accum,
                   float* __restrict__ dv_accum, int* __restrict__ dq_semaphore, CF_MOD_PARAMS,
                   CF_SEQ_PARAMS CF_BSP_PARAMS CF_DROP_PARAMS CF_BWD_TMA_PARAMS) {
  using namespace bwd90ws;
  extern __shared__ __align__(1024) unsigned char smem[];
  CF_REQUIRE_SMEM(kSmemBytes);
  sm90_require_aligned(smem);
  const BwdBarriers bars{smem_addr(smem + kOffBar)};
  // The roles find their tiles after setmaxnreg (values live across the producer's must fit
  // in its registers).
#define CF_BWD_WS_TILES                                               \
  unsigned char* sK = smem;                                           \
  unsigned char* sV = smem + kOffV;                                   \
  unsigned char* sQ = smem + kOffQ;                                   \
  unsigned char* sdO = smem + kOffDO;                                 \
  unsigned char* sdS = smem + kOffDS;                                 \
  float* sLse = reinterpret_cast<float*>(smem + kOffLse);             \
  float* sDelta = reinterpret_cast<float*>(smem + kOffDelta);        \
  int* sTiles = reinterpret_cast<int*>(smem + kOffTiles);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2;
  // The block's work, as flash_bwd_sm90.cu: key tile kvh's keys n0 .., its query heads from
  // h_first (each role works it out after its setmaxnreg, as the tiles).
// An opaque 0 per role keeps the compiler from hoisting the two roles' identical copies
// above the branch (across setmaxnreg).
#define CF_BWD_WS_BLOCK_WORK                                                                   \
  int role_zero = 0;                                                                          \
  asm volatile("" : "+r"(role_zero));                                                         \
  const int splits = kv_splits + role_zero;                                                   \
  const TileOrder order = causal_tile_order((long long)max_seqlen_q * head_dim *             \
                                            (2 * sizeof(elem_t) + 4) * (heads_per_kv / splits)); \
  const int key_tile = !CF_CAUSAL ? (kOrdered && CF_LOCAL ? (int)(gridDim.x - 1 - blockIdx.x)   \
                                                         : (int)blockIdx.x) + role_zero       \
                       : kOrdered ? (int)gridDim.x - 1 - order.tile_rank /* lightest first */ \
                                  : order.tile_rank;                                          \
  const int kvh = CF_CAUSAL ? order.head : (int)blockIdx.y + role_zero;                      \
  const int b = (blockIdx.z + role_zero) / splits, n0 = key_tile * kBN;                       \
  const SeqInfo seq(b, heads, max_seqlen_q, max_seqlen_k, CF_SEQ_ARGS);                       \
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;                                 \
  const int split_heads = heads_per_kv / splits;                                             \
  const int h_first = kvh * heads_per_kv + ((blockIdx.z + role_zero) % splits) * split_heads; \
  const MaskPolicy mask(seqlen_q, seqlen_k, window_left, window_right);                      \
  const QueryTiles qt = query_tiles_of<kBM, kBN>(mask, n0);                                   \
  const int m_first = qt.first, tiles_per_head = qt.end - qt.first;                           \
  /* ordered dQ: where this key tile starts its walk (kRotatable, above) */                    \
  const int n_k = (int)gridDim.x + role_zero;                                                 \
  const bool rotate = kRotatable && n_k <= kRotateMaxKeyTiles && tiles_per_head >= n_k;       \
  const int m_start = rotate ? m_first + key_tile * tiles_per_head / n_k : m_first;           \
  const int q_tiles = (max_seqlen_q + kBM - 1) / kBM;                                         \
  const OrderedTurns turns{mask, key_tile, m_first, tiles_per_head, n_k, q_tiles,              \
                           rotate, dq_semaphore + (cf_i64)b * heads * q_tiles * 2};            \
  /* block mask: the kept (head, query tile) pairs (ordered dQ never takes one) */            \
  const KeptQueryTiles<kBM> kept(CF_BSP_MASK, b, h_first, n0, qt, split_heads);              \
  /* the grid covers the longest sequence: a block past this one's keys has no work */       \
  const int n_iter = CF_VARLEN && n0 >= seqlen_k ? 0 : kept.count();


  if (tid == 0) {
    // cp.async: warps 0, 1 and 3; TMA: the two issuing lanes (the boxes' bytes count apart)
    // (kTailZero: every thread of warps 0, 1 and 3, after the box or its zeroed tail)
    mbar_init(bars.k_v_full(), kTma && !kTailZero ? 2 : 96);
    if (kTailZero) {
      mbar_init(bars.kv_landed(), 2);
      for (int s = 0; s < kStages; ++s) {
        mbar_init(bars.q_landed(s), 1);
        mbar_init(bars.do_landed(s), 1);
      }
    }
    for (int s = 0; s < kStages; ++s) {
      // warps 0, 1: their copies (TMA: lane 0's boxes), then their stores
      mbar_init(bars.q_full(s), (kTma ? 1 : 64) + (kDropSlots ? 32 : 64));  // (ring: warp 0)
      mbar_init(bars.do_full(s), (kTma ? 1 : 32) + 32);  // warp 3
      // every consumer thread arrives: one arrival per warp after __syncwarp was as correct,
      // but racecheck reported the other lanes' reads of the statistics as racing the refill
      mbar_init(bars.stage_empty(s), kConsumerThreads);
    }
    for (int buf = 0; buf < 2; ++buf) {
      mbar_init(bars.ds_full(buf), kConsumerThreads);
      mbar_init(bars.ds_empty(buf), kConsumerThreads);
    }
    for (int r = 0; r < kDropSlots; ++r) {
      mbar_init(bars.drop_full(r), kDrawThreads);       // every drawing thread, after its stores
      mbar_init(bars.drop_empty(r), kConsumerThreads);  // every consumer thread, after its load
    }
    if constexpr (kTurnAgent) {
      for (int g = 0; g < 2; ++g) {
        mbar_init(bars.turn_granted(g), 1);  // the agent's lane 0
        mbar_init(bars.dq_added(g), 128);    // every thread of warpgroup g
        if constexpr (kPieces == 2) {
          mbar_init(bars.turn_granted(g, 1), 1);
          mbar_init(bars.dq_added(g, 1), 128);
        }
      }
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (wg == 0) {  // ---- the producer ------------------------------------------------------
    regs_dealloc<kProducerRegs>();
    // (warp read through a shuffle: ptxas then knows the branch is warp-uniform; with a
    // plain warp == 2 it kept convergence state on the stack and spilled 20-52 B)
    if constexpr (kTurnAgent) {
      if (__shfl_sync(0xffffffffu, warp, 0) == 2) {
        CF_BWD_WS_BLOCK_WORK
        if constexpr (kAgentAdds)
          serve_bulk_turns(turns, bars, n_iter, m_first, tiles_per_head, m_start, h_first,
                           lane, seq, dq_accum, smem_addr(smem + kOffDqPiece), max_seqlen_q);
        else
          serve_turns(turns, bars, n_iter, m_first, tiles_per_head, m_start, h_first, lane);
        return;
      }
    }
    if constexpr (kDropSlots > 0) {  // warps 1 and 2 draw each tile's flags, in the walk's order
      const int w = __shfl_sync(0xffffffffu, warp, 0);
      if (w == 1 || w == 2) {
        CF_BWD_WS_BLOCK_WORK
        const Dropout drop = CF_DROP;
        TileWalk walk(m_first, qt.end, h_first, m_start);
#pragma unroll 1
        for (int it = 0; it < n_iter; ++it, walk.next()) {
          const int slot = it % kDropSlots, round = it / kDropSlots;
          if (round > 0) mbar_wait(bars.drop_empty(slot), (round - 1) & 1);
          cf_drop_ring_fill_keys<8, kNT>(drop, smem + kOffRing + slot * kRingSlot,
                                         drop.head(b, walk.h, heads), n0, walk.m0, tid - 32,
                                         kDrawThreads);
          mbar_arrive(bars.drop_full(slot));
        }
        return;
      }
    }
    if (warp != 2) {  // warps 0, 1: K, then Q and lse2; warp 3: V, then dO and delta
      CF_BWD_WS_BLOCK_WORK
      CF_BWD_WS_TILES
      if (n_iter == 0) return;
      const bool q_side = warp < 2;  // (kDropSlots: warp 0 alone)
      const int t = q_side ? tid : lane, threads = q_side && !kDropSlots ? 64 : 32;
#if CF_BWD_TMA
      // the maps' row and batch of this sequence's row 0 (packed: one map over every row)
      const int map_q0 = CF_VARLEN ? seq.q_begin : 0, map_k0 = CF_VARLEN ? seq.k_begin : 0;
      const int map_b = CF_VARLEN ? 0 : b;
      // packed: the key tile that ends the sequence lands on kv_landed, zeroed past the end
      const bool kv_tail = kTailZero && n0 + kBN > seqlen_k;
      const cf_u32 kv_bar = kv_tail ? bars.kv_landed() : bars.k_v_full();
      if (t == 0) {  // one lane a side issues its boxes
        mbar_arrive_expect_tx(kv_bar, kTileK);
        tma_load_tile<kBN, kPanels>(smem_addr(q_side ? sK : sV), q_side ? &tm_k : &tm_v,
                                    map_k0 + n0, kvh, map_b, kv_bar);
      }
      if (kv_tail) {
        mbar_wait(bars.kv_landed(), 0);  // (once a block)
        zero_rows_past<kBN, kPanels>(q_side ? sK : sV, seqlen_k - n0, t, threads);
        fence_proxy_async();  // these stores before the tensor cores' reads
      }
      if (kTailZero && (kv_tail || t != 0)) mbar_arrive(bars.k_v_full());
#else
      const elem_t* kv_head = q_side ? k + seq.k_offset(stride_kb, stride_kn) + kvh * stride_kh
                                     : v + seq.k_offset(stride_vb, stride_vn) + kvh * stride_vh;
      copy_tile<kBN>(smem_addr(q_side ? sK : sV), kv_head, q_side ? stride_kn : stride_vn, n0,
                     seqlen_k - n0, head_dim, t, threads);
      mbar_arrive_cp_async(bars.k_v_full());
#endif
      const float2 fold = q_side ? CF_DROP.fold<true>() : CF_DROP.fold<false>();
      TileWalk walk(m_first, qt.end, h_first, m_start);
      int kept_t = kept.above(-1);  // block mask: the walk's index of this tile
#pragma unroll 1
      // (under a block mask the walk's end bounds the loop: one register fewer than n_iter)
      for (int it = 0; CF_BLOCK_SPARSE ? kept_t < kept.n : it < n_iter; ++it, walk.next()) {
        const int st = it % kStages, round = it / kStages;
        if (round > 0) mbar_wait(bars.stage_empty(st), (round - 1) & 1);
        int m0 = walk.m0, h = walk.h;
        if constexpr (CF_BLOCK_SPARSE) {
          int g;
          kept.tile(kept_t, m0, g);
          h = h_first + g;
          kept_t = kept.above(kept_t);
          if (tid == 0) {  // for the consumers, released by the ordinary q_full arrival
            sTiles[2 * st] = m0;
            sTiles[2 * st + 1] = h;
          }
        }
        // rows past seqlen_q become zeros (Q, dO) and 0 (lse2, delta): harmless
#if CF_BWD_TMA
        // packed: the query tile that ends the sequence lands on its stage's q_landed /
        // do_landed, which lane 0 completes by a plain arrival for the other tiles, so its
        // phase is the round's (a stage is armed again only after every thread of the side
        // has arrived on its full barrier, so none can miss a phase)
        const bool q_tail = kTailZero && m0 + kBM > seqlen_q;
        const cf_u32 full = q_side ? bars.q_full(st) : bars.do_full(st);
        const cf_u32 landed = q_side ? bars.q_landed(st) : bars.do_landed(st);
        if (t == 0) {
          mbar_arrive_expect_tx(q_tail ? landed : full, kTileQ);
          tma_load_tile<kBM, kPanels>(smem_addr((q_side ? sQ : sdO) + st * kTileQ),
                                      q_side ? &tm_q : &tm_do, map_q0 + m0, h, map_b,
                                      q_tail ? landed : full);
          if (kTailZero && !q_tail) mbar_arrive(landed);
        }
        if (q_tail) {
          mbar_wait(landed, round & 1);
          zero_rows_past<kBM, kPanels>((q_side ? sQ : sdO) + st * kTileQ, seqlen_q - m0, t,
                                       threads);
          fence_proxy_async();
          if (t == 0) mbar_arrive(full);  // the arrival the box would have made
        }
#else
        const elem_t* rows = q_side ? q + seq.q_offset(stride_qb, stride_qm) + h * stride_qh
                                    : dout + seq.q_offset(stride_dob, stride_dom) + h * stride_doh;
        copy_tile<kBM>(smem_addr((q_side ? sQ : sdO) + st * kTileQ), rows,
                       q_side ? stride_qm : stride_dom, m0, seqlen_q - m0, head_dim, t, threads);
#endif
        const float* stats = (q_side ? lse2 : delta) + seq.stats(h);
        float* s_stats = (q_side ? sLse : sDelta) + st * kBM;
        if (!kTma) mbar_arrive_cp_async(q_side ? bars.q_full(st) : bars.do_full(st));
        // the statistics by plain loads and stores (the consumers read them with plain
        // loads; the producer can afford to wait), then a second, ordinary arrival; with
        // dropout, 1 / (1 - p) folded in here saves the consumers two multiplies an element
#pragma unroll 1
        for (int r = t; r < kBM; r += threads)
          s_stats[r] = m0 + r >= seqlen_q ? 0.f
                       : kDropFold        ? fmaf(stats[m0 + r], fold.x, fold.y)
                                          : stats[m0 + r];
        mbar_arrive(q_side ? bars.q_full(st) : bars.do_full(st));
      }
      if (!kTma) {
        cp_async_commit();  // leave with no copy in flight
        cp_async_wait<0>();
      }
    }
    return;
  }

  // ---- the consumers -----------------------------------------------------------------------
  regs_alloc<kConsumerRegs>();
  CF_BWD_WS_BLOCK_WORK
  CF_BWD_WS_TILES
  const Dropout drop = CF_DROP;  // keeps everything without CF_DROPOUT
  const int me = wg - 1, cwarp = warp & 3, group = lane >> 2, tig = lane & 3;
  const cf_u32 sK_base = smem_addr(sK), sV_base = smem_addr(sV), sQ_sa = smem_addr(sQ);
  const cf_u32 sdO_sa = smem_addr(sdO), sdS_sa = smem_addr(sdS);
  float acc_dk[kDT][4], acc_dv[kDT][4];
#pragma unroll
  for (int d = 0; d < kDT; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[d][e] = acc_dv[d][e] = 0.f;
  const int key_row = n0 + me * 64 + cwarp * 16 + group;  // this thread's keys: +0, +8
  const int r_in_block = me * 64 + cwarp * 16 + group;    // the same, from n0
  const auto wait_for = [](cf_u32 bar, int parity) {  // copies (generic proxy) -> wgmma
    mbar_wait(bar, parity);
    if (!kTma) fence_proxy_async();  // TMA boxes land through wgmma's async proxy
  };
  if (n_iter > 0) wait_for(bars.k_v_full(), 0);

  // Turns (CF_BWD_WS_PINGPONG): the warpgroups take turns issuing their products, so one's
  // P^T / dS^T and dQ adds run while the other's products hold the tensor cores; warpgroup 1
  // opens the first turn. Each turn barrier counts the warpgroup that waits and the one that
  // hands the turn over.
  const auto my_turn = [me] {
    if constexpr (kPingPong) named_bar_sync(kTurnBarrier + me, kConsumerThreads);
  };
  const auto their_turn = [me] {
    if constexpr (kPingPong) named_bar_arrive(kTurnBarrier + (me ^ 1), kConsumerThreads);
  };
  if (kPingPong && n_iter > 0 && me == 1) their_turn();
  // CF_DQ_BULK: the warpgroup's piece, and where its staged dQ goes (set when staged). Each
  // my_turn() is a barrier of the whole warpgroup (with turns off, bulk_sync is).
  const bool leader = (tid & 127) == 0;
  const cf_u32 dq_piece = smem_addr(smem + kOffDqPiece) + me * kDqPieceBytes;
  float* staged_dq = nullptr;
  const auto bulk_sync = [me] {
    if constexpr (kBulk && !kPingPong) named_bar_sync(kOrderBarrier + me, 128);
  };
  // stage dQ of query tile pm0, head ph in the piece; it is added after the next barrier,
  // unless all its rows are past seqlen_q (head_dim 64's second 64 rows of a 128-row tile:
  // the accumulator has no piece there)
  // (n: the warpgroup's n-th piece; kPieces 2: into piece n & 1)
  const auto stage_dq = [&](const float (&dq)[8][4], int pm0, int ph, int n) {
    if constexpr (kPieces == 1)
      stage_dq_piece(dq, dq_piece, cwarp, lane);
    else
      stage_dq_piece(dq, dq_piece + (n & 1) * 2 * kDqPieceBytes, cwarp, lane);
    fence_proxy_async();  // the stores, for the bulk copy's (async proxy) reads
    if constexpr (kAgentAdds) {  // staged: the agent adds it in its turn
      mbar_arrive(kPieces == 1 ? bars.dq_added(me) : bars.dq_added(me, n & 1));
      return;
    }
    const int row0 = pm0 + (kBM == 128 ? 64 * me : 0);
    staged_dq = row0 < seqlen_q
                    ? seq.dq_piece(dq_accum, ph, row0, kBM == 128 ? 0 : 64 * me, max_seqlen_q, kD)
                    : nullptr;
  };
  const auto add_staged_dq = [&] {  // after a barrier that followed every thread's staging
    if (kBulk && !kAgentAdds && leader && staged_dq) {
      bulk_reduce_add_f32(staged_dq, dq_piece, kDqPieceBytes);
      bulk_commit();
    }
  };

  // dQ of the previous tile: issued after this tile's dV and dK, from dS^T buffer
  // (it - 1) & 1 once both warpgroups have written it (ds_full); added into dq_accum once
  // done; the buffer is free again when both have read it (ds_empty).
  const auto issue_dq = [&](float (&dq)[8][4], int prev) {
    // prev < 0, the first tile: a dry run on K and V (resident, never written), discarded;
    // a conditional product here made the compiler keep dq in local memory (128 B)
    cf_u32 ds_buf = sK_base;
    if (prev >= 0) {
      mbar_wait(bars.ds_full(prev & 1), (prev >> 1) & 1);  // both halves of dS^T(prev) are in
      ds_buf = sdS_sa + (prev & 1) * kTileDS;
    }
    cf_u32 sK_sa = sK_base;
    asm volatile("" : "+r"(sK_sa));
    if constexpr (kBM == 128) {  // head_dim 64: query rows 64 me .., all 128 keys
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        wgmma_ss_mn_n64(dq, sm90_desc_mnmajor<kBN>(ds_buf + me * kBN * 128, kk),
                        sm90_desc_mnmajor<kBN>(sK_sa, kk), kk > 0);
    } else {  // head_dim 128: columns 64 me .. (panel me of K), all 128 keys
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        wgmma_ss_mn_n64(dq, sm90_desc_mnmajor<kBN>(ds_buf, kk),
                        sm90_desc_mnmajor<kBN>(sK_sa + me * kBN * 128, kk), kk > 0);
    }
    wgmma_commit();
  };
  // dq_accum += dQ of query tile pm0, head ph (times softmax_scale); ordered: after the key
  // tiles before this one that see this query tile, then pass the turn on.
  // n: the add's place in the walk (the turn agent's mbarrier phases)
  const auto add_dq_of = [&](const float (&dq)[8][4], int pm0, int ph, int n) {
    const int dq_row0 = kBM == 128 ? 64 * me : 0, dq_col0 = kBM == 128 ? 0 : 64 * me;
    int* sem = nullptr;
    int turn = 0;
    if constexpr (kTurnAgent) {
      if (leader) mbar_wait(bars.turn_granted(me), n & 1);
      named_bar_sync(kOrderBarrier + me, 128);
    } else if constexpr (kOrdered) {
      turn = turns.turn(pm0);
      sem = turns.semaphore(pm0, ph, me);
      if (leader) wait_for_turn(sem, turn);
      named_bar_sync(kOrderBarrier + me, 128);
    }
    if constexpr (kRed4) {  // (rows wholly past seqlen_q: no piece)
      if (pm0 + dq_row0 < seqlen_q)
        red_dq_piece(dq, seq.dq_piece(dq_accum, ph, pm0 + dq_row0, dq_col0, max_seqlen_q, kD),
                     cwarp, lane);
    } else {
      add_dq(dq, dq_accum + (seq.row_q() * heads + ph) * head_dim,
             pm0 + dq_row0 + cwarp * 16 + group, dq_col0, tig, seqlen_q, heads, head_dim,
             softmax_scale);
    }
    if constexpr (kTurnAgent) {
      mbar_arrive(bars.dq_added(me));  // the agent passes the turn on
    } else if constexpr (kOrdered) {
      named_bar_sync(kOrderBarrier + me, 128);  // every thread's adds, before the leader's fence
      if (leader) fence_and_release(sem, turn + 1);
    }
  };

  TileWalk walk(m_first, qt.end, h_first, m_start);
  int pm0 = 0, ph = 0;  // the previous tile's query rows and head
#pragma unroll 1
  for (int it = 0; it < n_iter; ++it, walk.next()) {
    const int st = it % kStages, phase = (it / kStages) & 1;
    int m0 = walk.m0, h = walk.h;
    cf_u32 sK_sa = sK_base, sV_sa = sV_base;
    asm volatile("" : "+r"(sK_sa), "+r"(sV_sa));  // descriptors per tile, not hoisted (registers)
    const cf_u32 q_tile = sQ_sa + st * kTileQ, do_tile = sdO_sa + st * kTileQ;

    // -- S^T = K Q^T, dP^T = V dO^T for this warpgroup's 64 keys
    float s[kNT][4], dp[kNT][4];
    wait_for(bars.q_full(st), phase);
    wait_for(bars.do_full(st), phase);
    if constexpr (CF_BLOCK_SPARSE) {  // the tile the producer picked
      m0 = sTiles[2 * st];
      h = sTiles[2 * st + 1];
    }
    my_turn();
    if constexpr (kBulk) {
      bulk_sync();
      add_staged_dq();  // the previous tile's stage: dQ of tile it - 2
      staged_dq = nullptr;
    }
    wgmma_fence();
    issue_scores_t<kBN, kBM>(s, sK_sa, me * 64 * 128, q_tile, 0);
    issue_scores_t<kBN, kBM>(dp, sV_sa, me * 64 * 128, do_tile, 0);
    wgmma_commit();
    their_turn();
    // dropout's kept flags of the tile (S^T: keys as rows) while the products run: drawn
    // here, or read from the slot the producer's warps drew them into (kDropSlots)
    unsigned long long keep;
    if constexpr (kDropSlots > 0) {
      const int slot = it % kDropSlots;
      mbar_wait(bars.drop_full(slot), (it / kDropSlots) & 1);
      keep = *reinterpret_cast<const unsigned long long*>(smem + kOffRing + slot * kRingSlot +
                                                          (warp - 4) * 32 * 8 + lane * 8);
      mbar_arrive(bars.drop_empty(slot));
    } else {
      keep = drop.keep_bits<kNT, true>(drop.head(b, h, heads), key_row, m0 + 2 * tig);
    }
    // CF_BWD_STATS_AHEAD: the statistics one fragment ahead of their use, the first while
    // the products run (else each is read where used)
    const float* lse_t = sLse + st * kBM;
    const float* delta_t = sDelta + st * kBM;
    float2 lse_next{}, dl_next{};
    if constexpr (kStatsAhead) {
      lse_next = *reinterpret_cast<const float2*>(lse_t + 2 * tig);
      dl_next = *reinterpret_cast<const float2*>(delta_t + 2 * tig);
    }
    wgmma_wait<0>();
    wgmma_fence_regs(s);
    wgmma_fence_regs(dp);

    // -- P^T and dS^T; s becomes P^T times the softcap's derivative
    // dS^T buffer it & 1: free once both warpgroups have read it for dQ(it - 2)
    if (it >= 2) mbar_wait(bars.ds_empty(it & 1), ((it - 2) >> 1) & 1);
    unsigned char* ds_tile = smem + kOffDS + (it & 1) * kTileDS;
    // Masked: some pair of the block hidden by the mask, or the keys tail (zero K rows give
    // S = 0 but P = exp2(-lse2), which must not reach dQ).
    const bool masked = !mask.full(m0, m0 + kBM - 1, n0, n0 + kBN - 1);
    const ScoreMods mods(CF_MOD_ARGS, b, h, seqlen_q, seqlen_k);
    cf_u32 pa[kQSteps][4], dsa[kQSteps][4];
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
      const int col = 8 * t + 2 * tig;
      float2 lse = lse_next, dl = dl_next;
      if (!kStatsAhead) {
        lse = *reinterpret_cast<const float2*>(lse_t + col);
        dl = *reinterpret_cast<const float2*>(delta_t + col);
      } else if (t + 1 < kNT) {
        lse_next = *reinterpret_cast<const float2*>(lse_t + col + 8);
        dl_next = *reinterpret_cast<const float2*>(delta_t + col + 8);
      }
      float p[4], ds[4];
      p_ds_fragment<kDropFold>(s[t], dp[t], lse, dl, key_row, m0 + col, masked, mask, mods,
                               scale_log2, p, ds, (unsigned int)(keep >> 4 * t) & 15u, drop);
      // to registers (the A operands of dV, dK) and dS^T to shared memory (dQ's)
      const int kq = t >> 1, hi = (t & 1) * 2;
      pa[kq][hi] = pack2(p[0], p[1]);
      pa[kq][hi + 1] = pack2(p[2], p[3]);
      dsa[kq][hi] = pack2(ds[0], ds[1]);
      dsa[kq][hi + 1] = pack2(ds[2], ds[3]);
      *reinterpret_cast<cf_u32*>(ds_tile + sm90_offset<kBN>(r_in_block, col)) = dsa[kq][hi];
      *reinterpret_cast<cf_u32*>(ds_tile + sm90_offset<kBN>(r_in_block + 8, col)) =
          dsa[kq][hi + 1];
    }
    fence_proxy_async();  // the dS^T stores, for the dQ wgmma
    mbar_arrive(bars.ds_full(it & 1));

    // -- dV += P^T dO, dK += dS^T Q (queries are the contraction: dO, Q MN-major), then dQ of
    // the previous tile
    if (kBulk && leader) {  // the piece free once the barrier passes
      if constexpr (kAgentAdds && kPieces == 1) {
        if (it >= 2) mbar_wait(bars.turn_granted(me), (it - 2) & 1);  // add it - 2 done
      } else if constexpr (kAgentAdds) {  // the piece staged next (it - 1): add it - 3 done
        if (it >= 3) mbar_wait(bars.turn_granted(me, (it - 3) & 1), ((it - 3) >> 1) & 1);
      } else {
        bulk_wait_read_all();
      }
    }
    my_turn();
    bulk_sync();
    wgmma_fence();
#pragma unroll
    for (int kq = 0; kq < kQSteps; ++kq)
      wgmma_rs_acc(acc_dv, pa[kq], sm90_desc_mnmajor<kBM>(do_tile, kq), 1);
#pragma unroll
    for (int kq = 0; kq < kQSteps; ++kq)
      wgmma_rs_acc(acc_dk, dsa[kq], sm90_desc_mnmajor<kBM>(q_tile, kq), 1);
    wgmma_commit();
    float dq[8][4];
    issue_dq(dq, it - 1);
    their_turn();
    wgmma_wait<0>();
    wgmma_fence_regs(acc_dv);
    wgmma_fence_regs(acc_dk);
    wgmma_fence_regs(dq);
    mbar_arrive(bars.stage_empty(st));  // this thread is done with Q, dO and the statistics
    if (it > 0) {
      mbar_arrive(bars.ds_empty((it - 1) & 1));
      if constexpr (kBulk)
        stage_dq(dq, pm0, ph, it - 1);  // added after the next tile's first barrier
      else
        add_dq_of(dq, pm0, ph, it - 1);
    }
    pm0 = m0;
    ph = h;
  }
  if (n_iter > 0) {  // the last tile's dQ
    float dq[8][4];
    my_turn();
    bulk_sync();
    add_staged_dq();
    wgmma_fence();
    issue_dq(dq, n_iter - 1);
    their_turn();
    wgmma_wait<0>();
    wgmma_fence_regs(dq);
    if constexpr (kBulk) {
      if (leader) {
        if constexpr (kAgentAdds && kPieces == 1) {
          if (n_iter >= 2) mbar_wait(bars.turn_granted(me), (n_iter - 2) & 1);
        } else if constexpr (kAgentAdds) {
          const int used = n_iter - 3;
          if (used >= 0) mbar_wait(bars.turn_granted(me, used & 1), (used >> 1) & 1);
        } else {
          bulk_wait_read_all();
        }
      }
      named_bar_sync(kOrderBarrier + me, 128);  // the piece is free
      stage_dq(dq, pm0, ph, n_iter - 1);  // kAgentAdds: the agent adds it (the block lives
                                          // until it has)
      if constexpr (!kAgentAdds) {
        named_bar_sync(kOrderBarrier + me, 128);  // every thread's stores, before the add
        add_staged_dq();
        if (leader) bulk_wait_all();
      }
    } else {
      add_dq_of(dq, pm0, ph, n_iter - 1);
    }
  }

  store_dk_dv(acc_dk, acc_dv, key_row, tig, seq, seqlen_k, heads / heads_per_kv, kvh, head_dim,
              kv_splits, dk_accum, dv_accum, dk, stride_dkb, stride_dkn, stride_dkh, dv,
              stride_dvb, stride_dvn, stride_dvh, softmax_scale);
}

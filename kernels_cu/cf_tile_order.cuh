// cf_tile_order.cuh -- which (tile, head) a block of a causal grid works on.
//
// Causal tiles differ in cost (a query tile near the end sees many keys; a key tile near the
// start is seen by many queries), so the order the hardware starts blocks in decides how long
// the last wave runs. Blocks start x-fastest, then y; read (blockIdx.x, blockIdx.y) as one
// index L over tiles x heads and hand out the heaviest tiles first, heads fastest, so the last
// wave holds only light tiles (measured on an H200, bf16, 2026-12-01: +5-30% at seqlen 1k-4k).
//
// Heads fastest across ALL heads made the backward's blocks in flight stream every head's
// Q, dO and dQ at once: at seqlen 16k it lost 7% (head_dim 64) against head-major order. So
// the backward passes the bytes a head streams, and heads go in equal chunks whose bytes fit
// a share of L2: heaviest first within a chunk, chunk after chunk (H200, bf16, 2026-12-01:
// backward 16k causal +4.5% at head_dim 64 and 128, 4k unchanged). The forward passes 0 (one
// chunk of all heads): chunking cost it 3% at 4k head_dim 128 and 12% at head_dim 256, where a
// later chunk's heavy tiles start late and run alone at the end.
#pragma once

#include "cf_mask.cuh"  // CF_CAUSAL

// The L2 bytes one chunk's streamed tensors may take (H100/H200 have 50 MB of L2; the rest
// is left to the tiles that stay resident and to the other operands).
#define CF_TILE_ORDER_L2_BYTES (24ll << 20)

struct TileOrder {
  int tile_rank;  // 0 = the heaviest tile
  int head;       // blockIdx.y's meaning: the (kv) head
};

// head_bytes: bytes a block of one head streams from global memory over the whole sequence
// (all blocks of a head share them through L2); 0: one chunk of all heads (the forward:
// causal_tile_order_all_heads below).
__device__ __forceinline__ TileOrder causal_tile_order(long long head_bytes) {
  const int tiles = (int)gridDim.x, heads = (int)gridDim.y;
  const int linear = (int)(blockIdx.y * gridDim.x + blockIdx.x);
  const long long fit = head_bytes > 0 ? CF_TILE_ORDER_L2_BYTES / head_bytes : heads;
  const int chunks = fit < 1 ? heads : (int)((heads + fit - 1) / fit);
  const int chunk = (heads + chunks - 1) / chunks;  // equal chunks, the last one no larger
  const int first = linear / (chunk * tiles) * chunk;
  const int in_chunk = min(chunk, heads - first);
  const int r = linear - first * tiles;
  return TileOrder{r / in_chunk, first + r % in_chunk};
}

// The forward's order: one chunk of all heads. Spelled apart from causal_tile_order(0), whose
// chunk arithmetic the compiler cannot fold (a 64-bit division and four 32-bit ones before
// the first load).
__device__ __forceinline__ TileOrder causal_tile_order_all_heads() {
  const int heads = (int)gridDim.y;
  const int linear = (int)(blockIdx.y * gridDim.x + blockIdx.x);
  return TileOrder{linear / heads, linear % heads};
}

// The portable forward and the float32 kernels (x = query tile, y = head, z = batch): a causal
// grid starts its last query tile first (it sees the most keys). The Hopper kernels use
// causal_tile_order above; the key-major backward kernels walk query tiles themselves.
__device__ __forceinline__ int query_tile_longest_first() {
  return CF_CAUSAL ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
}

// cf_tile_order.cuh -- which (tile, head) a block of a causal grid works on.
//
// Causal tiles differ in cost (a query tile near the end sees many keys; a key tile near the
// start is seen by many queries), so the order the hardware starts blocks in decides how long
// the last wave runs. Blocks start x-fastest, then y; read (blockIdx.x, blockIdx.y) as one
// index L over tiles x heads and hand out the heaviest tiles first, heads fastest, so the last
// wave holds only light tiles (measured on an H200, bf16, 2026-12-01: +5-30% at seqlen 1k-4k).
//
// Heads fastest across ALL heads made the blocks in flight stream every head's tensors at
// once: at seqlen 16k that outgrows L2 (the backward at head_dim 64, 16k, causal lost 7%
// against head-major order). So heads go in chunks whose streamed bytes fit a share of L2:
// within a chunk heaviest first, heads fastest; chunk after chunk. Short sequences get one
// chunk of all heads, long ones chunks of a few heads.
#pragma once

// The L2 bytes one chunk's streamed tensors may take (H100/H200 have 50 MB of L2; the rest
// is left to the tiles that stay resident and to the other operands).
#define CF_TILE_ORDER_L2_BYTES (24ll << 20)

struct TileOrder {
  int tile_rank;  // 0 = the heaviest tile
  int head;       // blockIdx.y's meaning: the (kv) head
};

// head_bytes: bytes a block of one head streams from global memory over the whole sequence
// (all blocks of a head share them through L2).
__device__ __forceinline__ TileOrder causal_tile_order(long long head_bytes) {
  const int tiles = (int)gridDim.x, heads = (int)gridDim.y;
  const int linear = (int)(blockIdx.y * gridDim.x + blockIdx.x);
  long long fit = CF_TILE_ORDER_L2_BYTES / (head_bytes > 0 ? head_bytes : 1);
  const int chunk = (int)(fit < 1 ? 1 : fit > heads ? heads : fit);
  const int c = linear / (chunk * tiles);
  const int first = c * chunk;
  const int in_chunk = min(chunk, heads - first);
  const int r = linear - first * tiles;
  return TileOrder{r / in_chunk, first + r % in_chunk};
}

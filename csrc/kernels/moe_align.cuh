// Mixture-of-experts grouping: a batch's (token, expert) pairs sorted by
// expert on the device, so each expert's weights serve all of its tokens in
// one pass (matvec_expert_groups_launch).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hx {

// ids[p] is the expert of pair p = token * top_k + j (moe_route_launch's
// output; clamped into [0, num_experts)). Writes, all in device memory:
//   offsets[e]: first slot of expert e's pairs (offsets[num_experts] = pairs),
//   active[0 .. *n_active): the experts with pairs, ascending,
//   pair_slot[p]: the slot pair p went to, slot_token[slot]: its token.
// Within an expert the slot order is arbitrary (atomics); nothing computed
// per slot depends on it.
// With `tiles` (tile_rows >= 1), also the work list of the grouped
// products: each expert's slots cut into tiles of at most tile_rows rows,
// experts in id order and each one's tiles in slot order, as
//   tiles[t] = {expert, first slot, rows, 0}, t < *n_tiles
// (at most moe_max_tiles(pairs, num_experts, tile_rows) of them), so a
// popular expert's rows spread over many CTAs instead of one CTA's loop.
void moe_align_launch(const int32_t* ids /*[pairs]*/, int pairs, int num_experts /*1..kMoeMaxExperts*/, int top_k,
                      int32_t* offsets /*[num_experts + 1]*/, int32_t* active /*[num_experts]*/,
                      int32_t* n_active /*[1]*/, int32_t* pair_slot /*[pairs]*/, int32_t* slot_token /*[pairs]*/,
                      int tile_rows, int4* tiles /*[moe_max_tiles] or nullptr*/, int32_t* n_tiles /*[1]*/,
                      cudaStream_t stream);

// The most tiles of tile_rows rows that `pairs` pairs over num_experts experts
// cut into: sum over experts of ceil(count / tile_rows) <= pairs / tile_rows
// + (experts with pairs).
inline int moe_max_tiles(int pairs, int num_experts, int tile_rows) {
  return (pairs + tile_rows - 1) / tile_rows + (num_experts < pairs ? num_experts : pairs);
}

}  // namespace hx

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
void moe_align_launch(const int32_t* ids /*[pairs]*/, int pairs, int num_experts /*1..kMoeMaxExperts*/, int top_k,
                      int32_t* offsets /*[num_experts + 1]*/, int32_t* active /*[num_experts]*/,
                      int32_t* n_active /*[1]*/, int32_t* pair_slot /*[pairs]*/, int32_t* slot_token /*[pairs]*/,
                      cudaStream_t stream);

}  // namespace hx

// Mixture-of-experts routing: each token's experts and their weights from
// its router logits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hx {

// Most experts (and experts per token) the routing kernels take.
constexpr int kMoeMaxExperts = 1024;
constexpr int kMoeMaxTopK = 64;

// Per token t: p = softmax(logits[t]) in float32; the top_k largest p, in
// descending order, with ties going to the lower expert id (as the CPU
// reference's stable sort); weights are those p, divided by their sum when
// `normalize` (norm_topk_prob). The ids are always in [0, num_experts), so
// a NaN row still routes somewhere (its weights stay NaN).
void moe_route_launch(const float* logits /*[n, num_experts]*/, int n, int num_experts /*1..kMoeMaxExperts*/,
                      int top_k /*1..min(num_experts, kMoeMaxTopK)*/, bool normalize, int32_t* ids /*[n, top_k]*/,
                      float* weights /*[n, top_k]*/, cudaStream_t stream);

}  // namespace hx

// Mixture-of-experts routing: each token's experts and their weights from
// its router logits.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
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
//
// With `prefetch` (slices > 0), the chosen experts' matrices of up to two
// stacks (expert e's at base + e * stride, stride bytes, a multiple of 16)
// are also prefetched into L2 (sm_90+ bulk prefetches; elsewhere nothing),
// each token's group of CTAs repeated `slices` times, each copy asking for
// one slice of every matrix: the expert products that follow, which can
// only start loading once they know the routing, find their weights in L2
// or on the way. Only the first copy writes ids and weights.
struct MoePrefetch {
  const void* base[2] = {nullptr, nullptr};
  size_t stride[2] = {0, 0};
  int slices = 0;  // CTAs per token group that prefetch (0: none; at most 1024)
};
void moe_route_launch(const float* logits /*[n, num_experts]*/, int n, int num_experts /*1..kMoeMaxExperts*/,
                      int top_k /*1..min(num_experts, kMoeMaxTopK)*/, bool normalize, int32_t* ids /*[n, top_k]*/,
                      float* weights /*[n, top_k]*/, cudaStream_t stream, const MoePrefetch& prefetch = {});

}  // namespace hx

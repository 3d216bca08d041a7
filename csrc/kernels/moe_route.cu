// Router top-k: softmax over a token's router logits, then its top_k experts.
//
//   p[e] = exp(l[e] - max l) * (1 / sum exp(l - max l))
//   chosen: k rounds of argmax over the unchosen p, the larger p first and,
//   on equal p, the lower e (the CPU reference sorts stably, descending)
//   weights: the chosen p, / their sum (rank order) when normalize
//
// One warp per token, 4 tokens per CTA; the token's probabilities sit in
// shared memory ([4][num_experts] floats) while the warp picks: each round a
// lane scans its strided experts, the warp reduces (p, e) pairs with
// shuffles, and the winner's slot is marked -1 (probabilities are >= 0, NaN
// ranks below every number and above a chosen slot, so the k picks are
// always distinct valid ids). One arch path (sm_80+).
#include "kernels/moe_route.cuh"

#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"
#include "common/launch.cuh"

namespace hx {
namespace {

constexpr int kWarps = 4;

// Selection key of a slot: its probability, a NaN just above a chosen slot.
__device__ __forceinline__ float route_key(float p) { return p >= 0.f ? p : (p == -1.f ? -1.f : -0.5f); }

__global__ void __launch_bounds__(kWarps * 32) moe_route_kernel(const float* __restrict__ logits, int n, int E, int k,
                                                             int normalize, int32_t* __restrict__ ids,
                                                             float* __restrict__ weights) {
  pdl_begin();
  extern __shared__ float probs[];  // [kWarps][E]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int t = blockIdx.x * kWarps + warp;
  if (t >= n) return;  // warp-uniform; the kernel has no block barrier
  const float* l = logits + (size_t)t * E;
  float* p = probs + (size_t)warp * E;

  float m = -INFINITY;
  for (int e = lane; e < E; e += 32) m = fmaxf(m, l[e]);
  m = warp_max(m);
  float s = 0.f;
  for (int e = lane; e < E; e += 32) {
    const float v = expf(l[e] - m);
    p[e] = v;
    s += v;
  }
  const float inv = 1.0f / warp_sum(s);
  for (int e = lane; e < E; e += 32) p[e] *= inv;
  __syncwarp();

  int32_t* out_ids = ids + (size_t)t * k;
  float* out_w = weights + (size_t)t * k;
  float total = 0.f;
  for (int j = 0; j < k; ++j) {
    float best = -2.f, best_raw = 0.f;
    int best_e = E;
    for (int e = lane; e < E; e += 32) {
      const float raw = p[e];
      const float key = route_key(raw);
      if (key > best) {  // ascending e: the first of equal keys stays
        best = key;
        best_raw = raw;
        best_e = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(kFullMask, best, o);
      const float orw = __shfl_xor_sync(kFullMask, best_raw, o);
      const int oe = __shfl_xor_sync(kFullMask, best_e, o);
      if (ob > best || (ob == best && oe < best_e)) {
        best = ob;
        best_raw = orw;
        best_e = oe;
      }
    }
    // k <= E leaves an unchosen slot (key >= -0.5 > -2) in some lane, so best_e < E.
    if (lane == 0) {
      out_ids[j] = best_e;
      out_w[j] = best_raw;
    }
    if ((best_e & 31) == lane) p[best_e] = -1.f;
    __syncwarp();
    total += best_raw;
  }
  // Lane 0 wrote every weight; it rescales them itself.
  if (normalize && lane == 0)
    for (int j = 0; j < k; ++j) out_w[j] = out_w[j] / total;
}

}  // namespace

void moe_route_launch(const float* logits, int n, int num_experts, int top_k, bool normalize, int32_t* ids,
                      float* weights, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kMoeMaxExperts)
    throw std::invalid_argument("moe_route: num_experts must be 1.." + std::to_string(kMoeMaxExperts) + ", got " +
                                std::to_string(num_experts));
  if (top_k < 1 || top_k > num_experts || top_k > kMoeMaxTopK)
    throw std::invalid_argument("moe_route: top_k must be 1..min(num_experts, " + std::to_string(kMoeMaxTopK) +
                                "), got " + std::to_string(top_k));
  if (n < 0) throw std::invalid_argument("moe_route: negative n");
  if (n == 0) return;
  if (!logits || !ids || !weights) throw std::invalid_argument("moe_route: null pointer");
  const size_t smem = (size_t)kWarps * num_experts * sizeof(float);
  launch_overlapped(moe_route_kernel, dim3((n + kWarps - 1) / kWarps), dim3(kWarps * 32), smem, stream, logits, n,
                    num_experts, top_k, normalize ? 1 : 0, ids, weights);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

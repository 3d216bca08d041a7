// Token sampling on the device, in helexa_native/params.py's exact order.
//
// Every launcher is CUDA-graph capturable: parameters, the step counter and
// the chosen token live in device memory, nothing is allocated and nothing
// synchronizes with the host.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/limits.h"

namespace hx {

// SamplingParams of one request as the device reads them: 40 bytes, no
// implicit padding, fields in this order (Python: struct.pack("<fifffffiQ", ...)).
struct SamplingParamsDevice {
  float temperature;         // 0: greedy
  int32_t top_k;             // 0 (or >= vocab): off
  float top_p;               // 1: off
  float min_p;               // 0: off
  float repetition_penalty;  // 1: off
  float presence_penalty;
  float frequency_penalty;
  int32_t reserved;          // keeps seed 8-byte aligned; ignored
  uint64_t seed;
};
static_assert(sizeof(SamplingParamsDevice) == 40, "SamplingParamsDevice layout is shared with the host");

// params.py steps 2-3 (and NaN -> -inf, as the host sampler does first):
//   x = logits[t]; if present[t]: x = x > 0 ? x / r : x * r;
//   x = x - presence * (counts[t] > 0); x = x - frequency * counts[t].
// out may alias logits. present / counts are maintained by the forward.
void penalties_launch(const float* logits /*[vocab]*/, float* out /*[vocab]*/, int vocab,
                      const SamplingParamsDevice* p /*device*/, const int32_t* present /*[vocab]*/,
                      const int32_t* counts /*[vocab]*/, cudaStream_t stream);

// Greedy: index of the largest logit, lowest id on ties, NaN counting as
// -inf (all -inf: 0). One block.
void argmax_launch(const float* logits /*[vocab]*/, int vocab, int32_t* out /*[1] device*/, cudaStream_t stream);

// Workspace bytes sample_launch needs for this vocabulary size.
size_t sample_workspace_bytes(int vocab);

// params.py steps 4-9 on (already penalized) logits: temperature 0 -> argmax;
// else x / T, top_k, softmax, top_p, min_p, renormalize, and the first
// candidate (descending probability, lower id first on ties) whose
// cumulative mass exceeds u = uniform(seed, *step). Exact over the whole
// vocabulary (a full device radix sort, no candidate cap).
void sample_launch(const float* logits /*[vocab]*/, int vocab, const SamplingParamsDevice* p /*device*/,
                   const int32_t* step /*[1] device*/, int32_t* out_token /*[1] device*/, void* workspace,
                   size_t ws_bytes, cudaStream_t stream);

// log_softmax of the raw logits (NaN -> -inf): out_logprob = lp[*token]
// (-inf for an id outside the vocabulary), and the top_n (<= kMaxTopLogprobs)
// largest lp, best first, lower id first on ties. out_top_* may be nullptr
// when top_n == 0.
void logprobs_launch(const float* logits /*[vocab]*/, int vocab, int top_n, const int32_t* token /*[1] device*/,
                     float* out_logprob /*[1] device*/, int32_t* out_top_ids /*[top_n] device*/,
                     float* out_top_lp /*[top_n] device*/, cudaStream_t stream);

// uniform(seed, step) of params.py, bit for bit (host and device).
__host__ __device__ inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
__host__ __device__ inline double sample_uniform(uint64_t seed, uint64_t step) {
  const uint64_t x = splitmix64(seed ^ splitmix64(step));
  return (double)(x >> 11) * (1.0 / 9007199254740992.0);
}

}  // namespace hx

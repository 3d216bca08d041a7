// Token sampling on the device, in helexa_native/params.py's exact order.
//
// Every launcher is CUDA-graph capturable: parameters, the step counter and
// the chosen token live in device memory, nothing is allocated and nothing
// synchronizes with the host.
//
// Each stage has a single-row form (one sequence, one SamplingParamsDevice) and a
// batched form (*_batch_launch) that serves B rows of a [B, vocab] logits
// matrix in one launch per stage, every row with its own parameters, random
// stream (seed, steps[b]) and penalty slot (1 <= B <= 65535; B = 0 does
// nothing). A batched row gives the same result as the single-row launcher
// on that row, bit for bit.
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

// penalties_launch for B rows. Penalty state is a pool of slots (see
// penalty_slots.cuh): row b reads present / counts row slots[b]; a slot
// outside [0, max_slots) means no state, and a row whose parameters are
// neutral (r == 1, presence == frequency == +0) skips the state: both only
// clean NaN to -inf, which is what the formula gives them (up to the sign of
// a zero logit). out may alias logits.
void penalties_batch_launch(const float* logits /*[B, vocab]*/, float* out /*[B, vocab]*/, int B, int vocab,
                            const SamplingParamsDevice* params /*[B] device*/, const int32_t* slots /*[B] device*/,
                            const int32_t* present /*[max_slots, vocab]*/, const int32_t* counts /*[max_slots, vocab]*/,
                            int max_slots, cudaStream_t stream);

// Greedy: index of the largest logit, lowest id on ties, NaN counting as
// -inf (all -inf: 0). One block.
void argmax_launch(const float* logits /*[vocab]*/, int vocab, int32_t* out /*[1] device*/, cudaStream_t stream);

// argmax_launch for B rows: one block per row (argmax_launch is B = 1), or
// with a workspace of argmax_workspace_bytes(B, vocab) bytes (8-byte
// aligned) and a vocabulary past 4096, slices of each row in blocks of
// their own and a second small launch that picks among them (the same ids).
size_t argmax_workspace_bytes(int B, int vocab);
void argmax_batch_launch(const float* logits /*[B, vocab]*/, int B, int vocab, int32_t* out /*[B] device*/,
                         cudaStream_t stream, void* workspace = nullptr, size_t workspace_bytes = 0);

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

// Workspace bytes sample_batch_launch needs: 16 * B * vocab bytes (the full
// sort's double buffers) plus about 52 KiB per row (candidates, histogram,
// partials); about 160 MB for B = 64 and vocab = 151936.
size_t sample_batch_workspace_bytes(int B, int vocab);

// sample_launch for B rows (B * vocab < 2^31), one set of launches for the
// batch. Row b uses params[b] and steps[b]; its token is what sample_launch
// gives for that row, bit for bit. Temperature-0 rows (and rows with no
// finite x / T) cost one argmax pass and no sort. A sampled row normally
// sorts only its best candidates: the values at or above a threshold chosen
// from a histogram of the row so that at most 4096 remain; when params.py's
// answer depends on a position past them (a flat distribution, a deep pick,
// top_k beyond them), that row is sorted in full by a segmented radix sort
// whose other segments are empty. candidate_prefix = false sorts every
// sampled row in full (the exact fallback alone; for tests and measurements).
// sorted_in_full, when given, receives 1 for each row that was sorted in full.
void sample_batch_launch(const float* logits /*[B, vocab]*/, int B, int vocab,
                         const SamplingParamsDevice* params /*[B] device*/, const int32_t* steps /*[B] device*/,
                         int32_t* out /*[B] device*/, void* workspace, size_t ws_bytes, cudaStream_t stream,
                         bool candidate_prefix = true, int32_t* sorted_in_full /*[B] device or nullptr*/ = nullptr);

// log_softmax of the raw logits (NaN -> -inf): out_logprob = lp[*token]
// (-inf for an id outside the vocabulary), and the top_n (<= kMaxTopLogprobs)
// largest lp, best first, lower id first on ties. out_top_* may be nullptr
// when top_n == 0.
void logprobs_launch(const float* logits /*[vocab]*/, int vocab, int top_n, const int32_t* token /*[1] device*/,
                     float* out_logprob /*[1] device*/, int32_t* out_top_ids /*[top_n] device*/,
                     float* out_top_lp /*[top_n] device*/, cudaStream_t stream);

// logprobs_launch for B rows, one block per row: row b's top list starts at
// out_top_*[b * kMaxTopLogprobs] and fills top_n entries of it.
void logprobs_batch_launch(const float* logits /*[B, vocab]*/, int B, int vocab, int top_n,
                           const int32_t* tokens /*[B] device*/, float* out_logprob /*[B] device*/,
                           int32_t* out_top_ids /*[B, kMaxTopLogprobs] device*/,
                           float* out_top_lp /*[B, kMaxTopLogprobs] device*/, cudaStream_t stream);

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

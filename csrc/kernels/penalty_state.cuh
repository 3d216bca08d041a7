// The device-side penalty state the sampler's penalties_launch reads
// (sampling.cuh): which tokens occur in the context, and how often each was
// generated; one row per sequence slot in the batched forward (updated here
// one slot at a time; penalty_slots.cuh updates many slots in one launch).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hx {

// Marks tokens as present in the context (repetition penalty) and, when
// `counts` is given, counts them as generated (presence/frequency penalties).
// Ids outside [0, vocab) are ignored, as the host sampler ignores them.
void penalty_update_launch(const int32_t* tokens /*[n]*/, int n, int32_t* present /*[vocab]*/,
                           int32_t* counts /*[vocab] or nullptr*/, int vocab, cudaStream_t stream);

}  // namespace hx

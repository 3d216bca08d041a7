// The device-side penalty state the sampler's penalties_launch reads
// (sampling.cuh): which tokens occur in the context, and how often each was
// generated; one row per sequence slot in the batched forward.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hx {

// Marks tokens as present in the context (repetition penalty) and, when
// `counts` is given, counts them as generated (presence/frequency penalties).
// Ids outside [0, vocab) are ignored, as the host sampler ignores them.
void penalty_update_launch(const int32_t* tokens /*[n]*/, int n, int32_t* present /*[vocab]*/,
                           int32_t* counts /*[vocab] or nullptr*/, int vocab, cudaStream_t stream);

// The penalty state of each sampled row's slot, copied to per-row buffers:
// present_out[i, :] = present[slots[i], :], counts_out likewise; a slot
// outside [0, n_slots) gives zeros (no penalty state). The slots are read
// from device memory, so a captured graph serves any assignment.
void gather_penalty_rows_launch(const int32_t* present /*[n_slots, vocab]*/, const int32_t* counts /*[n_slots, vocab]*/,
                                const int32_t* slots /*[m] device*/, int m, int vocab, int n_slots,
                                int32_t* present_out /*[m, vocab]*/, int32_t* counts_out /*[m, vocab]*/,
                                cudaStream_t stream);

}  // namespace hx

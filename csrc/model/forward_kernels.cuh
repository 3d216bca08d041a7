// Small glue kernels of the model forward: bias rows after a GEMM, row
// gathers of the batched step, and the device-side penalty state the sampler reads.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace hx {

// y[i, j] += bias[j] for every row i.
void add_bias_rows_launch(float* y /*[n, m]*/, const float* bias /*[m]*/, int n, int m,
                          cudaStream_t stream);

// Marks tokens as present in the context (repetition penalty) and, when
// `counts` is given, counts them as generated (presence/frequency penalties).
// Ids outside [0, vocab) are ignored, as the host sampler ignores them.
void penalty_update_launch(const int32_t* tokens /*[n]*/, int n, int32_t* present /*[vocab]*/,
                           int32_t* counts /*[vocab] or nullptr*/, int vocab, cudaStream_t stream);

// dst[i, :] = src[rows[i], :] for i < m (rows read from device memory).
void gather_rows_launch(const float* src /*[n, h]*/, const int32_t* rows /*[m] device*/, int m, int h,
                        float* dst /*[m, h]*/, cudaStream_t stream);

// The penalty state of each sampled row's slot, copied to per-row buffers:
// present_out[i, :] = present[slots[i], :], counts_out likewise; a slot
// outside [0, n_slots) gives zeros (no penalty state).
void gather_penalty_rows_launch(const int32_t* present /*[n_slots, vocab]*/, const int32_t* counts /*[n_slots, vocab]*/,
                                const int32_t* slots /*[m] device*/, int m, int vocab, int n_slots,
                                int32_t* present_out /*[m, vocab]*/, int32_t* counts_out /*[m, vocab]*/,
                                cudaStream_t stream);

}  // namespace hx

// Small glue kernels of the model forward: bias rows after a GEMM and the
// device-side penalty state the sampler reads.
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

}  // namespace hx

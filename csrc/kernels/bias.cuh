// Bias rows added after a GEMM (the prefill path; the decode matvec adds its
// bias itself).
#pragma once

#include <cuda_runtime.h>

namespace hx {

// y[i, j] += bias[j] for every row i.
void add_bias_rows_launch(float* y /*[n, m]*/, const float* bias /*[m]*/, int n, int m, cudaStream_t stream);

}  // namespace hx

// Mixture-of-experts output: each token's expert outputs, weighted by its
// routing weights, added to the residual stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hx {

// x[t, :] += sum_j weights[t, j] * y[slot(t * top_k + j), :] for t < n, the
// sum taken in j order; slot(p) = pair_slot[p], or p when pair_slot is null
// (y rows in pair order).
void moe_combine_launch(float* x /*[n, h] in/out*/, const float* y /*[n * top_k, h]*/,
                        const float* weights /*[n, top_k]*/, const int32_t* pair_slot /*[n * top_k] or nullptr*/, int n,
                        int top_k, int h, cudaStream_t stream);

}  // namespace hx

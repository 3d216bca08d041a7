// Column sums of a block of rows: the mean pooling of sentence embeddings
// sums each sequence's final hidden rows pass by pass.
#pragma once

#include <cuda_runtime.h>

namespace hx {

// dst[j] = (accumulate ? dst[j] : 0) + sum over i < n of src[i, j], each
// column summed in row order in float32. n == 0 with accumulate off zeroes dst.
void sum_rows_launch(const float* src /*[n, h]*/, int n, int h, float* dst /*[h]*/, bool accumulate,
                     cudaStream_t stream);

}  // namespace hx

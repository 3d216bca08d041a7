// Row gather: dst[i, :] = src[rows[i], :].
//
// Grid (column blocks, rows), 256 threads; each block reads its row index
// once from device memory and copies a grid-stride share of the columns.
// One arch path (sm_80+).
#include "kernels/gather_rows.cuh"

#include "common/check.h"

namespace hx {

static __global__ void gather_rows_kernel(const float* __restrict__ src, const int32_t* __restrict__ rows, int h,
                                          float* __restrict__ dst) {
  const float* s = src + (size_t)rows[blockIdx.y] * h;
  float* d = dst + (size_t)blockIdx.y * h;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < h; j += gridDim.x * blockDim.x) d[j] = s[j];
}

void gather_rows_launch(const float* src, const int32_t* rows, int m, int h, float* dst, cudaStream_t stream) {
  if (m <= 0 || h <= 0) return;
  const int threads = 256;
  const int cols = (h + threads - 1) / threads < 16 ? (h + threads - 1) / threads : 16;
  gather_rows_kernel<<<dim3(cols, m), threads, 0, stream>>>(src, rows, h, dst);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

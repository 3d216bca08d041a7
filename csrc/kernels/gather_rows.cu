// Row gather: dst[i, :] = src[rows[i], :], as float32 or rounded to bf16.
//
// Grid (column blocks, rows), 256 threads; each block reads its row index
// once from device memory and copies a grid-stride share of the columns (the
// bf16 form four columns a thread: one 16-byte load, one 8-byte store).
// One arch path (sm_80+).
#include "kernels/gather_rows.cuh"

#include <cuda_bf16.h>

#include <stdexcept>

#include "common/check.h"
#include "common/launch.cuh"

namespace hx {

static __global__ void gather_rows_bf16_kernel(const float4* __restrict__ src, const int32_t* __restrict__ rows, int h4,
                                               uint2* __restrict__ dst) {
  pdl_begin();
  const float4* s = src + (size_t)rows[blockIdx.y] * h4;
  uint2* d = dst + (size_t)blockIdx.y * h4;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < h4; j += gridDim.x * blockDim.x) {
    const float4 v = s[j];
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    d[j] = make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
  }
}

void gather_rows_bf16_launch(const float* src, const int32_t* rows, int m, int h, __nv_bfloat16* dst,
                             cudaStream_t stream) {
  if (m <= 0 || h <= 0) return;
  if (h % 4 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0 || reinterpret_cast<uintptr_t>(dst) % 8 != 0)
    throw std::invalid_argument("gather_rows_bf16: h must be a multiple of 4, src 16- and dst 8-byte aligned");
  const int threads = 256, h4 = h / 4;
  const int cols = (h4 + threads - 1) / threads < 16 ? (h4 + threads - 1) / threads : 16;
  launch_overlapped(gather_rows_bf16_kernel, dim3(cols, m), dim3(threads), 0, stream,
                    reinterpret_cast<const float4*>(src), rows, h4, reinterpret_cast<uint2*>(dst));
  HX_CUDA_CHECK(cudaGetLastError());
}

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

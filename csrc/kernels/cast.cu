// float32 <-> bf16 casts, elementwise, grid-stride.
//
// Vectorized (4 elements per step) when the pointers allow, scalar
// otherwise. f32 -> bf16 rounds to nearest even like torch's .to(bfloat16);
// bf16 -> f32 is exact. One arch path (sm_80+ baseline).
#include "kernels/cast.cuh"

#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"

namespace hx {
namespace {

__global__ void f32_to_bf16_vec_kernel(const float4* __restrict__ x, __nv_bfloat162* __restrict__ y, int64_t n4) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
    const float4 v = x[i];
    y[2 * i] = __floats2bfloat162_rn(v.x, v.y);
    y[2 * i + 1] = __floats2bfloat162_rn(v.z, v.w);
  }
}

__global__ void f32_to_bf16_kernel(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}

__global__ void bf16_to_f32_vec_kernel(const __nv_bfloat162* __restrict__ x, float4* __restrict__ y, int64_t n4) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
    const float2 a = __bfloat1622float2(x[2 * i]);
    const float2 b = __bfloat1622float2(x[2 * i + 1]);
    y[i] = make_float4(a.x, a.y, b.x, b.y);
  }
}

__global__ void bf16_to_f32_kernel(const __nv_bfloat16* __restrict__ x, float* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = __bfloat162float(x[i]);
}

bool aligned(const void* p, size_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

int grid_for(int64_t work, int threads) {
  const int64_t want = (work + threads - 1) / threads;
  return (int)(want < 16384 ? (want > 0 ? want : 1) : 16384);
}

}  // namespace

void f32_to_bf16_launch(const float* x, __nv_bfloat16* y, int64_t n, cudaStream_t stream) {
  if (n < 0) throw std::invalid_argument("f32_to_bf16: negative n " + std::to_string(n));
  if (n == 0) return;
  const int threads = 256;
  if (n % 4 == 0 && aligned(x, 16) && aligned(y, 8))
    f32_to_bf16_vec_kernel<<<grid_for(n / 4, threads), threads, 0, stream>>>(
        reinterpret_cast<const float4*>(x), reinterpret_cast<__nv_bfloat162*>(y), n / 4);
  else
    f32_to_bf16_kernel<<<grid_for(n, threads), threads, 0, stream>>>(x, y, n);
  HX_CUDA_CHECK(cudaGetLastError());
}

void bf16_to_f32_launch(const __nv_bfloat16* x, float* y, int64_t n, cudaStream_t stream) {
  if (n < 0) throw std::invalid_argument("bf16_to_f32: negative n " + std::to_string(n));
  if (n == 0) return;
  const int threads = 256;
  if (n % 4 == 0 && aligned(x, 8) && aligned(y, 16))
    bf16_to_f32_vec_kernel<<<grid_for(n / 4, threads), threads, 0, stream>>>(reinterpret_cast<const __nv_bfloat162*>(x),
                                                                             reinterpret_cast<float4*>(y), n / 4);
  else
    bf16_to_f32_kernel<<<grid_for(n, threads), threads, 0, stream>>>(x, y, n);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

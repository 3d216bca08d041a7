// KV pool append: kc[h, slot_pos[t], :] = bf16(k[t, h, :]), vc likewise.
//
// Pool layout [nk, cap, d] bf16 per layer (one K and one V buffer), cap =
// blocks * block_size pool positions, so a head's positions within a block
// are contiguous rows for the attention kernels. One thread
// per 4 elements (float4 in, 8 bytes of bf16 out) when d % 4 == 0, else one
// per element. Round-to-nearest-even conversion, as torch's .to(bfloat16).
// Positions outside [0, cap) are dropped, never written out of bounds.
// One arch path (sm_80+ baseline).
#include "common/launch.cuh"
#include "kernels/kv_cache.cuh"

#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"

namespace hx {
namespace {

template <int VEC>
__global__ void kv_append_kernel(const float* __restrict__ k, const float* __restrict__ v,
                                 __nv_bfloat16* __restrict__ kc, __nv_bfloat16* __restrict__ vc,
                                 const int32_t* __restrict__ slot_pos, int n, int nk, int d, int cap) {
  pdl_begin();
  const int groups = d / VEC;
  const int64_t total = (int64_t)n * nk * groups;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int g = (int)(idx % groups);
    const int64_t th = idx / groups;  // t * nk + h
    const int h = (int)(th % nk);
    const int t = (int)(th / nk);
    const int p = slot_pos[t];
    if (p < 0 || p >= cap) continue;
    const size_t src = (size_t)th * d + (size_t)g * VEC;
    const size_t dst = ((size_t)h * cap + p) * d + (size_t)g * VEC;
    if constexpr (VEC == 4) {
      const float4 a = *reinterpret_cast<const float4*>(k + src);
      const float4 b = *reinterpret_cast<const float4*>(v + src);
      __nv_bfloat162* ko = reinterpret_cast<__nv_bfloat162*>(kc + dst);
      __nv_bfloat162* vo = reinterpret_cast<__nv_bfloat162*>(vc + dst);
      ko[0] = __floats2bfloat162_rn(a.x, a.y);
      ko[1] = __floats2bfloat162_rn(a.z, a.w);
      vo[0] = __floats2bfloat162_rn(b.x, b.y);
      vo[1] = __floats2bfloat162_rn(b.z, b.w);
    } else {
      kc[dst] = __float2bfloat16_rn(k[src]);
      vc[dst] = __float2bfloat16_rn(v[src]);
    }
  }
}

bool aligned(const void* p, size_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

}  // namespace

void kv_append_launch(const float* k, const float* v, __nv_bfloat16* kc, __nv_bfloat16* vc,
                      const int32_t* slot_pos, int n, int nk, int d, int cap, cudaStream_t stream) {
  if (n < 0 || nk <= 0 || d <= 0 || cap <= 0)
    throw std::invalid_argument("kv_append: bad sizes n=" + std::to_string(n) + " nk=" + std::to_string(nk) +
                                " d=" + std::to_string(d) + " cap=" + std::to_string(cap));
  if (n == 0) return;
  const bool vec = d % 4 == 0 && aligned(k, 16) && aligned(v, 16) && aligned(kc, 8) && aligned(vc, 8);
  const int threads = 256;
  const int64_t work = (int64_t)n * nk * (vec ? d / 4 : d);
  const int64_t want = (work + threads - 1) / threads;
  const int blocks = (int)(want < 8192 ? want : 8192);
  if (vec)
    launch_overlapped(kv_append_kernel<4>, blocks, threads, 0, stream, k, v, kc, vc, slot_pos, n, nk, d, cap);
  else
    launch_overlapped(kv_append_kernel<1>, blocks, threads, 0, stream, k, v, kc, vc, slot_pos, n, nk, d, cap);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

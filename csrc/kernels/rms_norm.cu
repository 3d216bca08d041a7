// RMS norm kernels.
//
// add_rms_norm: r = residual + delta (stored back), y = r / sqrt(mean(r^2) + eps) * w.
//   One block per row [h]; pass 1 adds, stores r and sums squares, a block
//   reduction gives the scale, pass 2 re-reads r (the thread's own writes,
//   L1/L2 hits) and writes float32 and/or bf16 outputs. float4 accesses when
//   h % 4 == 0 and the pointers allow it, scalar otherwise.
//   Rows up to 8192 wide (float4 path) keep the row in registers instead:
//   one read of the residual, all loads in flight before the reduction; that
//   kernel can also write the output's int8 matvec stage (x_stage.cuh).
// head_rms_norm: one warp per (token, head) row of d values, in place.
// Float32 math everywhere, 1/sqrtf (IEEE) rather than rsqrtf so results
// match a float32 torch reference to rounding. One arch path (sm_80+ baseline).
#include "common/launch.cuh"
#include "kernels/rms_norm.cuh"

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"
#include "kernels/x_stage.cuh"

namespace hx {
namespace {

template <bool VEC>
__global__ void add_rms_norm_kernel(float* __restrict__ residual, const float* __restrict__ delta,
                                    const float* __restrict__ weight, float eps, float* __restrict__ out_f32,
                                    __nv_bfloat16* __restrict__ out_bf16, int h) {
  pdl_begin();
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  float* r = residual + row * h;
  const float* d = delta ? delta + row * h : nullptr;
  float ss = 0.f;
  if constexpr (VEC) {
    const int nv = h >> 2;
    float4* r4 = reinterpret_cast<float4*>(r);
    const float4* d4 = reinterpret_cast<const float4*>(d);
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
      float4 v = r4[i];
      if (d4) {
        const float4 e = d4[i];
        v.x += e.x;
        v.y += e.y;
        v.z += e.z;
        v.w += e.w;
        r4[i] = v;
      }
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  } else {
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
      float v = r[i];
      if (d) {
        v += d[i];
        r[i] = v;
      }
      ss += v * v;
    }
  }
  ss = block_sum(ss, scratch);
  const float inv = 1.0f / sqrtf(ss / (float)h + eps);
  if constexpr (VEC) {
    const int nv = h >> 2;
    const float4* r4 = reinterpret_cast<const float4*>(r);
    const float4* w4 = reinterpret_cast<const float4*>(weight);
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
      const float4 v = r4[i];
      const float4 w = w4[i];
      const float4 y = make_float4(v.x * inv * w.x, v.y * inv * w.y, v.z * inv * w.z, v.w * inv * w.w);
      if (out_f32) reinterpret_cast<float4*>(out_f32 + row * h)[i] = y;
      if (out_bf16) {
        __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(out_bf16 + row * h) + 2 * i;
        o[0] = __floats2bfloat162_rn(y.x, y.y);
        o[1] = __floats2bfloat162_rn(y.z, y.w);
      }
    }
  } else {
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
      const float y = r[i] * inv * weight[i];
      if (out_f32) out_f32[row * h + i] = y;
      if (out_bf16) out_bf16[row * h + i] = __float2bfloat16_rn(y);
    }
  }
}

// Rows of at most NV float4 per thread: the row stays in registers between
// the reduction and the output, every load (residual, delta, weight) is
// issued before the reduction waits, and the residual is read once.
template <int NV>
__global__ void __launch_bounds__(256) add_rms_norm_reg_kernel(
    float* __restrict__ residual, const float* __restrict__ delta, const float* __restrict__ weight, float eps,
    float* __restrict__ out_f32, __nv_bfloat16* __restrict__ out_bf16, int h, uint8_t* __restrict__ x_stage) {
  pdl_begin();
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const int nv = h >> 2;
  float4* r4 = reinterpret_cast<float4*>(residual + row * h);
  const float4* d4 = delta ? reinterpret_cast<const float4*>(delta + row * h) : nullptr;
  const float4* w4 = reinterpret_cast<const float4*>(weight);
  float4 v[NV], w[NV];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    v[j] = i < nv ? r4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    w[j] = i < nv ? __ldg(w4 + i) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (d4) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int i = threadIdx.x + j * blockDim.x;
      if (i < nv) {
        const float4 e = d4[i];
        v[j].x += e.x;
        v[j].y += e.y;
        v[j].z += e.z;
        v[j].w += e.w;
        r4[i] = v[j];
      }
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < NV; ++j) ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
  ss = block_sum(ss, scratch);
  const float inv = 1.0f / sqrtf(ss / (float)h + eps);
  using namespace matvec::dp4a;
  const StageParts st = x_stage ? stage_parts<kStageTerms>(x_stage, (size_t)gridDim.x * h) : StageParts{};
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    if (j * (int)blockDim.x >= nv) break;  // uniform: whole warps stay together for the stage's shuffles
    const int i = threadIdx.x + j * blockDim.x;
    const bool in = i < nv;
    const float4 y =
        make_float4(v[j].x * inv * w[j].x, v[j].y * inv * w[j].y, v[j].z * inv * w[j].z, v[j].w * inv * w[j].w);
    if (in && out_f32) reinterpret_cast<float4*>(out_f32 + row * h)[i] = y;
    if (in && out_bf16) {
      __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(out_bf16 + row * h) + 2 * i;
      o[0] = __floats2bfloat162_rn(y.x, y.y);
      o[1] = __floats2bfloat162_rn(y.z, y.w);
    }
    if (x_stage) {  // h % 32 == 0: lanes 8m .. 8m + 7 hold one 32-block of the row
      float r[4] = {y.x, y.y, y.z, y.w};
      quantize_group<kStageTerms>(WarpShuffle{}, r, row * nv + i, in, st);
    }
  }
}

__global__ void head_rms_norm_kernel(float* __restrict__ x, const float* __restrict__ weight, float eps, int rows,
                                     int d) {
  pdl_begin();
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float* p = x + (size_t)row * d;
  float ss = 0.f;
  for (int i = lane; i < d; i += 32) ss += p[i] * p[i];
  ss = warp_sum(ss);
  const float inv = 1.0f / sqrtf(ss / (float)d + eps);
  for (int i = lane; i < d; i += 32) p[i] = p[i] * inv * weight[i];
}

bool aligned(const void* p, size_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

}  // namespace

void add_rms_norm_launch(float* residual, const float* delta, const float* weight, float eps, float* out_f32,
                         __nv_bfloat16* out_bf16, int n, int h, cudaStream_t stream, uint8_t* x_stage) {
  if (n < 0 || h <= 0)
    throw std::invalid_argument("add_rms_norm: bad sizes n=" + std::to_string(n) + " h=" + std::to_string(h));
  if (x_stage && (h % 32 != 0 || !out_f32 || !aligned(x_stage, 16)))
    throw std::invalid_argument("add_rms_norm: an int8 stage needs h % 32 == 0 (h=" + std::to_string(h) +
                                "), a float32 output and a 16-byte aligned stage");
  if (n == 0) return;
  const bool vec = h % 4 == 0 && aligned(residual, 16) && (!delta || aligned(delta, 16)) && aligned(weight, 16) &&
                   (!out_f32 || aligned(out_f32, 16)) && (!out_bf16 || aligned(out_bf16, 8));
  if (vec && h / 4 <= 8 * 256) {
    // Register path: up to 256 threads (more only add reduction steps), as
    // few float4 per thread as that allows.
    const int nv = h / 4;
    const int per = nv <= 256 ? 1 : (nv <= 512 ? 2 : (nv <= 1024 ? 4 : 8));
    int threads = ((nv + per - 1) / per + 31) / 32 * 32;
    threads = threads < 32 ? 32 : threads;
    auto kernel = per == 1   ? add_rms_norm_reg_kernel<1>
                  : per == 2 ? add_rms_norm_reg_kernel<2>
                  : per == 4 ? add_rms_norm_reg_kernel<4>
                             : add_rms_norm_reg_kernel<8>;
    launch_overlapped(kernel, n, threads, 0, stream, residual, delta, weight, eps, out_f32, out_bf16, h, x_stage);
    HX_CUDA_CHECK(cudaGetLastError());
    return;
  }
  const int work = vec ? h / 4 : h;
  // About four accesses per thread: enough to hide latency, one row per block.
  int threads = ((work + 3) / 4 + 31) / 32 * 32;
  threads = threads < 32 ? 32 : (threads > 1024 ? 1024 : threads);
  if (vec)
    launch_overlapped(add_rms_norm_kernel<true>, n, threads, 0, stream, residual, delta, weight, eps, out_f32, out_bf16,
                      h);
  else
    launch_overlapped(add_rms_norm_kernel<false>, n, threads, 0, stream, residual, delta, weight, eps, out_f32,
                      out_bf16, h);
  HX_CUDA_CHECK(cudaGetLastError());
  // Rows too wide to stay in registers: the stage from the written output.
  if (x_stage) matvec::quantize_x_launch(out_f32, n, h, matvec::dp4a::kStageTerms, x_stage, stream);
}

void head_rms_norm_launch(float* x, const float* weight, float eps, int n, int heads, int d, cudaStream_t stream) {
  if (n < 0 || heads <= 0 || d <= 0)
    throw std::invalid_argument("head_rms_norm: bad sizes n=" + std::to_string(n) + " heads=" + std::to_string(heads) +
                                " d=" + std::to_string(d));
  const int rows = n * heads;
  if (rows == 0) return;
  const int warps = 8;
  launch_overlapped(head_rms_norm_kernel, (rows + warps - 1) / warps, warps * 32, 0, stream, x, weight, eps, rows, d);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

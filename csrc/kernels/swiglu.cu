// SwiGLU: out = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
//
// Elementwise over contiguous [n, f] (or row-strided gate/up for a fused
// gate|up buffer). float4 loads when the pointers and sizes allow, scalar
// otherwise; expf (not the fast intrinsic) so results match torch's float32
// silu to rounding. Writes float32 and/or bf16, and on request the float32
// output's int8 matvec stage (x_stage.cuh). One arch path (sm_80+).
#include "common/launch.cuh"
#include "kernels/swiglu.cuh"

#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"
#include "kernels/x_stage.cuh"

namespace hx {
namespace {

// With x_stage (n4 % 8 == 0), lanes 8m .. 8m + 7 of a warp hold one
// 32-block: the loop runs while any lane of the warp has work (whole warps
// take part in the stage's shuffles).
__global__ void swiglu_vec_kernel(const float4* __restrict__ gate, const float4* __restrict__ up,
                                  float4* __restrict__ out_f32, __nv_bfloat162* __restrict__ out_bf16, int64_t n4,
                                  uint8_t* __restrict__ x_stage) {
  pdl_begin();
  using namespace matvec::dp4a;
  const StageParts st = x_stage ? stage_parts<kStageTerms>(x_stage, (size_t)n4 * 4) : StageParts{};
  const int lane = threadIdx.x & 31;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i - lane < n4;
       i += (int64_t)gridDim.x * blockDim.x) {
    const bool in = i < n4;
    float4 y = make_float4(0.f, 0.f, 0.f, 0.f);
    if (in) {
      const float4 g = gate[i], u = up[i];
      y = make_float4(swiglu_act(g.x, u.x), swiglu_act(g.y, u.y), swiglu_act(g.z, u.z), swiglu_act(g.w, u.w));
      if (out_f32) out_f32[i] = y;
      if (out_bf16) {
        out_bf16[2 * i] = __floats2bfloat162_rn(y.x, y.y);
        out_bf16[2 * i + 1] = __floats2bfloat162_rn(y.z, y.w);
      }
    }
    if (x_stage) {
      float r[4] = {y.x, y.y, y.z, y.w};
      quantize_group<kStageTerms>(WarpShuffle{}, r, (size_t)i, in, st);
    }
  }
}

__global__ void swiglu_rows_kernel(const float* __restrict__ gate, const float* __restrict__ up, int64_t ld,
                                   float* __restrict__ out_f32, __nv_bfloat16* __restrict__ out_bf16, int64_t total,
                                   int64_t f) {
  pdl_begin();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / f;
    const int64_t c = i - r * f;
    const float y = swiglu_act(gate[r * ld + c], up[r * ld + c]);
    if (out_f32) out_f32[i] = y;
    if (out_bf16) out_bf16[i] = __float2bfloat16_rn(y);
  }
}

bool aligned(const void* p, size_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

int grid_for(int64_t work, int threads) {
  const int64_t want = (work + threads - 1) / threads;
  return (int)(want < 16384 ? (want > 0 ? want : 1) : 16384);
}

}  // namespace

void swiglu_rows_launch(const float* gate, const float* up, int64_t ld, float* out_f32, __nv_bfloat16* out_bf16, int n,
                        int f, cudaStream_t stream) {
  if (n < 0 || f <= 0 || ld < f)
    throw std::invalid_argument("swiglu: bad sizes n=" + std::to_string(n) + " f=" + std::to_string(f) +
                                " ld=" + std::to_string(ld));
  const int64_t total = (int64_t)n * f;
  if (total == 0 || (!out_f32 && !out_bf16)) return;
  const int threads = 256;
  if (ld == f && total % 4 == 0 && aligned(gate, 16) && aligned(up, 16) && (!out_f32 || aligned(out_f32, 16)) &&
      (!out_bf16 || aligned(out_bf16, 8))) {
    launch_overlapped(swiglu_vec_kernel, grid_for(total / 4, threads), threads, 0, stream,
                      reinterpret_cast<const float4*>(gate), reinterpret_cast<const float4*>(up),
                      reinterpret_cast<float4*>(out_f32), reinterpret_cast<__nv_bfloat162*>(out_bf16), total / 4,
                      static_cast<uint8_t*>(nullptr));
  } else {
    launch_overlapped(swiglu_rows_kernel, grid_for(total, threads), threads, 0, stream, gate, up, ld, out_f32, out_bf16,
                      total, f);
  }
  HX_CUDA_CHECK(cudaGetLastError());
}

void swiglu_launch(const float* gate, const float* up, float* out_f32, __nv_bfloat16* out_bf16, int64_t n_elems,
                   cudaStream_t stream, uint8_t* x_stage) {
  if (n_elems < 0) throw std::invalid_argument("swiglu: negative n_elems " + std::to_string(n_elems));
  if (x_stage && (n_elems % 32 != 0 || n_elems / 4 > INT32_MAX || !out_f32 || !aligned(x_stage, 16)))
    throw std::invalid_argument("swiglu: an int8 stage needs n_elems % 32 == 0 (n_elems=" + std::to_string(n_elems) +
                                "), a float32 output and a 16-byte aligned stage");
  if (n_elems == 0 || (!out_f32 && !out_bf16)) return;
  const int threads = 256;
  if (n_elems % 4 == 0 && aligned(gate, 16) && aligned(up, 16) && (!out_f32 || aligned(out_f32, 16)) &&
      (!out_bf16 || aligned(out_bf16, 8))) {
    launch_overlapped(swiglu_vec_kernel, grid_for(n_elems / 4, threads), threads, 0, stream,
                      reinterpret_cast<const float4*>(gate), reinterpret_cast<const float4*>(up),
                      reinterpret_cast<float4*>(out_f32), reinterpret_cast<__nv_bfloat162*>(out_bf16), n_elems / 4,
                      x_stage);
  } else {
    // One row of n_elems: the strided kernel with ld == f covers it.
    launch_overlapped(swiglu_rows_kernel, grid_for(n_elems, threads), threads, 0, stream, gate, up, n_elems, out_f32,
                      out_bf16, n_elems, n_elems);
    if (x_stage)
      matvec::quantize_x_launch(out_f32, 1, static_cast<int>(n_elems), matvec::dp4a::kStageTerms, x_stage, stream);
  }
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

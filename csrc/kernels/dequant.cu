// Dequantize stored GGUF rows: out[i, j] = W[i, j] as bf16 or float32.
//
// Quantized types: one thread per pair of units of quant_blocks.cuh (16
// elements, two runs of 8), so half a warp covers one 256-element pass of a
// row; the block decoder reads its fields straight from global memory (L1
// serves the neighbouring reads of one pass) and each run of 8 is stored as
// one 16-byte (bf16) or two 16-byte (float) writes. Values are computed exactly as the
// reference dequantizer does (same products and sums, no FMA contraction),
// then rounded to nearest even for bf16.
// Float types: an element-wise conversion, 4 elements per thread when rows
// allow vector access. One arch path (sm_80+).
#include "kernels/dequant.cuh"

#include <cuda_fp16.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"
#include "kernels/quant_blocks.cuh"

namespace hx {
namespace {

template <typename O>
__device__ __forceinline__ void store4(O* p, const float (&v)[4]) {
  if constexpr (sizeof(O) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    __nv_bfloat162 a = __floats2bfloat162_rn(v[0], v[1]);
    __nv_bfloat162 b = __floats2bfloat162_rn(v[2], v[3]);
    uint2 u;
    u.x = *reinterpret_cast<uint32_t*>(&a);
    u.y = *reinterpret_cast<uint32_t*>(&b);
    *reinterpret_cast<uint2*>(p) = u;
  }
}

// 8 consecutive values: one 16-byte store for bf16, two for float.
template <typename O>
__device__ __forceinline__ void store8(O* p, const float (&v)[8]) {
  if constexpr (sizeof(O) == 4) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint4 u;
    uint32_t* w = reinterpret_cast<uint32_t*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      w[i] = *reinterpret_cast<uint32_t*>(&h);
    }
    *reinterpret_cast<uint4*>(p) = u;
  }
}

// One thread per unit pair (2v, 2v+1) of a pass: the pair shares one block and
// its runs continue each other, so each run of 8 is one contiguous store.
template <GgmlType T, typename O>
__global__ void __launch_bounds__(256) dequant_quant_kernel(const uint8_t* __restrict__ w, O* __restrict__ out,
                                                         int64_t n_items, int npass, int k, size_t row_bytes) {
  using B = quant::Block<T>;
  constexpr int PB = quant::pass_bytes<T>();
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_items; i += stride) {
    const int u = 2 * (int)(i & 15);
    const int64_t rp = i >> 4;
    const int64_t row = rp / npass;
    const int pass = (int)(rp - row * npass);
    const int ebase = pass * 256;
    const int e0 = B::elem0(u);
    if (ebase + e0 >= k) continue;  // a row whose k is not a multiple of 256 ends mid-pass
    const uint8_t* p = w + (size_t)row * row_bytes + (size_t)pass * PB;
    const quant::QUnit q0 = B::unit(p, u), q1 = B::unit(p, u + 1);
    float r0[8], r1[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      r0[j] = quant::unit_value<T>(q0, j);
      r0[j + 4] = quant::unit_value<T>(q1, j);
      r1[j] = quant::unit_value<T>(q0, j + 4);
      r1[j + 4] = quant::unit_value<T>(q1, j + 4);
    }
    O* o = out + (size_t)row * k + ebase;
    store8(o + e0, r0);
    store8(o + B::elem1(u), r1);
  }
}

template <GgmlType T>
__device__ __forceinline__ float float_at(const uint8_t* w, size_t i) {
  if constexpr (T == GgmlType::F32) {
    return reinterpret_cast<const float*>(w)[i];
  } else {
    const uint32_t h = reinterpret_cast<const uint16_t*>(w)[i];
    if constexpr (T == GgmlType::F16)
      return quant::half_float(h);
    else
      return quant::bits_float(h << 16);
  }
}

template <typename O>
__device__ __forceinline__ O from_float(float v) {
  if constexpr (sizeof(O) == 4)
    return v;
  else
    return __float2bfloat16_rn(v);
}

// Element-wise; with vec4 every thread converts 4 consecutive elements (n % 4 == 0, aligned).
template <GgmlType T, typename O, bool VEC4>
__global__ void __launch_bounds__(256) dequant_float_kernel(const uint8_t* __restrict__ w, O* __restrict__ out,
                                                         int64_t n) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  if constexpr (VEC4) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n / 4; i += stride) {
      float v[4];
      if constexpr (T == GgmlType::F32) {
        const float4 f = reinterpret_cast<const float4*>(w)[i];
        v[0] = f.x;
        v[1] = f.y;
        v[2] = f.z;
        v[3] = f.w;
      } else {
        const uint2 h = reinterpret_cast<const uint2*>(w)[i];
        const uint32_t hv[4] = {h.x & 0xffff, h.x >> 16, h.y & 0xffff, h.y >> 16};
#pragma unroll
        for (int j = 0; j < 4; ++j)
          v[j] = T == GgmlType::F16 ? quant::half_float(hv[j]) : quant::bits_float(hv[j] << 16);
      }
      store4(out + 4 * i, v);
    }
  } else {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
      out[i] = from_float<O>(float_at<T>(w, (size_t)i));
  }
}

int grid_for(int64_t items, int threads) {
  const int sms = device_sm_count(current_device());
  const int64_t want = (items + threads - 1) / threads;
  return (int)std::max<int64_t>(1, std::min<int64_t>(want, (int64_t)sms * 16));
}

template <GgmlType T, typename O>
void launch_quant(const void* w, O* out, int64_t n_out, int64_t k, cudaStream_t stream) {
  const int npass = (int)((k + 255) / 256);
  const int64_t n_items = n_out * npass * 16;
  constexpr int kThreads = 256;
  dequant_quant_kernel<T, O><<<grid_for(n_items, kThreads), kThreads, 0, stream>>>(
      static_cast<const uint8_t*>(w), out, n_items, npass, (int)k, row_bytes(T, k));
  HX_CUDA_CHECK(cudaGetLastError());
}

template <GgmlType T, typename O>
void launch_float(const void* w, O* out, int64_t n_out, int64_t k, cudaStream_t stream) {
  const int64_t n = n_out * k;
  constexpr int kThreads = 256;
  const uintptr_t wa = reinterpret_cast<uintptr_t>(w), oa = reinterpret_cast<uintptr_t>(out);
  const bool vec = n % 4 == 0 && wa % (4 * block_bytes(T)) == 0 && oa % (4 * sizeof(O)) == 0;
  if (vec)
    dequant_float_kernel<T, O, true>
        <<<grid_for(n / 4, kThreads), kThreads, 0, stream>>>(static_cast<const uint8_t*>(w), out, n);
  else
    dequant_float_kernel<T, O, false>
        <<<grid_for(n, kThreads), kThreads, 0, stream>>>(static_cast<const uint8_t*>(w), out, n);
  HX_CUDA_CHECK(cudaGetLastError());
}

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("dequantize: " + what); }

template <typename O>
void dispatch(GgmlType type, const void* w, O* out, int64_t n_out, int64_t k, cudaStream_t stream) {
  if (!is_supported(type)) bad("unsupported GGML type id " + std::to_string(static_cast<int>(type)));
  if (n_out < 0 || k < 0) bad("negative size");
  if (n_out == 0 || k == 0) return;
  if (!w || !out) bad("null pointer");
  if (k > INT32_MAX) bad("k too large");
  const int qk = block_elems(type);
  if (k % qk != 0)
    bad(std::string("k=") + std::to_string(k) + " is not a multiple of the " + type_name(type) + " block size " +
        std::to_string(qk));
  if (!is_float_type(type)) {
    if (reinterpret_cast<uintptr_t>(w) % 16 != 0) bad("quantized weights must be 16-byte aligned");
    if (reinterpret_cast<uintptr_t>(out) % 16 != 0) bad("out must be 16-byte aligned");
  }
#define HX_CASE(T)                                            \
  case GgmlType::T:                                           \
    if constexpr (is_float_type(GgmlType::T))                 \
      launch_float<GgmlType::T, O>(w, out, n_out, k, stream); \
    else                                                      \
      launch_quant<GgmlType::T, O>(w, out, n_out, k, stream); \
    return;
  switch (type) { HX_FOR_EACH_GGML_TYPE(HX_CASE) }
#undef HX_CASE
  bad("unsupported GGML type");
}

}  // namespace

void dequantize_launch(GgmlType type, const void* w, __nv_bfloat16* out, int64_t n_out, int64_t k,
                       cudaStream_t stream) {
  dispatch(type, w, out, n_out, k, stream);
}

void dequantize_f32_launch(GgmlType type, const void* w, float* out, int64_t n_out, int64_t k, cudaStream_t stream) {
  dispatch(type, w, out, n_out, k, stream);
}

}  // namespace hx

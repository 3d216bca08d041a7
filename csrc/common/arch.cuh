// Architecture feature macros and warp-level primitives shared by the kernels.
//
// Feature macros are defined here once, from __CUDA_ARCH__, so kernel files
// test capabilities (`#if HX_HAS_BF16_MMA`) instead of scattering SM numbers.
// They are only defined in the device compilation pass; host code that must
// pick a path asks the device at run time (hx::device_sm()).
//   HX_HAS_BF16_MMA  sm_80+: mma.sync m16n8k16 with bf16 inputs, ldmatrix
//   HX_HAS_CP_ASYNC  sm_80+: cp.async global->shared copies
//   HX_HAS_PDL       sm_90+: griddepcontrol (programmatic dependent launch, launch.cuh)
//   HX_HOPPER        sm_90+
//   HX_BLACKWELL     sm_100+
// The package builds only sm_80 and newer; the sm_80 paths are the baseline
// every kernel has, newer macros only select faster variants.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
#define HX_HAS_BF16_MMA 1
#define HX_HAS_CP_ASYNC 1
#endif
#if __CUDA_ARCH__ >= 900
#define HX_HOPPER 1
#define HX_HAS_PDL 1
#endif
#if __CUDA_ARCH__ >= 1000
#define HX_BLACKWELL 1
#endif
#endif

#ifndef HX_HAS_BF16_MMA
#define HX_HAS_BF16_MMA 0
#endif
#ifndef HX_HAS_CP_ASYNC
#define HX_HAS_CP_ASYNC 0
#endif
#ifndef HX_HAS_PDL
#define HX_HAS_PDL 0
#endif
#ifndef HX_HOPPER
#define HX_HOPPER 0
#endif
#ifndef HX_BLACKWELL
#define HX_BLACKWELL 0
#endif

namespace hx {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Sum / max over groups of `width` consecutive lanes (width a power of two
// <= 32); every lane of a group receives the result.
template <int width = 32>
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <int width = 32>
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = width / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block-wide sum for blockDim.x a multiple of 32 (<= 1024); `scratch` holds
// 32 floats of shared memory. Every thread receives the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

namespace detail {
// Attribute queries are driver calls; launchers ask on every call, so the
// answers are cached per device (0 = not asked yet). Races only repeat the query.
constexpr int kMaxDevices = 64;
inline int cached_attribute(std::atomic<int>* cache, int device, cudaDeviceAttr attr) {
  if (device < 0 || device >= kMaxDevices) {
    int v = 0;
    return cudaDeviceGetAttribute(&v, attr, device) == cudaSuccess ? v : 0;
  }
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0 && cudaDeviceGetAttribute(&v, attr, device) == cudaSuccess)
    cache[device].store(v, std::memory_order_relaxed);
  return v;
}
}  // namespace detail

// Block-wide max, same contract as block_sum.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

// The current device (the calling thread's), as the launchers see it.
inline int current_device() {
  int d = 0;
  return cudaGetDevice(&d) == cudaSuccess ? d : 0;
}

// SM version of the device as major * 10 + minor (e.g. 90).
inline int device_sm(int device) {
  static std::atomic<int> major[detail::kMaxDevices];
  static std::atomic<int> minor[detail::kMaxDevices];
  const int ma = detail::cached_attribute(major, device, cudaDevAttrComputeCapabilityMajor);
  // Minor 0 is a valid answer: cache minor + 1.
  int mi = 0;
  if (device >= 0 && device < detail::kMaxDevices) {
    mi = minor[device].load(std::memory_order_relaxed);
    if (mi == 0) {
      int v = 0;
      if (cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess) {
        mi = v + 1;
        minor[device].store(mi, std::memory_order_relaxed);
      }
    }
    mi = mi > 0 ? mi - 1 : 0;
  }
  return ma * 10 + mi;
}

// Number of SMs of the device.
inline int device_sm_count(int device) {
  static std::atomic<int> cache[detail::kMaxDevices];
  const int v = detail::cached_attribute(cache, device, cudaDevAttrMultiProcessorCount);
  return v > 0 ? v : 1;
}

}  // namespace hx

// Helpers shared by the torch-op files (ops.cpp, ops_quant.cpp, ops_moe.cpp):
// tensor checks that raise Python errors, the current stream, and launching
// a kernel with its argument errors turned into Python exceptions.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <cstdint>
#include <stdexcept>

#include "bindings/op_check.h"

namespace hx {
namespace op {

// Defined, a CUDA tensor on dev, of dtype, contiguous.
inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& dev) {
  HX_OP_CHECK(t.defined(), name, " is undefined");
  HX_OP_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  HX_OP_CHECK(t.device() == dev, name, " is on ", t.device(), ", expected ", dev);
  HX_OP_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  HX_OP_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The CUDA device of t, checked before any guard is built on it.
inline at::Device cuda_device(const at::Tensor& t, const char* name) {
  HX_OP_CHECK(t.defined() && t.is_cuda(), name, " must be a CUDA tensor");
  return t.device();
}

inline cudaStream_t stream_of(const at::Device& dev) { return c10::cuda::getCurrentCUDAStream(dev.index()).stream(); }
inline cudaStream_t stream_of(const at::Tensor& t) { return stream_of(t.device()); }

// v as an int in [lo, INT32_MAX].
inline int as_int(int64_t v, const char* name, int64_t lo = 0) {
  HX_OP_CHECK(v >= lo && v <= INT32_MAX, name, " out of range: ", v);
  return static_cast<int>(v);
}

// Runs a launcher, turning its argument errors into Python exceptions (c10::Error).
template <typename F>
void launch(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    HX_OP_CHECK(false, e.what());
  }
}

}  // namespace op
}  // namespace hx

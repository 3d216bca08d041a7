// Dequantization of stored GGUF rows to bf16 (prefill: then cuBLAS GEMM) or
// float32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/ggml_types.h"

namespace hx {

// out[i, j] = W[i, j] for i < n_out, j < k, rounded to bf16 (round to nearest
// even) from the exact float32 value the reference dequantizer computes.
// k must be a multiple of the type's block size; for quantized types w and out
// must be 16-byte aligned. Throws std::invalid_argument on bad
// arguments, hx::CudaError if the launch fails.
void dequantize_launch(GgmlType type, const void* w /*[n_out, k] stored rows*/, __nv_bfloat16* out /*[n_out, k]*/,
                       int64_t n_out, int64_t k, cudaStream_t stream);

// Same, float32 out (bit-exact with the reference dequantizer); out 16-byte aligned.
void dequantize_f32_launch(GgmlType type, const void* w /*[n_out, k] stored rows*/, float* out /*[n_out, k]*/,
                           int64_t n_out, int64_t k, cudaStream_t stream);

}  // namespace hx

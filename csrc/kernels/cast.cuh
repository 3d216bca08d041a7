// Elementwise casts between float32 and bf16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace hx {

// y = bf16(x), round to nearest even (NaN stays NaN).
void f32_to_bf16_launch(const float* x /*[n]*/, __nv_bfloat16* y /*[n]*/, int64_t n, cudaStream_t stream);

// y = float(x), exact.
void bf16_to_f32_launch(const __nv_bfloat16* x /*[n]*/, float* y /*[n]*/, int64_t n, cudaStream_t stream);

}  // namespace hx

// Gathering rows of a float matrix by indices in device memory (the batched
// step's last row of each sequence, before the LM head).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace hx {

// dst[i, :] = src[rows[i], :] for i < m. The indices are read on the device,
// so a captured graph serves any of them.
void gather_rows_launch(const float* src /*[n, h]*/, const int32_t* rows /*[m] device*/, int m, int h,
                        float* dst /*[m, h]*/, cudaStream_t stream);

// The same rows rounded to bf16 (round to nearest even, as f32_to_bf16_launch):
// one pass instead of a gather and a cast. h a multiple of 4, src 16-byte and
// dst 8-byte aligned; throws std::invalid_argument otherwise.
void gather_rows_bf16_launch(const float* src /*[n, h]*/, const int32_t* rows /*[m] device*/, int m, int h,
                             __nv_bfloat16* dst /*[m, h]*/, cudaStream_t stream);

}  // namespace hx

// SwiGLU activation of the llama MLP.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace hx {

// silu(g) * u, the one formula of every SwiGLU here (this kernel and the
// expert products that fuse it), so fused and separate paths give the same bits.
__host__ __device__ __forceinline__ float swiglu_act(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// out = silu(gate) * up = gate / (1 + exp(-gate)) * up, elementwise, float32
// math; written as float32 and/or bf16 (either output may be nullptr). For
// [n, f] rows pass n_elems = n * f (rows are contiguous).
// x_stage (or nullptr): also the float32 output's int8 matvec stage, as
// add_rms_norm_launch writes it (rms_norm.cuh); needs n_elems % 32 == 0
// (f % 32 == 0 for [n, f] rows) and out_f32.
void swiglu_launch(const float* gate /*[n, f]*/, const float* up /*[n, f]*/, float* out_f32 /*[n, f] or nullptr*/,
                   __nv_bfloat16* out_bf16 /*[n, f] or nullptr*/, int64_t n_elems, cudaStream_t stream,
                   uint8_t* x_stage = nullptr);

// Strided variant for a fused gate|up buffer: gate row i at gate + i * ld,
// up row i at up + i * ld, output rows packed [n, f].
void swiglu_rows_launch(const float* gate /*[n, ld]*/, const float* up /*[n, ld]*/, int64_t ld,
                        float* out_f32 /*[n, f] or nullptr*/, __nv_bfloat16* out_bf16 /*[n, f] or nullptr*/, int n,
                        int f, cudaStream_t stream);

}  // namespace hx

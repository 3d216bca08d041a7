// RMS norms: the fused residual add + norm of every layer, and the per-head
// q/k norm of qwen3.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace hx {

// residual += delta (when delta is given); then, per row,
// out = residual * rsqrt(mean(residual^2) + eps) * weight, written as float32
// and/or bf16 (either output may be nullptr). Float32 math throughout.
//
// x_stage (or nullptr): also the output's int8 matvec stage (x_stage.cuh,
// two terms; matvec_x_scratch_bytes(n, h) bytes, 16-byte aligned), the bits
// quantize_x_launch would write from the float32 output, so an int8 matvec
// of this output needs no quantize launch (MatvecOptions::x_staged). Needs
// h % 32 == 0 and out_f32.
void add_rms_norm_launch(float* residual /*[n, h] in/out*/, const float* delta /*[n, h] or nullptr*/,
                         const float* weight /*[h]*/, float eps, float* out_f32 /*[n, h] or nullptr*/,
                         __nv_bfloat16* out_bf16 /*[n, h] or nullptr*/, int n, int h, cudaStream_t stream,
                         uint8_t* x_stage = nullptr);

// In place, per (token, head) row of d values: x = x * rsqrt(mean(x^2) + eps) * weight.
void head_rms_norm_launch(float* x /*[n, heads, d] in place*/, const float* weight /*[d]*/, float eps, int n, int heads,
                          int d, cudaStream_t stream);

}  // namespace hx

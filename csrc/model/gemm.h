// Prefill GEMMs through cuBLAS. This pair is the only place the model calls
// cuBLAS, so the library choice (GemmEx vs Lt) stays local.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

struct cublasContext;
typedef struct cublasContext* cublasHandle_t;

namespace hx {

// y = x w^T (accumulate: y += x w^T), row-major, bf16 inputs, float32 output
// and accumulation on tensor cores. Rows of y are ldy floats apart (0: m),
// so a product can fill a column range of a wider matrix.
void gemm_bf16_xwT(cublasHandle_t handle, const __nv_bfloat16* x /*[n, k]*/, const __nv_bfloat16* w /*[m, k]*/,
                   float* y /*[n, ldy]*/, int n, int m, int k, bool accumulate, cudaStream_t stream, int ldy = 0);

// y = x w^T in float32 throughout (no TF32): small products whose result
// decides something discrete, such as a mixture-of-experts router's logits,
// which pick the experts and must match the float32 reference.
void gemm_f32_xwT(cublasHandle_t handle, const float* x /*[n, k]*/, const float* w /*[m, k]*/, float* y /*[n, m]*/,
                  int n, int m, int k, cudaStream_t stream);

}  // namespace hx

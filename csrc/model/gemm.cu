// Row-major y[n, m] = x[n, k] w[m, k]^T with cublasGemmEx.
//
// cuBLAS is column-major: a row-major [r, c] matrix is a column-major [c, r]
// one. So y^T (m x n, ld m) = op(W) X^T where W seen column-major is [k, m]
// (op = T) and X seen column-major is [k, n] (op = N). bf16 A/B with a
// float32 C is one of GemmEx's tensor-core combinations; with beta = 1 the
// product lands directly on the float32 residual stream.
#include "model/gemm.h"

#include <cublas_v2.h>

#include "common/check.h"

namespace hx {

namespace {

// cublasSetStream also drops the workspace the worker bound to the handle
// (falling back to cuBLAS's own pool, which allocates inside every graph
// capture), so the stream is only set when it changes.
void use_stream(cublasHandle_t handle, cudaStream_t stream) {
  cudaStream_t current = nullptr;
  HX_CUBLAS_CHECK(cublasGetStream(handle, &current));
  if (current != stream) HX_CUBLAS_CHECK(cublasSetStream(handle, stream));
}

}  // namespace

void gemm_bf16_xwT(cublasHandle_t handle, const __nv_bfloat16* x, const __nv_bfloat16* w, float* y, int n, int m, int k,
                   bool accumulate, cudaStream_t stream, int ldy) {
  if (n == 0 || m == 0) return;
  const float alpha = 1.0f;
  const float beta = accumulate ? 1.0f : 0.0f;
  use_stream(handle, stream);
  HX_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, w, CUDA_R_16BF, k, x, CUDA_R_16BF, k,
                               &beta, y, CUDA_R_32F, ldy > 0 ? ldy : m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void gemm_f32_xwT(cublasHandle_t handle, const float* x, const float* w, float* y, int n, int m, int k,
                  cudaStream_t stream) {
  if (n == 0 || m == 0) return;
  const float alpha = 1.0f, beta = 0.0f;
  use_stream(handle, stream);
  HX_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, w, CUDA_R_32F, k, x, CUDA_R_32F, k,
                               &beta, y, CUDA_R_32F, m, CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
}

}  // namespace hx

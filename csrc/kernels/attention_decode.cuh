// Attention of one new query token over the bf16 KV cache (decode).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace hx {

// Bytes of float workspace attention_decode_launch needs for these sizes.
size_t attention_decode_workspace_bytes(int nq, int d, int cap);

// out[h] = softmax(scale * q[h] . K[g(h), t]) over t < seq_len, times V,
// with g(h) = h / (nq / nk) (GQA: consecutive q heads share a kv head).
// seq_len is read from device memory (clamped to [0, cap]; 0 writes zeros),
// and the grid depends only on the sizes and cap, so a captured CUDA graph
// stays valid as seq_len grows. head_dim: any multiple of 8 up to 256.
// kc / vc must be 16-byte aligned. Throws std::invalid_argument on bad sizes
// or a too-small workspace.
void attention_decode_launch(const float* q /*[nq, d]*/, const __nv_bfloat16* kc /*[nk, cap, d]*/,
                             const __nv_bfloat16* vc /*[nk, cap, d]*/,
                             const int32_t* seq_len /*[1] device: valid positions incl. current*/,
                             float* out /*[nq, d]*/, float* workspace, size_t workspace_bytes, int nq, int nk,
                             int d, int cap, float scale, cudaStream_t stream);

}  // namespace hx

// Attention of one new query token per sequence over the paged bf16 KV pool (decode).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace hx {

// Bytes of float workspace attention_decode_launch needs for these sizes on
// the current device (max_seq = max_blocks * block_size of the launch).
size_t attention_decode_workspace_bytes(int batch, int nq, int nk, int d, int max_seq);

// For each sequence b < batch and q head h:
//   out[b, h] = softmax(scale * q[b, h] . K[g(h), row_b(t)]) over t < seq_lens[b], times V,
// with g(h) = h / (nq / nk) (GQA: consecutive q heads share a kv head) and
// row_b(t) = block_tables[b, t / block_size] * block_size + t % block_size,
// the pool position of the sequence's position t. seq_lens is read from
// device memory (clamped to [0, max_blocks * block_size]; 0 writes zeros),
// table entries outside [0, cap / block_size) read block 0, and the grid
// depends only on the sizes, so a captured CUDA graph stays valid as the
// lengths and tables change. block_size: a power of two >= 16 dividing cap.
// head_dim: any multiple of 8 up to 256. kc / vc must be 16-byte aligned.
// x_stage (or nullptr): also out's int8 matvec stage, as add_rms_norm_launch
// writes it (rms_norm.cuh); needs d % 32 == 0.
// Throws std::invalid_argument on bad sizes or a too-small workspace.
void attention_decode_launch(const float* q /*[batch, nq, d]*/, const __nv_bfloat16* kc /*[nk, cap, d]*/,
                             const __nv_bfloat16* vc /*[nk, cap, d]*/,
                             const int32_t* seq_lens /*[batch] device: valid positions incl. current*/,
                             const int32_t* block_tables /*[batch, max_blocks] device*/, int max_blocks, int block_size,
                             float* out /*[batch, nq, d]*/, float* workspace, size_t workspace_bytes, int batch, int nq,
                             int nk, int d, int cap, float scale, cudaStream_t stream, uint8_t* x_stage = nullptr);

}  // namespace hx

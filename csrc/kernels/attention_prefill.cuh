// Causal attention of one sequence's n new tokens over the paged bf16 KV pool (prefill).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace hx {

// Query i (0 <= i < n) sits at position start_pos + i and attends to the
// sequence's positions 0 .. start_pos + i; position t lives at pool row
// block_table[t / block_size] * block_size + t % block_size, and the pool
// already holds the n new keys and values. q heads kvh*G .. kvh*G+G-1
// (G = nq / nk) read kv head kvh. head_dim 64 and 128 run on tensor cores
// (bf16 mma, float32 accumulation; q and the softmax weights are rounded to
// bf16 as flash attention does); any other head_dim that is even and at most
// 256 runs a scalar float32 kernel. block_size: a power of two >= 16 dividing
// cap. Requires start_pos + n <= max_blocks * block_size (the table's
// coverage). Throws std::invalid_argument on bad sizes.
void attention_prefill_launch(const float* q /*[n, nq, d]*/, const __nv_bfloat16* kc /*[nk, cap, d]*/,
                              const __nv_bfloat16* vc /*[nk, cap, d]*/,
                              const int32_t* block_table /*[max_blocks] device*/, int max_blocks, int block_size,
                              int start_pos, int n, float* out /*[n, nq, d]*/, int nq, int nk, int d, int cap,
                              float scale, cudaStream_t stream);

// The scalar float32 kernel for every head_dim (even, <= 256); tests use it
// as a second implementation, the forward only through attention_prefill_launch.
void attention_prefill_scalar_launch(const float* q /*[n, nq, d]*/, const __nv_bfloat16* kc /*[nk, cap, d]*/,
                                     const __nv_bfloat16* vc /*[nk, cap, d]*/,
                                     const int32_t* block_table /*[max_blocks] device*/, int max_blocks,
                                     int block_size, int start_pos, int n, float* out /*[n, nq, d]*/, int nq, int nk,
                                     int d, int cap, float scale, cudaStream_t stream);

}  // namespace hx

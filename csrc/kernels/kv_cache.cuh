// Appending new keys and values to the bf16 KV pool of one layer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace hx {

// kc[h, slot_pos[t], :] = bf16(k[t, h, :]) and likewise for v, for every
// token t and kv head h; slot_pos is the token's pool position (its logical
// position mapped through its sequence's block table). A slot position
// outside [0, cap) is skipped (nothing is written).
void kv_append_launch(const float* k /*[n, nk, d]*/, const float* v /*[n, nk, d]*/,
                      __nv_bfloat16* kc /*[nk, cap, d]*/, __nv_bfloat16* vc /*[nk, cap, d]*/,
                      const int32_t* slot_pos /*[n] device*/, int n, int nk, int d, int cap, cudaStream_t stream);

}  // namespace hx

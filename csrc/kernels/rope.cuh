// Rotary position embedding of q and k, in place.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/rope_style.h"

namespace hx {

// For every token t, head and pair i < d/2, with angle a = pos[t] * inv_freq[i]:
//   RopeStyle::Half (HF rotate_half): pair (x[i], x[i + d/2]);
//   RopeStyle::Pairs (GGML normal mode): pair (x[2i], x[2i + 1]);
//   (x0, x1) -> (x0 cos a - x1 sin a, x1 cos a + x0 sin a).
// inv_freq already holds any scaling. Angles and cos/sin are computed in
// float64 (as the CPU reference does), the rotation in float32. k may be
// nullptr with nk = 0. d must be even.
void rope_launch(float* q /*[n, nq, d]*/, float* k /*[n, nk, d]*/, const int32_t* pos /*[n] device*/,
                 const float* inv_freq /*[d/2]*/, int n, int nq, int nk, int d, RopeStyle style,
                 cudaStream_t stream);

// Same, with the frequency table in float64: no rounding of the frequencies,
// so angles at large positions match the float64 reference to the last bit.
void rope_launch(float* q /*[n, nq, d]*/, float* k /*[n, nk, d]*/, const int32_t* pos /*[n] device*/,
                 const double* inv_freq /*[d/2]*/, int n, int nq, int nk, int d, RopeStyle style,
                 cudaStream_t stream);

// table[p, i] = (cos, sin)(p * inv_freq[i]) for p < len, float64 angle and
// sincos rounded once to float32 (the values rope_launch's float64 path uses).
void rope_table_launch(const double* inv_freq /*[d/2]*/, float* table /*[len, d/2, 2]*/, int len, int d,
                       cudaStream_t stream);

// The decode/prefill attention input step in one launch, per token t:
//   q, k rows: optional per-head rms norm (q_norm/k_norm both given or both
//   nullptr, as head_rms_norm_launch), then the rotation of rope_launch with
//   cos/sin from `table` (positions outside [0, table_len) fall back to the
//   float64 sincos of inv_freq) at the logical position pos[t]; q and k are
//   rewritten in place;
//   kc[h, slot_pos[t], :] = bf16(rotated k[t, h, :]), vc likewise from v: the
//   pool position the host mapped pos[t] to through the sequence's block
//   table; slot positions outside [0, cap) skipped, as kv_append_launch.
void rope_kv_append_launch(float* q /*[n, nq, d]*/, float* k /*[n, nk, d]*/, const float* v /*[n, nk, d]*/,
                           __nv_bfloat16* kc /*[nk, cap, d]*/, __nv_bfloat16* vc /*[nk, cap, d]*/,
                           const int32_t* pos /*[n] device*/, const int32_t* slot_pos /*[n] device*/,
                           const float* table /*[table_len, d/2, 2] or nullptr*/,
                           int table_len, const double* inv_freq /*[d/2]*/, const float* q_norm /*[d] or nullptr*/,
                           const float* k_norm /*[d] or nullptr*/, float eps, int n, int nq, int nk, int d, int cap,
                           RopeStyle style, cudaStream_t stream);

}  // namespace hx

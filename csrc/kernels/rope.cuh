// Rotary position embedding of q and k, in place.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hx {

// For every token t, head and pair i < d/2, with angle a = pos[t] * inv_freq[i]:
//   style 0 ("half", HF rotate_half): pair (x[i], x[i + d/2]);
//   style 1 ("pairs", GGML normal mode): pair (x[2i], x[2i + 1]);
//   (x0, x1) -> (x0 cos a - x1 sin a, x1 cos a + x0 sin a).
// inv_freq already holds any scaling. Angles and cos/sin are computed in
// float64 (as the CPU reference does), the rotation in float32. k may be
// nullptr with nk = 0. d must be even.
void rope_launch(float* q /*[n, nq, d]*/, float* k /*[n, nk, d]*/, const int32_t* pos /*[n] device*/,
                 const float* inv_freq /*[d/2]*/, int n, int nq, int nk, int d, int style,
                 cudaStream_t stream);

// Same, with the frequency table in float64: no rounding of the frequencies,
// so angles at large positions match the float64 reference to the last bit.
void rope_launch(float* q /*[n, nq, d]*/, float* k /*[n, nk, d]*/, const int32_t* pos /*[n] device*/,
                 const double* inv_freq /*[d/2]*/, int n, int nq, int nk, int d, int style,
                 cudaStream_t stream);

}  // namespace hx

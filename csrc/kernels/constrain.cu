// Masks and logit_bias over logits rows (see constrain.cuh).
//
// Grid (vocabulary chunks of kChunk, B), 256 threads. Each block first
// writes its chunk: x cleaned of NaN, or -inf where the mask bit is clear
// (the 32 lanes of a warp read one mask word). Then, after a barrier, its
// threads walk the row's bias list in parallel and rewrite the ids that fall
// in the chunk and are allowed as clean(x) + value; ids are distinct, so no
// two threads write one element. A masked id keeps -inf whatever its bias,
// which is what adding first and masking after gives. Rows without a bias
// list skip the second phase. One arch path (sm_80+).
#include "kernels/constrain.cuh"

#include <climits>

#include "common/check.h"

namespace hx {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = kThreads * 8;

__device__ __forceinline__ float clean(float x) { return isnan(x) ? -INFINITY : x; }

__device__ __forceinline__ bool allowed(const uint32_t* mask, int t) {
  return mask == nullptr || ((mask[t >> 5] >> (t & 31)) & 1u) != 0u;
}

// logits / out are not __restrict__: out may alias logits (the bias phase
// then reads the cleaned value, which is the same clean(x)).
__global__ void __launch_bounds__(kThreads) constrain_batch_kernel(const float* logits, float* out, int vocab,
                                                                const int32_t* __restrict__ rows,
                                                                const int32_t* __restrict__ data) {
  const int b = blockIdx.y;
  const size_t row = (size_t)b * vocab;
  const int mask_off = rows[kConstrainDescInts * b];
  const int bias_off = rows[kConstrainDescInts * b + 1];
  const int bias_n = rows[kConstrainDescInts * b + 2];
  const uint32_t* mask = mask_off >= 0 ? reinterpret_cast<const uint32_t*>(data + mask_off) : nullptr;
  const int c0 = blockIdx.x * kChunk;
  const int c1 = min(vocab, c0 + kChunk);
  for (int t = c0 + threadIdx.x; t < c1; t += kThreads)
    out[row + t] = allowed(mask, t) ? clean(logits[row + t]) : -INFINITY;
  if (bias_n <= 0) return;  // the same for every thread of the block
  __syncthreads();
  const int32_t* ids = data + bias_off;
  const int32_t* vals = ids + bias_n;
  for (int j = threadIdx.x; j < bias_n; j += kThreads) {
    const int t = ids[j];
    if (t < c0 || t >= c1 || !allowed(mask, t)) continue;
    out[row + t] = __fadd_rn(clean(logits[row + t]), __int_as_float(vals[j]));
  }
}

}  // namespace

void constrain_batch_launch(const float* logits, float* out, int B, int vocab, const int32_t* rows, const int32_t* data,
                            cudaStream_t stream) {
  if (B <= 0 || vocab <= 0) return;
  if (B > 65535) throw std::invalid_argument("constrain_batch_launch: at most 65535 rows");
  const int chunks = (vocab + kChunk - 1) / kChunk;
  constrain_batch_kernel<<<dim3(chunks, B), kThreads, 0, stream>>>(logits, out, vocab, rows, data);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

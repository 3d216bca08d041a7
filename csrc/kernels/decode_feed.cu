// The feed between the decode steps of one job (decode_feed.cuh): one thread
// per row. Launched in stream order after the step's sampler, so it reads
// the sampled tokens once they are written. One arch path (sm_80+).
#include "kernels/decode_feed.cuh"

#include "common/check.h"

namespace hx {

static __global__ void decode_feed_kernel(DecodeFeed feed, const int32_t* __restrict__ sampled,
                                          int32_t* __restrict__ record, int rows, bool advance) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r < rows) decode_feed_row(feed, r, sampled[r], record, advance);
}

void decode_feed_launch(const DecodeFeed& feed, const int32_t* sampled, int32_t* record, int rows, bool advance,
                        cudaStream_t stream) {
  if (rows <= 0) return;
  const int threads = 128;
  decode_feed_kernel<<<(rows + threads - 1) / threads, threads, 0, stream>>>(feed, sampled, record, rows, advance);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

// One-shot all-reduce over peer memory: x = sum over ranks r of x_r, in place.
//
// Grid: kPeerBlocks CTAs of kPeerThreads threads, the same on every rank.
// CTA b owns the float4 units b * T + t, b * T + t + G * T, ... (and the
// scalar tail likewise), so it handles the same elements on every rank and
// needs only its own synchronisation slot. Per call, CTA b of each rank:
//   1. bumps its call counter c (device memory of its own rank, so graph
//      replays keep counting; every rank makes the same calls, so the
//      counters agree),
//   2. copies its units of x into half (c & 1) of its own staging buffer,
//   3. signals: thread r stores c into rank r's flags[b][me] (a release
//      store at system scope, after a system fence: the staged data is
//      visible to any rank that sees the flag),
//   4. waits until its own flags[b][r] has reached c for every rank r
//      (acquire loads at system scope),
//   5. sums its units over every rank's staging half in rank order (so all
//      ranks get the same bits) and writes them to x; peer data is read
//      through L2 only (ld.global.cg), never a stale L1 line.
// Two halves alternate by call parity: a rank one call ahead writes the
// other half while slower ranks still read this one, and it cannot get two
// calls ahead, since its next call waits for theirs (and a rank's calls
// are ordered kernels: its previous call has fully finished). Counters are
// compared with wrap-around arithmetic; a peer may already have stored c + 1.
// A waiting thread polls the host-mapped abort word every 1024 spins and
// gives up once it is set (the watchdog's abort: the result is garbage, the
// model is failed anyway). Block 0 records c in the host-mapped `arrived`
// word, the watchdog's view of how far the rank got.
// One arch path (sm_80+: ld.acquire / st.release at system scope).
#include "kernels/all_reduce_peer.cuh"

#include <stdexcept>
#include <string>

#include "common/check.h"

namespace hx {

namespace {

__device__ __forceinline__ void store_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t load_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void add4(float4& a, const float4& b) {
  a.x += b.x;
  a.y += b.y;
  a.z += b.z;
  a.w += b.w;
}

}  // namespace

static __global__ void __launch_bounds__(kPeerThreads) peer_all_reduce_kernel(const PeerAllReduceArgs a,
                                                                           float* __restrict__ x, size_t count) {
  __shared__ uint32_t s_call;
  const int b = blockIdx.x, t = threadIdx.x;
  if (t == 0) {
    uint32_t* counter = a.flags[a.rank] + kPeerBlocks * kPeerMaxRanks + b;
    const uint32_t c = *counter + 1;
    *counter = c;
    s_call = c;
    if (b == 0 && a.arrived != nullptr) *a.arrived = c;
  }
  __syncthreads();
  const uint32_t call = s_call;
  const size_t half = (call & 1u) ? a.capacity : 0;
  const size_t n4 = count / 4;
  const size_t first = static_cast<size_t>(b) * kPeerThreads + t;
  const size_t stride = static_cast<size_t>(kPeerBlocks) * kPeerThreads;

  float* mine = a.staging[a.rank] + half;
  for (size_t i = first; i < n4; i += stride)
    reinterpret_cast<float4*>(mine)[i] = reinterpret_cast<const float4*>(x)[i];
  for (size_t i = n4 * 4 + first; i < count; i += stride) mine[i] = x[i];
  __syncthreads();

  if (t < a.nranks) {
    __threadfence_system();
    store_release_sys(a.flags[t] + b * kPeerMaxRanks + a.rank, call);
    const uint32_t* f = a.flags[a.rank] + b * kPeerMaxRanks + t;
    for (uint32_t spins = 1; static_cast<int32_t>(load_acquire_sys(f) - call) < 0; ++spins)
      if ((spins & 1023u) == 0 && *a.abort != 0) break;
  }
  __syncthreads();

  for (size_t i = first; i < n4; i += stride) {
    float4 acc = __ldcg(reinterpret_cast<const float4*>(a.staging[0] + half) + i);
#pragma unroll
    for (int r = 1; r < kPeerMaxRanks; ++r)
      if (r < a.nranks) add4(acc, __ldcg(reinterpret_cast<const float4*>(a.staging[r] + half) + i));
    reinterpret_cast<float4*>(x)[i] = acc;
  }
  for (size_t i = n4 * 4 + first; i < count; i += stride) {
    float acc = __ldcg(a.staging[0] + half + i);
#pragma unroll
    for (int r = 1; r < kPeerMaxRanks; ++r)
      if (r < a.nranks) acc += __ldcg(a.staging[r] + half + i);
    x[i] = acc;
  }
}

void peer_all_reduce_launch(const PeerAllReduceArgs& args, float* x, size_t count, cudaStream_t stream) {
  if (args.nranks < 1 || args.nranks > kPeerMaxRanks || args.rank < 0 || args.rank >= args.nranks)
    throw std::invalid_argument("peer all-reduce: rank " + std::to_string(args.rank) + " of " +
                                std::to_string(args.nranks) + " ranks (at most " + std::to_string(kPeerMaxRanks) + ")");
  if (args.abort == nullptr) throw std::invalid_argument("peer all-reduce: no abort word");
  if (count > args.capacity || args.capacity % 4 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0)
    throw std::invalid_argument("peer all-reduce of " + std::to_string(count) + " floats: staging holds " +
                                std::to_string(args.capacity) + " (multiple of 4), x must be 16-byte aligned");
  // Every rank launches every call, even an empty one: the counters stay in step.
  peer_all_reduce_kernel<<<kPeerBlocks, kPeerThreads, 0, stream>>>(args, x, count);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

// Device sampling in helexa_native/params.py's order (see sampling.cuh).
//
// penalties: elementwise over the vocabulary; products are rounded before
//   the subtraction (no FMA) so the result equals the host sampler's float32
//   arithmetic bit for bit.
// argmax: one block of 1024 threads (float4 loads), (value, id) reduction,
//   lowest id on ties.
// sample (exact, no candidate cap):
//   1. prep (multi-block): x = logits / T (NaN -> -inf, -0 -> +0), written as
//      sort keys with their ids; each block also leaves its (max, sum exp)
//      so the softmax denominator of the whole vocabulary needs no second pass.
//   2. cub::DeviceRadixSort::SortPairsDescending: a stable sort, so equal
//      values keep ascending ids, which is exactly params.py's candidate order.
//   3. finish (one block of 1024 threads) on the sorted arrays, in chunks of
//      4096 with early exit: Z over the top_k prefix; the first position whose
//      mass before it reaches top_p or whose probability falls below
//      min_p * p_max ends the candidate list; renormalize (float64, as the
//      host does); the first candidate whose cumulative mass exceeds
//      u = uniform(seed, step) wins (the last nonzero one if rounding leaves u
//      above the total). Prefix sums are float64 block scans.
//   Typical cost is the sort (~5 launches) plus one finishing pass over a
//   short prefix; temperature 0 goes through the same path (the forward
//   should call argmax_launch instead for greedy requests).
// logprobs: one block, one pass: online log-sum-exp plus a per-thread
//   register list of the 20 best (value, id), merged by top_n rounds of a
//   block argmax.
// One arch path (sm_80+ baseline).
#include "kernels/sampling.cuh"

#include <cub/device/device_radix_sort.cuh>

#include <climits>
#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"

namespace hx {
namespace {

__device__ __forceinline__ float clean(float x) { return isnan(x) ? -INFINITY : x; }

// ---------------------------------------------------------------- penalties

__global__ void penalties_kernel(const float* __restrict__ logits, float* __restrict__ out, int vocab,
                                 const SamplingParamsDevice* __restrict__ p, const int32_t* __restrict__ present,
                                 const int32_t* __restrict__ counts) {
  const float r = p->repetition_penalty, pres = p->presence_penalty, freq = p->frequency_penalty;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < vocab; t += gridDim.x * blockDim.x) {
    float x = clean(logits[t]);
    if (present[t]) x = x > 0.f ? __fdiv_rn(x, r) : __fmul_rn(x, r);
    const int c = counts[t];
    x = __fsub_rn(x, __fmul_rn(pres, c > 0 ? 1.f : 0.f));
    x = __fsub_rn(x, __fmul_rn(freq, (float)c));
    out[t] = x;
  }
}

// ------------------------------------------------------------------- argmax

// (value, id) order: larger value first, then lower id.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

__device__ __forceinline__ void warp_best(float& v, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, v, o);
    const int oi = __shfl_xor_sync(kFullMask, i, o);
    if (better(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
}

// Block-wide best (value, id); every thread receives it. sv / si: 32 slots of shared memory.
__device__ __forceinline__ void block_best(float& v, int& i, float* sv, int* si) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  warp_best(v, i);
  __syncthreads();
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  v = lane < nw ? sv[lane] : -INFINITY;
  i = lane < nw ? si[lane] : INT_MAX;
  warp_best(v, i);
}

__global__ void __launch_bounds__(1024) argmax_kernel(const float* __restrict__ logits, int vocab,
                                                      int32_t* __restrict__ out) {
  __shared__ float sv[32];
  __shared__ int si[32];
  float bv = -INFINITY;
  int bi = INT_MAX;
  // float4 body (when aligned) with several loads in flight per thread, then the tail.
  int tail = 0;
  if ((reinterpret_cast<uintptr_t>(logits) & 15) == 0) {
    const int n4 = vocab >> 2;
    const float4* l4 = reinterpret_cast<const float4*>(logits);
#pragma unroll 4
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
      const float4 v = l4[i];
      const float xs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = clean(xs[e]);
        if (better(x, 4 * i + e, bv, bi)) {
          bv = x;
          bi = 4 * i + e;
        }
      }
    }
    tail = n4 << 2;
  }
  for (int t = tail + threadIdx.x; t < vocab; t += blockDim.x) {
    const float x = clean(logits[t]);
    if (better(x, t, bv, bi)) {
      bv = x;
      bi = t;
    }
  }
  block_best(bv, bi, sv, si);
  if (threadIdx.x == 0) *out = bi == INT_MAX ? 0 : bi;
}

// ------------------------------------------------------------------- sample

struct Partial {
  float m;    // block max of x
  float pad;
  double s;   // sum of exp(x - m) over the block
};

constexpr int kPrepThreads = 256;
constexpr int kPrepMaxBlocks = 256;
constexpr int kFinThreads = 1024;
constexpr int kPer = 4;                              // contiguous elements per thread per chunk
constexpr int kChunk = kFinThreads * kPer;

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ double block_sum_d(double v, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum_d(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nw ? scratch[lane] : 0.0;
  return warp_sum_d(v);
}

__global__ void __launch_bounds__(kPrepThreads)
sample_prep_kernel(const float* __restrict__ logits, int vocab, const SamplingParamsDevice* __restrict__ p,
                   float* __restrict__ keys, int32_t* __restrict__ ids, Partial* __restrict__ parts) {
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  const float T = p->temperature;
  float m = -INFINITY;
  double s = 0.0;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < vocab; t += gridDim.x * blockDim.x) {
    float x = clean(logits[t]);
    if (T > 0.f) x = __fdiv_rn(x, T);
    if (x == 0.f) x = 0.f;  // -0 and +0 are one value to the host's stable sort
    keys[t] = x;
    ids[t] = t;
    if (x == -INFINITY) continue;
    if (x > m) {
      s = s * (double)expf(m - x) + 1.0;
      m = x;
    } else {
      s += (double)expf(x - m);
    }
  }
  const float bm = block_max(m, fscratch);
  const double contrib = (m == -INFINITY) ? 0.0 : s * (double)expf(m - bm);
  const double bs = block_sum_d(contrib, dscratch);
  if (threadIdx.x == 0) parts[blockIdx.x] = Partial{bm, 0.f, bs};
}

// Shared state of the finishing block's chunked scans.
struct ScanSmem {
  double warp_tot[32];
  double dscratch[32];
  float fscratch[32];
  int found;
};

// First j in [0, L) where pred(j, cum_j, v_j) holds, cum_j the inclusive
// prefix sum of v (float64, in sorted order); L if none. Chunked with early
// exit; every thread of the block must call it.
template <class ValF, class PredF>
__device__ int find_first(int L, ValF val, PredF pred, ScanSmem& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double carry = 0.0;
  for (int base = 0; base < L; base += kChunk) {
    const int j0 = base + threadIdx.x * kPer;
    double v[kPer];
    double tsum = 0.0;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      v[e] = j0 + e < L ? val(j0 + e) : 0.0;
      tsum += v[e];
    }
    // Exclusive block scan of the per-thread sums.
    double incl = tsum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double y = __shfl_up_sync(kFullMask, incl, o);
      if (lane >= o) incl += y;
    }
    __syncthreads();  // previous chunk is done with warp_tot / found
    if (lane == 31) sm.warp_tot[warp] = incl;
    if (threadIdx.x == 0) sm.found = INT_MAX;
    __syncthreads();
    double wexcl = 0.0, total = 0.0;
    for (int w = 0; w < (kFinThreads >> 5); ++w) {
      const double t = sm.warp_tot[w];
      if (w < warp) wexcl += t;
      total += t;
    }
    double run = carry + wexcl + (incl - tsum);
    int mine = INT_MAX;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      run += v[e];
      if (mine == INT_MAX && j0 + e < L && pred(j0 + e, run, v[e])) mine = j0 + e;
    }
    if (mine != INT_MAX) atomicMin(&sm.found, mine);
    __syncthreads();
    const int f = sm.found;
    if (f != INT_MAX) return f;
    carry += total;
  }
  return L;
}

__global__ void __launch_bounds__(kFinThreads)
sample_finish_kernel(const float* __restrict__ keys, const int32_t* __restrict__ ids,
                     const Partial* __restrict__ parts, int nparts, int vocab,
                     const SamplingParamsDevice* __restrict__ p, const int32_t* __restrict__ step,
                     int32_t* __restrict__ out) {
  __shared__ ScanSmem sm;
  const float T = p->temperature;
  const float top = keys[0];
  if (!(T > 0.f) || !isfinite(top)) {
    // Greedy, or nothing finite to normalize: the first candidate, as the host does.
    if (threadIdx.x == 0) *out = ids[0];
    return;
  }
  const int V = vocab;
  const int k = (p->top_k > 0 && p->top_k < V) ? p->top_k : V;
  const float m = top;

  // Softmax denominator over the top-k prefix.
  double zd;
  if (k == V) {
    double c = 0.0;
    for (int b = threadIdx.x; b < nparts; b += blockDim.x) {
      const Partial q = parts[b];
      if (q.m != -INFINITY) c += q.s * (double)expf(q.m - m);
    }
    zd = block_sum_d(c, sm.dscratch);
  } else {
    double c = 0.0;
    for (int j = threadIdx.x; j < k; j += blockDim.x) c += (double)expf(keys[j] - m);
    zd = block_sum_d(c, sm.dscratch);
  }
  const float invZ = 1.0f / (float)zd;
  auto prob = [&](int j) { return expf(keys[j] - m) * invZ; };

  // top_p and min_p both cut a prefix of the sorted candidates.
  int L = k;
  const float top_p = p->top_p, min_p = p->min_p;
  const bool use_p = top_p < 1.f, use_min = min_p > 0.f;
  if (use_p || use_min) {
    const float thr = min_p * invZ;  // min_p * p_max, p_max = exp(0) / Z
    const int j = find_first(
        k, [&](int i) { return (double)prob(i); },
        [&](int, double cum, double v) {
          const float pj = (float)v;
          return (use_p && __fsub_rn((float)cum, pj) >= top_p) || (use_min && pj < thr);
        },
        sm);
    L = j > 1 ? j : 1;
  }

  // Renormalize the kept candidates and invert the CDF at u.
  double S;
  if (L == V) {
    S = zd * (double)invZ;
  } else {
    double c = 0.0;
    for (int j = threadIdx.x; j < L; j += blockDim.x) c += (double)prob(j);
    S = block_sum_d(c, sm.dscratch);
  }
  const double u = sample_uniform(p->seed, (uint64_t)(int64_t)(*step));
  int j = find_first(
      L, [&](int i) { return (double)prob(i) / S; }, [&](int, double cum, double) { return cum > u; }, sm);
  if (j == L) {
    // u above the rounded total: the last candidate with nonzero probability.
    const int z = find_first(
        L, [&](int i) { return (double)prob(i); }, [&](int, double, double v) { return v == 0.0; }, sm);
    j = z > 0 ? z - 1 : 0;
  }
  if (threadIdx.x == 0) *out = ids[j];
}

struct SampleWs {
  float* keys_in;
  float* keys_out;
  int32_t* ids_in;
  int32_t* ids_out;
  Partial* parts;
  void* cub_tmp;
  size_t cub_bytes;
  size_t total;
};

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

int prep_blocks(int vocab) {
  const int b = (vocab + kPrepThreads * 4 - 1) / (kPrepThreads * 4);
  return b < 1 ? 1 : (b > kPrepMaxBlocks ? kPrepMaxBlocks : b);
}

SampleWs layout(int vocab, void* base) {
  SampleWs w{};
  size_t cub_bytes = 0;
  HX_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(nullptr, cub_bytes, (const float*)nullptr,
                                                          (float*)nullptr, (const int32_t*)nullptr,
                                                          (int32_t*)nullptr, vocab));
  char* b = static_cast<char*>(base);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    void* ptr = b ? b + off : nullptr;
    off = align_up(off + bytes, 256);
    return ptr;
  };
  w.keys_in = static_cast<float*>(take((size_t)vocab * sizeof(float)));
  w.keys_out = static_cast<float*>(take((size_t)vocab * sizeof(float)));
  w.ids_in = static_cast<int32_t*>(take((size_t)vocab * sizeof(int32_t)));
  w.ids_out = static_cast<int32_t*>(take((size_t)vocab * sizeof(int32_t)));
  w.parts = static_cast<Partial*>(take((size_t)kPrepMaxBlocks * sizeof(Partial)));
  w.cub_tmp = take(cub_bytes);
  w.cub_bytes = cub_bytes;
  w.total = off;
  return w;
}

// ----------------------------------------------------------------- logprobs

constexpr int kLpThreads = 512;

__global__ void __launch_bounds__(kLpThreads)
logprobs_kernel(const float* __restrict__ logits, int vocab, int top_n, const int32_t* __restrict__ token,
                float* __restrict__ out_lp, int32_t* __restrict__ out_ids, float* __restrict__ out_top) {
  constexpr int N = kMaxTopLogprobs;
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  __shared__ float sv[32];
  __shared__ int si[32];
  float tv[N];
  int ti[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    tv[i] = -INFINITY;
    ti[i] = INT_MAX;
  }
  float m = -INFINITY;
  double s = 0.0;  // sum of exp(x - m) over this thread's elements (online)
  for (int t = threadIdx.x; t < vocab; t += blockDim.x) {
    const float x = clean(logits[t]);
    if (x > m) {
      s = s * (double)expf(m - x) + 1.0;
      m = x;
    } else if (x != -INFINITY) {
      s += (double)expf(x - m);
    }
    if (top_n > 0 && better(x, t, tv[N - 1], ti[N - 1])) {
      tv[N - 1] = x;
      ti[N - 1] = t;
#pragma unroll
      for (int i = N - 1; i > 0; --i) {
        if (better(tv[i], ti[i], tv[i - 1], ti[i - 1])) {
          const float a = tv[i];
          tv[i] = tv[i - 1];
          tv[i - 1] = a;
          const int b = ti[i];
          ti[i] = ti[i - 1];
          ti[i - 1] = b;
        }
      }
    }
  }
  const float M = block_max(m, fscratch);
  const double Z = block_sum_d(m == -INFINITY ? 0.0 : s * (double)expf(m - M), dscratch);
  const float lse = M == -INFINITY ? INFINITY : M + logf((float)Z);
  if (threadIdx.x == 0) {
    const int tok = *token;
    *out_lp = (tok >= 0 && tok < vocab) ? clean(logits[tok]) - lse : -INFINITY;
  }
  for (int r = 0; r < top_n; ++r) {
    float bv = tv[0];
    int bi = ti[0];
    block_best(bv, bi, sv, si);
    if (threadIdx.x == 0) {
      out_ids[r] = bi == INT_MAX ? -1 : bi;
      out_top[r] = bi == INT_MAX ? -INFINITY : bv - lse;
    }
    if (ti[0] == bi && bi != INT_MAX) {
#pragma unroll
      for (int i = 0; i < N - 1; ++i) {
        tv[i] = tv[i + 1];
        ti[i] = ti[i + 1];
      }
      tv[N - 1] = -INFINITY;
      ti[N - 1] = INT_MAX;
    }
  }
}

void check_vocab(const char* what, int vocab) {
  if (vocab <= 0) throw std::invalid_argument(std::string(what) + ": vocab must be positive, got " + std::to_string(vocab));
}

}  // namespace

void penalties_launch(const float* logits, float* out, int vocab, const SamplingParamsDevice* p,
                      const int32_t* present, const int32_t* counts, cudaStream_t stream) {
  check_vocab("penalties", vocab);
  const int threads = 256;
  int blocks = (vocab + threads - 1) / threads;
  blocks = blocks > 1024 ? 1024 : blocks;
  penalties_kernel<<<blocks, threads, 0, stream>>>(logits, out, vocab, p, present, counts);
  HX_CUDA_CHECK(cudaGetLastError());
}

void argmax_launch(const float* logits, int vocab, int32_t* out, cudaStream_t stream) {
  check_vocab("argmax", vocab);
  argmax_kernel<<<1, 1024, 0, stream>>>(logits, vocab, out);
  HX_CUDA_CHECK(cudaGetLastError());
}

size_t sample_workspace_bytes(int vocab) {
  check_vocab("sample", vocab);
  return layout(vocab, nullptr).total;
}

void sample_launch(const float* logits, int vocab, const SamplingParamsDevice* p, const int32_t* step,
                   int32_t* out_token, void* workspace, size_t ws_bytes, cudaStream_t stream) {
  check_vocab("sample", vocab);
  const SampleWs w = layout(vocab, workspace);
  if (workspace == nullptr || ws_bytes < w.total)
    throw std::invalid_argument("sample: workspace of " + std::to_string(ws_bytes) + " bytes, needs " +
                                std::to_string(w.total));
  const int nb = prep_blocks(vocab);
  sample_prep_kernel<<<nb, kPrepThreads, 0, stream>>>(logits, vocab, p, w.keys_in, w.ids_in, w.parts);
  HX_CUDA_CHECK(cudaGetLastError());
  size_t cub_bytes = w.cub_bytes;
  HX_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(w.cub_tmp, cub_bytes, w.keys_in, w.keys_out, w.ids_in,
                                                          w.ids_out, vocab, 0, 32, stream));
  sample_finish_kernel<<<1, kFinThreads, 0, stream>>>(w.keys_out, w.ids_out, w.parts, nb, vocab, p, step, out_token);
  HX_CUDA_CHECK(cudaGetLastError());
}

void logprobs_launch(const float* logits, int vocab, int top_n, const int32_t* token, float* out_logprob,
                     int32_t* out_top_ids, float* out_top_lp, cudaStream_t stream) {
  check_vocab("logprobs", vocab);
  if (top_n < 0 || top_n > kMaxTopLogprobs)
    throw std::invalid_argument("logprobs: top_n must be in [0, " + std::to_string(kMaxTopLogprobs) + "], got " +
                                std::to_string(top_n));
  if (top_n > 0 && (out_top_ids == nullptr || out_top_lp == nullptr))
    throw std::invalid_argument("logprobs: top_n > 0 needs out_top_ids and out_top_lp");
  logprobs_kernel<<<1, kLpThreads, 0, stream>>>(logits, vocab, top_n, token, out_logprob, out_top_ids, out_top_lp);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

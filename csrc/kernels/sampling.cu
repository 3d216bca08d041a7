// Device sampling in helexa_native/params.py's order (see sampling.cuh).
//
// penalties: elementwise over the vocabulary; products are rounded before
//   the subtraction (no FMA) so the result equals the host sampler's float32
//   arithmetic bit for bit. Batched: grid (chunks, B), row b reads penalty
//   slot slots[b] of the [max_slots, vocab] pool.
// argmax: one block of 1024 threads per row (float4 loads), (value, id)
//   reduction, lowest id on ties.
// sample, single row (exact, no candidate cap):
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
// sample, batched (B rows, each exactly as the single-row path):
//   1. prep, grid (blocks per row, B): the single-row prep's (max, sum exp)
//      partials, same blocks and order, plus a histogram of x over 4096
//      buckets (the top 12 bits of x's order-preserving bit pattern).
//   2. select, one block per row: the lowest bucket such that the buckets
//      from the top down to it hold at most kCand = 4096 values; x at or
//      above its floor is a prefix of the row's sorted order.
//   3. gather, grid (blocks per row, B): those candidates as 64-bit keys
//      (x's ordered bits, then vocab-mask minus id), so a descending sort
//      gives params.py's order whatever order the atomics wrote them in.
//   4. finish, one block per row: temperature 0 or no finite x -> argmax
//      pass; else a block radix sort of the candidates in shared memory and
//      the single-row finish run on them (same block size, same scans),
//      which either reaches its answer inside the prefix or reports that it
//      needs more. Positions are only trusted in whole groups of kPer, so
//      every float64 partial sum it uses equals the full-sort one.
//   5-7. rows that need more: keys written in full, a segmented radix sort
//      whose segments are empty for every other row, and the finish on the
//      whole sorted row (the single-row path's own code).
// logprobs: one block per row, one pass: online log-sum-exp plus a
//   per-thread register list of the 20 best (value, id), merged by top_n
//   rounds of a block argmax.
// One arch path (sm_80+ baseline).
#include "kernels/sampling.cuh"

#include <cub/block/block_radix_sort.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <climits>
#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"
#include "common/launch.cuh"

namespace hx {
namespace {

__device__ __forceinline__ float clean(float x) { return isnan(x) ? -INFINITY : x; }

// ---------------------------------------------------------------- penalties

__device__ __forceinline__ float penalize(float x, int32_t present, int32_t c, float r, float pres, float freq) {
  if (present) x = x > 0.f ? __fdiv_rn(x, r) : __fmul_rn(x, r);
  x = __fsub_rn(x, __fmul_rn(pres, c > 0 ? 1.f : 0.f));
  x = __fsub_rn(x, __fmul_rn(freq, (float)c));
  return x;
}

__global__ void penalties_kernel(const float* __restrict__ logits, float* __restrict__ out, int vocab,
                                 const SamplingParamsDevice* __restrict__ p, const int32_t* __restrict__ present,
                                 const int32_t* __restrict__ counts) {
  const float r = p->repetition_penalty, pres = p->presence_penalty, freq = p->frequency_penalty;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < vocab; t += gridDim.x * blockDim.x)
    out[t] = penalize(clean(logits[t]), present[t], counts[t], r, pres, freq);
}

// logits / out are not __restrict__: out may alias logits.
__global__ void penalties_batch_kernel(const float* logits, float* out, int vocab,
                                       const SamplingParamsDevice* __restrict__ params,
                                       const int32_t* __restrict__ slots, const int32_t* __restrict__ present,
                                       const int32_t* __restrict__ counts, int max_slots) {
  const int b = blockIdx.y;
  const size_t row = (size_t)b * vocab;
  const SamplingParamsDevice* p = params + b;
  const float r = p->repetition_penalty, pres = p->presence_penalty, freq = p->frequency_penalty;
  const int s = slots[b];
  // Neutral parameters leave every x as it is (x / 1, x * 1, x - (+0)), so
  // such rows skip the state.
  const bool neutral = r == 1.f && __float_as_uint(pres) == 0u && __float_as_uint(freq) == 0u;
  const bool active = s >= 0 && s < max_slots && !neutral;
  const int32_t* pr = present + (active ? (size_t)s * vocab : 0);
  const int32_t* cn = counts + (active ? (size_t)s * vocab : 0);
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < vocab; t += gridDim.x * blockDim.x) {
    const float x = clean(logits[row + t]);
    out[row + t] = active ? penalize(x, pr[t], cn[t], r, pres, freq) : x;
  }
}

// ------------------------------------------------------------------- argmax

// (value, id) order: larger value first, then lower id.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

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

// The best (clean(row[t]), t) of this thread over t in [lo, hi), folded into
// (bv, bi): a float4 body (row + lo 16-byte aligned) with several loads in
// flight per thread, then the tail.
__device__ __forceinline__ void scan_best(const float* __restrict__ row, int lo, int hi, float& bv, int& bi) {
  int tail = lo;
  if ((reinterpret_cast<uintptr_t>(row + lo) & 15) == 0) {
    const int n4 = (hi - lo) >> 2;
    const float4* l4 = reinterpret_cast<const float4*>(row + lo);
#pragma unroll 4
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
      const float4 v = l4[i];
      const float xs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = clean(xs[e]);
        const int t = lo + 4 * i + e;
        if (better(x, t, bv, bi)) {
          bv = x;
          bi = t;
        }
      }
    }
    tail = lo + (n4 << 2);
  }
  for (int t = tail + threadIdx.x; t < hi; t += blockDim.x) {
    const float x = clean(row[t]);
    if (better(x, t, bv, bi)) {
      bv = x;
      bi = t;
    }
  }
}

// Index of the best clean(row[t]) (lowest id on ties, 0 when all are -inf);
// every thread of the block receives it.
__device__ __forceinline__ int argmax_row(const float* __restrict__ row, int vocab, float* sv, int* si) {
  float bv = -INFINITY;
  int bi = INT_MAX;
  scan_best(row, 0, vocab, bv, bi);
  block_best(bv, bi, sv, si);
  return bi == INT_MAX ? 0 : bi;
}

// One block per row.
__global__ void __launch_bounds__(1024) argmax_kernel(const float* __restrict__ logits, int vocab,
                                                   int32_t* __restrict__ out) {
  pdl_begin();
  __shared__ float sv[32];
  __shared__ int si[32];
  const int best = argmax_row(logits + (size_t)blockIdx.x * vocab, vocab, sv, si);
  if (threadIdx.x == 0) out[blockIdx.x] = best;
}

// Large vocabularies: a row in kArgmaxSlices-way slices, one block each
// (blockIdx.x the slice, blockIdx.y the row), their best (value, id) pairs
// into the workspace; one warp per row then picks among them. The order is
// total (larger value, then lower id), so the result is the one block's.
constexpr int kArgmaxThreads = 256;
constexpr int kArgmaxSliceMin = 4096;  // elements a slice block reads at least
constexpr int kArgmaxMaxSlices = 64;

struct ArgmaxSplit {
  int slices, per;  // slices of `per` elements (a multiple of 4)
};

ArgmaxSplit argmax_split(int vocab) {
  int s = (vocab + kArgmaxSliceMin - 1) / kArgmaxSliceMin;
  s = s < kArgmaxMaxSlices ? s : kArgmaxMaxSlices;
  int per = (vocab + s - 1) / s;
  per = (per + 3) / 4 * 4;
  return {(vocab + per - 1) / per, per};
}

__global__ void __launch_bounds__(kArgmaxThreads) argmax_slice_kernel(const float* __restrict__ logits, int vocab, int per,
                                                                   float2* __restrict__ part) {
  pdl_begin();
  __shared__ float sv[32];
  __shared__ int si[32];
  const int lo = blockIdx.x * per, hi = min(vocab, lo + per);
  float bv = -INFINITY;
  int bi = INT_MAX;
  scan_best(logits + (size_t)blockIdx.y * vocab, lo, hi, bv, bi);
  block_best(bv, bi, sv, si);
  if (threadIdx.x == 0) part[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = make_float2(bv, __int_as_float(bi));
}

__global__ void __launch_bounds__(32) argmax_pick_kernel(const float2* __restrict__ part, int slices,
                                                      int32_t* __restrict__ out) {
  pdl_begin();
  float bv = -INFINITY;
  int bi = INT_MAX;
  for (int s = threadIdx.x; s < slices; s += 32) {
    const float2 p = part[(size_t)blockIdx.x * slices + s];
    const int i = __float_as_int(p.y);
    if (better(p.x, i, bv, bi)) {
      bv = p.x;
      bi = i;
    }
  }
  warp_best(bv, bi);
  if (threadIdx.x == 0) out[blockIdx.x] = bi == INT_MAX ? 0 : bi;
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

// Batched path: candidates per row (one finishing block sorts them in shared
// memory, kSortItems per thread) and the histogram that chooses them.
constexpr int kSortItems = 4;
constexpr int kCand = kFinThreads * kSortItems;
constexpr int kBucketBits = 12;
constexpr int kBuckets = 1 << kBucketBits;
constexpr int kBucketShift = 32 - kBucketBits;
static_assert(kBuckets % kFinThreads == 0, "select gives each thread whole buckets");

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

// The sort key of one logit: clean(logit) / T (T > 0; unchanged otherwise),
// with -0 folded into +0 (one value to the host's stable sort).
__device__ __forceinline__ float scaled_key(float logit, float T) {
  float x = clean(logit);
  if (T > 0.f) x = __fdiv_rn(x, T);
  if (x == 0.f) x = 0.f;
  return x;
}

// Order-preserving bit pattern of a float that is not NaN (a < b <=> ord(a) < ord(b)).
__device__ __forceinline__ uint32_t ord_of(float x) {
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float float_of_ord(uint32_t o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7FFFFFFFu) : ~o);
}

// Online (max, sum exp(x - max)) of one thread's values; -inf adds nothing.
__device__ __forceinline__ void online_add(float x, float& m, double& s) {
  if (x == -INFINITY) return;
  if (x > m) {
    s = s * (double)expf(m - x) + 1.0;
    m = x;
  } else {
    s += (double)expf(x - m);
  }
}

// The block's (max, sum exp) from each thread's online pair; thread 0 writes it.
__device__ __forceinline__ void write_partial(float m, double s, Partial* out, float* fscratch, double* dscratch) {
  const float bm = block_max(m, fscratch);
  const double contrib = (m == -INFINITY) ? 0.0 : s * (double)expf(m - bm);
  const double bs = block_sum_d(contrib, dscratch);
  if (threadIdx.x == 0) *out = Partial{bm, 0.f, bs};
}

int prep_blocks(int vocab) {
  const int b = (vocab + kPrepThreads * 4 - 1) / (kPrepThreads * 4);
  return b < 1 ? 1 : (b > kPrepMaxBlocks ? kPrepMaxBlocks : b);
}

__global__ void __launch_bounds__(kPrepThreads) sample_prep_kernel(const float* __restrict__ logits, int vocab,
                                                                const SamplingParamsDevice* __restrict__ p,
                                                                float* __restrict__ keys, int32_t* __restrict__ ids,
                                                                Partial* __restrict__ parts) {
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  const float T = p->temperature;
  float m = -INFINITY;
  double s = 0.0;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < vocab; t += gridDim.x * blockDim.x) {
    const float x = scaled_key(logits[t], T);
    keys[t] = x;
    ids[t] = t;
    online_add(x, m, s);
  }
  write_partial(m, s, parts + blockIdx.x, fscratch, dscratch);
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

// params.py steps 5-9 on a row's sorted candidates: keys descending, ids
// ascending on ties, of which the first n_avail are given (n_avail == vocab:
// the whole row). Returns the token, or -1 when the answer depends on a
// position past the given ones; with the whole row it never does. Every
// thread of a kFinThreads block calls it and receives the same answer.
//
// With a prefix, a position is used only when the full-row computation would
// see the same float64 partial sums there: sums over [0, j) read only those
// positions, and find_first's scan adds a thread's kPer values as a group,
// so a prefix counts only in whole groups.
__device__ int finish_row(const float* keys, const int32_t* ids, int n_avail, const Partial* __restrict__ parts,
                          int nparts, int vocab, const SamplingParamsDevice* __restrict__ p, int32_t step,
                          ScanSmem& sm) {
  const float T = p->temperature;
  const float top = keys[0];
  if (!(T > 0.f) || !isfinite(top)) {
    // Greedy, or nothing finite to normalize: the first candidate, as the host does.
    return ids[0];
  }
  const int V = vocab;
  const int avail = n_avail >= V ? V : n_avail - n_avail % kPer;
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
    if (k > avail) return -1;
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
    const int lim = k < avail ? k : avail;
    const int j = find_first(
        lim, [&](int i) { return (double)prob(i); },
        [&](int, double cum, double v) {
          const float pj = (float)v;
          return (use_p && __fsub_rn((float)cum, pj) >= top_p) || (use_min && pj < thr);
        },
        sm);
    if (j == lim && lim < k) return -1;
    L = j > 1 ? j : 1;
  }

  // Renormalize the kept candidates and invert the CDF at u.
  double S;
  if (L == V) {
    S = zd * (double)invZ;
  } else {
    if (L > avail) return -1;
    double c = 0.0;
    for (int j = threadIdx.x; j < L; j += blockDim.x) c += (double)prob(j);
    S = block_sum_d(c, sm.dscratch);
  }
  const double u = sample_uniform(p->seed, (uint64_t)(int64_t)step);
  const int lim = L < avail ? L : avail;
  int j =
      find_first(lim, [&](int i) { return (double)prob(i) / S; }, [&](int, double cum, double) { return cum > u; }, sm);
  if (j == lim) {
    if (lim < L) return -1;
    // u above the rounded total: the last candidate with nonzero probability.
    const int z =
        find_first(L, [&](int i) { return (double)prob(i); }, [&](int, double, double v) { return v == 0.0; }, sm);
    j = z > 0 ? z - 1 : 0;
  }
  return ids[j];
}

__global__ void __launch_bounds__(kFinThreads) sample_finish_kernel(const float* __restrict__ keys,
                                                                 const int32_t* __restrict__ ids,
                                                                 const Partial* __restrict__ parts, int nparts,
                                                                 int vocab, const SamplingParamsDevice* __restrict__ p,
                                                                 const int32_t* __restrict__ step,
                                                                 int32_t* __restrict__ out) {
  __shared__ ScanSmem sm;
  const int tok = finish_row(keys, ids, vocab, parts, nparts, vocab, p, *step, sm);
  if (threadIdx.x == 0) *out = tok;
}

// ---------------------------------------------------------- sample, batched

// 1. Partials (as sample_prep_kernel, without keys) and, when asked, the
// row's histogram of x. Grid (nparts, B); greedy rows have nothing to do.
__global__ void __launch_bounds__(kPrepThreads) sample_batch_prep_kernel(const float* __restrict__ logits, int vocab,
                                                                      const SamplingParamsDevice* __restrict__ params,
                                                                      Partial* __restrict__ parts,
                                                                      uint32_t* __restrict__ hist, bool histogram) {
  __shared__ uint32_t h[kBuckets];
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  const int b = blockIdx.y;
  const float T = params[b].temperature;
  if (!(T > 0.f)) return;
  if (histogram) {
    for (int i = threadIdx.x; i < kBuckets; i += blockDim.x) h[i] = 0u;
    __syncthreads();
  }
  const float* row = logits + (size_t)b * vocab;
  float m = -INFINITY;
  double s = 0.0;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < vocab; t += gridDim.x * blockDim.x) {
    const float x = scaled_key(row[t], T);
    if (histogram) atomicAdd(&h[ord_of(x) >> kBucketShift], 1u);
    online_add(x, m, s);
  }
  write_partial(m, s, parts + (size_t)b * gridDim.x + blockIdx.x, fscratch, dscratch);
  if (histogram) {
    __syncthreads();
    uint32_t* g = hist + (size_t)b * kBuckets;
    for (int i = threadIdx.x; i < kBuckets; i += blockDim.x)
      if (h[i] != 0u) atomicAdd(&g[i], h[i]);
  }
}

// 2. Per row: the longest run of buckets from the top holding at most kCand
// values. thr[b] = the floor of its lowest bucket (x qualifies when
// ord_of(x) >= thr[b]); expect[b] = how many values qualify (0: none, the row
// goes to the full sort).
__global__ void __launch_bounds__(kFinThreads) sample_batch_select_kernel(const SamplingParamsDevice* __restrict__ params,
                                                                       const uint32_t* __restrict__ hist,
                                                                       uint32_t* __restrict__ thr,
                                                                       int32_t* __restrict__ expect) {
  constexpr int kPerThread = kBuckets / kFinThreads;
  __shared__ uint32_t warp_tot[32];
  __shared__ int npos;
  const int b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (!(params[b].temperature > 0.f)) {
    if (threadIdx.x == 0) expect[b] = 0;
    return;
  }
  // Position q counts buckets from the top: bucket kBuckets - 1 - q.
  const uint32_t* h = hist + (size_t)b * kBuckets;
  uint32_t c[kPerThread];
  uint32_t tsum = 0;
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    c[e] = h[kBuckets - 1 - (threadIdx.x * kPerThread + e)];
    tsum += c[e];
  }
  uint32_t incl = tsum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t y = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_tot[warp] = incl;
  if (threadIdx.x == 0) npos = 0;
  __syncthreads();
  uint32_t run = incl - tsum;
  for (int w = 0; w < warp; ++w) run += warp_tot[w];
  // The cumulative count never decreases, so the positions within the cap
  // are a prefix [0, P) of the order.
  uint32_t cum[kPerThread];
  int mine = 0;
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    run += c[e];
    cum[e] = run;
    mine += run <= (uint32_t)kCand ? 1 : 0;
  }
  if (mine) atomicAdd(&npos, mine);
  __syncthreads();
  const int P = npos;
  if (P == 0) {
    if (threadIdx.x == 0) expect[b] = 0;
    return;
  }
  const int q = P - 1;
  if (q / kPerThread == (int)threadIdx.x) {
    uint32_t n = 0;
#pragma unroll
    for (int e = 0; e < kPerThread; ++e)
      if (e == q % kPerThread) n = cum[e];
    thr[b] = (uint32_t)(kBuckets - 1 - q) << kBucketShift;
    expect[b] = (int32_t)n;
  }
}

// 3. The candidates of each row as descending-sortable 64-bit keys:
// (ord_of(x) << id_bits) | (id_mask - id). Grid (nparts, B).
__global__ void __launch_bounds__(kPrepThreads) sample_batch_gather_kernel(
    const float* __restrict__ logits, int vocab, const SamplingParamsDevice* __restrict__ params,
    const uint32_t* __restrict__ thr, const int32_t* __restrict__ expect, int32_t* __restrict__ count,
    unsigned long long* __restrict__ cand, int id_bits) {
  const int b = blockIdx.y;
  const float T = params[b].temperature;
  if (!(T > 0.f) || expect[b] <= 0) return;
  const uint32_t th = thr[b];
  const unsigned long long id_mask = (1ull << id_bits) - 1ull;
  const float* row = logits + (size_t)b * vocab;
  unsigned long long* out = cand + (size_t)b * kCand;
  const int lane = threadIdx.x & 31;
  for (int base = blockIdx.x * blockDim.x; base < vocab; base += gridDim.x * blockDim.x) {
    const int t = base + threadIdx.x;
    uint32_t o = 0;
    bool take = false;
    if (t < vocab) {
      o = ord_of(scaled_key(row[t], T));
      take = o >= th;
    }
    const unsigned ballot = __ballot_sync(kFullMask, take);
    if (ballot == 0u) continue;
    const int leader = __ffs(ballot) - 1;
    int first = 0;
    if (lane == leader) first = atomicAdd(&count[b], __popc(ballot));
    first = __shfl_sync(kFullMask, first, leader);
    if (take) {
      const int pos = first + __popc(ballot & ((1u << lane) - 1u));
      if (pos < kCand) out[pos] = ((unsigned long long)o << id_bits) | (id_mask - (unsigned long long)t);
    }
  }
}

using CandSort = cub::BlockRadixSort<unsigned long long, kFinThreads, kSortItems>;

// 4. Per row: greedy rows and rows without a finite x take the argmax; the
// others sort their candidates and finish on them. Rows that need more are
// marked for the full sort: segment [b * vocab, b * vocab + vocab), else empty.
__global__ void __launch_bounds__(kFinThreads) sample_batch_prefix_kernel(
    const float* __restrict__ logits, int vocab, const SamplingParamsDevice* __restrict__ params,
    const int32_t* __restrict__ steps, const Partial* __restrict__ parts, int nparts,
    const int32_t* __restrict__ expect, const int32_t* __restrict__ count, const unsigned long long* __restrict__ cand,
    int id_bits, bool prefix, int32_t* __restrict__ seg_begin, int32_t* __restrict__ seg_end, int32_t* __restrict__ out,
    int32_t* __restrict__ sorted_in_full) {
  __shared__ union {
    CandSort::TempStorage sort;
    struct {
      float keys[kCand];
      int32_t ids[kCand];
    } sorted;
  } cs;
  __shared__ ScanSmem sm;
  __shared__ float sv[32];
  __shared__ int si[32];
  const int b = blockIdx.x;
  const SamplingParamsDevice* p = params + b;
  const float T = p->temperature;
  const float* row = logits + (size_t)b * vocab;
  bool full = false;
  if (!(T > 0.f)) {
    const int tok = argmax_row(row, vocab, sv, si);
    if (threadIdx.x == 0) out[b] = tok;
  } else {
    const Partial* pp = parts + (size_t)b * nparts;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) mx = fmaxf(mx, pp[i].m);
    mx = block_max(mx, sm.fscratch);
    if (!isfinite(mx)) {
      // Nothing finite to normalize: the first in sorted order, i.e. the best
      // x / T with the lowest id.
      float bv = -INFINITY;
      int bi = INT_MAX;
      for (int t = threadIdx.x; t < vocab; t += blockDim.x) {
        const float x = scaled_key(row[t], T);
        if (better(x, t, bv, bi)) {
          bv = x;
          bi = t;
        }
      }
      block_best(bv, bi, sv, si);
      if (threadIdx.x == 0) out[b] = bi == INT_MAX ? 0 : bi;
    } else if (!prefix) {
      full = true;
    } else {
      const int n = count[b];
      if (n <= 0 || n > kCand || n != expect[b]) {
        full = true;
      } else {
        const unsigned long long* c = cand + (size_t)b * kCand;
        unsigned long long key[kSortItems];
#pragma unroll
        for (int e = 0; e < kSortItems; ++e) {
          const int i = threadIdx.x * kSortItems + e;
          key[e] = i < n ? c[i] : 0ull;  // 0 is below every real key: padding sorts last
        }
        CandSort(cs.sort).SortDescending(key, 0, 32 + id_bits);
        __syncthreads();  // the sort's storage becomes the sorted arrays
        const unsigned long long id_mask = (1ull << id_bits) - 1ull;
#pragma unroll
        for (int e = 0; e < kSortItems; ++e) {
          const int i = threadIdx.x * kSortItems + e;
          cs.sorted.keys[i] = float_of_ord((uint32_t)(key[e] >> id_bits));
          cs.sorted.ids[i] = (int32_t)(id_mask - (key[e] & id_mask));
        }
        __syncthreads();
        const int tok = finish_row(cs.sorted.keys, cs.sorted.ids, n, pp, nparts, vocab, p, steps[b], sm);
        if (tok < 0)
          full = true;
        else if (threadIdx.x == 0)
          out[b] = tok;
      }
    }
  }
  if (threadIdx.x == 0) {
    seg_begin[b] = b * vocab;
    seg_end[b] = b * vocab + (full ? vocab : 0);
    if (sorted_in_full != nullptr) sorted_in_full[b] = full ? 1 : 0;
  }
}

// 5. Sort keys and ids of the rows marked for the full sort. Grid (nparts, B).
__global__ void __launch_bounds__(kPrepThreads) sample_batch_keys_kernel(const float* __restrict__ logits, int vocab,
                                                                      const SamplingParamsDevice* __restrict__ params,
                                                                      const int32_t* __restrict__ seg_begin,
                                                                      const int32_t* __restrict__ seg_end,
                                                                      float* __restrict__ keys,
                                                                      int32_t* __restrict__ ids) {
  const int b = blockIdx.y;
  if (seg_end[b] <= seg_begin[b]) return;
  const float T = params[b].temperature;
  const size_t off = (size_t)b * vocab;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < vocab; t += gridDim.x * blockDim.x) {
    keys[off + t] = scaled_key(logits[off + t], T);
    ids[off + t] = t;
  }
}

// 7. The single-row finish on each fully sorted row.
__global__ void __launch_bounds__(kFinThreads) sample_batch_full_kernel(
    const float* __restrict__ keys, const int32_t* __restrict__ ids, const Partial* __restrict__ parts, int nparts,
    int vocab, const SamplingParamsDevice* __restrict__ params, const int32_t* __restrict__ steps,
    const int32_t* __restrict__ seg_begin, const int32_t* __restrict__ seg_end, int32_t* __restrict__ out) {
  __shared__ ScanSmem sm;
  const int b = blockIdx.x;
  if (seg_end[b] <= seg_begin[b]) return;
  const size_t off = (size_t)b * vocab;
  const int tok =
      finish_row(keys + off, ids + off, vocab, parts + (size_t)b * nparts, nparts, vocab, params + b, steps[b], sm);
  if (threadIdx.x == 0) out[b] = tok;
}

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Carves a workspace (base == nullptr: only sizes it) into 256-byte aligned pieces.
struct Carver {
  char* base;
  size_t off = 0;
  void* take(size_t bytes) {
    void* ptr = base ? base + off : nullptr;
    off = align_up(off + bytes, 256);
    return ptr;
  }
};

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

SampleWs layout(int vocab, void* base) {
  SampleWs w{};
  size_t cub_bytes = 0;
  HX_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(nullptr, cub_bytes, (const float*)nullptr, (float*)nullptr,
                                                          (const int32_t*)nullptr, (int32_t*)nullptr, vocab));
  Carver c{static_cast<char*>(base)};
  w.keys_in = static_cast<float*>(c.take((size_t)vocab * sizeof(float)));
  w.keys_out = static_cast<float*>(c.take((size_t)vocab * sizeof(float)));
  w.ids_in = static_cast<int32_t*>(c.take((size_t)vocab * sizeof(int32_t)));
  w.ids_out = static_cast<int32_t*>(c.take((size_t)vocab * sizeof(int32_t)));
  w.parts = static_cast<Partial*>(c.take((size_t)kPrepMaxBlocks * sizeof(Partial)));
  w.cub_tmp = c.take(cub_bytes);
  w.cub_bytes = cub_bytes;
  w.total = c.off;
  return w;
}

// Batched workspace, in this order:
//   parts  [B, nparts] Partial      per-block (max, sum exp) of every row
//   hist   [B, kBuckets] uint32     } zeroed by each launch
//   count  [B] int32                }   (one memset)
//   thr, expect, seg_begin, seg_end [B] int32 each
//   cand   [B, kCand] uint64        candidate keys
//   keys[2] [B, vocab] float, ids[2] [B, vocab] int32: the full sort's double buffers
//   cub temporary storage of the segmented sort
struct SampleBatchWs {
  Partial* parts;
  uint32_t* hist;
  int32_t* count;
  size_t zero_bytes;
  uint32_t* thr;
  int32_t* expect;
  int32_t* seg_begin;
  int32_t* seg_end;
  unsigned long long* cand;
  float* keys[2];
  int32_t* ids[2];
  void* cub_tmp;
  size_t cub_bytes;
  size_t total;
};

SampleBatchWs batch_layout(int B, int vocab, void* base) {
  SampleBatchWs w{};
  const size_t rows = (size_t)B, n = (size_t)B * vocab;
  size_t cub_bytes = 0;
  {
    cub::DoubleBuffer<float> k(nullptr, nullptr);
    cub::DoubleBuffer<int32_t> v(nullptr, nullptr);
    HX_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
        nullptr, cub_bytes, k, v, (int)n, B, (const int32_t*)nullptr, (const int32_t*)nullptr, 0, 32));
  }
  Carver c{static_cast<char*>(base)};
  w.parts = static_cast<Partial*>(c.take(rows * prep_blocks(vocab) * sizeof(Partial)));
  const size_t zero_start = c.off;
  w.hist = static_cast<uint32_t*>(c.take(rows * kBuckets * sizeof(uint32_t)));
  w.count = static_cast<int32_t*>(c.take(rows * sizeof(int32_t)));
  w.zero_bytes = c.off - zero_start;
  w.thr = static_cast<uint32_t*>(c.take(rows * sizeof(uint32_t)));
  w.expect = static_cast<int32_t*>(c.take(rows * sizeof(int32_t)));
  w.seg_begin = static_cast<int32_t*>(c.take(rows * sizeof(int32_t)));
  w.seg_end = static_cast<int32_t*>(c.take(rows * sizeof(int32_t)));
  w.cand = static_cast<unsigned long long*>(c.take(rows * kCand * sizeof(unsigned long long)));
  for (int i = 0; i < 2; ++i) {
    w.keys[i] = static_cast<float*>(c.take(n * sizeof(float)));
    w.ids[i] = static_cast<int32_t*>(c.take(n * sizeof(int32_t)));
  }
  w.cub_tmp = c.take(cub_bytes);
  w.cub_bytes = cub_bytes;
  w.total = c.off;
  return w;
}

// Bits that hold any id below vocab (at least 1).
int id_bits_for(int vocab) {
  int bits = 1;
  while (bits < 31 && ((int64_t)1 << bits) < (int64_t)vocab) ++bits;
  return bits;
}

// ----------------------------------------------------------------- logprobs

constexpr int kLpThreads = 512;

// One block per row; row b's top list goes to out_ids / out_top + b * kMaxTopLogprobs.
__global__ void __launch_bounds__(kLpThreads) logprobs_kernel(const float* __restrict__ logits_all, int vocab, int top_n,
                                                           const int32_t* __restrict__ tokens,
                                                           float* __restrict__ out_lp,
                                                           int32_t* __restrict__ out_ids_all,
                                                           float* __restrict__ out_top_all) {
  constexpr int N = kMaxTopLogprobs;
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  __shared__ float sv[32];
  __shared__ int si[32];
  const int b = blockIdx.x;
  const float* logits = logits_all + (size_t)b * vocab;
  int32_t* out_ids = top_n > 0 ? out_ids_all + (size_t)b * N : nullptr;
  float* out_top = top_n > 0 ? out_top_all + (size_t)b * N : nullptr;
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
          const int c = ti[i];
          ti[i] = ti[i - 1];
          ti[i - 1] = c;
        }
      }
    }
  }
  const float M = block_max(m, fscratch);
  const double Z = block_sum_d(m == -INFINITY ? 0.0 : s * (double)expf(m - M), dscratch);
  const float lse = M == -INFINITY ? INFINITY : M + logf((float)Z);
  if (threadIdx.x == 0) {
    const int tok = tokens[b];
    out_lp[b] = (tok >= 0 && tok < vocab) ? clean(logits[tok]) - lse : -INFINITY;
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
  if (vocab <= 0)
    throw std::invalid_argument(std::string(what) + ": vocab must be positive, got " + std::to_string(vocab));
}

void check_rows(const char* what, int B, int vocab) {
  check_vocab(what, vocab);
  if (B < 0) throw std::invalid_argument(std::string(what) + ": B must be >= 0, got " + std::to_string(B));
  if (B > 65535) throw std::invalid_argument(std::string(what) + ": B must be <= 65535, got " + std::to_string(B));
}

void check_top_n(int top_n, const int32_t* out_top_ids, const float* out_top_lp) {
  if (top_n < 0 || top_n > kMaxTopLogprobs)
    throw std::invalid_argument("logprobs: top_n must be in [0, " + std::to_string(kMaxTopLogprobs) + "], got " +
                                std::to_string(top_n));
  if (top_n > 0 && (out_top_ids == nullptr || out_top_lp == nullptr))
    throw std::invalid_argument("logprobs: top_n > 0 needs out_top_ids and out_top_lp");
}

}  // namespace

void penalties_launch(const float* logits, float* out, int vocab, const SamplingParamsDevice* p, const int32_t* present,
                      const int32_t* counts, cudaStream_t stream) {
  check_vocab("penalties", vocab);
  const int threads = 256;
  int blocks = (vocab + threads - 1) / threads;
  blocks = blocks > 1024 ? 1024 : blocks;
  penalties_kernel<<<blocks, threads, 0, stream>>>(logits, out, vocab, p, present, counts);
  HX_CUDA_CHECK(cudaGetLastError());
}

void penalties_batch_launch(const float* logits, float* out, int B, int vocab, const SamplingParamsDevice* params,
                            const int32_t* slots, const int32_t* present, const int32_t* counts, int max_slots,
                            cudaStream_t stream) {
  check_rows("penalties_batch", B, vocab);
  if (B == 0) return;
  const int threads = 256;
  // About four elements per thread; B rows side by side fill the GPU.
  int blocks = (vocab + threads * 4 - 1) / (threads * 4);
  blocks = blocks > 256 ? 256 : blocks;
  penalties_batch_kernel<<<dim3(blocks, B), threads, 0, stream>>>(logits, out, vocab, params, slots, present, counts,
                                                                  max_slots);
  HX_CUDA_CHECK(cudaGetLastError());
}

void argmax_launch(const float* logits, int vocab, int32_t* out, cudaStream_t stream) {
  check_vocab("argmax", vocab);
  launch_overlapped(argmax_kernel, 1, 1024, 0, stream, logits, vocab, out);
  HX_CUDA_CHECK(cudaGetLastError());
}

size_t argmax_workspace_bytes(int B, int vocab) {
  if (B <= 0 || vocab <= 0) return 0;
  return (size_t)B * argmax_split(vocab).slices * sizeof(float2);
}

void argmax_batch_launch(const float* logits, int B, int vocab, int32_t* out, cudaStream_t stream, void* workspace,
                         size_t workspace_bytes) {
  check_rows("argmax_batch", B, vocab);
  if (B == 0) return;
  const ArgmaxSplit sp = argmax_split(vocab);
  if (sp.slices > 1 && B <= 65535 && workspace != nullptr && workspace_bytes >= argmax_workspace_bytes(B, vocab) &&
      (reinterpret_cast<uintptr_t>(workspace) & 7) == 0) {
    float2* part = static_cast<float2*>(workspace);
    launch_overlapped(argmax_slice_kernel, dim3(sp.slices, B), kArgmaxThreads, 0, stream, logits, vocab, sp.per, part);
    HX_CUDA_CHECK(cudaGetLastError());
    launch_overlapped(argmax_pick_kernel, B, 32, 0, stream, static_cast<const float2*>(part), sp.slices, out);
    HX_CUDA_CHECK(cudaGetLastError());
    return;
  }
  launch_overlapped(argmax_kernel, B, 1024, 0, stream, logits, vocab, out);
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

namespace {

void check_sample_batch(int B, int vocab) {
  check_rows("sample_batch", B, vocab);
  if ((int64_t)B * vocab > INT_MAX)
    throw std::invalid_argument("sample_batch: B * vocab must be < 2^31, got " + std::to_string((int64_t)B * vocab));
}

}  // namespace

size_t sample_batch_workspace_bytes(int B, int vocab) {
  check_sample_batch(B, vocab);
  return B == 0 ? 0 : batch_layout(B, vocab, nullptr).total;
}

void sample_batch_launch(const float* logits, int B, int vocab, const SamplingParamsDevice* params,
                         const int32_t* steps, int32_t* out, void* workspace, size_t ws_bytes, cudaStream_t stream,
                         bool candidate_prefix, int32_t* sorted_in_full) {
  check_sample_batch(B, vocab);
  if (B == 0) return;
  const SampleBatchWs w = batch_layout(B, vocab, workspace);
  if (workspace == nullptr || ws_bytes < w.total)
    throw std::invalid_argument("sample_batch: workspace of " + std::to_string(ws_bytes) + " bytes, needs " +
                                std::to_string(w.total));
  const int nb = prep_blocks(vocab);
  const int id_bits = id_bits_for(vocab);
  const dim3 row_grid(nb, B);
  if (candidate_prefix) HX_CUDA_CHECK(cudaMemsetAsync(w.hist, 0, w.zero_bytes, stream));
  sample_batch_prep_kernel<<<row_grid, kPrepThreads, 0, stream>>>(logits, vocab, params, w.parts, w.hist,
                                                                  candidate_prefix);
  HX_CUDA_CHECK(cudaGetLastError());
  if (candidate_prefix) {
    sample_batch_select_kernel<<<B, kFinThreads, 0, stream>>>(params, w.hist, w.thr, w.expect);
    HX_CUDA_CHECK(cudaGetLastError());
    sample_batch_gather_kernel<<<row_grid, kPrepThreads, 0, stream>>>(logits, vocab, params, w.thr, w.expect, w.count,
                                                                      w.cand, id_bits);
    HX_CUDA_CHECK(cudaGetLastError());
  }
  sample_batch_prefix_kernel<<<B, kFinThreads, 0, stream>>>(logits, vocab, params, steps, w.parts, nb, w.expect,
                                                            w.count, w.cand, id_bits, candidate_prefix, w.seg_begin,
                                                            w.seg_end, out, sorted_in_full);
  HX_CUDA_CHECK(cudaGetLastError());
  // Rows marked above (none, usually) are sorted in full; empty segments cost a block exit.
  sample_batch_keys_kernel<<<row_grid, kPrepThreads, 0, stream>>>(logits, vocab, params, w.seg_begin, w.seg_end,
                                                                  w.keys[0], w.ids[0]);
  HX_CUDA_CHECK(cudaGetLastError());
  cub::DoubleBuffer<float> keys(w.keys[0], w.keys[1]);
  cub::DoubleBuffer<int32_t> ids(w.ids[0], w.ids[1]);
  size_t cub_bytes = w.cub_bytes;
  HX_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(w.cub_tmp, cub_bytes, keys, ids, B * vocab, B,
                                                                   (const int32_t*)w.seg_begin,
                                                                   (const int32_t*)w.seg_end, 0, 32, stream));
  sample_batch_full_kernel<<<B, kFinThreads, 0, stream>>>(keys.Current(), ids.Current(), w.parts, nb, vocab, params,
                                                          steps, w.seg_begin, w.seg_end, out);
  HX_CUDA_CHECK(cudaGetLastError());
}

void logprobs_launch(const float* logits, int vocab, int top_n, const int32_t* token, float* out_logprob,
                     int32_t* out_top_ids, float* out_top_lp, cudaStream_t stream) {
  check_vocab("logprobs", vocab);
  check_top_n(top_n, out_top_ids, out_top_lp);
  logprobs_kernel<<<1, kLpThreads, 0, stream>>>(logits, vocab, top_n, token, out_logprob, out_top_ids, out_top_lp);
  HX_CUDA_CHECK(cudaGetLastError());
}

void logprobs_batch_launch(const float* logits, int B, int vocab, int top_n, const int32_t* tokens, float* out_logprob,
                           int32_t* out_top_ids, float* out_top_lp, cudaStream_t stream) {
  check_rows("logprobs_batch", B, vocab);
  check_top_n(top_n, out_top_ids, out_top_lp);
  if (B == 0) return;
  logprobs_kernel<<<B, kLpThreads, 0, stream>>>(logits, vocab, top_n, tokens, out_logprob, out_top_ids, out_top_lp);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

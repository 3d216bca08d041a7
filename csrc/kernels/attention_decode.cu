// Decode attention (one query token per sequence) over the paged bf16 KV
// pool, flash-decoding style, for a batch of sequences.
//
//   out[b, h] = sum_t softmax_t(scale * q[b, h] . K[row_b(t)]) V[row_b(t)],  t < seq_len[b]
//   row_b(t) = table[b, t / block_size] * block_size + t % block_size
//
// Layout: q [batch, nq, d] float32, pool [nk, cap, d] bf16 (cap = pool
// blocks * block_size positions), block tables [batch, max_blocks] int32,
// GQA group G = nq / nk (q heads kvh*G .. kvh*G+G-1 read kv head kvh).
//
// Split kernel: grid (P splits, nk kv heads, batch * ceil(G / GT) head
// groups), 128 threads. P depends only on the batch size, max_blocks *
// block_size, the head counts and the device (one wave of resident blocks
// over the whole batch), so the launch is identical for every seq_len and
// every table (CUDA-graph replayable); each block derives its slice of its
// sequence from the seq_len in device memory:
//   chunk = round_up(ceil(seq_len / P), 32), split s covers [s*chunk, (s+1)*chunk).
// Splits past the end return at once. Paging: a warp's rows of one
// iteration are ROWS_W <= 16 consecutive positions starting at a multiple of
// ROWS_W, so with block_size a power of two >= 16 they lie in one KV block;
// the warp reads that block's id once (broadcast load, fetched one iteration
// ahead so its latency hides behind the K/V loads). Inside a CTA, a row of K
// or V is read by LPR = next_pow2(d / 8) lanes with one 16-byte load each
// (lanes past d/8 idle), so a warp reads 32/LPR consecutive rows per load
// instruction; each lane issues B loads of K and B of V before using any,
// which keeps enough bytes in flight to run near memory bandwidth. All GT q
// heads of the kv head reuse each loaded K/V row (the GQA sharing). Scores
// are reduced over the LPR lanes with xor shuffles; every row group keeps its
// own online-softmax state (max m, sum l, unnormalized acc in log2 domain),
// merged across row groups by shuffles and across warps in shared memory.
// The CTA writes (m, l, acc) for its split to the workspace.
// Combine kernel: one CTA per (sequence, q head) merges the valid splits:
//   out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s,
// and on request writes out's int8 matvec stage too (x_stage.cuh), so the
// o projection's int8 matvec needs no quantize launch.
// Float32 math on bf16 K/V, so results match a float32 reference on the same
// cache values to rounding. One arch path (sm_80+ baseline): the kernel is
// bandwidth-bound and plain 16-byte loads saturate HBM on every target.
#include "common/launch.cuh"
#include "kernels/attention_decode.cuh"

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"
#include "kernels/x_stage.cuh"

namespace hx {
namespace {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kChunkAlign = 32;    // chunk granularity in positions
constexpr int kMaxSplits = 256;    // workspace bound on splits per head
constexpr int kMinBlockSize = 16;  // smallest KV block: a warp's rows of one iteration fit in it
constexpr float kLog2e = 1.4426950408889634f;
// Finite "minus infinity" for running maxima: 2^(kNegBig - x) is 0 for any
// real score and 1 when both sides are kNegBig, so empty states merge cleanly.
constexpr float kNegBig = -1e30f;

__host__ __device__ __forceinline__ int decode_chunk(int seq, int splits) {
  const int c = (seq + splits - 1) / splits;
  return (c + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
}

__host__ inline int max_splits_for(int max_seq) {
  const int s = (max_seq + kChunkAlign - 1) / kChunkAlign;
  return s < kMaxSplits ? (s > 0 ? s : 1) : kMaxSplits;
}

// Block id `i` of a table, clamped into the pool so a bad entry can never
// address memory outside it.
__device__ __forceinline__ int pool_block(const int32_t* __restrict__ table, int i, int nblk) {
  const int v = __ldg(table + i);
  return (unsigned)v < (unsigned)nblk ? v : 0;
}

__device__ __forceinline__ void bf16x8_to_float(const uint4& r, float* f) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// Blocks per SM the register budget is sized for. GT = 4 fits 128 registers
// on sm_80..sm_90 but spills on sm_100, which gets 3 blocks' worth instead;
// the host reads the resulting occupancy back to size the grid.
template <int GT>
struct DecodeOccupancy {
  static constexpr int value = GT <= 2 ? 4 : (GT <= 4 ? (HX_BLACKWELL ? 3 : 4) : 2);
};

template <int LPR, int GT, int B>
__global__ void __launch_bounds__(kDecodeThreads, DecodeOccupancy<GT>::value) attn_decode_split_kernel(
    const float* __restrict__ q, const __nv_bfloat16* __restrict__ kc, const __nv_bfloat16* __restrict__ vc,
    const int32_t* __restrict__ seq_lens, const int32_t* __restrict__ tables,
    float* __restrict__ part_acc /*[batch*nq, P, d]*/, float2* __restrict__ part_ml /*[batch*nq, P]*/, int G,
    int groups, int nq, int d, int cap, int max_blocks, int bshift, int P, float qscale) {
  pdl_begin();
  constexpr int RG = 32 / LPR;          // row groups (rows per load instruction) per warp
  constexpr int ROWS_W = RG * B;        // rows per warp per iteration
  constexpr int ROWS_BLK = kDecodeWarps * ROWS_W;
  constexpr int DMAX = 8 * LPR;
  static_assert(ROWS_W <= kMinBlockSize && (ROWS_W & (ROWS_W - 1)) == 0,
                "a warp's rows of one iteration must lie in one KV block");

  __shared__ float sm_m[kDecodeWarps][GT];
  __shared__ float sm_l[kDecodeWarps][GT];
  __shared__ float sm_acc[kDecodeWarps][GT][DMAX];

  const int split = blockIdx.x, kvh = blockIdx.y;
  const int bi = blockIdx.z / groups;
  const int g0 = (blockIdx.z - bi * groups) * GT;
  const int gn = min(GT, G - g0);
  const int max_seq = max_blocks << bshift;
  int seq = seq_lens[bi];
  seq = seq < 0 ? 0 : (seq > max_seq ? max_seq : seq);
  const int chunk = decode_chunk(seq, P);
  const int start = split * chunk;
  if (start >= seq) return;
  const int end = min(start + chunk, seq);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rg = lane / LPR, li = lane % LPR;
  const int dim0 = li * 8;
  const bool active = dim0 < d;

  float qr[GT][8];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      qr[g][e] = (active && g < gn) ? q[((size_t)bi * nq + kvh * G + g0 + g) * d + dim0 + e] * qscale : 0.f;
  }
  float m[GT], l[GT], acc[GT][8];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    m[g] = kNegBig;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }

  const size_t head_off = (size_t)kvh * cap * d + dim0;
  const uint4* kb = reinterpret_cast<const uint4*>(kc + head_off);
  const uint4* vb = reinterpret_cast<const uint4*>(vc + head_off);
  const int row_vecs = d / 8;  // uint4 per row
  const int32_t* table = tables + (size_t)bi * max_blocks;
  const int nblk = cap >> bshift;
  const int in_block = (1 << bshift) - 1;

  int base = start + warp * ROWS_W;
  int next_blk = base < end ? pool_block(table, base >> bshift, nblk) : 0;
  for (; base < end; base += ROWS_BLK) {
    const int blk = next_blk;
    if (base + ROWS_BLK < end) next_blk = pool_block(table, (base + ROWS_BLK) >> bshift, nblk);
    // Pool row of position `base`; the warp's other rows follow it in the same block.
    const size_t row0 = ((size_t)blk << bshift) + (base & in_block);
    uint4 kr[B], vr[B];
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const int t = base + b * RG + rg;
      if (active && t < end) {
        const size_t row = row0 + b * RG + rg;
        kr[b] = __ldg(kb + row * row_vecs);
        vr[b] = __ldg(vb + row * row_vecs);
      } else {
        kr[b] = make_uint4(0, 0, 0, 0);
        vr[b] = make_uint4(0, 0, 0, 0);
      }
    }
    float s[B][GT];
#pragma unroll
    for (int b = 0; b < B; ++b) {
      float kf[8];
      bf16x8_to_float(kr[b], kf);
      const bool valid = base + b * RG + rg < end;
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(qr[g][e], kf[e], dot);
        dot = warp_sum<LPR>(dot);
        s[b][g] = valid ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      if (g >= gn) break;
      float mx = s[0][g];
#pragma unroll
      for (int b = 1; b < B; ++b) mx = fmaxf(mx, s[b][g]);
      const float mnew = fmaxf(m[g], mx);
      const float alpha = exp2f(m[g] - mnew);
      m[g] = mnew;
      l[g] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= alpha;
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const float p = exp2f(s[b][g] - mnew);
        l[g] += p;
        float vf[8];
        bf16x8_to_float(vr[b], vf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
      }
    }
  }

  // Merge the row groups of the warp.
#pragma unroll
  for (int off = LPR; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      const float mo = __shfl_xor_sync(kFullMask, m[g], off);
      const float lo = __shfl_xor_sync(kFullMask, l[g], off);
      const float mnew = fmaxf(m[g], mo);
      const float a = exp2f(m[g] - mnew), bo = exp2f(mo - mnew);
      l[g] = l[g] * a + lo * bo;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] = acc[g][e] * a + __shfl_xor_sync(kFullMask, acc[g][e], off) * bo;
      m[g] = mnew;
    }
  }
  if (rg == 0) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
#pragma unroll
      for (int e = 0; e < 8; ++e) sm_acc[warp][g][dim0 + e] = acc[g][e];
      if (li == 0) {
        sm_m[warp][g] = m[g];
        sm_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();

  // Merge the warps and write this split's partial state.
  for (int idx = threadIdx.x; idx < gn * d; idx += kDecodeThreads) {
    const int g = idx / d, c = idx - g * d;
    float M = sm_m[0][g];
#pragma unroll
    for (int w = 1; w < kDecodeWarps; ++w) M = fmaxf(M, sm_m[w][g]);
    float A = 0.f, L = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float f = exp2f(sm_m[w][g] - M);
      A += sm_acc[w][g][c] * f;
      L += sm_l[w][g] * f;
    }
    const size_t slot = ((size_t)bi * nq + kvh * G + g0 + g) * P + split;
    part_acc[slot * d + c] = A;
    if (c == 0) part_ml[slot] = make_float2(M, L);
  }
}

// One head's d outputs (in shared memory) into the int8 matvec stage of the
// whole [n / d heads, d] output, starting at element e0 (d % 32 == 0): the
// first d / 4 threads take 4 elements each, whole warps together.
__device__ __forceinline__ void stage_head(const float* so, uint8_t* x_stage, size_t n, size_t e0, int d) {
  using namespace matvec::dp4a;
  __syncthreads();
  const int t = threadIdx.x;
  if ((t & ~31) >= d / 4) return;  // warps past the head's groups
  const StageParts st = stage_parts<kStageTerms>(x_stage, n);
  const bool in = t < d / 4;
  float r[4] = {0.f, 0.f, 0.f, 0.f};
  if (in) {
    const float4 v = reinterpret_cast<const float4*>(so)[t];
    r[0] = v.x;
    r[1] = v.y;
    r[2] = v.z;
    r[3] = v.w;
  }
  quantize_group<kStageTerms>(WarpShuffle{}, r, e0 / 4 + t, in, st);
}

__global__ void __launch_bounds__(kDecodeThreads) attn_decode_combine_kernel(
    const float* __restrict__ part_acc, const float2* __restrict__ part_ml, const int32_t* __restrict__ seq_lens,
    float* __restrict__ out, int nq, int d, int max_seq, int P, uint8_t* __restrict__ x_stage) {
  pdl_begin();
  __shared__ float w[kMaxSplits];
  __shared__ float scratch[32];
  __shared__ __align__(16) float so[256];  // the head's output, for the stage
  const int h = blockIdx.x;  // sequence * nq + head
  int seq = seq_lens[h / nq];
  seq = seq < 0 ? 0 : (seq > max_seq ? max_seq : seq);
  float* o = out + (size_t)h * d;
  if (seq == 0) {
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
      o[c] = 0.f;
      so[c] = 0.f;
    }
    if (x_stage) stage_head(so, x_stage, (size_t)gridDim.x * d, (size_t)h * d, d);
    return;
  }
  const int chunk = decode_chunk(seq, P);
  const int ns = (seq + chunk - 1) / chunk;
  const float2* ml = part_ml + (size_t)h * P;
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < ns; s += blockDim.x) mx = fmaxf(mx, ml[s].x);
  const float M = block_max(mx, scratch);
  float lsum = 0.f;
  for (int s = threadIdx.x; s < ns; s += blockDim.x) {
    const float2 v = ml[s];
    const float f = exp2f(v.x - M);
    w[s] = f;
    lsum += f * v.y;
  }
  const float L = block_sum(lsum, scratch);  // its barriers also publish w[]
  const float inv = 1.0f / L;
  const float* a = part_acc + (size_t)h * P * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < ns; ++s) acc = fmaf(w[s], a[(size_t)s * d + c], acc);
    o[c] = acc * inv;
    so[c] = acc * inv;
  }
  if (x_stage) stage_head(so, x_stage, (size_t)gridDim.x * d, (size_t)h * d, d);
}

using SplitKernel = void (*)(const float*, const __nv_bfloat16*, const __nv_bfloat16*, const int32_t*, const int32_t*,
                             float*, float2*, int, int, int, int, int, int, int, int, float);

template <int LPR>
SplitKernel split_kernel_for(int GT) {
  switch (GT) {
    case 1: return attn_decode_split_kernel<LPR, 1, 4>;
    case 2: return attn_decode_split_kernel<LPR, 2, 4>;
    case 4: return attn_decode_split_kernel<LPR, 4, 4>;
    default: return attn_decode_split_kernel<LPR, 8, 2>;
  }
}

// Resident blocks per SM of a split kernel instance, cached per device and
// instance (LPR 8/16/32 x GT 1/2/4/8 = 12 instances).
int resident_blocks(SplitKernel k, int slot, int device) {
  static std::atomic<int> cache[detail::kMaxDevices][12];
  const bool cacheable = device >= 0 && device < detail::kMaxDevices;
  int v = cacheable ? cache[device][slot].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    HX_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, k, kDecodeThreads, 0));
    v = v > 0 ? v : 1;
    if (cacheable) cache[device][slot].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Kernel instance, head groups and split count of one launch shape. P is a
// function of the sizes and the device only, never of the sequences'
// lengths or tables.
struct DecodePlan {
  SplitKernel kernel;
  int G, GT, groups, P;
};

DecodePlan plan_decode(int batch, int nq, int nk, int d, int max_seq) {
  DecodePlan p{};
  p.G = nq / nk;
  p.GT = p.G <= 1 ? 1 : (p.G <= 2 ? 2 : (p.G <= 4 ? 4 : 8));
  p.groups = (p.G + p.GT - 1) / p.GT;
  const int lpr = d <= 64 ? 8 : (d <= 128 ? 16 : 32);
  p.kernel =
      lpr == 8 ? split_kernel_for<8>(p.GT) : (lpr == 16 ? split_kernel_for<16>(p.GT) : split_kernel_for<32>(p.GT));
  // One full wave of resident blocks over the whole batch when sequences
  // are long: fewer splits leave SMs idle, more only add partial states to merge.
  const int dev = current_device();
  const int slot = (lpr == 8 ? 0 : (lpr == 16 ? 4 : 8)) + (p.GT == 1 ? 0 : (p.GT == 2 ? 1 : (p.GT == 4 ? 2 : 3)));
  const int64_t wave = (int64_t)resident_blocks(p.kernel, slot, dev) * device_sm_count(dev);
  const int64_t per_split = (int64_t)nk * p.groups * batch;
  const int64_t want = (wave + per_split - 1) / per_split;
  const int pmax = max_splits_for(max_seq);
  p.P = want < 1 ? 1 : (want > pmax ? pmax : (int)want);
  return p;
}

void check_decode_sizes(int batch, int nq, int nk, int d, int cap, int max_blocks, int block_size) {
  if (batch < 0 || nq <= 0 || nk <= 0 || cap <= 0 || nq % nk != 0)
    throw std::invalid_argument("attention_decode: bad sizes batch=" + std::to_string(batch) +
                                " nq=" + std::to_string(nq) + " nk=" + std::to_string(nk) +
                                " (nq must be a multiple of nk) cap=" + std::to_string(cap));
  if (d <= 0 || d % 8 != 0 || d > 256)
    throw std::invalid_argument("attention_decode: head_dim " + std::to_string(d) +
                                " unsupported (needs a multiple of 8, at most 256)");
  if (block_size < kMinBlockSize || (block_size & (block_size - 1)) != 0 || cap % block_size != 0)
    throw std::invalid_argument("attention_decode: block_size " + std::to_string(block_size) +
                                " must be a power of two >= " + std::to_string(kMinBlockSize) +
                                " dividing the pool's " + std::to_string(cap) + " positions");
  if (max_blocks <= 0 || (int64_t)max_blocks * block_size > INT32_MAX)
    throw std::invalid_argument("attention_decode: bad max_blocks " + std::to_string(max_blocks));
}

}  // namespace

size_t attention_decode_workspace_bytes(int batch, int nq, int nk, int d, int max_seq) {
  if (batch <= 0 || nq <= 0 || nk <= 0 || nq % nk != 0 || d <= 0 || max_seq <= 0) return 0;
  const DecodePlan p = plan_decode(batch, nq, nk, d, max_seq);
  return (size_t)batch * nq * p.P * (size_t)(d + 2) * sizeof(float);
}

void attention_decode_launch(const float* q, const __nv_bfloat16* kc, const __nv_bfloat16* vc, const int32_t* seq_lens,
                             const int32_t* block_tables, int max_blocks, int block_size, float* out, float* workspace,
                             size_t workspace_bytes, int batch, int nq, int nk, int d, int cap, float scale,
                             cudaStream_t stream, uint8_t* x_stage) {
  check_decode_sizes(batch, nq, nk, d, cap, max_blocks, block_size);
  if (x_stage && (d % 32 != 0 || reinterpret_cast<uintptr_t>(x_stage) % 16 != 0))
    throw std::invalid_argument("attention_decode: an int8 stage needs head_dim % 32 == 0 (head_dim=" +
                                std::to_string(d) + ") and a 16-byte aligned stage");
  if ((reinterpret_cast<uintptr_t>(kc) | reinterpret_cast<uintptr_t>(vc)) % 16 != 0)
    throw std::invalid_argument("attention_decode: K/V pool pointers must be 16-byte aligned");
  if (batch == 0) return;
  if (seq_lens == nullptr || block_tables == nullptr)
    throw std::invalid_argument("attention_decode: seq_lens and block_tables are required");
  const int max_seq = max_blocks * block_size;
  const DecodePlan p = plan_decode(batch, nq, nk, d, max_seq);
  const size_t need = (size_t)batch * nq * p.P * (size_t)(d + 2) * sizeof(float);
  if (workspace == nullptr || workspace_bytes < need)
    throw std::invalid_argument("attention_decode: workspace of " + std::to_string(workspace_bytes) + " bytes, needs " +
                                std::to_string(need));
  if ((int64_t)batch * p.groups > 65535)
    throw std::invalid_argument("attention_decode: batch " + std::to_string(batch) + " is too large for one launch");
  int bshift = 0;
  while ((1 << bshift) < block_size) ++bshift;

  float* part_acc = workspace;
  float2* part_ml = reinterpret_cast<float2*>(workspace + (size_t)batch * nq * p.P * d);
  const dim3 grid(p.P, nk, batch * p.groups);
  launch_overlapped(p.kernel, grid, kDecodeThreads, 0, stream, q, kc, vc, seq_lens, block_tables, part_acc, part_ml,
                    p.G, p.groups, nq, d, cap, max_blocks, bshift, p.P, scale * kLog2e);
  HX_CUDA_CHECK(cudaGetLastError());
  launch_overlapped(attn_decode_combine_kernel, batch * nq, kDecodeThreads, 0, stream, part_acc, part_ml, seq_lens, out,
                    nq, d, max_seq, p.P, x_stage);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

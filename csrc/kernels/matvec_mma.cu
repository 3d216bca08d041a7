// The fragment matvecs: Q4_K products of 1..8 tokens on tensor cores, with
// the weights decoded straight into mma.sync fragments (no shared-memory
// stage); and bf16 products of 1..32 tokens, the weights loaded into the
// fragments as they are (below, after the Q4_K kernel).
//
//   y[t, i] = (accumulate ? y[t, i] : 0) + bias[i] + sum_j W[i, j] x~[t, j]
//
// where x~ is x rounded to 11 significant bits (fp16 after a power-of-two
// scale per token and 256-element super-block, so no activation overflows or
// goes subnormal), and the products are summed in fp32.
//
// Why: the float matvec spends about four instructions on every 4-bit weight
// (a PRMT and an FMA per element plus its share of the scale decode and the
// activation loads), which caps a Q4_K product near 2 TB/s on an H100. Here a
// weight costs about one: a LOP3 makes two of them fp16 numbers 1024 + q (or
// 1024 + 16 q for high nibbles) at once, one HFMA2 turns the pair into the
// exact integers sc * q (sc the 6-bit sub-block scale; at most 945, exact in
// fp16), and the MMA does the multiply-adds, eight tokens for the price of one.
//
// Layout: a warp owns 16 rows (a row tile) and a set of super-blocks (its
// k-split: s = ks, ks + KS, ...). Lane (g = lane / 4, c = lane % 4) reads,
// for rows g and g + 8, the 16-byte header and the 32 quant bytes of
// sub-block pair c (bytes 16 + 32c .. of the 144): low nibbles are elements
// 64c .. 64c + 31 (sub-block 2c), high nibbles 64c + 32 .. (sub-block 2c + 1).
// The dot product's order over k is free, so each MMA takes one 4-byte word
// of every lane: word i's low nibbles fill the A fragment of one MMA (bytes 0
// and 2 in a0/a1, bytes 1 and 3 in a2/a3), its high nibbles another; the B
// fragment is token g's four activations of those elements, which the prep
// kernel stored in the order (x0, x2, x1, x3) so that one 8-byte load is both
// registers, and the four lanes c of a word side by side (one 32-byte
// sector per load at one token). The sub-block scale is already in A, so one fp32 accumulator
// per super-block serves all eight sub-blocks; then
//   sum_j w_j x_j = d * sum_j sc q x  -  dmin * sum_sub m * sum_{j in sub} x,
// the second sum a ninth MMA: A holds the lane's two mins, B the token's
// sub-block sums (as a mean, hi + lo fp16 halves, so they stay exact to
// about 2^-22). d, dmin and the scale undo apply in fp32 per super-block.
//
// Warps of a CTA that share a row tile (k-splits) add their sums in shared
// memory in a fixed order: results never depend on scheduling. sm_80+.
#include "kernels/matvec_mma.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "common/arch.cuh"
#include "common/check.h"
#include "common/launch.cuh"
#include "kernels/mma_sync.cuh"
#include "kernels/quant_blocks.cuh"

namespace hx {
namespace matvec {
namespace mma {
namespace {

__device__ __forceinline__ uint32_t h2_bits(__half2 v) { return *reinterpret_cast<uint32_t*>(&v); }
__device__ __forceinline__ __half2 bits_h2(uint32_t v) { return *reinterpret_cast<__half2*>(&v); }

// The prep of one (token, super-block) item by one warp, into `out` (the
// scratch layout, global or shared memory): lane l takes elements 8l .. 8l + 7.
__device__ __forceinline__ void prep_item(const Params& p, int item, int lane, uint8_t* out) {
  const int tok = item / p.nsb, s = item - tok * p.nsb;
  const size_t at = (size_t)tok * p.k + s * 256 + 8 * lane;
  float e[8];
  if (p.xb != nullptr) {
    // bf16: its bits are a float's upper half.
    const uint4 b = *reinterpret_cast<const uint4*>(p.xb + at);
    const uint32_t w[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      e[2 * i] = __uint_as_float(w[i] << 16);
      e[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else {
    const float4 u = *reinterpret_cast<const float4*>(p.x + at), v = *reinterpret_cast<const float4*>(p.x + at + 4);
    e[0] = u.x, e[1] = u.y, e[2] = u.z, e[3] = u.w, e[4] = v.x, e[5] = v.y, e[6] = v.z, e[7] = v.w;
  }
  float m = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(e[i]));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  // The block's largest |x| lands in [2^14, 2^15): far from fp16's overflow,
  // and elements down to 2^-29 of it stay normal.
  int ex = 0;
  if (m > 0.f && isfinite(m)) frexpf(m, &ex);
  ex = max(ex, -100);  // a block of (near) zeros: any scale serves, keep 2^(15 - ex) finite
  const float scale = ldexpf(1.f, 15 - ex), inv = ldexpf(1.f, ex - 15);
  __half h[8];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    h[i] = __float2half_rn(e[i] * scale);
    sum += __half2float(h[i]);
  }
  // Groups of four q = 2 lane, 2 lane + 1 go to word q % 16 of pair q / 16.
  uint2* xw = reinterpret_cast<uint2*>(out) + ((size_t)tok * p.nsb + s) * 64 + (lane / 8);
  const int r = (2 * lane) % 16;
  xw[4 * r] = make_uint2(h2_bits(__halves2half2(h[0], h[2])), h2_bits(__halves2half2(h[1], h[3])));
  xw[4 * (r + 1)] = make_uint2(h2_bits(__halves2half2(h[4], h[6])), h2_bits(__halves2half2(h[5], h[7])));
  // Sub-block j = lane / 4 is lanes 4j .. 4j + 3.
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  const float mean = sum * (1.f / 32.f);
  const float next = __shfl_down_sync(0xffffffffu, mean, 4);  // lane 8c: sub-block 2c + 1
  if ((lane & 7) == 0) {
    const __half h0 = __float2half_rn(mean), h1 = __float2half_rn(next);
    const __half l0 = __float2half_rn(mean - __half2float(h0)), l1 = __float2half_rn(next - __half2float(h1));
    uint2 w;
    w.x = h2_bits(__halves2half2(h0, h1));
    w.y = h2_bits(__halves2half2(l0, l1));
    reinterpret_cast<uint2*>(out + p.lay.xs_off)[((size_t)tok * p.nsb + s) * 4 + lane / 8] = w;
  }
  float* invp = reinterpret_cast<float*>(out + p.lay.inv_off) + (size_t)s * kTokens;
  if (lane == 0) invp[tok] = inv;
  if (tok == 0 && lane >= p.ntok && lane < kTokens) invp[lane] = 1.f;  // slots the product reads but never writes out
}

// Prep into the global scratch: one warp per (token, super-block). It
// triggers its dependents before it waits: the product's weight loads then
// overlap the kernel before this one, and the product still waits for this
// whole grid (which finishes only after that kernel) before it reads x16.
__global__ void __launch_bounds__(256) prep_kernel(const Params p) {
#if HX_HAS_PDL
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  const int item = blockIdx.x * blockDim.y + threadIdx.y;
  if (item < p.ntok * p.nsb) prep_item(p, item, threadIdx.x, p.scratch);
}

// Largest prepared x (scratch_layout bytes) a CTA builds in its own shared
// memory instead (one token up to k = 18204): no prep launch, and no round
// trip of x16 through L2 between two grids.
constexpr size_t kLocalBytes = 40 * 1024;  // plus the 4 KB reduction buffer: under the 48 KB default

template <bool kLocal, class T>
__device__ __forceinline__ T ld_x(const T* q) {
  if constexpr (kLocal)
    return *q;
  else
    return __ldg(q);
}

// A weight chunk: streamed past L1, and volatile so the compiler keeps it
// under its guard (the prefetch of a super-block past the last is skipped).
__device__ __forceinline__ uint4 ld_weights(const uint8_t* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// One row's fold constants for pair c, from its 16-byte header:
//   lo nibbles (1024 + q):      sc_lo * v - 1024 sc_lo        = sc_lo q
//   hi nibbles (1024 + 16 q):   (sc_hi / 16) * v - 64 sc_hi   = sc_hi q
// (each an exact fp16 integer: the FMA rounds once, and sc q <= 945), the
// two mins as fp16 for the min MMA, and d, dmin in fp32.
struct RowScales {
  __half2 s_lo, b_lo, s_hi, b_hi;
  uint32_t mins;
  float d, dmin;
};
__device__ __forceinline__ RowScales row_scales(const uint4 h, int c) {
  using B = quant::Block<GgmlType::Q4_K>;
  const uint32_t w = B::scale_min_pair(h.y, h.z, h.w, c);  // bytes [sc(2c), sc(2c+1), m(2c), m(2c+1)]
  const __half2 k1024 = __float2half2_rn(1024.f);
  RowScales r;
  // prmt with 0x64 bytes: fp16 1024 + byte, exact for bytes < 1024.
  const __half2 sl = __hsub2(bits_h2(__byte_perm(w, 0x64646464u, 0x4040)), k1024);
  const __half2 sh =
      __hfma2(bits_h2(__byte_perm(w, 0x64646464u, 0x4141)), __float2half2_rn(1.f / 16.f), __float2half2_rn(-64.f));
  r.s_lo = sl;
  r.b_lo = __hmul2(sl, __float2half2_rn(-1024.f));
  r.s_hi = sh;
  r.b_hi = __hmul2(sh, __float2half2_rn(-1024.f));
  r.mins = h2_bits(__hsub2(bits_h2(__byte_perm(w, 0x64646464u, 0x4342)), k1024));
  r.d = __half2float(__ushort_as_half((unsigned short)(h.x & 0xffffu)));
  r.dmin = __half2float(__ushort_as_half((unsigned short)(h.x >> 16)));
  return r;
}

__device__ __forceinline__ uint32_t u4_word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

template <bool kLocal>
__global__ void __launch_bounds__(kWarps * 32, 2) q4k_kernel(const Params p) {
  __shared__ float4 red[kWarps][32];
  extern __shared__ uint4 local[];  // kLocal: the prepared x (scratch layout)
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int KS = p.ks;
  const int ks = warp % KS, tile = blockIdx.x * (kWarps / KS) + warp / KS;
  const int g = lane >> 2, c = lane & 3;
  const int row0 = tile * 16 + g, row1 = row0 + 8;
  // Rows past the end re-read the last one; their sums are never written.
  const uint8_t* w0 = p.w + (size_t)min(row0, p.n_out - 1) * p.row_bytes;
  const uint8_t* w1 = p.w + (size_t)min(row1, p.n_out - 1) * p.row_bytes;
  const int tok = min(g, p.ntok - 1);
  const uint8_t* prep = kLocal ? reinterpret_cast<const uint8_t*>(local) : p.scratch;
  const uint2* x16 = reinterpret_cast<const uint2*>(prep) + (size_t)tok * p.nsb * 64 + c;
  const uint2* xs = reinterpret_cast<const uint2*>(prep + p.lay.xs_off) + (size_t)tok * p.nsb * 4 + c;
  const float* invs = reinterpret_cast<const float*>(prep + p.lay.inv_off) + 2 * c;

  uint4 cur[6], nxt[6];
  auto load = [&](int s, uint4(&b)[6]) {
    const uint8_t* q0 = w0 + (size_t)s * kSbBytes;
    const uint8_t* q1 = w1 + (size_t)s * kSbBytes;
    b[0] = ld_weights(q0);
    b[1] = ld_weights(q0 + 16 + 32 * c);
    b[2] = ld_weights(q0 + 32 + 32 * c);
    b[3] = ld_weights(q1);
    b[4] = ld_weights(q1 + 16 + 32 * c);
    b[5] = ld_weights(q1 + 32 + 32 * c);
  };

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  // Weights never change: the first super-block's loads go out before the
  // wait for the prep kernel (launch.cuh).
  if (!p.static_w) pdl_begin();
  if (ks < p.nsb) load(ks, cur);
  if (p.static_w) pdl_begin();
  if constexpr (kLocal) {
    // The CTA prepares x itself, its warps taking the (token, super-block) items in turn.
    for (int item = warp; item < p.ntok * p.nsb; item += kWarps)
      prep_item(p, item, lane, reinterpret_cast<uint8_t*>(local));
    __syncthreads();
  }
  for (int s = ks; s < p.nsb; s += KS) {
    if (s + KS < p.nsb) load(s + KS, nxt);
    // Token tok's activations of this super-block's pair c: word i's lo run
    // is uint2 4i (+ c, in x16), its hi run uint2 4 (8 + i).
    const uint2* xp = x16 + (size_t)s * 64;
    const uint2 xsum = ld_x<kLocal>(xs + (size_t)s * 4);
    const float2 inv = ld_x<kLocal>(reinterpret_cast<const float2*>(invs + (size_t)s * kTokens));
    const RowScales r0 = row_scales(cur[0], c), r1 = row_scales(cur[3], c);

    float dlo[4] = {0.f, 0.f, 0.f, 0.f}, dhi[4] = {0.f, 0.f, 0.f, 0.f}, dmn[4] = {0.f, 0.f, 0.f, 0.f};
    constexpr uint32_t kMagic = 0x64006400u;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t q0 = u4_word(i < 4 ? cur[1] : cur[2], i & 3);
      const uint32_t q1 = u4_word(i < 4 ? cur[4] : cur[5], i & 3);
      const uint32_t q0s = q0 >> 8, q1s = q1 >> 8;
      // Row g / g + 8, elements (e0, e2) and (e1, e3) of the word's runs.
      const uint32_t a0 = h2_bits(__hfma2(bits_h2((q0 & 0x000f000fu) | kMagic), r0.s_lo, r0.b_lo));
      const uint32_t a1 = h2_bits(__hfma2(bits_h2((q1 & 0x000f000fu) | kMagic), r1.s_lo, r1.b_lo));
      const uint32_t a2 = h2_bits(__hfma2(bits_h2((q0s & 0x000f000fu) | kMagic), r0.s_lo, r0.b_lo));
      const uint32_t a3 = h2_bits(__hfma2(bits_h2((q1s & 0x000f000fu) | kMagic), r1.s_lo, r1.b_lo));
      const uint32_t b0 = h2_bits(__hfma2(bits_h2((q0 & 0x00f000f0u) | kMagic), r0.s_hi, r0.b_hi));
      const uint32_t b1 = h2_bits(__hfma2(bits_h2((q1 & 0x00f000f0u) | kMagic), r1.s_hi, r1.b_hi));
      const uint32_t b2 = h2_bits(__hfma2(bits_h2((q0s & 0x00f000f0u) | kMagic), r0.s_hi, r0.b_hi));
      const uint32_t b3 = h2_bits(__hfma2(bits_h2((q1s & 0x00f000f0u) | kMagic), r1.s_hi, r1.b_hi));
      const uint2 xa = ld_x<kLocal>(xp + 4 * i), xb = ld_x<kLocal>(xp + 4 * (8 + i));
      mma_f16(dlo, a0, a1, a2, a3, xa.x, xa.y);
      mma_f16(dhi, b0, b1, b2, b3, xb.x, xb.y);
    }
    mma_f16(dmn, r0.mins, r1.mins, r0.mins, r1.mins, xsum.x, xsum.y);
    // D: [0] row g token 2c, [1] row g token 2c + 1, [2] / [3] row g + 8.
    const float m0 = 32.f * r0.dmin, m1 = 32.f * r1.dmin;
    acc[0] = fmaf(fmaf(r0.d, dlo[0] + dhi[0], -m0 * dmn[0]), inv.x, acc[0]);
    acc[1] = fmaf(fmaf(r0.d, dlo[1] + dhi[1], -m0 * dmn[1]), inv.y, acc[1]);
    acc[2] = fmaf(fmaf(r1.d, dlo[2] + dhi[2], -m1 * dmn[2]), inv.x, acc[2]);
    acc[3] = fmaf(fmaf(r1.d, dlo[3] + dhi[3], -m1 * dmn[3]), inv.y, acc[3]);
#pragma unroll
    for (int j = 0; j < 6; ++j) cur[j] = nxt[j];
  }

  // The k-splits of a row tile meet in shared memory, added in split order.
  red[warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  __syncthreads();
  if (ks != 0) return;
  float4 t = red[warp][lane];
  for (int j = 1; j < KS; ++j) {
    const float4 o = red[warp + j][lane];
    t.x += o.x;
    t.y += o.y;
    t.z += o.z;
    t.w += o.w;
  }
  const float v[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int row = j < 2 ? row0 : row1, tk = 2 * c + (j & 1);
    if (row < p.n_out && tk < p.ntok) {
      float* out = p.y + (size_t)tk * p.n_out + row;
      float val = v[j];
      if (p.bias) val += p.bias[row];
      if (p.accumulate) val += *out;
      *out = val;
    }
  }
}

// ---------------------------------------------------------------------------
// bf16 weights: no decode at all. Lane (g, c) loads, for rows g and g + 8 of
// its tile, the 16 bytes at elements 8c .. 8c + 7 and 32 + 8c .. 32 + 8c + 7
// of a 64-element chunk (four lanes cover 64 contiguous bytes of a row per
// load). Each 16-byte piece is two MMAs' A registers: words 0 and 1 are
// k-slots (2c, 2c + 1) and (2c + 8, 2c + 9) of the first, words 2 and 3 of
// the second. The k order is free, so the B fragment of token g is simply x's
// 16 bytes at the same elements: no prep, x is read in place.
//
// fp32 x (kSplit, up to 4 tokens): column 2t holds token t rounded to bf16
// (hi), column 2t + 1 the rest rounded again (lo = bf16(x - hi)), each lane
// making its column's values from x's 32 bytes. bf16 products are exact in
// fp32, so y = D[2t] + D[2t + 1] carries x to about 16 significant bits, as
// close to a float product as makes no difference, in columns one token
// would leave empty.

// Chunks in flight per warp beyond the one being multiplied (2 KB each).
constexpr int kDenseDepth = 2;

// Column g's 8 bf16 values (an MMA pair's B registers) of fp32 x at xp:
// x rounded (hi), or with `lo` what rounding x left out, rounded.
__device__ __forceinline__ uint4 split_x(const float* xp, bool lo) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(xp)), b = __ldg(reinterpret_cast<const float4*>(xp) + 1);
  const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  // Without a branch (lanes of both kinds share a warp): x + m bf16(x), m 0
  // or -1, exact either way (x - bf16(x) is representable).
  const float m = lo ? -1.f : 0.f;
  uint32_t r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float e0 = fmaf(m, __bfloat162float(__float2bfloat16_rn(v[2 * i])), v[2 * i]);
    const float e1 = fmaf(m, __bfloat162float(__float2bfloat16_rn(v[2 * i + 1])), v[2 * i + 1]);
    r[i] = pack_bf16(e0, e1);
  }
  return make_uint4(r[0], r[1], r[2], r[3]);
}

template <int NT, bool kSplit>
__global__ void __launch_bounds__(kWarps * 32, 2) bf16_kernel(const DenseParams p) {
  static_assert(!kSplit || NT == 1, "split x fills one tile");
  __shared__ float4 red[kWarps][NT][32];
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int KS = p.ks;
  const int ks = warp % KS, tile = blockIdx.x * (kWarps / KS) + warp / KS;
  const int g = lane >> 2, c = lane & 3;
  const int row0 = tile * 16 + g, row1 = row0 + 8;
  // Rows past the end re-read the last one; tokens past ntok the last token.
  // Their sums are never written.
  const uint4* w0 = reinterpret_cast<const uint4*>(p.w + (size_t)min(row0, p.n_out - 1) * p.k) + c;
  const uint4* w1 = reinterpret_cast<const uint4*>(p.w + (size_t)min(row1, p.n_out - 1) * p.k) + c;
  const uint4* xr[NT];
  const float* xf = nullptr;
  if constexpr (kSplit) {
    xf = p.xf + (size_t)min(g >> 1, p.ntok - 1) * p.k + 8 * c;
  } else {
#pragma unroll
    for (int t = 0; t < NT; ++t)
      xr[t] = reinterpret_cast<const uint4*>(p.x + (size_t)min(8 * t + g, p.ntok - 1) * p.k) + c;
  }

  // Chunk s is uint4 8 s (+ c) of a row; its second half 8 s + 4.
  auto load = [&](int s, uint4(&b)[4]) {
    b[0] = ld_weights(reinterpret_cast<const uint8_t*>(w0 + 8 * s));
    b[1] = ld_weights(reinterpret_cast<const uint8_t*>(w0 + 8 * s + 4));
    b[2] = ld_weights(reinterpret_cast<const uint8_t*>(w1 + 8 * s));
    b[3] = ld_weights(reinterpret_cast<const uint8_t*>(w1 + 8 * s + 4));
  };

  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
  uint4 buf[kDenseDepth][4];
  // Weights never change: the first chunks' loads go out before the wait.
  if (!p.static_w) pdl_begin();
#pragma unroll
  for (int u = 0; u < kDenseDepth; ++u)
    if (ks + u * KS < p.nch) load(ks + u * KS, buf[u]);
  if (p.static_w) pdl_begin();
  const int step = kDenseDepth * KS;
  for (int s0 = ks; s0 < p.nch; s0 += step) {
#pragma unroll
    for (int u = 0; u < kDenseDepth; ++u) {
      const int s = s0 + u * KS;
      if (s < p.nch) {
        uint4 cur[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) cur[j] = buf[u][j];
        if (s + step < p.nch) load(s + step, buf[u]);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          uint4 xl, xh;
          if constexpr (kSplit) {
            xl = split_x(xf + 64 * s, g & 1);
            xh = split_x(xf + 64 * s + 32, g & 1);
          } else {
            xl = __ldg(xr[t] + 8 * s);
            xh = __ldg(xr[t] + 8 * s + 4);
          }
          mma_bf16(acc[t], cur[0].x, cur[2].x, cur[0].y, cur[2].y, xl.x, xl.y);
          mma_bf16(acc[t], cur[0].z, cur[2].z, cur[0].w, cur[2].w, xl.z, xl.w);
          mma_bf16(acc[t], cur[1].x, cur[3].x, cur[1].y, cur[3].y, xh.x, xh.y);
          mma_bf16(acc[t], cur[1].z, cur[3].z, cur[1].w, cur[3].w, xh.z, xh.w);
        }
      }
    }
  }

  // The k-splits of a row tile meet in shared memory, added in split order.
#pragma unroll
  for (int t = 0; t < NT; ++t) red[warp][t][lane] = make_float4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
  __syncthreads();
  if (ks != 0) return;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    float4 sum = red[warp][t][lane];
    for (int j = 1; j < KS; ++j) {
      const float4 o = red[warp + j][t][lane];
      sum.x += o.x;
      sum.y += o.y;
      sum.z += o.z;
      sum.w += o.w;
    }
    // D: [0] row g column 2c, [1] row g column 2c + 1, [2] / [3] row g + 8;
    // split x: columns 2c and 2c + 1 are token c's hi and lo.
    constexpr int kOuts = kSplit ? 2 : 4;
    float v[4];
    if constexpr (kSplit) {
      v[0] = sum.x + sum.y;
      v[1] = sum.z + sum.w;
    } else {
      v[0] = sum.x, v[1] = sum.y, v[2] = sum.z, v[3] = sum.w;
    }
#pragma unroll
    for (int j = 0; j < kOuts; ++j) {
      const int row = (kSplit ? j == 0 : j < 2) ? row0 : row1;
      const int tk = kSplit ? c : 8 * t + 2 * c + (j & 1);
      if (row < p.n_out && tk < p.ntok) {
        const int base = row < p.s1 ? 0 : (row < p.s2 ? p.s1 : p.s2);
        const int len = (row < p.s1 ? p.s1 : (row < p.s2 ? p.s2 : p.n_out)) - base;
        float* out = p.y + (size_t)p.ntok * base + (size_t)tk * len + (row - base);
        float val = v[j];
        if (p.bias) val += p.bias[row];
        if (p.accumulate) val += *out;
        *out = val;
      }
    }
  }
}

// CTAs of `kernel` (256 threads, no dynamic shared memory) one SM holds at
// once, asked once per device for each kernel (registers bound it: the Q4_K
// local variant's shared stage never lowers it).
template <auto kernel>
int resident(int device) {
  constexpr int kDevices = 64;
  static std::atomic<int> table[kDevices];
  if (device >= 0 && device < kDevices) {
    const int v = table[device].load(std::memory_order_acquire);
    if (v > 0) return v;
  }
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kWarps * 32, 0) != cudaSuccess) n = 1;
  (void)cudaGetLastError();
  n = std::max(n, 1);
  if (device >= 0 && device < kDevices) table[device].store(n, std::memory_order_release);
  return n;
}

// k-splits asked for by HELEXA_MV_MMA_SPLITS (1, 2, 4 or 8; unset: planned), for A/B runs.
int forced_splits() {
  static const int v = [] {
    const char* e = std::getenv("HELEXA_MV_MMA_SPLITS");
    const int n = e && *e ? std::atoi(e) : 0;
    return n == 1 || n == 2 || n == 4 || n == 8 ? n : 0;
  }();
  return v;
}

// k-splits of a grid of `tiles` row tiles over `steps` k steps (at most
// kWarps, no more than steps), for `sms` SMs holding `per_sm` CTAs each.
// CTAs do equal work and the busiest SM sets the time, so a split is rated by
// ceil(C / sms) / C for its C CTAs (1 / sms: perfectly even). The best rating
// wins; within 2% of it, a split whose grid is resident at once in its
// largest form (most warps in flight), else the smallest (fewest CTAs to
// start). An H100, gate|up 28672 x 4096 in bf16: 224 CTAs of one split
// (92 SMs taking two, 40 one) 91 us against cuBLAS's 78.
// HELEXA_MV_MMA_SPLITS overrides.
int plan_splits(long tiles, int steps, int sms, int per_sm) {
  if (forced_splits() > 0) {
    int ks = forced_splits();
    while (ks > 1 && ks > steps) ks /= 2;
    return ks;
  }
  sms = std::max(sms, 1);
  double best = 0.;
  double rate[kWarps + 1] = {};
  for (int ks = 1; ks <= kWarps && (ks == 1 || ks <= steps); ks *= 2) {
    const long ctas = (tiles + kWarps / ks - 1) / (kWarps / ks);
    rate[ks] = (double)((ctas + sms - 1) / sms) / (double)ctas;  // per-SM share of the work: lower is better
    if (best == 0. || rate[ks] < best) best = rate[ks];
  }
  int one_wave = 0, smallest = 0;
  for (int ks = 1; ks <= kWarps && rate[ks] > 0.; ks *= 2) {
    if (rate[ks] > 1.02 * best) continue;
    const long ctas = (tiles + kWarps / ks - 1) / (kWarps / ks);
    if (ctas <= (long)sms * per_sm) one_wave = ks;
    if (smallest == 0) smallest = ks;
  }
  return one_wave > 0 ? one_wave : smallest;
}

}  // namespace

// The prep (the kernel, or each CTA for a small stage when asked), then the
// product, its k-splits from plan_splits.
void run_q4k(Params p, int device, int sms, cudaStream_t stream) {
  p.nsb = p.k / 256;
  p.lay = scratch_layout(p.ntok, p.k);
  const bool local = p.local && p.lay.bytes <= kLocalBytes;
  if (!local) {
    const int items = p.ntok * p.nsb;
    launch_overlapped(prep_kernel, (items + 7) / 8, dim3(32, 8), 0, stream, p);
    HX_CUDA_CHECK(cudaGetLastError());
  }
  const long tiles = (p.n_out + 15) / 16;
  p.ks = plan_splits(tiles, p.nsb, sms, resident<q4k_kernel<false>>(device));
  const int ks = p.ks;
  const int per = kWarps / ks;
  if (local)
    launch_overlapped(q4k_kernel<true>, (int)((tiles + per - 1) / per), dim3(32, kWarps), p.lay.bytes, stream, p);
  else
    launch_overlapped(q4k_kernel<false>, (int)((tiles + per - 1) / per), dim3(32, kWarps), 0, stream, p);
  HX_CUDA_CHECK(cudaGetLastError());
}

// Tiles of 8 tokens: 1, 2 or 4 (up to kDenseTokens), or fp32 x split into
// one tile; k-splits from plan_splits.
template <int NT, bool kSplit>
static void launch_bf16(DenseParams& p, int device, int sms, cudaStream_t stream) {
  const long tiles = (p.n_out + 15) / 16;
  p.ks = plan_splits(tiles, p.nch, sms, resident<bf16_kernel<NT, kSplit>>(device));
  const int per = kWarps / p.ks;
  launch_overlapped(bf16_kernel<NT, kSplit>, dim3((unsigned)((tiles + per - 1) / per)), dim3(32, kWarps), 0, stream, p);
  HX_CUDA_CHECK(cudaGetLastError());
}

void run_bf16(DenseParams p, int device, int sms, cudaStream_t stream) {
  p.nch = p.k / kDenseChunk;
  if (p.xf != nullptr)
    launch_bf16<1, true>(p, device, sms, stream);
  else if (p.ntok <= 8)
    launch_bf16<1, false>(p, device, sms, stream);
  else if (p.ntok <= 16)
    launch_bf16<2, false>(p, device, sms, stream);
  else
    launch_bf16<4, false>(p, device, sms, stream);
}

}  // namespace mma
}  // namespace matvec
}  // namespace hx

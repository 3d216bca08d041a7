// Integer-dot matvec for the common block types (Q4_0, Q8_0, Q4_K, Q6_K).
//
// Each CTA first quantizes the activations into shared memory: per token and
// per 32 elements an int8 vector, a float scale d = max|x| / 127 (q =
// rint(x * (1 / d))), and the int sums of each 16 elements (for the formats' zero
// points and mins). It then walks its row groups (grid-stride, so the
// quantization is paid once per CTA, not per row group). A warp owns R rows;
// lanes stride over "items" (a block, or a quarter of a super-block), load
// the item's weight words straight into registers (16-byte loads where the
// format is 16-byte aligned, else 4-byte loads funnel-shifted into place),
// and multiply 4 quants by 4 int8 activations per dp4a. Scales apply once
// per 16 or 32 elements. The result is exactly W . x_q in fp32 arithmetic
// (x_q the dequantized int8 activations), about 0.3% from W . x per output.
//
// Precise mode (Args::int8_x == 2) stores two int8 terms per block: q1 as
// above, then the residual r = x - q1 * d1 quantized the same way (q2, d2 =
// max|r| / 127). Each block's product is d1 * (w . q1) + d2 * (w . q2), with
// the zero points and mins applied per term. The weight words are decoded
// once and feed both terms, so the extra cost is dp4a and shared-memory work,
// not memory traffic; x is then represented to ~1/(127 * 254) of its block
// maximum, close to float accuracy.
//
// The CTA body is __host__ __device__ over a context (ids, barriers,
// shuffles, loads) so tests run it on the host like matvec_impl.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <algorithm>
#include <cstdint>

#include "common/ggml_types.h"
#include "kernels/quant_blocks.cuh"
#include "kernels/x_stage.cuh"

namespace hx {
namespace matvec {
namespace dp4a {

constexpr int kWarps = 8;  // warps per CTA
constexpr int kRows = 2;   // rows per warp

template <GgmlType T>
constexpr bool supported() {
  return T == GgmlType::Q4_0 || T == GgmlType::Q8_0 || T == GgmlType::Q4_K || T == GgmlType::Q6_K;
}

// Largest activation stage a launch may use without opting into more shared memory.
constexpr size_t kMaxSmem = 48 * 1024;

HXQ_INLINE int dot4(uint32_t a, uint32_t b, int c) {
#if defined(__CUDA_ARCH__)
  return __dp4a((int)a, (int)b, c);
#else
  for (int i = 0; i < 4; ++i) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
  return c;
#endif
}

HXQ_INLINE uint32_t shr16_pair(uint32_t lo, uint32_t hi) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(lo, hi, 16);
#else
  return (lo >> 16) | (hi << 16);
#endif
}

// N words starting at a 2-byte aligned address p: aligned 4-byte loads, the
// odd half-word case shifted into place. The extra word read in that case
// starts inside the row's bytes or the next row's (or is the aligned word
// holding the tensor's last bytes), so it never leaves the allocation.
#pragma nv_exec_check_disable
template <int N, class Ctx>
HXQ_INLINE void words_a2(const Ctx& ctx, const uint8_t* p, uint32_t (&q)[N]) {
  const uintptr_t mis = reinterpret_cast<uintptr_t>(p) & 2;
  const uint8_t* base = p - mis;
  uint32_t w[N + 1];
#pragma unroll
  for (int i = 0; i < N; ++i) w[i] = ctx.ld_w32(base + 4 * i);
  w[N] = mis ? ctx.ld_w32(base + 4 * N) : 0u;
#pragma unroll
  for (int i = 0; i < N; ++i) q[i] = mis ? shr16_pair(w[i], w[i + 1]) : w[i];
}

// The activation stage, per term u: xq[u] [ntok][k] int8, xd[u] [ntok][k/32]
// scales, xs[u] [ntok][k/16] int sums. U (terms used) is a compile-time
// constant of the kernel, so the term loops unroll and index registers.
struct XStage {
  const int8_t* xq[kMaxTerms];
  const float* xd[kMaxTerms];
  const int* xs[kMaxTerms];
  int k;
};

// Dot of NW * 4 activations (term u) of token t starting at element e
// (16-aligned) with the quant words q (4 elements each): returns sum q * xq.
template <int NW>
HXQ_INLINE int seg_dot(const XStage& X, int u, int t, int e, const uint32_t* q) {
  const uint4* xp = reinterpret_cast<const uint4*>(X.xq[u] + (size_t)t * X.k + e);
  int s = 0;
#pragma unroll
  for (int i = 0; i < NW / 4; ++i) {
    const uint4 v = xp[i];
    s = dot4(q[4 * i + 0], v.x, s);
    s = dot4(q[4 * i + 1], v.y, s);
    s = dot4(q[4 * i + 2], v.z, s);
    s = dot4(q[4 * i + 3], v.w, s);
  }
  return s;
}

HXQ_INLINE float xscale(const XStage& X, int u, int t, int e) { return X.xd[u][(size_t)t * (X.k / 32) + e / 32]; }
HXQ_INLINE int xsum16(const XStage& X, int u, int t, int e) { return X.xs[u][(size_t)t * (X.k / 16) + e / 16]; }

// An item's weights are read in two phases: load() fetches its raw words
// into registers (Words), dot() decodes them and multiplies. dp4a_cta issues
// the next item's load() before the current item's dot(), so each lane keeps
// one item in flight, and issues its first item before the wait for the
// previous kernel and the activation quantization (static weights).
template <GgmlType T>
struct Item;

// Q8_0: item = one block; 32 signed quants against one x block.
template <>
struct Item<GgmlType::Q8_0> {
  static constexpr int QK = 32, BB = 34, IPB = 1;
  template <int R>
  struct Words {
    uint32_t q[R][8];
    uint32_t d[R];
  };
#pragma nv_exec_check_disable
  template <int R, class Ctx>
  HXQ_INLINE static void load(const Ctx& ctx, const uint8_t* const (&blk)[R], int, Words<R>& w) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      words_a2<8>(ctx, blk[r] + 2, w.q[r]);
      w.d[r] = ctx.ld_w16(blk[r]);
    }
  }
  template <int NT, int R, int U>
  HXQ_INLINE static void dot(const Words<R>& w, int, int e0, const XStage& X, int ntok, float (&acc)[R][NT]) {
    float d[R];
#pragma unroll
    for (int r = 0; r < R; ++r) d[r] = quant::half_float(w.d[r]);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (NT > 1 && t >= ntok) break;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float xd = xscale(X, u, t, e0);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][t] = fmaf(d[r] * xd, (float)seg_dot<8>(X, u, t, e0, w.q[r]), acc[r][t]);
      }
    }
  }
};

// Q4_0: item = one block; byte i holds element i (low nibble) and 16 + i (high), zero point 8.
template <>
struct Item<GgmlType::Q4_0> {
  static constexpr int QK = 32, BB = 18, IPB = 1;
  template <int R>
  struct Words {
    uint32_t q[R][4];
    uint32_t d[R];
  };
#pragma nv_exec_check_disable
  template <int R, class Ctx>
  HXQ_INLINE static void load(const Ctx& ctx, const uint8_t* const (&blk)[R], int, Words<R>& w) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      words_a2<4>(ctx, blk[r] + 2, w.q[r]);
      w.d[r] = ctx.ld_w16(blk[r]);
    }
  }
  template <int NT, int R, int U>
  HXQ_INLINE static void dot(const Words<R>& w, int, int e0, const XStage& X, int ntok, float (&acc)[R][NT]) {
    uint32_t lo[R][4], hi[R][4];
    float d[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        lo[r][i] = w.q[r][i] & 0x0f0f0f0fu;
        hi[r][i] = (w.q[r][i] >> 4) & 0x0f0f0f0fu;
      }
      d[r] = quant::half_float(w.d[r]);
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (NT > 1 && t >= ntok) break;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float xd = xscale(X, u, t, e0);
        const int zs = 8 * (xsum16(X, u, t, e0) + xsum16(X, u, t, e0 + 16));
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int s = seg_dot<4>(X, u, t, e0, lo[r]) + seg_dot<4>(X, u, t, e0 + 16, hi[r]) - zs;
          acc[r][t] = fmaf(d[r] * xd, (float)s, acc[r][t]);
        }
      }
    }
  }
};

// Q4_K: item c (0..3) = quant bytes 32c..32c+31: sub-block 2c in the low
// nibbles, 2c + 1 in the high ones, each with a 6-bit scale and min.
template <>
struct Item<GgmlType::Q4_K> {
  static constexpr int QK = 256, BB = 144, IPB = 4;
  template <int R>
  struct Words {
    uint4 h[R], v0[R], v1[R];
  };
#pragma nv_exec_check_disable
  template <int R, class Ctx>
  HXQ_INLINE static void load(const Ctx& ctx, const uint8_t* const (&blk)[R], int c, Words<R>& w) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      w.h[r] = ctx.ld_w128(blk[r]);
      w.v0[r] = ctx.ld_w128(blk[r] + 16 + 32 * c);
      w.v1[r] = ctx.ld_w128(blk[r] + 32 + 32 * c);
    }
  }
  template <int NT, int R, int U>
  HXQ_INLINE static void dot(const Words<R>& w, int c, int e0, const XStage& X, int ntok, float (&acc)[R][NT]) {
    uint32_t lo[R][8], hi[R][8];
    float a0[R], a1[R], m0[R], m1[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint4 v0 = w.v0[r], v1 = w.v1[r], h = w.h[r];
      const uint32_t q[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        lo[r][i] = q[i] & 0x0f0f0f0fu;
        hi[r][i] = (q[i] >> 4) & 0x0f0f0f0fu;
      }
      const uint32_t sm = quant::BlockK4Map::scale_min_pair(h.y, h.z, h.w, c);
      const float d = quant::half_float(h.x & 0xffff), dmin = quant::half_float(h.x >> 16);
      a0[r] = d * (float)(sm & 0xff);
      a1[r] = d * (float)((sm >> 8) & 0xff);
      m0[r] = dmin * (float)((sm >> 16) & 0xff);
      m1[r] = dmin * (float)(sm >> 24);
    }
    const int e = e0 + 64 * c;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (NT > 1 && t >= ntok) break;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float xd0 = xscale(X, u, t, e), xd1 = xscale(X, u, t, e + 32);
        const float sx0 = xd0 * (float)(xsum16(X, u, t, e) + xsum16(X, u, t, e + 16));
        const float sx1 = xd1 * (float)(xsum16(X, u, t, e + 32) + xsum16(X, u, t, e + 48));
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float s = acc[r][t];
          s = fmaf(a0[r] * xd0, (float)seg_dot<8>(X, u, t, e, lo[r]), s);
          s = fmaf(a1[r] * xd1, (float)seg_dot<8>(X, u, t, e + 32, hi[r]), s);
          s = fmaf(-m0[r], sx0, s);
          s = fmaf(-m1[r], sx1, s);
          acc[r][t] = s;
        }
      }
    }
  }
};

// Q6_K: item (h, p) = ql bytes 64h + 32p .. + 31 and qh bytes 32h .. + 31:
// elements 128h + 32p + l (low nibbles, qh bits 2p) and 128h + 64 + 32p + l
// (high nibbles, qh bits 2p + 4); int8 scale per 16 elements, zero point 32.
template <>
struct Item<GgmlType::Q6_K> {
  static constexpr int QK = 256, BB = 210, IPB = 4;
  template <int R>
  struct Words {
    uint32_t ql[R][8], qh[R][8];
    uint32_t s01[R], s23[R], d[R];
  };
#pragma nv_exec_check_disable
  template <int R, class Ctx>
  HXQ_INLINE static void load(const Ctx& ctx, const uint8_t* const (&blk)[R], int it, Words<R>& w) {
    const int h = it >> 1, p = it & 1;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      words_a2<8>(ctx, blk[r] + 64 * h + 32 * p, w.ql[r]);
      words_a2<8>(ctx, blk[r] + 128 + 32 * h, w.qh[r]);
      // 16-element groups 8h + 2p, +1 (low) and 8h + 4 + 2p, +1 (high): one aligned
      // 2-byte pair each in the scales at byte 192.
      w.s01[r] = ctx.ld_w16(blk[r] + 192 + 8 * h + 2 * p);
      w.s23[r] = ctx.ld_w16(blk[r] + 196 + 8 * h + 2 * p);
      w.d[r] = ctx.ld_w16(blk[r] + 208);
    }
  }
  template <int NT, int R, int U>
  HXQ_INLINE static void dot(const Words<R>& w, int it, int e0, const XStage& X, int ntok, float (&acc)[R][NT]) {
    const int h = it >> 1, p = it & 1;
    uint32_t lo[R][8], hi[R][8];
    float sc[R][4];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        lo[r][i] = (w.ql[r][i] & 0x0f0f0f0fu) | (((w.qh[r][i] >> (2 * p)) & 0x03030303u) << 4);
        hi[r][i] = ((w.ql[r][i] >> 4) & 0x0f0f0f0fu) | (((w.qh[r][i] >> (2 * p + 4)) & 0x03030303u) << 4);
      }
      const float d = quant::half_float(w.d[r]);
      sc[r][0] = d * (float)(int8_t)(w.s01[r] & 0xff);
      sc[r][1] = d * (float)(int8_t)(w.s01[r] >> 8);
      sc[r][2] = d * (float)(int8_t)(w.s23[r] & 0xff);
      sc[r][3] = d * (float)(int8_t)(w.s23[r] >> 8);
    }
    const int e = e0 + 128 * h + 32 * p;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (NT > 1 && t >= ntok) break;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float xd0 = xscale(X, u, t, e), xd1 = xscale(X, u, t, e + 64);
        const int z0 = 32 * xsum16(X, u, t, e), z1 = 32 * xsum16(X, u, t, e + 16);
        const int z2 = 32 * xsum16(X, u, t, e + 64), z3 = 32 * xsum16(X, u, t, e + 80);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float s = acc[r][t];
          s = fmaf(sc[r][0] * xd0, (float)(seg_dot<4>(X, u, t, e, lo[r]) - z0), s);
          s = fmaf(sc[r][1] * xd0, (float)(seg_dot<4>(X, u, t, e + 16, lo[r] + 4) - z1), s);
          s = fmaf(sc[r][2] * xd1, (float)(seg_dot<4>(X, u, t, e + 64, hi[r]) - z2), s);
          s = fmaf(sc[r][3] * xd1, (float)(seg_dot<4>(X, u, t, e + 80, hi[r] + 4) - z3), s);
          acc[r][t] = s;
        }
      }
    }
  }
};

// Quantizes x [ntok, k] into the stage. Each thread takes 4 elements; 8
// neighbouring lanes hold one 32-block (k is a multiple of 32, so blocks never
// straddle tokens or warps), 4 lanes one 16-element sum. A thread issues the
// loads of kQuantBatch groups before using any, so the CTA waits for a few L2
// round trips, not one per group. q = rint(x * (1 / d)), in IEEE float32.
// With U == 2 the residual r = fma(-q1, d1, x) (one rounding) is quantized the
// same way into the second term.
constexpr int kQuantBatch = 4;

#pragma nv_exec_check_disable
template <int U, class Ctx>
HXQ_INLINE void quantize_x(const Ctx& ctx, const float* x, int ntok, int k, const StageParts& st) {
  const int tid = ctx.warp() * 32 + ctx.lane(), nth = ctx.nwarps() * 32;
  const int ngrp = ntok * k / 4;
  for (int g0 = 0; g0 < ngrp; g0 += kQuantBatch * nth) {
    float4 v[kQuantBatch];
#pragma unroll
    for (int j = 0; j < kQuantBatch; ++j) {
      const int g = g0 + j * nth + tid;
      v[j] = g < ngrp ? ctx.ld_x(x + 4 * (size_t)g) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int j = 0; j < kQuantBatch; ++j) {
      if (g0 + j * nth >= ngrp) break;  // uniform across the CTA
      const int g = g0 + j * nth + tid;  // g % 32 == tid % 32: a 32-block's lanes are neighbours
      float r[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
      quantize_group<U>(ctx, r, (size_t)g, g < ngrp, st);
    }
  }
}

// One CTA: quantize x into shared memory (unless a.xq holds it already,
// quantized once for the whole grid), then row groups blockIdx, blockIdx +
// gridDim, ...
// Each lane walks its items (lane, lane + 32, ... of each of its warp's row
// groups in turn) with the next item's words loaded before the current one is
// multiplied; with static weights the first item's loads precede the wait for
// the previous kernel and the quantization of x (launch.cuh).
#pragma nv_exec_check_disable
// U: int8 terms per element (1, or 2 for the precise mode). Shared layout:
// all terms' quants, then all scales, then all sums (16-byte aligned parts
// since k is a multiple of 32).
template <GgmlType T, int NT, int U = 1, class Ctx, class Args>
HXQ_INLINE void dp4a_cta(const Args& a, const Ctx& ctx, uint8_t* smem) {
  static_assert(U >= 1 && U <= kMaxTerms, "1 or 2 activation terms");
  using I = Item<T>;
  constexpr int R = kRows;
  using W = typename I::template Words<R>;
  const int k = a.k;
  const int lane = ctx.lane(), warp = ctx.warp();
  const int rows_per_cta = ctx.nwarps() * R;
  const int nitems = k / I::QK * I::IPB;
  const int g_step = ctx.nblocks();

  // Item (g, it) of this lane: row group g (this warp's rows g * rows_per_cta
  // + warp * R ..), item it; `valid` when the warp has rows there and it < nitems.
  auto row0_of = [&](int g) { return g * rows_per_cta + warp * R; };
  auto load_item = [&](int g, int it, W& w) {
    const int row0 = row0_of(g);
    const int b = it / I::IPB, i = it - b * I::IPB;
    const uint8_t* blk[R];
#pragma unroll
    for (int r = 0; r < R; ++r)
      blk[r] = a.w + (size_t)std::min(row0 + r, a.n_out - 1) * a.row_bytes + (size_t)b * I::BB;
    I::template load<R>(ctx, blk, i, w);
  };

  W cur;
  const int g0 = ctx.block();
  const bool first = row0_of(g0) < a.n_out && lane < nitems;
  if (a.static_w && first) load_item(g0, lane, cur);
  ctx.wait_prior();
  if (!a.static_w && first) load_item(g0, lane, cur);

  const size_t n = (size_t)a.ntok * k;
  // The stage: quantized here, or already by quantize_x_launch (a.xq).
  uint8_t* const base = a.xq ? const_cast<uint8_t*>(a.xq) : smem;
  const StageParts st = stage_parts<U>(base, n);
  if (!a.xq) {
    quantize_x<U>(ctx, a.x, a.ntok, k, st);
    ctx.syncthreads();
  }
  const XStage X{{st.xq[0], st.xq[1]}, {st.xd[0], st.xd[1]}, {st.xs[0], st.xs[1]}, k};

  for (int g = g0; g * rows_per_cta < a.n_out; g += g_step) {
    const int row0 = row0_of(g);
    if (row0 >= a.n_out) continue;  // whole warp: no shuffles skipped by part of it (and no later group has rows)
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[r][t] = 0.f;
    for (int it = lane; it < nitems; it += 32) {
      // The next item: further along this group, else this lane's first of the next group.
      int gn = g, itn = it + 32;
      if (itn >= nitems) {
        gn = g + g_step;
        itn = lane;
      }
      W nxt;
      if (row0_of(gn) < a.n_out && itn < nitems) load_item(gn, itn, nxt);
      const int b = it / I::IPB, i = it - b * I::IPB;
      I::template dot<NT, R, U>(cur, i, b * I::QK, X, a.ntok, acc);
      cur = nxt;
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        float v = acc[r][t];
#pragma unroll
        for (int m = 16; m > 0; m >>= 1) v += ctx.shfl_xor(v, m);
        const int row = row0 + r;
        if (lane == 0 && row < a.n_out && t < a.ntok) {
          float* out = a.y + (size_t)t * a.n_out + row;
          if (a.bias) v += a.bias[row];
          if (a.accumulate) v += *out;
          *out = v;
        }
      }
  }
}

}  // namespace dp4a
}  // namespace matvec
}  // namespace hx

// Matvec kernel template, instantiated once per storage type by the generated
// files matvec_<type>.cu (tools/gen_kernels.py).
//
// Q4_0, Q8_0, Q4_K and Q6_K go to the integer-dot kernel of matvec_dp4a.cuh
// (int8 activations, dp4a) when asked (Args::int8_x) and its activation stage
// fits 48 KiB of shared memory (n_tok * k * 1.375 bytes per int8 term: one,
// or two in the precise mode); the other types, and larger stages, use the
// float kernel below.
//
//   y[t, i] = (accumulate ? y[t, i] : 0) + bias[i] + sum_j W[i, j] x[t, j]
//
// Layout: W is n_out rows of row_bytes bytes (GGUF blocks), rows contiguous.
// A CTA owns R consecutive rows; its W warps split each row's k range into
// "steps" of P passes (256 elements per pass), warp w taking steps w, w+W, ...
//
// Weight bytes take one path whatever the block size: a step of each of the R
// rows is a contiguous byte range, copied with 16-byte streaming loads
// (ld.global.nc, L1 no-allocate) of the 16-byte aligned chunks that cover it
// into the warp's shared-memory stage, preserving the address mod 16. The
// block decoders (quant_blocks.cuh) then read their fields from shared memory
// at the alignment the format guarantees, which makes 18-, 22-, 34-, 110- and
// 210-byte blocks as cheap to stream as 16-byte aligned ones. Loads for step
// s + W are issued into registers before step s is decoded, so each warp keeps
// its next step in flight while it computes.
//
// Lanes decode units (8 elements, two runs of 4, see quant_blocks.cuh) of each
// of the R rows; their activations (float4 loads, cached in L1, shared by the
// R rows) come from the same runs. With up to two tokens a lane takes a pair
// of units that share their scales, halving the scale decoding per element.
// Quants become floats with one prmt each (0x3F000000 | q << 16 is
// 0.5 + q/256); the unit's offset term multiplies the run's activation sum.
// 8-bit quants and the IQ4 grid use the exact 2^23 magic number instead.
// Accumulation is fp32 throughout.
//
// Partial sums meet in shared memory at the end (no atomics); one warp per
// output reduces across lanes and warps with shuffles and writes y.
// One arch path: plain sm_80+ instructions (prmt, 16-byte loads, shuffles).
//
// The CTA body is a __host__ __device__ template over a context that supplies
// thread ids, barriers, shuffles and loads, so tests run this exact code on
// the host with one OS thread per simulated GPU thread.
//
// Mixture-of-experts products (run_experts) run the same CTA body over a
// stack of expert matrices: the kernel first reads which expert (and which
// x and y rows) its blockIdx.y stands for from device memory, then runs
// matvec_cta on that expert's matrix. Pairs: one (token, expert) product per
// blockIdx.y, one token (NT = 1); for a gate|up stack the CTA may take
// matching gate and up rows and write the SwiGLU (kGlu). Grouped: one expert
// per blockIdx.y, its rows kMatvecMaxTokens at a time (NT = 8), a barrier
// between them since each pass reuses the shared stage. Combine: one token
// per blockIdx.y; its warps split the steps of the token's top_k experts'
// rows, weight each step's partial sums by the expert's routing weight, and
// add the total to the residual (kCombine): the second expert product and
// the weighted sum in one launch, its first weight loads issued before the
// wait for the first product (the routing was written before that).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>

#include "common/launch.cuh"
#include "common/check.h"
#include "common/ggml_types.h"
#include "kernels/matvec.cuh"
#include "kernels/matvec_dp4a.cuh"
#include "kernels/quant_blocks.cuh"
#include "kernels/swiglu.cuh"

namespace hx {
namespace matvec {

// Rows per CTA, passes per step and units per lane, per type and token count.
// R rows share every activation load; P sets the bytes each warp has in
// flight (R * P * pass bytes). With U units per lane the warp works on U
// passes at once: lanes 32/U * p .. 32/U * (p + 1) - 1 take pass p, lane l
// units U * (l % (32/U)) ... U = 2 (quant types, up to 2 tokens): a unit pair
// shares its scales. With more tokens the activations of 16 elements per
// token would not fit the registers. (Four units per lane for Q4_K, sharing
// one scale decode per 32 elements, measured 4% slower on an H100.)
template <GgmlType T, int NT = 1>
struct Config {
  static constexpr int PB = quant::pass_bytes<T>();
  static constexpr int R = T == GgmlType::F32 ? 2 : 4;
  static constexpr int U = (!is_float_type(T) && NT <= 2) ? 2 : 1;
  static constexpr int P = PB >= 512 ? 1 : (PB >= 128 ? 2 : 4);
  static constexpr int SB = P * PB;                    // step bytes of one row
  static constexpr int NSEG = (SB + 15) / 16 + 1;      // 16-byte chunks covering a step at any alignment
  static constexpr int SLOTS = R * NSEG;
  static constexpr int LOADS = (SLOTS + 31) / 32;      // chunks per lane per step
};

constexpr int kMaxWarps = 8;

struct Args {
  const uint8_t* w;    // [n_out, row_bytes]
  const float* x;      // [ntok, k]
  float* y;            // [ntok, n_out]
  const float* bias;   // [n_out] or nullptr
  size_t row_bytes;
  int n_out, k, ntok, npass, nsteps;  // nsteps: set by stepped<T, NT>()
  int accumulate;
  int int8_x;          // dp4a kernel where it has one: 0 float math, 1 one int8 term, 2 two (precise)
  int static_w;        // no kernel writes w: its first loads may precede the wait for the previous kernel
  // dp4a kernels: x already quantized into this stage (dp4a::smem_bytes
  // layout, by quantize_x_launch) instead of by each CTA; nullptr: per CTA.
  const uint8_t* xq;
  // Host only: where launch_nt quantizes x for the dp4a kernel (nullptr: the
  // CTAs do). The product's grid stays as large as with per-CTA quantization
  // (one CTA per row group measured slower).
  uint8_t* x_scratch;
  // Host only: x_scratch already holds x's two-term stage (MatvecOptions::x_staged).
  int x_staged = 0;
  // Expert fusions (matvec_cta's Mode; unused by kPlain).
  int glu = 0;                   // kGlu: gate rows [0, glu), up rows [glu, 2 glu); y is [ntok, glu]
  const int32_t* ids = nullptr;  // kCombine: the token's top_k experts ...
  const float* mix = nullptr;    // ... and their weights; x holds top_k rows of k, one per expert
  size_t stride = 0;             // kCombine: bytes between consecutive experts' matrices
  int top_k = 0, num_experts = 0;
};

// What a CTA computes (matvec_cta's Mode):
//   kPlain    y[t, i] = W[i] . x[t] (+ bias, + y), rows block * R ...
//   kGlu      one token, W = gate | up: y[i] = silu(gate[i] . x) * (up[i] . x)
//             for i in block * R/2 ..: the CTA's R rows are R/2 gate rows and
//             their R/2 up rows, so the SwiGLU needs no pass of its own
//   kCombine  one token: y[i] += sum_j mix[j] * W_ids[j][i] . x[j], the warps
//             splitting (expert, step) pairs: an MoE layer's second product
//             and the weighted sum of its experts in one launch
enum : int { kPlain = 0, kGlu = 1, kCombine = 2 };

// `a` with nsteps set for the kernel of NT tokens (steps of Config<T, NT>::P
// passes), so the step count always matches the kernel's configuration.
template <GgmlType T, int NT>
Args stepped(Args a) {
  a.nsteps = (a.npass + Config<T, NT>::P - 1) / Config<T, NT>::P;
  return a;
}

// Grid of one launch.
struct Plan {
  int blocks, warps;
  size_t smem_bytes;
};

template <GgmlType T, int NT>
size_t smem_bytes(int warps) {
  using C = Config<T, NT>;
  const size_t stage_bytes = (size_t)warps * C::SLOTS * 16;
  const size_t red_bytes = (size_t)warps * C::R * NT * 32 * sizeof(float);
  return std::max(stage_bytes, red_bytes);
}

// Warps per CTA (1, 2, 4 or 8, splitting each row's steps). resident[i]: CTAs
// of 2^i warps one SM holds at once. A CTA's rows finish together, so the
// grid runs in ceil(blocks / resident CTAs) rounds of a CTA's lifetime (its
// steps per warp plus a fixed cost): few long CTAs leave the GPU idling on a
// last partial round, many short ones pay the fixed cost often. Among the
// choices whose first round fills at least 3/4 of the SMs' warp slots (else
// the memory system starves), take the fewest estimated step-times.
template <GgmlType T, int NT>
Plan plan(const Args& a, int sms, const int (&resident)[4]) {
  using C = Config<T, NT>;
  Plan p;
  p.blocks = (a.n_out + C::R - 1) / C::R;
  long capacity = 1;
  for (int i = 0; i < 4; ++i) capacity = std::max(capacity, (long)sms * resident[i] << i);
  double best = 0.0;
  long best_fill = -1;
  bool best_full = false;
  p.warps = 1;
  for (int i = 0; i < 4; ++i) {
    const int w = 1 << i;
    if (w > 1 && w > a.nsteps) break;
    const long conc = (long)sms * resident[i];
    if (conc <= 0) continue;
    const long fill = std::min<long>(p.blocks, conc) * w;
    const bool full = 4 * fill >= 3 * capacity;
    const long rounds = (p.blocks + conc - 1) / conc;
    const double cost = (double)rounds * ((a.nsteps + w - 1) / w + 0.3);
    const bool better =
        best_fill < 0 || (full && !best_full) || (full == best_full && (full ? cost < best : fill > best_fill));
    if (better) {
      best = cost;
      best_fill = fill;
      best_full = full;
      p.warps = w;
    }
  }
  p.smem_bytes = smem_bytes<T, NT>(p.warps);
  return p;
}

// The GPU's context: ids, barriers, shuffles and the two load flavours.
struct DeviceCtx {
  uint4* smem;
  __device__ __forceinline__ int lane() const { return threadIdx.x; }
  __device__ __forceinline__ int warp() const { return threadIdx.y; }
  __device__ __forceinline__ int nwarps() const { return blockDim.y; }
  __device__ __forceinline__ int block() const { return blockIdx.x; }
  __device__ __forceinline__ void syncwarp() const { __syncwarp(); }
  __device__ __forceinline__ void syncthreads() const { __syncthreads(); }
  __device__ __forceinline__ float shfl_xor(float v, int m) const { return __shfl_xor_sync(0xffffffffu, v, m); }
  // Weights: read once, so skip L1 (the activations live there). The loads
  // are volatile: callers guard them (a chunk past a tensor's last row), and
  // the compiler may otherwise hoist a plain asm load out of its guard, a
  // read past the end that faults where the allocation ends on a page.
  __device__ __forceinline__ uint4 ld_stream(const void* p) const {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
  }
  __device__ __forceinline__ float4 ld_x(const float* p) const { return __ldg(reinterpret_cast<const float4*>(p)); }
  __device__ __forceinline__ int nblocks() const { return gridDim.x; }
  // Wait for the previous kernel of the stream (launch.cuh); before this the
  // CTA reads nothing but static weights.
  __device__ __forceinline__ void wait_prior() const { pdl_begin(); }
  // Weight words for the dp4a kernels (read-only path; neighbouring lanes
  // share 16-byte headers and Q6_K high bits, so these may allocate in L1).
  __device__ __forceinline__ uint4 ld_w128(const void* p) const {
    uint4 r;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
  }
  __device__ __forceinline__ uint32_t ld_w32(const void* p) const {
    return __ldg(reinterpret_cast<const unsigned int*>(p));
  }
  __device__ __forceinline__ uint32_t ld_w16(const void* p) const {
    return __ldg(reinterpret_cast<const unsigned short*>(p));
  }
};

// Units ub..ub+U-1 of one pass for R rows: acc[r][t] += W[row r, units] . x[t, units].
// src[r]: the pass's bytes of row r (shared memory); xp: x of token 0 at the pass start.
// (The exec-check pragmas: a host context only ever runs on the host, the
// device context only on the device.)
#pragma nv_exec_check_disable
template <GgmlType T, int NT, int R, int U, class Ctx>
__host__ __device__ __forceinline__ void pass_dot(const Ctx& ctx, const uint8_t* const (&src)[R], const float* xp,
                                                  int ub, int k, int ntok, int ebase, float (&acc)[R][NT]) {
  using B = quant::Block<T>;
  float xv[NT][U][8];
  bool v1 = true;
#pragma unroll
  for (int i = 0; i < U; ++i) {
    const int e0 = B::elem0(ub + i), e1 = B::elem1(ub + i);
    // Quant rows end on whole units; float rows (k % 4 == 0) may end between runs.
    const bool has1 = !is_float_type(T) || ebase + e1 < k;
    v1 = has1;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const bool on = NT == 1 || t < ntok;
      const float4 p = on ? ctx.ld_x(xp + (size_t)t * k + e0) : make_float4(0.f, 0.f, 0.f, 0.f);
      const float4 q = on && has1 ? ctx.ld_x(xp + (size_t)t * k + e1) : make_float4(0.f, 0.f, 0.f, 0.f);
      xv[t][i][0] = p.x;
      xv[t][i][1] = p.y;
      xv[t][i][2] = p.z;
      xv[t][i][3] = p.w;
      xv[t][i][4] = q.x;
      xv[t][i][5] = q.y;
      xv[t][i][6] = q.z;
      xv[t][i][7] = q.w;
    }
  }
  if constexpr (is_float_type(T)) {
    static_assert(U == 1, "float rows use one unit per lane");
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float wv[8];
      B::run4(src[r], B::elem0(ub), wv);
      if (v1)
        B::run4(src[r], B::elem1(ub), wv + 4);
      else
        wv[4] = wv[5] = wv[6] = wv[7] = 0.f;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        float s = acc[r][t];
#pragma unroll
        for (int i = 0; i < 8; ++i) s = fmaf(xv[t][0][i], wv[i], s);
        acc[r][t] = s;
      }
    }
  } else {
    float sx0[NT], sx1[NT];
    quant::run_sums<T, NT, U>(xv, sx0, sx1);
#pragma unroll
    for (int r = 0; r < R; ++r) quant::lane_dot<T, NT, U>(src[r], ub, xv, sx0, sx1, acc[r]);
  }
}

// Issues the 16-byte loads of step s (bytes [s * SB, s * SB + SB) of every row
// of the CTA) into this lane's registers; shift moves every row by a multiple
// of 16 bytes (to another expert's matrix).
#pragma nv_exec_check_disable
template <int SLOTS, int SB, int LOADS, class Ctx>
__host__ __device__ __forceinline__ void issue_step(const Ctx& ctx, int lane, int s, uint32_t row_bytes,
                                                    const uint8_t* const (&slot_base)[LOADS],
                                                    const uint32_t (&slot_mis)[LOADS],
                                                    const uint32_t (&slot_off)[LOADS], uint4 (&buf)[LOADS],
                                                    size_t shift = 0) {
  const uint32_t off = (uint32_t)s * SB;
  const uint32_t lim = std::min(off + (uint32_t)SB, row_bytes);  // this step's bytes: [off, lim)
#pragma unroll
  for (int j = 0; j < LOADS; ++j) {
    if (SLOTS % 32 != 0 && lane + 32 * j >= SLOTS) continue;
    // Chunk offset from the aligned row base; below mis + lim it shares its
    // aligned 16 bytes with a byte of the row, so the read stays in the tensor.
    const uint32_t t = ((slot_mis[j] + off) & ~15u) + slot_off[j];
    if (t < slot_mis[j] + lim) buf[j] = ctx.ld_stream(slot_base[j] + shift + t);
  }
}

// One CTA: rows blockIdx * R .. + R - 1 (kGlu: gate rows blockIdx * R/2 ..
// and the matching up rows; see Mode).
#pragma nv_exec_check_disable
template <GgmlType T, int NT, int Mode = kPlain, class Ctx>
__host__ __device__ __forceinline__ void matvec_cta(const Args& a, const Ctx& ctx) {
  using B = quant::Block<T>;
  using C = Config<T, NT>;
  constexpr int R = C::R, P = C::P, PB = C::PB, SB = C::SB, NSEG = C::NSEG, SLOTS = C::SLOTS, LOADS = C::LOADS,
                U = C::U;
  static_assert(P % U == 0, "a step holds whole groups of U passes");
  static_assert(Mode == kPlain || NT == 1, "the expert fusions run one token");
  static_assert(Mode != kGlu || R % 2 == 0, "a kGlu CTA pairs gate and up rows");
  constexpr int HR = R / 2;
  const int lane = ctx.lane(), warp = ctx.warp(), nwarps = ctx.nwarps();
  uint4* stage = ctx.smem + warp * SLOTS;
  const int row0 = Mode == kGlu ? ctx.block() * HR : ctx.block() * R;
  const uint32_t row_bytes = (uint32_t)a.row_bytes;
  // Stored row of the CTA's row r. Rows past the end re-read the last one;
  // their sums are never written.
  auto row_of = [&](int r) -> int {
    if constexpr (Mode == kGlu) {
      const int g = std::min(row0 + r % HR, a.glu - 1);
      return r < HR ? g : a.glu + g;
    } else {
      return std::min(row0 + r, a.n_out - 1);
    }
  };

  // Each row's start address mod 16 places its bytes in the stage.
  int row_mis[R];
#pragma unroll
  for (int r = 0; r < R; ++r)
    row_mis[r] = (int)(reinterpret_cast<uintptr_t>(a.w + (size_t)row_of(r) * a.row_bytes) & 15);

  // Lane's load slots: slot lane + 32j is chunk (idx % NSEG) of row idx / NSEG
  // of the step, read from the row's 16-byte aligned base.
  const uint8_t* slot_base[LOADS];
  uint32_t slot_mis[LOADS], slot_off[LOADS];
#pragma unroll
  for (int j = 0; j < LOADS; ++j) {
    const int idx = lane + 32 * j;
    const int r = std::min(idx / NSEG, R - 1);
    const uintptr_t rp = reinterpret_cast<uintptr_t>(a.w + (size_t)row_of(r) * a.row_bytes);
    slot_base[j] = reinterpret_cast<const uint8_t*>(rp & ~uintptr_t(15));
    slot_mis[j] = (uint32_t)(rp & 15);
    slot_off[j] = 16u * (uint32_t)(idx - (idx / NSEG) * NSEG);
  }

  // kCombine walks top_k * nsteps steps: step s is step s % nsteps of the
  // row of expert slot s / nsteps (slot_of), whose matrix starts shift_of(s)
  // bytes on; the other modes walk their one row's steps.
  uint4 buf[LOADS];
  const int nsteps = Mode == kCombine ? a.top_k * a.nsteps : a.nsteps;
  auto slot_of = [&](int s) { return Mode == kCombine ? s / a.nsteps : 0; };
  auto shift_of = [&](int s) -> size_t {
    if constexpr (Mode == kCombine)
      return (size_t)std::min(std::max(a.ids[slot_of(s)], 0), a.num_experts - 1) * a.stride;
    else
      return 0;
  };
  auto issue = [&](int s) {
    issue_step<SLOTS, SB>(ctx, lane, s - slot_of(s) * a.nsteps, row_bytes, slot_base, slot_mis, slot_off, buf,
                          shift_of(s));
  };

  float acc[R][NT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[r][t] = 0.f;

  // With U units per lane, groups of 32 / U lanes take neighbouring passes.
  constexpr int LPP = 32 / U;  // lanes per pass
  const int sub = lane / LPP;
  const int ub = U * (lane % LPP);
  // Static weights: the first step's loads go out before waiting for the
  // kernel that produced x (launch.cuh), so they overlap its tail. (kCombine:
  // static_w also says the routing was written two launches back or more.)
  if (!a.static_w) ctx.wait_prior();
  if (warp < nsteps) issue(warp);
  if (a.static_w) ctx.wait_prior();
  for (int s = warp; s < nsteps; s += nwarps) {
    ctx.syncwarp();  // the previous step's readers are done with the stage
#pragma unroll
    for (int j = 0; j < LOADS; ++j)
      if (SLOTS % 32 == 0 || lane + 32 * j < SLOTS) stage[lane + 32 * j] = buf[j];
    ctx.syncwarp();
    if (s + nwarps < nsteps) issue(s + nwarps);

    const int j = slot_of(s), ls = s - j * a.nsteps;  // expert slot, step of its row
    const float* x = a.x + (size_t)j * a.k;
    float part[R][NT];
    if constexpr (Mode == kCombine) {
#pragma unroll
      for (int r = 0; r < R; ++r) part[r][0] = 0.f;
    }
    const uint32_t off = (uint32_t)ls * SB;
#pragma unroll
    for (int g = 0; g < P / U; ++g) {
      const int pass = ls * P + g * U + sub;
      if (U == 1 && pass >= a.npass) break;
      const int ebase = pass * 256;
      // Past the row's end (last pass, or the odd last pass of a pair): no work.
      if (pass < a.npass && ebase + B::elem0(ub) < a.k) {
        const uint8_t* src[R];
#pragma unroll
        for (int r = 0; r < R; ++r)
          src[r] = reinterpret_cast<const uint8_t*>(stage + r * NSEG) + ((row_mis[r] + off) & 15) + (g * U + sub) * PB;
        if constexpr (Mode == kCombine)
          pass_dot<T, NT, R, U>(ctx, src, x + ebase, ub, a.k, a.ntok, ebase, part);
        else
          pass_dot<T, NT, R, U>(ctx, src, x + ebase, ub, a.k, a.ntok, ebase, acc);
      }
    }
    if constexpr (Mode == kCombine) {
      const float m = a.mix[j];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r][0] = fmaf(m, part[r][0], acc[r][0]);
    }
  }

  // Cross-lane and cross-warp sums: partials meet in shared memory.
  ctx.syncthreads();
  float* red = reinterpret_cast<float*>(ctx.smem);  // [nwarps][R * NT][32]
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < NT; ++t) red[(warp * R * NT + r * NT + t) * 32 + lane] = acc[r][t];
  ctx.syncthreads();
  auto reduce = [&](int o) {
    float v = 0.f;
    for (int w = 0; w < nwarps; ++w) v += red[(w * R * NT + o) * 32 + lane];
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += ctx.shfl_xor(v, m);
    return v;
  };
  if constexpr (Mode == kGlu) {
    // Warp r reduces gate row r and its up row, so one lane holds both.
    for (int r = warp; r < HR; r += nwarps) {
      const float g = reduce(r), u = reduce(r + HR);
      if (lane == 0 && row0 + r < a.glu) a.y[row0 + r] = swiglu_act(g, u);
    }
  } else {
    for (int o = warp; o < R * NT; o += nwarps) {
      float v = reduce(o);
      const int row = row0 + o / NT, t = o % NT;
      if (lane == 0 && row < a.n_out && t < a.ntok) {
        float* out = a.y + (size_t)t * a.n_out + row;
        if (a.bias) v += a.bias[row];
        if (a.accumulate) v += *out;
        *out = v;
      }
    }
  }
}

template <GgmlType T, int NT>
__global__ void __launch_bounds__(kMaxWarps * 32) matvec_kernel(const Args a) {
  // matvec_cta calls ctx.wait_prior() (pdl_begin) before it touches x or y.
  extern __shared__ uint4 smem[];
  matvec_cta<T, NT>(a, DeviceCtx{smem});
}

template <GgmlType T, int NT, int U>
__global__ void __launch_bounds__(dp4a::kWarps * 32, 1) matvec_dp4a_kernel(const Args a) {
  // dp4a_cta calls ctx.wait_prior() (pdl_begin) first.
  extern __shared__ uint4 smem[];
  dp4a::dp4a_cta<T, NT, U>(a, DeviceCtx{smem}, reinterpret_cast<uint8_t*>(smem));
}

// Grid of a dp4a launch: one CTA per row group, at most as many as fit on the
// GPU at once (each CTA quantizes x once, or reads the stage quantize_x_launch
// wrote, then strides over row groups). smem: the launch's shared bytes.
// fit[0]: CTAs per SM without shared memory (asked once per device),
// fit[1]: shared memory per SM.
template <GgmlType T, int NT, int U>
int dp4a_blocks(const Args& a, int device, int sms, int warps, size_t smem) {
  constexpr int kDevices = 64;
  static int table[kDevices][2];
  static std::atomic<bool> ready[kDevices];
  int fit[2] = {1, 0};
  if (device >= 0 && device < kDevices && ready[device].load(std::memory_order_acquire)) {
    fit[0] = table[device][0];
    fit[1] = table[device][1];
  } else {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit[0], matvec_dp4a_kernel<T, NT, U>, dp4a::kWarps * 32, 0) !=
        cudaSuccess)
      fit[0] = 1;
    if (cudaDeviceGetAttribute(&fit[1], cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) != cudaSuccess) fit[1] = 0;
    (void)cudaGetLastError();
    if (device >= 0 && device < kDevices) {
      table[device][0] = fit[0];
      table[device][1] = fit[1];
      ready[device].store(true, std::memory_order_release);
    }
  }
  int per_sm = std::max(1, fit[0]);
  if (fit[1] > 0) per_sm = std::max(1, std::min<int>(per_sm, (int)((size_t)fit[1] / (smem + 1024))));
  if (warps < dp4a::kWarps) per_sm *= dp4a::kWarps / warps;
  const int rows_per_cta = warps * dp4a::kRows;
  const long groups = (a.n_out + rows_per_cta - 1) / rows_per_cta;
  return (int)std::max(1L, std::min<long>(groups, (long)std::max(sms, 1) * per_sm));
}

// CTAs of 1, 2, 4, 8 warps that fit on one SM, asked once per device.
template <GgmlType T, int NT>
const int (&resident_ctas(int device))[4] {
  constexpr int kDevices = 64;
  static int table[kDevices][4];
  static std::atomic<bool> ready[kDevices];
  static thread_local int local[4];
  int (&r)[4] = device >= 0 && device < kDevices ? table[device] : local;
  if (device >= 0 && device < kDevices && ready[device].load(std::memory_order_acquire)) return r;
  for (int i = 0; i < 4; ++i) {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, matvec_kernel<T, NT>, 32 << i, smem_bytes<T, NT>(1 << i)) !=
        cudaSuccess)
      n = 0;
    r[i] = n;
  }
  (void)cudaGetLastError();
  if (device >= 0 && device < kDevices) ready[device].store(true, std::memory_order_release);
  return r;
}

template <GgmlType T, int NT>
void launch_nt(const Args& in, int device, int sms, cudaStream_t stream) {
  Args a = stepped<T, NT>(in);
  if constexpr (dp4a::supported<T>()) {
    // The precise mode's stage is twice as large; where it does not fit, the
    // float kernel (not the single-term one) keeps the asked-for accuracy.
    const int terms = a.int8_x >= 2 ? 2 : 1;
    const size_t smem = dp4a::smem_bytes(a.ntok, a.k, terms);
    if (a.int8_x && smem <= dp4a::kMaxSmem) {
      // Small matrices: narrower CTAs, so the row groups still cover the SMs.
      int warps = dp4a::kWarps;
      while (warps > 4 && (long)(a.n_out + warps * dp4a::kRows - 1) / (warps * dp4a::kRows) < sms) warps /= 2;
      size_t stage = smem;
      a.xq = nullptr;
      if (a.x_scratch) {
        if (!(a.x_staged && terms == dp4a::kStageTerms))
          quantize_x_launch(a.x, a.ntok, a.k, terms, a.x_scratch, stream);
        a.xq = a.x_scratch;
        stage = 0;
      }
      if (terms == 2)
        launch_overlapped(matvec_dp4a_kernel<T, NT, 2>, dp4a_blocks<T, NT, 2>(a, device, sms, warps, stage),
                          dim3(32, warps), stage, stream, a);
      else
        launch_overlapped(matvec_dp4a_kernel<T, NT, 1>, dp4a_blocks<T, NT, 1>(a, device, sms, warps, stage),
                          dim3(32, warps), stage, stream, a);
      HX_CUDA_CHECK(cudaGetLastError());
      return;
    }
  }
  const Plan p = plan<T, NT>(a, sms, resident_ctas<T, NT>(device));
  launch_overlapped(matvec_kernel<T, NT>, p.blocks, dim3(32, p.warps), p.smem_bytes, stream, a);
  HX_CUDA_CHECK(cudaGetLastError());
}

// Where a mixture-of-experts launch finds its experts (matvec.cuh). Pairs:
// ids set, the grouped fields null. Grouped: offsets, active and n_active set.
struct ExpertArgs {
  const int32_t* ids = nullptr;       // pairs: [count] expert of each product
  const int32_t* offsets = nullptr;   // grouped: [num_experts + 1] first row of each expert
  const int32_t* active = nullptr;    // grouped: [num_experts] experts that have rows
  const int32_t* n_active = nullptr;  // grouped: [1] entries of active
  size_t stride = 0;                  // bytes between consecutive experts' matrices
  int num_experts = 0;
  int x_div = 1;                      // pairs: product p reads x row p / x_div
};

// The expert launches: pairs (one product per blockIdx.y), pairs with the
// SwiGLU fused (kGlu rows), grouped (one expert per blockIdx.y), and the
// combine (one token per blockIdx.y, its top_k experts summed: kCombine).
enum class Experts { kPairs, kPairsGlu, kGrouped, kCombine };

template <GgmlType T, int NT, Experts K>
__global__ void __launch_bounds__(kMaxWarps * 32) matvec_experts_kernel(const Args a, const ExpertArgs ex) {
  extern __shared__ uint4 smem[];
  const DeviceCtx ctx{smem};
  Args b = a;
  if constexpr (K == Experts::kCombine) {
    // matvec_cta waits for the previous kernel (after its first weight loads
    // when static_w: the routing it reads is older than that kernel).
    const int t = blockIdx.y;
    b.ids = a.ids + (size_t)t * a.top_k;
    b.mix = a.mix + (size_t)t * a.top_k;
    b.x = a.x + (size_t)t * a.top_k * a.k;
    b.y = a.y + (size_t)t * a.n_out;
    b.ntok = 1;
    matvec_cta<T, 1, kCombine>(b, ctx);
    return;
  }
  // The routing is the previous kernel's output: wait before reading it (and
  // before any weight, whose address depends on it).
  pdl_begin();
  b.static_w = 0;
  if constexpr (K != Experts::kGrouped) {
    const int p = blockIdx.y;
    const int e = min(max(ex.ids[p], 0), ex.num_experts - 1);
    b.w = a.w + (size_t)e * ex.stride;
    b.x = a.x + (size_t)(p / ex.x_div) * a.k;
    b.ntok = 1;
    if constexpr (K == Experts::kPairsGlu) {
      b.y = a.y + (size_t)p * a.glu;
      matvec_cta<T, NT, kGlu>(b, ctx);
    } else {
      b.y = a.y + (size_t)p * a.n_out;
      matvec_cta<T, NT>(b, ctx);
    }
  } else {
    if ((int)blockIdx.y >= *ex.n_active) return;  // the whole CTA: fewer experts have rows than the grid holds
    const int e = min(max(ex.active[blockIdx.y], 0), ex.num_experts - 1);
    const int r0 = ex.offsets[e], r1 = ex.offsets[e + 1];
    b.w = a.w + (size_t)e * ex.stride;
    for (int r = r0; r < r1; r += NT) {
      if (r > r0) ctx.syncthreads();  // the previous rows' reduction is done with the shared stage
      b.x = a.x + (size_t)r * a.k;
      b.y = a.y + (size_t)r * a.n_out;
      b.ntok = min(NT, r1 - r);
      matvec_cta<T, NT>(b, ctx);
    }
  }
}

// One expert launch: grid (row groups, groups), warps planned as for a plain
// launch over groups times the rows (kCombine: groups are tokens, and each
// CTA walks top_k experts' steps).
template <GgmlType T, int NT, Experts K>
void launch_experts(const Args& in, const ExpertArgs& ex, int groups, int device, int sms, cudaStream_t stream) {
  using C = Config<T, NT>;
  const Args a = stepped<T, NT>(in);
  Args whole = a;
  whole.n_out = (int)std::min<long>((long)a.n_out * groups, 1L << 30);
  if (K == Experts::kCombine) whole.nsteps = a.nsteps * a.top_k;
  Plan p = plan<T, NT>(whole, sms, resident_ctas<T, NT>(device));
  const int blocks = K == Experts::kPairsGlu ? (a.glu + C::R / 2 - 1) / (C::R / 2) : (a.n_out + C::R - 1) / C::R;
  launch_overlapped(matvec_experts_kernel<T, NT, K>, dim3(blocks, groups), dim3(32, p.warps), p.smem_bytes, stream, a,
                    ex);
  HX_CUDA_CHECK(cudaGetLastError());
}

// Expert entry for one type; `a` and `ex` are validated by the caller.
// Grouped: ex.offsets set. Combine: a.top_k > 0 (groups: tokens). Pairs
// otherwise, with the SwiGLU fused where a.glu > 0.
template <GgmlType T>
void run_experts(const Args& a, const ExpertArgs& ex, int groups, int device, int sms, cudaStream_t stream) {
  if (ex.offsets != nullptr)
    launch_experts<T, kMatvecMaxTokens, Experts::kGrouped>(a, ex, groups, device, sms, stream);
  else if (a.top_k > 0)
    launch_experts<T, 1, Experts::kCombine>(a, ex, groups, device, sms, stream);
  else if (a.glu > 0)
    launch_experts<T, 1, Experts::kPairsGlu>(a, ex, groups, device, sms, stream);
  else
    launch_experts<T, 1, Experts::kPairs>(a, ex, groups, device, sms, stream);
}

// Entry for one type; `a` is validated by the caller.
template <GgmlType T>
void run(const Args& a, int device, int sms, cudaStream_t stream) {
  if (a.ntok <= 1)
    launch_nt<T, 1>(a, device, sms, stream);
  else if (a.ntok == 2)
    launch_nt<T, 2>(a, device, sms, stream);
  else if (a.ntok <= 4)
    launch_nt<T, 4>(a, device, sms, stream);
  else
    launch_nt<T, 8>(a, device, sms, stream);
}

#ifndef HX_MATVEC_NO_EXTERN
// Defined by the generated per-type files.
#define HX_MATVEC_DECLARE(T)                                                  \
  extern template void run<GgmlType::T>(const Args&, int, int, cudaStream_t); \
  extern template void run_experts<GgmlType::T>(const Args&, const ExpertArgs&, int, int, int, cudaStream_t);
HX_FOR_EACH_GGML_TYPE(HX_MATVEC_DECLARE)
#undef HX_MATVEC_DECLARE
#endif

}  // namespace matvec
}  // namespace hx

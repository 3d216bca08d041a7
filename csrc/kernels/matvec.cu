// Matvec entry points (plain and mixture-of-experts): argument checks,
// dispatch to the per-type kernels (matvec_impl.cuh, instantiated in
// matvec_<type>.cu), and a plain kernel for
// float matrices whose rows are not 16-byte friendly (k % 4 != 0 or an
// unaligned pointer), which the staged kernel cannot read with vector loads.
//
// Generic kernel layout: one warp per row, lanes stride over k, one fp32
// partial per token, shuffle reduction. One arch path (sm_80+).
#include "common/launch.cuh"
#include "kernels/matvec.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"
#include "kernels/matmul_tc_impl.cuh"
#include "kernels/matmul_tc_staged.cuh"
#include "kernels/matvec_impl.cuh"
#include "kernels/matvec_mma.h"

namespace hx {
namespace {

template <GgmlType T>
__device__ __forceinline__ float float_elem(const uint8_t* row, int j) {
  if constexpr (T == GgmlType::F32) {
    float v;
    memcpy(&v, row + 4 * (size_t)j, 4);
    return v;
  } else {
    const uint32_t h = (uint32_t)row[2 * (size_t)j] | ((uint32_t)row[2 * (size_t)j + 1] << 8);
    if constexpr (T == GgmlType::F16)
      return quant::half_float(h);
    else
      return quant::bits_float(h << 16);
  }
}

template <GgmlType T>
__global__ void __launch_bounds__(256) matvec_float_plain_kernel(const matvec::Args a) {
  pdl_begin();
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= a.n_out) return;
  const uint8_t* w = a.w + (size_t)row * a.row_bytes;
  float acc[kMatvecMaxTokens];
#pragma unroll
  for (int t = 0; t < kMatvecMaxTokens; ++t) acc[t] = 0.f;
  for (int j = lane; j < a.k; j += 32) {
    const float wv = float_elem<T>(w, j);
#pragma unroll
    for (int t = 0; t < kMatvecMaxTokens; ++t)
      if (t < a.ntok) acc[t] = fmaf(wv, a.x[(size_t)t * a.k + j], acc[t]);
  }
#pragma unroll
  for (int t = 0; t < kMatvecMaxTokens; ++t) {
    if (t >= a.ntok) break;
    const float v = warp_sum(acc[t]);
    if (lane == 0) {
      float* out = a.y + (size_t)t * a.n_out + row;
      float r = v;
      if (a.bias) r += a.bias[row];
      if (a.accumulate) r += *out;
      *out = r;
    }
  }
}

template <GgmlType T>
void launch_float_plain(const matvec::Args& a, cudaStream_t stream) {
  constexpr int kWarps = 8;
  launch_overlapped(matvec_float_plain_kernel<T>, (a.n_out + kWarps - 1) / kWarps, kWarps * 32, 0, stream, a);
  HX_CUDA_CHECK(cudaGetLastError());
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// quantize_x over a whole grid: warps are numbered across its CTAs, so each
// thread takes the groups one CTA's thread would (every 32-block stays in one
// warp, as the shuffles need).
struct GridCtx {
  __device__ __forceinline__ int lane() const { return threadIdx.x; }
  __device__ __forceinline__ int warp() const { return blockIdx.x * blockDim.y + threadIdx.y; }
  __device__ __forceinline__ int nwarps() const { return gridDim.x * blockDim.y; }
  __device__ __forceinline__ float shfl_xor(float v, int m) const { return __shfl_xor_sync(0xffffffffu, v, m); }
  __device__ __forceinline__ float4 ld_x(const float* p) const { return __ldg(reinterpret_cast<const float4*>(p)); }
};

template <int U>
__global__ void __launch_bounds__(256) quantize_x_kernel(const float* __restrict__ x, int ntok, int k,
                                                      uint8_t* __restrict__ out) {
  pdl_begin();
  const size_t n = (size_t)ntok * k;
  matvec::dp4a::quantize_x<U>(GridCtx{}, x, ntok, k, matvec::dp4a::stage_parts<U>(out, n));
}

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("matvec: " + what); }

// y[t, i] = (accumulate ? y : 0) + bias[i] + sum_s part[s, t, i], splits in order.
__global__ void __launch_bounds__(256) tc_reduce_kernel(const float* __restrict__ part, float* __restrict__ y,
                                                     const float* __restrict__ bias, int splits, int ntok, int n_out,
                                                     int accumulate) {
  pdl_begin();
  const size_t n = (size_t)ntok * n_out;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float v = part[i];
    for (int s = 1; s < splits; ++s) v += part[(size_t)s * n + i];
    if (bias) v += bias[i % n_out];
    if (accumulate) v += y[i];
    y[i] = v;
  }
}

// Split-K of a small-batch product: enough CTAs for `waves` per SM where the
// row tiles alone are fewer, each split at least two passes.
struct TcSplit {
  int splits, pass_per_split;
};

// A positive integer from the environment, or `fallback`.
int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  const int n = v ? std::atoi(v) : 0;
  return n > 0 ? n : fallback;
}

// A set, non-empty variable as an integer clamped at 0 (0 turns a path off), or `fallback`.
int env_count(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::max(0, std::atoi(v)) : fallback;
}

TcSplit tc_split(int n_out, int k, int sms, int waves) {
  const int npass = (k + tc::kPass - 1) / tc::kPass;
  const int tiles = (n_out + tc::kRows - 1) / tc::kRows;
  int want = (waves * sms + tiles - 1) / tiles;
  want = std::max(1, std::min({want, tc::kMaxSplits, npass / 2}));
  const int per = (npass + want - 1) / want;
  return {(npass + per - 1) / per, per};
}

}  // namespace

namespace matvec {

void quantize_x_launch(const float* x, int ntok, int k, int terms, uint8_t* out, cudaStream_t stream) {
  // One group of 4 elements per thread.
  constexpr int kWarps = 8;
  const long groups = (long)ntok * k / 4;
  const int blocks = (int)std::max(1L, (groups + kWarps * 32 - 1) / (kWarps * 32));
  if (terms == 2)
    launch_overlapped(quantize_x_kernel<2>, blocks, dim3(32, kWarps), 0, stream, x, ntok, k, out);
  else
    launch_overlapped(quantize_x_kernel<1>, blocks, dim3(32, kWarps), 0, stream, x, ntok, k, out);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace matvec

TcOptions tc_options_from_env() {
  const char* kernel = std::getenv("HELEXA_TC_KERNEL");
  TcOptions o;
  o.staged = !(kernel != nullptr && std::strcmp(kernel, "v1") == 0);
  o.waves = env_int("HELEXA_TC_WAVES", o.staged ? 6 : 2);
  o.ring_kb = env_int("HELEXA_TC_RING_KB", 32);
  o.int_tokens = env_count("HELEXA_TC_INT", o.int_tokens);
  o.wide = env_count("HELEXA_TC_WIDE", o.wide);
  return o;
}

size_t matmul_tc_workspace_bytes(int n_tok, int n_out, int k, const TcOptions& opt) {
  if (n_tok < 1 || n_out < 1 || k < 1) return 0;
  const TcSplit sp = tc_split(n_out, k, device_sm_count(current_device()), opt.waves);
  return sp.splits > 1 ? (size_t)sp.splits * n_tok * n_out * sizeof(float) : 0;
}

namespace {

// What both tensor-core entries check and fill alike (`who` opens their
// errors): one product of every token given, no bias, no split, no staging
// chosen yet.
tc::Args tc_args(GgmlType type, const void* w, const __nv_bfloat16* x, float* y, int n_out, int k, const TcOptions& opt,
                 const char* who) {
  const int ring_kb = opt.ring_kb;
  if (!is_supported(type)) bad("unsupported GGML type id " + std::to_string(static_cast<int>(type)));
  if (n_out < 1 || k < 1) bad("n_out and k must be positive");
  const int qk = block_elems(type);
  if (k % qk != 0 || k % 8 != 0)
    bad(std::string(who) + ": k=" + std::to_string(k) + " must be a multiple of 8 and of the " + type_name(type) +
        " block size " + std::to_string(qk));
  if (!w || !x || !y) bad("null pointer");
  if (!aligned16(w) || !aligned16(x)) bad(std::string(who) + ": w and x must be 16-byte aligned");
  if (ring_kb < 1) bad(std::string(who) + ": ring_kb must be positive");
  tc::Args a;
  a.w = static_cast<const uint8_t*>(w);
  a.x = x;
  a.y = y;
  a.bias = nullptr;
  a.part = nullptr;
  a.row_bytes = row_bytes(type, k);
  a.n_out = n_out;
  a.k = k;
  a.ntok = 0;
  a.npass = (k + tc::kPass - 1) / tc::kPass;
  a.splits = 1;
  a.pass_per_split = a.npass;
  a.accumulate = 0;
  a.ring_bytes = (size_t)ring_kb * 1024;
  a.stages = 0;
  a.int_tokens = opt.int_tokens;
  a.wide = opt.wide;
  return a;
}

}  // namespace

void matmul_tc_launch(GgmlType type, const void* w, const __nv_bfloat16* x, float* y, int n_out, int k, int n_tok,
                      const float* bias, bool accumulate, float* workspace, size_t workspace_bytes,
                      const TcOptions& opt, cudaStream_t stream) {
  if (n_tok < 1 || n_tok > kTcMaxTokens)
    bad("tensor-core product: n_tok must be 1.." + std::to_string(kTcMaxTokens) + ", got " + std::to_string(n_tok));
  if (opt.waves < 1) bad("tensor-core product: waves must be positive");
  tc::Args a = tc_args(type, w, x, y, n_out, k, opt, "tensor-core product");
  const TcSplit sp = tc_split(n_out, k, device_sm_count(current_device()), opt.waves);
  a.bias = bias;
  a.part = workspace;
  a.ntok = n_tok;
  a.splits = sp.splits;
  a.pass_per_split = sp.pass_per_split;
  a.accumulate = accumulate ? 1 : 0;
  if (sp.splits > 1) {
    const size_t need = (size_t)sp.splits * n_tok * n_out * sizeof(float);
    if (workspace == nullptr || workspace_bytes < need)
      bad("tensor-core product: workspace of " + std::to_string(workspace_bytes) + " bytes, need " +
          std::to_string(need) + " (matmul_tc_workspace_bytes)");
  }
  const bool staged = opt.staged;
#define HX_CASE(T)                      \
  case GgmlType::T:                     \
    if (staged)                         \
      tcs::run<GgmlType::T>(a, stream); \
    else                                \
      tc::run<GgmlType::T>(a, stream);  \
    break;
  switch (type) {
    HX_FOR_EACH_GGML_TYPE(HX_CASE)
    default: bad("unsupported GGML type");
  }
#undef HX_CASE
  if (sp.splits > 1) {
    const size_t n = (size_t)n_tok * n_out;
    const int blocks = (int)std::min<size_t>((n + 255) / 256, 4096);
    launch_overlapped(tc_reduce_kernel, blocks, 256, 0, stream, static_cast<const float*>(workspace), y, bias,
                      sp.splits, n_tok, n_out, a.accumulate);
    HX_CUDA_CHECK(cudaGetLastError());
  }
}

int moe_tile_rows(int rows_hint) {
  static const int forced = env_int("HELEXA_MOE_TILE_ROWS", 0);
  const int want = forced > 0 ? forced : rows_hint;
  const int t = std::max(1, std::min(8, (want + 7) / 8));
  return 8 * (t <= 1 ? 1 : (t <= 2 ? 2 : (t <= 4 ? 4 : 8)));
}

void matmul_tc_expert_groups_launch(GgmlType type, const void* w, size_t stride, const int4* tiles,
                                    const int32_t* n_tiles, int max_tiles, int tile_rows, const __nv_bfloat16* x,
                                    float* y, int n_out, int k, const TcOptions& opt, cudaStream_t stream) {
  if (max_tiles < 1 || max_tiles > 65535)
    bad("tensor-core expert groups: max_tiles must be 1..65535, got " + std::to_string(max_tiles));
  if (tile_rows != 8 && tile_rows != 16 && tile_rows != 32 && tile_rows != 64)
    bad("tensor-core expert groups: tile_rows must be 8, 16, 32 or 64, got " + std::to_string(tile_rows));
  if (!tiles || !n_tiles) bad("null pointer");
  // a.ntok stays 0: each tile's row count is read on the device.
  const tc::Args a = tc_args(type, w, x, y, n_out, k, opt, "tensor-core expert groups");
  if (stride % 16 != 0 || stride < row_bytes(type, k) * static_cast<size_t>(n_out))
    bad("expert stride " + std::to_string(stride) + " must be a multiple of 16 and hold a whole matrix");
  tcs::Groups gr;
  gr.tiles = tiles;
  gr.n_tiles = n_tiles;
  gr.stride = stride;
#define HX_CASE(T) \
  case GgmlType::T: tcs::run_groups<GgmlType::T>(a, gr, max_tiles, tile_rows / 8, stream); return;
  switch (type) {
    HX_FOR_EACH_GGML_TYPE(HX_CASE)
    default: break;
  }
#undef HX_CASE
  bad("unsupported GGML type");
}

static_assert(kBf16FragMaxTokens == matvec::mma::kDenseTokens && kBf16FragF32Tokens == matvec::mma::kDenseSplitTokens,
              "one token limit");

namespace {
// The Q4_K fragment kernel (matvec_mma.cu) over checked arguments: x in fp32, or xb in bf16.
void q4k_frag(const uint8_t* w, const float* x, const uint16_t* xb, float* y, int n_out, int k, int n_tok,
              const float* bias, bool accumulate, bool static_weights, uint8_t* scratch, bool local_prep, int device,
              int sms, cudaStream_t stream) {
  matvec::mma::Params p{};
  p.w = w;
  p.row_bytes = row_bytes(GgmlType::Q4_K, k);
  p.n_out = n_out;
  p.k = k;
  p.ntok = n_tok;
  p.x = x;
  p.xb = xb;
  p.y = y;
  p.bias = bias;
  p.accumulate = accumulate ? 1 : 0;
  p.static_w = static_weights ? 1 : 0;
  p.scratch = scratch;
  p.local = local_prep ? 1 : 0;
  matvec::mma::run_q4k(p, device, sms, stream);
}

void bf16_frag(const __nv_bfloat16* w, const void* x, bool f32_x, float* y, int n_out, int k, int n_tok,
               const float* bias, bool accumulate, bool static_weights, int s1, int s2, cudaStream_t stream) {
  if (!matvec_bf16_usable(n_out, k, n_tok, f32_x))
    bad("bf16 fragment matvec: n_out=" + std::to_string(n_out) + " k=" + std::to_string(k) +
        " n_tok=" + std::to_string(n_tok) + " (k a positive multiple of 64, 1.." +
        std::to_string(f32_x ? kBf16FragF32Tokens : kBf16FragMaxTokens) + " tokens)");
  if (!w || !x || !y) bad("null pointer");
  if (!aligned16(w) || !aligned16(x)) bad("bf16 fragment matvec: w and x must be 16-byte aligned");
  if (s1 < 0 || s1 > s2 || s2 > n_out) bad("bf16 fragment matvec: row runs must satisfy 0 <= s1 <= s2 <= n_out");
  matvec::mma::DenseParams p{};
  p.w = reinterpret_cast<const uint16_t*>(w);
  if (f32_x)
    p.xf = static_cast<const float*>(x);
  else
    p.x = static_cast<const uint16_t*>(x);
  p.y = y;
  p.bias = bias;
  p.n_out = n_out;
  p.k = k;
  p.ntok = n_tok;
  p.s1 = s1;
  p.s2 = s2;
  p.accumulate = accumulate ? 1 : 0;
  p.static_w = static_weights ? 1 : 0;
  const int device = current_device();
  matvec::mma::run_bf16(p, device, device_sm_count(device), stream);
}
}  // namespace

void matvec_bf16_launch(const __nv_bfloat16* w, const __nv_bfloat16* x, float* y, int n_out, int k, int n_tok,
                        const float* bias, bool accumulate, bool static_weights, int s1, int s2, cudaStream_t stream) {
  bf16_frag(w, x, false, y, n_out, k, n_tok, bias, accumulate, static_weights, s1, s2, stream);
}

void matvec_bf16_launch(const __nv_bfloat16* w, const float* x, float* y, int n_out, int k, int n_tok,
                        const float* bias, bool accumulate, bool static_weights, int s1, int s2, cudaStream_t stream) {
  bf16_frag(w, x, true, y, n_out, k, n_tok, bias, accumulate, static_weights, s1, s2, stream);
}

void matvec_q4k_frag_launch(const void* w, const __nv_bfloat16* x, float* y, int n_out, int k, int n_tok,
                            const float* bias, bool accumulate, bool static_weights, void* x_scratch, bool local_prep,
                            cudaStream_t stream) {
  if (n_out < 1 || !matvec::mma::usable(n_tok, k, x_scratch))
    bad("Q4_K fragment matvec: n_out=" + std::to_string(n_out) + " k=" + std::to_string(k) +
        " n_tok=" + std::to_string(n_tok) + " (k a positive multiple of 256, 1.." + std::to_string(kMatvecMaxTokens) +
        " tokens, an x scratch)");
  if (!w || !x || !y) bad("null pointer");
  if (!aligned16(w) || !aligned16(x) || !aligned16(x_scratch))
    bad("Q4_K fragment matvec: w, x and the scratch must be 16-byte aligned");
  const int device = current_device();
  q4k_frag(static_cast<const uint8_t*>(w), nullptr, reinterpret_cast<const uint16_t*>(x), y, n_out, k, n_tok, bias,
           accumulate, static_weights, static_cast<uint8_t*>(x_scratch), local_prep, device, device_sm_count(device),
           stream);
}

size_t matvec_x_scratch_bytes(int n_tok, int k) {
  const size_t dp4a = matvec::dp4a::smem_bytes(n_tok, k, matvec::dp4a::kMaxTerms);
  return std::max(dp4a, matvec::mma::scratch_layout(n_tok, (k + 255) / 256 * 256).bytes);
}

void matvec_launch(GgmlType type, const void* w, const float* x, float* y, int n_out, int k, int n_tok,
                   const float* bias, const MatvecOptions& options, cudaStream_t stream) {
  if (!is_supported(type)) bad("unsupported GGML type id " + std::to_string(static_cast<int>(type)));
  if (n_tok < 1 || n_tok > kMatvecMaxTokens)
    bad("n_tok must be 1.." + std::to_string(kMatvecMaxTokens) + ", got " + std::to_string(n_tok));
  if (n_out < 1 || k < 1) bad("n_out and k must be positive");
  const int qk = block_elems(type);
  if (k % qk != 0)
    bad(std::string("k=") + std::to_string(k) + " is not a multiple of the " + type_name(type) + " block size " +
        std::to_string(qk));
  if (!w || !x || !y) bad("null pointer");

  matvec::Args a;
  a.w = static_cast<const uint8_t*>(w);
  a.x = x;
  a.y = y;
  a.bias = bias;
  a.row_bytes = row_bytes(type, k);
  a.n_out = n_out;
  a.k = k;
  a.ntok = n_tok;
  a.npass = (k + 255) / 256;
  a.accumulate = options.accumulate ? 1 : 0;
  a.int8_x = options.int8_activations ? (options.precise ? 2 : 1) : 0;
  a.static_w = options.static_weights ? 1 : 0;
  a.xq = nullptr;
  const int mma_tokens = options.int8_activations ? 0 : std::max(options.mma_tokens, 0);
  a.x_scratch = (options.int8_activations || mma_tokens > 0) && options.x_scratch != nullptr
                    ? static_cast<uint8_t*>(options.x_scratch)
                    : nullptr;
  if (a.x_scratch && !aligned16(a.x_scratch)) bad("x_scratch must be 16-byte aligned");
  a.x_staged = a.x_scratch != nullptr && options.int8_activations && options.x_staged ? 1 : 0;
  a.nsteps = 0;

  const bool vec_ok = aligned16(w) && aligned16(x) && k % 4 == 0;
  if (is_float_type(type) && !vec_ok) {
    switch (type) {
      case GgmlType::F32: launch_float_plain<GgmlType::F32>(a, stream); return;
      case GgmlType::F16: launch_float_plain<GgmlType::F16>(a, stream); return;
      default: launch_float_plain<GgmlType::BF16>(a, stream); return;
    }
  }
  if (!aligned16(w)) bad("quantized weights must be 16-byte aligned");
  if (!aligned16(x)) bad("x must be 16-byte aligned");

  const int device = current_device();
  const int sms = device_sm_count(device);
  if (type == GgmlType::Q4_K && n_tok <= mma_tokens && matvec::mma::usable(n_tok, k, a.x_scratch)) {
    q4k_frag(a.w, x, nullptr, y, n_out, k, n_tok, bias, a.accumulate != 0, a.static_w != 0, a.x_scratch,
             options.mma_local_prep, device, sms, stream);
    return;
  }
#define HX_CASE(T) \
  case GgmlType::T: matvec::run<GgmlType::T>(a, device, sms, stream); return;
  switch (type) { HX_FOR_EACH_GGML_TYPE(HX_CASE) }
#undef HX_CASE
  bad("unsupported GGML type");
}

namespace {

// Args of an expert launch (validated): float math, one token per product
// (the grouped kernel sets its own count per pass).
matvec::Args expert_args(GgmlType type, const void* w, size_t stride, int num_experts, const float* x, float* y,
                         int n_out, int k) {
  if (!is_supported(type)) bad("unsupported GGML type id " + std::to_string(static_cast<int>(type)));
  if (n_out < 1 || k < 1) bad("n_out and k must be positive");
  if (num_experts < 1) bad("num_experts must be positive");
  if (k % block_elems(type) != 0 || k % 4 != 0)
    bad(std::string("expert rows of k=") + std::to_string(k) + " must be a multiple of 4 and of the " +
        type_name(type) + " block size " + std::to_string(block_elems(type)));
  if (!w || !x || !y) bad("null pointer");
  if (!aligned16(w) || !aligned16(x)) bad("expert weights and x must be 16-byte aligned");
  if (stride % 16 != 0 || stride < row_bytes(type, k) * static_cast<size_t>(n_out))
    bad("expert stride " + std::to_string(stride) + " must be a multiple of 16 and hold a whole matrix");
  matvec::Args a;
  a.w = static_cast<const uint8_t*>(w);
  a.x = x;
  a.y = y;
  a.bias = nullptr;
  a.row_bytes = row_bytes(type, k);
  a.n_out = n_out;
  a.k = k;
  a.ntok = 1;
  a.npass = (k + 255) / 256;
  a.nsteps = 0;
  a.accumulate = 0;
  a.int8_x = 0;
  a.static_w = 0;
  a.xq = nullptr;
  a.x_scratch = nullptr;
  return a;
}

void dispatch_experts(GgmlType type, const matvec::Args& a, const matvec::ExpertArgs& ex, int groups,
                      cudaStream_t stream) {
  const int device = current_device();
  const int sms = device_sm_count(device);
#define HX_CASE(T) \
  case GgmlType::T: matvec::run_experts<GgmlType::T>(a, ex, groups, device, sms, stream); return;
  switch (type) { HX_FOR_EACH_GGML_TYPE(HX_CASE) }
#undef HX_CASE
  bad("unsupported GGML type");
}

}  // namespace

namespace {

// The pairs' routing: product p reads expert ids[p] and x row p / x_div.
matvec::ExpertArgs pair_routing(const int32_t* ids, int x_div, size_t stride, int num_experts, int count) {
  if (count < 1 || count > 65535) bad("expert pairs: count must be 1..65535, got " + std::to_string(count));
  if (x_div < 1) bad("expert pairs: x_div must be positive");
  if (!ids) bad("expert pairs: null ids");
  matvec::ExpertArgs ex;
  ex.ids = ids;
  ex.stride = stride;
  ex.num_experts = num_experts;
  ex.x_div = x_div;
  return ex;
}

}  // namespace

void matvec_expert_pairs_launch(GgmlType type, const void* w, size_t stride, int num_experts, const int32_t* ids,
                                const float* x, int x_div, float* y, int n_out, int k, int count, cudaStream_t stream) {
  const matvec::ExpertArgs ex = pair_routing(ids, x_div, stride, num_experts, count);
  dispatch_experts(type, expert_args(type, w, stride, num_experts, x, y, n_out, k), ex, count, stream);
}

void matvec_expert_pairs_glu_launch(GgmlType type, const void* w, size_t stride, int num_experts, const int32_t* ids,
                                    const float* x, int x_div, float* y, int f, int k, int count, cudaStream_t stream) {
  const matvec::ExpertArgs ex = pair_routing(ids, x_div, stride, num_experts, count);
  if (f < 1 || f > (1 << 29)) bad("expert pairs: bad SwiGLU width " + std::to_string(f));
  matvec::Args a = expert_args(type, w, stride, num_experts, x, y, 2 * f, k);
  a.glu = f;
  dispatch_experts(type, a, ex, count, stream);
}

void matvec_expert_combine_launch(GgmlType type, const void* w, size_t stride, int num_experts, const int32_t* ids,
                                  const float* mix, int top_k, const float* act, float* x, int n_out, int k, int n_tok,
                                  bool routing_settled, cudaStream_t stream) {
  if (n_tok < 1 || n_tok > 65535) bad("expert combine: n_tok must be 1..65535, got " + std::to_string(n_tok));
  if (top_k < 1 || top_k > num_experts)
    bad("expert combine: top_k must be 1..num_experts, got " + std::to_string(top_k));
  if (!ids || !mix) bad("expert combine: null routing arrays");
  matvec::Args a = expert_args(type, w, stride, num_experts, act, x, n_out, k);
  a.accumulate = 1;
  a.static_w = routing_settled ? 1 : 0;
  a.ids = ids;
  a.mix = mix;
  a.stride = stride;
  a.top_k = top_k;
  a.num_experts = num_experts;
  dispatch_experts(type, a, matvec::ExpertArgs{}, n_tok, stream);
}

void matvec_expert_groups_launch(GgmlType type, const void* w, size_t stride, int num_experts, const int32_t* offsets,
                                 const int32_t* active, const int32_t* n_active, int max_groups, const float* x,
                                 float* y, int n_out, int k, cudaStream_t stream) {
  if (max_groups < 1 || max_groups > 65535)
    bad("expert groups: max_groups must be 1..65535, got " + std::to_string(max_groups));
  if (!offsets || !active || !n_active) bad("expert groups: null routing arrays");
  matvec::ExpertArgs ex;
  ex.offsets = offsets;
  ex.active = active;
  ex.n_active = n_active;
  ex.stride = stride;
  ex.num_experts = num_experts;
  dispatch_experts(type, expert_args(type, w, stride, num_experts, x, y, n_out, k), ex, max_groups, stream);
}

}  // namespace hx

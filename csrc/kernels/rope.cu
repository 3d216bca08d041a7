// Rotary position embedding, in place on q [n, nq, d] and k [n, nk, d].
//
// One block per token: its threads first fill a shared table of cos/sin for
// the d/2 angles pos * inv_freq[i] (float64 angle and sincos, rounded to
// float32 once, exactly what the CPU reference feeds its float32 rotation),
// then rotate every pair of every q and k head of that token. The rotation
// uses explicitly rounded float32 products and sums (no FMA contraction) so
// it reproduces the reference's `a * cos - b * sin` bit for bit.
// Styles (common/rope_style.h): Half rotates (i, i + d/2) (HF rotate_half),
// Pairs rotates (2i, 2i + 1) (GGML).
// One arch path (sm_80+ baseline); the float64 work is d/2 sincos per token.
// rope_kv_kernel is the forward's fused form: cos/sin come from a float32
// table built once per model (same values), and k / v go straight on to the
// bf16 KV pool at each token's pool position (its logical position, which
// the rotation uses, remapped through the sequence's block table by the
// host), so a decode step spends one small launch here instead of two.
#include "common/launch.cuh"
#include "kernels/rope.cuh"

#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"

namespace hx {
namespace {

template <typename FT>
__global__ void rope_kernel(float* __restrict__ q, float* __restrict__ k, const int32_t* __restrict__ pos,
                            const FT* __restrict__ inv_freq, int nq, int nk, int d, RopeStyle style) {
  extern __shared__ float cs[];  // [half] cos, then [half] sin
  const int t = blockIdx.x;
  const int half = d >> 1;
  const double p = (double)pos[t];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    double s, c;
    sincos(p * (double)inv_freq[i], &s, &c);
    cs[i] = (float)c;
    cs[half + i] = (float)s;
  }
  __syncthreads();
  const int total = (nq + nk) * half;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int head = idx / half;
    const int i = idx - head * half;
    float* x = head < nq ? q + ((size_t)t * nq + head) * d : k + ((size_t)t * nk + (head - nq)) * d;
    const int i0 = style == RopeStyle::Half ? i : 2 * i;
    const int i1 = style == RopeStyle::Half ? i + half : 2 * i + 1;
    const float x0 = x[i0], x1 = x[i1];
    const float c = cs[i], s = cs[half + i];
    x[i0] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    x[i1] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
  }
}

template <typename FT>
void rope_impl(float* q, float* k, const int32_t* pos, const FT* inv_freq, int n, int nq, int nk, int d,
               RopeStyle style, cudaStream_t stream) {
  if (n < 0 || nq < 0 || nk < 0 || d <= 0 || (d & 1))
    throw std::invalid_argument("rope: bad sizes n=" + std::to_string(n) + " nq=" + std::to_string(nq) +
                                " nk=" + std::to_string(nk) + " d=" + std::to_string(d) + " (d must be even)");
  if (!is_rope_style(style))
    throw std::invalid_argument("rope: unknown rope style " + std::to_string(static_cast<int>(style)));
  if (nk > 0 && k == nullptr) throw std::invalid_argument("rope: k is null with nk > 0");
  if (n == 0 || nq + nk == 0) return;
  const int pairs = (nq + nk) * (d / 2);
  int threads = (pairs + 31) / 32 * 32;
  threads = threads > 256 ? 256 : threads;
  rope_kernel<FT><<<n, threads, (size_t)d * sizeof(float), stream>>>(q, k, pos, inv_freq, nq, nk, d, style);
  HX_CUDA_CHECK(cudaGetLastError());
}

// cos/sin of pos * inv_freq[i] for every position below len: the same
// float64 sincos rounded once to float32 as rope_kernel<double> computes.
__global__ void rope_table_kernel(const double* __restrict__ inv_freq, float2* __restrict__ table, int len,
                                  int half) {
  const int64_t total = (int64_t)len * half;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int p = (int)(idx / half);
    const int i = (int)(idx - (int64_t)p * half);
    double s, c;
    sincos((double)p * inv_freq[i], &s, &c);
    table[idx] = make_float2((float)c, (float)s);
  }
}

constexpr int kRopeKvWarps = 8;

// One warp per (token, head) row; heads [0, nq) are q, [nq, nq + nk) k,
// [nq + nk, nq + 2 nk) v. q/k rows get the optional per-head rms norm (same
// lane-strided sum and rounding as head_rms_norm_kernel) and the rotation
// at pos; k and v rows then go to the bf16 pool at slot_pos (skipped outside
// [0, cap)).
__global__ void __launch_bounds__(kRopeKvWarps * 32)
rope_kv_kernel(float* __restrict__ q, float* __restrict__ k, const float* __restrict__ v,
               __nv_bfloat16* __restrict__ kc, __nv_bfloat16* __restrict__ vc, const int32_t* __restrict__ pos,
               const int32_t* __restrict__ slot_pos, const float2* __restrict__ table, int table_len,
               const double* __restrict__ inv_freq,
               const float* __restrict__ q_norm, const float* __restrict__ k_norm, float eps, int nq, int nk,
               int d, int cap, RopeStyle style) {
  pdl_begin();
  const int t = blockIdx.x;
  const int head = blockIdx.y * kRopeKvWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (head >= nq + 2 * nk) return;
  const int p = pos[t];
  const int sp = slot_pos[t];
  const bool cached = sp >= 0 && sp < cap;
  if (head >= nq + nk) {
    const int kh = head - nq - nk;
    if (!cached) return;
    const float* src = v + ((size_t)t * nk + kh) * d;
    __nv_bfloat16* dst = vc + ((size_t)kh * cap + sp) * d;
    for (int i = lane; i < d; i += 32) dst[i] = __float2bfloat16_rn(src[i]);
    return;
  }
  const bool is_q = head < nq;
  const int kh = head - nq;
  float* x = is_q ? q + ((size_t)t * nq + head) * d : k + ((size_t)t * nk + kh) * d;
  const float* nw = is_q ? q_norm : k_norm;
  float inv = 1.f;
  if (nw != nullptr) {
    float ss = 0.f;
    for (int i = lane; i < d; i += 32) ss += x[i] * x[i];
    ss = warp_sum(ss);
    inv = 1.0f / sqrtf(ss / (float)d + eps);
  }
  const int half = d >> 1;
  const bool in_table = p >= 0 && p < table_len;
  __nv_bfloat16* kdst = (!is_q && cached) ? kc + ((size_t)kh * cap + sp) * d : nullptr;
  for (int i = lane; i < half; i += 32) {
    float c, s;
    if (in_table) {
      const float2 cs = table[(size_t)p * half + i];
      c = cs.x;
      s = cs.y;
    } else {
      double sd, cd;
      sincos((double)p * inv_freq[i], &sd, &cd);
      c = (float)cd;
      s = (float)sd;
    }
    const int i0 = style == RopeStyle::Half ? i : 2 * i;
    const int i1 = style == RopeStyle::Half ? i + half : 2 * i + 1;
    float x0 = x[i0], x1 = x[i1];
    if (nw != nullptr) {
      x0 = x0 * inv * nw[i0];
      x1 = x1 * inv * nw[i1];
    }
    const float y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    const float y1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
    x[i0] = y0;
    x[i1] = y1;
    if (kdst != nullptr) {
      kdst[i0] = __float2bfloat16_rn(y0);
      kdst[i1] = __float2bfloat16_rn(y1);
    }
  }
}

}  // namespace

void rope_launch(float* q, float* k, const int32_t* pos, const float* inv_freq, int n, int nq, int nk, int d,
                 RopeStyle style, cudaStream_t stream) {
  rope_impl(q, k, pos, inv_freq, n, nq, nk, d, style, stream);
}

void rope_launch(float* q, float* k, const int32_t* pos, const double* inv_freq, int n, int nq, int nk, int d,
                 RopeStyle style, cudaStream_t stream) {
  rope_impl(q, k, pos, inv_freq, n, nq, nk, d, style, stream);
}

void rope_table_launch(const double* inv_freq, float* table, int len, int d, cudaStream_t stream) {
  if (len < 0 || d <= 0 || (d & 1))
    throw std::invalid_argument("rope_table: bad sizes len=" + std::to_string(len) + " d=" + std::to_string(d));
  const int64_t total = (int64_t)len * (d / 2);
  if (total == 0) return;
  const int threads = 256;
  const int64_t want = (total + threads - 1) / threads;
  const int blocks = (int)(want < 4096 ? want : 4096);
  rope_table_kernel<<<blocks, threads, 0, stream>>>(inv_freq, reinterpret_cast<float2*>(table), len, d / 2);
  HX_CUDA_CHECK(cudaGetLastError());
}

void rope_kv_append_launch(float* q, float* k, const float* v, __nv_bfloat16* kc, __nv_bfloat16* vc,
                           const int32_t* pos, const int32_t* slot_pos, const float* table, int table_len,
                           const double* inv_freq,
                           const float* q_norm, const float* k_norm, float eps, int n, int nq, int nk, int d,
                           int cap, RopeStyle style, cudaStream_t stream) {
  if (n < 0 || nq < 0 || nk <= 0 || d <= 0 || (d & 1) || cap <= 0 || table_len < 0)
    throw std::invalid_argument("rope_kv_append: bad sizes n=" + std::to_string(n) + " nq=" + std::to_string(nq) +
                                " nk=" + std::to_string(nk) + " d=" + std::to_string(d) +
                                " cap=" + std::to_string(cap) + " (d must be even)");
  if (!is_rope_style(style))
    throw std::invalid_argument("rope_kv_append: unknown rope style " + std::to_string(static_cast<int>(style)));
  if (inv_freq == nullptr) throw std::invalid_argument("rope_kv_append: inv_freq is required");
  if (n > 0 && (pos == nullptr || slot_pos == nullptr))
    throw std::invalid_argument("rope_kv_append: pos and slot_pos are required");
  if ((q_norm == nullptr) != (k_norm == nullptr))
    throw std::invalid_argument("rope_kv_append: q_norm and k_norm must be given together");
  if (table == nullptr) table_len = 0;
  if (n == 0) return;
  const int rows = nq + 2 * nk;
  const dim3 grid(n, (rows + kRopeKvWarps - 1) / kRopeKvWarps);
  launch_overlapped(rope_kv_kernel, grid, kRopeKvWarps * 32, 0, stream, q, k, v, kc, vc, pos, slot_pos,
                    reinterpret_cast<const float2*>(table), table_len, inv_freq, q_norm, k_norm, eps, nq, nk, d, cap,
                    style);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

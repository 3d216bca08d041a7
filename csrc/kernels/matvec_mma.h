// The fragment matvec's interface (matvec_mma.cu): the Q4_K product of 1..8
// tokens on tensor cores, its prepared activations in a caller's scratch; and
// the bf16 product of 1..32 tokens, weights loaded straight into fragments.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace hx {
namespace matvec {
namespace mma {

constexpr int kWarps = 8;    // warps per CTA: row tiles x k-splits
constexpr int kTokens = 8;   // the MMA's n: tokens one launch takes at most
constexpr int kSbBytes = 144;  // one Q4_K super-block

// The prep kernel's output inside x_scratch (16-byte aligned pieces):
//   x16 [ntok][nsb][16][4] uint2: fp16 of x * 2^e, group of four 16c + r of a
//       super-block (elements 64c + 4r ..) at [r][c], stored as (x0, x2, x1, x3);
//   xs  [ntok][nsb][4] uint2: sub-block means of those fp16 values for pair c,
//       {half2(hi(2c), hi(2c + 1)), half2(lo(2c), lo(2c + 1))};
//   inv [nsb][kTokens] float: 2^-e of each super-block and token.
struct Scratch {
  size_t xs_off, inv_off, bytes;
};
inline Scratch scratch_layout(int ntok, int k) {
  const size_t nsb = (size_t)k / 256;
  Scratch s;
  s.xs_off = ((size_t)ntok * k * 2 + 15) & ~size_t(15);
  s.inv_off = s.xs_off + (size_t)ntok * nsb * 4 * sizeof(uint2);
  s.bytes = s.inv_off + nsb * kTokens * sizeof(float);
  return s;
}

struct Params {
  const uint8_t* w;  // [n_out][nsb * 144]
  size_t row_bytes;
  int n_out, k, nsb, ntok;
  const float* x;      // [ntok][k] (the prep's input)
  const uint16_t* xb;  // or [ntok][k] bf16 (x then unused)
  float* y;        // [ntok][n_out]
  const float* bias;
  int accumulate, static_w;
  int ks;  // k-splits per CTA: 1, 2, 4 or 8; row tiles per CTA: kWarps / ks
  uint8_t* scratch;
  int local;  // CTAs prepare x in their shared memory where it fits (kLocalBytes), not the prep kernel
  Scratch lay;
};

// Whether the fragment kernel takes this product: Q4_K rows (k a multiple of
// 256) of 1..kTokens tokens, a scratch for the prep kernel's output.
inline bool usable(int ntok, int k, const void* scratch) {
  return scratch != nullptr && ntok >= 1 && ntok <= kTokens && k % 256 == 0 && k > 0;
}

// The product (and, where the CTAs do not prepare x themselves, the prep
// kernel before it) on `stream`; p.nsb, p.lay and p.ks are set here.
void run_q4k(Params p, int device, int sms, cudaStream_t stream);

// bf16 weights, bf16 x: tiles of 8 tokens (1, 2 or 4 of them).
constexpr int kDenseTokens = 32;  // tokens one launch takes at most (kBf16FragMaxTokens)
constexpr int kDenseChunk = 64;   // k elements a warp takes per step (k a multiple of it)
constexpr int kDenseSplitTokens = 4;  // tokens of fp32 x one launch takes (split into hi + lo)
struct DenseParams {
  const uint16_t* w;  // [n_out][k] bf16
  const uint16_t* x;  // [ntok][k] bf16, or null with xf
  const float* xf;    // [ntok][k] fp32, ntok <= kDenseSplitTokens: each token two MMA columns, hi and lo
  float* y;           // rows [0, s1), [s1, s2), [s2, n_out) as [ntok][run] one run after another
  const float* bias;
  int n_out, k, ntok, nch;  // nch = k / kDenseChunk
  int s1, s2;
  int accumulate, static_w;
  int ks;  // k-splits per CTA, as Params::ks
};
void run_bf16(DenseParams p, int device, int sms, cudaStream_t stream);

}  // namespace mma
}  // namespace matvec
}  // namespace hx

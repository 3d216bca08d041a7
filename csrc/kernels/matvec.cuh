// Quantized / float matrix-vector products for decode: y = W x (+ bias), for
// up to kMatvecMaxTokens tokens, reading weights in their stored GGUF layout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/ggml_types.h"

namespace hx {

// Most tokens one matvec_launch handles. The forward sends batches up to this
// size through the matvec and larger ones through dequantize + GEMM, where
// tensor cores win.
constexpr int kMatvecMaxTokens = 8;

// How one matvec_launch runs; the defaults are a plain y = W x (+ bias) in
// float math.
struct MatvecOptions {
  // y += instead of y =.
  bool accumulate = false;
  // Q4_0/Q8_0/Q4_K/Q6_K: quantize x to int8 blocks of 32 and use integer dot
  // products (about 1.5x faster decode, ~0.3% relative error per product).
  bool int8_activations = false;
  // With int8_activations: two int8 terms per element (x and its quantization
  // residual), near float accuracy for twice the dp4a work and stage size;
  // where that stage does not fit 48 KiB the float kernel runs. false: one term.
  bool precise = true;
  // No kernel ever writes w (model weights): the launch may read it before
  // the previous kernel of the stream has finished (launch.cuh).
  bool static_weights = false;
  // With int8_activations: a device buffer of matvec_x_scratch_bytes(n_tok, k)
  // bytes or more (16-byte aligned). x is quantized into it once, by a small
  // kernel, instead of by every CTA of the product. Launches sharing it must
  // be ordered on one stream. nullptr: each CTA quantizes x for itself.
  void* x_scratch = nullptr;
  // With int8_activations, precise and x_scratch: the scratch already holds
  // x's stage, written by x's producer (add_rms_norm_launch, swiglu_launch,
  // attention_decode_launch with an x_stage), so no quantize launch runs.
  bool x_staged = false;
  // Q4_K without int8_activations: up to this many tokens, the fragment
  // kernel (matvec_mma.cu: weights decoded into tensor-core fragments, x
  // rounded to 11 significant bits, fp32 sums), its x prepared once into
  // x_scratch (required; without it the float kernel runs). 0: off.
  int mma_tokens = 0;
  // With mma_tokens: each CTA prepares x in its own shared memory where that
  // fits (one token up to k = 18204), instead of one prep kernel into x_scratch.
  bool mma_local_prep = false;
};

// y[t, i] (= or +=) sum_j W[i, j] * x[t, j] (+ bias[i]) for t < n_tok, i < n_out.
// W is n_out stored rows of k elements of `type` (k a multiple of the block
// size; w 16-byte aligned). x must be 16-byte aligned. Every GGML type of
// ggml_types.h is accepted. Throws std::invalid_argument for a bad type, size
// or alignment; hx::CudaError if the launch fails.
void matvec_launch(GgmlType type, const void* w /*[n_out, k] stored rows*/, const float* x /*[n_tok, k]*/,
                   float* y /*[n_tok, n_out]*/, int n_out, int k, int n_tok /*1..kMatvecMaxTokens*/,
                   const float* bias /*[n_out] or nullptr*/, const MatvecOptions& options, cudaStream_t stream);

// Q4_K rows on the fragment kernel (MatvecOptions::mma_tokens) with x in bf16:
// for batches whose activations the forward holds in bf16 (those it would
// otherwise send to matmul_tc_launch). 1..kMatvecMaxTokens tokens, k a
// multiple of 256; x_scratch as MatvecOptions::x_scratch (required);
// local_prep as MatvecOptions::mma_local_prep. Throws std::invalid_argument
// on bad arguments.
void matvec_q4k_frag_launch(const void* w /*[n_out, k] Q4_K rows*/, const __nv_bfloat16* x /*[n_tok, k]*/, float* y,
                            int n_out, int k, int n_tok, const float* bias /*[n_out] or nullptr*/, bool accumulate,
                            bool static_weights, void* x_scratch, bool local_prep, cudaStream_t stream);

// Most tokens one matvec_bf16_launch handles: with bf16 x, with fp32 x.
constexpr int kBf16FragMaxTokens = 32;
constexpr int kBf16FragF32Tokens = 4;

// bf16 weights on tensor cores, for a few tokens (matvec_mma.cu): each weight
// is loaded once straight into an MMA fragment (no shared-memory stage, no
// conversion), x is read in place, sums in fp32 and added over k in a fixed
// order (results never depend on scheduling).
//   y (= or +=) W x (+ bias)
// x in bf16 (1..kBf16FragMaxTokens tokens), or in fp32 (1..kBf16FragF32Tokens
// tokens: each rounded to bf16 and its remainder rounded again, the two
// multiplied in the MMA's otherwise idle columns, so x keeps about 16
// significant bits). Output rows may go to up to three runs, each laid out
// [n_tok][run rows] one after another in y: rows [0, s1), [s1, s2),
// [s2, n_out) (a fused q|k|v or gate|up matrix into its separate outputs);
// s1 = s2 = n_out: plainly [n_tok, n_out]. k a multiple of 64; w and x
// 16-byte aligned. static_weights as in MatvecOptions. Throws
// std::invalid_argument on bad arguments.
void matvec_bf16_launch(const __nv_bfloat16* w /*[n_out, k]*/, const __nv_bfloat16* x /*[n_tok, k]*/, float* y,
                        int n_out, int k, int n_tok, const float* bias /*[n_out] or nullptr*/, bool accumulate,
                        bool static_weights, int s1, int s2, cudaStream_t stream);
void matvec_bf16_launch(const __nv_bfloat16* w /*[n_out, k]*/, const float* x /*[n_tok, k]*/, float* y, int n_out,
                        int k, int n_tok, const float* bias /*[n_out] or nullptr*/, bool accumulate,
                        bool static_weights, int s1, int s2, cudaStream_t stream);
// Whether matvec_bf16_launch takes these sizes (f32_x: the fp32-x form).
inline bool matvec_bf16_usable(int n_out, int k, int n_tok, bool f32_x = false) {
  return n_out >= 1 && k >= 64 && k % 64 == 0 && n_tok >= 1 &&
         n_tok <= (f32_x ? kBf16FragF32Tokens : kBf16FragMaxTokens);
}

// Most tokens one matmul_tc_launch handles.
constexpr int kTcMaxTokens = 64;

// The same product for a batch of tokens on tensor cores (matmul_tc_impl.cuh):
// x in bf16, each weight block read once and decoded exactly (then rounded to
// bf16), fp32 accumulation; y[t, i] (= or +=) sum_j W[i, j] x[t, j] (+ bias[i])
// for t < n_tok. Every GGML type; k a multiple of 8 and of the block size;
// w and x 16-byte aligned. Where the rows alone do not fill the GPU the k
// range is split, and the splits are added in a fixed order from `workspace`
// (matmul_tc_workspace_bytes(n_tok, n_out, k) bytes; nullptr when that is 0).
// Capturable in a CUDA graph once the first launch of each token tile on the
// device has run outside capture. Throws std::invalid_argument on bad
// arguments.
// How it runs: `opt` picks the implementation and its split and ring sizes.
struct TcOptions {
  bool staged = true;  // matmul_tc_staged.cuh instead of matmul_tc_impl.cuh
  int waves = 6;       // CTAs per SM the split along k aims at
  int ring_kb = 32;    // the staged ring's shared memory
  int int_tokens = -1;  // Q4_K / Q6_K on integer weights up to this many tokens (-1: per type)
  int wide = -1;        // 8-warp CTAs from this many token tiles (-1: per type, 0: never)
};
// The options the environment asks for (read once by a model at load):
//   HELEXA_TC_KERNEL=v1      the first (unstaged) implementation;
//   HELEXA_TC_WAVES          waves (default 6; v1 2);
//   HELEXA_TC_RING_KB        ring_kb (default 32: several CTAs per SM);
//   HELEXA_TC_INT            int_tokens for both types (default: Q4_K 16, Q6_K 32;
//                            0 turns the integer path off);
//   HELEXA_TC_WIDE           wide for every shape (default: 8 tiles, Q8_0 4, for
//                            matrices of 4096+ rows; 0: never).
// The staged defaults are the best of an H100 A/B (bench/notes.md).
TcOptions tc_options_from_env();

void matmul_tc_launch(GgmlType type, const void* w /*[n_out, k] stored rows*/, const __nv_bfloat16* x /*[n_tok, k]*/,
                      float* y /*[n_tok, n_out]*/, int n_out, int k, int n_tok /*1..kTcMaxTokens*/,
                      const float* bias /*[n_out] or nullptr*/, bool accumulate, float* workspace,
                      size_t workspace_bytes, const TcOptions& opt, cudaStream_t stream);

// Mixture-of-experts products on tensor cores, in the grouped layout of
// matvec_expert_groups_launch: x's rows sorted by expert (moe_align_launch's
// slots), y row r = W_e x row r for r's expert e, x in bf16 (the arithmetic
// of matmul_tc_launch). The work is moe_align_launch's tile list for
// tile_rows (8, 16, 32 or 64): CTA (i, j) multiplies 64 rows of tile j's
// expert matrix with tile j's rows, so an expert with many rows takes many
// CTAs at once, and the routing is read on the device (capturable in a
// graph; max_tiles, 1..65535, bounds *n_tiles: moe_max_tiles). k a multiple
// of 8 and of the block size; w, x 16-byte aligned, stride a multiple of 16.
// Throws std::invalid_argument on bad arguments, and where two ring stages
// of the type do not fit in the device's shared memory (wide float rows on a
// small-shared-memory part: use matvec_expert_groups_launch).
void matmul_tc_expert_groups_launch(GgmlType type, const void* w /*[num_experts][n_out, k] stored rows, stride apart*/,
                                    size_t stride, const int4* tiles /*[max_tiles]*/, const int32_t* n_tiles /*[1]*/,
                                    int max_tiles, int tile_rows, const __nv_bfloat16* x /*[rows, k]*/,
                                    float* y /*[rows, n_out]*/, int n_out, int k, const TcOptions& opt,
                                    cudaStream_t stream);

// Rows per tile of the grouped products for experts expected to hold
// rows_hint rows each: 8, 16, 32 or 64 (HELEXA_MOE_TILE_ROWS forces one).
int moe_tile_rows(int rows_hint);

// Workspace bytes of one matmul_tc_launch with `opt` on the current device (0: no split).
size_t matmul_tc_workspace_bytes(int n_tok, int n_out, int k, const TcOptions& opt);

// Bytes of the x_scratch buffer of one matvec_launch of n_tok tokens of k elements.
size_t matvec_x_scratch_bytes(int n_tok, int k);

// Expert products of a mixture-of-experts layer. W is a stack of
// num_experts matrices of [n_out, k] stored rows, expert e's starting at
// w + e * stride (stride a multiple of 16, w 16-byte aligned, k a multiple
// of 4). Which expert a product reads is read from device memory, written by
// the kernel before (the router), so one captured graph serves any routing.
// Float math, the same kernel body as matvec_launch (an expert's weights are
// not static: its id is only known once the previous kernel has finished).
//
// Pairs: product p < count reads expert ids[p] (clamped into range) and x
// row p / x_div, and writes y row p: one launch covers every (token, chosen
// expert) pair of a small batch (x_div = experts per token for the first
// product of the experts' FFN, 1 for the second).
void matvec_expert_pairs_launch(GgmlType type, const void* w /*[num_experts][n_out, k] stored rows, stride apart*/,
                                size_t stride, int num_experts, const int32_t* ids /*[count] device*/,
                                const float* x /*[count / x_div, k]*/, int x_div, float* y /*[count, n_out]*/,
                                int n_out, int k, int count /*1..65535*/, cudaStream_t stream);

// Pairs over a gate|up stack (expert e's rows [0, f) gate, [f, 2f) up, of k
// elements) with the SwiGLU applied: y row p = silu(gate_e x) * (up_e x),
// [count, f], in the bits swiglu_launch would give for the plain pairs'
// output. One launch instead of the pairs and the SwiGLU.
void matvec_expert_pairs_glu_launch(GgmlType type, const void* w /*[num_experts][2 f, k] stored rows, stride apart*/,
                                    size_t stride, int num_experts, const int32_t* ids /*[count] device*/,
                                    const float* x /*[count / x_div, k]*/, int x_div, float* y /*[count, f]*/, int f,
                                    int k, int count /*1..65535*/, cudaStream_t stream);

// The experts' second product and their weighted sum, into the residual:
//   x[t] += sum_j mix[t, j] * W_{ids[t, j]} act[t * top_k + j]   (t < n_tok)
// W a stack of [n_out, k] matrices as above; ids and mix [n_tok, top_k] in
// device memory (moe_route_launch's output). One CTA row group per (token,
// n_out rows) walks that token's top_k experts, so a small batch's experts
// need no separate combine pass (float sums in another order than
// matvec_expert_pairs_launch + moe_combine_launch: equal to rounding).
// routing_settled: ids were written before the kernel that precedes this
// launch on the stream (which begins by waiting for its own predecessor, as
// every overlapped kernel here does), so the first weight loads may go out
// before waiting for act.
void matvec_expert_combine_launch(GgmlType type, const void* w /*[num_experts][n_out, k] stored rows, stride apart*/,
                                  size_t stride, int num_experts, const int32_t* ids /*[n_tok, top_k] device*/,
                                  const float* mix /*[n_tok, top_k] device*/, int top_k,
                                  const float* act /*[n_tok * top_k, k]*/, float* x /*[n_tok, n_out]*/, int n_out,
                                  int k, int n_tok /*1..65535*/, bool routing_settled, cudaStream_t stream);

// Grouped: x holds rows sorted by expert (rows offsets[e] .. offsets[e + 1] - 1
// are expert e's; active[0 .. *n_active) lists the experts that have rows;
// all in device memory, as moe_align_launch writes them). One CTA row group
// per (expert, n_out rows) streams that expert's rows once from memory for
// all of its x rows, kMatvecMaxTokens at a time (the repeats hit L2).
// max_groups (1..65535) bounds *n_active: the grid holds that many experts.
void matvec_expert_groups_launch(GgmlType type, const void* w /*[num_experts][n_out, k] stored rows, stride apart*/,
                                 size_t stride, int num_experts, const int32_t* offsets /*[num_experts + 1] device*/,
                                 const int32_t* active /*[num_experts] device*/, const int32_t* n_active /*[1] device*/,
                                 int max_groups, const float* x /*[rows, k]*/, float* y /*[rows, n_out]*/, int n_out,
                                 int k, cudaStream_t stream);

}  // namespace hx

// GpuModel: one llama-family decoder resident on a device worker.
//
// Lives in the worker's slab as a Resource, so it is built, used and
// destroyed only on the worker thread. It owns every device buffer it uses
// (weights, KV cache, scratch, I/O slots) and frees them in its destructor.
//
// Forward plan, per layer (n tokens; residual x is float32 [n, hidden]):
//   xn = rmsnorm(x) * attn_norm
//   q|k|v = xn Wqkv^T (+ bias)              n <= 8: quantized matvec; else dequant->bf16 + GEMM
//   q, k = rope(head_rmsnorm(q, k) (qwen3), pos); kv cache[pos] = k, v
//                                            one fused launch, cos/sin from a table built at load
//   a = attention(q, cache)                 n == 1 decode: split-sequence kernel reading seq_len
//                                            from device memory; else tensor-core causal prefill
//   x += a Wo^T                              (matvec accumulate / GEMM with beta = 1)
//   xn = rmsnorm(x) * ffn_norm
//   x += (silu(xn Wg^T) * (xn Wu^T)) Wd^T
// then logits = rmsnorm(x_last) * output_norm @ Wout^T and the device sampler.
// q/k/v and gate/up share one buffer each when their stored types match, so
// a decode step issues one matvec for each pair.
//
// Decode (one token) is recorded once per sampling mode as a CUDA graph and
// replayed; everything that changes per step (token, position, sequence
// length, sampler step, sampling parameters) sits in one device struct that a
// single host-to-device copy refreshes before the replay.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/ggml_types.h"
#include "kernels/matvec.cuh"
#include "kernels/sampling.cuh"
#include "model/model_api.h"
#include "runtime/worker.h"

namespace hx {

// A weight matrix [n_out, k] in its stored (GGUF) layout, or a row range of one.
struct LinearWeight {
  GgmlType type = GgmlType::F32;
  const void* data = nullptr;
  int n_out = 0;
  int k = 0;

  size_t stride() const { return row_bytes(type, k); }
  LinearWeight rows(int first, int count) const {
    LinearWeight r = *this;
    r.data = static_cast<const char*>(data) + stride() * static_cast<size_t>(first);
    r.n_out = count;
    return r;
  }
};

struct LayerWeights {
  const float* attn_norm = nullptr;   // [hidden]
  const float* ffn_norm = nullptr;    // [hidden]
  const float* q_norm = nullptr;      // [head_dim] (qwen3)
  const float* k_norm = nullptr;      // [head_dim] (qwen3)
  const float* b_qkv = nullptr;       // [q + 2 kv] (qwen2) or null
  const float* b_o = nullptr;         // [hidden] or null
  LinearWeight q, k, v, o, gate, up, down;
  bool qkv_fused = false;             // q, k, v are consecutive rows of `qkv`
  LinearWeight qkv;
  bool qk_fused = false;              // q, k are consecutive rows of `qk` (v has another type)
  LinearWeight qk;
  bool gate_up_fused = false;         // gate, up are consecutive rows of `gate_up`
  LinearWeight gate_up;
  __nv_bfloat16* k_cache = nullptr;   // [kv_heads, cap, head_dim]
  __nv_bfloat16* v_cache = nullptr;   // [kv_heads, cap, head_dim]
};

// Per-step inputs the decode graph reads from device memory.
struct DecodeInputs {
  int32_t token;
  int32_t pos;
  int32_t seq_len;
  int32_t step;
  SamplingParamsDevice params;
};

// What a step returns to the host.
struct StepOutputs {
  int32_t token;
  float logprob;
  int32_t top_ids[kMaxTopLogprobs];
  float top_lp[kMaxTopLogprobs];
};

class GpuModel : public Resource {
 public:
  GpuModel(WorkerContext& ctx, const ModelSpec& spec, const std::vector<HostTensor>& tensors);
  ~GpuModel() override;

  StepResult prefill(WorkerContext& ctx, const std::vector<int32_t>& tokens, int start_pos,
                     const StepSampling& sampling, const PenaltyUpdate& pen, bool want_logits);
  StepResult decode(WorkerContext& ctx, int32_t token, int pos, const StepSampling& sampling,
                    const PenaltyUpdate& pen, bool want_logits);
  std::vector<float> forward_logits(WorkerContext& ctx, const std::vector<int32_t>& tokens,
                                    int start_pos, bool all_logits);
  void clear_kv(WorkerContext& ctx);
  void set_graphs(bool enabled);
  std::map<std::string, int64_t> memory() const;
  size_t device_bytes() const { return weight_bytes_ + kv_bytes_ + scratch_bytes_; }

 private:
  // Sampling tail variants, each its own graph.
  enum ModeBits : int { kSampled = 1, kPenalties = 2, kLogprobs = 4 };

  void* dev_alloc(size_t bytes, size_t* counter);
  void* host_alloc(size_t bytes);
  void free_all() noexcept;

  void load_weights(WorkerContext& ctx, const std::vector<HostTensor>& tensors);
  void alloc_state();
  void init_tables(WorkerContext& ctx);

  void check_tokens(const std::vector<int32_t>& tokens, int start_pos) const;
  void stage_inputs(WorkerContext& ctx, const StepSampling& sampling, int32_t token, int pos);
  void apply_penalty_update(WorkerContext& ctx, const PenaltyUpdate& pen);
  static int mode_of(const StepSampling& sampling, const PenaltyUpdate& pen);

  // Runs the layers over n tokens whose ids / positions are already on the
  // device; leaves the residual stream in x_.
  void run_layers(WorkerContext& ctx, const int32_t* ids, const int32_t* pos, int n, int start_pos,
                  bool decode);
  void linear(WorkerContext& ctx, const LinearWeight& w, const float* x_f32, const __nv_bfloat16* x_bf16,
              float* y, int n, const float* bias, bool accumulate, bool small);
  void dequantize_for_gemm(WorkerContext& ctx, const LinearWeight& w, const __nv_bfloat16** out);
  // Whether a decode matvec over an [n_out, k] weight of type t uses int8
  // activations (spec_.int8_activations). Int8Mode::Auto takes them where the
  // H100 measured them faster: Q4_0 and Q8_0 matrices of 4M+ elements (on
  // small ones the activation quantization costs more than the integer math
  // saves; Q4_K and Q6_K run faster with float math).
  bool int8_for(GgmlType t, int n_out, int k) const {
    switch (spec_.int8_activations) {
      case Int8Mode::Always: return true;
      case Int8Mode::Auto:
        return (t == GgmlType::Q4_0 || t == GgmlType::Q8_0) && static_cast<int64_t>(n_out) * k >= (int64_t{1} << 22);
      case Int8Mode::Never: break;
    }
    return false;
  }
  // The decode matvec's options over weight w: int8_for, two int8 terms, the
  // weights read as static, the shared x scratch.
  MatvecOptions matvec_options(const LinearWeight& w, bool accumulate) const;
  // Final norm + LM head for rows [row0, row0 + count) of x_ into logits_ rows.
  void lm_head(WorkerContext& ctx, int row0, int count);
  // Sampling kernels on logits_ row 0 into the device outputs.
  void sample_tail(WorkerContext& ctx, int mode);
  void decode_body(WorkerContext& ctx, int mode);
  StepResult collect(WorkerContext& ctx, const StepSampling& sampling, bool want_logits);

  ModelSpec spec_;
  int q_size_ = 0, kv_size_ = 0, qkv_size_ = 0;
  int cap_ = 0;
  int chunk_ = 0;
  bool use_graphs_ = true;

  std::vector<void*> dev_buffers_;
  std::vector<void*> host_buffers_;
  size_t weight_bytes_ = 0, kv_bytes_ = 0, scratch_bytes_ = 0;

  LinearWeight token_embd_;
  LinearWeight output_;
  const float* output_norm_ = nullptr;
  const double* inv_freq_ = nullptr;   // [head_dim / 2], float64 like the reference's angles
  std::vector<LayerWeights> layers_;

  // Scratch, sized for chunk_ tokens.
  float* x_ = nullptr;                 // [chunk, hidden] residual stream
  float* xn_ = nullptr;                // [chunk, hidden] normed (matvec input)
  __nv_bfloat16* xb_ = nullptr;        // [chunk, max(hidden, q, inter)] GEMM input
  float* qkv_ = nullptr;               // [chunk, q + 2 kv]: q block, then k block, then v block
  float* attn_ = nullptr;              // [chunk, q]
  float* gu_ = nullptr;                // [chunk, 2 inter]: gate block, then up block
  float* act_ = nullptr;               // [chunk, inter] (matvec path)
  void* x_scratch_ = nullptr;          // int8 activations of one small-batch matvec (matvec_x_scratch_bytes)
  __nv_bfloat16* wbuf_ = nullptr;      // dequantized weight for one GEMM (largest matrix)
  size_t wbuf_elems_ = 0;
  float* logits_ = nullptr;            // [8, vocab] raw logits
  float* work_logits_ = nullptr;       // [vocab] penalized copy the sampler reads
  float* rope_table_ = nullptr;        // [cap, head_dim / 2, 2] cos, sin of pos * inv_freq
  float* attn_ws_ = nullptr;
  size_t attn_ws_bytes_ = 0;
  void* sample_ws_ = nullptr;
  size_t sample_ws_bytes_ = 0;

  int32_t* d_tokens_ = nullptr;        // [cap] prompt ids
  int32_t* d_pos_ = nullptr;           // [cap] their positions
  int32_t* d_pen_tokens_ = nullptr;    // [cap] penalty update staging
  int32_t* d_present_ = nullptr;       // [vocab] token occurs in the context
  int32_t* d_counts_ = nullptr;        // [vocab] times generated
  DecodeInputs* d_in_ = nullptr;
  StepOutputs* d_out_ = nullptr;

  int32_t* h_tokens_ = nullptr;        // pinned mirrors
  int32_t* h_pos_ = nullptr;
  int32_t* h_pen_tokens_ = nullptr;
  DecodeInputs* h_in_ = nullptr;
  StepOutputs* h_out_ = nullptr;
  float* h_logits_ = nullptr;          // [8, vocab]

  std::map<int, cudaGraphExec_t> graphs_;
  std::map<int, bool> graph_failed_;
  int64_t graph_replays_ = 0;
  int64_t graph_captures_ = 0;
};

}  // namespace hx

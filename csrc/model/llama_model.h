// GpuModel: one llama-family decoder resident on a device worker.
//
// Lives in the worker's slab as a Resource, so it is built, used and
// destroyed only on the worker thread. It owns every device buffer it uses
// (weights, KV pool, scratch, I/O staging) and frees them in its destructor.
//
// Forward plan of one pass over n token rows (rows of several sequences;
// residual x is float32 [n, hidden]), per layer:
//   xn = rmsnorm(x) * attn_norm
//   q|k|v = xn Wqkv^T (+ bias)              n <= 8: quantized matvec; else dequant->bf16 + GEMM
//   q, k = rope(head_rmsnorm(q, k) (qwen3), pos); pool[slot_pos] = k, v
//                                            one fused launch; pos is the row's position in its
//                                            sequence, slot_pos its row in the paged KV pool
//   a = attention(q, pool)                  rows of one-token sequences: one batched decode
//                                            launch over their block tables; each longer
//                                            sequence chunk: tensor-core causal prefill
//   x += a Wo^T                              (matvec accumulate / GEMM with beta = 1)
//   xn = rmsnorm(x) * ffn_norm
//   x += (silu(xn Wg^T) * (xn Wu^T)) Wd^T
//     or, in a mixture-of-experts layer (moe_ffn):
//   l = xn Wr^T (float32); each row's top_k experts and weights (moe_route)
//   x += sum_j w_j * down_j(silu(gate_j xn) * up_j xn)
//                                            n <= 8: one launch per product over every
//                                            (row, expert) pair; else pairs sorted by
//                                            expert (moe_align), each expert's rows in one pass
// then, for the last row of each sequence that samples (or wants logits),
// logits = rmsnorm(x) * output_norm @ Wout^T and the device sampler.
// q/k/v and gate/up share one buffer each when their stored types match, so
// a decode step issues one matvec for each pair.
//
// KV pool: per layer K and V of [kv_heads, num_blocks * block_size, head_dim]
// bf16; a sequence's position p lives at pool position
// table[p / block_size] * block_size + p % block_size.
//
// Pure-decode steps (every sequence feeds one token and samples) run on a
// batch-size bucket (1, 2, 4, ... up to max_num_seqs + 1 rows) and are
// recorded once per bucket and sampling mode as a CUDA graph and replayed;
// everything that changes per step (tokens, positions, pool positions,
// sequence lengths, block tables, penalty slots, sampling parameters and
// steps, constraint descriptors) sits in the bucket's device input region,
// which one host-to-device copy refreshes before the replay. Rows past the
// batch are padding (position -1, length 0) whose results are ignored.
//
// Constraints (structured-output masks, logit_bias): a step with any
// constrained row runs the graph of its mode with the kConstrained bit,
// whose sampling tail first writes every row's logits, masked and biased
// (unconstrained rows copied), into the work rows the penalties and the
// sampler read. The masks and bias lists of the step's constrained rows
// are packed into one constraint data buffer (one more copy); each row's
// descriptor (offsets into it) sits in the row inputs. Steps without
// constraints use the graphs and copies they always did.
// steps) sits in the bucket's device input region, which one host-to-device
// copy refreshes before the replay. Rows past the batch are padding
// (position -1, length 0) whose results are ignored.
//
// Tensor parallelism (spec.tp_size >= 1): the model is one rank's shard (its
// query / kv heads and MLP rows; embedding replicated). Rank 0 adds its
// attn_output and ffn_down products to the residual x, the other ranks write
// theirs over it, and x is then summed over the group in place (TpComm, on
// the compute stream, so inside the decode graph): x + sum of the partials on
// every rank, with no extra buffer. Only rank 0 has the LM head and sampler
// (spec.lm_head); the followers' steps return no tokens.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
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

// A stack of experts' [n_out, k] matrices in stored layout: expert e's
// rows start at data + e * stride (stride a multiple of 16).
struct ExpertWeight {
  GgmlType type = GgmlType::F32;
  const void* data = nullptr;
  int n_out = 0;
  int k = 0;
  size_t stride = 0;
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
  // Mixture-of-experts layers: a router and stacked experts instead of gate/up/down.
  bool moe = false;
  LinearWeight router;                // [num_experts, hidden] float32
  bool exp_gate_up_fused = false;     // each expert's gate rows, then its up rows, in exp_gate_up
  ExpertWeight exp_gate_up;           // [E][2 expert_ffn, hidden]
  ExpertWeight exp_gate, exp_up;      // [E][expert_ffn, hidden] each (types differ)
  ExpertWeight exp_down;              // [E][hidden, expert_ffn]
  __nv_bfloat16* k_pool = nullptr;    // [kv_heads, pool positions, head_dim]
  __nv_bfloat16* v_pool = nullptr;    // [kv_heads, pool positions, head_dim]
};

// Per-row inputs of a step in one staging buffer (host and device copies
// share the layout, so one copy moves them). Each array holds one entry per
// row of the step; tables hold `stride` block ids per row.
struct RowInputs {
  int32_t* tokens = nullptr;          // token ids
  int32_t* pos = nullptr;             // position in the row's sequence (-1: padding)
  int32_t* slot_pos = nullptr;        // pool position its K/V go to (-1: nowhere)
  int32_t* seq_lens = nullptr;        // decode rows: positions to attend to (0: padding)
  int32_t* slots = nullptr;           // sampled rows: penalty slot (-1: none)
  int32_t* steps = nullptr;           // sampled rows: step of the random stream
  SamplingParamsDevice* params = nullptr;  // sampled rows: sampling parameters
  int32_t* cons = nullptr;            // sampled rows: [rows, 3] constraint descriptors (constrain.cuh)
  int32_t* tables = nullptr;          // decode rows: [rows, stride] block tables
  int stride = 0;
};

// A chunk of one sequence inside a pass: `count` rows from pass row `row0`,
// at positions start_pos.. of the sequence whose table (device) covers them.
struct PrefillSegment {
  int row0 = 0, count = 0, start_pos = 0;
  const int32_t* table = nullptr;
  int table_len = 0;
};

// One pass through the layers: n rows; rows [0, n_dec) are one-token
// sequences attending through dec_tables, the rest are prefill segments.
struct PassLayout {
  const int32_t* ids = nullptr;       // [n] device
  const int32_t* pos = nullptr;       // [n] device
  const int32_t* slot_pos = nullptr;  // [n] device
  int n = 0;
  int n_dec = 0;
  const int32_t* dec_lens = nullptr;  // [n_dec] device
  const int32_t* dec_tables = nullptr;  // [n_dec, dec_stride] device
  int dec_stride = 0;
  std::vector<PrefillSegment> segs;
};

// Where general_step sends final hidden rows instead of the LM head
// (model_hidden_states): per sequence in input order.
struct HiddenOut {
  HiddenPooling pooling = HiddenPooling::All;
  std::vector<std::vector<float>>* rows = nullptr;  // All: [n_i * hidden] each, filled in place
};

// What the sampled rows return to the host: one region of `rows` entries per
// field, so the batched sampler launchers write each field in one launch.
// Laid out in one buffer (device and pinned host alike): tokens, logprobs,
// then the top-logprob lists ([rows, kMaxTopLogprobs] ids, then values).
struct StepOutputs {
  int32_t* token = nullptr;
  float* logprob = nullptr;
  int32_t* top_ids = nullptr;
  float* top_lp = nullptr;

  static size_t bytes(int rows) { return static_cast<size_t>(rows) * (8 + 8 * kMaxTopLogprobs); }
  static size_t token_bytes(int rows) { return static_cast<size_t>(rows) * 4; }
  static StepOutputs over(void* base, int rows) {
    StepOutputs o;
    char* p = static_cast<char*>(base);
    const size_t R = static_cast<size_t>(rows);
    o.token = reinterpret_cast<int32_t*>(p);
    o.logprob = reinterpret_cast<float*>(p + 4 * R);
    o.top_ids = reinterpret_cast<int32_t*>(p + 8 * R);
    o.top_lp = reinterpret_cast<float*>(p + 8 * R + 4 * R * kMaxTopLogprobs);
    return o;
  }
};

class TpComm;

class GpuModel : public Resource {
 public:
  GpuModel(WorkerContext& ctx, const ModelSpec& spec, const std::vector<HostTensor>& tensors);
  ~GpuModel() override;

  // Allocates the KV pool (once): num_blocks blocks of spec.block_size positions.
  void alloc_kv(WorkerContext& ctx, int num_blocks);
  std::vector<StepResult> step_batch(WorkerContext& ctx, const std::vector<SeqInput>& seqs);
  // n_steps pure-decode steps in one job (model_decode_steps): each step's
  // sampled token is the next step's input, fed on the device; returns each
  // sequence's n_steps tokens.
  std::vector<std::vector<int32_t>> decode_steps(WorkerContext& ctx, const std::vector<SeqInput>& seqs, int n_steps);
  std::vector<float> forward_logits(WorkerContext& ctx, const std::vector<int32_t>& tokens, int start_pos,
                                    const std::vector<int32_t>& block_table, bool all_logits);
  std::vector<std::vector<float>> hidden_states(WorkerContext& ctx, const std::vector<std::vector<int32_t>>& tokens,
                                                const std::vector<std::vector<int32_t>>& block_tables,
                                                HiddenPooling pooling);
  void set_graphs(bool enabled);
  std::map<std::string, int64_t> memory() const;
  size_t device_bytes() const { return weight_bytes_ + kv_bytes_ + scratch_bytes_; }
  size_t kv_bytes() const { return kv_bytes_; }
  TpComm* tp() const { return tp_.get(); }  // null unless spec.tp_size >= 1

 private:
  // Sampling tail variants, each its own graph; kForwardOnly: the layers and
  // the LM head without the tail (a step whose token masks are late runs
  // its tail after them, outside the graph).
  enum ModeBits : int { kSampled = 1, kPenalties = 2, kLogprobs = 4, kConstrained = 8, kForwardOnly = 16, kModes = 32 };
  // How long a step waits for its late token masks before it fails.
  static constexpr int kLateMaskWaitMs = 120000;

  // A pure-decode batch size: its graphs and its device input region.
  struct Bucket {
    int rows = 0;
    char* dev = nullptr;              // device input region
    size_t bytes = 0;
    size_t tables_off = 0;            // byte offset of the block tables in the region
  };

  void* dev_alloc(size_t bytes, size_t* counter);
  void* host_alloc(size_t bytes);
  void free_all() noexcept;

  void load_weights(WorkerContext& ctx, const std::vector<HostTensor>& tensors);
  void alloc_state();
  void init_tables(WorkerContext& ctx);

  // Whether layer i runs the mixture-of-experts FFN (qwen3moe, not in mlp_only_layers).
  bool moe_layer(int i) const;
  // Bad input of a step refused before any device work. ahead: positions
  // past each sequence's tokens its table must cover too (decode_steps).
  void validate(const std::vector<SeqInput>& seqs, int ahead = 0) const;
  // A sampling sequence's mask and logit_bias checked; returns the
  // constraint data words they take.
  size_t validate_constraints(const SeqInput& s, const std::string& who) const;
  int blocks_for(int positions) const { return (positions + spec_.block_size - 1) >> bshift_; }
  int pool_pos(const std::vector<int32_t>& table, int p) const {
    return (table[p >> bshift_] << bshift_) | (p & (spec_.block_size - 1));
  }
  void apply_penalty_updates(WorkerContext& ctx, const std::vector<SeqInput>& seqs);
  static int mode_of(const std::vector<SeqInput>& seqs);
  static void fill_params(SamplingParamsDevice* p, const StepSampling& sampling);
  // Lays out a row-input region of `rows` rows and block tables of `stride`
  // entries per row at `base`; returns its bytes and the tables' offset.
  static size_t row_layout(char* base, int rows, int stride, RowInputs* out, size_t* tables_off);

  // Constraint data of a step: for each row r of `rows` (nullptr: none),
  // its mask and bias list appended to h_cons_ and its descriptor written to
  // desc[3r..3r+2]; then one copy to d_cons_ (when any row has data), unless
  // a row's mask is late: finish_constraints then copies them.
  void stage_constraints(WorkerContext& ctx, const std::vector<const SeqInput*>& rows, int32_t* desc);
  // Waits for the late masks stage_constraints left (none: returns at once),
  // places them and copies the step's constraint data to d_cons_.
  void finish_constraints(WorkerContext& ctx);
  // Grows the constraint data buffers to hold `words` (dropping the graphs
  // that read the old one).
  void reserve_constraints(WorkerContext& ctx, size_t words);
  // (Re)allocates the constraint data buffers for `words` (nothing may still read them).
  void alloc_constraints(size_t words);

  // Waits for the compute stream after a failed step (see the definition).
  static void settle(WorkerContext& ctx) noexcept;
  std::vector<StepResult> decode_step(WorkerContext& ctx, const std::vector<SeqInput>& seqs);
  // A pure-decode step's row inputs into its bucket's device region, with
  // block tables covering `ahead` positions from each row's token (1, or the
  // steps of a decode_steps job); constraint data too when mode has
  // kConstrained (*late: some of its masks are late). Returns the bucket.
  const Bucket& stage_decode(WorkerContext& ctx, const std::vector<SeqInput>& seqs, int ahead, int mode, bool* late);
  // One pure-decode step over a staged bucket: its graph replayed (recorded
  // after a plain run on first use), or the plain run where graphs are off
  // or failed to record.
  void run_decode(WorkerContext& ctx, const Bucket& b, int mode);
  // decode_steps' input checks (validate() with the job's positions included).
  void validate_decode_steps(const std::vector<SeqInput>& seqs, int n_steps) const;
  // Every other step, and forward_logits: passes of up to chunk_ rows.
  // all_rows: the LM head over every row, downloaded into *all_out
  // (forward_logits of one sequence); otherwise over each sequence's last
  // row where it samples or wants logits. hidden: no LM head; the final
  // normed hidden rows go where it says (model_hidden_states).
  std::vector<StepResult> general_step(WorkerContext& ctx, const std::vector<SeqInput>& seqs, bool all_rows,
                                       std::vector<float>* all_out, const HiddenOut* hidden = nullptr);

  // Runs the layers over one pass whose inputs are already on the device;
  // leaves the residual stream in x_.
  void run_layers(WorkerContext& ctx, const PassLayout& pl);
  // x_staged: x_scratch_ holds x_f32's int8 stage, written by x's producer
  // (MatvecOptions::x_staged; run_layers decides where).
  void linear(WorkerContext& ctx, const LinearWeight& w, const float* x_f32, const __nv_bfloat16* x_bf16, float* y,
              int n, const float* bias, bool accumulate, bool small, bool x_staged = false);
  // x_ += the MoE FFN of the n rows whose normed input is in xn_ (float32).
  void moe_ffn(WorkerContext& ctx, const LayerWeights& L, int n);
  void dequantize_for_gemm(WorkerContext& ctx, const LinearWeight& w, const __nv_bfloat16** out);
  // Whether a decode matvec over an [n_out, k] weight of type t uses int8
  // activations (spec_.int8_activations). Int8Mode::Auto takes them where the
  // H100 measured them faster: Q4_0 and Q8_0 matrices of 4M+ elements (the
  // float kernel reads small ones faster, also with the input staged by its
  // producer: SmolLM2-135M 1479 against 1413 tok/s; Q4_K and Q6_K run faster
  // with float math). HELEXA_INT8_MIN_ELEMS moves that size (int8_min_elems_).
  bool int8_for(GgmlType t, int n_out, int k) const {
    switch (spec_.int8_activations) {
      case Int8Mode::Always: return true;
      case Int8Mode::Auto:
        return (t == GgmlType::Q4_0 || t == GgmlType::Q8_0) && static_cast<int64_t>(n_out) * k >= int8_min_elems_;
      case Int8Mode::Never: break;
    }
    return false;
  }
  // Batches of n tokens: the fp32 matvec below tc_min_ tokens (up to
  // kMatvecMaxTokens), the tensor-core product from tc_min_ to kTcMaxTokens,
  // dequantize + cuBLAS above. bf16 weights need no dequantization, and
  // cuBLAS reads them faster than the product at every batch it serves:
  // they skip the product unless HELEXA_TC_BF16=1.
  bool small_for(int n) const { return n <= kMatvecMaxTokens && n < tc_min_; }
  // bf16 weights of batches past the float matvec, up to mv_bf16_ tokens:
  // the fragment kernel (matvec_bf16_launch) instead of cuBLAS.
  bool bf16_frag_for(int n, const LinearWeight& w) const {
    return w.type == GgmlType::BF16 && !small_for(n) && n <= mv_bf16_ && matvec_bf16_usable(w.n_out, w.k, n);
  }
  // bf16 weights on the float matvec's batches (fp32 x), up to mv_bf16_f32_
  // tokens and for matrices of mv_bf16_min_rows_ rows or more: the fragment kernel.
  bool bf16_f32_for(int n, const LinearWeight& w) const {
    return w.type == GgmlType::BF16 && n <= mv_bf16_f32_ && w.n_out >= mv_bf16_min_rows_ &&
           matvec_bf16_usable(w.n_out, w.k, n, true);
  }
  // Q4_K batches past the float matvec, up to mv_mma_batch_ tokens, on the
  // fragment kernel with bf16 x (matvec_q4k_frag_launch) instead of the product.
  bool q4k_frag_for(int n, const LinearWeight& w) const {
    return w.type == GgmlType::Q4_K && !small_for(n) && n <= mv_mma_batch_ && w.n_out >= mv_min_rows_ &&
           x_scratch_ != nullptr && w.k % 256 == 0;
  }
  bool tc_for(int n, GgmlType t) const {
    return n >= tc_min_ && n <= kTcMaxTokens && (t != GgmlType::BF16 || tc_bf16_);
  }
  // The decode matvec's options over weight w: int8_for, two int8 terms, the
  // weights read as static, the shared x scratch, and for Q4_K matrices of
  // mv_min_rows_ rows or more the fragment kernel up to mv_mma_ tokens.
  MatvecOptions matvec_options(const LinearWeight& w, bool accumulate, bool x_staged = false) const;
  // Final norm + LM head of `count` consecutive hidden rows into logits rows
  // [count, vocab]: the matvec in groups of kMatvecMaxTokens rows, or for
  // many rows dequantize + GEMM in row slices.
  void lm_head(WorkerContext& ctx, const float* x, int count, float* logits);
  // Constraints, penalties, the token choice and logprobs of logits_ rows
  // [0, rows) into d_out_ rows, each with its own slot / step / parameters /
  // constraint descriptor (device arrays): one batched launch per stage for
  // the whole batch.
  void sample_rows(WorkerContext& ctx, int rows, int mode, const int32_t* slots, const int32_t* steps,
                   const SamplingParamsDevice* params, const int32_t* cons);
  void decode_body(WorkerContext& ctx, const Bucket& b, int mode);
  // A decode step's end: when its masks were late (the forward ran without
  // the tail), waits for them and runs the tail; then collect().
  std::vector<StepResult> late_tail(WorkerContext& ctx, const Bucket& b, int mode, const std::vector<SeqInput>& seqs,
                                    const std::vector<int>& out_row, int sampled);
  // A token id the sampler wrote, or a runtime_error when it is outside the vocabulary.
  int32_t checked_token(int32_t token) const;
  // Reads back the sampled rows and wanted logits. out_row[i]: sequence i's
  // logits row (-1: none).
  std::vector<StepResult> collect(WorkerContext& ctx, const std::vector<SeqInput>& seqs,
                                  const std::vector<int>& out_row, int rows_sampled);

  ModelSpec spec_;
  int q_size_ = 0, kv_size_ = 0, qkv_size_ = 0;
  int n_ctx_ = 0;                      // longest sequence
  int chunk_ = 0;                      // rows per pass of the general step
  int slots_ = 0;                      // penalty slots = largest step = max_num_seqs + 1
  int rows_cap_ = 0;                   // scratch rows: max(chunk_, slots_)
  int logit_rows_ = 0;                 // logits rows: max(slots_, kMatvecMaxTokens)
  int bshift_ = 0;                     // log2(block_size)
  int max_blocks_ = 0;                 // blocks of the longest sequence: ceil(n_ctx / block_size)
  int num_blocks_ = 0;                 // pool blocks (0 until alloc_kv)
  int pool_cap_ = 0;                   // pool positions: num_blocks * block_size
  int stage_rows_ = 0;                 // token rows the general staging holds at once
  size_t pen_cap_ = 0;                 // penalty tokens the penalty staging holds at once
  int mask_words_ = 0;                 // words of one vocabulary bitmask: ceil(vocab / 32)
  bool use_graphs_ = true;
  int tc_min_ = 4;  // fewest tokens of a tensor-core product (HELEXA_TC_MIN; > 64: never)
  bool tc_bf16_ = false;               // bf16 weights through the tensor-core product too (HELEXA_TC_BF16=1)
  // Grouped expert products (batches past kMatvecMaxTokens) on tensor cores:
  // quantized experts while the tensor-core product is on (HELEXA_MOE_TC=0:
  // the float matvec groups).
  bool moe_tc_ = false;
  int moe_pairs_max_ = kMatvecMaxTokens;  // tokens up to which experts run as pairs (moe_ffn)
  bool moe_fuse_ = false;                 // pairs: SwiGLU and combine fused into the products
  bool xq_fuse_ = false;                  // producers write the int8 matvecs' stage (run_layers)
  int64_t int8_min_elems_ = int64_t{1} << 22;  // int8_for's Auto size
  int mv_mma_ = 0;                        // Q4_K matvecs up to this many tokens on the fragment kernel
  int mv_min_rows_ = 2048;                // ... of matrices of at least this many rows
  bool mv_local_ = false;                 // ... each CTA preparing its x (MatvecOptions::mma_local_prep)
  int mv_mma_batch_ = 0;                  // ... and Q4_K batches past the matvec up to this many tokens
  int mv_bf16_ = 16;                      // bf16 products up to this many tokens on the fragment kernel
  int mv_bf16_f32_ = 0;                   // ... and float-matvec batches (fp32 x) up to this many
  int mv_bf16_min_rows_ = 2048;           // ... of matrices of at least this many rows
  TcOptions tc_opts_;                  // the product's implementation and sizes (tc_options_from_env, at load)

  std::vector<void*> dev_buffers_;
  std::vector<void*> host_buffers_;
  size_t weight_bytes_ = 0, kv_bytes_ = 0, scratch_bytes_ = 0;

  LinearWeight token_embd_;
  LinearWeight output_;
  const float* output_norm_ = nullptr;
  const double* inv_freq_ = nullptr;   // [head_dim / 2], float64 like the reference's angles
  std::vector<LayerWeights> layers_;

  // Scratch, sized for rows_cap_ rows.
  float* x_ = nullptr;                 // [rows, hidden] residual stream
  float* xn_ = nullptr;                // [rows, hidden] normed (matvec input)
  __nv_bfloat16* xb_ = nullptr;        // [rows, max(hidden, q, inter)] GEMM input
  float* qkv_ = nullptr;               // [rows, q + 2 kv]: q block, then k block, then v block
  float* attn_ = nullptr;              // [rows, q]
  float* gu_ = nullptr;                // [rows, 2 inter]: gate block, then up block
  float* act_ = nullptr;               // [kMatvecMaxTokens, inter] (matvec path)
  float* x_sel_ = nullptr;             // [logit_rows, hidden] last rows gathered for the LM head
  // Mixture-of-experts scratch: P = rows_cap * experts_per_tok (row, expert) pairs.
  float* router_logits_ = nullptr;     // [rows, num_experts]
  int32_t* moe_ids_ = nullptr;         // [P] each row's experts, best first
  float* moe_w_ = nullptr;             // [P] their weights
  int32_t* moe_offsets_ = nullptr;     // [num_experts + 1] grouped path: each expert's first slot
  int32_t* moe_active_ = nullptr;      // [num_experts] experts with rows
  int32_t* moe_n_active_ = nullptr;    // [1]
  int32_t* moe_pair_slot_ = nullptr;   // [P] slot of each pair
  int32_t* moe_slot_token_ = nullptr;  // [P] row of each slot
  int4* moe_tiles_ = nullptr;          // tensor-core groups' work: {expert, first slot, rows, 0}
  int32_t* moe_n_tiles_ = nullptr;     // [1]
  float* exp_xy_ = nullptr;            // [P, hidden] gathered expert inputs, then expert outputs
  float* exp_gu_ = nullptr;            // [P, 2 expert_ffn] gate and up products
  float* exp_act_ = nullptr;           // [P, expert_ffn] SwiGLU
  __nv_bfloat16* exp_xb_ = nullptr;    // [P, max(hidden, expert_ffn)] expert inputs in bf16 (moe_tc_)
  void* x_scratch_ = nullptr;          // int8 activations of one small-batch matvec (matvec_x_scratch_bytes)
  __nv_bfloat16* wbuf_ = nullptr;      // dequantized weight for one GEMM (largest matrix or LM head slice)
  size_t wbuf_elems_ = 0;
  float* tc_ws_ = nullptr;             // split-K partials of the tensor-core products
  size_t tc_ws_bytes_ = 0;
  float* logits_ = nullptr;            // [logit_rows, vocab] raw logits
  float* work_logits_ = nullptr;       // [logit_rows, vocab] penalized copies the sampler reads
  float* rope_table_ = nullptr;        // [n_ctx, head_dim / 2, 2] cos, sin of pos * inv_freq
  float* attn_ws_ = nullptr;
  size_t attn_ws_bytes_ = 0;
  void* sample_ws_ = nullptr;
  size_t sample_ws_bytes_ = 0;

  int32_t* d_present_ = nullptr;       // [slots, vocab] token occurs in the context
  int32_t* d_counts_ = nullptr;        // [slots, vocab] times generated
  int32_t* d_pen_tokens_ = nullptr;    // [pen_cap] penalty update staging
  int32_t* h_pen_tokens_ = nullptr;
  char* d_gen_ = nullptr;              // general step staging (header + token rows)
  char* h_gen_ = nullptr;
  size_t gen_bytes_ = 0;
  int32_t* d_fed_ = nullptr;           // [kMaxDecodeSteps, slots] tokens of a decode_steps job
  int32_t* h_fed_ = nullptr;
  char* h_dec_ = nullptr;              // host staging of a bucket's input region (largest bucket)
  int32_t* d_cons_ = nullptr;          // [cons_cap] constraint data of a step (masks, bias lists)
  int32_t* h_cons_ = nullptr;          // pinned
  size_t cons_cap_ = 0;                // words
  // Set by stage_constraints for finish_constraints: the words staged so
  // far and each late mask's row and h_cons_ offset (valid during the step).
  size_t cons_used_ = 0;
  std::vector<std::pair<const SeqInput*, size_t>> late_rows_;
  size_t cons_dev_bytes_ = 0;          // d_cons_'s share of scratch_bytes_
  float* d_pool_ = nullptr;            // [slots, hidden] mean-pooling sums of a hidden-states job
  float* h_pool_ = nullptr;            // [slots, hidden] pinned: pooled rows
  void* d_out_ = nullptr;              // StepOutputs of logit_rows rows
  void* h_out_ = nullptr;              // pinned
  float* h_logits_ = nullptr;          // [logit_rows, vocab] pinned

  std::vector<Bucket> buckets_;        // ascending rows; the last holds slots_ rows
  std::map<int, cudaGraphExec_t> graphs_;   // key: bucket rows * kModes + mode
  std::map<int, bool> graph_failed_;
  int64_t graph_replays_ = 0;
  int64_t graph_captures_ = 0;

  std::unique_ptr<TpComm> tp_;         // tensor parallelism (spec.tp_size >= 1)
};

}  // namespace hx

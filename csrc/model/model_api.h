// Jobs of the GPU llama-family model, as plain C++ values.
//
// The bindings (compiled by the host compiler) see only this header: every
// function submits one job to the device worker, waits on its future and
// returns host values (a handle, tokens, float logits). The CUDA side lives
// in llama_model.cu and runs entirely on the worker's thread.
//
// The KV cache is one pool of `num_blocks` blocks of `block_size` positions
// shared by every sequence; a sequence names its blocks with a block table
// (position p lives in block table[p / block_size]). Which blocks a sequence
// owns is decided by the caller (helexa_native/kv_blocks.py).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/limits.h"
#include "common/rope_style.h"
#include "model/late_masks.h"

namespace hx {

class DeviceWorker;
class JobWaiter;

// Whether decode matvecs over Q4_0/Q8_0/Q4_K/Q6_K quantize their input to two
// int8 terms per element (x and its residual; near float accuracy) and use
// integer dot products (MatvecOptions::int8_activations).
enum class Int8Mode : int32_t {
  Never = 0,   // float math everywhere
  Auto = 1,    // where measured faster: large Q4_0 and Q8_0 matrices (GpuModel::int8_for)
  Always = 2,  // every type that has the integer kernel
};

// Architecture and run-time sizing of one model.
struct ModelSpec {
  std::string arch;               // "llama" | "qwen2" | "qwen3" | "qwen3moe"
  int vocab = 0;
  int hidden = 0;
  int intermediate = 0;           // dense FFN width (0 allowed when every layer is MoE)
  int layers = 0;
  int heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  float eps = 1e-5f;
  RopeStyle rope_style = RopeStyle::Half;
  bool qk_norm = false;
  std::vector<double> inv_freq;   // [head_dim / 2], scaling already applied
  int n_ctx = 4096;               // longest sequence, in positions
  int prefill_chunk = 512;        // tokens per forward pass (bounds scratch)
  bool use_graphs = true;         // replay pure-decode steps as CUDA graphs
  int block_size = 16;            // KV pool positions per block (a power of two >= 16)
  int num_blocks = 0;             // KV pool blocks; 0: allocated later by model_alloc_kv
  int max_num_seqs = 64;          // sequences of the scheduler; penalty slots and the
                          // largest step hold max_num_seqs + 1 (one private sequence)
  Int8Mode int8_activations = Int8Mode::Auto;
  // Mixture of experts (qwen3moe; num_experts 0: dense). A MoE layer routes
  // each token to experts_per_tok of num_experts SwiGLU experts of width
  // expert_ffn; norm_topk_prob rescales the chosen weights to sum to one.
  // Layers in mlp_only_layers keep a dense FFN of `intermediate`.
  int num_experts = 0;
  int experts_per_tok = 0;
  int expert_ffn = 0;
  bool norm_topk_prob = false;
  std::vector<int> mlp_only_layers;
  // Tensor parallelism. tp_size 0: the whole model. tp_size >= 1: this model
  // is rank tp_rank of tp_size (the worker's NCCL communicator must be that
  // rank of that many); heads, kv_heads and intermediate are the shard's own,
  // and its partial products after attn_output and after ffn_down are summed
  // over the group: by the one-shot peer kernel for messages up to
  // tp_peer_max_bytes once the ranks are linked (model_link_peers), else by
  // NCCL. tp_size 1 runs the same path over a group of one.
  int tp_rank = 0;
  int tp_size = 0;
  int64_t tp_peer_max_bytes = int64_t{512} << 10;
  // false: no output norm, LM head, penalty state or sampler (a follower rank
  // of a tensor-parallel group, whose tokens would be unused): steps return
  // token -1 and forward_logits returns nothing.
  bool lm_head = true;
};

// One weight as the loader holds it: GGML type id, torch-order shape, host bytes.
// Norms and biases arrive as float32 (type 0), and so do MoE routers
// (blk.N.ffn_gate_inp.weight [num_experts, hidden]). Stacked expert tensors
// (blk.N.ffn_{gate,up,down}_exps.weight) come whole, [num_experts, rows,
// cols], or as one tensor per expert named "<name>:<e>" [rows, cols] (an HF
// checkpoint's own per-expert arrays, never stacked on the host).
struct HostTensor {
  std::string name;
  int type = 0;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t bytes = 0;
};

// The sampling argument of one step job: the request's SamplingParams (as the
// device sampler reads them, SamplingParamsDevice), the step counter of its
// random stream, and which logprobs to report.
struct StepSampling {
  float temperature = 0.f;  // 0: greedy
  int top_k = 0;
  float top_p = 1.f;
  float min_p = 0.f;
  float repetition_penalty = 1.f;
  float presence_penalty = 0.f;
  float frequency_penalty = 0.f;
  uint64_t seed = 0;
  int step = 0;
  bool logprobs = false;
  int top_logprobs = 0;  // 0..kMaxTopLogprobs
};

// Tokens to add to a slot's device-side penalty state before sampling.
// reset clears it first. Context tokens feed the repetition penalty;
// generated tokens feed it too and also the presence/frequency counts.
struct PenaltyUpdate {
  bool active = false;  // any penalty in use this step
  bool reset = false;
  std::vector<int32_t> context;
  std::vector<int32_t> generated;
};

// One sequence's share of a batched step: tokens at positions start_pos..,
// their keys and values written through block_table (at least
// ceil((start_pos + n) / block_size) pool block ids; positions below
// start_pos already hold the sequence's cache). slot (0..max_num_seqs) names
// the sequence's penalty state; slots of one step are distinct. With
// `sample`, a token is sampled after the last one; want_logits also returns
// that position's raw logits (with or without sampling).
//
// A sampling sequence may carry a logit_bias (distinct token ids in
// [0, vocab) and finite values, added to the raw logits) and a
// structured-output mask (`allowed`: a bitmask of at least ceil(vocab / 32)
// words, bit t % 32 of word t / 32 set for an allowed token t; empty: every
// token), both applied before the penalties in params.py's order. Logprobs
// and returned logits stay those of the raw logits.
struct SeqInput {
  std::vector<int32_t> tokens;
  int start_pos = 0;
  std::vector<int32_t> block_table;
  int slot = 0;
  bool sample = true;
  StepSampling sampling;
  PenaltyUpdate penalties;  // applied to `slot` (only when sampling)
  bool want_logits = false;
  std::vector<int32_t> allowed;
  // Or the mask is row `late_row` of `late`, filled by another thread while
  // the step's forward runs (late_masks.h); `allowed` is then empty.
  std::shared_ptr<LateMasks> late;
  int late_row = -1;
  std::vector<int32_t> bias_ids;
  std::vector<float> bias_values;

  bool masked() const { return !allowed.empty() || late != nullptr; }
};

struct StepResult {
  int32_t token = -1;  // -1 when the sequence did not sample
  bool has_logprob = false;
  float logprob = 0.f;
  std::vector<std::pair<int32_t, float>> top;
  std::vector<float> logits;  // raw logits of the sampled position, when asked for
};

// Host-mapped words of a tensor-parallel model (pinned host memory its device
// reads and writes) that threads other than its worker's may touch while a
// step runs; valid until the model is dropped.
struct TpStatus {
  volatile uint32_t abort;    // set by the watchdog: spinning kernels give up
  volatile uint32_t arrived;  // written by the device: peer all-reduces this rank has entered
};

// One rank's peer all-reduce memory, as the other ranks of its process map it.
struct PeerEndpoint {
  int device = -1;
  uint64_t staging = 0;  // device address of its [2, capacity] float staging
  uint64_t flags = 0;    // device address of its flag array
  uint64_t capacity = 0; // floats per staging half
};

struct LoadResult {
  int64_t handle = 0;
  size_t bytes = 0;  // device bytes held by the model (weights, KV pool, scratch)
  double seconds = 0.0;  // time spent in the load job
  TpStatus* tp_status = nullptr;  // tensor-parallel models only
};

LoadResult model_load(DeviceWorker& w, const ModelSpec& spec, const std::vector<HostTensor>& tensors);

// Allocates the KV pool of a model loaded with spec.num_blocks == 0 (once);
// returns the pool's bytes. Lets the caller size the pool from the device
// memory left after the weights and scratch.
size_t model_alloc_kv(DeviceWorker& w, int64_t handle, int num_blocks);

// One batched step: every sequence's tokens through the layers together,
// then sampling for the sequences that ask. Results in input order. Bad
// input (token ids, positions past n_ctx, block ids, short tables, slots)
// throws std::invalid_argument before any device work. A step where every
// sequence feeds one token and samples replays a CUDA graph (per batch-size
// bucket and sampling mode) unless graphs are off. `waiter` (optional) waits
// on the reply; a caller stepping again and again passes the same one for
// steps of one kind (see JobWaiter).
std::vector<StepResult> model_step_batch(DeviceWorker& w, int64_t handle, const std::vector<SeqInput>& seqs,
                                         JobWaiter* waiter = nullptr);

// n_steps pure-decode steps in one job: every sequence feeds one token and
// samples, and each step's sampled token is fed to the next step on the
// device, one position on, so the host neither waits nor copies between
// them; returns each sequence's n_steps tokens (input order). The block
// tables must cover start_pos + n_steps positions. Each sequence's
// penalty update applies first, and every sampled token joins its slot's
// penalty state on the device, as a later step's update would add it. Only
// steps that need nothing from the host between tokens qualify: no
// logprobs, logits or token constraints, a model that samples on one device, and
// 1 <= n_steps <= kMaxDecodeSteps; anything else throws
// std::invalid_argument before any device work. A stop token sampled
// mid-job does not end the job: the caller drops what follows it.
std::vector<std::vector<int32_t>> model_decode_steps(DeviceWorker& w, int64_t handle, const std::vector<SeqInput>& seqs,
                                                     int n_steps, JobWaiter* waiter = nullptr);

// One sequence's tokens through its block table; logits (float32,
// row-major) of the last position ([vocab]) or of all ([n, vocab]).
std::vector<float> model_forward_logits(DeviceWorker& w, int64_t handle, const std::vector<int32_t>& tokens,
                                        int start_pos, const std::vector<int32_t>& block_table, bool all_logits);

// Which final hidden rows model_hidden_states returns per sequence.
enum class HiddenPooling : int32_t {
  All = 0,    // every row [n, hidden]
  Last = 1,   // the last row [1, hidden]
  First = 2,  // the first row [1, hidden]
  Mean = 3,   // the mean of the rows [1, hidden]
};

// Final hidden states (after the output norm, float32 row-major) of each
// token sequence, run from position 0 through its block table: the borrowed
// blocks' KV is overwritten, nothing else (other sequences' blocks, penalty
// slots, graphs) changes. At most max_num_seqs + 1 sequences per call; bad
// input throws std::invalid_argument before any device work.
std::vector<std::vector<float>> model_hidden_states(DeviceWorker& w, int64_t handle,
                                                    const std::vector<std::vector<int32_t>>& tokens,
                                                    const std::vector<std::vector<int32_t>>& block_tables,
                                                    HiddenPooling pooling);
// The same two jobs, submitted without waiting (the tensor-parallel backends
// submit every rank's job before waiting on any). `started` (optional) is
// set when the job begins on the worker.
std::future<std::vector<StepResult>> model_step_batch_submit(DeviceWorker& w, int64_t handle,
                                                             std::shared_ptr<const std::vector<SeqInput>> seqs,
                                                             std::shared_ptr<std::atomic<bool>> started);
std::future<std::vector<float>> model_forward_logits_submit(DeviceWorker& w, int64_t handle,
                                                            std::shared_ptr<const SeqInput> seq, bool all_logits,
                                                            std::shared_ptr<std::atomic<bool>> started);

// Tensor parallelism in one process. model_peer_access: whether the worker's
// device can map every one of `devices` (peer access). model_peer_endpoint:
// the model's staging and flags. model_link_peers (every rank, once, before
// its first step): enable peer access to the group's devices and send small
// all-reduces through the peer kernel; group[r] is rank r's endpoint.
bool model_peer_access(DeviceWorker& w, const std::vector<int>& devices);
PeerEndpoint model_peer_endpoint(DeviceWorker& w, int64_t handle);
void model_link_peers(DeviceWorker& w, int64_t handle, const std::vector<PeerEndpoint>& group);
// Test hook: the model's next step begins with a kernel that spins until its
// abort word is set (a step made to hang, for the watchdog's tests).
void model_hang_next_step(DeviceWorker& w, int64_t handle);
// Test hook: `data` summed over the group by the peer kernel (peer) or NCCL,
// through a device buffer of its own; every rank must submit its part.
std::future<std::vector<float>> model_all_reduce_test_submit(DeviceWorker& w, int64_t handle,
                                                             std::shared_ptr<const std::vector<float>> data, bool peer);

void model_drop(DeviceWorker& w, int64_t handle);
void model_set_graphs(DeviceWorker& w, int64_t handle, bool enabled);
std::map<std::string, int64_t> model_memory(DeviceWorker& w, int64_t handle);

}  // namespace hx

// Jobs of the GPU llama-family model, as plain C++ values.
//
// The bindings (compiled by the host compiler) see only this header: every
// function submits one job to the device worker, waits on its future and
// returns host values (a handle, a token, float logits). The CUDA side lives
// in llama_model.cu and runs entirely on the worker's thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "common/limits.h"
#include "common/rope_style.h"

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
  std::string arch;               // "llama" | "qwen2" | "qwen3"
  int vocab = 0;
  int hidden = 0;
  int intermediate = 0;
  int layers = 0;
  int heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  float eps = 1e-5f;
  RopeStyle rope_style = RopeStyle::Half;
  bool qk_norm = false;
  std::vector<double> inv_freq;   // [head_dim / 2], scaling already applied
  int n_ctx = 4096;               // KV cache capacity in positions
  int prefill_chunk = 512;        // tokens per prefill pass (bounds scratch)
  bool use_graphs = true;         // replay decode as a CUDA graph
  Int8Mode int8_activations = Int8Mode::Auto;
};

// One weight as the loader holds it: GGML type id, torch-order shape, host bytes.
// Norms and biases arrive as float32 (type 0).
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
  float temperature = 0.f;        // 0: greedy
  int top_k = 0;
  float top_p = 1.f;
  float min_p = 0.f;
  float repetition_penalty = 1.f;
  float presence_penalty = 0.f;
  float frequency_penalty = 0.f;
  uint64_t seed = 0;
  int step = 0;
  bool logprobs = false;
  int top_logprobs = 0;           // 0..kMaxTopLogprobs
};

// Tokens to add to the device-side penalty state before sampling.
// reset clears it first. Context tokens feed the repetition penalty;
// generated tokens feed it too and also the presence/frequency counts.
struct PenaltyUpdate {
  bool active = false;            // any penalty in use this step
  bool reset = false;
  std::vector<int32_t> context;
  std::vector<int32_t> generated;
};

struct StepResult {
  int32_t token = -1;
  bool has_logprob = false;
  float logprob = 0.f;
  std::vector<std::pair<int32_t, float>> top;
  std::vector<float> logits;      // raw logits of the sampled position, when asked for
};

struct LoadResult {
  int64_t handle = 0;
  size_t bytes = 0;               // device bytes held by the model (weights, cache, scratch)
  double seconds = 0.0;           // time spent in the load job
};

LoadResult model_load(DeviceWorker& w, const ModelSpec& spec, const std::vector<HostTensor>& tensors);

// Runs tokens at start_pos.. (filling the cache) and samples after the last one.
StepResult model_prefill(DeviceWorker& w, int64_t handle, const std::vector<int32_t>& tokens,
                         int start_pos, const StepSampling& sampling, const PenaltyUpdate& pen,
                         bool want_logits);

// One token at `pos`: the decode path (replayed CUDA graph unless disabled).
// `waiter` (optional) waits on the reply; a caller decoding token after token
// passes the same one each time (see JobWaiter).
StepResult model_decode(DeviceWorker& w, int64_t handle, int32_t token, int pos,
                        const StepSampling& sampling, const PenaltyUpdate& pen, bool want_logits,
                        JobWaiter* waiter = nullptr);

// Logits (float32, row-major) of the last position ([vocab]) or of all ([n, vocab]).
std::vector<float> model_forward_logits(DeviceWorker& w, int64_t handle,
                                        const std::vector<int32_t>& tokens, int start_pos,
                                        bool all_logits);

void model_clear_kv(DeviceWorker& w, int64_t handle);
void model_drop(DeviceWorker& w, int64_t handle);
void model_set_graphs(DeviceWorker& w, int64_t handle, bool enabled);
std::map<std::string, int64_t> model_memory(DeviceWorker& w, int64_t handle);

}  // namespace hx

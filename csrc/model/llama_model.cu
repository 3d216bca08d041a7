// GpuModel (see llama_model.h) and the model jobs of model_api.h.
#include "model/llama_model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "common/check.h"
#include "kernels/attention_decode.cuh"
#include "kernels/attention_prefill.cuh"
#include "kernels/bias.cuh"
#include "kernels/cast.cuh"
#include "kernels/dequant.cuh"
#include "kernels/embedding.cuh"
#include "kernels/kv_cache.cuh"
#include "kernels/matvec.cuh"
#include "kernels/penalty_state.cuh"
#include "kernels/rms_norm.cuh"
#include "kernels/rope.cuh"
#include "kernels/swiglu.cuh"
#include "model/gemm.h"

namespace hx {

namespace {

[[noreturn]] void bad_model(const std::string& msg) { throw std::invalid_argument(msg); }

bool known_type(int t) {
  return t >= 0 && t <= 64 && is_supported(static_cast<GgmlType>(t));
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(s[i]);
  }
  return out + ")";
}

class TensorTable {
 public:
  explicit TensorTable(const std::vector<HostTensor>& ts) {
    for (const auto& t : ts) by_name_[t.name] = &t;
  }
  const HostTensor* find(const std::string& name) const {
    auto it = by_name_.find(name);
    return it == by_name_.end() ? nullptr : it->second;
  }
  // A matrix [n_out, k] of any supported type, with its byte size checked.
  const HostTensor& matrix(const std::string& name, int64_t n_out, int64_t k) const {
    const HostTensor* t = find(name);
    if (t == nullptr) bad_model("missing tensor " + name);
    if (!known_type(t->type)) bad_model("tensor " + name + " has unsupported GGML type " + std::to_string(t->type));
    if (t->shape.size() != 2 || t->shape[0] != n_out || t->shape[1] != k)
      bad_model("tensor " + name + " has shape " + shape_str(t->shape) + ", expected (" +
                std::to_string(n_out) + ", " + std::to_string(k) + ")");
    const GgmlType ty = static_cast<GgmlType>(t->type);
    if (k % block_elems(ty) != 0)
      bad_model("tensor " + name + ": row length " + std::to_string(k) + " is not a multiple of its block size");
    const size_t want = row_bytes(ty, k) * static_cast<size_t>(n_out);
    if (t->bytes != want || t->data == nullptr)
      bad_model("tensor " + name + " holds " + std::to_string(t->bytes) + " bytes, expected " + std::to_string(want));
    return *t;
  }
  // A float32 vector of n values (norm weights, biases).
  const HostTensor* vector(const std::string& name, int64_t n, bool required) const {
    const HostTensor* t = find(name);
    if (t == nullptr) {
      if (required) bad_model("missing tensor " + name);
      return nullptr;
    }
    if (t->type != 0) bad_model("tensor " + name + " must be passed as float32");
    int64_t count = 1;
    for (int64_t s : t->shape) count *= s;
    if (count != n || t->bytes != static_cast<size_t>(n) * 4 || t->data == nullptr)
      bad_model("tensor " + name + " has shape " + shape_str(t->shape) + ", expected (" + std::to_string(n) + ",)");
    return t;
  }

 private:
  std::unordered_map<std::string, const HostTensor*> by_name_;
};

}  // namespace

// ---------------------------------------------------------------------------
// Construction and memory

GpuModel::GpuModel(WorkerContext& ctx, const ModelSpec& spec, const std::vector<HostTensor>& tensors)
    : spec_(spec) {
  const ModelSpec& s = spec_;
  if (s.arch != "llama" && s.arch != "qwen2" && s.arch != "qwen3") bad_model("unsupported architecture " + s.arch);
  if (s.vocab <= 0 || s.hidden <= 0 || s.intermediate <= 0 || s.layers <= 0 || s.heads <= 0 ||
      s.kv_heads <= 0 || s.head_dim <= 0)
    bad_model("model dimensions must be positive");
  if (s.heads % s.kv_heads != 0) bad_model("num_heads must be a multiple of num_kv_heads");
  // The decode attention kernel takes head dims in multiples of 8 up to 256.
  if (s.head_dim % 8 != 0 || s.head_dim > 256)
    bad_model("head_dim " + std::to_string(s.head_dim) + " is not supported on the GPU (multiples of 8 up to 256)");
  if (static_cast<int>(s.inv_freq.size()) != s.head_dim / 2) bad_model("inv_freq must hold head_dim / 2 values");
  if (!is_rope_style(s.rope_style)) bad_model("unknown rope style " + std::to_string(static_cast<int>(s.rope_style)));
  if (s.n_ctx <= 0) bad_model("n_ctx must be positive");
  if (!(s.eps > 0.f)) bad_model("rms_norm_eps must be positive");

  q_size_ = s.heads * s.head_dim;
  kv_size_ = s.kv_heads * s.head_dim;
  qkv_size_ = q_size_ + 2 * kv_size_;
  cap_ = s.n_ctx;
  chunk_ = std::max(1, std::min(s.prefill_chunk > 0 ? s.prefill_chunk : 512, cap_));
  use_graphs_ = s.use_graphs;
  try {
    load_weights(ctx, tensors);
    alloc_state();
    init_tables(ctx);
    clear_kv(ctx);
    ctx.synchronize();
  } catch (...) {
    free_all();
    throw;
  }
}

GpuModel::~GpuModel() { free_all(); }

void GpuModel::free_all() noexcept {
  // Runs on the worker thread with the device current; errors here can only
  // mean the context is already gone, and nothing is left to do about them.
  for (auto& kv : graphs_) cudaGraphExecDestroy(kv.second);
  graphs_.clear();
  for (void* p : dev_buffers_) cudaFree(p);
  dev_buffers_.clear();
  for (void* p : host_buffers_) cudaFreeHost(p);
  host_buffers_.clear();
  cudaGetLastError();
}

void* GpuModel::dev_alloc(size_t bytes, size_t* counter) {
  if (bytes == 0) return nullptr;
  const size_t rounded = (bytes + 255) / 256 * 256;
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, rounded);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    cudaGetLastError();
    throw CudaError("out of device memory loading the model: " + std::to_string(rounded >> 20) +
                        " MiB more needed after " + std::to_string(device_bytes() >> 20) + " MiB, " +
                        std::to_string(free_b >> 20) + " MiB free of " + std::to_string(total_b >> 20) +
                        " MiB (try a smaller n_ctx or model)",
                    "cuda", static_cast<int>(e), false, "cudaMalloc", __FILE__, __LINE__);
  }
  HX_CUDA_CHECK(e);
  dev_buffers_.push_back(p);
  *counter += rounded;
  return p;
}

void* GpuModel::host_alloc(size_t bytes) {
  void* p = nullptr;
  HX_CUDA_CHECK(cudaHostAlloc(&p, std::max<size_t>(bytes, 16), cudaHostAllocDefault));
  host_buffers_.push_back(p);
  return p;
}

void GpuModel::load_weights(WorkerContext& ctx, const std::vector<HostTensor>& tensors) {
  const ModelSpec& s = spec_;
  const TensorTable table(tensors);
  const int h = s.hidden, f = s.intermediate;

  auto upload_matrix = [&](const HostTensor& t, int n_out, int k) {
    LinearWeight w;
    w.type = static_cast<GgmlType>(t.type);
    w.n_out = n_out;
    w.k = k;
    void* dst = dev_alloc(t.bytes, &weight_bytes_);
    ctx.upload(t.data, t.bytes, dst);
    w.data = dst;
    return w;
  };
  auto upload_vector = [&](const HostTensor* t) -> const float* {
    if (t == nullptr) return nullptr;
    void* dst = dev_alloc(t->bytes, &weight_bytes_);
    ctx.upload(t->data, t->bytes, dst);
    return static_cast<const float*>(dst);
  };
  // Row-concatenates matrices of one type into one buffer; returns the parts as views.
  auto upload_fused = [&](const std::vector<const HostTensor*>& parts, const std::vector<int>& rows, int k,
                          LinearWeight* fused, std::vector<LinearWeight*> views) {
    const GgmlType ty = static_cast<GgmlType>(parts[0]->type);
    size_t total = 0;
    int total_rows = 0;
    for (size_t i = 0; i < parts.size(); ++i) {
      total += parts[i]->bytes;
      total_rows += rows[i];
    }
    char* dst = static_cast<char*>(dev_alloc(total, &weight_bytes_));
    size_t off = 0;
    for (const HostTensor* p : parts) {
      ctx.upload(p->data, p->bytes, dst + off);
      off += p->bytes;
    }
    fused->type = ty;
    fused->data = dst;
    fused->n_out = total_rows;
    fused->k = k;
    int r0 = 0;
    for (size_t i = 0; i < views.size(); ++i) {
      *views[i] = fused->rows(r0, rows[i]);
      r0 += rows[i];
    }
  };

  // Fused parts are read as matrices of their own: each must start 16-byte aligned.
  auto fusable = [](const std::vector<const HostTensor*>& leading) {
    size_t off = 0;
    for (const HostTensor* t : leading) {
      off += t->bytes;
      if (off % 16 != 0) return false;
    }
    return true;
  };

  token_embd_ = upload_matrix(table.matrix("token_embd.weight", s.vocab, h), s.vocab, h);
  output_norm_ = upload_vector(table.vector("output_norm.weight", h, true));
  if (table.find("output.weight") != nullptr)
    output_ = upload_matrix(table.matrix("output.weight", s.vocab, h), s.vocab, h);
  else
    output_ = token_embd_;  // tied embeddings
  {
    void* dst = dev_alloc(s.inv_freq.size() * sizeof(double), &weight_bytes_);
    ctx.upload(s.inv_freq.data(), s.inv_freq.size() * sizeof(double), dst);
    inv_freq_ = static_cast<const double*>(dst);
  }

  layers_.resize(s.layers);
  for (int i = 0; i < s.layers; ++i) {
    if (ctx.stop_requested()) throw std::runtime_error("load interrupted: the worker is shutting down");
    const std::string p = "blk." + std::to_string(i) + ".";
    LayerWeights& L = layers_[i];
    L.attn_norm = upload_vector(table.vector(p + "attn_norm.weight", h, true));
    L.ffn_norm = upload_vector(table.vector(p + "ffn_norm.weight", h, true));
    if (s.qk_norm) {
      L.q_norm = upload_vector(table.vector(p + "attn_q_norm.weight", s.head_dim, true));
      L.k_norm = upload_vector(table.vector(p + "attn_k_norm.weight", s.head_dim, true));
    }

    const HostTensor& tq = table.matrix(p + "attn_q.weight", q_size_, h);
    const HostTensor& tk = table.matrix(p + "attn_k.weight", kv_size_, h);
    const HostTensor& tv = table.matrix(p + "attn_v.weight", kv_size_, h);
    if (tq.type == tk.type && tq.type == tv.type && fusable({&tq, &tk})) {
      L.qkv_fused = true;
      upload_fused({&tq, &tk, &tv}, {q_size_, kv_size_, kv_size_}, h, &L.qkv, {&L.q, &L.k, &L.v});
    } else if (tq.type == tk.type && fusable({&tq})) {
      // Mixes such as Q4_K_M store v in another type: q and k still share a launch.
      L.qk_fused = true;
      upload_fused({&tq, &tk}, {q_size_, kv_size_}, h, &L.qk, {&L.q, &L.k});
      L.v = upload_matrix(tv, kv_size_, h);
    } else {
      L.q = upload_matrix(tq, q_size_, h);
      L.k = upload_matrix(tk, kv_size_, h);
      L.v = upload_matrix(tv, kv_size_, h);
    }
    const HostTensor* bq = table.vector(p + "attn_q.bias", q_size_, false);
    const HostTensor* bk = table.vector(p + "attn_k.bias", kv_size_, false);
    const HostTensor* bv = table.vector(p + "attn_v.bias", kv_size_, false);
    if (bq || bk || bv) {
      // One fused bias; a missing part is zero, as the reference treats it.
      char* dst = static_cast<char*>(dev_alloc(static_cast<size_t>(qkv_size_) * 4, &weight_bytes_));
      HX_CUDA_CHECK(cudaMemsetAsync(dst, 0, static_cast<size_t>(qkv_size_) * 4, ctx.compute_stream()));
      if (bq) ctx.upload(bq->data, bq->bytes, dst);
      if (bk) ctx.upload(bk->data, bk->bytes, dst + static_cast<size_t>(q_size_) * 4);
      if (bv) ctx.upload(bv->data, bv->bytes, dst + static_cast<size_t>(q_size_ + kv_size_) * 4);
      L.b_qkv = reinterpret_cast<const float*>(dst);
    }
    L.o = upload_matrix(table.matrix(p + "attn_output.weight", h, q_size_), h, q_size_);
    L.b_o = upload_vector(table.vector(p + "attn_output.bias", h, false));

    const HostTensor& tg = table.matrix(p + "ffn_gate.weight", f, h);
    const HostTensor& tu = table.matrix(p + "ffn_up.weight", f, h);
    if (tg.type == tu.type && fusable({&tg})) {
      L.gate_up_fused = true;
      upload_fused({&tg, &tu}, {f, f}, h, &L.gate_up, {&L.gate, &L.up});
    } else {
      L.gate = upload_matrix(tg, f, h);
      L.up = upload_matrix(tu, f, h);
    }
    L.down = upload_matrix(table.matrix(p + "ffn_down.weight", h, f), h, f);
  }

  // The dequantize scratch holds the largest matrix one GEMM group reads.
  size_t most = 0;
  auto need = [&](const LinearWeight& w) {
    if (w.type != GgmlType::BF16) most = std::max(most, static_cast<size_t>(w.n_out) * w.k);
  };
  for (const auto& L : layers_) {
    if (L.qkv_fused) need(L.qkv); else { need(L.q); need(L.k); need(L.v); }
    if (L.gate_up_fused) need(L.gate_up); else { need(L.gate); need(L.up); }
    need(L.o);
    need(L.down);
  }
  wbuf_elems_ = most;
}

void GpuModel::alloc_state() {
  const ModelSpec& s = spec_;
  const size_t C = static_cast<size_t>(chunk_), h = s.hidden, f = s.intermediate, V = s.vocab;
  size_t* sc = &scratch_bytes_;

  const size_t per_cache = static_cast<size_t>(s.kv_heads) * cap_ * s.head_dim;
  auto* kv = static_cast<__nv_bfloat16*>(dev_alloc(per_cache * 2 * s.layers * sizeof(__nv_bfloat16), &kv_bytes_));
  for (int i = 0; i < s.layers; ++i) {
    layers_[i].k_cache = kv + per_cache * (2 * i);
    layers_[i].v_cache = kv + per_cache * (2 * i + 1);
  }

  x_ = static_cast<float*>(dev_alloc(C * h * 4, sc));
  xn_ = static_cast<float*>(dev_alloc(C * h * 4, sc));
  const size_t widest = std::max<size_t>({h, static_cast<size_t>(q_size_), f});
  xb_ = static_cast<__nv_bfloat16*>(dev_alloc(C * widest * 2, sc));
  qkv_ = static_cast<float*>(dev_alloc(C * qkv_size_ * 4, sc));
  attn_ = static_cast<float*>(dev_alloc(C * q_size_ * 4, sc));
  gu_ = static_cast<float*>(dev_alloc(C * 2 * f * 4, sc));
  act_ = static_cast<float*>(dev_alloc(static_cast<size_t>(kMatvecMaxTokens) * f * 4, sc));
  {
    // Small batches' int8 activations, quantized once per matvec (HELEXA_XQ=0: by every CTA).
    const char* v = std::getenv("HELEXA_XQ");
    if (!(v && v[0] == '0') && spec_.int8_activations != Int8Mode::Never)
      x_scratch_ = dev_alloc(matvec_x_scratch_bytes(kMatvecMaxTokens, static_cast<int>(widest)), sc);
  }
  if (wbuf_elems_ > 0) wbuf_ = static_cast<__nv_bfloat16*>(dev_alloc(wbuf_elems_ * 2, sc));
  logits_ = static_cast<float*>(dev_alloc(kMatvecMaxTokens * V * 4, sc));
  work_logits_ = static_cast<float*>(dev_alloc(V * 4, sc));
  attn_ws_bytes_ = attention_decode_workspace_bytes(s.heads, s.head_dim, cap_);
  attn_ws_ = static_cast<float*>(dev_alloc(attn_ws_bytes_, sc));
  rope_table_ = static_cast<float*>(dev_alloc(static_cast<size_t>(cap_) * s.head_dim * 4, sc));
  sample_ws_bytes_ = sample_workspace_bytes(s.vocab);
  sample_ws_ = dev_alloc(sample_ws_bytes_, sc);

  d_tokens_ = static_cast<int32_t*>(dev_alloc(static_cast<size_t>(cap_) * 4, sc));
  d_pos_ = static_cast<int32_t*>(dev_alloc(static_cast<size_t>(cap_) * 4, sc));
  d_pen_tokens_ = static_cast<int32_t*>(dev_alloc(static_cast<size_t>(cap_) * 4, sc));
  d_present_ = static_cast<int32_t*>(dev_alloc(V * 4, sc));
  d_counts_ = static_cast<int32_t*>(dev_alloc(V * 4, sc));
  d_in_ = static_cast<DecodeInputs*>(dev_alloc(sizeof(DecodeInputs), sc));
  d_out_ = static_cast<StepOutputs*>(dev_alloc(sizeof(StepOutputs), sc));

  h_tokens_ = static_cast<int32_t*>(host_alloc(static_cast<size_t>(cap_) * 4));
  h_pos_ = static_cast<int32_t*>(host_alloc(static_cast<size_t>(cap_) * 4));
  h_pen_tokens_ = static_cast<int32_t*>(host_alloc(static_cast<size_t>(cap_) * 4));
  h_in_ = static_cast<DecodeInputs*>(host_alloc(sizeof(DecodeInputs)));
  h_out_ = static_cast<StepOutputs*>(host_alloc(sizeof(StepOutputs)));
  h_logits_ = static_cast<float*>(host_alloc(kMatvecMaxTokens * V * 4));
  std::memset(h_in_, 0, sizeof(DecodeInputs));
}

std::map<std::string, int64_t> GpuModel::memory() const {
  std::map<std::string, int64_t> m;
  m["weights_bytes"] = static_cast<int64_t>(weight_bytes_);
  m["kv_cache_bytes"] = static_cast<int64_t>(kv_bytes_);
  m["scratch_bytes"] = static_cast<int64_t>(scratch_bytes_);
  m["total_bytes"] = static_cast<int64_t>(device_bytes());
  m["n_ctx"] = cap_;
  m["prefill_chunk"] = chunk_;
  m["graphs"] = static_cast<int64_t>(graphs_.size());
  m["graph_captures"] = graph_captures_;
  m["graph_replays"] = graph_replays_;
  int64_t failed = 0;
  for (const auto& kv : graph_failed_) failed += kv.second ? 1 : 0;
  m["graph_failures"] = failed;
  m["use_graphs"] = use_graphs_ ? 1 : 0;
  return m;
}

void GpuModel::init_tables(WorkerContext& ctx) {
  cudaStream_t st = ctx.compute_stream();
  // The decode attention's workspace starts zeroed (every launch writes the
  // partial states it reads; zeroing keeps unused slots deterministic).
  HX_CUDA_CHECK(cudaMemsetAsync(attn_ws_, 0, attn_ws_bytes_, st));
  // cos/sin for every cache position, once: the per-layer rope becomes a
  // table lookup instead of float64 sincos per token and layer.
  rope_table_launch(inv_freq_, rope_table_, cap_, spec_.head_dim, st);
}

void GpuModel::set_graphs(bool enabled) { use_graphs_ = enabled; }

void GpuModel::clear_kv(WorkerContext& ctx) {
  cudaStream_t st = ctx.compute_stream();
  const size_t per_cache = static_cast<size_t>(spec_.kv_heads) * cap_ * spec_.head_dim;
  HX_CUDA_CHECK(cudaMemsetAsync(layers_[0].k_cache, 0, per_cache * 2 * spec_.layers * sizeof(__nv_bfloat16), st));
  HX_CUDA_CHECK(cudaMemsetAsync(d_present_, 0, static_cast<size_t>(spec_.vocab) * 4, st));
  HX_CUDA_CHECK(cudaMemsetAsync(d_counts_, 0, static_cast<size_t>(spec_.vocab) * 4, st));
}

// ---------------------------------------------------------------------------
// Inputs

void GpuModel::check_tokens(const std::vector<int32_t>& tokens, int start_pos) const {
  if (tokens.empty()) throw std::invalid_argument("tokens must not be empty");
  if (start_pos < 0) throw std::invalid_argument("start_pos must be non-negative");
  if (static_cast<int64_t>(start_pos) + static_cast<int64_t>(tokens.size()) > cap_)
    throw std::invalid_argument("positions up to " + std::to_string(start_pos + tokens.size()) +
                                " exceed the context of " + std::to_string(cap_) + " tokens");
  for (int32_t t : tokens)
    if (t < 0 || t >= spec_.vocab)
      throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary (size " +
                                  std::to_string(spec_.vocab) + ")");
}

int GpuModel::mode_of(const StepSampling& sampling, const PenaltyUpdate& pen) {
  int m = 0;
  if (sampling.temperature > 0.f) m |= kSampled;
  if (pen.active) m |= kPenalties;
  if (sampling.logprobs) m |= kLogprobs;
  return m;
}

void GpuModel::stage_inputs(WorkerContext& ctx, const StepSampling& sampling, int32_t token, int pos) {
  if (sampling.logprobs && (sampling.top_logprobs < 0 || sampling.top_logprobs > kMaxTopLogprobs))
    throw std::invalid_argument("top_logprobs must be in [0, " + std::to_string(kMaxTopLogprobs) + "]");
  DecodeInputs& in = *h_in_;
  in.token = token;
  in.pos = pos;
  in.seq_len = pos + 1;
  in.step = sampling.step;
  SamplingParamsDevice& p = in.params;
  p.temperature = sampling.temperature;
  p.top_k = sampling.top_k;
  p.top_p = sampling.top_p;
  p.min_p = sampling.min_p;
  p.repetition_penalty = sampling.repetition_penalty;
  p.presence_penalty = sampling.presence_penalty;
  p.frequency_penalty = sampling.frequency_penalty;
  p.reserved = 0;
  p.seed = sampling.seed;
  HX_CUDA_CHECK(cudaMemcpyAsync(d_in_, h_in_, sizeof(DecodeInputs), cudaMemcpyHostToDevice, ctx.compute_stream()));
}

void GpuModel::apply_penalty_update(WorkerContext& ctx, const PenaltyUpdate& pen) {
  if (!pen.active) return;
  cudaStream_t st = ctx.compute_stream();
  if (pen.reset) {
    HX_CUDA_CHECK(cudaMemsetAsync(d_present_, 0, static_cast<size_t>(spec_.vocab) * 4, st));
    HX_CUDA_CHECK(cudaMemsetAsync(d_counts_, 0, static_cast<size_t>(spec_.vocab) * 4, st));
  }
  bool staged = false;
  auto push = [&](const std::vector<int32_t>& toks, int32_t* counts) {
    for (size_t a = 0; a < toks.size(); a += static_cast<size_t>(cap_)) {
      const size_t n = std::min(toks.size() - a, static_cast<size_t>(cap_));
      // The pinned staging buffer is reused: wait for the previous copy out of it.
      if (staged) HX_CUDA_CHECK(cudaStreamSynchronize(st));
      std::memcpy(h_pen_tokens_, toks.data() + a, n * 4);
      HX_CUDA_CHECK(cudaMemcpyAsync(d_pen_tokens_, h_pen_tokens_, n * 4, cudaMemcpyHostToDevice, st));
      penalty_update_launch(d_pen_tokens_, static_cast<int>(n), d_present_, counts, spec_.vocab, st);
      staged = true;
    }
  };
  push(pen.context, nullptr);
  push(pen.generated, d_counts_);
}

// ---------------------------------------------------------------------------
// Forward

void GpuModel::dequantize_for_gemm(WorkerContext& ctx, const LinearWeight& w, const __nv_bfloat16** out) {
  if (w.type == GgmlType::BF16) {
    *out = static_cast<const __nv_bfloat16*>(w.data);
    return;
  }
  dequantize_launch(w.type, w.data, wbuf_, w.n_out, w.k, ctx.compute_stream());
  *out = wbuf_;
}

MatvecOptions GpuModel::matvec_options(const LinearWeight& w, bool accumulate) const {
  MatvecOptions o;
  o.accumulate = accumulate;
  o.int8_activations = int8_for(w.type, w.n_out, w.k);
  o.precise = true;
  o.static_weights = true;  // weights are written once, at load
  o.x_scratch = x_scratch_;
  return o;
}

void GpuModel::linear(WorkerContext& ctx, const LinearWeight& w, const float* x_f32,
                      const __nv_bfloat16* x_bf16, float* y, int n, const float* bias, bool accumulate,
                      bool small) {
  cudaStream_t st = ctx.compute_stream();
  if (small) {
    matvec_launch(w.type, w.data, x_f32, y, w.n_out, w.k, n, bias, matvec_options(w, accumulate), st);
    return;
  }
  const __nv_bfloat16* wb = nullptr;
  dequantize_for_gemm(ctx, w, &wb);
  gemm_bf16_xwT(ctx.cublas(), x_bf16, wb, y, n, w.n_out, w.k, accumulate, st);
  if (bias != nullptr) add_bias_rows_launch(y, bias, n, w.n_out, st);
}

void GpuModel::run_layers(WorkerContext& ctx, const int32_t* ids, const int32_t* pos, int n, int start_pos,
                          bool decode) {
  cudaStream_t st = ctx.compute_stream();
  const ModelSpec& s = spec_;
  const int h = s.hidden, d = s.head_dim, nq = s.heads, nk = s.kv_heads, f = s.intermediate;
  const float eps = s.eps;
  const bool small = n <= kMatvecMaxTokens;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));

  float* q = qkv_;
  float* k = q + static_cast<size_t>(n) * q_size_;
  float* v = k + static_cast<size_t>(n) * kv_size_;
  float* gate = gu_;
  float* up = gu_ + static_cast<size_t>(n) * f;

  embedding_launch(token_embd_.type, token_embd_.data, ids, x_, n, h, s.vocab, st);

  for (const LayerWeights& L : layers_) {
    add_rms_norm_launch(x_, nullptr, L.attn_norm, eps, small ? xn_ : nullptr, small ? nullptr : xb_, n, h, st);

    const float* bq = L.b_qkv;
    const float* bk = L.b_qkv ? L.b_qkv + q_size_ : nullptr;
    const float* bv = L.b_qkv ? L.b_qkv + q_size_ + kv_size_ : nullptr;
    if (n == 1 && L.qkv_fused) {
      // q, k and v blocks are adjacent for one token: one launch fills all three.
      matvec_launch(L.qkv.type, L.qkv.data, xn_, q, qkv_size_, h, 1, L.b_qkv, matvec_options(L.qkv, false), st);
    } else if (!small && L.qkv_fused) {
      const __nv_bfloat16* wb = nullptr;
      dequantize_for_gemm(ctx, L.qkv, &wb);
      gemm_bf16_xwT(ctx.cublas(), xb_, wb, q, n, q_size_, h, false, st);
      gemm_bf16_xwT(ctx.cublas(), xb_, wb + static_cast<size_t>(q_size_) * h, k, n, kv_size_, h, false, st);
      gemm_bf16_xwT(ctx.cublas(), xb_, wb + static_cast<size_t>(q_size_ + kv_size_) * h, v, n, kv_size_, h,
                    false, st);
      if (bq != nullptr) {
        add_bias_rows_launch(q, bq, n, q_size_, st);
        add_bias_rows_launch(k, bk, n, kv_size_, st);
        add_bias_rows_launch(v, bv, n, kv_size_, st);
      }
    } else if (n == 1 && L.qk_fused) {
      // q and k blocks (and their biases) are adjacent for one token.
      matvec_launch(L.qk.type, L.qk.data, xn_, q, q_size_ + kv_size_, h, 1, L.b_qkv, matvec_options(L.qk, false),
                    st);
      linear(ctx, L.v, xn_, xb_, v, n, bv, false, small);
    } else {
      linear(ctx, L.q, xn_, xb_, q, n, bq, false, small);
      linear(ctx, L.k, xn_, xb_, k, n, bk, false, small);
      linear(ctx, L.v, xn_, xb_, v, n, bv, false, small);
    }

    // qwen3's q/k norm, the rotation and the cache append in one launch.
    rope_kv_append_launch(q, k, v, L.k_cache, L.v_cache, pos, rope_table_, cap_, inv_freq_, L.q_norm,
                          L.q_norm != nullptr ? L.k_norm : nullptr, eps, n, nq, nk, d, cap_, s.rope_style, st);
    if (decode) {
      attention_decode_launch(q, L.k_cache, L.v_cache, &d_in_->seq_len, attn_, attn_ws_, attn_ws_bytes_, nq, nk,
                              d, cap_, scale, st);
    } else {
      attention_prefill_launch(q, L.k_cache, L.v_cache, start_pos, n, attn_, nq, nk, d, cap_, scale, st);
    }

    if (!small) f32_to_bf16_launch(attn_, xb_, static_cast<int64_t>(n) * q_size_, st);
    linear(ctx, L.o, attn_, xb_, x_, n, L.b_o, true, small);

    add_rms_norm_launch(x_, nullptr, L.ffn_norm, eps, small ? xn_ : nullptr, small ? nullptr : xb_, n, h, st);
    if (n == 1 && L.gate_up_fused) {
      matvec_launch(L.gate_up.type, L.gate_up.data, xn_, gate, 2 * f, h, 1, nullptr, matvec_options(L.gate_up, false),
                    st);
    } else if (!small && L.gate_up_fused) {
      const __nv_bfloat16* wb = nullptr;
      dequantize_for_gemm(ctx, L.gate_up, &wb);
      gemm_bf16_xwT(ctx.cublas(), xb_, wb, gate, n, f, h, false, st);
      gemm_bf16_xwT(ctx.cublas(), xb_, wb + static_cast<size_t>(f) * h, up, n, f, h, false, st);
    } else {
      linear(ctx, L.gate, xn_, xb_, gate, n, nullptr, false, small);
      linear(ctx, L.up, xn_, xb_, up, n, nullptr, false, small);
    }
    swiglu_launch(gate, up, small ? act_ : nullptr, small ? nullptr : xb_, static_cast<int64_t>(n) * f, st);
    linear(ctx, L.down, act_, xb_, x_, n, nullptr, true, small);
  }
}

void GpuModel::lm_head(WorkerContext& ctx, int row0, int count) {
  cudaStream_t st = ctx.compute_stream();
  const int h = spec_.hidden;
  add_rms_norm_launch(x_ + static_cast<size_t>(row0) * h, nullptr, output_norm_, spec_.eps, xn_, nullptr, count, h,
                      st);
  matvec_launch(output_.type, output_.data, xn_, logits_, spec_.vocab, h, count, nullptr,
                matvec_options(output_, false), st);
}

void GpuModel::sample_tail(WorkerContext& ctx, int mode) {
  cudaStream_t st = ctx.compute_stream();
  const int V = spec_.vocab;
  const float* src = logits_;
  if (mode & kPenalties) {
    penalties_launch(logits_, work_logits_, V, &d_in_->params, d_present_, d_counts_, st);
    src = work_logits_;
  }
  if (mode & kSampled)
    sample_launch(src, V, &d_in_->params, &d_in_->step, &d_out_->token, sample_ws_, sample_ws_bytes_, st);
  else
    argmax_launch(src, V, &d_out_->token, st);
  if (mode & kLogprobs)
    logprobs_launch(logits_, V, std::min(kMaxTopLogprobs, V), &d_out_->token, &d_out_->logprob, d_out_->top_ids,
                    d_out_->top_lp, st);
}

void GpuModel::decode_body(WorkerContext& ctx, int mode) {
  run_layers(ctx, &d_in_->token, &d_in_->pos, 1, 0, true);
  lm_head(ctx, 0, 1);
  sample_tail(ctx, mode);
}

StepResult GpuModel::collect(WorkerContext& ctx, const StepSampling& sampling, bool want_logits) {
  cudaStream_t st = ctx.compute_stream();
  const int V = spec_.vocab;
  HX_CUDA_CHECK(cudaMemcpyAsync(h_out_, d_out_, sizeof(StepOutputs), cudaMemcpyDeviceToHost, st));
  if (want_logits)
    HX_CUDA_CHECK(cudaMemcpyAsync(h_logits_, logits_, static_cast<size_t>(V) * 4, cudaMemcpyDeviceToHost, st));
  HX_CUDA_CHECK(cudaStreamSynchronize(st));
  StepResult r;
  r.token = h_out_->token;
  if (r.token < 0 || r.token >= V)
    throw std::runtime_error("the device sampler returned token id " + std::to_string(r.token) +
                             " outside the vocabulary");
  if (sampling.logprobs) {
    r.has_logprob = true;
    r.logprob = h_out_->logprob;
    const int n = std::min({sampling.top_logprobs, kMaxTopLogprobs, V});
    for (int i = 0; i < n; ++i) r.top.emplace_back(h_out_->top_ids[i], h_out_->top_lp[i]);
  }
  if (want_logits) r.logits.assign(h_logits_, h_logits_ + V);
  return r;
}

// ---------------------------------------------------------------------------
// Jobs

StepResult GpuModel::prefill(WorkerContext& ctx, const std::vector<int32_t>& tokens, int start_pos,
                             const StepSampling& sampling, const PenaltyUpdate& pen, bool want_logits) {
  check_tokens(tokens, start_pos);
  cudaStream_t st = ctx.compute_stream();
  const int n = static_cast<int>(tokens.size());
  for (int i = 0; i < n; ++i) {
    h_tokens_[i] = tokens[i];
    h_pos_[i] = start_pos + i;
  }
  HX_CUDA_CHECK(cudaMemcpyAsync(d_tokens_, h_tokens_, static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice, st));
  HX_CUDA_CHECK(cudaMemcpyAsync(d_pos_, h_pos_, static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice, st));
  apply_penalty_update(ctx, pen);
  stage_inputs(ctx, sampling, tokens.back(), start_pos + n - 1);
  int last = 0;
  for (int a = 0; a < n; a += chunk_) {
    const int nc = std::min(chunk_, n - a);
    run_layers(ctx, d_tokens_ + a, d_pos_ + a, nc, start_pos + a, false);
    last = nc - 1;
  }
  lm_head(ctx, last, 1);
  sample_tail(ctx, mode_of(sampling, pen));
  return collect(ctx, sampling, want_logits);
}

StepResult GpuModel::decode(WorkerContext& ctx, int32_t token, int pos, const StepSampling& sampling,
                            const PenaltyUpdate& pen, bool want_logits) {
  // check_tokens without building a vector: this is the per-token path.
  if (pos < 0) throw std::invalid_argument("start_pos must be non-negative");
  if (pos >= cap_)
    throw std::invalid_argument("positions up to " + std::to_string(pos + 1) + " exceed the context of " +
                                std::to_string(cap_) + " tokens");
  if (token < 0 || token >= spec_.vocab)
    throw std::invalid_argument("token id " + std::to_string(token) + " is outside the vocabulary (size " +
                                std::to_string(spec_.vocab) + ")");
  cudaStream_t st = ctx.compute_stream();
  apply_penalty_update(ctx, pen);
  stage_inputs(ctx, sampling, token, pos);
  const int mode = mode_of(sampling, pen);
  auto it = graphs_.find(mode);
  const auto failed = graph_failed_.find(mode);
  if (!use_graphs_ || (failed != graph_failed_.end() && failed->second)) {
    decode_body(ctx, mode);
  } else if (it != graphs_.end()) {
    HX_CUDA_CHECK(cudaGraphLaunch(it->second, st));
    ++graph_replays_;
  } else {
    // The plain run answers this step (and warms every kernel up); the
    // recording made after it serves the next steps.
    decode_body(ctx, mode);
    cudaGraph_t graph = nullptr;
    HX_CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    try {
      decode_body(ctx, mode);
    } catch (...) {
      // Leave capture mode whatever failed, or the stream stays unusable.
      cudaStreamEndCapture(st, &graph);
      if (graph != nullptr) cudaGraphDestroy(graph);
      cudaGetLastError();
      graph_failed_[mode] = true;
      try {
        throw;
      } catch (const CudaError& e) {
        // A launch refused during capture only costs the graph; the plain
        // run already produced this step's result.
        if (e.sticky) throw;
      }
      return collect(ctx, sampling, want_logits);
    }
    cudaError_t e = cudaStreamEndCapture(st, &graph);
    cudaGraphExec_t exec = nullptr;
    if (e == cudaSuccess && graph != nullptr) e = cudaGraphInstantiate(&exec, graph, 0);
    if (graph != nullptr) cudaGraphDestroy(graph);
    if (e != cudaSuccess || exec == nullptr) {
      cudaGetLastError();
      graph_failed_[mode] = true;
    } else {
      graphs_[mode] = exec;
      ++graph_captures_;
    }
  }
  return collect(ctx, sampling, want_logits);
}

std::vector<float> GpuModel::forward_logits(WorkerContext& ctx, const std::vector<int32_t>& tokens, int start_pos,
                                            bool all_logits) {
  check_tokens(tokens, start_pos);
  cudaStream_t st = ctx.compute_stream();
  const int n = static_cast<int>(tokens.size());
  const size_t V = static_cast<size_t>(spec_.vocab);
  for (int i = 0; i < n; ++i) {
    h_tokens_[i] = tokens[i];
    h_pos_[i] = start_pos + i;
  }
  HX_CUDA_CHECK(cudaMemcpyAsync(d_tokens_, h_tokens_, static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice, st));
  HX_CUDA_CHECK(cudaMemcpyAsync(d_pos_, h_pos_, static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice, st));
  std::vector<float> out(all_logits ? V * n : V);
  int last = 0;
  for (int a = 0; a < n; a += chunk_) {
    const int nc = std::min(chunk_, n - a);
    run_layers(ctx, d_tokens_ + a, d_pos_ + a, nc, start_pos + a, false);
    last = nc - 1;
    if (!all_logits) continue;
    for (int g = 0; g < nc; g += kMatvecMaxTokens) {
      const int ng = std::min(kMatvecMaxTokens, nc - g);
      lm_head(ctx, g, ng);
      HX_CUDA_CHECK(cudaMemcpyAsync(h_logits_, logits_, V * ng * 4, cudaMemcpyDeviceToHost, st));
      HX_CUDA_CHECK(cudaStreamSynchronize(st));
      std::memcpy(out.data() + static_cast<size_t>(a + g) * V, h_logits_, V * ng * 4);
    }
  }
  if (!all_logits) {
    lm_head(ctx, last, 1);
    HX_CUDA_CHECK(cudaMemcpyAsync(h_logits_, logits_, V * 4, cudaMemcpyDeviceToHost, st));
    HX_CUDA_CHECK(cudaStreamSynchronize(st));
    std::memcpy(out.data(), h_logits_, V * 4);
  }
  return out;
}

// ---------------------------------------------------------------------------
// model_api.h: each call is one job on the worker; the caller blocks on it.

LoadResult model_load(DeviceWorker& w, const ModelSpec& spec, const std::vector<HostTensor>& tensors) {
  auto fut = w.submit([&spec, &tensors](WorkerContext& ctx) -> LoadResult {
    if (ctx.host_only()) throw std::invalid_argument("the GPU model needs a CUDA device worker");
    const auto t0 = std::chrono::steady_clock::now();
    auto model = std::make_unique<GpuModel>(ctx, spec, tensors);
    LoadResult r;
    r.bytes = model->device_bytes();
    r.handle = ctx.add_resource(std::move(model));
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return r;
  });
  return fut.get();
}

StepResult model_prefill(DeviceWorker& w, int64_t handle, const std::vector<int32_t>& tokens, int start_pos,
                         const StepSampling& sampling, const PenaltyUpdate& pen, bool want_logits) {
  return w.submit([&, handle](WorkerContext& ctx) {
            return ctx.resource<GpuModel>(handle)->prefill(ctx, tokens, start_pos, sampling, pen, want_logits);
          })
      .get();
}

StepResult model_decode(DeviceWorker& w, int64_t handle, int32_t token, int pos, const StepSampling& sampling,
                        const PenaltyUpdate& pen, bool want_logits, JobWaiter* waiter) {
  auto f = w.submit([&, handle](WorkerContext& ctx) {
    return ctx.resource<GpuModel>(handle)->decode(ctx, token, pos, sampling, pen, want_logits);
  });
  return waiter ? waiter->wait(f) : f.get();
}

std::vector<float> model_forward_logits(DeviceWorker& w, int64_t handle, const std::vector<int32_t>& tokens,
                                        int start_pos, bool all_logits) {
  return w.submit([&, handle](WorkerContext& ctx) {
            return ctx.resource<GpuModel>(handle)->forward_logits(ctx, tokens, start_pos, all_logits);
          })
      .get();
}

void model_clear_kv(DeviceWorker& w, int64_t handle) {
  w.submit([handle](WorkerContext& ctx) {
     ctx.resource<GpuModel>(handle)->clear_kv(ctx);
     ctx.synchronize();
   }).get();
}

void model_drop(DeviceWorker& w, int64_t handle) {
  w.submit_cleanup([handle](WorkerContext& ctx) { ctx.drop(handle); }).get();
}

void model_set_graphs(DeviceWorker& w, int64_t handle, bool enabled) {
  w.submit([handle, enabled](WorkerContext& ctx) { ctx.resource<GpuModel>(handle)->set_graphs(enabled); }).get();
}

std::map<std::string, int64_t> model_memory(DeviceWorker& w, int64_t handle) {
  return w.submit([handle](WorkerContext& ctx) {
            auto m = ctx.resource<GpuModel>(handle)->memory();
            size_t free_b = 0, total_b = 0;
            HX_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
            m["device_free_bytes"] = static_cast<int64_t>(free_b);
            m["device_total_bytes"] = static_cast<int64_t>(total_b);
            return m;
          })
      .get();
}

}  // namespace hx

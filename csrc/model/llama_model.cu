// GpuModel (see llama_model.h) and the model jobs of model_api.h.
#include "model/llama_model.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "common/arch.cuh"
#include "common/check.h"
#include "kernels/attention_decode.cuh"
#include "kernels/attention_prefill.cuh"
#include "kernels/bias.cuh"
#include "kernels/cast.cuh"
#include "kernels/constrain.cuh"
#include "kernels/decode_feed.cuh"
#include "kernels/dequant.cuh"
#include "kernels/embedding.cuh"
#include "kernels/gather_rows.cuh"
#include "kernels/matvec.cuh"
#include "kernels/moe_align.cuh"
#include "kernels/moe_combine.cuh"
#include "kernels/moe_route.cuh"
#include "kernels/penalty_state.cuh"
#include "kernels/rms_norm.cuh"
#include "kernels/rope.cuh"
#include "kernels/sum_rows.cuh"
#include "kernels/swiglu.cuh"
#include "model/gemm.h"
#include "model/tensor_parallel.h"

namespace hx {

namespace {

[[noreturn]] void bad_model(const std::string& msg) { throw std::invalid_argument(msg); }

bool known_type(int t) { return t >= 0 && t <= 64 && is_supported(static_cast<GgmlType>(t)); }

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
      bad_model("tensor " + name + " has shape " + shape_str(t->shape) + ", expected (" + std::to_string(n_out) + ", " +
                std::to_string(k) + ")");
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

  // A stacked expert tensor [E, rows, cols] of any supported type, passed
  // whole or as one tensor per expert ("<name>:<e>", [rows, cols]).
  struct Experts {
    GgmlType type = GgmlType::F32;
    std::vector<const char*> at;  // [E] each expert's first byte
    size_t bytes = 0;             // one expert's bytes
    bool stacked = false;         // at[e] == at[0] + e * bytes
  };
  Experts experts(const std::string& name, int64_t E, int64_t rows, int64_t cols) const {
    auto type_of = [&](const HostTensor& t, const std::string& what) {
      if (!known_type(t.type)) bad_model("tensor " + what + " has unsupported GGML type " + std::to_string(t.type));
      const GgmlType ty = static_cast<GgmlType>(t.type);
      if (cols % block_elems(ty) != 0 || cols % 4 != 0)
        bad_model("tensor " + what + ": row length " + std::to_string(cols) +
                  " is not a multiple of its block size and of 4");
      return ty;
    };
    Experts out;
    if (const HostTensor* t = find(name)) {
      out.type = type_of(*t, name);
      if (t->shape.size() != 3 || t->shape[0] != E || t->shape[1] != rows || t->shape[2] != cols)
        bad_model("tensor " + name + " has shape " + shape_str(t->shape) + ", expected (" + std::to_string(E) + ", " +
                  std::to_string(rows) + ", " + std::to_string(cols) + ")");
      out.bytes = row_bytes(out.type, cols) * static_cast<size_t>(rows);
      if (t->bytes != out.bytes * static_cast<size_t>(E) || t->data == nullptr)
        bad_model("tensor " + name + " holds " + std::to_string(t->bytes) + " bytes, expected " +
                  std::to_string(out.bytes * static_cast<size_t>(E)));
      out.stacked = true;
      for (int64_t e = 0; e < E; ++e) out.at.push_back(static_cast<const char*>(t->data) + out.bytes * e);
      return out;
    }
    for (int64_t e = 0; e < E; ++e) {
      const std::string part = name + ":" + std::to_string(e);
      const HostTensor* t = find(part);
      if (t == nullptr) bad_model("missing tensor " + (e == 0 ? name : part));
      const GgmlType ty = type_of(*t, part);
      if (e == 0) {
        out.type = ty;
        out.bytes = row_bytes(ty, cols) * static_cast<size_t>(rows);
      } else if (ty != out.type) {
        bad_model("tensor " + part + " has GGML type " + std::to_string(t->type) + ", expert 0 has " +
                  std::to_string(static_cast<int>(out.type)));
      }
      if (t->shape.size() != 2 || t->shape[0] != rows || t->shape[1] != cols)
        bad_model("tensor " + part + " has shape " + shape_str(t->shape) + ", expected (" + std::to_string(rows) +
                  ", " + std::to_string(cols) + ")");
      if (t->bytes != out.bytes || t->data == nullptr)
        bad_model("tensor " + part + " holds " + std::to_string(t->bytes) + " bytes, expected " +
                  std::to_string(out.bytes));
      out.at.push_back(static_cast<const char*>(t->data));
    }
    return out;
  }

 private:
  std::unordered_map<std::string, const HostTensor*> by_name_;
};

// Byte offsets of arrays packed one after another, each 16-byte aligned.
struct Packer {
  size_t off = 0;
  template <class T>
  size_t take(size_t count) {
    off = (off + 15) / 16 * 16;
    const size_t at = off;
    off += count * sizeof(T);
    return at;
  }
};

template <class T>
T* at(char* base, size_t off) {
  return reinterpret_cast<T*>(base + off);
}

}  // namespace

// ---------------------------------------------------------------------------
// Construction and memory

GpuModel::GpuModel(WorkerContext& ctx, const ModelSpec& spec, const std::vector<HostTensor>& tensors) : spec_(spec) {
  const ModelSpec& s = spec_;
  const bool moe_arch = s.arch == "qwen3moe";
  if (s.arch != "llama" && s.arch != "qwen2" && s.arch != "qwen3" && !moe_arch)
    bad_model("unsupported architecture " + s.arch);
  if (s.vocab <= 0 || s.hidden <= 0 || s.intermediate < 0 || s.layers <= 0 || s.heads <= 0 || s.kv_heads <= 0 ||
      s.head_dim <= 0)
    bad_model("model dimensions must be positive");
  if (moe_arch) {
    if (s.num_experts < 1 || s.num_experts > kMoeMaxExperts)
      bad_model("num_experts must be in [1, " + std::to_string(kMoeMaxExperts) + "], got " +
                std::to_string(s.num_experts));
    if (s.experts_per_tok < 1 || s.experts_per_tok > std::min(s.num_experts, kMoeMaxTopK))
      bad_model("num_experts_per_tok must be in [1, " + std::to_string(std::min(s.num_experts, kMoeMaxTopK)) +
                "], got " + std::to_string(s.experts_per_tok));
    if (s.expert_ffn <= 0) bad_model("moe_intermediate_size must be positive");
    for (int l : s.mlp_only_layers)
      if (l < 0 || l >= s.layers) bad_model("mlp_only_layers names layer " + std::to_string(l));
  } else if (s.num_experts != 0) {
    bad_model("architecture " + s.arch + " has no experts, but num_experts is " + std::to_string(s.num_experts));
  }
  bool any_dense = !moe_arch;
  for (int i = 0; i < s.layers; ++i) any_dense = any_dense || !moe_layer(i);
  if (any_dense && s.intermediate <= 0) bad_model("intermediate_size must be positive");
  if (s.heads % s.kv_heads != 0) bad_model("num_heads must be a multiple of num_kv_heads");
  // The decode attention kernel takes head dims in multiples of 8 up to 256.
  if (s.head_dim % 8 != 0 || s.head_dim > 256)
    bad_model("head_dim " + std::to_string(s.head_dim) + " is not supported on the GPU (multiples of 8 up to 256)");
  if (static_cast<int>(s.inv_freq.size()) != s.head_dim / 2) bad_model("inv_freq must hold head_dim / 2 values");
  if (!is_rope_style(s.rope_style)) bad_model("unknown rope style " + std::to_string(static_cast<int>(s.rope_style)));
  if (s.n_ctx <= 0) bad_model("n_ctx must be positive");
  if (!(s.eps > 0.f)) bad_model("rms_norm_eps must be positive");
  if (s.block_size < 16 || s.block_size > (1 << 20) || (s.block_size & (s.block_size - 1)) != 0)
    bad_model("block_size must be a power of two from 16 up, got " + std::to_string(s.block_size));
  if (s.max_num_seqs < 1 || s.max_num_seqs > 4096)
    bad_model("max_num_seqs must be in [1, 4096], got " + std::to_string(s.max_num_seqs));
  if (s.num_blocks < 0) bad_model("num_blocks must not be negative");
  if (s.tp_size < 0 || (s.tp_size > 0 && (s.tp_rank < 0 || s.tp_rank >= s.tp_size)))
    bad_model("tensor-parallel rank " + std::to_string(s.tp_rank) + " of " + std::to_string(s.tp_size) +
              " is out of range");

  q_size_ = s.heads * s.head_dim;
  kv_size_ = s.kv_heads * s.head_dim;
  qkv_size_ = q_size_ + 2 * kv_size_;
  n_ctx_ = s.n_ctx;
  // Rows of one forward pass; a step holds at most max_num_seqs sequences
  // of n_ctx tokens, so that bounds it (a short context alone does not: one
  // step may carry several prompts).
  chunk_ = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(s.prefill_chunk > 0 ? s.prefill_chunk : 512,
                                             static_cast<int64_t>(n_ctx_) * std::max(1, s.max_num_seqs))));
  slots_ = s.max_num_seqs + 1;
  // The tensor-core product from 4 tokens, except on narrow models (hidden
  // below 768, as SmolLM2-135M): their small matrices ran faster on the fp32
  // matvec up to 8 tokens and dequantize + cuBLAS above (bench/notes.md,
  // tenth run: +11% at 8 streams, +24% at 32). HELEXA_TC_MIN overrides.
  tc_min_ = s.hidden >= 768 ? 4 : kTcMaxTokens + 1;
  if (const char* v = std::getenv("HELEXA_TC_MIN")) tc_min_ = std::max(2, std::atoi(v));
  if (const char* v = std::getenv("HELEXA_TC_BF16")) tc_bf16_ = v[0] == '1';
  tc_opts_ = tc_options_from_env();
  logit_rows_ = std::max(slots_, kMatvecMaxTokens);
  rows_cap_ = std::max(chunk_, logit_rows_);
  while ((1 << bshift_) < s.block_size) ++bshift_;
  max_blocks_ = static_cast<int>((static_cast<int64_t>(n_ctx_) + s.block_size - 1) / s.block_size);
  if (static_cast<int64_t>(max_blocks_) * s.block_size > INT32_MAX) bad_model("n_ctx is too large");
  stage_rows_ = std::max(chunk_, n_ctx_);
  pen_cap_ = static_cast<size_t>(n_ctx_) + 1024;
  mask_words_ = constrain_mask_words(s.vocab);
  use_graphs_ = s.use_graphs;
  try {
    if (s.tp_size > 0) {
      tp_ = std::make_unique<TpComm>(ctx, s.tp_rank, s.tp_size, s.tp_peer_max_bytes);
      scratch_bytes_ += tp_->device_bytes();
    }
    load_weights(ctx, tensors);
    alloc_state();
    init_tables(ctx);
    if (s.num_blocks > 0) alloc_kv(ctx, s.num_blocks);
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
                        " MiB (try a smaller n_ctx, KV cache or model)",
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

  // Stacked experts on the device: expert e's matrix (its parts' rows one
  // after another) at e * stride, stride rounded up to 16 bytes so every
  // expert starts aligned (the padding is zeroed).
  auto upload_experts = [&](const std::vector<const TensorTable::Experts*>& parts, int n_out, int k) {
    ExpertWeight w;
    w.type = parts[0]->type;
    w.n_out = n_out;
    w.k = k;
    size_t bytes = 0;
    for (const auto* part : parts) bytes += part->bytes;
    w.stride = (bytes + 15) / 16 * 16;
    const size_t E = parts[0]->at.size();
    char* dst = static_cast<char*>(dev_alloc(w.stride * E, &weight_bytes_));
    w.data = dst;
    if (parts.size() == 1 && parts[0]->stacked && w.stride == bytes) {
      ctx.upload(parts[0]->at[0], bytes * E, dst);
      return w;
    }
    if (w.stride != bytes) HX_CUDA_CHECK(cudaMemsetAsync(dst, 0, w.stride * E, ctx.compute_stream()));
    for (size_t e = 0; e < E; ++e) {
      size_t off = e * w.stride;
      for (const auto* part : parts) {
        ctx.upload(part->at[e], part->bytes, dst + off);
        off += part->bytes;
      }
    }
    return w;
  };

  token_embd_ = upload_matrix(table.matrix("token_embd.weight", s.vocab, h), s.vocab, h);
  if (s.lm_head) {
    output_norm_ = upload_vector(table.vector("output_norm.weight", h, true));
    if (table.find("output.weight") != nullptr)
      output_ = upload_matrix(table.matrix("output.weight", s.vocab, h), s.vocab, h);
    else
      output_ = token_embd_;  // tied embeddings
  }
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

    if (moe_layer(i)) {
      const int E = s.num_experts, fe = s.expert_ffn;
      L.moe = true;
      const HostTensor& tr = table.matrix(p + "ffn_gate_inp.weight", E, h);
      if (tr.type != 0) bad_model("tensor " + p + "ffn_gate_inp.weight (the router) must be passed as float32");
      L.router = upload_matrix(tr, E, h);
      const TensorTable::Experts tg = table.experts(p + "ffn_gate_exps.weight", E, fe, h);
      const TensorTable::Experts tu = table.experts(p + "ffn_up_exps.weight", E, fe, h);
      const TensorTable::Experts td = table.experts(p + "ffn_down_exps.weight", E, h, fe);
      if (tg.type == tu.type) {
        // Each expert's gate rows, then its up rows: one pair product fills both.
        L.exp_gate_up_fused = true;
        L.exp_gate_up = upload_experts({&tg, &tu}, 2 * fe, h);
      } else {
        L.exp_gate = upload_experts({&tg}, fe, h);
        L.exp_up = upload_experts({&tu}, fe, h);
      }
      L.exp_down = upload_experts({&td}, h, fe);
      continue;
    }

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

  // The dequantize scratch holds the largest matrix one GEMM group reads (a
  // MoE layer's empty dense weights add nothing; its experts are never dequantized).
  size_t most = 0;
  auto need = [&](const LinearWeight& w) {
    if (w.type != GgmlType::BF16) most = std::max(most, static_cast<size_t>(w.n_out) * w.k);
  };
  for (const auto& L : layers_) {
    if (L.qkv_fused)
      need(L.qkv);
    else {
      need(L.q);
      need(L.k);
      need(L.v);
    }
    if (L.gate_up_fused)
      need(L.gate_up);
    else {
      need(L.gate);
      need(L.up);
    }
    need(L.o);
    need(L.down);
  }
  // The LM head of more than a few rows is dequantized in row slices of at
  // least 4096 rows (or all of it) through the same scratch.
  if (s.lm_head && output_.type != GgmlType::BF16)
    most = std::max(most, static_cast<size_t>(h) * static_cast<size_t>(std::min(s.vocab, 4096)));
  wbuf_elems_ = most;
}
void GpuModel::alloc_state() {
  const ModelSpec& s = spec_;
  bool any_dense = false, any_moe = false;
  for (const LayerWeights& L : layers_) {
    any_dense = any_dense || !L.moe;
    any_moe = any_moe || L.moe;
  }
  // Dense FFN scratch only where a layer has a dense FFN.
  const size_t R = static_cast<size_t>(rows_cap_), h = s.hidden, f = any_dense ? s.intermediate : 0, V = s.vocab;
  const size_t LR = static_cast<size_t>(logit_rows_), S = static_cast<size_t>(slots_);
  size_t* sc = &scratch_bytes_;

  x_ = static_cast<float*>(dev_alloc(R * h * 4, sc));
  xn_ = static_cast<float*>(dev_alloc(R * h * 4, sc));
  const size_t widest = std::max<size_t>({h, static_cast<size_t>(q_size_), f});
  xb_ = static_cast<__nv_bfloat16*>(dev_alloc(R * widest * 2, sc));
  qkv_ = static_cast<float*>(dev_alloc(R * qkv_size_ * 4, sc));
  attn_ = static_cast<float*>(dev_alloc(R * q_size_ * 4, sc));
  gu_ = static_cast<float*>(dev_alloc(R * 2 * f * 4, sc));
  act_ = static_cast<float*>(dev_alloc(static_cast<size_t>(kMatvecMaxTokens) * f * 4, sc));
  x_sel_ = static_cast<float*>(dev_alloc(LR * h * 4, sc));
  if (any_moe) {
    const size_t E = s.num_experts, P = R * s.experts_per_tok, fe = s.expert_ffn;
    router_logits_ = static_cast<float*>(dev_alloc(R * E * 4, sc));
    moe_ids_ = static_cast<int32_t*>(dev_alloc(P * 4, sc));
    moe_w_ = static_cast<float*>(dev_alloc(P * 4, sc));
    moe_offsets_ = static_cast<int32_t*>(dev_alloc((E + 1) * 4, sc));
    moe_active_ = static_cast<int32_t*>(dev_alloc(E * 4, sc));
    moe_n_active_ = static_cast<int32_t*>(dev_alloc(4, sc));
    moe_pair_slot_ = static_cast<int32_t*>(dev_alloc(P * 4, sc));
    moe_slot_token_ = static_cast<int32_t*>(dev_alloc(P * 4, sc));
    moe_tiles_ =
        static_cast<int4*>(dev_alloc(moe_max_tiles(static_cast<int>(P), static_cast<int>(E), 8) * sizeof(int4), sc));
    moe_n_tiles_ = static_cast<int32_t*>(dev_alloc(4, sc));
    exp_xy_ = static_cast<float*>(dev_alloc(P * h * 4, sc));
    exp_gu_ = static_cast<float*>(dev_alloc(P * 2 * fe * 4, sc));
    exp_act_ = static_cast<float*>(dev_alloc(P * fe * 4, sc));
    const char* v = std::getenv("HELEXA_MOE_TC");
    // (Their inputs are gathered into bf16 four columns a thread: hidden a
    // multiple of 4, as every real model's.)
    moe_tc_ = tc_min_ <= kTcMaxTokens && !(v && std::strcmp(v, "0") == 0) && h % 4 == 0;
    for (const LayerWeights& L : layers_)
      for (const ExpertWeight* w : {&L.exp_gate_up, &L.exp_gate, &L.exp_up, &L.exp_down})
        if (L.moe && w->data && is_float_type(w->type)) moe_tc_ = false;
    if (moe_tc_) exp_xb_ = static_cast<__nv_bfloat16*>(dev_alloc(P * std::max(h, fe) * 2, sc));
    // Up to this many tokens the experts run as (token, expert) pairs
    // (HELEXA_MOE_PAIRS_MAX, 0..kMatvecMaxTokens); past it, grouped by expert.
    // With the tensor-core groups, from 5 tokens (an H100 A/B: 8 tokens of
    // the Qwen3-30B-A3B shape, Q4_K_M, 939 tok/s grouped against 812 as pairs).
    moe_pairs_max_ = moe_tc_ ? 4 : kMatvecMaxTokens;
    if (const char* pm = std::getenv("HELEXA_MOE_PAIRS_MAX"))
      moe_pairs_max_ = std::min(std::max(std::atoi(pm), 0), kMatvecMaxTokens);
    // The pairs with the SwiGLU and the weighted sum fused into their two
    // launches (tenth run, Qwen3-30B-A3B Q4_K_M: 343.5 tok/s at one stream
    // against 314.2 for four launches); HELEXA_MOE_FUSE=0: four launches.
    const char* fv = std::getenv("HELEXA_MOE_FUSE");
    moe_fuse_ = !(fv && std::strcmp(fv, "0") == 0);
  }
  {
    // Q4_K matvecs of up to mv_mma_ tokens on the fragment kernel
    // (matvec_mma.cu; HELEXA_MV_MMA=0..8): the products that take the matvec,
    // batches below the tensor-core product's start. Off by default: on an H100 its
    // faster large products (gate|up +7%, 4096 x 4096 +9%, a 128256-row
    // head +18%) did not show in decode (8B Q4_K_M 300.8 against 299.3
    // tok/s, Qwen3-30B-A3B 344.1 against 353.2; bench/notes.md).
    mv_mma_ = 0;
    if (const char* mv = std::getenv("HELEXA_MV_MMA"); mv && *mv)
      mv_mma_ = std::min(std::max(std::atoi(mv), 0), kMatvecMaxTokens);
    // Smaller matrices stay on the float kernel: there the prep launch and
    // the grid's few warps cost more than the decode saves (an H100, one
    // token: 1024 x 4096 5.95 us against 4.05; 4096 x 4096 8.78 against 9.51).
    if (const char* mr = std::getenv("HELEXA_MV_MMA_MIN_ROWS"); mr && *mr) mv_min_rows_ = std::max(1, std::atoi(mr));
    // HELEXA_MV_MMA_LOCAL=1: each CTA prepares its x in shared memory (no
    // prep launch); not yet measured.
    if (const char* ml = std::getenv("HELEXA_MV_MMA_LOCAL")) mv_local_ = ml[0] == '1';
    // HELEXA_MV_MMA_BATCH=N: Q4_K batches from the tensor-core product's
    // start up to N (at most 8) tokens on the fragment kernel, x read in bf16.
    // Off by default: faster alone on an H100 (gate|up at 4 tokens 36.8 us
    // against the product's 42.8), slower in the step (8B Q4_K_M at 8
    // streams 1581 tok/s against 1667).
    if (const char* mb = std::getenv("HELEXA_MV_MMA_BATCH"); mb && *mb)
      mv_mma_batch_ = std::min(std::max(std::atoi(mb), 0), kMatvecMaxTokens);
    // bf16 weights past the float matvec and up to mv_bf16_ tokens on the
    // fragment kernel (HELEXA_MV_BF16=0..32, default 16; 0: cuBLAS, as for
    // larger batches). An H100, 8B bf16 aggregate decode: N=8 1228 tok/s
    // against 1037.5 on cuBLAS; N=32 3525 with the kernel up to 16 tokens,
    // 3294 up to 32 (cuBLAS reads 4096 x 4096 faster at 32 tokens).
    if (const char* mb = std::getenv("HELEXA_MV_BF16"); mb && *mb)
      mv_bf16_ = std::min(std::max(std::atoi(mb), 0), kBf16FragMaxTokens);
    // The same kernel on fp32 x for the float matvec's batches (HELEXA_MV_BF16_F32=0..4
    // tokens) of matrices of HELEXA_MV_BF16_MIN_ROWS rows or more. Off by
    // default: at one token on an H100 it gained 1.8% on 1B bf16 (798.8
    // against 784.9 tok/s) and lost 1.1% on 8B bf16 (170.1 against 172.0),
    // whose q|k|v and gate|up shapes the float matvec reads faster.
    if (const char* mb = std::getenv("HELEXA_MV_BF16_F32"); mb && *mb)
      mv_bf16_f32_ = std::min(std::max(std::atoi(mb), 0), kBf16FragF32Tokens);
    if (const char* mb = std::getenv("HELEXA_MV_BF16_MIN_ROWS"); mb && *mb)
      mv_bf16_min_rows_ = std::max(1, std::atoi(mb));
    // Small batches' int8 activations, quantized once per matvec (HELEXA_XQ=0:
    // by every CTA), and the fragment kernel's prepared x, in one scratch.
    const char* v = std::getenv("HELEXA_XQ");
    const bool xq = !(v && v[0] == '0') && spec_.int8_activations != Int8Mode::Never;
    if (xq || mv_mma_ > 0 || mv_mma_batch_ > 0)
      x_scratch_ = dev_alloc(matvec_x_scratch_bytes(kMatvecMaxTokens, static_cast<int>(widest)), sc);
    // The int8 matvecs' inputs staged by their producers (run_layers:
    // HELEXA_XQ_FUSE=0 turns it off). Not beside the Q4_K fragment kernel at
    // one token, whose prep shares the scratch.
    const char* fz = std::getenv("HELEXA_XQ_FUSE");
    xq_fuse_ = xq && x_scratch_ != nullptr && mv_mma_ == 0 && !(fz && fz[0] == '0');
    if (const char* me = std::getenv("HELEXA_INT8_MIN_ELEMS"); me && *me)
      int8_min_elems_ = std::max<int64_t>(0, std::atoll(me));
  }
  if (wbuf_elems_ > 0) wbuf_ = static_cast<__nv_bfloat16*>(dev_alloc(wbuf_elems_ * 2, sc));
  if (tc_min_ <= kTcMaxTokens) {
    // Split-K partials of the largest small-batch product.
    const int shapes[][2] = {{q_size_, static_cast<int>(h)},
                             {kv_size_, static_cast<int>(h)},
                             {static_cast<int>(h), q_size_},
                             {static_cast<int>(f), static_cast<int>(h)},
                             {static_cast<int>(h), static_cast<int>(f)},
                             {static_cast<int>(V), static_cast<int>(h)}};
    for (const auto& sh : shapes)
      tc_ws_bytes_ = std::max(tc_ws_bytes_, matmul_tc_workspace_bytes(kTcMaxTokens, sh[0], sh[1], tc_opts_));
    if (tc_ws_bytes_ > 0) tc_ws_ = static_cast<float*>(dev_alloc(tc_ws_bytes_, sc));
  }
  // A model without the LM head (a tensor-parallel follower) has no logits,
  // sampler or penalty state.
  const bool head = s.lm_head;
  if (head) {
    logits_ = static_cast<float*>(dev_alloc(LR * V * 4, sc));
    work_logits_ = static_cast<float*>(dev_alloc(LR * V * 4, sc));
  }
  // The decode attention's split count depends on the batch: size the
  // workspace for the largest any batch up to slots_ rows needs.
  const int max_seq = max_blocks_ * s.block_size;
  for (int b = 1; b <= slots_; ++b)
    attn_ws_bytes_ =
        std::max(attn_ws_bytes_, attention_decode_workspace_bytes(b, s.heads, s.kv_heads, s.head_dim, max_seq));
  attn_ws_ = static_cast<float*>(dev_alloc(attn_ws_bytes_, sc));
  rope_table_ = static_cast<float*>(dev_alloc(static_cast<size_t>(n_ctx_) * s.head_dim * 4, sc));
  if (head) {
    sample_ws_bytes_ = sample_batch_workspace_bytes(logit_rows_, s.vocab);
    sample_ws_ = dev_alloc(sample_ws_bytes_, sc);
    d_present_ = static_cast<int32_t*>(dev_alloc(S * V * 4, sc));
    d_counts_ = static_cast<int32_t*>(dev_alloc(S * V * 4, sc));
    d_pen_tokens_ = static_cast<int32_t*>(dev_alloc(pen_cap_ * 4, sc));
    h_pen_tokens_ = static_cast<int32_t*>(host_alloc(pen_cap_ * 4));
  }

  // General step staging: a header for up to slots_ sequences, then the
  // token rows of up to stage_rows_ rows.
  {
    Packer p;
    p.take<int32_t>(S);                                   // decode lengths
    p.take<int32_t>(S);                                   // sampled rows' slots
    p.take<int32_t>(S);                                   // steps
    p.take<SamplingParamsDevice>(S);                           // parameters
    p.take<int32_t>(S);                                   // LM-head rows
    p.take<int32_t>(S * kConstrainDescInts);              // constraint descriptors
    p.take<int32_t>(S * static_cast<size_t>(max_blocks_));  // block tables
    p.take<int32_t>(stage_rows_);                         // tokens
    p.take<int32_t>(stage_rows_);                         // positions
    p.take<int32_t>(stage_rows_);                         // pool positions
    gen_bytes_ = p.off + 16;
  }
  d_gen_ = static_cast<char*>(dev_alloc(gen_bytes_, sc));
  h_gen_ = static_cast<char*>(host_alloc(gen_bytes_));

  // Pure-decode buckets: 1, 2, 4, ... rows, the last one slots_ rows.
  size_t largest = 0;
  for (int rows = 1;; rows *= 2) {
    Bucket b;
    b.rows = std::min(rows, slots_);
    b.bytes = row_layout(nullptr, b.rows, max_blocks_, nullptr, &b.tables_off);
    b.dev = static_cast<char*>(dev_alloc(b.bytes, sc));
    largest = std::max(largest, b.bytes);
    buckets_.push_back(b);
    if (b.rows == slots_) break;
  }
  h_dec_ = static_cast<char*>(host_alloc(largest));

  // Constraint data: room for a mask and a few hundred biased tokens per
  // slot; a step that needs more grows it (reserve_constraints).
  alloc_constraints(S * (static_cast<size_t>(mask_words_) + 2 * 256));
  d_pool_ = static_cast<float*>(dev_alloc(S * h * 4, sc));
  h_pool_ = static_cast<float*>(host_alloc(S * h * 4));

  d_out_ = dev_alloc(StepOutputs::bytes(logit_rows_), sc);
  h_out_ = host_alloc(StepOutputs::bytes(logit_rows_));
  if (head) {
    d_fed_ = static_cast<int32_t*>(dev_alloc(static_cast<size_t>(kMaxDecodeSteps) * S * 4, sc));
    h_fed_ = static_cast<int32_t*>(host_alloc(static_cast<size_t>(kMaxDecodeSteps) * S * 4));
  }
  if (head) h_logits_ = static_cast<float*>(host_alloc(LR * V * 4));
}

size_t GpuModel::row_layout(char* base, int rows, int stride, RowInputs* out, size_t* tables_off) {
  Packer p;
  const size_t n = static_cast<size_t>(rows);
  const size_t tokens = p.take<int32_t>(n), pos = p.take<int32_t>(n), slot_pos = p.take<int32_t>(n);
  const size_t seq_lens = p.take<int32_t>(n), slots = p.take<int32_t>(n), steps = p.take<int32_t>(n);
  const size_t params = p.take<SamplingParamsDevice>(n);
  const size_t cons = p.take<int32_t>(n * kConstrainDescInts);
  const size_t tables = p.take<int32_t>(n * static_cast<size_t>(stride));
  if (out != nullptr && base != nullptr) {
    out->tokens = at<int32_t>(base, tokens);
    out->pos = at<int32_t>(base, pos);
    out->slot_pos = at<int32_t>(base, slot_pos);
    out->seq_lens = at<int32_t>(base, seq_lens);
    out->slots = at<int32_t>(base, slots);
    out->steps = at<int32_t>(base, steps);
    out->params = at<SamplingParamsDevice>(base, params);
    out->cons = at<int32_t>(base, cons);
    out->tables = at<int32_t>(base, tables);
    out->stride = stride;
  }
  if (tables_off != nullptr) *tables_off = tables;
  return p.off;
}

void GpuModel::alloc_kv(WorkerContext& ctx, int num_blocks) {
  const ModelSpec& s = spec_;
  if (num_blocks_ != 0) throw std::invalid_argument("the KV pool is already allocated");
  if (num_blocks < 1) throw std::invalid_argument("num_blocks must be positive");
  if (static_cast<int64_t>(num_blocks) * s.block_size > INT32_MAX)
    throw std::invalid_argument("a KV pool of " + std::to_string(num_blocks) + " blocks of " +
                                std::to_string(s.block_size) + " positions exceeds 2^31 positions");
  const size_t per_pool = static_cast<size_t>(s.kv_heads) * num_blocks * s.block_size * s.head_dim;
  const size_t bytes = per_pool * 2 * s.layers * sizeof(__nv_bfloat16);
  auto* kv = static_cast<__nv_bfloat16*>(dev_alloc(bytes, &kv_bytes_));
  for (int i = 0; i < s.layers; ++i) {
    layers_[i].k_pool = kv + per_pool * (2 * i);
    layers_[i].v_pool = kv + per_pool * (2 * i + 1);
  }
  HX_CUDA_CHECK(cudaMemsetAsync(kv, 0, bytes, ctx.compute_stream()));
  num_blocks_ = num_blocks;
  pool_cap_ = num_blocks * s.block_size;
}

std::map<std::string, int64_t> GpuModel::memory() const {
  std::map<std::string, int64_t> m;
  m["weights_bytes"] = static_cast<int64_t>(weight_bytes_);
  m["kv_cache_bytes"] = static_cast<int64_t>(kv_bytes_);
  m["scratch_bytes"] = static_cast<int64_t>(scratch_bytes_);
  m["total_bytes"] = static_cast<int64_t>(device_bytes());
  m["n_ctx"] = n_ctx_;
  m["prefill_chunk"] = chunk_;
  m["kv_blocks"] = num_blocks_;
  m["kv_block_size"] = spec_.block_size;
  m["kv_pool_positions"] = pool_cap_;
  m["max_num_seqs"] = spec_.max_num_seqs;
  m["graphs"] = static_cast<int64_t>(graphs_.size());
  m["graph_captures"] = graph_captures_;
  m["graph_replays"] = graph_replays_;
  int64_t failed = 0;
  for (const auto& kv : graph_failed_) failed += kv.second ? 1 : 0;
  m["graph_failures"] = failed;
  m["use_graphs"] = use_graphs_ ? 1 : 0;
  m["tc_min_tokens"] = tc_min_;
  m["bf16_frag_tokens"] = mv_bf16_;
  m["q4k_frag_batch_tokens"] = mv_mma_batch_;
  m["int8_stage_fused"] = xq_fuse_ ? 1 : 0;
  if (tp_) {
    m["tp_rank"] = tp_->rank();
    m["tp_size"] = tp_->nranks();
    m["tp_peer_linked"] = tp_->linked() ? 1 : 0;
    m["tp_peer_max_bytes"] = tp_->peer_max_bytes();
  }
  return m;
}

void GpuModel::init_tables(WorkerContext& ctx) {
  cudaStream_t st = ctx.compute_stream();
  const size_t V = static_cast<size_t>(spec_.vocab);
  // The decode attention's workspace starts zeroed (every launch writes the
  // partial states it reads; zeroing keeps unused slots deterministic).
  HX_CUDA_CHECK(cudaMemsetAsync(attn_ws_, 0, attn_ws_bytes_, st));
  // cos/sin for every position of a sequence, once: the per-layer rope
  // becomes a table lookup instead of float64 sincos per token and layer.
  rope_table_launch(inv_freq_, rope_table_, n_ctx_, spec_.head_dim, st);
  if (spec_.lm_head) {
    HX_CUDA_CHECK(cudaMemsetAsync(d_present_, 0, static_cast<size_t>(slots_) * V * 4, st));
    HX_CUDA_CHECK(cudaMemsetAsync(d_counts_, 0, static_cast<size_t>(slots_) * V * 4, st));
  }
  for (const Bucket& b : buckets_) HX_CUDA_CHECK(cudaMemsetAsync(b.dev, 0, b.bytes, st));
  std::memset(h_dec_, 0, buckets_.back().bytes);
}

void GpuModel::set_graphs(bool enabled) { use_graphs_ = enabled; }

bool GpuModel::moe_layer(int i) const {
  const std::vector<int>& dense = spec_.mlp_only_layers;
  return spec_.arch == "qwen3moe" && std::find(dense.begin(), dense.end(), i) == dense.end();
}

// ---------------------------------------------------------------------------
// Inputs

void GpuModel::validate(const std::vector<SeqInput>& seqs, int ahead) const {
  if (num_blocks_ == 0) throw std::invalid_argument("the KV pool is not allocated yet");
  if (seqs.empty()) throw std::invalid_argument("a step needs at least one sequence");
  if (static_cast<int>(seqs.size()) > slots_)
    throw std::invalid_argument("a step holds at most " + std::to_string(slots_) +
                                " sequences (max_num_seqs + 1), got " + std::to_string(seqs.size()));
  std::vector<char> seen(static_cast<size_t>(slots_), 0);
  size_t cons_words = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SeqInput& s = seqs[i];
    const std::string who = "sequence " + std::to_string(i) + ": ";
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    if (n == 0) throw std::invalid_argument(who + "tokens must not be empty");
    if (s.start_pos < 0) throw std::invalid_argument(who + "start_pos must be non-negative");
    const int64_t end = s.start_pos + n + ahead;
    if (end > n_ctx_)
      throw std::invalid_argument(who + "positions up to " + std::to_string(end) + " exceed the context of " +
                                  std::to_string(n_ctx_) + " tokens");
    for (int32_t t : s.tokens)
      if (t < 0 || t >= spec_.vocab)
        throw std::invalid_argument(who + "token id " + std::to_string(t) + " is outside the vocabulary (size " +
                                    std::to_string(spec_.vocab) + ")");
    if (s.slot < 0 || s.slot >= slots_)
      throw std::invalid_argument(who + "slot " + std::to_string(s.slot) + " is outside [0, " + std::to_string(slots_) +
                                  ")");
    if (seen[s.slot])
      throw std::invalid_argument(who + "slot " + std::to_string(s.slot) + " is used twice in one step");
    seen[s.slot] = 1;
    const int need = blocks_for(static_cast<int>(end));
    if (static_cast<int64_t>(s.block_table.size()) < need)
      throw std::invalid_argument(who + "the block table holds " + std::to_string(s.block_table.size()) +
                                  " blocks; positions up to " + std::to_string(end) + " need " + std::to_string(need));
    for (int j = 0; j < need; ++j)
      if (s.block_table[j] < 0 || s.block_table[j] >= num_blocks_)
        throw std::invalid_argument(who + "block id " + std::to_string(s.block_table[j]) + " is outside the pool of " +
                                    std::to_string(num_blocks_) + " blocks");
    if (s.sample && s.sampling.logprobs && (s.sampling.top_logprobs < 0 || s.sampling.top_logprobs > kMaxTopLogprobs))
      throw std::invalid_argument(who + "top_logprobs must be in [0, " + std::to_string(kMaxTopLogprobs) + "]");
    if (s.sample) cons_words += validate_constraints(s, who);
  }
  // Offsets into the constraint data are int32.
  if (cons_words > static_cast<size_t>(INT32_MAX))
    throw std::invalid_argument("the step's token masks and logit_bias lists hold " + std::to_string(cons_words) +
                                " words, more than 2^31 - 1");
}

size_t GpuModel::validate_constraints(const SeqInput& s, const std::string& who) const {
  size_t words = 0;
  if (s.late != nullptr) {
    if (!s.allowed.empty()) throw std::invalid_argument(who + "a token mask cannot be both given and late");
    if (s.late_row < 0 || s.late_row >= s.late->rows())
      throw std::invalid_argument(who + "late mask row " + std::to_string(s.late_row) + " is outside [0, " +
                                  std::to_string(s.late->rows()) + ")");
    if (s.late->words() < mask_words_)
      throw std::invalid_argument(who + "the late token masks hold " + std::to_string(s.late->words()) +
                                  " words a row; a vocabulary of " + std::to_string(spec_.vocab) + " needs " +
                                  std::to_string(mask_words_));
    words += mask_words_;
  }
  if (!s.allowed.empty()) {
    if (s.allowed.size() < static_cast<size_t>(mask_words_))
      throw std::invalid_argument(who + "the token mask holds " + std::to_string(s.allowed.size()) +
                                  " words; a vocabulary of " + std::to_string(spec_.vocab) + " needs " +
                                  std::to_string(mask_words_));
    words += mask_words_;
  }
  const size_t nb = s.bias_ids.size();
  if (s.bias_values.size() != nb)
    throw std::invalid_argument(who + "logit_bias has " + std::to_string(nb) + " token ids and " +
                                std::to_string(s.bias_values.size()) + " values");
  if (nb == 0) return words;
  for (size_t j = 0; j < nb; ++j) {
    if (s.bias_ids[j] < 0 || s.bias_ids[j] >= spec_.vocab)
      throw std::invalid_argument(who + "logit_bias token id " + std::to_string(s.bias_ids[j]) +
                                  " is outside the vocabulary (size " + std::to_string(spec_.vocab) + ")");
    if (!std::isfinite(s.bias_values[j]))
      throw std::invalid_argument(who + "logit_bias of token " + std::to_string(s.bias_ids[j]) + " is not finite");
  }
  // The device adds each entry on its own: a repeated id would race.
  std::vector<int32_t> ids(s.bias_ids);
  std::sort(ids.begin(), ids.end());
  const auto dup = std::adjacent_find(ids.begin(), ids.end());
  if (dup != ids.end()) throw std::invalid_argument(who + "logit_bias names token " + std::to_string(*dup) + " twice");
  return words + 2 * nb;
}

int GpuModel::mode_of(const std::vector<SeqInput>& seqs) {
  // One tail serves every row of a batch: the union of the rows' needs.
  // A row without penalties passes the penalty kernel unchanged (factor 1,
  // zero offsets), a greedy row gives the same token through the sampler.
  int m = 0;
  for (const SeqInput& s : seqs) {
    if (!s.sample) continue;
    if (s.sampling.temperature > 0.f) m |= kSampled;
    if (s.penalties.active) m |= kPenalties;
    if (s.sampling.logprobs) m |= kLogprobs;
    if (s.masked() || !s.bias_ids.empty()) m |= kConstrained;
  }
  return m;
}

void GpuModel::alloc_constraints(size_t words) {
  // Frees the old buffers (if any) and forgets them, so a failed allocation
  // leaves none behind and a later step tries again.
  if (d_cons_ != nullptr) {
    dev_buffers_.erase(std::find(dev_buffers_.begin(), dev_buffers_.end(), static_cast<void*>(d_cons_)));
    cudaFree(d_cons_);
    scratch_bytes_ -= cons_dev_bytes_;
  }
  if (h_cons_ != nullptr) {
    host_buffers_.erase(std::find(host_buffers_.begin(), host_buffers_.end(), static_cast<void*>(h_cons_)));
    cudaFreeHost(h_cons_);
  }
  d_cons_ = nullptr;
  h_cons_ = nullptr;
  cons_cap_ = 0;
  cons_dev_bytes_ = 0;
  const size_t before = scratch_bytes_;
  d_cons_ = static_cast<int32_t*>(dev_alloc(words * 4, &scratch_bytes_));
  cons_dev_bytes_ = scratch_bytes_ - before;
  h_cons_ = static_cast<int32_t*>(host_alloc(words * 4));
  cons_cap_ = words;
}

void GpuModel::reserve_constraints(WorkerContext& ctx, size_t words) {
  if (words <= cons_cap_) return;
  // Nothing queued may still read the old buffers, and graphs recorded with
  // them would read freed memory.
  HX_CUDA_CHECK(cudaStreamSynchronize(ctx.compute_stream()));
  for (auto it = graphs_.begin(); it != graphs_.end();) {
    if ((it->first % kModes) & kConstrained) {
      cudaGraphExecDestroy(it->second);
      it = graphs_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = graph_failed_.begin(); it != graph_failed_.end();)
    it = ((it->first % kModes) & kConstrained) ? graph_failed_.erase(it) : std::next(it);
  alloc_constraints(std::max(words, 2 * cons_cap_));
}

void GpuModel::stage_constraints(WorkerContext& ctx, const std::vector<const SeqInput*>& rows, int32_t* desc) {
  size_t words = 0;
  for (const SeqInput* s : rows)
    if (s != nullptr) words += (s->masked() ? mask_words_ : 0) + 2 * s->bias_ids.size();
  reserve_constraints(ctx, words);
  late_rows_.clear();
  size_t used = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    int32_t* d = desc + kConstrainDescInts * r;
    d[0] = -1;
    d[1] = 0;
    d[2] = 0;
    const SeqInput* s = rows[r];
    if (s == nullptr) continue;
    if (s->masked()) {
      if (s->late != nullptr)
        late_rows_.emplace_back(s, used);
      else
        std::memcpy(h_cons_ + used, s->allowed.data(), static_cast<size_t>(mask_words_) * 4);
      d[0] = static_cast<int32_t>(used);
      used += mask_words_;
    }
    const size_t nb = s->bias_ids.size();
    if (nb > 0) {
      std::memcpy(h_cons_ + used, s->bias_ids.data(), nb * 4);
      std::memcpy(h_cons_ + used + nb, s->bias_values.data(), nb * 4);
      d[1] = static_cast<int32_t>(used);
      d[2] = static_cast<int32_t>(nb);
      used += 2 * nb;
    }
  }
  cons_used_ = used;
  if (used > 0 && late_rows_.empty())
    HX_CUDA_CHECK(cudaMemcpyAsync(d_cons_, h_cons_, used * 4, cudaMemcpyHostToDevice, ctx.compute_stream()));
}

void GpuModel::finish_constraints(WorkerContext& ctx) {
  if (late_rows_.empty()) return;
  const LateMasks* waited = nullptr;
  for (const auto& [s, off] : late_rows_) {
    if (s->late.get() != waited) {
      s->late->wait(std::chrono::milliseconds(kLateMaskWaitMs));
      waited = s->late.get();
    }
    std::memcpy(h_cons_ + off, s->late->row(s->late_row), static_cast<size_t>(mask_words_) * 4);
  }
  late_rows_.clear();
  HX_CUDA_CHECK(cudaMemcpyAsync(d_cons_, h_cons_, cons_used_ * 4, cudaMemcpyHostToDevice, ctx.compute_stream()));
}

void GpuModel::fill_params(SamplingParamsDevice* p, const StepSampling& sampling) {
  p->temperature = sampling.temperature;
  p->top_k = sampling.top_k;
  p->top_p = sampling.top_p;
  p->min_p = sampling.min_p;
  p->repetition_penalty = sampling.repetition_penalty;
  p->presence_penalty = sampling.presence_penalty;
  p->frequency_penalty = sampling.frequency_penalty;
  p->reserved = 0;
  p->seed = sampling.seed;
}

void GpuModel::apply_penalty_updates(WorkerContext& ctx, const std::vector<SeqInput>& seqs) {
  cudaStream_t st = ctx.compute_stream();
  const size_t V = static_cast<size_t>(spec_.vocab);
  struct Update {
    int slot;
    size_t off;
    int n;
    bool counts;
  };
  std::vector<Update> staged_ops;
  size_t staged = 0;
  bool in_flight = false;  // a copy out of the pinned staging may still run
  auto flush = [&]() {
    if (staged == 0) return;
    HX_CUDA_CHECK(cudaMemcpyAsync(d_pen_tokens_, h_pen_tokens_, staged * 4, cudaMemcpyHostToDevice, st));
    for (const Update& u : staged_ops)
      penalty_update_launch(d_pen_tokens_ + u.off, u.n, d_present_ + u.slot * V,
                            u.counts ? d_counts_ + u.slot * V : nullptr, spec_.vocab, st);
    staged_ops.clear();
    staged = 0;
    in_flight = true;
  };
  auto push = [&](const std::vector<int32_t>& toks, int slot, bool counts) {
    for (size_t a = 0; a < toks.size();) {
      if (staged == pen_cap_) flush();
      if (in_flight) {
        HX_CUDA_CHECK(cudaStreamSynchronize(st));
        in_flight = false;
      }
      const size_t n = std::min(toks.size() - a, pen_cap_ - staged);
      std::memcpy(h_pen_tokens_ + staged, toks.data() + a, n * 4);
      staged_ops.push_back({slot, staged, static_cast<int>(n), counts});
      staged += n;
      a += n;
    }
  };
  for (const SeqInput& s : seqs) {
    if (!s.sample || !s.penalties.active) continue;
    if (s.penalties.reset) {
      // Ordered before this slot's own updates, which launch at a later flush.
      HX_CUDA_CHECK(cudaMemsetAsync(d_present_ + s.slot * V, 0, V * 4, st));
      HX_CUDA_CHECK(cudaMemsetAsync(d_counts_ + s.slot * V, 0, V * 4, st));
    }
    push(s.penalties.context, s.slot, false);
    push(s.penalties.generated, s.slot, true);
  }
  flush();
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

MatvecOptions GpuModel::matvec_options(const LinearWeight& w, bool accumulate, bool x_staged) const {
  MatvecOptions o;
  o.accumulate = accumulate;
  o.int8_activations = int8_for(w.type, w.n_out, w.k);
  o.precise = true;
  o.static_weights = true;  // weights are written once, at load
  o.x_scratch = x_scratch_;
  o.x_staged = x_staged;
  o.mma_tokens = w.n_out >= mv_min_rows_ ? mv_mma_ : 0;
  o.mma_local_prep = mv_local_;
  return o;
}

void GpuModel::linear(WorkerContext& ctx, const LinearWeight& w, const float* x_f32, const __nv_bfloat16* x_bf16,
                      float* y, int n, const float* bias, bool accumulate, bool small, bool x_staged) {
  cudaStream_t st = ctx.compute_stream();
  if (small && bf16_f32_for(n, w)) {
    matvec_bf16_launch(static_cast<const __nv_bfloat16*>(w.data), x_f32, y, w.n_out, w.k, n, bias, accumulate, true,
                       w.n_out, w.n_out, st);
    return;
  }
  if (small) {
    matvec_launch(w.type, w.data, x_f32, y, w.n_out, w.k, n, bias, matvec_options(w, accumulate, x_staged), st);
    return;
  }
  if (q4k_frag_for(n, w)) {
    matvec_q4k_frag_launch(w.data, x_bf16, y, w.n_out, w.k, n, bias, accumulate, true, x_scratch_, mv_local_, st);
    return;
  }
  if (bf16_frag_for(n, w)) {
    matvec_bf16_launch(static_cast<const __nv_bfloat16*>(w.data), x_bf16, y, w.n_out, w.k, n, bias, accumulate, true,
                       w.n_out, w.n_out, st);
    return;
  }
  if (tc_for(n, w.type)) {
    matmul_tc_launch(w.type, w.data, x_bf16, y, w.n_out, w.k, n, bias, accumulate, tc_ws_, tc_ws_bytes_, tc_opts_, st);
    return;
  }
  const __nv_bfloat16* wb = nullptr;
  dequantize_for_gemm(ctx, w, &wb);
  gemm_bf16_xwT(ctx.cublas(), x_bf16, wb, y, n, w.n_out, w.k, accumulate, st);
  if (bias != nullptr) add_bias_rows_launch(y, bias, n, w.n_out, st);
}

void GpuModel::run_layers(WorkerContext& ctx, const PassLayout& pl) {
  cudaStream_t st = ctx.compute_stream();
  const ModelSpec& s = spec_;
  const int n = pl.n;
  const int h = s.hidden, d = s.head_dim, nq = s.heads, nk = s.kv_heads, f = s.intermediate;
  const float eps = s.eps;
  const bool small = small_for(n);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // Tensor parallelism: rank 0 adds its attn_output / ffn_down product to x,
  // the others overwrite x with theirs; the sum over the ranks is then
  // x + every partial product, on every rank.
  const bool accumulate = tp_ == nullptr || tp_->rank() == 0;
  const size_t hidden_count = static_cast<size_t>(n) * h;

  float* q = qkv_;
  float* k = q + static_cast<size_t>(n) * q_size_;
  float* v = k + static_cast<size_t>(n) * kv_size_;
  float* gate = gu_;
  float* up = gu_ != nullptr ? gu_ + static_cast<size_t>(n) * f : nullptr;  // null: every layer is MoE

  embedding_launch(token_embd_.type, token_embd_.data, pl.ids, x_, n, h, s.vocab, st);

  // Small batches' int8 matvecs read x's two-term stage from x_scratch_.
  // Where x's producer (a norm, the SwiGLU, the decode attention) can write
  // that stage, it does, and the matvecs of x skip their quantize launch:
  // stage_for(consumers) says whether any of them takes the int8 path.
  auto stage_for = [&](std::initializer_list<const LinearWeight*> ws) {
    if (!small || !xq_fuse_) return false;
    for (const LinearWeight* w : ws)
      if (w->data != nullptr && int8_for(w->type, w->n_out, w->k)) return true;
    return false;
  };
  uint8_t* const stage = static_cast<uint8_t*>(x_scratch_);
  const bool decode_only = pl.n_dec == n && pl.segs.empty();

  for (const LayerWeights& L : layers_) {
    const bool st_attn = h % 32 == 0 && (n == 1 && L.qkv_fused  ? stage_for({&L.qkv})
                                         : n == 1 && L.qk_fused ? stage_for({&L.qk, &L.v})
                                                                : stage_for({&L.q, &L.k, &L.v}));
    add_rms_norm_launch(x_, nullptr, L.attn_norm, eps, small ? xn_ : nullptr, small ? nullptr : xb_, n, h, st,
                        st_attn ? stage : nullptr);

    const float* bq = L.b_qkv;
    const float* bk = L.b_qkv ? L.b_qkv + q_size_ : nullptr;
    const float* bv = L.b_qkv ? L.b_qkv + q_size_ + kv_size_ : nullptr;
    if (n == 1 && L.qkv_fused) {
      // q, k and v blocks are adjacent for one token: one launch fills all three.
      linear(ctx, L.qkv, xn_, xb_, q, 1, L.b_qkv, false, true, st_attn);
    } else if (L.qkv_fused && bf16_frag_for(n, L.qkv)) {
      // q, k and v in one launch, each into its own [n, rows] run of qkv_.
      matvec_bf16_launch(static_cast<const __nv_bfloat16*>(L.qkv.data), xb_, q, qkv_size_, h, n, L.b_qkv, false, true,
                         q_size_, q_size_ + kv_size_, st);
    } else if (L.qkv_fused && tc_for(n, L.qkv.type)) {
      linear(ctx, L.qkv.rows(0, q_size_), xn_, xb_, q, n, bq, false, false);
      linear(ctx, L.qkv.rows(q_size_, kv_size_), xn_, xb_, k, n, bk, false, false);
      linear(ctx, L.qkv.rows(q_size_ + kv_size_, kv_size_), xn_, xb_, v, n, bv, false, false);
    } else if (!small && L.qkv_fused) {
      const __nv_bfloat16* wb = nullptr;
      dequantize_for_gemm(ctx, L.qkv, &wb);
      gemm_bf16_xwT(ctx.cublas(), xb_, wb, q, n, q_size_, h, false, st);
      gemm_bf16_xwT(ctx.cublas(), xb_, wb + static_cast<size_t>(q_size_) * h, k, n, kv_size_, h, false, st);
      gemm_bf16_xwT(ctx.cublas(), xb_, wb + static_cast<size_t>(q_size_ + kv_size_) * h, v, n, kv_size_, h, false, st);
      if (bq != nullptr) {
        add_bias_rows_launch(q, bq, n, q_size_, st);
        add_bias_rows_launch(k, bk, n, kv_size_, st);
        add_bias_rows_launch(v, bv, n, kv_size_, st);
      }
    } else if (n == 1 && L.qk_fused) {
      // q and k blocks (and their biases) are adjacent for one token.
      matvec_launch(L.qk.type, L.qk.data, xn_, q, q_size_ + kv_size_, h, 1, L.b_qkv,
                    matvec_options(L.qk, false, st_attn), st);
      linear(ctx, L.v, xn_, xb_, v, n, bv, false, small, st_attn);
    } else {
      linear(ctx, L.q, xn_, xb_, q, n, bq, false, small, st_attn);
      linear(ctx, L.k, xn_, xb_, k, n, bk, false, small, st_attn);
      linear(ctx, L.v, xn_, xb_, v, n, bv, false, small, st_attn);
    }

    // qwen3's q/k norm, the rotation and the pool append in one launch.
    rope_kv_append_launch(q, k, v, L.k_pool, L.v_pool, pl.pos, pl.slot_pos, rope_table_, n_ctx_, inv_freq_, L.q_norm,
                          L.q_norm != nullptr ? L.k_norm : nullptr, eps, n, nq, nk, d, pool_cap_, s.rope_style, st);
    // attn_ is all decode rows' output: the attention can stage it for o.
    const bool st_o = decode_only && d % 32 == 0 && stage_for({&L.o});
    if (pl.n_dec > 0)
      attention_decode_launch(q, L.k_pool, L.v_pool, pl.dec_lens, pl.dec_tables, pl.dec_stride, s.block_size, attn_,
                              attn_ws_, attn_ws_bytes_, pl.n_dec, nq, nk, d, pool_cap_, scale, st,
                              st_o ? stage : nullptr);
    for (const PrefillSegment& g : pl.segs)
      attention_prefill_launch(q + static_cast<size_t>(g.row0) * q_size_, L.k_pool, L.v_pool, g.table, g.table_len,
                               s.block_size, g.start_pos, g.count, attn_ + static_cast<size_t>(g.row0) * q_size_, nq,
                               nk, d, pool_cap_, scale, st);

    if (!small) f32_to_bf16_launch(attn_, xb_, static_cast<int64_t>(n) * q_size_, st);
    linear(ctx, L.o, attn_, xb_, x_, n, L.b_o, accumulate, small, st_o);
    if (tp_) tp_->all_reduce(ctx, x_, hidden_count);

    // A MoE layer reads its input in float32 at every batch size (router and expert products).
    const bool f32_in = small || L.moe;
    const bool st_ffn =
        !L.moe && h % 32 == 0 && (n == 1 && L.gate_up_fused ? stage_for({&L.gate_up}) : stage_for({&L.gate, &L.up}));
    add_rms_norm_launch(x_, nullptr, L.ffn_norm, eps, f32_in ? xn_ : nullptr, f32_in ? nullptr : xb_, n, h, st,
                        st_ffn ? stage : nullptr);
    if (L.moe) {
      moe_ffn(ctx, L, n);
      continue;
    }
    if (n == 1 && L.gate_up_fused) {
      linear(ctx, L.gate_up, xn_, xb_, gate, 1, nullptr, false, true, st_ffn);
    } else if (L.gate_up_fused && bf16_frag_for(n, L.gate_up)) {
      matvec_bf16_launch(static_cast<const __nv_bfloat16*>(L.gate_up.data), xb_, gate, 2 * f, h, n, nullptr, false,
                         true, f, 2 * f, st);
    } else if (L.gate_up_fused && tc_for(n, L.gate_up.type)) {
      linear(ctx, L.gate_up.rows(0, f), xn_, xb_, gate, n, nullptr, false, false);
      linear(ctx, L.gate_up.rows(f, f), xn_, xb_, up, n, nullptr, false, false);
    } else if (!small && L.gate_up_fused) {
      const __nv_bfloat16* wb = nullptr;
      dequantize_for_gemm(ctx, L.gate_up, &wb);
      gemm_bf16_xwT(ctx.cublas(), xb_, wb, gate, n, f, h, false, st);
      gemm_bf16_xwT(ctx.cublas(), xb_, wb + static_cast<size_t>(f) * h, up, n, f, h, false, st);
    } else {
      linear(ctx, L.gate, xn_, xb_, gate, n, nullptr, false, small, st_ffn);
      linear(ctx, L.up, xn_, xb_, up, n, nullptr, false, small, st_ffn);
    }
    const bool st_down = f % 32 == 0 && stage_for({&L.down});
    swiglu_launch(gate, up, small ? act_ : nullptr, small ? nullptr : xb_, static_cast<int64_t>(n) * f, st,
                  st_down ? stage : nullptr);
    linear(ctx, L.down, act_, xb_, x_, n, nullptr, accumulate, small, st_down);
    if (tp_) tp_->all_reduce(ctx, x_, hidden_count);
  }
}

void GpuModel::moe_ffn(WorkerContext& ctx, const LayerWeights& L, int n) {
  cudaStream_t st = ctx.compute_stream();
  const ModelSpec& s = spec_;
  const int h = s.hidden, E = s.num_experts, K = s.experts_per_tok, fe = s.expert_ffn;
  const int P = n * K;  // (row, expert) pairs
  const bool small = n <= kMatvecMaxTokens;

  // Router logits in float32 at every batch size: the choice of experts is
  // discrete and must follow the float32 reference.
  if (small)
    matvec_launch(GgmlType::F32, L.router.data, xn_, router_logits_, E, h, n, nullptr, matvec_options(L.router, false),
                  st);
  else
    gemm_f32_xwT(ctx.cublas(), xn_, static_cast<const float*>(L.router.data), router_logits_, n, E, h, st);
  moe_route_launch(router_logits_, n, E, K, s.norm_topk_prob, moe_ids_, moe_w_, st);

  // Small batches: one launch per product over every (row, expert) pair,
  // rows in pair order. Larger ones: pairs sorted by expert (slots), rows in
  // slot order, each expert's weights read once for all of its rows.
  const int groups = std::min(E, P);
  const bool pairs = n <= moe_pairs_max_;
  const bool tc = !pairs && moe_tc_;
  // The tensor-core groups take tiles of the rows an expert is expected to
  // hold (P / groups), cut from each expert's rows by the alignment.
  const int tile_rows = moe_tile_rows(P / groups);
  const int max_tiles = moe_max_tiles(P, E, tile_rows);
  auto product = [&](const ExpertWeight& w, const float* x, int x_div, float* y) {
    if (pairs)
      matvec_expert_pairs_launch(w.type, w.data, w.stride, E, moe_ids_, x, x_div, y, w.n_out, w.k, P, st);
    else if (tc)  // x is exp_xb_, the same rows in bf16
      matmul_tc_expert_groups_launch(w.type, w.data, w.stride, moe_tiles_, moe_n_tiles_, max_tiles, tile_rows, exp_xb_,
                                     y, w.n_out, w.k, tc_opts_, st);
    else
      matvec_expert_groups_launch(w.type, w.data, w.stride, E, moe_offsets_, moe_active_, moe_n_active_, groups, x, y,
                                  w.n_out, w.k, st);
  };
  // Fused pairs: the gate|up launch writes the SwiGLU, and the down launch
  // adds each token's weighted expert rows to the residual (its first weight
  // loads overlap the gate|up tail: the routing is older than that).
  const bool fuse = pairs && moe_fuse_;
  const float* x_in = xn_;
  int x_div = K;
  if (!pairs) {
    moe_align_launch(moe_ids_, P, E, K, moe_offsets_, moe_active_, moe_n_active_, moe_pair_slot_, moe_slot_token_,
                     tile_rows, tc ? moe_tiles_ : nullptr, moe_n_tiles_, st);
    constexpr int kGatherRows = 65535;  // the gather's grid rows
    for (int r = 0; r < P; r += kGatherRows) {
      const int m = std::min(kGatherRows, P - r);
      if (tc)  // the tensor-core groups read bf16 rows: gathered and rounded in one pass
        gather_rows_bf16_launch(xn_, moe_slot_token_ + r, m, h, exp_xb_ + static_cast<size_t>(r) * h, st);
      else
        gather_rows_launch(xn_, moe_slot_token_ + r, m, h, exp_xy_ + static_cast<size_t>(r) * h, st);
    }
    x_in = exp_xy_;
    x_div = 1;
  }
  // The SwiGLU writes the down product's input: float32, or bf16 for the
  // tensor-core groups (after the gate/up products have read exp_xb_).
  const size_t pf = static_cast<size_t>(P) * fe;
  float* act_f32 = tc ? nullptr : exp_act_;
  __nv_bfloat16* act_bf16 = tc ? exp_xb_ : nullptr;
  if (L.exp_gate_up_fused && fuse) {
    const ExpertWeight& w = L.exp_gate_up;
    matvec_expert_pairs_glu_launch(w.type, w.data, w.stride, E, moe_ids_, x_in, x_div, exp_act_, fe, h, P, st);
  } else if (L.exp_gate_up_fused) {
    product(L.exp_gate_up, x_in, x_div, exp_gu_);  // [P, 2 fe]: gate | up per row
    swiglu_rows_launch(exp_gu_, exp_gu_ + fe, 2 * static_cast<int64_t>(fe), act_f32, act_bf16, P, fe, st);
  } else {
    product(L.exp_gate, x_in, x_div, exp_gu_);  // [P, fe]
    product(L.exp_up, x_in, x_div, exp_gu_ + pf);  // [P, fe]
    swiglu_launch(exp_gu_, exp_gu_ + pf, act_f32, act_bf16, static_cast<int64_t>(pf), st);
  }
  const ExpertWeight& d = L.exp_down;
  if (fuse) {
    matvec_expert_combine_launch(d.type, d.data, d.stride, E, moe_ids_, moe_w_, K, exp_act_, x_, d.n_out, d.k, n, true,
                                 st);
  } else {
    product(d, exp_act_, 1, exp_xy_);  // [P, h]
    moe_combine_launch(x_, exp_xy_, moe_w_, pairs ? nullptr : moe_pair_slot_, n, K, h, st);
  }
}

void GpuModel::lm_head(WorkerContext& ctx, const float* x, int count, float* logits) {
  cudaStream_t st = ctx.compute_stream();
  const int h = spec_.hidden, V = spec_.vocab;
  float* rows = const_cast<float*>(x);  // read only: the norm writes its input back only with a delta
  const bool bf16 = output_.type == GgmlType::BF16;
  // A quantized LM head is read once per group of kMatvecMaxTokens rows by
  // the matvec, or dequantized once (about 4x its stored bytes of traffic)
  // for a GEMM: up to 4 groups the matvec moves less.
  if (tc_for(count, output_.type)) {
    add_rms_norm_launch(rows, nullptr, output_norm_, spec_.eps, nullptr, xb_, count, h, st);
    matmul_tc_launch(output_.type, output_.data, xb_, logits, V, h, count, nullptr, false, tc_ws_, tc_ws_bytes_,
                     tc_opts_, st);
    return;
  }
  if (bf16_frag_for(count, output_)) {
    add_rms_norm_launch(rows, nullptr, output_norm_, spec_.eps, nullptr, xb_, count, h, st);
    matvec_bf16_launch(static_cast<const __nv_bfloat16*>(output_.data), xb_, logits, V, h, count, nullptr, false, true,
                       V, V, st);
    return;
  }
  if (count <= kMatvecMaxTokens || (!bf16 && count <= 4 * kMatvecMaxTokens)) {
    // One group of rows: the norm stages them for an int8 head (run_layers).
    const bool staged =
        count <= kMatvecMaxTokens && xq_fuse_ && h % 32 == 0 && int8_for(output_.type, output_.n_out, output_.k);
    add_rms_norm_launch(rows, nullptr, output_norm_, spec_.eps, xn_, nullptr, count, h, st,
                        staged ? static_cast<uint8_t*>(x_scratch_) : nullptr);
    for (int g = 0; g < count; g += kMatvecMaxTokens) {
      const int ng = std::min(kMatvecMaxTokens, count - g);
      // (The float matvec reads a bf16 head of 128256 rows faster than the
      // fragment kernel at one token: 331 against 343 us, 8B shape, H100.)
      matvec_launch(output_.type, output_.data, xn_ + static_cast<size_t>(g) * h, logits + static_cast<size_t>(g) * V,
                    V, h, ng, nullptr, matvec_options(output_, false, staged), st);
    }
    return;
  }
  add_rms_norm_launch(rows, nullptr, output_norm_, spec_.eps, nullptr, xb_, count, h, st);
  if (bf16) {
    gemm_bf16_xwT(ctx.cublas(), xb_, static_cast<const __nv_bfloat16*>(output_.data), logits, count, V, h, false, st);
    return;
  }
  const int slice = static_cast<int>(std::min<size_t>(static_cast<size_t>(V), wbuf_elems_ / h));
  for (int r0 = 0; r0 < V; r0 += slice) {
    const int nr = std::min(slice, V - r0);
    const LinearWeight part = output_.rows(r0, nr);
    dequantize_launch(part.type, part.data, wbuf_, nr, h, st);
    gemm_bf16_xwT(ctx.cublas(), xb_, wbuf_, logits + r0, count, nr, h, false, st, V);
  }
}

void GpuModel::sample_rows(WorkerContext& ctx, int rows, int mode, const int32_t* slots, const int32_t* steps,
                           const SamplingParamsDevice* params, const int32_t* cons) {
  cudaStream_t st = ctx.compute_stream();
  const int V = spec_.vocab;
  const StepOutputs o = StepOutputs::over(d_out_, logit_rows_);
  const float* src = logits_;
  if (mode & kConstrained) {
    // params.py 1a-1b into the work rows; logprobs below still read the raw logits.
    constrain_batch_launch(logits_, work_logits_, rows, V, cons, d_cons_, st);
    src = work_logits_;
  }
  if (mode & kPenalties) {
    // Each row's slot is read from device memory, so a graph replays for any slots.
    penalties_batch_launch(src, work_logits_, rows, V, params, slots, d_present_, d_counts_, slots_, st);
    src = work_logits_;
  }
  if (mode & kSampled)
    sample_batch_launch(src, rows, V, params, steps, o.token, sample_ws_, sample_ws_bytes_, st);
  else  // greedy: the sampler's workspace holds the argmax's per-slice bests
    argmax_batch_launch(src, rows, V, o.token, st, sample_ws_, sample_ws_bytes_);
  if (mode & kLogprobs)
    logprobs_batch_launch(logits_, rows, V, std::min(kMaxTopLogprobs, V), o.token, o.logprob, o.top_ids, o.top_lp, st);
}

void GpuModel::decode_body(WorkerContext& ctx, const Bucket& b, int mode) {
  RowInputs in;
  row_layout(b.dev, b.rows, max_blocks_, &in, nullptr);
  PassLayout pl;
  pl.ids = in.tokens;
  pl.pos = in.pos;
  pl.slot_pos = in.slot_pos;
  pl.n = b.rows;
  pl.n_dec = b.rows;
  pl.dec_lens = in.seq_lens;
  pl.dec_tables = in.tables;
  pl.dec_stride = max_blocks_;
  run_layers(ctx, pl);
  if (!spec_.lm_head) return;
  lm_head(ctx, x_, b.rows, logits_);
  if (!(mode & kForwardOnly)) sample_rows(ctx, b.rows, mode, in.slots, in.steps, in.params, in.cons);
}

int32_t GpuModel::checked_token(int32_t token) const {
  if (token < 0 || token >= spec_.vocab)
    throw std::runtime_error("the device sampler returned token id " + std::to_string(token) +
                             " outside the vocabulary");
  return token;
}

std::vector<StepResult> GpuModel::collect(WorkerContext& ctx, const std::vector<SeqInput>& seqs,
                                          const std::vector<int>& out_row, int rows_sampled) {
  cudaStream_t st = ctx.compute_stream();
  const int V = spec_.vocab;
  const size_t Vs = static_cast<size_t>(V);
  if (rows_sampled > 0) {
    bool lp = false;
    for (const SeqInput& s : seqs) lp = lp || (s.sample && s.sampling.logprobs);
    const size_t n = lp ? StepOutputs::bytes(logit_rows_) : StepOutputs::token_bytes(rows_sampled);
    HX_CUDA_CHECK(cudaMemcpyAsync(h_out_, d_out_, n, cudaMemcpyDeviceToHost, st));
  }
  const StepOutputs ho = StepOutputs::over(h_out_, logit_rows_);
  for (size_t i = 0; i < seqs.size(); ++i)
    if (seqs[i].want_logits && out_row[i] >= 0)
      HX_CUDA_CHECK(
          cudaMemcpyAsync(h_logits_ + out_row[i] * Vs, logits_ + out_row[i] * Vs, Vs * 4, cudaMemcpyDeviceToHost, st));
  HX_CUDA_CHECK(cudaStreamSynchronize(st));
  std::vector<StepResult> out(seqs.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SeqInput& s = seqs[i];
    StepResult& r = out[i];
    const int k = out_row[i];
    if (s.sample && k >= 0) {
      r.token = checked_token(ho.token[k]);
      if (s.sampling.logprobs) {
        r.has_logprob = true;
        r.logprob = ho.logprob[k];
        const int n = std::min({s.sampling.top_logprobs, kMaxTopLogprobs, V});
        const size_t t0 = static_cast<size_t>(k) * kMaxTopLogprobs;
        for (int j = 0; j < n; ++j) r.top.emplace_back(ho.top_ids[t0 + j], ho.top_lp[t0 + j]);
      }
    }
    if (s.want_logits && k >= 0) r.logits.assign(h_logits_ + k * Vs, h_logits_ + (k + 1) * Vs);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Steps

std::vector<StepResult> GpuModel::step_batch(WorkerContext& ctx, const std::vector<SeqInput>& seqs) {
  validate(seqs);
  late_rows_.clear();  // a failed step may have left rows of its own
  bool decode_only = true;
  for (const SeqInput& s : seqs) decode_only = decode_only && s.tokens.size() == 1 && s.sample;
  try {
    if (tp_) tp_->maybe_hang(ctx.compute_stream());
    if (spec_.lm_head) apply_penalty_updates(ctx, seqs);
    return decode_only ? decode_step(ctx, seqs) : general_step(ctx, seqs, false, nullptr);
  } catch (...) {
    settle(ctx);
    throw;
  }
}

void GpuModel::settle(WorkerContext& ctx) noexcept {
  // A step that failed midway may have left copies out of the pinned staging
  // buffers queued; the next job refills them only after those finished.
  // Any error this reports is the one already being thrown (or the worker's
  // own check after the job finds it).
  cudaStreamSynchronize(ctx.compute_stream());
}

const GpuModel::Bucket& GpuModel::stage_decode(WorkerContext& ctx, const std::vector<SeqInput>& seqs, int ahead,
                                               int mode, bool* late) {
  const int B = static_cast<int>(seqs.size());
  const Bucket* bk = &buckets_.back();
  for (const Bucket& b : buckets_)
    if (b.rows >= B) {
      bk = &b;
      break;
    }
  RowInputs in;
  row_layout(h_dec_, bk->rows, max_blocks_, &in, nullptr);
  const StepSampling idle;
  int last_blocks = 0;
  for (int r = 0; r < bk->rows; ++r) {
    if (r < B) {
      const SeqInput& s = seqs[r];
      const int p = s.start_pos;
      in.tokens[r] = s.tokens[0];
      in.pos[r] = p;
      in.slot_pos[r] = pool_pos(s.block_table, p);
      in.seq_lens[r] = p + 1;
      in.slots[r] = s.slot;
      in.steps[r] = s.sampling.step;
      fill_params(in.params + r, s.sampling);
      last_blocks = blocks_for(p + ahead);
      std::memcpy(in.tables + static_cast<size_t>(r) * max_blocks_, s.block_table.data(),
                  static_cast<size_t>(last_blocks) * 4);
    } else {
      // Padding: no cache write, nothing to attend to, no penalty state.
      in.tokens[r] = 0;
      in.pos[r] = -1;
      in.slot_pos[r] = -1;
      in.seq_lens[r] = 0;
      in.slots[r] = -1;
      in.steps[r] = 0;
      fill_params(in.params + r, idle);
    }
  }
  if (mode & kConstrained) {
    std::vector<const SeqInput*> crow(bk->rows, nullptr);
    for (int r = 0; r < B; ++r) crow[r] = &seqs[r];
    stage_constraints(ctx, crow, in.cons);
    if (late != nullptr) *late = !late_rows_.empty();
  }
  // Everything up to the last real row's table entries; padded rows' tables are never read.
  const size_t bytes = bk->tables_off + (static_cast<size_t>(B - 1) * max_blocks_ + last_blocks) * 4;
  HX_CUDA_CHECK(cudaMemcpyAsync(bk->dev, h_dec_, bytes, cudaMemcpyHostToDevice, ctx.compute_stream()));
  return *bk;
}

void GpuModel::run_decode(WorkerContext& ctx, const Bucket& b, int mode) {
  cudaStream_t st = ctx.compute_stream();
  const int key = b.rows * kModes + mode;
  auto it = graphs_.find(key);
  const auto failed = graph_failed_.find(key);
  if (!use_graphs_ || (failed != graph_failed_.end() && failed->second)) {
    decode_body(ctx, b, mode);
    return;
  }
  if (it != graphs_.end()) {
    HX_CUDA_CHECK(cudaGraphLaunch(it->second, st));
    ++graph_replays_;
    return;
  }
  // The plain run answers this step (and warms every kernel up); the
  // recording made after it serves the next steps of this bucket and mode.
  decode_body(ctx, b, mode);
  cudaGraph_t graph = nullptr;
  HX_CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  try {
    decode_body(ctx, b, mode);
  } catch (...) {
    // Leave capture mode whatever failed, or the stream stays unusable.
    cudaStreamEndCapture(st, &graph);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
    graph_failed_[key] = true;
    try {
      throw;
    } catch (const CudaError& e) {
      // A launch refused during capture only costs the graph; the plain
      // run already produced this step's result.
      if (e.sticky) throw;
    }
    return;
  }
  cudaError_t e = cudaStreamEndCapture(st, &graph);
  cudaGraphExec_t exec = nullptr;
  if (e == cudaSuccess && graph != nullptr) e = cudaGraphInstantiate(&exec, graph, 0);
  if (graph != nullptr) cudaGraphDestroy(graph);
  if (e != cudaSuccess || exec == nullptr) {
    cudaGetLastError();
    graph_failed_[key] = true;
  } else {
    graphs_[key] = exec;
    ++graph_captures_;
  }
}

std::vector<StepResult> GpuModel::decode_step(WorkerContext& ctx, const std::vector<SeqInput>& seqs) {
  // Without the LM head nothing is sampled: one tail-less graph per bucket.
  const int mode = spec_.lm_head ? mode_of(seqs) : 0;
  bool late = false;
  const Bucket& bk = stage_decode(ctx, seqs, 1, mode, &late);
  // Late masks: the graph runs the layers and the LM head, and the tail
  // follows once the masks are in, while the device may still be busy.
  run_decode(ctx, bk, late ? kForwardOnly : mode);
  const int sampled = spec_.lm_head ? static_cast<int>(seqs.size()) : 0;
  std::vector<int> out_row(seqs.size(), -1);
  for (int r = 0; r < sampled; ++r) out_row[r] = r;
  return late_tail(ctx, bk, mode, seqs, out_row, sampled);
}

void GpuModel::validate_decode_steps(const std::vector<SeqInput>& seqs, int n_steps) const {
  if (n_steps < 1 || n_steps > kMaxDecodeSteps)
    throw std::invalid_argument("n_steps must be in [1, " + std::to_string(kMaxDecodeSteps) + "], got " +
                                std::to_string(n_steps));
  if (!spec_.lm_head || tp_)
    throw std::invalid_argument("several decode steps per job need a model that samples on one device");
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SeqInput& s = seqs[i];
    const std::string who = "sequence " + std::to_string(i) + ": ";
    if (s.tokens.size() != 1 || !s.sample)
      throw std::invalid_argument(who + "each decode step feeds one token and samples the next");
    if (s.sampling.logprobs || s.want_logits || s.masked() || !s.bias_ids.empty())
      throw std::invalid_argument(who + "logprobs, logits and token constraints need one step per job");
  }
  // Positions, block tables and the rest as for a step that runs n_steps tokens.
  validate(seqs, n_steps - 1);
}

std::vector<std::vector<int32_t>> GpuModel::decode_steps(WorkerContext& ctx, const std::vector<SeqInput>& seqs,
                                                         int n_steps) {
  validate_decode_steps(seqs, n_steps);
  late_rows_.clear();
  cudaStream_t st = ctx.compute_stream();
  const int B = static_cast<int>(seqs.size());
  const int mode = mode_of(seqs);  // greedy or sampled, with or without penalties: nothing else passes
  try {
    apply_penalty_updates(ctx, seqs);
    const Bucket& bk = stage_decode(ctx, seqs, n_steps, mode, nullptr);
    RowInputs in;
    row_layout(bk.dev, bk.rows, max_blocks_, &in, nullptr);
    DecodeFeed feed;
    feed.tokens = in.tokens;
    feed.pos = in.pos;
    feed.slot_pos = in.slot_pos;
    feed.seq_lens = in.seq_lens;
    feed.steps = in.steps;
    feed.tables = in.tables;
    feed.stride = max_blocks_;
    feed.block_shift = bshift_;
    if (mode & kPenalties) {
      feed.slots = in.slots;
      feed.present = d_present_;
      feed.counts = d_counts_;
      feed.vocab = spec_.vocab;
    }
    const StepOutputs o = StepOutputs::over(d_out_, logit_rows_);
    // The host queues every step at once; the device runs them back to back.
    for (int j = 0; j < n_steps; ++j) {
      run_decode(ctx, bk, mode);
      decode_feed_launch(feed, o.token, d_fed_ + static_cast<size_t>(j) * B, B, j + 1 < n_steps, st);
    }
    const size_t n = static_cast<size_t>(n_steps) * B;
    HX_CUDA_CHECK(cudaMemcpyAsync(h_fed_, d_fed_, n * 4, cudaMemcpyDeviceToHost, st));
    HX_CUDA_CHECK(cudaStreamSynchronize(st));
    std::vector<std::vector<int32_t>> out(seqs.size(), std::vector<int32_t>(n_steps));
    for (int j = 0; j < n_steps; ++j)
      for (int i = 0; i < B; ++i) out[i][j] = checked_token(h_fed_[static_cast<size_t>(j) * B + i]);
    return out;
  } catch (...) {
    settle(ctx);
    throw;
  }
}

std::vector<StepResult> GpuModel::late_tail(WorkerContext& ctx, const Bucket& b, int mode,
                                            const std::vector<SeqInput>& seqs, const std::vector<int>& out_row,
                                            int sampled) {
  if (!late_rows_.empty()) {
    finish_constraints(ctx);
    RowInputs in;
    row_layout(b.dev, b.rows, max_blocks_, &in, nullptr);
    sample_rows(ctx, b.rows, mode, in.slots, in.steps, in.params, in.cons);
  }
  return collect(ctx, seqs, out_row, sampled);
}

std::vector<StepResult> GpuModel::general_step(WorkerContext& ctx, const std::vector<SeqInput>& seqs, bool all_rows,
                                               std::vector<float>* all_out, const HiddenOut* hidden) {
  cudaStream_t st = ctx.compute_stream();
  const int nseq = static_cast<int>(seqs.size());
  const int h = spec_.hidden;
  const size_t Vs = static_cast<size_t>(spec_.vocab);
  // Without the LM head (a tensor-parallel follower) the passes run the
  // layers only: no logits rows, no sampling.
  const bool head = spec_.lm_head;

  // Execution order: one-token sequences first, so their rows open the
  // first pass(es) as one block for the batched decode attention.
  std::vector<int> order;
  order.reserve(nseq);
  for (int i = 0; i < nseq; ++i)
    if (seqs[i].tokens.size() == 1) order.push_back(i);
  const int n_single = static_cast<int>(order.size());
  for (int i = 0; i < nseq; ++i)
    if (seqs[i].tokens.size() != 1) order.push_back(i);

  // Rows: sequence j (in execution order) owns global rows [row0[j], row0[j] + len[j]).
  // Logits rows: in execution order, which is also the order passes finish them.
  std::vector<int64_t> row0(nseq), len(nseq);
  std::vector<int> out_row(nseq, -1), blocks(nseq);
  int64_t T = 0;
  int width = 1, K = 0;
  bool any_sample = false;
  for (int j = 0; j < nseq; ++j) {
    const SeqInput& s = seqs[order[j]];
    row0[j] = T;
    len[j] = static_cast<int64_t>(s.tokens.size());
    T += len[j];
    blocks[j] = blocks_for(s.start_pos + static_cast<int>(len[j]));
    width = std::max(width, blocks[j]);
    if (head && !all_rows && (s.sample || s.want_logits)) out_row[order[j]] = K++;
    any_sample = any_sample || (head && !all_rows && s.sample);
  }

  // Header, copied once: decode lengths, sampled rows, LM-head rows, tables.
  Packer pk;
  const size_t o_lens = pk.take<int32_t>(n_single);
  const size_t o_slots = pk.take<int32_t>(K), o_steps = pk.take<int32_t>(K);
  const size_t o_params = pk.take<SamplingParamsDevice>(K), o_lm = pk.take<int32_t>(K);
  const size_t o_cons = pk.take<int32_t>(static_cast<size_t>(K) * kConstrainDescInts);
  const size_t o_tables = pk.take<int32_t>(static_cast<size_t>(nseq) * width);
  const size_t header = pk.off;
  const int mode = mode_of(seqs);
  {
    const StepSampling idle;
    std::vector<const SeqInput*> crow(K, nullptr);
    for (int j = 0; j < nseq; ++j) {
      const SeqInput& s = seqs[order[j]];
      if (j < n_single) at<int32_t>(h_gen_, o_lens)[j] = s.start_pos + 1;
      std::memcpy(at<int32_t>(h_gen_, o_tables) + static_cast<size_t>(j) * width, s.block_table.data(),
                  static_cast<size_t>(blocks[j]) * 4);
      const int k = out_row[order[j]];
      if (k < 0) continue;
      at<int32_t>(h_gen_, o_slots)[k] = s.sample ? s.slot : -1;
      at<int32_t>(h_gen_, o_steps)[k] = s.sample ? s.sampling.step : 0;
      fill_params(at<SamplingParamsDevice>(h_gen_, o_params) + k, s.sample ? s.sampling : idle);
      at<int32_t>(h_gen_, o_lm)[k] = static_cast<int32_t>((row0[j] + len[j] - 1) % chunk_);
      if (s.sample) crow[k] = &s;
    }
    if (mode & kConstrained) stage_constraints(ctx, crow, at<int32_t>(h_gen_, o_cons));
  }
  int32_t* d_lens = at<int32_t>(d_gen_, o_lens);
  int32_t* d_tables = at<int32_t>(d_gen_, o_tables);
  int32_t* d_lm = at<int32_t>(d_gen_, o_lm);

  // Passes of chunk_ rows over the global rows; token rows staged a window
  // of passes at a time (a step longer than the staging waits for the
  // previous window before refilling it).
  const int64_t n_pass = (T + chunk_ - 1) / chunk_;
  bool first = true;
  int jfill = 0;
  for (int64_t p = 0; p < n_pass;) {
    const int64_t w0 = p * chunk_;
    int64_t p_end = p, w_rows = 0;
    while (p_end < n_pass) {
      const int64_t r = std::min(T, (p_end + 1) * chunk_) - p_end * chunk_;
      if (p_end > p && w_rows + r > stage_rows_) break;
      w_rows += r;
      ++p_end;
    }
    if (!first) HX_CUDA_CHECK(cudaStreamSynchronize(st));
    Packer wp;
    wp.off = header;
    const size_t o_tok = wp.take<int32_t>(w_rows), o_pos = wp.take<int32_t>(w_rows), o_sp = wp.take<int32_t>(w_rows);
    int32_t* ht = at<int32_t>(h_gen_, o_tok);
    int32_t* hp = at<int32_t>(h_gen_, o_pos);
    int32_t* hs = at<int32_t>(h_gen_, o_sp);
    for (int64_t g = w0; g < w0 + w_rows; ++g) {
      while (g >= row0[jfill] + len[jfill]) ++jfill;
      const SeqInput& s = seqs[order[jfill]];
      const int t = static_cast<int>(g - row0[jfill]);
      const int pos = s.start_pos + t;
      ht[g - w0] = s.tokens[t];
      hp[g - w0] = pos;
      hs[g - w0] = pool_pos(s.block_table, pos);
    }
    const size_t from = first ? 0 : o_tok;
    HX_CUDA_CHECK(cudaMemcpyAsync(d_gen_ + from, h_gen_ + from, wp.off - from, cudaMemcpyHostToDevice, st));
    first = false;

    for (; p < p_end; ++p) {
      const int64_t ps = p * chunk_, pe = std::min(T, ps + chunk_);
      const int n = static_cast<int>(pe - ps);
      PassLayout pl;
      pl.ids = at<int32_t>(d_gen_, o_tok) + (ps - w0);
      pl.pos = at<int32_t>(d_gen_, o_pos) + (ps - w0);
      pl.slot_pos = at<int32_t>(d_gen_, o_sp) + (ps - w0);
      pl.n = n;
      if (ps < n_single) {
        pl.n_dec = static_cast<int>(std::min<int64_t>(pe, n_single) - ps);
        pl.dec_lens = d_lens + ps;
        pl.dec_tables = d_tables + ps * width;
        pl.dec_stride = width;
      }
      int k_first = -1, k_count = 0;
      bool contiguous = true;
      int prev_row = 0;
      for (int j = 0; j < nseq; ++j) {
        const int64_t lo = std::max(row0[j], ps), hi = std::min(row0[j] + len[j], pe);
        if (hi <= lo) continue;
        const SeqInput& s = seqs[order[j]];
        if (j >= n_single) {
          PrefillSegment g;
          g.row0 = static_cast<int>(lo - ps);
          g.count = static_cast<int>(hi - lo);
          g.start_pos = s.start_pos + static_cast<int>(lo - row0[j]);
          g.table = d_tables + static_cast<size_t>(j) * width;
          g.table_len = blocks[j];
          pl.segs.push_back(g);
        }
        const int k = out_row[order[j]];
        if (k >= 0 && hi == row0[j] + len[j]) {
          const int row = static_cast<int>(hi - 1 - ps);
          if (k_first < 0)
            k_first = k;
          else
            contiguous = contiguous && row == prev_row + 1;
          prev_row = row;
          ++k_count;
        }
      }
      run_layers(ctx, pl);
      if (!head) continue;
      if (hidden != nullptr) {
        // The final norm over every row of the pass, then each sequence's share of them.
        add_rms_norm_launch(x_, nullptr, output_norm_, spec_.eps, xn_, nullptr, n, h, st);
        const size_t hs = static_cast<size_t>(h);
        for (int j = 0; j < nseq; ++j) {
          const int64_t lo = std::max(row0[j], ps), hi = std::min(row0[j] + len[j], pe);
          if (hi <= lo) continue;
          const int i = order[j];
          const float* src = xn_ + static_cast<size_t>(lo - ps) * hs;
          switch (hidden->pooling) {
            case HiddenPooling::All:
              HX_CUDA_CHECK(cudaMemcpyAsync((*hidden->rows)[i].data() + static_cast<size_t>(lo - row0[j]) * hs, src,
                                            static_cast<size_t>(hi - lo) * hs * 4, cudaMemcpyDeviceToHost, st));
              break;
            case HiddenPooling::Last:
              if (hi == row0[j] + len[j])
                HX_CUDA_CHECK(cudaMemcpyAsync(h_pool_ + i * hs, src + static_cast<size_t>(hi - 1 - lo) * hs, hs * 4,
                                              cudaMemcpyDeviceToHost, st));
              break;
            case HiddenPooling::First:
              if (lo == row0[j])
                HX_CUDA_CHECK(cudaMemcpyAsync(h_pool_ + i * hs, src, hs * 4, cudaMemcpyDeviceToHost, st));
              break;
            case HiddenPooling::Mean:
              sum_rows_launch(src, static_cast<int>(hi - lo), h, d_pool_ + i * hs, lo != row0[j], st);
              break;
          }
        }
      } else if (all_rows) {
        for (int g = 0; g < n; g += logit_rows_) {
          const int ng = std::min(logit_rows_, n - g);
          lm_head(ctx, x_ + static_cast<size_t>(g) * h, ng, logits_);
          HX_CUDA_CHECK(cudaMemcpyAsync(h_logits_, logits_, Vs * ng * 4, cudaMemcpyDeviceToHost, st));
          HX_CUDA_CHECK(cudaStreamSynchronize(st));
          std::memcpy(all_out->data() + static_cast<size_t>(ps + g) * Vs, h_logits_, Vs * ng * 4);
        }
      } else if (k_count > 0) {
        const float* src = x_sel_;
        if (contiguous) {
          const int first_row = prev_row - (k_count - 1);
          src = x_ + static_cast<size_t>(first_row) * h;
        } else {
          gather_rows_launch(x_, d_lm + k_first, k_count, h, x_sel_, st);
        }
        lm_head(ctx, src, k_count, logits_ + static_cast<size_t>(k_first) * Vs);
      }
    }
  }
  if (any_sample) {
    if (mode & kConstrained) finish_constraints(ctx);
    sample_rows(ctx, K, mode, at<int32_t>(d_gen_, o_slots), at<int32_t>(d_gen_, o_steps),
                at<SamplingParamsDevice>(d_gen_, o_params), at<int32_t>(d_gen_, o_cons));
  }
  return collect(ctx, seqs, out_row, any_sample ? K : 0);
}

std::vector<float> GpuModel::forward_logits(WorkerContext& ctx, const std::vector<int32_t>& tokens, int start_pos,
                                            const std::vector<int32_t>& block_table, bool all_logits) {
  std::vector<SeqInput> one(1);
  SeqInput& s = one[0];
  s.tokens = tokens;
  s.start_pos = start_pos;
  s.block_table = block_table;
  s.slot = 0;
  s.sample = false;
  s.want_logits = !all_logits;
  validate(one);
  try {
    if (!spec_.lm_head) {
      general_step(ctx, one, true, nullptr);
      return {};
    }
    if (!all_logits) return std::move(general_step(ctx, one, false, nullptr)[0].logits);
    std::vector<float> out(static_cast<size_t>(spec_.vocab) * tokens.size());
    general_step(ctx, one, true, &out);
    return out;
  } catch (...) {
    settle(ctx);
    throw;
  }
}

std::vector<std::vector<float>> GpuModel::hidden_states(WorkerContext& ctx,
                                                        const std::vector<std::vector<int32_t>>& tokens,
                                                        const std::vector<std::vector<int32_t>>& block_tables,
                                                        HiddenPooling pooling) {
  if (block_tables.size() != tokens.size())
    throw std::invalid_argument("hidden states: " + std::to_string(tokens.size()) + " sequences but " +
                                std::to_string(block_tables.size()) + " block tables");
  if (pooling != HiddenPooling::All && pooling != HiddenPooling::Last && pooling != HiddenPooling::First &&
      pooling != HiddenPooling::Mean)
    throw std::invalid_argument("unknown hidden-state pooling " + std::to_string(static_cast<int>(pooling)));
  const size_t n = tokens.size();
  // Sequences that never sample: each runs from position 0 on a slot of its
  // own (distinct slots keep validate's rule; no penalty state is touched).
  std::vector<SeqInput> seqs(n);
  for (size_t i = 0; i < n; ++i) {
    seqs[i].tokens = tokens[i];
    seqs[i].start_pos = 0;
    seqs[i].block_table = block_tables[i];
    seqs[i].slot = static_cast<int>(i);
    seqs[i].sample = false;
  }
  validate(seqs);
  const size_t hs = static_cast<size_t>(spec_.hidden);
  std::vector<std::vector<float>> out(n);
  if (pooling == HiddenPooling::All)
    for (size_t i = 0; i < n; ++i) out[i].resize(tokens[i].size() * hs);
  HiddenOut ho;
  ho.pooling = pooling;
  ho.rows = &out;
  try {
    general_step(ctx, seqs, false, nullptr, &ho);  // returns once the stream is idle
    if (pooling == HiddenPooling::Mean) {
      HX_CUDA_CHECK(cudaMemcpyAsync(h_pool_, d_pool_, n * hs * 4, cudaMemcpyDeviceToHost, ctx.compute_stream()));
      HX_CUDA_CHECK(cudaStreamSynchronize(ctx.compute_stream()));
    }
  } catch (...) {
    settle(ctx);
    throw;
  }
  if (pooling != HiddenPooling::All) {
    for (size_t i = 0; i < n; ++i) {
      out[i].assign(h_pool_ + i * hs, h_pool_ + (i + 1) * hs);
      if (pooling == HiddenPooling::Mean) {
        const float count = static_cast<float>(tokens[i].size());
        for (float& v : out[i]) v /= count;
      }
    }
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
    if (model->tp() != nullptr) r.tp_status = model->tp()->status();
    r.handle = ctx.add_resource(std::move(model));
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return r;
  });
  return fut.get();
}

size_t model_alloc_kv(DeviceWorker& w, int64_t handle, int num_blocks) {
  return w
      .submit([handle, num_blocks](WorkerContext& ctx) {
        GpuModel* m = ctx.resource<GpuModel>(handle);
        m->alloc_kv(ctx, num_blocks);
        ctx.synchronize();
        return m->kv_bytes();
      })
      .get();
}

std::vector<StepResult> model_step_batch(DeviceWorker& w, int64_t handle, const std::vector<SeqInput>& seqs,
                                         JobWaiter* waiter) {
  auto f = w.submit([&, handle](WorkerContext& ctx) { return ctx.resource<GpuModel>(handle)->step_batch(ctx, seqs); });
  return waiter ? waiter->wait(f) : f.get();
}

std::vector<std::vector<int32_t>> model_decode_steps(DeviceWorker& w, int64_t handle, const std::vector<SeqInput>& seqs,
                                                     int n_steps, JobWaiter* waiter) {
  auto f = w.submit([&, handle, n_steps](WorkerContext& ctx) {
    return ctx.resource<GpuModel>(handle)->decode_steps(ctx, seqs, n_steps);
  });
  return waiter ? waiter->wait(f) : f.get();
}

std::vector<float> model_forward_logits(DeviceWorker& w, int64_t handle, const std::vector<int32_t>& tokens,
                                        int start_pos, const std::vector<int32_t>& block_table, bool all_logits) {
  return w
      .submit([&, handle](WorkerContext& ctx) {
        return ctx.resource<GpuModel>(handle)->forward_logits(ctx, tokens, start_pos, block_table, all_logits);
      })
      .get();
}

std::vector<std::vector<float>> model_hidden_states(DeviceWorker& w, int64_t handle,
                                                    const std::vector<std::vector<int32_t>>& tokens,
                                                    const std::vector<std::vector<int32_t>>& block_tables,
                                                    HiddenPooling pooling) {
  return w
      .submit([&, handle, pooling](WorkerContext& ctx) {
        return ctx.resource<GpuModel>(handle)->hidden_states(ctx, tokens, block_tables, pooling);
      })
      .get();
}

std::future<std::vector<StepResult>> model_step_batch_submit(DeviceWorker& w, int64_t handle,
                                                             std::shared_ptr<const std::vector<SeqInput>> seqs,
                                                             std::shared_ptr<std::atomic<bool>> started) {
  // Owns its inputs: the caller may stop waiting (a watchdog) before the job ends.
  return w.submit([handle, seqs = std::move(seqs), started = std::move(started)](WorkerContext& ctx) {
    if (started) started->store(true);
    return ctx.resource<GpuModel>(handle)->step_batch(ctx, *seqs);
  });
}

std::future<std::vector<float>> model_forward_logits_submit(DeviceWorker& w, int64_t handle,
                                                            std::shared_ptr<const SeqInput> seq, bool all_logits,
                                                            std::shared_ptr<std::atomic<bool>> started) {
  return w.submit([handle, seq = std::move(seq), all_logits, started = std::move(started)](WorkerContext& ctx) {
    if (started) started->store(true);
    return ctx.resource<GpuModel>(handle)->forward_logits(ctx, seq->tokens, seq->start_pos, seq->block_table,
                                                          all_logits);
  });
}

namespace {
TpComm& tp_of(WorkerContext& ctx, int64_t handle) {
  TpComm* tp = ctx.resource<GpuModel>(handle)->tp();
  if (tp == nullptr) throw std::invalid_argument("the model was not loaded as a tensor-parallel rank");
  return *tp;
}
}  // namespace

bool model_peer_access(DeviceWorker& w, const std::vector<int>& devices) {
  return w
      .submit([devices](WorkerContext& ctx) {
        if (ctx.host_only()) return false;
        for (int d : devices) {
          if (d == ctx.device()) continue;
          int ok = 0;
          HX_CUDA_CHECK(cudaDeviceCanAccessPeer(&ok, ctx.device(), d));
          if (!ok) return false;
        }
        return true;
      })
      .get();
}

PeerEndpoint model_peer_endpoint(DeviceWorker& w, int64_t handle) {
  return w.submit([handle](WorkerContext& ctx) { return tp_of(ctx, handle).endpoint(ctx); }).get();
}

void model_link_peers(DeviceWorker& w, int64_t handle, const std::vector<PeerEndpoint>& group) {
  w.submit([handle, &group](WorkerContext& ctx) { tp_of(ctx, handle).link(ctx, group); }).get();
}

void model_hang_next_step(DeviceWorker& w, int64_t handle) {
  w.submit([handle](WorkerContext& ctx) { tp_of(ctx, handle).arm_hang(); }).get();
}

std::future<std::vector<float>> model_all_reduce_test_submit(DeviceWorker& w, int64_t handle,
                                                             std::shared_ptr<const std::vector<float>> data,
                                                             bool peer) {
  return w.submit([handle, data = std::move(data), peer](WorkerContext& ctx) {
    TpComm& tp = tp_of(ctx, handle);
    const size_t n = data->size();
    float* x = static_cast<float*>(ctx.alloc(std::max<size_t>(n, 4) * sizeof(float)));
    try {
      ctx.upload(data->data(), n * sizeof(float), x);
      tp.all_reduce_with(ctx, x, n, peer);
      std::vector<float> out(n);
      ctx.download(out.data(), x, n * sizeof(float));
      ctx.free(x);
      return out;
    } catch (...) {
      ctx.synchronize();
      ctx.free(x);
      throw;
    }
  });
}

void model_drop(DeviceWorker& w, int64_t handle) {
  w.submit_cleanup([handle](WorkerContext& ctx) { ctx.drop(handle); }).get();
}

void model_set_graphs(DeviceWorker& w, int64_t handle, bool enabled) {
  w.submit([handle, enabled](WorkerContext& ctx) { ctx.resource<GpuModel>(handle)->set_graphs(enabled); }).get();
}

std::map<std::string, int64_t> model_memory(DeviceWorker& w, int64_t handle) {
  return w
      .submit([handle](WorkerContext& ctx) {
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

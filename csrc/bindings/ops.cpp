// Torch ops over the forward's non-matvec kernels, for tests and tools:
// torch.ops.helexa.<name>(...) after `import helexa_native._C`.
//
// Each op checks devices, dtypes, shapes and contiguity, then calls the
// launcher on the tensors' device and its current stream. Outputs are
// caller-allocated (tests poison them first); ops that need a workspace
// allocate it from torch's caching allocator, which keeps them usable inside
// torch.cuda.graph capture. CUDA builds only (setup.py compiles ops*.cpp only then).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bindings/op_check.h"
#include "bindings/op_util.h"

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <utility>

#include "common/ggml_types.h"
#include "common/rope_style.h"
#include "kernels/attention_decode.cuh"
#include "kernels/attention_prefill.cuh"
#include "kernels/cast.cuh"
#include "kernels/constrain.cuh"
#include "kernels/embedding.cuh"
#include "kernels/kv_cache.cuh"
#include "kernels/penalty_slots.cuh"
#include "kernels/rms_norm.cuh"
#include "kernels/rope.cuh"
#include "kernels/sampling.cuh"
#include "kernels/sum_rows.cuh"
#include "kernels/swiglu.cuh"
#include "kernels/x_stage.cuh"

namespace hx {
namespace {

using op::as_int;
using op::check_tensor;
using op::cuda_device;
using op::stream_of;

__nv_bfloat16* bf16_ptr(const at::Tensor& t) { return reinterpret_cast<__nv_bfloat16*>(t.data_ptr()); }

// The rope style a config names ("half" | "pairs").
RopeStyle rope_style(c10::string_view name) {
  const std::string s(name.data(), name.size());
  RopeStyle style = RopeStyle::Half;
  HX_OP_CHECK(rope_style_from_name(s, &style), "style must be 'half' or 'pairs', got '", s, "'");
  return style;
}

// ------------------------------------------------------------------ kernels

void op_embedding(const at::Tensor& table, int64_t type, const at::Tensor& ids, at::Tensor& out, int64_t vocab) {
  const c10::cuda::CUDAGuard guard(cuda_device(out, "out"));
  const auto dev = out.device();
  HX_OP_CHECK(table.is_cuda() && table.device() == dev && table.is_contiguous(),
              "table must be a contiguous CUDA tensor on ", dev);
  check_tensor(ids, "ids", at::kInt, dev);
  check_tensor(out, "out", at::kFloat, dev);
  HX_OP_CHECK(out.dim() == 2 && out.size(0) == ids.numel(), "out must be [n, hidden] with n = ids.numel()");
  const auto t = static_cast<GgmlType>(type);
  HX_OP_CHECK(is_supported(t), "unsupported GGML type id ", type);
  const int hidden = as_int(out.size(1), "hidden");
  HX_OP_CHECK(hidden % block_elems(t) == 0, "hidden must be a multiple of ", block_elems(t));
  const size_t need = row_bytes(t, hidden) * static_cast<size_t>(vocab);
  HX_OP_CHECK(static_cast<size_t>(table.nbytes()) >= need, "table holds ", table.nbytes(), " bytes, needs ", need);
  embedding_launch(t, table.data_ptr(), ids.data_ptr<int32_t>(), out.data_ptr<float>(), as_int(ids.numel(), "n"),
                   hidden, as_int(vocab, "vocab"), stream_of(out));
}

// An optional int8 matvec stage of `elems` activations (x_stage.cuh): a
// contiguous uint8 tensor of at least matvec_x_scratch layout's bytes on dev.
uint8_t* stage_ptr(const std::optional<at::Tensor>& stage, int64_t elems, const c10::Device& dev) {
  if (!stage.has_value() || !stage->defined()) return nullptr;
  check_tensor(*stage, "x_stage", at::kByte, dev);
  const size_t need = matvec::dp4a::smem_bytes(1, as_int(elems, "stage elements"), matvec::dp4a::kStageTerms);
  HX_OP_CHECK(static_cast<size_t>(stage->nbytes()) >= need, "x_stage holds ", stage->nbytes(), " bytes, needs ", need);
  return stage->data_ptr<uint8_t>();
}

void op_quantize_x(const at::Tensor& x, at::Tensor& stage) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, "x"));
  check_tensor(x, "x", at::kFloat, x.device());
  HX_OP_CHECK(x.numel() % 32 == 0, "quantize_x: x needs a multiple of 32 elements");
  uint8_t* st = stage_ptr(stage, x.numel(), x.device());
  matvec::quantize_x_launch(x.data_ptr<float>(), 1, as_int(x.numel(), "x elements"), matvec::dp4a::kStageTerms, st,
                            stream_of(x));
}

void op_add_rms_norm(at::Tensor& residual, const std::optional<at::Tensor>& delta, const at::Tensor& weight, double eps,
                     const std::optional<at::Tensor>& out_f32, const std::optional<at::Tensor>& out_bf16,
                     const std::optional<at::Tensor>& x_stage) {
  const c10::cuda::CUDAGuard guard(cuda_device(residual, "residual"));
  const auto dev = residual.device();
  check_tensor(residual, "residual", at::kFloat, dev);
  HX_OP_CHECK(residual.dim() == 2, "residual must be [n, h]");
  const int n = as_int(residual.size(0), "n"), h = as_int(residual.size(1), "h");
  check_tensor(weight, "weight", at::kFloat, dev);
  HX_OP_CHECK(weight.numel() == h, "weight must have h elements");
  const float* d = nullptr;
  if (delta.has_value() && delta->defined()) {
    check_tensor(*delta, "delta", at::kFloat, dev);
    HX_OP_CHECK(delta->sizes() == residual.sizes(), "delta must match residual");
    d = delta->data_ptr<float>();
  }
  float* of = nullptr;
  __nv_bfloat16* ob = nullptr;
  if (out_f32.has_value() && out_f32->defined()) {
    check_tensor(*out_f32, "out_f32", at::kFloat, dev);
    HX_OP_CHECK(out_f32->sizes() == residual.sizes(), "out_f32 must match residual");
    of = out_f32->data_ptr<float>();
  }
  if (out_bf16.has_value() && out_bf16->defined()) {
    check_tensor(*out_bf16, "out_bf16", at::kBFloat16, dev);
    HX_OP_CHECK(out_bf16->sizes() == residual.sizes(), "out_bf16 must match residual");
    ob = bf16_ptr(*out_bf16);
  }
  add_rms_norm_launch(residual.data_ptr<float>(), d, weight.data_ptr<float>(), static_cast<float>(eps), of, ob, n, h,
                      stream_of(residual), stage_ptr(x_stage, residual.numel(), dev));
}

void op_head_rms_norm(at::Tensor& x, const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, "x"));
  check_tensor(x, "x", at::kFloat, x.device());
  check_tensor(weight, "weight", at::kFloat, x.device());
  HX_OP_CHECK(x.dim() == 3, "x must be [n, heads, d]");
  HX_OP_CHECK(weight.numel() == x.size(2), "weight must have d elements");
  head_rms_norm_launch(x.data_ptr<float>(), weight.data_ptr<float>(), static_cast<float>(eps), as_int(x.size(0), "n"),
                       as_int(x.size(1), "heads"), as_int(x.size(2), "d"), stream_of(x));
}

void op_rope(at::Tensor& q, at::Tensor& k, const at::Tensor& pos, const at::Tensor& inv_freq, c10::string_view style) {
  const c10::cuda::CUDAGuard guard(cuda_device(q, "q"));
  const auto dev = q.device();
  check_tensor(q, "q", at::kFloat, dev);
  check_tensor(k, "k", at::kFloat, dev);
  check_tensor(pos, "pos", at::kInt, dev);
  HX_OP_CHECK(q.dim() == 3 && k.dim() == 3, "q and k must be [n, heads, d]");
  HX_OP_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), "q and k must agree in n and d");
  HX_OP_CHECK(pos.numel() == q.size(0), "pos must have n elements");
  const int d = as_int(q.size(2), "d");
  HX_OP_CHECK(inv_freq.numel() == d / 2, "inv_freq must have d/2 elements");
  HX_OP_CHECK(inv_freq.is_cuda() && inv_freq.device() == dev && inv_freq.is_contiguous(),
              "inv_freq must be a contiguous CUDA tensor on ", dev);
  const int n = as_int(q.size(0), "n"), nq = as_int(q.size(1), "nq"), nk = as_int(k.size(1), "nk");
  const RopeStyle rs = rope_style(style);
  if (inv_freq.scalar_type() == at::kDouble) {
    rope_launch(q.data_ptr<float>(), k.data_ptr<float>(), pos.data_ptr<int32_t>(), inv_freq.data_ptr<double>(), n, nq,
                nk, d, rs, stream_of(q));
  } else {
    HX_OP_CHECK(inv_freq.scalar_type() == at::kFloat, "inv_freq must be float32 or float64");
    rope_launch(q.data_ptr<float>(), k.data_ptr<float>(), pos.data_ptr<int32_t>(), inv_freq.data_ptr<float>(), n, nq,
                nk, d, rs, stream_of(q));
  }
}

void op_kv_append(const at::Tensor& k, const at::Tensor& v, at::Tensor& kc, at::Tensor& vc,
                  const at::Tensor& slot_pos) {
  const c10::cuda::CUDAGuard guard(cuda_device(kc, "k_cache"));
  const auto dev = kc.device();
  check_tensor(k, "k", at::kFloat, dev);
  check_tensor(v, "v", at::kFloat, dev);
  check_tensor(kc, "k_cache", at::kBFloat16, dev);
  check_tensor(vc, "v_cache", at::kBFloat16, dev);
  check_tensor(slot_pos, "slot_pos", at::kInt, dev);
  HX_OP_CHECK(k.dim() == 3 && k.sizes() == v.sizes(), "k and v must be [n, nk, d]");
  HX_OP_CHECK(kc.dim() == 3 && kc.sizes() == vc.sizes(), "caches must be [nk, cap, d]");
  HX_OP_CHECK(kc.size(0) == k.size(1) && kc.size(2) == k.size(2), "cache heads / head_dim must match k");
  HX_OP_CHECK(slot_pos.numel() == k.size(0), "slot_pos must have n elements");
  kv_append_launch(k.data_ptr<float>(), v.data_ptr<float>(), bf16_ptr(kc), bf16_ptr(vc), slot_pos.data_ptr<int32_t>(),
                   as_int(k.size(0), "n"), as_int(k.size(1), "nk"), as_int(k.size(2), "d"), as_int(kc.size(1), "cap"),
                   stream_of(kc));
}

void op_rope_table(const at::Tensor& inv_freq, at::Tensor& table) {
  const c10::cuda::CUDAGuard guard(cuda_device(table, "table"));
  const auto dev = table.device();
  check_tensor(inv_freq, "inv_freq", at::kDouble, dev);
  check_tensor(table, "table", at::kFloat, dev);
  HX_OP_CHECK(table.dim() == 3 && table.size(1) == inv_freq.numel() && table.size(2) == 2,
              "table must be [len, d/2, 2] with d/2 = inv_freq.numel()");
  rope_table_launch(inv_freq.data_ptr<double>(), table.data_ptr<float>(), as_int(table.size(0), "len"),
                    2 * as_int(inv_freq.numel(), "d/2"), stream_of(table));
}

void op_rope_kv_append(at::Tensor& q, at::Tensor& k, const at::Tensor& v, at::Tensor& kc, at::Tensor& vc,
                       const at::Tensor& pos, const at::Tensor& slot_pos, const std::optional<at::Tensor>& table,
                       const at::Tensor& inv_freq, const std::optional<at::Tensor>& q_norm,
                       const std::optional<at::Tensor>& k_norm, double eps, c10::string_view style) {
  const c10::cuda::CUDAGuard guard(cuda_device(kc, "k_cache"));
  const auto dev = kc.device();
  check_tensor(q, "q", at::kFloat, dev);
  check_tensor(k, "k", at::kFloat, dev);
  check_tensor(v, "v", at::kFloat, dev);
  check_tensor(kc, "k_cache", at::kBFloat16, dev);
  check_tensor(vc, "v_cache", at::kBFloat16, dev);
  check_tensor(pos, "pos", at::kInt, dev);
  check_tensor(slot_pos, "slot_pos", at::kInt, dev);
  check_tensor(inv_freq, "inv_freq", at::kDouble, dev);
  HX_OP_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes(), "q must be [n, nq, d], k and v [n, nk, d]");
  HX_OP_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), "q and k must agree in n and d");
  HX_OP_CHECK(kc.dim() == 3 && kc.sizes() == vc.sizes(), "caches must be [nk, cap, d]");
  HX_OP_CHECK(kc.size(0) == k.size(1) && kc.size(2) == k.size(2), "cache heads / head_dim must match k");
  HX_OP_CHECK(pos.numel() == q.size(0) && slot_pos.numel() == q.size(0), "pos and slot_pos must have n elements");
  const int d = as_int(q.size(2), "d");
  HX_OP_CHECK(inv_freq.numel() == d / 2, "inv_freq must have d/2 elements");
  const RopeStyle rs = rope_style(style);
  const float* tp = nullptr;
  int tlen = 0;
  if (table.has_value() && table->defined()) {
    check_tensor(*table, "table", at::kFloat, dev);
    HX_OP_CHECK(table->dim() == 3 && table->size(1) == d / 2 && table->size(2) == 2, "table must be [len, d/2, 2]");
    tp = table->data_ptr<float>();
    tlen = as_int(table->size(0), "table length");
  }
  const bool has_q = q_norm.has_value() && q_norm->defined();
  const bool has_k = k_norm.has_value() && k_norm->defined();
  HX_OP_CHECK(has_q == has_k, "q_norm and k_norm must be given together");
  if (has_q) {
    check_tensor(*q_norm, "q_norm", at::kFloat, dev);
    check_tensor(*k_norm, "k_norm", at::kFloat, dev);
    HX_OP_CHECK(q_norm->numel() == d && k_norm->numel() == d, "q_norm and k_norm must have d elements");
  }
  rope_kv_append_launch(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), bf16_ptr(kc), bf16_ptr(vc),
                        pos.data_ptr<int32_t>(), slot_pos.data_ptr<int32_t>(), tp, tlen, inv_freq.data_ptr<double>(),
                        has_q ? q_norm->data_ptr<float>() : nullptr, has_k ? k_norm->data_ptr<float>() : nullptr,
                        static_cast<float>(eps), as_int(q.size(0), "n"), as_int(q.size(1), "nq"),
                        as_int(k.size(1), "nk"), d, as_int(kc.size(1), "cap"), rs, stream_of(kc));
}

void op_attention_decode(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& seq_lens,
                         const at::Tensor& block_tables, int64_t block_size, at::Tensor& out, double scale,
                         const std::optional<at::Tensor>& x_stage) {
  const c10::cuda::CUDAGuard guard(cuda_device(q, "q"));
  const auto dev = q.device();
  check_tensor(q, "q", at::kFloat, dev);
  check_tensor(kc, "k_cache", at::kBFloat16, dev);
  check_tensor(vc, "v_cache", at::kBFloat16, dev);
  check_tensor(seq_lens, "seq_lens", at::kInt, dev);
  check_tensor(block_tables, "block_tables", at::kInt, dev);
  check_tensor(out, "out", at::kFloat, dev);
  HX_OP_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [batch, nq, d]");
  HX_OP_CHECK(kc.dim() == 3 && kc.sizes() == vc.sizes() && kc.size(2) == q.size(2), "caches must be [nk, cap, d]");
  HX_OP_CHECK(seq_lens.numel() == q.size(0), "seq_lens must hold one value per sequence");
  HX_OP_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && block_tables.size(1) > 0,
              "block_tables must be [batch, max_blocks]");
  const int batch = as_int(q.size(0), "batch"), nq = as_int(q.size(1), "nq"), d = as_int(q.size(2), "d");
  const int nk = as_int(kc.size(0), "nk"), cap = as_int(kc.size(1), "cap");
  const int max_blocks = as_int(block_tables.size(1), "max_blocks"), bs = as_int(block_size, "block_size");
  HX_OP_CHECK(static_cast<int64_t>(max_blocks) * bs <= INT32_MAX, "max_blocks * block_size out of range");
  HX_OP_CHECK(nk > 0 && nq % nk == 0, "nq must be a multiple of the cache's kv heads");
  const size_t ws_bytes = attention_decode_workspace_bytes(batch, nq, nk, d, max_blocks * bs);
  // Zeroed like the model's (the kernel writes every partial state it reads).
  at::Tensor ws = at::zeros({static_cast<int64_t>((ws_bytes + 3) / 4) + 1}, q.options());
  attention_decode_launch(q.data_ptr<float>(), bf16_ptr(kc), bf16_ptr(vc), seq_lens.data_ptr<int32_t>(),
                          block_tables.data_ptr<int32_t>(), max_blocks, bs, out.data_ptr<float>(), ws.data_ptr<float>(),
                          ws_bytes, batch, nq, nk, d, cap, static_cast<float>(scale), stream_of(q),
                          stage_ptr(x_stage, out.numel(), dev));
}

void op_attention_prefill(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                          const at::Tensor& block_table, int64_t block_size, int64_t start_pos, at::Tensor& out,
                          double scale, bool scalar) {
  const c10::cuda::CUDAGuard guard(cuda_device(q, "q"));
  const auto dev = q.device();
  check_tensor(q, "q", at::kFloat, dev);
  check_tensor(kc, "k_cache", at::kBFloat16, dev);
  check_tensor(vc, "v_cache", at::kBFloat16, dev);
  check_tensor(block_table, "block_table", at::kInt, dev);
  check_tensor(out, "out", at::kFloat, dev);
  HX_OP_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [n, nq, d]");
  HX_OP_CHECK(kc.dim() == 3 && kc.sizes() == vc.sizes() && kc.size(2) == q.size(2), "caches must be [nk, cap, d]");
  HX_OP_CHECK(block_table.dim() == 1, "block_table must be [max_blocks]");
  const int n = as_int(q.size(0), "n"), nq = as_int(q.size(1), "nq"), d = as_int(q.size(2), "d");
  const int nk = as_int(kc.size(0), "nk"), cap = as_int(kc.size(1), "cap");
  auto launch = scalar ? attention_prefill_scalar_launch : attention_prefill_launch;
  launch(q.data_ptr<float>(), bf16_ptr(kc), bf16_ptr(vc), block_table.data_ptr<int32_t>(),
         as_int(block_table.numel(), "max_blocks"), as_int(block_size, "block_size"), as_int(start_pos, "start_pos"), n,
         out.data_ptr<float>(), nq, nk, d, cap, static_cast<float>(scale), stream_of(q));
}

void op_swiglu(const at::Tensor& gate, const at::Tensor& up, const std::optional<at::Tensor>& out_f32,
               const std::optional<at::Tensor>& out_bf16, const std::optional<at::Tensor>& x_stage) {
  const c10::cuda::CUDAGuard guard(cuda_device(gate, "gate"));
  const auto dev = gate.device();
  check_tensor(gate, "gate", at::kFloat, dev);
  check_tensor(up, "up", at::kFloat, dev);
  HX_OP_CHECK(gate.sizes() == up.sizes(), "gate and up must have one shape");
  float* of = nullptr;
  __nv_bfloat16* ob = nullptr;
  if (out_f32.has_value() && out_f32->defined()) {
    check_tensor(*out_f32, "out_f32", at::kFloat, dev);
    HX_OP_CHECK(out_f32->numel() == gate.numel(), "out_f32 must have gate's size");
    of = out_f32->data_ptr<float>();
  }
  if (out_bf16.has_value() && out_bf16->defined()) {
    check_tensor(*out_bf16, "out_bf16", at::kBFloat16, dev);
    HX_OP_CHECK(out_bf16->numel() == gate.numel(), "out_bf16 must have gate's size");
    ob = bf16_ptr(*out_bf16);
  }
  swiglu_launch(gate.data_ptr<float>(), up.data_ptr<float>(), of, ob, gate.numel(), stream_of(gate),
                stage_ptr(x_stage, gate.numel(), dev));
}

void op_f32_to_bf16(const at::Tensor& x, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, "x"));
  check_tensor(x, "x", at::kFloat, x.device());
  check_tensor(out, "out", at::kBFloat16, x.device());
  HX_OP_CHECK(out.numel() == x.numel(), "out must have x's size");
  f32_to_bf16_launch(x.data_ptr<float>(), bf16_ptr(out), x.numel(), stream_of(x));
}

void op_bf16_to_f32(const at::Tensor& x, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, "x"));
  check_tensor(x, "x", at::kBFloat16, x.device());
  check_tensor(out, "out", at::kFloat, x.device());
  HX_OP_CHECK(out.numel() == x.numel(), "out must have x's size");
  bf16_to_f32_launch(bf16_ptr(x), out.data_ptr<float>(), x.numel(), stream_of(x));
}

// ----------------------------------------------------------------- sampling

at::Tensor op_sampling_params_device(double temperature, int64_t top_k, double top_p, double min_p,
                                     double repetition_penalty, double presence_penalty, double frequency_penalty,
                                     int64_t seed, at::Device device) {
  SamplingParamsDevice p{};
  p.temperature = static_cast<float>(temperature);
  p.top_k = static_cast<int32_t>(top_k < 0 ? 0 : (top_k > INT32_MAX ? INT32_MAX : top_k));
  p.top_p = static_cast<float>(top_p);
  p.min_p = static_cast<float>(min_p);
  p.repetition_penalty = static_cast<float>(repetition_penalty);
  p.presence_penalty = static_cast<float>(presence_penalty);
  p.frequency_penalty = static_cast<float>(frequency_penalty);
  p.reserved = 0;
  p.seed = static_cast<uint64_t>(seed);
  at::Tensor host = at::empty({static_cast<int64_t>(sizeof(p))}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(host.data_ptr(), &p, sizeof(p));
  return host.to(device);
}

const SamplingParamsDevice* params_ptr(const at::Tensor& params, const at::Device& dev) {
  check_tensor(params, "params", at::kByte, dev);
  HX_OP_CHECK(params.numel() == static_cast<int64_t>(sizeof(SamplingParamsDevice)), "params must hold ",
              sizeof(SamplingParamsDevice), " bytes (torch.ops.helexa.sampling_params_device)");
  return reinterpret_cast<const SamplingParamsDevice*>(params.data_ptr());
}

void op_penalties(const at::Tensor& logits, at::Tensor& out, const at::Tensor& params, const at::Tensor& present,
                  const at::Tensor& counts) {
  const c10::cuda::CUDAGuard guard(cuda_device(logits, "logits"));
  const auto dev = logits.device();
  check_tensor(logits, "logits", at::kFloat, dev);
  check_tensor(out, "out", at::kFloat, dev);
  check_tensor(present, "present", at::kInt, dev);
  check_tensor(counts, "counts", at::kInt, dev);
  const int64_t v = logits.numel();
  HX_OP_CHECK(out.numel() == v && present.numel() == v && counts.numel() == v,
              "out, present and counts must have vocab elements");
  penalties_launch(logits.data_ptr<float>(), out.data_ptr<float>(), as_int(v, "vocab"), params_ptr(params, dev),
                   present.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), stream_of(logits));
}

void op_argmax(const at::Tensor& logits, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(cuda_device(logits, "logits"));
  check_tensor(logits, "logits", at::kFloat, logits.device());
  check_tensor(out, "out", at::kInt, logits.device());
  HX_OP_CHECK(out.numel() == 1, "out must hold one value");
  argmax_launch(logits.data_ptr<float>(), as_int(logits.numel(), "vocab"), out.data_ptr<int32_t>(), stream_of(logits));
}

void op_sample(const at::Tensor& logits, const at::Tensor& params, const at::Tensor& step, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(cuda_device(logits, "logits"));
  const auto dev = logits.device();
  check_tensor(logits, "logits", at::kFloat, dev);
  check_tensor(step, "step", at::kInt, dev);
  check_tensor(out, "out", at::kInt, dev);
  HX_OP_CHECK(step.numel() == 1 && out.numel() == 1, "step and out must hold one value");
  const int vocab = as_int(logits.numel(), "vocab");
  const size_t ws_bytes = sample_workspace_bytes(vocab);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
  sample_launch(logits.data_ptr<float>(), vocab, params_ptr(params, dev), step.data_ptr<int32_t>(),
                out.data_ptr<int32_t>(), ws.data_ptr(), ws_bytes, stream_of(logits));
}

void op_logprobs(const at::Tensor& logits, int64_t top_n, const at::Tensor& token, at::Tensor& out_logprob,
                 at::Tensor& out_top_ids, at::Tensor& out_top_lp) {
  const c10::cuda::CUDAGuard guard(cuda_device(logits, "logits"));
  const auto dev = logits.device();
  check_tensor(logits, "logits", at::kFloat, dev);
  check_tensor(token, "token", at::kInt, dev);
  check_tensor(out_logprob, "out_logprob", at::kFloat, dev);
  check_tensor(out_top_ids, "out_top_ids", at::kInt, dev);
  check_tensor(out_top_lp, "out_top_lp", at::kFloat, dev);
  HX_OP_CHECK(token.numel() == 1 && out_logprob.numel() == 1, "token and out_logprob must hold one value");
  HX_OP_CHECK(top_n >= 0 && top_n <= kMaxTopLogprobs, "top_n must be in [0, ", kMaxTopLogprobs, "]");
  HX_OP_CHECK(out_top_ids.numel() >= top_n && out_top_lp.numel() >= top_n, "top outputs need top_n elements");
  logprobs_launch(logits.data_ptr<float>(), as_int(logits.numel(), "vocab"), static_cast<int>(top_n),
                  token.data_ptr<int32_t>(), out_logprob.data_ptr<float>(), out_top_ids.data_ptr<int32_t>(),
                  out_top_lp.data_ptr<float>(), stream_of(logits));
}

// ------------------------------------------------------- sampling, batched

// B rows of sampling_params_device, concatenated: [B * 40] or [B, 40] bytes.
const SamplingParamsDevice* batch_params_ptr(const at::Tensor& params, int64_t B, const at::Device& dev) {
  check_tensor(params, "params", at::kByte, dev);
  const int64_t row = static_cast<int64_t>(sizeof(SamplingParamsDevice));
  HX_OP_CHECK(params.numel() == B * row, "params must hold B * ", row, " = ", B * row, " bytes (B rows of ",
              "torch.ops.helexa.sampling_params_device, concatenated), got ", params.numel());
  HX_OP_CHECK(reinterpret_cast<uintptr_t>(params.data_ptr()) % alignof(SamplingParamsDevice) == 0,
              "params must start on an ", alignof(SamplingParamsDevice), "-byte boundary");
  return reinterpret_cast<const SamplingParamsDevice*>(params.data_ptr());
}

// logits [B, vocab] float32: returns (B, vocab).
std::pair<int, int> logits_rows(const at::Tensor& logits, const at::Device& dev) {
  check_tensor(logits, "logits", at::kFloat, dev);
  HX_OP_CHECK(logits.dim() == 2, "logits must be [B, vocab]");
  return {as_int(logits.size(0), "B"), as_int(logits.size(1), "vocab")};
}

// A penalty slot pool tensor: [max_slots, vocab] int32.
void check_pool(const at::Tensor& t, const char* name, int64_t vocab, const at::Device& dev) {
  check_tensor(t, name, at::kInt, dev);
  HX_OP_CHECK(t.dim() == 2 && t.size(1) == vocab, name, " must be [max_slots, vocab] with vocab = ", vocab);
}

void op_penalties_batch(const at::Tensor& logits, at::Tensor& out, const at::Tensor& params, const at::Tensor& slots,
                        const at::Tensor& present, const at::Tensor& counts) {
  const c10::cuda::CUDAGuard guard(cuda_device(logits, "logits"));
  const auto dev = logits.device();
  const auto [B, vocab] = logits_rows(logits, dev);
  check_tensor(out, "out", at::kFloat, dev);
  HX_OP_CHECK(out.sizes() == logits.sizes(), "out must match logits");
  check_tensor(slots, "slots", at::kInt, dev);
  HX_OP_CHECK(slots.numel() == B, "slots must have B elements");
  check_pool(present, "present", vocab, dev);
  check_pool(counts, "counts", vocab, dev);
  HX_OP_CHECK(counts.size(0) == present.size(0), "present and counts must have the same slots");
  penalties_batch_launch(logits.data_ptr<float>(), out.data_ptr<float>(), B, vocab, batch_params_ptr(params, B, dev),
                         slots.data_ptr<int32_t>(), present.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                         as_int(present.size(0), "max_slots"), stream_of(logits));
}

void op_penalty_update_batch(const at::Tensor& tokens, const at::Tensor& slots, at::Tensor& present,
                             const std::optional<at::Tensor>& counts) {
  const c10::cuda::CUDAGuard guard(cuda_device(present, "present"));
  const auto dev = present.device();
  check_tensor(tokens, "tokens", at::kInt, dev);
  check_tensor(slots, "slots", at::kInt, dev);
  HX_OP_CHECK(tokens.numel() == slots.numel(), "tokens and slots must have one element per entry");
  check_tensor(present, "present", at::kInt, dev);
  HX_OP_CHECK(present.dim() == 2, "present must be [max_slots, vocab]");
  int32_t* c = nullptr;
  if (counts.has_value() && counts->defined()) {
    check_tensor(*counts, "counts", at::kInt, dev);
    HX_OP_CHECK(counts->sizes() == present.sizes(), "counts must match present");
    c = counts->data_ptr<int32_t>();
  }
  penalty_update_batch_launch(tokens.data_ptr<int32_t>(), slots.data_ptr<int32_t>(), as_int(tokens.numel(), "n"),
                              present.data_ptr<int32_t>(), c, as_int(present.size(0), "max_slots"),
                              as_int(present.size(1), "vocab"), stream_of(present));
}

void op_penalty_reset_batch(const at::Tensor& slots, at::Tensor& present, const std::optional<at::Tensor>& counts) {
  const c10::cuda::CUDAGuard guard(cuda_device(present, "present"));
  const auto dev = present.device();
  check_tensor(slots, "slots", at::kInt, dev);
  check_tensor(present, "present", at::kInt, dev);
  HX_OP_CHECK(present.dim() == 2, "present must be [max_slots, vocab]");
  int32_t* c = nullptr;
  if (counts.has_value() && counts->defined()) {
    check_tensor(*counts, "counts", at::kInt, dev);
    HX_OP_CHECK(counts->sizes() == present.sizes(), "counts must match present");
    c = counts->data_ptr<int32_t>();
  }
  penalty_reset_batch_launch(slots.data_ptr<int32_t>(), as_int(slots.numel(), "n"), present.data_ptr<int32_t>(), c,
                             as_int(present.size(0), "max_slots"), as_int(present.size(1), "vocab"),
                             stream_of(present));
}

void op_argmax_batch(const at::Tensor& logits, at::Tensor& out, bool sliced) {
  const c10::cuda::CUDAGuard guard(cuda_device(logits, "logits"));
  const auto dev = logits.device();
  const auto [B, vocab] = logits_rows(logits, dev);
  check_tensor(out, "out", at::kInt, dev);
  HX_OP_CHECK(out.numel() == B, "out must have B elements");
  // sliced: the model's form, each row's slices in blocks of their own.
  at::Tensor ws;
  if (sliced)
    ws = at::empty({static_cast<int64_t>(argmax_workspace_bytes(B, vocab)) + 8},
                   at::TensorOptions().dtype(at::kByte).device(dev));
  argmax_batch_launch(logits.data_ptr<float>(), B, vocab, out.data_ptr<int32_t>(), stream_of(logits),
                      sliced ? ws.data_ptr() : nullptr, sliced ? static_cast<size_t>(ws.nbytes()) : 0);
}

void op_sample_batch(const at::Tensor& logits, const at::Tensor& params, const at::Tensor& steps, at::Tensor& out,
                     bool candidate_prefix, const std::optional<at::Tensor>& sorted_in_full) {
  const c10::cuda::CUDAGuard guard(cuda_device(logits, "logits"));
  const auto dev = logits.device();
  const auto [B, vocab] = logits_rows(logits, dev);
  check_tensor(steps, "steps", at::kInt, dev);
  check_tensor(out, "out", at::kInt, dev);
  HX_OP_CHECK(steps.numel() == B && out.numel() == B, "steps and out must have B elements");
  HX_OP_CHECK(static_cast<int64_t>(B) * vocab <= INT32_MAX, "B * vocab must be below 2^31");
  const SamplingParamsDevice* p = batch_params_ptr(params, B, dev);
  int32_t* full = nullptr;
  if (sorted_in_full.has_value() && sorted_in_full->defined()) {
    check_tensor(*sorted_in_full, "sorted_in_full", at::kInt, dev);
    HX_OP_CHECK(sorted_in_full->numel() == B, "sorted_in_full must have B elements");
    full = sorted_in_full->data_ptr<int32_t>();
  }
  if (B == 0) return;
  const size_t ws_bytes = sample_batch_workspace_bytes(B, vocab);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
  sample_batch_launch(logits.data_ptr<float>(), B, vocab, p, steps.data_ptr<int32_t>(), out.data_ptr<int32_t>(),
                      ws.data_ptr(), ws_bytes, stream_of(logits), candidate_prefix, full);
}

void op_logprobs_batch(const at::Tensor& logits, int64_t top_n, const at::Tensor& tokens, at::Tensor& out_logprob,
                       at::Tensor& out_top_ids, at::Tensor& out_top_lp) {
  const c10::cuda::CUDAGuard guard(cuda_device(logits, "logits"));
  const auto dev = logits.device();
  const auto [B, vocab] = logits_rows(logits, dev);
  check_tensor(tokens, "tokens", at::kInt, dev);
  check_tensor(out_logprob, "out_logprob", at::kFloat, dev);
  check_tensor(out_top_ids, "out_top_ids", at::kInt, dev);
  check_tensor(out_top_lp, "out_top_lp", at::kFloat, dev);
  HX_OP_CHECK(tokens.numel() == B && out_logprob.numel() == B, "tokens and out_logprob must have B elements");
  HX_OP_CHECK(top_n >= 0 && top_n <= kMaxTopLogprobs, "top_n must be in [0, ", kMaxTopLogprobs, "]");
  HX_OP_CHECK(out_top_ids.numel() == static_cast<int64_t>(B) * kMaxTopLogprobs &&
                  out_top_lp.numel() == static_cast<int64_t>(B) * kMaxTopLogprobs,
              "out_top_ids and out_top_lp must be [B, ", kMaxTopLogprobs, "]");
  logprobs_batch_launch(logits.data_ptr<float>(), B, vocab, static_cast<int>(top_n), tokens.data_ptr<int32_t>(),
                        out_logprob.data_ptr<float>(), out_top_ids.data_ptr<int32_t>(), out_top_lp.data_ptr<float>(),
                        stream_of(logits));
}

void op_constrain_batch(const at::Tensor& logits, at::Tensor& out, const at::Tensor& rows, const at::Tensor& data) {
  const c10::cuda::CUDAGuard guard(cuda_device(logits, "logits"));
  const auto dev = logits.device();
  const auto [B, vocab] = logits_rows(logits, dev);
  check_tensor(out, "out", at::kFloat, dev);
  HX_OP_CHECK(out.sizes() == logits.sizes(), "out must match logits");
  check_tensor(rows, "rows", at::kInt, dev);
  HX_OP_CHECK(rows.numel() == static_cast<int64_t>(B) * kConstrainDescInts, "rows must be [B, ", kConstrainDescInts,
              "]");
  check_tensor(data, "data", at::kInt, dev);
  // Descriptors are read on the device; check them here so a bad one fails as an argument error.
  const at::Tensor desc = rows.to(at::kCPU);
  const int32_t* d = desc.data_ptr<int32_t>();
  const int64_t words = data.numel(), mask_words = constrain_mask_words(vocab);
  for (int b = 0; b < B; ++b) {
    const int64_t mask_off = d[kConstrainDescInts * b], bias_off = d[kConstrainDescInts * b + 1],
                  bias_n = d[kConstrainDescInts * b + 2];
    HX_OP_CHECK(mask_off == -1 || (mask_off >= 0 && mask_off + mask_words <= words), "row ", b,
                ": the mask lies outside data");
    HX_OP_CHECK(bias_n >= 0 && (bias_n == 0 || (bias_off >= 0 && bias_off + 2 * bias_n <= words)), "row ", b,
                ": the bias list lies outside data");
  }
  if (B == 0) return;
  constrain_batch_launch(logits.data_ptr<float>(), out.data_ptr<float>(), B, vocab, rows.data_ptr<int32_t>(),
                         data.data_ptr<int32_t>(), stream_of(logits));
}

void op_sum_rows(const at::Tensor& src, at::Tensor& dst, bool accumulate) {
  const c10::cuda::CUDAGuard guard(cuda_device(src, "src"));
  const auto dev = src.device();
  check_tensor(src, "src", at::kFloat, dev);
  check_tensor(dst, "dst", at::kFloat, dev);
  HX_OP_CHECK(src.dim() == 2, "src must be [n, h]");
  HX_OP_CHECK(dst.numel() == src.size(1), "dst must have h elements");
  sum_rows_launch(src.data_ptr<float>(), as_int(src.size(0), "n"), as_int(src.size(1), "h"), dst.data_ptr<float>(),
                  accumulate, stream_of(src));
}

}  // namespace
}  // namespace hx

TORCH_LIBRARY_FRAGMENT(helexa, m) {
  m.def("embedding(Tensor table, int type, Tensor ids, Tensor(a!) out, int vocab) -> ()", &hx::op_embedding);
  m.def(
      "add_rms_norm(Tensor(a!) residual, Tensor? delta, Tensor weight, float eps, Tensor(b!)? out_f32, "
      "Tensor(c!)? out_bf16, Tensor(d!)? x_stage=None) -> ()",
      &hx::op_add_rms_norm);
  m.def("quantize_x(Tensor x, Tensor(a!) stage) -> ()", &hx::op_quantize_x);
  m.def("head_rms_norm(Tensor(a!) x, Tensor weight, float eps) -> ()", &hx::op_head_rms_norm);
  m.def("rope(Tensor(a!) q, Tensor(b!) k, Tensor pos, Tensor inv_freq, str style) -> ()", &hx::op_rope);
  m.def("kv_append(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_pos) -> ()",
        &hx::op_kv_append);
  m.def("rope_table(Tensor inv_freq, Tensor(a!) table) -> ()", &hx::op_rope_table);
  m.def(
      "rope_kv_append(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor pos, "
      "Tensor slot_pos, Tensor? table, Tensor inv_freq, Tensor? q_norm, Tensor? k_norm, float eps, str style) -> ()",
      &hx::op_rope_kv_append);
  m.def(
      "attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, Tensor block_tables, "
      "int block_size, Tensor(a!) out, float scale, Tensor(b!)? x_stage=None) -> ()",
      &hx::op_attention_decode);
  m.def(
      "attention_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, int block_size, "
      "int start_pos, Tensor(a!) out, float scale, bool scalar=False) -> ()",
      &hx::op_attention_prefill);
  m.def("swiglu(Tensor gate, Tensor up, Tensor(a!)? out_f32, Tensor(b!)? out_bf16, Tensor(c!)? x_stage=None) -> ()",
        &hx::op_swiglu);
  m.def("f32_to_bf16(Tensor x, Tensor(a!) out) -> ()", &hx::op_f32_to_bf16);
  m.def("bf16_to_f32(Tensor x, Tensor(a!) out) -> ()", &hx::op_bf16_to_f32);
  m.def(
      "sampling_params_device(float temperature, int top_k, float top_p, float min_p, float repetition_penalty, "
      "float presence_penalty, float frequency_penalty, int seed, Device device) -> Tensor",
      &hx::op_sampling_params_device);
  m.def("penalties(Tensor logits, Tensor(a!) out, Tensor params, Tensor present, Tensor counts) -> ()",
        &hx::op_penalties);
  m.def("argmax(Tensor logits, Tensor(a!) out) -> ()", &hx::op_argmax);
  m.def("sample(Tensor logits, Tensor params, Tensor step, Tensor(a!) out) -> ()", &hx::op_sample);
  m.def(
      "logprobs(Tensor logits, int top_n, Tensor token, Tensor(a!) out_logprob, Tensor(b!) out_top_ids, "
      "Tensor(c!) out_top_lp) -> ()",
      &hx::op_logprobs);
  m.def(
      "penalties_batch(Tensor logits, Tensor(a!) out, Tensor params, Tensor slots, Tensor present, "
      "Tensor counts) -> ()",
      &hx::op_penalties_batch);
  m.def("penalty_update_batch(Tensor tokens, Tensor slots, Tensor(a!) present, Tensor(b!)? counts) -> ()",
        &hx::op_penalty_update_batch);
  m.def("penalty_reset_batch(Tensor slots, Tensor(a!) present, Tensor(b!)? counts) -> ()", &hx::op_penalty_reset_batch);
  m.def("argmax_batch(Tensor logits, Tensor(a!) out, bool sliced=False) -> ()", &hx::op_argmax_batch);
  m.def(
      "sample_batch(Tensor logits, Tensor params, Tensor steps, Tensor(a!) out, bool candidate_prefix=True, "
      "Tensor(b!)? sorted_in_full=None) -> ()",
      &hx::op_sample_batch);
  m.def(
      "logprobs_batch(Tensor logits, int top_n, Tensor tokens, Tensor(a!) out_logprob, Tensor(b!) out_top_ids, "
      "Tensor(c!) out_top_lp) -> ()",
      &hx::op_logprobs_batch);
  m.def("constrain_batch(Tensor logits, Tensor(a!) out, Tensor rows, Tensor data) -> ()", &hx::op_constrain_batch);
  m.def("sum_rows(Tensor src, Tensor(a!) dst, bool accumulate) -> ()", &hx::op_sum_rows);
}

// Torch ops over the mixture-of-experts kernels (routing, grouping, expert
// products, combine), for tests: torch.ops.helexa.<name>(...) after
// `import helexa_native._C`.
//
// Outputs are caller-allocated (tests poison them first). Tensors are checked
// for device, dtype, size and contiguity; launches go to the current stream of
// the tensors' device. CUDA builds only (setup.py compiles ops*.cpp only then).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bindings/op_check.h"
#include "bindings/op_util.h"

#include <cstdint>
#include <optional>
#include <stdexcept>

#include "common/ggml_types.h"
#include "kernels/matvec.cuh"
#include "kernels/moe_align.cuh"
#include "kernels/moe_combine.cuh"
#include "kernels/moe_route.cuh"

namespace hx {
namespace {

using op::as_int;
using op::check_tensor;
using op::cuda_device;
using op::launch;
using op::stream_of;

void op_moe_route(const at::Tensor& logits, int64_t top_k, bool normalize, at::Tensor& ids, at::Tensor& weights) {
  const c10::cuda::CUDAGuard guard(cuda_device(logits, "logits"));
  const auto dev = logits.device();
  check_tensor(logits, "logits", at::kFloat, dev);
  check_tensor(ids, "ids", at::kInt, dev);
  check_tensor(weights, "weights", at::kFloat, dev);
  HX_OP_CHECK(logits.dim() == 2, "logits must be [n, num_experts]");
  const int n = as_int(logits.size(0), "n", 0), E = as_int(logits.size(1), "num_experts", 1);
  const int k = as_int(top_k, "top_k", 1);
  HX_OP_CHECK(ids.numel() == static_cast<int64_t>(n) * k && weights.numel() == ids.numel(),
              "ids and weights must hold n * top_k entries");
  launch([&] {
    moe_route_launch(logits.data_ptr<float>(), n, E, k, normalize, ids.data_ptr<int32_t>(), weights.data_ptr<float>(),
                     stream_of(dev));
  });
}

void op_moe_align(const at::Tensor& ids, int64_t num_experts, int64_t top_k, at::Tensor& offsets, at::Tensor& active,
                  at::Tensor& n_active, at::Tensor& pair_slot, at::Tensor& slot_token, int64_t tile_rows,
                  at::Tensor& tiles, at::Tensor& n_tiles) {
  const c10::cuda::CUDAGuard guard(cuda_device(ids, "ids"));
  const auto dev = ids.device();
  check_tensor(ids, "ids", at::kInt, dev);
  check_tensor(offsets, "offsets", at::kInt, dev);
  check_tensor(active, "active", at::kInt, dev);
  check_tensor(n_active, "n_active", at::kInt, dev);
  check_tensor(pair_slot, "pair_slot", at::kInt, dev);
  check_tensor(slot_token, "slot_token", at::kInt, dev);
  const int E = as_int(num_experts, "num_experts", 1), P = as_int(ids.numel(), "pairs", 1);
  HX_OP_CHECK(offsets.numel() == E + 1 && active.numel() == E && n_active.numel() == 1,
              "offsets, active and n_active must hold num_experts + 1, num_experts and 1 entries");
  HX_OP_CHECK(pair_slot.numel() == P && slot_token.numel() == P, "pair_slot and slot_token must hold ids.numel()");
  check_tensor(tiles, "tiles", at::kInt, dev);
  check_tensor(n_tiles, "n_tiles", at::kInt, dev);
  const int tr = as_int(tile_rows, "tile_rows", 1);
  HX_OP_CHECK(
      tiles.dim() == 2 && tiles.size(1) == 4 && tiles.size(0) >= moe_max_tiles(P, E, tr) && n_tiles.numel() == 1,
      "tiles must be [moe_max_tiles, 4] and n_tiles hold 1 entry");
  launch([&] {
    moe_align_launch(ids.data_ptr<int32_t>(), P, E, as_int(top_k, "top_k", 1), offsets.data_ptr<int32_t>(),
                     active.data_ptr<int32_t>(), n_active.data_ptr<int32_t>(), pair_slot.data_ptr<int32_t>(),
                     slot_token.data_ptr<int32_t>(), tr, reinterpret_cast<int4*>(tiles.data_ptr<int32_t>()),
                     n_tiles.data_ptr<int32_t>(), stream_of(dev));
  });
}

void op_moe_combine(at::Tensor& x, const at::Tensor& y, const at::Tensor& weights,
                    const std::optional<at::Tensor>& pair_slot) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, "x"));
  const auto dev = x.device();
  check_tensor(x, "x", at::kFloat, dev);
  check_tensor(y, "y", at::kFloat, dev);
  check_tensor(weights, "weights", at::kFloat, dev);
  HX_OP_CHECK(x.dim() == 2 && weights.dim() == 2 && weights.size(0) == x.size(0), "x [n, h], weights [n, top_k]");
  const int n = as_int(x.size(0), "n", 0), h = as_int(x.size(1), "h", 1), k = as_int(weights.size(1), "top_k", 1);
  HX_OP_CHECK(y.numel() == static_cast<int64_t>(n) * k * h, "y must be [n * top_k, h]");
  const int32_t* slots = nullptr;
  if (pair_slot && pair_slot->defined()) {
    check_tensor(*pair_slot, "pair_slot", at::kInt, dev);
    HX_OP_CHECK(pair_slot->numel() == static_cast<int64_t>(n) * k, "pair_slot must hold n * top_k entries");
    slots = pair_slot->data_ptr<int32_t>();
  }
  launch([&] {
    moe_combine_launch(x.data_ptr<float>(), y.data_ptr<float>(), weights.data_ptr<float>(), slots, n, k, h,
                       stream_of(dev));
  });
}

// w: [num_experts, stride] uint8, each expert's n_out stored rows of k elements at the start of its row.
void check_experts(const at::Tensor& w, int64_t type, int n_out, int k, const at::Device& dev) {
  check_tensor(w, "w", at::kByte, dev);
  const auto t = static_cast<GgmlType>(type);
  HX_OP_CHECK(type >= 0 && type <= 64 && is_supported(t), "unsupported GGML type id ", type);
  HX_OP_CHECK(w.dim() == 2 && static_cast<size_t>(w.size(1)) >= row_bytes(t, k) * static_cast<size_t>(n_out),
              "w must be [num_experts, stride] with room for ", n_out, " rows of ", k, " ", type_name(t), " elements");
}

// The grouped products' routing arrays and rows (x of `x_type`): returns num_experts.
int check_groups(const at::Tensor& w, int64_t type, int n_out, int k, const at::Tensor& offsets,
                 const at::Tensor& active, const at::Tensor& n_active, const at::Tensor& x, at::ScalarType x_type,
                 const at::Tensor& y, const at::Device& dev) {
  check_experts(w, type, n_out, k, dev);
  const int E = as_int(w.size(0), "num_experts", 1);
  check_tensor(offsets, "offsets", at::kInt, dev);
  check_tensor(active, "active", at::kInt, dev);
  check_tensor(n_active, "n_active", at::kInt, dev);
  check_tensor(x, "x", x_type, dev);
  check_tensor(y, "y", at::kFloat, dev);
  HX_OP_CHECK(offsets.numel() == E + 1 && active.numel() == E && n_active.numel() == 1,
              "offsets, active and n_active must hold num_experts + 1, num_experts and 1 entries");
  HX_OP_CHECK(x.dim() == 2 && x.size(1) == k && y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == n_out,
              "x must be [rows, k] and y [rows, n_out]");
  return E;
}

void op_matvec_expert_pairs(int64_t type, const at::Tensor& w, const at::Tensor& ids, const at::Tensor& x,
                            int64_t x_div, at::Tensor& y, int64_t n_out, int64_t k) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, "x"));
  const auto dev = x.device();
  const int no = as_int(n_out, "n_out", 1), kk = as_int(k, "k", 1), div = as_int(x_div, "x_div", 1);
  check_experts(w, type, no, kk, dev);
  check_tensor(ids, "ids", at::kInt, dev);
  check_tensor(x, "x", at::kFloat, dev);
  check_tensor(y, "y", at::kFloat, dev);
  const int count = as_int(ids.numel(), "count", 1);
  HX_OP_CHECK(x.numel() >= static_cast<int64_t>((count - 1) / div + 1) * kk, "x must hold count / x_div rows of k");
  HX_OP_CHECK(y.numel() == static_cast<int64_t>(count) * no, "y must be [count, n_out]");
  launch([&] {
    matvec_expert_pairs_launch(static_cast<GgmlType>(type), w.data_ptr(), static_cast<size_t>(w.size(1)),
                               as_int(w.size(0), "num_experts", 1), ids.data_ptr<int32_t>(), x.data_ptr<float>(), div,
                               y.data_ptr<float>(), no, kk, count, stream_of(dev));
  });
}

void op_matvec_expert_pairs_glu(int64_t type, const at::Tensor& w, const at::Tensor& ids, const at::Tensor& x,
                                int64_t x_div, at::Tensor& y, int64_t f, int64_t k) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, "x"));
  const auto dev = x.device();
  const int ff = as_int(f, "f", 1), kk = as_int(k, "k", 1), div = as_int(x_div, "x_div", 1);
  check_experts(w, type, 2 * ff, kk, dev);
  check_tensor(ids, "ids", at::kInt, dev);
  check_tensor(x, "x", at::kFloat, dev);
  check_tensor(y, "y", at::kFloat, dev);
  const int count = as_int(ids.numel(), "count", 1);
  HX_OP_CHECK(x.numel() >= static_cast<int64_t>((count - 1) / div + 1) * kk, "x must hold count / x_div rows of k");
  HX_OP_CHECK(y.numel() == static_cast<int64_t>(count) * ff, "y must be [count, f]");
  launch([&] {
    matvec_expert_pairs_glu_launch(static_cast<GgmlType>(type), w.data_ptr(), static_cast<size_t>(w.size(1)),
                                   as_int(w.size(0), "num_experts", 1), ids.data_ptr<int32_t>(), x.data_ptr<float>(),
                                   div, y.data_ptr<float>(), ff, kk, count, stream_of(dev));
  });
}

void op_matvec_expert_combine(int64_t type, const at::Tensor& w, const at::Tensor& ids, const at::Tensor& mix,
                              const at::Tensor& act, at::Tensor& x, int64_t n_out, int64_t k) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, "x"));
  const auto dev = x.device();
  const int no = as_int(n_out, "n_out", 1), kk = as_int(k, "k", 1);
  check_experts(w, type, no, kk, dev);
  check_tensor(ids, "ids", at::kInt, dev);
  check_tensor(mix, "mix", at::kFloat, dev);
  check_tensor(act, "act", at::kFloat, dev);
  check_tensor(x, "x", at::kFloat, dev);
  HX_OP_CHECK(ids.dim() == 2 && mix.sizes() == ids.sizes(), "ids and mix must be [n_tok, top_k]");
  const int n = as_int(ids.size(0), "n_tok", 1), top_k = as_int(ids.size(1), "top_k", 1);
  HX_OP_CHECK(act.dim() == 2 && act.size(0) == static_cast<int64_t>(n) * top_k && act.size(1) == kk,
              "act must be [n_tok * top_k, k]");
  HX_OP_CHECK(x.dim() == 2 && x.size(0) == n && x.size(1) == no, "x must be [n_tok, n_out]");
  launch([&] {
    matvec_expert_combine_launch(static_cast<GgmlType>(type), w.data_ptr(), static_cast<size_t>(w.size(1)),
                                 as_int(w.size(0), "num_experts", 1), ids.data_ptr<int32_t>(), mix.data_ptr<float>(),
                                 top_k, act.data_ptr<float>(), x.data_ptr<float>(), no, kk, n, false, stream_of(dev));
  });
}

void op_matvec_expert_groups(int64_t type, const at::Tensor& w, const at::Tensor& offsets, const at::Tensor& active,
                             const at::Tensor& n_active, int64_t max_groups, const at::Tensor& x, at::Tensor& y,
                             int64_t n_out, int64_t k) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, "x"));
  const auto dev = x.device();
  const int no = as_int(n_out, "n_out", 1), kk = as_int(k, "k", 1);
  const int E = check_groups(w, type, no, kk, offsets, active, n_active, x, at::kFloat, y, dev);
  launch([&] {
    matvec_expert_groups_launch(static_cast<GgmlType>(type), w.data_ptr(), static_cast<size_t>(w.size(1)), E,
                                offsets.data_ptr<int32_t>(), active.data_ptr<int32_t>(), n_active.data_ptr<int32_t>(),
                                as_int(max_groups, "max_groups", 1), x.data_ptr<float>(), y.data_ptr<float>(), no, kk,
                                stream_of(dev));
  });
}

void op_matmul_tc_expert_groups(int64_t type, const at::Tensor& w, const at::Tensor& tiles, const at::Tensor& n_tiles,
                                int64_t tile_rows, const at::Tensor& x, at::Tensor& y, int64_t n_out, int64_t k) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, "x"));
  const auto dev = x.device();
  const int no = as_int(n_out, "n_out", 1), kk = as_int(k, "k", 1);
  check_experts(w, type, no, kk, dev);
  check_tensor(tiles, "tiles", at::kInt, dev);
  check_tensor(n_tiles, "n_tiles", at::kInt, dev);
  check_tensor(x, "x", at::kBFloat16, dev);
  check_tensor(y, "y", at::kFloat, dev);
  HX_OP_CHECK(tiles.dim() == 2 && tiles.size(1) == 4 && n_tiles.numel() == 1,
              "tiles must be [max_tiles, 4] (moe_align's list) and n_tiles hold 1 entry");
  HX_OP_CHECK(x.dim() == 2 && x.size(1) == kk && y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == no,
              "x must be [rows, k] and y [rows, n_out]");
  const TcOptions opt = tc_options_from_env();
  launch([&] {
    matmul_tc_expert_groups_launch(
        static_cast<GgmlType>(type), w.data_ptr(), static_cast<size_t>(w.size(1)),
        reinterpret_cast<const int4*>(tiles.data_ptr<int32_t>()), n_tiles.data_ptr<int32_t>(),
        as_int(tiles.size(0), "max_tiles", 1), as_int(tile_rows, "tile_rows", 8),
        reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), y.data_ptr<float>(), no, kk, opt, stream_of(dev));
  });
}

int64_t op_moe_tile_rows(int64_t rows_hint) { return moe_tile_rows(as_int(rows_hint, "rows_hint", 0)); }

}  // namespace
}  // namespace hx

TORCH_LIBRARY_FRAGMENT(helexa, m) {
  m.def("moe_route(Tensor logits, int top_k, bool normalize, Tensor(a!) ids, Tensor(b!) weights) -> ()",
        &hx::op_moe_route);
  m.def(
      "moe_align(Tensor ids, int num_experts, int top_k, Tensor(a!) offsets, Tensor(b!) active, Tensor(c!) n_active, "
      "Tensor(d!) pair_slot, Tensor(e!) slot_token, int tile_rows, Tensor(f!) tiles, Tensor(g!) n_tiles) -> ()",
      &hx::op_moe_align);
  m.def("moe_combine(Tensor(a!) x, Tensor y, Tensor weights, Tensor? pair_slot) -> ()", &hx::op_moe_combine);
  m.def(
      "matvec_expert_pairs(int type, Tensor w, Tensor ids, Tensor x, int x_div, Tensor(a!) y, int n_out, int k) -> ()",
      &hx::op_matvec_expert_pairs);
  m.def(
      "matvec_expert_pairs_glu(int type, Tensor w, Tensor ids, Tensor x, int x_div, Tensor(a!) y, int f, int k) -> ()",
      &hx::op_matvec_expert_pairs_glu);
  m.def(
      "matvec_expert_combine(int type, Tensor w, Tensor ids, Tensor mix, Tensor act, Tensor(a!) x, int n_out, int k) "
      "-> ()",
      &hx::op_matvec_expert_combine);
  m.def(
      "matvec_expert_groups(int type, Tensor w, Tensor offsets, Tensor active, Tensor n_active, int max_groups, "
      "Tensor x, Tensor(a!) y, int n_out, int k) -> ()",
      &hx::op_matvec_expert_groups);
  m.def(
      "matmul_tc_expert_groups(int type, Tensor w, Tensor tiles, Tensor n_tiles, int tile_rows, Tensor x, "
      "Tensor(a!) y, int n_out, int k) -> ()",
      &hx::op_matmul_tc_expert_groups);
  m.def("moe_tile_rows(int rows_hint) -> int", &hx::op_moe_tile_rows);
}

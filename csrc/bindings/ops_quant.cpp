// Torch ops over the weight-reading kernels (matvec, dequantize), for tests
// and benchmarks: torch.ops.helexa.<name>(...) after `import helexa_native._C`.
//
// The ops return new tensors. matvec's result starts NaN-filled (or as a copy
// of y_accumulate), so an element the kernel fails to write shows up in the
// tests. Tensors are checked for device, dtype and size; a weight or input
// that is not 16-byte aligned (a view into a larger buffer) is copied first.
// Launches go to the current stream of the tensors' device.
// CUDA builds only (setup.py compiles ops*.cpp only then).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bindings/op_check.h"
#include "bindings/op_util.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>

#include "common/ggml_types.h"
#include "kernels/dequant.cuh"
#include "kernels/matvec.cuh"

namespace hx {
namespace {

GgmlType checked_type(int64_t type) {
  const auto t = static_cast<GgmlType>(type);
  HX_OP_CHECK(type >= 0 && type <= 64 && is_supported(t), "unsupported GGML type id ", type);
  return t;
}

using op::launch;

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Contiguous and 16-byte aligned (a fresh allocation is).
at::Tensor ready(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

// The weight tensor as raw bytes holding n_out stored rows of k elements.
at::Tensor checked_weights(const at::Tensor& w, GgmlType t, int n_out, int k) {
  HX_OP_CHECK(w.defined() && w.is_cuda(), "w must be a CUDA tensor");
  HX_OP_CHECK(w.scalar_type() == at::kByte, "w must be uint8 (the stored GGUF bytes), got ", w.scalar_type());
  HX_OP_CHECK(k % block_elems(t) == 0, "k=", k, " is not a multiple of the ", type_name(t), " block size ",
              block_elems(t));
  const size_t need = row_bytes(t, k) * static_cast<size_t>(n_out);
  HX_OP_CHECK(static_cast<size_t>(w.numel()) >= need, "w holds ", w.numel(), " bytes; ", n_out, " rows of ", k, " ",
              type_name(t), " elements need ", need);
  return ready(w);
}

// The size facts of a matvec call that need no tensor: checked before any
// guard, allocation or tensor access, so a bad call fails with nothing built.
void check_matvec_sizes(GgmlType t, int64_t n_out, int64_t k) {
  const int64_t qk = block_elems(t);
  HX_OP_CHECK(qk > 0 && k % qk == 0, "k=", k, " is not a multiple of the ", type_name(t), " block size ", qk);
  HX_OP_CHECK(n_out >= 1 && n_out <= INT32_MAX, "n_out out of range: ", n_out);
}

// A product's optional bias (contiguous float32 [n_out]) and its output
// [n_tok, n_out]: a copy of y_accumulate when given (the op never writes the
// caller's tensor), else NaN-filled so an element the kernel skips shows.
struct ProductOut {
  at::Tensor bias, y;
  bool accumulate = false;
};

ProductOut product_out(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& y_accumulate, int64_t ntok, int64_t n_out) {
  const auto dev = x.device();
  ProductOut o;
  if (bias && bias->defined()) {
    HX_OP_CHECK(bias->device() == dev && bias->scalar_type() == at::kFloat && bias->numel() == n_out,
                "bias must be float32 [n_out] on ", dev);
    o.bias = bias->contiguous();
  }
  o.accumulate = y_accumulate && y_accumulate->defined();
  if (o.accumulate) {
    HX_OP_CHECK(y_accumulate->device() == dev && y_accumulate->scalar_type() == at::kFloat &&
                    y_accumulate->numel() == ntok * n_out,
                "y_accumulate must be float32 [n_tok, n_out] on ", dev);
    o.y = y_accumulate->reshape({ntok, n_out}).clone(at::MemoryFormat::Contiguous);
  } else {
    o.y = at::full({ntok, n_out}, NAN, x.options().dtype(at::kFloat));
  }
  return o;
}

at::Tensor op_matvec(int64_t type, const at::Tensor& w, const at::Tensor& x, int64_t n_out, int64_t k,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& y_accumulate, bool int8,
                     bool prequant, int64_t mma, bool mma_local) {
  const GgmlType t = checked_type(type);
  const int no = op::as_int(n_out, "n_out", 1), kk = op::as_int(k, "k", 1);
  check_matvec_sizes(t, n_out, k);
  HX_OP_CHECK(x.defined() && x.is_cuda(), "x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dev = x.device();
  HX_OP_CHECK(w.defined() && w.device() == dev, "w must be on ", dev);
  HX_OP_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  HX_OP_CHECK(x.dim() >= 1 && x.size(-1) == k, "x must be [n_tok, k] with k=", k);
  const int64_t ntok = x.numel() / k;
  HX_OP_CHECK(ntok >= 1 && ntok <= kMatvecMaxTokens, "matvec takes 1..", kMatvecMaxTokens, " tokens, got ", ntok);
  const at::Tensor wc = checked_weights(w, t, no, kk);
  const at::Tensor xc = ready(x);
  const ProductOut po = product_out(x, bias, y_accumulate, ntok, n_out);
  const at::Tensor &bc = po.bias, &y = po.y;
  const bool acc = po.accumulate;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  // prequant: x quantized once into a scratch by its own kernel (as the model runs it).
  // mma: Q4_K's fragment kernel up to that many tokens (its x prepared into the same scratch).
  HX_OP_CHECK(mma >= 0 && mma <= kMatvecMaxTokens, "mma must be 0..", kMatvecMaxTokens, ", got ", mma);
  at::Tensor scratch;
  if ((int8 && prequant) || (mma > 0 && !int8))
    scratch = at::empty({static_cast<int64_t>(matvec_x_scratch_bytes(static_cast<int>(ntok), kk))},
                        x.options().dtype(at::kByte));
  MatvecOptions options;
  options.accumulate = acc;
  options.int8_activations = int8;
  options.mma_tokens = static_cast<int>(mma);
  options.mma_local_prep = mma_local;
  options.x_scratch = scratch.defined() ? scratch.data_ptr() : nullptr;
  launch([&] {
    matvec_launch(t, wc.data_ptr(), xc.data_ptr<float>(), y.data_ptr<float>(), no, kk, static_cast<int>(ntok),
                  bc.defined() ? bc.data_ptr<float>() : nullptr, options, stream);
  });
  return y;
}

// matmul_tc_launch on checked tensors (x contiguous, 16-byte aligned bf16 on
// the current device), its split-K workspace allocated here.
void run_matmul_tc(GgmlType t, const at::Tensor& wc, const at::Tensor& x, float* y, int no, int kk, int ntok,
                   const float* bias, bool accumulate) {
  const TcOptions opt = tc_options_from_env();  // per call: tests time both implementations in one process
  const size_t ws_bytes = matmul_tc_workspace_bytes(ntok, no, kk, opt);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes / 4)}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  launch([&] {
    matmul_tc_launch(t, wc.data_ptr(), reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), y, no, kk, ntok, bias,
                     accumulate, ws.defined() ? ws.data_ptr<float>() : nullptr, ws_bytes, opt, stream);
  });
}

// The tensor-core product of a batch: x bf16 [n_tok, k] (1..kTcMaxTokens rows).
at::Tensor op_matmul_tc(int64_t type, const at::Tensor& w, const at::Tensor& x, int64_t n_out, int64_t k,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& y_accumulate) {
  const GgmlType t = checked_type(type);
  const int no = op::as_int(n_out, "n_out", 1), kk = op::as_int(k, "k", 1);
  check_matvec_sizes(t, n_out, k);
  HX_OP_CHECK(x.defined() && x.is_cuda(), "x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dev = x.device();
  HX_OP_CHECK(w.defined() && w.device() == dev, "w must be on ", dev);
  HX_OP_CHECK(x.scalar_type() == at::kBFloat16, "x must be bfloat16, got ", x.scalar_type());
  HX_OP_CHECK(x.dim() >= 1 && x.size(-1) == k, "x must be [n_tok, k] with k=", k);
  const int64_t ntok = x.numel() / k;
  HX_OP_CHECK(ntok >= 1 && ntok <= kTcMaxTokens, "matmul_tc takes 1..", kTcMaxTokens, " tokens, got ", ntok);
  const at::Tensor wc = checked_weights(w, t, no, kk);
  const at::Tensor xc = ready(x);
  const ProductOut po = product_out(x, bias, y_accumulate, ntok, n_out);
  run_matmul_tc(t, wc, xc, po.y.data_ptr<float>(), no, kk, static_cast<int>(ntok),
                po.bias.defined() ? po.bias.data_ptr<float>() : nullptr, po.accumulate);
  return po.y;
}

// Q4_K weights times bf16 x on the fragment kernel (its x scratch allocated here).
at::Tensor op_matvec_q4k_frag(const at::Tensor& w, const at::Tensor& x, int64_t n_out, int64_t k,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& y_accumulate,
                              bool local) {
  const int no = op::as_int(n_out, "n_out", 1), kk = op::as_int(k, "k", 1);
  check_matvec_sizes(GgmlType::Q4_K, n_out, k);
  HX_OP_CHECK(x.defined() && x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == k,
              "x must be a bfloat16 CUDA tensor [n_tok, k] with k=", k);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dev = x.device();
  const int64_t ntok = x.size(0);
  HX_OP_CHECK(ntok >= 1 && ntok <= kMatvecMaxTokens, "the Q4_K fragment matvec takes 1..", kMatvecMaxTokens,
              " tokens, got ", ntok);
  HX_OP_CHECK(w.defined() && w.device() == dev, "w must be on ", dev);
  const at::Tensor wc = checked_weights(w, GgmlType::Q4_K, no, kk);
  const at::Tensor xc = ready(x);
  const ProductOut po = product_out(x, bias, y_accumulate, ntok, no);
  const at::Tensor scratch = at::empty({static_cast<int64_t>(matvec_x_scratch_bytes(static_cast<int>(ntok), kk))},
                                       x.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  launch([&] {
    matvec_q4k_frag_launch(wc.data_ptr(), reinterpret_cast<const __nv_bfloat16*>(xc.data_ptr()), po.y.data_ptr<float>(),
                           no, kk, static_cast<int>(ntok), po.bias.defined() ? po.bias.data_ptr<float>() : nullptr,
                           po.accumulate, false, scratch.data_ptr(), local, stream);
  });
  return po.y;
}

// bf16 weights [n_out, k] times x [n_tok, k] (bf16, or float32 for up to
// kBf16FragF32Tokens tokens) on the fragment kernel. s1, s2 (-1: n_out) split
// the output rows into runs (matvec_bf16_launch); y (and y_accumulate) then
// hold the runs one after another in [n_tok, n_out]'s memory.
void launch_bf16_frag(const at::Tensor& w, const at::Tensor& x, float* y, const float* bias, bool accumulate,
                      bool static_w, int s1, int s2, cudaStream_t stream) {
  const int no = static_cast<int>(w.size(0)), kk = static_cast<int>(w.size(1)), nt = static_cast<int>(x.size(0));
  const auto* wp = reinterpret_cast<const __nv_bfloat16*>(w.data_ptr());
  launch([&] {
    if (x.scalar_type() == at::kFloat)
      matvec_bf16_launch(wp, x.data_ptr<float>(), y, no, kk, nt, bias, accumulate, static_w, s1, s2, stream);
    else
      matvec_bf16_launch(wp, reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), y, no, kk, nt, bias, accumulate,
                         static_w, s1, s2, stream);
  });
}

void check_bf16_frag(const at::Tensor& w, const at::Tensor& x) {
  HX_OP_CHECK(
      x.defined() && x.is_cuda() && x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
      "x must be a bfloat16 or float32 CUDA tensor [n_tok, k]");
  HX_OP_CHECK(w.defined() && w.device() == x.device() && w.scalar_type() == at::kBFloat16 && w.dim() == 2,
              "w must be a bfloat16 tensor [n_out, k] on ", x.device());
  HX_OP_CHECK(x.size(1) == w.size(1), "x must be [n_tok, k] with k=", w.size(1));
  const int no = op::as_int(w.size(0), "n_out", 1), kk = op::as_int(w.size(1), "k", 1);
  const bool f32 = x.scalar_type() == at::kFloat;
  HX_OP_CHECK(matvec_bf16_usable(no, kk, static_cast<int>(std::min<int64_t>(x.size(0), 1 << 20)), f32),
              "bf16 fragment matvec: k a positive multiple of 64 and 1..",
              f32 ? kBf16FragF32Tokens : kBf16FragMaxTokens, " tokens of ", f32 ? "float32" : "bfloat16", " x");
}

at::Tensor op_matvec_bf16(const at::Tensor& w, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& y_accumulate, int64_t s1, int64_t s2) {
  check_bf16_frag(w, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int no = static_cast<int>(w.size(0));
  const int r1 = s1 < 0 ? no : op::as_int(s1, "s1", 0), r2 = s2 < 0 ? no : op::as_int(s2, "s2", 0);
  HX_OP_CHECK(r1 <= r2 && r2 <= no, "row runs must satisfy 0 <= s1 <= s2 <= n_out");
  const at::Tensor wc = ready(w), xc = ready(x);
  const ProductOut po = product_out(x, bias, y_accumulate, x.size(0), no);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  launch_bf16_frag(wc, xc, po.y.data_ptr<float>(), po.bias.defined() ? po.bias.data_ptr<float>() : nullptr,
                   po.accumulate, false, r1, r2, stream);
  return po.y;
}

// The same into a caller's y, for graph-captured benchmarks (weights static).
void op_matvec_bf16_out(const at::Tensor& w, const at::Tensor& x, at::Tensor& y) {
  check_bf16_frag(w, x);
  const c10::cuda::CUDAGuard guard(x.device());
  HX_OP_CHECK(x.is_contiguous() && aligned16(x) && w.is_contiguous() && aligned16(w),
              "w and x must be contiguous and 16-byte aligned");
  const int no = static_cast<int>(w.size(0));
  HX_OP_CHECK(
      y.device() == x.device() && y.scalar_type() == at::kFloat && y.is_contiguous() && y.numel() == x.size(0) * no,
      "y must be contiguous float32 [n_tok, n_out] on ", x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  launch_bf16_frag(w, x, y.data_ptr<float>(), nullptr, false, true, no, no, stream);
}

at::Tensor op_dequantize(int64_t type, const at::Tensor& w, int64_t n_out, int64_t k, bool bf16) {
  const GgmlType t = checked_type(type);
  const int no = op::as_int(n_out, "n_out", 0), kk = op::as_int(k, "k", 0);
  HX_OP_CHECK(w.defined() && w.is_cuda(), "w must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor wc = checked_weights(w, t, no, kk);
  at::Tensor out = at::full({n_out, k}, NAN, w.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(w.device().index()).stream();
  launch([&] {
    if (bf16)
      dequantize_launch(t, wc.data_ptr(), reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), n_out, k, stream);
    else
      dequantize_f32_launch(t, wc.data_ptr(), out.data_ptr<float>(), n_out, k, stream);
  });
  return out;
}

// Out variants: no allocation and no copy around the launch, so benchmarks can
// capture them in a CUDA graph and time the kernel alone.
void op_matvec_out(int64_t type, const at::Tensor& w, const at::Tensor& x, at::Tensor& y, int64_t n_out, int64_t k,
                   const std::optional<at::Tensor>& bias, bool accumulate, const std::optional<at::Tensor>& scratch,
                   int64_t mma, bool mma_local) {
  const GgmlType t = checked_type(type);
  const int no = op::as_int(n_out, "n_out", 1), kk = op::as_int(k, "k", 1);
  check_matvec_sizes(t, n_out, k);
  HX_OP_CHECK(x.defined() && x.is_cuda(), "x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dev = x.device();
  HX_OP_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && aligned16(x) && x.numel() % k == 0,
              "x must be contiguous 16-byte aligned float32 [n_tok, k]");
  const int64_t ntok = x.numel() / k;
  HX_OP_CHECK(ntok >= 1 && ntok <= kMatvecMaxTokens, "matvec takes 1..", kMatvecMaxTokens, " tokens");
  HX_OP_CHECK(w.defined() && w.device() == dev && w.is_contiguous() && aligned16(w),
              "w must be a contiguous 16-byte aligned tensor on ", dev);
  const at::Tensor wc = checked_weights(w, t, no, kk);
  HX_OP_CHECK(y.device() == dev && y.scalar_type() == at::kFloat && y.is_contiguous() && y.numel() == ntok * n_out,
              "y must be contiguous float32 [n_tok, n_out] on ", dev);
  const float* b = nullptr;
  if (bias && bias->defined()) {
    HX_OP_CHECK(
        bias->device() == dev && bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n_out,
        "bias must be contiguous float32 [n_out] on ", dev);
    b = bias->data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  MatvecOptions options;
  options.accumulate = accumulate;
  // mma: Q4_K's fragment kernel up to that many tokens, its x prepared into
  // `scratch` (matvec_x_scratch_bytes(n_tok, k) bytes: the model's layout).
  HX_OP_CHECK(mma >= 0 && mma <= kMatvecMaxTokens, "mma must be 0..", kMatvecMaxTokens, ", got ", mma);
  if (mma > 0) {
    HX_OP_CHECK(scratch && scratch->defined() && scratch->device() == dev && scratch->is_contiguous() &&
                    aligned16(*scratch) &&
                    static_cast<size_t>(scratch->nbytes()) >= matvec_x_scratch_bytes(static_cast<int>(ntok), kk),
                "mma needs a contiguous 16-byte aligned scratch of matvec_x_scratch_bytes(n_tok, k) bytes on ", dev);
    options.mma_tokens = static_cast<int>(mma);
    options.mma_local_prep = mma_local;
    options.x_scratch = scratch->data_ptr();
  }
  launch([&] {
    matvec_launch(t, wc.data_ptr(), x.data_ptr<float>(), y.data_ptr<float>(), no, kk, static_cast<int>(ntok), b,
                  options, stream);
  });
}

// The tensor-core product into a caller's y (graph-captured benchmarks
// replay it; no fill launch around the product).
void op_matmul_tc_out(int64_t type, const at::Tensor& w, const at::Tensor& x, at::Tensor& y, int64_t n_out, int64_t k) {
  const GgmlType t = checked_type(type);
  const int no = op::as_int(n_out, "n_out", 1), kk = op::as_int(k, "k", 1);
  check_matvec_sizes(t, n_out, k);
  HX_OP_CHECK(x.defined() && x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && aligned16(x) &&
                  x.numel() % k == 0,
              "x must be a contiguous 16-byte aligned bfloat16 CUDA tensor [n_tok, k]");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dev = x.device();
  const int64_t ntok = x.numel() / k;
  HX_OP_CHECK(ntok >= 1 && ntok <= kTcMaxTokens, "matmul_tc takes 1..", kTcMaxTokens, " tokens, got ", ntok);
  HX_OP_CHECK(w.defined() && w.device() == dev && w.is_contiguous() && aligned16(w),
              "w must be a contiguous 16-byte aligned tensor on ", dev);
  const at::Tensor wc = checked_weights(w, t, no, kk);
  HX_OP_CHECK(y.device() == dev && y.scalar_type() == at::kFloat && y.is_contiguous() && y.numel() == ntok * n_out,
              "y must be contiguous float32 [n_tok, n_out] on ", dev);
  run_matmul_tc(t, wc, x, y.data_ptr<float>(), no, kk, static_cast<int>(ntok), nullptr, false);
}

void op_dequantize_out(int64_t type, const at::Tensor& w, at::Tensor& out, int64_t n_out, int64_t k) {
  const GgmlType t = checked_type(type);
  const int no = op::as_int(n_out, "n_out", 0), kk = op::as_int(k, "k", 0);
  HX_OP_CHECK(w.defined() && w.is_cuda(), "w must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(w.device());
  HX_OP_CHECK(w.is_contiguous() && aligned16(w), "w must be contiguous and 16-byte aligned");
  const at::Tensor wc = checked_weights(w, t, no, kk);
  HX_OP_CHECK(out.device() == w.device() && out.is_contiguous() && out.numel() == n_out * k &&
                  (out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kFloat),
              "out must be contiguous bf16 or float32 [n_out, k] on ", w.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(w.device().index()).stream();
  launch([&] {
    if (out.scalar_type() == at::kBFloat16)
      dequantize_launch(t, wc.data_ptr(), reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), n_out, k, stream);
    else
      dequantize_f32_launch(t, wc.data_ptr(), out.data_ptr<float>(), n_out, k, stream);
  });
}

}  // namespace
}  // namespace hx

TORCH_LIBRARY_FRAGMENT(helexa, m) {
  m.def(
      "matvec(int type, Tensor w_uint8, Tensor x_f32, int n_out, int k, Tensor? bias, Tensor? y_accumulate, "
      "bool int8=False, bool prequant=False, int mma=0, bool mma_local=False) -> Tensor",
      &hx::op_matvec);
  m.def(
      "matmul_tc(int type, Tensor w_uint8, Tensor x_bf16, int n_out, int k, Tensor? bias, Tensor? y_accumulate) -> "
      "Tensor",
      &hx::op_matmul_tc);
  m.def("dequantize(int type, Tensor w_uint8, int n_out, int k, bool bf16) -> Tensor", &hx::op_dequantize);
  m.def("matvec_bf16(Tensor w, Tensor x, Tensor? bias, Tensor? y_accumulate, int s1=-1, int s2=-1) -> Tensor",
        &hx::op_matvec_bf16);
  m.def("matvec_bf16_out(Tensor w, Tensor x, Tensor(a!) y) -> ()", &hx::op_matvec_bf16_out);
  m.def(
      "matvec_q4k_frag(Tensor w_uint8, Tensor x_bf16, int n_out, int k, Tensor? bias, Tensor? y_accumulate, "
      "bool local=False) -> Tensor",
      &hx::op_matvec_q4k_frag);
  m.def(
      "matvec_out(int type, Tensor w_uint8, Tensor x_f32, Tensor(a!) y, int n_out, int k, Tensor? bias, "
      "bool accumulate, Tensor? scratch=None, int mma=0, bool mma_local=False) -> ()",
      &hx::op_matvec_out);
  m.def("dequantize_out(int type, Tensor w_uint8, Tensor(a!) out, int n_out, int k) -> ()", &hx::op_dequantize_out);
  m.def("matmul_tc_out(int type, Tensor w_uint8, Tensor x_bf16, Tensor(a!) y, int n_out, int k) -> ()",
        &hx::op_matmul_tc_out);
}

// helexa_native._C: build facts plus the runtime and model bindings.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/bind.h"
#include "common/ggml_types.h"
#include "common/limits.h"

namespace py = pybind11;

namespace {

std::vector<std::string> compiled_archs() {
  std::vector<std::string> out;
  std::string s = HX_ARCHS;
  size_t start = 0;
  while (start < s.size()) {
    size_t end = s.find(';', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

// GGML type name -> id for every type the kernels read (ggml_types.h).
py::dict ggml_type_ids() {
  py::dict ids;
#define HX_TYPE_ID(T) ids[hx::type_name(hx::GgmlType::T)] = static_cast<int>(hx::GgmlType::T);
  HX_FOR_EACH_GGML_TYPE(HX_TYPE_ID)
#undef HX_TYPE_ID
  return ids;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "helexa_native native extension";
  m.attr("__version__") = HX_VERSION;
#ifdef HX_WITH_CUDA
  m.attr("cuda") = true;
#else
  m.attr("cuda") = false;
#endif
#ifdef HX_WITH_NCCL
  m.attr("nccl") = true;
#else
  m.attr("nccl") = false;
#endif
  m.def("compiled_archs", &compiled_archs, "SM architectures (e.g. '90') this build holds machine code for");
  // Facts helexa_native also states in Python (defaults.py, ggml_types.py); a test checks they agree.
  m.attr("MAX_TOP_LOGPROBS") = hx::kMaxTopLogprobs;
  m.attr("MAX_DECODE_STEPS") = hx::kMaxDecodeSteps;
  m.attr("GGML_TYPE_IDS") = ggml_type_ids();
  hx::bind_runtime(m);
  hx::bind_model(m);
}

// helexa_native._C: build facts plus the runtime and model bindings.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/bind.h"

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
  hx::bind_runtime(m);
  hx::bind_model(m);
}

// Registration hooks: each binding file adds its part of helexa_native._C.
// Only files under csrc/bindings include pybind11 or torch headers.
#pragma once
#include <pybind11/pybind11.h>

namespace hx {
void bind_runtime(pybind11::module_& m);   // runtime_bind.cpp: DeviceWorker and friends
void bind_model(pybind11::module_& m);     // model_bind.cpp: GPU model jobs (empty without CUDA)
}  // namespace hx

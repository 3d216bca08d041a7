#include "bindings/bind.h"

namespace hx {
void bind_model(pybind11::module_& m) { (void)m; }
}  // namespace hx

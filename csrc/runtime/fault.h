// Deliberate device fault, for tests of worker poisoning only.
#pragma once

#include <cuda_runtime_api.h>

namespace hx {

// Queues a kernel that stores through an address no allocation covers; the
// next synchronizing call on that context reports cudaErrorIllegalAddress.
void fault_launch(cudaStream_t stream);

}  // namespace hx

// One device worker per CUDA device per process, shared by every model on it.
#pragma once

#include <memory>

#include "runtime/worker.h"

namespace hx {

// The live worker for device_index, started on first use (or again after it
// was shut down). device_index -1 gives a fresh, unshared host-only worker.
std::shared_ptr<DeviceWorker> acquire_worker(int device_index);

// Shuts every registered worker down: all are told first, then all are
// joined, so NCCL teardown never waits on a rank that was not told.
void shutdown_all_workers();

}  // namespace hx

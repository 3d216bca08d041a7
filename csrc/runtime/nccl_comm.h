// Thin NCCL layer for the device worker. Every call except unique_id() and an
// aborting destroy() (DeviceWorker::abort_nccl) runs on the owning worker's
// thread with its device current. NVLink multicast stays off: the first of
// unique_id() / init_rank() sets NCCL_NVLS_ENABLE=0 for the process. In a
// build without HX_WITH_NCCL the functions throw std::logic_error naming the
// missing support.
#pragma once

#include <cstddef>
#include <string>

#include "runtime/worker.h"

namespace hx {
namespace nccl {

enum class DType { kF32, kBF16 };

bool available();
size_t unique_id_bytes();  // NCCL_UNIQUE_ID_BYTES (128)
// A fresh id for one communicator; rank 0's process makes it, every rank
// receives the same bytes. Touches no device.
std::string unique_id();
// Blocks until all nranks ranks have called it with the same id.
ncclComm_t init_rank(const std::string& unique_id, int nranks, int rank);
// abort: the device or communicator is broken; skip the orderly flush.
void destroy(ncclComm_t comm, bool abort) noexcept;
void allreduce_sum(ncclComm_t comm, void* buf /*[count] in place*/, size_t count, DType dtype, cudaStream_t stream);

}  // namespace nccl
}  // namespace hx

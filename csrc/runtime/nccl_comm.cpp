#include "runtime/nccl_comm.h"

#include <pthread.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#include "common/check.h"

namespace hx {
namespace nccl {

#ifdef HX_WITH_NCCL

namespace {
// Renames the calling thread for its lifetime, restoring the old name after.
class ThreadNameScope {
 public:
  explicit ThreadNameScope(const char* name) {
    saved_ = pthread_getname_np(pthread_self(), old_, sizeof(old_)) == 0;
    if (saved_) pthread_setname_np(pthread_self(), name);
  }
  ~ThreadNameScope() {
    if (saved_) pthread_setname_np(pthread_self(), old_);
  }
  ThreadNameScope(const ThreadNameScope&) = delete;
  ThreadNameScope& operator=(const ThreadNameScope&) = delete;

 private:
  char old_[16] = {0};
  bool saved_ = false;
};

// NVLink multicast (NVLS) stays off: NCCL reads NCCL_NVLS_ENABLE when a
// communicator is created, so it is set before this process's first NCCL
// call, once (later calls of every thread wait for it). It overrides the
// environment: the devices this runs on must not get multicast objects.
void keep_multicast_off() {
  static std::once_flag once;
  std::call_once(once, [] { setenv("NCCL_NVLS_ENABLE", "0", 1); });
}
}  // namespace

bool available() { return true; }

size_t unique_id_bytes() { return NCCL_UNIQUE_ID_BYTES; }

std::string unique_id() {
  keep_multicast_off();
  ncclUniqueId id;
  HX_NCCL_CHECK(ncclGetUniqueId(&id));
  return std::string(id.internal, NCCL_UNIQUE_ID_BYTES);
}

ncclComm_t init_rank(const std::string& uid, int nranks, int rank) {
  if (uid.size() != NCCL_UNIQUE_ID_BYTES)
    throw std::invalid_argument("an NCCL unique id has " + std::to_string(NCCL_UNIQUE_ID_BYTES) + " bytes, got " +
                                std::to_string(uid.size()));
  if (nranks < 1 || rank < 0 || rank >= nranks)
    throw std::invalid_argument("NCCL rank " + std::to_string(rank) + " out of range for " + std::to_string(nranks) +
                                " ranks");
  keep_multicast_off();
  ncclUniqueId id;
  std::copy(uid.begin(), uid.end(), id.internal);
  ncclComm_t comm = nullptr;
  ncclResult_t r;
  {
    // Linux threads inherit their creator's name, and NCCL starts threads
    // here, one of which (RAS, one per process) outlives every communicator.
    // Named after the worker they would pass for its thread after shutdown.
    ThreadNameScope name("nccl");
    r = ncclCommInitRank(&comm, nranks, id, rank);
  }
  if (r != ncclSuccess) {
    // No communicator came to exist, so nothing is left broken: not sticky
    // (a CUDA fault behind it is caught by the worker's context probe).
    std::string reason =
        std::string(ncclGetErrorString(r)) + " (ncclResult " + std::to_string(static_cast<int>(r)) + ")";
    throw CudaError(detail::format_failure("ncclCommInitRank", reason, __FILE__, __LINE__), "nccl", static_cast<int>(r),
                    false, "ncclCommInitRank", __FILE__, __LINE__);
  }
  return comm;
}

void destroy(ncclComm_t comm, bool abort) noexcept {
  if (comm == nullptr) return;
  if (abort)
    ncclCommAbort(comm);
  else if (ncclCommDestroy(comm) != ncclSuccess)
    ncclCommAbort(comm);
}

void allreduce_sum(ncclComm_t comm, void* buf, size_t count, DType dtype, cudaStream_t stream) {
  ncclDataType_t t = dtype == DType::kF32 ? ncclFloat32 : ncclBfloat16;
  HX_NCCL_CHECK(ncclAllReduce(buf, buf, count, t, ncclSum, comm, stream));
}

#else  // no NCCL in this build

namespace {
[[noreturn]] void missing() {
  throw std::logic_error(
      "this build of helexa_native has no NCCL support (rebuild with a CUDA torch "
      "whose nvidia-nccl wheel is installed)");
}
}  // namespace

bool available() { return false; }
size_t unique_id_bytes() { return 128; }
std::string unique_id() { missing(); }
ncclComm_t init_rank(const std::string&, int, int) { missing(); }
void destroy(ncclComm_t, bool) noexcept {}
void allreduce_sum(ncclComm_t, void*, size_t, DType, cudaStream_t) { missing(); }

#endif

}  // namespace nccl
}  // namespace hx

// TpComm: a tensor-parallel GpuModel's link to the other ranks of its group.
//
// Owned by the model (so built, used and destroyed on its worker's thread).
// all_reduce() sums a float32 buffer over the group in place, on the compute
// stream (so it lands inside a captured decode graph): through the one-shot
// peer kernel (kernels/all_reduce_peer.cuh) when the ranks share this process
// and are linked and the message is at most peer_max_bytes, else through
// NCCL on the worker's communicator. Both give every rank the same bits.
//
// Peer path: staging and flags are allocated (and the flags zeroed) at load;
// link() enables peer access to the other ranks' devices and records their
// addresses once, so captured graphs keep valid pointers. Never multicast:
// plain peer loads and stores only.
//
// The status words (abort, arrived) live in mapped pinned host memory, so
// the watchdog's thread reads and writes them while the worker is blocked in
// a stuck step: setting abort makes every spinning kernel of this rank give
// up (the peer all-reduce's wait and the test hook's hang).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/all_reduce_peer.cuh"
#include "model/model_api.h"
#include "runtime/worker.h"

namespace hx {

class TpComm {
 public:
  // Checks that the worker's communicator is rank `rank` of `nranks`, and
  // allocates the peer path's memory and the status words on ctx's device.
  TpComm(WorkerContext& ctx, int rank, int nranks, int64_t peer_max_bytes);
  ~TpComm();
  TpComm(const TpComm&) = delete;
  TpComm& operator=(const TpComm&) = delete;

  // x[0, count) = the sum over the ranks of their x[0, count).
  void all_reduce(WorkerContext& ctx, float* x, size_t count);
  // The same through one implementation (tests): peer (needs link() and
  // count within the staging) or NCCL.
  void all_reduce_with(WorkerContext& ctx, float* x, size_t count, bool peer);

  PeerEndpoint endpoint(const WorkerContext& ctx) const;
  // group[r]: rank r's endpoint. Throws std::invalid_argument when the group
  // does not match this rank or a device cannot be mapped.
  void link(WorkerContext& ctx, const std::vector<PeerEndpoint>& group);
  bool linked() const { return linked_; }

  // Test hook: the next maybe_hang() launches a kernel that spins until abort.
  void arm_hang() { hang_armed_ = true; }
  void maybe_hang(cudaStream_t stream);

  TpStatus* status() const { return status_; }
  int rank() const { return rank_; }
  int nranks() const { return nranks_; }
  int64_t peer_max_bytes() const { return peer_max_bytes_; }
  size_t device_bytes() const { return device_bytes_; }

 private:
  void free_all() noexcept;

  int rank_ = 0, nranks_ = 0;
  int64_t peer_max_bytes_ = 0;
  size_t capacity_ = 0;            // floats per staging half
  float* staging_ = nullptr;       // [2, capacity_]
  uint32_t* flags_ = nullptr;      // kPeerFlagBytes
  size_t device_bytes_ = 0;
  TpStatus* status_ = nullptr;     // mapped pinned host memory
  TpStatus* status_dev_ = nullptr; // its device address
  PeerAllReduceArgs peer_{};
  bool linked_ = false;
  bool hang_armed_ = false;
};

}  // namespace hx

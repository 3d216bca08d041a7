// TpComm (see tensor_parallel.h) and the test hook's hang kernel.
#include "model/tensor_parallel.h"

#include <stdexcept>
#include <string>

#include "common/check.h"
#include "runtime/nccl_comm.h"

namespace hx {

namespace {

// Upper bound of the test hook's hang, so a test that never aborts cannot
// hold the GPU for good: ten minutes, in globaltimer nanoseconds.
constexpr uint64_t kHangLimitNs = 600ull * 1000 * 1000 * 1000;

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// One thread spinning until the host-mapped abort word is set.
__global__ void hang_kernel(const volatile uint32_t* abort) {
  const uint64_t t0 = global_ns();
  while (*abort == 0 && global_ns() - t0 < kHangLimitNs) __nanosleep(100000);
}

std::string rank_of(int rank, int nranks) { return "rank " + std::to_string(rank) + " of " + std::to_string(nranks); }

}  // namespace

TpComm::TpComm(WorkerContext& ctx, int rank, int nranks, int64_t peer_max_bytes)
    : rank_(rank), nranks_(nranks), peer_max_bytes_(peer_max_bytes) {
  if (nranks < 1 || rank < 0 || rank >= nranks)
    throw std::invalid_argument("tensor-parallel " + rank_of(rank, nranks) + " is out of range");
  if (peer_max_bytes < 0) throw std::invalid_argument("tp_peer_max_bytes must not be negative");
  if (!nccl::available())
    throw std::invalid_argument(
        "tensor parallelism needs NCCL, which this build of helexa_native lacks (rebuild with a CUDA torch "
        "whose nvidia-nccl wheel is installed)");
  const int have = ctx.nccl_nranks();
  if (have != nranks || ctx.nccl_rank() != rank)
    throw std::invalid_argument(ctx.name() + "'s NCCL communicator is " +
                                (have == 0 ? std::string("not set up") : rank_of(ctx.nccl_rank(), have)) +
                                ", but the model is tensor-parallel " + rank_of(rank, nranks));
  try {
    HX_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&status_), sizeof(TpStatus), cudaHostAllocMapped));
    status_->abort = 0;
    status_->arrived = 0;
    HX_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&status_dev_), status_, 0));
    if (nranks <= kPeerMaxRanks && peer_max_bytes >= 16) {
      capacity_ = static_cast<size_t>(peer_max_bytes) / 16 * 4;
      HX_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&staging_), 2 * capacity_ * sizeof(float)));
      HX_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&flags_), kPeerFlagBytes));
      HX_CUDA_CHECK(cudaMemsetAsync(flags_, 0, kPeerFlagBytes, ctx.compute_stream()));
      device_bytes_ = 2 * capacity_ * sizeof(float) + kPeerFlagBytes;
    }
  } catch (...) {
    free_all();
    throw;
  }
}

TpComm::~TpComm() { free_all(); }

void TpComm::free_all() noexcept {
  // On the worker thread with the device current (the owning model's destructor).
  if (staging_ != nullptr) cudaFree(staging_);
  if (flags_ != nullptr) cudaFree(flags_);
  if (status_ != nullptr) cudaFreeHost(status_);
  staging_ = nullptr;
  flags_ = nullptr;
  status_ = status_dev_ = nullptr;
  cudaGetLastError();
}

void TpComm::all_reduce(WorkerContext& ctx, float* x, size_t count) {
  cudaStream_t st = ctx.compute_stream();
  // The same choice on every rank: count, link state and limits agree.
  if (linked_ && count <= capacity_ && count * sizeof(float) <= static_cast<size_t>(peer_max_bytes_)) {
    peer_all_reduce_launch(peer_, x, count, st);
    return;
  }
  nccl::allreduce_sum(ctx.nccl_comm(), x, count, nccl::DType::kF32, st);
}

void TpComm::all_reduce_with(WorkerContext& ctx, float* x, size_t count, bool peer) {
  if (!peer) {
    nccl::allreduce_sum(ctx.nccl_comm(), x, count, nccl::DType::kF32, ctx.compute_stream());
    return;
  }
  if (!linked_) throw std::invalid_argument("the peer all-reduce is not linked");
  if (count > capacity_)
    throw std::invalid_argument("the peer staging holds " + std::to_string(capacity_) + " floats, not " +
                                std::to_string(count));
  peer_all_reduce_launch(peer_, x, count, ctx.compute_stream());
}

PeerEndpoint TpComm::endpoint(const WorkerContext& ctx) const {
  PeerEndpoint e;
  e.device = ctx.device();
  e.staging = reinterpret_cast<uint64_t>(staging_);
  e.flags = reinterpret_cast<uint64_t>(flags_);
  e.capacity = capacity_;
  return e;
}

void TpComm::link(WorkerContext& ctx, const std::vector<PeerEndpoint>& group) {
  if (static_cast<int>(group.size()) != nranks_)
    throw std::invalid_argument("linking tensor-parallel " + rank_of(rank_, nranks_) + " to a group of " +
                                std::to_string(group.size()));
  if (staging_ == nullptr)
    throw std::invalid_argument("this model has no peer all-reduce (more than " + std::to_string(kPeerMaxRanks) +
                                " ranks, or tp_peer_max_bytes below 16)");
  const PeerEndpoint me = endpoint(ctx);
  if (group[rank_].staging != me.staging || group[rank_].flags != me.flags)
    throw std::invalid_argument("group[" + std::to_string(rank_) + "] is not this model's endpoint");
  for (int r = 0; r < nranks_; ++r) {
    const PeerEndpoint& e = group[r];
    if (e.capacity != capacity_ || e.staging == 0 || e.flags == 0)
      throw std::invalid_argument("rank " + std::to_string(r) + "'s peer staging does not match this rank's");
    if (r == rank_) continue;
    if (e.device == me.device)
      throw std::invalid_argument("ranks " + std::to_string(r) + " and " + std::to_string(rank_) + " share " +
                                  ctx.name());
    int ok = 0;
    HX_CUDA_CHECK(cudaDeviceCanAccessPeer(&ok, me.device, e.device));
    if (!ok)
      throw std::invalid_argument(ctx.name() + " cannot map the memory of cuda:" + std::to_string(e.device) +
                                  " (no peer access)");
    const cudaError_t err = cudaDeviceEnablePeerAccess(e.device, 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled)
      cudaGetLastError();
    else
      HX_CUDA_CHECK(err);
  }
  PeerAllReduceArgs a{};
  for (int r = 0; r < nranks_; ++r) {
    a.staging[r] = reinterpret_cast<float*>(group[r].staging);
    a.flags[r] = reinterpret_cast<uint32_t*>(group[r].flags);
  }
  a.abort = &status_dev_->abort;
  a.arrived = &status_dev_->arrived;
  a.capacity = capacity_;
  a.rank = rank_;
  a.nranks = nranks_;
  peer_ = a;
  linked_ = true;
}

void TpComm::maybe_hang(cudaStream_t stream) {
  if (!hang_armed_) return;
  hang_armed_ = false;
  hang_kernel<<<1, 1, 0, stream>>>(&status_dev_->abort);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

// Host-side helpers of uploads: a parallel memcpy pool and the pinned
// double-buffered staging pipeline that feeds the copy stream.
//
// One memcpy thread reaches roughly a third of what a PCIe 5 DMA engine
// drains, so the copy into pinned memory is split over a few helper threads
// (host memory only: they make no CUDA call).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#ifdef HX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace hx {

class CopyPool {
 public:
  // helpers: extra threads (0: every copy runs on the caller); each is named
  // name_prefix + index (at most 15 characters in all).
  CopyPool(int helpers, const std::string& name_prefix);
  ~CopyPool();  // joins the helpers
  CopyPool(const CopyPool&) = delete;
  CopyPool& operator=(const CopyPool&) = delete;

  // dst[0, n) = src[0, n), split over the caller and the helpers.
  void copy(void* dst, const void* src, size_t n);

  // Helpers worth starting on this host: one per core beyond the caller, at
  // most 15 (HELEXA_COPY_THREADS overrides the total).
  static int default_helpers();

 private:
  void helper_main(int index);

  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::vector<std::thread> threads_;
  char* dst_ = nullptr;
  const char* src_ = nullptr;
  size_t n_ = 0;
  size_t slice_ = 0;
  unsigned long generation_ = 0;
  int pending_ = 0;
  bool quit_ = false;
};

#ifdef HX_WITH_CUDA
// Pinned double-buffered host -> device pipeline on one stream. Created and
// used only on the worker thread.
class Stager {
 public:
  Stager(cudaStream_t stream, size_t chunk_bytes, CopyPool* pool);
  ~Stager();  // frees the pinned buffers; call release_leaking() first on a dead context
  Stager(const Stager&) = delete;
  Stager& operator=(const Stager&) = delete;

  // Queues dst[0, n) = src[0, n) on the stream. Returns once src has been
  // fully read (copied into pinned memory); the DMA may still be running.
  // Consecutive uploads pack into the current staging buffer, so a run of
  // small tensors keeps the host copy of one overlapping the DMA of others.
  void upload(void* dst, const void* src, size_t n);
  // Forget the CUDA objects without touching CUDA (poisoned context).
  void release_leaking();

 private:
  cudaStream_t stream_;
  size_t chunk_;
  CopyPool* pool_;
  void* pinned_[2] = {nullptr, nullptr};
  cudaEvent_t drained_[2] = {nullptr, nullptr};  // the last DMA reading pinned_[i] finished
  int cur_ = 0;       // staging buffer being filled
  size_t fill_ = 0;   // bytes of it handed to DMAs so far
};
#endif

}  // namespace hx

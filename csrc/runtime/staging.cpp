#include "runtime/staging.h"

#include <pthread.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common/check.h"

namespace hx {

namespace {
// Below this a single memcpy beats waking the helpers.
constexpr size_t kMinParallelBytes = size_t(4) << 20;
constexpr size_t kSliceAlign = 4096;
}  // namespace

int CopyPool::default_helpers() {
  // HELEXA_COPY_THREADS (1..64) sets the copy threads, caller included.
  if (const char* env = std::getenv("HELEXA_COPY_THREADS")) {
    const long v = std::strtol(env, nullptr, 10);
    if (v >= 1 && v <= 64) return static_cast<int>(v) - 1;
  }
  unsigned hw = std::thread::hardware_concurrency();
  // One memcpy stream from pageable memory moves ~5-10 GB/s; a PCIe 5 DMA
  // takes ~55 GB/s, so it takes many slices to keep the copy engine fed (on
  // a 16-core H100 host: 8 threads 38 GB/s, 16 threads 45 GB/s of 53 pinned).
  int slices = static_cast<int>(std::min(16u, std::max(1u, hw)));
  return slices - 1;
}

CopyPool::CopyPool(int helpers, const std::string& name_prefix) {
  threads_.reserve(static_cast<size_t>(std::max(helpers, 0)));
  for (int i = 1; i <= helpers; ++i) {
    threads_.emplace_back([this, i] { helper_main(i); });
    std::string name = (name_prefix + std::to_string(i)).substr(0, 15);
    pthread_setname_np(threads_.back().native_handle(), name.c_str());
  }
}

CopyPool::~CopyPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    quit_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void CopyPool::copy(void* dst, const void* src, size_t n) {
  if (n == 0) return;
  if (threads_.empty() || n < kMinParallelBytes) {
    std::memcpy(dst, src, n);
    return;
  }
  const size_t parts = threads_.size() + 1;
  size_t slice = (n + parts - 1) / parts;
  slice = (slice + kSliceAlign - 1) / kSliceAlign * kSliceAlign;
  {
    std::lock_guard<std::mutex> lk(mu_);
    dst_ = static_cast<char*>(dst);
    src_ = static_cast<const char*>(src);
    n_ = n;
    slice_ = slice;
    pending_ = static_cast<int>(threads_.size());
    ++generation_;
  }
  work_cv_.notify_all();
  std::memcpy(dst, src, std::min(slice, n));
  std::unique_lock<std::mutex> lk(mu_);
  done_cv_.wait(lk, [this] { return pending_ == 0; });
}

void CopyPool::helper_main(int index) {
  unsigned long seen = 0;
  for (;;) {
    char* dst;
    const char* src;
    size_t n, slice;
    {
      std::unique_lock<std::mutex> lk(mu_);
      work_cv_.wait(lk, [&] { return quit_ || generation_ != seen; });
      if (quit_) return;
      seen = generation_;
      dst = dst_;
      src = src_;
      n = n_;
      slice = slice_;
    }
    size_t begin = slice * static_cast<size_t>(index);
    if (begin < n) std::memcpy(dst + begin, src + begin, std::min(slice, n - begin));
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }
}

#ifdef HX_WITH_CUDA

namespace {
// Staging offsets stay DMA-friendly.
constexpr size_t kStageAlign = 256;
}  // namespace

Stager::Stager(cudaStream_t stream, size_t chunk_bytes, CopyPool* pool)
    : stream_(stream), chunk_(chunk_bytes), pool_(pool) {
  try {
    for (int i = 0; i < 2; ++i) {
      HX_CUDA_CHECK(cudaHostAlloc(&pinned_[i], chunk_, cudaHostAllocDefault));
      HX_CUDA_CHECK(cudaEventCreateWithFlags(&drained_[i], cudaEventDisableTiming));
    }
  } catch (...) {
    for (int i = 0; i < 2; ++i) {
      if (pinned_[i] != nullptr) cudaFreeHost(pinned_[i]);
      if (drained_[i] != nullptr) cudaEventDestroy(drained_[i]);
    }
    throw;
  }
}

Stager::~Stager() {
  for (int i = 0; i < 2; ++i) {
    // A pinned buffer may still feed a DMA; wait before giving it back.
    if (drained_[i] != nullptr) {
      cudaEventSynchronize(drained_[i]);
      cudaEventDestroy(drained_[i]);
    }
    if (pinned_[i] != nullptr) cudaFreeHost(pinned_[i]);
  }
}

void Stager::release_leaking() {
  for (int i = 0; i < 2; ++i) {
    pinned_[i] = nullptr;
    drained_[i] = nullptr;
  }
}

void Stager::upload(void* dst, const void* src, size_t n) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  size_t done = 0;
  while (done < n) {
    if (fill_ >= chunk_) {
      // Switch buffers; the other one is reusable once its last DMA drained.
      cur_ ^= 1;
      HX_CUDA_CHECK(cudaEventSynchronize(drained_[cur_]));
      fill_ = 0;
    }
    const size_t len = std::min(n - done, chunk_ - fill_);
    char* stage = static_cast<char*>(pinned_[cur_]) + fill_;
    pool_->copy(stage, s + done, len);
    HX_CUDA_CHECK(cudaMemcpyAsync(d + done, stage, len, cudaMemcpyHostToDevice, stream_));
    HX_CUDA_CHECK(cudaEventRecord(drained_[cur_], stream_));
    fill_ = std::min(chunk_, (fill_ + len + kStageAlign - 1) / kStageAlign * kStageAlign);
    done += len;
  }
}

#endif  // HX_WITH_CUDA

}  // namespace hx

// The device worker's thread, slab and job loop (see worker.h).
#include "runtime/worker.h"

#include <cxxabi.h>
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <thread>

#include "common/check.h"
#include "runtime/nccl_comm.h"
#include "runtime/staging.h"

#ifdef HX_WITH_CUDA
#include <cublasLt.h>
#include <cublas_v2.h>
#endif

namespace hx {

namespace {

// How long an idle worker polls its queue before sleeping (thread_main).
constexpr std::chrono::microseconds kIdlePoll{200};
// 64 MiB per staging buffer: each chunk's DMA (~1.3 ms at 50 GB/s) dwarfs
// the per-chunk event wait and helper wake-up.
constexpr size_t kStagingChunk = size_t(64) << 20;
// cuBLAS's recommended workspace on Hopper; set explicitly so graph capture
// never makes cuBLAS allocate.
constexpr size_t kCublasWorkspace = size_t(32) << 20;
constexpr size_t kHostAlign = 256;

std::string thread_name(int device) {
  return device < 0 ? std::string("hx-dev-host") : "hx-dev-" + std::to_string(device);
}

// CUDA documents its context-corrupting errors (illegal address, launch
// failure, ...) as leaving the whole process in an inconsistent state: any
// further CUDA work, on any device, may return the same error until the
// process is relaunched. Observed on a two-GPU host: after a fault on cuda:0,
// cudaMalloc on cuda:1's own thread failed with cudaErrorIllegalAddress. So
// the first such error poisons every CUDA worker of the process, each with a
// message naming the device that failed, instead of letting the others run
// into it at random later.
std::atomic<bool> g_cuda_lost{false};
std::mutex g_cuda_lost_mu;
std::string g_cuda_lost_reason;  // guarded by g_cuda_lost_mu

void mark_cuda_lost(const std::string& reason) {
  std::lock_guard<std::mutex> lk(g_cuda_lost_mu);
  if (g_cuda_lost.load()) return;
  g_cuda_lost_reason = reason;
  g_cuda_lost.store(true);
}

std::string cuda_lost_reason() {
  std::lock_guard<std::mutex> lk(g_cuda_lost_mu);
  return "CUDA is unusable in this process after a sticky error on " + g_cuda_lost_reason;
}

}  // namespace

struct DeviceWorker::State {
  cudaStream_t compute = nullptr;
  cudaStream_t copy = nullptr;
#ifdef HX_WITH_CUDA
  cudaEvent_t compute_mark = nullptr;  // orders copy-stream work after compute work
  cudaEvent_t copy_mark = nullptr;     // orders compute-stream work after an upload
#endif
  cublasHandle_t cublas = nullptr;
  cublasLtHandle_t cublaslt = nullptr;
  void* cublas_workspace = nullptr;
  // The communicator is also reached from other threads by abort_nccl():
  // nccl, nccl_rank, nccl_nranks and nccl_aborted are guarded by nccl_mu.
  std::mutex nccl_mu;
  ncclComm_t nccl = nullptr;
  int nccl_rank = -1;
  int nccl_nranks = 0;
  bool nccl_aborted = false;  // the last communicator was aborted (until the next nccl_init)
  // Ordered by handle, so teardown destroys newest first (a graph before the
  // model it replays, a model before the buffers it was given).
  std::map<int64_t, WorkerContext::Entry> slab;
  std::unordered_map<const void*, int64_t> by_ptr;
  int64_t next_handle = 1;
  std::unique_ptr<CopyPool> pool;
#ifdef HX_WITH_CUDA
  std::unique_ptr<Stager> stager;
#endif
};

// ---------------------------------------------------------------------------
// Lifecycle

DeviceWorker::DeviceWorker(int device_index) : device_(device_index < 0 ? -1 : device_index) {
#ifdef HX_WITH_CUDA
  host_only_ = device_ < 0;
#else
  host_only_ = true;
#endif
  if (device_ < 0)
    name_ = "host";
  else
    name_ = (host_only_ ? "host:" : "cuda:") + std::to_string(device_);
  st_ = std::make_unique<State>();
  std::promise<void> started;
  std::future<void> ready = started.get_future();
  thread_ = std::thread(&DeviceWorker::thread_main, this, &started);
  try {
    ready.get();
  } catch (...) {
    thread_.join();
    joined_ = true;
    throw;
  }
}

DeviceWorker::~DeviceWorker() {
  if (std::this_thread::get_id() == thread_.get_id()) {
    // Destroyed by its own job: the thread cannot join itself; it exits after
    // this job and tears down on the way out.
    begin_shutdown();
    thread_.detach();
    return;
  }
  try {
    shutdown();
  } catch (...) {
  }
}

void DeviceWorker::thread_main(std::promise<void>* started) {
  pthread_setname_np(pthread_self(), thread_name(device_).c_str());
  try {
    setup();
  } catch (const std::exception& e) {
    std::string msg = name_ + ": could not start the device worker: " + e.what();
    teardown();
    started->set_exception(std::make_exception_ptr(WorkerError(msg, name_)));
    return;
  }
  started->set_value();

  for (;;) {
    std::unique_ptr<Job> job;
    // A decode loop submits its next job microseconds after the last reply:
    // poll for it briefly instead of paying a sleep and a wake-up (tens of
    // microseconds on a virtual machine) for every token.
    if (!has_work_.load(std::memory_order_acquire)) {
      const auto until = std::chrono::steady_clock::now() + kIdlePoll;
      while (!has_work_.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < until)
        std::this_thread::yield();
    }
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) break;
      job = std::move(queue_.front());
      queue_.pop_front();
      has_work_.store(!queue_.empty(), std::memory_order_release);
    }
    if (!host_only_ && g_cuda_lost.load() && !is_poisoned()) poison(cuda_lost_reason());
    if (is_poisoned() && !job->cleanup) {
      job->fail(poisoned_error());
      continue;
    }
    try {
      job->run(*this);
    } catch (...) {
      job->fail(classify(std::current_exception()));
    }
  }
  teardown();
}

void DeviceWorker::setup() {
  if (host_only_) return;
#ifdef HX_WITH_CUDA
  State& s = *st_;
  if (g_cuda_lost.load()) throw std::runtime_error(cuda_lost_reason());
  int count = 0;
  HX_CUDA_CHECK(cudaGetDeviceCount(&count));
  if (device_ >= count)
    throw std::invalid_argument(name_ + " does not exist (" + std::to_string(count) + " CUDA devices visible)");
  HX_CUDA_CHECK(cudaSetDevice(device_));
  HX_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major_, cudaDevAttrComputeCapabilityMajor, device_));
  HX_CUDA_CHECK(cudaDeviceGetAttribute(&cc_minor_, cudaDevAttrComputeCapabilityMinor, device_));
  // Create the context here rather than inside the first job.
  HX_CUDA_CHECK(cudaFree(nullptr));
  HX_CUDA_CHECK(cudaStreamCreateWithFlags(&s.compute, cudaStreamNonBlocking));
  HX_CUDA_CHECK(cudaStreamCreateWithFlags(&s.copy, cudaStreamNonBlocking));
  HX_CUDA_CHECK(cudaEventCreateWithFlags(&s.compute_mark, cudaEventDisableTiming));
  HX_CUDA_CHECK(cudaEventCreateWithFlags(&s.copy_mark, cudaEventDisableTiming));
  HX_CUBLAS_CHECK(cublasCreate(&s.cublas));
  HX_CUBLAS_CHECK(cublasSetStream(s.cublas, s.compute));
  HX_CUDA_CHECK(cudaMalloc(&s.cublas_workspace, kCublasWorkspace));
  HX_CUBLAS_CHECK(cublasSetWorkspace(s.cublas, s.cublas_workspace, kCublasWorkspace));
  HX_CUBLAS_CHECK(cublasLtCreate(&s.cublaslt));
#endif
}

void DeviceWorker::teardown() {
  State& s = *st_;
  if (!host_only_ && g_cuda_lost.load() && !is_poisoned()) poison(cuda_lost_reason());
  // A poisoned host-only worker has no device context to lose: it frees.
  bool dead = is_poisoned() && !host_only_;
#ifdef HX_WITH_CUDA
  if (!host_only_ && !dead) {
    // Nothing may be freed under work still queued on the streams.
    for (cudaStream_t str : {s.compute, s.copy}) {
      if (str == nullptr) continue;
      cudaError_t e = cudaStreamSynchronize(str);
      if (is_sticky(e)) {
        poison_cuda(std::string("cudaStreamSynchronize at shutdown failed: ") + cudaGetErrorString(e) + " (" +
                    cudaGetErrorName(e) + ")");
        dead = true;
        break;
      }
    }
  }
#endif
  // A dead communicator is aborted, never flushed.
  ncclComm_t comm = nullptr;
  {
    std::lock_guard<std::mutex> lk(s.nccl_mu);
    comm = s.nccl;
    s.nccl = nullptr;
  }
  nccl::destroy(comm, dead);

  for (auto it = s.slab.rbegin(); it != s.slab.rend(); ++it) {
    WorkerContext::Entry& e = it->second;
    if (e.res) {
      if (dead)
        (void)e.res.release();  // its destructor would call into a dead context
      else
        e.res.reset();
    } else if (e.ptr != nullptr && !dead) {
      if (host_only_) std::free(e.ptr);
#ifdef HX_WITH_CUDA
      else
        cudaFree(e.ptr);
#endif
    }
  }
  s.slab.clear();
  s.by_ptr.clear();

#ifdef HX_WITH_CUDA
  if (s.stager) {
    if (dead) s.stager->release_leaking();
    s.stager.reset();
  }
#endif
  s.pool.reset();

#ifdef HX_WITH_CUDA
  if (!host_only_ && !dead) {
    if (s.cublaslt != nullptr) cublasLtDestroy(s.cublaslt);
    if (s.cublas != nullptr) cublasDestroy(s.cublas);
    if (s.cublas_workspace != nullptr) cudaFree(s.cublas_workspace);
    if (s.compute_mark != nullptr) cudaEventDestroy(s.compute_mark);
    if (s.copy_mark != nullptr) cudaEventDestroy(s.copy_mark);
    if (s.compute != nullptr) cudaStreamDestroy(s.compute);
    if (s.copy != nullptr) cudaStreamDestroy(s.copy);
    cudaGetLastError();
  }
#endif
  s.cublaslt = nullptr;
  s.cublas = nullptr;
  s.cublas_workspace = nullptr;
  s.compute = s.copy = nullptr;
}

void DeviceWorker::begin_shutdown() {
  std::deque<std::unique_ptr<Job>> pending;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stopping_) return;
    stopping_ = true;
    pending.swap(queue_);
    has_work_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
  for (auto& job : pending) job->fail(shut_down_error());
}

void DeviceWorker::shutdown() {
  if (std::this_thread::get_id() == thread_.get_id())
    throw std::logic_error("a job cannot shut down its own worker (" + name_ + ")");
  begin_shutdown();
  std::lock_guard<std::mutex> lk(join_mu_);
  if (!joined_ && thread_.joinable()) thread_.join();
  joined_ = true;
}

bool DeviceWorker::is_shut_down() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stopping_;
}

void DeviceWorker::push(std::unique_ptr<Job> job) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!stopping_) {
      queue_.push_back(std::move(job));
      has_work_.store(true, std::memory_order_release);
      cv_.notify_one();
      return;
    }
  }
  job->fail(shut_down_error());
}

// ---------------------------------------------------------------------------
// Poisoning and error classification

bool DeviceWorker::is_poisoned() const {
  std::lock_guard<std::mutex> lk(mu_);
  return poisoned_;
}

std::string DeviceWorker::poison_reason() const {
  std::lock_guard<std::mutex> lk(mu_);
  return poison_reason_;
}

void DeviceWorker::poison(const std::string& reason) {
  std::lock_guard<std::mutex> lk(mu_);
  if (poisoned_) return;  // the first failure is the one worth reporting
  poisoned_ = true;
  poison_reason_ = reason;
}

void DeviceWorker::poison_cuda(const std::string& reason) {
  poison(reason);
  if (!host_only_) mark_cuda_lost(name_ + ": " + reason);
}

std::exception_ptr DeviceWorker::shut_down_error() const {
  return std::make_exception_ptr(WorkerError("worker for " + name_ + " shut down", name_));
}

std::exception_ptr DeviceWorker::poisoned_error() const {
  return std::make_exception_ptr(
      WorkerError(name_ + " is unusable after an earlier device error: " + poison_reason(), name_, false, true));
}

void DeviceWorker::after_job(bool cleanup) {
#ifdef HX_WITH_CUDA
  // A dead context is never asked again: cleanup jobs on a poisoned worker
  // end here without a CUDA call.
  if (host_only_ || is_poisoned()) return;
  struct Probe {
    cudaError_t e;
    const char* what;
  };
  Probe probes[3] = {{cudaGetLastError(), "cudaGetLastError() after the job"},
                     {cudaStreamQuery(st_->compute), "cudaStreamQuery(compute stream) after the job"},
                     {cudaStreamQuery(st_->copy), "cudaStreamQuery(copy stream) after the job"}};
  for (const Probe& p : probes) {
    if (p.e == cudaSuccess || p.e == cudaErrorNotReady) continue;
    if (cleanup && is_sticky(p.e)) {
      // Freeing on a context that just died succeeded in effect: the memory
      // went with it. The worker is poisoned, the cleanup itself reports success.
      poison_cuda(detail::format_failure(
          p.what, std::string(cudaGetErrorString(p.e)) + " (" + cudaGetErrorName(p.e) + ")", __FILE__, __LINE__));
      return;
    }
    detail::throw_cuda(p.e, p.what, __FILE__, __LINE__);
  }
#else
  (void)cleanup;
#endif
}

std::string DeviceWorker::probe_context() {
#ifdef HX_WITH_CUDA
  if (host_only_ || is_poisoned()) return {};
  cudaError_t errs[3] = {cudaGetLastError(), cudaStreamQuery(st_->compute), cudaStreamQuery(st_->copy)};
  for (cudaError_t e : errs) {
    if (is_sticky(e)) {
      std::string why =
          std::string("the device context failed: ") + cudaGetErrorString(e) + " (" + cudaGetErrorName(e) + ")";
      poison_cuda(why);
      return why;
    }
  }
#endif
  return {};
}

std::exception_ptr DeviceWorker::classify(std::exception_ptr e) {
  std::string msg;
  bool sticky = false;
  try {
    std::rethrow_exception(e);
  } catch (const WorkerError&) {
    // Already names its device (a nested wait on another worker's future).
    probe_context();
    return e;
  } catch (const CudaError& ce) {
    sticky = ce.sticky;
    msg = ce.what();
    if (sticky && ce.library == "cuda") {
      poison_cuda(msg);
    } else if (sticky) {
      // A broken communicator (or a simulated failure) poisons this worker;
      // a CUDA fault behind it, if any, also marks the process.
      probe_context();
      poison(msg);
    }
  } catch (const std::invalid_argument& ia) {
    std::string broken = probe_context();
    if (broken.empty()) return e;  // bad input: stays a ValueError for Python
    msg = std::string(ia.what());
    msg += "; " + broken;
    return std::make_exception_ptr(WorkerError(name_ + ": " + msg, name_, false, true));
  } catch (const std::exception& ex) {
    msg = ex.what();
  } catch (...) {
    msg = "unknown exception in a device job";
  }
  if (!sticky) {
    std::string broken = probe_context();
    if (!broken.empty()) msg += "; " + broken;
  }
  return std::make_exception_ptr(WorkerError(name_ + ": " + msg, name_, sticky, is_poisoned()));
}

// ---------------------------------------------------------------------------
// WorkerContext

int WorkerContext::device() const { return w_->device_; }
const std::string& WorkerContext::name() const { return w_->name_; }
bool WorkerContext::host_only() const { return w_->host_only_; }
cudaStream_t WorkerContext::compute_stream() const { return w_->st_->compute; }
cudaStream_t WorkerContext::copy_stream() const { return w_->st_->copy; }
cublasHandle_t WorkerContext::cublas() const { return w_->st_->cublas; }
cublasLtHandle_t WorkerContext::cublaslt() const { return w_->st_->cublaslt; }
bool WorkerContext::poisoned() const { return w_->is_poisoned(); }
bool WorkerContext::stop_requested() const { return w_->is_shut_down(); }
int WorkerContext::nccl_rank() const {
  std::lock_guard<std::mutex> lk(w_->st_->nccl_mu);
  return w_->st_->nccl_rank;
}

int WorkerContext::nccl_nranks() const {
  std::lock_guard<std::mutex> lk(w_->st_->nccl_mu);
  return w_->st_->nccl_nranks;
}

ncclComm_t WorkerContext::nccl_comm() const {
  DeviceWorker::State& s = *w_->st_;
  std::lock_guard<std::mutex> lk(s.nccl_mu);
  if (s.nccl == nullptr)
    throw std::logic_error(w_->name_ + (s.nccl_aborted ? " has no NCCL communicator: it was aborted"
                                                       : " has no NCCL communicator (nccl_init was not run)"));
  return s.nccl;
}

void WorkerContext::nccl_init(const std::string& unique_id, int nranks, int rank) {
  DeviceWorker::State& s = *w_->st_;
  {
    std::lock_guard<std::mutex> lk(s.nccl_mu);
    if (s.nccl != nullptr)
      throw std::logic_error(w_->name_ + " already has an NCCL communicator (rank " + std::to_string(s.nccl_rank) +
                             " of " + std::to_string(s.nccl_nranks) + ")");
  }
  if (w_->host_only_) throw std::logic_error("a host-only worker cannot join an NCCL group");
  // Blocks until every rank joined: the lock is not held meanwhile.
  ncclComm_t comm = nccl::init_rank(unique_id, nranks, rank);
  std::lock_guard<std::mutex> lk(s.nccl_mu);
  s.nccl = comm;
  s.nccl_rank = rank;
  s.nccl_nranks = nranks;
  s.nccl_aborted = false;
}

void WorkerContext::nccl_destroy() {
  DeviceWorker::State& s = *w_->st_;
  ncclComm_t comm = nullptr;
  {
    std::lock_guard<std::mutex> lk(s.nccl_mu);
    comm = s.nccl;
    s.nccl = nullptr;
    s.nccl_rank = -1;
    s.nccl_nranks = 0;
    s.nccl_aborted = false;
  }
  nccl::destroy(comm, poisoned());
}

void DeviceWorker::abort_nccl() noexcept {
  ncclComm_t comm = nullptr;
  {
    std::lock_guard<std::mutex> lk(st_->nccl_mu);
    comm = st_->nccl;
    st_->nccl = nullptr;
    if (comm != nullptr) st_->nccl_aborted = true;
  }
  nccl::destroy(comm, true);
}

std::pair<size_t, size_t> WorkerContext::mem_info() const {
  if (w_->host_only_) {
    long page = sysconf(_SC_PAGESIZE);
    long avail = sysconf(_SC_AVPHYS_PAGES);
    long total = sysconf(_SC_PHYS_PAGES);
    return {static_cast<size_t>(avail) * static_cast<size_t>(page),
            static_cast<size_t>(total) * static_cast<size_t>(page)};
  }
  size_t free_b = 0, total_b = 0;
#ifdef HX_WITH_CUDA
  HX_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
#endif
  return {free_b, total_b};
}

void* WorkerContext::alloc(size_t bytes) {
  if (bytes == 0) return nullptr;
  if (poisoned()) throw std::logic_error(w_->name_ + " is poisoned: no allocation possible");
  void* p = nullptr;
  if (w_->host_only_) {
    p = std::aligned_alloc(kHostAlign, (bytes + kHostAlign - 1) / kHostAlign * kHostAlign);
    if (p == nullptr) throw std::runtime_error("out of host memory allocating " + std::to_string(bytes) + " bytes");
  } else {
#ifdef HX_WITH_CUDA
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      std::string call = "cudaMalloc(" + std::to_string(bytes) + " bytes)";
      detail::throw_cuda(e, call.c_str(), __FILE__, __LINE__);
    }
#endif
  }
  DeviceWorker::State& s = *w_->st_;
  const int64_t h = s.next_handle++;
  WorkerContext::Entry& entry = s.slab[h];
  entry.ptr = p;
  entry.bytes = bytes;
  s.by_ptr[p] = h;
  return p;
}

void WorkerContext::free(void* ptr) {
  if (ptr == nullptr) return;
  DeviceWorker::State& s = *w_->st_;
  auto it = s.by_ptr.find(ptr);
  if (it == s.by_ptr.end()) throw std::invalid_argument(w_->name_ + ": free of a pointer this worker did not allocate");
  drop(it->second);
}

int64_t WorkerContext::handle_of(const void* ptr) const {
  auto it = w_->st_->by_ptr.find(ptr);
  if (it == w_->st_->by_ptr.end()) throw std::invalid_argument(w_->name_ + ": pointer not allocated by this worker");
  return it->second;
}

const WorkerContext::Entry* WorkerContext::find(int64_t handle) const {
  auto it = w_->st_->slab.find(handle);
  return it == w_->st_->slab.end() ? nullptr : &it->second;
}

void WorkerContext::bad_handle(int64_t handle, const char* want) const {
  std::string what = want;
  int status = 0;
  char* readable = abi::__cxa_demangle(want, nullptr, nullptr, &status);
  if (status == 0 && readable != nullptr) what = readable;
  std::free(readable);
  throw std::invalid_argument(w_->name_ + " holds no " + what + " with handle " + std::to_string(handle));
}

void* WorkerContext::buffer(int64_t handle, size_t* bytes) const {
  const Entry* e = find(handle);
  if (e == nullptr || e->res != nullptr) bad_handle(handle, "device buffer");
  if (bytes != nullptr) *bytes = e->bytes;
  return e->ptr;
}

int64_t WorkerContext::add_resource(std::unique_ptr<Resource> r) {
  if (r == nullptr) throw std::invalid_argument("add_resource of a null resource");
  DeviceWorker::State& s = *w_->st_;
  const int64_t h = s.next_handle++;
  s.slab[h].res = std::move(r);
  return h;
}

void WorkerContext::drop(int64_t handle) {
  DeviceWorker::State& s = *w_->st_;
  auto it = s.slab.find(handle);
  if (it == s.slab.end()) bad_handle(handle, "buffer or resource");
  // Unlink first: a failing free must not leave a dangling entry behind.
  Entry e = std::move(it->second);
  s.slab.erase(it);
  if (e.ptr != nullptr) s.by_ptr.erase(e.ptr);
  const bool dead = poisoned() && !w_->host_only_;
  if (e.res) {
    if (dead)
      (void)e.res.release();  // the memory went with the context
    else
      e.res.reset();
    return;
  }
  if (e.ptr == nullptr || dead) return;
  if (w_->host_only_) {
    std::free(e.ptr);
    return;
  }
#ifdef HX_WITH_CUDA
  cudaError_t err = cudaFree(e.ptr);
  if (err == cudaSuccess) return;
  if (is_sticky(err)) {
    // The context died (possibly from an earlier job's fault surfacing here):
    // the memory is gone with it, so the free succeeded in effect.
    w_->poison_cuda(detail::format_failure(
        "cudaFree", std::string(cudaGetErrorString(err)) + " (" + cudaGetErrorName(err) + ")", __FILE__, __LINE__));
    return;
  }
  detail::throw_cuda(err, "cudaFree", __FILE__, __LINE__);
#endif
}

void* WorkerContext::upload(const void* host, size_t bytes, void* dst) {
  if (bytes == 0) return dst;
  if (host == nullptr) throw std::invalid_argument("upload from a null host pointer");
  DeviceWorker::State& s = *w_->st_;
  const bool owned = dst == nullptr;
  if (owned) dst = alloc(bytes);
  try {
    if (!s.pool) s.pool = std::make_unique<CopyPool>(CopyPool::default_helpers(), thread_name(w_->device_) + "-cp");
    if (w_->host_only_) {
      s.pool->copy(dst, host, bytes);
      return dst;
    }
#ifdef HX_WITH_CUDA
    if (!s.stager) s.stager = std::make_unique<Stager>(s.copy, kStagingChunk, s.pool.get());
    HX_CUDA_CHECK(cudaEventRecord(s.compute_mark, s.compute));
    HX_CUDA_CHECK(cudaStreamWaitEvent(s.copy, s.compute_mark, 0));
    s.stager->upload(dst, host, bytes);
    HX_CUDA_CHECK(cudaEventRecord(s.copy_mark, s.copy));
    HX_CUDA_CHECK(cudaStreamWaitEvent(s.compute, s.copy_mark, 0));
#endif
    return dst;
  } catch (...) {
    if (owned) {
      try {
        free(dst);
      } catch (...) {
      }
    }
    throw;
  }
}

void WorkerContext::download(void* host, const void* src, size_t bytes) {
  if (bytes == 0) return;
  if (w_->host_only_) {
    std::memcpy(host, src, bytes);
    return;
  }
#ifdef HX_WITH_CUDA
  DeviceWorker::State& s = *w_->st_;
  HX_CUDA_CHECK(cudaEventRecord(s.compute_mark, s.compute));
  HX_CUDA_CHECK(cudaStreamWaitEvent(s.copy, s.compute_mark, 0));
  HX_CUDA_CHECK(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, s.copy));
  HX_CUDA_CHECK(cudaStreamSynchronize(s.copy));
#endif
}

void WorkerContext::synchronize() {
  if (w_->host_only_) return;
#ifdef HX_WITH_CUDA
  HX_CUDA_CHECK(cudaStreamSynchronize(w_->st_->compute));
  HX_CUDA_CHECK(cudaStreamSynchronize(w_->st_->copy));
#endif
}

}  // namespace hx

// The device worker: one OS thread per CUDA device owns that device's context,
// streams, cuBLAS handles, NCCL communicator and every device allocation.
//
// Callers submit jobs (callables taking WorkerContext&) and wait on futures;
// jobs run one at a time in submission order on the worker thread, so only
// that thread ever makes CUDA calls for the device (invariant 1). A job must
// never wait on a future of its own worker (it would wait forever). A sticky
// CUDA error poisons the worker: later jobs fail fast without touching CUDA,
// naming the device and the original failure (invariant 2). CUDA documents
// context-corrupting errors as lost for the whole process, so a real one
// poisons every CUDA worker of the process (the process itself survives;
// only a new process gets the devices back).
//
// Built without HX_WITH_CUDA, or constructed with device_index -1, the same
// queue, futures, slab, poisoning and shutdown run as a host-only worker whose
// "device memory" is host heap and whose streams and handles are null.
//
// The header needs no CUDA headers: the handle types are forward-declared
// exactly as the CUDA, cuBLAS and NCCL headers declare them.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <utility>

#if defined(HX_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>
#else
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
#endif
struct cublasContext;
typedef struct cublasContext* cublasHandle_t;
struct cublasLtContext;
typedef struct cublasLtContext* cublasLtHandle_t;
struct ncclComm;
typedef struct ncclComm* ncclComm_t;

namespace hx {

// Anything a job keeps on the device between jobs (a model's weights, a KV
// cache, a captured graph). Destroyed on the worker thread with the device
// current, by drop() or at shutdown (newest first). On a poisoned CUDA
// worker the object is leaked instead: its destructor would make CUDA calls
// on a dead context.
// Destructors must not throw.
class Resource {
 public:
  virtual ~Resource() = default;
};

// The exception every job failure reaches its waiter as. The message starts
// with the device name ("cuda:0: ...") and keeps the original error text
// (call, file, line for CUDA errors). std::invalid_argument thrown by a job
// passes through unchanged (bad input, not a device failure).
class WorkerError : public std::runtime_error {
 public:
  WorkerError(const std::string& message, std::string device, bool sticky = false, bool poisoned = false)
      : std::runtime_error(message), device(std::move(device)), sticky(sticky), poisoned(poisoned) {}
  std::string device;  // "cuda:0", "host"
  bool sticky;         // the failure itself was a sticky device error
  bool poisoned;       // the worker is poisoned (by this failure or an earlier one)
};

class DeviceWorker;

// What a job sees. Only valid on the worker thread, during the job.
class WorkerContext {
 public:
  int device() const;                // CUDA ordinal; -1 for a host-only worker
  const std::string& name() const;   // "cuda:0", "host"
  bool host_only() const;
  cudaStream_t compute_stream() const;  // non-blocking; null when host-only
  cudaStream_t copy_stream() const;     // non-blocking; null when host-only
  cublasHandle_t cublas() const;        // bound to compute_stream(); null when host-only
  cublasLtHandle_t cublaslt() const;    // null when host-only
  ncclComm_t nccl_comm() const;         // throws std::logic_error before nccl_init (or once aborted)
  int nccl_rank() const;                // -1 before nccl_init
  int nccl_nranks() const;              // 0 before nccl_init
  // Creates this worker's communicator on its thread; blocks until all nranks
  // ranks have joined (submit every rank's init before waiting on any).
  // unique_id: the NCCL_UNIQUE_ID_BYTES bytes from nccl_unique_id() or a store.
  void nccl_init(const std::string& unique_id, int nranks, int rank);
  // Destroys this worker's communicator (none: no-op), so nccl_init may run
  // again (a new tensor-parallel group). Submit it on every rank before
  // waiting on any.
  void nccl_destroy();

  // (free, total) bytes of device memory; host RAM for a host-only worker.
  std::pair<size_t, size_t> mem_info() const;

  // Device memory tracked in the worker's slab: freed at shutdown if a job
  // did not free it. alloc(0) returns nullptr.
  void* alloc(size_t bytes);
  void free(void* ptr);                     // no-op for nullptr; throws on an unknown pointer
  int64_t handle_of(const void* ptr) const; // the slab handle of an alloc()ed buffer
  void* buffer(int64_t handle, size_t* bytes = nullptr) const;  // throws on a bad handle

  // Resources: the slab takes ownership and returns a handle (> 0).
  int64_t add_resource(std::unique_ptr<Resource> r);
  template <class T>
  T* resource(int64_t handle) const;  // throws std::invalid_argument: unknown handle / wrong type
  // Frees a buffer or destroys a resource by handle; unknown handles throw.
  void drop(int64_t handle);

  // Host -> device through pinned staging buffers on the copy stream, double
  // buffered (host memcpy into one staging buffer overlaps the DMA from the
  // other), chunked, the memcpy spread over a few helper threads. dst ==
  // nullptr allocates (tracked). The copy starts after work already queued on
  // compute_stream() (dst may be in use). Returns the device pointer. On return the
  // host buffer may be reused, and work later queued on compute_stream() sees
  // the data (the compute stream waits on the copy); the copy stream itself
  // is not synchronized.
  void* upload(const void* host, size_t bytes, void* dst = nullptr);
  // Device -> host, after all work queued so far on both streams; synchronous.
  void download(void* host, const void* src, size_t bytes);
  // Waits for both streams; a failure surfaces as hx::CudaError.
  void synchronize();

  bool poisoned() const;
  // True once shutdown began: long jobs (loads) may stop early.
  bool stop_requested() const;

 private:
  friend class DeviceWorker;
  explicit WorkerContext(DeviceWorker* w) : w_(w) {}
  struct Entry;
  const Entry* find(int64_t handle) const;
  [[noreturn]] void bad_handle(int64_t handle, const char* want) const;
  DeviceWorker* w_;
};

// Waits on the replies of one kind of repeated job (a decode step, say).
// It learns how long the job takes (moving average of caller-side waits),
// sleeps until about three quarters of that, then polls the future, so the
// caller resumes within microseconds of the reply instead of after a futex
// wake-up (tens of microseconds on a virtual machine). Polling lasts at most
// until twice the expected time; after that, and on the first call, it simply
// blocks. Thread-safe; the result and any exception are the future's.
class JobWaiter {
 public:
  template <class T>
  T wait(std::future<T>& f) {
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    const int64_t expect = expected_ns_.load(std::memory_order_relaxed);
    if (expect > 0 && f.wait_for(std::chrono::nanoseconds(expect * 3 / 4)) != std::future_status::ready) {
      const auto until = t0 + std::chrono::nanoseconds(2 * expect);
      while (f.wait_for(std::chrono::seconds(0)) != std::future_status::ready && clock::now() < until)
        std::this_thread::yield();
    }
    f.wait();
    const int64_t took = std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - t0).count();
    // Moving average over ~8 replies; the first reply seeds it.
    expected_ns_.store(expect > 0 ? expect + (took - expect) / 8 : took, std::memory_order_relaxed);
    return f.get();
  }
  // wait() with a limit: false when `timeout` passed before the reply (which
  // may still come; nothing is learned then). Any future type (std::future,
  // std::shared_future); the result stays in the future.
  template <class Future>
  bool wait_for(Future& f, std::chrono::nanoseconds timeout) {
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    const auto deadline = t0 + timeout;
    const int64_t expect = expected_ns_.load(std::memory_order_relaxed);
    if (expect > 0 &&
        f.wait_until(std::min(deadline, t0 + std::chrono::nanoseconds(expect * 3 / 4))) != std::future_status::ready) {
      const auto until = std::min(deadline, t0 + std::chrono::nanoseconds(2 * expect));
      while (f.wait_for(std::chrono::seconds(0)) != std::future_status::ready && clock::now() < until)
        std::this_thread::yield();
    }
    if (f.wait_until(deadline) != std::future_status::ready) return false;
    const int64_t took = std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - t0).count();
    expected_ns_.store(expect > 0 ? expect + (took - expect) / 8 : took, std::memory_order_relaxed);
    return true;
  }
  int64_t expected_ns() const { return expected_ns_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> expected_ns_{0};
};

class DeviceWorker {
 public:
  // Starts the thread "hx-dev-N" and sets the device up on it; throws
  // WorkerError if that fails (bad ordinal, no driver). device_index -1, or any
  // index in a build without CUDA, gives a host-only worker.
  explicit DeviceWorker(int device_index);
  ~DeviceWorker();  // shutdown()
  DeviceWorker(const DeviceWorker&) = delete;
  DeviceWorker& operator=(const DeviceWorker&) = delete;

  // Queues f to run as f(WorkerContext&) on the worker thread, after every job
  // submitted before it. The future holds f's result, or a WorkerError /
  // std::invalid_argument if f (or the device) failed, the worker is poisoned,
  // or it shut down before running f. After f returns, pending CUDA launch
  // errors and the streams' error state are checked, so a fault f caused but
  // did not check still fails f's future.
  template <class F>
  auto submit(F&& f) -> std::future<std::invoke_result_t<std::decay_t<F>&, WorkerContext&>>;

  // Like submit, but f also runs on a poisoned worker, which must then make
  // no CUDA call (ctx.poisoned() tells; ctx.free and ctx.drop already obey
  // this). For cleanup: freeing and dropping on a dead device succeed.
  template <class F>
  auto submit_cleanup(F&& f) -> std::future<std::invoke_result_t<std::decay_t<F>&, WorkerContext&>>;

  int device_index() const { return device_; }  // -1 when host-only
  const std::string& name() const { return name_; }
  bool host_only() const { return host_only_; }
  int cc_major() const { return cc_major_; }  // compute capability; 0 when host-only
  int cc_minor() const { return cc_minor_; }

  bool is_poisoned() const;
  std::string poison_reason() const;  // empty unless poisoned
  bool is_shut_down() const;

  // Stop taking jobs, answer queued ones with "worker for cuda:N shut down",
  // let the running job finish, free the slab and the device objects on the
  // thread. begin_shutdown() returns at once; shutdown() also joins the
  // thread (call begin_shutdown on every NCCL rank first, then shutdown, so
  // collective teardown cannot wait on a rank that was never told).
  // Idempotent; must not be called from the worker thread itself.
  void begin_shutdown();
  void shutdown();

  // Marks the worker poisoned as if a sticky error had been seen (tests).
  void poison(const std::string& reason);

  // Aborts this worker's NCCL communicator (ncclCommAbort) from any thread,
  // without a job: NCCL kernels in flight on it give up, so a job stuck in a
  // collective returns; later collectives fail until nccl_init runs again.
  // The tensor-parallel watchdog's call (its worker is busy with the stuck
  // step, so it cannot wait for a job); the worker itself is not poisoned.
  void abort_nccl() noexcept;

 private:
  friend class WorkerContext;
  struct Job {
    virtual ~Job() = default;
    virtual void run(DeviceWorker& w) = 0;  // calls the job, then w.after_job()
    virtual void fail(std::exception_ptr e) = 0;
    bool cleanup = false;
  };
  template <class F, class R>
  struct JobImpl;
  struct State;  // device objects and the slab (worker.cpp)

  template <class F>
  auto enqueue(F&& f, bool cleanup) -> std::future<std::invoke_result_t<std::decay_t<F>&, WorkerContext&>>;
  void push(std::unique_ptr<Job> job);
  void thread_main(std::promise<void>* started);
  void setup();            // on the thread: device, streams, handles
  void teardown();         // on the thread: slab, NCCL, handles, streams
  // On the thread, after a job: throws CudaError on a pending launch / stream
  // error; makes no CUDA call on a poisoned worker; for a cleanup job a sticky
  // error poisons instead of failing it.
  void after_job(bool cleanup);
  // poison() for a real sticky CUDA error: CUDA documents those as lost for
  // the whole process, so every other CUDA worker is poisoned at its next job.
  void poison_cuda(const std::string& reason);
  std::exception_ptr classify(std::exception_ptr e);  // poisons on sticky errors; adds the device name
  std::string probe_context();  // on the thread: poisons and describes a broken context, else ""
  std::exception_ptr shut_down_error() const;
  std::exception_ptr poisoned_error() const;

  const int device_;
  bool host_only_;
  std::string name_;
  int cc_major_ = 0, cc_minor_ = 0;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Job>> queue_;
  // queue_ non-empty or stopping_, readable without mu_: the idle thread polls
  // it for a moment before sleeping on cv_ (see thread_main).
  std::atomic<bool> has_work_{false};
  bool stopping_ = false;   // no new jobs; guarded by mu_
  bool joined_ = false;     // guarded by join_mu_
  std::mutex join_mu_;
  bool poisoned_ = false;   // guarded by mu_
  std::string poison_reason_;
  std::thread thread_;

  std::unique_ptr<State> st_;  // touched only on the worker thread
  WorkerContext ctx_{this};
};

// ---------------------------------------------------------------------------
// Template definitions.

struct WorkerContext::Entry {
  void* ptr = nullptr;
  size_t bytes = 0;
  std::unique_ptr<Resource> res;  // null for a plain buffer
};

template <class T>
T* WorkerContext::resource(int64_t handle) const {
  const Entry* e = find(handle);
  if (e == nullptr || e->res == nullptr) bad_handle(handle, typeid(T).name());
  T* p = dynamic_cast<T*>(e->res.get());
  if (p == nullptr) bad_handle(handle, typeid(T).name());
  return p;
}

template <class F, class R>
struct DeviceWorker::JobImpl final : DeviceWorker::Job {
  explicit JobImpl(F&& f) : fn(std::forward<F>(f)) {}
  void run(DeviceWorker& w) override {
    if constexpr (std::is_void_v<R>) {
      fn(w.ctx_);
      w.after_job(cleanup);
      promise.set_value();
    } else {
      R r = fn(w.ctx_);
      w.after_job(cleanup);
      promise.set_value(std::move(r));
    }
  }
  void fail(std::exception_ptr e) override { promise.set_exception(e); }
  std::decay_t<F> fn;
  std::promise<R> promise;
};

template <class F>
auto DeviceWorker::enqueue(F&& f, bool cleanup) -> std::future<std::invoke_result_t<std::decay_t<F>&, WorkerContext&>> {
  using R = std::invoke_result_t<std::decay_t<F>&, WorkerContext&>;
  auto job = std::make_unique<JobImpl<F, R>>(std::forward<F>(f));
  job->cleanup = cleanup;
  auto fut = job->promise.get_future();
  push(std::move(job));
  return fut;
}

template <class F>
auto DeviceWorker::submit(F&& f) -> std::future<std::invoke_result_t<std::decay_t<F>&, WorkerContext&>> {
  return enqueue(std::forward<F>(f), false);
}

template <class F>
auto DeviceWorker::submit_cleanup(F&& f) -> std::future<std::invoke_result_t<std::decay_t<F>&, WorkerContext&>> {
  return enqueue(std::forward<F>(f), true);
}

}  // namespace hx

// Python face of the device worker: _C.DeviceWorker, _C.PendingJob,
// _C.nccl_unique_id, _C.shutdown_all.
//
// Every wait on a job releases the GIL; no job touches a Python object, so
// the worker thread never needs the GIL. Job failures arrive in Python as
// helexa_native.errors.DeviceError (with .device and .poisoned set); bad
// arguments detected on the worker stay ValueError.
#include <Python.h>
#include <pthread.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "bindings/bind.h"
#include "common/check.h"
#include "runtime/nccl_comm.h"
#include "runtime/registry.h"
#include "runtime/worker.h"
#ifdef HX_WITH_CUDA
#include "runtime/fault.h"
#endif

namespace py = pybind11;

namespace hx {

namespace {

template <class T>
T wait(std::future<T>& f) {
  py::gil_scoped_release nogil;
  return f.get();
}

void wait(std::future<void>& f) {
  py::gil_scoped_release nogil;
  f.get();
}

void raise_device_error(const std::string& msg, const std::string& device, bool poisoned) {
  py::object cls;
  try {
    cls = py::module_::import("helexa_native.errors").attr("DeviceError");
  } catch (py::error_already_set&) {
    PyErr_SetString(PyExc_RuntimeError, msg.c_str());
    return;
  }
  py::object exc = cls(msg);
  exc.attr("device") = device;
  exc.attr("poisoned") = poisoned;
  PyErr_SetObject(cls.ptr(), exc.ptr());
}

// A job whose result Python collects later (NCCL ranks must all be submitted
// before any is waited on; tests queue work behind a slow job).
class PendingJob {
 public:
  explicit PendingJob(std::future<int64_t> f) : f_(f.share()) {}
  int64_t wait_result() {
    py::gil_scoped_release nogil;
    return f_.get();
  }
  bool done() const { return f_.wait_for(std::chrono::seconds(0)) == std::future_status::ready; }

 private:
  std::shared_future<int64_t> f_;
};

// Holds a C-contiguous view of a Python buffer until destroyed (with the GIL).
class BufferView {
 public:
  explicit BufferView(const py::object& obj) {
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_C_CONTIGUOUS) != 0) {
      PyErr_Clear();
      throw py::value_error("upload needs an object exporting a C-contiguous buffer (bytes, numpy array, ...)");
    }
  }
  ~BufferView() { PyBuffer_Release(&view_); }
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;
  const void* data() const { return view_.buf; }
  size_t size() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

std::atomic<int64_t> g_job_sequence{0};

nccl::DType parse_dtype(const std::string& s) {
  if (s == "f32") return nccl::DType::kF32;
  if (s == "bf16") return nccl::DType::kBF16;
  throw py::value_error("dtype must be 'f32' or 'bf16', got '" + s + "'");
}

std::future<int64_t> submit_nccl_init(DeviceWorker& w, const std::string& uid, int nranks, int rank) {
  if (uid.size() != nccl::unique_id_bytes())
    throw py::value_error("unique_id must have " + std::to_string(nccl::unique_id_bytes()) + " bytes, got " +
                          std::to_string(uid.size()));
  if (nranks < 1 || rank < 0 || rank >= nranks)
    throw py::value_error("rank " + std::to_string(rank) + " out of range for nranks " + std::to_string(nranks));
  return w.submit([uid, nranks, rank](WorkerContext& ctx) -> int64_t {
    ctx.nccl_init(uid, nranks, rank);
    return 0;
  });
}

std::future<int64_t> submit_allreduce_test(DeviceWorker& w, int64_t handle, int64_t count, const std::string& dtype) {
  nccl::DType t = parse_dtype(dtype);
  if (count < 0) throw py::value_error("count must be >= 0");
  return w.submit([handle, count, t](WorkerContext& ctx) -> int64_t {
    size_t cap = 0;
    void* p = ctx.buffer(handle, &cap);
    size_t need = static_cast<size_t>(count) * (t == nccl::DType::kF32 ? 4 : 2);
    if (need > cap)
      throw std::invalid_argument("all-reduce of " + std::to_string(need) + " bytes over a buffer of " +
                                  std::to_string(cap));
    nccl::allreduce_sum(ctx.nccl_comm(), p, static_cast<size_t>(count), t, ctx.compute_stream());
    ctx.synchronize();
    return 0;
  });
}

}  // namespace

void bind_runtime(py::module_& m) {
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const WorkerError& e) {
      raise_device_error(e.what(), e.device, e.poisoned);
    } catch (const CudaError& e) {
      raise_device_error(e.what(), "", e.sticky);
    }
  });

  py::class_<PendingJob>(m, "PendingJob", "A submitted job; wait() returns its result or raises its error.")
      .def("wait", &PendingJob::wait_result, "Block (GIL released) until the job ends; return its result.")
      .def("done", &PendingJob::done, "True once the job has ended (wait() will not block).");

  py::class_<DeviceWorker, std::shared_ptr<DeviceWorker>>(
      m, "DeviceWorker",
      "The thread owning one CUDA device (or a host-only worker for device_index -1 or a CPU build). "
      "One per device per process: constructing it for a device returns the live worker.")
      .def(py::init([](int device_index) {
             py::gil_scoped_release nogil;
             return acquire_worker(device_index);
           }),
           py::arg("device_index"))
      // The C++ registry (runtime/registry.h) is the one record of which
      // worker owns a device; Python wrappers of one worker compare equal.
      .def(
          "__eq__", [](const DeviceWorker& a, const DeviceWorker& b) { return &a == &b; }, py::is_operator())
      .def("__hash__", [](const DeviceWorker& w) { return std::hash<const DeviceWorker*>()(&w); })
      .def_property_readonly("device_index", &DeviceWorker::device_index)
      .def_property_readonly("name", &DeviceWorker::name)
      .def_property_readonly("host_only", &DeviceWorker::host_only)
      .def_property_readonly("compute_capability",
                             [](const DeviceWorker& w) { return std::make_pair(w.cc_major(), w.cc_minor()); })
      .def("is_poisoned", &DeviceWorker::is_poisoned)
      .def("poison_reason", &DeviceWorker::poison_reason)
      .def("is_shut_down", &DeviceWorker::is_shut_down)
      .def(
          "vram",
          [](DeviceWorker& w) {
            auto f = w.submit([](WorkerContext& ctx) { return ctx.mem_info(); });
            return wait(f);
          },
          "(free, total) bytes of device memory (host RAM for a host-only worker).")
      .def(
          "upload",
          [](DeviceWorker& w, const py::object& data) {
            BufferView view(data);
            const void* src = view.data();
            const size_t n = view.size();
            if (n == 0) throw py::value_error("nothing to upload: the buffer is empty");
            auto f = w.submit([src, n](WorkerContext& ctx) {
              void* dst = ctx.alloc(n);
              try {
                ctx.upload(src, n, dst);
                ctx.synchronize();
              } catch (...) {
                try {
                  ctx.free(dst);
                } catch (...) {
                }
                throw;
              }
              return std::make_pair(ctx.handle_of(dst), static_cast<int64_t>(n));
            });
            return wait(f);
          },
          py::arg("data"), "Copy a C-contiguous buffer to new device memory; returns (handle, nbytes).")
      .def(
          "download",
          [](DeviceWorker& w, int64_t handle, int64_t nbytes) {
            auto f = w.submit([handle, nbytes](WorkerContext& ctx) {
              size_t cap = 0;
              void* p = ctx.buffer(handle, &cap);
              size_t n = nbytes < 0 ? cap : static_cast<size_t>(nbytes);
              if (n > cap)
                throw std::invalid_argument("download of " + std::to_string(n) + " bytes from a buffer of " +
                                            std::to_string(cap));
              std::string out(n, '\0');
              ctx.download(out.data(), p, n);
              return out;
            });
            std::string s = wait(f);
            return py::bytes(s);
          },
          py::arg("handle"), py::arg("nbytes") = -1, "Copy a device buffer back (all of it when nbytes < 0).")
      .def(
          "free",
          [](DeviceWorker& w, int64_t handle) {
            auto f = w.submit_cleanup([handle](WorkerContext& ctx) { ctx.drop(handle); });
            try {
              wait(f);
            } catch (const WorkerError&) {
              // Shutdown already freed the whole slab; a dead context took
              // the memory with it.
              if (!w.is_shut_down() && !w.is_poisoned()) throw;
            }
          },
          py::arg("handle"), "Free a buffer or resource (a no-op on memory lost with a poisoned device).")
      .def(
          "synchronize",
          [](DeviceWorker& w) {
            auto f = w.submit([](WorkerContext& ctx) { ctx.synchronize(); });
            wait(f);
          },
          "Wait for all queued device work.")
      .def(
          "begin_shutdown", [](DeviceWorker& w) { w.begin_shutdown(); },
          "Stop taking jobs and fail queued ones; returns without waiting.")
      .def(
          "shutdown",
          [](DeviceWorker& w) {
            py::gil_scoped_release nogil;
            w.shutdown();
          },
          "Fail queued jobs, free everything on the worker thread and join it.")
      // NCCL
      .def(
          "nccl_init",
          [](DeviceWorker& w, py::bytes uid, int nranks, int rank) {
            auto f = submit_nccl_init(w, std::string(uid), nranks, rank);
            wait(f);
          },
          py::arg("unique_id"), py::arg("nranks"), py::arg("rank"),
          "Create this worker's NCCL communicator (blocks until every rank joins).")
      .def(
          "nccl_init_async",
          [](DeviceWorker& w, py::bytes uid, int nranks, int rank) {
            return PendingJob(submit_nccl_init(w, std::string(uid), nranks, rank));
          },
          py::arg("unique_id"), py::arg("nranks"), py::arg("rank"))
      .def(
          "nccl_destroy_async",
          [](DeviceWorker& w) {
            return PendingJob(w.submit_cleanup([](WorkerContext& ctx) -> int64_t {
              ctx.nccl_destroy();
              return 0;
            }));
          },
          "Destroy this worker's NCCL communicator (so nccl_init may run again); submit it on every rank "
          "before waiting on any.")
      .def(
          "abort_nccl",
          [](DeviceWorker& w) {
            py::gil_scoped_release nogil;
            w.abort_nccl();
          },
          "Abort this worker's NCCL communicator from this thread, without a job (collectives in flight "
          "return; later ones fail until nccl_init runs again). The tensor-parallel watchdog's call.")
      .def_property_readonly("nccl_rank",
                             [](DeviceWorker& w) {
                               auto f = w.submit([](WorkerContext& ctx) { return ctx.nccl_rank(); });
                               return wait(f);
                             })
      .def(
          "nccl_allreduce_test",
          [](DeviceWorker& w, int64_t handle, int64_t count, const std::string& dtype) {
            auto f = submit_allreduce_test(w, handle, count, dtype);
            wait(f);
          },
          py::arg("handle"), py::arg("count"), py::arg("dtype"),
          "In-place sum all-reduce over a device buffer (a sanity check of the NCCL group). Every rank "
          "must run it at once: from one process use nccl_allreduce_test_async on each worker.")
      .def(
          "nccl_allreduce_test_async",
          [](DeviceWorker& w, int64_t handle, int64_t count, const std::string& dtype) {
            return PendingJob(submit_allreduce_test(w, handle, count, dtype));
          },
          py::arg("handle"), py::arg("count"), py::arg("dtype"))
      // Test hooks
      .def(
          "sleep_job",
          [](DeviceWorker& w, int ms, bool learn) {
            auto f = w.submit([ms](WorkerContext&) -> int64_t {
              std::this_thread::sleep_for(std::chrono::milliseconds(ms));
              return 0;
            });
            if (!learn) return wait(f);
            static JobWaiter waiter;  // as a model's decode steps use one
            py::gil_scoped_release nogil;
            return waiter.wait(f);
          },
          py::arg("ms"), py::arg("learn") = false,
          "Test hook: occupy the worker for ms milliseconds. learn: wait through a JobWaiter "
          "that learns the job's duration, as decode steps do.")
      .def(
          "sleep_job_async",
          [](DeviceWorker& w, int ms) {
            return PendingJob(w.submit([ms](WorkerContext&) -> int64_t {
              std::this_thread::sleep_for(std::chrono::milliseconds(ms));
              return 0;
            }));
          },
          py::arg("ms"))
      .def(
          "echo_job",
          [](DeviceWorker& w, int64_t v) {
            auto f = w.submit([v](WorkerContext&) { return v; });
            return wait(f);
          },
          py::arg("value"), "Test hook: a job returning its argument.")
      .def(
          "echo_job_async",
          [](DeviceWorker& w, int64_t v) { return PendingJob(w.submit([v](WorkerContext&) { return v; })); },
          py::arg("value"))
      .def(
          "sequence_job_async",
          [](DeviceWorker& w) {
            return PendingJob(w.submit([](WorkerContext&) { return g_job_sequence.fetch_add(1); }));
          },
          "Test hook: a job returning a process-wide counter it increments (shows execution order).")
      .def(
          "raise_job",
          [](DeviceWorker& w, const std::string& message) {
            auto f = w.submit([message](WorkerContext&) -> int64_t { throw std::runtime_error(message); });
            wait(f);
          },
          py::arg("message"), "Test hook: a job that throws std::runtime_error(message).")
      .def(
          "bad_input_job",
          [](DeviceWorker& w, const std::string& message) {
            auto f = w.submit([message](WorkerContext&) -> int64_t { throw std::invalid_argument(message); });
            wait(f);
          },
          py::arg("message"), "Test hook: a job that throws std::invalid_argument(message).")
      .def(
          "thread_name_job",
          [](DeviceWorker& w) {
            auto f = w.submit([](WorkerContext&) {
              char buf[32] = {0};
              pthread_getname_np(pthread_self(), buf, sizeof(buf));
              return std::string(buf);
            });
            return wait(f);
          },
          "Test hook: the name of the thread jobs run on.")
      .def(
          "simulate_sticky_error",
          [](DeviceWorker& w) {
            auto f = w.submit([](WorkerContext&) -> int64_t {
              throw CudaError(detail::format_failure("simulate_sticky_error()", "simulated sticky device error",
                                                     __FILE__, __LINE__),
                              "simulated", 0, true, "simulate_sticky_error()", __FILE__, __LINE__);
            });
            wait(f);
          },
          "Test hook: fail a job with a sticky error, poisoning the worker without touching the device.")
      .def(
          "inject_fault",
          [](DeviceWorker& w) {
#ifdef HX_WITH_CUDA
            if (w.host_only()) throw py::value_error("inject_fault needs a CUDA worker");
            // Synchronized inside the job, so the fault surfaces and poisons
            // here rather than in whichever job comes next.
            auto f = w.submit([](WorkerContext& ctx) {
              fault_launch(ctx.compute_stream());
              ctx.synchronize();
            });
            wait(f);
#else
            (void)w;
            throw py::value_error("inject_fault needs a CUDA build");
#endif
          },
          "Test hook: run a kernel that stores to an illegal address (poisons this device's context).");

  m.def(
      "nccl_unique_id",
      []() -> py::bytes {
        std::string id;
        try {
          id = nccl::unique_id();
        } catch (const std::logic_error& e) {
          raise_device_error(e.what(), "", false);
          throw py::error_already_set();
        }
        return py::bytes(id);
      },
      "A fresh NCCL unique id (bytes) for one communicator.");
  m.def(
      "shutdown_all",
      []() {
        py::gil_scoped_release nogil;
        shutdown_all_workers();
      },
      "Shut down every registered device worker (all told first, then all joined).");
}

}  // namespace hx

// Error checks for CUDA, cuBLAS and NCCL calls.
//
// HX_CUDA_CHECK(expr), HX_CUBLAS_CHECK(expr), HX_NCCL_CHECK(expr) throw
// hx::CudaError carrying the call text, file, line, the library's error code
// and a `sticky` flag. Sticky errors leave the CUDA context (or the NCCL
// communicator) unusable: the device worker that sees one poisons itself and
// refuses all later work for that device. Nothing here exits or aborts; errors
// travel as exceptions through the worker's futures into Python.
//
// Header-only so kernel files compile alone with nvcc. The CUDA-side macros
// exist when compiling with nvcc or with HX_WITH_CUDA; HX_CUBLAS_CHECK needs
// cuBLAS headers, HX_NCCL_CHECK needs HX_WITH_NCCL and nccl.h. The error class
// itself is always available, so host-only builds share the poisoning code.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#if defined(HX_WITH_CUDA) || defined(__CUDACC__)
#define HX_CHECK_HAS_CUDA 1
#include <cuda_runtime.h>
#endif

#if defined(HX_CHECK_HAS_CUDA) && defined(__has_include)
#if __has_include(<cublas_v2.h>)
#define HX_CHECK_HAS_CUBLAS 1
#include <cublas_v2.h>
#endif
#endif

#if defined(HX_WITH_NCCL)
#define HX_CHECK_HAS_NCCL 1
#include <nccl.h>
#endif

namespace hx {

// A failed CUDA / cuBLAS / NCCL call (or a simulated one in host-only tests).
class CudaError : public std::runtime_error {
 public:
  CudaError(std::string message, std::string library, int code, bool sticky, std::string call = {},
            std::string file = {}, int line = 0)
      : std::runtime_error(std::move(message)),
        library(std::move(library)),
        call(std::move(call)),
        file(std::move(file)),
        line(line),
        code(code),
        sticky(sticky) {}

  std::string library;  // "cuda", "cublas", "nccl" (or "simulated")
  std::string call;     // the source text of the failing call
  std::string file;
  int line;
  int code;             // the library's status value
  bool sticky;          // true: the context / communicator is unusable from now on
};

namespace detail {

inline std::string format_failure(const char* call, const std::string& reason, const char* file, int line) {
  std::string s(call);
  s += " failed: ";
  s += reason;
  s += " at ";
  s += file;
  s += ":";
  s += std::to_string(line);
  return s;
}

}  // namespace detail

#ifdef HX_CHECK_HAS_CUDA
// Errors after which the CUDA context cannot be used again (the driver reports
// them from every later call in the process for this device).
inline bool is_sticky(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorNvlinkUncorrectable:
    case cudaErrorContextIsDestroyed: return true;
    default: return false;
  }
}

namespace detail {
[[noreturn]] inline void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  std::string reason = std::string(cudaGetErrorString(e)) + " (" + cudaGetErrorName(e) + ")";
  throw CudaError(format_failure(call, reason, file, line), "cuda", static_cast<int>(e), is_sticky(e), call, file,
                  line);
}
}  // namespace detail

#define HX_CUDA_CHECK(expr)                                                                               \
  do {                                                                                                    \
    cudaError_t hx_check_err_ = (expr);                                                                   \
    if (hx_check_err_ != cudaSuccess) ::hx::detail::throw_cuda(hx_check_err_, #expr, __FILE__, __LINE__); \
  } while (0)
#endif  // HX_CHECK_HAS_CUDA

#ifdef HX_CHECK_HAS_CUBLAS
namespace detail {
[[noreturn]] inline void throw_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  std::string reason =
      std::string(cublasGetStatusString(s)) + " (cublasStatus " + std::to_string(static_cast<int>(s)) + ")";
  // cuBLAS reports a faulting kernel as EXECUTION_FAILED; whether the context
  // is gone is decided by the worker's own probe after the job, not here.
  throw CudaError(format_failure(call, reason, file, line), "cublas", static_cast<int>(s), false, call, file, line);
}
}  // namespace detail

#define HX_CUBLAS_CHECK(expr)                                                                                       \
  do {                                                                                                              \
    cublasStatus_t hx_check_st_ = (expr);                                                                           \
    if (hx_check_st_ != CUBLAS_STATUS_SUCCESS) ::hx::detail::throw_cublas(hx_check_st_, #expr, __FILE__, __LINE__); \
  } while (0)
#endif  // HX_CHECK_HAS_CUBLAS

#ifdef HX_CHECK_HAS_NCCL
// A communicator that hit a system, internal, remote or CUDA error cannot be
// trusted for further collectives; argument and usage errors leave it intact.
inline bool is_sticky(ncclResult_t r) {
  return r == ncclUnhandledCudaError || r == ncclSystemError || r == ncclInternalError || r == ncclRemoteError;
}

namespace detail {
[[noreturn]] inline void throw_nccl(ncclResult_t r, const char* call, const char* file, int line) {
  std::string reason = std::string(ncclGetErrorString(r)) + " (ncclResult " + std::to_string(static_cast<int>(r)) + ")";
  throw CudaError(format_failure(call, reason, file, line), "nccl", static_cast<int>(r), is_sticky(r), call, file,
                  line);
}
}  // namespace detail

#define HX_NCCL_CHECK(expr)                                                                               \
  do {                                                                                                    \
    ncclResult_t hx_check_res_ = (expr);                                                                  \
    if (hx_check_res_ != ncclSuccess) ::hx::detail::throw_nccl(hx_check_res_, #expr, __FILE__, __LINE__); \
  } while (0)
#endif  // HX_CHECK_HAS_NCCL

}  // namespace hx

// Kernel launches that may overlap their predecessor (programmatic dependent
// launch, sm_90+).
//
// A decode step is a few hundred small kernels in one CUDA graph; between two
// dependent kernels the GPU otherwise drains the first grid completely before
// it starts scheduling the second (about a microsecond each time). Launched
// through hx::launch_overlapped, the next kernel's blocks are scheduled while
// the previous grid finishes, and they wait in pdl_begin() until that grid
// has completed and its writes are visible.
//
// The contract, for every kernel launched this way: its first statement is
// pdl_begin(), before any read or write of global memory (reads of memory
// that no kernel writes, such as model weights, may come before it). Then ordering is
// exactly that of a plain stream launch (each grid still waits for the whole
// previous grid, transitively), only the launch latency is hidden. Kernels
// launched the usual way (<<< >>>) keep full stream ordering and need nothing.
//
// Off below sm_90 (the instructions do not exist there; pdl_begin() compiles
// to nothing) and when the environment sets HELEXA_PDL=0.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "common/arch.cuh"
#include "common/check.h"

namespace hx {

// First statement of an overlapped kernel: wait for the previous grid, then
// let the next one be scheduled.
__device__ __forceinline__ void pdl_begin() {
#if HX_HAS_PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether launches on `device` overlap (sm_90+ and not disabled).
inline bool pdl_enabled(int device) {
  static const bool allowed = [] {
    const char* v = std::getenv("HELEXA_PDL");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  return allowed && device_sm(device) >= 90;
}

// kernel<<<grid, block, smem, stream>>>(args...), overlapped with the previous
// kernel of the stream where pdl_enabled(). `kernel` must begin with pdl_begin().
template <class... Params, class... Args>
void launch_overlapped(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  if (pdl_enabled(current_device())) {
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  HX_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

}  // namespace hx

// Sorting a batch's (token, expert) pairs by expert: a counting sort in one
// CTA of 1024 threads (one per expert for the scans; kMoeMaxExperts = 1024).
//
//   count[e] = pairs routed to e (shared-memory atomics)
//   offsets = exclusive scan of count; active = experts with count > 0, in
//   id order (exclusive scan of the flags gives each its place)
//   slot of pair p = offsets[e] + (atomic cursor of e), slot_token = p / top_k
//   tiles: exclusive scan of ceil(count / tile_rows) gives each expert's
//   first tile; its thread writes them
//
// Scans are warp shuffles plus one pass over the 32 warp totals. The grid is
// one CTA whatever the batch, so a captured graph serves any routing. One
// arch path (sm_80+).
#include "kernels/moe_align.cuh"

#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"
#include "common/launch.cuh"
#include "kernels/moe_route.cuh"

namespace hx {
namespace {

constexpr int kThreads = 1024;  // >= kMoeMaxExperts: one expert per thread in the scans

// Exclusive scan of one value per thread over the CTA; *total gets the sum.
// warp_tot: 32 ints of shared memory.
__device__ __forceinline__ int block_exclusive_scan(int v, int* warp_tot, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += u;
  }
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int w = warp_tot[lane];
    int wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(kFullMask, wi, o);
      if (lane >= o) wi += u;
    }
    __syncwarp();
    warp_tot[lane] = wi - w;
    if (lane == 31) *total = wi;
  }
  __syncthreads();
  const int r = incl - v + warp_tot[warp];
  __syncthreads();  // warp_tot and *total are read before the next scan reuses them
  return r;
}

__global__ void __launch_bounds__(kThreads) moe_align_kernel(const int32_t* __restrict__ ids, int pairs, int E, int top_k,
                                                          int32_t* __restrict__ offsets, int32_t* __restrict__ active,
                                                          int32_t* __restrict__ n_active,
                                                          int32_t* __restrict__ pair_slot,
                                                          int32_t* __restrict__ slot_token, int tile_rows,
                                                          int4* __restrict__ tiles, int32_t* __restrict__ n_tiles) {
  pdl_begin();
  __shared__ int count[kMoeMaxExperts];
  __shared__ int cursor[kMoeMaxExperts];
  __shared__ int warp_tot[32];
  __shared__ int totals[3];
  const int tid = threadIdx.x;
  if (tid < E) count[tid] = 0;
  __syncthreads();
  for (int p = tid; p < pairs; p += kThreads) atomicAdd(&count[min(max(ids[p], 0), E - 1)], 1);
  __syncthreads();
  const int c = tid < E ? count[tid] : 0;
  const int off = block_exclusive_scan(c, warp_tot, &totals[0]);
  const int flag = c > 0 ? 1 : 0;
  const int place = block_exclusive_scan(flag, warp_tot, &totals[1]);
  if (tid < E) {
    offsets[tid] = off;
    cursor[tid] = off;
    if (flag) active[place] = tid;
  }
  if (tid == 0) {
    offsets[E] = totals[0];
    *n_active = totals[1];
  }
  if (tiles != nullptr) {
    const int nt = (c + tile_rows - 1) / tile_rows;
    const int first = block_exclusive_scan(nt, warp_tot, &totals[2]);
    for (int j = 0; j < nt; ++j) {
      const int r0 = j * tile_rows;
      tiles[first + j] = make_int4(tid, off + r0, min(tile_rows, c - r0), 0);
    }
    if (tid == 0) *n_tiles = totals[2];
  }
  __syncthreads();
  for (int p = tid; p < pairs; p += kThreads) {
    const int slot = atomicAdd(&cursor[min(max(ids[p], 0), E - 1)], 1);
    pair_slot[p] = slot;
    slot_token[slot] = p / top_k;
  }
}

}  // namespace

void moe_align_launch(const int32_t* ids, int pairs, int num_experts, int top_k, int32_t* offsets, int32_t* active,
                      int32_t* n_active, int32_t* pair_slot, int32_t* slot_token, int tile_rows, int4* tiles,
                      int32_t* n_tiles, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kMoeMaxExperts)
    throw std::invalid_argument("moe_align: num_experts must be 1.." + std::to_string(kMoeMaxExperts) + ", got " +
                                std::to_string(num_experts));
  if (top_k < 1) throw std::invalid_argument("moe_align: top_k must be positive");
  if (pairs < 1) throw std::invalid_argument("moe_align: pairs must be positive");
  if (!ids || !offsets || !active || !n_active || !pair_slot || !slot_token)
    throw std::invalid_argument("moe_align: null pointer");
  if (tiles != nullptr && (tile_rows < 1 || n_tiles == nullptr))
    throw std::invalid_argument("moe_align: a tile list needs tile_rows >= 1 and n_tiles");
  launch_overlapped(moe_align_kernel, dim3(1), dim3(kThreads), 0, stream, ids, pairs, num_experts, top_k, offsets,
                    active, n_active, pair_slot, slot_token, tile_rows, tiles, n_tiles);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

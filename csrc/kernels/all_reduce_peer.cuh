// One-shot sum all-reduce over peer memory, for the tensor-parallel ranks of
// one process (one device worker per GPU, peer access enabled between them).
// The small per-layer messages of a decode step (16 KB a token at hidden
// 4096, float32) take a few microseconds this way; NCCL's launch and
// protocol cost more than the data. Large messages go to NCCL.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace hx {

// Ranks one group may hold, and the CTAs of every launch (each CTA owns a
// fixed share of the elements and its own synchronisation slot, so the grid
// must be the same on every rank for every call).
constexpr int kPeerMaxRanks = 8;
constexpr int kPeerBlocks = 32;
constexpr int kPeerThreads = 512;

// Bytes of one rank's flag array: kPeerBlocks x kPeerMaxRanks arrival words
// written by the peers, then kPeerBlocks call counters of its own.
constexpr size_t kPeerFlagBytes = sizeof(uint32_t) * kPeerBlocks * (kPeerMaxRanks + 1);

// Everything one rank's launch reads; fixed once the group is linked, so a
// captured graph holds it by value.
struct PeerAllReduceArgs {
  float* staging[kPeerMaxRanks];   // each rank's [2, capacity] staging (device pointers, peer-mapped)
  uint32_t* flags[kPeerMaxRanks];  // each rank's flag array (kPeerFlagBytes)
  const volatile uint32_t* abort;  // host-mapped: nonzero makes a waiting CTA give up
  volatile uint32_t* arrived;      // host-mapped: calls this rank entered (progress for the watchdog); or null
  size_t capacity = 0;             // floats in each half of a staging buffer
  int rank = 0;
  int nranks = 0;
};

// x[i] = sum over ranks r (in rank order, so every rank gets the same bits)
// of rank r's x[i], in place. count <= capacity. Every rank of the group
// must launch it with the same count, in the same order relative to its
// other calls. The flag arrays start zeroed.
void peer_all_reduce_launch(const PeerAllReduceArgs& args, float* x /*[count]*/, size_t count, cudaStream_t stream);

}  // namespace hx

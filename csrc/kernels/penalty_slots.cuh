// The device penalty state of a batch: a pool of slots, one per sequence.
//
// present[s, t] = 1 when token t is in slot s's context (prompt or generated:
// repetition_penalty), counts[s, t] = how often slot s generated t
// (presence / frequency penalties). A sequence keeps its slot while others
// join and leave the batch; penalties_batch_launch (sampling.cuh) reads row
// slots[b] for batch row b. A new sequence: reset its slot, add its prompt
// with counts == nullptr, then add each sampled token with counts.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hx {

// For each i: present[slots[i], tokens[i]] = 1 and, when counts is given,
// counts[slots[i], tokens[i]] += 1 (atomics: a pair may repeat). Entries with
// a token outside [0, vocab) or a slot outside [0, max_slots) are skipped, as
// the host sampler skips such ids, so a batch row without penalty state can
// pass slot -1.
void penalty_update_batch_launch(const int32_t* tokens /*[n] device*/, const int32_t* slots /*[n] device*/, int n,
                                 int32_t* present /*[max_slots, vocab]*/,
                                 int32_t* counts /*[max_slots, vocab] or nullptr*/, int max_slots, int vocab,
                                 cudaStream_t stream);

// Zeroes the present (and counts, when given) rows of the listed slots;
// slots outside [0, max_slots) are skipped.
void penalty_reset_batch_launch(const int32_t* slots /*[n] device*/, int n, int32_t* present /*[max_slots, vocab]*/,
                                int32_t* counts /*[max_slots, vocab] or nullptr*/, int max_slots, int vocab,
                                cudaStream_t stream);

}  // namespace hx

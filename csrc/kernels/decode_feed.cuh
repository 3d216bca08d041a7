// Several decode steps in one job: between two replays of a pure-decode
// step, each row's sampled token becomes its next input, one position on.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hx {

// A pure-decode step's per-row inputs that the feed advances (device arrays
// of the step's row-input region; model/llama_model.h RowInputs).
struct DecodeFeed {
  int32_t* tokens = nullptr;
  int32_t* pos = nullptr;
  int32_t* slot_pos = nullptr;
  int32_t* seq_lens = nullptr;
  int32_t* steps = nullptr;
  const int32_t* tables = nullptr;  // [rows, stride] block ids
  int stride = 0;
  int block_shift = 0;  // log2 of the KV block size
  // Penalty state (sampling's present / counts rows, [slots, vocab]) that
  // each sampled token joins, as the host's update after a step would add
  // it; null: the job samples without penalties.
  const int32_t* slots = nullptr;
  int32_t* present = nullptr;
  int32_t* counts = nullptr;
  int vocab = 0;
};

// Row r after a step that sampled `token` for it: record the token, count
// it as generated in the row's penalty slot (when the job has penalties),
// and when `advance`, make it the row's input at the next position (the
// pool position through the row's block table, one more position to attend
// to, the next step of its random stream). The caller's tables cover every
// position fed; rows' slots differ, so no two rows touch one state row.
__host__ __device__ inline void decode_feed_row(const DecodeFeed& f, int r, int32_t token, int32_t* record,
                                                bool advance) {
  record[r] = token;
  if (f.present != nullptr && f.slots[r] >= 0 && token >= 0 && token < f.vocab) {
    const int64_t at = static_cast<int64_t>(f.slots[r]) * f.vocab + token;
    f.present[at] = 1;
    f.counts[at] += 1;
  }
  if (!advance) return;
  const int32_t p = f.pos[r] + 1;
  const int32_t mask = (1 << f.block_shift) - 1;
  f.tokens[r] = token;
  f.pos[r] = p;
  f.slot_pos[r] = (f.tables[static_cast<int64_t>(r) * f.stride + (p >> f.block_shift)] << f.block_shift) | (p & mask);
  f.seq_lens[r] = p + 1;
  f.steps[r] += 1;
}

// decode_feed_row for rows [0, rows) on `stream`, reading each row's token
// from `sampled` (the sampler's output) and recording it at record[r].
void decode_feed_launch(const DecodeFeed& feed, const int32_t* sampled, int32_t* record, int rows, bool advance,
                        cudaStream_t stream);

}  // namespace hx

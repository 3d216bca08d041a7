// Structured-output masks and logit_bias on a batch of logits rows, before
// the penalties (helexa_native/params.py steps 1a-1b; sampling.constrain_logits
// is the host twin).
//
// Graph capturable: what each row gets is read from device memory (a
// descriptor per row and one flat data array), so a recorded launch serves
// any masks and biases the host writes there before a replay.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hx {

// Words of a vocabulary bitmask: bit t % 32 of word t / 32 is token t.
inline int constrain_mask_words(int vocab) { return (vocab + 31) / 32; }

// Ints per row in the descriptor array of constrain_batch_launch.
constexpr int kConstrainDescInts = 3;

// For each row b with descriptor d = rows[3b .. 3b+2] =
// (mask offset, bias offset, bias count) into `data`:
//   x = logits[b, t] (NaN -> -inf);
//   x += value of t in the row's bias list;                     (step 1a)
//   x = -inf where bit t of the row's mask is clear;            (step 1b)
//   out[b, t] = x.
// A mask offset of -1 means no mask; a row's mask is
// constrain_mask_words(vocab) words at data[mask offset]. The bias list is
// `count` distinct token ids at data[bias offset] followed by `count` float32
// values (their bit patterns) right after them; ids outside [0, vocab) are
// ignored. A row with neither is copied (NaN -> -inf). Additions round as
// the host's float32 `index_add_` does. out may alias logits.
void constrain_batch_launch(const float* logits /*[B, vocab]*/, float* out /*[B, vocab]*/, int B, int vocab,
                            const int32_t* rows /*[B, 3] device*/, const int32_t* data /*device*/, cudaStream_t stream);

}  // namespace hx

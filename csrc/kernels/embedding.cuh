// Token embedding lookup from a table in any supported GGML storage type.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/ggml_types.h"

namespace hx {

// out[i, :] = dequantized row ids[i] of the table; an id outside [0, vocab)
// writes a row of zeros and reads nothing. hidden must be a multiple of the
// type's block size (32 or 256 for quantized types). Throws std::invalid_argument
// for an unsupported type or a bad size.
void embedding_launch(GgmlType type, const void* table /*[vocab, hidden] stored rows*/, const int32_t* ids /*[n]*/,
                      float* out /*[n, hidden]*/, int n, int hidden, int vocab, cudaStream_t stream);

}  // namespace hx

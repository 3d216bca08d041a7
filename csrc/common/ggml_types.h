// GGML storage types the engine reads, with GGML's own numeric ids (the ids
// GGUF files store), and the size facts every weight reader needs.
//
// Quantized types store rows as a sequence of fixed-size blocks; a row of k
// elements is k / block_elems(t) blocks of block_bytes(t) bytes. Float types
// are "blocks" of one element. Host and device code share these functions.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define HX_HOST_DEVICE __host__ __device__
#else
#define HX_HOST_DEVICE
#endif

namespace hx {

enum class GgmlType : int {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  IQ4_NL = 20,
  IQ4_XS = 23,
  BF16 = 30,
};

// Every type above, for dispatch tables: HX_FOR_EACH_GGML_TYPE(X) expands
// X(F32) X(F16) ... once per type, so a switch over the types is one line.
#define HX_FOR_EACH_GGML_TYPE(X) \
  X(F32)                         \
  X(F16) X(BF16) X(Q4_0) X(Q4_1) X(Q5_0) X(Q5_1) X(Q8_0) X(Q2_K) X(Q3_K) X(Q4_K) X(Q5_K) X(Q6_K) X(IQ4_NL) X(IQ4_XS)

// Elements per block; 0 for an id this engine does not read.
HX_HOST_DEVICE constexpr int block_elems(GgmlType t) {
  switch (t) {
    case GgmlType::F32:
    case GgmlType::F16:
    case GgmlType::BF16: return 1;
    case GgmlType::Q4_0:
    case GgmlType::Q4_1:
    case GgmlType::Q5_0:
    case GgmlType::Q5_1:
    case GgmlType::Q8_0:
    case GgmlType::IQ4_NL: return 32;
    case GgmlType::Q2_K:
    case GgmlType::Q3_K:
    case GgmlType::Q4_K:
    case GgmlType::Q5_K:
    case GgmlType::Q6_K:
    case GgmlType::IQ4_XS: return 256;
  }
  return 0;
}

// Bytes per block; 0 for an id this engine does not read.
HX_HOST_DEVICE constexpr int block_bytes(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return 4;
    case GgmlType::F16: return 2;
    case GgmlType::BF16: return 2;
    case GgmlType::Q4_0: return 2 + 16;                  // d, 32 nibbles
    case GgmlType::Q4_1: return 2 + 2 + 16;              // d, m, 32 nibbles
    case GgmlType::Q5_0: return 2 + 4 + 16;              // d, high bits, nibbles
    case GgmlType::Q5_1: return 2 + 2 + 4 + 16;          // d, m, high bits, nibbles
    case GgmlType::Q8_0: return 2 + 32;                  // d, 32 int8
    case GgmlType::Q2_K: return 16 + 64 + 2 + 2;         // scales, 2-bit quants, d, dmin
    case GgmlType::Q3_K: return 32 + 64 + 12 + 2;        // high-bit mask, 2-bit quants, scales, d
    case GgmlType::Q4_K: return 2 + 2 + 12 + 128;        // d, dmin, scales, nibbles
    case GgmlType::Q5_K: return 2 + 2 + 12 + 32 + 128;   // d, dmin, scales, high bits, nibbles
    case GgmlType::Q6_K: return 128 + 64 + 16 + 2;       // low nibbles, high 2 bits, scales, d
    case GgmlType::IQ4_NL: return 2 + 16;                // d, 32 table indices
    case GgmlType::IQ4_XS: return 2 + 2 + 4 + 128;       // d, scales high, scales low, indices
  }
  return 0;
}

// True for the ids above (the types this engine reads).
HX_HOST_DEVICE constexpr bool is_supported(GgmlType t) { return block_elems(t) != 0; }

// True for the plain float types.
HX_HOST_DEVICE constexpr bool is_float_type(GgmlType t) {
  return t == GgmlType::F32 || t == GgmlType::F16 || t == GgmlType::BF16;
}

// Bytes of one stored row of k elements (k a multiple of block_elems(t)).
HX_HOST_DEVICE constexpr size_t row_bytes(GgmlType t, int64_t k) {
  return block_elems(t) == 0 ? 0 : static_cast<size_t>(k / block_elems(t)) * static_cast<size_t>(block_bytes(t));
}

// GGML's name of the type ("Q4_K"), for error messages.
HX_HOST_DEVICE constexpr const char* type_name(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return "F32";
    case GgmlType::F16: return "F16";
    case GgmlType::BF16: return "BF16";
    case GgmlType::Q4_0: return "Q4_0";
    case GgmlType::Q4_1: return "Q4_1";
    case GgmlType::Q5_0: return "Q5_0";
    case GgmlType::Q5_1: return "Q5_1";
    case GgmlType::Q8_0: return "Q8_0";
    case GgmlType::Q2_K: return "Q2_K";
    case GgmlType::Q3_K: return "Q3_K";
    case GgmlType::Q4_K: return "Q4_K";
    case GgmlType::Q5_K: return "Q5_K";
    case GgmlType::Q6_K: return "Q6_K";
    case GgmlType::IQ4_NL: return "IQ4_NL";
    case GgmlType::IQ4_XS: return "IQ4_XS";
  }
  return "unknown";
}

}  // namespace hx

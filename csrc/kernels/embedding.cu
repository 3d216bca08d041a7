// Embedding lookup: out[i, j] = dequant(table[ids[i]], j), float32 output.
//
// Layout: the table is [vocab, hidden] in its stored GGUF form, one row per
// token: F32/F16/BF16 elements, or hidden / QK blocks of the quantized type
// (QK = 32 for Q4_0..Q8_0 and IQ4_NL, 256 for the K-quants and IQ4_XS). Block
// layouts follow ggml (ggml-common.h); fp16 scales are read byte-wise because
// blocks of 18, 22, 34, 110 or 210 bytes leave them only 2-byte aligned.
//
// One block of threads per (token, slice of the row); each thread decodes
// single elements. Only n rows are touched, so the element-wise decoders
// favour being obviously right over speed: the lookup is a few microseconds
// even for a long prefill. The decoders are __host__ __device__ so they can be
// checked on the host against the gguf package. One arch path (sm_80+ baseline).
#include "kernels/embedding.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"

namespace hx {
namespace emb {

// ggml's non-linear 4-bit grid of IQ4_NL / IQ4_XS
// ({-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113}),
// packed as int8 bytes in two words so the lookup needs no local memory.
__host__ __device__ __forceinline__ float iq4nl_value(int i) {
  const uint64_t w = i < 8 ? 0xf6eaddcfbfad9881ull : 0x7159453526190d01ull;
  return (float)(int8_t)(uint8_t)(w >> (8 * (i & 7)));
}

__host__ __device__ __forceinline__ float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {
    // Subnormal half: normalize the mantissa.
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400u) == 0);
    bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
#endif
}

__host__ __device__ __forceinline__ float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  memcpy(&f, &bits, 4);
  return f;
#endif
}

// Rounded product / sum that the compiler may not fuse into an FMA: the
// gguf reference dequantizer rounds each step, and so must we to match it.
__host__ __device__ __forceinline__ float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__host__ __device__ __forceinline__ float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
__host__ __device__ __forceinline__ float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

__host__ __device__ __forceinline__ uint16_t u16_at(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }
__host__ __device__ __forceinline__ float f16_at(const uint8_t* p) { return half_bits_to_float(u16_at(p)); }

// K-quant 6-bit scale and min number j (0..7) packed in 12 bytes (Q4_K, Q5_K).
__host__ __device__ __forceinline__ void scale_min_k4(int j, const uint8_t* q, int* sc, int* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Element e of one block `b` of each type; block byte sizes in the comments.
__host__ __device__ __forceinline__ float q4_0(const uint8_t* b, int e) {  // 18: d, qs[16]
  const int q = e < 16 ? (b[2 + e] & 0xF) : (b[2 + e - 16] >> 4);
  return f16_at(b) * (float)(q - 8);
}
__host__ __device__ __forceinline__ float q4_1(const uint8_t* b, int e) {  // 20: d, m, qs[16]
  const int q = e < 16 ? (b[4 + e] & 0xF) : (b[4 + e - 16] >> 4);
  return add_rn(mul_rn(f16_at(b), (float)q), f16_at(b + 2));
}
__host__ __device__ __forceinline__ float q5_0(const uint8_t* b, int e) {  // 22: d, qh[4], qs[16]
  const uint32_t qh = (uint32_t)b[2] | ((uint32_t)b[3] << 8) | ((uint32_t)b[4] << 16) | ((uint32_t)b[5] << 24);
  const int lo = e < 16 ? (b[6 + e] & 0xF) : (b[6 + e - 16] >> 4);
  const int q = lo | (int)(((qh >> e) & 1u) << 4);
  return f16_at(b) * (float)(q - 16);
}
__host__ __device__ __forceinline__ float q5_1(const uint8_t* b, int e) {  // 24: d, m, qh[4], qs[16]
  const uint32_t qh = (uint32_t)b[4] | ((uint32_t)b[5] << 8) | ((uint32_t)b[6] << 16) | ((uint32_t)b[7] << 24);
  const int lo = e < 16 ? (b[8 + e] & 0xF) : (b[8 + e - 16] >> 4);
  const int q = lo | (int)(((qh >> e) & 1u) << 4);
  return add_rn(mul_rn(f16_at(b), (float)q), f16_at(b + 2));
}
__host__ __device__ __forceinline__ float q8_0(const uint8_t* b, int e) {  // 34: d, qs[32]
  return f16_at(b) * (float)(int8_t)b[2 + e];
}
__host__ __device__ __forceinline__ float iq4_nl(const uint8_t* b, int e) {  // 18: d, qs[16]
  const int q = e < 16 ? (b[2 + e] & 0xF) : (b[2 + e - 16] >> 4);
  return f16_at(b) * iq4nl_value(q);
}
__host__ __device__ __forceinline__ float q2_k(const uint8_t* b, int e) {
  // 84: scales[16], qs[64], d, dmin. Halves of 128; in a half, 4 shifts of
  // 32 elements, each 16 with its own 4-bit scale and min.
  const uint8_t* scales = b;
  const uint8_t* qs = b + 16;
  const int h = e >> 7, r = e & 127, j = r >> 5, l = r & 31;
  const int sc = scales[h * 8 + j * 2 + (l >> 4)];
  const int q = (qs[h * 32 + l] >> (2 * j)) & 3;
  return sub_rn(mul_rn(mul_rn(f16_at(b + 80), (float)(sc & 0xF)), (float)q), mul_rn(f16_at(b + 82), (float)(sc >> 4)));
}
__host__ __device__ __forceinline__ float q3_k(const uint8_t* b, int e) {
  // 110: hmask[32], qs[64], scales[12] (16 x 6 bits), d.
  const uint8_t* hmask = b;
  const uint8_t* qs = b + 32;
  const uint8_t* sc = b + 96;
  const int h = e >> 7, r = e & 127, j = r >> 5, l = r & 31;
  const int is = h * 8 + j * 2 + (l >> 4);
  const int lo = is < 8 ? (sc[is] & 0xF) : (sc[is - 8] >> 4);
  const int hi = (sc[8 + (is & 3)] >> (2 * (is >> 2))) & 3;
  const int scale = (lo | (hi << 4)) - 32;
  const int q = ((qs[h * 32 + l] >> (2 * j)) & 3) - ((hmask[l] >> (h * 4 + j)) & 1 ? 0 : 4);
  return mul_rn(mul_rn(f16_at(b + 108), (float)scale), (float)q);
}
__host__ __device__ __forceinline__ float q4_k(const uint8_t* b, int e) {
  // 144: d, dmin, scales[12], qs[128]. Chunks of 64: low nibbles then high.
  const int c = e >> 6, r = e & 63, l = r & 31, hi = r >> 5;
  int sc, mn;
  scale_min_k4(2 * c + hi, b + 4, &sc, &mn);
  const uint8_t byte = b[16 + c * 32 + l];
  const int q = hi ? (byte >> 4) : (byte & 0xF);
  return sub_rn(mul_rn(mul_rn(f16_at(b), (float)sc), (float)q), mul_rn(f16_at(b + 2), (float)mn));
}
__host__ __device__ __forceinline__ float q5_k(const uint8_t* b, int e) {
  // 176: d, dmin, scales[12], qh[32], qs[128].
  const int c = e >> 6, r = e & 63, l = r & 31, hi = r >> 5;
  int sc, mn;
  scale_min_k4(2 * c + hi, b + 4, &sc, &mn);
  const uint8_t byte = b[48 + c * 32 + l];
  const int q = (hi ? (byte >> 4) : (byte & 0xF)) + (((b[16 + l] >> (2 * c + hi)) & 1) << 4);
  return sub_rn(mul_rn(mul_rn(f16_at(b), (float)sc), (float)q), mul_rn(f16_at(b + 2), (float)mn));
}
__host__ __device__ __forceinline__ float q6_k(const uint8_t* b, int e) {
  // 210: ql[128], qh[64], scales[16] (int8), d. Halves of 128, four
  // quarters of 32: quarters 0/1 low nibbles of ql[0..63], 2/3 high nibbles.
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = (const int8_t*)(b + 192);
  const int h = e >> 7, r = e & 127, g = r >> 5, l = r & 31;
  const uint8_t lb = ql[h * 64 + l + (g & 1) * 32];
  const int lo = g >= 2 ? (lb >> 4) : (lb & 0xF);
  const int q = (lo | (((qh[h * 32 + l] >> (2 * g)) & 3) << 4)) - 32;
  return mul_rn(mul_rn(f16_at(b + 208), (float)sc[h * 8 + (l >> 4) + 2 * g]), (float)q);
}
__host__ __device__ __forceinline__ float iq4_xs(const uint8_t* b, int e) {
  // 136: d, scales_h (u16), scales_l[4], qs[128]; 8 sub-blocks of 32.
  const int ib = e >> 5, r = e & 31;
  const int sh = u16_at(b + 2);
  const int ls = ((b[4 + ib / 2] >> (4 * (ib & 1))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4);
  const uint8_t byte = b[8 + ib * 16 + (r & 15)];
  const int q = r < 16 ? (byte & 0xF) : (byte >> 4);
  return mul_rn(mul_rn(f16_at(b), (float)(ls - 32)), iq4nl_value(q));
}

// Element j of a stored row of type T.
template <GgmlType T>
__host__ __device__ __forceinline__ float row_elem(const uint8_t* row, int j) {
  constexpr int QK = block_elems(T);
  constexpr int BB = block_bytes(T);
  const uint8_t* b = row + (size_t)(j / QK) * BB;
  const int e = j % QK;
  if constexpr (T == GgmlType::F32) {
    float f;
#if defined(__CUDA_ARCH__)
    f = *reinterpret_cast<const float*>(b);
#else
    memcpy(&f, b, 4);
#endif
    return f;
  } else if constexpr (T == GgmlType::F16) {
    return f16_at(b);
  } else if constexpr (T == GgmlType::BF16) {
    return bf16_bits_to_float(u16_at(b));
  } else if constexpr (T == GgmlType::Q4_0) {
    return q4_0(b, e);
  } else if constexpr (T == GgmlType::Q4_1) {
    return q4_1(b, e);
  } else if constexpr (T == GgmlType::Q5_0) {
    return q5_0(b, e);
  } else if constexpr (T == GgmlType::Q5_1) {
    return q5_1(b, e);
  } else if constexpr (T == GgmlType::Q8_0) {
    return q8_0(b, e);
  } else if constexpr (T == GgmlType::IQ4_NL) {
    return iq4_nl(b, e);
  } else if constexpr (T == GgmlType::Q2_K) {
    return q2_k(b, e);
  } else if constexpr (T == GgmlType::Q3_K) {
    return q3_k(b, e);
  } else if constexpr (T == GgmlType::Q4_K) {
    return q4_k(b, e);
  } else if constexpr (T == GgmlType::Q5_K) {
    return q5_k(b, e);
  } else if constexpr (T == GgmlType::Q6_K) {
    return q6_k(b, e);
  } else {
    static_assert(T == GgmlType::IQ4_XS, "unhandled type");
    return iq4_xs(b, e);
  }
}

template <GgmlType T>
static __global__ void embedding_kernel(const uint8_t* __restrict__ table, size_t row_bytes,
                                        const int32_t* __restrict__ ids, float* __restrict__ out, int hidden,
                                        int vocab) {
  const int tok = blockIdx.x;
  const int32_t id = ids[tok];
  float* o = out + (size_t)tok * hidden;
  const bool valid = id >= 0 && id < vocab;
  const uint8_t* row = table + (size_t)(valid ? id : 0) * row_bytes;
  for (int j = blockIdx.y * blockDim.x + threadIdx.x; j < hidden; j += gridDim.y * blockDim.x)
    o[j] = valid ? row_elem<T>(row, j) : 0.f;
}

}  // namespace emb

void embedding_launch(GgmlType type, const void* table, const int32_t* ids, float* out, int n, int hidden, int vocab,
                      cudaStream_t stream) {
  const int qk = block_elems(type);
  const int bb = block_bytes(type);
  if (qk == 0) throw std::invalid_argument("embedding: unsupported GGML type id " + std::to_string((int)type));
  if (n < 0 || hidden <= 0 || vocab <= 0)
    throw std::invalid_argument("embedding: bad sizes n=" + std::to_string(n) + " hidden=" + std::to_string(hidden) +
                                " vocab=" + std::to_string(vocab));
  if (hidden % qk != 0)
    throw std::invalid_argument("embedding: hidden=" + std::to_string(hidden) +
                                " is not a multiple of the block size " + std::to_string(qk));
  if (n == 0) return;
  const size_t row_bytes = (size_t)(hidden / qk) * bb;
  const int threads = 256;
  const int slices = (hidden + threads * 4 - 1) / (threads * 4);
  const dim3 grid(n, slices);
  const auto* t = static_cast<const uint8_t*>(table);
#define HX_EMB_CASE(T)                                                                                       \
  case GgmlType::T:                                                                                          \
    emb::embedding_kernel<GgmlType::T><<<grid, threads, 0, stream>>>(t, row_bytes, ids, out, hidden, vocab); \
    break;
  switch (type) {
    HX_FOR_EACH_GGML_TYPE(HX_EMB_CASE)
    default: throw std::invalid_argument("embedding: unsupported GGML type id " + std::to_string((int)type));
  }
#undef HX_EMB_CASE
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx

// Block decoders for every GGML storage type the engine reads, shared by the
// matvec, dequantize and (optionally) embedding kernels.
//
// A weight row is cut into "passes" of 256 elements: 8 blocks of the 32-wide
// types, one super-block of the 256-wide types, 256 plain values of the float
// types. A pass has 32 "units" of 8 elements, each made of two runs of 4
// consecutive elements, elem0(u)..+3 and elem1(u)..+3. The runs follow each
// format's nibble/bit layout, so a unit needs one 4-byte word of quants per
// run (usually the same word: low and high nibbles), and the runs of
// neighbouring units are neighbours in the activation vector. Units 2v and
// 2v + 1 always share their block / sub-block scales and continue each
// other's runs.
//
// unit() returns the quants as unsigned bytes (u0 for the first run, u1 for
// the second) plus a scale and offset per run:
//     w = a * (byte - Z) + b       (b only where the format has a min / offset)
// with the products and sums in the order the reference dequantizer (ggml /
// the gguf package) uses, so dequantizing through unit() is bit-exact.
// Quant fields are read with the alignment the format guarantees inside a
// 16-byte aligned tensor (blocks of 18, 22, 34, 110 or 210 bytes are only
// 2-byte aligned); the same code reads global or shared memory.
//
// Everything here is __host__ __device__ so the decoders are checked on the
// host against the gguf package (tests/test_cuda_compile.py).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "common/ggml_types.h"

#define HXQ_INLINE __host__ __device__ __forceinline__

namespace hx {
namespace quant {

// ---------------------------------------------------------------------------
// Bit helpers (device intrinsics, portable host fallbacks)

// prmt.b32: result byte n is byte (s >> 4n) & 7 of {y, x}; if bit 3 of that
// selector nibble is set, the byte's sign bit is replicated instead.
HXQ_INLINE uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(s));
  return r;
#else
  const uint64_t v = (uint64_t)x | ((uint64_t)y << 32);
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) {
    const uint32_t sel = (s >> (4 * n)) & 0xf;
    uint32_t b = (uint32_t)(v >> (8 * (sel & 7))) & 0xff;
    if (sel & 8) b = (b & 0x80) ? 0xff : 0x00;
    r |= b << (8 * n);
  }
  return r;
#endif
}

HXQ_INLINE float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  memcpy(&f, &b, 4);
  return f;
#endif
}

HXQ_INLINE float half_float(uint32_t h) { return __half2float(__ushort_as_half(static_cast<unsigned short>(h))); }

// Loads at the alignment the caller guarantees (2 or 4 bytes).
HXQ_INLINE uint32_t ld_u8(const uint8_t* p) { return *p; }
HXQ_INLINE uint32_t ld_u16(const uint8_t* p) { return *reinterpret_cast<const uint16_t*>(p); }
HXQ_INLINE uint32_t ld_u32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
HXQ_INLINE uint2 ld_u64(const uint8_t* p) { return *reinterpret_cast<const uint2*>(p); }
HXQ_INLINE uint4 ld_u128(const uint8_t* p) { return *reinterpret_cast<const uint4*>(p); }
HXQ_INLINE uint32_t ld_u32_a2(const uint8_t* p) {
  const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
  return (uint32_t)q[0] | ((uint32_t)q[1] << 16);
}

// Exact product / sum without contraction into an FMA, so the dequantizer
// rounds exactly as the float32 numpy reference does.
HXQ_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float r = a * b;
  return r;
#endif
}
HXQ_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  volatile float r = a + b;
  return r;
#endif
}

HXQ_INLINE uint32_t rotr(uint32_t x, int n) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(x, x, n);
#else
  n &= 31;
  return n ? (x >> n) | (x << (32 - n)) : x;
#endif
}

// Spreads the 4 low bits of h to bit 4 of each byte (bit i -> byte i): the
// shifted copies of h in the product never overlap, so no carries.
HXQ_INLINE uint32_t spread4_bit4(uint32_t h) { return (h * 0x02040810u) & 0x10101010u; }

// IQ4_NL / IQ4_XS non-linear grid, stored +128 so every entry is one unsigned byte.
constexpr uint32_t kIq4Grid0 = (1u) | (24u << 8) | (45u << 16) | (63u << 24);        // -127 -104 -83 -65
constexpr uint32_t kIq4Grid1 = (79u) | (93u << 8) | (106u << 16) | (118u << 24);     // -49 -35 -22 -10
constexpr uint32_t kIq4Grid2 = (129u) | (141u << 8) | (153u << 16) | (166u << 24);   // 1 13 25 38
constexpr uint32_t kIq4Grid3 = (181u) | (197u << 8) | (217u << 16) | (241u << 24);   // 53 69 89 113

// The 8 4-bit grid indices of word q (byte i: low nibble = element i of the
// first run, high nibble = element i of the second) -> grid bytes of both
// runs. prmt indexes 8 bytes with 3 bits, so each nibble looks up both table
// halves and a sign-replicating prmt turns its bit 3 into a byte mask.
HXQ_INLINE void iq4_lookup(uint32_t q, uint32_t& run0, uint32_t& run1) {
  const uint32_t sel = q & 0x77777777u;        // nibbles L0 H0 L1 H1 L2 H2 L3 H3
  const uint32_t q4 = q << 4;                  // byte msbs: bit 3 of L0, L1, L2, L3
  const uint32_t lo_a = byte_perm(kIq4Grid0, kIq4Grid1, sel), hi_a = byte_perm(kIq4Grid2, kIq4Grid3, sel);
  const uint32_t lo_b = byte_perm(kIq4Grid0, kIq4Grid1, sel >> 16), hi_b = byte_perm(kIq4Grid2, kIq4Grid3, sel >> 16);
  const uint32_t m_a = byte_perm(q4, q, 0xd9c8u);  // 0xff where L0, H0, L1, H1 >= 8
  const uint32_t m_b = byte_perm(q4, q, 0xfbeau);  // same for L2, H2, L3, H3
  const uint32_t a = (hi_a & m_a) | (lo_a & ~m_a);  // grid[L0] grid[H0] grid[L1] grid[H1]
  const uint32_t b = (hi_b & m_b) | (lo_b & ~m_b);  // grid[L2] grid[H2] grid[L3] grid[H3]
  run0 = byte_perm(a, b, 0x6420u);
  run1 = byte_perm(a, b, 0x7531u);
}

// Exact: byte i of word -> (float)(byte - Z), through the 2^23 magic number
// (0x4B0000xx is 2^23 + xx).
template <int Z>
HXQ_INLINE float byte_value(uint32_t word, int i) {
  return bits_float(byte_perm(word, 0x4b000000u, 0x7440u | (uint32_t)i)) - (8388608.0f + (float)Z);
}

// Bytes (0, 1) (sel kIntLo) or (2, 3) (kIntHi) of w, each below 128, as the
// bf16 pair (128 + b, 128 + b'): 0x43 is the high byte of bf16 128.0, whose
// 7 mantissa bits then hold b exactly (the staged product's integer path).
constexpr uint32_t kIntLo = 0x4140u, kIntHi = 0x4342u;
HXQ_INLINE uint32_t int_pair(uint32_t w, uint32_t sel) { return byte_perm(w, 0x43434343u, sel); }

// One lane's 8 elements of a pass. Element i < 4 is byte i of u0 and belongs
// to the run at elem0; element i >= 4 is byte i - 4 of u1, run at elem1.
struct QUnit {
  uint32_t u0, u1;
  float a0, b0, a1, b1;
};

template <GgmlType T>
struct Block;

// ---------------------------------------------------------------------------
// 32-element blocks: unit u covers block u / 4, elements 4a..4a+3 (low
// nibbles / first half) and 16 + 4a..16 + 4a + 3 (high nibbles), a = u % 4.

struct Block32Map {
  static constexpr int kPassElems = 256;
  HXQ_INLINE static int elem0(int u) { return 32 * (u >> 2) + 4 * (u & 3); }
  HXQ_INLINE static int elem1(int u) { return elem0(u) + 16; }
};

template <>
struct Block<GgmlType::Q4_0> : Block32Map {
  static constexpr int QK = 32, BB = 18, Z = 8;
  static constexpr bool HAS_B = false, WIDE = false, SAME_SCALE = true;
  HXQ_INLINE static QUnit unit(const uint8_t* pass, int u) {
    const uint8_t* b = pass + (u >> 2) * BB;
    const float d = half_float(ld_u16(b));
    const uint32_t q = ld_u32_a2(b + 2 + 4 * (u & 3));
    return {q & 0x0f0f0f0fu, (q >> 4) & 0x0f0f0f0fu, d, 0.f, d, 0.f};
  }
};

template <>
struct Block<GgmlType::Q4_1> : Block32Map {
  static constexpr int QK = 32, BB = 20, Z = 0;
  static constexpr bool HAS_B = true, WIDE = false, SAME_SCALE = true;
  HXQ_INLINE static QUnit unit(const uint8_t* pass, int u) {
    const uint8_t* b = pass + (u >> 2) * BB;
    const uint32_t dm = ld_u32(b);
    const float d = half_float(dm & 0xffff), m = half_float(dm >> 16);
    const uint32_t q = ld_u32(b + 4 + 4 * (u & 3));
    return {q & 0x0f0f0f0fu, (q >> 4) & 0x0f0f0f0fu, d, m, d, m};
  }
};

template <>
struct Block<GgmlType::Q5_0> : Block32Map {
  static constexpr int QK = 32, BB = 22, Z = 16;
  static constexpr bool HAS_B = false, WIDE = false, SAME_SCALE = true;
  HXQ_INLINE static QUnit unit(const uint8_t* pass, int u) {
    const uint8_t* b = pass + (u >> 2) * BB;
    const int a = u & 3;
    const float d = half_float(ld_u16(b));
    const uint32_t qh = ld_u32_a2(b + 2);  // bit i: high bit of element i
    const uint32_t q = ld_u32_a2(b + 6 + 4 * a);
    const uint32_t u0 = (q & 0x0f0f0f0fu) | spread4_bit4((qh >> (4 * a)) & 0xf);
    const uint32_t u1 = ((q >> 4) & 0x0f0f0f0fu) | spread4_bit4((qh >> (16 + 4 * a)) & 0xf);
    return {u0, u1, d, 0.f, d, 0.f};
  }
};

template <>
struct Block<GgmlType::Q5_1> : Block32Map {
  static constexpr int QK = 32, BB = 24, Z = 0;
  static constexpr bool HAS_B = true, WIDE = false, SAME_SCALE = true;
  HXQ_INLINE static QUnit unit(const uint8_t* pass, int u) {
    const uint8_t* b = pass + (u >> 2) * BB;
    const int a = u & 3;
    const uint32_t dm = ld_u32(b);
    const float d = half_float(dm & 0xffff), m = half_float(dm >> 16);
    const uint32_t qh = ld_u32(b + 4);
    const uint32_t q = ld_u32(b + 8 + 4 * a);
    const uint32_t u0 = (q & 0x0f0f0f0fu) | spread4_bit4((qh >> (4 * a)) & 0xf);
    const uint32_t u1 = ((q >> 4) & 0x0f0f0f0fu) | spread4_bit4((qh >> (16 + 4 * a)) & 0xf);
    return {u0, u1, d, m, d, m};
  }
};

template <>
struct Block<GgmlType::Q8_0> : Block32Map {
  static constexpr int QK = 32, BB = 34, Z = 128;
  static constexpr bool HAS_B = false, WIDE = true, SAME_SCALE = true;
  HXQ_INLINE static QUnit unit(const uint8_t* pass, int u) {
    const uint8_t* b = pass + (u >> 2) * BB;
    const int a = u & 3;
    const float d = half_float(ld_u16(b));
    // int8 -> unsigned byte q + 128
    const uint32_t u0 = ld_u32_a2(b + 2 + 4 * a) ^ 0x80808080u;
    const uint32_t u1 = ld_u32_a2(b + 18 + 4 * a) ^ 0x80808080u;
    return {u0, u1, d, 0.f, d, 0.f};
  }
};

template <>
struct Block<GgmlType::IQ4_NL> : Block32Map {
  static constexpr int QK = 32, BB = 18, Z = 128;
  static constexpr bool HAS_B = false, WIDE = true, SAME_SCALE = true;
  HXQ_INLINE static QUnit unit(const uint8_t* pass, int u) {
    const uint8_t* b = pass + (u >> 2) * BB;
    const float d = half_float(ld_u16(b));
    QUnit r{0, 0, d, 0.f, d, 0.f};
    iq4_lookup(ld_u32_a2(b + 2 + 4 * (u & 3)), r.u0, r.u1);
    return r;
  }
};

// ---------------------------------------------------------------------------
// 256-element super-blocks (one per pass).

// Q2_K and Q3_K: quant byte 32h + l holds elements 128h + 32s + l at bits 2s.
// Unit u: h = u / 16, p = (u / 8) % 2, g = u % 8; runs at 128h + 64p + 4g
// (bits 4p) and + 32 (bits 4p + 2).
struct Block2bitMap {
  static constexpr int kPassElems = 256;
  HXQ_INLINE static int elem0(int u) { return 128 * (u >> 4) + 64 * ((u >> 3) & 1) + 4 * (u & 7); }
  HXQ_INLINE static int elem1(int u) { return elem0(u) + 32; }
};

template <>
struct Block<GgmlType::Q2_K> : Block2bitMap {
  // scales[16] | qs[64] | d | dmin
  static constexpr int QK = 256, BB = 84, Z = 0;
  static constexpr bool HAS_B = true, WIDE = false, SAME_SCALE = false;
  HXQ_INLINE static QUnit unit(const uint8_t* sb, int u) {
    const int h = u >> 4, p = (u >> 3) & 1, g = u & 7;
    const uint32_t q = ld_u32(sb + 16 + 32 * h + 4 * g);
    const uint32_t dd = ld_u32(sb + 80);
    const float d = half_float(dd & 0xffff), dmin = half_float(dd >> 16);
    // 16-element groups (elem / 16): run 0 -> 8h + 4p + g/4, run 1 -> that + 2
    const uint32_t sc4 = ld_u32(sb + 8 * h + 4 * p) >> (8 * (g >> 2));
    const uint32_t s0 = sc4 & 0xff, s1 = (sc4 >> 16) & 0xff;
    QUnit r;
    r.u0 = (q >> (4 * p)) & 0x03030303u;
    r.u1 = (q >> (4 * p + 2)) & 0x03030303u;
    r.a0 = mul_rn(d, (float)(s0 & 0xf));
    r.b0 = -mul_rn(dmin, (float)(s0 >> 4));
    r.a1 = mul_rn(d, (float)(s1 & 0xf));
    r.b1 = -mul_rn(dmin, (float)(s1 >> 4));
    return r;
  }
};

template <>
struct Block<GgmlType::Q3_K> : Block2bitMap {
  // hmask[32] | qs[64] | scales[12] (16 x 6 bit) | d
  static constexpr int QK = 256, BB = 110, Z = 4;
  static constexpr bool HAS_B = false, WIDE = false, SAME_SCALE = false;
  HXQ_INLINE static QUnit unit(const uint8_t* sb, int u) {
    const int h = u >> 4, p = (u >> 3) & 1, g = u & 7;
    const uint32_t q = ld_u32_a2(sb + 32 + 32 * h + 4 * g);
    // high bit of element e is bit e / 32 of hmask[e % 32]; a set bit means no -4
    const uint32_t hm = ld_u32_a2(sb + 4 * g);
    const int hb = 4 * h + 2 * p;
    QUnit r;
    r.u0 = ((q >> (4 * p)) & 0x03030303u) | (((hm >> hb) & 0x01010101u) << 2);
    r.u1 = ((q >> (4 * p + 2)) & 0x03030303u) | (((hm >> (hb + 1)) & 0x01010101u) << 2);
    // 6-bit scale of group i = elem / 16: low 4 bits in nibble i / 8 of byte i % 8,
    // high 2 bits at bit 2 * (i / 4) of byte 8 + i % 4. Run 0: i = 8h + 4p + g/4; run 1: i + 2.
    const uint32_t lo = ld_u32_a2(sb + 96 + 4 * p) >> (8 * (g >> 2));
    const uint32_t hi = ld_u32_a2(sb + 104) >> (8 * (g >> 2));
    const int s0 = (int)(((lo >> (4 * h)) & 0xf) | (((hi >> hb) & 3) << 4)) - 32;
    const int s1 = (int)(((lo >> (16 + 4 * h)) & 0xf) | (((hi >> (16 + hb)) & 3) << 4)) - 32;
    const float d = half_float(ld_u16(sb + 108));
    r.a0 = mul_rn(d, (float)s0);
    r.a1 = mul_rn(d, (float)s1);
    r.b0 = r.b1 = 0.f;
    return r;
  }
};

// Q4_K / Q5_K: byte 32c + l of the nibbles holds element 64c + l (low) and
// 64c + 32 + l (high); 8 sub-blocks of 32 with 6-bit scales and mins.
// Unit u: c = u / 8, a = u % 8; runs at 64c + 4a (sub-block 2c) and + 32 (2c + 1).
struct BlockK4Map {
  static constexpr int kPassElems = 256;
  HXQ_INLINE static int elem0(int u) { return 64 * (u >> 3) + 4 * (u & 7); }
  HXQ_INLINE static int elem1(int u) { return elem0(u) + 32; }

  // Scales and mins of sub-blocks 2c and 2c + 1 from the 12 packed bytes at s
  // (4-byte aligned) as one word of bytes [sc(2c), sc(2c+1), m(2c), m(2c+1)].
  // Sub-block j < 4: sc = s[j] & 63, m = s[j+4] & 63; j >= 4: low 4 bits in
  // s[j+4] (sc low nibble, m high nibble), high 2 bits in the top of s[j-4] / s[j].
  HXQ_INLINE static uint32_t scale_min_pair(const uint8_t* s, int c) {
    return scale_min_pair(ld_u32(s), ld_u32(s + 4), ld_u32(s + 8), c);
  }
  HXQ_INLINE static uint32_t scale_min_pair(uint32_t w0, uint32_t w1, uint32_t w2, int c) {
    // bytes 2(c%2), 2(c%2)+1 of the first word, then of the second
    const uint32_t sel = 0x5410u + 0x2222u * (uint32_t)(c & 1);
    const uint32_t h = byte_perm(w0, w1, sel);
    const uint32_t lo_form = h & 0x3f3f3f3fu;
    const uint32_t l = byte_perm(w2, w2 >> 4, sel) & 0x0f0f0f0fu;
    const uint32_t hi_form = l | ((h >> 2) & 0x30303030u);
    return c < 2 ? lo_form : hi_form;  // a select: lanes of one warp hold different c
  }

  // a = d * sc, b = -(dmin * m) for both runs, from the packed word above.
  HXQ_INLINE static void scales(QUnit& r, uint32_t dd, uint32_t w) {
    const float d = half_float(dd & 0xffff), dmin = half_float(dd >> 16);
    r.a0 = mul_rn(d, byte_value<0>(w, 0));
    r.a1 = mul_rn(d, byte_value<0>(w, 1));
    r.b0 = -mul_rn(dmin, byte_value<0>(w, 2));
    r.b1 = -mul_rn(dmin, byte_value<0>(w, 3));
  }
};

template <>
struct Block<GgmlType::Q4_K> : BlockK4Map {
  // d | dmin | scales[12] | qs[128]
  static constexpr int QK = 256, BB = 144, Z = 0;
  static constexpr bool HAS_B = true, WIDE = false, SAME_SCALE = false, K4_HEADER = true;
  // Quants of units ub..ub+U-1 (U <= 2, ub even when U = 2: one 8-byte load).
  template <int U>
  HXQ_INLINE static void quants(const uint8_t* sb, int ub, uint32_t (&u0)[U], uint32_t (&u1)[U]) {
    const uint8_t* p = sb + 16 + 32 * (ub >> 3) + 4 * (ub & 7);
    uint32_t q[U];
    if constexpr (U == 2) {
      const uint2 v = ld_u64(p);
      q[0] = v.x;
      q[1] = v.y;
    } else {
      q[0] = ld_u32(p);
    }
    for (int i = 0; i < U; ++i) {
      u0[i] = q[i] & 0x0f0f0f0fu;
      u1[i] = (q[i] >> 4) & 0x0f0f0f0fu;
    }
  }
  HXQ_INLINE static QUnit unit(const uint8_t* sb, int u) {
    const int c = u >> 3, a = u & 7;
    const uint32_t q = ld_u32(sb + 16 + 32 * c + 4 * a);
    QUnit r;
    r.u0 = q & 0x0f0f0f0fu;
    r.u1 = (q >> 4) & 0x0f0f0f0fu;
    scales(r, ld_u32(sb), scale_min_pair(sb + 4, c));
    return r;
  }
  // The integer path of the staged product (matmul_tc_staged.cuh): k-step
  // (c, sub, h) of a pass covers elements 64c + 32 sub + 16h .. + 15, all of
  // sub-block 2c + sub; lane q's four are int_elem(c, sub, h, q) + 0..3, their
  // quants the bytes of int_quants(word, sub), word the 4 bytes at
  // int_word(c, h, q) (one word serves both sub-blocks of pair c).
  HXQ_INLINE static int int_word(int c, int h, int q) { return 16 + 32 * c + 16 * h + 4 * q; }
  HXQ_INLINE static uint32_t int_quants(uint32_t word, int sub) { return (word >> (4 * sub)) & 0x0f0f0f0fu; }
  HXQ_INLINE static int int_elem(int c, int sub, int h, int q) { return 64 * c + 32 * sub + 16 * h + 4 * q; }
};

template <>
struct Block<GgmlType::Q5_K> : BlockK4Map {
  // d | dmin | scales[12] | qh[32] | qs[128]; high bit of element 32j + l is bit j of qh[l]
  static constexpr int QK = 256, BB = 176, Z = 0;
  static constexpr bool HAS_B = true, WIDE = false, SAME_SCALE = false, K4_HEADER = true;
  template <int U>
  HXQ_INLINE static void quants(const uint8_t* sb, int ub, uint32_t (&u0)[U], uint32_t (&u1)[U]) {
    const int c = ub >> 3, a = ub & 7;
    uint32_t q[U], qh[U];
    if constexpr (U == 2) {
      const uint2 v = ld_u64(sb + 48 + 32 * c + 4 * a), h = ld_u64(sb + 16 + 4 * a);
      q[0] = v.x;
      q[1] = v.y;
      qh[0] = h.x;
      qh[1] = h.y;
    } else {
      q[0] = ld_u32(sb + 48 + 32 * c + 4 * a);
      qh[0] = ld_u32(sb + 16 + 4 * a);
    }
    // Rotating right by 2c - 4 (2c - 3) brings bit 2c (2c + 1) of every byte to bit 4.
    for (int i = 0; i < U; ++i) {
      u0[i] = (q[i] & 0x0f0f0f0fu) | (rotr(qh[i], 2 * c - 4) & 0x10101010u);
      u1[i] = ((q[i] >> 4) & 0x0f0f0f0fu) | (rotr(qh[i], 2 * c - 3) & 0x10101010u);
    }
  }
  HXQ_INLINE static QUnit unit(const uint8_t* sb, int u) {
    const int c = u >> 3, a = u & 7;
    const uint32_t qh = ld_u32(sb + 16 + 4 * a);
    const uint32_t q = ld_u32(sb + 48 + 32 * c + 4 * a);
    QUnit r;
    r.u0 = (q & 0x0f0f0f0fu) | (((qh >> (2 * c)) & 0x01010101u) << 4);
    r.u1 = ((q >> 4) & 0x0f0f0f0fu) | (((qh >> (2 * c + 1)) & 0x01010101u) << 4);
    scales(r, ld_u32(sb), scale_min_pair(sb + 4, c));
    return r;
  }
};

// Q6_K: ql byte 64h + l holds element 128h + l (low nibble) and 128h + 64 + l
// (high); qh byte 32h + l holds bits 4..5 of element 128h + 32s + l at bits 2s.
// Unit u: h = u / 16, a = u % 16; runs at 128h + 4a and + 64.
template <>
struct Block<GgmlType::Q6_K> {
  // ql[128] | qh[64] | scales[16] (int8) | d
  static constexpr int kPassElems = 256;
  static constexpr int QK = 256, BB = 210, Z = 32;
  static constexpr bool HAS_B = false, WIDE = false, SAME_SCALE = false;
  HXQ_INLINE static int elem0(int u) { return 128 * (u >> 4) + 4 * (u & 15); }
  HXQ_INLINE static int elem1(int u) { return elem0(u) + 64; }
  // The 6-bit quants of unit u (QUnit::u0, u1).
  HXQ_INLINE static void quants(const uint8_t* sb, int u, uint32_t& u0, uint32_t& u1) {
    const int h = u >> 4, a = u & 15;
    const uint32_t ql = ld_u32_a2(sb + 64 * h + 4 * a);
    const uint32_t qh = ld_u32_a2(sb + 128 + 32 * h + 4 * (a & 7));
    const int t = 2 * (a >> 3);
    u0 = (ql & 0x0f0f0f0fu) | (((qh >> t) & 0x03030303u) << 4);
    u1 = ((ql >> 4) & 0x0f0f0f0fu) | (((qh >> (t + 4)) & 0x03030303u) << 4);
  }
  // The integer path of the staged product (matmul_tc_staged.cuh): k-step
  // (hh, s, j) of a pass covers group int_group(hh, s, j), elements
  // 128hh + 32s + 16j .. + 15; lane q's four are int_elem(hh, s, j, q) + 0..3,
  // their 6-bit quants the bytes of int_quants(ql, qh, s), ql the 4 bytes at
  // int_ql(hh, s % 2, j, q) and qh those at int_qh(hh, j, q).
  HXQ_INLINE static int int_ql(int hh, int s1, int j, int q) { return 64 * hh + 32 * s1 + 16 * j + 4 * q; }
  HXQ_INLINE static int int_qh(int hh, int j, int q) { return 128 + 32 * hh + 16 * j + 4 * q; }
  HXQ_INLINE static uint32_t int_quants(uint32_t ql, uint32_t qh, int s) {
    return ((ql >> (4 * (s >> 1))) & 0x0f0f0f0fu) | (((qh >> (2 * s)) & 0x03030303u) << 4);
  }
  HXQ_INLINE static int int_elem(int hh, int s, int j, int q) { return 128 * hh + 32 * s + 16 * j + 4 * q; }
  HXQ_INLINE static int int_group(int hh, int s, int j) { return 8 * hh + 2 * s + j; }

  // The scale of 16-element group g: d * scales[g].
  HXQ_INLINE static float group_scale(const uint8_t* sb, int g) {
    return mul_rn(half_float(ld_u16(sb + 208)), (float)(int8_t)ld_u8(sb + 192 + g));
  }
  HXQ_INLINE static QUnit unit(const uint8_t* sb, int u) {
    const int h = u >> 4, a = u & 15;
    QUnit r;
    quants(sb, u, r.u0, r.u1);
    const float d = half_float(ld_u16(sb + 208));
    // 16-element groups: run 0 -> 8h + a/4, run 1 -> 8h + 4 + a/4
    const int g0 = 8 * h + (a >> 2);
    const float s0 = (float)(int8_t)ld_u8(sb + 192 + g0);
    const float s1 = (float)(int8_t)ld_u8(sb + 196 + g0);
    r.a0 = mul_rn(d, s0);
    r.a1 = mul_rn(d, s1);
    r.b0 = r.b1 = 0.f;
    return r;
  }
};

// IQ4_XS: sub-block j's 16 index bytes hold elements 32j + l (low) and
// 32j + 16 + l (high); 6-bit scales split over scales_l / scales_h.
template <>
struct Block<GgmlType::IQ4_XS> : Block32Map {
  // d | scales_h (u16) | scales_l[4] | qs[128]
  static constexpr int QK = 256, BB = 136, Z = 128;
  static constexpr bool HAS_B = false, WIDE = true, SAME_SCALE = true;
  HXQ_INLINE static QUnit unit(const uint8_t* sb, int u) {
    const int j = u >> 2, a = u & 3;
    const uint32_t dh = ld_u32(sb);
    const float d = half_float(dh & 0xffff);
    const uint32_t sl = (ld_u32(sb + 4) >> (4 * j)) & 0xf;  // byte j/2, nibble j%2
    const uint32_t shi = (dh >> (16 + 2 * j)) & 3;
    const float dl = mul_rn(d, (float)((int)(sl | (shi << 4)) - 32));
    QUnit r{0, 0, dl, 0.f, dl, 0.f};
    iq4_lookup(ld_u32(sb + 8 + 16 * j + 4 * a), r.u0, r.u1);
    return r;
  }
};

// ---------------------------------------------------------------------------
// Float types: pass of 256 values, unit u = elements 4u..4u+3 and 128+4u..+3.

template <GgmlType T>
struct FloatBlock {
  static constexpr int kPassElems = 256;
  static constexpr int QK = 1;
  static constexpr int BB = T == GgmlType::F32 ? 4 : 2;
  HXQ_INLINE static int elem0(int u) { return 4 * u; }
  HXQ_INLINE static int elem1(int u) { return 128 + 4 * u; }
  // Four values starting at element e of the pass (8-byte aligned for 16-bit types,
  // 16-byte aligned for F32, as rows are when k % 4 == 0 in an aligned tensor).
  HXQ_INLINE static void run4(const uint8_t* pass, int e, float v[4]) {
    if constexpr (T == GgmlType::F32) {
      const float4 f = *reinterpret_cast<const float4*>(pass + 4 * e);
      v[0] = f.x;
      v[1] = f.y;
      v[2] = f.z;
      v[3] = f.w;
    } else {
      const uint2 h = *reinterpret_cast<const uint2*>(pass + 2 * e);
      if constexpr (T == GgmlType::F16) {
        v[0] = half_float(h.x & 0xffff);
        v[1] = half_float(h.x >> 16);
        v[2] = half_float(h.y & 0xffff);
        v[3] = half_float(h.y >> 16);
      } else {
        v[0] = bits_float(h.x << 16);
        v[1] = bits_float(h.x & 0xffff0000u);
        v[2] = bits_float(h.y << 16);
        v[3] = bits_float(h.y & 0xffff0000u);
      }
    }
  }
};
template <>
struct Block<GgmlType::F32> : FloatBlock<GgmlType::F32> {};
template <>
struct Block<GgmlType::F16> : FloatBlock<GgmlType::F16> {};
template <>
struct Block<GgmlType::BF16> : FloatBlock<GgmlType::BF16> {};

// Bytes of one pass of a row (256 elements).
template <GgmlType T>
constexpr int pass_bytes() {
  return 256 / Block<T>::QK * Block<T>::BB;
}

// ---------------------------------------------------------------------------
// Turning quant bytes into floats.

// Biased, for bytes <= 127: byte i of word -> 0.5 + byte / 256 with a single
// prmt (0x3F000000 | byte << 16). The matvec folds the bias into its offset term.
HXQ_INLINE float byte_biased(uint32_t word, int i) {
  return bits_float(byte_perm(word, 0x3f000000u, 0x7044u | ((uint32_t)i << 8)));
}

// Dequantized element i (0..7) of a unit, rounded like the reference.
template <GgmlType T>
HXQ_INLINE float unit_value(const QUnit& q, int i) {
  using B = Block<T>;
  const float v = i < 4 ? byte_value<B::Z>(q.u0, i) : byte_value<B::Z>(q.u1, i - 4);
  const float a = i < 4 ? q.a0 : q.a1;
  const float b = i < 4 ? q.b0 : q.b1;
  const float p = mul_rn(a, v);
  return B::HAS_B ? add_rn(p, b) : p;
}

// ---------------------------------------------------------------------------
// The matvec's per-lane arithmetic (here so the host tests run it too).
// xv[t][i][0..7]: activations of token t at unit i's two runs.

// Per-token activation sums of the two runs (only the biased path uses them;
// they are shared by every row a lane processes).
template <GgmlType T, int NT, int U>
HXQ_INLINE void run_sums(const float (&xv)[NT][U][8], float (&sx0)[NT], float (&sx1)[NT]) {
  for (int t = 0; t < NT; ++t) {
    sx0[t] = sx1[t] = 0.f;
    if constexpr (!Block<T>::WIDE) {
      sx0[t] = (xv[t][0][0] + xv[t][0][1]) + (xv[t][0][2] + xv[t][0][3]);
      sx1[t] = (xv[t][0][4] + xv[t][0][5]) + (xv[t][0][6] + xv[t][0][7]);
      for (int i = 1; i < U; ++i) {
        sx0[t] += (xv[t][i][0] + xv[t][i][1]) + (xv[t][i][2] + xv[t][i][3]);
        sx1[t] += (xv[t][i][4] + xv[t][i][5]) + (xv[t][i][6] + xv[t][i][7]);
      }
    }
  }
}

// acc[t] += a0 * sum(x f, run 0) + b0 * sum(x, run 0) + (same for run 1), with
// the biased floats f = 0.5 + q/256 of the U units' quant bytes (one prmt each).
template <int NT, int U, bool SAME_SCALE>
HXQ_INLINE void biased_dot(const uint32_t (&u0)[U], const uint32_t (&u1)[U], const float (&xv)[NT][U][8],
                           const float (&sx0)[NT], const float (&sx1)[NT], float a0, float b0, float a1, float b1,
                           float (&acc)[NT]) {
  for (int t = 0; t < NT; ++t) {
    float s0 = 0.f, s1 = 0.f;
    for (int i = 0; i < U; ++i)
      for (int j = 0; j < 4; ++j) {
        s0 = fmaf(xv[t][i][j], byte_biased(u0[i], j), s0);
        s1 = fmaf(xv[t][i][j + 4], byte_biased(u1[i], j), s1);
      }
    float s = acc[t];
    if constexpr (SAME_SCALE) {
      s = fmaf(a0, s0 + s1, s);
      s = fmaf(b0, sx0[t] + sx1[t], s);
    } else {
      s = fmaf(a0, s0, s);
      s = fmaf(b0, sx0[t], s);
      s = fmaf(a1, s1, s);
      s = fmaf(b1, sx1[t], s);
    }
    acc[t] = s;
  }
}

// acc[t] += sum over U units (one block / sub-block: unit 0's scales serve all)
// of w . x. 8-bit and grid formats use exact integers; the others the biased
// f = 0.5 + q/256:  sum x*w = 256a * sum x*f + (b - a * (128 + Z)) * sum x.
template <GgmlType T, int NT, int U>
HXQ_INLINE void units_dot(const QUnit (&q)[U], const float (&xv)[NT][U][8], const float (&sx0)[NT],
                          const float (&sx1)[NT], float (&acc)[NT]) {
  using B = Block<T>;
  if constexpr (B::WIDE) {
    for (int t = 0; t < NT; ++t) {
      float s0 = 0.f, s1 = 0.f;
      for (int i = 0; i < U; ++i)
        for (int j = 0; j < 4; ++j) {
          s0 = fmaf(xv[t][i][j], byte_value<B::Z>(q[i].u0, j), s0);
          s1 = fmaf(xv[t][i][j + 4], byte_value<B::Z>(q[i].u1, j), s1);
        }
      if constexpr (B::SAME_SCALE)
        acc[t] = fmaf(q[0].a0, s0 + s1, acc[t]);
      else
        acc[t] = fmaf(q[0].a1, s1, fmaf(q[0].a0, s0, acc[t]));
    }
  } else {
    constexpr float kBias = 128.0f + (float)B::Z;
    const float a0 = 256.0f * q[0].a0, a1 = 256.0f * q[0].a1;
    const float b0 = B::HAS_B ? fmaf(-kBias, q[0].a0, q[0].b0) : -kBias * q[0].a0;
    const float b1 = B::HAS_B ? fmaf(-kBias, q[0].a1, q[0].b1) : -kBias * q[0].a1;
    uint32_t u0[U], u1[U];
    for (int i = 0; i < U; ++i) {
      u0[i] = q[i].u0;
      u1[i] = q[i].u1;
    }
    biased_dot<NT, U, B::SAME_SCALE>(u0, u1, xv, sx0, sx1, a0, b0, a1, b1, acc);
  }
}

template <GgmlType T, class = void>
struct HasK4Header {
  static constexpr bool value = false;
};
template <GgmlType T>
struct HasK4Header<T, decltype((void)Block<T>::K4_HEADER)> {
  static constexpr bool value = Block<T>::K4_HEADER;
};

// One lane's contribution of units ub..ub+U-1 of one pass of one row:
// acc[t] += W[units] . x[t, units]. This is the matvec's whole per-row work.
// Q4_K / Q5_K read their 16-byte header once and turn the 6-bit scales into
// the offsets of biased_dot directly (one prmt and one FMA each): with
// f = 0.5 + v/256 for a scale or min byte v,
//   a = 256 d sc       = 65536 d f_sc - 32768 d
//   b = -dmin m - 128 d sc = -256 dmin f_m - 32768 d f_sc + (128 dmin + 16384 d).
template <GgmlType T, int NT, int U>
HXQ_INLINE void lane_dot(const uint8_t* pass, int ub, const float (&xv)[NT][U][8], const float (&sx0)[NT],
                         const float (&sx1)[NT], float (&acc)[NT]) {
  using B = Block<T>;
  if constexpr (HasK4Header<T>::value) {
    const uint4 h = ld_u128(pass);
    uint32_t u0[U], u1[U];
    B::template quants<U>(pass, ub, u0, u1);
    const uint32_t w = B::scale_min_pair(h.y, h.z, h.w, ub >> 3);
    const float d = half_float(h.x & 0xffff), dmin = half_float(h.x >> 16);
    const float d1 = 65536.0f * d, d2 = -32768.0f * d, d3 = -256.0f * dmin;
    const float d4 = fmaf(128.0f, dmin, 16384.0f * d);
    const float fs0 = byte_biased(w, 0), fs1 = byte_biased(w, 1);
    const float fm0 = byte_biased(w, 2), fm1 = byte_biased(w, 3);
    const float a0 = fmaf(d1, fs0, d2), a1 = fmaf(d1, fs1, d2);
    const float b0 = fmaf(d3, fm0, fmaf(d2, fs0, d4)), b1 = fmaf(d3, fm1, fmaf(d2, fs1, d4));
    biased_dot<NT, U, false>(u0, u1, xv, sx0, sx1, a0, b0, a1, b1, acc);
  } else {
    QUnit q[U];
    for (int i = 0; i < U; ++i) q[i] = B::unit(pass, ub + i);
    units_dot<T, NT, U>(q, xv, sx0, sx1, acc);
  }
}

}  // namespace quant
}  // namespace hx

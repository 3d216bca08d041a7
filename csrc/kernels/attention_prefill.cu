// Causal prefill attention on tensor cores, flash-attention 2 style, over
// one sequence's blocks of the paged KV pool.
//
//   out[i, h] = sum_{t <= start_pos + i} softmax_t(scale * q[i, h] . K[g(h), row(t)]) V[g(h), row(t)]
//   row(t) = table[t / block_size] * block_size + t % block_size
//
// Layout: q / out [n, nq, d] float32; pool [nk, cap, d] bf16 (cap = pool
// blocks * block_size positions); the sequence's block table [max_blocks] int32.
//
// Tensor-core path (head_dim D = 64 or 128; sm_80+, HX_HAS_BF16_MMA):
// GQA rows: for kv head kvh the G = nq / nk query heads of every token form
// n * G rows, row R = i * G + g; a block takes 64 consecutive rows (any G,
// any n) of one kv head, so each K/V tile it loads serves all G heads.
// Grid (ceil(n*G / 64), nk), 4 warps, each warp owns 16 rows. The Q tile is
// converted to bf16 into shared memory and loaded once into mma A fragments
// (ldmatrix). K/V tiles of 64 positions stream through a two-stage cp.async
// pipeline; every thread maps its rows of a tile to pool rows through the
// table itself (per row, so any block size works), reading the table two
// tiles ahead into registers so the lookups never stall a tile's loads;
// shared tiles use an XOR swizzle of 16-byte chunks (chunk ^ row%8)
// so ldmatrix reads are bank-conflict free. S = Q K^T with
// mma.sync.m16n8k16 (bf16 in, float32 accumulate); causal mask only on the
// tiles that cross a row's limit; online softmax in the log2 domain in
// registers (row max/sum across the 4 lanes of a quad); P is rounded to bf16
// and fed from registers straight back as the A operand of O += P V (V via
// ldmatrix.trans). Blocks run heaviest-first (last rows see the most keys).
// Positions past the block's last key are zero-filled, never read.
//
// Scalar path (any even head_dim <= 256, or a GPU without bf16 mma): one warp
// per (token, head) row, lanes split the head dim, keys in sequence (each
// mapped through the table) with an online softmax; float32 throughout.
// Slow but simple; a cross-check in tests.
// Table entries outside [0, cap / block_size) read block 0: a bad table can
// give wrong numbers, never an access outside the pool.
#include "kernels/attention_prefill.cuh"

#include <atomic>
#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"

namespace hx {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kBM = 64;        // query rows per block
constexpr int kBN = 64;        // keys per tile
constexpr int kThreads = 128;  // 4 warps x 16 rows

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Offset (in bf16 elements) of 16-byte chunk c of row r in a swizzled [rows, D] tile.
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#if HX_HAS_CP_ASYNC
  // src-size 0 zero-fills the 16 bytes without reading global memory.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if HX_HAS_CP_ASYNC
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if HX_HAS_CP_ASYNC
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
#if HX_HAS_BF16_MMA
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
#if HX_HAS_BF16_MMA
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
#endif
}

// c += a (16x16 bf16, row) * b (16x8 bf16, col), float32 accumulators.
__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#if HX_HAS_BF16_MMA
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Pool row of sequence position `pos`.
__device__ __forceinline__ int pool_row(const int32_t* __restrict__ table, int nblk, int bshift, int pos) {
  int b = __ldg(table + (pos >> bshift));
  b = (unsigned)b < (unsigned)nblk ? b : 0;
  return (b << bshift) | (pos & ((1 << bshift) - 1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <int D>
__global__ void __launch_bounds__(kThreads)
attn_prefill_mma_kernel(const float* __restrict__ q, const __nv_bfloat16* __restrict__ kc,
                        const __nv_bfloat16* __restrict__ vc, const int32_t* __restrict__ table, int bshift,
                        float* __restrict__ out, int start_pos, int n, int nq, int G, int cap, float scale_log2) {
#if HX_HAS_BF16_MMA
  constexpr int CPR = D / 8;       // 16-byte chunks per row
  constexpr int LOADS = kBN * CPR / kThreads;  // 16-byte chunks of a K (or V) tile per thread
  constexpr int KS = D / 16;       // k-steps of Q K^T
  constexpr int NT_S = kBN / 8;    // n-tiles of S per warp
  constexpr int NT_O = D / 8;      // n-tiles of O per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* sK = sQ + kBM * D;        // [2][kBN][D]
  __nv_bfloat16* sV = sK + 2 * kBN * D;    // [2][kBN][D]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int kvh = blockIdx.y;
  const int tile = gridDim.x - 1 - blockIdx.x;  // heaviest first
  const int rows = n * G;
  const int R0 = tile * kBM;
  const int r_last = min(R0 + kBM, rows) - 1;
  const int i_first = R0 / G, i_last = r_last / G;
  const int kv_end = start_pos + i_last + 1;          // keys [0, kv_end) are needed
  const int n_tiles = (kv_end + kBN - 1) / kBN;
  const int full_limit = start_pos + i_first;          // every row sees keys <= this

  const __nv_bfloat16* kbase = kc + (size_t)kvh * cap * D;
  const __nv_bfloat16* vbase = vc + (size_t)kvh * cap * D;
  const int nblk = cap >> bshift;

  // Pool rows of this thread's rows of one tile (-1: past the last key).
  int prow[LOADS];
  auto lookup = [&](int t) {
#pragma unroll
    for (int it = 0; it < LOADS; ++it) {
      const int key = t * kBN + (it * kThreads + tid) / CPR;
      prow[it] = key < kv_end ? pool_row(table, nblk, bshift, key) : -1;
    }
  };
  auto load_kv = [&](int buf) {
    __nv_bfloat16* dk = sK + buf * kBN * D;
    __nv_bfloat16* dv = sV + buf * kBN * D;
#pragma unroll
    for (int it = 0; it < LOADS; ++it) {
      const int idx = it * kThreads + tid;
      const int r = idx / CPR, c = idx % CPR;
      const bool valid = prow[it] >= 0;
      const size_t off = (size_t)(valid ? prow[it] : 0) * D + c * 8;
      cp_async16(dk + swz<D>(r, c), kbase + off, valid);
      cp_async16(dv + swz<D>(r, c), vbase + off, valid);
    }
  };

  lookup(0);
  load_kv(0);
  cp_async_commit();
  if (n_tiles > 1) lookup(1);

  // Q tile -> bf16 shared (rows past the end are zeros).
#pragma unroll
  for (int it = 0; it < kBM * CPR / kThreads; ++it) {
    const int idx = it * kThreads + tid;
    const int r = idx / CPR, c = idx % CPR;
    const int R = R0 + r;
    uint4 packed = make_uint4(0, 0, 0, 0);
    if (R < rows) {
      const int i = R / G, g = R - (R / G) * G;
      const float4* src =
          reinterpret_cast<const float4*>(q + ((size_t)i * nq + (size_t)kvh * G + g) * D + c * 8);
      const float4 a = src[0], b = src[1];
      packed = make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
    }
    *reinterpret_cast<uint4*>(sQ + swz<D>(r, c)) = packed;
  }
  __syncthreads();

  uint32_t qf[KS][4];
  {
    const int r = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) ldmatrix_x4(qf[ks], sQ + swz<D>(r, ks * 2 + (lane >> 4)));
  }

  float o[NT_O][4];
#pragma unroll
  for (int nt = 0; nt < NT_O; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  // The two rows of this thread and the last key each may see.
  const int ra = warp * 16 + (lane >> 2);
  const int lim_a = start_pos + (R0 + ra) / G, lim_b = start_pos + (R0 + ra + 8) / G;

  for (int t = 0; t < n_tiles; ++t) {
    // prow holds tile t + 1's rows here; the lookup for t + 2 then runs
    // under this tile's math.
    if (t + 1 < n_tiles) load_kv((t + 1) & 1);
    cp_async_commit();
    if (t + 2 < n_tiles) lookup(t + 2);
    cp_async_wait<1>();
    __syncthreads();

    const __nv_bfloat16* tk = sK + (t & 1) * kBN * D;
    const __nv_bfloat16* tv = sV + (t & 1) * kBN * D;

    float s[NT_S][4];
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
      for (int np = 0; np < NT_S / 2; ++np) {
        uint32_t b[4];
        const int r = np * 16 + (lane & 7) + (lane >> 4) * 8;
        ldmatrix_x4(b, tk + swz<D>(r, ks * 2 + ((lane >> 3) & 1)));
        mma_bf16(s[2 * np], qf[ks], b[0], b[1]);
        mma_bf16(s[2 * np + 1], qf[ks], b[2], b[3]);
      }
    }

    const bool need_mask = t * kBN + kBN - 1 > full_limit;
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[nt][e] * scale_log2;
        if (need_mask) {
          const int key = t * kBN + nt * 8 + 2 * (lane & 3) + (e & 1);
          if (key > ((e & 2) ? lim_b : lim_a)) v = -INFINITY;
        }
        s[nt][e] = v;
      }
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      const float mnew = fmaxf(m[h], mx);
      const float muse = mnew == -INFINITY ? 0.f : mnew;
      const float alpha = exp2f(m[h] - muse);
      m[h] = mnew;
      float rs = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt) {
        const float p0 = exp2f(s[nt][2 * h] - muse), p1 = exp2f(s[nt][2 * h + 1] - muse);
        s[nt][2 * h] = p0;
        s[nt][2 * h + 1] = p1;
        rs += p0 + p1;
      }
      l[h] = l[h] * alpha + rs;
#pragma unroll
      for (int nt = 0; nt < NT_O; ++nt) {
        o[nt][2 * h] *= alpha;
        o[nt][2 * h + 1] *= alpha;
      }
    }

#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      const int r = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, tv + swz<D>(r, dp * 2 + (lane >> 4)));
        mma_bf16(o[2 * dp], pa, b[0], b[1]);
        mma_bf16(o[2 * dp + 1], pa, b[2], b[3]);
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this buffer
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float lt = l[h];
    lt += __shfl_xor_sync(kFullMask, lt, 1);
    lt += __shfl_xor_sync(kFullMask, lt, 2);
    const float inv = 1.0f / lt;
    const int R = R0 + ra + 8 * h;
    if (R >= rows) continue;
    const int i = R / G, g = R - (R / G) * G;
    float* dst = out + ((size_t)i * nq + (size_t)kvh * G + g) * D + 2 * (lane & 3);
#pragma unroll
    for (int nt = 0; nt < NT_O; ++nt)
      *reinterpret_cast<float2*>(dst + nt * 8) = make_float2(o[nt][2 * h] * inv, o[nt][2 * h + 1] * inv);
  }
#else
  __trap();  // the host never selects this kernel below sm_80
#endif
}

constexpr int kScalarWarps = 4;
constexpr int kScalarMaxPerLane = 8;  // head_dim <= 256

__global__ void __launch_bounds__(kScalarWarps * 32)
attn_prefill_scalar_kernel(const float* __restrict__ q, const __nv_bfloat16* __restrict__ kc,
                           const __nv_bfloat16* __restrict__ vc, const int32_t* __restrict__ table, int bshift,
                           float* __restrict__ out, int start_pos, int n, int nq, int G, int d, int cap,
                           float scale_log2) {
  const int row = blockIdx.x * kScalarWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= n * nq) return;
  const int i = row / nq, h = row - (row / nq) * nq;
  const int kvh = h / G;
  const float* qp = q + (size_t)row * d;
  float qv[kScalarMaxPerLane], acc[kScalarMaxPerLane];
#pragma unroll
  for (int j = 0; j < kScalarMaxPerLane; ++j) {
    const int c = lane + 32 * j;
    qv[j] = c < d ? qp[c] * scale_log2 : 0.f;
    acc[j] = 0.f;
  }
  const __nv_bfloat16* kb = kc + (size_t)kvh * cap * d;
  const __nv_bfloat16* vb = vc + (size_t)kvh * cap * d;
  const int nblk = cap >> bshift;
  float m = -INFINITY, l = 0.f;
  const int last = start_pos + i;
  for (int t = 0; t <= last; ++t) {
    const size_t row = (size_t)pool_row(table, nblk, bshift, t) * d;
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < kScalarMaxPerLane; ++j) {
      const int c = lane + 32 * j;
      if (c < d) dot = fmaf(qv[j], __bfloat162float(kb[row + c]), dot);
    }
    dot = warp_sum(dot);
    const float mnew = fmaxf(m, dot);
    const float alpha = exp2f(m - mnew);
    const float p = exp2f(dot - mnew);
    l = l * alpha + p;
#pragma unroll
    for (int j = 0; j < kScalarMaxPerLane; ++j) {
      const int c = lane + 32 * j;
      if (c < d) acc[j] = acc[j] * alpha + p * __bfloat162float(vb[row + c]);
    }
    m = mnew;
  }
  float* op = out + (size_t)row * d;
#pragma unroll
  for (int j = 0; j < kScalarMaxPerLane; ++j) {
    const int c = lane + 32 * j;
    if (c < d) op[c] = acc[j] / l;
  }
}

// Checks the sizes; returns log2(block_size).
int check_sizes(const char* what, const int32_t* table, int max_blocks, int block_size, int start_pos, int n, int nq,
                int nk, int d, int cap) {
  if (n < 0 || start_pos < 0 || nq <= 0 || nk <= 0 || nq % nk != 0 || cap <= 0 || max_blocks < 0 ||
      (int64_t)start_pos + n > (int64_t)max_blocks * block_size)
    throw std::invalid_argument(std::string(what) + ": bad sizes start_pos=" + std::to_string(start_pos) +
                                " n=" + std::to_string(n) + " nq=" + std::to_string(nq) + " nk=" +
                                std::to_string(nk) + " max_blocks=" + std::to_string(max_blocks) +
                                " (need nq % nk == 0 and start_pos + n <= max_blocks * block_size)");
  if (block_size < 16 || (block_size & (block_size - 1)) != 0 || cap % block_size != 0)
    throw std::invalid_argument(std::string(what) + ": block_size " + std::to_string(block_size) +
                                " must be a power of two >= 16 dividing the pool's " + std::to_string(cap) +
                                " positions");
  if (d <= 0 || d % 2 != 0 || d > 32 * kScalarMaxPerLane)
    throw std::invalid_argument(std::string(what) + ": head_dim " + std::to_string(d) +
                                " unsupported (needs an even value at most 256)");
  if (table == nullptr && n > 0) throw std::invalid_argument(std::string(what) + ": the block table is required");
  int shift = 0;
  while ((1 << shift) < block_size) ++shift;
  return shift;
}

template <int D>
void launch_mma(const float* q, const __nv_bfloat16* kc, const __nv_bfloat16* vc, const int32_t* table, int bshift,
                int start_pos, int n, float* out, int nq, int nk, int cap, float scale, cudaStream_t stream) {
  const size_t smem = (size_t)(kBM + 4 * kBN) * D * sizeof(__nv_bfloat16);
  static std::atomic<bool> configured[detail::kMaxDevices];
  const int dev = current_device();
  if (dev < 0 || dev >= detail::kMaxDevices || !configured[dev].load(std::memory_order_relaxed)) {
    HX_CUDA_CHECK(cudaFuncSetAttribute(attn_prefill_mma_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)smem));
    if (dev >= 0 && dev < detail::kMaxDevices) configured[dev].store(true, std::memory_order_relaxed);
  }
  const int G = nq / nk;
  const dim3 grid((n * G + kBM - 1) / kBM, nk);
  attn_prefill_mma_kernel<D><<<grid, kThreads, smem, stream>>>(q, kc, vc, table, bshift, out, start_pos, n, nq, G,
                                                               cap, scale * kLog2e);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void attention_prefill_scalar_launch(const float* q, const __nv_bfloat16* kc, const __nv_bfloat16* vc,
                                     const int32_t* block_table, int max_blocks, int block_size, int start_pos, int n,
                                     float* out, int nq, int nk, int d, int cap, float scale, cudaStream_t stream) {
  const int bshift = check_sizes("attention_prefill", block_table, max_blocks, block_size, start_pos, n, nq, nk, d, cap);
  if (n == 0) return;
  const int rows = n * nq;
  attn_prefill_scalar_kernel<<<(rows + kScalarWarps - 1) / kScalarWarps, kScalarWarps * 32, 0, stream>>>(
      q, kc, vc, block_table, bshift, out, start_pos, n, nq, nq / nk, d, cap, scale * kLog2e);
  HX_CUDA_CHECK(cudaGetLastError());
}

void attention_prefill_launch(const float* q, const __nv_bfloat16* kc, const __nv_bfloat16* vc,
                              const int32_t* block_table, int max_blocks, int block_size, int start_pos, int n,
                              float* out, int nq, int nk, int d, int cap, float scale, cudaStream_t stream) {
  const int bshift = check_sizes("attention_prefill", block_table, max_blocks, block_size, start_pos, n, nq, nk, d, cap);
  if (n == 0) return;
  const bool aligned = ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(kc) |
                         reinterpret_cast<uintptr_t>(vc) | reinterpret_cast<uintptr_t>(out)) % 16) == 0;
  const bool mma = aligned && device_sm(current_device()) >= 80;
  if (mma && d == 64) {
    launch_mma<64>(q, kc, vc, block_table, bshift, start_pos, n, out, nq, nk, cap, scale, stream);
  } else if (mma && d == 128) {
    launch_mma<128>(q, kc, vc, block_table, bshift, start_pos, n, out, nq, nk, cap, scale, stream);
  } else {
    attention_prefill_scalar_launch(q, kc, vc, block_table, max_blocks, block_size, start_pos, n, out, nq, nk, d, cap,
                                    scale, stream);
  }
}

}  // namespace hx

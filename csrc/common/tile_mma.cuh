// Tensor-core tile building blocks shared by the CUDA kernels of every op (fp16 / bf16 operands,
// fp32 accumulation): element traits, cp.async global->shared tile copies, ldmatrix fragment
// loads, warp-level mma.sync.m16n8k16 products, one-warp row dot products, and the host helpers
// that check pointers and raise a kernel's shared-memory limit.
//
// Device code and the CUDA runtime only, no torch header (see scft_attention_kernel.cu for why).
// Everything here is inline or a template, so each .cu that includes it gets its own copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "common/ptx.cuh"

namespace sketchcolor {
namespace tiles {

__host__ __device__ constexpr inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Element types. Kernels move fp16/bf16 data as raw 16-bit words (uint16_t); the traits convert
// and pick the matching mma instruction.

template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
  __device__ static __forceinline__ uint16_t from_float(float x) {
    const __nv_bfloat16 v = __float2bfloat16_rn(x);
    uint16_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
  __device__ static __forceinline__ float2 unpack(uint32_t u) {
    __nv_bfloat162 v;
    memcpy(&v, &u, sizeof(u));
    return __bfloat1622float2(v);
  }
  __device__ static __forceinline__ float to_float(uint16_t u) {
    __nv_bfloat16 v;
    memcpy(&v, &u, sizeof(u));
    return __bfloat162float(v);
  }
  // d (16x8 fp32) += a (16x16, row) * b (16x8, col)
  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k16_bf16(d, a, b0, b1);
  }
};

template <>
struct Elem<__half> {
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
  __device__ static __forceinline__ uint16_t from_float(float x) {
    const __half v = __float2half_rn(x);
    uint16_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
  __device__ static __forceinline__ float2 unpack(uint32_t u) {
    __half2 v;
    memcpy(&v, &u, sizeof(u));
    return __half22float2(v);
  }
  __device__ static __forceinline__ float to_float(uint16_t u) {
    __half v;
    memcpy(&v, &u, sizeof(u));
    return __half2float(v);
  }
  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k16_f16(d, a, b0, b1);
  }
};

// ---------------------------------------------------------------------------------------------
// Shared-memory copies and fragment loads.

// Copies a kRows x kCols tile (2-byte elements, columns contiguous in global memory) whose
// top-left element is (row0, col0) of the matrix at `gmem` (row pitch `row_stride` elements) into
// shared memory at `smem_tile` (row pitch `smem_pitch` elements). Rows >= row_limit and columns
// >= col_limit are zero-filled, so the tile edges of every product are exact zeros: a masked
// key or head-dim column contributes 0 to every dot product, never garbage or NaN.
// Requires gmem 16-byte aligned and row_stride, col0 multiples of 8 (launchers check this).
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void load_tile_async(uint32_t smem_tile, int smem_pitch, const uint16_t* gmem,
                                                int64_t row_stride, int row0, int row_limit, int col0,
                                                int col_limit, int tid) {
  static_assert(kCols % 8 == 0, "tile columns are copied in 16-byte (8-element) pieces");
  constexpr int kPiecesPerRow = kCols / 8;
  constexpr int kPieces = kRows * kPiecesPerRow;
  static_assert(kThreads % kPiecesPerRow == 0 && kPieces % kThreads == 0,
                "each thread copies the same column of evenly spaced rows");
  // Thread tid copies column piece c of rows r0, r0 + kRowStep, ...: one column mask, one base
  // address and a constant row step, instead of a 64-bit address per piece held in registers.
  constexpr int kRowStep = kThreads / kPiecesPerRow;
  const int r0 = tid / kPiecesPerRow;
  const int c = (tid % kPiecesPerRow) * 8;
  int col_bytes = (col_limit - (col0 + c)) * 2;
  col_bytes = col_bytes < 0 ? 0 : (col_bytes > 16 ? 16 : col_bytes);
  const int64_t first = int64_t(row0 + r0) * row_stride + col0 + c;
  const int64_t step = int64_t(kRowStep) * row_stride;
  const uint32_t dst = smem_tile + uint32_t(r0 * smem_pitch + c) * 2u;
#pragma unroll
  for (int i = 0; i < kPieces / kThreads; ++i) {
    const int bytes = row0 + r0 + i * kRowStep < row_limit ? col_bytes : 0;
    // A piece with no bytes to read still names a valid address (the tile's matrix base).
    const uint16_t* src = bytes > 0 ? gmem + (first + i * step) : gmem;
    cp_async_16(dst + uint32_t(i * kRowStep * smem_pitch) * 2u, src, bytes);
  }
}

// Fragment loads for mma.m16n8k16 (PTX ISA fragment layouts; g = lane / 4, t = lane % 4):
//   A 16x16: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B 16x8:  b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C 16x8:  c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
// ldmatrix.x4 takes lanes 8i..8i+7 as the row addresses of 8x8 matrix i and returns matrix i in
// register i (lane holds row g, columns 2t..2t+1; with .trans, the transpose).

// A fragment of rows [m0, m0+16), columns [k0, k0+16) of a tile stored [m][k] (k contiguous).
__device__ __forceinline__ void load_a_kcontig(uint32_t (&a)[4], uint32_t tile, int pitch, int m0, int k0,
                                               int lane) {
  ldmatrix_x4(a, tile + uint32_t((m0 + (lane & 15)) * pitch + k0 + (lane >> 4) * 8) * 2u);
}
// A fragment of rows [m0, m0+16), columns [k0, k0+16) of a tile stored [k][m] (m contiguous).
__device__ __forceinline__ void load_a_mcontig(uint32_t (&a)[4], uint32_t tile, int pitch, int m0, int k0,
                                               int lane) {
  ldmatrix_x4_trans(a, tile + uint32_t((k0 + (lane & 7) + (lane >> 4) * 8) * pitch + m0 + ((lane >> 3) & 1) * 8) * 2u);
}
// B fragments of two n8 tiles, columns [n0, n0+16), rows [k0, k0+16), of a tile stored [n][k]
// (k contiguous): b[0], b[1] for columns n0..n0+7; b[2], b[3] for n0+8..n0+15.
__device__ __forceinline__ void load_b_pair_kcontig(uint32_t (&b)[4], uint32_t tile, int pitch, int n0, int k0,
                                                    int lane) {
  ldmatrix_x4(b, tile + uint32_t((n0 + (lane & 7) + (lane >> 4) * 8) * pitch + k0 + ((lane >> 3) & 1) * 8) * 2u);
}
// The same two B fragments from a tile stored [k][n] (n contiguous).
__device__ __forceinline__ void load_b_pair_ncontig(uint32_t (&b)[4], uint32_t tile, int pitch, int k0, int n0,
                                                    int lane) {
  ldmatrix_x4_trans(b, tile + uint32_t((k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * pitch + n0 + (lane >> 4) * 8) * 2u);
}

// acc (kMt*16 x kNt*8 warp tile) += A (rows [m0, ...), k16 step k0, stored [m][k]) *
// B^T (B stored [n][k], columns [n0, ...)). The product q k^T and dO v^T.
template <typename T, int kMt, int kNt>
__device__ __forceinline__ void warp_mma_k16_nk(float (&acc)[kMt][kNt][4], uint32_t a_tile, int a_pitch, int m0,
                                                uint32_t b_tile, int b_pitch, int n0, int k0, int lane) {
  static_assert(kNt % 2 == 0, "B fragments are loaded for pairs of n8 tiles");
  uint32_t a[kMt][4];
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt) load_a_kcontig(a[mt], a_tile, a_pitch, m0 + mt * 16, k0, lane);
#pragma unroll
  for (int np = 0; np < kNt / 2; ++np) {
    uint32_t b[4];
    load_b_pair_kcontig(b, b_tile, b_pitch, n0 + np * 16, k0, lane);
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt) {
      Elem<T>::mma(acc[mt][2 * np], a[mt], b[0], b[1]);
      Elem<T>::mma(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
    }
  }
}

// acc += A B^T over a whole kChunk-wide chunk of the shared dimension: the k16 steps of
// warp_mma_k16_nk. The score products q k^T of every kernel that streams D in chunks.
template <typename T, int kMt, int kNt, int kChunk>
__device__ __forceinline__ void warp_mma_chunk_nk(float (&acc)[kMt][kNt][4], uint32_t a_tile, int a_pitch, int m0,
                                                  uint32_t b_tile, int b_pitch, int n0, int lane) {
  static_assert(kChunk % 16 == 0, "chunks are whole k16 steps");
#pragma unroll
  for (int kk = 0; kk < kChunk; kk += 16)
    warp_mma_k16_nk<T, kMt, kNt>(acc, a_tile, a_pitch, m0, b_tile, b_pitch, n0, kk, lane);
}

// acc += A * B with B stored [k][n] (n contiguous) and A stored [m][k] (kAKContig) or [k][m].
template <typename T, int kMt, int kNt, bool kAKContig>
__device__ __forceinline__ void warp_mma_k16_kn(float (&acc)[kMt][kNt][4], uint32_t a_tile, int a_pitch, int m0,
                                                uint32_t b_tile, int b_pitch, int n0, int k0, int lane) {
  static_assert(kNt % 2 == 0, "B fragments are loaded for pairs of n8 tiles");
  uint32_t a[kMt][4];
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt) {
    if (kAKContig) {
      load_a_kcontig(a[mt], a_tile, a_pitch, m0 + mt * 16, k0, lane);
    } else {
      load_a_mcontig(a[mt], a_tile, a_pitch, m0 + mt * 16, k0, lane);
    }
  }
#pragma unroll
  for (int np = 0; np < kNt / 2; ++np) {
    uint32_t b[4];
    load_b_pair_ncontig(b, b_tile, b_pitch, k0, n0 + np * 16, lane);
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt) {
      Elem<T>::mma(acc[mt][2 * np], a[mt], b[0], b[1]);
      Elem<T>::mma(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
    }
  }
}

template <int kMt, int kNt>
__device__ __forceinline__ void zero_acc(float (&acc)[kMt][kNt][4]) {
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
}

// Two adjacent outputs (columns col, col+1 of one row) in the element type; `pairs` says the
// row's storage allows a 4-byte store at even columns.
template <typename T>
__device__ __forceinline__ void store_pair(uint16_t* row_ptr, int col, int col_limit, bool pairs, float v0, float v1) {
  if (pairs && col + 1 < col_limit) {
    store_vector(reinterpret_cast<uint32_t*>(row_ptr + col), Elem<T>::pack(v0, v1));
  } else {
    if (col < col_limit) row_ptr[col] = Elem<T>::from_float(v0);
    if (col + 1 < col_limit) row_ptr[col + 1] = Elem<T>::from_float(v1);
  }
}

// The step a consumer of a kStages-deep cp.async stage ring takes before reading job j's stage:
// j's copies have landed for this thread (at most kStages - 2 newer groups stay in flight), the
// barrier makes them visible to every warp and says every warp is done with job j - 1, whose stage
// `issue_next` then refills (it commits one group, empty past the last job).
template <int kStages, typename IssueNext>
__device__ __forceinline__ void ring_wait_and_refill(IssueNext& issue_next) {
  cp_async_wait<kStages - 2>();
  __syncthreads();
  issue_next();
}

// sum_c a[c] * b[c] for c < n in fp32, computed by one warp and returned to every lane. Lanes read
// 16-byte pieces of 8 elements (a and b must be 16-byte aligned); a tail shorter than a piece is
// read element by element, never past n.
template <typename T>
__device__ __forceinline__ float warp_row_dot(const uint16_t* a, const uint16_t* b, int n, int lane) {
  float acc = 0.f;
  for (int c = lane * 8; c < n; c += 32 * 8) {
    if (c + 8 <= n) {
      const uint4 av = __ldg(reinterpret_cast<const uint4*>(a + c));
      const uint4 bv = __ldg(reinterpret_cast<const uint4*>(b + c));
      const uint32_t aw[4] = {av.x, av.y, av.z, av.w};
      const uint32_t bw[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const float2 af = Elem<T>::unpack(aw[w]);
        const float2 bf = Elem<T>::unpack(bw[w]);
        acc = fmaf(af.x, bf.x, acc);
        acc = fmaf(af.y, bf.y, acc);
      }
    } else {
      for (int e = c; e < n; ++e) acc = fmaf(Elem<T>::to_float(a[e]), Elem<T>::to_float(b[e]), acc);
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  return acc;
}

// ---------------------------------------------------------------------------------------------
// Host side.

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) % 16) == 0; }
inline bool aligned4(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) % 4) == 0; }
// An element stride of 16-bit rows keeps every row 16-byte aligned (a multiple of 8 elements); it
// matters only when its axis has more than one index.
inline bool stride_ok(int64_t stride, int64_t extent) { return extent <= 1 || stride % 8 == 0; }

// Whether the current device lets one block have smem_bytes of shared memory (its opt-in limit).
inline cudaError_t device_grants_smem(size_t smem_bytes, bool* granted) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  *granted = smem_bytes <= size_t(optin);
  return cudaSuccess;
}

// Picks Cfg where the device grants its shared memory and force_compact is false, else CompactCfg
// (the same tiles through fewer stages), and calls launch(Cfg{}) or launch(CompactCfg{}).
template <typename Cfg, typename CompactCfg, typename Launch>
cudaError_t launch_fitting(bool force_compact, Launch&& launch) {
  if (force_compact) return launch(CompactCfg{});
  bool granted = false;
  const cudaError_t err = device_grants_smem(Cfg::kSmemBytes, &granted);
  if (err != cudaSuccess) return err;
  return granted ? launch(Cfg{}) : launch(CompactCfg{});
}

// Raises the kernel's dynamic shared-memory limit when it needs more than the default 48 KiB,
// after checking that the device can give it.
template <typename Kernel>
cudaError_t prepare_smem(Kernel kernel, size_t smem_bytes) {
  if (smem_bytes <= 48 * 1024) return cudaSuccess;
  bool granted = false;
  const cudaError_t err = device_grants_smem(smem_bytes, &granted);
  if (err != cudaSuccess) return err;
  if (!granted) return cudaErrorInvalidConfiguration;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes));
}

}  // namespace tiles
}  // namespace sketchcolor

// Warpgroup matrix products for sm_90a (wgmma.mma_async, HGMMA in SASS): the shared-memory operand
// layout they read, its descriptors, the instructions with fp32 accumulators, and the fences that
// order them against ordinary register and shared-memory accesses.
//
// Device code and the CUDA runtime only, no torch header. The wgmma primitives exist only when the
// device pass targets sm_90a (__CUDA_ARCH_FEAT_SM90_ALL): a kernel that uses them guards its body
// the same way, so that the sm_80 pass of the same file never sees them.
//
// Operand layout ("interleaved", the descriptor's no-swizzle mode). A kRows x kCols tile of 16-bit
// elements is stored as 8 x 8 core matrices of 128 contiguous bytes (8 rows of 16 bytes); core
// (row / 8, col / 8) starts at ((row / 8) * (kCols / 8) + col / 8) * 128 bytes. So, in bytes:
//   next core along the columns: 128;  next core along the rows: kCols / 8 * 128.
// wgmma names the two strides by the product's dimensions: LBO is the step between cores along K,
// SBO the step along M or N. A K-major operand (q, k, P: rows are M or N, columns are K) therefore
// has LBO = 128 and SBO = kCols / 8 * 128; an MN-major operand (rows are K, columns are M or N, read
// with the operand's transpose flag: v in the forward, B of the backward GEMMs, and A = P or dS
// read as P^T, dS^T) has LBO = kCols / 8 * 128 and SBO = 128.
// Why not a swizzled layout: those are made for the bulk tensor copy (TMA); tiles here are filled
// by 16-byte cp.async, and this layout makes that copy conflict-free (below) with no swizzle math.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/tile_mma.cuh"

namespace sketchcolor {
namespace tiles {

// Copies a kRows x kCols tile (2-byte elements, columns contiguous in global memory) whose
// top-left element is (row0, col0) of the matrix at `gmem` (row pitch `row_stride` elements) into
// shared memory at `smem_tile` in the interleaved layout. Rows >= row_limit and columns >=
// col_limit are zero-filled, like load_tile_async. Piece p (16 bytes) lands at byte 16 p, so eight
// consecutive threads fill one core matrix (8 rows of one 16-byte column piece): 128 contiguous
// bytes, a conflict-free shared-memory wavefront. A warp reads 4 consecutive pieces (two whole
// 32-byte sectors) of each of 8 rows.
// Requires gmem 16-byte aligned and row_stride, col0 multiples of 8 (launchers check this).
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void load_tile_interleaved_async(uint32_t smem_tile, const uint16_t* gmem,
                                                            int64_t row_stride, int row0, int row_limit, int col0,
                                                            int col_limit, int tid) {
  static_assert(kRows % 8 == 0 && kCols % 8 == 0, "tiles are whole 8 x 8 core matrices");
  constexpr int kPiecesPerRow = kCols / 8;
  constexpr int kPieces = kRows * kPiecesPerRow;
  constexpr int kCoresPerPass = kThreads / 8;   // core matrices the CTA fills per pass
  static_assert(kThreads % 8 == 0 && kPieces % kThreads == 0, "every thread copies the same number of pieces");
  static_assert(kCoresPerPass % kPiecesPerRow == 0 || kPiecesPerRow % kCoresPerPass == 0,
                "a pass covers whole core rows, or a row is whole passes");
  // Pass i copies piece tid + i * kThreads: core tid / 8 + i * kCoresPerPass. Under the assert
  // above, its row and column are this thread's first ones plus compile-time offsets, so the
  // loop needs one base address and no division per piece.
  const int first_core = tid >> 3;
  const int row = (first_core / kPiecesPerRow) * 8 + (tid & 7);
  const int col = col0 + (first_core % kPiecesPerRow) * 8;
  const uint16_t* base = gmem + (int64_t(row0 + row) * row_stride + col);
#pragma unroll
  for (int i = 0; i < kPieces / kThreads; ++i) {
    const int pass_core = i * kCoresPerPass;
    const int row_offset = (pass_core / kPiecesPerRow) * 8;
    const int col_offset = (pass_core % kPiecesPerRow) * 8;
    int bytes = (col_limit - (col + col_offset)) * 2;
    bytes = bytes < 0 ? 0 : (bytes > 16 ? 16 : bytes);
    if (row0 + row + row_offset >= row_limit) bytes = 0;
    // A piece with no bytes to read still names a valid address (the matrix base).
    const uint16_t* src = bytes > 0 ? base + (int64_t(row_offset) * row_stride + col_offset) : gmem;
    cp_async_16(smem_tile + uint32_t(tid + i * kThreads) * 16u, src, bytes);
  }
}

// Byte offset of element (row, col) in an interleaved tile with kCols columns.
template <int kCols>
__device__ __forceinline__ uint32_t interleaved_offset(int row, int col) {
  return uint32_t(((row >> 3) * (kCols / 8) + (col >> 3)) * 128 + (row & 7) * 16 + (col & 7) * 2);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || !defined(__CUDA_ARCH__)

// Shared-memory matrix descriptor: start address, LBO and SBO in 16-byte units (bits 0-13, 16-29,
// 32-45), base offset 0 and swizzle mode 0 (bits 49-51, 62-63). Shared addresses are below 256 KiB,
// so 14 bits hold them.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return uint64_t((addr & 0x3FFFFu) >> 4) | (uint64_t(lbo_bytes >> 4) << 16) | (uint64_t(sbo_bytes >> 4) << 32);
}

// What a consumer of a kStages-deep cp.async ring does before wgmma reads job j's stage: waits for
// its own copies of job j, makes them and any shared memory it wrote since the last barrier visible
// to the async proxy that wgmma reads through, and meets the other threads at a barrier. Unlike
// ring_wait_and_refill the refill is the caller's: it issues job j's wgmma first, then refills a
// stage whose wgmma group every thread waited for before this barrier, while the tensor cores run.
// A consumer that waits for each group before the next barrier (kGroupsInFlight = 0) refills job
// j - 1's stage, so kStages - 2 newer copy groups stay in flight; one that leaves a group running
// across the barrier (kGroupsInFlight = 1: wgmma_wait<1>) can refill only job j - 2's, so the ring
// runs one job less far ahead and its prologue issues kStages - 2 jobs instead of kStages - 1.
template <int kStages, int kGroupsInFlight = 0>
__device__ __forceinline__ void ring_wait_for_wgmma() {
  static_assert(kGroupsInFlight >= 0 && kStages - 2 - kGroupsInFlight >= 0, "a stage per job in flight");
  cp_async_wait<kStages - 2 - kGroupsInFlight>();
  fence_proxy_async_smem();
  __syncthreads();
}


#endif  // sm_90a device pass, or the host pass

}  // namespace tiles
}  // namespace sketchcolor

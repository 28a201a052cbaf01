// The backward GEMMs of SCFT attention for sm_90a (H100, H200): scft_gemm_kernel's contract
// (scft_gemm.cuh: grouped problems, C_in, fp32 or input-dtype output, alpha, tails in m, n and k,
// B*H in grid.z) with the products on warpgroup MMA (wgmma.mma_async, HGMMA in SASS), which reads
// both operands straight from shared memory instead of through ldmatrix into registers.
//
// No torch header (see scft_attention_kernel.cu for why). The configuration is ScftGemmSm90Config
// in scft_attention.h; the shared-memory operand layout and the wgmma primitives are in
// common/wgmma.cuh; the design and its FLOP / byte counts in benchmarks/NOTES-cuda.md.
#include "scft_attention/scft_attention.h"

#include <cstdint>

#include "common/tile_mma.cuh"
#include "common/wgmma.cuh"
#include "scft_attention/scft_gemm.cuh"

namespace sketchcolor {
namespace scft {
namespace {

using namespace tiles;
using gemm::GemmBatch;

// C tile (kBlockM x kBlockN) = alpha * A B [+ C_in] over the problem's whole k, in kBlockK-deep
// tiles through a kStages cp.async ring in the interleaved layout. Warpgroup g multiplies rows
// [64 g, 64 g + 64) of the tile by all kBlockN columns. A k tile's step: barrier (its stage has
// landed and every warpgroup is done with tile kt - 2), issue its wgmma group, refill tile kt - 2's
// stage while the tensor cores run, then wait until only this group is in flight: the previous
// group's operands are free after the next barrier, and the tensor cores always have the next
// group queued behind the running one.
template <typename T, typename Cfg, bool kAKContig>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSm) scft_gemm_sm90_kernel(const GemmBatch batch) {
#if (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)) || defined(SKETCHCOLOR_CUDA_EMULATOR)
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kBlockK = Cfg::kBlockK;
  constexpr int kThreads = Cfg::kThreads, kStages = Cfg::kStages;
  constexpr int kGroupRows = kBlockM / Cfg::kWarpgroups;   // rows per warpgroup: the wgmma M
  constexpr int kRegs = kBlockN / 2;                       // 64 x kBlockN fp32 over 128 threads
  constexpr uint32_t kABytes = Cfg::kABytes, kStageBytes = Cfg::kStageBytes;
  // Descriptor strides of the interleaved tiles (common/wgmma.cuh); LBO steps along k, SBO along m
  // or n, both between 8 x 8 core matrices:
  //   A stored [m][k] (kAKContig: K-major), kBlockK columns: LBO = 128, SBO = kBlockK / 8 * 128;
  //   A stored [k][m] (MN-major, transposed read), kBlockM columns: LBO = kBlockM / 8 * 128, SBO = 128;
  //   B stored [k][n] (MN-major, transposed read), kBlockN columns: LBO = kBlockN / 8 * 128, SBO = 128.
  // So in every case a k16 step moves the start by 2 LBO, and warpgroup g's rows start 8 g SBO in.
  constexpr uint32_t kALbo = kAKContig ? 128u : uint32_t(kBlockM / 8 * 128);
  constexpr uint32_t kASbo = kAKContig ? uint32_t(kBlockK / 8 * 128) : 128u;
  constexpr uint32_t kBLbo = uint32_t(kBlockN / 8 * 128);
  constexpr uint32_t kBSbo = 128u;
  static_assert(kGroupRows == 64 && kThreads == Cfg::kWarpgroups * 128, "a warpgroup per 64 rows");
  static_assert(kBlockK % 16 == 0 && kABytes == kBlockM * kBlockK * 2, "k16 steps over 16-bit tiles");

  const gemm::GemmCta<kBlockM, kBlockN> cta(batch);
  const int m = cta.m, n = cta.n, kdim = cta.k;
  const int row0 = cta.row0, col0 = cta.col0;
  if (cta.empty()) return;   // uniform exit, before any barrier

  const uint16_t* a = cta.a_ptr();
  const int64_t a_stride_row = cta.a_stride_row();
  const uint16_t* bmat = cta.b_ptr();
  const int64_t b_stride_row = cta.b_stride_row();

  unsigned char* const smem = dynamic_smem();
  const uint32_t stage_base = smem_addr(smem);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warpgroup = tid >> 7;

  const int k_tiles = ceil_div(kdim, kBlockK);
  float acc[kRegs];
#pragma unroll
  for (int i = 0; i < kRegs; ++i) acc[i] = 0.f;

  // Copies k tile load_tile (A's and B's rows or columns [k0, k0 + kBlockK), zero past k, m and n)
  // into its stage and commits one cp.async group, an empty one past the last tile so that the
  // wait_group arithmetic stays uniform.
  int load_tile = 0;
  auto issue_next_tile = [&]() {
    if (load_tile < k_tiles) {
      const uint32_t stage = stage_base + uint32_t(load_tile % kStages) * kStageBytes;
      const int k0 = load_tile * kBlockK;
      if constexpr (kAKContig) {
        load_tile_interleaved_async<kBlockM, kBlockK, kThreads>(stage, a, a_stride_row, row0, m, k0, kdim, tid);
      } else {
        load_tile_interleaved_async<kBlockK, kBlockM, kThreads>(stage, a, a_stride_row, k0, kdim, row0, m, tid);
      }
      load_tile_interleaved_async<kBlockK, kBlockN, kThreads>(stage + kABytes, bmat, b_stride_row, k0, kdim, col0, n,
                                                              tid);
    }
    cp_async_commit();
    ++load_tile;
  };

  // One wgmma group stays in flight across each barrier, so the ring runs kStages - 2 tiles ahead.
#pragma unroll 1
  for (int i = 0; i < kStages - 2; ++i) issue_next_tile();

#pragma unroll 1
  for (int kt = 0; kt < k_tiles; ++kt) {
    ring_wait_for_wgmma<kStages, 1>();
    const uint32_t stage = stage_base + uint32_t(kt % kStages) * kStageBytes;
    const uint32_t a_tile = stage + uint32_t(warpgroup * 8) * kASbo;
    const uint32_t b_tile = stage + kABytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      wgmma_ss<T, kBlockN, !kAKContig, true>(acc, smem_desc(a_tile + uint32_t(2 * kk) * kALbo, kALbo, kASbo),
                                             smem_desc(b_tile + uint32_t(2 * kk) * kBLbo, kBLbo, kBSbo));
    }
    wgmma_commit();
    issue_next_tile();   // tile kt + kStages - 2 into the stage of tile kt - 2
    wgmma_wait<1>();     // tile kt - 1's group is done in this warpgroup
  }
  wgmma_wait<0>();
  fence_registers(acc);
  cp_async_wait<0>();

  // ---- epilogue: thread (warp w of the warpgroup, lane l) holds rows 16 w + l / 4 (+ 8) of its
  // warpgroup's 64, columns 8 j + 2 (l % 4) + {0, 1} of n8 block j (wgmma_ss) ----
  const gemm::GemmOutput out(cta);
  const int row_base = row0 + warpgroup * kGroupRows + ((tid >> 5) & 3) * 16 + (lane >> 2);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_base + half * 8;
    if (row >= m) continue;
    const int64_t row_offset = int64_t(row) * out.c_stride_row;
#pragma unroll
    for (int j = 0; j < kRegs / 4; ++j) {
      const int col = col0 + j * 8 + (lane & 3) * 2;
      out.store<T>(row_offset, col, n, acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
    }
  }
#elif defined(__CUDA_ARCH__)
  // Built for a target without wgmma; the backward launchers select this kernel only on 9.0 devices,
  // whose code in this build is sm_90a. Fail loudly rather than return without writing outputs.
  __trap();
#endif
}

}  // namespace

namespace gemm {

template <typename T, bool kAKContig>
cudaError_t launch_sm90(const GemmBatch& batch, int batch_heads, cudaStream_t stream) {
  using Cfg = ScftGemmSm90Config;
  return launch<Cfg>(scft_gemm_sm90_kernel<T, Cfg, kAKContig>, batch, batch_heads, stream);
}

template cudaError_t launch_sm90<__half, false>(const GemmBatch&, int, cudaStream_t);
template cudaError_t launch_sm90<__half, true>(const GemmBatch&, int, cudaStream_t);
template cudaError_t launch_sm90<__nv_bfloat16, false>(const GemmBatch&, int, cudaStream_t);
template cudaError_t launch_sm90<__nv_bfloat16, true>(const GemmBatch&, int, cudaStream_t);

}  // namespace gemm
}  // namespace scft
}  // namespace sketchcolor

// The SCFT attention forward for sm_90a (H100, H200): the algorithm of scft_attn_fwd_kernel
// (scft_attention_kernel.cu) with both products on warpgroup MMA (wgmma.mma_async, HGMMA in SASS),
// which reads its operands straight from shared memory instead of through ldmatrix into registers.
//
// No torch header (see scft_attention_kernel.cu for why). Configurations and the launcher
// declaration are in scft_attention.h; the shared-memory operand layout and the wgmma primitives in
// common/wgmma.cuh; the design and its FLOP / byte counts in benchmarks/NOTES-cuda.md.
#include "scft_attention/scft_attention.h"

#include <cstdint>

#include "common/tile_mma.cuh"
#include "common/wgmma.cuh"
#include "scft_attention/scft_attention_fwd.cuh"

namespace sketchcolor {
namespace scft {
namespace {

using namespace tiles;

// Grid, jobs and ring as in scft_attn_fwd_kernel (scft_attention_fwd.cuh: fwd::Cta,
// fwd::JobProducer with the interleaved layout).
// A job's step: barrier (its stage has landed), issue its wgmma group, refill the stage of the
// previous job while the tensor cores run, wait for the group. So the stage being refilled is never
// still read by the tensor cores, and the refill's address work overlaps the products.
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) scft_attn_fwd_sm90_kernel(const ScftAttnFwdParams p) {
#if (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)) || defined(SKETCHCOLOR_CUDA_EMULATOR)
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kBlockK = Cfg::kBlockK;
  constexpr int kBlockDv = Cfg::kBlockDv, kKeysPerVJob = Cfg::kKeysPerVJob;
  constexpr int kThreads = Cfg::kThreads, kStages = Cfg::kStages, kWarpgroups = Cfg::kWarpgroups;
  constexpr int kGroupKeys = kBlockN / kWarpgroups;     // S columns per warpgroup
  constexpr int kGroupCols = kBlockDv / kWarpgroups;    // O columns per warpgroup
  constexpr int kSRegs = kGroupKeys / 2;                // 64 x kGroupKeys fp32 over 128 threads
  constexpr int kORegs = kGroupCols / 2;
  constexpr int kVJobs = kBlockN / kKeysPerVJob;
  constexpr uint32_t kStageBytes = Cfg::kStageBytes;
  // Interleaved-layout strides (common/wgmma.cuh): q and k chunks have kBlockK columns, the P tile
  // kBlockN, the v chunk kBlockDv.
  constexpr uint32_t kQkRowCoreStride = kBlockK / 8 * 128;
  constexpr uint32_t kPRowCoreStride = kBlockN / 8 * 128;
  constexpr uint32_t kVRowCoreStride = kBlockDv / 8 * 128;
  static_assert(kBlockM == 64 && kWarpgroups == 2 && kThreads == 256, "two warpgroups over one wgmma M");
  static_assert(kBlockK % 16 == 0 && kKeysPerVJob % 16 == 0 && kBlockN % kKeysPerVJob == 0, "k16 steps");

  unsigned char* const smem = dynamic_smem();
  const uint32_t stage_base = smem_addr(smem);
  const uint32_t p_tile = stage_base + kStages * kStageBytes;
  unsigned char* p_tile_ptr = smem + kStages * kStageBytes;
  float* red_max = reinterpret_cast<float*>(smem + kStages * kStageBytes + kBlockM * kBlockN * 2);
  float* red_sum = red_max + kWarpgroups * kBlockM;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warpgroup = tid >> 7;
  const int group = lane >> 2;      // fragment row within 8
  const int quad_lane = lane & 3;   // fragment column pair
  // This thread's two fragment rows (row_of[0] and row_of[0] + 8) of the CTA's 64.
  const int row_of[2] = {((tid >> 5) & 3) * 16 + group, ((tid >> 5) & 3) * 16 + group + 8};

  const fwd::Cta<Cfg> cta(p);
  fwd::JobProducer<Cfg, true> producer(p, cta, stage_base, kStageBytes, tid);
  const int n_keys = p.n_keys, n_queries = p.n_queries;
  const int qk_jobs = producer.qk_jobs;
  const int key_tiles = ceil_div(n_keys, kBlockN);
  const float scale_log2 = p.scale * kLog2e;   // softmax in base 2: exp(x) = exp2(x log2 e)

  // Register state: S (this warpgroup's 64 x kGroupKeys scores of the current key tile) and O
  // (64 x kGroupCols, fp32, the whole kernel), both in the wgmma accumulator layout; row statistics
  // for the thread's two rows. row_max is the same in both warpgroups; row_sum covers this thread's
  // key columns only and is reduced at the end.
  float acc_s[kSRegs];
  float acc_o[kORegs];
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < kORegs; ++i) acc_o[i] = 0.f;

#pragma unroll 1
  for (int i = 0; i < kStages - 1; ++i) producer.issue_next();

  int job = 0;
#pragma unroll 1
  for (int tile = 0; tile < key_tiles; ++tile) {
#pragma unroll
    for (int i = 0; i < kSRegs; ++i) acc_s[i] = 0.f;
#pragma unroll 1
    for (int step = 0; step < qk_jobs; ++step, ++job) {
      ring_wait_for_wgmma<kStages>();
      // ---- S += q_chunk k_chunk^T: A = the q chunk (64 x kBlockK), B = this warpgroup's 64 keys of
      // the k chunk; both K-major. A k16 step moves two cores along K (256 bytes). ----
      const uint32_t q_tile = stage_base + uint32_t(job % kStages) * kStageBytes;
      const uint32_t k_tile = q_tile + kBlockM * kBlockK * 2 + uint32_t(warpgroup * (kGroupKeys / 8)) * kQkRowCoreStride;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockK / 16; ++kk) {
        wgmma_ss<T, kGroupKeys, false, false>(acc_s, smem_desc(q_tile + kk * 256u, 128u, kQkRowCoreStride),
                                       smem_desc(k_tile + kk * 256u, 128u, kQkRowCoreStride));
      }
      wgmma_commit();
      producer.issue_next();
      wgmma_wait<0>();
      fence_registers(acc_s);
    }

    // ---- online softmax step for key tile `tile` ----
    {
      // Scale into base 2 and mask keys >= M with -inf (they get probability exactly 0).
      const int key_base = tile * kBlockN + warpgroup * kGroupKeys + quad_lane * 2;
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < kSRegs; ++i) {
        const int key = key_base + (i >> 2) * 8 + (i & 1);
        const float s = key < n_keys ? acc_s[i] * scale_log2 : -INFINITY;
        acc_s[i] = s;
        tile_max[(i >> 1) & 1] = fmaxf(tile_max[(i >> 1) & 1], s);
      }
      // Row max across the quad, then across the two warpgroups through shared memory. red_max was
      // last read in the previous tile's softmax step; the job barriers since then order this
      // write after those reads.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float x = tile_max[half];
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
        if (quad_lane == 0) red_max[warpgroup * kBlockM + row_of[half]] = x;
      }
      __syncthreads();
      float alpha[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float x = fmaxf(red_max[row_of[half]], red_max[kBlockM + row_of[half]]);
        // Key tile `tile` has at least one key < M, so m_new is finite and alpha = exp2(-inf) = 0
        // on the first tile.
        const float m_new = fmaxf(row_max[half], x);
        alpha[half] = exp2f(row_max[half] - m_new);
        row_max[half] = m_new;
        row_sum[half] *= alpha[half];
      }
#pragma unroll
      for (int i = 0; i < kORegs; ++i) acc_o[i] *= alpha[(i >> 1) & 1];
      // P = exp2(S' - m) in the input dtype into the interleaved P tile (K-major A operand of the
      // V jobs). A quad writes 16 contiguous bytes of one core row, a warp one whole core matrix per
      // n8 block: no bank conflicts. The last V job of the previous tile finished reading the tile
      // (its wgmma group was waited for) before this tile's QK-job barriers; the first V job's
      // proxy fence and barrier publish the new values to wgmma.
#pragma unroll
      for (int j = 0; j < kSRegs / 4; ++j) {
        const int col = warpgroup * kGroupKeys + j * 8 + quad_lane * 2;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float p0 = exp2f(acc_s[4 * j + 2 * half] - row_max[half]);
          const float p1 = exp2f(acc_s[4 * j + 2 * half + 1] - row_max[half]);
          row_sum[half] += p0 + p1;
          store_vector(reinterpret_cast<uint32_t*>(p_tile_ptr + interleaved_offset<kBlockN>(row_of[half], col)),
                       Elem<T>::pack(p0, p1));
        }
      }
    }

#pragma unroll 1
    for (int v_step = 0; v_step < kVJobs; ++v_step, ++job) {
      ring_wait_for_wgmma<kStages>();
      // ---- O += P[:, keys of this job] v_chunk[:, this warpgroup's columns]: A = P (K-major, a
      // k16 step moves two cores along the keys), B = the v chunk (MN-major, transposed read; a
      // k16 step moves two core rows, 16 keys). ----
      const uint32_t v_tile = stage_base + uint32_t(job % kStages) * kStageBytes + uint32_t(warpgroup * (kGroupCols / 8)) * 128u;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kKeysPerVJob / 16; ++kk) {
        const uint32_t p_cols = p_tile + uint32_t((v_step * kKeysPerVJob + kk * 16) / 8) * 128u;
        wgmma_ss<T, kGroupCols, false, true>(acc_o, smem_desc(p_cols, 128u, kPRowCoreStride),
                                      smem_desc(v_tile + uint32_t(kk * 2) * kVRowCoreStride, kVRowCoreStride, 128u));
      }
      wgmma_commit();
      producer.issue_next();
      wgmma_wait<0>();
      fence_registers(acc_o);
    }
  }
  cp_async_wait<0>();

  // ---- epilogue: total row sums across the two warpgroups, O / l, LSE ----
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float x = row_sum[half];
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    if (quad_lane == 0) red_sum[warpgroup * kBlockM + row_of[half]] = x;
  }
  __syncthreads();

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = cta.m0 + row_of[half];
    // total >= 1: the row's maximal key contributes exp2(0).
    const float total = red_sum[row_of[half]] + red_sum[kBlockM + row_of[half]];
    if (row < n_queries) {
      const float inv_total = 1.f / total;
#pragma unroll
      for (int j = 0; j < kORegs / 4; ++j) {
        const int col = cta.dv0 + warpgroup * kGroupCols + j * 8 + quad_lane * 2;
        fwd::store_output_pair<T>(p, cta.bh, row, col, acc_o[4 * j + 2 * half] * inv_total,
                                  acc_o[4 * j + 2 * half + 1] * inv_total);
      }
      if (blockIdx.y == 0 && warpgroup == 0 && quad_lane == 0) {
        p.lse[int64_t(cta.bh) * n_queries + row] = row_max[half] * kLn2 + logf(total);
      }
    }
  }
#elif defined(__CUDA_ARCH__)
  // Built for a target without wgmma; scft_attn_fwd_cuda selects this kernel only on 9.0 devices,
  // whose code in this build is sm_90a. Fail loudly rather than return without writing outputs.
  __trap();
#endif
}

template <typename T>
cudaError_t fwd_sm90_dispatch(const ScftAttnFwdParams& p, cudaStream_t stream) {
  using Dv128 = ScftFwdSm90ConfigDv128;
  using Dv256 = ScftFwdSm90ConfigDv256;
  using Dv512 = ScftFwdSm90ConfigDv512;
  if (p.value_dim <= 128) return fwd::launch<Dv128>(scft_attn_fwd_sm90_kernel<T, Dv128>, p, stream);
  if (p.value_dim <= 256) return fwd::launch<Dv256>(scft_attn_fwd_sm90_kernel<T, Dv256>, p, stream);
  return fwd::launch<Dv512>(scft_attn_fwd_sm90_kernel<T, Dv512>, p, stream);
}

}  // namespace

cudaError_t scft_attn_fwd_sm90_cuda(const ScftAttnFwdParams& p, ScftDtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case ScftDtype::kFloat16:
      return fwd_sm90_dispatch<__half>(p, stream);
    case ScftDtype::kBFloat16:
      return fwd_sm90_dispatch<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace scft
}  // namespace sketchcolor

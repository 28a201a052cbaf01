// What the two forward kernels of SCFT attention share (scft_attn_fwd_kernel on mma.sync,
// scft_attn_fwd_sm90_kernel on wgmma): the CTA's operands, the job schedule that fills the stage
// ring, the output stores and the launch. They differ in how the tiles are laid out in shared
// memory and how the products and the softmax step read them.
//
// Device code and the CUDA runtime only, no torch header (see scft_attention_kernel.cu).
#pragma once

#include <cstdint>

#include "common/tile_mma.cuh"
#include "common/wgmma.cuh"
#include "scft_attention/scft_attention.h"

namespace sketchcolor {
namespace scft {
namespace fwd {

using tiles::ceil_div;

// The CTA's operand bases and output block. Grid (ceil(N / kBlockM), ceil(Dv / kBlockDv), B*H):
// blockIdx.x is fastest, so the CTAs resident at one time share the same key/value tiles in L2.
template <typename Cfg>
struct Cta {
  const uint16_t* q;   // q[b, h]: (N, D) rows, row pitch p.q_stride_row
  const uint16_t* k;   // k[b, h]: (M, D)
  const uint16_t* v;   // v[b, h]: (M, Dv)
  int m0;              // first query row of the block
  int dv0;             // first output column of the Dv slice
  int bh;              // b * H + h

  __device__ __forceinline__ explicit Cta(const ScftAttnFwdParams& p)
      : m0(blockIdx.x * Cfg::kBlockM), dv0(blockIdx.y * Cfg::kBlockDv), bh(blockIdx.z) {
    const int b = bh / p.heads;
    const int h = bh - b * p.heads;
    q = static_cast<const uint16_t*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
    k = static_cast<const uint16_t*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
    v = static_cast<const uint16_t*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
  }
};

// The CTA's jobs, in order: per key tile of kBlockN keys, qk_jobs "QK jobs" (a kBlockM x kBlockK
// q chunk and a kBlockN x kBlockK k chunk of the same D columns) then kBlockN / kKeysPerVJob
// "V jobs" (kKeysPerVJob value rows of the CTA's Dv slice). issue_next() copies the next job into
// stage (job % kStages) and commits one cp.async group, an empty one past the last job so that
// the consumers' wait_group arithmetic stays uniform. kInterleaved picks the wgmma operand layout
// (common/wgmma.cuh) over padded rows (pitches kQkStride / kVStride).
template <typename Cfg, bool kInterleaved>
struct JobProducer {
  static constexpr int kVJobs = Cfg::kBlockN / Cfg::kKeysPerVJob;

  const ScftAttnFwdParams& p;
  const Cta<Cfg>& cta;
  uint32_t stage_base;   // shared address of stage 0
  uint32_t stage_bytes;
  int qk_jobs;           // ceil(D / kBlockK)
  int jobs_per_tile;     // qk_jobs + kVJobs
  int total_jobs;        // key tiles x jobs_per_tile
  int tid;
  int load_job = 0, load_tile = 0, load_step = 0;

  __device__ __forceinline__ JobProducer(const ScftAttnFwdParams& params, const Cta<Cfg>& c, uint32_t base,
                                         uint32_t bytes, int thread)
      : p(params), cta(c), stage_base(base), stage_bytes(bytes), qk_jobs(ceil_div(params.head_dim, Cfg::kBlockK)),
        jobs_per_tile(qk_jobs + kVJobs), total_jobs(ceil_div(params.n_keys, Cfg::kBlockN) * jobs_per_tile),
        tid(thread) {}

  __device__ __forceinline__ void issue_next() {
    constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kBlockK = Cfg::kBlockK;
    constexpr int kThreads = Cfg::kThreads;
    if (load_job < total_jobs) {
      const uint32_t stage = stage_base + uint32_t(load_job % Cfg::kStages) * stage_bytes;
      const int key0 = load_tile * kBlockN;
      if (load_step < qk_jobs) {
        const int d0 = load_step * kBlockK;
        if constexpr (kInterleaved) {
          tiles::load_tile_interleaved_async<kBlockM, kBlockK, kThreads>(stage, cta.q, p.q_stride_row, cta.m0,
                                                                         p.n_queries, d0, p.head_dim, tid);
          tiles::load_tile_interleaved_async<kBlockN, kBlockK, kThreads>(
              stage + kBlockM * kBlockK * 2, cta.k, p.k_stride_row, key0, p.n_keys, d0, p.head_dim, tid);
        } else {
          tiles::load_tile_async<kBlockM, kBlockK, kThreads>(stage, Cfg::kQkStride, cta.q, p.q_stride_row, cta.m0,
                                                             p.n_queries, d0, p.head_dim, tid);
          tiles::load_tile_async<kBlockN, kBlockK, kThreads>(stage + kBlockM * Cfg::kQkStride * 2, Cfg::kQkStride,
                                                             cta.k, p.k_stride_row, key0, p.n_keys, d0, p.head_dim,
                                                             tid);
        }
      } else {
        const int v_row0 = key0 + (load_step - qk_jobs) * Cfg::kKeysPerVJob;
        if constexpr (kInterleaved) {
          tiles::load_tile_interleaved_async<Cfg::kKeysPerVJob, Cfg::kBlockDv, kThreads>(
              stage, cta.v, p.v_stride_row, v_row0, p.n_keys, cta.dv0, p.value_dim, tid);
        } else {
          tiles::load_tile_async<Cfg::kKeysPerVJob, Cfg::kBlockDv, kThreads>(
              stage, Cfg::kVStride, cta.v, p.v_stride_row, v_row0, p.n_keys, cta.dv0, p.value_dim, tid);
        }
      }
      if (++load_step == jobs_per_tile) {
        load_step = 0;
        ++load_tile;
      }
    }
    tiles::cp_async_commit();
    ++load_job;
  }
};

// Columns col, col + 1 of output row `row` (of the CTA's head bh): out in the input dtype, or
// out_f32 when the caller asked for the unrounded output. Columns >= Dv are dropped.
template <typename T>
__device__ __forceinline__ void store_output_pair(const ScftAttnFwdParams& p, int bh, int row, int col, float o0,
                                                  float o1) {
  const int64_t row_offset = (int64_t(bh) * p.n_queries + row) * p.value_dim;
  if (p.out_f32 != nullptr) {
    float* out_row = p.out_f32 + row_offset;
    if (col < p.value_dim) out_row[col] = o0;
    if (col + 1 < p.value_dim) out_row[col + 1] = o1;
  } else {
    tiles::store_pair<T>(static_cast<uint16_t*>(p.out) + row_offset, col, p.value_dim, (p.value_dim % 2) == 0, o0,
                         o1);
  }
}

// Launches a forward kernel over its configuration's grid after raising its shared-memory limit.
template <typename Cfg, typename Kernel>
cudaError_t launch(Kernel kernel, const ScftAttnFwdParams& p, cudaStream_t stream) {
  cudaError_t err = tiles::prepare_smem(kernel, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(p.n_queries, Cfg::kBlockM), ceil_div(p.value_dim, Cfg::kBlockDv), p.batch * p.heads);
  return tiles::launch_kernel(kernel, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p);
}

}  // namespace fwd
}  // namespace scft
}  // namespace sketchcolor

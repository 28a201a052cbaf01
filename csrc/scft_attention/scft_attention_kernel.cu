// CUDA kernels and launchers of SCFT attention (fp16 / bf16, tensor cores via mma.sync).
//
// No torch header: nvcc compiles this file on any machine, and the compile test checks its
// register, spill and shared-memory report and its SASS without a GPU. Shapes, strides and the
// tile configurations are documented in scft_attention.h; the design and its FLOP / byte counts
// are in benchmarks/NOTES-cuda.md.
//
// Kernels:
//   scft_attn_fwd_kernel        fused forward: S = q k^T over D in chunks, online softmax, O += P v
//                               for one Dv slice per CTA, LSE out
//   scft_attn_bwd_delta_kernel  Delta_i = sum_c dO[i, c] * O[i, c]
//   scft_attn_bwd_probs_kernel  per key chunk: P = exp(scale S - lse), dS = P * (dO v^T - Delta)
//   scft_gemm_kernel            the backward's products over the chunk workspaces:
//                               dV = P^T dO, dK = scale dS^T q (one grouped launch), dQ += scale dS k
//
// Matrix products use mma.sync.m16n8k16 with fp32 accumulators (HMMA in SASS), operands fed by
// ldmatrix from shared memory that cp.async fills several stages ahead. On compute capability 9.0
// the forward and the backward GEMMs run the wgmma kernels of scft_attention_fwd_sm90_kernel.cu and
// scft_gemm_sm90_kernel.cu instead (scft_mma_choice in scft_attention.h).
#include "scft_attention/scft_attention.h"

#include <cstdint>

#include "common/tile_mma.cuh"
#include "scft_attention/scft_attention_fwd.cuh"
#include "scft_attention/scft_gemm.cuh"

namespace sketchcolor {
namespace scft {
namespace {

using namespace tiles;
using gemm::GemmBatch;
using gemm::GemmOperand;
using gemm::GemmProblem;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// Forward.
//
// Grid and jobs: scft_attention_fwd.cuh (fwd::Cta, fwd::JobProducer). All jobs flow through one
// ring of kStages stage buffers, so loads for the next key tile's QK jobs are in flight while this
// tile's V jobs run.
// q is re-streamed per key tile instead of staying resident: 64 x 1024 bf16 q rows are 128 KiB,
// which with the stage ring would not fit sm_80's 163 KiB.
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) scft_attn_fwd_kernel(const ScftAttnFwdParams p) {
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kBlockK = Cfg::kBlockK;
  constexpr int kBlockDv = Cfg::kBlockDv, kKeysPerVJob = Cfg::kKeysPerVJob;
  constexpr int kThreads = Cfg::kThreads, kStages = Cfg::kStages, kWarpsN = Cfg::kWarpsN;
  constexpr int kWarpRows = kBlockM / Cfg::kWarpsM;       // query rows per warp (S and O)
  constexpr int kWarpKeys = kBlockN / kWarpsN;            // S columns per warp
  constexpr int kWarpCols = kBlockDv / kWarpsN;           // O columns per warp
  constexpr int kMt = kWarpRows / 16, kNtS = kWarpKeys / 8, kNtO = kWarpCols / 8;
  constexpr int kVJobs = kBlockN / kKeysPerVJob;
  constexpr uint32_t kStageBytes = Cfg::kStageElems * 2;
  static_assert(kWarpRows % 16 == 0 && kWarpKeys % 16 == 0 && kWarpCols % 16 == 0, "warp tiles are 16-aligned");
  static_assert(kBlockK % 16 == 0 && kKeysPerVJob % 16 == 0 && kBlockN % kKeysPerVJob == 0, "k16 steps");
  static_assert(Cfg::kWarpsM * kWarpsN * 32 == kThreads, "thread count");

  unsigned char* const smem = dynamic_smem();
  const uint32_t stage_base = smem_addr(smem);
  const uint32_t p_tile = stage_base + kStages * kStageBytes;
  uint16_t* p_tile_ptr = reinterpret_cast<uint16_t*>(smem + kStages * kStageBytes);
  float* red_max = reinterpret_cast<float*>(smem + kStages * kStageBytes + kBlockM * Cfg::kPStride * 2);
  float* red_sum = red_max + kWarpsN * kBlockM;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / kWarpsN;
  const int warp_n = warp % kWarpsN;
  const int group = lane >> 2;      // fragment row within 8
  const int quad_lane = lane & 3;   // fragment column pair

  const fwd::Cta<Cfg> cta(p);
  fwd::JobProducer<Cfg, false> producer(p, cta, stage_base, kStageBytes, tid);
  auto issue_next_job = [&]() { producer.issue_next(); };
  const int n_keys = p.n_keys, n_queries = p.n_queries;
  const int qk_jobs = producer.qk_jobs;
  const int key_tiles = ceil_div(n_keys, kBlockN);
  const float scale_log2 = p.scale * kLog2e;   // softmax in base 2: exp(x) = exp2(x log2 e)

  // Register state. S (this warp's kWarpRows x kWarpKeys scores of the current key tile) lives
  // only through the QK jobs and the softmax step; O (kWarpRows x kWarpCols, fp32) for the whole
  // kernel. Row statistics are per (m tile, row half): rows group and group + 8.
  float acc_s[kMt][kNtS][4];
  float acc_o[kMt][kNtO][4];
  float row_max[kMt][2];   // running max of scale*log2e*S over keys seen (identical in all warps)
  float row_sum[kMt][2];   // running sum of exp2(S' - row_max) over this warp's key columns
  zero_acc(acc_o);
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt) {
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

#pragma unroll 1
  for (int i = 0; i < kStages - 1; ++i) issue_next_job();

  // Consumer. The loop nest mirrors the job order: per key tile, QK jobs, the softmax step, V jobs.
  // Written as nested loops (not one flat job loop) so that the compiler sees S dead during the
  // V jobs and O's 4 * kNtO * kMt registers do not have to coexist with S there.
  int job = 0;
#pragma unroll 1
  for (int tile = 0; tile < key_tiles; ++tile) {
    zero_acc(acc_s);
#pragma unroll 1
    for (int step = 0; step < qk_jobs; ++step, ++job) {
      ring_wait_and_refill<kStages>(issue_next_job);
      // ---- S += q_chunk k_chunk^T ----
      const uint32_t q_tile = stage_base + uint32_t(job % kStages) * kStageBytes;
      const uint32_t k_tile = q_tile + kBlockM * Cfg::kQkStride * 2;
      warp_mma_chunk_nk<T, kMt, kNtS, kBlockK>(acc_s, q_tile, Cfg::kQkStride, warp_m * kWarpRows, k_tile,
                                               Cfg::kQkStride, warp_n * kWarpKeys, lane);
    }

    // ---- online softmax step for key tile `tile` ----
    // Scale into base 2 and mask keys >= M with -inf (they get probability exactly 0).
    {
      const int key_base = tile * kBlockN + warp_n * kWarpKeys + quad_lane * 2;
      float tile_max[kMt][2];
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) {
        tile_max[mt][0] = tile_max[mt][1] = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNtS; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = key_base + nt * 8 + (e & 1);
            const float s = key < n_keys ? acc_s[mt][nt][e] * scale_log2 : -INFINITY;
            acc_s[mt][nt][e] = s;
            tile_max[mt][e >> 1] = fmaxf(tile_max[mt][e >> 1], s);
          }
      }
      // Row max across the quad (the 4 lanes holding one row), then across the kWarpsN warps
      // that share the row, through shared memory. red_max was last read in the previous tile's
      // softmax step, and the V-job barriers since then order this write after those reads.
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float x = tile_max[mt][half];
          x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
          x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
          if (quad_lane == 0) red_max[warp_n * kBlockM + warp_m * kWarpRows + mt * 16 + half * 8 + group] = x;
        }
      __syncthreads();
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = warp_m * kWarpRows + mt * 16 + half * 8 + group;
          float x = red_max[row];
#pragma unroll
          for (int wn = 1; wn < kWarpsN; ++wn) x = fmaxf(x, red_max[wn * kBlockM + row]);
          // Key tile `tile` has at least one key < M, so x and m_new are finite and
          // alpha = exp2(-inf) = 0 on the first tile.
          const float m_new = fmaxf(row_max[mt][half], x);
          const float alpha = exp2f(row_max[mt][half] - m_new);
          row_max[mt][half] = m_new;
          row_sum[mt][half] *= alpha;
#pragma unroll
          for (int nt = 0; nt < kNtO; ++nt) {
            acc_o[mt][nt][2 * half] *= alpha;
            acc_o[mt][nt][2 * half + 1] *= alpha;
          }
        }
      // P = exp2(S' - m) in the input dtype into the probability tile. The last V job of the
      // previous tile read it before the QK-job barriers of this tile; the first V job's barrier
      // below publishes the new values.
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNtS; ++nt) {
          const float p0 = exp2f(acc_s[mt][nt][0] - row_max[mt][0]);
          const float p1 = exp2f(acc_s[mt][nt][1] - row_max[mt][0]);
          const float p2 = exp2f(acc_s[mt][nt][2] - row_max[mt][1]);
          const float p3 = exp2f(acc_s[mt][nt][3] - row_max[mt][1]);
          row_sum[mt][0] += p0 + p1;
          row_sum[mt][1] += p2 + p3;
          const int row = warp_m * kWarpRows + mt * 16 + group;
          const int col = warp_n * kWarpKeys + nt * 8 + quad_lane * 2;
          store_vector(reinterpret_cast<uint32_t*>(p_tile_ptr + row * Cfg::kPStride + col), Elem<T>::pack(p0, p1));
          store_vector(reinterpret_cast<uint32_t*>(p_tile_ptr + (row + 8) * Cfg::kPStride + col), Elem<T>::pack(p2, p3));
        }
    }

#pragma unroll 1
    for (int v_step = 0; v_step < kVJobs; ++v_step, ++job) {
      ring_wait_and_refill<kStages>(issue_next_job);
      // ---- O += P[:, keys of this job] v_chunk ----
      // A = the probability tile's columns [p_col0, p_col0 + kKeysPerVJob) (base address moved to
      // column p_col0, 64-byte aligned), B = rows [0, kKeysPerVJob) of the v chunk in this stage.
      const uint32_t v_tile = stage_base + uint32_t(job % kStages) * kStageBytes;
      const uint32_t p_cols = p_tile + uint32_t(v_step * kKeysPerVJob) * 2u;
#pragma unroll
      for (int kk = 0; kk < kKeysPerVJob; kk += 16) {
        warp_mma_k16_kn<T, kMt, kNtO, true>(acc_o, p_cols, Cfg::kPStride, warp_m * kWarpRows, v_tile, Cfg::kVStride,
                                            warp_n * kWarpCols, kk, lane);
      }
    }
  }
  cp_async_wait<0>();

  // ---- epilogue: total row sums across warps, O / l, LSE ----
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float x = row_sum[mt][half];
      x += __shfl_xor_sync(0xffffffffu, x, 1);
      x += __shfl_xor_sync(0xffffffffu, x, 2);
      if (quad_lane == 0) red_sum[warp_n * kBlockM + warp_m * kWarpRows + mt * 16 + half * 8 + group] = x;
    }
  __syncthreads();

#pragma unroll
  for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row_local = warp_m * kWarpRows + mt * 16 + half * 8 + group;
      const int row = cta.m0 + row_local;
      float total = red_sum[row_local];
#pragma unroll
      for (int wn = 1; wn < kWarpsN; ++wn) total += red_sum[wn * kBlockM + row_local];
      if (row < n_queries) {
        // total >= 1: the row's maximal key contributes exp2(0).
        const float inv_total = 1.f / total;
#pragma unroll
        for (int nt = 0; nt < kNtO; ++nt) {
          const int col = cta.dv0 + warp_n * kWarpCols + nt * 8 + quad_lane * 2;
          fwd::store_output_pair<T>(p, cta.bh, row, col, acc_o[mt][nt][2 * half] * inv_total,
                                    acc_o[mt][nt][2 * half + 1] * inv_total);
        }
        if (blockIdx.y == 0 && warp_n == 0 && quad_lane == 0) {
          p.lse[int64_t(cta.bh) * n_queries + row] = row_max[mt][half] * kLn2 + logf(total);
        }
      }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward: Delta_i = sum_c dO[i, c] * O[i, c], one warp per query row, 16-byte loads.
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) scft_attn_bwd_delta_kernel(const ScftAttnBwdParams p) {
  constexpr int kWarpsPerBlock = Cfg::kThreads / 32;
  const int lane = threadIdx.x & 31;
  const int64_t row_id = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t total_rows = int64_t(p.batch) * p.heads * p.n_queries;
  if (row_id >= total_rows) return;
  const int64_t bh = row_id / p.n_queries;
  const int i = int(row_id - bh * p.n_queries);
  const int b = int(bh / p.heads);
  const int h = int(bh - int64_t(b) * p.heads);
  const uint16_t* o = static_cast<const uint16_t*>(p.out) + b * p.out_stride_b + h * p.out_stride_h +
                      int64_t(i) * p.out_stride_row;
  const uint16_t* go = static_cast<const uint16_t*>(p.grad_out) + b * p.grad_out_stride_b +
                       h * p.grad_out_stride_h + int64_t(i) * p.grad_out_stride_row;
  const float acc = warp_row_dot<T>(o, go, p.value_dim, lane);
  if (lane == 0) p.delta[row_id] = acc;
}

// ---------------------------------------------------------------------------------------------
// Backward: P and dS for the keys [key_begin, key_end) of one chunk.
//
// Grid (ceil((key_end - key_begin) / kBlockN), ceil(N / kBlockM), B*H). Jobs: ceil(D / kBlockK)
// chunks of (q, k) accumulating S, then ceil(Dv / kBlockK) chunks of (dO, v) accumulating dP,
// all through one stage ring. The two 128x128 fp32 accumulators are split over 8 warps (64 + 64
// registers per thread). P and dS are written in the input dtype: the GEMMs that consume them
// take 16-bit operands, exactly like the P tile of the forward.
template <typename T, typename Cfg, bool kWithDScores>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    scft_attn_bwd_probs_kernel(const ScftAttnBwdParams p, const int key_begin, const int key_end) {
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kBlockK = Cfg::kBlockK;
  constexpr int kThreads = Cfg::kThreads, kStages = Cfg::kStages, kWarpsN = Cfg::kWarpsN;
  constexpr int kWarpRows = kBlockM / Cfg::kWarpsM, kWarpKeys = kBlockN / kWarpsN;
  constexpr int kMt = kWarpRows / 16, kNt = kWarpKeys / 8;
  constexpr uint32_t kStageBytes = Cfg::kStageElems * 2;
  static_assert(kWarpRows % 16 == 0 && kWarpKeys % 16 == 0 && kBlockK % 16 == 0, "warp tiles are 16-aligned");

  unsigned char* const smem = dynamic_smem();
  const uint32_t stage_base = smem_addr(smem);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / kWarpsN;
  const int warp_n = warp % kWarpsN;
  const int group = lane >> 2;
  const int quad_lane = lane & 3;

  const int n_queries = p.n_queries, head_dim = p.head_dim, value_dim = p.value_dim;
  const int n0 = key_begin + blockIdx.x * kBlockN;   // first key of this tile
  const int m0 = blockIdx.y * kBlockM;
  const int bh = blockIdx.z;
  const int b = bh / p.heads;
  const int h = bh - b * p.heads;
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
  const uint16_t* go =
      static_cast<const uint16_t*>(p.grad_out) + b * p.grad_out_stride_b + h * p.grad_out_stride_h;

  const int s_jobs = ceil_div(head_dim, kBlockK);
  const int total_jobs = s_jobs + (kWithDScores ? ceil_div(value_dim, kBlockK) : 0);

  float acc_s[kMt][kNt][4];    // q k^T
  float acc_dp[kMt][kNt][4];   // dO v^T
  zero_acc(acc_s);
  zero_acc(acc_dp);

  int load_job = 0;
  auto issue_next_job = [&]() {
    if (load_job < total_jobs) {
      const uint32_t stage = stage_base + uint32_t(load_job % kStages) * kStageBytes;
      const uint32_t b_tile = stage + kBlockM * Cfg::kStride * 2;
      if (load_job < s_jobs) {
        const int d0 = load_job * kBlockK;
        load_tile_async<kBlockM, kBlockK, kThreads>(stage, Cfg::kStride, q, p.q_stride_row, m0, n_queries, d0,
                                                    head_dim, tid);
        load_tile_async<kBlockN, kBlockK, kThreads>(b_tile, Cfg::kStride, k, p.k_stride_row, n0, key_end, d0,
                                                    head_dim, tid);
      } else {
        const int c0 = (load_job - s_jobs) * kBlockK;
        load_tile_async<kBlockM, kBlockK, kThreads>(stage, Cfg::kStride, go, p.grad_out_stride_row, m0, n_queries,
                                                    c0, value_dim, tid);
        load_tile_async<kBlockN, kBlockK, kThreads>(b_tile, Cfg::kStride, v, p.v_stride_row, n0, key_end, c0,
                                                    value_dim, tid);
      }
    }
    cp_async_commit();
    ++load_job;
  };

#pragma unroll 1
  for (int i = 0; i < kStages - 1; ++i) issue_next_job();

#pragma unroll 1
  for (int job = 0; job < total_jobs; ++job) {
    ring_wait_and_refill<kStages>(issue_next_job);
    const uint32_t stage = stage_base + uint32_t(job % kStages) * kStageBytes;
    const uint32_t b_tile = stage + kBlockM * Cfg::kStride * 2;
    if (!kWithDScores || job < s_jobs) {
      warp_mma_chunk_nk<T, kMt, kNt, kBlockK>(acc_s, stage, Cfg::kStride, warp_m * kWarpRows, b_tile, Cfg::kStride,
                                              warp_n * kWarpKeys, lane);
    } else {
      warp_mma_chunk_nk<T, kMt, kNt, kBlockK>(acc_dp, stage, Cfg::kStride, warp_m * kWarpRows, b_tile, Cfg::kStride,
                                              warp_n * kWarpKeys, lane);
    }
  }
  cp_async_wait<0>();

  // ---- epilogue: P = exp2(S * scale log2e - lse log2e), dS = P (dP - Delta) ----
  const float scale_log2 = p.scale * kLog2e;
  const int64_t chunk = p.key_chunk;
  uint16_t* probs = static_cast<uint16_t*>(p.probs) + int64_t(bh) * n_queries * chunk;
  uint16_t* dscores = static_cast<uint16_t*>(p.dscores) + int64_t(bh) * n_queries * chunk;
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp_m * kWarpRows + mt * 16 + half * 8 + group;
      if (row < n_queries) {
        const float lse_log2 = p.lse[int64_t(bh) * n_queries + row] * kLog2e;
        const float delta = kWithDScores ? p.delta[int64_t(bh) * n_queries + row] : 0.f;
        uint16_t* p_row = probs + int64_t(row) * chunk;
        uint16_t* ds_row = dscores + int64_t(row) * chunk;
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt) {
          const int key = n0 + warp_n * kWarpKeys + nt * 8 + quad_lane * 2;
          const float p0 = exp2f(acc_s[mt][nt][2 * half] * scale_log2 - lse_log2);
          const float p1 = exp2f(acc_s[mt][nt][2 * half + 1] * scale_log2 - lse_log2);
          // Chunk-local column; key_chunk and key_begin are even, so pairs are 4-byte aligned.
          const int col = key - key_begin;
          const int col_limit = key_end - key_begin;
          store_pair<T>(p_row, col, col_limit, true, p0, p1);
          if (kWithDScores) {
            const float ds0 = p0 * (acc_dp[mt][nt][2 * half] - delta);
            const float ds1 = p1 * (acc_dp[mt][nt][2 * half + 1] - delta);
            store_pair<T>(ds_row, col, col_limit, true, ds0, ds1);
          }
        }
      }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward GEMMs: the problems, the CTA's tile and the output store are in scft_gemm.cuh.

template <typename T, typename Cfg, bool kAKContig>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSm) scft_gemm_kernel(const GemmBatch batch) {
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kBlockK = Cfg::kBlockK;
  constexpr int kThreads = Cfg::kThreads, kStages = Cfg::kStages, kWarpsN = Cfg::kWarpsN;
  constexpr int kWarpRows = kBlockM / Cfg::kWarpsM, kWarpCols = kBlockN / kWarpsN;
  constexpr int kMt = kWarpRows / 16, kNt = kWarpCols / 8;
  constexpr int kAPitch = kAKContig ? Cfg::kAStrideKContig : Cfg::kAStrideMContig;
  constexpr uint32_t kABytes = uint32_t(kAKContig ? kBlockM * Cfg::kAStrideKContig : kBlockK * Cfg::kAStrideMContig) * 2;
  constexpr uint32_t kStageBytes = Cfg::kStageElems * 2;
  static_assert(kWarpRows % 16 == 0 && kWarpCols % 16 == 0 && kBlockK % 16 == 0, "warp tiles are 16-aligned");

  const gemm::GemmCta<kBlockM, kBlockN> cta(batch);
  const int m = cta.m, n = cta.n, kdim = cta.k;
  const int row0 = cta.row0, col0 = cta.col0;
  if (cta.empty()) return;   // uniform exit

  const uint16_t* a = cta.a_ptr();
  const int64_t a_stride_row = cta.a_stride_row();
  const uint16_t* bmat = cta.b_ptr();
  const int64_t b_stride_row = cta.b_stride_row();

  unsigned char* const smem = dynamic_smem();
  const uint32_t stage_base = smem_addr(smem);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / kWarpsN;
  const int warp_n = warp % kWarpsN;
  const int group = lane >> 2;
  const int quad_lane = lane & 3;

  const int k_tiles = ceil_div(kdim, kBlockK);
  float acc[kMt][kNt][4];
  zero_acc(acc);

  int load_tile = 0;
  auto issue_next_tile = [&]() {
    if (load_tile < k_tiles) {
      const uint32_t stage = stage_base + uint32_t(load_tile % kStages) * kStageBytes;
      const int k0 = load_tile * kBlockK;
      if (kAKContig) {
        load_tile_async<kBlockM, kBlockK, kThreads>(stage, kAPitch, a, a_stride_row, row0, m, k0, kdim, tid);
      } else {
        load_tile_async<kBlockK, kBlockM, kThreads>(stage, kAPitch, a, a_stride_row, k0, kdim, row0, m, tid);
      }
      load_tile_async<kBlockK, kBlockN, kThreads>(stage + kABytes, Cfg::kBStride, bmat, b_stride_row, k0, kdim, col0,
                                                  n, tid);
    }
    cp_async_commit();
    ++load_tile;
  };

#pragma unroll 1
  for (int i = 0; i < kStages - 1; ++i) issue_next_tile();

#pragma unroll 1
  for (int kt = 0; kt < k_tiles; ++kt) {
    ring_wait_and_refill<kStages>(issue_next_tile);
    const uint32_t stage = stage_base + uint32_t(kt % kStages) * kStageBytes;
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 16)
      warp_mma_k16_kn<T, kMt, kNt, kAKContig>(acc, stage, kAPitch, warp_m * kWarpRows, stage + kABytes,
                                              Cfg::kBStride, warp_n * kWarpCols, kk, lane);
  }
  cp_async_wait<0>();

  // ---- epilogue ----
  const gemm::GemmOutput out(cta);
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + warp_m * kWarpRows + mt * 16 + half * 8 + group;
      if (row >= m) continue;
      const int64_t row_offset = int64_t(row) * out.c_stride_row;
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt) {
        const int col = col0 + warp_n * kWarpCols + nt * 8 + quad_lane * 2;
        out.store<T>(row_offset, col, n, acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]);
      }
    }
}

// ---------------------------------------------------------------------------------------------
// Host side.

bool dims_ok(int batch, int heads, int n, int m, int d, int dv) {
  const int64_t batch_heads = int64_t(batch) * heads;
  return batch >= 1 && heads >= 1 && batch_heads <= 65535 && n >= 1 && m >= 1 && d >= 1 && dv >= 1 &&
         d <= kMaxHeadDim && dv <= kMaxHeadDim &&
         ceil_div(n, ScftBwdProbsConfig::kBlockM) <= 65535 &&   // grid.y of the probs kernel
         m <= INT32_MAX / 2;   // key counts rounded up to tiles and chunk ends stay in int (as the binding's cap)
}

// The kernels the environment and the device pick (scft_mma_choice, scft_stages_choice).
struct KernelChoice {
  bool use_wgmma = false;       // the wgmma forward and GEMM kernels (9.0 only)
  bool force_compact = false;   // the compact mma.sync forward and probability kernels everywhere
};

template <typename T>
cudaError_t fwd_dispatch(const ScftAttnFwdParams& p, bool force_compact, cudaStream_t stream) {
  const auto launch = [&](auto config) {
    using Cfg = decltype(config);
    return fwd::launch<Cfg>(scft_attn_fwd_kernel<T, Cfg>, p, stream);
  };
  if (p.value_dim <= 128)
    return tiles::launch_fitting<ScftFwdConfigDv128, ScftFwdCompactConfigDv128>(force_compact, launch);
  if (p.value_dim <= 256)
    return tiles::launch_fitting<ScftFwdConfigDv256, ScftFwdCompactConfigDv256>(force_compact, launch);
  return tiles::launch_fitting<ScftFwdConfigDv512, ScftFwdCompactConfigDv512>(force_compact, launch);
}

// The batch's GEMMs on wgmma (scft_gemm_sm90_kernel.cu) or mma.sync.
template <typename T, bool kAKContig>
cudaError_t launch_gemm(const GemmBatch& batch, int batch_heads, bool use_wgmma, cudaStream_t stream) {
  if (use_wgmma) return gemm::launch_sm90<T, kAKContig>(batch, batch_heads, stream);
  using Cfg = ScftGemmConfig;
  return gemm::launch<Cfg>(scft_gemm_kernel<T, Cfg, kAKContig>, batch, batch_heads, stream);
}

GemmOperand operand(const void* ptr, int64_t stride_b, int64_t stride_h, int64_t stride_row) {
  GemmOperand op;
  op.ptr = static_cast<const uint16_t*>(ptr);
  op.stride_b = stride_b;
  op.stride_h = stride_h;
  op.stride_row = stride_row;
  return op;
}

// P (and with kWithDScores dS) of the keys [key_begin, key_end) into the chunk workspaces.
template <typename T, bool kWithDScores>
cudaError_t launch_probs(const ScftAttnBwdParams& p, int key_begin, int key_end, bool force_compact,
                         cudaStream_t stream) {
  return tiles::launch_fitting<ScftBwdProbsConfig, ScftBwdProbsCompactConfig>(force_compact, [&](auto config) {
    using Cfg = decltype(config);
    auto kernel = scft_attn_bwd_probs_kernel<T, Cfg, kWithDScores>;
    const cudaError_t err = prepare_smem(kernel, Cfg::kSmemBytes);
    if (err != cudaSuccess) return err;
    const dim3 grid(ceil_div(key_end - key_begin, Cfg::kBlockN), ceil_div(p.n_queries, Cfg::kBlockM), p.batch * p.heads);
    return launch_kernel(kernel, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p, key_begin, key_end);
  });
}

// dV[chunk] = P^T dO for the chunk's keys, into grad_v_f32 (float32) when it is set, else grad_v.
// A is the P workspace read transposed ([query][key] storage, m = key, k = query).
GemmProblem value_grad_problem(const ScftAttnBwdParams& p, int key_begin, int chunk_keys) {
  const int64_t n = p.n_queries, m = p.n_keys, dv = p.value_dim, chunk = p.key_chunk;
  GemmProblem pv;
  pv.a = operand(p.probs, int64_t(p.heads) * n * chunk, n * chunk, chunk);
  pv.b = operand(p.grad_out, p.grad_out_stride_b, p.grad_out_stride_h, p.grad_out_stride_row);
  pv.c_in = nullptr;
  pv.c_out_f32 = p.grad_v_f32 != nullptr ? p.grad_v_f32 + int64_t(key_begin) * dv : nullptr;
  pv.c_out = p.grad_v_f32 == nullptr ? static_cast<uint16_t*>(p.grad_v) + int64_t(key_begin) * dv : nullptr;
  pv.c_stride_b = int64_t(p.heads) * m * dv;
  pv.c_stride_h = m * dv;
  pv.c_stride_row = dv;
  pv.c_pairs = (dv % 2) == 0;
  pv.m = chunk_keys;
  pv.n = p.value_dim;
  pv.k = p.n_queries;
  pv.alpha = 1.f;
  return pv;
}

template <typename T>
cudaError_t bwd_dispatch(const ScftAttnBwdParams& p, const KernelChoice& choice, cudaStream_t stream) {
  const int batch_heads = p.batch * p.heads;
  const int64_t n = p.n_queries, m = p.n_keys, d = p.head_dim;
  const int64_t chunk = p.key_chunk;

  {  // Delta
    constexpr int kRowsPerBlock = ScftBwdDeltaConfig::kThreads / 32;
    const int64_t rows = int64_t(batch_heads) * n;
    const dim3 grid(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
    const cudaError_t err = launch_kernel(scft_attn_bwd_delta_kernel<T, ScftBwdDeltaConfig>, grid,
                                          dim3(ScftBwdDeltaConfig::kThreads), 0, stream, p);
    if (err != cudaSuccess) return err;
  }

  cudaError_t err = cudaSuccess;
  const int num_chunks = ceil_div(p.n_keys, p.key_chunk);
  for (int c = 0; c < num_chunks; ++c) {
    const int key_begin = c * p.key_chunk;
    const int key_end = key_begin + p.key_chunk < p.n_keys ? key_begin + p.key_chunk : p.n_keys;
    const int chunk_keys = key_end - key_begin;

    err = launch_probs<T, true>(p, key_begin, key_end, choice.force_compact, stream);
    if (err != cudaSuccess) return err;

    // dV[chunk] = P^T dO and dK[chunk] = scale dS^T q.
    GemmBatch kv;
    kv.num_problems = 2;
    kv.heads = p.heads;
    {
      kv.problem[0] = value_grad_problem(p, key_begin, chunk_keys);
      GemmProblem& pk = kv.problem[1];
      pk.a = operand(p.dscores, int64_t(p.heads) * n * chunk, n * chunk, chunk);
      pk.b = operand(p.q, p.q_stride_b, p.q_stride_h, p.q_stride_row);
      pk.c_in = nullptr;
      pk.c_out_f32 = nullptr;
      pk.c_out = static_cast<uint16_t*>(p.grad_k) + int64_t(key_begin) * d;
      pk.c_stride_b = int64_t(p.heads) * m * d;
      pk.c_stride_h = m * d;
      pk.c_stride_row = d;
      pk.c_pairs = (d % 2) == 0;
      pk.m = chunk_keys;
      pk.n = p.head_dim;
      pk.k = p.n_queries;
      pk.alpha = p.scale;
    }
    err = launch_gemm<T, false>(kv, batch_heads, choice.use_wgmma, stream);
    if (err != cudaSuccess) return err;

    // dQ (+)= scale dS k[chunk]: A is dS ([query][key], k = key contiguous), B the chunk's keys.
    GemmBatch qb;
    qb.num_problems = 1;
    qb.heads = p.heads;
    {
      GemmProblem& pq = qb.problem[0];
      pq.a = operand(p.dscores, int64_t(p.heads) * n * chunk, n * chunk, chunk);
      pq.b = operand(static_cast<const uint16_t*>(p.k) + int64_t(key_begin) * p.k_stride_row, p.k_stride_b,
                     p.k_stride_h, p.k_stride_row);
      const bool first = c == 0;
      const bool last = c == num_chunks - 1;
      pq.c_in = first ? nullptr : p.grad_q_accum;
      pq.c_out_f32 = last ? nullptr : p.grad_q_accum;
      pq.c_out = last ? static_cast<uint16_t*>(p.grad_q) : nullptr;
      pq.c_stride_b = int64_t(p.heads) * n * d;   // grad_q and grad_q_accum are both contiguous (B, H, N, D)
      pq.c_stride_h = n * d;
      pq.c_stride_row = d;
      pq.c_pairs = (d % 2) == 0;
      pq.m = p.n_queries;
      pq.n = p.head_dim;
      pq.k = chunk_keys;
      pq.alpha = p.scale;
      qb.problem[1] = pq;   // unused (num_problems = 1), kept initialized
    }
    err = launch_gemm<T, true>(qb, batch_heads, choice.use_wgmma, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}


// grad_v_f32 = P^T grad_out only: per key chunk, P then one GEMM.
template <typename T>
cudaError_t dv_dispatch(const ScftAttnBwdParams& p, const KernelChoice& choice, cudaStream_t stream) {
  const int num_chunks = ceil_div(p.n_keys, p.key_chunk);
  for (int c = 0; c < num_chunks; ++c) {
    const int key_begin = c * p.key_chunk;
    const int key_end = key_begin + p.key_chunk < p.n_keys ? key_begin + p.key_chunk : p.n_keys;
    cudaError_t err = launch_probs<T, false>(p, key_begin, key_end, choice.force_compact, stream);
    if (err != cudaSuccess) return err;
    GemmBatch batch;
    batch.num_problems = 1;
    batch.heads = p.heads;
    batch.problem[0] = value_grad_problem(p, key_begin, key_end - key_begin);
    batch.problem[1] = batch.problem[0];   // unused (num_problems = 1), kept initialized
    err = launch_gemm<T, false>(batch, p.batch * p.heads, choice.use_wgmma, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// What both backward launchers read: sizes, the key chunk, grad_out, q, k, lse and the P workspace.
bool bwd_common_ok(const ScftAttnBwdParams& p) {
  if (!dims_ok(p.batch, p.heads, p.n_queries, p.n_keys, p.head_dim, p.value_dim)) return false;
  if (p.key_chunk <= 0 || p.key_chunk % 128 != 0) return false;
  const void* tiled[] = {p.grad_out, p.q, p.k, p.probs};
  for (const void* ptr : tiled)
    if (ptr == nullptr || !aligned16(ptr)) return false;
  if (p.lse == nullptr || !aligned4(p.lse)) return false;
  return stride_ok(p.grad_out_stride_b, p.batch) && stride_ok(p.grad_out_stride_h, p.heads) &&
         stride_ok(p.grad_out_stride_row, p.n_queries) && stride_ok(p.q_stride_b, p.batch) &&
         stride_ok(p.q_stride_h, p.heads) && stride_ok(p.q_stride_row, p.n_queries) &&
         stride_ok(p.k_stride_b, p.batch) && stride_ok(p.k_stride_h, p.heads) && stride_ok(p.k_stride_row, p.n_keys);
}

// What the environment and the device pick; an unknown choice is cudaErrorInvalidValue.
cudaError_t pick_kernels(KernelChoice* picked) {
  const ScftMmaChoice mma = scft_mma_choice();
  const ScftStagesChoice stages = scft_stages_choice();
  if (mma == ScftMmaChoice::kUnknown || stages == ScftStagesChoice::kUnknown) return cudaErrorInvalidValue;
  picked->force_compact = stages == ScftStagesChoice::kCompact;
  if (mma == ScftMmaChoice::kMmaSync) {
    picked->use_wgmma = false;
    return cudaSuccess;
  }
  int device = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return err;
  picked->use_wgmma = scft_uses_wgmma(mma, major, minor);
  if (mma == ScftMmaChoice::kWgmma && !picked->use_wgmma) return cudaErrorInvalidDeviceFunction;
  return cudaSuccess;
}

}  // namespace

cudaError_t scft_attn_fwd_cuda(const ScftAttnFwdParams& p, ScftDtype dtype, cudaStream_t stream) {
  if (!dims_ok(p.batch, p.heads, p.n_queries, p.n_keys, p.head_dim, p.value_dim)) return cudaErrorInvalidValue;
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.lse == nullptr) return cudaErrorInvalidValue;
  if ((p.out == nullptr) == (p.out_f32 == nullptr)) return cudaErrorInvalidValue;   // exactly one output
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned4(p.lse)) return cudaErrorInvalidValue;
  if (p.out != nullptr ? !aligned16(p.out) : !aligned4(p.out_f32)) return cudaErrorInvalidValue;
  if (!stride_ok(p.q_stride_b, p.batch) || !stride_ok(p.q_stride_h, p.heads) ||
      !stride_ok(p.q_stride_row, p.n_queries) || !stride_ok(p.k_stride_b, p.batch) ||
      !stride_ok(p.k_stride_h, p.heads) || !stride_ok(p.k_stride_row, p.n_keys) ||
      !stride_ok(p.v_stride_b, p.batch) || !stride_ok(p.v_stride_h, p.heads) || !stride_ok(p.v_stride_row, p.n_keys))
    return cudaErrorInvalidValue;
  if (dtype != ScftDtype::kFloat16 && dtype != ScftDtype::kBFloat16) return cudaErrorInvalidValue;
  KernelChoice choice;
  const cudaError_t err = pick_kernels(&choice);
  if (err != cudaSuccess) return err;
  if (choice.use_wgmma) return scft_attn_fwd_sm90_cuda(p, dtype, stream);
  switch (dtype) {
    case ScftDtype::kFloat16:
      return fwd_dispatch<__half>(p, choice.force_compact, stream);
    case ScftDtype::kBFloat16:
      return fwd_dispatch<__nv_bfloat16>(p, choice.force_compact, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t scft_attn_bwd_cuda(const ScftAttnBwdParams& p, ScftDtype dtype, cudaStream_t stream) {
  if (!bwd_common_ok(p)) return cudaErrorInvalidValue;
  // Tiles are copied in 16-byte pieces and outputs stored in pairs: 16-byte aligned. delta is read
  // one float at a time.
  const void* tiled[] = {p.v, p.out, p.grad_q, p.grad_k, p.grad_v, p.dscores};
  for (const void* ptr : tiled)
    if (ptr == nullptr || !aligned16(ptr)) return cudaErrorInvalidValue;
  if (p.delta == nullptr || !aligned4(p.delta)) return cudaErrorInvalidValue;
  if (ceil_div(p.n_keys, p.key_chunk) > 1 && (p.grad_q_accum == nullptr || !aligned16(p.grad_q_accum)))
    return cudaErrorInvalidValue;
  if (!stride_ok(p.out_stride_b, p.batch) || !stride_ok(p.out_stride_h, p.heads) ||
      !stride_ok(p.out_stride_row, p.n_queries) || !stride_ok(p.v_stride_b, p.batch) ||
      !stride_ok(p.v_stride_h, p.heads) || !stride_ok(p.v_stride_row, p.n_keys))
    return cudaErrorInvalidValue;
  if (dtype != ScftDtype::kFloat16 && dtype != ScftDtype::kBFloat16) return cudaErrorInvalidValue;
  KernelChoice choice;
  const cudaError_t err = pick_kernels(&choice);
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case ScftDtype::kFloat16:
      return bwd_dispatch<__half>(p, choice, stream);
    case ScftDtype::kBFloat16:
      return bwd_dispatch<__nv_bfloat16>(p, choice, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t scft_attn_bwd_dv_cuda(const ScftAttnBwdParams& p, ScftDtype dtype, cudaStream_t stream) {
  if (!bwd_common_ok(p)) return cudaErrorInvalidValue;
  // float2 stores of pairs of float32 outputs.
  if (p.grad_v_f32 == nullptr || !aligned16(p.grad_v_f32)) return cudaErrorInvalidValue;
  if (dtype != ScftDtype::kFloat16 && dtype != ScftDtype::kBFloat16) return cudaErrorInvalidValue;
  KernelChoice choice;
  const cudaError_t err = pick_kernels(&choice);
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case ScftDtype::kFloat16:
      return dv_dispatch<__half>(p, choice, stream);
    case ScftDtype::kBFloat16:
      return dv_dispatch<__nv_bfloat16>(p, choice, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace scft
}  // namespace sketchcolor

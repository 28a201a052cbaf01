// The CUDA backend of SCFT attention: parameter structs, tile configurations and launchers.
//
// Pure C++17 plus the CUDA runtime API header: no torch header, so that
// scft_attention_kernel.cu compiles with nvcc anywhere, and so that the compile test can build a
// tiny host program from this header alone to learn the shared-memory size of every kernel.
//
// Shapes use the op's names: B batch, H heads, N queries, M keys, D the q/k head dim,
// Dv the v head dim. Element strides are in elements (not bytes); the last axis of every tensor
// has stride 1. The launchers require 16-byte aligned base pointers (4-byte for the float32 lse
// and delta) and row/head/batch strides that are multiples of 8 elements on every axis with more
// than one index (so that every tile row starts on a 16-byte boundary and can be copied with
// 16-byte cp.async); the torch binding guarantees that by copying inputs that do not meet it
// into a padded buffer. Outputs and workspaces are contiguous.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common/kernel_dtype.h"

namespace sketchcolor {
namespace scft {

using ScftDtype = KernelDtype;

// Largest D and Dv the binding accepts. No tile shape depends on it: D and Dv are streamed
// through shared memory in chunks; it bounds what the index arithmetic and tests reason about.
constexpr int kMaxHeadDim = 4096;
// Shared-memory rows are padded by 8 elements (16 bytes): a row pitch of 16 * odd bytes puts the
// 8 rows that one ldmatrix 8x8 reads into 8 distinct 16-byte bank groups (no bank conflicts).
constexpr int kSmemPad = 8;
constexpr int kElemBytes = 2;

constexpr int scft_max(int a, int b) { return a > b ? a : b; }
constexpr int64_t scft_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Forward: one CTA owns kBlockM query rows and a kBlockDv-wide slice of the output columns
// (grid.y walks the Dv slices). It streams key tiles of kBlockN keys; for each, the score tile
// S = q k^T is accumulated over D in kBlockK-wide "QK jobs" (q and k chunks through a cp.async
// ring of kStages stage buffers), the online-softmax step turns S into P (bf16/fp16 in shared
// memory), and kKeysPerVJob-row "V jobs" add P v[:, slice] into the fp32 output accumulator that
// stays in registers. Warps form a kWarpsM x kWarpsN grid: warp (wm, wn) owns query rows
// [wm*BM/WM, ...) of both S and O, S columns [wn*BN/WN, ...) and O columns [wn*BDv/WN, ...).
template <int kBlockDv_, int kStages_>
struct ScftFwdTile {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 128;
  static constexpr int kBlockK = 64;
  static constexpr int kBlockDv = kBlockDv_;
  static constexpr int kKeysPerVJob = 32;
  static constexpr int kWarpsM = 2;
  static constexpr int kWarpsN = 4;
  static constexpr int kThreads = kWarpsM * kWarpsN * 32;
  static constexpr int kStages = kStages_;
  static constexpr int kQkStride = kBlockK + kSmemPad;    // q and k chunk rows in a stage
  static constexpr int kVStride = kBlockDv + kSmemPad;    // v chunk rows in a stage
  static constexpr int kPStride = kBlockN + kSmemPad;     // probability tile rows
  static constexpr int kStageElems =
      scft_max((kBlockM + kBlockN) * kQkStride, kKeysPerVJob * kVStride);
  // Stage ring, the probability tile (kBlockM x kBlockN), and two kWarpsN x kBlockM fp32
  // row-reduction buffers (partial row maxima, partial row sums).
  static constexpr size_t kSmemBytes =
      size_t(kStages * kStageElems + kBlockM * kPStride) * kElemBytes +
      size_t(2 * kWarpsN * kBlockM) * sizeof(float);
};
// Dv <= 128 (one slice), Dv <= 256 (one slice), larger Dv (slices of 512: 992 = 512 + 480).
// 4 stages: 127-149 KiB, for devices granting 163 KiB per block (8.0, 8.7) or more.
struct ScftFwdConfigDv128 : ScftFwdTile<128, 4> {};
struct ScftFwdConfigDv256 : ScftFwdTile<256, 4> {};
struct ScftFwdConfigDv512 : ScftFwdTile<512, 4> {};
// The same tiles through a 2-stage ring (73-84 KiB), for devices granting 99 KiB per block (8.6,
// 8.9: RTX 30xx/40xx, A10, L4, L40S); 3 stages would need 100-117 KiB. One job is in flight while
// the next is multiplied instead of three, so the copies' latency is hidden only as far as one
// job's products last (a 64 x 128 x 64 QK job: 1 Mflop per CTA).
struct ScftFwdCompactConfigDv128 : ScftFwdTile<128, 2> {};
struct ScftFwdCompactConfigDv256 : ScftFwdTile<256, 2> {};
struct ScftFwdCompactConfigDv512 : ScftFwdTile<512, 2> {};

// Forward on sm_90a (scft_attention_fwd_sm90_kernel.cu): the same jobs, ring and Dv slices as
// ScftFwdTile, with the two products on wgmma (warpgroup MMA, operands read straight from shared
// memory) instead of mma.sync. Two warpgroups share the CTA's 64 query rows: warpgroup w computes
// the score columns [w * kBlockN / 2, ...) of every key tile (a 64 x 64 wgmma accumulator) and owns
// the output columns [w * kBlockDv / 2, ...) of the slice (64 x kBlockDv / 2 fp32: 128 registers
// per thread at kBlockDv = 512). Row maxima and sums are combined across the two warpgroups through
// shared memory; P goes through shared memory because each warpgroup's product needs all kBlockN
// columns of it. Stage tiles use the interleaved layout of common/wgmma.cuh (no padding).
// Jobs are twice as long as ScftFwdTile's (128-wide D chunks, 64-key V jobs): each job pays a
// barrier, a proxy fence and a wait for its wgmma group, so fewer, longer jobs keep the tensor
// cores busier; kStages is what fits 227 KiB beside the P tile.
template <int kBlockDv_, int kStages_>
struct ScftFwdSm90Tile {
  static constexpr int kBlockM = 64;     // the M of one wgmma
  static constexpr int kBlockN = 128;
  static constexpr int kBlockK = 128;
  static constexpr int kBlockDv = kBlockDv_;
  static constexpr int kKeysPerVJob = 64;
  static constexpr int kWarpgroups = 2;
  static constexpr int kThreads = kWarpgroups * 128;
  static constexpr int kStages = kStages_;
  static constexpr int kQkStageBytes = (kBlockM + kBlockN) * kBlockK * kElemBytes;   // q chunk, k chunk
  static constexpr int kVStageBytes = kKeysPerVJob * kBlockDv * kElemBytes;          // v rows of the slice
  static constexpr int kStageBytes = scft_max(kQkStageBytes, kVStageBytes);
  // Stage ring, the probability tile (kBlockM x kBlockN), and two kWarpgroups x kBlockM fp32
  // row-reduction buffers (partial row maxima, partial row sums).
  static constexpr size_t kSmemBytes = size_t(kStages) * kStageBytes + size_t(kBlockM * kBlockN) * kElemBytes +
                                       size_t(2 * kWarpgroups * kBlockM) * sizeof(float);
};
struct ScftFwdSm90ConfigDv128 : ScftFwdSm90Tile<128, 4> {};   // 48 KiB stages
struct ScftFwdSm90ConfigDv256 : ScftFwdSm90Tile<256, 4> {};   // 48 KiB stages
struct ScftFwdSm90ConfigDv512 : ScftFwdSm90Tile<512, 3> {};   // 64 KiB stages

// ---------------------------------------------------------------------------------------------
// Backward, probabilities and score gradients of one key chunk: a CTA owns a kBlockM x kBlockN
// tile of (query, key) pairs, accumulates S = q k^T over D and dP = dO v^T over Dv (both
// through the same stage ring, chunks of kBlockK), and writes P = exp(scale S - lse) and
// dS = P * (dP - Delta) in the input dtype to the chunk workspaces.
template <int kStages_>
struct ScftBwdProbsTile {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
  static constexpr int kBlockK = 64;
  static constexpr int kWarpsM = 2;
  static constexpr int kWarpsN = 4;
  static constexpr int kThreads = kWarpsM * kWarpsN * 32;
  static constexpr int kStages = kStages_;
  static constexpr int kStride = kBlockK + kSmemPad;
  static constexpr int kStageElems = (kBlockM + kBlockN) * kStride;
  static constexpr size_t kSmemBytes = size_t(kStages * kStageElems) * kElemBytes;
};
struct ScftBwdProbsConfig : ScftBwdProbsTile<3> {};          // 108 KiB
struct ScftBwdProbsCompactConfig : ScftBwdProbsTile<2> {};   // 72 KiB, for 99 KiB devices

// Backward GEMMs over the chunk workspaces (dV = P^T dO, dK = scale dS^T q, dQ += scale dS k):
// C (m x n) = alpha * A (m x k) B (k x n) [+ C_in], B stored k-major rows (n contiguous), A either
// m-major rows (k contiguous) or k-major rows (m contiguous).
struct ScftGemmConfig {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
  static constexpr int kBlockK = 32;
  static constexpr int kWarpsM = 2;
  static constexpr int kWarpsN = 4;
  static constexpr int kThreads = kWarpsM * kWarpsN * 32;
  static constexpr int kMinBlocksPerSm = 2;   // 64 fp32 accumulators per thread leave room for two CTAs
  static constexpr int kStages = 4;
  static constexpr int kAStrideKContig = kBlockK + kSmemPad;   // A tile stored [m][k]
  static constexpr int kAStrideMContig = kBlockM + kSmemPad;   // A tile stored [k][m]
  static constexpr int kBStride = kBlockN + kSmemPad;          // B tile stored [k][n]
  static constexpr int kStageElems =
      scft_max(kBlockM * kAStrideKContig, kBlockK * kAStrideMContig) + kBlockK * kBStride;
  static constexpr size_t kSmemBytes = size_t(kStages * kStageElems) * kElemBytes;
};

// The same GEMMs on sm_90a (scft_gemm_sm90_kernel.cu): the contract of ScftGemmConfig with the
// products on wgmma (HGMMA, both operands read from shared memory by the tensor cores; A through
// the transpose flag when it is stored [k][m], B always). Two warpgroups own 64 rows each of a
// 128 x 256 output tile: one HGMMA.64x256x16 per warpgroup and k16 step, 64 x 256 fp32 accumulators
// (128 registers per thread). Why 128 x 256: the backward GEMMs reduce over k = N (dV, dK) or the
// key chunk (dQ), thousands deep, so they are bound by the operand bytes each CTA streams from L2,
// and a tile does BM BN / (BM + BN) flop per such byte: 85 here against 64 for 128 x 128
// (benchmarks/NOTES-cuda.md); 256 is the widest wgmma N, and 64 x 256 fp32 is as much as a
// warpgroup's registers hold beside the addressing. D, Dv = 992 pad to 1024 columns either way.
// kBlockK = 64: a k tile is one wgmma group of 4 HGMMA per warpgroup between barriers. The consumer
// leaves that group running across the next barrier (ring_wait_for_wgmma<kStages, 1>), so a stage
// is refilled two tiles after it was read; with 4 stages of 48 KiB (192 KiB, one CTA per SM) two
// k tiles are in flight from L2 while one is multiplied.
struct ScftGemmSm90Config {
  static constexpr int kBlockM = 128;   // 2 warpgroups x the wgmma M of 64
  static constexpr int kBlockN = 256;   // the N of each warpgroup's wgmma
  static constexpr int kBlockK = 64;    // k per stage: 4 k16 steps
  static constexpr int kWarpgroups = 2;
  static constexpr int kThreads = kWarpgroups * 128;
  static constexpr int kMinBlocksPerSm = 1;   // 192 KiB of shared memory: one CTA per SM
  static constexpr int kStages = 4;
  static constexpr int kABytes = kBlockM * kBlockK * kElemBytes;   // A tile, 128 x 64: [m][k] or [k][m]
  static constexpr int kBBytes = kBlockK * kBlockN * kElemBytes;   // B tile, 64 x 256: [k][n]
  static constexpr int kStageBytes = kABytes + kBBytes;            // 48 KiB, interleaved layout
  static constexpr size_t kSmemBytes = size_t(kStages) * kStageBytes;
};

struct ScftBwdDeltaConfig {
  static constexpr int kThreads = 256;   // one warp per query row
  static constexpr size_t kSmemBytes = 0;
};

// Dynamic shared memory requested by each kernel, by the configuration name that appears in the
// kernel's mangled name. tests/test_cuda_compile.py compiles a host program that prints this table
// and adds it to the static shared memory that ptxas reports.
struct ScftKernelSmem {
  const char* config_name;
  size_t dynamic_smem_bytes;
};
inline constexpr ScftKernelSmem kScftKernelSmemTable[] = {
    {"ScftFwdConfigDv128", ScftFwdConfigDv128::kSmemBytes},
    {"ScftFwdConfigDv256", ScftFwdConfigDv256::kSmemBytes},
    {"ScftFwdConfigDv512", ScftFwdConfigDv512::kSmemBytes},
    {"ScftFwdCompactConfigDv128", ScftFwdCompactConfigDv128::kSmemBytes},
    {"ScftFwdCompactConfigDv256", ScftFwdCompactConfigDv256::kSmemBytes},
    {"ScftFwdCompactConfigDv512", ScftFwdCompactConfigDv512::kSmemBytes},
    {"ScftFwdSm90ConfigDv128", ScftFwdSm90ConfigDv128::kSmemBytes},
    {"ScftFwdSm90ConfigDv256", ScftFwdSm90ConfigDv256::kSmemBytes},
    {"ScftFwdSm90ConfigDv512", ScftFwdSm90ConfigDv512::kSmemBytes},
    {"ScftBwdProbsConfig", ScftBwdProbsConfig::kSmemBytes},
    {"ScftBwdProbsCompactConfig", ScftBwdProbsCompactConfig::kSmemBytes},
    {"ScftGemmConfig", ScftGemmConfig::kSmemBytes},
    {"ScftGemmSm90Config", ScftGemmSm90Config::kSmemBytes},
    {"ScftBwdDeltaConfig", ScftBwdDeltaConfig::kSmemBytes},
};

// ---------------------------------------------------------------------------------------------
// Parameters. x[b, h, i, c] of a 4-D operand lives at
//   x + b * x_stride_b + h * x_stride_h + i * x_stride_row + c.

struct ScftAttnFwdParams {
  const void* q;          // (B, H, N, D)  fp16/bf16
  const void* k;          // (B, H, M, D)  same dtype as q
  const void* v;          // (B, H, M, Dv) same dtype as q
  void* out;              // (B, H, N, Dv) same dtype as q, contiguous: softmax(scale q k^T) v
  float* out_f32;         // (B, H, N, Dv) float32, contiguous: the same output unrounded, written
                          //   instead of `out` when set (exactly one of the two is non-null)
  float* lse;             // (B, H, N)     float32, contiguous: logsumexp_j (scale q_i . k_j)
  int64_t q_stride_b, q_stride_h, q_stride_row;   // elements
  int64_t k_stride_b, k_stride_h, k_stride_row;
  int64_t v_stride_b, v_stride_h, v_stride_row;
  int batch;              // B
  int heads;              // H
  int n_queries;          // N >= 1
  int n_keys;             // M >= 1
  int head_dim;           // D  in [1, kMaxHeadDim]
  int value_dim;          // Dv in [1, kMaxHeadDim]
  float scale;            // S = scale * q k^T
};

struct ScftAttnBwdParams {
  // Inputs.
  const void* grad_out;   // (B, H, N, Dv) dL/d out, dtype of q
  const void* q;          // (B, H, N, D)
  const void* k;          // (B, H, M, D)
  const void* v;          // (B, H, M, Dv)
  const void* out;        // (B, H, N, Dv) the forward's output
  const float* lse;       // (B, H, N)     float32, contiguous: the forward's logsumexp
  int64_t grad_out_stride_b, grad_out_stride_h, grad_out_stride_row;   // elements
  int64_t q_stride_b, q_stride_h, q_stride_row;
  int64_t k_stride_b, k_stride_h, k_stride_row;
  int64_t v_stride_b, v_stride_h, v_stride_row;
  int64_t out_stride_b, out_stride_h, out_stride_row;
  // Outputs, contiguous, dtype of q.
  void* grad_q;           // (B, H, N, D)
  void* grad_k;           // (B, H, M, D)
  void* grad_v;           // (B, H, M, Dv)
  float* grad_v_f32;      // (B, H, M, Dv) float32: scft_attn_bwd_dv_cuda's output (the other
                          //   launcher ignores it, and that one ignores v, out, delta, dscores,
                          //   grad_q, grad_k, grad_v and grad_q_accum)
  // Workspaces, contiguous, allocated by the caller (see scft_bwd_workspace_plan).
  float* delta;           // (B, H, N) float32: Delta_i = sum_c grad_out[i, c] * out[i, c]
  void* probs;            // (B, H, N, key_chunk) dtype of q: P = exp(scale S - lse) of one key chunk
  void* dscores;          // (B, H, N, key_chunk) dtype of q: dS = P * (dO v^T - Delta) of one key chunk
  float* grad_q_accum;    // (B, H, N, D) float32: dQ summed over key chunks; null when one chunk
  int key_chunk;          // keys per chunk: a multiple of 128, >= min(M rounded up to 128, ...)
  int batch;              // B
  int heads;              // H
  int n_queries;          // N >= 1
  int n_keys;             // M >= 1
  int head_dim;           // D
  int value_dim;          // Dv
  float scale;
};

// The GPU as the backward's key chunking sees its GEMMs: how many GEMM CTAs run at once and how
// many output columns each one owns. slots = 0 means unknown: the plan then goes by memory alone.
struct ScftGemmOccupancy {
  int slots;     // SMs x CTAs of the GEMM kernel per SM
  int block_n;   // output columns per CTA (its tile's n; the tile's m is 128 in both kernels)
};

// The occupancy of the GEMM kernel that runs (wgmma or mma.sync, see scft_uses_wgmma) on a GPU of
// num_sms SMs, each with smem_per_sm bytes of shared memory of which the driver reserves
// reserved_per_block for every resident CTA. The mma.sync kernel's registers allow two CTAs per
// SM, but its 74 KiB of shared memory (plus the reserved 1 KiB) fit twice only in 8.0's 164 KiB
// and 9.0's 228 KiB, once in the 100 KiB of 8.6, 8.9 and 12.x.
inline ScftGemmOccupancy scft_gemm_occupancy(int num_sms, bool wgmma, int64_t smem_per_sm, int64_t reserved_per_block) {
  static_assert(ScftGemmConfig::kBlockM == 128 && ScftGemmSm90Config::kBlockM == 128, "128-key GEMM tiles");
  if (wgmma) return {num_sms * ScftGemmSm90Config::kMinBlocksPerSm, ScftGemmSm90Config::kBlockN};
  int64_t per_sm = smem_per_sm / (static_cast<int64_t>(ScftGemmConfig::kSmemBytes) + reserved_per_block);
  if (per_sm > ScftGemmConfig::kMinBlocksPerSm) per_sm = ScftGemmConfig::kMinBlocksPerSm;
  if (per_sm < 1) per_sm = 1;
  return {num_sms * static_cast<int>(per_sm), ScftGemmConfig::kBlockN};
}

// Which backward GEMMs run per key chunk: all three (dV and dK of the chunk's keys, reducing over
// the N queries, then dQ (+)= dS k_chunk), or dV alone (scft_attn_bwd_dv_cuda).
enum class ScftBwdGemms { kAll, kValueOnly };

// The GEMM time of one key chunk of `keys` keys, in units of one CTA reducing over one key or query:
// the dV/dK launch takes ceil(CTAs / slots) waves of CTAs that each reduce over N, the dQ launch
// ceil(CTAs / slots) waves of CTAs that each reduce over the chunk's keys.
inline int64_t scft_bwd_chunk_gemm_cost(int64_t batch_heads, int64_t n_queries, int64_t keys, int64_t head_dim,
                                        int64_t value_dim, ScftGemmOccupancy gemm, ScftBwdGemms gemms) {
  constexpr int64_t kBlockM = ScftGemmConfig::kBlockM;   // both GEMM kernels' (scft_gemm_occupancy)
  const bool all = gemms == ScftBwdGemms::kAll;
  const int64_t kv_tiles_n = scft_ceil_div(value_dim, gemm.block_n) + (all ? scft_ceil_div(head_dim, gemm.block_n) : 0);
  const int64_t kv_ctas = scft_ceil_div(keys, kBlockM) * kv_tiles_n * batch_heads;
  int64_t cost = scft_ceil_div(kv_ctas, gemm.slots) * n_queries;
  if (all) {
    const int64_t dq_ctas = scft_ceil_div(n_queries, kBlockM) * scft_ceil_div(head_dim, gemm.block_n) * batch_heads;
    cost += scft_ceil_div(dq_ctas, gemm.slots) * keys;
  }
  return cost;
}

// How the backward splits the keys: the P and dS workspaces hold N x key_chunk values per head
// (never N x M), so the backward's extra memory is O(N * (D + Dv)) like its inputs.
// Memory bounds key_chunk: it is a multiple of 128 keys whose two workspaces fit in
// max(64 MiB, bytes of q + k + v + grad_out), and no larger than M rounded up to 128; but at least
// 128, so with very many queries and a small head dim (N x 128 x 4 bytes per head above the
// budget) the workspaces are 128 keys' worth, at most 256 / (D + 2 Dv) times the inputs' bytes.
// Within that bound, the GEMMs' waves choose: each chunk's dV/dK launch has few CTAs (at N = M =
// 16384, D = 992 the memory bound of 2432 keys gives 152 wgmma CTAs, 1.15 waves of an H100's 132
// SMs: the second wave runs 20 CTAs as long as the first), so the plan takes the multiple of 128
// with the least total GEMM time (scft_bwd_chunk_gemm_cost over all chunks; ties go to the larger
// chunk, fewer launches): 2048 keys there, one full wave per chunk, modelled 0.97 of the ideal
// against 0.68 for 2432. With gemm.slots = 0 the memory bound is the chunk.
struct ScftBwdWorkspacePlan {
  int key_chunk;          // keys per chunk
  int num_chunks;         // ceil(M / key_chunk)
  bool needs_grad_q_accum;  // num_chunks > 1: dQ is summed in a float32 (B, H, N, D) buffer
};

// max_key_chunk > 0 (a multiple of 128) caps the chosen chunk: the CUDA emulator's tests run the
// several-chunk path on shapes small enough to emulate, which would fit one chunk.
inline ScftBwdWorkspacePlan scft_bwd_workspace_plan(int64_t batch_heads, int64_t n_queries, int64_t n_keys,
                                                    int64_t head_dim, int64_t value_dim, ScftGemmOccupancy gemm,
                                                    ScftBwdGemms gemms, int64_t max_key_chunk = 0) {
  const int64_t kChunkAlign = 128;
  const int64_t input_bytes =
      (batch_heads * (n_queries * (head_dim + 2 * value_dim) + n_keys * (head_dim + value_dim))) * kElemBytes;
  const int64_t floor_bytes = int64_t(64) << 20;
  const int64_t budget = input_bytes > floor_bytes ? input_bytes : floor_bytes;
  const int64_t bytes_per_key = batch_heads * n_queries * 2 * kElemBytes;   // one P and one dS column
  int64_t chunk = (budget / (bytes_per_key > 0 ? bytes_per_key : 1)) / kChunkAlign * kChunkAlign;
  const int64_t all_keys = scft_ceil_div(n_keys, kChunkAlign) * kChunkAlign;
  if (chunk < kChunkAlign) chunk = kChunkAlign;
  if (chunk > all_keys) chunk = all_keys;
  if (gemm.slots > 0 && gemm.block_n > 0) {
    auto chunk_cost = [&](int64_t keys) {
      return scft_bwd_chunk_gemm_cost(batch_heads, n_queries, keys, head_dim, value_dim, gemm, gemms);
    };
    int64_t best_cost = -1;
    const int64_t memory_bound = chunk;
    for (int64_t candidate = memory_bound; candidate >= kChunkAlign; candidate -= kChunkAlign) {
      const int64_t full = n_keys / candidate, rest = n_keys % candidate;
      const int64_t cost = full * chunk_cost(candidate) + (rest > 0 ? chunk_cost(rest) : 0);
      if (best_cost < 0 || cost < best_cost) {
        best_cost = cost;
        chunk = candidate;
      }
    }
  }
  if (max_key_chunk > 0 && chunk > max_key_chunk) chunk = max_key_chunk;
  ScftBwdWorkspacePlan plan;
  plan.key_chunk = static_cast<int>(chunk);
  plan.num_chunks = static_cast<int>(scft_ceil_div(n_keys, chunk));
  plan.needs_grad_q_accum = plan.num_chunks > 1;
  return plan;
}

// ---------------------------------------------------------------------------------------------
// Launchers (scft_attention_kernel.cu). They validate the parameters, enqueue the kernels on
// `stream` and return the first CUDA error (cudaErrorInvalidValue for parameters the kernels
// cannot take, cudaErrorInvalidConfiguration when the device has too little shared memory per
// block for a kernel), never swallowing one. All work is deterministic: no atomics.

// Which tensor-core instruction family the CUDA attention kernels use, read from the environment
// variable SKETCHCOLOR_CUDA_MMA on every call: unset or "auto" lets the device decide (wgmma on
// compute capability 9.0, H100 and H200, whose code in this build is sm_90a; mma.sync elsewhere);
// "mma_sync" forces mma.sync, which tests and benchmarks use to compare the two on one device;
// "wgmma" insists on wgmma. It picks the forward kernel and the backward's GEMM kernel (the
// backward's Delta and P/dS kernels exist on mma.sync only).
enum class ScftMmaChoice { kAuto, kMmaSync, kWgmma, kUnknown };
inline ScftMmaChoice scft_mma_choice() {
  const char* choice = std::getenv("SKETCHCOLOR_CUDA_MMA");
  if (choice == nullptr || std::strcmp(choice, "auto") == 0) return ScftMmaChoice::kAuto;
  if (std::strcmp(choice, "mma_sync") == 0) return ScftMmaChoice::kMmaSync;
  if (std::strcmp(choice, "wgmma") == 0) return ScftMmaChoice::kWgmma;
  return ScftMmaChoice::kUnknown;
}

// Which copy-ring depth the mma.sync forward and probability kernels use, read from the environment
// variable SKETCHCOLOR_CUDA_STAGES on every call: unset or "auto" takes the full configuration (3-4
// stages) where the device grants its shared memory and the compact one (2 stages) elsewhere (8.6,
// 8.9: 99 KiB per block); "compact" takes the compact one everywhere, which tests and benchmarks
// use to run it on a GPU that grants more. The wgmma forward has its own ring and ignores it.
enum class ScftStagesChoice { kAuto, kCompact, kUnknown };
inline ScftStagesChoice scft_stages_choice() {
  const char* choice = std::getenv("SKETCHCOLOR_CUDA_STAGES");
  if (choice == nullptr || std::strcmp(choice, "auto") == 0) return ScftStagesChoice::kAuto;
  if (std::strcmp(choice, "compact") == 0) return ScftStagesChoice::kCompact;
  return ScftStagesChoice::kUnknown;
}

// Whether the wgmma kernels can run on a device of this compute capability: the build's only
// machine code for them is sm_90a, which runs on 9.0 alone.
inline bool scft_wgmma_runs_on(int major, int minor) { return major == 9 && minor == 0; }

// Whether the wgmma kernels run for a valid choice on a device of compute capability major.minor
// (the launchers reject "wgmma" elsewhere; this says what runs when they accept).
inline bool scft_uses_wgmma(ScftMmaChoice choice, int major, int minor) {
  return choice != ScftMmaChoice::kMmaSync && scft_wgmma_runs_on(major, minor);
}

// Every launcher below reads scft_mma_choice() and scft_stages_choice(): an unknown choice is
// cudaErrorInvalidValue; "wgmma" on a device that is not 9.0, cudaErrorInvalidDeviceFunction.

// out, lse <- attention(q, k, v), on the kernel scft_mma_choice() names.
cudaError_t scft_attn_fwd_cuda(const ScftAttnFwdParams& params, ScftDtype dtype, cudaStream_t stream);

// The wgmma forward alone, for parameters scft_attn_fwd_cuda has validated, on a 9.0 device; its
// kernels are built for sm_90a only (elsewhere their bodies trap).
cudaError_t scft_attn_fwd_sm90_cuda(const ScftAttnFwdParams& params, ScftDtype dtype, cudaStream_t stream);

// grad_q, grad_k, grad_v <- backward. Enqueues: Delta; then per key chunk: P and dS, the grouped
// GEMM dV/dK for the chunk's keys, and the GEMM dQ (+)= scale dS k_chunk (the GEMMs on the kernel
// scft_mma_choice() names).
cudaError_t scft_attn_bwd_cuda(const ScftAttnBwdParams& params, ScftDtype dtype, cudaStream_t stream);

// grad_v_f32 <- P^T grad_out in float32, P = exp(scale q k^T - lse): the value gradient alone, per
// key chunk P then one GEMM. A query whose lse is +inf has P = 0 and contributes nothing, which is
// how the nll correspondence loss (csrc/correspondence_loss) leaves out queries without a
// correspondence when it computes sum_i P_ij q_i with grad_out = q.
cudaError_t scft_attn_bwd_dv_cuda(const ScftAttnBwdParams& params, ScftDtype dtype, cudaStream_t stream);

}  // namespace scft
}  // namespace sketchcolor

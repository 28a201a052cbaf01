// The CUDA backend of the correspondence loss: parameter structs, tile configuration and launchers.
//
// Pure C++17 plus the CUDA runtime API header, no torch header (see scft_attention.h for why).
// Shapes use the op's names: B batch (a head axis is folded into it by the caller), N queries,
// M keys, D the head dim, T sampled negatives per query. Element strides are in elements; the last
// axis of q and k has stride 1, their base pointers are 16-byte aligned and their row and batch
// strides are multiples of 8 elements (the torch binding copies inputs that are not into padded
// buffers). Index tensors and outputs are contiguous. Scores are S = scale * q k^T.
//
// The nll loss has no kernel of its own here beyond its row pass: its sums over keys are attention
// with v = k (scft_attn_fwd_cuda with out_f32) and its key gradient is attention's value gradient
// with grad_out = q (scft_attn_bwd_dv_cuda); the binding composes them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/kernel_dtype.h"

namespace sketchcolor {
namespace corr {

// Largest D the binding accepts (as for attention: index arithmetic, not tile shapes, bounds it).
constexpr int kMaxHeadDim = 4096;
constexpr int kSmemPad = 8;   // shared-memory row padding: conflict-free ldmatrix (see scft_attention.h)

// Hardest-negative search: a CTA owns kBlockM query rows and one split of the keys; per key tile
// of kBlockN keys it accumulates S = q k^T over D in kBlockK-wide chunks (a cp.async ring of
// kStages stages), then folds the tile into each row's running (max, lowest argmax) over the keys
// outside the row's exclusion window. Nothing of the tile outlives that step, so the tile stays in
// registers and only the running maxima (two per thread per m16 fragment) cross key tiles. A
// 32-wide D chunk and 4 stages keep the ring at 80 KiB, so two CTAs share an sm_90 or sm_100 SM
// (2 x 85 KiB with the reduction; on sm_80's 164 KiB one CTA per SM runs at a time).
struct CorrHardestSearchConfig {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
  static constexpr int kBlockK = 32;
  static constexpr int kWarpsM = 2;
  static constexpr int kWarpsN = 4;
  static constexpr int kThreads = kWarpsM * kWarpsN * 32;
  static constexpr int kMinBlocksPerSm = 2;   // 64 fp32 accumulators + 32 row-state registers fit 128
  static constexpr int kStages = 4;
  static constexpr int kStride = kBlockK + kSmemPad;
  static constexpr int kStageElems = (kBlockM + kBlockN) * kStride;
  // Stage ring, then the kWarpsN x kBlockM (max, argmax) pairs of the cross-warp reduction.
  static constexpr size_t kSmemBytes =
      size_t(kStages * kStageElems) * 2 + size_t(kWarpsN * kBlockM) * (sizeof(float) + sizeof(int));
};

// The row kernels (sampled triplet terms, hardest finalize, triplet dq, nll rows, row scatter):
// one warp per query or key row, 16-byte loads of D, no shared memory.
struct CorrRowsConfig {
  static constexpr int kThreads = 256;
  static constexpr size_t kSmemBytes = 0;
};

// Dynamic shared memory per kernel configuration (read by tests/test_cuda_compile.py, like
// scft_attention.h's table).
struct CorrKernelSmem {
  const char* config_name;
  size_t dynamic_smem_bytes;
};
inline constexpr CorrKernelSmem kCorrKernelSmemTable[] = {
    {"CorrHardestSearchConfig", CorrHardestSearchConfig::kSmemBytes},
    {"CorrRowsConfig", CorrRowsConfig::kSmemBytes},
};

// q[b, i, c] lives at q + b * q_stride_b + i * q_stride_row + c, and k likewise.
struct CorrInputs {
  const void* q;          // (B, N, D) fp16/bf16
  const void* k;          // (B, M, D) same dtype
  const int64_t* pos;     // (B, N) contiguous, values in [-1, M): the true key of query i, -1 for none
  int64_t q_stride_b, q_stride_row;   // elements
  int64_t k_stride_b, k_stride_row;
  int batch;              // B >= 1
  int n_queries;          // N >= 1
  int n_keys;             // M >= 1
  int head_dim;           // D in [1, kMaxHeadDim]
  float scale;
};

struct CorrTripletParams {
  CorrInputs in;
  const int64_t* neg;     // (B, N, T) contiguous, values in [-1, M)
  float* terms;           // (B, N, T) float32 out: max(0, S[i, neg] - S[i, pos] + margin), 0 if either is -1
  int negatives;          // T >= 1
  float margin;
};

struct CorrHardestParams {
  CorrInputs in;
  float* terms;           // (B, N) float32 out: max(0, S[i, neg_i] - S[i, pos_i] + margin), 0 without neg_i
  int64_t* neg;           // (B, N) int64 out: the lowest-index argmax of S[i, j] over keys more than
                          //   `exclusion` cells (Chebyshev, on the grid) from pos_i; -1 for none
  float* split_best;      // (B, key_splits, N) float32 workspace: each key split's best score
  int* split_arg;         // (B, key_splits, N) int32 workspace: its key, -1 for none
  int grid_h, grid_w;     // key j sits at cell (j / grid_w, j % grid_w); grid_h * grid_w == M
  int exclusion;          // >= 0
  int key_splits;         // >= 1: CTAs per query tile, each searching keys_per_split keys
  int keys_per_split;     // a multiple of CorrHardestSearchConfig::kBlockN
  float margin;
};

// How the search splits the keys so that small N still fills the GPU: enough splits for about two
// CTAs per SM (one wave on sm_90, two on sm_80), at least one whole key tile per split. The
// binding allocates the workspaces by it.
struct CorrHardestPlan {
  int key_splits;
  int keys_per_split;
};

inline CorrHardestPlan corr_hardest_plan(int64_t batch, int64_t n_queries, int64_t n_keys, int num_sms) {
  constexpr int64_t kTileN = CorrHardestSearchConfig::kBlockN, kTileM = CorrHardestSearchConfig::kBlockM;
  const int64_t query_ctas = batch * ((n_queries + kTileM - 1) / kTileM);
  const int64_t key_tiles = (n_keys + kTileN - 1) / kTileN;
  int64_t splits = (2 * int64_t(num_sms > 0 ? num_sms : 1) + query_ctas - 1) / query_ctas;
  splits = splits < 1 ? 1 : (splits > key_tiles ? key_tiles : splits);
  const int64_t tiles_per_split = (key_tiles + splits - 1) / splits;
  CorrHardestPlan plan;
  plan.keys_per_split = static_cast<int>(tiles_per_split * kTileN);
  plan.key_splits = static_cast<int>((key_tiles + tiles_per_split - 1) / tiles_per_split);
  return plan;
}

struct CorrTripletGradQParams {
  CorrInputs in;          // q is not read: grad_q_i = sum_t coef_it (k[neg_it] - k[pos_i])
  const int64_t* neg;     // (B, N, T) contiguous
  const float* coef;      // (B, N, T) float32 contiguous: d loss / d term * scale where the term is
                          //   positive (then pos and neg are valid), else 0
  void* grad_q;           // (B, N, D) q's dtype, contiguous out
  int negatives;          // T
};

// out[r] (+)= sum over e in [offsets[r], offsets[r + 1]) of entry_coef[e] * src_row(entry_row[e]):
// a scatter of source rows into destination rows with no atomics. Each destination row is summed
// by one warp in the entries' order, so the result is bitwise reproducible.
struct CorrRowScatterParams {
  const void* src;        // source rows: row s = b * src_rows + i at src + b * src_stride_b + i * src_stride_row
  int64_t src_stride_b, src_stride_row;
  int src_batches;        // B
  int src_rows;           // source rows per batch (N)
  const int* entry_row;   // (E) int32: the source row of each entry, grouped by destination
  const float* entry_coef;  // (E) float32
  const int64_t* offsets; // (R + 1) int64, non-decreasing, offsets[R] <= E
  void* out;              // (R, D) src's dtype, contiguous: overwritten (0 for rows without entries), or
  float* out_f32;         // (R, D) float32, contiguous: added to; exactly one of the two is set
  int rows;               // R
  int head_dim;           // D
};

struct CorrNllRowsParams {
  CorrInputs in;
  const float* lse;       // (B, N) float32 contiguous: logsumexp_j S[i, j]
  float* terms;           // (B, N) float32 out: lse_i - S[i, pos_i], 0 where pos_i = -1
  // Both set when the gradient is wanted, both null otherwise:
  const float* attn;      // (B, N, D) float32 contiguous: sum_j P_ij k_j, P = softmax_j S[i, j]
  float* grad_q;          // (B, N, D) float32 out: attn_i - k[pos_i] (d term_i / d q_i over scale), 0 where pos_i = -1
  float* lse_masked;      // (B, N) float32 out: lse_i, +inf where pos_i = -1 (so that P_i. = 0 downstream)
};

// Launchers (correspondence_loss_kernel.cu). They validate the parameters, enqueue on `stream` and
// return the first CUDA error (cudaErrorInvalidValue for parameters the kernels cannot take),
// never swallowing one. No atomics anywhere: results are bitwise reproducible.
cudaError_t corr_triplet_fwd_cuda(const CorrTripletParams& params, KernelDtype dtype, cudaStream_t stream);
// The search over key splits, then one warp per query reduces the splits and forms the term.
cudaError_t corr_hardest_fwd_cuda(const CorrHardestParams& params, KernelDtype dtype, cudaStream_t stream);
cudaError_t corr_triplet_grad_q_cuda(const CorrTripletGradQParams& params, KernelDtype dtype, cudaStream_t stream);
cudaError_t corr_row_scatter_cuda(const CorrRowScatterParams& params, KernelDtype dtype, cudaStream_t stream);
cudaError_t corr_nll_rows_cuda(const CorrNllRowsParams& params, KernelDtype dtype, cudaStream_t stream);

}  // namespace corr
}  // namespace sketchcolor

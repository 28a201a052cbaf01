// CUDA kernels and launchers of the correspondence loss (fp16 / bf16 inputs, fp32 arithmetic).
//
// No torch header (see scft_attention_kernel.cu). Shapes and parameters: correspondence_loss.h.
//
// Kernels:
//   corr_hardest_search_kernel   per (query tile, key split): S = q k^T over D on tensor cores
//                                (mma.sync, operands through a cp.async ring), folded per key tile
//                                into each row's masked running (max, lowest argmax)
//   corr_hardest_finalize_kernel one warp per query: reduce the splits, S[i, pos_i], the term
//   corr_triplet_terms_kernel    one warp per query: the sampled triplet terms (gathered dots)
//   corr_triplet_grad_q_kernel   one warp per query: grad_q_i = sum_t coef_it (k[neg_it] - k[pos_i])
//   corr_row_scatter_kernel      one warp per destination row: sum of coefficient * source row over
//                                its sorted entries (grad_k without atomics)
//   corr_nll_rows_kernel         one warp per query: the nll term, grad_q, the masked lse
//
// The sampled and row kernels move O(N * T * D) or O(N * D) bytes and do as many flops: they are
// bandwidth-bound gathers, so they use 16-byte loads and fp32 FMAs, not tensor cores. Only the
// hardest search does N * M * D work.
#include "correspondence_loss/correspondence_loss.h"

#include <cstdint>

#include "common/tile_mma.cuh"

namespace sketchcolor {
namespace corr {
namespace {

using namespace tiles;

// ---------------------------------------------------------------------------------------------
// Row helpers: a warp walks a D-long row in 8-element pieces, lane l owning pieces l, l + 32, ...
constexpr int kPiece = 8;
constexpr int kWarpSpan = 32 * kPiece;

// x[0..8) = row[c..c+8) in fp32 (0 past n). The row is 16-byte aligned; a full piece is one
// 16-byte load, a tail piece is read element by element.
template <typename T>
__device__ __forceinline__ void load_piece(float (&x)[kPiece], const uint16_t* row, int c, int n) {
  if (c + kPiece <= n) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + c));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = Elem<T>::unpack(w[i]);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPiece; ++i) x[i] = c + i < n ? Elem<T>::to_float(row[c + i]) : 0.f;
  }
}

// row[c..min(c+8, n)) = x in T. The row is 16-byte aligned (outputs are contiguous with D a
// multiple of 8) only when aligned_rows; otherwise pieces are stored element by element.
template <typename T>
__device__ __forceinline__ void store_piece(uint16_t* row, int c, int n, bool aligned_rows, const float (&x)[kPiece]) {
  if (aligned_rows && c + kPiece <= n) {
    uint4 v;
    v.x = Elem<T>::pack(x[0], x[1]);
    v.y = Elem<T>::pack(x[2], x[3]);
    v.z = Elem<T>::pack(x[4], x[5]);
    v.w = Elem<T>::pack(x[6], x[7]);
    store_vector(reinterpret_cast<uint4*>(row + c), v);
  } else {
#pragma unroll
    for (int i = 0; i < kPiece; ++i)
      if (c + i < n) row[c + i] = Elem<T>::from_float(x[i]);
  }
}

struct RowRef {
  int64_t id;   // b * N + i
  int b, i;
};

// The query row of this warp (one per warp, blockIdx.x-major), or id = -1 past the last one.
__device__ __forceinline__ RowRef warp_query_row(int rows_per_batch, int64_t total_rows) {
  constexpr int kWarpsPerBlock = CorrRowsConfig::kThreads / 32;
  RowRef r;
  r.id = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r.id >= total_rows) {
    r.id = -1;
    return r;
  }
  r.b = int(r.id / rows_per_batch);
  r.i = int(r.id - int64_t(r.b) * rows_per_batch);
  return r;
}

__device__ __forceinline__ const uint16_t* q_row(const CorrInputs& in, int b, int i) {
  return static_cast<const uint16_t*>(in.q) + b * in.q_stride_b + int64_t(i) * in.q_stride_row;
}
__device__ __forceinline__ const uint16_t* k_row(const CorrInputs& in, int b, int64_t j) {
  return static_cast<const uint16_t*>(in.k) + b * in.k_stride_b + j * in.k_stride_row;
}

// Whether score a ranks above score b: larger, or NaN where b is not (torch.argmax, the
// reference's, ranks NaN above every number). x != x is true for NaN alone (--use_fast_math
// does not assume finite values).
__device__ __forceinline__ bool ranks_above(float a, float b) { return a > b || (a != a && b == b); }

// max(0, x) that keeps a NaN x (fmaxf(0, NaN) is 0): a NaN score must reach the loss, as it does
// through the reference's relu, instead of becoming a zero term.
__device__ __forceinline__ float hinge(float x) { return x < 0.f ? 0.f : x; }

// (value, key) candidates of an argmax: a key >= 0 beats none, a value ranking above beats the
// other, and values of one rank (equal, or both NaN) go to the lower key. A total order, so any
// reduction order gives one answer.
__device__ __forceinline__ bool beats(float value, int key, float best, int best_key) {
  const bool same_rank = value == best || (value != value && best != best);
  return key >= 0 && (best_key < 0 || ranks_above(value, best) || (same_rank && key < best_key));
}

__device__ __forceinline__ void warp_argmax(float& best, int& best_key) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, offset);
    const int key = __shfl_xor_sync(0xffffffffu, best_key, offset);
    if (beats(v, key, best, best_key)) {
      best = v;
      best_key = key;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Hardest-negative search.
//
// Grid (ceil(N / kBlockM), key_splits, B). The job sequence is (key tile, D chunk) pairs in
// order; all flow through one ring of kStages stages, so the next tile's first chunks load while
// this tile is folded into the running maxima. Warp (wm, wn) owns rows [wm * 64, +64) and key
// columns [wn * 32, +32) of every tile; each thread then sees 8 rows x 8 keys per tile, in
// increasing key order, so a strict ">" keeps its lowest-index maximum.
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSm) corr_hardest_search_kernel(const CorrHardestParams p) {
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kBlockK = Cfg::kBlockK;
  constexpr int kThreads = Cfg::kThreads, kStages = Cfg::kStages, kWarpsN = Cfg::kWarpsN;
  constexpr int kWarpRows = kBlockM / Cfg::kWarpsM, kWarpKeys = kBlockN / kWarpsN;
  constexpr int kMt = kWarpRows / 16, kNt = kWarpKeys / 8;
  constexpr uint32_t kStageBytes = Cfg::kStageElems * 2;
  static_assert(kWarpRows % 16 == 0 && kWarpKeys % 16 == 0 && kBlockK % 16 == 0, "warp tiles are 16-aligned");

  unsigned char* const smem = dynamic_smem();
  const uint32_t stage_base = smem_addr(smem);
  float* red_best = reinterpret_cast<float*>(smem + kStages * kStageBytes);
  int* red_key = reinterpret_cast<int*>(red_best + kWarpsN * kBlockM);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / kWarpsN;
  const int warp_n = warp % kWarpsN;
  const int group = lane >> 2;
  const int quad_lane = lane & 3;

  const CorrInputs& in = p.in;
  const int n_queries = in.n_queries, head_dim = in.head_dim;
  const int m0 = blockIdx.x * kBlockM;
  const int split = blockIdx.y;
  const int b = blockIdx.z;
  const int key_begin = split * p.keys_per_split;
  const int key_end = min(in.n_keys, key_begin + p.keys_per_split);
  const uint16_t* q = static_cast<const uint16_t*>(in.q) + b * in.q_stride_b;
  const uint16_t* k = static_cast<const uint16_t*>(in.k) + b * in.k_stride_b;

  // Per owned row (m tile, row half): its pos cell and its running best.
  int pos_row[kMt][2], pos_col[kMt][2];
  float best[kMt][2];
  int best_key[kMt][2];
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp_m * kWarpRows + mt * 16 + half * 8 + group;
      const int64_t pos = row < n_queries ? in.pos[int64_t(b) * n_queries + row] : -1;
      // A row without pos gets a cell no key is outside of: it never takes a candidate.
      pos_row[mt][half] = pos >= 0 ? int(pos / p.grid_w) : -1;
      pos_col[mt][half] = pos >= 0 ? int(pos % p.grid_w) : -1;
      best[mt][half] = -INFINITY;
      best_key[mt][half] = -1;
    }

  const int qk_jobs = ceil_div(head_dim, kBlockK);
  const int key_tiles = ceil_div(key_end - key_begin, kBlockN);
  const int total_jobs = key_tiles * qk_jobs;

  int load_job = 0;
  auto issue_next_job = [&]() {
    if (load_job < total_jobs) {
      const uint32_t stage = stage_base + uint32_t(load_job % kStages) * kStageBytes;
      const int tile = load_job / qk_jobs;
      const int d0 = (load_job - tile * qk_jobs) * kBlockK;
      load_tile_async<kBlockM, kBlockK, kThreads>(stage, Cfg::kStride, q, in.q_stride_row, m0, n_queries, d0,
                                                  head_dim, tid);
      load_tile_async<kBlockN, kBlockK, kThreads>(stage + kBlockM * Cfg::kStride * 2, Cfg::kStride, k,
                                                  in.k_stride_row, key_begin + tile * kBlockN, key_end, d0, head_dim,
                                                  tid);
    }
    cp_async_commit();
    ++load_job;
  };

#pragma unroll 1
  for (int i = 0; i < kStages - 1; ++i) issue_next_job();

  float acc[kMt][kNt][4];
  int job = 0;
#pragma unroll 1
  for (int tile = 0; tile < key_tiles; ++tile) {
    zero_acc(acc);
#pragma unroll 1
    for (int step = 0; step < qk_jobs; ++step, ++job) {
      ring_wait_and_refill<kStages>(issue_next_job);
      const uint32_t q_tile = stage_base + uint32_t(job % kStages) * kStageBytes;
      const uint32_t k_tile = q_tile + kBlockM * Cfg::kStride * 2;
      warp_mma_chunk_nk<T, kMt, kNt, kBlockK>(acc, q_tile, Cfg::kStride, warp_m * kWarpRows, k_tile, Cfg::kStride,
                                              warp_n * kWarpKeys, lane);
    }
    // ---- fold the tile into the running maxima ----
    const int key_base = key_begin + tile * kBlockN + warp_n * kWarpKeys + quad_lane * 2;
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int odd = 0; odd < 2; ++odd) {
        const int key = key_base + nt * 8 + odd;
        if (key >= key_end) continue;
        const int key_row = key / p.grid_w;
        const int key_col = key - key_row * p.grid_w;
#pragma unroll
        for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const bool outside = pos_row[mt][half] >= 0 && (abs(key_row - pos_row[mt][half]) > p.exclusion ||
                                                             abs(key_col - pos_col[mt][half]) > p.exclusion);
            const float s = acc[mt][nt][2 * half + odd] * in.scale;
            if (outside && (best_key[mt][half] < 0 || ranks_above(s, best[mt][half]))) {
              best[mt][half] = s;
              best_key[mt][half] = key;
            }
          }
      }
  }
  cp_async_wait<0>();

  // ---- reduce each row over its quad (4 lanes), then over the kWarpsN warps sharing it ----
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float v = best[mt][half];
      int key = best_key[mt][half];
#pragma unroll
      for (int offset = 1; offset <= 2; offset <<= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, v, offset);
        const int other_key = __shfl_xor_sync(0xffffffffu, key, offset);
        if (beats(other, other_key, v, key)) {
          v = other;
          key = other_key;
        }
      }
      if (quad_lane == 0) {
        const int slot = warp_n * kBlockM + warp_m * kWarpRows + mt * 16 + half * 8 + group;
        red_best[slot] = v;
        red_key[slot] = key;
      }
    }
  __syncthreads();
  for (int row_local = tid; row_local < kBlockM; row_local += kThreads) {
    const int row = m0 + row_local;
    if (row >= n_queries) continue;
    float v = red_best[row_local];
    int key = red_key[row_local];
    for (int wn = 1; wn < kWarpsN; ++wn) {
      if (beats(red_best[wn * kBlockM + row_local], red_key[wn * kBlockM + row_local], v, key)) {
        v = red_best[wn * kBlockM + row_local];
        key = red_key[wn * kBlockM + row_local];
      }
    }
    const int64_t slot = (int64_t(b) * p.key_splits + split) * n_queries + row;
    p.split_best[slot] = v;
    p.split_arg[slot] = key;
  }
}

// Cfg is always CorrRowsConfig; as a template argument it names the configuration in the kernel's
// symbol, where the compile test looks for it.
template <typename T, typename Cfg = CorrRowsConfig>
__global__ void __launch_bounds__(Cfg::kThreads) corr_hardest_finalize_kernel(const CorrHardestParams p) {
  const CorrInputs& in = p.in;
  const RowRef r = warp_query_row(in.n_queries, int64_t(in.batch) * in.n_queries);
  if (r.id < 0) return;
  const int lane = threadIdx.x & 31;
  float best = -INFINITY;
  int best_key = -1;
  for (int s = lane; s < p.key_splits; s += 32) {
    const int64_t slot = (int64_t(r.b) * p.key_splits + s) * in.n_queries + r.i;
    if (beats(p.split_best[slot], p.split_arg[slot], best, best_key)) {
      best = p.split_best[slot];
      best_key = p.split_arg[slot];
    }
  }
  warp_argmax(best, best_key);   // every lane now holds the row's answer: the branch below is warp-uniform
  const int64_t pos = in.pos[r.id];
  float term = 0.f;
  if (pos >= 0 && best_key >= 0) {
    const float s_pos = in.scale * warp_row_dot<T>(q_row(in, r.b, r.i), k_row(in, r.b, pos), in.head_dim, lane);
    term = hinge(best - s_pos + p.margin);
  } else {
    best_key = -1;
  }
  if (lane == 0) {
    p.terms[r.id] = term;
    p.neg[r.id] = best_key;
  }
}

// ---------------------------------------------------------------------------------------------
// Sampled triplet.

template <typename T, typename Cfg = CorrRowsConfig>
__global__ void __launch_bounds__(Cfg::kThreads) corr_triplet_terms_kernel(const CorrTripletParams p) {
  const CorrInputs& in = p.in;
  const RowRef r = warp_query_row(in.n_queries, int64_t(in.batch) * in.n_queries);
  if (r.id < 0) return;
  const int lane = threadIdx.x & 31;
  const int64_t pos = in.pos[r.id];
  float* terms = p.terms + r.id * p.negatives;
  const int64_t* neg = p.neg + r.id * p.negatives;
  if (pos < 0) {
    for (int t = lane; t < p.negatives; t += 32) terms[t] = 0.f;
    return;
  }
  const uint16_t* qi = q_row(in, r.b, r.i);
  const float s_pos = in.scale * warp_row_dot<T>(qi, k_row(in, r.b, pos), in.head_dim, lane);
  for (int t = 0; t < p.negatives; ++t) {
    const int64_t j = neg[t];   // the same for every lane: the branch is warp-uniform
    float term = 0.f;
    if (j >= 0) {
      const float s_neg = in.scale * warp_row_dot<T>(qi, k_row(in, r.b, j), in.head_dim, lane);
      term = hinge(s_neg - s_pos + p.margin);
    }
    if (lane == 0) terms[t] = term;
  }
}

template <typename T, typename Cfg = CorrRowsConfig>
__global__ void __launch_bounds__(Cfg::kThreads) corr_triplet_grad_q_kernel(const CorrTripletGradQParams p) {
  const CorrInputs& in = p.in;
  const RowRef r = warp_query_row(in.n_queries, int64_t(in.batch) * in.n_queries);
  if (r.id < 0) return;
  const int lane = threadIdx.x & 31;
  const int head_dim = in.head_dim;
  const float* coef = p.coef + r.id * p.negatives;
  const int64_t* neg = p.neg + r.id * p.negatives;
  const int64_t pos = in.pos[r.id];
  uint16_t* out = static_cast<uint16_t*>(p.grad_q) + r.id * head_dim;
  const bool aligned_rows = head_dim % kPiece == 0;
  float coef_sum = 0.f;
  for (int t = 0; t < p.negatives; ++t) coef_sum += coef[t];
  for (int c = lane * kPiece; c < head_dim; c += kWarpSpan) {
    float acc[kPiece] = {};
    if (pos >= 0) {   // pos = -1 makes every coefficient 0: the row's gradient is 0
      float x[kPiece];
      load_piece<T>(x, k_row(in, r.b, pos), c, head_dim);
#pragma unroll
      for (int e = 0; e < kPiece; ++e) acc[e] = -coef_sum * x[e];
      for (int t = 0; t < p.negatives; ++t) {
        if (coef[t] == 0.f) continue;   // an inactive term (its neg may be -1)
        load_piece<T>(x, k_row(in, r.b, neg[t]), c, head_dim);
#pragma unroll
        for (int e = 0; e < kPiece; ++e) acc[e] = fmaf(coef[t], x[e], acc[e]);
      }
    }
    store_piece<T>(out, c, head_dim, aligned_rows, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Deterministic row scatter: one warp per destination row.

template <typename T, typename Cfg = CorrRowsConfig>
__global__ void __launch_bounds__(Cfg::kThreads) corr_row_scatter_kernel(const CorrRowScatterParams p) {
  constexpr int kWarpsPerBlock = CorrRowsConfig::kThreads / 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  const int lane = threadIdx.x & 31;
  const int head_dim = p.head_dim;
  const int64_t first = p.offsets[row], last = p.offsets[row + 1];
  if (p.out_f32 != nullptr && first == last) return;   // adds nothing
  const bool aligned_rows = head_dim % kPiece == 0;
  for (int c = lane * kPiece; c < head_dim; c += kWarpSpan) {
    float acc[kPiece] = {};
    for (int64_t e = first; e < last; ++e) {
      const int src_row = p.entry_row[e];
      const int b = src_row / p.src_rows;
      const int i = src_row - b * p.src_rows;
      float x[kPiece];
      load_piece<T>(x, static_cast<const uint16_t*>(p.src) + b * p.src_stride_b + int64_t(i) * p.src_stride_row, c,
                    head_dim);
      const float w = p.entry_coef[e];
#pragma unroll
      for (int j = 0; j < kPiece; ++j) acc[j] = fmaf(w, x[j], acc[j]);
    }
    if (p.out_f32 != nullptr) {
      float* out = p.out_f32 + row * head_dim;
#pragma unroll
      for (int j = 0; j < kPiece; ++j)
        if (c + j < head_dim) out[c + j] += acc[j];
    } else {
      store_piece<T>(static_cast<uint16_t*>(p.out) + row * head_dim, c, head_dim, aligned_rows, acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// nll rows.

template <typename T, typename Cfg = CorrRowsConfig>
__global__ void __launch_bounds__(Cfg::kThreads) corr_nll_rows_kernel(const CorrNllRowsParams p) {
  const CorrInputs& in = p.in;
  const RowRef r = warp_query_row(in.n_queries, int64_t(in.batch) * in.n_queries);
  if (r.id < 0) return;
  const int lane = threadIdx.x & 31;
  const int head_dim = in.head_dim;
  const int64_t pos = in.pos[r.id];
  float* grad = p.grad_q != nullptr ? p.grad_q + r.id * head_dim : nullptr;
  if (pos < 0) {
    if (lane == 0) {
      p.terms[r.id] = 0.f;
      p.lse_masked[r.id] = INFINITY;
    }
    if (grad != nullptr)
      for (int c = lane; c < head_dim; c += 32) grad[c] = 0.f;
    return;
  }
  const uint16_t* k_pos = k_row(in, r.b, pos);
  const float s_pos = in.scale * warp_row_dot<T>(q_row(in, r.b, r.i), k_pos, head_dim, lane);
  if (lane == 0) {
    p.terms[r.id] = p.lse[r.id] - s_pos;
    p.lse_masked[r.id] = p.lse[r.id];
  }
  if (grad == nullptr) return;
  const float* attn = p.attn + r.id * head_dim;
  for (int c = lane * kPiece; c < head_dim; c += kWarpSpan) {
    float x[kPiece];
    load_piece<T>(x, k_pos, c, head_dim);
#pragma unroll
    for (int j = 0; j < kPiece; ++j)
      if (c + j < head_dim) grad[c + j] = attn[c + j] - x[j];
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

bool inputs_ok(const CorrInputs& in) {
  return in.q != nullptr && in.k != nullptr && in.pos != nullptr && aligned16(in.q) && aligned16(in.k) &&
         in.batch >= 1 && in.batch <= 65535 && in.n_queries >= 1 && in.n_keys >= 1 && in.head_dim >= 1 &&
         in.head_dim <= kMaxHeadDim && int64_t(in.batch) * in.n_queries <= INT32_MAX &&
         stride_ok(in.q_stride_b, in.batch) && stride_ok(in.q_stride_row, in.n_queries) &&
         stride_ok(in.k_stride_b, in.batch) && stride_ok(in.k_stride_row, in.n_keys);
}

// One warp per row of `rows`.
dim3 rows_grid(int64_t rows) {
  constexpr int kWarpsPerBlock = CorrRowsConfig::kThreads / 32;
  return dim3(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
}

template <typename T>
cudaError_t hardest_dispatch(const CorrHardestParams& p, cudaStream_t stream) {
  using Cfg = CorrHardestSearchConfig;
  auto search = corr_hardest_search_kernel<T, Cfg>;
  cudaError_t err = prepare_smem(search, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(p.in.n_queries, Cfg::kBlockM), p.key_splits, p.in.batch);
  err = launch_kernel(search, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p);
  if (err != cudaSuccess) return err;
  return launch_kernel(corr_hardest_finalize_kernel<T>, rows_grid(int64_t(p.in.batch) * p.in.n_queries),
                       dim3(CorrRowsConfig::kThreads), 0, stream, p);
}

// Runs launch.template operator()<T>() for the dtype.
template <typename Launch>
cudaError_t by_dtype(KernelDtype dtype, Launch launch) {
  switch (dtype) {
    case KernelDtype::kFloat16:
      return launch(__half{});
    case KernelDtype::kBFloat16:
      return launch(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t corr_triplet_fwd_cuda(const CorrTripletParams& p, KernelDtype dtype, cudaStream_t stream) {
  if (!inputs_ok(p.in) || p.neg == nullptr || p.terms == nullptr || p.negatives < 1) return cudaErrorInvalidValue;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t rows = int64_t(p.in.batch) * p.in.n_queries;
    return launch_kernel(corr_triplet_terms_kernel<T>, rows_grid(rows), dim3(CorrRowsConfig::kThreads), 0, stream, p);
  });
}

cudaError_t corr_hardest_fwd_cuda(const CorrHardestParams& p, KernelDtype dtype, cudaStream_t stream) {
  constexpr int kTileN = CorrHardestSearchConfig::kBlockN;
  if (!inputs_ok(p.in) || p.terms == nullptr || p.neg == nullptr || p.split_best == nullptr ||
      p.split_arg == nullptr)
    return cudaErrorInvalidValue;
  if (p.grid_h < 1 || p.grid_w < 1 || int64_t(p.grid_h) * p.grid_w != p.in.n_keys || p.exclusion < 0)
    return cudaErrorInvalidValue;
  if (p.key_splits < 1 || p.key_splits > 65535 || p.keys_per_split < kTileN || p.keys_per_split % kTileN != 0 ||
      int64_t(p.key_splits) * p.keys_per_split < p.in.n_keys ||
      int64_t(p.key_splits - 1) * p.keys_per_split >= p.in.n_keys)   // every split has a key
    return cudaErrorInvalidValue;
  return by_dtype(dtype, [&](auto tag) { return hardest_dispatch<decltype(tag)>(p, stream); });
}

cudaError_t corr_triplet_grad_q_cuda(const CorrTripletGradQParams& p, KernelDtype dtype, cudaStream_t stream) {
  if (!inputs_ok(p.in) || p.neg == nullptr || p.coef == nullptr || p.grad_q == nullptr || !aligned16(p.grad_q) ||
      p.negatives < 1)
    return cudaErrorInvalidValue;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t rows = int64_t(p.in.batch) * p.in.n_queries;
    return launch_kernel(corr_triplet_grad_q_kernel<T>, rows_grid(rows), dim3(CorrRowsConfig::kThreads), 0, stream, p);
  });
}

cudaError_t corr_row_scatter_cuda(const CorrRowScatterParams& p, KernelDtype dtype, cudaStream_t stream) {
  if (p.src == nullptr || !aligned16(p.src) || p.entry_row == nullptr || p.entry_coef == nullptr ||
      p.offsets == nullptr || p.rows < 1 || p.src_rows < 1 || p.head_dim < 1 || p.head_dim > kMaxHeadDim)
    return cudaErrorInvalidValue;
  if ((p.out == nullptr) == (p.out_f32 == nullptr)) return cudaErrorInvalidValue;   // exactly one output
  if (p.out != nullptr && !aligned16(p.out)) return cudaErrorInvalidValue;
  if (p.src_batches < 1 || int64_t(p.src_batches) * p.src_rows > INT32_MAX) return cudaErrorInvalidValue;
  if (!stride_ok(p.src_stride_b, p.src_batches) || !stride_ok(p.src_stride_row, p.src_rows)) return cudaErrorInvalidValue;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_kernel(corr_row_scatter_kernel<T>, rows_grid(p.rows), dim3(CorrRowsConfig::kThreads), 0, stream, p);
  });
}

cudaError_t corr_nll_rows_cuda(const CorrNllRowsParams& p, KernelDtype dtype, cudaStream_t stream) {
  if (!inputs_ok(p.in) || p.lse == nullptr || p.terms == nullptr || p.lse_masked == nullptr)
    return cudaErrorInvalidValue;
  if ((p.grad_q == nullptr) != (p.attn == nullptr)) return cudaErrorInvalidValue;   // both or neither
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t rows = int64_t(p.in.batch) * p.in.n_queries;
    return launch_kernel(corr_nll_rows_kernel<T>, rows_grid(rows), dim3(CorrRowsConfig::kThreads), 0, stream, p);
  });
}

}  // namespace corr
}  // namespace sketchcolor

// CPU kernels of the correspondence loss. Nothing of size N x M is ever allocated:
//  - sampled triplet: dot products of q_i with gathered k rows; the backward gathers for dq and
//    scatters into dk through a per-key list of contributions (deterministic, no atomics);
//  - hardest triplet: GEMM score tiles streamed past each query tile with a masked running
//    max/argmax; its backward is the sampled-triplet backward with the chosen negatives;
//  - nll: the loss and its gradient in one pass over GEMM score tiles (see nll_loss_kernel).
// Scores are float32 for float16 and bfloat16 inputs, as on every backend (the margin and the
// hardest negative's rank are differences of scores): the gather kernels accumulate in float32,
// and the GEMM kernels take float32 copies of q and k (see score_input).
// Parallel work is split over query tiles (or keys), so every core is busy at batch 1.
#include "correspondence_loss/correspondence_loss_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/avx512.h"
#include "common/cpu_isa.h"
#include "common/cpu_parallel.h"
#include "correspondence_loss/correspondence_loss_checks.h"
#include "scft_attention/tile_gemm.h"

namespace sketchcolor {
namespace {

// Query rows per tile: the (BLOCK_Q x D) query tile stays in L2 while the key tiles stream past.
constexpr int64_t BLOCK_Q = 128;
// Keys per tile: the (BLOCK_Q x BLOCK_K) fp32 score tile (128 KiB) stays in L2 between the GEMM
// that writes it and the passes that read it.
constexpr int64_t BLOCK_K = 256;
// Query rows per work item of the gather kernels: each row costs (T + 1) dot products of length D.
constexpr int64_t ROW_GRAIN = 16;


// a . b over d elements in the accumulator type. Eight independent partial sums let the
// compiler vectorize without reassociating a single chain; the order is fixed, so the result is
// the same on every call.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
acc_t dot(const scalar_t* a, const scalar_t* b, int64_t d) {
  constexpr int64_t kLanes = 8;
  acc_t lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += static_cast<acc_t>(a[c + l]) * static_cast<acc_t>(b[c + l]);
  }
  acc_t sum = 0;
  for (; c < d; ++c) sum += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// The same loop built for AVX-512, where the compiler vectorizes it 8 doubles (16 floats) wide
// instead of baseline x86-64's 2 (4): the triplet backward's double sums (below) run here.
template <typename scalar_t, typename acc_t>
SKETCHCOLOR_AVX512_TARGET void add_scaled_avx512(acc_t* out, const scalar_t* x, acc_t alpha, int64_t d) {
  for (int64_t c = 0; c < d; ++c) out[c] += alpha * static_cast<acc_t>(x[c]);
}

// max(0, x) that keeps a NaN x (std::max(acc_t(0), NaN) is 0): a NaN score must reach the loss,
// as it does through the reference's relu, instead of becoming a zero term.
template <typename acc_t>
acc_t hinge(acc_t x) {
  return x < acc_t(0) ? acc_t(0) : x;
}

// Whether score a ranks above score b in the hardest-negative search: larger, or NaN where b is
// not (torch.argmax, the reference's, ranks NaN above every number).
template <typename acc_t>
bool ranks_above(acc_t a, acc_t b) {
  return a > b || (std::isnan(a) && !std::isnan(b));
}

// out += alpha * x over d elements.
template <typename scalar_t, typename acc_t>
void add_scaled(acc_t* out, const scalar_t* x, acc_t alpha, int64_t d) {
  for (int64_t c = 0; c < d; ++c) out[c] += alpha * static_cast<acc_t>(x[c]);
}

template <typename scalar_t>
void triplet_forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos, const at::Tensor& neg,
                            const at::Tensor& terms, double scale, double margin) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = q.size(1), m = k.size(1), d = q.size(2), negatives = neg.size(2);
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const int64_t* pos_data = pos.const_data_ptr<int64_t>();
  const int64_t* neg_data = neg.const_data_ptr<int64_t>();
  acc_t* terms_data = terms.mutable_data_ptr<acc_t>();
  const acc_t scale_acc = static_cast<acc_t>(scale), margin_acc = static_cast<acc_t>(margin);

  parallel_for_in_caller_state(0, q.size(0) * n, ROW_GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = b * N + i
      const int64_t p = pos_data[row];
      const int64_t* row_neg = neg_data + row * negatives;
      acc_t* row_terms = terms_data + row * negatives;
      if (p < 0) {
        std::fill(row_terms, row_terms + negatives, acc_t(0));
        continue;
      }
      const scalar_t* q_row = q_data + row * d;
      const scalar_t* k_batch = k_data + (row / n) * m * d;
      const acc_t pos_score = scale_acc * dot(q_row, k_batch + p * d, d);
      for (int64_t t = 0; t < negatives; ++t) {
        const int64_t j = row_neg[t];
        row_terms[t] =
            j < 0 ? acc_t(0) : hinge(scale_acc * dot(q_row, k_batch + j * d, d) - pos_score + margin_acc);
      }
    }
  });
}

// dq_i = sum_t c_it (k[neg_it] - k[pos_i]) and dk_j = sum over (i, t) with neg_it = j of c_it q_i
// minus sum over i with pos_i = j of (sum_t c_it) q_i, where c_it = scale * grad_it for positive
// terms and 0 otherwise. grad_q (B, N, D) and grad_k (B, M, D) are zero-filled accumulators.
template <typename scalar_t>
void triplet_backward_kernel(const at::Tensor& grad_terms, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& pos, const at::Tensor& neg, const at::Tensor& terms, double scale,
                             const at::Tensor& grad_q, const at::Tensor& grad_k) {
  using acc_t = acc_type<scalar_t>;
  const int64_t batch = q.size(0), n = q.size(1), m = k.size(1), d = q.size(2), negatives = neg.size(2);
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const int64_t* pos_data = pos.const_data_ptr<int64_t>();
  const int64_t* neg_data = neg.const_data_ptr<int64_t>();
  const acc_t* grad_data = grad_terms.const_data_ptr<acc_t>();
  const acc_t* terms_data = terms.const_data_ptr<acc_t>();
  acc_t* grad_q_data = grad_q.mutable_data_ptr<acc_t>();
  acc_t* grad_k_data = grad_k.mutable_data_ptr<acc_t>();
  const acc_t scale_acc = static_cast<acc_t>(scale);

  // Per-term coefficients c_it (B*N, T) and their row sums, the coefficient of k[pos_i] (B*N).
  // dk sums in double (sum_t), rounded once per entry: a key gathers up to N (T + 1) terms of
  // either sign, and float32 partial sums lose about twice what the reference's blocked GEMM does
  // (seen at N = 257, T = 32, D = 992). The sums read each q row once either way, so the wider
  // accumulator costs little.
  using sum_t = double;
  std::vector<acc_t> coef(batch * n * negatives);
  std::vector<sum_t> pos_coef(batch * n);
  parallel_for_in_caller_state(0, batch * n, ROW_GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t p = pos_data[row];
      sum_t sum = 0;
      for (int64_t t = 0; t < negatives; ++t) {
        const int64_t term = row * negatives + t;
        // Invalid terms are 0 in a forward's output; checking the indices too keeps any
        // `terms` argument from addressing key -1.
        const bool active = terms_data[term] > 0 && p >= 0 && neg_data[term] >= 0;
        coef[term] = active ? scale_acc * grad_data[term] : acc_t(0);
        sum += coef[term];
      }
      pos_coef[row] = sum;
      if (p < 0) continue;
      acc_t* dq = grad_q_data + row * d;
      const scalar_t* k_batch = k_data + (row / n) * m * d;
      for (int64_t t = 0; t < negatives; ++t) {
        const acc_t c = coef[row * negatives + t];
        if (c != 0) add_scaled(dq, k_batch + neg_data[row * negatives + t] * d, c, d);
      }
      if (sum != 0) add_scaled(dq, k_batch + p * d, static_cast<acc_t>(-sum), d);
    }
  });

  // dk as a segmented sum: per batch, the contributions (query row, coefficient) grouped by key
  // in a CSR list built in query order, then summed per key in that order. Batch b's entries
  // start at b * N * (T + 1); key_begin (B, M + 1) holds absolute offsets.
  const int64_t entries_per_batch = n * (negatives + 1);
  std::vector<int64_t> key_begin(batch * (m + 1)), entry_row(batch * entries_per_batch);
  std::vector<sum_t> entry_coef(batch * entries_per_batch);
  parallel_for_in_caller_state(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> cursor(m + 1);
    for (int64_t b = begin; b < end; ++b) {
      // Visits the nonzero contributions of batch b in a fixed order: query i, then pos before negatives.
      auto for_each_contribution = [&](auto&& emit) {
        for (int64_t i = 0; i < n; ++i) {
          const int64_t row = b * n + i;
          if (pos_coef[row] != 0) emit(pos_data[row], i, -pos_coef[row]);
          for (int64_t t = 0; t < negatives; ++t) {
            const sum_t c = coef[row * negatives + t];
            if (c != 0) emit(neg_data[row * negatives + t], i, c);
          }
        }
      };
      std::fill(cursor.begin(), cursor.end(), 0);
      for_each_contribution([&](int64_t key, int64_t, sum_t) { ++cursor[key + 1]; });
      cursor[0] = b * entries_per_batch;
      for (int64_t j = 0; j < m; ++j) cursor[j + 1] += cursor[j];
      std::copy(cursor.begin(), cursor.end(), key_begin.begin() + b * (m + 1));
      for_each_contribution([&](int64_t key, int64_t i, sum_t c) {
        entry_row[cursor[key]] = i;
        entry_coef[cursor[key]] = c;
        ++cursor[key];
      });
    }
  });
  const CpuIsa isa = cpu_isa();   // read once, outside the worker threads
  const auto add_to_sum = isa == CpuIsa::kAvx512 ? add_scaled_avx512<scalar_t, sum_t> : add_scaled<scalar_t, sum_t>;
  parallel_for_in_caller_state(0, batch * m, ROW_GRAIN, [&](int64_t begin, int64_t end) {
    std::vector<sum_t> dk_sum(d);
    for (int64_t key = begin; key < end; ++key) {  // key = b * M + j
      const int64_t b = key / m, j = key % m;
      const int64_t* offsets = key_begin.data() + b * (m + 1);
      if (offsets[j] == offsets[j + 1]) continue;   // grad_k is zero-filled
      std::fill(dk_sum.begin(), dk_sum.end(), sum_t(0));
      for (int64_t e = offsets[j]; e < offsets[j + 1]; ++e) {
        add_to_sum(dk_sum.data(), q_data + (b * n + entry_row[e]) * d, entry_coef[e], d);
      }
      std::transform(dk_sum.begin(), dk_sum.end(), grad_k_data + key * d, [](sum_t v) { return static_cast<acc_t>(v); });
    }
  });
}

template <typename scalar_t>
void hardest_forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos, int64_t grid_w,
                            int64_t exclusion, double scale, double margin, const at::Tensor& terms,
                            const at::Tensor& neg) {
  using acc_t = acc_type<scalar_t>;
  const int64_t batch = q.size(0), n = q.size(1), m = k.size(1), d = q.size(2);
  const int64_t q_tiles = (n + BLOCK_Q - 1) / BLOCK_Q;
  const at::TensorOptions acc_options = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto q_rows = q.view({batch * n, d}), k_rows = k.view({batch * m, d});
  const int64_t* pos_data = pos.const_data_ptr<int64_t>();
  acc_t* terms_data = terms.mutable_data_ptr<acc_t>();
  int64_t* neg_data = neg.mutable_data_ptr<int64_t>();

  // One work item per (batch, query tile): every core is busy even at B = 1.
  const CpuIsa isa = cpu_isa();   // read once, outside the worker threads
  parallel_for_in_caller_state(0, batch * q_tiles, 1, [&](int64_t begin, int64_t end) {
    const auto scores_buffer = at::empty({BLOCK_Q, BLOCK_K}, acc_options);
    TileGemm tile_gemm(BLOCK_Q * BLOCK_K, q.options(), isa);
    std::vector<acc_t> best(BLOCK_Q), pos_score(BLOCK_Q);
    std::vector<int64_t> best_key(BLOCK_Q);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / q_tiles, q0 = (item % q_tiles) * BLOCK_Q, rows = std::min(BLOCK_Q, n - q0);
      const int64_t row0 = b * n + q0;
      const int64_t* tile_pos = pos_data + row0;
      std::fill(best_key.begin(), best_key.end(), -1);
      if (std::any_of(tile_pos, tile_pos + rows, [](int64_t p) { return p >= 0; })) {
        const auto q_tile = q_rows.narrow(0, row0, rows);
        for (int64_t k0 = 0; k0 < m; k0 += BLOCK_K) {
          const int64_t cols = std::min(BLOCK_K, m - k0);
          const auto scores = tile_view(scores_buffer, rows, cols);
          tile_gemm(q_tile, k_rows.narrow(0, b * m + k0, cols).t(), scores, scale, false);
          const acc_t* score_data = scores.const_data_ptr<acc_t>();
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t p = tile_pos[r];
            if (p < 0) continue;
            const acc_t* row_scores = score_data + r * cols;
            if (p >= k0 && p < k0 + cols) pos_score[r] = row_scores[p - k0];
            // Keys in increasing order and a strict ranking: ties (and later NaNs) keep the lowest index.
            const int64_t pos_row = p / grid_w, pos_col = p % grid_w;
            int64_t key_row = k0 / grid_w, key_col = k0 % grid_w;
            for (int64_t c = 0; c < cols; ++c) {
              const bool outside =
                  std::abs(key_row - pos_row) > exclusion || std::abs(key_col - pos_col) > exclusion;
              if (outside && (best_key[r] < 0 || ranks_above(row_scores[c], best[r]))) {
                best[r] = row_scores[c];
                best_key[r] = k0 + c;
              }
              if (++key_col == grid_w) {
                key_col = 0;
                ++key_row;
              }
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        neg_data[row0 + r] = best_key[r];
        terms_data[row0 + r] =
            best_key[r] < 0 ? acc_t(0) : hinge(best[r] - pos_score[r] + static_cast<acc_t>(margin));
      }
    }
  });
}

// The nll loss and, with with_grad, its gradient, in one pass over the score tiles:
//   loss = (1/C) sum over valid i of (lse_i - S[i, pos_i]),  C = the number of valid i,
//   dS = w_i (P - onehot(pos_i)) with P = exp(S - lse), w_i = 1/C on valid rows and 0 elsewhere,
//   dq = scale dS K, dk = scale dS^T Q.
// grad_q (B, N, D) and grad_k (B, M, D) are zero-filled accumulators (unused without with_grad).
//
// Why one pass: a forward that keeps only lse and a backward that recomputes P from it take four
// GEMMs per score tile (S; S again, dq, dk), one more than the materialized reference's three.
// Here each query tile's scores against every key, as exp(S - tile max), wait in a
// (BLOCK_Q x M) strip per batch (O(M), never N x M) until the rows' lse is known, and dq and dk
// come from the strip: three GEMMs and one exp per score. The gradient is that of the mean itself,
// so the op's backward only scales it by the upstream gradient.
//
// Work runs in waves over query tiles. In a wave, work items (batch, chunk of key tiles) fill
// their part of the strip and the max and sum of exp of each (key tile, row) (phase A); each
// batch combines its rows' lse in key-tile order; then every item turns its part of the strip
// into dS and adds its GEMMs (phase B): it owns the dk rows of its keys, and its partial dq of
// the query tile is summed in chunk order after the wave. So every core has work at batch 1,
// no running item waits for another, and the result is fixed for a given thread count.
template <typename scalar_t>
void nll_loss_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos, double scale, bool with_grad,
                     int64_t valid_count, const at::Tensor& terms, const at::Tensor& grad_q, const at::Tensor& grad_k) {
  using acc_t = acc_type<scalar_t>;
  const int64_t batch = q.size(0), n = q.size(1), m = k.size(1), d = q.size(2);
  const int64_t q_tiles = (n + BLOCK_Q - 1) / BLOCK_Q, k_tiles = (m + BLOCK_K - 1) / BLOCK_K;
  const at::TensorOptions acc_options = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::clamp<int64_t>((threads + batch - 1) / batch, 1, k_tiles);
  const acc_t weight = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(valid_count, 1));
  const int64_t* pos_data = pos.const_data_ptr<int64_t>();
  acc_t* terms_data = terms.mutable_data_ptr<acc_t>();
  const auto q_rows = q.view({batch * n, d}), k_rows = k.view({batch * m, d});

  // (B, k_tiles, BLOCK_Q): per score tile and row, the max of S and the sum of exp(S - max);
  // the combine step turns the max into the factor w exp(max - lse) that makes exp(S - max) w P.
  const at::Tensor tile_max = at::empty({batch, k_tiles, BLOCK_Q}, acc_options);
  const at::Tensor tile_sum = at::empty({batch, k_tiles, BLOCK_Q}, acc_options);
  acc_t* tile_max_data = tile_max.mutable_data_ptr<acc_t>();
  const acc_t* tile_sum_data = tile_sum.const_data_ptr<acc_t>();
  // (B, BLOCK_Q, M), with gradients only: exp(S - tile max) of the wave's query tile, every key.
  const at::Tensor strip = with_grad ? at::empty({batch, BLOCK_Q, m}, acc_options) : at::Tensor();
  // (B, chunks, BLOCK_Q, D): one partial dq tile per work item when a batch has several chunks.
  const at::Tensor grad_q_partials =
      with_grad && chunks > 1 ? at::empty({batch, chunks, BLOCK_Q, d}, acc_options) : at::Tensor();
  const auto grad_q_rows = with_grad ? grad_q.view({batch * n, d}) : at::Tensor();
  const auto grad_k_rows = with_grad ? grad_k.view({batch * m, d}) : at::Tensor();
  std::vector<acc_t> pos_score(batch * BLOCK_Q);  // S[i, pos_i] of the wave's rows
  std::vector<char> has_valid_row(batch);         // whether batch b's query tile has a valid row

  for (int64_t qt = 0; qt < q_tiles; ++qt) {
    const int64_t q0 = qt * BLOCK_Q, rows = std::min(BLOCK_Q, n - q0);
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t* tile_pos = pos_data + b * n + q0;
      has_valid_row[b] = std::any_of(tile_pos, tile_pos + rows, [](int64_t p) { return p >= 0; });
    }
    auto chunk_tiles = [&](int64_t chunk) {
      return std::make_pair(chunk * k_tiles / chunks, (chunk + 1) * k_tiles / chunks);
    };
    // The (rows x cols) scores of batch b against key tile kt: in the strip, or in a tile buffer.
    auto strip_tile = [&](int64_t b, int64_t k0, int64_t cols) {
      return strip[b].narrow(0, 0, rows).narrow(1, k0, cols);
    };

    // Phase A: S tiles, S[i, pos_i], and each tile's row max and sum of exp(S - max).
    const CpuIsa isa = cpu_isa();   // read once, outside the worker threads
    parallel_for_in_caller_state(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      const at::Tensor scores_buffer = with_grad ? at::Tensor() : at::empty({BLOCK_Q, BLOCK_K}, acc_options);
      TileGemm tile_gemm(BLOCK_Q * BLOCK_K, q.options(), isa);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / chunks, row0 = b * n + q0;
        if (!has_valid_row[b]) continue;
        const auto q_tile = q_rows.narrow(0, row0, rows);
        const auto [tile_begin, tile_end] = chunk_tiles(item % chunks);
        for (int64_t kt = tile_begin; kt < tile_end; ++kt) {
          const int64_t k0 = kt * BLOCK_K, cols = std::min(BLOCK_K, m - k0);
          const at::Tensor scores = with_grad ? strip_tile(b, k0, cols) : tile_view(scores_buffer, rows, cols);
          tile_gemm(q_tile, k_rows.narrow(0, b * m + k0, cols).t(), scores, scale, false);
          const acc_t* score_data = scores.const_data_ptr<acc_t>();
          const int64_t ld = scores.stride(0);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t p = pos_data[row0 + r];
            if (p >= k0 && p < k0 + cols) pos_score[b * BLOCK_Q + r] = score_data[r * ld + p - k0];
          }
          at::Tensor max_out = tile_max[b][kt].narrow(0, 0, rows), sum_out = tile_sum[b][kt].narrow(0, 0, rows);
          at::amax_out(max_out, scores, {1});
          at::sum_out(sum_out, scores.sub_(max_out.unsqueeze(1)).exp_(), {1});
        }
      }
    });

    // Combine, per batch in key-tile order: lse, the terms, and the factors w exp(max - lse).
    parallel_for_in_caller_state(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = b * n + q0 + r;
          if (!has_valid_row[b] || pos_data[row] < 0) {
            terms_data[row] = 0;
            for (int64_t kt = 0; kt < k_tiles; ++kt) tile_max_data[(b * k_tiles + kt) * BLOCK_Q + r] = 0;
            continue;
          }
          acc_t row_max = -std::numeric_limits<acc_t>::infinity(), row_sum = 0;
          for (int64_t kt = 0; kt < k_tiles; ++kt) row_max = std::max(row_max, tile_max_data[(b * k_tiles + kt) * BLOCK_Q + r]);
          for (int64_t kt = 0; kt < k_tiles; ++kt) {
            const int64_t at_tile = (b * k_tiles + kt) * BLOCK_Q + r;
            row_sum += tile_sum_data[at_tile] * std::exp(tile_max_data[at_tile] - row_max);
          }
          const acc_t lse = row_max + std::log(row_sum);
          terms_data[row] = lse - pos_score[b * BLOCK_Q + r];
          for (int64_t kt = 0; kt < k_tiles; ++kt) {
            acc_t& factor = tile_max_data[(b * k_tiles + kt) * BLOCK_Q + r];
            factor = weight * std::exp(factor - lse);
          }
        }
      }
    });
    if (!with_grad) continue;

    // Phase B: dS = w (P - onehot(pos)) from the strip; dk += scale dS^T Q, dq += scale dS K.
    parallel_for_in_caller_state(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      TileGemm tile_gemm(std::max(BLOCK_Q, BLOCK_K) * std::max(BLOCK_K, d), q.options(), isa);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / chunks, chunk = item % chunks, row0 = b * n + q0;
        const auto grad_q_tile = chunks > 1 ? tile_view(grad_q_partials[b][chunk], rows, d).zero_()
                                            : grad_q_rows.narrow(0, row0, rows);
        if (!has_valid_row[b]) continue;
        const auto q_tile = q_rows.narrow(0, row0, rows);
        const auto [tile_begin, tile_end] = chunk_tiles(chunk);
        for (int64_t kt = tile_begin; kt < tile_end; ++kt) {
          const int64_t k0 = kt * BLOCK_K, cols = std::min(BLOCK_K, m - k0);
          const auto k_tile = k_rows.narrow(0, b * m + k0, cols);
          const at::Tensor dscores = strip_tile(b, k0, cols);
          dscores.mul_(tile_max[b][kt].narrow(0, 0, rows).unsqueeze(1));
          acc_t* dscore_data = dscores.mutable_data_ptr<acc_t>();
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t p = pos_data[row0 + r];
            if (p >= k0 && p < k0 + cols) dscore_data[r * m + p - k0] -= weight;
          }
          tile_gemm(dscores.t(), q_tile, grad_k_rows.narrow(0, b * m + k0, cols), scale, true);
          tile_gemm(dscores, k_tile, grad_q_tile, scale, true);
        }
      }
    });
    if (chunks > 1) {
      parallel_for_in_caller_state(0, batch, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          auto grad_q_tile = grad_q_rows.narrow(0, b * n + q0, rows);
          for (int64_t chunk = 0; chunk < chunks; ++chunk) {
            grad_q_tile.add_(tile_view(grad_q_partials[b][chunk], rows, d));
          }
        }
      });
    }
  }
}

// The GEMM kernels' view of q or k: contiguous, and float32 for float16 and bfloat16 inputs. A
// reduced-precision GEMM would round every score to the input dtype, which moves losses by ~1e-4
// and can change which key is the hardest negative. O((N + M) D) more memory, never N x M.
at::Tensor score_input(const at::Tensor& x) {
  // A dtype change writes the contiguous copy itself: one copy, not two, for a strided input. (With
  // the dtype unchanged, to() would return a strided x as it is.)
  const auto type = corr_stat_type(x);
  return type == x.scalar_type() ? x.contiguous() : x.to(type, false, false, at::MemoryFormat::Contiguous);
}

// Zero-filled contiguous gradient accumulators in the accumulator type.
at::Tensor grad_accumulator(const at::Tensor& like) {
  return at::zeros(like.sizes(), like.options().dtype(corr_stat_type(like)).memory_format(at::MemoryFormat::Contiguous));
}

void check_cpu(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), op, " (cpp): q must be a CPU tensor, got ", q.device());
}

}  // namespace

at::Tensor corr_triplet_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos, const at::Tensor& neg,
                                double scale, double margin) {
  constexpr const char* op = "corr_triplet_fwd";
  check_corr_triplet_args(op, q, k, pos, neg, scale, IndexRangeCheck::kHost);
  check_cpu(op, q);
  check_corr_margin(op, margin);
  // The kernel's views of the inputs must not be seen by autograd.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto terms = at::empty(neg.sizes(), q.options().dtype(corr_stat_type(q)));
  if (terms.numel() == 0) return terms;
  const auto qc = q.contiguous(), kc = k.contiguous(), pos_c = pos.contiguous(), neg_c = neg.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "corr_triplet_fwd_cpu",
                                  [&] { triplet_forward_kernel<scalar_t>(qc, kc, pos_c, neg_c, terms, scale, margin); });
  return terms;
}

std::tuple<at::Tensor, at::Tensor> corr_triplet_bwd_cpu(const at::Tensor& grad_terms, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& pos,
                                                        const at::Tensor& neg, const at::Tensor& terms, double scale) {
  constexpr const char* op = "corr_triplet_bwd";
  check_corr_triplet_args(op, q, k, pos, neg, scale, IndexRangeCheck::kHost);
  check_cpu(op, q);
  check_corr_stat(op, "terms", terms, neg.sizes(), q);
  check_corr_stat(op, "grad_terms", grad_terms, neg.sizes(), q);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto grad_q = grad_accumulator(q), grad_k = grad_accumulator(k);
  if (terms.numel() > 0) {
    const auto qc = q.contiguous(), kc = k.contiguous(), pos_c = pos.contiguous(), neg_c = neg.contiguous();
    const auto grad_c = grad_terms.contiguous(), terms_c = terms.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "corr_triplet_bwd_cpu", [&] {
      triplet_backward_kernel<scalar_t>(grad_c, qc, kc, pos_c, neg_c, terms_c, scale, grad_q, grad_k);
    });
  }
  return {grad_q.to(q.scalar_type()), grad_k.to(k.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> corr_hardest_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& pos, int64_t grid_h, int64_t grid_w,
                                                        int64_t exclusion, double scale, double margin) {
  constexpr const char* op = "corr_hardest_fwd";
  check_corr_hardest_args(op, q, k, pos, grid_h, grid_w, exclusion, scale, margin, IndexRangeCheck::kHost);
  check_cpu(op, q);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto terms = at::empty(pos.sizes(), q.options().dtype(corr_stat_type(q)));
  auto neg = at::empty(pos.sizes(), pos.options());
  if (terms.numel() == 0) return {terms, neg};
  const auto qc = score_input(q), kc = score_input(k), pos_c = pos.contiguous();
  AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "corr_hardest_fwd_cpu", [&] {
    hardest_forward_kernel<scalar_t>(qc, kc, pos_c, grid_w, exclusion, scale, margin, terms, neg);
  });
  return {terms, neg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> corr_nll_loss_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& pos, double scale, bool with_grad) {
  constexpr const char* op = "corr_nll_loss";
  check_corr_nll_args(op, q, k, pos, scale, IndexRangeCheck::kHost);
  check_cpu(op, q);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto terms = at::empty(pos.sizes(), q.options().dtype(corr_stat_type(q)));
  const auto stat_options = q.options().dtype(corr_stat_type(q));
  auto grad_q = with_grad ? grad_accumulator(q) : at::empty({0}, stat_options);
  auto grad_k = with_grad ? grad_accumulator(k) : at::empty({0}, stat_options);
  const int64_t valid_count = (pos >= 0).sum().item<int64_t>();
  if (terms.numel() > 0) {
    const auto qc = score_input(q), kc = score_input(k), pos_c = pos.contiguous();
    AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "corr_nll_loss_cpu", [&] {
      nll_loss_kernel<scalar_t>(qc, kc, pos_c, scale, with_grad, valid_count, terms, grad_q, grad_k);
    });
  }
  // Terms without a valid pos are 0, so the sum over all is the sum over the valid ones.
  auto loss = terms.sum().div_(static_cast<double>(std::max<int64_t>(valid_count, 1)));
  return {loss, grad_q, grad_k};
}

}  // namespace sketchcolor

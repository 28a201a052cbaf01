// The elementwise work of the CPU attention kernels on one score tile, fused into AVX-512
// loops over its rows. The generic kernels make one ATen pass per step (scale, max, subtract,
// exp, sum, convert to bf16, ...), each walking the whole tile through L2; here each row is
// walked once or twice while it sits in L1, and bf16 tiles are read and written directly
// instead of through fp32 copies.
//
// Tiles are row-major with a row stride of `cols`. `In` and `Out` are float or uint16_t (bf16
// bits); In == Out == float tiles may alias (the fp32 kernels work in place). The numerics are
// the generic kernels': the same fp32 operations, bf16 rounded the same way, except for exp
// (within 2 ulp, common/avx512.h), the order of the row sums and fused multiply-adds.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/avx512.h"

namespace sketchcolor::avx512 {

// One key tile of the forward's online softmax, row by row: with x = scale * scores,
//   m' = max(row_max, max_j x),  probs = exp(x - m'),  row_sum = row_sum * exp(row_max - m') + sum_j probs,
// and the rows of acc (row stride acc_stride, acc_cols wide) rescaled by exp(row_max - m')
// where that is not 1, which after the first few key tiles is rare: the row max seldom moves.
template <typename In, typename Out>
SKETCHCOLOR_AVX512_TARGET void online_softmax_tile(
    const In* scores, Out* probs, int64_t rows, int64_t cols, float scale, float* row_max, float* row_sum,
    float* acc, int64_t acc_stride, int64_t acc_cols) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < rows; ++r) {
    const In* score_row = scores + r * cols;
    Out* prob_row = probs + r * cols;
    __m512 max_v = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 lanes = first_lanes(cols - j);
      max_v = _mm512_mask_max_ps(max_v, lanes, max_v, _mm512_mul_ps(scale_v, load(score_row + j, lanes)));
    }
    const float old_max = row_max[r], tile_max = _mm512_reduce_max_ps(max_v);
    const float new_max = tile_max > old_max ? tile_max : old_max;
    const float rescale = std::exp(old_max - new_max);
    const __m512 new_max_v = _mm512_set1_ps(new_max);
    __m512 sum_v = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 lanes = first_lanes(cols - j);
      const __m512 p = exp(_mm512_sub_ps(_mm512_mul_ps(scale_v, load(score_row + j, lanes)), new_max_v));
      store(prob_row + j, lanes, p);
      sum_v = _mm512_mask_add_ps(sum_v, lanes, sum_v, p);
    }
    row_sum[r] = row_sum[r] * rescale + _mm512_reduce_add_ps(sum_v);
    row_max[r] = new_max;
    if (rescale != 1.0f) {
      float* acc_row = acc + r * acc_stride;
      const __m512 rescale_v = _mm512_set1_ps(rescale);
      for (int64_t j = 0; j < acc_cols; j += 16) {
        const __mmask16 lanes = first_lanes(acc_cols - j);
        store(acc_row + j, lanes, _mm512_mul_ps(load(acc_row + j, lanes), rescale_v));
      }
    }
  }
}

// The backward's probabilities and score gradients of one tile, in one pass:
//   probs = exp(scale * scores - lse),  dscores = probs * (dprobs - delta)
// with lse and delta per row; delta == nullptr means 0 (the bf16 kernel folds Delta into the
// dP GEMM).
template <typename In, typename Out>
SKETCHCOLOR_AVX512_TARGET void softmax_backward_tile(
    const In* scores, const In* dprobs, Out* probs, Out* dscores, int64_t rows, int64_t cols, float scale,
    const float* lse, const float* delta) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 lse_v = _mm512_set1_ps(lse[r]), delta_v = _mm512_set1_ps(delta == nullptr ? 0.0f : delta[r]);
    const int64_t row = r * cols;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 lanes = first_lanes(cols - j);
      const __m512 p = exp(_mm512_sub_ps(_mm512_mul_ps(scale_v, load(scores + row + j, lanes)), lse_v));
      const __m512 dp = load(dprobs + row + j, lanes);
      store(probs + row + j, lanes, p);
      store(dscores + row + j, lanes, _mm512_mul_ps(_mm512_sub_ps(dp, delta_v), p));
    }
  }
}

// c += alpha * product for a (rows x cols) bf16 product and an fp32 c with row stride
// c_stride: the fp32 accumulation of a bf16 tile GEMM, which ATen runs as a mixed-dtype loop
// several times slower than this one.
SKETCHCOLOR_AVX512_TARGET inline void add_scaled_bf16(
    const uint16_t* product, int64_t rows, int64_t cols, float alpha, float* c, int64_t c_stride) {
  const __m512 alpha_v = _mm512_set1_ps(alpha);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* product_row = product + r * cols;
    float* c_row = c + r * c_stride;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 lanes = first_lanes(cols - j);
      store(c_row + j, lanes, _mm512_fmadd_ps(alpha_v, load(product_row + j, lanes), load(c_row + j, lanes)));
    }
  }
}

}  // namespace sketchcolor::avx512

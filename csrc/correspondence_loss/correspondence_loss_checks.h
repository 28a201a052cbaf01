// Input checks of the correspondence-loss ops, for any backend that binds them: every failure
// names the op, the argument and what was expected.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace sketchcolor {

// Terms and statistics are float32, float64 for float64 inputs.
inline at::ScalarType corr_stat_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// q (B, N, D), k (B, M, D).
inline void check_corr_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, double scale) {
  TORCH_CHECK(q.dim() == 3, op, ": q must have shape (B, N, D), got rank ", q.dim());
  TORCH_CHECK(k.dim() == 3, op, ": k must have shape (B, M, D), got rank ", k.dim());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": q must be a floating-point tensor, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k has dtype ", k.scalar_type(), " but q has ",
              q.scalar_type());
  TORCH_CHECK(k.device() == q.device(), op, ": k is on ", k.device(), " but q is on ", q.device());
  TORCH_CHECK(k.size(0) == q.size(0), op, ": k's batch size B = ", k.size(0), " must equal q's ", q.size(0));
  TORCH_CHECK(k.size(2) == q.size(2), op, ": k's head dim D = ", k.size(2), " must equal q's ", q.size(2));
  TORCH_CHECK(q.size(2) > 0, op, ": q's head dim D must be at least 1");
  TORCH_CHECK(k.size(1) > 0, op, ": k must have at least one key (M >= 1)");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

// Where the range check of an index tensor runs. kHost copies its minimum and maximum to the host
// and raises at once; kDevice (for a CUDA stream being captured into a graph, where a copy to the
// host is not allowed) asserts on the device, so a bad index fails the next synchronizing call.
enum class IndexRangeCheck { kHost, kDevice };

// An int64 index tensor of the given shape on q's device with values in [-1, M).
inline void check_corr_index(const char* op, const char* name, const at::Tensor& index, at::IntArrayRef shape,
                             const at::Tensor& q, int64_t num_keys, IndexRangeCheck range_check) {
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": ", name, " must have dtype int64, got ", index.scalar_type());
  TORCH_CHECK(index.device() == q.device(), op, ": ", name, " is on ", index.device(), " but q is on ", q.device());
  TORCH_CHECK(index.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", index.sizes());
  if (index.numel() == 0) return;
  const auto [min_value, max_value] = at::aminmax(index);
  if (range_check == IndexRangeCheck::kDevice) {
    at::_assert_async(at::logical_and(min_value >= -1, max_value < num_keys),
                      c10::str(op, ": ", name, " values must be in [-1, M) = [-1, ", num_keys, ")"));
    return;
  }
  // One reduction and one device-to-host copy: on CUDA this check is the op's only host sync.
  const at::Tensor bounds = at::stack({min_value, max_value}).cpu();
  const int64_t lowest = bounds[0].item<int64_t>(), highest = bounds[1].item<int64_t>();
  TORCH_CHECK(lowest >= -1 && highest < num_keys, op, ": ", name, " values must be in [-1, M) = [-1, ", num_keys,
              "), got values in [", lowest, ", ", highest, "]");
}

// A float32 (float64 for float64 q) tensor of the given shape on q's device.
inline void check_corr_stat(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                            const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == corr_stat_type(q), op, ": ", name, " must have dtype ", corr_stat_type(q), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// The arguments of each op, whatever the backend (device and dtype support are the backend's).
inline void check_corr_triplet_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                    const at::Tensor& neg, double scale, IndexRangeCheck range_check) {
  check_corr_inputs(op, q, k, scale);
  TORCH_CHECK(neg.dim() == 3, op, ": neg must have shape (B, N, T), got rank ", neg.dim());
  check_corr_index(op, "pos", pos, {q.size(0), q.size(1)}, q, k.size(1), range_check);
  check_corr_index(op, "neg", neg, {q.size(0), q.size(1), neg.size(2)}, q, k.size(1), range_check);
}

inline void check_corr_margin(const char* op, double margin) {
  TORCH_CHECK(std::isfinite(margin), op, ": margin must be finite, got ", margin);
}

inline void check_corr_hardest_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                    int64_t grid_h, int64_t grid_w, int64_t exclusion, double scale, double margin,
                                    IndexRangeCheck range_check) {
  check_corr_inputs(op, q, k, scale);
  check_corr_index(op, "pos", pos, {q.size(0), q.size(1)}, q, k.size(1), range_check);
  // Divided, not multiplied: h * w can overflow int64 and wrap around to M.
  TORCH_CHECK(grid_h >= 1 && grid_w >= 1 && k.size(1) % grid_w == 0 && k.size(1) / grid_w == grid_h, op,
              ": key_grid (h, w) must be positive with h * w == M = ", k.size(1), ", got (", grid_h, ", ", grid_w,
              ")");
  TORCH_CHECK(exclusion >= 0, op, ": exclusion must be >= 0, got ", exclusion);
  check_corr_margin(op, margin);
}

inline void check_corr_nll_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                double scale, IndexRangeCheck range_check) {
  check_corr_inputs(op, q, k, scale);
  check_corr_index(op, "pos", pos, {q.size(0), q.size(1)}, q, k.size(1), range_check);
}

}  // namespace sketchcolor

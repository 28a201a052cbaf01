// The correspondence-loss launchers' view of their inputs (correspondence_loss.h), filled from torch
// tensors: for the CUDA binding (correspondence_loss_cuda.cpp) and the CUDA emulator's
// (csrc/emulator/emulator_binding.cpp). Compiled only where the kernels are.
#pragma once

#include <ATen/ATen.h>

#include "common/cuda_binding.h"
#include "correspondence_loss/correspondence_loss.h"

namespace sketchcolor {

// The kernels' view of q, k (kernel_layout) and pos, with the tensors that own that memory.
struct CorrKernelInputs {
  at::Tensor q, k, pos;
  corr::CorrInputs in;
};

inline CorrKernelInputs corr_kernel_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos, double scale) {
  CorrKernelInputs x;
  x.q = kernel_layout(q);
  x.k = kernel_layout(k);
  x.pos = pos.contiguous();
  corr::CorrInputs& in = x.in;
  in.q = x.q.data_ptr();
  in.k = x.k.data_ptr();
  in.pos = x.pos.data_ptr<int64_t>();
  in.q_stride_b = x.q.stride(0);
  in.q_stride_row = x.q.stride(1);
  in.k_stride_b = x.k.stride(0);
  in.k_stride_row = x.k.stride(1);
  in.batch = static_cast<int>(q.size(0));
  in.n_queries = static_cast<int>(q.size(1));
  in.n_keys = static_cast<int>(k.size(1));
  in.head_dim = static_cast<int>(q.size(2));
  in.scale = static_cast<float>(scale);
  return x;
}

// The sampled-negative triplet terms' parameters for inputs x, negatives neg_c ((B, N, T) int64,
// contiguous) and the output terms ((B, N, T) float32).
inline corr::CorrTripletParams corr_triplet_params(const CorrKernelInputs& x, const at::Tensor& neg_c,
                                                   const at::Tensor& terms, double margin) {
  corr::CorrTripletParams p{};
  p.in = x.in;
  p.neg = neg_c.data_ptr<int64_t>();
  p.terms = terms.data_ptr<float>();
  p.negatives = static_cast<int>(neg_c.size(2));
  p.margin = static_cast<float>(margin);
  return p;
}

// The hardest-negative search's parameters for inputs x, its outputs (terms float32, neg int64, both
// (B, N)) and its key-split workspaces ((B, key_splits, N) float32 and int32) sized by `plan`.
inline corr::CorrHardestParams corr_hardest_params(const CorrKernelInputs& x, const at::Tensor& terms,
                                                   const at::Tensor& neg, const at::Tensor& split_best,
                                                   const at::Tensor& split_arg, int64_t grid_h, int64_t grid_w,
                                                   int64_t exclusion, const corr::CorrHardestPlan& plan,
                                                   double margin) {
  corr::CorrHardestParams p{};
  p.in = x.in;
  p.terms = terms.data_ptr<float>();
  p.neg = neg.data_ptr<int64_t>();
  p.split_best = split_best.data_ptr<float>();
  p.split_arg = split_arg.data_ptr<int32_t>();
  p.grid_h = static_cast<int>(grid_h);
  p.grid_w = static_cast<int>(grid_w);
  p.exclusion = static_cast<int>(exclusion);
  p.key_splits = plan.key_splits;
  p.keys_per_split = plan.keys_per_split;
  p.margin = static_cast<float>(margin);
  return p;
}

}  // namespace sketchcolor

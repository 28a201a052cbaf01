// CPU kernels of the correspondence-loss ops (schemas in csrc/op_schemas.h).
//
// Every op works on (B, N, D) queries and (B, M, D) keys (a head axis is folded into B by the
// caller). The triplet ops return per-term losses, not their mean: the caller divides the sum by
// the number of valid terms, so their backward takes a gradient per term. The nll op returns the
// mean itself with its gradient (see corr_nll_loss_cpu). Terms and losses are float32 (float64
// for float64 inputs); a term that is not valid is 0 and passes no gradient.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace sketchcolor {

// pos (B, N), neg (B, N, T) int64 in [-1, M) -> terms (B, N, T):
// max(0, S[i, neg] - S[i, pos] + margin), 0 where pos or neg is -1.
at::Tensor corr_triplet_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos, const at::Tensor& neg,
                                double scale, double margin);

// grad_terms and terms (B, N, T) -> grads of q, k. Only gathers and a deterministic scatter:
// a term contributes where it is positive.
std::tuple<at::Tensor, at::Tensor> corr_triplet_bwd_cpu(const at::Tensor& grad_terms, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& pos,
                                                        const at::Tensor& neg, const at::Tensor& terms, double scale);

// Keys on a (grid_h, grid_w) grid. -> terms (B, N) with the hardest negative of each query, and
// neg (B, N) int64: that negative, the lowest-index argmax of S[i, j] over keys more than
// `exclusion` cells (Chebyshev) from pos_i; -1 where pos_i is -1 or no key is that far.
// The backward is corr_triplet_bwd with T = 1.
std::tuple<at::Tensor, at::Tensor> corr_hardest_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& pos, int64_t grid_h, int64_t grid_w,
                                                        int64_t exclusion, double scale, double margin);

// -> loss () = the mean over i with pos_i >= 0 of lse_i - S[i, pos_i] (0 when there is none), and
// with with_grad its gradients for q and k (empty tensors without), computed in the same pass
// over the score tiles so that the backward only scales them. The gradients are float32 (float64
// for float64 inputs) like the loss: rounded to q's dtype once, after that scaling.
std::tuple<at::Tensor, at::Tensor, at::Tensor> corr_nll_loss_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& pos, double scale, bool with_grad);

}  // namespace sketchcolor

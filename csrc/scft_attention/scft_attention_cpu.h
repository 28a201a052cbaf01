// CPU kernels of the SCFT attention ops (schemas in csrc/op_schemas.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace sketchcolor {

// q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv) -> out (B, H, N, Dv) in q's dtype,
// lse (B, H, N) in float32 (float64 for float64 inputs).
std::tuple<at::Tensor, at::Tensor> scft_attn_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);

// grad_out and out (B, H, N, Dv), lse (B, H, N) from the forward -> grads of q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> scft_attn_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale);

}  // namespace sketchcolor

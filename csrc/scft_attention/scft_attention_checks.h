// Input checks shared by the CPU and CUDA bindings of the SCFT attention ops: every
// failure names the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace sketchcolor {

inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "scft_attn: q must have shape (B, H, N, D), got rank ", q.dim());
  TORCH_CHECK(k.dim() == 4, "scft_attn: k must have shape (B, H, M, D), got rank ", k.dim());
  TORCH_CHECK(v.dim() == 4, "scft_attn: v must have shape (B, H, M, Dv), got rank ", v.dim());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "scft_attn: k has dtype ", k.scalar_type(),
              " but q has ", q.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), "scft_attn: v has dtype ", v.scalar_type(),
              " but q has ", q.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "scft_attn: k is on ", k.device(), " but q is on ", q.device());
  TORCH_CHECK(v.device() == q.device(), "scft_attn: v is on ", v.device(), " but q is on ", q.device());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1), "scft_attn: k's (B, H) = (", k.size(0),
              ", ", k.size(1), ") must equal q's (", q.size(0), ", ", q.size(1), ")");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1), "scft_attn: v's (B, H) = (", v.size(0),
              ", ", v.size(1), ") must equal q's (", q.size(0), ", ", q.size(1), ")");
  TORCH_CHECK(k.size(3) == q.size(3), "scft_attn: k's head dim D = ", k.size(3), " must equal q's ", q.size(3));
  TORCH_CHECK(v.size(2) == k.size(2), "scft_attn: v's key count M = ", v.size(2), " must equal k's ", k.size(2));
  TORCH_CHECK(k.size(2) > 0, "scft_attn: k must have at least one key (M >= 1): a softmax over no keys is undefined");
  TORCH_CHECK(q.size(3) > 0, "scft_attn: q's head dim D must be at least 1");
  TORCH_CHECK(v.size(3) > 0, "scft_attn: v's head dim Dv must be at least 1");
}

inline void check_attention_grad_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  check_attention_inputs(q, k, v);
  const auto expected_out = std::vector<int64_t>{q.size(0), q.size(1), q.size(2), v.size(3)};
  TORCH_CHECK(out.sizes() == expected_out, "scft_attn_bwd: out must have shape (B, H, N, Dv) = ", expected_out,
              ", got ", out.sizes());
  TORCH_CHECK(grad_out.sizes() == expected_out, "scft_attn_bwd: grad_out must have shape (B, H, N, Dv) = ",
              expected_out, ", got ", grad_out.sizes());
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 3), "scft_attn_bwd: lse must have shape (B, H, N) = ",
              q.sizes().slice(0, 3), ", got ", lse.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "scft_attn_bwd: out has dtype ", out.scalar_type(),
              " but q has ", q.scalar_type());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type(), "scft_attn_bwd: grad_out has dtype ",
              grad_out.scalar_type(), " but q has ", q.scalar_type());
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.scalar_type() == lse_type, "scft_attn_bwd: lse must have dtype ", lse_type, ", got ",
              lse.scalar_type());
  for (const auto* t : {&grad_out, &out, &lse}) {
    TORCH_CHECK(t->device() == q.device(), "scft_attn_bwd: grad_out, out and lse must be on q's device ", q.device(),
                ", got ", t->device());
  }
}

}  // namespace sketchcolor

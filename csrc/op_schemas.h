// The torch.library schemas of every sketchcolor op: defined once, for the package's library
// (csrc/ops.cpp) and for the CUDA emulator's copy of it (csrc/emulator/emulator_binding.cpp), which
// runs the CUDA bindings on CPU tensors under another namespace.
#pragma once

#include <torch/library.h>

namespace sketchcolor {

inline void define_ops(torch::Library& m) {
  // q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv) -> out (B, H, N, Dv), lse (B, H, N)
  m.def("scft_attn_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  // -> grad_q, grad_k, grad_v
  m.def(
      "scft_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale)"
      " -> (Tensor, Tensor, Tensor)");

  // Correspondence loss (see csrc/correspondence_loss/correspondence_loss_cpu.h): q (B, N, D),
  // k (B, M, D), pos (B, N) int64. The triplet ops give per-term losses; the caller takes the mean.
  // neg (B, N, T) -> terms (B, N, T)
  m.def("corr_triplet_fwd(Tensor q, Tensor k, Tensor pos, Tensor neg, float scale, float margin) -> Tensor");
  // -> grad_q, grad_k
  m.def(
      "corr_triplet_bwd(Tensor grad_terms, Tensor q, Tensor k, Tensor pos, Tensor neg, Tensor terms, float scale)"
      " -> (Tensor, Tensor)");
  // -> terms (B, N), neg (B, N) int64: the hardest negative (-1 for none)
  m.def(
      "corr_hardest_fwd(Tensor q, Tensor k, Tensor pos, int grid_h, int grid_w, int exclusion, float scale,"
      " float margin) -> (Tensor, Tensor)");
  // -> loss (), and with with_grad its grad_q, grad_k in float32/64 (else empty): the nll loss in one pass
  m.def("corr_nll_loss(Tensor q, Tensor k, Tensor pos, float scale, bool with_grad) -> (Tensor, Tensor, Tensor)");
}

}  // namespace sketchcolor

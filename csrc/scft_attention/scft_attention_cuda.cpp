// Torch binding of the CUDA backend of SCFT attention (compiled only in CUDA builds, and in the
// CUDA emulator): input checks, layout preparation, output and workspace allocation, and the
// registration of the launchers in scft_attention_kernel.cu as the CUDA kernels of the ops in
// csrc/op_schemas.h. The GPU is reached through common/cuda_binding.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/cuda_binding.h"
#include "scft_attention/scft_attention.h"
#include "scft_attention/scft_attention_binding.h"
#include "scft_attention/scft_attention_checks.h"

namespace sketchcolor {
namespace {

// Sizes the kernels' int32 indices and grid dimensions can take.
void check_kernel_limits(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  const int64_t batch_heads = q.size(0) * q.size(1);
  TORCH_CHECK(batch_heads <= 65535, op, " (cuda backend): B * H = ", batch_heads,
              " exceeds 65535 (the grid's z dimension); split the batch");
  TORCH_CHECK(q.size(3) <= scft::kMaxHeadDim, op, " (cuda backend): head dim D = ", q.size(3), " exceeds ",
              scft::kMaxHeadDim);
  TORCH_CHECK(v.size(3) <= scft::kMaxHeadDim, op, " (cuda backend): value head dim Dv = ", v.size(3), " exceeds ",
              scft::kMaxHeadDim);
  TORCH_CHECK(q.size(2) <= int64_t(65535) * scft::ScftBwdProbsConfig::kBlockM, op,
              " (cuda backend): N = ", q.size(2), " queries exceed ", int64_t(65535) * scft::ScftBwdProbsConfig::kBlockM);
  TORCH_CHECK(k.size(2) <= std::numeric_limits<int32_t>::max() / 2, op, " (cuda backend): M = ", k.size(2),
              " keys exceed the kernels' 32-bit key index");
}

std::tuple<at::Tensor, at::Tensor> scft_attn_fwd_cuda_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         double scale) {
  constexpr const char* kOp = "scft_attn_fwd";
  check_cuda_tensor(q, "q", kOp);
  check_low_precision(q, "q", kOp);
  check_attention_inputs(q, k, v);   // ranks, matching dtypes, devices and shapes, M, D, Dv >= 1
  check_kernel_limits(q, k, v, kOp);
  TORCH_CHECK(std::isfinite(scale), kOp, ": scale must be finite, got ", scale);

  KernelDeviceGuard device_guard(q.device());
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), dv = v.size(3);
  at::Tensor out = at::empty({batch, heads, n, dv}, q.options());
  at::Tensor lse = at::empty({batch, heads, n}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};   // no queries (or B * H = 0): nothing to compute

  check_kernel_choice(q, kOp);
  const at::Tensor qx = kernel_layout(q), kx = kernel_layout(k), vx = kernel_layout(v);
  scft::ScftAttnFwdParams p = scft_fwd_params(qx, kx, vx, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  check_launch(scft::scft_attn_fwd_cuda(p, kernel_dtype(q), kernel_stream()), kOp);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scft_attn_bwd_cuda_op(const at::Tensor& grad_out, const at::Tensor& q,
                                                                     const at::Tensor& k, const at::Tensor& v,
                                                                     const at::Tensor& out, const at::Tensor& lse,
                                                                     double scale) {
  constexpr const char* kOp = "scft_attn_bwd";
  check_cuda_tensor(q, "q", kOp);
  check_low_precision(q, "q", kOp);
  check_attention_grad_inputs(grad_out, q, k, v, out, lse);   // shapes, dtypes (lse float32), devices
  check_kernel_limits(q, k, v, kOp);
  TORCH_CHECK(std::isfinite(scale), kOp, ": scale must be finite, got ", scale);

  KernelDeviceGuard device_guard(q.device());
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), m = k.size(2);
  const int64_t d = q.size(3), dv = v.size(3);
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor grad_q = at::empty({batch, heads, n, d}, q.options(), contiguous);
  if (batch * heads == 0 || n == 0) {
    // No query attends to any key: the key and value gradients are zero.
    return {grad_q, at::zeros({batch, heads, m, d}, k.options()), at::zeros({batch, heads, m, dv}, v.options())};
  }
  check_kernel_choice(q, kOp);
  at::Tensor grad_k = at::empty({batch, heads, m, d}, k.options(), contiguous);
  at::Tensor grad_v = at::empty({batch, heads, m, dv}, v.options(), contiguous);

  const at::Tensor gox = kernel_layout(grad_out), qx = kernel_layout(q), kx = kernel_layout(k);
  const at::Tensor vx = kernel_layout(v), ox = kernel_layout(out);
  const at::Tensor lse_c = lse.contiguous();

  const scft::ScftBwdWorkspacePlan plan = scft_bwd_plan(q, batch * heads, n, m, d, dv, scft::ScftBwdGemms::kAll);
  at::Tensor delta = at::empty({batch, heads, n}, q.options().dtype(at::kFloat));
  at::Tensor probs = at::empty({batch, heads, n, plan.key_chunk}, q.options());
  at::Tensor dscores = at::empty({batch, heads, n, plan.key_chunk}, q.options());
  at::Tensor grad_q_accum;
  if (plan.needs_grad_q_accum) grad_q_accum = at::empty({batch, heads, n, d}, q.options().dtype(at::kFloat));

  const scft::ScftAttnBwdParams p = scft_full_bwd_params(gox, qx, kx, vx, ox, lse_c, probs, dscores, delta, grad_q,
                                                        grad_k, grad_v, grad_q_accum, scale);
  check_launch(scft::scft_attn_bwd_cuda(p, kernel_dtype(q), kernel_stream()), kOp);
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace sketchcolor

SKETCHCOLOR_CUDA_KERNELS(m) {
  m.impl("scft_attn_fwd", &sketchcolor::scft_attn_fwd_cuda_op);
  m.impl("scft_attn_bwd", &sketchcolor::scft_attn_bwd_cuda_op);
}

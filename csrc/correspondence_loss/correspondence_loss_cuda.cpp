// Torch binding of the CUDA backend of the correspondence loss (compiled only in CUDA builds, and
// in the CUDA emulator): input checks, layouts, outputs and workspaces, the glue between kernels,
// and the registration of the launchers in correspondence_loss_kernel.cu (and, for nll,
// scft_attention_kernel.cu) as the CUDA kernels of the ops in csrc/op_schemas.h. The GPU is
// reached through common/cuda_binding.h.
//
// Two pieces of glue run as ATen ops because they are O(B * N * T) index work with no arithmetic
// worth a kernel: the stable sort that groups the key-gradient contributions by key (what makes
// the scatter deterministic without atomics), and the final division by the number of valid terms
// (a device scalar, so no host synchronization).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/cuda_binding.h"
#include "correspondence_loss/correspondence_loss.h"
#include "correspondence_loss/correspondence_loss_binding.h"
#include "correspondence_loss/correspondence_loss_checks.h"
#include "scft_attention/scft_attention.h"
#include "scft_attention/scft_attention_binding.h"

namespace sketchcolor {
namespace {

// Device, dtype and the sizes the kernels' 32-bit indices and grid take.
void check_cuda_inputs(const char* op, const at::Tensor& q, const at::Tensor& k) {
  check_cuda_tensor(q, "q", op);
  check_low_precision(q, "q", op);
  TORCH_CHECK(q.size(0) <= 65535, op, " (cuda backend): batch B = ", q.size(0),
              " exceeds 65535 (the grid's z dimension); split the batch");
  TORCH_CHECK(q.size(2) <= corr::kMaxHeadDim, op, " (cuda backend): head dim D = ", q.size(2), " exceeds ",
              corr::kMaxHeadDim);
  TORCH_CHECK(q.size(0) * q.size(1) <= std::numeric_limits<int32_t>::max(), op, " (cuda backend): B * N = ",
              q.size(0) * q.size(1), " exceeds the kernels' 32-bit row index");
  TORCH_CHECK(q.size(0) * k.size(1) <= std::numeric_limits<int32_t>::max(), op, " (cuda backend): B * M = ",
              q.size(0) * k.size(1), " exceeds the kernels' 32-bit row index");
}

// A copy to the host would end a CUDA graph capture: index ranges are checked on the device while
// the stream the op launches on (q's GPU's current one) is being captured.
IndexRangeCheck index_range_check(const at::Tensor& q) {
  return stream_is_capturing(q) ? IndexRangeCheck::kDevice : IndexRangeCheck::kHost;
}

// key_grad (B, M, D) (+)= the sum over entries e of coef[e] * q[row[e]], where dest (E) int64 is each
// entry's key b * M + j, or B * M for an entry that contributes nothing, and row (E) its query
// b * N + i. A stable sort groups the entries by key in their original order, so every key's sum
// runs in one fixed order: deterministic, no atomics. key_grad is written in q's dtype (zero for
// keys without entries) or, when float32, added to.
void scatter_to_keys(const CorrKernelInputs& x, const at::Tensor& dest, const at::Tensor& row, const at::Tensor& coef,
                     at::Tensor& key_grad, const char* op) {
  const int64_t key_rows = int64_t(x.in.batch) * x.in.n_keys;
  const auto [sorted_dest, order] = at::sort(dest, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor entry_row = row.index_select(0, order).to(at::kInt);
  const at::Tensor entry_coef = coef.index_select(0, order).contiguous();
  // offsets[r] = the number of entries whose key is below r: key r's entries are [offsets[r], offsets[r+1]).
  const at::Tensor offsets = at::searchsorted(sorted_dest, at::arange(key_rows + 1, dest.options()));
  corr::CorrRowScatterParams p{};
  p.src = x.in.q;
  p.src_stride_b = x.in.q_stride_b;
  p.src_stride_row = x.in.q_stride_row;
  p.src_batches = x.in.batch;
  p.src_rows = x.in.n_queries;
  p.entry_row = entry_row.data_ptr<int32_t>();
  p.entry_coef = entry_coef.data_ptr<float>();
  p.offsets = offsets.data_ptr<int64_t>();
  if (key_grad.scalar_type() == at::kFloat) {
    p.out_f32 = key_grad.data_ptr<float>();
  } else {
    p.out = key_grad.data_ptr();
  }
  p.rows = static_cast<int>(key_rows);
  p.head_dim = x.in.head_dim;
  check_launch(corr::corr_row_scatter_cuda(p, kernel_dtype(x.q), kernel_stream()), op);
}

at::Tensor corr_triplet_fwd_cuda_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                    const at::Tensor& neg, double scale, double margin) {
  constexpr const char* kOp = "corr_triplet_fwd";
  check_corr_triplet_args(kOp, q, k, pos, neg, scale, index_range_check(q));
  check_corr_margin(kOp, margin);
  check_cuda_inputs(kOp, q, k);
  KernelDeviceGuard device_guard(q.device());
  at::Tensor terms = at::empty(neg.sizes(), q.options().dtype(at::kFloat));
  if (terms.numel() == 0) return terms;
  const CorrKernelInputs x = corr_kernel_inputs(q, k, pos, scale);
  const at::Tensor neg_c = neg.contiguous();
  const corr::CorrTripletParams p = corr_triplet_params(x, neg_c, terms, margin);
  check_launch(corr::corr_triplet_fwd_cuda(p, kernel_dtype(q), kernel_stream()), kOp);
  return terms;
}

std::tuple<at::Tensor, at::Tensor> corr_triplet_bwd_cuda_op(const at::Tensor& grad_terms, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& pos,
                                                            const at::Tensor& neg, const at::Tensor& terms,
                                                            double scale) {
  constexpr const char* kOp = "corr_triplet_bwd";
  check_corr_triplet_args(kOp, q, k, pos, neg, scale, index_range_check(q));
  check_corr_stat(kOp, "terms", terms, neg.sizes(), q);
  check_corr_stat(kOp, "grad_terms", grad_terms, neg.sizes(), q);
  check_cuda_inputs(kOp, q, k);
  KernelDeviceGuard device_guard(q.device());
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor grad_q = at::empty(q.sizes(), q.options(), contiguous);
  at::Tensor grad_k = at::empty(k.sizes(), k.options(), contiguous);
  if (terms.numel() == 0) return {grad_q.zero_(), grad_k.zero_()};

  const CorrKernelInputs x = corr_kernel_inputs(q, k, pos, scale);
  const at::Tensor neg_c = neg.contiguous();
  // d loss / d S[i, neg] = -d loss / d S[i, pos] = grad_terms where the hinge is active; times scale
  // for d S / d (q k^T). The forward writes 0 where pos or neg is -1, but the op can be called with
  // any terms: like the cpu kernel, only entries whose two keys exist get a coefficient, so no key
  // row -1 is ever read or written.
  const at::Tensor active = (terms > 0).logical_and_(pos.unsqueeze(-1) >= 0).logical_and_(neg_c >= 0);
  const at::Tensor coef = at::where(active, grad_terms * scale, at::zeros({}, terms.options())).contiguous();

  corr::CorrTripletGradQParams p{};
  p.in = x.in;
  p.neg = neg_c.data_ptr<int64_t>();
  p.coef = coef.data_ptr<float>();
  p.grad_q = grad_q.data_ptr();
  p.negatives = static_cast<int>(neg.size(2));
  check_launch(corr::corr_triplet_grad_q_cuda(p, kernel_dtype(q), kernel_stream()), kOp);

  // grad_k[neg_it] += coef_it q_i and grad_k[pos_i] -= coef_it q_i: 2T entries per query.
  const int64_t batch = q.size(0), n = q.size(1), m = k.size(1), t = neg.size(2);
  const at::Tensor keys = at::cat({neg_c, pos.unsqueeze(-1).expand({batch, n, t})}, -1);   // (B, N, 2T)
  const at::Tensor coefs = at::cat({coef, -coef}, -1);
  const at::Tensor batch_base = (at::arange(batch, pos.options()) * m).view({batch, 1, 1});
  const at::Tensor dest = at::where(coefs != 0, keys + batch_base, at::full({}, batch * m, pos.options())).flatten();
  const at::Tensor row = at::arange(batch * n, pos.options()).repeat_interleave(2 * t);
  scatter_to_keys(x, dest, row, coefs.flatten(), grad_k, kOp);
  return {grad_q, grad_k};
}

std::tuple<at::Tensor, at::Tensor> corr_hardest_fwd_cuda_op(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& pos, int64_t grid_h, int64_t grid_w,
                                                            int64_t exclusion, double scale, double margin) {
  constexpr const char* kOp = "corr_hardest_fwd";
  check_corr_hardest_args(kOp, q, k, pos, grid_h, grid_w, exclusion, scale, margin, index_range_check(q));
  check_cuda_inputs(kOp, q, k);
  TORCH_CHECK(exclusion <= std::numeric_limits<int32_t>::max(), kOp, " (cuda backend): exclusion ", exclusion,
              " exceeds the kernels' 32-bit range");
  KernelDeviceGuard device_guard(q.device());
  at::Tensor terms = at::empty(pos.sizes(), q.options().dtype(at::kFloat));
  at::Tensor neg = at::empty(pos.sizes(), pos.options());
  if (terms.numel() == 0) return {terms, neg};

  const int num_sms = device_attribute(cudaDevAttrMultiProcessorCount, q);
  const corr::CorrHardestPlan plan = corr::corr_hardest_plan(q.size(0), q.size(1), k.size(1), num_sms);
  at::Tensor split_best = at::empty({q.size(0), plan.key_splits, q.size(1)}, q.options().dtype(at::kFloat));
  at::Tensor split_arg = at::empty({q.size(0), plan.key_splits, q.size(1)}, q.options().dtype(at::kInt));

  const CorrKernelInputs x = corr_kernel_inputs(q, k, pos, scale);
  const corr::CorrHardestParams p =
      corr_hardest_params(x, terms, neg, split_best, split_arg, grid_h, grid_w, exclusion, plan, margin);
  check_launch(corr::corr_hardest_fwd_cuda(p, kernel_dtype(q), kernel_stream()), kOp);
  return {terms, neg};
}

// The nll loss from attention with v = k: attn_i = sum_j P_ij k_j and lse_i come from the attention
// forward, so d loss / d q_i = scale (attn_i - k[pos_i]) / count. d loss / d k_j =
// scale (sum_i P_ij q_i - sum_{i: pos_i = j} q_i) / count, where the first sum is attention's value
// gradient with grad_out = q over the queries with a pos (the others get lse = +inf, so P = 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> corr_nll_loss_cuda_op(const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& pos, double scale,
                                                                     bool with_grad) {
  constexpr const char* kOp = "corr_nll_loss";
  check_corr_nll_args(kOp, q, k, pos, scale, index_range_check(q));
  check_cuda_inputs(kOp, q, k);
  KernelDeviceGuard device_guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t batch = q.size(0), n = q.size(1), m = k.size(1), d = q.size(2);
  if (batch == 0 || n == 0) {
    return {at::zeros({}, f32), with_grad ? at::zeros(q.sizes(), f32) : at::empty({0}, f32),
            with_grad ? at::zeros(k.sizes(), f32) : at::empty({0}, f32)};
  }
  const CorrKernelInputs x = corr_kernel_inputs(q, k, pos, scale);
  const at::Tensor q4 = x.q.unsqueeze(1), k4 = x.k.unsqueeze(1);   // (B, 1, N, D), (B, 1, M, D)
  const cudaStream_t stream = kernel_stream();

  // Attention with v = k. Without the gradient only lse is needed: a 1-wide value slice keeps the
  // forward's P v product to one 128-column tile instead of D columns.
  const int64_t value_dim = with_grad ? d : 1;
  at::Tensor attn = at::empty({batch, 1, n, value_dim}, f32);
  at::Tensor lse = at::empty({batch, 1, n}, f32);
  {
    // v = the first value_dim columns of k: the same rows and strides.
    check_kernel_choice(q, kOp);
    scft::ScftAttnFwdParams p = scft_fwd_params(q4, k4, k4.narrow(3, 0, value_dim), scale);
    p.out_f32 = attn.data_ptr<float>();
    p.lse = lse.data_ptr<float>();
    check_launch(scft::scft_attn_fwd_cuda(p, kernel_dtype(q), stream), kOp);
  }

  at::Tensor terms = at::empty({batch, n}, f32);
  at::Tensor lse_masked = at::empty({batch, 1, n}, f32);
  at::Tensor grad_q = with_grad ? at::empty({batch, n, d}, f32) : at::empty({0}, f32);
  {
    corr::CorrNllRowsParams p{};
    p.in = x.in;
    p.lse = lse.data_ptr<float>();
    p.terms = terms.data_ptr<float>();
    p.lse_masked = lse_masked.data_ptr<float>();
    if (with_grad) {
      p.attn = attn.data_ptr<float>();
      p.grad_q = grad_q.data_ptr<float>();
    }
    check_launch(corr::corr_nll_rows_cuda(p, kernel_dtype(q), stream), kOp);
  }
  // Only the rows kernel reads the attention output: its (B, N, D) float32 go back to the allocator
  // (reusable on this stream once the kernel has run) before the value gradient's workspace.
  attn.reset();
  const at::Tensor valid = pos >= 0;
  const at::Tensor inv_count = valid.sum().clamp_min(1).to(at::kFloat).reciprocal();
  at::Tensor loss = terms.sum() * inv_count;
  if (!with_grad) return {loss, grad_q, at::empty({0}, f32)};

  at::Tensor grad_k = at::empty({batch, m, d}, f32);
  {
    const scft::ScftBwdWorkspacePlan plan = scft_bwd_plan(q, batch, n, m, d, d, scft::ScftBwdGemms::kValueOnly);
    at::Tensor probs = at::empty({batch, 1, n, plan.key_chunk}, q.options());
    // grad_out = q: P^T q.
    scft::ScftAttnBwdParams p = scft_bwd_params(q4, q4, k4, lse_masked, probs, scale);
    p.grad_v_f32 = grad_k.data_ptr<float>();
    check_launch(scft::scft_attn_bwd_dv_cuda(p, kernel_dtype(q), stream), kOp);
  }
  // grad_k[pos_i] -= q_i for the queries with a pos.
  const at::Tensor batch_base = (at::arange(batch, pos.options()) * m).view({batch, 1});
  const at::Tensor dest = at::where(valid, pos + batch_base, at::full({}, batch * m, pos.options())).flatten();
  scatter_to_keys(x, dest, at::arange(batch * n, pos.options()), at::full({batch * n}, -1.0f, f32), grad_k, kOp);

  const at::Tensor grad_scale = inv_count * static_cast<float>(scale);
  grad_q.mul_(grad_scale);
  grad_k.mul_(grad_scale);
  return {loss, grad_q, grad_k};
}

}  // namespace
}  // namespace sketchcolor

SKETCHCOLOR_CUDA_KERNELS(m) {
  m.impl("corr_triplet_fwd", &sketchcolor::corr_triplet_fwd_cuda_op);
  m.impl("corr_triplet_bwd", &sketchcolor::corr_triplet_bwd_cuda_op);
  m.impl("corr_hardest_fwd", &sketchcolor::corr_hardest_fwd_cuda_op);
  m.impl("corr_nll_loss", &sketchcolor::corr_nll_loss_cuda_op);
}

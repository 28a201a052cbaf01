// Python entry points of the CUDA emulator (built by tests/test_cuda_emulated.py with
// torch.utils.cpp_extension, together with emulator.cpp and every csrc/<op>/*_kernel.cu compiled as
// host C++): the CUDA launchers of scft_attention.h and correspondence_loss.h run on CPU tensors
// prepared as the CUDA bindings prepare them (the same parameter helpers), with outputs and
// workspaces poisoned (NaN) before the kernels write them; a kernel error is raised with the
// emulator's message.
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <tuple>

#include "common/cuda_binding.h"
#include "correspondence_loss/correspondence_loss.h"
#include "correspondence_loss/correspondence_loss_binding.h"
#include "emulator/emulator.h"
#include "scft_attention/scft_attention.h"
#include "scft_attention/scft_attention_binding.h"

namespace sketchcolor {
namespace {

void set_device(int major, int minor, int multiprocessors, int smem_per_block_optin, int smem_per_multiprocessor) {
  emu::DeviceModel d;
  d.major = major;
  d.minor = minor;
  d.multiprocessors = multiprocessors;
  d.smem_per_block_optin = smem_per_block_optin;
  d.smem_per_multiprocessor = smem_per_multiprocessor;
  emu::set_device(d);
}

void set_schedule(bool reverse_threads, bool copies_at_issue) {
  emu::Schedule s;
  s.reverse_threads = reverse_threads;
  s.copies = copies_at_issue ? emu::CopyLanding::kAtIssue : emu::CopyLanding::kAtWait;
  emu::set_schedule(s);
}

std::map<std::string, int64_t> stats() {
  const emu::Stats s = emu::stats();
  return {{"blocks", s.blocks}, {"switches", s.switches}, {"mma_sync", s.mma_sync}, {"wgmma", s.wgmma}};
}

at::Tensor poisoned(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::full(sizes, std::numeric_limits<float>::quiet_NaN(), options);
}

// Registers the tensors cp.async may read (inputs and workspaces), then checks a launcher's result.
struct Launch {
  explicit Launch(std::initializer_list<at::Tensor> readable) {
    emu::clear_globals();
    for (const at::Tensor& t : readable)
      if (t.defined()) emu::register_global(t.data_ptr(), size_t(t.storage().nbytes()) - t.storage_offset() * t.element_size());
  }
  ~Launch() { emu::clear_globals(); }
  void check(cudaError_t err, const char* op) const {
    TORCH_CHECK(err == cudaSuccess, op, " (emulated cuda backend): launcher returned cudaError ", int(err), ": ",
                emu::take_error());
  }
};

void check_inputs(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.device().is_cpu(), op, ": the emulator takes CPU tensors");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op, ": float16 or bfloat16 only");
}

std::tuple<at::Tensor, at::Tensor> attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            double scale) {
  check_inputs(q, "scft_attn_fwd");
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), dv = v.size(3);
  at::Tensor out = poisoned({batch, heads, n, dv}, q.options());
  at::Tensor lse = poisoned({batch, heads, n}, q.options().dtype(at::kFloat));
  const at::Tensor qx = kernel_layout(q), kx = kernel_layout(k), vx = kernel_layout(v);
  scft::ScftAttnFwdParams p = scft_fwd_params(qx, kx, vx, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const Launch launch({qx, kx, vx});
  launch.check(scft::scft_attn_fwd_cuda(p, kernel_dtype(q), nullptr), "scft_attn_fwd");
  return {out, lse};
}

// key_chunk = 0: the launchers' own plan for the emulated device (as the CUDA binding computes it);
// otherwise that many keys per chunk (a multiple of 128), to run several chunks on small shapes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse, double scale,
                                                        int64_t key_chunk) {
  check_inputs(q, "scft_attn_bwd");
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), m = k.size(2);
  const int64_t d = q.size(3), dv = v.size(3);
  if (key_chunk == 0) {
    const emu::DeviceModel& device = emu::device();
    const bool wgmma = scft::scft_uses_wgmma(scft::scft_mma_choice(), device.major, device.minor);
    key_chunk = scft::scft_bwd_workspace_plan(batch * heads, n, m, d, dv,
                                              scft::scft_gemm_occupancy(device.multiprocessors, wgmma),
                                              scft::ScftBwdGemms::kAll)
                    .key_chunk;
  }
  const bool several_chunks = (m + key_chunk - 1) / key_chunk > 1;
  at::Tensor grad_q = poisoned({batch, heads, n, d}, q.options());
  at::Tensor grad_k = poisoned({batch, heads, m, d}, k.options());
  at::Tensor grad_v = poisoned({batch, heads, m, dv}, v.options());
  at::Tensor delta = poisoned({batch, heads, n}, q.options().dtype(at::kFloat));
  at::Tensor probs = poisoned({batch, heads, n, key_chunk}, q.options());
  at::Tensor dscores = poisoned({batch, heads, n, key_chunk}, q.options());
  at::Tensor grad_q_accum;
  if (several_chunks) grad_q_accum = poisoned({batch, heads, n, d}, q.options().dtype(at::kFloat));

  const at::Tensor gox = kernel_layout(grad_out), qx = kernel_layout(q), kx = kernel_layout(k);
  const at::Tensor vx = kernel_layout(v), ox = kernel_layout(out), lse_c = lse.contiguous();
  const scft::ScftAttnBwdParams p = scft_full_bwd_params(gox, qx, kx, vx, ox, lse_c, probs, dscores, delta, grad_q,
                                                        grad_k, grad_v, grad_q_accum, scale);
  const Launch launch({gox, qx, kx, vx, ox, probs, dscores, grad_q_accum});
  launch.check(scft::scft_attn_bwd_cuda(p, kernel_dtype(q), nullptr), "scft_attn_bwd");
  return {grad_q, grad_k, grad_v};
}

// Hardest-negative triplet terms and negatives (corr_hardest_fwd_cuda), with the key splits the CUDA
// binding plans for the emulated device's SM count.
std::tuple<at::Tensor, at::Tensor> corr_hardest(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                int64_t grid_h, int64_t grid_w, int64_t exclusion, double scale,
                                                double margin) {
  check_inputs(q, "corr_hardest_fwd");
  at::Tensor terms = poisoned(pos.sizes(), q.options().dtype(at::kFloat));
  at::Tensor neg = at::full(pos.sizes(), int64_t(-7), pos.options());
  const corr::CorrHardestPlan plan = corr::corr_hardest_plan(q.size(0), q.size(1), k.size(1), emu::device().multiprocessors);
  at::Tensor split_best = poisoned({q.size(0), plan.key_splits, q.size(1)}, q.options().dtype(at::kFloat));
  at::Tensor split_arg = at::full({q.size(0), plan.key_splits, q.size(1)}, -7, q.options().dtype(at::kInt));
  const CorrKernelInputs x = corr_kernel_inputs(q, k, pos, scale);
  const corr::CorrHardestParams p =
      corr_hardest_params(x, terms, neg, split_best, split_arg, grid_h, grid_w, exclusion, plan, margin);
  const Launch launch({x.q, x.k});
  launch.check(corr::corr_hardest_fwd_cuda(p, kernel_dtype(q), nullptr), "corr_hardest_fwd");
  return {terms, neg};
}

// Sampled-negative triplet terms (corr_triplet_fwd_cuda).
at::Tensor corr_triplet(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos, const at::Tensor& neg,
                        double scale, double margin) {
  check_inputs(q, "corr_triplet_fwd");
  at::Tensor terms = poisoned(neg.sizes(), q.options().dtype(at::kFloat));
  const CorrKernelInputs x = corr_kernel_inputs(q, k, pos, scale);
  const at::Tensor neg_c = neg.contiguous();
  const corr::CorrTripletParams p = corr_triplet_params(x, neg_c, terms, margin);
  const Launch launch({x.q, x.k});
  launch.check(corr::corr_triplet_fwd_cuda(p, kernel_dtype(q), nullptr), "corr_triplet_fwd");
  return terms;
}

}  // namespace
}  // namespace sketchcolor

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_device", &sketchcolor::set_device, "the emulated GPU: compute capability, SMs, shared memory limits");
  m.def("set_schedule", &sketchcolor::set_schedule, "fiber order and cp.async landing time");
  m.def("stats", &sketchcolor::stats, "counters since the last reset: blocks, switches, mma_sync, wgmma");
  m.def("reset_stats", &sketchcolor::emu::reset_stats);
  m.def("attn_fwd", &sketchcolor::attn_fwd);
  m.def("attn_bwd", &sketchcolor::attn_bwd);
  m.def("corr_hardest", &sketchcolor::corr_hardest);
  m.def("corr_triplet", &sketchcolor::corr_triplet);
}

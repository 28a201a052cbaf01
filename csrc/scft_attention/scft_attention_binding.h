// Parameter structs of the SCFT attention launchers (scft_attention.h) filled from torch tensors:
// for the attention binding and for the ops built on attention (the nll correspondence loss).
// Compiled only in CUDA builds. Tensors are the kernels' views (common/cuda_binding.h,
// kernel_layout) of (B, H, rows, cols) operands; outputs and workspaces are the caller's to set.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>

#include "common/cuda_binding.h"
#include "scft_attention/scft_attention.h"

namespace sketchcolor {

// stride_b, stride_h, stride_row <- t's strides of a (B, H, rows, cols) tensor.
inline void scft_strides(const at::Tensor& t, int64_t& stride_b, int64_t& stride_h, int64_t& stride_row) {
  stride_b = t.stride(0);
  stride_h = t.stride(1);
  stride_row = t.stride(2);
}

// Inputs, strides and sizes of the forward; out / out_f32 and lse are left null.
inline scft::ScftAttnFwdParams scft_fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               double scale) {
  scft::ScftAttnFwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  scft_strides(q, p.q_stride_b, p.q_stride_h, p.q_stride_row);
  scft_strides(k, p.k_stride_b, p.k_stride_h, p.k_stride_row);
  scft_strides(v, p.v_stride_b, p.v_stride_h, p.v_stride_row);
  p.batch = static_cast<int>(q.size(0));
  p.heads = static_cast<int>(q.size(1));
  p.n_queries = static_cast<int>(q.size(2));
  p.n_keys = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.value_dim = static_cast<int>(v.size(3));
  p.scale = static_cast<float>(scale);
  return p;
}

// What both backward launchers read (grad_out, q, k, lse, their strides, the sizes; Dv is
// grad_out's width) and the P workspace with its key chunk. The rest is left null.
inline scft::ScftAttnBwdParams scft_bwd_params(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& lse, const at::Tensor& probs, double scale) {
  scft::ScftAttnBwdParams p{};
  p.grad_out = grad_out.data_ptr();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.lse = lse.data_ptr<float>();
  scft_strides(grad_out, p.grad_out_stride_b, p.grad_out_stride_h, p.grad_out_stride_row);
  scft_strides(q, p.q_stride_b, p.q_stride_h, p.q_stride_row);
  scft_strides(k, p.k_stride_b, p.k_stride_h, p.k_stride_row);
  p.probs = probs.data_ptr();
  p.key_chunk = static_cast<int>(probs.size(3));
  p.batch = static_cast<int>(q.size(0));
  p.heads = static_cast<int>(q.size(1));
  p.n_queries = static_cast<int>(q.size(2));
  p.n_keys = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.value_dim = static_cast<int>(grad_out.size(3));
  p.scale = static_cast<float>(scale);
  return p;
}

// Every parameter of the full backward (scft_attn_bwd_cuda): scft_bwd_params, v and out, the three
// gradients, and the Delta, dS and dQ-accumulator workspaces (grad_q_accum undefined for one chunk).
inline scft::ScftAttnBwdParams scft_full_bwd_params(const at::Tensor& grad_out, const at::Tensor& q,
                                                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                                    const at::Tensor& lse, const at::Tensor& probs,
                                                    const at::Tensor& dscores, const at::Tensor& delta,
                                                    const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                    const at::Tensor& grad_v, const at::Tensor& grad_q_accum,
                                                    double scale) {
  scft::ScftAttnBwdParams p = scft_bwd_params(grad_out, q, k, lse, probs, scale);
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  scft_strides(v, p.v_stride_b, p.v_stride_h, p.v_stride_row);
  scft_strides(out, p.out_stride_b, p.out_stride_h, p.out_stride_row);
  p.grad_q = grad_q.data_ptr();
  p.grad_k = grad_k.data_ptr();
  p.grad_v = grad_v.data_ptr();
  p.delta = delta.data_ptr<float>();
  p.dscores = dscores.data_ptr();
  p.grad_q_accum = grad_q_accum.defined() ? grad_q_accum.data_ptr<float>() : nullptr;
  return p;
}

// The kernels the environment asks for exist: a known copy-ring choice (scft_stages_choice), and a
// tensor-core instruction family (scft_mma_choice) this device has.
inline void check_kernel_choice(const at::Tensor& q, const char* op) {
  TORCH_CHECK(scft::scft_stages_choice() != scft::ScftStagesChoice::kUnknown, op,
              " (cuda backend): SKETCHCOLOR_CUDA_STAGES must be auto or compact, got '",
              std::getenv("SKETCHCOLOR_CUDA_STAGES"), "'");
  const scft::ScftMmaChoice choice = scft::scft_mma_choice();
  TORCH_CHECK(choice != scft::ScftMmaChoice::kUnknown, op,
              " (cuda backend): SKETCHCOLOR_CUDA_MMA must be auto, mma_sync or wgmma, got '",
              std::getenv("SKETCHCOLOR_CUDA_MMA"), "'");
  if (choice == scft::ScftMmaChoice::kWgmma) {
    const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, q);
    const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor, q);
    TORCH_CHECK(scft::scft_wgmma_runs_on(major, minor), op,
                " (cuda backend): SKETCHCOLOR_CUDA_MMA=wgmma needs a compute capability 9.0 GPU (H100, H200); ",
                q.device(), " is ", major, ".", minor);
  }
}

// The occupancy of the backward GEMM kernel that runs on q's device (SKETCHCOLOR_CUDA_MMA as
// check_kernel_choice validated it), for the key chunking of scft_bwd_workspace_plan.
inline scft::ScftGemmOccupancy gemm_occupancy(const at::Tensor& q) {
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, q);
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, q);
  const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor, q);
  const int smem_per_sm = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, q);
  const int reserved_per_block = device_attribute(cudaDevAttrReservedSharedMemoryPerBlock, q);
  return scft::scft_gemm_occupancy(sms, scft::scft_uses_wgmma(scft::scft_mma_choice(), major, minor), smem_per_sm,
                                   reserved_per_block);
}

// The backward's key chunking on q's device (scft_bwd_workspace_plan); under the emulator, capped
// at the chunk its tests ask for (emulated_binding.h).
inline scft::ScftBwdWorkspacePlan scft_bwd_plan(const at::Tensor& q, int64_t batch_heads, int64_t n_queries,
                                                int64_t n_keys, int64_t head_dim, int64_t value_dim,
                                                scft::ScftBwdGemms gemms) {
  int64_t max_key_chunk = 0;
#ifdef SKETCHCOLOR_CUDA_EMULATOR
  max_key_chunk = emulated_binding_options().key_chunk_limit;
#endif
  return scft::scft_bwd_workspace_plan(batch_heads, n_queries, n_keys, head_dim, value_dim, gemm_occupancy(q), gemms,
                                       max_key_chunk);
}

}  // namespace sketchcolor

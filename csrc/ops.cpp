// The torch.library schemas of every sketchcolor op and their CPU kernels. CUDA kernels
// register themselves from csrc/<op>/<op>_cuda.cpp in CUDA builds; autograd and fake
// kernels are registered from Python (sketchcolor/ops/).
#include <Python.h>
#include <torch/library.h>

#include "scft_attention/scft_attention_cpu.h"

// Importing sketchcolor._C runs the static registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(sketchcolor, m) {
  // q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv) -> out (B, H, N, Dv), lse (B, H, N)
  m.def("scft_attn_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  // -> grad_q, grad_k, grad_v
  m.def(
      "scft_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sketchcolor, CPU, m) {
  m.impl("scft_attn_fwd", &sketchcolor::scft_attn_fwd_cpu);
  m.impl("scft_attn_bwd", &sketchcolor::scft_attn_bwd_cpu);
}

// The sketchcolor op library (schemas in op_schemas.h) and its CPU kernels. CUDA kernels
// register themselves from csrc/<op>/<op>_cuda.cpp in CUDA builds; autograd and fake
// kernels are registered from Python (sketchcolor/ops/).
#include <Python.h>
#include <torch/library.h>

#include "correspondence_loss/correspondence_loss_cpu.h"
#include "op_schemas.h"
#include "scft_attention/scft_attention_cpu.h"

// Importing sketchcolor._C runs the static registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(sketchcolor, m) { sketchcolor::define_ops(m); }

TORCH_LIBRARY_IMPL(sketchcolor, CPU, m) {
  m.impl("scft_attn_fwd", &sketchcolor::scft_attn_fwd_cpu);
  m.impl("scft_attn_bwd", &sketchcolor::scft_attn_bwd_cpu);
  m.impl("corr_triplet_fwd", &sketchcolor::corr_triplet_fwd_cpu);
  m.impl("corr_triplet_bwd", &sketchcolor::corr_triplet_bwd_cpu);
  m.impl("corr_hardest_fwd", &sketchcolor::corr_hardest_fwd_cpu);
  m.impl("corr_nll_loss", &sketchcolor::corr_nll_loss_cpu);
}

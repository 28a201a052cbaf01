// The emulator's stand-ins for the GPU calls of the torch bindings (included from
// common/cuda_binding.h when SKETCHCOLOR_CUDA_EMULATOR is defined): the same functions, answered by
// the emulated device (csrc/emulator/emulator.h), whose memory is the host's, so its tensors are CPU
// tensors. The bindings' ops register under the namespace sketchcolor_emulated, as the CPU kernels
// of a copy of the sketchcolor library (csrc/emulator/emulator_binding.cpp defines it), so they run
// beside the package's own CPU kernels and are called as torch.ops.sketchcolor_emulated.<op>.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Device.h>
#include <torch/library.h>

#include <cstdint>

#include "emulator/emulator.h"

#define SKETCHCOLOR_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(sketchcolor_emulated, CPU, m)

namespace sketchcolor {

// What the tests set beyond the device model (emulator_binding.cpp's set_binding_options).
struct EmulatedBindingOptions {
  bool capturing = false;        // stream_is_capturing(): as if torch.cuda.graph were recording
  int64_t key_chunk_limit = 0;   // > 0: the backward's key chunks hold at most this many keys
};
inline EmulatedBindingOptions& emulated_binding_options() {
  static EmulatedBindingOptions options;
  return options;
}

inline void check_cuda_tensor(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, " (emulated cuda backend): ", name,
              " must be a CPU tensor (the emulated device's memory), got one on ", t.device());
}

// One emulated device, current always.
struct KernelDeviceGuard {
  explicit KernelDeviceGuard(c10::Device) {}
};

// Launches run to completion in order, whatever the stream.
inline cudaStream_t kernel_stream() { return nullptr; }

inline bool stream_is_capturing(const at::Tensor&) { return emulated_binding_options().capturing; }

inline int device_attribute(cudaDeviceAttr attr, const at::Tensor&) {
  int value = 0;
  const cudaError_t err = emu::device_get_attribute(&value, attr, 0);
  TORCH_CHECK(err == cudaSuccess, "emulated device: attribute ", int(attr), " is not modelled");
  return value;
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " (emulated cuda backend): launch failed: cudaError ", int(err), ": ",
              emu::take_error());
}

}  // namespace sketchcolor

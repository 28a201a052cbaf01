// What every torch binding of a CUDA kernel file needs (compiled only in CUDA builds): dtype checks
// with messages that name the op and the argument, the layout the kernels read, and everything the
// bindings ask of the GPU and its runtime: the device check, the device guard, the current stream,
// whether that stream is being captured, device attributes, and the launch error check.
//
// The bindings reach the GPU only through this file. Under SKETCHCOLOR_CUDA_EMULATOR those calls go
// to the CUDA emulator instead (csrc/emulator/emulated_binding.h, the same functions), whose device
// takes CPU tensors: the bindings' whole op code, not only their kernels, then runs on a CPU
// (tests/test_cuda_emulated.py), as common/ptx.cuh does for the kernels' instructions.
//
// ATen/cuda/CUDAContext.h is not included: it pulls in cuBLAS / cuSPARSE headers, which would keep
// the bindings from being syntax-checked where torch is a CPU build (tests/test_cuda_compile.py).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "common/kernel_dtype.h"

#ifdef SKETCHCOLOR_CUDA_EMULATOR
#include "emulator/emulated_binding.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// The bindings register their ops as the CUDA kernels of the sketchcolor library.
#define SKETCHCOLOR_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(sketchcolor, CUDA, m)

namespace sketchcolor {

inline void check_cuda_tensor(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, " (cuda backend): ", name, " must be a CUDA tensor, got one on ", t.device());
}

// Makes the tensors' GPU the current one for the op's allocations and launches.
using KernelDeviceGuard = c10::cuda::OptionalCUDAGuard;

// The stream the op's kernels are enqueued on: torch's current one (at::cuda::getCurrentCUDAStream
// re-exports this function).
inline cudaStream_t kernel_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// True while the stream the op launches on, torch's current stream on t's GPU, is being captured
// into a CUDA graph (torch.cuda.graph, torch.compile's cudagraphs), when nothing may copy to the
// host. Capture is per stream: the current device's stream says nothing about t's when the op
// runs before its device guard. A tensor off the GPU is never launched on (the op rejects it).
inline bool stream_is_capturing(const at::Tensor& t) {
  if (!t.is_cuda()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(t.device().index()).stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

inline int device_attribute(cudaDeviceAttr attr, const at::Tensor& t) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, t.device().index()));
  return value;
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " (cuda backend): launch failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err),
              err == cudaErrorInvalidConfiguration
                  ? " (the device grants less shared memory per block than the kernels need: at least "
                    "84 KiB, with the compact kernels that 8.6 and 8.9 GPUs run; every 8.x and 9.0 GPU has it)"
                  : "");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sketchcolor
#endif

namespace sketchcolor {

inline void check_low_precision(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op, " (cuda backend): ", name,
              " has dtype ", t.scalar_type(),
              ", but the cuda backend takes float16 or bfloat16 tensors only. For float32 or float64 use "
              "impl=\"triton\" (CUDA tensors) or impl=\"cpp\" (CPU tensors).");
}

inline KernelDtype kernel_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? KernelDtype::kBFloat16 : KernelDtype::kFloat16;
}

// Every row a kernel copies starts on a 16-byte boundary: 8 fp16/bf16 elements.
constexpr int64_t kKernelRowAlignElems = 8;

// A view of `t` (any rank >= 1, 16-bit elements) the kernels can read directly: last-axis stride 1,
// 16-byte aligned data, and strides that are multiples of 8 elements on every other axis with more
// than one index (so every row starts on a 16-byte boundary and can be copied with 16-byte cp.async
// or read with 16-byte loads). Inputs that qualify, whatever their strides (a transposed view whose
// rows stay contiguous, a slice), are passed as they are; others are copied once into a buffer
// whose rows are padded to a multiple of 8 elements.
inline at::Tensor kernel_layout(const at::Tensor& t) {
  const int64_t last = t.dim() - 1;
  bool qualifies = t.stride(last) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d < last; ++d) {
    if (t.size(d) > 1 && t.stride(d) % kKernelRowAlignElems != 0) qualifies = false;
  }
  if (qualifies) return t;
  // One copy whatever t's strides: into contiguous rows when the width is a multiple of 8.
  std::vector<int64_t> padded(t.sizes().begin(), t.sizes().end());
  padded[last] = (padded[last] + kKernelRowAlignElems - 1) / kKernelRowAlignElems * kKernelRowAlignElems;
  at::Tensor view = at::empty(padded, t.options()).narrow(last, 0, t.size(last));
  view.copy_(t);
  return view;
}

}  // namespace sketchcolor

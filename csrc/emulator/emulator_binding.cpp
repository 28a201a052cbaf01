// Python entry points of the CUDA emulator (built by tests/cuda_emulator.py with
// torch.utils.cpp_extension, together with emulator.cpp, every csrc/<op>/*_kernel.cu and every
// csrc/<op>/*_cuda.cpp binding, all compiled as host C++ with SKETCHCOLOR_CUDA_EMULATOR).
//
// The bindings register their ops as the CPU kernels of sketchcolor_emulated, a library with the
// sketchcolor schemas (op_schemas.h): torch.ops.sketchcolor_emulated.<op> runs a CUDA binding's op
// on CPU tensors, from its input checks through its ATen glue to the kernels, on the emulated
// device this module describes. While the device allocator is on, every CPU allocation (the test's
// inputs, the bindings' outputs and workspaces) is memory of that device (emu::device_malloc): it
// starts as NaN, cp.async may read it, and a kernel running past its end (or, with the start
// guarded, before its start) is a launch error.
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/core/CPUAllocator.h>

#include <cstring>
#include <functional>
#include <map>
#include <string>

#include "common/cuda_binding.h"
#include "emulator/emulator.h"
#include "op_schemas.h"

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

void set_schedule(bool reverse_threads, uint32_t shuffle_seed, bool reverse_blocks, bool copies_at_issue,
                  bool run_blocks) {
  emu::Schedule s;
  s.reverse_threads = reverse_threads;
  s.shuffle_seed = shuffle_seed;
  s.reverse_blocks = reverse_blocks;
  s.copies = copies_at_issue ? emu::CopyLanding::kAtIssue : emu::CopyLanding::kAtWait;
  s.run_blocks = run_blocks;
  emu::set_schedule(s);
}

void set_binding_options(bool capturing, int64_t key_chunk_limit) {
  TORCH_CHECK(key_chunk_limit >= 0 && key_chunk_limit % 128 == 0,
              "set_binding_options: key_chunk_limit must be 0 (the plan's chunks) or a positive multiple of 128, got ",
              key_chunk_limit);
  emulated_binding_options() = {capturing, key_chunk_limit};
}

std::map<std::string, int64_t> stats() {
  const emu::Stats s = emu::stats();
  return {{"blocks", s.blocks},
          {"switches", s.switches},
          {"mma_sync", s.mma_sync},
          {"wgmma", s.wgmma},
          {"device_bytes", s.device_bytes},
          {"device_bytes_peak", s.device_bytes_peak},
          {"dynamic_smem_peak", s.dynamic_smem_peak}};
}

// CPU tensors as the emulated device's memory (emu::device_malloc: NaN-filled, between guard
// pages, readable by cp.async).
class DeviceAllocator final : public c10::Allocator {
 public:
  // The pointer is its own context and device_free the raw deleter, as in the default allocator:
  // oneDNN's matmul allocates through raw_allocate and raw_deallocate, which need both.
  c10::DataPtr allocate(size_t bytes) override {
    void* data = emu::device_malloc(bytes);
    TORCH_CHECK(bytes == 0 || data != nullptr, "emulated device: out of memory allocating ", bytes, " bytes");
    return {data, data, &emu::device_free, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &emu::device_free; }

  void copy_data(void* dest, const void* src, size_t count) const override { std::memcpy(dest, src, count); }
};

DeviceAllocator device_allocator;

// on: CPU tensors allocated from now on are the emulated device's memory; off: the default allocator
// again (tensors already allocated keep their device memory until freed). Returns whether it was on.
bool use_device_allocator(bool on) {
  const bool was_on = c10::GetCPUAllocator() == &device_allocator;
  c10::SetCPUAllocator(on ? static_cast<c10::Allocator*>(&device_allocator) : c10::GetDefaultCPUAllocator());
  return was_on;
}

void set_guarded_edge(const std::string& edge) {
  TORCH_CHECK(edge == "end" || edge == "start", "set_guarded_edge: edge must be 'end' or 'start', got '", edge, "'");
  emu::set_guarded_edge(edge == "start" ? emu::GuardedEdge::kStart : emu::GuardedEdge::kEnd);
}

// One emulated thread loads or stores the byte `offset` bytes from t's data; returns the launch's
// error ("" for none). The tests' check that an access outside a buffer is reported.
std::string access_byte(const at::Tensor& t, int64_t offset, bool store) {
  volatile unsigned char* byte = static_cast<unsigned char*>(t.data_ptr()) + offset;
  const std::function<void()> body = [&] {
    if (store) {
      *byte = 0;
    } else {
      (void)*byte;
    }
  };
  const cudaError_t err = emu::launch(reinterpret_cast<const void*>(&access_byte), dim3(1), dim3(1), 0, body);
  return err == cudaSuccess ? std::string() : emu::take_error();
}

}  // namespace
}  // namespace sketchcolor

TORCH_LIBRARY(sketchcolor_emulated, m) { sketchcolor::define_ops(m); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_device", &sketchcolor::set_device, "the emulated GPU: compute capability, SMs, shared memory limits");
  m.def("set_schedule", &sketchcolor::set_schedule,
        "thread and block order, cp.async landing time, and whether launches run their blocks at all",
        py::arg("reverse_threads") = false, py::arg("shuffle_seed") = 0, py::arg("reverse_blocks") = false,
        py::arg("copies_at_issue") = false,
        py::arg("run_blocks") = true);
  m.def("set_binding_options", &sketchcolor::set_binding_options,
        "the bindings' view of the stream (capturing) and a cap on the backward's key chunk (0: none)",
        py::arg("capturing") = false, py::arg("key_chunk_limit") = 0);
  m.def("use_device_allocator", &sketchcolor::use_device_allocator,
        "CPU allocations as emulated device memory (NaN-filled, guard-paged, readable by cp.async) or "
        "not; returns whether they were");
  m.def("set_guarded_edge", &sketchcolor::set_guarded_edge,
        "which edge of device buffers allocated from now on touches a guard page: 'end' (overruns fault "
        "at the first byte) or 'start' (underruns do)",
        py::arg("edge"));
  m.def("access_byte", &sketchcolor::access_byte, "one emulated thread loads or stores a byte of a tensor",
        py::arg("tensor"), py::arg("offset"), py::arg("store"));
  m.def("stats", &sketchcolor::stats, "counters since the last reset: blocks, switches, mma_sync, wgmma, device_bytes(_peak), dynamic_smem_peak");
  m.def("reset_stats", &sketchcolor::emu::reset_stats);
}

// The emulator's stand-ins for common/ptx.cuh (included from there when SKETCHCOLOR_CUDA_EMULATOR
// is defined): the same functions, with the same meaning, carried out by csrc/emulator/emulator.cpp;
// and the CUDA built-ins and runtime calls the kernel sources use, which a host compiler lacks or
// which must reach the emulated device instead of a real one.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "emulator/emulator.h"

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define threadIdx (::sketchcolor::emu::thread_idx())
#define blockIdx (::sketchcolor::emu::block_idx())
#define blockDim (::sketchcolor::emu::block_dim())
#define gridDim (::sketchcolor::emu::grid_dim())
#define __syncthreads() ::sketchcolor::emu::syncthreads()
#define cudaGetLastError() ::sketchcolor::emu::get_last_error()
#define cudaGetDevice ::sketchcolor::emu::get_device
#define cudaDeviceGetAttribute ::sketchcolor::emu::device_get_attribute
#define cudaFuncSetAttribute(kernel, attr, value) \
  ::sketchcolor::emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value)

// Every lane of the warp takes part (the kernels pass the full mask).
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "32- or 64-bit values");
  if (mask != 0xffffffffu) ::sketchcolor::emu::kernel_error("__shfl_xor_sync with a partial lane mask");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = ::sketchcolor::emu::shfl_xor(bits, lane_mask);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// CUDA's integer and float min / max device functions.
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

namespace sketchcolor {
namespace emu {

// A GPU faults on a load or store not aligned to its size (up to 16 bytes); a CPU would not notice.
template <typename T>
inline void check_alignment(const T* ptr, const char* what) {
  constexpr size_t kAlign = sizeof(T) < 16 ? sizeof(T) : 16;
  if (reinterpret_cast<uintptr_t>(ptr) % kAlign != 0)
    kernel_error(std::string(what) + " of " + std::to_string(sizeof(T)) + " bytes at a misaligned address");
}

}  // namespace emu
}  // namespace sketchcolor

template <typename T>
inline T __ldg(const T* ptr) {
  ::sketchcolor::emu::check_alignment(ptr, "__ldg");
  return *ptr;
}

namespace sketchcolor {
namespace tiles {

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
                          Args&&... args) {
  // Each thread gets its own copy of the parameters, as from the kernel's parameter space.
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  return emu::launch(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes,
                     [&] { std::apply(kernel, params); });
}

template <typename V>
inline V load_vector(const V* ptr) {
  static_assert(sizeof(V) >= 4 && sizeof(V) <= 16 && (sizeof(V) & (sizeof(V) - 1)) == 0, "4- to 16-byte vectors");
  emu::check_alignment(ptr, "vector load");
  return *ptr;
}
template <typename V>
inline void store_vector(V* ptr, const V& value) {
  static_assert(sizeof(V) >= 4 && sizeof(V) <= 16 && (sizeof(V) & (sizeof(V) - 1)) == 0, "4- to 16-byte vectors");
  emu::check_alignment(ptr, "vector store");
  *ptr = value;
}

inline unsigned char* dynamic_smem() { return emu::dynamic_smem(); }
inline uint32_t smem_addr(const void* ptr) { return emu::smem_offset(ptr); }

inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma_m16n8k16(d, a, b0, b1, emu::Operand::kBFloat16);
}
inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma_m16n8k16(d, a, b0, b1, emu::Operand::kFloat16);
}

inline void cp_async_16(uint32_t dst, const void* src, int src_bytes) { emu::cp_async(dst, src, src_bytes); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int kPending>
inline void cp_async_wait() {
  emu::cp_async_wait(kPending);
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { emu::ldmatrix_x4(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { emu::ldmatrix_x4(r, addr, true); }

// Register fences order nothing in the emulator: every access is in program order. The proxy
// fence publishes shared memory to the async proxy that wgmma reads (emulator.h).
inline void wgmma_fence() {}
inline void fence_proxy_async_smem() { emu::fence_proxy_async(); }
template <int kRegs>
inline void fence_registers(float (&)[kRegs]) {}
inline void wgmma_commit() { emu::wgmma_commit(); }
template <int kPending>
inline void wgmma_wait() {
  emu::wgmma_wait(kPending);
}

template <typename T, int kN, bool kTransA, bool kTransB>
inline void wgmma_ss(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "fp16 or bf16 operands");
  static_assert(kN == 64 || kN == 128 || kN == 256, "warpgroup products are 64, 128 or 256 wide");
  emu::wgmma(d, kN, desc_a, desc_b, kTransA, kTransB,
             std::is_same_v<T, __nv_bfloat16> ? emu::Operand::kBFloat16 : emu::Operand::kFloat16);
}

}  // namespace tiles
}  // namespace sketchcolor

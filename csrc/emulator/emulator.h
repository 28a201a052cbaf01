// A CUDA emulator for this package's kernels: it runs the kernel sources, compiled as host C++,
// on a CPU, one thread block at a time, each CUDA thread a fiber of its own.
//
// Why: the CUDA kernels are built and checked for the real targets on machines without a GPU
// (tests/test_cuda_compile.py), but numerics, masks, index math, barrier placement and the
// launchers' dispatch only show when the code runs. Here it runs: tests/test_cuda_emulated.py
// compares the kernels' results with sketchcolor.reference on fresh random inputs.
//
// What is emulated, and how faithfully:
//   - Threads of a block are fibers; a fiber runs until it reaches a barrier or a warp-collective
//     instruction. __syncthreads releases when every live thread of the block has arrived; a warp
//     collective (mma.sync, ldmatrix, shfl) executes when all 32 lanes of the warp have arrived
//     at it, and must be the same instruction in every lane (else: a divergence error). A block in
//     which no fiber can move is a deadlock, reported as an error.
//   - The order in which fibers run between synchronization points is forward, reverse or
//     shuffled thread order (Schedule), so a result that depends on it exposes a missing barrier; blocks run in
//     forward or reverse grid order, so blocks writing the same output, or relying on an order,
//     show too.
//   - cp.async copies land at cp.async.wait_group (the latest moment the hardware allows) or at
//     issue (the earliest), by Schedule: reading a stage before waiting for it, or refilling a
//     stage other warps still read, gives wrong results in one of the two.
//   - wgmma.mma_async reads shared memory and writes the accumulators at wgmma.wait_group, the
//     latest moment allowed, so overwriting an operand tile or reading an accumulator before the
//     wait is caught. It reads through the async proxy: shared memory as it was when every live
//     thread of the block last executed fence.proxy.async. An operand byte that differs from the
//     live shared memory is an error (a generic-proxy write, st.shared or cp.async, not fenced, or
//     a copy racing with the product), and so is a thread writing accumulators of a product still
//     in flight.
//   - Shared memory starts as 0xFF bytes (NaN in fp16, bf16 and fp32) in every block; every shared
//     address an instruction takes is checked against the launch's dynamic shared memory, and every
//     cp.async source (with bytes to copy) against the device_malloc buffers.
//   - Global memory is the host's: the torch bindings (common/cuda_binding.h) run on CPU tensors,
//     allocated with device_malloc. Each buffer lies between inaccessible pages and touches one
//     (its end, or its start: GuardedEdge), so a plain load or store running past its end, or
//     before its start, faults; a fault while a kernel runs is reported as the launch's error
//     (load or store, how far past or before which buffer). __ldg and the vector loads and stores of
//     common/ptx.cuh check their alignment, which a GPU requires and a CPU does not.
//   - mma.sync and wgmma multiply 16-bit operands exactly and accumulate in double, rounding to fp32
//     once per instruction (the tensor cores round at least as often; tests allow for it).
//   - The device (compute capability, SM count, shared memory limits) is a DeviceModel the caller
//     sets; cudaFuncSetAttribute and launches enforce its shared-memory limits as the runtime does.
// Not emulated: timing, memory coalescing or bank conflicts, plain global loads and stores before a
// buffer's start or past its end by less than its 16-byte rounding, and per-thread proxy fences
// (shared memory is published to the async proxy once every live thread has fenced).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace sketchcolor {
namespace emu {

// What cudaDeviceGetAttribute reports.
struct DeviceModel {
  int major = 8;                              // compute capability
  int minor = 0;
  int multiprocessors = 108;                  // cudaDevAttrMultiProcessorCount
  int smem_per_block_optin = 163 * 1024;      // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int smem_per_multiprocessor = 164 * 1024;   // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  int reserved_smem_per_block = 1024;         // cudaDevAttrReservedSharedMemoryPerBlock (1 KiB from 8.0 on)
};
void set_device(const DeviceModel& device);
const DeviceModel& device();

enum class CopyLanding { kAtWait, kAtIssue };
struct Schedule {
  bool reverse_threads = false;   // run ready fibers from the last thread of the block to the first
  uint32_t shuffle_seed = 0;      // nonzero: each round runs the ready fibers in a fresh random order
  bool reverse_blocks = false;    // run a grid's blocks from the last to the first
  CopyLanding copies = CopyLanding::kAtWait;
  // false: launches are validated as usual and then return without running a block, so a
  // binding's allocations can be measured at shapes too large to emulate (outputs stay NaN).
  bool run_blocks = true;
};
void set_schedule(const Schedule& schedule);

// Device memory (emulator_binding.cpp allocates every CPU tensor from it while its allocator is
// on): `bytes` filled with ff ff ff 7f (NaN in every float dtype, out of range as int32 and
// int64), 16-byte aligned, in a mapping of its own between two inaccessible pages. Its buffers are
// the global memory cp.async may read (with none allocated, sources are not checked), and a
// kernel's plain load or store into a guard page is a launch error naming the buffer.
void* device_malloc(size_t bytes);
void device_free(void* ptr);

// Which edge of a buffer touches its guard page, for buffers allocated from now on. kEnd (the
// default): the buffer ends (rounded up to 16 bytes) right before the rear guard, so the first
// byte past its end faults. kStart: it starts right after the front guard, so the first byte
// before its start faults (an index of -1, say). The other edge then has up to a page of
// NaN-filled slack before its guard.
enum class GuardedEdge { kEnd, kStart };
void set_guarded_edge(GuardedEdge edge);

// The error of the last failed launch ("" if none), and clears it.
std::string take_error();

// Counters since the last reset: blocks run, fiber switches, the warp-level mma.sync and
// warpgroup-level wgmma instructions executed (tests check which family a launcher chose), the
// device memory in use (tests measure the bindings' peak), and the largest dynamic shared memory
// a launch asked for (tests check which configuration a launcher chose).
struct Stats {
  int64_t blocks = 0;
  int64_t switches = 0;
  int64_t mma_sync = 0;
  int64_t wgmma = 0;
  int64_t device_bytes = 0;        // device_malloc bytes live now
  int64_t device_bytes_peak = 0;   // the most live at once since the reset
  int64_t dynamic_smem_peak = 0;   // the most dynamic shared memory one accepted launch asked for
};
Stats stats();
void reset_stats();

// ---- what the emulated kernels call (through csrc/emulator/emulated_ptx.h) ----
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void syncthreads();
unsigned char* dynamic_smem();
uint32_t smem_offset(const void* ptr);
[[noreturn]] void kernel_error(const std::string& message);

uint64_t shfl_xor(uint64_t bits, int lane_mask);
void cp_async(uint32_t dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans);
enum class Operand { kBFloat16, kFloat16 };
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, Operand type);
void wgmma(float* d, int n, uint64_t desc_a, uint64_t desc_b, bool trans_a, bool trans_b, Operand type);
void fence_proxy_async();
void wgmma_commit();
void wgmma_wait(int pending);

// Runs body() as every thread of every block of the grid; returns cudaSuccess, or
// cudaErrorInvalidValue / cudaErrorInvalidConfiguration for a launch the runtime would refuse, or
// cudaErrorLaunchFailure after a kernel error (take_error says what).
cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);

// The CUDA runtime calls the launchers make.
cudaError_t get_last_error();
cudaError_t get_device(int* device);
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);

}  // namespace emu
}  // namespace sketchcolor

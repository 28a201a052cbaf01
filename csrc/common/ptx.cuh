// Every PTX instruction the CUDA kernels issue by inline assembly, in one file: the mma.sync
// tensor-core product, ldmatrix fragment loads, cp.async copies, the shared-memory window, the
// kernel launch, and on sm_90a the warpgroup products (wgmma) with their fences; and the vector
// loads and stores, whose alignment the hardware requires.
//
// Why one file: it is the whole boundary between the kernels and the hardware. The CUDA emulator
// (csrc/emulator/, used by tests/test_cuda_emulated.py to run the kernels on a CPU) compiles the
// same kernel sources as host C++ with SKETCHCOLOR_CUDA_EMULATOR defined, and supplies these
// functions, with the same names and meanings, from csrc/emulator/emulated_ptx.h instead.
#pragma once

#if defined(SKETCHCOLOR_CUDA_EMULATOR)
#include "emulator/emulated_ptx.h"
#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace sketchcolor {
namespace tiles {

// Launches kernel<<<grid, block, smem_bytes, stream>>>(args...) and returns the launch's error.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                          Args&&... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

// The block's dynamic shared memory (the size its launch requested). One declaration for every
// kernel: CUDA requires all extern __shared__ arrays of a program to agree.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char sketchcolor_dynamic_smem[];
  return sketchcolor_dynamic_smem;
}

// The shared-state-space address of a generic pointer into shared memory (what ldmatrix, cp.async
// and the wgmma descriptors take).
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// A vector load or store (4 to 16 bytes) through a generic pointer, global or shared. The hardware
// faults unless the address is aligned to the vector's size; a CPU does not, so the emulator's
// versions check it.
template <typename V>
__device__ __forceinline__ V load_vector(const V* ptr) {
  return *ptr;
}
template <typename V>
__device__ __forceinline__ void store_vector(V* ptr, const V& value) {
  *ptr = value;
}

// d (16x8 fp32) += a (16x16, row-major fragment) * b (16x8, column-major fragment), bf16 or fp16.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte asynchronous global->shared copy; bytes past src_bytes (0..16) are zero-filled and
// src is not read past them. .cg: the stream goes through L2 only, it is reused from shared memory.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// ---------------------------------------------------------------------------------------------
// sm_90a only: present in the sm_90a device pass and the host pass (see common/wgmma.cuh).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || !defined(__CUDA_ARCH__)

// Orders this thread's earlier register accesses (accumulators it zeroed or rescaled) before the
// warpgroup's next wgmma.mma_async; every warp of the warpgroup issues it.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Makes this thread's ordinary shared-memory writes (cp.async copies, st.shared) visible to the
// async proxy that wgmma reads shared memory through; a barrier after it publishes them to the
// whole warpgroup's wgmma.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// wgmma writes its accumulators asynchronously, between the instruction and wgmma_wait, while the
// compiler sees the write at the instruction. After the wait, this pins every accumulator register
// so that no read of it is scheduled before the wait.
template <int kRegs>
__device__ __forceinline__ void fence_registers(float (&r)[kRegs]) {
#pragma unroll
  for (int i = 0; i < kRegs; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

#define SKETCHCOLOR_WGMMA_D32                                                              \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                 \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define SKETCHCOLOR_WGMMA_D64                                                              \
  SKETCHCOLOR_WGMMA_D32 ", "                                                               \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "       \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define SKETCHCOLOR_WGMMA_D128                                                             \
  SKETCHCOLOR_WGMMA_D64 ", "                                                               \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "       \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "       \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, " \
  "%111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, "   \
  "%125, %126, %127"
// D += A B with A and B from shared memory (descriptors %A and %B), the scale-d predicate always
// true (accumulate), A and B unscaled, A transposed (MN-major) when %TA is 1, B when %TB is 1.
#define SKETCHCOLOR_WGMMA_SS(SHAPE_AND_TYPES, DREGS, A, B, TA, TB)                   \
  "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, 1, 0;\nwgmma.mma_async.sync.aligned." \
  SHAPE_AND_TYPES " {" DREGS "}, " A ", " B ", accumulate, 1, 1, " TA ", " TB ";\n}\n"

#define SKETCHCOLOR_F4(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define SKETCHCOLOR_F16(d, i) \
  SKETCHCOLOR_F4(d, i), SKETCHCOLOR_F4(d, i + 4), SKETCHCOLOR_F4(d, i + 8), SKETCHCOLOR_F4(d, i + 12)
#define SKETCHCOLOR_F32(d, i) SKETCHCOLOR_F16(d, i), SKETCHCOLOR_F16(d, i + 16)
#define SKETCHCOLOR_F64(d, i) SKETCHCOLOR_F32(d, i), SKETCHCOLOR_F32(d, i + 32)
#define SKETCHCOLOR_F128(d, i) SKETCHCOLOR_F64(d, i), SKETCHCOLOR_F64(d, i + 64)

// The three widths for one operand type string ("bf16.bf16" or "f16.f16"), inside wgmma_ss.
#define SKETCHCOLOR_WGMMA_SS_BY_WIDTH(TYPES)                                                                 \
  if constexpr (kN == 64) {                                                                                  \
    asm volatile(SKETCHCOLOR_WGMMA_SS("m64n64k16.f32." TYPES, SKETCHCOLOR_WGMMA_D32, "%32", "%33", "%34",    \
                                      "%35")                                                                 \
                 : SKETCHCOLOR_F32(d, 0)                                                                     \
                 : "l"(desc_a), "l"(desc_b), "n"(kTA), "n"(kTB));                                            \
  } else if constexpr (kN == 128) {                                                                          \
    asm volatile(SKETCHCOLOR_WGMMA_SS("m64n128k16.f32." TYPES, SKETCHCOLOR_WGMMA_D64, "%64", "%65", "%66",   \
                                      "%67")                                                                 \
                 : SKETCHCOLOR_F64(d, 0)                                                                     \
                 : "l"(desc_a), "l"(desc_b), "n"(kTA), "n"(kTB));                                            \
  } else {                                                                                                   \
    static_assert(kN == 256, "warpgroup products are 64, 128 or 256 wide");                                  \
    asm volatile(SKETCHCOLOR_WGMMA_SS("m64n256k16.f32." TYPES, SKETCHCOLOR_WGMMA_D128, "%128", "%129", "%130", \
                                      "%131")                                                                \
                 : SKETCHCOLOR_F128(d, 0)                                                                    \
                 : "l"(desc_a), "l"(desc_b), "n"(kTA), "n"(kTB));                                            \
  }

// d (64 x kN fp32, the warpgroup's accumulator fragment) += A (64 x 16) B (16 x kN), both read from
// shared memory through their descriptors; A K-major (stored [m][k]) or, with kTransA, MN-major
// (stored [k][m]); B K-major (stored [n][k]) or, with kTransB, MN-major (stored [k][n]). PTX allows
// the transposed reads for 16-bit operands only, which these are. Fragment: thread (warp w of the
// warpgroup, lane l) holds, for n8 block j, d[4j], d[4j+1] at row 16 w + l / 4, columns
// 8 j + 2 (l % 4) + {0, 1}, and d[4j+2], d[4j+3] at the row 8 below: the mma.m16n8 accumulator
// layout, repeated over the n8 blocks.
template <typename T, int kN, bool kTransA, bool kTransB>
__device__ __forceinline__ void wgmma_ss(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "fp16 or bf16 operands");
  constexpr int kTA = kTransA ? 1 : 0;
  constexpr int kTB = kTransB ? 1 : 0;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    SKETCHCOLOR_WGMMA_SS_BY_WIDTH("bf16.bf16")
  } else {
    SKETCHCOLOR_WGMMA_SS_BY_WIDTH("f16.f16")
  }
}

#undef SKETCHCOLOR_WGMMA_SS_BY_WIDTH
#undef SKETCHCOLOR_F128
#undef SKETCHCOLOR_F64
#undef SKETCHCOLOR_F32
#undef SKETCHCOLOR_F16
#undef SKETCHCOLOR_F4
#undef SKETCHCOLOR_WGMMA_SS
#undef SKETCHCOLOR_WGMMA_D128
#undef SKETCHCOLOR_WGMMA_D64
#undef SKETCHCOLOR_WGMMA_D32

#endif  // sm_90a device pass, or the host pass

}  // namespace tiles
}  // namespace sketchcolor

#endif  // !SKETCHCOLOR_CUDA_EMULATOR

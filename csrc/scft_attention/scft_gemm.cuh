// What the backward GEMM kernels of SCFT attention share: the grouped problem description their
// launchers fill, the selection of a CTA's problem, tile and operands, the output store and the
// launch. The kernels differ in how they multiply (scft_gemm_kernel on mma.sync in
// scft_attention_kernel.cu, scft_gemm_sm90_kernel on wgmma in scft_gemm_sm90_kernel.cu), not in
// what they compute.
//
// C (m x n) = alpha * A (m x k) B (k x n) [+ C_in], batched over B*H, up to two independent problems
// per launch (dV and dK of a key chunk share a launch so that together they fill the GPU). fp32
// accumulation; each output element is produced by exactly one CTA: deterministic.
//
// Device code and the CUDA runtime only, no torch header (see scft_attention_kernel.cu).
#pragma once

#include <cstdint>

#include "common/tile_mma.cuh"

namespace sketchcolor {
namespace scft {
namespace gemm {

struct GemmOperand {
  const uint16_t* ptr;   // element [b, h, row, col] at ptr + b*stride_b + h*stride_h + row*stride_row + col
  int64_t stride_b, stride_h, stride_row;
};

struct GemmProblem {
  GemmOperand a;         // A (m x k): stored [m][k] when the kernel's kAKContig, else [k][m]
  GemmOperand b;         // B (k x n): stored [k][n]
  const float* c_in;     // (m x n) fp32 per (b, h), added to the product; null for none
  float* c_out_f32;      // (m x n) fp32 output, or null
  uint16_t* c_out;       // (m x n) output in the input dtype, or null; exactly one output is set
  int64_t c_stride_b, c_stride_h, c_stride_row;   // shared by c_in and the output
  bool c_pairs;          // two adjacent columns may be stored as one 4-byte (8-byte fp32) word
  int m, n, k;
  float alpha;
};

struct GemmBatch {
  GemmProblem problem[2];
  int num_problems;      // 1 or 2; blockIdx.y selects the problem
  int heads;             // H, to split blockIdx.z into (b, h)
  int tiles_n;           // n tiles of the widest problem: blockIdx.x = tile_m * tiles_n + tile_n
};

// The CTA's problem (blockIdx.y), its kBlockM x kBlockN output tile (blockIdx.x) and its head
// (blockIdx.z = b * H + h). Fields are selected one at a time from the two problems rather than by
// copying the chosen problem, which keeps them in registers (no local copy of the parameter array).
template <int kBlockM, int kBlockN>
struct GemmCta {
  const GemmProblem& p0;
  const GemmProblem& p1;
  bool second;           // blockIdx.y != 0
  int m, n, k;           // the problem's sizes
  int row0, col0;        // first output row and column of the tile
  int b, h;              // the head

  __device__ __forceinline__ explicit GemmCta(const GemmBatch& batch)
      : p0(batch.problem[0]), p1(batch.problem[1]), second(blockIdx.y != 0), m(second ? p1.m : p0.m),
        n(second ? p1.n : p0.n), k(second ? p1.k : p0.k) {
    const int tile_m = blockIdx.x / batch.tiles_n;
    const int tile_n = blockIdx.x - tile_m * batch.tiles_n;
    row0 = tile_m * kBlockM;
    col0 = tile_n * kBlockN;
    b = blockIdx.z / batch.heads;
    h = blockIdx.z - b * batch.heads;
  }
  // The tile lies outside the narrower problem of a grouped launch: the CTA has nothing to do.
  __device__ __forceinline__ bool empty() const { return row0 >= m || col0 >= n; }

  // The head's A and B and their row pitches.
  __device__ __forceinline__ const uint16_t* a_ptr() const {
    return second ? p1.a.ptr + b * p1.a.stride_b + h * p1.a.stride_h : p0.a.ptr + b * p0.a.stride_b + h * p0.a.stride_h;
  }
  __device__ __forceinline__ int64_t a_stride_row() const { return second ? p1.a.stride_row : p0.a.stride_row; }
  __device__ __forceinline__ const uint16_t* b_ptr() const {
    return second ? p1.b.ptr + b * p1.b.stride_b + h * p1.b.stride_h : p0.b.ptr + b * p0.b.stride_b + h * p0.b.stride_h;
  }
  __device__ __forceinline__ int64_t b_stride_row() const { return second ? p1.b.stride_row : p0.b.stride_row; }
};

// The output side of the CTA's problem for its head: stores alpha * acc [+ C_in] for pairs of
// adjacent columns, the granularity of every tensor-core accumulator fragment.
struct GemmOutput {
  float alpha;
  const float* c_in;     // head (b, h)'s C_in, or null
  float* c_out_f32;      // head (b, h)'s fp32 output, or null
  uint16_t* c_out;       // head (b, h)'s input-dtype output, or null
  int64_t c_stride_row;
  bool c_pairs;

  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ explicit GemmOutput(const GemmCta<kBlockM, kBlockN>& cta) {
    const GemmProblem& p0 = cta.p0;
    const GemmProblem& p1 = cta.p1;
    const bool second = cta.second;
    const int b = cta.b, h = cta.h;
    alpha = second ? p1.alpha : p0.alpha;
    const int64_t c_offset = second ? b * p1.c_stride_b + h * p1.c_stride_h : b * p0.c_stride_b + h * p0.c_stride_h;
    c_stride_row = second ? p1.c_stride_row : p0.c_stride_row;
    const float* c_in_base = second ? p1.c_in : p0.c_in;
    float* c_out_f32_base = second ? p1.c_out_f32 : p0.c_out_f32;
    uint16_t* c_out_base = second ? p1.c_out : p0.c_out;
    c_pairs = second ? p1.c_pairs : p0.c_pairs;
    c_in = c_in_base != nullptr ? c_in_base + c_offset : nullptr;
    c_out_f32 = c_out_f32_base != nullptr ? c_out_f32_base + c_offset : nullptr;
    c_out = c_out_base != nullptr ? c_out_base + c_offset : nullptr;
  }

  // Columns col, col + 1 of the output row at row_offset (= row * c_stride_row, row < m) from the
  // accumulators acc0, acc1; columns >= n (the problem's) are dropped. An even col with c_pairs is
  // stored as one 8-byte (fp32) or 4-byte word.
  template <typename T>
  __device__ __forceinline__ void store(int64_t row_offset, int col, int n, float acc0, float acc1) const {
    float v0 = alpha * acc0;
    float v1 = alpha * acc1;
    const int64_t idx = row_offset + col;
    if (c_pairs && col + 1 < n) {
      if (c_in != nullptr) {
        const float2 prev = tiles::load_vector(reinterpret_cast<const float2*>(c_in + idx));
        v0 += prev.x;
        v1 += prev.y;
      }
      if (c_out_f32 != nullptr) {
        tiles::store_vector(reinterpret_cast<float2*>(c_out_f32 + idx), make_float2(v0, v1));
      } else {
        tiles::store_vector(reinterpret_cast<uint32_t*>(c_out + idx), tiles::Elem<T>::pack(v0, v1));
      }
    } else {
      if (col < n) {
        if (c_in != nullptr) v0 += c_in[idx];
        if (c_out_f32 != nullptr) c_out_f32[idx] = v0; else c_out[idx] = tiles::Elem<T>::from_float(v0);
      }
      if (col + 1 < n) {
        if (c_in != nullptr) v1 += c_in[idx + 1];
        if (c_out_f32 != nullptr) c_out_f32[idx + 1] = v1; else c_out[idx + 1] = tiles::Elem<T>::from_float(v1);
      }
    }
  }
};

// Launches a GEMM kernel over its configuration's tiles of every problem of the batch (grid: tiles of
// the largest m times tiles of the largest n, the problems, the heads; it sets batch.tiles_n) after
// raising its shared-memory limit.
template <typename Cfg, typename Kernel>
cudaError_t launch(Kernel kernel, GemmBatch batch, int batch_heads, cudaStream_t stream) {
  const cudaError_t err = tiles::prepare_smem(kernel, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  int max_m = 0, max_n = 0;
  for (int i = 0; i < batch.num_problems; ++i) {
    max_m = batch.problem[i].m > max_m ? batch.problem[i].m : max_m;
    max_n = batch.problem[i].n > max_n ? batch.problem[i].n : max_n;
  }
  batch.tiles_n = tiles::ceil_div(max_n, Cfg::kBlockN);
  const dim3 grid(tiles::ceil_div(max_m, Cfg::kBlockM) * batch.tiles_n, batch.num_problems, batch_heads);
  return tiles::launch_kernel(kernel, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, batch);
}

// The GEMMs on wgmma (scft_gemm_sm90_kernel.cu, instantiated there for both dtypes and both A
// layouts), for a batch the backward launchers built, on a 9.0 device: the kernels are built for
// sm_90a only (elsewhere their bodies trap).
template <typename T, bool kAKContig>
cudaError_t launch_sm90(const GemmBatch& batch, int batch_heads, cudaStream_t stream);

}  // namespace gemm
}  // namespace scft
}  // namespace sketchcolor

// Tiles of the CPU kernels: the accumulator type, scratch views, and the tile products
// c = alpha * a @ b (+ c when accumulating), where a (m x k) and b (k x n) are tile views
// (possibly transposed) and c (m x n) is in the accumulator type.
//
// fp32 and fp64 go straight through at::addmm_out (BLAS). bf16 and fp16 tiles go through
// at::mm_out in their own dtype, which ATen sends to oneDNN: with AVX512-BF16 or AMX that is
// about 2x the fp32 rate, where MKL's mixed bf16 x bf16 -> fp32 GEMM runs no faster than fp32
// on some CPUs. The product is rounded once to bf16 per tile and then summed in fp32, so the
// error stays that of one low-precision rounding, like the reference's. That fp32 sum is a
// mixed-dtype ATen loop in the generic code and an AVX-512 loop where cpu_isa() allows.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#include "common/cpu_isa.h"
#include "scft_attention/attention_tiles_avx512.h"

namespace sketchcolor {

// Accumulator type of the CPU kernels: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A (rows x cols) row-major view of a scratch buffer, so tile edges need no padding.
inline at::Tensor tile_view(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.view(-1).narrow(0, 0, rows * cols).view({rows, cols});
}

class TileGemm {
 public:
  // max_elements: the largest m * n this instance will produce; dtype: the tiles' dtype; isa:
  // kAvx512 (only where cpu_isa() gave it) sums bf16 products into fp32 in an AVX-512 loop,
  // kGeneric with ATen's add_.
  TileGemm(int64_t max_elements, const at::TensorOptions& tile_options, CpuIsa isa)
      : scratch_(at::empty({max_elements}, tile_options)), isa_(isa) {}

  void operator()(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, double alpha, bool accumulate) {
    if (a.scalar_type() == c.scalar_type()) {
      auto out = c;
      at::addmm_out(out, c, a, b, accumulate ? 1.0 : 0.0, alpha);
      return;
    }
    auto product = scratch_.narrow(0, 0, a.size(0) * b.size(1)).view({a.size(0), b.size(1)});
    at::mm_out(product, a, b);
    if (accumulate && isa_ == CpuIsa::kAvx512 && product.scalar_type() == at::kBFloat16 &&
        c.scalar_type() == at::kFloat && c.stride(1) == 1) {
      avx512::add_scaled_bf16(reinterpret_cast<const uint16_t*>(product.const_data_ptr<at::BFloat16>()), c.size(0),
                              c.size(1), static_cast<float>(alpha), c.data_ptr<float>(), c.stride(0));
    } else if (accumulate) {
      c.add_(product, alpha);
    } else {
      c.copy_(product).mul_(alpha);
    }
  }

 private:
  at::Tensor scratch_;  // (max_elements,) in the tiles' dtype; unused for fp32 and fp64
  CpuIsa isa_;
};

}  // namespace sketchcolor

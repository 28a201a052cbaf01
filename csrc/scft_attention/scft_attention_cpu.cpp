// Blocked CPU kernels of SCFT attention: online softmax over key tiles in the forward,
// a hand-written single-pass backward, and nothing of size N x M ever allocated.
//
// Tile products go through ATen's cpublas::gemm (MKL / oneDNN): for bf16 and fp16 inputs
// its mixed overload multiplies low-precision tiles into fp32 accumulators, which is where
// the 2.4x bf16 speed of this class of CPU comes from. Elementwise tile work (max, exp,
// sums, conversions) of fp32 and bf16 runs as fused AVX-512 passes where the CPU has AVX-512
// (attention_tiles_avx512.h); elsewhere, for fp64 and fp16, and under SKETCHCOLOR_CPU_ISA=generic
// (common/cpu_isa.h) it goes through ATen ops on tile views, one pass per step.
#include "scft_attention/scft_attention_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>

#include "common/cpu_isa.h"
#include "common/cpu_parallel.h"
#include "scft_attention/attention_tiles_avx512.h"
#include "scft_attention/scft_attention_checks.h"
#include "scft_attention/tile_gemm.h"

namespace sketchcolor {
namespace {

// Query rows per tile: a (BLOCK_Q x D) query tile and the (BLOCK_Q x Dv) fp32 accumulator
// stay in L2 while all key tiles stream past them.
constexpr int64_t BLOCK_Q = 256;
// Keys per tile: the (BLOCK_Q x BLOCK_K) fp32 score tile is 128 KiB, small enough to stay in
// L2 between the GEMM that writes it and the elementwise passes that read it.
constexpr int64_t BLOCK_K = 256;

// The low-precision copy of a probability tile that the second GEMM reads; fp32 and fp64
// inputs use the tile itself.
template <typename scalar_t>
at::Tensor low_precision_tile(const at::Tensor& tile, const at::Tensor& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    return tile;
  } else {
    auto view = tile_view(buffer, tile.size(0), tile.size(1));
    view.copy_(tile);
    return view;
  }
}

// The dtypes with fused AVX-512 tile loops; fp64 and fp16 always take the generic code.
template <typename scalar_t>
constexpr bool has_avx512_tiles = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>;

// A tile's data as the AVX-512 loops take it: fp32, or bf16 as its bits.
inline float* lanes_data(const at::Tensor& tile, float) { return tile.data_ptr<float>(); }
inline uint16_t* lanes_data(const at::Tensor& tile, at::BFloat16) {
  return reinterpret_cast<uint16_t*>(tile.data_ptr<at::BFloat16>());
}
template <typename scalar_t>
auto lanes_data(const at::Tensor& tile) {
  return lanes_data(tile, scalar_t{});
}

// One key tile of the forward's online softmax in fused AVX-512 passes. Returns the tile of
// probabilities (fp32, or bf16 for bf16 inputs) that multiplies V; row_max, row_sum and the
// rows of acc are updated for it. bf16 scores stay the GEMM's bf16 product: the softmax pass
// converts and scales them itself, as the generic code's fp32 copy would have.
template <typename scalar_t>
at::Tensor online_softmax_avx512(TileGemm& tile_gemm, const at::Tensor& q_tile, const at::Tensor& k_tile,
                                 double scale, const at::Tensor& scores_buffer, const at::Tensor& probs_buffer,
                                 const at::Tensor& row_max, const at::Tensor& row_sum, const at::Tensor& acc) {
  const int64_t rows = q_tile.size(0), cols = k_tile.size(0);
  auto scores = tile_view(scores_buffer, rows, cols);
  float scores_scale = 1.0f;
  at::Tensor probs = scores;  // fp32 works in place
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    at::mm_out(scores, q_tile, k_tile.t());
    scores_scale = static_cast<float>(scale);
    probs = tile_view(probs_buffer, rows, cols);
  } else {
    tile_gemm(q_tile, k_tile.t(), scores, scale, false);
  }
  avx512::online_softmax_tile(lanes_data<scalar_t>(scores), lanes_data<scalar_t>(probs), rows, cols, scores_scale,
                              row_max.data_ptr<float>(), row_sum.data_ptr<float>(), acc.data_ptr<float>(),
                              acc.stride(0), acc.size(1));
  return probs;
}

// fused: the elementwise tile work runs in the AVX-512 loops, else in ATen ops.
template <typename scalar_t, bool fused>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    const at::Tensor& lse, double scale) {
  static_assert(!fused || has_avx512_tiles<scalar_t>);
  using acc_t = acc_type<scalar_t>;
  const int64_t heads = q.size(0) * q.size(1), n = q.size(2), m = k.size(2), d = q.size(3), dv = v.size(3);
  const int64_t q_tiles = (n + BLOCK_Q - 1) / BLOCK_Q;
  const at::TensorOptions acc_options = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto q_rows = q.view({heads * n, d}), k_rows = k.view({heads * m, d}), v_rows = v.view({heads * m, dv});
  const auto out_rows = out.view({heads * n, dv}), lse_rows = lse.view({heads * n});

  // One work item per (batch*head, query tile): every core is busy even at B = H = 1.
  parallel_for_in_caller_state(0, heads * q_tiles, 1, [&](int64_t begin, int64_t end) {
    // The fused bf16 code keeps the scores in the GEMM's bf16 product; everything else in fp32.
    const auto scores_buffer = at::empty({BLOCK_Q, BLOCK_K}, fused ? q.options() : acc_options);
    const auto probs_buffer = at::empty({BLOCK_Q, BLOCK_K}, q.options());
    const auto acc_buffer = at::empty({BLOCK_Q, dv}, acc_options);
    const auto stats_buffer = at::empty({4, BLOCK_Q}, acc_options);
    TileGemm tile_gemm(BLOCK_Q * std::max(BLOCK_K, dv), q.options(), fused ? CpuIsa::kAvx512 : CpuIsa::kGeneric);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t head = item / q_tiles, q0 = (item % q_tiles) * BLOCK_Q, rows = std::min(BLOCK_Q, n - q0);
      const auto q_tile = q_rows.narrow(0, head * n + q0, rows);
      const auto acc = tile_view(acc_buffer, rows, dv).zero_();
      auto row_max = stats_buffer[0].narrow(0, 0, rows).fill_(-std::numeric_limits<acc_t>::infinity());
      auto new_max = stats_buffer[1].narrow(0, 0, rows);
      auto row_sum = stats_buffer[2].narrow(0, 0, rows).zero_();
      auto rescale = stats_buffer[3].narrow(0, 0, rows);
      for (int64_t k0 = 0; k0 < m; k0 += BLOCK_K) {
        const int64_t cols = std::min(BLOCK_K, m - k0);
        const auto k_tile = k_rows.narrow(0, head * m + k0, cols);
        at::Tensor probs;
        if constexpr (fused) {
          probs = online_softmax_avx512<scalar_t>(tile_gemm, q_tile, k_tile, scale, scores_buffer, probs_buffer,
                                                  row_max, row_sum, acc);
        } else {
          const auto scores = tile_view(scores_buffer, rows, cols);
          tile_gemm(q_tile, k_tile.t(), scores, scale, false);
          // Online softmax: rescale what was accumulated under the old row max.
          at::amax_out(new_max, scores, {1});
          at::maximum_out(new_max, new_max, row_max);
          at::sub_out(rescale, row_max, new_max).exp_();
          scores.sub_(new_max.unsqueeze(1)).exp_();
          row_sum.mul_(rescale).add_(scores.sum(1));
          acc.mul_(rescale.unsqueeze(1));
          row_max.copy_(new_max);
          probs = low_precision_tile<scalar_t>(scores, probs_buffer);
        }
        tile_gemm(probs, v_rows.narrow(0, head * m + k0, cols), acc, 1.0, true);
      }
      out_rows.narrow(0, head * n + q0, rows).copy_(acc.div_(row_sum.unsqueeze(1)));
      lse_rows.narrow(0, head * n + q0, rows).copy_(row_sum.log_().add_(row_max));
    }
  });
}

// Work items of the backward wait for each other when adding partial dQ tiles; if one
// item throws, the others must stop waiting instead of spinning forever.
class OrderedTileAdd {
 public:
  explicit OrderedTileAdd(int64_t tiles) : turns_(new std::atomic<int64_t>[tiles]) {
    for (int64_t i = 0; i < tiles; ++i) turns_[i].store(0, std::memory_order_relaxed);
  }
  // Runs add() for tile `tile` after chunks 0..chunk-1 have run theirs: the sum order, and so
  // the result, is fixed for a given thread count.
  template <typename F>
  void run_in_order(int64_t tile, int64_t chunk, F&& add) {
    while (turns_[tile].load(std::memory_order_acquire) != chunk) {
      TORCH_CHECK(!failed_.load(std::memory_order_relaxed), "scft_attn_bwd: another work item failed");
      std::this_thread::yield();
    }
    add();
    turns_[tile].store(chunk + 1, std::memory_order_release);
  }
  void mark_failed() { failed_.store(true, std::memory_order_relaxed); }

 private:
  std::unique_ptr<std::atomic<int64_t>[]> turns_;
  std::atomic<bool> failed_{false};
};

// The backward's P = exp(scale Q K^T - lse) and dS = P (dP - Delta) of one tile in one fused
// AVX-512 pass, as the tiles the dV, dK and dQ GEMMs read (fp32, or bf16 for bf16 inputs).
// bf16 reads the bf16 products of both GEMMs directly and writes both bf16 operands, where the
// generic code makes fp32 copies of each; fp32 works in place on the GEMMs' fp32 tiles.
template <typename scalar_t>
std::pair<at::Tensor, at::Tensor> softmax_backward_avx512(TileGemm& tile_gemm, const at::Tensor& q_tile,
                                                          const at::Tensor& k_tile, const at::Tensor& grad_out_aug_tile,
                                                          const at::Tensor& v_aug_tile, const at::Tensor& lse_tile,
                                                          const at::Tensor& delta_tile, double scale,
                                                          const at::Tensor& scores_buffer,
                                                          const at::Tensor& dprobs_buffer,
                                                          const at::Tensor& probs_lp_buffer,
                                                          const at::Tensor& dscores_lp_buffer) {
  const int64_t rows = q_tile.size(0), cols = k_tile.size(0);
  auto scores = tile_view(scores_buffer, rows, cols), dprobs = tile_view(dprobs_buffer, rows, cols);
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    at::mm_out(scores, q_tile, k_tile.t());
    at::mm_out(dprobs, grad_out_aug_tile, v_aug_tile.t());  // dP - Delta, from the augmented operands
    const auto probs = tile_view(probs_lp_buffer, rows, cols), dscores = tile_view(dscores_lp_buffer, rows, cols);
    avx512::softmax_backward_tile(lanes_data<scalar_t>(scores), lanes_data<scalar_t>(dprobs),
                                  lanes_data<scalar_t>(probs), lanes_data<scalar_t>(dscores), rows, cols,
                                  static_cast<float>(scale), lse_tile.data_ptr<float>(), nullptr);
    return {probs, dscores};
  } else {
    tile_gemm(q_tile, k_tile.t(), scores, scale, false);
    tile_gemm(grad_out_aug_tile, v_aug_tile.t(), dprobs, 1.0, false);
    avx512::softmax_backward_tile(lanes_data<scalar_t>(scores), lanes_data<scalar_t>(dprobs),
                                  lanes_data<scalar_t>(scores), lanes_data<scalar_t>(dprobs), rows, cols, 1.0f,
                                  lse_tile.data_ptr<float>(), delta_tile.data_ptr<float>());
    return {scores, dprobs};
  }
}

// fused: as in forward_kernel.
template <typename scalar_t, bool fused>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, double scale, const at::Tensor& grad_q_acc,
                     const at::Tensor& grad_k_acc, const at::Tensor& grad_v_acc) {
  static_assert(!fused || has_avx512_tiles<scalar_t>);
  using acc_t = acc_type<scalar_t>;
  const int64_t heads = q.size(0) * q.size(1), n = q.size(2), m = k.size(2), d = q.size(3), dv = v.size(3);
  const int64_t q_tiles = (n + BLOCK_Q - 1) / BLOCK_Q, k_tiles = (m + BLOCK_K - 1) / BLOCK_K;
  const at::TensorOptions acc_options = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  // Delta_i = rowsum(dO_i * O_i), in the accumulator type.
  at::Tensor delta = at::empty({heads, n}, acc_options);
  const auto out_rows = out.view({heads * n, dv});
  parallel_for_in_caller_state(0, heads * n, BLOCK_Q, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin; r0 < end; r0 += BLOCK_Q) {
      const int64_t rows = std::min(BLOCK_Q, end - r0);
      auto prod = grad_out.view({heads * n, dv}).narrow(0, r0, rows).to(acc_options.dtype()) * out_rows.narrow(0, r0, rows);
      at::Tensor delta_rows = delta.view(-1).narrow(0, r0, rows);
      at::sum_out(delta_rows, prod, {1});
    }
  });

  // dP - Delta is computed by one GEMM of augmented operands: [dO | -Delta] [V | 1]^T. In bf16 and
  // fp16 the tile GEMMs round their output once, and rounding dP alone before subtracting an
  // exact Delta would leave an error of |dP| * 2^-8 in dS where the true dS vanishes (every row
  // of a one-key softmax, for one); rounding the difference keeps it relative to dS. Delta enters
  // as two low-precision columns (high and low parts), so it is represented to ~2^-16.
  constexpr bool low_precision = !std::is_same_v<scalar_t, acc_t>;
  const int64_t extra = low_precision ? 2 : 0;
  at::Tensor grad_out_aug = grad_out.view({heads * n, dv}), v_aug = v.view({heads * m, dv});
  if constexpr (low_precision) {
    grad_out_aug = at::empty({heads * n, dv + extra}, q.options());
    grad_out_aug.narrow(1, 0, dv).copy_(grad_out.view({heads * n, dv}));
    const auto delta_high = delta.view({heads * n, 1}).to(q.scalar_type());
    grad_out_aug.narrow(1, dv, 1).copy_(delta_high).neg_();
    grad_out_aug.narrow(1, dv + 1, 1).copy_(delta.view({heads * n, 1}) - delta_high.to(acc_options.dtype())).neg_();
    v_aug = at::empty({heads * m, dv + extra}, q.options());
    v_aug.narrow(1, 0, dv).copy_(v.view({heads * m, dv}));
    v_aug.narrow(1, dv, extra).fill_(1);
  }
  const auto grad_out_rows = grad_out_aug.narrow(1, 0, dv);

  // Work items are (batch*head, chunk of key tiles): each owns the dK, dV rows of its keys,
  // so those need no synchronization, and every core has work even at B = H = 1. dQ rows
  // receive one partial per chunk, added in chunk order. Items are numbered chunk-major:
  // parallel_for hands each thread a contiguous range, and item (h, c) waits, per query tile,
  // for (h, c - 1). Head-major, that is the last item of the previous thread's range, so the
  // threads ran one after another (16x the ideal time at 64 threads and B*H = 2); chunk-major,
  // it is an item that thread runs at the same time, one query tile ahead.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), k_tiles));
  OrderedTileAdd dq_order(heads * q_tiles);
  const auto q_rows = q.view({heads * n, d}), k_rows = k.view({heads * m, d});
  const auto lse_rows = lse.view({heads * n, 1}), delta_rows = delta.view({heads * n, 1});
  const auto grad_q_rows = grad_q_acc.view({heads * n, d}), grad_k_rows = grad_k_acc.view({heads * m, d});
  const auto grad_v_rows = grad_v_acc.view({heads * m, dv});

  parallel_for_in_caller_state(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
    // The outputs of the Q K^T and dO V^T GEMMs: fp32 tiles that become P and dS in place,
    // except in the fused bf16 code, which reads the GEMMs' bf16 products.
    const auto scores_buffer = at::empty({BLOCK_Q, BLOCK_K}, fused ? q.options() : acc_options);
    const auto dprobs_buffer = at::empty({BLOCK_Q, BLOCK_K}, fused ? q.options() : acc_options);
    const auto probs_lp_buffer = at::empty({BLOCK_Q, BLOCK_K}, q.options());
    const auto dscores_lp_buffer = at::empty({BLOCK_Q, BLOCK_K}, q.options());
    const auto grad_q_partial_buffer = at::empty({BLOCK_Q, d}, acc_options);
    TileGemm tile_gemm(std::max(BLOCK_Q, BLOCK_K) * std::max({BLOCK_K, d, dv}), q.options(),
                       fused ? CpuIsa::kAvx512 : CpuIsa::kGeneric);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item / heads, head = item % heads;
      const int64_t tile_begin = chunk * k_tiles / chunks, tile_end = (chunk + 1) * k_tiles / chunks;
      try {
        for (int64_t qt = 0; qt < q_tiles; ++qt) {
          const int64_t row0 = head * n + qt * BLOCK_Q, rows = std::min(BLOCK_Q, n - qt * BLOCK_Q);
          const auto q_tile = q_rows.narrow(0, row0, rows), grad_out_tile = grad_out_rows.narrow(0, row0, rows);
          const auto grad_out_aug_tile = grad_out_aug.narrow(0, row0, rows);
          const auto lse_tile = lse_rows.narrow(0, row0, rows), delta_tile = delta_rows.narrow(0, row0, rows);
          const auto grad_q_partial = tile_view(grad_q_partial_buffer, rows, d).zero_();
          for (int64_t kt = tile_begin; kt < tile_end; ++kt) {
            const int64_t key0 = head * m + kt * BLOCK_K, cols = std::min(BLOCK_K, m - kt * BLOCK_K);
            const auto k_tile = k_rows.narrow(0, key0, cols), v_aug_tile = v_aug.narrow(0, key0, cols);
            // P = exp(scale * Q K^T - lse), recomputed from the saved row statistics, and
            // dS = P * (dP - Delta) with dP - Delta = dO V^T - Delta, as the GEMMs' operands.
            at::Tensor probs_operand, dscores_operand;
            if constexpr (fused) {
              std::tie(probs_operand, dscores_operand) = softmax_backward_avx512<scalar_t>(
                  tile_gemm, q_tile, k_tile, grad_out_aug_tile, v_aug_tile, lse_tile, delta_tile, scale, scores_buffer,
                  dprobs_buffer, probs_lp_buffer, dscores_lp_buffer);
            } else {
              const auto probs = tile_view(scores_buffer, rows, cols);
              tile_gemm(q_tile, k_tile.t(), probs, scale, false);
              probs.sub_(lse_tile).exp_();
              const auto dscores = tile_view(dprobs_buffer, rows, cols);
              tile_gemm(grad_out_aug_tile, v_aug_tile.t(), dscores, 1.0, false);
              if constexpr (!low_precision) dscores.sub_(delta_tile);
              probs_operand = low_precision_tile<scalar_t>(probs, probs_lp_buffer);
              dscores.mul_(probs);
              dscores_operand = low_precision_tile<scalar_t>(dscores, dscores_lp_buffer);
            }
            // dV += P^T dO;  dK += scale dS^T Q;  dQ_partial += scale dS K
            tile_gemm(probs_operand.t(), grad_out_tile, grad_v_rows.narrow(0, key0, cols), 1.0, true);
            tile_gemm(dscores_operand.t(), q_tile, grad_k_rows.narrow(0, key0, cols), scale, true);
            tile_gemm(dscores_operand, k_tile, grad_q_partial, scale, true);
          }
          dq_order.run_in_order(head * q_tiles + qt, chunk,
                                [&] { grad_q_rows.narrow(0, row0, rows).add_(grad_q_partial); });
        }
      } catch (...) {
        dq_order.mark_failed();
        throw;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> scft_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale) {
  check_attention_inputs(q, k, v);
  // The kernel's tile views of q, k, v must not be seen by autograd.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(q.device().is_cpu(), "scft_attn_fwd (cpp): q must be a CPU tensor, got ", q.device());
  TORCH_CHECK(std::isfinite(scale), "scft_attn_fwd: scale must be finite, got ", scale);
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_type));
  if (q.numel() == 0) return {out, lse};
  const bool avx512 = cpu_isa() == CpuIsa::kAvx512;
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "scft_attn_fwd_cpu", [&] {
    if constexpr (has_avx512_tiles<scalar_t>) {
      if (avx512) return forward_kernel<scalar_t, true>(qc, kc, vc, out, lse, scale);
    }
    forward_kernel<scalar_t, false>(qc, kc, vc, out, lse, scale);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scft_attn_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 double scale) {
  check_attention_grad_inputs(grad_out, q, k, v, out, lse);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(q.device().is_cpu(), "scft_attn_bwd (cpp): q must be a CPU tensor, got ", q.device());
  TORCH_CHECK(std::isfinite(scale), "scft_attn_bwd: scale must be finite, got ", scale);
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool accumulate_in_place = q.scalar_type() == acc_type;
  // fp32 and fp64 accumulate straight into the gradients; bf16 and fp16 into fp32 copies.
  auto make_acc = [&](const at::Tensor& like) {
    return at::zeros(like.sizes(), like.options().dtype(acc_type).memory_format(at::MemoryFormat::Contiguous));
  };
  auto grad_q = make_acc(q), grad_k = make_acc(k), grad_v = make_acc(v);
  if (q.size(2) > 0) {
    const bool avx512 = cpu_isa() == CpuIsa::kAvx512;
    const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const auto grad_out_c = grad_out.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "scft_attn_bwd_cpu", [&] {
      if constexpr (has_avx512_tiles<scalar_t>) {
        if (avx512) {
          return backward_kernel<scalar_t, true>(grad_out_c, qc, kc, vc, out_c, lse_c, scale, grad_q, grad_k, grad_v);
        }
      }
      backward_kernel<scalar_t, false>(grad_out_c, qc, kc, vc, out_c, lse_c, scale, grad_q, grad_k, grad_v);
    });
  }
  if (accumulate_in_place) return {grad_q, grad_k, grad_v};
  return {grad_q.to(q.scalar_type()), grad_k.to(k.scalar_type()), grad_v.to(v.scalar_type())};
}

}  // namespace sketchcolor

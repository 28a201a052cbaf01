// AVX-512 building blocks of the CPU kernels' fused tile loops: 16 fp32 lanes loaded from and
// stored to fp32 or bf16 rows (with a lane mask for row tails), and exp.
//
// Functions carry SKETCHCOLOR_AVX512_TARGET instead of the file being compiled with -mavx512f,
// so the rest of a translation unit that includes it still runs on any x86-64 CPU; callers
// check cpu_isa() (common/cpu_isa.h) before entering AVX-512 code. No torch header: the exp
// test compiles this file on its own.
#pragma once

#include <immintrin.h>

#include <cstdint>

// The ISA extensions that cpu_isa() checks for: F, and BW and VL for 16-bit masked loads and stores.
#define SKETCHCOLOR_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))
// The building blocks below: inlined into the loops that call them.
#define SKETCHCOLOR_AVX512_INLINE SKETCHCOLOR_AVX512_TARGET __attribute__((always_inline)) inline

namespace sketchcolor::avx512 {

// Lanes 0..count-1 of a 16-lane vector, for the last, partial chunk of a row.
SKETCHCOLOR_AVX512_INLINE __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1u);
}

SKETCHCOLOR_AVX512_INLINE __m512 load(const float* p, __mmask16 lanes) { return _mm512_maskz_loadu_ps(lanes, p); }

SKETCHCOLOR_AVX512_INLINE void store(float* p, __mmask16 lanes, __m512 v) { _mm512_mask_storeu_ps(p, lanes, v); }

// bf16 is the high half of an fp32, so widening is exact: zero-extend and shift.
SKETCHCOLOR_AVX512_INLINE __m512 load(const uint16_t* p, __mmask16 lanes) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// Round to nearest even, NaN to the quiet NaN 0x7FC0: bit for bit what c10::BFloat16 (and so
// ATen's copy_ to bf16) does, denormals included, which vcvtneps2bf16 would flush to zero.
SKETCHCOLOR_AVX512_INLINE void store(uint16_t* p, __mmask16 lanes, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, lanes, _mm512_cvtepi32_epi16(rounded));
}

// exp(x) within 1 ulp of the correctly rounded result for every float (checked exhaustively;
// the test, against std::exp, allows 2): x = n ln2 + r with
// |r| <= ln2/2, exp(r) by its degree-7 Taylor polynomial (truncation error 5e-9, under 0.1
// ulp), and the result scaled by 2^n with vscalefps, which rounds once even when the result
// is denormal. Arguments below -104 give +0 and above 89 give inf (exp(-104) is below half
// the smallest denormal, exp(89) above FLT_MAX); clamping them first keeps n and r exact,
// and -inf -> 0, inf -> inf, NaN -> NaN fall out of it.
SKETCHCOLOR_AVX512_INLINE __m512 exp(__m512 x) {
  // vmaxps / vminps return their second operand when either is NaN: x goes second so a NaN
  // argument survives the clamp and propagates through the arithmetic below.
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 x_log2e = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(x_log2e, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 in two parts: with |n| <= 150 the fused n * ln2_high subtraction is exact.
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147182464599609375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-1.904654323148236e-09f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace sketchcolor::avx512

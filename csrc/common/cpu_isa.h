// Which code the CPU kernels run their fused tile loops with, decided at each op call.
//
// AVX-512 (F, BW, VL) when the CPU has it, the generic ATen code otherwise. The environment
// variable SKETCHCOLOR_CPU_ISA overrides that at run time, read at every call so that a test
// can run both paths in one process: `generic` forces the ATen code (it stays tested on
// AVX-512 machines), `avx512` insists on AVX-512 and fails on a CPU without it, and `auto` (or
// unset) picks the best available.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string_view>

namespace sketchcolor {

enum class CpuIsa { kGeneric, kAvx512 };

inline bool cpu_has_avx512() {
  // __builtin_cpu_supports also checks that the OS saves the AVX-512 registers.
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}

inline CpuIsa cpu_isa() {
  const char* env = std::getenv("SKETCHCOLOR_CPU_ISA");
  const std::string_view requested = env == nullptr ? "auto" : env;
  if (requested == "generic") return CpuIsa::kGeneric;
  if (requested == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "SKETCHCOLOR_CPU_ISA=avx512, but this CPU lacks AVX-512 F, BW or VL");
    return CpuIsa::kAvx512;
  }
  TORCH_CHECK(requested == "auto" || requested.empty(), "SKETCHCOLOR_CPU_ISA must be auto, generic or avx512, got '",
              requested, "'");
  return cpu_has_avx512() ? CpuIsa::kAvx512 : CpuIsa::kGeneric;
}

}  // namespace sketchcolor

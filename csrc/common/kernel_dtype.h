// The element type of a CUDA kernel's 16-bit operands, as the launchers of every op take it.
// No torch header: kernel files and the host-only compile tests include it.
#pragma once

namespace sketchcolor {

enum class KernelDtype : int { kFloat16 = 0, kBFloat16 = 1 };

}  // namespace sketchcolor

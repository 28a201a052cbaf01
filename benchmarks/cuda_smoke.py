"""One small forward and backward through every kernel of the cuda backend, for compute-sanitizer:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/cuda_smoke.py
    compute-sanitizer --tool racecheck python benchmarks/cuda_smoke.py

The GPU tests compare results; this gives the sanitizer every kernel once, on shapes small
enough for its slowdown, with tails in every dimension: attention with D = 100 (rows padded by
the binding), Dv = 600 (two output slices, the second partial) and D = Dv = 992, in float16 and
bfloat16, with each tensor-core instruction family the device has (SKETCHCOLOR_CUDA_MMA); the
correspondence loss in each mode. Without the caching allocator (the variable above) memcheck
sees each tensor's own bounds rather than the allocator's larger blocks.
"""
from __future__ import annotations

import os
import sys

import torch

from sketchcolor.benchmarking.cases import Case, make_inputs, workload

# (B, H, N, M, D, Dv)
ATTENTION_SHAPES = [(1, 2, 70, 200, 100, 600), (1, 1, 33, 129, 992, 992)]
# (B, N, M, D): M = 130 is a 10 x 13 key grid in mode hardest
CORRESPONDENCE_SHAPES = [(2, 70, 130, 100)]
NEGATIVES = 4   # T of mode triplet


def mma_choices() -> list[str]:
    """The tensor-core instruction families this device runs (wgmma on compute capability 9.0)."""
    return ["mma_sync", "wgmma"] if torch.cuda.get_device_capability() == (9, 0) else ["mma_sync"]


def cases(dtype: torch.dtype) -> list[Case]:
    """Every attention shape and every correspondence mode, on the cuda backend."""
    attention = [Case("attention", "cuda", n, m, d, dv, batch=batch, heads=heads, dtype=dtype, device="cuda")
                 for batch, heads, n, m, d, dv in ATTENTION_SHAPES]
    correspondence = [Case("correspondence", "cuda", n, m, d, batch=batch, mode=mode,
                           negatives=NEGATIVES if mode == "triplet" else None, dtype=dtype, device="cuda")
                      for batch, n, m, d in CORRESPONDENCE_SHAPES for mode in ("triplet", "hardest", "nll")]
    return attention + correspondence


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_smoke: no CUDA device", file=sys.stderr)
        return 2
    for choice in mma_choices():
        os.environ["SKETCHCOLOR_CUDA_MMA"] = choice
        for dtype in (torch.float16, torch.bfloat16):
            for case in cases(dtype):
                workload(case, make_inputs(case), "fwd+bwd")()
            torch.cuda.synchronize()
            print(f"ran every kernel: {choice} {str(dtype).removeprefix('torch.')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

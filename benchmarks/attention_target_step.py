"""One forward and backward of the cuda backend's SCFT attention at issue 6's target shape
(bfloat16, B = H = 1, N = M = 16384, D = Dv = 992), for a profiler:

    ncu --set basic --section MemoryWorkloadAnalysis -k regex:"scft_attn_fwd|scft_attn_bwd_probs|scft_gemm" \\
        -c 4 python benchmarks/attention_target_step.py

profiles the forward and the first key chunk's P/dS kernel and two GEMMs (benchmarks/run_on_gpu.sh
runs that). The times that count come from benchmarks/bench_attention.py; this only gives the
profiler the kernels at the shape the design counts of benchmarks/NOTES-cuda.md are for.
"""
from __future__ import annotations

import sys

import torch

from sketchcolor.benchmarking.cases import bench_case, make_inputs, workload

TARGET_N = 16384


def main() -> int:
    if not torch.cuda.is_available():
        print("attention_target_step: no CUDA device", file=sys.stderr)
        return 2
    case = bench_case("attention", "cuda", TARGET_N, dtype=torch.bfloat16, device="cuda")
    workload(case, make_inputs(case), "fwd+bwd")()
    torch.cuda.synchronize()
    print(f"one forward and backward: {case.shape_label()}, bfloat16")
    return 0


if __name__ == "__main__":
    sys.exit(main())

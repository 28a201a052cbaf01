"""SCFT attention benchmark: the fused backends against torch SDPA and the materialized reference.

    python benchmarks/bench_attention.py --device cuda      # bf16; reference, torch_sdpa, triton, cuda (when built)
    python benchmarks/bench_attention.py --device cpu       # fp32; reference, torch_sdpa, cpp
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --device cpu --sizes 64   # + triton, interpreted

First the correctness check: every fused backend that can run here is compared with the
float64 reference on small shapes (odd N != M, heads, D = 992) in the benchmark's dtype by
sketchcolor.verify's rule; a failure stops the run (exit status 1) before anything is timed.

Then each provider and size (B = H = 1, N = M, D = Dv = 992 unless --head-dim) is timed
forward and forward+backward (median of --repeats after --warmup; CUDA events on a GPU,
time.perf_counter on CPU) and its forward+backward peak memory is measured
(torch.cuda.max_memory_allocated on a GPU; on CPU the peak RSS of a child process). The FLOP
rates use the explicit count of sketchcolor.benchmarking.cases.flops: forward
4*N*M*D (2*N*M*D for S = q k^T plus 2*N*M*Dv for P v, D = Dv), backward 2.5x the forward.
Cases that run out of memory are reported as such (N = 65536 materializes 16 GiB per score
matrix in the reference). The table is printed and written, with the machine, date and
command, to this script's section of benchmarks/RESULTS.md.

Goals, checked at the end of a GPU run in bfloat16 at N = M = 16384 (D = Dv = 992): the cuda
backend's forward+backward takes at most 0.5x torch_sdpa's time and at most triton's, and its
forward runs at least 0.6x the bf16 GEMM rate, measured in the same run as torch.matmul of the
forward's score product alone, (N x D) @ (D x M).

The cases, inputs and calls are those of ``sketchcolor bench`` (sketchcolor.benchmarking):
one definition of what is timed, shared by this script, the pytest-benchmark suite and the CLI.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sketchcolor.benchmarking.cases import PAPER_HEAD_DIM, Case, bench_case, dtype_skip_reason, skip_reason
from sketchcolor.benchmarking.correctness import print_check, run_check
from sketchcolor.benchmarking.options import default_device, default_dtype, dtype, non_negative_int, positive_int, refuse_missing_cuda, size_list
from sketchcolor.benchmarking.report import publish, safe_ratio
from sketchcolor.benchmarking.suite import BenchResult, run_benchmarks
from sketchcolor.benchmarking.timing import time_call
from sketchcolor.ops import _backends
from sketchcolor.verify import ATTENTION_SHAPES_QUICK, attention_case

RESULTS = Path(__file__).with_name("RESULTS.md")
FUSED = ("triton", "cuda", "cpp")
DEFAULT_SIZES = {"cuda": (1024, 4096, 16384, 65536), "cpu": (1024, 4096)}
# The interpreter runs every tile op in numpy: at D = 992 a forward+backward at N = M = 128
# takes tens of seconds, so larger sizes are left to compiled backends.
INTERPRETER_MAX_N = 128
CUDA_GOAL = {"n": 16384, "dtype": torch.bfloat16, "head_dim": PAPER_HEAD_DIM, "time_vs_sdpa": 0.5, "time_vs_triton": 1.0,
             "fwd_vs_gemm": 0.6}
LEGEND = (
    "fwd: no autograd; fwd+bwd: one forward and the gradients of q, k, v. FLOP/s: forward 4*N*M*D, backward 2.5x "
    "(D = Dv). peak MiB: fwd+bwd, inputs included, above the memory before the case (GPU: "
    "torch.cuda.max_memory_allocated; CPU: peak RSS of a child process). time/x and mem/x: fwd+bwd time and peak "
    "memory over x's (sdpa = torch.nn.functional.scaled_dot_product_attention, ref = the materialized reference); "
    "lower is better."
)


def providers(device: str, impls: tuple[str, ...] | None) -> tuple[str, ...]:
    if impls is None:
        impls = ("triton", "cuda") if device == "cuda" else ("cpp", "triton")
    return ("reference", "torch_sdpa", *impls)


def correctness_cases(fused: list[str], device: str, case_dtype: torch.dtype) -> list[tuple[str, Case]]:
    """(backend, case) per backend and shape of the correctness check."""
    return [(provider, attention_case(provider, shape, case_dtype, device)) for provider in fused for shape in ATTENTION_SHAPES_QUICK]


def gemm_flops_per_second(n: int, d: int, dtype: torch.dtype) -> float:
    """The rate of torch.matmul (cuBLAS) on the forward's score product alone, (n x d) @ (d x n):
    the GEMM rate the fused forward is held against."""
    a = torch.randn(n, d, device="cuda", dtype=dtype)
    b = torch.randn(d, n, device="cuda", dtype=dtype)
    timing = time_call(lambda: torch.matmul(a, b), "cuda", repeats=10, warmup=3)
    return 2 * n * n * d / (timing.median_ms * 1e-3)


def cuda_goal_lines(results: list[BenchResult], gemm_rate: float | None) -> list[str]:
    """'met' / 'NOT met' / 'not measured' for each of CUDA_GOAL's targets (the module docstring)."""
    at_goal = {r.case.provider: r for r in results if r.case.n == CUDA_GOAL["n"]}

    def fwd_bwd_ms(provider: str) -> float | None:
        return at_goal[provider].median_ms("fwd+bwd") if provider in at_goal else None

    def line(label: str, value: float | None, bound: float, at_most: bool) -> str:
        if value is None:
            return f"goal cuda N={CUDA_GOAL['n']} bf16 {label}: not measured"
        met = value <= bound if at_most else value >= bound
        return f"goal cuda N={CUDA_GOAL['n']} bf16 {label}: {'met' if met else 'NOT met'} ({value:.2f}x)"

    cuda_ms = fwd_bwd_ms("cuda")
    fwd_rate = at_goal["cuda"].flops_per_second("fwd") if "cuda" in at_goal else None
    gemm = "" if gemm_rate is None else f" ({gemm_rate / 1e12:.0f} TFLOP/s, torch.matmul N x D x M)"
    return [
        line(f"fwd+bwd <= {CUDA_GOAL['time_vs_sdpa']}x torch_sdpa", safe_ratio(cuda_ms, fwd_bwd_ms("torch_sdpa")),
             CUDA_GOAL["time_vs_sdpa"], at_most=True),
        line(f"fwd+bwd <= {CUDA_GOAL['time_vs_triton']}x triton", safe_ratio(cuda_ms, fwd_bwd_ms("triton")),
             CUDA_GOAL["time_vs_triton"], at_most=True),
        line(f"fwd >= {CUDA_GOAL['fwd_vs_gemm']}x the bf16 GEMM rate{gemm}", safe_ratio(fwd_rate, gemm_rate),
             CUDA_GOAL["fwd_vs_gemm"], at_most=False),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device(), help="default: cuda if present, else cpu")
    parser.add_argument("--dtype", type=dtype, default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--sizes", type=size_list, default=None, metavar="LIST", help="N = M (default: 1024,4096,16384,65536 on cuda; 1024,4096 on cpu)")
    parser.add_argument("--impl", nargs="+", choices=FUSED, default=None, help="fused backends (default: triton cuda on cuda; cpp triton on cpu)")
    parser.add_argument("--head-dim", type=positive_int, default=PAPER_HEAD_DIM, help=f"D = Dv (default: {PAPER_HEAD_DIM}, the paper's)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed repetitions per pass; the median is reported (default: 5)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs before timing (default: 1; Triton autotunes in it)")
    parser.add_argument("--deterministic", action="store_true", help="triton: dQ without atomics (Options.deterministic)")
    parser.add_argument("--tf32", action="store_true", help="triton, float32 inputs: TF32 tensor-core dots (Options.tf32)")
    parser.add_argument("--skip-check", action="store_true", help="time even if the correctness check fails")
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/RESULTS.md alone")
    args = parser.parse_args()
    refuse_missing_cuda(parser, args.device)

    case_dtype = args.dtype or default_dtype(args.device)
    sizes = args.sizes or DEFAULT_SIZES[args.device]
    interpreted = args.device == "cpu" and _backends.triton_interpreting()
    notes, runnable = [], []
    for provider in providers(args.device, args.impl):
        reason = skip_reason("attention", provider, args.device) or dtype_skip_reason("attention", provider, case_dtype)
        if reason is None:
            runnable.append(provider)
        else:
            notes.append(f"skipped {provider}: {reason}")

    triton_options = {"deterministic": args.deterministic, "tf32": args.tf32}
    if "triton" in runnable:
        from sketchcolor.kernels.scft_attention import set_options

        set_options(**triton_options)  # process-wide; on CPU the memory children run with the defaults
        notes.append("triton options: " + ", ".join(f"{k}={v}" for k, v in triton_options.items()))

    fused = [p for p in runnable if p in FUSED]
    check_lines = run_check(correctness_cases(fused, args.device, case_dtype))
    if not print_check(check_lines, args.skip_check):
        return 1

    cases: list[Case] = []
    for provider in runnable:
        for n in sizes:
            if provider == "triton" and interpreted and n > INTERPRETER_MAX_N:
                notes.append(f"skipped triton N={n}: interpreted on CPU, only N <= {INTERPRETER_MAX_N}")
                continue
            cases.append(bench_case("attention", provider, n, head_dim=args.head_dim, dtype=case_dtype, device=args.device))
    cases.sort(key=lambda case: case.n)  # each size's baselines and backends measured together
    results = run_benchmarks(cases, repeats=args.repeats, warmup=args.warmup)
    goal_run = (args.device == "cuda" and case_dtype == CUDA_GOAL["dtype"] and args.head_dim == CUDA_GOAL["head_dim"]
                and CUDA_GOAL["n"] in sizes)
    if goal_run:
        notes += cuda_goal_lines(results, gemm_flops_per_second(CUDA_GOAL["n"], args.head_dim, case_dtype))
    return publish(
        results,
        title=f"SCFT attention, {args.device}, {str(case_dtype).removeprefix('torch.')}, D = Dv = {args.head_dim}",
        section=f"bench_attention {args.device}",
        device=args.device,
        check_lines=check_lines,
        legend=LEGEND,
        notes=notes,
        results_path=RESULTS,
        write=not args.no_write,
    )


if __name__ == "__main__":
    sys.exit(main())

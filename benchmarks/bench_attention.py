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
from sketchcolor.benchmarking.options import default_device, default_dtype, dtype, non_negative_int, positive_int, size_list
from sketchcolor.benchmarking.report import publish
from sketchcolor.benchmarking.suite import run_benchmarks
from sketchcolor.ops import _backends
from sketchcolor.verify import ATTENTION_SHAPES_QUICK, attention_case

RESULTS = Path(__file__).with_name("RESULTS.md")
FUSED = ("triton", "cuda", "cpp")
DEFAULT_SIZES = {"cuda": (1024, 4096, 16384, 65536), "cpu": (1024, 4096)}
# The interpreter runs every tile op in numpy: at D = 992 a forward+backward at N = M = 128
# takes tens of seconds, so larger sizes are left to compiled backends.
INTERPRETER_MAX_N = 128
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
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available on this machine")

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

"""Correspondence-loss benchmark: the materialized reference against the fused backends.

    python benchmarks/bench_correspondence.py                  # CPU, fp32, N = M in 1024, 4096, 16384, every mode
    python benchmarks/bench_correspondence.py --sizes 1024     # a quick check that everything runs
    python benchmarks/bench_correspondence.py --device cuda    # reference and triton on a GPU, bf16

First the correctness check: every fused backend that runs here is compared with the float64
reference on small shapes (heads, D = 992) in every mode and the benchmark's dtype by
sketchcolor.verify's rule; a failure stops the run (exit status 1) before anything is timed.

Then each case (mode, provider, N = M, D = 992, B = 1, T = 32 sampled negatives in mode triplet)
is timed forward and forward+backward (median of --repeats after --warmup) and its
forward+backward peak memory is measured, by sketchcolor.benchmarking (the machinery of
``sketchcolor bench``): on CPU the peak RSS of a fresh child process per case above its RSS
after imports, on GPU torch.cuda.max_memory_allocated. The table is printed and written to this
script's section of benchmarks/RESULTS.md with the machine, date and command.

Goal, checked at the end: on CPU in fp32 at N = M = 16384, in modes hardest and nll, the cpp
backend's peak memory is at most 0.1x the reference's and its forward+backward time at most
the reference's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sketchcolor.benchmarking.cases import (
    CORRESPONDENCE_MODES,
    DEFAULT_NEGATIVES,
    PAPER_HEAD_DIM,
    Case,
    bench_case,
    dtype_skip_reason,
    skip_reason,
)
from sketchcolor.benchmarking.correctness import print_check, run_check
from sketchcolor.benchmarking.options import default_device, default_dtype, dtype, mode_list, non_negative_int, positive_int, refuse_missing_cuda, size_list
from sketchcolor.benchmarking.report import baseline_ratios, publish
from sketchcolor.benchmarking.suite import run_benchmarks
from sketchcolor.verify import CORRESPONDENCE_SHAPES_QUICK, correspondence_case

RESULTS = Path(__file__).with_name("RESULTS.md")
GOAL = {"device": "cpu", "dtype": torch.float32, "n": 16384, "modes": ("hardest", "nll"), "provider": "cpp",
        "memory_ratio": 0.1, "time_ratio": 1.0}
LEGEND = (
    "fwd: no autograd; fwd+bwd: the loss and the gradients of q and k. peak MiB: fwd+bwd, inputs included, above "
    "the process's memory after imports (CPU: peak RSS of a child process per case; GPU: "
    "torch.cuda.max_memory_allocated). time/ref and mem/ref: fwd+bwd time and peak memory over the reference's."
)


def correctness_cases(fused: list[str], modes, device: str, case_dtype: torch.dtype) -> list[tuple[str, Case]]:
    """("<backend> <mode>", case) per backend, mode and shape of the correctness check."""
    return [
        (f"{provider} {mode}", correspondence_case(provider, mode, shape, case_dtype, device))
        for provider in fused
        for mode in modes
        for shape in CORRESPONDENCE_SHAPES_QUICK
    ]


def goal_lines(results) -> list[str]:
    """'met' / 'NOT met' / 'not measured' for each mode of the goal (see the module docstring)."""
    lines = []
    for mode in GOAL["modes"]:
        result = next(
            (r for r in results if r.case.mode == mode and r.case.provider == GOAL["provider"] and r.case.n == GOAL["n"]
             and r.case.dtype == GOAL["dtype"] and r.case.device == GOAL["device"]),
            None,
        )
        ratios = baseline_ratios(result, results) if result is not None else {}
        memory, time = ratios.get("memory_vs_reference"), ratios.get("time_vs_reference")
        label = f"goal {mode} N={GOAL['n']} {GOAL['provider']} fp32 CPU: mem <= {GOAL['memory_ratio']}x ref, time <= {GOAL['time_ratio']}x ref"
        if memory is None or time is None:
            lines.append(f"{label}: not measured")
            continue
        met = memory <= GOAL["memory_ratio"] and time <= GOAL["time_ratio"]
        lines.append(f"{label}: {'met' if met else 'NOT met'} (mem {memory:.3f}x, time {time:.2f}x)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device(), help="default: cuda if present, else cpu")
    parser.add_argument("--dtype", type=dtype, default=None, help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--sizes", type=size_list, default=(1024, 4096, 16384), metavar="LIST", help="N = M (default: 1024,4096,16384)")
    parser.add_argument("--modes", type=mode_list, default=CORRESPONDENCE_MODES, metavar="LIST", help="triplet, hardest, nll or all (default: all)")
    parser.add_argument("--impl", nargs="+", choices=("cpp", "triton", "cuda"), default=None, help="fused backends (default: cpp on cpu, triton and cuda on cuda)")
    parser.add_argument("--negatives", type=positive_int, default=DEFAULT_NEGATIVES, help=f"T of mode triplet (default: {DEFAULT_NEGATIVES})")
    parser.add_argument("--head-dim", type=positive_int, default=PAPER_HEAD_DIM, help=f"D (default: {PAPER_HEAD_DIM})")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed repetitions per pass; the median is reported (default: 3)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs before timing (default: 1)")
    parser.add_argument("--skip-check", action="store_true", help="time even if the correctness check fails")
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/RESULTS.md alone")
    args = parser.parse_args()
    refuse_missing_cuda(parser, args.device)

    case_dtype = args.dtype or default_dtype(args.device)
    impls = args.impl or (["cpp"] if args.device == "cpu" else ["triton", "cuda"])
    runnable, skipped = [], []
    for provider in ("reference", *impls):
        reason = skip_reason("correspondence", provider, args.device) or dtype_skip_reason("correspondence", provider, case_dtype)
        if reason is None:
            runnable.append(provider)
        else:
            skipped.append(f"skipped {provider}: {reason}")

    check_lines = run_check(correctness_cases([p for p in runnable if p != "reference"], args.modes, args.device, case_dtype))
    if not print_check(check_lines, args.skip_check):
        return 1

    cases = []
    for provider in runnable:
        cases += [
            bench_case(f"correspondence/{mode}", provider, n, head_dim=args.head_dim, dtype=case_dtype, device=args.device,
                       negatives=args.negatives)
            for mode in args.modes
            for n in args.sizes
        ]
    # Each (mode, size) with its reference next to it, smallest first.
    cases.sort(key=lambda case: (case.mode, case.n))
    results = run_benchmarks(cases, repeats=args.repeats, warmup=args.warmup)
    return publish(
        results,
        title=f"Correspondence loss, {args.device}, {str(case_dtype).removeprefix('torch.')}, D = {args.head_dim}",
        section=f"bench_correspondence {args.device}",
        device=args.device,
        check_lines=check_lines,
        legend=LEGEND,
        notes=[*skipped, *goal_lines(results)],
        results_path=RESULTS,
        write=not args.no_write,
    )


if __name__ == "__main__":
    sys.exit(main())

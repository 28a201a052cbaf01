"""``sketchcolor bench``: time and measure every available backend against torch SDPA and the reference.

For each op variant, provider and size: the median time of the forward and of forward+backward,
the FLOP rate, the peak memory of forward+backward, and the ratios to the baselines measured in
the same run. Prints a table and writes bench.json, time.png and memory.png into --out.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..output_paths import check_output_folder
from . import machine
from .cases import CORRESPONDENCE_MODES, DEFAULT_NEGATIVES, PAPER_HEAD_DIM, bench_case, dtype_skip_reason, providers_for, skip_reason
from .options import (
    add_target_options,
    default_dtype,
    dtype,
    missing_cuda,
    mode_list,
    non_negative_int,
    positive_int,
    random_seed,
    selected_ops,
    size_list,
)
from .report import bench_table, format_table, memory_notes, result_record, write_json
from .suite import run_benchmarks

DEFAULT_SIZES = (1024, 4096, 16384)
OUT_FILES = ("bench.json", "time.png", "memory.png")  # what --out receives
LEGEND = (
    "fwd runs without autograd; fwd+bwd is one forward and the backward of all inputs. peak MiB: fwd+bwd, "
    "inputs included, above the process's memory after imports (CPU: peak RSS of a child process per case; "
    "GPU: torch.cuda.max_memory_allocated). time/x and mem/x: fwd+bwd time and peak memory over x's "
    "(sdpa = torch.nn.functional.scaled_dot_product_attention, ref = the materialized reference); lower is better."
)


def add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark the kernel backends against torch SDPA and the reference (time, FLOP/s, peak memory)",
        description="Time forward and forward+backward of every available backend per size (median of several "
        "repetitions; CUDA events on GPU), measure peak memory, and compare with torch SDPA and the materialized "
        "reference in the same run. Prints a table and writes bench.json, time.png and memory.png into --out.",
    )
    add_target_options(parser)
    parser.add_argument("--dtype", type=dtype, default=None, help="float32, bfloat16, float16 or float64 (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument(
        "--sizes", type=size_list, default=DEFAULT_SIZES, metavar="LIST",
        help=f"comma-separated N = M token counts (default: {','.join(map(str, DEFAULT_SIZES))})",
    )
    parser.add_argument("--head-dim", type=positive_int, default=PAPER_HEAD_DIM, help=f"D = Dv (default: {PAPER_HEAD_DIM}, the paper's)")
    parser.add_argument(
        "--modes", type=mode_list, default=CORRESPONDENCE_MODES, metavar="LIST",
        help=f"correspondence-loss modes from {', '.join(CORRESPONDENCE_MODES)}, or all (default: all)",
    )
    parser.add_argument("--negatives", type=positive_int, default=DEFAULT_NEGATIVES, help=f"T of the triplet mode (default: {DEFAULT_NEGATIVES})")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed repetitions per pass; the median is reported (default: 5)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs before timing (default: 1)")
    parser.add_argument("--seed", type=random_seed, default=0, help="seed of the random inputs (default: 0)")
    parser.add_argument(
        "--threads", type=positive_int, default=None,
        help="CPU threads of torch (default: torch's, one per core); 1 gives steadier numbers on a shared machine",
    )
    parser.add_argument("--out", default="runs/bench", help="folder for bench.json, time.png and memory.png (default: runs/bench)")
    parser.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    reason = missing_cuda(args.device)
    if reason is not None:  # cli.main prints a ValueError as a usage error and exits 2
        raise ValueError(reason)
    check_output_folder("--out", args.out, OUT_FILES)
    case_dtype = args.dtype or default_dtype(args.device)
    cases, skipped = [], {}
    for op in selected_ops(args.op):
        variants = [op] if op == "attention" else [f"{op}/{mode}" for mode in args.modes]
        for provider in providers_for(op, args.impl):
            reason = skip_reason(op, provider, args.device) or dtype_skip_reason(op, provider, case_dtype)
            if reason is not None:
                skipped[f"{op} {provider}"] = reason
                continue
            cases += [
                bench_case(variant, provider, n, head_dim=args.head_dim, dtype=case_dtype, device=args.device, negatives=args.negatives)
                for variant in variants
                for n in args.sizes
            ]
    # Grouped by variant and size, so that each size's baselines and backends are measured together.
    cases.sort(key=lambda case: (case.variant, case.n))
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or default_threads)  # the memory children inherit this count
    try:
        results = run_benchmarks(cases, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
        environment = machine.describe(args.device)
    finally:
        torch.set_num_threads(default_threads)

    headers, rows = bench_table(results)
    print(format_table(headers, rows))
    print("\n" + "\n".join([LEGEND, *memory_notes(results)]))
    for what, reason in skipped.items():
        print(f"skipped {what}: {reason}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {key: value for key, value in vars(args).items() if key not in ("handler", "dtype")}
    settings["dtype"] = str(case_dtype).removeprefix("torch.")
    payload = {
        "environment": environment,
        "settings": settings,
        "skipped": skipped,
        "results": [result_record(result, results) for result in results],
    }
    json_path, time_path, memory_path = (out / name for name in OUT_FILES)
    write_json(json_path, payload)
    from .plots import plot_memory, plot_times  # matplotlib is loaded only when a bench has run

    plot_times(results, time_path)
    plot_memory(results, memory_path)
    print(f"wrote {json_path}, {time_path}, {memory_path}")
    failed = [r for r in results if r.error is not None and not r.out_of_memory]
    return 1 if failed else 0

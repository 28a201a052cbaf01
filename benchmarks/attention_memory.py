"""Peak memory of SCFT attention forward+backward per provider, each case in its own process.

    python benchmarks/attention_memory.py                               # N = M = 16384, fp32 (minutes)
    python benchmarks/attention_memory.py --sizes 1024 --results /tmp/RESULTS.md   # a quick check

Providers: the materialized reference, the cpp backend and torch SDPA on CPU, B = H = 1,
D = Dv = 992. Each case runs in a fresh Python process (sketchcolor.benchmarking.memory): it
imports torch and sketchcolor, runs a tiny warm-up, records its RSS ("after imports"), runs one
forward+backward and reports its peak RSS. The table gives the peak minus the RSS after
imports (what the case needed, inputs included) and the raw peak, and is written to this
script's section of benchmarks/RESULTS.md with the machine, date, torch version and command.

Targets, reported and not asserted: at N = M = 16384 in fp32 the cpp backend needs at most
1.1x torch SDPA's memory and at most 0.3x the reference's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sketchcolor.benchmarking import machine
from sketchcolor.benchmarking.cases import PAPER_HEAD_DIM, bench_case, skip_reason
from sketchcolor.benchmarking.options import dtype, positive_int, size_list
from sketchcolor.benchmarking.report import MIB, baseline_ratios, format_table, markdown_table, memory_notes, peak_cell
from sketchcolor.benchmarking.results_file import write_section
from sketchcolor.benchmarking.suite import run_benchmarks

PROVIDERS = ("reference", "cpp", "torch_sdpa")
SECTION = "attention_memory.py"
# (baseline, largest cpp / baseline peak-memory ratio) at TARGET_N in fp32.
TARGETS = (("torch_sdpa", 1.1), ("reference", 0.3))
TARGET_N = 16384


def target_lines(results) -> list[str]:
    """'met' / 'NOT met' / 'not measured' for each target (see the module docstring)."""
    cpp = next((r for r in results if r.case.provider == "cpp" and r.case.n == TARGET_N and r.case.dtype == torch.float32), None)
    ratios = baseline_ratios(cpp, results) if cpp is not None else {}
    lines = []
    for baseline, limit in TARGETS:
        label = f"target: cpp peak memory <= {limit}x {baseline}'s at N = M = {TARGET_N}, fp32"
        ratio = ratios.get(f"memory_vs_{baseline}")
        if ratio is None:
            lines.append(f"{label}: not measured")
        else:
            lines.append(f"{label}: {'met' if ratio <= limit else 'NOT met'} ({ratio:.2f}x)")
    return lines


def memory_table(results) -> tuple[list[str], list[list[str]]]:
    headers = ["provider", "N", "dtype", "peak - after imports MiB", "raw peak RSS MiB", "RSS after imports MiB", "vs torch_sdpa", "vs reference", "note"]
    rows = []
    for result in results:
        memory, ratios = result.memory, baseline_ratios(result, results)
        row = [result.case.provider, str(result.case.n), result.case.dtype_name, peak_cell(memory)]
        for value in (memory.raw_peak_bytes, memory.baseline_bytes):
            row.append("-" if value is None else f"{value / MIB:.0f}")
        for baseline in ("torch_sdpa", "reference"):
            ratio = ratios[f"memory_vs_{baseline}"]
            row.append("-" if ratio is None else f"{ratio:.2f}x")
        row.append(result.error or "")
        rows.append(row)
    return headers, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=size_list, default=(TARGET_N,), metavar="LIST", help=f"N = M (default: {TARGET_N})")
    parser.add_argument("--dtype", type=dtype, default=torch.float32, help="default: float32")
    parser.add_argument("--head-dim", type=positive_int, default=PAPER_HEAD_DIM, help=f"D = Dv (default: {PAPER_HEAD_DIM})")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"), help="the results file whose section to write (default: benchmarks/RESULTS.md)")
    args = parser.parse_args()

    cases = []
    for provider in PROVIDERS:
        reason = skip_reason("attention", provider, "cpu")
        if reason is not None:
            print(f"skipped {provider}: {reason}")
            continue
        cases += [bench_case("attention", provider, n, head_dim=args.head_dim, dtype=args.dtype) for n in args.sizes]
    cases.sort(key=lambda case: case.n)
    print(f"measuring {len(cases)} cases, one process each", flush=True)
    results = run_benchmarks(cases, passes=())

    headers, rows = memory_table(results)
    targets = target_lines(results)
    notes = memory_notes(results)
    print(format_table(headers, rows))
    print("\n".join(["", *targets, *notes]))

    body = "\n\n".join([
        "## SCFT attention: peak memory of forward+backward on CPU (benchmarks/attention_memory.py)",
        machine.provenance("cpu"),
        f"B = H = 1, D = Dv = {args.head_dim}. Each case in its own process: peak RSS minus the RSS after imports "
        "(inputs included), and the raw peak RSS.",
        markdown_table(headers, rows),
        "\n".join(f"- {line}" for line in [*targets, *notes]),
    ])
    write_section(args.results, SECTION, body)
    print(f"wrote the '{SECTION}' section of {args.results}")
    return 1 if any(r.error is not None and not r.out_of_memory for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

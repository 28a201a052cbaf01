"""Benchmark results as a text table, a Markdown table, JSON and a section of a results file.

Rates use the FLOP counts of cases.flops: GFLOP/s on CPU, TFLOP/s on GPU. Ratios divide a
row's fwd+bwd time and peak memory by those of torch_sdpa and of the reference at the same
variant, size and dtype (lower is better). A CPU peak below the method's resolution (see
memory.py) is shown as ">=" its floor, a bound and not a measurement, and has no ratios.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Collection
from pathlib import Path

import torch

from . import machine
from .cases import Case, flops
from .memory import PeakMemory
from .results_file import write_section
from .suite import BenchResult

BASELINE_COLUMNS = (("torch_sdpa", "sdpa"), ("reference", "ref"))
MIB = 2**20


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: columns padded to their widest cell, numbers right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells):
        return "  ".join(
            str(cell).rjust(width) if _is_number(str(cell)) else str(cell).ljust(width) for cell, width in zip(cells, widths)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def markdown_table(headers: list[str], rows: list[list[str]], right_aligned: Collection[str] = ()) -> str:
    """A Markdown table; the columns whose header is in ``right_aligned`` are aligned right."""

    def line(cells):
        return "| " + " | ".join(str(cell) for cell in cells) + " |"

    alignment = ["---:" if header in right_aligned else "---" for header in headers]
    return "\n".join([line(headers), line(alignment), *(line(row) for row in rows)])


def rate_unit(device: str) -> tuple[str, float]:
    """('GFLOP/s', 1e9) on CPU, ('TFLOP/s', 1e12) on GPU."""
    return ("TFLOP/s", 1e12) if torch.device(device).type == "cuda" else ("GFLOP/s", 1e9)


def bench_table(results: list[BenchResult]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the bench table, one row per case; ratio columns only for the
    baselines that were measured (a loss has no torch_sdpa)."""
    unit, divisor = rate_unit(results[0].case.device) if results else ("GFLOP/s", 1e9)
    measured = {r.case.provider for r in results}
    baselines = [(provider, short) for provider, short in BASELINE_COLUMNS if provider in measured]
    headers = ["op", "provider", "dtype", "N", "fwd ms", f"fwd {unit}", "fwd+bwd ms", f"fwd+bwd {unit}", "peak MiB"]
    headers += [f"{kind}/{short}" for kind in ("time", "mem") for _, short in baselines] + ["note"]
    rows = []
    for result in results:
        ratios = baseline_ratios(result, results)
        row = [result.case.variant, result.case.provider, result.case.dtype_name, str(result.case.n)]
        for pass_ in ("fwd", "fwd+bwd"):
            rate = result.flops_per_second(pass_)
            row += [_number(result.median_ms(pass_)), _number(rate and rate / divisor)]
        row.append(peak_cell(result.memory))
        row += [_number(ratios[f"{kind}_vs_{provider}"], ratio=True) for kind in ("time", "memory") for provider, _ in baselines]
        row.append(result.error or "")
        rows.append(row)
    return headers, rows


def memory_notes(results: list[BenchResult]) -> list[str]:
    """The note that explains ">=" peak cells, if the table has any."""
    if not any(r.memory and r.memory.unmeasured_reason for r in results):
        return []
    return [
        "peak MiB >=X: not measured. The child's peak RSS rose by less than the X MiB of the tensors alive at "
        "the end of fwd+bwd (inputs, outputs, gradients): RSS sees only pages the process newly touches, not "
        "allocations that reuse memory it already holds, as small cases do. X is a lower bound; its mem/x "
        "ratios are '-'."
    ]


def publish(
    results: list[BenchResult],
    *,
    title: str,
    section: str,
    device: str,
    check_lines: list[str],
    legend: str,
    notes: list[str],
    results_path: Path | str,
    write: bool,
) -> int:
    """Print the bench table of ``results``, ``legend`` and ``notes``; if ``write``, also put them,
    under the heading ``title`` with the machine, the command and the correctness check's
    ``check_lines``, into the section ``section`` of the Markdown file ``results_path``.

    Returns the exit status of the benchmark: 1 if a case failed other than by running out of
    memory (an oversized case is a result, a broken one is not), else 0.
    """
    headers, rows = bench_table(results)
    notes = [*notes, *memory_notes(results)]
    print(format_table(headers, rows))
    print("\n" + "\n".join([legend, *notes]))
    if write:
        body = "\n\n".join([
            f"## {title}",
            machine.provenance(device),
            "Correctness first (sketchcolor.verify rule, float64 reference):\n" + "\n".join(f"- {line}" for line in check_lines),
            markdown_table(headers, rows),
            "\n".join([legend, *(f"- {note}" for note in notes)]),
        ])
        write_section(results_path, section, body)
        print(f"wrote the '{section}' section of {results_path}")
    failed = [r for r in results if r.error is not None and not r.out_of_memory]
    return 1 if failed else 0


def baseline_ratios(result: BenchResult, results: list[BenchResult]) -> dict[str, float | None]:
    """time_vs_<baseline> and memory_vs_<baseline>: fwd+bwd time and peak memory of ``result``
    over the baseline's at the same variant, N, dtype and device; None where either is missing."""
    ratios = {}
    for provider, _ in BASELINE_COLUMNS:
        baseline = next((r for r in results if r.case == _with_provider(result.case, provider)), None)
        ratios[f"time_vs_{provider}"] = safe_ratio(result.median_ms("fwd+bwd"), baseline and baseline.median_ms("fwd+bwd"))
        ratios[f"memory_vs_{provider}"] = safe_ratio(_peak(result), baseline and _peak(baseline))
    return ratios


def result_record(result: BenchResult, results: list[BenchResult]) -> dict:
    """One result as a JSON object: the case, raw numbers, FLOP counts and ratios."""
    case = result.case
    record = {"variant": case.variant, "shape": case.shape_label(), **case.to_json()}
    for pass_ in ("fwd", "fwd+bwd"):
        key = pass_.replace("+", "_")
        timing = result.timings.get(pass_)
        record[f"{key}_median_ms"] = result.median_ms(pass_)
        record[f"{key}_samples_ms"] = list(timing.samples_ms) if timing else None
        record[f"{key}_flops"] = flops(case, pass_)
        record[f"{key}_flops_per_s"] = result.flops_per_second(pass_)
    memory = result.memory
    record.update(
        peak_bytes=memory and memory.peak_bytes,
        raw_peak_bytes=memory and memory.raw_peak_bytes,
        baseline_bytes=memory and memory.baseline_bytes,
        floor_bytes=memory and memory.floor_bytes,
        peak_unmeasured_reason=memory and memory.unmeasured_reason,
        memory_method=memory and memory.method,
        error=result.error,
        out_of_memory=result.out_of_memory,
        **baseline_ratios(result, results),
    )
    return record


def write_json(path: Path | str, payload: dict) -> None:
    """``payload`` as indented JSON; non-finite floats become null (JSON has no inf or nan)."""
    Path(path).write_text(json.dumps(_finite(payload), indent=2) + "\n")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _with_provider(case: Case, provider: str) -> Case:
    return dataclasses.replace(case, provider=provider)


def _peak(result: BenchResult) -> int | None:
    return result.memory and result.memory.peak_bytes


def safe_ratio(value, baseline) -> float | None:
    """value / baseline, None where either is missing or the baseline is zero."""
    return value / baseline if value is not None and baseline else None


def peak_cell(memory: PeakMemory | None) -> str:
    """The peak MiB cell: the measurement, ">=" the floor where the method could not resolve the
    peak (memory_notes says why), or '-' where there is neither."""
    if memory is None:
        return "-"
    if memory.unmeasured_reason is not None:
        return ">=" + _number(memory.floor_bytes / MIB)
    return _number(None if memory.peak_bytes is None else memory.peak_bytes / MIB)


def _number(value: float | None, ratio: bool = False) -> str:
    """A table cell: '-' for a missing value, 3 significant digits otherwise."""
    if value is None:
        return "-"
    if ratio:
        return f"{value:.2f}x" if value >= 0.01 else f"{value:.1e}x"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if value >= 0.01 else f"{value:.2e}"


def _is_number(cell: str) -> bool:
    try:
        float(cell.removeprefix(">=").removesuffix("x"))
    except ValueError:
        return False
    return True

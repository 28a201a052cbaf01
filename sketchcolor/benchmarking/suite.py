"""The benchmark loop: peak memory and pass timings of each case, with a progress bar.

Memory is measured first: on CPU in a child process, so a case too large for the machine kills
the child, not this process, and its timing is skipped. A case that fails records its error and
the loop goes on, so that one broken or oversized provider does not lose the others' numbers.
"""
from __future__ import annotations

import dataclasses
import sys

import torch
from tqdm import tqdm

from .cases import PASSES, Case, flops, make_inputs, workload
from .memory import PeakMemory, measure_peak_memory
from .timing import Timing, time_call


@dataclasses.dataclass
class BenchResult:
    case: Case
    memory: PeakMemory | None = None
    timings: dict[str, Timing] = dataclasses.field(default_factory=dict)  # pass -> timing
    error: str | None = None
    out_of_memory: bool = False

    def median_ms(self, pass_: str) -> float | None:
        """The pass's median time, None where it was not timed."""
        timing = self.timings.get(pass_)
        return None if timing is None else timing.median_ms

    def flops_per_second(self, pass_: str) -> float | None:
        ms = self.median_ms(pass_)
        return None if ms is None else flops(self.case, pass_) / (ms * 1e-3)


def run_benchmarks(
    cases: list[Case],
    *,
    passes: tuple[str, ...] = PASSES,
    measure_memory: bool = True,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> list[BenchResult]:
    """Peak memory of fwd+bwd (if ``measure_memory``) and the median time of each pass of ``passes``."""
    results = []
    bar = tqdm(cases, desc="bench", unit="case", file=sys.stderr, disable=not progress)
    for case in bar:
        bar.set_postfix_str(f"{case.variant} {case.provider} N={case.n}")
        results.append(_run_case(case, passes, measure_memory, repeats, warmup, seed))
    return results


def _run_case(case: Case, passes, measure_memory: bool, repeats: int, warmup: int, seed: int) -> BenchResult:
    result = BenchResult(case)
    if measure_memory:
        result.memory = measure_peak_memory(case, seed)
        if result.memory.error is not None:
            result.error, result.out_of_memory = result.memory.error, result.memory.out_of_memory
            return result
    try:
        inputs = make_inputs(case, seed)
        for pass_ in passes:
            result.timings[pass_] = time_call(workload(case, inputs, pass_, seed), case.device, repeats, warmup)
    except torch.OutOfMemoryError as error:
        result.error, result.out_of_memory = f"out of memory: {str(error).splitlines()[0]}", True
    except Exception as error:  # noqa: BLE001  (recorded in the table and the exit status, see module docstring)
        result.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    finally:
        if torch.device(case.device).type == "cuda":
            torch.cuda.empty_cache()
    return result

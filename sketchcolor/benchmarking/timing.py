"""Wall time of a call: the median of several repetitions after warm-up.

On CUDA each repetition is bracketed by CUDA events on the current stream (the launch
overhead of the host is not what is measured); on CPU by time.perf_counter.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    samples_ms: tuple[float, ...]


def time_call(fn: Callable[[], object], device: torch.device | str, repeats: int = 5, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; the median in ms."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples = [_time_cuda(fn) if device.type == "cuda" else _time_cpu(fn) for _ in range(repeats)]
    return Timing(statistics.median(samples), tuple(samples))


def _time_cpu(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _time_cuda(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)

"""Peak memory of one forward+backward of a case, and the peak RSS of any function run in a child.

CPU: a fresh Python process per measurement (``python -m sketchcolor.benchmarking.memory SPEC``,
see run_in_child), because a process's peak RSS never goes down. For a case the child imports
torch and sketchcolor, runs the case once at a tiny size (lazy imports, op registration, thread
pools), records its RSS ("after imports"), runs the case and reports its peak RSS (VmHWM). What
the case needed, inputs included, is the peak minus the RSS after imports; the raw peak is kept too.
RSS counts the pages a process has touched, so allocations that reuse memory the process already
holds (freed heap of the imports and the warm-up) do not raise it: a small case can peak below
the bytes of its own live tensors, even at 0. Such a peak is not a measurement: it is reported
as None with the reason, next to that floor (cases.live_tensor_bytes), a lower bound of the truth.

CUDA: in this process. A warm-up run first (Triton autotuning allocates scratch), then
torch.cuda.max_memory_allocated over one run, reset before the inputs are allocated; the
baseline is what was allocated at the reset.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import runpy
import signal
import subprocess
import sys
import traceback
from typing import Callable

import torch

from .cases import Case, forward_backward, live_tensor_bytes, make_inputs, output_gradient

CPU_METHOD = "peak RSS of a child process"
CUDA_METHOD = "torch.cuda.max_memory_allocated"
_WARMUP_SIZE = 8  # N and M of the child's warm-up run


@dataclasses.dataclass(frozen=True)
class PeakMemory:
    """``peak_bytes`` is what the case needed above ``baseline_bytes``; None when it failed, or,
    with ``unmeasured_reason``, when the method could not resolve it (the peak it saw was below
    ``floor_bytes``, the case's live tensors, which it needs at least; CPU only)."""

    method: str
    peak_bytes: int | None = None
    raw_peak_bytes: int | None = None
    baseline_bytes: int | None = None
    error: str | None = None
    out_of_memory: bool = False
    floor_bytes: int | None = None
    unmeasured_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class ChildRun:
    """What the function given to run_in_child returned and the child's peak RSS, or, when
    ``error`` is set, neither and why."""

    returned: dict | None = None
    peak_rss_bytes: int | None = None
    error: str | None = None
    out_of_memory: bool = False


def measure_peak_memory(case: Case, seed: int = 0) -> PeakMemory:
    """Peak memory of one forward+backward of ``case`` (see the module docstring)."""
    if torch.device(case.device).type == "cuda":
        return _measure_cuda(case, seed)
    return _measure_in_child(case, seed)


def _run_once(case: Case, seed: int) -> None:
    inputs = make_inputs(case, seed)
    forward_backward(case, inputs, output_gradient(case, seed))


def _measure_cuda(case: Case, seed: int) -> PeakMemory:
    device = torch.device(case.device)
    try:
        _run_once(case, seed)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        _run_once(case, seed)
        torch.cuda.synchronize(device)
        raw_peak = torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError as error:
        return PeakMemory(CUDA_METHOD, error=f"out of memory: {str(error).splitlines()[0]}", out_of_memory=True)
    finally:
        torch.cuda.empty_cache()
    return PeakMemory(CUDA_METHOD, raw_peak - baseline, raw_peak, baseline)


def _measure_in_child(case: Case, seed: int) -> PeakMemory:
    run = run_in_child(_run_case_after_warmup, case=case.to_json(), seed=seed)
    if run.error is not None:
        return PeakMemory(CPU_METHOD, error=run.error, out_of_memory=run.out_of_memory)
    rss_after_imports = run.returned["rss_after_imports"]
    rise, floor = run.peak_rss_bytes - rss_after_imports, live_tensor_bytes(case)
    if rise < floor:
        reason = (
            f"the peak RSS rose by {rise} bytes, less than the {floor} bytes of the tensors alive at the end of "
            "fwd+bwd: so the case reused memory the process already held, which peak RSS does not see"
        )
        return PeakMemory(CPU_METHOD, None, run.peak_rss_bytes, rss_after_imports, floor_bytes=floor, unmeasured_reason=reason)
    return PeakMemory(CPU_METHOD, rise, run.peak_rss_bytes, rss_after_imports, floor_bytes=floor)


def _run_case_after_warmup(case: dict, seed: int) -> dict:
    """measure_peak_memory's work in the child: a warm-up at a tiny size, then the case; returns
    the RSS between the two, what the process holds before the case allocates anything."""
    case = Case.from_json(case)
    _run_once(dataclasses.replace(case, n=min(case.n, _WARMUP_SIZE), m=min(case.m, _WARMUP_SIZE)), seed)
    rss_after_imports = _proc_status_bytes("VmRSS")
    _run_once(case, seed)
    return {"rss_after_imports": rss_after_imports}


def run_in_child(function: Callable[..., dict], *, timeout: float | None = None, **kwargs) -> ChildRun:
    """``function(**kwargs)`` in a fresh Python process: what it returned and the process's peak RSS.

    The child finds ``function`` by its name in its module, so it must be defined at the top level
    of an importable module or of the script this process runs (``__main__``, executed again in
    the child under another name, so its ``if __name__ == "__main__"`` part does not run).
    ``kwargs`` and the returned dict travel as JSON. The child uses this process's torch thread
    count. Past ``timeout`` seconds the child is killed and the run fails.
    """
    if function.__module__ == "__main__":
        location = {"script": sys.modules["__main__"].__file__}
    else:
        location = {"module": function.__module__}
    spec = json.dumps({**location, "function": function.__name__, "kwargs": kwargs, "threads": torch.get_num_threads()})
    try:
        proc = subprocess.run([sys.executable, "-m", __name__, spec], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ChildRun(error=f"the measuring process ran past the {timeout:g} s timeout")
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if proc.returncode == 0 and report is not None:
        return ChildRun(report["returned"], report["peak_rss"])
    if report is not None:  # the child caught the error and said what it was
        return ChildRun(error=report["error"], out_of_memory=report["out_of_memory"])
    if proc.returncode == -signal.SIGKILL:
        return ChildRun(error="the measuring process was killed (SIGKILL): out of memory?", out_of_memory=True)
    detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return ChildRun(error=f"the measuring process failed: {detail}")


def _proc_status_bytes(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS: resident now; VmHWM: peak resident), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} field (peak RSS is measured on Linux only)")


def _child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    if "script" in spec:
        function = runpy.run_path(spec["script"])[spec["function"]]
    else:
        function = getattr(importlib.import_module(spec["module"]), spec["function"])
    try:
        returned = function(**spec["kwargs"])
        peak_rss = _proc_status_bytes("VmHWM")
    except (RuntimeError, MemoryError) as error:
        traceback.print_exc()
        out_of_memory = isinstance(error, MemoryError) or "can't allocate memory" in str(error)
        print(json.dumps({"error": str(error).splitlines()[0], "out_of_memory": out_of_memory}))
        return 1
    print(json.dumps({"returned": returned, "peak_rss": peak_rss}))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))

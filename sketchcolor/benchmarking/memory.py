"""Peak memory of one forward+backward of a case.

CPU: a fresh Python process per case (``python -m sketchcolor.benchmarking.memory SPEC``),
because a process's peak RSS never goes down. The child imports torch and sketchcolor, runs
the case once at a tiny size (lazy imports, op registration, thread pools), records its RSS
("after imports"), runs the case and reports its peak RSS (VmHWM). What the case needed,
inputs included, is the peak minus the RSS after imports; the raw peak is kept too.

CUDA: in this process. A warm-up run first (Triton autotuning allocates scratch), then
torch.cuda.max_memory_allocated over one run, reset before the inputs are allocated; the
baseline is what was allocated at the reset.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import traceback

import torch

from .cases import Case, forward_backward, make_inputs, output_gradient

CPU_METHOD = "peak RSS of a child process"
CUDA_METHOD = "torch.cuda.max_memory_allocated"
_WARMUP_SIZE = 8  # N and M of the child's warm-up run


@dataclasses.dataclass(frozen=True)
class PeakMemory:
    """``peak_bytes`` is what the case needed above ``baseline_bytes``; None when it failed."""

    method: str
    peak_bytes: int | None = None
    raw_peak_bytes: int | None = None
    baseline_bytes: int | None = None
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
    spec = json.dumps({"case": case.to_json(), "seed": seed, "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, "-m", __name__, spec], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if proc.returncode == 0 and report is not None:
        return PeakMemory(CPU_METHOD, report["peak_rss"] - report["rss_after_imports"], report["peak_rss"], report["rss_after_imports"])
    if report is not None:  # the child caught the error and said what it was
        return PeakMemory(CPU_METHOD, error=report["error"], out_of_memory=report["out_of_memory"])
    if proc.returncode == -signal.SIGKILL:
        return PeakMemory(CPU_METHOD, error="the measuring process was killed (SIGKILL): out of memory?", out_of_memory=True)
    detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return PeakMemory(CPU_METHOD, error=f"the measuring process failed: {detail}")


def _proc_status_bytes(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS: resident now; VmHWM: peak resident), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} field (peak RSS is measured on Linux only)")


def _child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    case, seed = Case.from_json(spec["case"]), spec["seed"]
    torch.set_num_threads(spec["threads"])
    try:
        _run_once(dataclasses.replace(case, n=min(case.n, _WARMUP_SIZE), m=min(case.m, _WARMUP_SIZE)), seed)
        rss_after_imports = _proc_status_bytes("VmRSS")
        _run_once(case, seed)
        peak_rss = _proc_status_bytes("VmHWM")
    except (RuntimeError, MemoryError) as error:
        traceback.print_exc()
        out_of_memory = isinstance(error, MemoryError) or "can't allocate memory" in str(error)
        print(json.dumps({"error": str(error).splitlines()[0], "out_of_memory": out_of_memory}))
        return 1
    print(json.dumps({"rss_after_imports": rss_after_imports, "peak_rss": peak_rss}))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))

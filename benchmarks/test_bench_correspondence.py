"""pytest-benchmark suite of the correspondence loss: the reference against cpp (CPU), triton and cuda
(GPU), forward+backward, every mode, N = M in 1024, 4096, 16384, D = 992.

    pytest benchmarks/test_bench_correspondence.py --benchmark-only            # every case (long)
    pytest benchmarks/test_bench_correspondence.py --benchmark-only -k 1024    # the small cases

The cases, inputs and calls are those of sketchcolor.benchmarking (``sketchcolor bench`` and
benchmarks/bench_correspondence.py time the same calls). Each benchmark also records the
case's forward+backward peak memory in extra_info (CPU: peak RSS of a fresh child process above
its RSS after imports; GPU: torch.cuda.max_memory_allocated).
"""
from __future__ import annotations

import pytest
import torch

from sketchcolor.benchmarking.cases import CORRESPONDENCE_MODES, bench_case, dtype_skip_reason, make_inputs, skip_reason, workload
from sketchcolor.benchmarking.memory import measure_peak_memory
from sketchcolor.benchmarking.options import default_device, default_dtype

DEVICE = default_device()
DTYPE = default_dtype(DEVICE)
SIZES = (1024, 4096, 16384)
PROVIDERS = ("reference", "cpp", "triton", "cuda")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", CORRESPONDENCE_MODES)
def test_correspondence_fwd_bwd(benchmark, mode, provider, n):
    reason = skip_reason("correspondence", provider, DEVICE) or dtype_skip_reason("correspondence", provider, DTYPE)
    if reason is not None:
        pytest.skip(reason)
    case = bench_case(f"correspondence/{mode}", provider, n, dtype=DTYPE, device=DEVICE)
    memory = measure_peak_memory(case)
    if memory.out_of_memory:
        pytest.skip(memory.error)
    assert memory.error is None, memory.error
    if memory.peak_bytes is not None:
        peak = {"peak_mib": memory.peak_bytes / 2**20}
    else:  # a small case whose RSS rose less than its live tensors: only their size is known
        peak = {"peak_mib_at_least": memory.floor_bytes / 2**20, "peak_unmeasured": memory.unmeasured_reason}
    benchmark.extra_info.update(shape=case.shape_label(), dtype=case.dtype_name, memory_method=memory.method, **peak)
    run = workload(case, make_inputs(case), "fwd+bwd")

    def run_synchronized():
        run()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run_synchronized, rounds=3, warmup_rounds=1)

"""pytest-benchmark suite of SCFT attention on CPU: the materialized reference, the cpp backend and
torch SDPA (torch.nn.functional.scaled_dot_product_attention), fp32, B = H = 1, N = M in
{1024, 4096, 16384}, D = Dv = 992; forward and forward+backward timed separately.

    pytest benchmarks/test_bench_attention.py --benchmark-only            # every case (many minutes)
    pytest benchmarks/test_bench_attention.py --benchmark-only -k 1024    # the small cases

Not collected by the test command (`python -m pytest tests`): testpaths is tests/. The cases,
inputs, calls and FLOP formula are those of sketchcolor.benchmarking, which ``sketchcolor bench``
uses too; extra_info holds the FLOP count and GFLOP/s at the median. Peak memory is measured
by benchmarks/attention_memory.py (a process per case).
"""
from __future__ import annotations

import pytest
import torch

from sketchcolor.benchmarking.cases import PASSES, bench_case, flops, make_inputs, skip_reason, workload

DEVICE = "cpu"
DTYPE = torch.float32
SIZES = (1024, 4096, 16384)
PROVIDERS = ("reference", "cpp", "torch_sdpa")
ROUNDS = 3


def _warmup_rounds(n: int) -> int:
    # A warm-up round hides first-call setup; at N = 16384 a round takes tens of seconds on two
    # cores and that setup is noise, so the largest size goes without.
    return 1 if n < 16384 else 0


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", PASSES)
def test_attention(benchmark, pass_, provider, n):
    reason = skip_reason("attention", provider, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    case = bench_case("attention", provider, n, dtype=DTYPE, device=DEVICE)
    run = workload(case, make_inputs(case), pass_)
    benchmark.group = f"attention {pass_} N={n}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=_warmup_rounds(n), iterations=1)
    count = flops(case, pass_)
    benchmark.extra_info.update(
        shape=case.shape_label(),
        dtype=case.dtype_name,
        flops=count,
        flop_formula="fwd 2*N*M*D + 2*N*M*Dv; bwd 2.5x fwd",
        gflops_per_s=count / benchmark.stats.stats.median / 1e9,
    )

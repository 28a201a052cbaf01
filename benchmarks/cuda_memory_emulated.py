"""Device memory the cuda backend allocates, measured without a GPU, in the CUDA emulator.

    python benchmarks/cuda_memory_emulated.py                          # N = M in {4096, 8192, 16384}
    python benchmarks/cuda_memory_emulated.py --sizes 4096 --results /tmp/RESULTS.md

The torch bindings of the cuda backend run on an emulated H100 (tests/cuda_emulator.py builds
it; it needs g++, ninja and the CUDA toolkit's headers) with launches validated but not run, so the shapes
can be the targets': bf16, B = H = 1, D = Dv = 992. Every allocation is counted, so the peak is
exactly what the bindings hold at once beyond their inputs: outputs, workspaces (the backward's
key-chunk buffers, the dQ accumulator, the hardest search's key splits, the loss's sort and scatter
index tensors) and layout copies. On a GPU the caching allocator rounds each block up (to 2 MiB
above 1 MiB), so its peak is a little higher.

Reported, not asserted (tests/test_cuda_emulated.py asserts the linear growth): the peak against
N * D * 2 bytes (one bf16 (N, D) tensor) and against one float32 N x M matrix, the least any
implementation that materializes the scores needs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cuda_emulator import DEVICES, binding_peak_bytes, load_emulator, memory_cases, unavailable_reason  # noqa: E402

from sketchcolor.benchmarking import machine  # noqa: E402
from sketchcolor.benchmarking.options import size_list  # noqa: E402
from sketchcolor.benchmarking.report import MIB, format_table, markdown_table  # noqa: E402
from sketchcolor.benchmarking.results_file import write_section  # noqa: E402

SECTION = "cuda_memory_emulated.py"
HEAD_DIM = 992


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=size_list, default=(4096, 8192, 16384), metavar="LIST",
                        help="N = M, multiples of 128 (default: 4096,8192,16384)")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"),
                        help="the results file whose section to write (default: benchmarks/RESULTS.md)")
    args = parser.parse_args()
    if any(n % 128 for n in args.sizes):
        parser.error("--sizes: every N must be a multiple of 128 (the hardest mode's key grid is (N / 128, 128))")

    reason = unavailable_reason()
    if reason is not None:
        print(f"cannot build the CUDA emulator: {reason}", file=sys.stderr)
        return 1
    print("building the CUDA emulator (about a minute; cached afterwards)", flush=True)
    emulator = load_emulator()
    emulator.set_device(*DEVICES["H100"])
    emulator.set_schedule(run_blocks=False)   # launches validated, not run
    emulator.set_binding_options()
    emulator.use_device_allocator(True)
    try:
        rows = []
        for n in args.sizes:
            for name, call in memory_cases(n, HEAD_DIM).items():
                peak = binding_peak_bytes(emulator, call)
                rows.append([name, str(n), f"{peak / MIB:.1f}", f"{peak / (n * HEAD_DIM * 2):.1f}",
                             f"{peak / (n * n * 4):.3f}x"])
    finally:
        emulator.use_device_allocator(False)

    headers = ["op", "N = M", "peak MiB", "/ (N * D * 2 bytes)", "vs one fp32 N x M"]
    print(format_table(headers, rows))
    body = "\n\n".join([
        "## cuda backend: device memory its bindings allocate, bf16, D = Dv = 992 (emulated H100, no GPU)",
        machine.provenance("cpu"),
        "Measured in the CUDA emulator (benchmarks/cuda_memory_emulated.py): the bindings run on an emulated "
        "H100 (132 SMs) with launches validated but not run, and every allocation is counted. Peak = the most "
        "held at once beyond the inputs. On a GPU the caching allocator's rounding adds a little.",
        markdown_table(headers, rows),
    ])
    write_section(args.results, SECTION, body)
    print(f"wrote the '{SECTION}' section of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

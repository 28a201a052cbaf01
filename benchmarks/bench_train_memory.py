"""Peak memory and time of one training step (D phase + G phase) vs image size, SCFT resolution
and attention backend, each case in a fresh process.

    python benchmarks/bench_train_memory.py                       # the full grid on CPU
    python benchmarks/bench_train_memory.py --sizes 256 --strides 16   # the smallest cases
    python benchmarks/bench_train_memory.py --device cuda --attn reference triton cuda

Every case runs the real training step (sketchcolor.train.train_step with the paper's model
and losses, VGG terms off) on a random batch in its own subprocess
(sketchcolor.benchmarking.memory.run_in_child), so its peak is its own: on CPU the peak
resident set size (VmHWM, which includes the weights, Adam state and the interpreter), on CUDA
torch.cuda.max_memory_allocated. The time is that of the last of ``--steps`` steps (the first
one allocates). The table is printed and written, with the machine, date and command, to this
script's section of benchmarks/RESULTS.md.

Goal: at 512x512 with SCFT at 1/4 (16,384 tokens) a fused backend's step (cpp on CPU; triton
and cuda on a GPU) peaks at most 0.4x as high as the reference step (which materializes the
16,384 x 16,384 attention and score matrices).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from sketchcolor.benchmarking import machine
from sketchcolor.benchmarking.memory import run_in_child
from sketchcolor.benchmarking.options import positive_int, refuse_missing_cuda
from sketchcolor.benchmarking.report import markdown_table
from sketchcolor.benchmarking.results_file import write_section
from sketchcolor.models import ModelConfig
from sketchcolor.ops._backends import IMPLS
from sketchcolor.train import TrainConfig, build_loss, build_models, build_optimizers, seed_everything, train_step

RESULTS = Path(__file__).with_name("RESULTS.md")
TARGET = {"size": 512, "scft_stride": 4, "ratio": 0.4}
TABLE_HEADERS = ["size", "SCFT", "tokens", "attn", "peak MiB", "step s", "peak / reference", "status"]
NUMBER_COLUMNS = {"size", "SCFT", "tokens", "peak MiB", "step s", "peak / reference"}


def case_config(size: int, scft_stride: int, attn: str, batch_size: int, width: int, device_name: str) -> TrainConfig:
    """The training settings of one case (TrainConfig refuses the ones the model cannot run)."""
    return TrainConfig(size=size, batch_size=batch_size, attn=attn, device=device_name, model=ModelConfig(width=width, scft_stride=scft_stride))


def run_case(size: int, scft_stride: int, attn: str, batch_size: int, width: int, steps: int, device_name: str) -> dict:
    """One case in this process (a run_in_child child): the time of its last step and, on CUDA,
    its peak allocated memory (the child's peak RSS is the CPU measure)."""
    device = torch.device(device_name)
    config = case_config(size, scft_stride, attn, batch_size, width, device_name)
    seed_everything(0)
    generator, discriminator = build_models(config, device)
    optimizer_g, optimizer_d = build_optimizers(config, generator, discriminator)
    loss = build_loss(config, generator, discriminator, device, lambda message: None)
    grid = config.model.feature_grid(size)
    batch = {
        "sketch": torch.rand(batch_size, 1, size, size, device=device) * 2 - 1,
        "reference": torch.rand(batch_size, 3, size, size, device=device) * 2 - 1,
        "ground_truth": torch.rand(batch_size, 3, size, size, device=device) * 2 - 1,
        "pos": torch.randint(-1, grid * grid, (batch_size, grid * grid), device=device),
    }
    if device.type == "cuda":
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    seconds = None
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        train_step(loss, [batch], optimizer_g, optimizer_d, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    cuda_peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"step_seconds": seconds, "cuda_peak_bytes": cuda_peak_bytes}


def run_in_subprocess(case: dict, args: argparse.Namespace) -> dict:
    run = run_in_child(
        run_case, timeout=args.timeout, **case, batch_size=args.batch_size, width=args.width, steps=args.steps, device_name=args.device
    )
    if run.error is not None:
        return {**case, "status": run.error[:80]}  # a table cell, not a log
    cuda_peak_bytes = run.returned["cuda_peak_bytes"]
    # On CUDA the step's tensors are in GPU memory, which the process's RSS does not count.
    peak_bytes = run.peak_rss_bytes if cuda_peak_bytes is None else cuda_peak_bytes
    return {**case, "peak_mib": peak_bytes / 2**20, "step_seconds": run.returned["step_seconds"], "status": "ok"}


def format_table(rows: list[dict]) -> str:
    by_case = {(row["size"], row["scft_stride"], row["attn"]): row for row in rows}
    cells = []
    for row in rows:
        reference = by_case.get((row["size"], row["scft_stride"], "reference"), {})
        ok = row["status"] == "ok"
        ratio = f"{row['peak_mib'] / reference['peak_mib']:.2f}" if ok and reference.get("status") == "ok" else "-"
        tokens = (row["size"] // row["scft_stride"]) ** 2
        peak = f"{row['peak_mib']:.0f}" if ok else "-"
        step = f"{row['step_seconds']:.2f}" if ok else "-"
        cells.append([str(row["size"]), f"1/{row['scft_stride']}", str(tokens), row["attn"], peak, step, ratio, row["status"]])
    return markdown_table(TABLE_HEADERS, cells, right_aligned=NUMBER_COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[256, 512, 1024], help="image sides (default: 256 512 1024)")
    parser.add_argument("--strides", type=positive_int, nargs="+", default=[16, 8, 4], help="SCFT strides: 16 = 1/16 (default: 16 8 4)")
    parser.add_argument("--attn", nargs="+", choices=IMPLS, default=["reference", "cpp"], help="backends to compare (default: reference cpp)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="images per step (default: 1)")
    parser.add_argument("--width", type=positive_int, default=16, help="model width (default: the paper's 16, D = 992)")
    parser.add_argument("--steps", type=positive_int, default=1, help="steps per case; the last is timed (default: 1; more excludes first-step setup from the time)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    parser.add_argument("--timeout", type=positive_int, default=1800, help="seconds per case (default: 1800)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/RESULTS.md alone")
    args = parser.parse_args()
    refuse_missing_cuda(parser, args.device)
    # Each case's settings are checked here, so that a bad one stops the run before any case runs.
    for size in args.sizes:
        for stride in args.strides:
            try:
                case_config(size, stride, args.attn[0], args.batch_size, args.width, args.device)
            except ValueError as error:
                parser.error(f"--sizes {size} with --strides {stride}: {error}")

    rows = []
    for size in args.sizes:
        for stride in args.strides:
            for attn in args.attn:
                row = run_in_subprocess({"size": size, "scft_stride": stride, "attn": attn}, args)
                print(f"size {size} SCFT 1/{stride} {attn}: {row['status']}" + (f", {row['peak_mib']:.0f} MiB, {row['step_seconds']:.2f} s" if row["status"] == "ok" else ""), flush=True)
                rows.append(row)
    table = format_table(rows)
    print(table)
    if not args.no_write:
        owner = f"bench_train_memory {args.device}"
        body = (
            f"## Training step memory, {args.device}\n\n"
            f"{machine.provenance(args.device)}\n\n"
            f"One D step + G step of the paper's model (width {args.width}, D = {62 * args.width}) at batch {args.batch_size}, "
            f"all losses but VGG's; peak: {'peak RSS of a fresh process per case (interpreter and weights included)' if args.device == 'cpu' else 'torch.cuda.max_memory_allocated'}; "
            f"step s: the last of {args.steps} steps.\n"
            f"Goal: at {TARGET['size']}x{TARGET['size']} with SCFT 1/{TARGET['scft_stride']}, a fused backend's peak <= {TARGET['ratio']}x reference's.\n\n"
            f"{table}\n"
        )
        write_section(RESULTS, owner, body)
        print(f"wrote the '{owner}' section of {RESULTS}")


if __name__ == "__main__":
    main()

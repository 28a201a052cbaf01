"""Command-line options shared by ``sketchcolor verify`` and ``sketchcolor bench``.

Each type function raises argparse.ArgumentTypeError, so a bad value is reported by argparse
as ``argument --<option>: <why>`` with exit status 2. (Their output paths are checked when the
commands start, by ``sketchcolor.output_paths``.)
"""
from __future__ import annotations

import argparse

import torch

from .cases import BACKENDS, CORRESPONDENCE_MODES, DTYPE_ALIASES, DTYPES, OPS


def _items(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list for {option}, got {text!r}")
    return items


def _choices(text: str, choices: tuple[str, ...], what: str) -> tuple[str, ...]:
    """A comma-separated subset of ``choices`` (in their order), or "all"."""
    if text == "all":
        return choices
    items = _items(text, what)
    unknown = [item for item in items if item not in choices]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(choices)} or all")
    return tuple(choice for choice in choices if choice in items)


def dtype(text: str) -> torch.dtype:
    """One dtype name: float64, float32, bfloat16, float16 (or fp64, fp32, bf16, fp16)."""
    name = DTYPE_ALIASES.get(text, text)
    if name not in DTYPES:
        aliases = ", ".join(DTYPE_ALIASES)
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPES)} (or {aliases})")
    return DTYPES[name]


def dtype_list(text: str) -> tuple[torch.dtype, ...]:
    """Comma-separated dtype names, or "all"."""
    if text == "all":
        return tuple(DTYPES.values())
    return tuple(dict.fromkeys(dtype(item) for item in _items(text, "dtype")))


def backend_list(text: str) -> tuple[str, ...]:
    return _choices(text, BACKENDS, "backend")


def mode_list(text: str) -> tuple[str, ...]:
    return _choices(text, CORRESPONDENCE_MODES, "correspondence mode")


# The inputs' generator is seeded with the seed and output_gradient's with seed + 1. torch's
# manual_seed takes any 64-bit value (up to 2**64 - 1); keeping both seeds in int64's range
# leaves them valid for signed 64-bit seed APIs too, and is more than any run needs.
MAX_SEED = 2**63 - 2


def _int_in_range(text: str, minimum: int, expected: str, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_in_range(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_in_range(text, 0, "an integer >= 0")


def random_seed(text: str) -> int:
    """A seed of the random inputs: 0 to MAX_SEED."""
    return _int_in_range(text, 0, f"an integer from 0 to {MAX_SEED} (2**63 - 2)", MAX_SEED)


def size_list(text: str) -> tuple[int, ...]:
    """Comma-separated positive token counts, e.g. 1024,4096,16384."""
    return tuple(dict.fromkeys(positive_int(item) for item in _items(text, "sizes")))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def missing_cuda(device: str) -> str | None:
    """Why ``--device`` cannot run here (cuda on a machine without a CUDA device), or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available on this machine"
    return None


def refuse_missing_cuda(parser: argparse.ArgumentParser, device: str) -> None:
    """Exit through ``parser`` (status 2) for ``--device cuda`` on a machine without a CUDA device,
    before anything runs or a results file is written."""
    reason = missing_cuda(device)
    if reason is not None:
        parser.error(reason)


def default_dtype(device: str) -> torch.dtype:
    """What the benchmarks on ``device`` run in unless told: bfloat16 on cuda, float32 on cpu."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """--op, --impl and --device: which ops and backends run, and where."""
    parser.add_argument("--op", choices=(*OPS, "all"), default="all", help="which op (default: all)")
    parser.add_argument(
        "--impl",
        type=backend_list,
        default=BACKENDS,
        metavar="LIST",
        help=f"comma-separated backends from {', '.join(BACKENDS)}, or all (default: all; unavailable ones are listed as skipped)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=default_device(),
        help="where the tensors live (default: cuda when a CUDA device is present, else cpu)",
    )


def selected_ops(op: str) -> tuple[str, ...]:
    return OPS if op == "all" else (op,)

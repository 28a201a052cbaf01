"""The ``sketchcolor`` command line.

Each subcommand is one ``add_<name>(subparsers)`` function that adds its parser and sets
``handler`` to the function that runs it; ``SUBCOMMANDS`` lists them in help order, so a new
subcommand is one function plus one entry. Handlers return the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

from .benchmarking.command import add_bench
from .models.config import ConfigFieldError
from .ops._backends import IMPLS
from .output_paths import check_output_file, check_output_image
from .verify import add_verify

# Annotations of the config fields the command line can set (they are strings under
# ``from __future__ import annotations``), and the argparse type of each.
_OPTION_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
# Held-out pairs drawn in a matches sheet (eval --matches, the demo's matches.png): one row each.
MATCH_SHEET_ROWS = 4


def _add_config_options(parser: argparse.ArgumentParser, config_class, title: str, prefix: str = "") -> None:
    """One option per field of a config dataclass that has a "help" entry in its metadata
    (``--batch-size`` for ``batch_size``), stored under ``prefix + name``."""
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(config_class):
        if "help" not in field.metadata:
            continue
        type_name = field.type.removesuffix(" | None")
        default = field.default
        option = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata['help']} (default: {default})"
        if type_name == "bool":
            group.add_argument(option, dest=prefix + field.name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            group.add_argument(
                option,
                dest=prefix + field.name,
                type=_OPTION_TYPES[type_name],
                default=default,
                choices=field.metadata.get("choices"),
                metavar=field.name.upper() if "choices" not in field.metadata else None,
                help=help_text,
            )


def _config_values(args: argparse.Namespace, config_class, prefix: str = "") -> dict:
    return {field.name: getattr(args, prefix + field.name) for field in dataclasses.fields(config_class) if "help" in field.metadata}


@contextlib.contextmanager
def _fields_named_as_flags():
    """A config field's bad value, set from the command line, is reported under the field's flag
    (``argument --l1-weight: must be ...``, as argparse reports its own checks), not its name."""
    try:
        yield
    except ConfigFieldError as error:
        raise ValueError(f"argument --{error.field.replace('_', '-')}: {error.problem}") from None


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="torch device to run on (default: auto, cuda when available)")
    parser.add_argument("--attn", default="auto", choices=IMPLS, help="backend of the SCFT attention op (default: auto)")


def _device(args: argparse.Namespace) -> str:
    from .train import resolve_device

    return str(resolve_device(args.device))


def _add_checkpoint_option(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, for the subcommands that load a trained model; read it with ``_checkpoint``."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint file, or a run folder (its latest checkpoint)")


def _checkpoint(args: argparse.Namespace) -> Path:
    from .train import find_checkpoint

    return find_checkpoint(args.checkpoint)


# --- train -------------------------------------------------------------------------------------


def add_train(subparsers) -> None:
    from .losses import LossConfig
    from .models import ModelConfig
    from .train import TrainConfig

    parser = subparsers.add_parser(
        "train",
        help="train a colorization model",
        description="Train the generator and discriminator on augmented-self pairs from a folder of images "
        "(or the built-in procedural shapes). Ctrl-C stops after the current step and saves a checkpoint.",
    )
    _add_config_options(parser, TrainConfig, "training")
    _add_config_options(parser, ModelConfig, "model (the defaults are the paper's architecture)", prefix="model.")
    _add_config_options(parser, LossConfig, "loss", prefix="loss.")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel training over the processes torchrun started (torchrun --nproc_per_node=N -m sketchcolor "
        "train ...); on by itself under torchrun, and with this flag a launch without torchrun is an error instead of "
        "a single-process run",
    )
    parser.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .distributed import process_group, rank
    from .losses import LossConfig
    from .models import ModelConfig
    from .train import TrainConfig, train

    with _fields_named_as_flags():
        config = TrainConfig(
            **_config_values(args, TrainConfig),
            model=ModelConfig(**_config_values(args, ModelConfig, "model.")),
            loss=LossConfig(**_config_values(args, LossConfig, "loss.")),
        )
    with process_group(config.device, required=args.distributed):
        result = train(config)
        if rank() == 0:
            print(f"step {result.step}; checkpoint: {result.checkpoint}; outputs in {result.out}")
    return _exit_status(result)


def _exit_status(result) -> int:
    """0, or 130 (the shell's status for Ctrl-C) for a run stopped by Ctrl-C after saving, so
    that a job script can tell it from a finished run. A time limit is a requested end: 0."""
    return 130 if result.stopped_early == "interrupted" else 0


# --- demo --------------------------------------------------------------------------------------


def add_demo(subparsers) -> None:
    from .train import demo_config

    preset = demo_config("")
    parser = subparsers.add_parser(
        "demo",
        help="train briefly on the built-in shapes and evaluate (minutes on a CPU)",
        description="Train a small model (64x64, narrow channels) on the built-in procedural shapes, then score it "
        "on held-out pairs against the blank-reference and mean-color baselines, with how often SCFT finds the true "
        "correspondence. Writes sample grids, a checkpoint, metrics.jsonl, eval.json and matches.png (SCFT's "
        "correspondence, drawn) to --out. Run again with the same --out, it continues the run there (one that "
        "stopped early trains on; a finished one is only evaluated again).",
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--steps", type=int, default=preset.steps, help="training steps (default: %(default)s)")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=preset.max_minutes,
        help="stop training (with a checkpoint) after this long, so that a slow or busy machine still finishes; "
        "running the demo again continues it (default: %(default)s; 800 steps take about 7 minutes on 2 cores)",
    )
    parser.add_argument("--eval-count", type=int, default=256, help="held-out pairs to evaluate on (default: 256)")
    parser.add_argument("--workers", type=int, default=preset.workers, help="DataLoader workers (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default: 1; on a small shared CPU one thread per process keeps a busy "
        "neighbour from stalling every step, and the data worker has the other core)",
    )
    _add_runtime_options(parser)
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from .data.preview import render_matches
    from .evaluate import evaluate, evaluation_json, format_table
    from .train import demo_config, train

    # Checked before training, which an error after it would waste.
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.eval_count < 1:
        raise ValueError(f"--eval-count must be at least 1, got {args.eval_count}")
    torch.set_num_threads(args.threads)
    config = demo_config(args.out)
    # The demo continues the run in --out, if there is one, instead of refusing it.
    with _fields_named_as_flags():
        config = dataclasses.replace(
            config, attn=args.attn, device=args.device, resume="auto", steps=args.steps, workers=args.workers, max_minutes=args.max_minutes
        )
    started = time.monotonic()
    result = train(config)
    trained = time.monotonic() - started
    if result.stopped_early == "interrupted":
        print(f"stopped at step {result.step} before the evaluation; run the same command again to continue")
        return _exit_status(result)
    evaluation = evaluate(result.checkpoint, count=args.eval_count, device=_device(args), attn=args.attn, samples=MATCH_SHEET_ROWS)
    scores = evaluation.scores
    report = {
        "steps": result.step,
        "stopped_early": result.stopped_early,
        "train_seconds": trained,
        "total_seconds": time.monotonic() - started,
        "checkpoint": str(result.checkpoint),
        "held_out_pairs": args.eval_count,
        **evaluation_json(evaluation),
        "l1_ratio_to_blank_reference": scores["model"].l1 / scores["blank_reference"].l1,
    }
    out = Path(args.out)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    render_matches(evaluation.samples, evaluation.grid).save(out / "matches.png")
    samples = sorted((out / "samples").glob("step-*.png"))
    print(format_table(evaluation))
    print(f"trained to step {result.step} in {trained / 60:.1f} min; total {report['total_seconds'] / 60:.1f} min")
    if result.stopped_early:
        print(f"training stopped at the {result.stopped_early} before step {config.steps}; run the same command again to continue")
    print(f"sample grid: {samples[-1] if samples else 'none'}")
    print(f"checkpoint:  {result.checkpoint}")
    print(f"metrics:     {out / 'metrics.jsonl'}, {out / 'eval.json'}")
    print(f"matches:     {out / 'matches.png'} (SCFT's correspondence on held-out pairs)")
    print(f"outputs in {out.resolve()}")
    return 0


# --- colorize ----------------------------------------------------------------------------------


def add_colorize(subparsers) -> None:
    parser = subparsers.add_parser(
        "colorize",
        help="color a sketch, or a folder of sketches, like a reference image",
        description="Color a line drawing (dark lines on white) like a reference image with a trained checkpoint. "
        "Inputs of any size are resized to a multiple of 16; the output has the sketch's size. Given a folder of "
        "sketches (or color images), colors each of its PNG/JPG/WebP files into the folder --out as <name>.png.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sketch", help="line drawing to color, or a folder of them")
    source.add_argument(
        "--color-image", help="color image to extract the sketch from (XDoG) instead of --sketch, or a folder of them"
    )
    parser.add_argument("--reference", required=True, help="color image whose colors to use")
    _add_checkpoint_option(parser)
    parser.add_argument("-o", "--out", required=True, help="output PNG; for a folder of sources, the output folder")
    parser.add_argument("--size", type=int, default=None, help="longer side to run the model at (default: the training size)")
    _add_runtime_options(parser)
    parser.set_defaults(handler=run_colorize)


def run_colorize(args: argparse.Namespace) -> int:
    from .colorize import colorize_file, colorize_folder

    source = args.sketch if args.sketch is not None else args.color_image
    options = dict(sketch=args.sketch, color_image=args.color_image, size=args.size, device=_device(args), attn=args.attn)
    if not Path(source).is_dir():
        print(f"wrote {colorize_file(_checkpoint(args), args.reference, args.out, **options)}")
        return 0
    result = colorize_folder(_checkpoint(args), args.reference, args.out, **options)
    print(f"wrote {len(result.written)} images to {args.out}")
    if result.unreadable:
        names = ", ".join(path.name for path in result.unreadable)
        print(f"sketchcolor colorize: could not read {len(result.unreadable)} of the sources, skipped: {names}", file=sys.stderr)
        return 1
    return 0


# --- sketch ------------------------------------------------------------------------------------


def add_sketch(subparsers) -> None:
    from .data import XDoGParams

    parser = subparsers.add_parser(
        "sketch",
        help="extract a line drawing from an image (XDoG)",
        description="Extract dark-on-white outlines from any image with the eXtended Difference of Gaussians.",
    )
    parser.add_argument("image", help="input image")
    parser.add_argument("-o", "--out", required=True, help="output image (PNG recommended)")
    defaults = XDoGParams()
    for name, help_text in (
        ("sigma", "line width: standard deviation of the inner Gaussian in pixels"),
        ("k", "ratio of the outer Gaussian's sigma to the inner one's"),
        ("p", "sharpening strength"),
        ("epsilon", "threshold below which a pixel is drawn dark"),
        ("phi", "steepness of the soft threshold"),
    ):
        parser.add_argument(f"--{name}", type=float, default=getattr(defaults, name), help=f"{help_text} (default: %(default)s)")
    parser.set_defaults(handler=run_sketch)


def run_sketch(args: argparse.Namespace) -> int:
    from .data import extract_sketch_file

    extract_sketch_file(args.image, args.out, sigma=args.sigma, k=args.k, p=args.p, epsilon=args.epsilon, phi=args.phi)
    print(f"wrote {args.out}")
    return 0


# --- eval --------------------------------------------------------------------------------------


def add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a checkpoint on held-out pairs (L1, PSNR, SSIM) against two baselines, and its SCFT correspondence",
        description="Score a checkpoint on held-out augmented-self pairs: the model, the model with the reference "
        "blanked to gray, and a fill with the reference's mean color. L1, PSNR and SSIM on [0, 1] images. Also how "
        "often SCFT's best-scoring reference cell is the true correspondence (or within one cell of it), beside chance.",
    )
    _add_checkpoint_option(parser)
    parser.add_argument("--data", default=None, help="folder of held-out images (default: built-in shapes with the held-out seed)")
    parser.add_argument("--count", type=int, default=256, help="pairs to score (default: 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass (default: 16)")
    parser.add_argument("--json", default=None, help="also write the scores to this JSON file")
    parser.add_argument(
        "--matches",
        default=None,
        help=f"also draw SCFT's correspondence on the first {MATCH_SHEET_ROWS} pairs to this image: coloured sketch "
        "cells, their true reference cells, the cells SCFT scores highest, the output and the ground truth",
    )
    _add_runtime_options(parser)
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from .data.preview import render_matches
    from .evaluate import evaluate, evaluation_json, format_table

    checkpoint = _checkpoint(args)
    # Checked before the evaluation, which an error after it would waste.
    if args.json:
        check_output_file("--json", args.json)
    if args.matches:
        check_output_image("--matches", args.matches)
    rows = MATCH_SHEET_ROWS if args.matches else 0
    evaluation = evaluate(checkpoint, args.data, args.count, args.batch_size, _device(args), args.attn, samples=rows)
    print(f"{checkpoint}: {args.count} held-out pairs")
    print(format_table(evaluation))
    if args.json:
        Path(args.json).write_text(json.dumps(evaluation_json(evaluation), indent=2) + "\n")
    if args.matches:
        render_matches(evaluation.samples, evaluation.grid).save(args.matches)
        print(f"wrote {args.matches}: SCFT's matches on {len(evaluation.samples)} pairs")
    return 0


SUBCOMMANDS = (add_train, add_colorize, add_sketch, add_demo, add_eval, add_verify, add_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sketchcolor",
        description="Reference-based sketch colorization (Lee et al., CVPR 2020) with fused SCFT kernels.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .train import NonFiniteLossError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except NonFiniteLossError as error:
        print(f"sketchcolor {args.command}: {error}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:
        print(f"sketchcolor {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sketchcolor {args.command}: interrupted", file=sys.stderr)
        return 130

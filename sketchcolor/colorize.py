"""Inference: color a sketch like a reference with a trained generator and write a PNG.

Inputs of any size are resized so that the longer side is the processing size (by default the
training size of the checkpoint) and both sides are multiples of 16, the encoders' total
downsampling; the output is resized back to the sketch's size. The sketch can also be drawn on
the fly from a color image with the data pipeline's XDoG extractor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .checkpoint import read_checkpoint
from .data import check_output_image_path, load_rgb_image, pil_to_tensor, tensor_to_pil, xdog
from .models import SIZE_MULTIPLE, Generator, ModelConfig
from .ops.scft_attention import FWD_OP as SCFT_ATTENTION_OP
from .train import check_attn


def load_generator(checkpoint: str | Path, device: str | torch.device = "cpu", attn: str = "auto") -> tuple[Generator, dict]:
    """The generator of a training checkpoint in eval mode, and the run's training config (a dict).
    Raises ValueError if backend ``attn`` cannot run its attention on ``device`` (in float32)."""
    check_attn(attn, torch.device(device), {SCFT_ATTENTION_OP: torch.float32})
    state = read_checkpoint(checkpoint, sections=("model", "config", "generator"))
    try:
        generator = Generator(ModelConfig.from_dict(state["model"]), attn_impl=attn)
        # RuntimeError: missing or unexpected keys and shape mismatches.
        generator.load_state_dict(state["generator"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"checkpoint {str(checkpoint)!r} holds no generator that loads ({type(error).__name__}: {error})") from error
    return generator.to(device).eval(), state["config"]


def processing_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is ``size``, each rounded to a multiple of 16 (at least 16)."""
    if not (isinstance(size, int) and size >= SIZE_MULTIPLE):
        raise ValueError(f"size must be an int >= {SIZE_MULTIPLE}, got {size!r}")
    factor = size / max(width, height)
    return tuple(max(SIZE_MULTIPLE, round(side * factor / SIZE_MULTIPLE) * SIZE_MULTIPLE) for side in (width, height))


def _resized(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    return pil_to_tensor(image.resize(size, Image.Resampling.LANCZOS))


@torch.no_grad()
def colorize(generator: Generator, sketch: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """sketch (1, H, W) and reference (3, H', W') in [0, 1], sides multiples of 16 -> (3, H, W) in [0, 1]."""
    device = next(generator.parameters()).device
    output = generator(sketch[None].to(device) * 2 - 1, reference[None].to(device) * 2 - 1).image
    return (output[0].float().cpu() + 1) / 2


def colorize_file(
    checkpoint: str | Path,
    reference: str | Path,
    out: str | Path,
    *,
    sketch: str | Path | None = None,
    color_image: str | Path | None = None,
    size: int | None = None,
    device: str = "cpu",
    attn: str = "auto",
) -> Path:
    """Color ``sketch`` (a line drawing, dark lines on white) or the XDoG sketch of
    ``color_image`` (exactly one of them) like ``reference``; write the result to ``out``."""
    if (sketch is None) == (color_image is None):
        raise ValueError("give exactly one of sketch (a line drawing) and color_image (to extract one from)")
    check_output_image_path(out)
    generator, train_config = load_generator(checkpoint, device, attn)
    source = load_rgb_image(sketch if sketch is not None else color_image)
    work_size = processing_size(*source.size, size if size is not None else int(train_config["size"]))
    if sketch is not None:
        sketch_tensor = _resized(source.convert("L"), work_size)
    else:
        # Extracted at the processing size, so line widths match what the model was trained on.
        sketch_tensor = xdog(_resized(source, work_size))
    reference_tensor = _resized(load_rgb_image(reference), work_size)
    result = tensor_to_pil(colorize(generator, sketch_tensor, reference_tensor)).resize(source.size, Image.Resampling.BICUBIC)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    return out

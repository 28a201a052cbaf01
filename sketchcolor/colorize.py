"""Inference: color a sketch (or every sketch of a folder) like a reference with a trained
generator and write PNGs.

Inputs of any size are resized so that the longer side is the processing size (by default the
training size of the checkpoint) and both sides are multiples of 16, the encoders' total
downsampling; the output is resized back to the sketch's size. The sketch can also be drawn on
the fly from a color image with the data pipeline's XDoG extractor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from .checkpoint import read_checkpoint
from .data import IMAGE_SUFFIXES, load_rgb_image, pil_to_tensor, tensor_to_pil, xdog
from .data.images import UnreadableImageError
from .models import SIZE_MULTIPLE, Generator, ModelConfig
from .ops.scft_attention import FWD_OP as SCFT_ATTENTION_OP
from .output_paths import check_not_an_input, check_output_folder, check_output_image
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


def _check_size(size) -> None:
    if not (isinstance(size, int) and size >= SIZE_MULTIPLE):
        raise ValueError(f"size must be an int >= {SIZE_MULTIPLE}, got {size!r}")


def processing_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is ``size``, each rounded to a multiple of 16 (at least 16)."""
    _check_size(size)
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


def _colorized_image(generator: Generator, source: Image.Image, is_sketch: bool, reference: Image.Image, size: int) -> Image.Image:
    """The colorized image of the sketch ``source`` (or of the XDoG sketch of the color image
    ``source``) at the source's size, processed at ``size`` on the longer side."""
    work_size = processing_size(*source.size, size)
    if is_sketch:
        sketch_tensor = _resized(source.convert("L"), work_size)
    else:
        # Extracted at the processing size, so line widths match what the model was trained on.
        sketch_tensor = xdog(_resized(source, work_size))
    reference_tensor = _resized(reference, work_size)
    return tensor_to_pil(colorize(generator, sketch_tensor, reference_tensor)).resize(source.size, Image.Resampling.BICUBIC)


def _source(sketch: str | Path | None, color_image: str | Path | None) -> tuple[Path, bool]:
    """(the path given, whether it holds sketches rather than color images)."""
    if (sketch is None) == (color_image is None):
        raise ValueError("give exactly one of sketch (a line drawing) and color_image (to extract one from)")
    return (Path(sketch), True) if sketch is not None else (Path(color_image), False)


def _model(checkpoint: str | Path, size: int | None, device: str, attn: str) -> tuple[Generator, int]:
    """The checkpoint's generator and the processing size: ``size``, or the training size."""
    if size is not None:
        _check_size(size)  # before the checkpoint is read
    generator, train_config = load_generator(checkpoint, device, attn)
    return generator, size if size is not None else int(train_config["size"])


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
    source, is_sketch = _source(sketch, color_image)
    check_output_image("out", out, create_folder=True)
    check_not_an_input("out", out, {"sketch" if is_sketch else "color_image": source, "reference": reference})
    generator, work_size = _model(checkpoint, size, device, attn)
    result = _colorized_image(generator, load_rgb_image(source), is_sketch, load_rgb_image(reference), work_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    return out


@dataclass
class FolderResult:
    written: list[Path]
    """The PNGs written, in the sources' name order."""
    unreadable: list[Path]
    """Sources that could not be decoded (skipped)."""


def colorize_folder(
    checkpoint: str | Path,
    reference: str | Path,
    out: str | Path,
    *,
    sketch: str | Path | None = None,
    color_image: str | Path | None = None,
    size: int | None = None,
    device: str = "cpu",
    attn: str = "auto",
) -> FolderResult:
    """``colorize_file`` for every PNG/JPG/WebP file in the folder ``sketch`` or ``color_image``
    (not its subfolders), with one reference and the model loaded once: ``out``/<name>.png for
    each source <name>.<suffix>. Every problem that would stop the run part-way is found before
    the first image: an output folder that is the sources' own (its PNGs would be replaced), two
    sources with one name, no sources, an unwritable ``out``. A source that cannot be decoded is
    skipped and listed in the result."""
    folder, is_sketch = _source(sketch, color_image)
    option = "sketch" if is_sketch else "color_image"
    if not folder.is_dir():
        raise NotADirectoryError(f"{option} {str(folder)!r} is not a folder")
    sources = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not sources:
        raise ValueError(f"{option} folder {str(folder)!r} contains no {', '.join(IMAGE_SUFFIXES)} files")
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise ValueError(f"out {str(out)!r} is the {option} folder itself; its images would be replaced: choose another folder")
    by_name: dict[str, Path] = {}
    for path in sources:
        if path.stem in by_name:
            raise ValueError(f"{by_name[path.stem].name} and {path.name} in {str(folder)!r} would both be written to {path.stem}.png")
        by_name[path.stem] = path
    check_output_folder("out", out, tuple(f"{name}.png" for name in by_name))
    for name in by_name:
        check_not_an_input("out", out / f"{name}.png", {"reference": reference})
    generator, work_size = _model(checkpoint, size, device, attn)
    reference_image = load_rgb_image(reference)
    out.mkdir(parents=True, exist_ok=True)
    result = FolderResult([], [])
    for path in tqdm(sources, desc="colorize", unit="image", dynamic_ncols=True):
        try:
            source = load_rgb_image(path)
        except UnreadableImageError:
            result.unreadable.append(path)
            continue
        target = out / f"{path.stem}.png"
        _colorized_image(generator, source, is_sketch, reference_image, work_size).save(target)
        result.written.append(target)
    return result

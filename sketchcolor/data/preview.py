"""Write a grid of training samples so the augmentation can be seen.

    python -m sketchcolor.data.preview --out preview.png [--data DIR] [--size 256] [--feature-grid 16]

One row per sample: sketch, reference, ground truth, then the correspondence: sketch cells
marked with coloured dots, and the same dots on the reference at the cells ``pos`` maps them
to (a cross on the sketch marks a cell whose content leaves the reference). Last, the sketch
carried cell by cell through ``pos`` onto the reference, drawn in red: where the
correspondence is right, the red lines lie on the reference's outlines (to within a cell).

``render_matches`` draws a trained model's correspondence with the same markers, beside the true
one (``sketchcolor eval --matches``).
"""

from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..output_paths import check_output_image
from .dataset import make_dataset
from .images import tensor_to_pil

COLUMNS = ("sketch", "reference", "ground truth", "sketch cells", "their reference cells", "sketch moved by pos")
MATCH_COLUMNS = ("sketch cells", "true reference cells", "SCFT's best cells", "colorized", "ground truth")
_MARKERS_PER_SIDE = 6
_LABEL_HEIGHT = 18
_MIN_MATCH_PANEL = 192


def _to_unit(image: torch.Tensor) -> torch.Tensor:
    return (image + 1) / 2


def _marker_cells(grid: int) -> list[int]:
    stride = -(-grid // _MARKERS_PER_SIDE)
    offset = stride // 2
    return [y * grid + x for y in range(offset, grid, stride) for x in range(offset, grid, stride)]


def _marker_color(rank: int) -> tuple[int, int, int]:
    # Golden-ratio hue steps: neighbouring markers get clearly different colours.
    hue = (rank * 0.618033988749895) % 1.0
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.9, 1.0))


def _cell_center(cell: int, grid: int, cell_side: float) -> tuple[float, float]:
    return ((cell % grid + 0.5) * cell_side, (cell // grid + 0.5) * cell_side)


def _faded(image: Image.Image) -> Image.Image:
    return Image.blend(image.convert("RGB"), Image.new("RGB", image.size, (255, 255, 255)), 0.45)


def marker_panels(sketch: torch.Tensor, reference: torch.Tensor, cells: torch.Tensor, grid: int) -> tuple[Image.Image, Image.Image]:
    """The sketch with a coloured dot on each marker cell (a cross where ``cells`` is -1), and the
    reference with the same dots on the cells ``cells`` (grid * grid,) maps them to: ``pos`` for the
    true correspondence, or the cells a model picked. Tensors in [-1, 1] as the dataset gives them."""
    size = sketch.shape[-1]
    cell_side = size / grid
    sketch_panel, reference_panel = _faded(tensor_to_pil(_to_unit(sketch))), _faded(tensor_to_pil(_to_unit(reference)))
    sketch_draw, reference_draw = ImageDraw.Draw(sketch_panel), ImageDraw.Draw(reference_panel)
    radius = max(3.0, min(cell_side * 0.35, size / 48))
    for rank, cell in enumerate(_marker_cells(grid)):
        color = _marker_color(rank)
        x, y = _cell_center(cell, grid, cell_side)
        target = int(cells[cell])
        if target < 0:
            sketch_draw.line([(x - radius, y - radius), (x + radius, y + radius)], fill=color, width=3)
            sketch_draw.line([(x - radius, y + radius), (x + radius, y - radius)], fill=color, width=3)
            continue
        sketch_draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline=(0, 0, 0))
        tx, ty = _cell_center(target, grid, cell_side)
        reference_draw.ellipse([tx - radius, ty - radius, tx + radius, ty + radius], fill=color, outline=(0, 0, 0))
    return sketch_panel, reference_panel


def correspondence_panels(
    sketch: torch.Tensor, reference: torch.Tensor, pos: torch.Tensor, grid: int
) -> tuple[Image.Image, Image.Image, Image.Image]:
    """The three correspondence panels of one sample (tensors in [-1, 1] as the dataset gives them)."""
    size = sketch.shape[-1]
    sketch_panel, reference_panel = marker_panels(sketch, reference, pos, grid)

    # Paste each sketch cell's patch at its reference cell; keep only the dark lines, in red.
    moved = torch.ones_like(sketch)
    side = size // grid
    for cell in torch.nonzero(pos >= 0).flatten().tolist():
        target = int(pos[cell])
        sy, sx = (cell // grid) * side, (cell % grid) * side
        ty, tx = (target // grid) * side, (target % grid) * side
        moved[:, ty : ty + side, tx : tx + side] = sketch[:, sy : sy + side, sx : sx + side]
    line_mask = tensor_to_pil((_to_unit(moved) < 0.5).float())
    moved_panel = _faded(tensor_to_pil(_to_unit(reference)))
    moved_panel.paste(Image.new("RGB", moved_panel.size, (230, 0, 0)), (0, 0), line_mask)
    return sketch_panel, reference_panel, moved_panel


def render_preview(samples: list[dict[str, torch.Tensor]], grid: int) -> Image.Image:
    """A labelled grid image with one row per dataset item."""
    rows = []
    for sample in samples:
        panels = [tensor_to_pil(_to_unit(sample[key])) for key in ("sketch", "reference", "ground_truth")]
        rows.append(panels + list(correspondence_panels(sample["sketch"], sample["reference"], sample["pos"], grid)))
    return _labelled_sheet(COLUMNS, rows)


def render_matches(rows: list[dict[str, torch.Tensor]], grid: int) -> Image.Image:
    """A labelled grid image of a model's correspondence, one row per pair: the keys of a dataset
    item plus "output" (the colorized image) and "best" (grid * grid,), the reference cell SCFT
    scores highest for each sketch cell. The dots of MATCH_COLUMNS' second and third panels have
    the colours of the sketch cells they belong to: where the model is right, they coincide."""
    # Small images (the demo's are 64 pixels) are enlarged by whole pixels, so the markers and
    # the labels have room.
    factor = -(-_MIN_MATCH_PANEL // rows[0]["sketch"].shape[-1])
    panel_rows = []
    for item in rows:
        sketch, reference, output, truth = (
            item[name].repeat_interleave(factor, -1).repeat_interleave(factor, -2) for name in ("sketch", "reference", "output", "ground_truth")
        )
        sketch_panel, true_panel = marker_panels(sketch, reference, item["pos"], grid)
        # Only the cells with a true cell: the others have nothing to be right about.
        _, best_panel = marker_panels(sketch, reference, torch.where(item["pos"] >= 0, item["best"], -1), grid)
        panel_rows.append([sketch_panel, true_panel, best_panel, tensor_to_pil(_to_unit(output)), tensor_to_pil(_to_unit(truth))])
    return _labelled_sheet(MATCH_COLUMNS, panel_rows)


def _labelled_sheet(labels: tuple[str, ...], rows: list[list[Image.Image]]) -> Image.Image:
    """Square panels of one size in a grid, one list per row, under a line of column labels."""
    size = rows[0][0].size[0]
    sheet = Image.new("RGB", (size * len(labels), _LABEL_HEIGHT + size * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for column, label in enumerate(labels):
        draw.text((column * size + 4, 3), label, fill=(0, 0, 0))
    for row, panels in enumerate(rows):
        for column, panel in enumerate(panels):
            sheet.paste(panel.convert("RGB"), (column * size, _LABEL_HEIGHT + row * size))
    return sheet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sketchcolor.data.preview",
        description="Write a grid of training samples (sketch, reference, ground truth, correspondence).",
    )
    parser.add_argument("--out", required=True, type=Path, help="PNG file to write")
    parser.add_argument("--data", default=None, help="folder of images (default: the built-in procedural shapes)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--feature-grid", type=int, default=16, help="feature cells per side (default 16)")
    parser.add_argument("--count", type=int, default=4, help="number of samples, one per row (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")
    try:
        # Before the samples are drawn.
        check_output_image("--out", args.out)
    except ValueError as error:
        parser.error(str(error))
    try:
        # length=count: a folder with fewer images repeats them with fresh augmentations.
        dataset = make_dataset(args.data, args.size, args.feature_grid, args.seed, args.count)
        # A folder whose every image is unreadable is found out here, drawing the samples.
        samples = [dataset[index] for index in range(args.count)]
    except (ValueError, NotADirectoryError) as error:
        parser.error(str(error))
    render_preview(samples, args.feature_grid).save(args.out)
    print(f"wrote {args.out}: {args.count} samples")


if __name__ == "__main__":
    main()

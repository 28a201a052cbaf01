"""Held-out evaluation: L1, PSNR and SSIM against the ground truth for the model and two baselines.

On augmented-self pairs of held-out images (the built-in procedural shapes drawn with the run's
held-out seed, whatever the run trained on; or, given a folder, that folder's images), it reports
- model:            the generator with the real reference;
- blank_reference:  the same generator with the reference replaced by uniform gray, i.e. what
                    it produces from the sketch alone: the gap to "model" is what the
                    reference's colors contribute;
- mean_color:       every pixel filled with the reference's mean color.
All metrics are on images in [0, 1] (PSNR and SSIM per image, then averaged).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from kornia.metrics import psnr, ssim

from .colorize import load_generator
from .data import make_dataset
from .train import held_out_seed

METHODS = ("model", "blank_reference", "mean_color")
SSIM_WINDOW = 11


@dataclass
class Scores:
    l1: float
    psnr: float
    ssim: float


def image_scores(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image (L1, PSNR, SSIM) of (B, 3, H, W) images in [0, 1]: a (B, 3) tensor."""
    l1 = (output - target).abs().flatten(1).mean(1)
    peak = torch.stack([psnr(o, t, max_val=1.0) for o, t in zip(output, target)])
    structure = ssim(output, target, SSIM_WINDOW, max_val=1.0).flatten(1).mean(1)
    return torch.stack([l1, peak, structure], dim=1)


@torch.no_grad()
def evaluate(
    checkpoint: str | Path,
    data: str | Path | None = None,
    count: int = 256,
    batch_size: int = 16,
    device: str = "cpu",
    attn: str = "auto",
) -> dict[str, Scores]:
    """Scores of METHODS on ``count`` held-out pairs at the checkpoint's training size.

    Without ``data`` the pairs are the built-in procedural shapes drawn with the held-out seed
    of the training seed (images the run never saw); with ``data``, the images of that folder.
    """
    for name, value in (("count", count), ("batch_size", batch_size)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    generator, train_config = load_generator(checkpoint, device, attn)
    size = int(train_config["size"])
    pairs = make_dataset(data, size, generator.config.feature_grid(size), held_out_seed(int(train_config["seed"])), count)
    totals = {method: torch.zeros(3, dtype=torch.float64) for method in METHODS}
    for start in range(0, count, batch_size):
        items = [pairs[index] for index in range(start, min(start + batch_size, count))]
        sketch, reference, target = (torch.stack([item[name] for item in items]).to(device) for name in ("sketch", "reference", "ground_truth"))
        outputs = {
            "model": generator(sketch, reference).image,
            # 0 is mid-gray in the [-1, 1] range the networks see.
            "blank_reference": generator(sketch, torch.zeros_like(reference)).image,
            "mean_color": reference.mean(dim=(2, 3), keepdim=True).expand_as(reference),
        }
        target01 = (target.float() + 1) / 2
        for method, output in outputs.items():
            totals[method] += image_scores((output.float() + 1) / 2, target01).sum(0).double().cpu()
    return {method: Scores(*(total / count).tolist()) for method, total in totals.items()}


def scores_json(scores: dict[str, Scores]) -> dict[str, dict[str, float]]:
    """``scores`` as JSON-ready data: method -> {"l1", "psnr", "ssim"}."""
    return {method: asdict(score) for method, score in scores.items()}


def format_table(scores: dict[str, Scores]) -> str:
    """A plain-text table; the last column is each method's L1 relative to blank_reference."""
    blank = scores["blank_reference"].l1
    lines = [f"{'method':<16} {'L1':>8} {'PSNR':>8} {'SSIM':>8} {'L1/blank':>9}"]
    for method, score in scores.items():
        lines.append(f"{method:<16} {score.l1:8.4f} {score.psnr:8.2f} {score.ssim:8.4f} {score.l1 / blank:9.3f}")
    return "\n".join(lines)

"""Held-out evaluation: L1, PSNR and SSIM against the ground truth for the model and two
baselines, and how often SCFT's attention finds the true correspondence.

On augmented-self pairs of held-out images (the built-in procedural shapes drawn with the run's
held-out seed, whatever the run trained on; or, given a folder, that folder's images), it reports
- model:            the generator with the real reference;
- blank_reference:  the same generator with the reference replaced by uniform gray, i.e. what
                    it produces from the sketch alone: the gap to "model" is what the
                    reference's colors contribute;
- mean_color:       every pixel filled with the reference's mean color.
All metrics are on images in [0, 1] (PSNR and SSIM per image, then averaged).

The correspondence scores (sketchcolor.correspondence_match) ask what the correspondence loss
trains: is SCFT's best-scoring reference cell for a sketch cell the true one, or within one cell
of it? Beside each rate is that of a uniformly random cell, where a model whose attention learned
nothing sits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from kornia.metrics import ssim

from .colorize import load_generator
from .correspondence_match import best_keys, correspondence_hits
from .data import make_dataset
from .train import held_out_seed

METHODS = ("model", "blank_reference", "mean_color")
SSIM_WINDOW = 11
# PSNR's cap, 100 dB: an image equal to its target (a flat page filled with its own mean colour)
# has an infinite PSNR, which would make its method's mean infinite (and eval.json invalid JSON).
PSNR_MSE_FLOOR = 1e-10


@dataclass
class Scores:
    l1: float
    psnr: float
    ssim: float


@dataclass
class CorrespondenceScores:
    exact: float
    """Fraction of the sketch cells with a true reference cell whose best-scoring key is that cell."""
    within_one: float
    """Fraction whose best-scoring key is at most one cell (Chebyshev) from the true cell."""
    chance_exact: float
    """``exact`` of a uniformly random key: 1 / M (0 with no cell scored, as the rates)."""
    chance_within_one: float
    """``within_one`` of a uniformly random key: the mean over the cells of |window| / M."""
    cells: int
    """Sketch cells scored (those with a true reference cell)."""


@dataclass
class Evaluation:
    scores: dict[str, Scores]
    """METHODS -> image scores."""
    correspondence: CorrespondenceScores
    grid: int
    """Cells per side of SCFT's feature grid, which ``pos`` and ``best`` index."""
    samples: list[dict[str, torch.Tensor]]
    """The first pairs (as many as asked), each a dataset item (CPU tensors) plus "output" (3, S, S)
    in [-1, 1] and "best" (grid * grid,): SCFT's best-scoring reference cell per sketch cell."""


def image_scores(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image (L1, PSNR, SSIM) of (B, 3, H, W) images in [0, 1]: a (B, 3) tensor."""
    l1 = (output - target).abs().flatten(1).mean(1)
    peak = -10 * (output - target).square().flatten(1).mean(1).clamp_min(PSNR_MSE_FLOOR).log10()
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
    samples: int = 0,
) -> Evaluation:
    """Scores of METHODS and SCFT's correspondence on ``count`` held-out pairs at the checkpoint's
    training size, and the first ``samples`` pairs with the model's output and matches.

    Without ``data`` the pairs are the built-in procedural shapes drawn with the held-out seed
    of the training seed (images the run never saw); with ``data``, the images of that folder.
    """
    for name, value, least in (("count", count, 1), ("batch_size", batch_size, 1), ("samples", samples, 0)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            raise ValueError(f"{name} must be {'a positive' if least else 'a non-negative'} int, got {value!r}")
    generator, train_config = load_generator(checkpoint, device, attn)
    size = int(train_config["size"])
    grid = generator.config.feature_grid(size)
    pairs = make_dataset(data, size, grid, held_out_seed(int(train_config["seed"])), count)
    totals = {method: torch.zeros(3, dtype=torch.float64) for method in METHODS}
    hits = torch.zeros(4, dtype=torch.float64)
    kept: list[dict[str, torch.Tensor]] = []
    for start in range(0, count, batch_size):
        items = [pairs[index] for index in range(start, min(start + batch_size, count))]
        sketch, reference, target, pos = (
            torch.stack([item[name] for item in items]).to(device) for name in ("sketch", "reference", "ground_truth", "pos")
        )
        colorized = generator(sketch, reference)
        hits += correspondence_hits(colorized.query, colorized.key, pos, (grid, grid)).cpu()
        wanted = min(samples - len(kept), len(items))
        if wanted > 0:
            # Only the few pairs drawn are searched a second time: the scores go through the checked
            # correspondence_hits, which returns counts, not the best keys.
            best = best_keys(colorized.query[:wanted], colorized.key[:wanted]).cpu()
            for item, output, item_best in zip(items[:wanted], colorized.image[:wanted].float().cpu(), best):
                kept.append({**item, "output": output, "best": item_best})
        outputs = {
            "model": colorized.image,
            # 0 is mid-gray in the [-1, 1] range the networks see.
            "blank_reference": generator(sketch, torch.zeros_like(reference)).image,
            "mean_color": reference.mean(dim=(2, 3), keepdim=True).expand_as(reference),
        }
        target01 = (target.float() + 1) / 2
        for method, output in outputs.items():
            totals[method] += image_scores((output.float() + 1) / 2, target01).sum(0).double().cpu()
    exact, within_one, chance_within_one, cells = hits.tolist()
    scored = max(cells, 1.0)  # no cell with a true reference cell: rates of 0, not NaN, chance too
    chance_exact = 1 / (grid * grid) if cells else 0.0
    correspondence = CorrespondenceScores(exact / scored, within_one / scored, chance_exact, chance_within_one / scored, int(cells))
    return Evaluation({method: Scores(*(total / count).tolist()) for method, total in totals.items()}, correspondence, grid, kept)


def evaluation_json(evaluation: Evaluation) -> dict[str, dict]:
    """``evaluation`` as JSON-ready data: {"scores": method -> {"l1", "psnr", "ssim"},
    "correspondence": {"exact", "within_one", "chance_exact", "chance_within_one", "cells"}}."""
    return {
        "scores": {method: asdict(score) for method, score in evaluation.scores.items()},
        "correspondence": asdict(evaluation.correspondence),
    }


def format_table(evaluation: Evaluation) -> str:
    """Plain text: the image scores, the last column each method's L1 relative to
    blank_reference, then the correspondence rates beside chance."""
    scores = evaluation.scores
    blank = scores["blank_reference"].l1
    lines = [f"{'method':<16} {'L1':>8} {'PSNR':>8} {'SSIM':>8} {'L1/blank':>9}"]
    for method, score in scores.items():
        lines.append(f"{method:<16} {score.l1:8.4f} {score.psnr:8.2f} {score.ssim:8.4f} {score.l1 / blank:9.3f}")
    match = evaluation.correspondence
    lines += [
        "",
        f"SCFT correspondence over {match.cells} sketch cells (best-scoring reference cell vs the true one):",
        f"  exact            {match.exact:.3f}  (chance {match.chance_exact:.3f})",
        f"  within one cell  {match.within_one:.3f}  (chance {match.chance_within_one:.3f})",
    ]
    return "\n".join(lines)

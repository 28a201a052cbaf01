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

The correspondence scores ask what the correspondence loss trains: for each sketch cell whose
content the reference holds (``pos`` >= 0, from the pair's warp), is SCFT's best-scoring
reference cell (the argmax of q . k, the largest attention weight) the true one, or within one
cell of it? Beside each rate is the rate of scores that ignore the images (a uniformly random
cell), so a model whose attention learned nothing sits at "chance".
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
# Scores held at once when searching the best key (rows of every item of the batch): 64 MiB in
# float32 whatever the resolution, so the evaluation needs no N x M matrix either.
SCORE_CHUNK_ELEMENTS = 2**24


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
    """``exact`` of a uniformly random key: 1 / M."""
    chance_within_one: float
    """``within_one`` of a uniformly random key: the mean over the cells of |window| / M."""
    cells: int
    """Sketch cells scored (those with a true reference cell)."""


@dataclass
class Evaluation:
    scores: dict[str, Scores]
    """METHODS -> image scores."""
    correspondence: CorrespondenceScores


def correspondence_hits(query: torch.Tensor, key: torch.Tensor, pos: torch.Tensor, key_grid: tuple[int, int]) -> torch.Tensor:
    """Counts (exact hits, hits within one cell, sum of the chance of a within-one hit, cells) of
    the best-scoring keys of ``query`` (B, N, D) among ``key`` (B, M, D) against ``pos`` (B, N)
    (-1: no true cell, not counted), on the reference's ``key_grid`` (h, w) with h * w = M.
    Returns a float64 (4,) tensor; ties go to the lowest key index."""
    grid_h, grid_w = key_grid
    if key.shape[1] != grid_h * grid_w:
        raise ValueError(f"key_grid {key_grid} must have h * w = M = {key.shape[1]} cells")
    batch, num_keys = key.shape[:2]
    rows = max(1, SCORE_CHUNK_ELEMENTS // (batch * num_keys))
    key_t = key.float().transpose(1, 2)
    best = torch.cat([torch.bmm(query[:, start : start + rows].float(), key_t).argmax(-1) for start in range(0, query.shape[1], rows)], dim=1)
    valid = pos >= 0
    true = pos.clamp_min(0)
    true_y, true_x = true // grid_w, true % grid_w
    distance = torch.maximum((best // grid_w - true_y).abs(), (best % grid_w - true_x).abs())
    # Cells of the 3 x 3 window around the true cell that lie on the grid.
    window = ((true_y + 1).clamp_max(grid_h - 1) - (true_y - 1).clamp_min(0) + 1) * (
        (true_x + 1).clamp_max(grid_w - 1) - (true_x - 1).clamp_min(0) + 1
    )
    counts = [(best == true) & valid, (distance <= 1) & valid, window.double() / num_keys * valid, valid]
    return torch.stack([count.double().sum() for count in counts]).cpu()


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
) -> Evaluation:
    """Scores of METHODS and SCFT's correspondence on ``count`` held-out pairs at the checkpoint's
    training size.

    Without ``data`` the pairs are the built-in procedural shapes drawn with the held-out seed
    of the training seed (images the run never saw); with ``data``, the images of that folder.
    """
    for name, value in (("count", count), ("batch_size", batch_size)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    generator, train_config = load_generator(checkpoint, device, attn)
    size = int(train_config["size"])
    grid = generator.config.feature_grid(size)
    pairs = make_dataset(data, size, grid, held_out_seed(int(train_config["seed"])), count)
    totals = {method: torch.zeros(3, dtype=torch.float64) for method in METHODS}
    hits = torch.zeros(4, dtype=torch.float64)
    for start in range(0, count, batch_size):
        items = [pairs[index] for index in range(start, min(start + batch_size, count))]
        sketch, reference, target, pos = (
            torch.stack([item[name] for item in items]).to(device) for name in ("sketch", "reference", "ground_truth", "pos")
        )
        colorized = generator(sketch, reference)
        hits += correspondence_hits(colorized.query, colorized.key, pos, (grid, grid))
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
    per_cell = max(cells, 1.0)  # no cell with a true reference cell: rates of 0, not NaN
    correspondence = CorrespondenceScores(
        exact / per_cell, within_one / per_cell, 1 / (grid * grid), chance_within_one / per_cell, int(cells)
    )
    return Evaluation({method: Scores(*(total / count).tolist()) for method, total in totals.items()}, correspondence)


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

"""How often SCFT finds the true correspondence: for each sketch cell whose content the reference
holds (``pos`` >= 0, from the pair's warp), is the reference cell it scores highest (the argmax
of q . k, its largest attention weight) the true one, or within one cell of it? This is what the
correspondence loss trains, read off directly: the loss's value says how many triplets still
violate the margin, not how many cells find their match."""

from __future__ import annotations

import torch

from .ops._backends import without_autocast

# Scores held at once when searching the best key (rows of every item of the batch): 64 MiB in
# float32 whatever the resolution, so the search needs no N x M matrix either.
SCORE_CHUNK_ELEMENTS = 2**24
# Sketch cells per item that training scores each step (every one up to this many; evenly spaced
# rows beyond): the search costs 2 * rows * M * D per item, under 1% of a step at 65,536 tokens.
TRAINING_ROWS = 1024


def best_keys(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """For ``query`` (B, N, D) and ``key`` (B, M, D), the index (B, N) of each query's
    best-scoring key (its largest attention weight); ties go to the lowest index."""
    batch, num_keys = key.shape[:2]
    rows = max(1, SCORE_CHUNK_ELEMENTS // (batch * num_keys))
    # float32 scores whatever the inputs' dtype and autocast: bfloat16 would tie near neighbours.
    with torch.no_grad(), without_autocast(key.device):
        key_t = key.float().transpose(1, 2)
        chunks = [torch.bmm(query[:, start : start + rows].float(), key_t).argmax(-1) for start in range(0, query.shape[1], rows)]
    return torch.cat(chunks, dim=1)


def correspondence_hits(query: torch.Tensor, key: torch.Tensor, pos: torch.Tensor, key_grid: tuple[int, int]) -> torch.Tensor:
    """Counts (exact hits, hits within one cell, sum of the chance of a within-one hit, cells) of
    the best-scoring keys of ``query`` (B, N, D) among ``key`` (B, M, D) against ``pos`` (B, N)
    (-1: no true cell, not counted), on the reference's ``key_grid`` (h, w) with h * w = M.
    Returns a float64 (4,) tensor on their device (no wait for the GPU)."""
    grid_h, grid_w = key_grid
    num_keys = key.shape[1]
    if num_keys != grid_h * grid_w:
        raise ValueError(f"key_grid {key_grid} must have h * w = M = {num_keys} cells")
    best = best_keys(query, key)
    valid = pos >= 0
    true = pos.clamp_min(0)
    true_y, true_x = true // grid_w, true % grid_w
    distance = torch.maximum((best // grid_w - true_y).abs(), (best % grid_w - true_x).abs())
    # Cells of the 3 x 3 window around the true cell that lie on the grid.
    window = ((true_y + 1).clamp_max(grid_h - 1) - (true_y - 1).clamp_min(0) + 1) * (
        (true_x + 1).clamp_max(grid_w - 1) - (true_x - 1).clamp_min(0) + 1
    )
    counts = [(best == true) & valid, (distance <= 1) & valid, window.double() / num_keys * valid, valid]
    return torch.stack([count.double().sum() for count in counts])


def within_one_rate(query: torch.Tensor, key: torch.Tensor, pos: torch.Tensor, key_grid: tuple[int, int]) -> torch.Tensor:
    """The fraction of scored sketch cells whose best-scoring key is within one cell of the true
    one (0 if no cell has one), on at most TRAINING_ROWS evenly spaced rows per item: the
    training loop's running view of ``correspondence_hits``."""
    stride = -(-query.shape[1] // TRAINING_ROWS)
    _, within_one, _, cells = correspondence_hits(query[:, ::stride], key, pos[:, ::stride], key_grid)
    return within_one / cells.clamp_min(1)

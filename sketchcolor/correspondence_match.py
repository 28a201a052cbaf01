"""How often SCFT finds the true correspondence: for each sketch cell whose content the reference
holds (``pos`` >= 0, from the pair's warp), is the reference cell it scores highest (the argmax
of q . k, its largest attention weight) the true one, or within one cell of it? This is what the
correspondence loss trains, read off directly: the loss's value says how many triplets still
violate the margin, not how many cells find their match."""

from __future__ import annotations

import torch

from .ops._backends import without_autocast

# Scores held at once when searching the best key (rows of one item): 64 MiB in float32 whatever
# the resolution, so the search needs no N x M matrix either; beside them, one item's keys in
# float32 (M x D).
SCORE_CHUNK_ELEMENTS = 2**24
# Sketch cells per item that training scores each step (every one up to this many; beyond, a
# lattice spread over the whole grid): the search costs 2 * rows * M * D per item, under 1% of a
# step at 65,536 tokens.
TRAINING_ROWS = 1024


def best_keys(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """For ``query`` (B, N, D) and ``key`` (B, M, D), the index (B, N) of each query's
    best-scoring key (its largest attention weight); ties go to the lowest index."""
    rows = max(1, SCORE_CHUNK_ELEMENTS // key.shape[1])
    best = []
    # float32 scores whatever the inputs' dtype and autocast: bfloat16 would tie near neighbours.
    with torch.no_grad(), without_autocast(key.device):
        for item_query, item_key in zip(query, key):
            key_t = item_key.float().t()
            chunks = [(item_query[start : start + rows].float() @ key_t).argmax(-1) for start in range(0, item_query.shape[0], rows)]
            best.append(torch.cat(chunks) if chunks else item_query.new_empty((0,), dtype=torch.int64))
    return torch.stack(best)


def match_counts(best: torch.Tensor, pos: torch.Tensor, key_grid: tuple[int, int]) -> torch.Tensor:
    """Counts (exact hits, hits within one cell, sum of the chance of a within-one hit, cells) of
    the chosen keys ``best`` (B, N) against the true ones ``pos`` (B, N) (-1: no true cell, not
    counted), both indices on the reference's ``key_grid`` (h, w). A float64 (4,) tensor on their
    device: nothing waits for a GPU."""
    grid_h, grid_w = key_grid
    valid = pos >= 0
    true = pos.clamp_min(0)
    true_y, true_x = true // grid_w, true % grid_w
    distance = torch.maximum((best // grid_w - true_y).abs(), (best % grid_w - true_x).abs())
    # Cells of the 3 x 3 window around the true cell that lie on the grid.
    window = ((true_y + 1).clamp_max(grid_h - 1) - (true_y - 1).clamp_min(0) + 1) * (
        (true_x + 1).clamp_max(grid_w - 1) - (true_x - 1).clamp_min(0) + 1
    )
    counts = [(best == true) & valid, (distance <= 1) & valid, window.double() / (grid_h * grid_w) * valid, valid]
    return torch.stack([count.double().sum() for count in counts])


def correspondence_hits(query: torch.Tensor, key: torch.Tensor, pos: torch.Tensor, key_grid: tuple[int, int]) -> torch.Tensor:
    """``match_counts`` of the best-scoring keys of ``query`` (B, N, D) among ``key`` (B, M, D),
    on the reference's ``key_grid`` (h, w) with h * w = M, after checking ``pos`` (B, N)."""
    num_keys = key.shape[1]
    if num_keys != key_grid[0] * key_grid[1]:
        raise ValueError(f"key_grid {tuple(key_grid)} must have h * w = M = {num_keys} cells")
    if pos.shape != query.shape[:2]:
        raise ValueError(f"pos must have shape (B, N) = {tuple(query.shape[:2])}, got {tuple(pos.shape)}")
    if pos.numel() and not -1 <= int(pos.min()) <= int(pos.max()) < num_keys:
        raise ValueError(f"pos must hold key indices in [-1, {num_keys}), got values in [{int(pos.min())}, {int(pos.max())}]")
    return match_counts(best_keys(query, key), pos, key_grid)


def training_rows(query_grid: tuple[int, int]) -> torch.Tensor:
    """The sketch cells (row-major indices) that training scores on ``query_grid`` (h, w): all
    of them up to TRAINING_ROWS, else every s-th row and column from s // 2 on, s the smallest
    stride that keeps them within TRAINING_ROWS: spread over the whole grid, borders and centre
    alike (every s-th index of the row-major order would be s-th whole columns)."""
    height, width = query_grid
    stride = 1
    while len(range(stride // 2, height, stride)) * len(range(stride // 2, width, stride)) > TRAINING_ROWS:
        stride += 1
    rows = torch.arange(stride // 2, height, stride)
    columns = torch.arange(stride // 2, width, stride)
    return (rows[:, None] * width + columns[None, :]).flatten()


def within_one_rate(
    query: torch.Tensor, key: torch.Tensor, pos: torch.Tensor, query_grid: tuple[int, int], key_grid: tuple[int, int]
) -> torch.Tensor:
    """The share of the scored sketch cells (``training_rows`` of ``query_grid``) whose
    best-scoring key is within one cell of the true one on ``key_grid``; 0 if none has a true
    cell. Training's running view of ``correspondence_hits``, unchecked and without a wait for
    the GPU."""
    rows = training_rows(query_grid).to(query.device)
    _, within_one, _, cells = match_counts(best_keys(query.detach()[:, rows], key.detach()), pos[:, rows], key_grid)
    return within_one / cells.clamp_min(1)

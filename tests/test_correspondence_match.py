"""How often SCFT's best-scoring reference cell is the true one (sketchcolor.correspondence_match),
which eval reports and training logs; eval's image scores run in test_cli.py."""

import pytest
import torch

import sketchcolor.correspondence_match as match_module
from sketchcolor.correspondence_match import correspondence_hits, within_one_rate

GRID = (3, 4)  # h x w reference cells, M = 12


def _keys(batch: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    # Orthonormal rows: key j scores 1 against itself and 0 against every other key.
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=generator))
    return basis[: GRID[0] * GRID[1]].float().expand(batch, -1, -1)


def _queries_at(key: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Queries whose best-scoring key is ``cells`` (B, N)."""
    return torch.stack([k[c] for k, c in zip(key, cells)])


def test_queries_at_their_true_cells_all_hit():
    key = _keys(2)
    pos = torch.tensor([[0, 5, 11, 7], [3, 8, 1, 2]])
    exact, within_one, _, cells = correspondence_hits(_queries_at(key, pos), key, pos, GRID).tolist()
    assert (exact, within_one, cells) == (8, 8, 8)


def test_a_neighbouring_cell_is_within_one_and_two_cells_off_is_not():
    key = _keys(1)
    pos = torch.tensor([[5, 5, 5, 5]])  # cell (1, 1)
    # (0, 0) and (2, 2) are diagonal neighbours, (1, 3) is two columns away, (1, 1) itself.
    found = torch.tensor([[0, 10, 7, 5]])
    exact, within_one, _, cells = correspondence_hits(_queries_at(key, found), key, pos, GRID).tolist()
    assert (exact, within_one, cells) == (1, 3, 4)


def test_a_neighbour_across_a_row_end_is_not_within_one():
    # Cells 3 (0, 3) and 4 (1, 0) are adjacent indices but opposite ends of the grid.
    key = _keys(1)
    exact, within_one, _, _ = correspondence_hits(_queries_at(key, torch.tensor([[4]])), key, torch.tensor([[3]]), GRID).tolist()
    assert (exact, within_one) == (0, 0)


def test_cells_without_a_true_cell_are_not_counted():
    key = _keys(1)
    pos = torch.tensor([[-1, 6, -1]])
    exact, within_one, chance, cells = correspondence_hits(_queries_at(key, pos.clamp_min(0)), key, pos, GRID).tolist()
    assert (exact, within_one, cells) == (1, 1, 1) and chance == pytest.approx(9 / 12)


def test_chance_counts_the_window_cells_on_the_grid():
    # A corner's 3 x 3 window holds 4 grid cells, an edge's 6, an interior cell's 9.
    key = _keys(1)
    pos = torch.tensor([[0, 1, 5, 11]])
    _, _, chance, _ = correspondence_hits(_queries_at(key, pos), key, pos, GRID).tolist()
    assert chance == pytest.approx((4 + 6 + 9 + 4) / 12)


def test_ties_go_to_the_lowest_key_index():
    key = torch.zeros(1, 12, 2)
    key[0, 4] = key[0, 9] = torch.tensor([1.0, 0.0])
    query = torch.tensor([[[1.0, 0.0]]])
    assert correspondence_hits(query, key, torch.tensor([[4]]), GRID)[0] == 1
    assert correspondence_hits(query, key, torch.tensor([[9]]), GRID)[0] == 0


def test_the_search_in_row_chunks_agrees_with_one_pass(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    query, key = torch.randn(2, 37, 8, generator=generator), torch.randn(2, 12, 8, generator=generator)
    pos = torch.randint(-1, 12, (2, 37), generator=generator)
    whole = correspondence_hits(query, key, pos, GRID)
    monkeypatch.setattr(match_module, "SCORE_CHUNK_ELEMENTS", 2 * 12 * 5)  # 5 rows of each item at a time
    assert torch.equal(correspondence_hits(query, key, pos, GRID), whole)


def test_a_key_grid_that_does_not_cover_the_keys_is_an_error():
    key = _keys(1)
    with pytest.raises(ValueError, match=r"key_grid \(4, 4\) must have h \* w = M = 12 cells"):
        correspondence_hits(key[:, :2], key, torch.tensor([[0, 1]]), (4, 4))


def test_training_scores_evenly_spaced_rows_beyond_its_limit(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    query, key = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 12, 8, generator=generator)
    pos = torch.randint(0, 12, (2, 5), generator=generator)
    _, within_one, _, cells = correspondence_hits(query, key, pos, GRID)
    assert within_one_rate(query, key, pos, GRID) == within_one / cells
    monkeypatch.setattr(match_module, "TRAINING_ROWS", 2)  # rows 0 and 3 of each item
    _, within_one, _, cells = correspondence_hits(query[:, [0, 3]], key, pos[:, [0, 3]], GRID)
    assert cells == 4 and within_one_rate(query, key, pos, GRID) == within_one / cells


def test_training_rate_without_a_true_cell_is_zero():
    key = _keys(1)
    assert within_one_rate(key[:, :3], key, torch.full((1, 3), -1), GRID) == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"count": 0}, "count must be a positive int, got 0"), ({"samples": -1}, "samples must be a non-negative int, got -1")],
)
def test_evaluate_names_a_bad_argument(arguments, message, tmp_path):
    from sketchcolor.evaluate import evaluate

    with pytest.raises(ValueError, match=message):
        evaluate(tmp_path / "no-checkpoint-needed", **arguments)

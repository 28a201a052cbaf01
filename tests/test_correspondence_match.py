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


@pytest.mark.parametrize(("height", "width"), [(4, 4), (32, 32), (33, 31), (256, 256), (512, 64), (5, 700)])
def test_training_scores_a_lattice_spread_over_the_whole_grid(height, width):
    rows = match_module.training_rows((height, width))
    assert rows.unique().numel() == rows.numel() <= match_module.TRAINING_ROWS
    if height * width <= match_module.TRAINING_ROWS:
        assert torch.equal(rows, torch.arange(height * width))
        return
    rows_used, columns_used = (rows // width).unique(), (rows % width).unique()
    assert rows.numel() == rows_used.numel() * columns_used.numel()  # a lattice
    # Evenly spaced, the same along both axes (whole columns, say, would over-weigh a border), and no
    # border left out: every cell is within one spacing of a scored one.
    spacings = set()
    for used, side in ((rows_used, height), (columns_used, width)):
        spacing = int(used[1] - used[0]) if used.numel() > 1 else side
        assert (used.diff() == spacing).all() and used[0] < spacing and used[-1] >= side - spacing
        if used.numel() > 1:
            spacings.add(spacing)
    assert len(spacings) == 1
    assert rows.numel() > match_module.TRAINING_ROWS // 4  # and not many fewer cells than allowed


def test_training_rate_is_the_within_one_share_of_the_lattice(monkeypatch):
    monkeypatch.setattr(match_module, "TRAINING_ROWS", 4)  # a 4 x 5 grid: the cells (1, 1), (1, 3), (3, 1), (3, 3)
    generator = torch.Generator().manual_seed(2)
    query, key = torch.randn(2, 20, 8, generator=generator), torch.randn(2, 12, 8, generator=generator)
    pos = torch.randint(0, 12, (2, 20), generator=generator)
    rows = torch.tensor([6, 8, 16, 18])
    assert torch.equal(match_module.training_rows((4, 5)), rows)
    _, within_one, _, cells = correspondence_hits(query[:, rows], key, pos[:, rows], GRID)
    assert cells == 8 and within_one_rate(query, key, pos, (4, 5), GRID) == within_one / cells


def test_training_rate_without_a_true_cell_is_zero():
    key = _keys(1)
    assert within_one_rate(key[:, :3], key, torch.full((1, 3), -1), (1, 3), GRID) == 0


def test_chance_agrees_with_counting_the_window_cell_by_cell():
    height, width = 5, 7
    generator = torch.Generator().manual_seed(4)
    pos = torch.randint(-1, height * width, (3, 40), generator=generator)
    best = torch.randint(0, height * width, (3, 40), generator=generator)
    expected = torch.zeros(4, dtype=torch.float64)
    for true, chosen in zip(pos.flatten().tolist(), best.flatten().tolist()):
        if true < 0:
            continue
        ty, tx = divmod(true, width)
        cy, cx = divmod(chosen, width)
        window = sum(1 for y in range(height) for x in range(width) if max(abs(y - ty), abs(x - tx)) <= 1)
        expected += torch.tensor([chosen == true, max(abs(cy - ty), abs(cx - tx)) <= 1, window / (height * width), 1], dtype=torch.float64)
    torch.testing.assert_close(match_module.match_counts(best, pos, (height, width)), expected)


def test_scores_are_float32_under_bfloat16_autocast():
    # Two keys whose scores differ by less than bfloat16 resolves: bfloat16 scores would tie and
    # pick the first; float32 scores pick the second, the better one.
    key = torch.zeros(1, 12, 2)
    key[0, 0] = torch.tensor([1.0, 0.0])
    key[0, 1] = torch.tensor([1.001, 0.0])
    query = torch.tensor([[[1.0, 0.0]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert match_module.best_keys(query, key).tolist() == [[1]]
        assert match_module.best_keys(query.bfloat16(), key.bfloat16()).tolist() == [[0]]  # the inputs' own rounding stays


@pytest.mark.parametrize(
    ("pos", "message"),
    [
        (torch.tensor([[0, 12]]), r"pos must hold key indices in \[-1, 12\), got values in \[0, 12\]"),
        (torch.tensor([[0, -2]]), r"pos must hold key indices in \[-1, 12\), got values in \[-2, 0\]"),
        (torch.tensor([[0]]), r"pos must have shape \(B, N\) = \(1, 2\), got \(1, 1\)"),
    ],
)
def test_a_bad_pos_is_named(pos, message):
    key = _keys(1)
    with pytest.raises(ValueError, match=message):
        correspondence_hits(key[:, :2], key, pos, GRID)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"count": 0}, "count must be a positive int, got 0"), ({"samples": -1}, "samples must be a non-negative int, got -1")],
)
def test_evaluate_names_a_bad_argument(arguments, message, tmp_path):
    from sketchcolor.evaluate import evaluate

    with pytest.raises(ValueError, match=message):
        evaluate(tmp_path / "no-checkpoint-needed", **arguments)

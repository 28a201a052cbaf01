"""The TPS spatial transform and the correspondence it gives (sketchcolor.data.warp)."""

import pytest
import torch
import torch.nn.functional as F

from torch.utils.data import Dataset

from sketchcolor.data import ColorPerturbation, PairConfig, PairDataset, TPSParams, TPSWarp, cell_centers, fit_tps


pytestmark = pytest.mark.usefixtures("one_thread")


def coordinate_image(size: int) -> torch.Tensor:
    """A (2, size, size) image whose pixels hold their own normalized (x, y) centre."""
    return cell_centers(size, size).T.reshape(2, size, size)


def regular_grid(count: int) -> torch.Tensor:
    ticks = torch.linspace(-1, 1, count, dtype=torch.float64)
    ys, xs = torch.meshgrid(ticks, ticks, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def sample(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values (N, C) of an image (C, H, W) at normalized points (N, 2)."""
    grid = points.to(image.dtype)[None, :, None, :]
    return F.grid_sample(image[None], grid, align_corners=False, padding_mode="border")[0, :, :, 0].T


def test_cell_centers_are_row_major_like_flattened_feature_maps():
    height, width = 3, 5
    centers = cell_centers(height, width)
    feature = torch.arange(height * width).reshape(1, 1, height, width).float()
    tokens = feature.flatten(2).transpose(1, 2)[0, :, 0].long()
    for index in tokens.tolist():
        y, x = divmod(index, width)
        assert centers[index].tolist() == pytest.approx([(2 * x + 1) / width - 1, (2 * y + 1) / height - 1])


def test_fit_tps_interpolates_and_reproduces_affine_maps_exactly():
    generator = torch.Generator().manual_seed(1)
    points = torch.rand(12, 2, generator=generator, dtype=torch.float64) * 2 - 1
    matrix = torch.tensor([[1.1, 0.2], [-0.3, 0.9]], dtype=torch.float64)
    shift = torch.tensor([0.05, -0.1], dtype=torch.float64)
    warp = TPSWarp(points, points @ matrix.T + shift)
    elsewhere = torch.rand(50, 2, generator=generator, dtype=torch.float64) * 4 - 2
    torch.testing.assert_close(warp.source_coordinates(points), points @ matrix.T + shift)
    torch.testing.assert_close(warp.source_coordinates(elsewhere), elsewhere @ matrix.T + shift)
    kernel_weights, _ = fit_tps(points, points @ matrix.T + shift)
    assert kernel_weights.abs().max() < 1e-9


def test_shift_gives_exact_cells_and_minus_one_where_content_leaves():
    # Reference pixel r shows ground truth at r + (0.5, 0): content moves left by a quarter
    # of the side, which is 2 of 8 columns; rows (6 of them) are unchanged.
    grid = regular_grid(3)
    warp = TPSWarp(grid, grid + torch.tensor([0.5, 0.0], dtype=torch.float64))
    height, width = 6, 8
    pos = warp.correspondence(height, width)
    expected = [y * width + x - 2 if x >= 2 else -1 for y in range(height) for x in range(width)]
    assert pos.tolist() == expected
    # The image moves the same way: 32 pixels wide, the reference's pixel column c shows the
    # ground truth's c + 8, and the border is repeated past the right edge.
    image = torch.arange(32, dtype=torch.float32).expand(1, 24, -1)
    reference = warp.warp_image(image)
    assert reference[0, 0].tolist() == list(range(8, 32)) + [31] * 8


def test_vertical_shift_moves_rows_not_columns():
    grid = regular_grid(4)
    warp = TPSWarp(grid, grid + torch.tensor([0.0, -0.5], dtype=torch.float64))
    height, width = 4, 6
    pos = warp.correspondence(height, width).reshape(height, width)
    # Ground-truth row y lands on reference row y + 1; the last row leaves the image.
    assert pos[:-1].tolist() == (torch.arange(height * width).reshape(height, width)[1:]).tolist()
    assert (pos[-1] == -1).all()


def locate_in_reference(reference: torch.Tensor, targets: torch.Tensor):
    """Oracle from the rendered reference alone: where (in pixel coordinates, continuous) does
    each ground-truth location appear? ``reference`` (3, S, S) holds, per pixel, the
    ground-truth (x, y) it shows and 1 where that is inside the image.

    Returns (locations (N, 2) as (x, y) pixels, nearest (N, 2) int pixel, distance (N,) in
    ground-truth pixels from the target to what the nearest pixel shows); locations are NaN
    where the nearest pixel has no fully inside neighbours to refine with.
    """
    size = reference.shape[-1]
    shown = reference[:2].double()
    inside = reference[2] > 0.999
    distances = torch.cdist(targets, shown.reshape(2, -1).T).masked_fill(~inside.reshape(-1), float("inf"))
    distance, index = distances.min(dim=1)
    nearest = torch.stack([index % size, index // size], dim=1)
    locations = torch.full((len(targets), 2), float("nan"), dtype=torch.float64)
    for n, (x, y) in enumerate(nearest.tolist()):
        if not (0 < x < size - 1 and 0 < y < size - 1 and inside[y - 1 : y + 2, x - 1 : x + 2].all()):
            continue
        # One Newton step on the image: its finite-difference Jacobian (ground-truth units per
        # reference pixel) takes the nearest pixel to the sub-pixel location.
        jacobian = torch.stack(
            [(shown[:, y, x + 1] - shown[:, y, x - 1]) / 2, (shown[:, y + 1, x] - shown[:, y - 1, x]) / 2], dim=1
        )
        step = torch.linalg.solve(jacobian, targets[n] - shown[:, y, x])
        locations[n] = torch.tensor([x, y], dtype=torch.float64) + step
    return locations, nearest, distance * size / 2


@pytest.mark.parametrize("trial", range(24))
def test_correspondence_recovers_ground_truth_from_the_reference(trial):
    """The content of sketch cell i appears in the reference in cell pos[i], or nowhere if
    pos[i] = -1: checked against an oracle that only looks at the warped reference image.
    (About a third of these warps move some cell's content out of the image, so both kinds of
    answer are checked.)"""
    generator = torch.Generator().manual_seed(100 + trial)
    size, grid = [(48, 4), (64, 8), (96, 16), (128, 16), (48, 6), (64, 16), (96, 8), (128, 32)][trial % 8]
    control_grid = int(torch.randint(3, 6, (), generator=generator))
    # Up to 0.3 of the control spacing: strong warps that do not fold.
    relative = float(torch.empty(()).uniform_(0.1, 0.3, generator=generator))
    warp = TPSParams(control_grid=control_grid, displacement=relative / (control_grid - 1)).sample(generator)
    # Channels: the ground-truth (x, y) each pixel shows, and 1 where it shows the image at all
    # (zero padding elsewhere, so that pixels showing no ground truth can be left out).
    ground_truth = torch.cat([coordinate_image(size), torch.ones(1, size, size, dtype=torch.float64)]).float()
    reference = warp.warp_image(ground_truth, padding_mode="zeros")
    targets = cell_centers(grid, grid)
    pos = warp.correspondence(grid, grid)

    # Exact location: sampling the reference where the inverse sends g gives back g, to a
    # fraction of a pixel (bilinear interpolation), wherever the sample involves no padding.
    located, found = warp.reference_coordinates(targets)
    assert found.all()
    visible = (sample(reference[2:], located)[:, 0] > 0.999) & (located.abs() < 1 - 1 / size).all(dim=1)
    assert visible.sum() >= grid * grid // 2
    recovered = sample(reference[:2], located[visible])
    torch.testing.assert_close(recovered, targets[visible].float(), atol=0.25 * 2 / size, rtol=0)

    # Cell level, against the oracle.
    oracle_locations, nearest, shown_distance = locate_in_reference(reference, targets)
    cell_side = size // grid
    checked_inside = 0
    for cell in range(grid * grid):
        if shown_distance[cell] > 3:
            # No reference pixel shows this content (a visible one would be within a pixel or
            # two, the warp's stretch times half a pixel's diagonal): it left the image.
            assert int(pos[cell]) == -1, f"cell {cell}: pos {int(pos[cell])}, but its content is not in the reference"
            continue
        x, y = oracle_locations[cell].tolist()
        if x != x:  # NaN: at the image edge or next to padding, the oracle has no answer
            continue
        column, row = int((x + 0.5) // cell_side), int((y + 0.5) // cell_side)
        oracle = row * grid + column if 0 <= column < grid and 0 <= row < grid else -1
        # The refined oracle is good to a small fraction of a pixel; skip what it cannot decide.
        boundary_distance = min(abs(v - cell_side * round(v / cell_side)) for v in (x + 0.5, y + 0.5))
        if boundary_distance < 0.1:
            continue
        assert int(pos[cell]) == oracle, f"cell {cell}: pos {int(pos[cell])}, oracle {oracle}"
        checked_inside += oracle >= 0
    assert checked_inside >= grid * grid // 2


class CoordinateImages(Dataset):
    """Images whose pixels hold their own position: red = x, green = y (in [0, 1]), blue = 1."""

    def __init__(self, size: int, length: int) -> None:
        self.size, self.length = size, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        position = (coordinate_image(self.size) + 1) / 2
        return torch.cat([position, torch.ones(1, self.size, self.size, dtype=torch.float64)]).float()


@pytest.mark.parametrize(("size", "grid"), [(64, 8), (96, 16)])
def test_dataset_items_pos_matches_their_own_reference(size, grid):
    """Wiring: each item's pos comes from the same warp that made its reference."""
    config = PairConfig(
        size=size, feature_grid=grid, color=ColorPerturbation(gain=0, offset=0), warp=TPSParams(padding_mode="zeros")
    )
    dataset = PairDataset(CoordinateImages(size, 3), config, seed=11)
    targets = cell_centers(grid, grid)
    cell_side = size // grid
    for index in range(len(dataset)):
        item = dataset[index]
        # Back to the oracle's layout: ground-truth (x, y) in [-1, 1] per pixel, then validity.
        reference = (item["reference"] + 1) / 2
        reference = torch.cat([reference[:2] * 2 - 1, reference[2:]])
        oracle_locations, _, shown_distance = locate_in_reference(reference, targets)
        checked = 0
        for cell in range(grid * grid):
            x, y = oracle_locations[cell].tolist()
            if shown_distance[cell] > 0.75 or x != x:  # not clearly shown, or no oracle answer (NaN)
                continue
            if min(abs(v - cell_side * round(v / cell_side)) for v in (x + 0.5, y + 0.5)) < 0.1:
                continue
            assert int(item["pos"][cell]) == int((y + 0.5) // cell_side) * grid + int((x + 0.5) // cell_side)
            checked += 1
        assert checked >= grid * grid // 2


def test_the_oracle_rejects_the_forward_map():
    """Negative control: cells taken through F instead of its inverse fail the exact check,
    so the recovery test above can tell the two directions apart."""
    warp = TPSParams(displacement=0.1).sample(torch.Generator().manual_seed(3))
    size = 64
    reference = warp.warp_image(coordinate_image(size).float())
    targets = cell_centers(8, 8)
    located, _ = warp.reference_coordinates(targets)
    visible = (located.abs() < 1 - 1 / size).all(dim=1)
    torch.testing.assert_close(sample(reference, located[visible]), targets[visible].float(), atol=2e-3, rtol=0)
    wrong = warp.source_coordinates(targets)
    visible = (wrong.abs() < 1 - 1 / size).all(dim=1)
    error = (sample(reference, wrong[visible]) - targets[visible].float()).abs().max()
    assert error > 2e-2


def test_sampled_warps_are_reproducible_and_respect_the_displacement():
    params = TPSParams(control_grid=5, displacement=0.07)
    first = params.sample(torch.Generator().manual_seed(9))
    second = params.sample(torch.Generator().manual_seed(9))
    other = params.sample(torch.Generator().manual_seed(10))
    assert torch.equal(first.source_points, second.source_points)
    assert not torch.equal(first.source_points, other.source_points)
    torch.testing.assert_close(first.reference_points, regular_grid(5))
    offsets = (first.source_points - first.reference_points).abs()
    assert offsets.max() <= 2 * 0.07 and offsets.max() > 0.07


def test_a_folding_warp_gives_valid_cells_or_minus_one():
    grid = regular_grid(3)
    source = grid.clone()
    source[4] = torch.tensor([0.9, 0.9], dtype=torch.float64)  # the centre dragged past others
    warp = TPSWarp(grid, source)
    targets = cell_centers(16, 16)
    located, found = warp.reference_coordinates(targets)
    torch.testing.assert_close(warp.source_coordinates(located[found]), targets[found], atol=1e-6, rtol=0)
    pos = warp.correspondence(16, 16)
    assert ((pos >= -1) & (pos < 256)).all()


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"control_grid": 1}, "control_grid"),
        ({"control_grid": 3.0}, "control_grid"),
        ({"displacement": 0.5}, "displacement"),
        ({"control_grid": 6, "displacement": 0.11}, "displacement"),
        ({"displacement": -0.1}, "displacement"),
        ({"padding_mode": "wrap"}, "padding_mode"),
    ],
)
def test_bad_tps_params_name_the_argument(arguments, name):
    with pytest.raises(ValueError, match=name):
        TPSParams(**arguments)


def test_bad_warp_inputs_name_the_argument():
    grid = regular_grid(3)
    with pytest.raises(ValueError, match="reference_points"):
        TPSWarp(grid[:2], grid[:2])
    with pytest.raises(ValueError, match="same shape"):
        TPSWarp(grid, grid[:5])
    warp = TPSWarp(grid, grid)
    with pytest.raises(ValueError, match="padding_mode"):
        warp.warp_image(torch.zeros(3, 8, 8), padding_mode="wrap")
    with pytest.raises(ValueError, match="width"):
        warp.correspondence(4, 0)

"""The TPS spatial transform and the correspondence it gives (sketchcolor.data.warp)."""

import pytest
import torch
import torch.nn.functional as F

from sketchcolor.data import TPSParams, TPSWarp, cell_centers, fit_tps


@pytest.fixture(autouse=True)
def one_thread():
    # The machine's cores are shared; several OpenMP threads on small tensors only contend.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
    # The image moves the same way: the reference's column c shows the ground truth's c + 2.
    image = torch.arange(width, dtype=torch.float32).repeat_interleave(4).expand(1, 24, -1)
    reference = warp.warp_image(image)
    assert reference[0, 0, :24].tolist() == image[0, 0, 8:].tolist() + [image[0, 0, -1].item()] * 8


def test_vertical_shift_moves_rows_not_columns():
    grid = regular_grid(4)
    warp = TPSWarp(grid, grid + torch.tensor([0.0, -0.5], dtype=torch.float64))
    height, width = 4, 6
    pos = warp.correspondence(height, width).reshape(height, width)
    # Ground-truth row y lands on reference row y + 1; the last row leaves the image.
    assert pos[:-1].tolist() == (torch.arange(height * width).reshape(height, width)[1:]).tolist()
    assert (pos[-1] == -1).all()


@pytest.mark.parametrize("trial", range(8))
def test_correspondence_recovers_ground_truth_from_the_reference(trial):
    """The content of sketch cell i appears in the reference at cell pos[i]: checked against a
    brute-force oracle that only looks at the warped reference image."""
    generator = torch.Generator().manual_seed(100 + trial)
    size = [48, 64, 96, 128][trial % 4]
    grid = [4, 8, 16, 16][trial % 4] if trial < 4 else [6, 16, 8, 32][trial % 4]
    params = TPSParams(
        control_grid=int(torch.randint(3, 6, (), generator=generator)),
        displacement=float(torch.empty(()).uniform_(0.04, 0.12, generator=generator)),
    )
    warp = params.sample(generator)
    reference = warp.warp_image(coordinate_image(size).float())
    targets = cell_centers(grid, grid)
    pos = warp.correspondence(grid, grid)

    # Exact location: sampling the reference where the inverse sends g gives back g.
    located, found = warp.reference_coordinates(targets)
    assert found.all()
    visible = (located.abs() < 1 - 1 / size).all(dim=1)
    torch.testing.assert_close(sample(reference, located[visible]), targets[visible].float(), atol=2e-3, rtol=0)

    # Cell level, against the oracle: the reference pixel showing the ground-truth location
    # closest to the sketch cell's centre, found by brute force over the reference image.
    shown = reference.reshape(2, -1).T.double()  # ground-truth location shown by each pixel
    nearest = torch.cdist(targets, shown).argmin(dim=1)
    pixel_y, pixel_x = nearest // size, nearest % size
    cell_side = size // grid
    checked = 0
    for cell in range(grid * grid):
        y, x = int(pixel_y[cell]), int(pixel_x[cell])
        at_edge = min(x, y, size - 1 - x, size - 1 - y) < 2
        oracle = (y // cell_side) * grid + x // cell_side
        if at_edge:
            # The content is at or beyond the reference's edge: either answer is right.
            assert int(pos[cell]) in (-1, oracle)
            continue
        near_boundary = min(x % cell_side, y % cell_side, cell_side - 1 - x % cell_side, cell_side - 1 - y % cell_side) < 1
        if near_boundary:
            continue
        assert int(pos[cell]) == oracle, f"cell {cell}: pos {int(pos[cell])}, oracle {oracle}"
        checked += 1
    assert checked >= grid * grid // 3


def test_the_oracle_rejects_the_forward_map():
    """Negative control: cells taken through F instead of its inverse fail the exact check,
    so the recovery test above can tell the two directions apart."""
    warp = TPSParams(displacement=0.1).sample(torch.Generator().manual_seed(3))
    size = 64
    reference = warp.warp_image(coordinate_image(size).float())
    targets = cell_centers(8, 8)
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

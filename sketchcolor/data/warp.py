"""Spatial transform: a random thin-plate-spline warp and the exact correspondence it implies.

Coordinates are (x, y) in the normalized frame of ``grid_sample`` with
``align_corners=False``: -1 and 1 are the outer edges of the image, and pixel (or feature
cell) ``i`` of ``n`` has its centre at ``(2 i + 1) / n - 1``. That frame does not depend on
resolution, so one warp serves the image (S x S pixels) and any feature grid (h x w cells).

The warp is a backward map ``F``: reference location -> ground-truth location, which is what
image warping needs (each reference pixel samples the ground truth at ``F(pixel)``). The
correspondence needs the other direction (where does a ground-truth / sketch location land in
the reference?), so it inverts ``F`` numerically with Newton's method on the very same spline.
A spline fitted to the swapped control points is only an approximate inverse; it serves as the
starting guess.

kornia evaluates the splines (``warp_points_tps``, ``warp_image_tps``). The weights are fitted
here rather than by ``kornia.geometry.transform.get_tps_transform``, which places the radial
basis centres on the target points while interpolating at the source points: that
non-symmetric system, with a 4x4 control grid, folds about a third of the warps whose control
points move by 10% of the side, and at 20% moves interior points by up to an image width
(kornia PR #2690 reports such "erratic warping"). The standard thin-plate spline (centres on
the interpolated points) stays smooth there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kornia.geometry.transform import warp_image_tps, warp_points_tps

from .checks import check_int, check_real

PADDING_MODES = ("zeros", "border", "reflection")

# Newton stops once |F(r) - g| is below this (normalized units; a pixel of a 4096-wide image
# is 5e-4), and a location whose residual is still above it after the iterations (possible
# only where a strong warp folds) gets no correspondence.
_NEWTON_TOLERANCE = 1e-7
_NEWTON_ITERATIONS = 30


def fit_tps(points: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin-plate spline through ``f(points[i]) = targets[i]``, for points and targets (K, 2).

    Returns (kernel_weights (1, K, 2), affine_weights (1, 3, 2)) in kornia's layout: with
    ``kernel_centers = points[None]`` they are what ``warp_points_tps`` and ``warp_image_tps`` take.
    """
    count = points.shape[0]
    squared_distances = torch.cdist(points, points).square()
    # U(r) = r^2 log r, written as r^2 log(r^2) / 2 and taken as 0 at r = 0 (its limit).
    kernel = 0.5 * squared_distances * torch.log(torch.where(squared_distances > 0, squared_distances, 1.0))
    affine_basis = torch.cat([torch.ones(count, 1, dtype=points.dtype), points], dim=1)
    system = torch.zeros(count + 3, count + 3, dtype=points.dtype)
    system[:count, :count] = kernel
    system[:count, count:] = affine_basis
    system[count:, :count] = affine_basis.T
    right_side = torch.cat([targets, torch.zeros(3, 2, dtype=points.dtype)])
    weights = torch.linalg.solve(system, right_side)
    return weights[None, :count], weights[None, count:]


def cell_centers(height: int, width: int) -> torch.Tensor:
    """Centres of a (height, width) grid of cells as (x, y) points, shape (height * width, 2).

    Row-major: cell (y, x) is row ``y * width + x``, the order of
    ``feat.flatten(2).transpose(1, 2)`` for a (B, C, height, width) feature map.
    """
    ys = (2 * torch.arange(height, dtype=torch.float64) + 1) / height - 1
    xs = (2 * torch.arange(width, dtype=torch.float64) + 1) / width - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


class TPSWarp:
    """A thin-plate spline ``F`` mapping reference locations to ground-truth locations.

    ``F(reference_points[i]) = source_points[i]`` exactly, smooth in between (kornia's TPS).
    """

    def __init__(self, reference_points: torch.Tensor, source_points: torch.Tensor) -> None:
        """Fit the spline through control points given as (K, 2) tensors of (x, y), K >= 3."""
        for name, points in (("reference_points", reference_points), ("source_points", source_points)):
            if points.dim() != 2 or points.shape[1] != 2 or points.shape[0] < 3:
                raise ValueError(f"{name} must have shape (K, 2) with K >= 3, got {tuple(points.shape)}")
        if reference_points.shape != source_points.shape:
            raise ValueError(
                f"reference_points and source_points must have the same shape, got "
                f"{tuple(reference_points.shape)} and {tuple(source_points.shape)}"
            )
        self.reference_points = reference_points.detach().to(torch.float64)
        self.source_points = source_points.detach().to(torch.float64)
        self._forward = fit_tps(self.reference_points, self.source_points)
        self._approximate_inverse = fit_tps(self.source_points, self.reference_points)

    def source_coordinates(self, points: torch.Tensor) -> torch.Tensor:
        """``F``: reference locations (N, 2) -> the ground-truth locations they show (N, 2), float64."""
        kernel_weights, affine_weights = self._forward
        points = points.to(torch.float64)[None]
        return warp_points_tps(points, self.reference_points[None], kernel_weights, affine_weights)[0]

    def warp_image(self, image: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
        """The reference: ``out[p] = image[F(p)]`` (bilinear) for an image (C, H, W) or (B, C, H, W).

        ``padding_mode`` (``grid_sample``'s) fills reference pixels whose source lies outside.
        """
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if image.dim() not in (3, 4):
            raise ValueError(f"image must have shape (C, H, W) or (B, C, H, W), got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"image must be a float tensor, got dtype {image.dtype}")
        batch = image if image.dim() == 4 else image[None]
        count, dtype = batch.shape[0], batch.dtype
        # In the image's precision: in float32 the sampled positions agree with the float64 map
        # the correspondence inverts to about 1e-6 of the side, at half the cost.
        kernel_weights, affine_weights = (weights.to(dtype).expand(count, -1, -1) for weights in self._forward)
        warped = warp_image_tps(
            batch,
            self.reference_points.to(dtype)[None].expand(count, -1, -1),
            kernel_weights,
            affine_weights,
            align_corners=False,
            padding_mode=padding_mode,
        )
        return warped if image.dim() == 4 else warped[0]

    def reference_coordinates(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``F^-1``: ground-truth locations (N, 2) -> reference locations showing them (N, 2), float64.

        Returns the locations and a bool mask (N,) of those found; a location is not found only
        where the warp folds so strongly that Newton's method does not converge.
        """
        targets = points.to(torch.float64)
        kernel_weights, affine_weights = self._approximate_inverse
        guess = warp_points_tps(targets[None], self.source_points[None], kernel_weights, affine_weights)[0]
        for _ in range(_NEWTON_ITERATIONS):
            residual = self.source_coordinates(guess) - targets
            active = residual.norm(dim=1) >= _NEWTON_TOLERANCE  # NaN compares False: given up
            if not active.any():
                break
            guess[active] -= self._newton_step(guess[active], residual[active])
        found = (self.source_coordinates(guess) - targets).norm(dim=1) < _NEWTON_TOLERANCE
        return guess, found

    def _newton_step(self, points: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # The Jacobian by central differences (no autograd, so this also runs under no_grad and
        # inference_mode); their ~1e-10 error only slows convergence, which is judged on the
        # exact residual.
        delta = 1e-6
        columns = []
        for axis in range(2):
            offset = torch.zeros(2, dtype=torch.float64)
            offset[axis] = delta
            difference = self.source_coordinates(points + offset) - self.source_coordinates(points - offset)
            columns.append(difference / (2 * delta))
        (a, c), (b, d) = columns[0].unbind(1), columns[1].unbind(1)  # jacobian [[a, b], [c, d]]
        # 2x2 inverse by its adjugate; where the Jacobian is singular (a fold) the point stays
        # where it is and ends up not found, instead of an error from a batched solve.
        determinant = a * d - b * c
        usable = determinant.abs() > 1e-12
        safe = torch.where(usable, determinant, 1.0)
        adjugate_times_residual = [d * residual[:, 0] - b * residual[:, 1], a * residual[:, 1] - c * residual[:, 0]]
        step = torch.stack(adjugate_times_residual, dim=1) / safe[:, None]
        return torch.where(usable[:, None], step, 0.0)

    def correspondence(self, height: int, width: int) -> torch.Tensor:
        """For each cell of a (height, width) grid on the ground truth (= sketch), the cell of the
        same grid on the reference that its centre's content lands in.

        Returns ``pos`` (height * width,) int64, row-major (cell (y, x) -> y * width + x), with
        -1 where the content lands outside the reference.
        """
        check_int("height", height, 1)
        check_int("width", width, 1)
        located, found = self.reference_coordinates(cell_centers(height, width))
        column = torch.floor((located[:, 0] + 1) / 2 * width).long()
        row = torch.floor((located[:, 1] + 1) / 2 * height).long()
        inside = found & (column >= 0) & (column < width) & (row >= 0) & (row < height)
        return torch.where(inside, row * width + column, torch.full_like(row, -1))


@dataclass(frozen=True)
class TPSParams:
    """How random TPS warps are drawn: control points on a regular grid, each displaced at random."""

    control_grid: int = 4
    """Control points per side, on a regular grid spanning the image, corners included (>= 2)."""
    displacement: float = 0.1
    """Each control point moves by up to this fraction of the image side along x and along y.
    Must stay below half the control points' spacing, 0.5 / (control_grid - 1), so neighbours
    cannot cross; up to about 0.3 / (control_grid - 1) the warp does not fold."""
    padding_mode: str = "border"
    """How reference pixels whose source lies outside the image are filled (grid_sample's modes)."""

    def __post_init__(self) -> None:
        check_int("control_grid", self.control_grid, 2)
        limit = 0.5 / (self.control_grid - 1)
        check_real(
            "displacement",
            self.displacement,
            f"a fraction of the image side in [0, {limit:.4g}) (half the spacing of a "
            f"{self.control_grid}x{self.control_grid} control grid)",
            lambda value: 0 <= value < limit,
        )
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")

    def sample(self, generator: torch.Generator) -> TPSWarp:
        """A random warp: the reference pixel at regular control point i shows the ground truth at
        that point plus a random offset."""
        ticks = torch.linspace(-1, 1, self.control_grid, dtype=torch.float64)
        grid_y, grid_x = torch.meshgrid(ticks, ticks, indexing="ij")
        grid = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)
        # A fraction f of the side is 2 f in normalized units.
        offsets = (torch.rand(grid.shape, generator=generator, dtype=torch.float64) * 2 - 1) * 2 * self.displacement
        return TPSWarp(grid, grid + offsets)

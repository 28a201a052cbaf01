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
non-symmetric system folds the image at displacements of 10% of the side and overshoots by
whole image widths at 15-20% (kornia PR #2690 reports the same "erratic warping"). The
standard thin-plate spline (centres on the interpolated points) stays smooth there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kornia.geometry.transform import warp_image_tps, warp_points_tps

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
        return warp_points_tps(points.to(torch.float64)[None], self.reference_points[None], kernel_weights, affine_weights)[0]

    def warp_image(self, image: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
        """The reference: ``out[p] = image[F(p)]`` (bilinear) for an image (C, H, W) or (B, C, H, W).

        ``padding_mode`` (``grid_sample``'s) fills reference pixels whose source lies outside.
        """
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if image.dim() not in (3, 4):
            raise ValueError(f"image must have shape (C, H, W) or (B, C, H, W), got {tuple(image.shape)}")
        batch = image if image.dim() == 4 else image[None]
        kernel_weights, affine_weights = self._forward
        count = batch.shape[0]
        # Warp in float64 so the image follows exactly the map the correspondence inverts.
        warped = warp_image_tps(
            batch.to(torch.float64),
            self.reference_points[None].expand(count, -1, -1),
            kernel_weights.expand(count, -1, -1),
            affine_weights.expand(count, -1, -1),
            align_corners=False,
            padding_mode=padding_mode,
        ).to(image.dtype)
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
            mapped, jacobian = self._value_and_jacobian(guess)
            residual = mapped - targets
            if residual.norm(dim=1).max() < _NEWTON_TOLERANCE:
                break
            # 2x2 inverse by its adjugate; where the Jacobian is singular (a fold) the point stays
            # where it is and ends up not found, instead of an error from a batched solve.
            (a, b), (c, d) = jacobian[:, 0].unbind(1), jacobian[:, 1].unbind(1)
            determinant = a * d - b * c
            usable = determinant.abs() > 1e-12
            safe = torch.where(usable, determinant, 1.0)
            step_x = (d * residual[:, 0] - b * residual[:, 1]) / safe
            step_y = (a * residual[:, 1] - c * residual[:, 0]) / safe
            step = torch.stack([step_x, step_y], dim=1)
            guess = guess - torch.where(usable[:, None], step, 0.0)
        found = (self.source_coordinates(guess) - targets).norm(dim=1) < _NEWTON_TOLERANCE
        return guess, found

    def _value_and_jacobian(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # F acts on each point separately, so the gradient of sum_n F_i(x_n) with respect to
        # x_n is row i of point n's Jacobian: two backward passes give all N Jacobians.
        with torch.enable_grad():
            leaf = points.detach().requires_grad_(True)
            mapped = self.source_coordinates(leaf)
            rows = [torch.autograd.grad(mapped[:, i].sum(), leaf, retain_graph=i == 0)[0] for i in range(2)]
        return mapped.detach(), torch.stack(rows, dim=1)

    def correspondence(self, height: int, width: int) -> torch.Tensor:
        """For each cell of a (height, width) grid on the ground truth (= sketch), the cell of the
        same grid on the reference that its centre's content lands in.

        Returns ``pos`` (height * width,) int64, row-major (cell (y, x) -> y * width + x), with
        -1 where the content lands outside the reference.
        """
        for name, value in (("height", height), ("width", width)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
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
    """Each control point moves by up to this fraction of the image side along x and along y."""
    padding_mode: str = "border"
    """How reference pixels whose source lies outside the image are filled (grid_sample's modes)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.control_grid, int) and self.control_grid >= 2):
            raise ValueError(f"control_grid must be an int >= 2, got {self.control_grid!r}")
        if not (isinstance(self.displacement, (int, float)) and 0 <= self.displacement < 0.5):
            raise ValueError(f"displacement must be a fraction of the image side in [0, 0.5), got {self.displacement!r}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")

    def sample(self, generator: torch.Generator) -> TPSWarp:
        """A random warp: the reference shows the control grid, displaced, of the ground truth."""
        ticks = torch.linspace(-1, 1, self.control_grid, dtype=torch.float64)
        grid_y, grid_x = torch.meshgrid(ticks, ticks, indexing="ij")
        grid = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)
        # A fraction f of the side is 2 f in normalized units.
        offsets = (torch.rand(grid.shape, generator=generator, dtype=torch.float64) * 2 - 1) * 2 * self.displacement
        return TPSWarp(grid, grid + offsets)

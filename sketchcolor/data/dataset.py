"""Training pairs by augmented-self reference: one colour image -> sketch, reference, ground truth
and the feature-grid correspondence between sketch and reference (DESIGN.md, "Data")."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .checks import check_int
from .color import ColorPerturbation
from .folder import ImageFolder
from .procedural import ProceduralShapes
from .warp import TPSParams
from .xdog import MAX_PARAMETER, MIN_SIGMA, XDoGParams, xdog

# Length of the procedural dataset when none is asked for: an epoch of a few hundred steps
# at batch 16; the images themselves are unlimited (any index renders).
DEFAULT_PROCEDURAL_LENGTH = 10_000


@dataclass(frozen=True)
class PairConfig:
    """Sizes and augmentation ranges of the training pairs."""

    size: int = 256
    """Side of the square sketch, reference and ground truth, in pixels."""
    feature_grid: int = 16
    """Cells per side of the feature grid that ``pos`` indexes (size / 16 in the paper; size / 8
    and size / 4 for high-resolution training); must divide ``size``."""
    sketch: XDoGParams = field(default_factory=XDoGParams)
    """XDoG parameters of the sketch; its sigma is replaced per item by one from sketch_sigma_range."""
    sketch_sigma_range: tuple[float, float] = (0.3, 0.5)
    """Range of the XDoG sigma drawn per item, so the model sees varied line widths."""
    color: ColorPerturbation = field(default_factory=ColorPerturbation)
    """Appearance transform from the image to the ground truth."""
    warp: TPSParams = field(default_factory=TPSParams)
    """Spatial transform from the ground truth to the reference."""

    def __post_init__(self) -> None:
        check_int("size", self.size, 8)
        check_int("feature_grid", self.feature_grid, 1)
        if self.size % self.feature_grid:
            raise ValueError(
                f"feature_grid must divide size (the grid is the model's feature map of size / stride), "
                f"got feature_grid={self.feature_grid} and size={self.size}"
            )
        sigmas = self.sketch_sigma_range
        is_pair = isinstance(sigmas, tuple) and len(sigmas) == 2 and all(isinstance(s, numbers.Real) for s in sigmas)
        # XDoGParams' bounds on sigma, so that every sigma drawn from the range is one it takes.
        if not (is_pair and MIN_SIGMA <= sigmas[0] <= sigmas[1] <= MAX_PARAMETER):
            raise ValueError(
                f"sketch_sigma_range must be a tuple (low, high) with {MIN_SIGMA:g} <= low <= high <= {MAX_PARAMETER:.2g}, "
                f"got {sigmas!r}"
            )
        for name, kind in (("sketch", XDoGParams), ("color", ColorPerturbation), ("warp", TPSParams)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random stream of one item: a function of (seed, epoch, index) only, so an item is the
    same whatever the number of DataLoader workers or the order items are asked in."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class PairDataset(Dataset):
    """Training items from any dataset of RGB images (float tensors (3, H, W) in [0, 1] with
    ``min(H, W) >= config.size``).

    Item ``i`` is a dict of float32 tensors in [-1, 1]: ``"sketch"`` (1, S, S), ``"reference"``
    (3, S, S), ``"ground_truth"`` (3, S, S), and ``"pos"`` (g * g,) int64 with ``g =
    config.feature_grid``: for sketch cell (y, x) (row ``y * g + x``, the order of
    ``feat.flatten(2).transpose(1, 2)``) the reference cell its content lands in, -1 outside.

    It uses image ``i % len(images)`` (``length`` may exceed the number of images: each repeat
    gets its own augmentation) and is a function of (seed, epoch, i) only. ``set_epoch``
    changes every augmentation; the images of the sources here do not depend on the epoch.
    """

    def __init__(
        self, images: Dataset, config: PairConfig = PairConfig(), seed: int = 0, length: int | None = None
    ) -> None:
        if not isinstance(config, PairConfig):
            raise ValueError(f"config must be a PairConfig, got {type(config).__name__}")
        check_int("seed", seed, 0)
        if len(images) == 0:
            raise ValueError("images must not be empty")
        if length is not None:
            check_int("length", length, 1)
        self.images, self.config, self.seed = images, config, seed
        self.length = len(images) if length is None else length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw new augmentations for every item (call before each epoch; with DataLoader workers
        this takes effect for workers started afterwards, i.e. without ``persistent_workers``)."""
        check_int("epoch", epoch, 0)
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        generator = item_generator(self.seed, self.epoch, index)
        image = self._square_crop(self.images[index % len(self.images)], generator)
        low, high = self.config.sketch_sigma_range
        sigma = low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))
        sketch = xdog(image, replace(self.config.sketch, sigma=sigma))
        ground_truth = self.config.color(image, generator)
        warp = self.config.warp.sample(generator)
        reference = warp.warp_image(ground_truth, self.config.warp.padding_mode)
        grid = self.config.feature_grid
        return {
            "sketch": sketch * 2 - 1,
            "reference": reference * 2 - 1,
            "ground_truth": ground_truth * 2 - 1,
            "pos": warp.correspondence(grid, grid),
        }

    def _square_crop(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        size = self.config.size
        if image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) < size:
            raise ValueError(f"images must give (3, H, W) tensors with H, W >= {size}, got {tuple(image.shape)}")
        top = int(torch.randint(image.shape[1] - size + 1, (), generator=generator))
        left = int(torch.randint(image.shape[2] - size + 1, (), generator=generator))
        return image[:, top : top + size, left : left + size].float()


def make_dataset(
    data_dir: str | Path | None, size: int = 256, feature_grid: int = 16, seed: int = 0, length: int | None = None
) -> PairDataset:
    """Training pairs from the images under ``data_dir``, or from the built-in procedural shapes
    when ``data_dir`` is None (``length`` images, DEFAULT_PROCEDURAL_LENGTH by default).

    ``length`` for a folder is the number of items per epoch (default: one per image; more
    repeats images with fresh augmentations).
    """
    config = PairConfig(size=size, feature_grid=feature_grid)
    if data_dir is None:
        images = ProceduralShapes(size, DEFAULT_PROCEDURAL_LENGTH if length is None else length, seed)
    else:
        images = ImageFolder(data_dir, size)
    return PairDataset(images, config, seed=seed, length=length)

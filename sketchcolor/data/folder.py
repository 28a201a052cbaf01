"""Any folder of images as training images."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .checks import check_int
from .images import UnreadableImageError, load_rgb_image, pil_to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class UnreadableImageWarning(UserWarning):
    """A file in the image folder could not be decoded and is skipped."""


class ImageFolder(Dataset):
    """Every PNG/JPG/WebP file under ``root`` (recursively, sorted by path), scaled so that its
    shorter side is ``size``: float tensors (3, H, W) in [0, 1] with ``min(H, W) == size``.

    A file that cannot be decoded is skipped with one ``UnreadableImageWarning`` naming it
    (per process), and the next readable file in order is returned in its place, so an epoch
    never stops on a bad file; when no file can be read, ValueError names the folder.
    """

    def __init__(self, root: str | Path, size: int) -> None:
        check_int("size", size, 8)
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"the data folder {str(self.root)!r} is not a directory")
        self.paths = sorted(
            path for path in self.root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        )
        if not self.paths:
            raise ValueError(
                f"the data folder {str(self.root)!r} contains no images: "
                f"looked for {', '.join(IMAGE_SUFFIXES)} files, recursively"
            )
        self.size = size
        self._unreadable: set[Path] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} images")
        for step in range(len(self.paths)):
            path = self.paths[(index + step) % len(self.paths)]
            if path in self._unreadable:
                continue
            try:
                image = load_rgb_image(path)
            except UnreadableImageError as error:
                self._unreadable.add(path)
                warnings.warn(f"skipping unreadable image {path}: {error.reason}", UnreadableImageWarning, stacklevel=2)
                continue
            return pil_to_tensor(self._scale(image))
        # ValueError: bad input, which the command line reports as an error naming the folder.
        raise ValueError(
            f"the data folder {str(self.root)!r}: none of its {len(self.paths)} image files could be read "
            "(each was skipped with a warning naming it)"
        )

    def _scale(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        factor = self.size / min(width, height)
        target = (max(self.size, round(width * factor)), max(self.size, round(height * factor)))
        return image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)

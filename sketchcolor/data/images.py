"""Reading any image file as RGB, and converting between Pillow images and tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# Errors Pillow raises for files that are not images, are truncated or corrupt, or are too
# large to decode safely. Anything else is a bug and should propagate.
_PILLOW_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableImageError(ValueError):
    """An image file could not be decoded. A ValueError (bad input, which the command line
    reports as an error), whatever Pillow raised: ``reason`` says what that was."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read the image {str(path)!r}: {reason}")
        self.path, self.reason = Path(path), reason


def load_rgb_image(path: str | Path) -> Image.Image:
    """Decode an image file fully and return it as 8-bit RGB.

    Grayscale and palette images are expanded to RGB; transparent images (an alpha channel, or
    a transparent colour key such as PNG's tRNS chunk on gray, RGB, 16-bit or palette images)
    are composited over white, since line art is usually drawn on transparent or white paper;
    16-bit images are scaled to 8 bits; EXIF orientation is applied. Raises
    UnreadableImageError when the file cannot be decoded.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except _PILLOW_DECODE_ERRORS as error:
        raise UnreadableImageError(path, str(error) or type(error).__name__) from error
    transparent_key = image.info.get("transparency")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 32-bit and 16-bit integer grayscale: Pillow's convert("RGB") would clip at 255.
        values = np.asarray(image, dtype=np.float64)
        scaled = Image.fromarray(np.clip(values / 257.0, 0, 255).round().astype(np.uint8), "L")
        if transparent_key is not None:
            # The key is a 16-bit value: compare it before scaling, which merges 257 values into one.
            scaled.putalpha(Image.fromarray(np.where(values == transparent_key, 0, 255).astype(np.uint8), "L"))
        image = scaled
    elif transparent_key is not None:
        # Pillow turns the colour key of 1, L, RGB and P images into an alpha channel.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit Pillow image -> float32 tensor (C, H, W) in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """Float tensor (1, H, W) or (3, H, W) in [0, 1] -> 8-bit Pillow image (L or RGB)."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (1, H, W) or (3, H, W), got {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if array.shape[0] == 1:
        return Image.fromarray(array[0], "L")
    return Image.fromarray(array.transpose(1, 2, 0), "RGB")

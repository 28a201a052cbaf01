"""Appearance transform: random colour perturbation that turns an image into the ground truth.

Lee et al. perturb each RGB channel with its own random noise so the model cannot learn one
fixed colour per object and has to take colours from the reference. Here each channel gets a
random gain and offset; a random hue rotation and saturation change (kornia.enhance) can be
added for photographs, whose colours vary less than synthetic ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kornia.enhance import adjust_hue, adjust_saturation

from .checks import check_real


def _uniform(low: float, high: float, generator: torch.Generator, shape: tuple[int, ...] = ()) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


@dataclass(frozen=True)
class ColorPerturbation:
    """Ranges of the random appearance transform; every draw comes from the caller's generator."""

    gain: float = 0.2
    """Each channel is multiplied by a factor drawn from [1 - gain, 1 + gain]."""
    offset: float = 0.2
    """Then each channel gets an offset drawn from [-offset, offset] (intensities in [0, 1])."""
    hue: float = 0.0
    """Hue rotation drawn from [-hue, hue], in turns of the colour wheel (0.5 = opposite hue); 0 is off."""
    saturation: float = 0.0
    """Saturation factor drawn from [1 - saturation, 1 + saturation]; 0 is off."""

    def __post_init__(self) -> None:
        check_real("gain", self.gain, "a number in [0, 1]", lambda value: 0 <= value <= 1)
        check_real("offset", self.offset, "a number in [0, 1]", lambda value: 0 <= value <= 1)
        check_real("hue", self.hue, "a number of turns in [0, 0.5]", lambda value: 0 <= value <= 0.5)
        check_real("saturation", self.saturation, "a number in [0, 1]", lambda value: 0 <= value <= 1)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Perturb an RGB image (3, H, W) in [0, 1]; the result is clamped to [0, 1]."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
        gains = _uniform(1 - self.gain, 1 + self.gain, generator, (3, 1, 1)).to(image.dtype)
        offsets = _uniform(-self.offset, self.offset, generator, (3, 1, 1)).to(image.dtype)
        # Draw every number even when a range is zero, so the generator's stream (and with it
        # every later augmentation of the item) does not depend on which options are on.
        hue_turns = float(_uniform(-self.hue, self.hue, generator))
        saturation = float(_uniform(1 - self.saturation, 1 + self.saturation, generator))
        result = (image * gains + offsets).clamp(0, 1)
        if self.hue > 0:
            result = adjust_hue(result, 2 * math.pi * hue_turns)
        if self.saturation > 0:
            result = adjust_saturation(result, saturation).clamp(0, 1)
        return result

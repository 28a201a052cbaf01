"""Sketch extraction with the eXtended Difference of Gaussians (XDoG, Winnemoeller et al. 2012).

The sharpened image ``S = (1 + p) G_sigma(I) - p G_{k sigma}(I)`` of the luminance ``I`` is
soft-thresholded: ``T = 1`` where ``S >= epsilon``, else ``1 + tanh(phi (S - epsilon))``. The
defaults (sigma in [0.3, 0.5], k = 4.5, p = 19, epsilon = 0.01, hard threshold) are the ones
public re-implementations of Lee et al. use to turn illustrations into line art: thin dark
lines at every luminance edge, white on flat areas (flat areas darker than epsilon, such as
solid black fills, stay black).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from kornia.color import rgb_to_grayscale
from kornia.filters import gaussian_blur2d

from ..output_paths import check_not_an_input, check_output_image
from .checks import check_real
from .images import load_rgb_image, pil_to_tensor, tensor_to_pil

# The largest value of any parameter. The filter computes in float32: a parameter beyond its range
# becomes inf there (p = inf makes the sharpened image inf - inf = NaN, a sketch saved silently
# as black).
MAX_PARAMETER = torch.finfo(torch.float32).max
# The smallest sigma: kornia needs a sigma that is positive in float32 (1e-320 rounds to 0), and a
# Gaussian narrower than about 0.1 pixel already leaves every pixel as it is (its neighbours'
# weights underflow), so no sigma below this bound would draw anything different.
MIN_SIGMA = 1e-3
# The outer Gaussian's radius (4 sigma k pixels) may reach this far past the image, or as far as
# the image's longer side. The blur pads the image by its radius on every side, so an unbounded
# one asked for terabytes (sigma 1e12) or overflowed (1e30); a blur that much wider than the
# image averages it into one tone and draws nothing anyway.
MIN_RADIUS_LIMIT = 64


@dataclass(frozen=True)
class XDoGParams:
    """XDoG parameters; intensities are in [0, 1] and sigma is in pixels. Each is a finite float32
    value (at most about 3.4e38 in magnitude)."""

    sigma: float = 0.4
    """Standard deviation of the inner Gaussian (line width); 0.3 to 0.5 suits line art."""
    k: float = 4.5
    """Ratio of the outer Gaussian's sigma to the inner one's (> 1)."""
    p: float = 19.0
    """Sharpening strength: weight of the difference of Gaussians (>= 0)."""
    epsilon: float = 0.01
    """Threshold on the sharpened image below which a pixel is drawn dark."""
    phi: float = 1e9
    """Steepness of the soft threshold; very large gives binary lines."""

    def __post_init__(self) -> None:
        # NaN fails every comparison, and inf the upper bound.
        largest = f"{MAX_PARAMETER:.2g} (float32's largest)"
        check_real("sigma", self.sigma, f"a number of pixels from {MIN_SIGMA:g} to {largest}", lambda value: MIN_SIGMA <= value <= MAX_PARAMETER)
        check_real("k", self.k, f"a number greater than 1 and at most {largest}", lambda value: 1 < value <= MAX_PARAMETER)
        check_real("p", self.p, f"a number from 0 to {largest}", lambda value: 0 <= value <= MAX_PARAMETER)
        check_real("epsilon", self.epsilon, f"a number from -{MAX_PARAMETER:.2g} to {largest}", lambda value: abs(value) <= MAX_PARAMETER)
        check_real("phi", self.phi, f"a positive number at most {largest}", lambda value: 0 < value <= MAX_PARAMETER)


def _gaussian(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(4 * sigma))
    # 'replicate' so the image border itself is not drawn as an edge.
    return gaussian_blur2d(image, 2 * radius + 1, (sigma, sigma), border_type="replicate")


def xdog(image: torch.Tensor, params: XDoGParams = XDoGParams()) -> torch.Tensor:
    """Line drawing of an image.

    Args:
        image: float tensor (3, H, W) RGB or (1, H, W) gray in [0, 1], or a batch (B, C, H, W).
        params: XDoG parameters.

    Returns:
        float tensor (1, H, W) (or (B, 1, H, W)) in [0, 1]: lines dark (0), paper white (1).
    """
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or image.shape[-3] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a tensor (C, H, W) or (B, C, H, W) with C = 1 or 3, got {shape}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a float tensor in [0, 1], got dtype {image.dtype}")
    limit = max(MIN_RADIUS_LIMIT, *image.shape[-2:])
    if 4 * params.sigma * params.k > limit:
        raise ValueError(
            f"sigma * k = {params.sigma * params.k:.4g} pixels (the outer Gaussian) is too wide for a {image.shape[-1]}x{image.shape[-2]} "
            f"image: its radius 4 * sigma * k must be at most max({MIN_RADIUS_LIMIT}, the image's longer side) = {limit} pixels"
        )
    batch = image if image.dim() == 4 else image.unsqueeze(0)
    gray = rgb_to_grayscale(batch) if batch.shape[1] == 3 else batch
    sharpened = (1 + params.p) * _gaussian(gray, params.sigma) - params.p * _gaussian(gray, params.sigma * params.k)
    lines = 1 + torch.tanh(params.phi * (sharpened - params.epsilon))
    sketch = torch.where(sharpened >= params.epsilon, torch.ones_like(sharpened), lines).clamp(0, 1)
    return sketch if image.dim() == 4 else sketch.squeeze(0)


def extract_sketch_file(in_path: str | Path, out_path: str | Path, **xdog_params: float) -> None:
    """Read any image file, extract its XDoG line drawing and write it as an 8-bit gray image.

    ``xdog_params`` are ``XDoGParams`` fields (sigma, k, p, epsilon, phi). The output format
    follows ``out_path``'s suffix (PNG recommended).
    """
    check_output_image("out", out_path, mode="L")
    check_not_an_input("out", out_path, {"image": in_path})
    params = XDoGParams(**xdog_params)
    sketch = xdog(pil_to_tensor(load_rgb_image(in_path)), params)
    tensor_to_pil(sketch).save(out_path)

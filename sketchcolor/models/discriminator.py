"""Conditional PatchGAN discriminator with spectral norm."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from .config import ModelConfig
from .layers import NEGATIVE_SLOPE

# Channels stop doubling at this multiple of disc_width, as in pix2pix's PatchGAN.
_MAX_WIDTH_MULTIPLE = 8
_KERNEL, _PADDING = 4, 1


def _conv_strides(config: ModelConfig) -> tuple[int, ...]:
    """Strides of the discriminator's convs in order: ``disc_layers`` of 2, then two of 1 (the
    last of them the 1-channel output)."""
    return (2,) * config.disc_layers + (1, 1)


def min_input_side(config: ModelConfig) -> int:
    """The smallest image side the discriminator takes: every conv's padded input must be at
    least its kernel, so from a 1x1 score map back through the convs, each needs an input of
    (output - 1) * stride + kernel - 2 * padding."""
    side = 1
    for stride in reversed(_conv_strides(config)):
        side = (side - 1) * stride + _KERNEL - 2 * _PADDING
    return side


class PatchDiscriminator(nn.Module):
    """Scores overlapping patches of (sketch, image) pairs: 4x4 convs, ``disc_layers`` of stride 2
    then one of stride 1 and a 1-channel output, spectral norm on every conv, no other norm.
    Conditioning on the sketch (channel concatenation) makes it judge whether the colors fit
    the drawing, not only whether they look real."""

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        layers, in_channels = [], 1 + 3
        *hidden_strides, output_stride = _conv_strides(config)
        for index, stride in enumerate(hidden_strides):
            out_channels = config.disc_width * min(2**index, _MAX_WIDTH_MULTIPLE)
            layers += [spectral_norm(nn.Conv2d(in_channels, out_channels, _KERNEL, stride, _PADDING)), nn.LeakyReLU(NEGATIVE_SLOPE)]
            in_channels = out_channels
        layers.append(spectral_norm(nn.Conv2d(in_channels, 1, _KERNEL, output_stride, _PADDING)))
        self.net = nn.Sequential(*layers)

    def forward(self, sketch: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """sketch (B, 1, H, W), image (B, 3, H, W) -> patch scores (B, 1, h, w), unbounded."""
        if sketch.shape[0] != image.shape[0] or sketch.shape[-2:] != image.shape[-2:] or sketch.shape[1] != 1 or image.shape[1] != 3:
            raise ValueError(
                f"sketch (B, 1, H, W) and image (B, 3, H, W) must agree in B, H and W, got {tuple(sketch.shape)} and {tuple(image.shape)}"
            )
        return self.net(torch.cat([sketch, image], dim=1))

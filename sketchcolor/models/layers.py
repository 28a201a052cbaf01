"""The conv block every generator part is built from."""

from __future__ import annotations

from torch import nn

# LeakyReLU slope used throughout, as in pix2pix-style generators and PatchGAN.
NEGATIVE_SLOPE = 0.2


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv -> batch norm -> LeakyReLU; stride 2 halves the side."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        # In place: batch norm's backward does not need its output, so autograd keeps one
        # tensor per block instead of two.
        nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
    )

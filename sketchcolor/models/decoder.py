"""The U-Net decoder: from the SCFT grid back to the image, with skips from the sketch encoder."""

from __future__ import annotations

import torch
from torch import nn

from .config import ENCODER_LAYER_STRIDES, ModelConfig
from .layers import conv_block


class UpBlock(nn.Module):
    """Conv to fewer channels, double the side, concatenate the skip at the new resolution, conv.

    Reducing the channels before upsampling, not after, keeps the first block from making a
    4x larger copy of the D-channel features (260 MB per 512x512 image at SCFT 1/4, D = 992)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce = conv_block(in_channels, out_channels)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.merge = conv_block(out_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([self.upsample(self.reduce(x)), skip], dim=1))


class UNetDecoder(nn.Module):
    """One up-block per halving between the SCFT grid (1/scft_stride) and the image; each takes
    as skip the sketch encoder's last activation at its resolution and has that many channels.
    Sketch activations at or below the SCFT resolution are already inside the SCFT features."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Index of the last encoder layer at each stride finer than the SCFT grid, coarse to fine.
        last_layer_at = {stride: index for index, stride in enumerate(ENCODER_LAYER_STRIDES)}
        strides = [stride for stride in sorted(last_layer_at, reverse=True) if stride < config.scft_stride]
        self.skip_layers = [last_layer_at[stride] for stride in strides]
        blocks, in_channels = [], config.feature_dim
        for index in self.skip_layers:
            channels = config.encoder_channels[index]
            blocks.append(UpBlock(in_channels, channels, channels))
            in_channels = channels
        self.blocks = nn.ModuleList(blocks)
        self.to_rgb = nn.Conv2d(in_channels, 3, 3, padding=1)

    def forward(self, features: torch.Tensor, sketch_activations: list[torch.Tensor]) -> torch.Tensor:
        """features (B, C, h, w) on the SCFT grid -> RGB (B, 3, H, W) in [-1, 1]."""
        x = features
        for block, index in zip(self.blocks, self.skip_layers):
            x = block(x, sketch_activations[index])
        return torch.tanh(self.to_rgb(x))

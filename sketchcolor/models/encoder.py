"""Es and Er: 10 conv layers whose activations, resized to one grid and concatenated, are the
features SCFT attends over (D = 992 channels at the paper's width)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ENCODER_LAYER_STRIDES, SIZE_MULTIPLE, ModelConfig
from .layers import conv_block


@dataclass
class EncoderOutput:
    features: torch.Tensor
    """(B, D, H / scft_stride, W / scft_stride): every layer's activation on the SCFT grid."""
    activations: list[torch.Tensor]
    """The 10 layers' activations at their own resolution (the decoder's skips)."""


class FeatureEncoder(nn.Module):
    """The paper's encoder: 16,16,32,32,64,64,128,128,256,256 channels (at width 16), stride 2 at
    layers 3, 5, 7 and 9.

    The paper average-pools every activation to the last layer's size (1/16 of the input side).
    Here the target is 1/scft_stride of the input side: activations finer than it are
    average-pooled, coarser ones are upsampled bilinearly, so the feature dimension D stays the
    same at every SCFT resolution.
    """

    def __init__(self, in_channels: int, config: ModelConfig) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.scft_stride = config.scft_stride
        layers, previous_channels, previous_stride = [], in_channels, 1
        for channels, stride in zip(config.encoder_channels, ENCODER_LAYER_STRIDES):
            layers.append(conv_block(previous_channels, channels, stride // previous_stride))
            previous_channels, previous_stride = channels, stride
        self.layers = nn.ModuleList(layers)

    def forward(self, image: torch.Tensor, name: str = "image") -> EncoderOutput:
        """Encode ``image`` (B, C, H, W) with H and W multiples of 16; ``name`` is used in errors."""
        if image.dim() != 4 or image.shape[1] != self.in_channels or image.shape[2] % SIZE_MULTIPLE or image.shape[3] % SIZE_MULTIPLE:
            raise ValueError(
                f"{name} must have shape (B, {self.in_channels}, H, W) with H and W multiples of {SIZE_MULTIPLE}, "
                f"got {tuple(image.shape)}"
            )
        height, width = image.shape[-2:]
        grid = (height // self.scft_stride, width // self.scft_stride)
        activations, resized = [], []
        x = image
        for layer, stride in zip(self.layers, ENCODER_LAYER_STRIDES):
            x = layer(x)
            activations.append(x)
            if stride < self.scft_stride:
                resized.append(F.avg_pool2d(x, self.scft_stride // stride))
            elif stride > self.scft_stride:
                resized.append(F.interpolate(x, size=grid, mode="bilinear", align_corners=False))
            else:
                resized.append(x)
        return EncoderOutput(torch.cat(resized, dim=1), activations)

"""The colorization generator: encoders Es and Er, SCFT, residual blocks, U-Net decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .decoder import UNetDecoder
from .encoder import FeatureEncoder
from .layers import NEGATIVE_SLOPE
from .scft import SCFT


class ResidualBlock(nn.Module):
    """x + conv-BN-LeakyReLU-conv-BN(x), at constant channels and resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@dataclass
class GeneratorOutput:
    image: torch.Tensor
    """(B, 3, H, W) colorized sketch in [-1, 1]."""
    query: torch.Tensor
    """SCFT's Q (B, N, D) over the sketch grid, for the correspondence loss."""
    key: torch.Tensor
    """SCFT's K (B, M, D) over the reference grid, for the correspondence loss."""


class Generator(nn.Module):
    """Colors a sketch (B, 1, H, W) like a reference (B, 3, H', W'), both in [-1, 1], with sides
    multiples of 16 (the reference may differ in size from the sketch)."""

    def __init__(self, config: ModelConfig = ModelConfig(), attn_impl: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.sketch_encoder = FeatureEncoder(1, config)
        self.reference_encoder = FeatureEncoder(3, config)
        self.scft = SCFT(config.feature_dim, attn_impl)
        self.residual_blocks = nn.Sequential(*(ResidualBlock(config.feature_dim) for _ in range(config.residual_blocks)))
        self.decoder = UNetDecoder(config)

    @property
    def attn_impl(self) -> str:
        return self.scft.attn_impl

    def forward(self, sketch: torch.Tensor, reference: torch.Tensor) -> GeneratorOutput:
        if sketch.shape[0] != reference.shape[0]:
            raise ValueError(f"sketch and reference must have the same batch size, got {sketch.shape[0]} and {reference.shape[0]}")
        sketch_encoding = self.sketch_encoder(sketch, "sketch")
        reference_encoding = self.reference_encoder(reference, "reference")
        transfer = self.scft(sketch_encoding.features, reference_encoding.features)
        image = self.decoder(self.residual_blocks(transfer.features), sketch_encoding.activations)
        return GeneratorOutput(image, transfer.query, transfer.key)

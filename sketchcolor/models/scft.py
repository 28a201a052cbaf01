"""SCFT, the spatially corresponding feature transfer: every sketch feature position attends
over all reference feature positions and adds what it finds to itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops


@dataclass
class SCFTOutput:
    features: torch.Tensor
    """c = vs + attention, as a map (B, D, h, w) on the sketch's feature grid."""
    query: torch.Tensor
    """Q = Wq vs (B, h * w, D), row-major over the sketch grid (row y * w + x)."""
    key: torch.Tensor
    """K = Wk vr (B, h' * w', D), row-major over the reference grid: the correspondence loss
    scores exactly the Q and K the attention used."""


def to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H * W, C), position y * W + x. A plain reshape to (B, H * W, C)
    without moving the channel axis would mix channels and positions (a known bug of public
    re-implementations)."""
    return feature_map.flatten(2).transpose(1, 2)


class SCFT(nn.Module):
    """Q = Wq vs, K = Wk vr, V = Wv vr (linear D -> D); c = vs + softmax(Q K^T / sqrt(D)) V.

    The attention runs through ``sketchcolor.ops.scft_attention`` with backend ``attn_impl``
    ("auto", "reference", "cpp", "triton" or "cuda"), which applies the 1/sqrt(D) scale to the
    scores before the softmax and never materializes the (h w) x (h' w') matrix in the fused
    backends.
    """

    def __init__(self, dim: int, attn_impl: str = "auto") -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        # No key bias: it would add q_i . b to every score of row i, which neither the softmax nor
        # the triplet loss (differences of scores) sees, so its gradient is zero up to rounding and
        # Adam would turn that rounding noise into full-size steps.
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim)
        self.attn_impl = attn_impl

    def forward(self, sketch_features: torch.Tensor, reference_features: torch.Tensor) -> SCFTOutput:
        """sketch_features (B, D, h, w) = vs, reference_features (B, D, h', w') = vr."""
        batch, dim, height, width = sketch_features.shape
        sketch_tokens = to_tokens(sketch_features)
        reference_tokens = to_tokens(reference_features)
        query = self.query(sketch_tokens)
        key = self.key(reference_tokens)
        value = self.value(reference_tokens)
        attended = ops.scft_attention(query, key, value, impl=self.attn_impl)
        context = sketch_tokens + attended
        features = context.transpose(1, 2).reshape(batch, dim, height, width)
        return SCFTOutput(features, query, key)

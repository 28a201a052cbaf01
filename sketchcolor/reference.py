"""Pure-PyTorch definitions of sketchcolor's ops: their meaning and the tests' oracle.

Everything here materializes the full (N, M) score matrix, so it is simple, differentiable
by autograd, works in float64, and costs O(N*M) memory. The fast backends in
``sketchcolor.ops`` must agree with these functions.
"""
from __future__ import annotations

import math

import torch


def default_scale(head_dim: int) -> float:
    """The attention temperature 1/sqrt(D) used when ``scale`` is None."""
    return 1.0 / math.sqrt(head_dim)


def attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """S = scale * q k^T over the last two axes: (..., N, D), (..., M, D) -> (..., N, M)."""
    if scale is None:
        scale = default_scale(q.shape[-1])
    return torch.matmul(q, k.transpose(-1, -2)) * scale


def scft_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
    upcast: bool = False,
):
    """SCFT cross-attention: out_i = sum_j softmax_j(scale * q_i . k_j) v_j.

    q (..., N, D), k (..., M, D), v (..., M, Dv) -> out (..., N, Dv) in q's dtype, and with
    ``return_lse`` also lse (..., N) = logsumexp_j S[i, j], float32 (float64 for float64 q).
    The scale is applied to the scores before the softmax (a known bug of some public
    re-implementations is the other order). ``upcast`` computes in float64 and casts back,
    which is how tests measure a low-precision backend against the exact answer.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    scores = attention_scores(q, k, scale)
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()  # softmax statistics in fp32, as every fused backend keeps them
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype)
    out = torch.matmul(probs, v).to(dtype)
    if not return_lse:
        return out
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return out, lse.to(lse_dtype)

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


def correspondence_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None = None,
    mode: str = "triplet",
    margin: float = 12.0,
    scale: float | None = None,
    hardest: bool = False,
    key_grid: tuple[int, int] | None = None,
    exclusion: int = 1,
) -> torch.Tensor:
    """Correspondence loss on S = scale * q k^T: the scalar mean over valid terms.

    q (..., N, D), k (..., M, D) with leading dims (B,) or (B, H); pos (B, N) or (..., N)
    int64: the key that query i truly corresponds to, -1 for none. Index tensors without the
    head axis are shared by every head.
    - mode="triplet", neg (..., N, T): terms max(0, S[i, neg_it] - S[i, pos_i] + margin) over
      (i, t) with pos_i >= 0 and neg_it >= 0 (-1 in neg means "no negative").
    - mode="triplet", hardest=True: one term per i, the negative being the first (lowest index)
      argmax of S[i, j] over keys j whose cell on key_grid=(h, w) (key j at (j // w, j % w)) is
      more than ``exclusion`` cells from pos_i's in Chebyshev distance; an i with no such key
      has no term. A NaN score ranks above every number (as in torch.argmax), so NaN inputs
      give a NaN loss in every mode, never a silently finite one.
    - mode="nll": terms logsumexp_j S[i, j] - S[i, pos_i] over i with pos_i >= 0.
    No valid term gives 0 (with zero gradients). Scores of bf16/fp16 inputs are rounded to the
    input dtype by the matmul and then evaluated in float32, so the loss is float32 for
    fp32/bf16/fp16 inputs and float64 for float64 inputs.
    """
    scores = attention_scores(q, k, scale)  # (..., N, M)
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    rows = scores.shape[:-1]
    pos = broadcast_heads(pos, rows)
    valid = pos >= 0  # (..., N)
    pos = pos.clamp_min(0)
    pos_scores = scores.gather(-1, pos.unsqueeze(-1))  # (..., N, 1)
    if mode == "nll":
        terms = torch.logsumexp(scores, dim=-1) - pos_scores.squeeze(-1)
        return _masked_mean(terms, valid)
    if mode != "triplet":
        raise ValueError(f"mode must be 'triplet' or 'nll', got {mode!r}")
    if hardest:
        grid_width = key_grid[1]
        keys = torch.arange(scores.shape[-1], device=scores.device)
        row_distance = (pos.unsqueeze(-1) // grid_width - keys // grid_width).abs()
        col_distance = (pos.unsqueeze(-1) % grid_width - keys % grid_width).abs()
        candidate = torch.maximum(row_distance, col_distance) > exclusion  # (..., N, M)
        # torch.argmax returns the first maximal index: ties go to the lowest key index.
        neg = scores.masked_fill(~candidate, -math.inf).argmax(dim=-1, keepdim=True)  # (..., N, 1)
        valid = (valid & candidate.any(dim=-1)).unsqueeze(-1)
    else:
        neg = broadcast_heads(neg, (*rows, neg.shape[-1]))
        valid = valid.unsqueeze(-1) & (neg >= 0)
        neg = neg.clamp_min(0)
    terms = torch.relu(scores.gather(-1, neg) - pos_scores + margin)  # (..., N, T)
    return _masked_mean(terms, valid)


def broadcast_heads(index: torch.Tensor, shape: torch.Size | tuple) -> torch.Tensor:
    """``index`` as ``shape`` = (B, [H,] N[, T]): one without the head axis, (B, N[, T]), is
    repeated for every head (a view); one of the full shape is returned as is."""
    if index.dim() == len(shape) - 1:
        index = index.unsqueeze(1)
    return index.expand(shape)


def _masked_mean(terms: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # where() rather than multiplication, so that masked terms pass no gradient at all.
    total = torch.where(valid, terms, torch.zeros_like(terms)).sum()
    return total / valid.sum().clamp_min(1).to(terms.dtype)

"""torch.library ops backed by the Triton correspondence-loss kernels (sketchcolor.kernels).

Importing this module defines, over (B, rows, D) tensors of any strides,
    torch.ops.sketchcolor.corr_triplet_fwd_triton(q, k, pos, neg, scale, margin) -> terms
    torch.ops.sketchcolor.corr_triplet_bwd_triton(grad_terms, q, k, pos, neg, terms, scale) -> (grad_q, grad_k)
    torch.ops.sketchcolor.corr_hardest_fwd_triton(q, k, pos, grid_h, grid_w, exclusion, scale, margin) -> (terms, neg)
    torch.ops.sketchcolor.corr_nll_loss_triton(q, k, pos, scale, with_grad) -> (loss, grad_q, grad_k)
with the schemas and meaning of the C++ ops (csrc/op_schemas.h); sketchcolor.ops.correspondence_loss
registers their autograd and is the public entry.

They are registered exactly as the Triton attention ops are (see _triton_attention): as
torch.library.triton_op, whose body launches through wrap_triton, so torch.compile sees the
kernels; and under TRITON_INTERPRET=1 as torch.library.custom_op with the body as the kernel
and the body with launches skipped as the fake kernel (interpreted kernels read tensor data,
which the functional/fake tensors of tracing do not have).
"""
from __future__ import annotations

import torch
from torch.library import custom_op, triton_op, wrap_triton

from sketchcolor.kernels import correspondence_loss as _kernels

from ._triton_attention import _direct, _skip_launch


def _triplet_fwd_body(launch):
    def corr_triplet_fwd_triton(
        q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: float, margin: float
    ) -> torch.Tensor:
        return _kernels.triplet_forward(q, k, pos, neg, scale, margin, launch=launch)

    return corr_triplet_fwd_triton


def _triplet_bwd_body(launch):
    def corr_triplet_bwd_triton(
        grad_terms: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        pos: torch.Tensor,
        neg: torch.Tensor,
        terms: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _kernels.triplet_backward(grad_terms, q, k, pos, neg, terms, scale, launch=launch)

    return corr_triplet_bwd_triton


def _hardest_fwd_body(launch):
    def corr_hardest_fwd_triton(
        q: torch.Tensor,
        k: torch.Tensor,
        pos: torch.Tensor,
        grid_h: int,
        grid_w: int,
        exclusion: int,
        scale: float,
        margin: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _kernels.hardest_forward(q, k, pos, grid_h, grid_w, exclusion, scale, margin, launch=launch)

    return corr_hardest_fwd_triton


def _nll_loss_body(launch):
    def corr_nll_loss_triton(
        q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, scale: float, with_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _kernels.nll_loss(q, k, pos, scale, with_grad, launch=launch)

    return corr_nll_loss_triton


_BODIES = {
    "corr_triplet_fwd_triton": _triplet_fwd_body,
    "corr_triplet_bwd_triton": _triplet_bwd_body,
    "corr_hardest_fwd_triton": _hardest_fwd_body,
    "corr_nll_loss_triton": _nll_loss_body,
}

for _name, _body in _BODIES.items():
    if _kernels.INTERPRETING:
        custom_op(f"sketchcolor::{_name}", _body(_direct), mutates_args=()).register_fake(_body(_skip_launch))
    else:
        triton_op(f"sketchcolor::{_name}", _body(wrap_triton), mutates_args=())

"""correspondence_loss: the public op, its checks, backend dispatch and autograd.

The fused backends expose these ops over (B, N, D) queries and (B, M, D) keys (a head axis is
folded into B here), with pos (B, N) int64:
    sketchcolor::corr_triplet_fwd(q, k, pos, neg, scale, margin) -> terms (B, N, T)
    sketchcolor::corr_triplet_bwd(grad_terms, q, k, pos, neg, terms, scale) -> (grad_q, grad_k)
    sketchcolor::corr_hardest_fwd(q, k, pos, grid_h, grid_w, exclusion, scale, margin)
        -> (terms (B, N), neg (B, N) int64, -1 for none); its backward is corr_triplet_bwd, T = 1
    sketchcolor::corr_nll_loss(q, k, pos, scale, with_grad) -> (loss (), grad_q, grad_k float32)
(C++ schemas in csrc/op_schemas.h, with cpp and cuda kernels; triton registers the same ops with a
``_triton`` suffix).
Triplet terms that are not valid are 0 and pass no gradient, so the triplet loss is the sum of
the terms divided by the number of valid terms, and autograd hands the backward op a gradient
per term. The nll op returns the mean itself and, when autograd will need it (``with_grad``),
its gradient from the same pass over the score tiles, which its backward scales (see
csrc/correspondence_loss/correspondence_loss_cpu.cpp, nll_loss_kernel, for why). Losses are
float32 (float64 for float64 inputs). Memory is O(B*N*T) or O(B*N), never O(N*M).
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from .. import reference
from . import _backends
from ._checks import (
    FLOAT_DTYPES,
    check_dim,
    check_index_values,
    check_number,
    check_same,
    check_tensor,
    resolve_scale,
    type_name,
)
from .scft_attention import lse_dtype

MODES = ("triplet", "nll")
# The op whose kernels decide whether a backend can run this loss (all four are registered together).
FWD_OP = "corr_nll_loss"


def correspondence_loss(
    q,
    k,
    pos,
    *,
    neg=None,
    mode: str = "triplet",
    margin: float = 12.0,
    scale=None,
    hardest: bool = False,
    key_grid=None,
    exclusion: int = 1,
    impl: str = "auto",
):
    """The correspondence loss on S = scale * q k^T without an N x M matrix; a scalar.

    Args:
        q: (B, N, D) or (B, H, N, D) queries (sketch features).
        k: (B, M, D) or (B, H, M, D) keys (reference features).
        pos: (B, N) int64 (or (B, H, N) with a head axis): the key that query i truly
            corresponds to, -1 where it has none. Without a head axis it is shared by all heads.
        neg: (B, N, T) (or (B, H, N, T)) int64 sampled negatives, required for
            mode="triplet" without ``hardest`` and not allowed otherwise. -1 means "no
            negative": that (i, t) term is left out of the mean.
        mode: "triplet": mean over valid (i, t) of max(0, S[i, neg_it] - S[i, pos_i] + margin);
            "nll": mean over valid i of logsumexp_j S[i, j] - S[i, pos_i] (``margin`` unused).
        margin: the triplet margin (finite).
        scale: multiplies q . k; default 1/sqrt(D).
        hardest: triplet with one negative per query, the hardest one: the lowest-index
            argmax of S[i, j] over the keys whose cell on ``key_grid`` is more than
            ``exclusion`` cells from pos_i's (Chebyshev distance). A query with no such key
            (the window covers the grid) is left out of the mean, like pos_i = -1.
        key_grid: (h, w) with h * w = M, key j at cell (j // w, j % w); required with
            ``hardest`` and not allowed otherwise.
        exclusion: the half-width of the excluded window, an int >= 0 (0 excludes only pos_i).
        impl: "auto", "reference", "cpp", "triton" or "cuda" (see sketchcolor.ops._backends).

    Returns the mean over all valid terms of the whole batch (and every head): float32 for
    float32/bfloat16/float16 inputs, float64 for float64 inputs. No valid term gives 0 with
    zero gradients. Gradients flow to q and k.
    """
    check_tensor("q", q, (3, 4), FLOAT_DTYPES)
    check_tensor("k", k, (q.dim(),))
    check_same("k", k, "q", q)
    if k.shape[:-2] != q.shape[:-2]:
        lead = "(B, H)" if q.dim() == 4 else "(B,)"
        raise ValueError(f"k: leading dims {lead} must match q's {tuple(q.shape[:-2])}, got {tuple(k.shape[:-2])}")
    check_dim("k", k.shape[-1], q.shape[-1], "head dim D (last axis) must equal q's and")
    if k.shape[-2] == 0:
        raise ValueError("k: M must be at least 1, got 0")
    if q.shape[-1] == 0:
        raise ValueError("q: D must be at least 1, got 0")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(hardest, bool):
        raise TypeError(f"hardest must be a bool, got {type_name(hardest)}")
    if hardest and mode != "triplet":
        raise ValueError(f"hardest=True is a triplet option; it is not allowed with mode={mode!r}")
    margin = check_number("margin", margin)
    scale = resolve_scale(scale, q.shape[-1])
    if isinstance(exclusion, bool) or not isinstance(exclusion, numbers.Integral) or exclusion < 0:
        raise ValueError(f"exclusion must be an int >= 0, got {exclusion!r} ({type_name(exclusion)})")
    exclusion = int(exclusion)
    num_keys = k.shape[-2]
    _check_index("pos", pos, q, num_keys, trailing_dims=0)
    sampled = mode == "triplet" and not hardest
    if sampled:
        if neg is None:
            raise ValueError("neg is required for mode='triplet' without hardest: (B, N, T) int64 sampled negatives")
        _check_index("neg", neg, q, num_keys, trailing_dims=1)
    elif neg is not None:
        raise ValueError(f"neg is only used by mode='triplet' without hardest; pass neg=None for mode={mode!r}, hardest={hardest}")
    if hardest:
        key_grid = _check_key_grid(key_grid, num_keys)
        # A window of half-width max(h, w) already covers the grid: wider ones mean the same, and
        # this keeps the value within the kernels' int64 (and the reference's tensor arithmetic).
        exclusion = min(exclusion, max(key_grid))
    elif key_grid is not None:
        raise ValueError("key_grid is only used with hardest=True; pass key_grid=None")
    backend = _backends.resolve(impl, q.device, FWD_OP, q.dtype)

    if backend == "reference":
        # The fused backends score float16 and bfloat16 q and k in float32; so does this path (the
        # reference itself rounds each score to the input dtype), so that impl changes no meaning.
        if q.dtype in (torch.float16, torch.bfloat16):
            q, k = q.float(), k.float()
        with _backends.without_autocast(q.device):
            return reference.correspondence_loss(
                q, k, pos, neg, mode=mode, margin=margin, scale=scale, hardest=hardest, key_grid=key_grid, exclusion=exclusion
            )

    # Fold a head axis into the batch; index tensors without one are shared by every head.
    rows = q.shape[:-1]  # (B, [H,] N)
    batch = math.prod(rows[:-1])  # B * H
    pos = reference.broadcast_heads(pos, rows).reshape(batch, rows[-1])
    if sampled:
        neg = reference.broadcast_heads(neg, (*rows, neg.shape[-1])).reshape(batch, rows[-1], neg.shape[-1])
    q, k = q.reshape(batch, *q.shape[-2:]), k.reshape(batch, *k.shape[-2:])
    ops = _fused_ops(backend)
    if mode == "nll":
        with_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        loss, _grad_q, _grad_k = ops.nll_loss(q, k, pos, scale, with_grad)
        return loss
    if hardest:
        terms, hardest_neg = ops.hardest_fwd(q, k, pos, key_grid[0], key_grid[1], exclusion, scale, margin)
        count = (hardest_neg >= 0).sum()
    else:
        terms = ops.triplet_fwd(q, k, pos, neg, scale, margin)
        count = ((pos >= 0).unsqueeze(-1) & (neg >= 0)).sum()
    # Terms that are not valid are 0: the sum over all terms is the sum over the valid ones.
    return terms.sum() / count.clamp_min(1).to(terms.dtype)


def _check_index(name: str, index, q: torch.Tensor, num_keys: int, trailing_dims: int) -> None:
    """int64 (B, [H,] N, *trailing) on q's device, or (B, N, *trailing) shared by the heads, in [-1, M)."""
    with_heads, shared = tuple(q.shape[:-1]), (q.shape[0], q.shape[-2])
    check_tensor(name, index, tuple(sorted({len(with_heads) + trailing_dims, len(shared) + trailing_dims})), (torch.int64,))
    if index.device != q.device:
        raise ValueError(f"{name} is on {index.device} but q is on {q.device}; all inputs must be on one device")
    lead = tuple(index.shape[: index.dim() - trailing_dims])
    if lead not in (with_heads, shared):
        expected = " or ".join(str(s) for s in dict.fromkeys((with_heads, shared)))
        raise ValueError(f"{name}: leading dims (B, [H,] N) must be {expected} to match q, got {tuple(index.shape)}")
    check_index_values(name, index, num_keys)


def _check_key_grid(key_grid, num_keys: int) -> tuple[int, int]:
    expected = f"a pair of positive ints (h, w) with h * w == M = {num_keys}"
    if key_grid is None:
        raise ValueError(f"key_grid is required with hardest=True: {expected}")
    if (
        not isinstance(key_grid, (tuple, list))
        or len(key_grid) != 2
        or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in key_grid)
        # In Python ints: a product of NumPy int64s can wrap around to M.
        or int(key_grid[0]) * int(key_grid[1]) != num_keys
    ):
        raise ValueError(f"key_grid must be {expected}, got {key_grid!r}")
    return int(key_grid[0]), int(key_grid[1])


@dataclasses.dataclass(frozen=True)
class _ForwardOps:
    """The forward ops of one fused backend, with autograd registered."""

    triplet_fwd: object
    hardest_fwd: object
    nll_loss: object


# "extension" (cpp and cuda: kernels of one set of ops) or "triton" -> its forward ops with
# autograd registered. A plain dict so that torch.compile traces a lookup, not the one-time
# registration (which dynamo refuses to trace).
_FORWARD_OPS: dict[str, _ForwardOps] = {}


def _fused_ops(backend: str) -> _ForwardOps:
    """The forward ops of a fused backend, registering their fake kernels and autograd once."""
    key = "triton" if backend == "triton" else "extension"
    ops = _FORWARD_OPS.get(key)
    if ops is None:
        if key == "extension":
            _register_cpp_fakes()
            ops = _register_autograd("")
        else:
            from . import _triton_correspondence  # noqa: F401  (defines the triton ops and their fakes)

            ops = _register_autograd("_triton")
        _FORWARD_OPS[key] = ops
    return ops


def _register_cpp_fakes(library: str = "sketchcolor") -> None:
    """Shape-only kernels of the C++ ops of ``library``, for torch.compile and opcheck."""

    @torch.library.register_fake(f"{library}::corr_triplet_fwd")
    def _triplet_fwd_fake(q, k, pos, neg, scale, margin):
        return q.new_empty(neg.shape, dtype=lse_dtype(q.dtype))

    @torch.library.register_fake(f"{library}::corr_hardest_fwd")
    def _hardest_fwd_fake(q, k, pos, grid_h, grid_w, exclusion, scale, margin):
        return q.new_empty(pos.shape, dtype=lse_dtype(q.dtype)), pos.new_empty(pos.shape)

    @torch.library.register_fake(f"{library}::corr_nll_loss")
    def _nll_loss_fake(q, k, pos, scale, with_grad):
        stat_dtype = lse_dtype(q.dtype)
        if not with_grad:
            return q.new_empty((), dtype=stat_dtype), q.new_empty((0,), dtype=stat_dtype), q.new_empty((0,), dtype=stat_dtype)
        return q.new_empty((), dtype=stat_dtype), q.new_empty(q.shape, dtype=stat_dtype), k.new_empty(k.shape, dtype=stat_dtype)

    @torch.library.register_fake(f"{library}::corr_triplet_bwd")
    def _triplet_bwd_fake(grad_terms, q, k, pos, neg, terms, scale):
        # The kernels return contiguous gradients whatever the inputs' strides.
        return q.new_empty(q.shape), k.new_empty(k.shape)


def _qk_grads(ctx, compute):
    """(grad_q, grad_k) from compute(), None where q or k needs no gradient; no call if neither does."""
    needs_q, needs_k = ctx.needs_input_grad[:2]
    if not (needs_q or needs_k):
        return None, None
    grad_q, grad_k = compute()
    return (grad_q if needs_q else None), (grad_k if needs_k else None)


def _register_autograd(suffix: str, library: str = "sketchcolor") -> _ForwardOps:
    """Hand-written backward of the ops ``corr_*_fwd{suffix}`` and ``corr_nll_loss{suffix}`` of
    ``library`` (the CUDA emulator's tests register its copy, sketchcolor_emulated)."""
    ops = getattr(torch.ops, library)
    triplet_bwd = getattr(ops, f"corr_triplet_bwd{suffix}")

    def triplet_setup(ctx, inputs, output):
        q, k, pos, neg, scale, _margin = inputs
        ctx.save_for_backward(q, k, pos, neg, output)
        ctx.scale = scale

    def triplet_backward(ctx, grad_terms):
        q, k, pos, neg, terms = ctx.saved_tensors
        grads = _qk_grads(ctx, lambda: triplet_bwd(grad_terms, q, k, pos, neg, terms, ctx.scale))
        return (*grads, None, None, None, None)

    def hardest_setup(ctx, inputs, output):
        q, k, pos, _grid_h, _grid_w, _exclusion, scale, _margin = inputs
        terms, neg = output
        ctx.mark_non_differentiable(neg)
        ctx.save_for_backward(q, k, pos, neg, terms)
        ctx.scale = scale

    def hardest_backward(ctx, grad_terms, _grad_neg):
        # The hardest negatives are sampled negatives with T = 1 once chosen.
        q, k, pos, neg, terms = ctx.saved_tensors
        grads = _qk_grads(
            ctx,
            lambda: triplet_bwd(grad_terms.unsqueeze(-1), q, k, pos, neg.unsqueeze(-1), terms.unsqueeze(-1), ctx.scale),
        )
        return (*grads, None, None, None, None, None, None)

    def nll_setup(ctx, inputs, output):
        q, _k, _pos, _scale, with_grad = inputs
        _loss, grad_q, grad_k = output
        ctx.mark_non_differentiable(grad_q, grad_k)
        # No zero-filled (N, D) and (M, D) gradients for those outputs in the backward.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_q, grad_k)
        ctx.with_grad, ctx.dtype = with_grad, q.dtype

    def nll_backward(ctx, grad_loss, _grad_grad_q, _grad_grad_k):
        # The gradients were computed in the forward; they are constants here, so a graph built
        # for double backward would silently miss their own dependence on q and k.
        if torch.is_grad_enabled():
            raise RuntimeError("correspondence_loss: double backward (gradients of gradients) is not supported")
        if grad_loss is None:  # gradients are not materialized: None is a zero upstream gradient
            return None, None, None, None, None

        def scaled():
            if not ctx.with_grad:
                raise RuntimeError("corr_nll_loss ran with with_grad=False: it has no gradient to give")
            grad_q, grad_k = ctx.saved_tensors  # float32 (float64): one rounding to q's dtype, after scaling
            return (grad_loss * grad_q).to(ctx.dtype), (grad_loss * grad_k).to(ctx.dtype)

        return (*_qk_grads(ctx, scaled), None, None, None)

    def double_backward(ctx, *grads):
        raise RuntimeError("correspondence_loss: double backward (gradients of gradients) is not supported")

    for name, backward, setup in (
        ("corr_triplet_fwd", triplet_backward, triplet_setup),
        ("corr_hardest_fwd", hardest_backward, hardest_setup),
        ("corr_nll_loss", nll_backward, nll_setup),
    ):
        torch.library.register_autograd(f"{library}::{name}{suffix}", backward, setup_context=setup)
    torch.library.register_autograd(f"{library}::corr_triplet_bwd{suffix}", double_backward)
    return _ForwardOps(
        getattr(ops, f"corr_triplet_fwd{suffix}"), getattr(ops, f"corr_hardest_fwd{suffix}"), getattr(ops, f"corr_nll_loss{suffix}")
    )


for _backend in _backends.registered_at_import(FWD_OP):
    _fused_ops(_backend)

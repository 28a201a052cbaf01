"""scft_attention: the public op, its checks, backend dispatch and autograd.

The fused backends expose two torch.library ops over (B, H, N, D) tensors:
    sketchcolor::scft_attn_fwd(q, k, v, scale) -> (out, lse)
    sketchcolor::scft_attn_bwd(grad_out, q, k, v, out, lse, scale) -> (grad_q, grad_k, grad_v)
(the C++ schemas are in csrc/op_schemas.h; cpp and cuda are kernels of these ops, triton
registers its own pair). This file gives them fake kernels and autograd, so opcheck and
torch.compile see through them, and never lets an N x M tensor exist.
"""
from __future__ import annotations

import torch

from .. import reference
from . import _backends
from ._checks import FLOAT_DTYPES, check_dim, check_same, check_tensor, resolve_scale

FWD_OP = "scft_attn_fwd"


def scft_attention(q, k, v, scale=None, *, impl: str = "auto", return_lse: bool = False):
    """Cross-attention out_i = sum_j softmax_j(scale * q_i . k_j) v_j without an N x M matrix.

    Args:
        q: (B, N, D) or (B, H, N, D) queries (sketch features).
        k: (B, M, D) or (B, H, M, D) keys (reference features).
        v: (B, M, Dv) or (B, H, M, Dv) values.
        scale: multiplies the scores before the softmax; default 1/sqrt(D).
        impl: "auto", "reference", "cpp", "triton" or "cuda" (see sketchcolor.ops._backends).
        return_lse: also return lse (B, [H,] N) = logsumexp_j S[i, j] in float32 (float64
            for float64 inputs). lse is returned detached: gradients do not flow through it.

    Returns out (B, [H,] N, Dv) in q's dtype (and lse). N = 0 gives empty outputs; M = 0 is
    an error because a softmax over no keys is undefined.
    """
    check_tensor("q", q, (3, 4), FLOAT_DTYPES)
    check_tensor("k", k, (q.dim(),))
    check_tensor("v", v, (q.dim(),))
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    lead = "(B, H)" if q.dim() == 4 else "(B,)"
    for name, t in (("k", k), ("v", v)):
        if t.shape[:-2] != q.shape[:-2]:
            raise ValueError(f"{name}: leading dims {lead} must match q's {tuple(q.shape[:-2])}, got {tuple(t.shape[:-2])}")
    check_dim("k", k.shape[-1], q.shape[-1], "head dim D (last axis) must equal q's and")
    check_dim("v", v.shape[-2], k.shape[-2], "number of keys M (axis -2) must equal k's and")
    for name, size, what in (("k", k.shape[-2], "M"), ("q", q.shape[-1], "D"), ("v", v.shape[-1], "Dv")):
        if size == 0:
            raise ValueError(f"{name}: {what} must be at least 1, got 0")
    scale = resolve_scale(scale, q.shape[-1])
    backend = _backends.resolve(impl, q.device, FWD_OP, q.dtype)

    if backend == "reference":
        with _backends.without_autocast(q.device):
            out, lse = reference.scft_attention(q, k, v, scale, return_lse=True)
        return (out, lse.detach()) if return_lse else out

    has_heads = q.dim() == 4
    if not has_heads:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    fwd = _fused_ops(backend)
    out, lse = fwd(q, k, v, scale)
    if not has_heads:
        out, lse = out.squeeze(1), lse.squeeze(1)
    return (out, lse) if return_lse else out


# "extension" (cpp and cuda: kernels of one op pair) or "triton" -> the forward op with autograd
# registered. A plain dict so that torch.compile
# traces a lookup, not the one-time registration (which dynamo refuses to trace).
_FORWARD_OPS: dict = {}


def _fused_ops(backend: str):
    """The forward op of a fused backend, registering its fake kernel and autograd once."""
    key = "triton" if backend == "triton" else "extension"
    op = _FORWARD_OPS.get(key)
    if op is None:
        if key == "extension":
            _register_cpp_fakes()
            op = _register_autograd("scft_attn_fwd", "scft_attn_bwd")
        else:
            from . import _triton_attention  # noqa: F401  (defines the triton_op pair and its fakes)

            op = _register_autograd("scft_attn_fwd_triton", "scft_attn_bwd_triton")
        _FORWARD_OPS[key] = op
    return op


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_cpp_fakes(library: str = "sketchcolor") -> None:
    """Shape-only kernels of the C++ ops of ``library``, for torch.compile and opcheck."""

    @torch.library.register_fake(f"{library}::scft_attn_fwd")
    def _fwd_fake(q, k, v, scale):
        batch, heads, n, _ = q.shape
        out = q.new_empty((batch, heads, n, v.shape[-1]))
        return out, q.new_empty((batch, heads, n), dtype=lse_dtype(q.dtype))

    @torch.library.register_fake(f"{library}::scft_attn_bwd")
    def _bwd_fake(grad_out, q, k, v, out, lse, scale):
        # The kernels return contiguous gradients whatever the inputs' strides.
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _register_autograd(fwd_name: str, bwd_name: str, library: str = "sketchcolor"):
    """Hand-written backward for a (fwd, bwd) op pair of ``library`` (the CUDA emulator's tests
    register its copy, sketchcolor_emulated); lse is an output without gradient."""
    ops = getattr(torch.ops, library)
    bwd = getattr(ops, bwd_name)

    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        needs = ctx.needs_input_grad
        if not any(needs[:3]):
            return None, None, None, None
        q, k, v, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = bwd(grad_out, q, k, v, out, lse, ctx.scale)
        return (grad_q if needs[0] else None, grad_k if needs[1] else None, grad_v if needs[2] else None, None)

    def double_backward(ctx, *grads):
        raise RuntimeError("scft_attention: double backward (gradients of gradients) is not supported")

    torch.library.register_autograd(f"{library}::{fwd_name}", backward, setup_context=setup_context)
    torch.library.register_autograd(f"{library}::{bwd_name}", double_backward)
    return getattr(ops, fwd_name)


for _backend in _backends.registered_at_import(FWD_OP):
    _fused_ops(_backend)

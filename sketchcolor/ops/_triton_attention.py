"""torch.library ops backed by the Triton SCFT-attention kernels (sketchcolor.kernels).

Importing this module defines
    torch.ops.sketchcolor.scft_attn_fwd_triton(q, k, v, scale) -> (out, lse)
    torch.ops.sketchcolor.scft_attn_bwd_triton(grad_out, q, k, v, out, lse, scale) -> (grad_q, grad_k, grad_v)
over (B, H, rows, dim) tensors of any strides; sketchcolor.ops.scft_attention registers
their autograd (_register_autograd) and is the public entry.

Both are torch.library.triton_op: the Python body allocates the outputs and launches the
kernels through torch.library.wrap_triton, so
  * eager calls launch the kernels directly (triton_op turns wrap_triton off there);
  * the same body, run on fake tensors, is the fake kernel (shapes and dtypes for
    torch.compile and opcheck): wrap_triton records the launches instead of running them;
  * torch.compile (Inductor) sees the kernels themselves and can schedule them.
Kernel options (tf32, deterministic) come from sketchcolor.kernels.scft_attention.options
and are read when the body runs (at trace time under torch.compile).

CPU tensors under TRITON_INTERPRET=1 (how CI proves the numerics) need another wrapper.
triton_op cannot serve them: its functional decomposition (what AOTAutograd, torch.compile
and opcheck's aot_dispatch tests run) executes the body on functional/fake tensors, and an
interpreted kernel reads tensor data, which those tensors do not have. So when the
interpreter is on, the same bodies are registered with torch.library.custom_op, which is
opaque to tracing: eager calls run the interpreted kernels, and the fake kernel is the body
with launches skipped (the launchers allocate every output before launching anything).
The schemas, names and autograd are identical either way.
"""
from __future__ import annotations

import torch
import torch._library.triton
from torch.library import custom_op, triton_op, wrap_triton

from sketchcolor.kernels import scft_attention as _kernels

FWD_NAME = "sketchcolor::scft_attn_fwd_triton"
BWD_NAME = "sketchcolor::scft_attn_bwd_triton"


def _direct(kernel):
    return kernel


class _NoLaunch:
    """kernel[grid](*args) that does nothing: the fake kernels only need the allocations."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _skip_launch(kernel):
    return _NoLaunch()


def _declare_kernels(name: str, kernels: list) -> None:
    """Record which Triton kernels op ``name`` launches.

    triton_op finds them by reading the body's source for ``wrap_triton(<kernel>)`` calls; these
    bodies launch through the shared launchers, which that reading cannot follow, so it finds
    none. The list feeds the AOTAutograd cache key: without it, editing a kernel would not
    invalidate graphs compiled with the old one. torch keeps it in a private registry
    (torch._library.triton.triton_ops_to_kernels); if a torch lacks it there is nothing to feed.
    """
    registry = getattr(torch._library.triton, "triton_ops_to_kernels", None)
    if registry is not None:
        registry[name] = list(kernels)


def _fwd_body(launch):
    def scft_attn_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _kernels.attention_forward(q, k, v, scale, launch=launch)

    return scft_attn_fwd_triton


def _bwd_body(launch):
    def scft_attn_bwd_triton(
        grad_out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _kernels.attention_backward(grad_out, q, k, v, out, lse, scale, launch=launch)

    return scft_attn_bwd_triton


if _kernels.INTERPRETING:
    scft_attn_fwd_triton = custom_op(FWD_NAME, _fwd_body(_direct), mutates_args=())
    scft_attn_fwd_triton.register_fake(_fwd_body(_skip_launch))
    scft_attn_bwd_triton = custom_op(BWD_NAME, _bwd_body(_direct), mutates_args=())
    scft_attn_bwd_triton.register_fake(_bwd_body(_skip_launch))
else:
    scft_attn_fwd_triton = triton_op(FWD_NAME, _fwd_body(wrap_triton), mutates_args=())
    scft_attn_bwd_triton = triton_op(BWD_NAME, _bwd_body(wrap_triton), mutates_args=())
    _declare_kernels(FWD_NAME, [_kernels.scft_attn_fwd, _kernels.scft_attn_fwd_pinned])
    _declare_kernels(BWD_NAME, [_kernels.scft_attn_bwd_preprocess, _kernels.scft_attn_bwd_dkdv, _kernels.scft_attn_bwd_dq])

"""Tile arithmetic shared by the Triton kernels of sketchcolor.kernels.

A @triton.jit function called from a kernel is inlined into it when the kernel compiles, so
these cost nothing at run time: they exist so that each piece is written once for the SCFT
attention and the correspondence-loss kernels alike.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def last_axis_passes_int32(t: torch.Tensor) -> bool:
    """Whether ``t``'s last-axis offsets (index times stride) reach 2**31 elements.

    The kernels multiply last-axis offsets (tl.arange, int32) by the stride in int32: a 64-bit
    product in every program would cost the layouts training uses, whose stride there is 1 (or
    N, for a (B, D, N)-style view). Only a layout like a permuted (D, ..., N) buffer of over two
    billion elements gets that far."""
    return t.dim() > 0 and (t.shape[-1] - 1) * abs(t.stride(-1)) >= 2**31


def int32_last_axis(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where its last-axis offsets would pass int32 (copied once here
    instead of widening every kernel's arithmetic)."""
    return t.contiguous() if last_axis_passes_int32(t) else t


def _cuda_present() -> bool:
    # Its own function so that a test can stand in a GPU: patching torch.cuda.is_available itself
    # makes fake CUDA tensors initialize CUDA on torch's CUDA builds.
    return torch.cuda.is_available()


def on_the_inputs_device(launcher):
    """``launcher`` run with the current CUDA device set to its first tensor argument's. Triton
    launches on the current device, in its current stream, which need not be the tensors' (a
    model on cuda:1 in a process whose current device is cuda:0 would have its kernels read
    another GPU's addresses); the cuda backend's bindings guard the same way. Without a CUDA
    device nothing launches on one (fake CUDA tensors, as torch.compile traces the ops with, can
    exist without it): no guard."""

    @functools.wraps(launcher)
    def on_device(*args, **kwargs):
        device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
        if device.type != "cuda" or not _cuda_present():
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)

    return on_device


# Under TRITON_INTERPRET=1 the interpreter implements no bfloat16 arithmetic: it stores
# bf16 as raw uint16, its tl.dot multiplies those bit patterns (triton-lang/triton#11584;
# the documented workaround is casting to float32), and its fp32 -> bf16 cast truncates
# where compiled code rounds to nearest even. _dot and _cast emulate what the GPU does
# (bf16 products are exact in fp32; RNE on the fp32 bits), so the CPU tests measure the
# GPU's rounding. Compiled kernels never take these branches.
_EMULATE_BF16 = tl.constexpr(INTERPRETING)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if _EMULATE_BF16:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even as compiled code does."""
    if _EMULATE_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)  # now exactly representable in bf16
    return x.to(dtype)


@triton.jit
def _rows_dot_rows(a_rows, a_valid, b_rows, b_valid, D, stride_ad, stride_bd,
                   ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(ROWS, COLS) fp32 tile of a b^T over D: a_rows (ROWS, 1) and b_rows (1, COLS) are row pointers.

    The reduction is a loop over BLOCK_D-wide chunks because D reaches 992 and more: a
    (rows, D) operand tile does not fit in registers, so a and b are re-read chunk by chunk
    for every tile (the re-reads hit L2) and only the fp32 result stays resident.
    """
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    offs_db = tl.arange(0, BLOCK_D)
    for start_d in range(0, D, BLOCK_D):
        offs_d = start_d + offs_db
        d_valid = offs_d < D
        a = tl.load(a_rows + offs_d[None, :] * stride_ad, mask=a_valid[:, None] & d_valid[None, :], other=0.0)
        b_t = tl.load(b_rows + offs_d[:, None] * stride_bd, mask=d_valid[:, None] & b_valid[None, :], other=0.0)
        acc = _dot(a, b_t, acc, DOT_PRECISION)
    return acc

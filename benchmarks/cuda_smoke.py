"""One small forward and backward through every kernel of the cuda backend, for compute-sanitizer:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/cuda_smoke.py
    compute-sanitizer --tool racecheck python benchmarks/cuda_smoke.py

The GPU tests compare results; this gives the sanitizer every kernel once, on shapes small
enough for its slowdown, with tails in every dimension: attention with D = 100 (rows padded by
the binding), Dv = 600 (two output slices, the second partial) and D = Dv = 992, in float16 and
bfloat16, with each tensor-core instruction family the device has (SKETCHCOLOR_CUDA_MMA); the
correspondence loss in each mode. Without the caching allocator (the variable above) memcheck
sees each tensor's own bounds rather than the allocator's larger blocks.
"""
from __future__ import annotations

import os
import sys

import torch

from sketchcolor.ops import correspondence_loss, scft_attention

# (B, H, N, M, D, Dv)
ATTENTION_SHAPES = [(1, 2, 70, 200, 100, 600), (1, 1, 33, 129, 992, 992)]
# (B, N, M, key grid, D)
CORRESPONDENCE_SHAPES = [(2, 70, 130, (10, 13), 100)]


def mma_choices() -> list[str]:
    """The tensor-core instruction families this device runs (wgmma on compute capability 9.0)."""
    return ["mma_sync", "wgmma"] if torch.cuda.get_device_capability() == (9, 0) else ["mma_sync"]


def attention(dtype: torch.dtype) -> None:
    for batch, heads, n, m, d, dv in ATTENTION_SHAPES:
        q = torch.randn(batch, heads, n, d, dtype=dtype, device="cuda", requires_grad=True)
        k = torch.randn(batch, heads, m, d, dtype=dtype, device="cuda", requires_grad=True)
        v = torch.randn(batch, heads, m, dv, dtype=dtype, device="cuda", requires_grad=True)
        out = scft_attention(q, k, v, impl="cuda")
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))


def correspondence(dtype: torch.dtype) -> None:
    for batch, n, m, key_grid, d in CORRESPONDENCE_SHAPES:
        q = torch.randn(batch, n, d, dtype=dtype, device="cuda", requires_grad=True)
        k = torch.randn(batch, m, d, dtype=dtype, device="cuda", requires_grad=True)
        pos = torch.randint(-1, m, (batch, n), device="cuda")
        neg = torch.randint(-1, m, (batch, n, 4), device="cuda")
        for kwargs in (dict(neg=neg), dict(hardest=True, key_grid=key_grid), dict(mode="nll")):
            loss = correspondence_loss(q, k, pos, impl="cuda", **kwargs)
            torch.autograd.grad(loss, (q, k))


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_smoke: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    for choice in mma_choices():
        os.environ["SKETCHCOLOR_CUDA_MMA"] = choice
        for dtype in (torch.float16, torch.bfloat16):
            attention(dtype)
            correspondence(dtype)
            torch.cuda.synchronize()
            print(f"ran every kernel: {choice} {str(dtype).removeprefix('torch.')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

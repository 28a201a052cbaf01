"""Which backend runs an op: the ``impl`` argument of every public op.

reference  sketchcolor.reference (any device; materializes N x M)
cpp        C++ CPU kernels of sketchcolor._C (CPU tensors)
triton     Triton kernels of sketchcolor.kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
cuda       CUDA kernels of sketchcolor._C (CUDA tensors, CUDA builds only)
auto       the fastest available for the tensors' device; falling back to reference warns once
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from . import _extension

IMPLS = ("auto", "reference", "cpp", "triton", "cuda")
_AUTO_ORDER = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
# Backends whose kernels take only some floating dtypes; the others take every one they can run.
DTYPES = {"cuda": (torch.float16, torch.bfloat16)}
# Shared memory per block the cuda backend needs at least: its largest kernel on a device that
# grants little, where the launchers take the compact (2-stage) forward and probability kernels
# (csrc/scft_attention/scft_attention.h: ScftFwdCompactConfigDv512 and the hardest-negative
# search, 84 KiB each; tests/test_cuda_compile.py checks the two agree). 8.x devices grant 99 KiB
# (8.6, 8.9) or 163 KiB (8.0, 8.7); 9.0 devices grant 227 KiB, enough for the wgmma kernels' 209
# KiB (forward) and 192 KiB (backward GEMMs). GPUs the build has no machine code for (setup.py:
# sm_80, which 8.x devices run, and sm_90a) run triton instead.
CUDA_SMEM_PER_BLOCK = 86016


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(impl: str, device: torch.device, op_name: str, dtype: torch.dtype | None = None) -> str | None:
    """None if ``impl`` can run ``op_name`` (the C++ schema name) on ``device`` (for ``dtype``
    inputs, when given), else why not."""
    reason = _placement_reason(impl, device, op_name)
    accepted = DTYPES.get(impl)
    if reason is None and dtype is not None and accepted is not None and dtype not in accepted:
        names = " or ".join(str(d).removeprefix("torch.") for d in accepted)
        reason = f"impl={impl!r} takes {names} tensors, got {str(dtype).removeprefix('torch.')}"
    return reason


def _placement_reason(impl: str, device: torch.device, op_name: str) -> str | None:
    """Why ``impl`` cannot run ``op_name`` on ``device`` in this installation, or None."""
    if impl == "reference":
        return None
    if impl == "cpp":
        if device.type != "cpu":
            return f"impl='cpp' runs on CPU tensors, got tensors on {device}"
        if _extension.load_error() is not None:
            return _extension.load_error()
        return None
    if impl == "cuda":
        if device.type != "cuda":
            return f"impl='cuda' runs on CUDA tensors, got tensors on {device}"
        if _extension.load_error() is not None:
            return _extension.load_error()
        if not _extension.has_kernel(op_name, "CUDA"):
            return "the extension sketchcolor._C was built without CUDA (needs a CUDA build of torch and nvcc at install time)"
        name, (major, minor), granted = _cuda_device(device)
        if not (major == 8 or (major, minor) == (9, 0)):
            return (
                f"impl='cuda' has machine code for compute capability 8.x (sm_80) and 9.0 (sm_90a); "
                f"{name} is {major}.{minor} (impl='triton' runs there)"
            )
        if granted < CUDA_SMEM_PER_BLOCK:
            return (
                f"impl='cuda' needs {CUDA_SMEM_PER_BLOCK // 1024} KiB of shared memory per block and "
                f"{name} grants {granted // 1024} KiB (impl='triton' runs there)"
            )
        return None
    if impl == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return f"impl='triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _cuda_device(device: torch.device) -> tuple[str, tuple[int, int], int]:
    """Name, compute capability and the most shared memory one block can have (the opt-in limit)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return props.name, (props.major, props.minor), props.shared_memory_per_block_optin


@functools.cache
def _warn_fallback(op_name: str, device_type: str, reasons: str) -> None:
    warnings.warn(
        f"sketchcolor: no fast backend for {op_name} on {device_type} ({reasons}); "
        "using impl='reference', which materializes the N x M score matrix",
        RuntimeWarning,
        stacklevel=4,
    )


def resolve(impl: str, device: torch.device, op_name: str, dtype: torch.dtype | None = None) -> str:
    """The concrete backend name for ``impl`` on ``dtype`` inputs; raises with the reason if it
    cannot run. ``auto`` skips a backend that cannot take the dtype (float32 on CUDA: triton)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        reason = unavailable_reason(impl, device, op_name, dtype)
        if reason is not None:
            raise RuntimeError(f"sketchcolor: impl={impl!r} is not available: {reason}")
        return impl
    reasons = []
    for candidate in _AUTO_ORDER.get(device.type, ()):
        reason = unavailable_reason(candidate, device, op_name, dtype)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    _warn_fallback(op_name, device.type, "; ".join(reasons) or "no fused backend for this device")
    return "reference"

"""Which backend runs an op: the ``impl`` argument of every public op.

reference  sketchcolor.reference (any device; materializes N x M)
cpp        C++ CPU kernels of sketchcolor._C (CPU tensors)
triton     Triton kernels of sketchcolor.kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
cuda       CUDA kernels of sketchcolor._C (CUDA tensors, CUDA builds only)
auto       the fastest available for the tensors' device; falling back to reference warns once
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import warnings

import torch

from . import _extension

IMPLS = ("auto", "reference", "cpp", "triton", "cuda")
_AUTO_ORDER = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
# Backends whose kernels take only some floating dtypes; the others take every one they can run.
DTYPES = {"cuda": (torch.float16, torch.bfloat16), "triton": (torch.float16, torch.bfloat16, torch.float32)}
# Shared memory per block the cuda backend needs at least: its largest kernel on a device that
# grants little, where the launchers take the compact (2-stage) forward and probability kernels
# (csrc/scft_attention/scft_attention.h: ScftFwdCompactConfigDv512 and the hardest-negative
# search, 84 KiB each; tests/test_cuda_compile.py checks the two agree). 8.6, 8.9 and 12.x devices
# grant 99 KiB; 8.0 and 8.7 163 KiB; 9.0 and 10.x 227 KiB, enough for the wgmma kernels' 209 KiB
# (forward) and 192 KiB (backward GEMMs) on 9.0.
CUDA_SMEM_PER_BLOCK = 86016
# The build's machine code (setup.py's -gencode targets) by compute capability major: a cubin runs
# on its major at its minor or later, and sm_90a (wgmma) on 9.0 alone. GPUs it does not cover (7.x,
# 11.x) run triton.
CUDA_MACHINE_CODE = {8: "sm_80", 9: "sm_90a", 10: "sm_100", 12: "sm_120"}
# Majors where auto prefers triton to cuda: on 10.x Triton multiplies with tcgen05, the fifth
# generation tensor cores' own instructions, and the cuda kernels with mma.sync, the Ampere-era
# instructions that 10.x runs below its tensor-core peak. Elsewhere both use the generation's
# instructions (mma.sync on 8.x and 12.x; wgmma on 9.0, where the cuda kernels use it too).
AUTO_TRITON_FIRST_MAJORS = (10,)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels_compiled_for_gpus() -> bool:
    """Whether the Triton kernels were imported without TRITON_INTERPRET=1 (not imported: False)."""
    tiles = sys.modules.get("sketchcolor.kernels._tiles")
    return tiles is not None and not tiles.INTERPRETING


@functools.cache
def _triton_import_error() -> str | None:
    try:
        for module in ("sketchcolor.kernels.scft_attention", "sketchcolor.kernels.correspondence_loss"):
            importlib.import_module(module)
    except Exception as error:  # noqa: BLE001  (a broken triton install: any error makes the backend unavailable)
        return f"the Triton kernels do not import ({type(error).__name__}: {error})"
    return None


# A constant to torch.compile, like _extension.load_error.
@torch.compiler.assume_constant_result
def triton_load_error() -> str | None:
    """None when the Triton kernels (and triton itself) import, else why not (cached). sketchcolor.ops
    registers the triton ops at import where triton can run: a broken install then makes the
    triton backend unavailable, with this reason, instead of failing the import of every backend."""
    return _triton_import_error()


def unavailable_reason(impl: str, device: torch.device, op_name: str, dtype: torch.dtype | None = None) -> str | None:
    """None if ``impl`` can run ``op_name`` (the C++ schema name) on ``device`` (for ``dtype``
    inputs, when given), else why not."""
    reason = _placement_reason(impl, device, op_name)
    accepted = DTYPES.get(impl)
    if reason is None and dtype is not None and accepted is not None and dtype not in accepted:
        *others, last = (str(d).removeprefix("torch.") for d in accepted)
        names = f"{', '.join(others)} or {last}" if others else last
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
        if major not in CUDA_MACHINE_CODE or (major == 9 and minor != 0):
            return (
                f"impl='cuda' has machine code for compute capability 8.x (sm_80), 9.0 (sm_90a), "
                f"10.x (sm_100) and 12.x (sm_120); {name} is {major}.{minor} (impl='triton' runs there)"
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
        if device.type == "cpu" and triton_interpreting() and _kernels_compiled_for_gpus():
            return (
                "TRITON_INTERPRET=1 was set after the Triton kernels were imported, and Triton chooses "
                "between interpreting a kernel and compiling it for a GPU when it imports it: set "
                "TRITON_INTERPRET=1 before importing sketchcolor (on a machine with a GPU, importing "
                "sketchcolor.ops imports the kernels)"
            )
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return triton_load_error()
        return f"impl='triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def registered_at_import(op_name: str) -> tuple[str, ...]:
    """The fused backends whose ops sketchcolor.ops registers (fake kernels, autograd) when it is
    imported: the ones this process can run ``op_name`` on. torch.compile cannot trace a
    registration, so a compiled call that came first would otherwise fail with fullgraph=True.
    ("cpp" stands for the extension's ops, the cuda kernels' too.)"""
    triton_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    candidates = (("cpp", torch.device("cpu")), ("triton", triton_device))
    return tuple(impl for impl, device in candidates if _placement_reason(impl, device, op_name) is None)


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


# A constant to torch.compile: dynamo calls it once while tracing, with the tensors' device and
# dtype, instead of tracing through the checks (torch 2.11's dynamo refuses importlib.util.find_spec
# and the dispatcher queries among them; the GPU machines run 2.11).
@torch.compiler.assume_constant_result
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
    reasons = {candidate: unavailable_reason(candidate, device, op_name, dtype) for candidate in _AUTO_ORDER.get(device.type, ())}
    runnable = [candidate for candidate, reason in reasons.items() if reason is None]
    if {"cuda", "triton"} <= set(runnable) and _cuda_device(device)[1][0] in AUTO_TRITON_FIRST_MAJORS:
        return "triton"
    if runnable:
        return runnable[0]
    _warn_fallback(op_name, device.type, "; ".join(f"{c}: {r}" for c, r in reasons.items()) or "no fused backend for this device")
    return "reference"


def without_autocast(device: torch.device):
    """The reference paths' context: autocast off. The fused backends are custom ops with no
    autocast kernels, which autocast passes by with their inputs as they are; the reference,
    plain torch ops, would otherwise have its matmuls cast to the autocast dtype, so that
    switching ``impl`` would change the result's dtype and precision."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()

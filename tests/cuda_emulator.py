"""Builds and loads the CUDA emulator (csrc/emulator): the kernel files and the torch bindings of
the cuda backend compiled as host C++ with SKETCHCOLOR_CUDA_EMULATOR, run on CPU tensors.

Used by tests/test_cuda_emulated.py (the backend against the reference), by tests/conftest.py
(SKETCHCOLOR_GUARD_CPU_MEMORY=1: every CPU tensor of a test session in the emulator's guard-paged
memory) and by benchmarks/cuda_memory_emulated.py. The build is cached under the system's temporary
directory, one per checkout and torch version, so the processes of one checkout share it.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib
import os
import pathlib
import shutil
import tempfile

import torch

from test_cuda_compile import CSRC, CUDA_INCLUDE

LIBRARY = "sketchcolor_emulated"
# Emulated GPUs: (compute capability major, minor, SMs, shared memory per block (opt-in), per SM).
DEVICES = {
    "A100": (8, 0, 108, 163 * 1024, 164 * 1024),
    "H100": (9, 0, 132, 227 * 1024, 228 * 1024),
    "RTX4090": (8, 9, 128, 99 * 1024, 100 * 1024),
    "B200": (10, 0, 148, 227 * 1024, 228 * 1024),
    "RTX5090": (12, 0, 170, 99 * 1024, 100 * 1024),
}


def unavailable_reason() -> str | None:
    """Why the emulator cannot be built here, or None."""
    from torch.utils import cpp_extension

    if shutil.which("g++") is None or CUDA_INCLUDE is None:
        return "the emulator needs g++ and the CUDA toolkit's headers (cuda_runtime.h)"
    if not cpp_extension.is_ninja_available():
        return "the emulator is built with torch.utils.cpp_extension, which needs ninja"
    return None


@dataclasses.dataclass
class Emulator:
    """The built emulator module and the emulated library's forward ops, autograd registered."""

    module: object
    attention_fwd: object
    correspondence_ops: object

    def __getattr__(self, name):
        return getattr(self.module, name)


_LOADED: list[Emulator] = []


def load_emulator() -> Emulator:
    """Builds the emulator (or reuses the cached build) and registers the package's own fake kernels
    and hand-written backward on the emulated library's ops; once per process."""
    if _LOADED:
        return _LOADED[0]
    from torch.utils import cpp_extension

    # One build per checkout and torch version: another checkout's build (its -I path differs)
    # must not rewrite this one's build files while it runs.
    checkout = hashlib.sha1(CSRC.encode()).hexdigest()[:10]
    build = pathlib.Path(tempfile.gettempdir()) / f"sketchcolor-cuda-emulator-torch{torch.__version__}-{checkout}"
    build.mkdir(exist_ok=True)
    # Each kernel file is its own translation unit, as under nvcc (their kernels and helpers live in
    # anonymous namespaces).
    units = []
    for cu in sorted(glob.glob(os.path.join(CSRC, "*", "*_kernel.cu"))):
        unit = build / ("emulated_" + os.path.basename(cu).replace(".cu", ".cpp"))
        include = f'#include "{os.path.relpath(cu, CSRC)}"\n'
        if not unit.exists() or unit.read_text() != include:   # rewritten only when it changes: ninja rebuilds on mtime
            unit.write_text(include)
        units.append(str(unit))
    bindings = sorted(glob.glob(os.path.join(CSRC, "*", "*_cuda.cpp")))
    module = cpp_extension.load(
        "sketchcolor_cuda_emulator",
        [os.path.join(CSRC, "emulator", "emulator.cpp"), os.path.join(CSRC, "emulator", "emulator_binding.cpp"),
         *units, *bindings],
        extra_cflags=[
            "-O2", "-DSKETCHCOLOR_CUDA_EMULATOR",
            # The CPU wheel of torch ships c10/cuda headers but not the CMake-generated cuda_cmake_macros.h.
            "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            "-Wno-attributes", "-Wno-unknown-pragmas", f"-I{CSRC}", f"-I{CUDA_INCLUDE}",
        ],
        build_directory=str(build),
    )
    attention = importlib.import_module("sketchcolor.ops.scft_attention")
    correspondence = importlib.import_module("sketchcolor.ops.correspondence_loss")
    attention._register_cpp_fakes(LIBRARY)
    correspondence._register_cpp_fakes(LIBRARY)
    _LOADED.append(Emulator(
        module,
        attention._register_autograd("scft_attn_fwd", "scft_attn_bwd", library=LIBRARY),
        correspondence._register_autograd("", library=LIBRARY),
    ))
    return _LOADED[0]


def binding_peak_bytes(emulator, call) -> int:
    """The most device memory call() holds at once beyond what was live before it: the bindings'
    outputs, workspaces and layout copies (its results are freed as it returns)."""
    emulator.reset_stats()
    before = emulator.stats()["device_bytes"]
    call()
    return emulator.stats()["device_bytes_peak"] - before


def memory_cases(n, head_dim=992, dtype=torch.bfloat16):
    """name -> a call of the cuda bindings at N = M = n (B = H = 1, D = Dv = head_dim): attention
    forward+backward, and each correspondence-loss op the loss runs (T = 4 sampled negatives)."""
    ops = torch.ops.sketchcolor_emulated
    q, k, v = (torch.randn(1, 1, n, head_dim, dtype=dtype) for _ in range(3))
    grad_out = torch.randn_like(q)
    pos = torch.randint(-1, n, (1, n))
    neg = torch.randint(-1, n, (1, n, 4))
    terms = torch.ones(1, n, 4)
    grid = (n // 128, 128)   # n a multiple of 128

    def attention():
        out, lse = ops.scft_attn_fwd(q, k, v, head_dim ** -0.5)
        ops.scft_attn_bwd(grad_out, q, k, v, out, lse, head_dim ** -0.5)

    q3, k3 = q[:, 0], k[:, 0]
    return {
        "attention fwd+bwd": attention,
        "correspondence triplet (fwd, bwd)": lambda: (ops.corr_triplet_fwd(q3, k3, pos, neg, 0.03, 12.0),
                                                      ops.corr_triplet_bwd(terms, q3, k3, pos, neg, terms, 0.03)),
        "correspondence hardest (search)": lambda: ops.corr_hardest_fwd(q3, k3, pos, *grid, 1, 0.03, 12.0),
        "correspondence nll (loss and gradients)": lambda: ops.corr_nll_loss(q3, k3, pos, 0.03, True),
    }

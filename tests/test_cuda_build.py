"""The installed extension, where torch is a CUDA build: what `pip install -e .` makes on a GPU
machine, checked on a machine without a GPU.

setup.py adds the CUDA kernels and their torch bindings when torch is a CUDA build and nvcc is
present. Built that way (.ci/run's second leg installs the GPU machines' torch, a CUDA 13 build,
for this), the extension must:

* load in a process that sees no GPU, so that every CPU path keeps working;
* register a CUDA kernel for every op of csrc/op_schemas.h, beside its CPU kernel;
* hold machine code for every -gencode target of setup.py, from every .cu file.

tests/test_cuda_compile.py compiles the kernels alone and checks the bindings' syntax; this file
checks what the real build links together. Skips where torch is a CPU build or nvcc is missing
(setup.py then builds the CPU kernels only), or where the build was told to leave CUDA out.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess

import pytest
import torch

from test_cuda_compile import ARCH_FLAGS, CUOBJDUMP, NVCC, ROOT
from sketchcolor.ops import _extension


def _cuda_build_skip_reason() -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (setup.py builds the CUDA kernels against a CUDA build)"
    if NVCC is None:
        return "nvcc not found: setup.py built the CPU kernels only"
    if os.environ.get("SKETCHCOLOR_NO_CUDA", "0") == "1":
        return "SKETCHCOLOR_NO_CUDA=1 leaves the CUDA kernels out of the build"
    return None


_REASON = _cuda_build_skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

# The op names the schemas define (csrc/op_schemas.h).
with open(os.path.join(ROOT, "csrc", "op_schemas.h")) as _schemas:
    SCHEMA_OPS = re.findall(r'm\.def\(\s*"(\w+)\(', _schemas.read())
KERNEL_FILES = sorted(os.path.basename(path)[: -len(".cu")] for path in glob.glob(os.path.join(ROOT, "csrc", "*", "*_kernel.cu")))


def test_the_schemas_are_read():
    # Guards the regular expression: an empty list would make the next test pass vacuously.
    assert "scft_attn_fwd" in SCHEMA_OPS and "corr_nll_loss" in SCHEMA_OPS, SCHEMA_OPS


def test_the_extension_loads_without_a_gpu():
    assert _extension.load_error() is None


@pytest.mark.parametrize("op_name", SCHEMA_OPS)
def test_every_op_has_a_cuda_and_a_cpu_kernel(op_name):
    missing = [key for key in ("CPU", "CUDA") if not _extension.has_kernel(op_name, key)]
    assert not missing, f"sketchcolor::{op_name} has no {' or '.join(missing)} kernel in {_extension_path()}"


@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not found (CUDA toolkit or triton's package)")
def test_machine_code_for_every_target_from_every_kernel_file():
    listing = subprocess.run([CUOBJDUMP, "--list-elf", _extension_path()], capture_output=True, text=True, check=True).stdout
    cubins = set(re.findall(r"ELF file\s+\d+:\s+(\S+)\.cubin", listing))
    # cuobjdump names the architecture without the "a" of sm_90a.
    expected = {f"{kernel_file}.{arch.removesuffix('a')}" for kernel_file in KERNEL_FILES for arch in ARCH_FLAGS}
    assert KERNEL_FILES and expected <= cubins, f"missing: {sorted(expected - cubins)}\n{listing}"


def _extension_path() -> str:
    import sketchcolor._C

    return sketchcolor._C.__file__

"""Builds sketchcolor._C.

C++ CPU kernels are always built. CUDA kernels (csrc/<op>/*_kernel.cu and the torch
bindings csrc/<op>/*_cuda.cpp) are added when torch is a CUDA build and nvcc is present,
unless SKETCHCOLOR_NO_CUDA=1. Install with `pip install --no-build-isolation -e .`:
this file imports torch, and pip's build isolation would fetch a second torch.
"""
import glob
import os
import re
import shutil
import subprocess

import torch
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _point_cuda_home_at_nvccs_toolkit() -> None:
    """torch.utils.cpp_extension, when imported, takes CUDA_HOME (unless set) as the folder above
    the nvcc on PATH. An nvcc that is a wrapper script (this development machine's
    /usr/local/bin/nvcc runs /usr/local/cuda-13.0/bin/nvcc) makes that /usr/local, which has no
    CUDA headers, and the bindings then fail to compile. nvcc names its own toolkit (TOP in
    --dryrun's output): that one is passed on."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None or _has_cuda_headers(os.path.dirname(os.path.dirname(nvcc))):
        return
    try:
        dryrun = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return
    top = re.search(r"^#\$ TOP=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    toolkit = os.path.realpath(top.group(1).strip()) if top else None
    if toolkit and _has_cuda_headers(toolkit):
        os.environ["CUDA_HOME"] = toolkit


def _has_cuda_headers(toolkit: str) -> bool:
    return os.path.isfile(os.path.join(toolkit, "include", "cuda_runtime_api.h"))


_point_cuda_home_at_nvccs_toolkit()
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402  (reads CUDA_HOME)


def _cuda_build_wanted() -> bool:
    if os.environ.get("SKETCHCOLOR_NO_CUDA", "0") == "1":
        return False
    nvcc_found = CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and nvcc_found


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern), recursive=True))


def _extension():
    cpu_sources = _sources("ops.cpp") + _sources("*/*_cpu.cpp")
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    if not _cuda_build_wanted():
        return CppExtension(
            "sketchcolor._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp", "-ldl"],
        )
    # Machine code per GPU generation. A cubin runs on its own major version at its minor or later
    # (sm_80: every 8.x; sm_100: 10.0 and 10.3; sm_120: 12.0 and 12.1); sm_90a, with wgmma, runs on
    # 9.0 alone. 10.x and 12.x run the mma.sync kernels (neither has wgmma).
    arch_flags = [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_100,code=sm_100",
        "-gencode=arch=compute_120,code=sm_120",
    ]
    return CUDAExtension(
        "sketchcolor._C",
        cpu_sources + _sources("*/*_cuda.cpp") + _sources("*/*_kernel.cu"),
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("SKETCHCOLOR_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", *arch_flags],
        },
        extra_link_args=["-fopenmp", "-ldl"],
    )


setup(
    packages=["sketchcolor", "sketchcolor.ops", "sketchcolor.data", "sketchcolor.models", "sketchcolor.kernels", "sketchcolor.benchmarking"],
    package_dir={"sketchcolor.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

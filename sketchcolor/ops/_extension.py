"""Lazy, cached access to the compiled extension sketchcolor._C.

The extension is built by setup.py (`pip install --no-build-isolation -e .`). Importing it
registers the ``torch.ops.sketchcolor`` schemas and their CPU (and, in CUDA builds, CUDA)
kernels. Nothing here compiles at run time: a missing build is reported with the command
that makes it.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def _import_error() -> str | None:
    try:
        import sketchcolor._C  # noqa: F401  (import registers the ops)
    except ImportError as err:
        return (
            f"the C++ extension sketchcolor._C is not built ({err}); build it with "
            "`pip install --no-build-isolation -e .`"
        )
    return None


# A constant to torch.compile: dynamo calls it once while tracing instead of tracing through the
# cache (which it warns about in every compiled step that calls an op).
@torch.compiler.assume_constant_result
def load_error() -> str | None:
    """None when sketchcolor._C is importable, else why not (cached)."""
    return _import_error()


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether torch.ops.sketchcolor.<op_name> has a kernel for CPU or CUDA tensors."""
    if load_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sketchcolor::{op_name}", dispatch_key)

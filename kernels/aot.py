"""Ahead-of-time compilation of the SCFT-attention kernels, without a GPU.

The launchers are run on meta tensors with a recording ``launch`` wrapper, which yields
exactly the arguments a real call would pass to each kernel (strides, sizes, constexprs).
``ast_source`` turns one recorded launch plus one autotune config into the
``triton.compiler.ASTSource`` the JIT would build, specializing arguments the way the
JIT does (an integer equal to 1 becomes a constant; pointers, and integers divisible by
16, are marked 16-divisible), and ``compile_launch`` compiles it for any
``GPUTarget``. tests/test_triton_compile.py uses these to prove that every config the
autotuner can pick compiles for every target of ``GPU_TARGETS``, fits its shared memory and
uses tensor cores.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import scft_attention as attn

# The GPU generations the kernels are compiled for ahead of time: name -> (target, the most
# shared memory one block may opt in to, cudaDevAttrMaxSharedMemoryPerBlockOptin). Compiling
# needs no GPU; the metadata then shows what each generation's code allocates.
GPU_TARGETS = {
    "sm_80": (GPUTarget("cuda", 80, 32), 166912),  # A100
    "sm_86": (GPUTarget("cuda", 86, 32), 101376),  # RTX 30xx, A10, A40
    "sm_89": (GPUTarget("cuda", 89, 32), 101376),  # RTX 40xx, L4, L40S
    "sm_90": (GPUTarget("cuda", 90, 32), 232448),  # H100, H200 (wgmma)
    "sm_100": (GPUTarget("cuda", 100, 32), 232448),  # B200 (tcgen05)
    "sm_120": (GPUTarget("cuda", 120, 32), 101376),  # RTX 50xx
}
# The PTX of a tensor-core product, per target: mma.sync everywhere; Triton may use wgmma on
# sm_90, and uses tcgen05 on sm_100 (every dot of these kernels; the reason sketchcolor.ops picks
# triton before cuda, whose kernels are on mma.sync, on 10.x GPUs).
TENSOR_CORE_PTX = {90: ("wgmma.mma_async", "mma.sync.aligned"), 100: ("tcgen05.mma",)}


def uses_tensor_cores(ptx: str, target: GPUTarget) -> bool:
    return any(op in ptx for op in TENSOR_CORE_PTX.get(target.arch, ("mma.sync.aligned",)))

_POINTER_TYPES = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.int32: "*i32",
    torch.int64: "*i64",
}
# autotuned handle -> the config family name used by scft_attention.GPU_CONFIGS
KERNEL_NAMES = {
    id(attn.scft_attn_fwd): "fwd",
    id(attn.scft_attn_fwd_pinned): "fwd",
    id(attn.scft_attn_bwd_preprocess): "bwd_preprocess",
    id(attn.scft_attn_bwd_dkdv): "bwd_dkdv",
    id(attn.scft_attn_bwd_dq): "bwd_dq",
}


@dataclasses.dataclass
class Launch:
    name: str  # attention: "fwd", "bwd_preprocess", "bwd_dkdv" or "bwd_dq" (GPU_CONFIGS keys); else the kernel's name
    fn: Any  # the @triton.jit function
    args: dict  # argument name -> value, as the launcher passed them (no config constexprs)

    @property
    def variant(self) -> str:
        """The name plus the launcher's constexprs, e.g. 'bwd_dkdv[ATOMIC_DQ=True]'."""
        flags = [f"{k}={v}" for k, v in self.args.items() if k in ("ATOMIC_DQ",)]
        return self.name + (f"[{','.join(flags)}]" if flags else "")


class LaunchRecorder:
    """A ``launch`` wrapper for the launchers that records each kernel call instead of running it."""

    def __init__(self):
        self.launches: list[Launch] = []

    def __call__(self, autotuned):  # an autotuned handle (triton.autotune of a @triton.jit function)
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                def record(*args, **kwargs):
                    fn = autotuned.fn
                    bound = dict(zip(fn.arg_names, args))
                    bound.update(kwargs)
                    name = KERNEL_NAMES.get(id(autotuned), fn.__name__)
                    recorder.launches.append(Launch(name, fn, bound))

                return record

        return _Grid()


def planned_launches(dtype: torch.dtype, *, batch=2, heads=4, n=4096, m=4096, d=992, dv=992, deterministic=False) -> list[Launch]:
    """The kernel launches of one forward and one backward on contiguous inputs of this shape."""
    q = torch.empty(batch, heads, n, d, dtype=dtype, device="meta")
    k = torch.empty(batch, heads, m, d, dtype=dtype, device="meta")
    v = torch.empty(batch, heads, m, dv, dtype=dtype, device="meta")
    recorder = LaunchRecorder()
    with attn.options(deterministic=deterministic):
        out, lse = attn.attention_forward(q, k, v, d**-0.5, launch=recorder)
        attn.attention_backward(torch.empty_like(out), q, k, v, out, lse, d**-0.5, launch=recorder)
    return recorder.launches


def ast_source(launch: Launch, config: triton.Config, **overrides) -> ASTSource:
    """The ASTSource the JIT would build for ``launch`` run with ``config``.

    ``overrides`` replace launcher arguments (e.g. DOT_PRECISION="tf32").
    """
    fn = launch.fn
    values = {**launch.args, **overrides, **config.kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, bool):
            raise TypeError(f"{name}: a bool must be a constexpr")
        elif isinstance(value, int):
            if value == 1:
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot specialize {value!r}")
    return ASTSource(fn, signature, constexprs, attrs)


def compile_launch(launch: Launch, config: triton.Config, target: GPUTarget, **overrides):
    """triton.compile of one launch with one config: a CompiledKernel (asm["ptx"], asm["cubin"], metadata.shared)."""
    return triton.compile(
        ast_source(launch, config, **overrides),
        target=target,
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )

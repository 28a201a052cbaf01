"""Ahead-of-time compilation of every Triton SCFT-attention kernel config, without a GPU.

For every GPU generation of aot.GPU_TARGETS (sm_80 A100, sm_86/sm_89 with 99 KiB per block,
sm_90 H100, sm_100 B200, sm_120), each kernel variant a forward/backward launches, and each
config the autotuner may pick there (sketchcolor.kernels.scft_attention.configs_for:
the configs whose shared-memory estimate fits the target), this compiles the kernel with
exactly the arguments the launcher passes (recorded on meta tensors at the paper's shape,
D = Dv = 992) and checks that
  * it compiles to PTX and a cubin,
  * its shared memory (compiled.metadata.shared) fits the target, and the estimate the
    autotuner's prune relies on is an upper bound of it,
  * its PTX uses tensor cores for the dots (mma.sync, or wgmma where Triton picks it on sm_90;
    tcgen05 on sm_100, which is why ``auto`` prefers triton to cuda on 10.x GPUs),
  * it holds no register transpose (tt.trans), which Triton 3.4 to 3.7.0 miscompile on sm_90.
bfloat16 compiles for every target, float16 for one target of each tensor-core instruction
family (FLOAT16_TARGETS). float32 is compiled in IEEE mode (FMA dots: no tensor-core check) and
in TF32 mode, for every target but sm_89 (sm_86's shared memory and instructions).
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("ahead-of-time compilation needs the compiler, not the interpreter (unset TRITON_INTERPRET)", allow_module_level=True)

from sketchcolor.kernels import aot  # noqa: E402
from sketchcolor.kernels import scft_attention as attn  # noqa: E402

TARGETS = aot.GPU_TARGETS
VARIANTS = ("fwd", "bwd_preprocess", "bwd_dkdv[ATOMIC_DQ=True]", "bwd_dkdv[ATOMIC_DQ=False]", "bwd_dq")


def _launches(dtype: torch.dtype) -> dict:
    """variant -> the recorded launch (the deterministic backward adds ATOMIC_DQ=False and bwd_dq)."""
    found = {}
    for deterministic in (False, True):
        for launch in aot.planned_launches(dtype, deterministic=deterministic):
            found.setdefault(launch.variant, launch)
    assert sorted(found) == sorted(VARIANTS), sorted(found)
    return found


def _check_compiled(launch, config, target, smem_limit, elem_size, **overrides):
    compiled = aot.compile_launch(launch, config, target, **overrides)
    shared = compiled.metadata.shared
    where = f"{launch.variant} {config} on sm_{target.arch}"
    assert compiled.asm["cubin"], where
    assert shared <= smem_limit, f"{where}: {shared} bytes of shared memory > {smem_limit}"
    estimate = attn.smem_estimate(launch.name, config, elem_size)
    assert estimate >= shared, f"{where}: the prune's estimate {estimate} is below the real {shared} bytes"
    # Triton 3.4 to 3.7.0 (3.6 on the GPU machines) compute wrong values on sm_90 for a
    # tl.trans of a product's result fed to tl.dot: the kernels transpose only through memory.
    assert "tt.trans" not in compiled.asm["ttir"], f"{where}: a register transpose (tt.trans)"
    return compiled


# float16 differs from bfloat16 only in the products' input type (the same configs, the same
# shared memory), so one target per instruction family (mma.sync, wgmma, tcgen05) proves it; the
# full matrix took CI two minutes more.
FLOAT16_TARGETS = ("sm_80", "sm_90", "sm_100")
SIXTEEN_BIT_CASES = [(name, torch.bfloat16) for name in TARGETS] + [(name, torch.float16) for name in FLOAT16_TARGETS]
FLOAT32_TARGETS = [name for name in TARGETS if name != "sm_89"]


@pytest.mark.parametrize(
    "target_name, dtype", SIXTEEN_BIT_CASES, ids=[f"{name}-{'bf16' if dtype == torch.bfloat16 else 'fp16'}" for name, dtype in SIXTEEN_BIT_CASES]
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pickable_config_compiles_fits_and_uses_tensor_cores(variant, target_name, dtype):
    target, smem_limit = TARGETS[target_name]
    launch = _launches(dtype)[variant]
    configs = attn.configs_for(launch.name, smem_limit, dtype.itemsize)
    assert configs, f"no {variant} config fits {target_name}"
    for config in configs:
        compiled = _check_compiled(launch, config, target, smem_limit, dtype.itemsize)
        if launch.name != "bwd_preprocess":  # the only kernel without a dot
            assert aot.uses_tensor_cores(compiled.asm["ptx"], target), f"{variant} {config}: no tensor-core product in the PTX"


@pytest.mark.parametrize("target_name", FLOAT32_TARGETS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_configs_compile_in_ieee_and_tf32(variant, target_name):
    target, smem_limit = TARGETS[target_name]
    launch = _launches(torch.float32)[variant]
    configs = attn.configs_for(launch.name, smem_limit, 4)
    assert configs, f"no float32 {variant} config fits {target_name}"
    if launch.name == "bwd_preprocess":
        _check_compiled(launch, configs[0], target, smem_limit, 4)
        return
    assert launch.args["DOT_PRECISION"] == "ieee"  # the default
    for config in configs:
        _check_compiled(launch, config, target, smem_limit, 4)
    compiled = _check_compiled(launch, configs[0], target, smem_limit, 4, DOT_PRECISION="tf32")
    assert aot.uses_tensor_cores(compiled.asm["ptx"], target), f"{variant}: tf32 dots without tensor-core products"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_delta_kernel_estimate_bounds_mixed_layouts(dtype):
    """The layouts above are contiguous. A dO with a strided feature axis next to a contiguous O
    (the training step's dO is such a view) makes the compiler convert one tile's layout
    through shared memory: the estimate must still bound it."""
    batch, heads, n, d = 2, 4, 4096, 992
    q = torch.empty(batch, heads, n, d, dtype=dtype, device="meta")
    grad_out = torch.empty(d, batch, heads, n, dtype=dtype, device="meta").permute(1, 2, 3, 0)
    recorder = aot.LaunchRecorder()
    attn.attention_backward(grad_out, q, q, q, torch.empty_like(q), torch.empty(batch, heads, n, device="meta"), d**-0.5, launch=recorder)
    launch = next(launch for launch in recorder.launches if launch.variant == "bwd_preprocess")
    target, smem_limit = TARGETS["sm_90"]
    compiled = _check_compiled(launch, attn.BWD_PREPROCESS_CONFIG, target, smem_limit, dtype.itemsize)
    assert compiled.metadata.shared > 4096, "no layout conversion: the case this test is for did not arise"


@pytest.mark.parametrize("target_name", list(TARGETS))
def test_prune_keeps_exactly_the_configs_proven_here(target_name, monkeypatch):
    """The autotuner's prune, on a device with this target's shared memory, returns only
    configs that configs_for lists (the ones the tests above compile)."""
    _, smem_limit = TARGETS[target_name]
    monkeypatch.setattr(attn, "_device_smem_limit", lambda index: smem_limit)
    for dtype in (torch.bfloat16, torch.float32):
        for launch in aot.planned_launches(dtype):
            autotuned = {
                "fwd": attn.scft_attn_fwd,
                "bwd_preprocess": attn.scft_attn_bwd_preprocess,
                "bwd_dkdv": attn.scft_attn_bwd_dkdv,
                "bwd_dq": attn.scft_attn_bwd_dq,
            }[launch.name]
            prune = autotuned.early_config_prune
            picked = prune(autotuned.configs, launch.args)
            allowed = attn.configs_for(launch.name, smem_limit, dtype.itemsize)
            assert picked and all(c in allowed for c in picked), (launch.variant, dtype)

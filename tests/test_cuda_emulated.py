"""The CUDA kernels run on the CPU, in the CUDA emulator (csrc/emulator), against sketchcolor.reference.

tests/test_cuda_compile.py proves the kernels compile for sm_80 and sm_90a, fit them and use the
tensor cores; tests/test_cuda_attention.py checks their numerics on a GPU. This file runs the same
kernel sources, and the launchers that dispatch them, without a GPU: compiled as host C++ with
SKETCHCOLOR_CUDA_EMULATOR, each CUDA thread a fiber, the tensor-core and copy instructions carried
out by the emulator from their PTX definitions (emulator.h says what is modelled). The emulated
device decides the code path exactly as a real one would: an A100 (8.0) runs the mma.sync kernels,
an H100 (9.0) the wgmma forward and backward GEMMs, and an H100 with SKETCHCOLOR_CUDA_MMA=mma_sync
the mma.sync ones again.

Outputs and workspaces start as NaN, shared memory as 0xFF bytes (NaN); cp.async sources must lie in
the launch's buffers. Rule: max |emulated - float64 reference| <= 2 * max |reference in the same low
precision - float64 reference| + atol (sketchcolor/testing.py), for out, lse and the three gradients.

Skips only where g++ or the CUDA toolkit's headers (cuda_runtime.h, cuda_fp16.h) are missing.
Run: PYTHONPATH=. pytest tests/test_cuda_emulated.py -q  (builds the emulator first, about a minute).
"""
from __future__ import annotations

import glob
import math
import os
import shutil

import pytest
import torch

from conftest import assert_close_to_reference
from test_cuda_compile import CSRC, CUDA_INCLUDE
from sketchcolor.reference import scft_attention as ref_attention

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or CUDA_INCLUDE is None,
    reason="the emulator needs g++ and the CUDA toolkit's headers (cuda_runtime.h)",
)

# Emulated GPUs: (compute capability major, minor, SMs, shared memory per block (opt-in), per SM).
DEVICES = {
    "A100": (8, 0, 108, 163 * 1024, 164 * 1024),
    "H100": (9, 0, 132, 227 * 1024, 228 * 1024),
}
# (device, SKETCHCOLOR_CUDA_MMA, the instruction family that must run).
PATHS = [("A100", "auto", "mma_sync"), ("H100", "auto", "wgmma"), ("H100", "mma_sync", "mma_sync")]
DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    from torch.utils import cpp_extension

    build = tmp_path_factory.mktemp("cuda_emulator")
    # Each kernel file is its own translation unit, as under nvcc (their kernels and helpers live in
    # anonymous namespaces).
    units = []
    for cu in sorted(glob.glob(os.path.join(CSRC, "*", "*_kernel.cu"))):
        unit = build / ("emulated_" + os.path.basename(cu).replace(".cu", ".cpp"))
        unit.write_text(f'#include "{os.path.relpath(cu, CSRC)}"\n')
        units.append(str(unit))
    return cpp_extension.load(
        "sketchcolor_cuda_emulator",
        [os.path.join(CSRC, "emulator", "emulator.cpp"), os.path.join(CSRC, "emulator", "emulator_binding.cpp"), *units],
        extra_cflags=[
            "-O2", "-DSKETCHCOLOR_CUDA_EMULATOR",
            # The CPU wheel of torch ships c10/cuda headers but not the CMake-generated cuda_cmake_macros.h.
            "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            "-Wno-attributes", "-Wno-unknown-pragmas", f"-I{CSRC}", f"-I{CUDA_INCLUDE}",
        ],
        build_directory=str(build),
    )


@pytest.fixture(params=PATHS, ids=lambda p: f"{p[0]}-{p[2]}")
def path(request, emulator, monkeypatch):
    """Emulates the device and instruction family; yields the family that must run."""
    device, choice, family = request.param
    emulator.set_device(*DEVICES[device])
    emulator.set_schedule(False, False)
    monkeypatch.setenv("SKETCHCOLOR_CUDA_MMA", choice)
    return family


class EmulatedAttention(torch.autograd.Function):
    """scft_attention on the emulated cuda backend, (B, H, N, D) CPU tensors."""

    @staticmethod
    def forward(ctx, emulator, q, k, v, scale, key_chunk):
        out, lse = emulator.attn_fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.emulator, ctx.scale, ctx.key_chunk = emulator, scale, key_chunk
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grads = ctx.emulator.attn_bwd(grad_out.contiguous(), q, k, v, out, lse, ctx.scale, ctx.key_chunk)
        return None, *grads, None, None


def make_inputs(batch, heads, n, m, d, dv, dtype, transposed=False):
    def make(rows, cols):
        if transposed:  # (.., cols, rows) storage viewed as (.., rows, cols): last-dim stride != 1
            return torch.randn(batch, heads, cols, rows, dtype=dtype).transpose(-1, -2).requires_grad_()
        return torch.randn(batch, heads, rows, cols, dtype=dtype).requires_grad_()

    return make(n, d), make(m, d), make(m, dv)


def forward_backward(fn, q, k, v, grad_out):
    out, lse = fn(q, k, v)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), grad_out))


def check_against_reference(emulator, family, q, k, v, scale=None, key_chunk=0):
    """out, lse and gradients of the emulated kernels vs the float64 reference (2x rule), and that
    the expected instruction family did the products."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    emulator.reset_stats()
    emulated = forward_backward(lambda *t: EmulatedAttention.apply(emulator, *t, scale, key_chunk), q, k, v, grad_out)
    counts = emulator.stats()
    other = "wgmma" if family == "mma_sync" else "mma_sync"
    # On 9.0 the backward's Delta and P/dS kernels are mma.sync ones; only the forward and GEMMs change.
    assert counts[family] > 0 and (family == "mma_sync" and counts[other] == 0 or family == "wgmma"), counts
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = forward_backward(lambda *t: ref_attention(*t, scale=scale, return_lse=True), *exact_inputs, grad_out.double())
    same = forward_backward(lambda *t: ref_attention(*t, scale=scale, return_lse=True), q, k, v, grad_out)
    for name, a, e, s in zip(("out", "lse", "grad_q", "grad_k", "grad_v"), emulated, exact, same):
        assert a.dtype == s.dtype, f"{name}: dtype {a.dtype}, reference gives {s.dtype}"
        assert_close_to_reference(name, a, e, s)
    return emulated


# (B, H, N, M, D, Dv): N != M, odd sizes, D = Dv = 992 (two 512-wide output slices), D and Dv not
# multiples of 16 (100, 36, 24), Dv = 200 (the 256-wide slice), batch and heads.
SHAPES = [
    (1, 1, 1, 7, 16, 24),
    (2, 3, 7, 1, 64, 16),
    (1, 2, 97, 256, 100, 36),
    (2, 1, 130, 129, 48, 200),
    (1, 1, 130, 97, 992, 992),
    (1, 1, 65, 300, 992, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_emulated_cuda_matches_reference(path, emulator, shape, dtype):
    check_against_reference(emulator, path, *make_inputs(*shape, dtype))


@pytest.mark.parametrize("shape", [(2, 2, 97, 130, 100, 36), (1, 1, 70, 97, 992, 992)], ids=str)
def test_emulated_cuda_non_contiguous_inputs(path, emulator, shape):
    q, k, v = make_inputs(*shape, torch.bfloat16, transposed=True)
    assert q.stride(-1) != 1
    check_against_reference(emulator, path, q, k, v)


def test_emulated_cuda_heads_from_batch_seq_heads_layout(path, emulator):
    # (B, N, H, D) storage viewed as (B, H, N, D): the kernels read the strides as they are.
    q, k, v = (torch.randn(2, n, 3, 40, dtype=torch.float16).transpose(1, 2).requires_grad_() for n in (33, 65, 65))
    assert not q.is_contiguous()
    check_against_reference(emulator, path, q, k, v)


@pytest.mark.parametrize("key_chunk", [128, 256])
def test_emulated_cuda_backward_over_several_key_chunks(path, emulator, key_chunk):
    # M = 300 in chunks of 128: three chunks, the middle one reads and writes the float32 dQ accumulator.
    check_against_reference(emulator, path, *make_inputs(2, 1, 97, 300, 72, 40, torch.bfloat16), key_chunk=key_chunk)


@pytest.mark.parametrize("scale", [0.05, -0.3])
def test_emulated_cuda_custom_scale_and_large_scores(path, emulator, scale):
    q, k, v = make_inputs(1, 2, 33, 300, 24, 8, torch.bfloat16)
    with torch.no_grad():
        q.mul_(8.0)
    check_against_reference(emulator, path, q, k, v, scale=scale)


@pytest.mark.parametrize("m", [1, 127, 129, 300])
def test_emulated_cuda_uniform_attention_is_exact(path, emulator, m):
    # q = 0: every score is 0, so lse = log M and out is the mean of v's rows; a key mask off by one moves both.
    q = torch.zeros(1, 2, 70, 24, dtype=torch.bfloat16)
    k = torch.randn(1, 2, m, 24, dtype=torch.bfloat16)
    v = torch.randn(1, 2, m, 40, dtype=torch.bfloat16)
    out, lse = emulator.attn_fwd(q, k, v, 1.0)
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(m)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.float(), v.float().mean(-2, keepdim=True).expand_as(out), atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("reverse_threads, copies_at_issue", [(True, False), (False, True), (True, True)])
def test_emulated_cuda_results_do_not_depend_on_thread_order_or_copy_timing(path, emulator, reverse_threads,
                                                                             copies_at_issue):
    # A missing barrier or cp.async wait shows as a result that changes with the order fibers run in
    # between barriers, or with when copies land (at issue, or at the wait).
    inputs = make_inputs(1, 1, 130, 200, 136, 264, torch.bfloat16)
    grad_out = torch.randn(1, 1, 130, 264, dtype=torch.bfloat16)
    fn = lambda *t: EmulatedAttention.apply(emulator, *t, 136 ** -0.5, 128)  # noqa: E731
    baseline = forward_backward(fn, *inputs, grad_out)
    emulator.set_schedule(reverse_threads, copies_at_issue)
    varied = forward_backward(fn, *inputs, grad_out)
    for a, b in zip(baseline, varied):
        assert torch.equal(a, b)


# ---- correspondence loss (csrc/correspondence_loss) ----
# Integer-valued q and k (|x| <= 2) make every score exact in fp32 and in float64, so the hardest
# negative must match the definition exactly, ties included (the lowest key index wins).

def integer_inputs(batch, n, m, d, dtype):
    q = torch.randint(-2, 3, (batch, n, d)).to(dtype)
    k = torch.randint(-2, 3, (batch, m, d)).to(dtype)
    pos = torch.randint(-1, m, (batch, n))
    return q, k, pos


def exact_scores(q, k, scale):
    return scale * q.double() @ k.double().transpose(-1, -2)


# (B, N, M, D, (grid h, w), exclusion): odd sizes, D = 3 (many ties), D = 992, keys past one 128-key
# tile and split across CTAs; exclusion windows that leave some queries with no candidate key.
HARDEST_CASES = [
    (1, 7, 12, 3, (3, 4), 1),
    (2, 130, 300, 3, (15, 20), 2),
    (1, 65, 391, 992, (17, 23), 1),
    (3, 33, 9, 40, (3, 3), 0),
    (1, 40, 4, 16, (2, 2), 1),
]


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", HARDEST_CASES, ids=str)
def test_emulated_cuda_hardest_negatives_are_exact(emulator, case, dtype, sms):
    # sms = 1: one key split per query tile; 132: keys split over many CTAs, reduced in the finalize kernel.
    batch, n, m, d, (grid_h, grid_w), exclusion = case
    emulator.set_device(9, 0, sms, 227 * 1024, 228 * 1024)
    emulator.set_schedule(False, False)
    q, k, pos = integer_inputs(batch, n, m, d, dtype)
    scale, margin = 0.5, 3.0
    terms, neg = emulator.corr_hardest(q, k, pos, grid_h, grid_w, exclusion, scale, margin)
    scores = exact_scores(q, k, scale)
    keys = torch.arange(m)
    p = pos.clamp_min(0).unsqueeze(-1)
    distance = torch.maximum((p // grid_w - keys // grid_w).abs(), (p % grid_w - keys % grid_w).abs())
    candidate = distance > exclusion
    has_negative = candidate.any(-1) & (pos >= 0)
    expected_neg = torch.where(has_negative, scores.masked_fill(~candidate, -math.inf).argmax(-1), -1)
    assert torch.equal(neg, expected_neg)
    gathered = scores.gather(-1, expected_neg.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    expected_terms = torch.where(has_negative, torch.relu(gathered - scores.gather(-1, p).squeeze(-1) + margin), 0.0)
    assert torch.equal(terms.double(), expected_terms)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 70, 3, 4), (1, 9, 300, 992, 1)], ids=str)
def test_emulated_cuda_sampled_triplet_terms_are_exact(emulator, shape, dtype):
    batch, n, m, d, negatives = shape
    emulator.set_schedule(False, False)
    q, k, pos = integer_inputs(batch, n, m, d, dtype)
    neg = torch.randint(-1, m, (batch, n, negatives))
    scale, margin = 0.25, 2.0
    terms = emulator.corr_triplet(q, k, pos, neg, scale, margin)
    scores = exact_scores(q, k, scale)
    valid = (pos.unsqueeze(-1) >= 0) & (neg >= 0)
    pos_scores = scores.gather(-1, pos.clamp_min(0).unsqueeze(-1))
    expected = torch.where(valid, torch.relu(scores.gather(-1, neg.clamp_min(0)) - pos_scores + margin), 0.0)
    assert torch.equal(terms.double(), expected)

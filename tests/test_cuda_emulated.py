"""The CUDA backend runs on the CPU, in the CUDA emulator (csrc/emulator), against sketchcolor.reference.

tests/test_cuda_compile.py proves the kernels compile for every target, fit them and use the
tensor cores; tests/test_cuda_attention.py and tests/test_cuda_correspondence.py check the backend on
a GPU. This file runs the same sources without a GPU: the kernel files and the torch bindings
(csrc/<op>/<op>_cuda.cpp), compiled as host C++ with SKETCHCOLOR_CUDA_EMULATOR. Each CUDA thread is a
fiber; the tensor-core and copy instructions are carried out by the emulator from their PTX
definitions (emulator.h says what is modelled); the bindings reach the emulated device through
common/cuda_binding.h and take CPU tensors. Their ops register as sketchcolor_emulated::<op>, get the
package's own autograd and fake kernels, and stand in for the cuda backend here (the
emulated_cuda_backend fixture): impl="cuda" then runs the whole chain, from the public op through
the binding's checks, plans and ATen glue to the kernels.

The emulated device decides the code path exactly as a real one would: an A100 (8.0) runs the
mma.sync kernels, an H100 (9.0) the wgmma forward and backward GEMMs, an H100 with
SKETCHCOLOR_CUDA_MMA=mma_sync the mma.sync ones again, and an RTX 4090 (8.9, 99 KiB per block)
the mma.sync kernels with the compact (2-stage) forward and probability kernels; a B200 (10.0) and
an RTX 5090 (12.0, 99 KiB) run the mma.sync kernels with the full and the compact rings.

Every CPU allocation during a test is emulated device memory: it starts as NaN (an out-of-range
value in integer tensors), so an output or workspace element the kernels never write fails the
comparison; it ends at an inaccessible page (a few tests put its start there instead), so a kernel
reaching past it fails the launch; shared memory starts as 0xFF bytes (NaN); cp.async sources must lie in allocated
buffers. Rule: max |emulated - float64 reference| <= 2 * max |reference in the same low precision -
float64 reference| + atol (sketchcolor/testing.py).

Skips only where g++, ninja or the CUDA toolkit's headers (cuda_runtime.h, cuda_fp16.h) are missing
(tests/cuda_emulator.py builds the emulator).
Run: PYTHONPATH=. pytest tests/test_cuda_emulated.py -q  (builds the emulator first, about a minute).
"""
from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch

from conftest import assert_close_to_reference
from cuda_emulator import DEVICES, binding_peak_bytes, load_emulator, memory_cases, unavailable_reason
from test_cuda_attention import check_against_reference as check_cuda_against_reference
from test_cuda_attention import forward_backward
from test_cuda_attention import make_inputs as make_cuda_inputs
from test_correspondence_loss import (
    MODES,
    check_all_invalid,
    check_all_negatives_missing,
    check_deterministic,
    check_empty,
    check_hardest,
    check_hardest_ties,
    check_hardest_without_candidates,
    check_nan_reaches_the_loss,
    check_small_margin_and_strided_inputs,
    check_triplet_backward_ignores_missing_keys,
    compare_with_reference,
    make_case,
)
from sketchcolor import reference
from sketchcolor.ops import _backends, correspondence_loss, scft_attention

attention_module = importlib.import_module("sketchcolor.ops.scft_attention")
correspondence_module = importlib.import_module("sketchcolor.ops.correspondence_loss")

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

# (device, SKETCHCOLOR_CUDA_MMA, the instruction family that must run).
# The RTX 4090 (8.9) grants 99 KiB per block: the mma.sync kernels with the compact (2-stage)
# forward and probability kernels.
PATHS = [("A100", "auto", "mma_sync"), ("H100", "auto", "wgmma"), ("H100", "mma_sync", "mma_sync"),
         ("RTX4090", "auto", "mma_sync")]
DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def emulator():
    return load_emulator()


@pytest.fixture(autouse=True)
def emulated_cuda_backend(emulator, monkeypatch):
    """impl="cuda" runs the emulated bindings on CPU tensors, on an emulated A100 unless the test
    picks another device; every allocation of the test is emulated device memory."""
    emulator.set_device(*DEVICES["A100"])
    emulator.set_schedule()
    emulator.set_binding_options()
    emulator.set_guarded_edge("end")
    resolve = _backends.resolve

    def resolve_cuda_to_emulator(impl, device, op_name, dtype=None):
        return "cuda" if impl == "cuda" else resolve(impl, device, op_name, dtype)

    monkeypatch.setattr(_backends, "resolve", resolve_cuda_to_emulator)
    monkeypatch.setitem(attention_module._FORWARD_OPS, "extension", emulator.attention_fwd)
    monkeypatch.setitem(correspondence_module._FORWARD_OPS, "extension", emulator.correspondence_ops)
    was_on = emulator.use_device_allocator(True)
    yield
    emulator.use_device_allocator(was_on)


@pytest.fixture(params=PATHS, ids=lambda p: f"{p[0]}-{p[2]}")
def path(request, emulator, monkeypatch):
    """Emulates the device and instruction family; yields the family that must run."""
    device, choice, family = request.param
    emulator.set_device(*DEVICES[device])
    monkeypatch.setenv("SKETCHCOLOR_CUDA_MMA", choice)
    return family


def make_inputs(batch, heads, n, m, d, dv, dtype, transposed=False):
    return make_cuda_inputs(batch, heads, n, m, d, dv, dtype, transposed, device="cpu")


def emulated_attention(scale=None):
    return lambda q, k, v: scft_attention(q, k, v, scale, impl="cuda", return_lse=True)


def check_family(emulator, family):
    """The expected tensor-core instruction family did the products since the last reset_stats."""
    counts = emulator.stats()
    other = "wgmma" if family == "mma_sync" else "mma_sync"
    # On 9.0 the backward's Delta and P/dS kernels are mma.sync ones; only the forward and GEMMs change.
    assert counts[family] > 0 and (family == "mma_sync" and counts[other] == 0 or family == "wgmma"), counts


def check_against_reference(emulator, family, q, k, v, scale=None):
    """The GPU tests' comparison of impl="cuda" (here emulated) with the float64 reference, and that
    the expected instruction family did the products."""
    emulator.reset_stats()
    check_cuda_against_reference(q, k, v, scale)
    check_family(emulator, family)


def test_emulator_reports_accesses_outside_a_buffer(emulator):
    # Device buffers end (rounded up to 16 bytes) at an inaccessible page: a kernel's plain load or
    # store past the end is the launch's error, naming the access and the buffer.
    t = torch.empty(40, dtype=torch.uint8)
    assert emulator.access_byte(t, 39, store=True) == "" and emulator.access_byte(t, 47, store=False) == ""
    for store, kind in ((True, "store"), (False, "load")):
        error = emulator.access_byte(t, 48, store=store)
        assert f"global {kind} at" in error and "8 bytes past the end of a 40-byte buffer" in error, error
    assert torch.isnan(torch.empty(3, dtype=torch.bfloat16)).all()   # fresh device memory is NaN
    # With the start guarded instead, the byte before the buffer faults; the slack past its end is NaN.
    emulator.set_guarded_edge("start")
    t = torch.empty(40, dtype=torch.uint8)
    assert emulator.access_byte(t, 0, store=True) == "" and emulator.access_byte(t, 100, store=False) == ""
    for store, kind in ((True, "store"), (False, "load")):
        error = emulator.access_byte(t, -3, store=store)
        assert f"global {kind} at" in error and "3 bytes before the start of a 40-byte buffer" in error, error
    assert torch.isnan(torch.empty(5)).all()
    with pytest.raises(RuntimeError, match="edge must be 'end' or 'start'"):
        emulator.set_guarded_edge("middle")


# (B, H, N, M, D, Dv): N != M, odd sizes, D = Dv = 992 (two 512-wide output slices), D and Dv not
# multiples of 16 (99, 37, 24; odd ones take element-wise tails and unpaired stores), Dv = 200 (the
# 256-wide slice), batch and heads.
SHAPES = [
    (1, 1, 1, 7, 16, 24),
    (2, 3, 7, 1, 64, 16),
    (1, 2, 97, 256, 99, 37),
    (2, 1, 130, 129, 48, 200),
    (1, 1, 130, 97, 992, 992),
    (1, 1, 65, 300, 992, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_emulated_cuda_matches_reference(path, emulator, shape, dtype):
    check_against_reference(emulator, path, *make_inputs(*shape, dtype))


# Shapes of the GPU tests past a thousand rows: 9 query tiles against 1 key tile with D = 992, the
# reverse with Dv = 992 (two output slices), and 9 x 9 tiles.
LONG_SHAPES = [(1, 1, 1025, 97, 992, 64), (1, 1, 97, 1025, 64, 992), (1, 1, 1025, 1025, 64, 64)]


@pytest.mark.parametrize("shape", LONG_SHAPES, ids=str)
def test_emulated_cuda_shapes_past_a_thousand_rows(path, emulator, shape):
    check_against_reference(emulator, path, *make_inputs(*shape, torch.bfloat16))


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
    emulator.set_binding_options(key_chunk_limit=key_chunk)
    check_against_reference(emulator, path, *make_inputs(2, 1, 97, 300, 72, 40, torch.bfloat16))


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
    out, lse = emulated_attention(1.0)(q, k, v)
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(m)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.float(), v.float().mean(-2, keepdim=True).expand_as(out), atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize(
    "schedule",
    [dict(reverse_threads=True), dict(shuffle_seed=20261207), dict(copies_at_issue=True), dict(reverse_blocks=True),
     dict(reverse_threads=True, reverse_blocks=True, copies_at_issue=True)],
    ids=lambda s: "+".join(f"{k}={v}" if not isinstance(v, bool) else k for k, v in s.items()),
)
def test_emulated_cuda_results_do_not_depend_on_thread_or_block_order_or_copy_timing(path, emulator, schedule):
    # A missing barrier or cp.async wait shows as a result that changes with the order fibers run in
    # between barriers, or with when copies land (at issue, or at the wait); blocks writing the same
    # output, or relying on an order among themselves, as one that changes with the block order.
    emulator.set_binding_options(key_chunk_limit=128)
    inputs = make_inputs(1, 1, 130, 200, 136, 264, torch.bfloat16)
    grad_out = torch.randn(1, 1, 130, 264, dtype=torch.bfloat16)
    baseline = forward_backward(emulated_attention(), *inputs, grad_out)
    emulator.set_schedule(**schedule)
    varied = forward_backward(emulated_attention(), *inputs, grad_out)
    for a, b in zip(baseline, varied):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES[:4] + [(1, 1, 70, 97, 992, 992)], ids=str)
def test_emulated_cuda_attention_reads_nothing_before_its_buffers(path, emulator, shape):
    # The other tests guard the end of every buffer; here the start: a row or column index of -1,
    # or a pointer stepped back before a loop, faults at its first byte.
    emulator.set_guarded_edge("start")
    check_against_reference(emulator, path, *make_inputs(*shape, torch.bfloat16))


def test_emulated_cuda_empty_queries():
    q, k, v = make_inputs(2, 3, 0, 7, 16, 5, torch.bfloat16)
    out, lse = emulated_attention()(q, k, v)
    assert out.shape == (2, 3, 0, 5) and lse.shape == (2, 3, 0)
    out.sum().backward()
    assert k.grad.abs().sum() == 0 and v.grad.abs().sum() == 0


def test_emulated_cuda_opcheck_attention(emulator):
    # The binding returns what the package's fake kernels promise (shapes, dtypes, contiguous
    # gradients whatever the inputs' strides), and autograd is registered on the op.
    q, k, v = make_inputs(1, 2, 33, 40, 24, 16, torch.bfloat16, transposed=True)
    torch.library.opcheck(torch.ops.sketchcolor_emulated.scft_attn_fwd.default, (q, k, v, 0.3))
    out, lse = torch.ops.sketchcolor_emulated.scft_attn_fwd(q.detach(), k.detach(), v.detach(), 0.3)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.3)
    torch.library.opcheck(torch.ops.sketchcolor_emulated.scft_attn_bwd.default, args)


def test_emulated_cuda_binding_rejects_what_its_kernels_cannot_take(emulator):
    ops = torch.ops.sketchcolor_emulated
    q, k, v = (t.detach() for t in make_inputs(1, 1, 5, 6, 16, 8, torch.float32))
    with pytest.raises(RuntimeError, match=r"float16 or bfloat16.*impl=\"triton\".*impl=\"cpp\""):
        ops.scft_attn_fwd(q, k, v, 0.25)
    q, k, v = (torch.zeros(65536, 1, 1, 8, dtype=torch.bfloat16) for _ in range(3))
    with pytest.raises(RuntimeError, match=r"B \* H = 65536 exceeds 65535"):
        ops.scft_attn_fwd(q, k, v, 0.25)


def test_emulated_cuda_mma_choice_is_checked(emulator, monkeypatch):
    q, k, v = (t.detach() for t in make_inputs(1, 1, 5, 6, 16, 8, torch.bfloat16))
    monkeypatch.setenv("SKETCHCOLOR_CUDA_MMA", "tensor_cores")
    with pytest.raises(RuntimeError, match="SKETCHCOLOR_CUDA_MMA must be auto, mma_sync or wgmma, got 'tensor_cores'"):
        emulated_attention()(q, k, v)
    monkeypatch.setenv("SKETCHCOLOR_CUDA_MMA", "wgmma")   # the emulated device is an A100
    with pytest.raises(RuntimeError, match=r"wgmma needs a compute capability 9.0 GPU.*is 8.0"):
        emulated_attention()(q, k, v)
    emulator.set_device(*DEVICES["B200"])                 # 10.0 has no wgmma either
    with pytest.raises(RuntimeError, match=r"wgmma needs a compute capability 9.0 GPU.*is 10.0"):
        emulated_attention()(q, k, v)


@pytest.mark.parametrize(
    "device, stages, compact",
    [("A100", "auto", False), ("A100", "compact", True), ("RTX4090", "auto", True), ("RTX4090", "compact", True),
     ("B200", "auto", False), ("RTX5090", "auto", True)],
)
def test_emulated_cuda_copy_ring_follows_the_device_and_the_environment(emulator, monkeypatch, device, stages, compact):
    # D = Dv = 992: the forward's 512-wide slices need 149 KiB with 4 stages and 84 KiB with 2 (the
    # backward's probability kernel 108 and 72 KiB). The compact configurations are what a 99 KiB
    # device (8.6, 8.9, 12.x) runs, and what SKETCHCOLOR_CUDA_STAGES=compact asks for anywhere. A
    # B200 (10.0) runs the mma.sync kernels with the full rings.
    emulator.set_device(*DEVICES[device])
    monkeypatch.setenv("SKETCHCOLOR_CUDA_STAGES", stages)
    inputs = make_inputs(1, 1, 70, 97, 992, 992, torch.bfloat16)
    emulator.reset_stats()
    check_against_reference(emulator, "mma_sync", *inputs)
    peak = emulator.stats()["dynamic_smem_peak"]
    if compact:
        assert peak == _backends.CUDA_SMEM_PER_BLOCK <= 99 * 1024, peak
    else:
        assert peak > 99 * 1024, peak


def test_emulated_cuda_stages_choice_is_checked(emulator, monkeypatch):
    q, k, v = (t.detach() for t in make_inputs(1, 1, 5, 6, 16, 8, torch.bfloat16))
    monkeypatch.setenv("SKETCHCOLOR_CUDA_STAGES", "deep")
    with pytest.raises(RuntimeError, match="SKETCHCOLOR_CUDA_STAGES must be auto or compact, got 'deep'"):
        emulated_attention()(q, k, v)


def test_emulated_cuda_launch_errors_reach_the_caller(emulator):
    # A GPU granting 64 KiB per block (no 8.x GPU does): even the compact forward does not fit, the
    # launchers' cudaFuncSetAttribute fails and the binding raises with the launcher's error,
    # instead of returning unwritten outputs.
    emulator.set_device(8, 0, 108, 64 * 1024, 64 * 1024)
    q, k, v = (t.detach() for t in make_inputs(1, 1, 5, 6, 16, 8, torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"scft_attn_fwd \(emulated cuda backend\): launch failed"):
        emulated_attention()(q, k, v)


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
    q, k, pos = integer_inputs(batch, n, m, d, dtype)
    scale, margin = 0.5, 3.0
    terms, neg = torch.ops.sketchcolor_emulated.corr_hardest_fwd(q, k, pos, grid_h, grid_w, exclusion, scale, margin)
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
    q, k, pos = integer_inputs(batch, n, m, d, dtype)
    neg = torch.randint(-1, m, (batch, n, negatives))
    scale, margin = 0.25, 2.0
    terms = torch.ops.sketchcolor_emulated.corr_triplet_fwd(q, k, pos, neg, scale, margin)
    scores = exact_scores(q, k, scale)
    valid = (pos.unsqueeze(-1) >= 0) & (neg >= 0)
    pos_scores = scores.gather(-1, pos.clamp_min(0).unsqueeze(-1))
    expected = torch.where(valid, torch.relu(scores.gather(-1, neg.clamp_min(0)) - pos_scores + margin), 0.0)
    assert torch.equal(terms.double(), expected)


# The loss through the public op (impl="cuda", emulated): the same checks as the GPU tests of
# tests/test_cuda_correspondence.py, from tests/test_correspondence_loss.py.
# (B, H or None, N, M, key_grid, D): one query; odd N != M; a head axis with D = 100 (padded rows);
# several query and key tiles with D = 992.
CORRESPONDENCE_SHAPES = [
    (1, None, 1, 7, (1, 7), 16),
    (2, None, 37, 45, (5, 9), 24),
    (1, 2, 33, 63, (7, 9), 100),
    (1, None, 129, 300, (15, 20), 992),
]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CORRESPONDENCE_SHAPES, ids=str)
def test_emulated_cuda_correspondence_loss_matches_reference(shape, dtype, mode):
    q, k, pos, kwargs = make_case(*shape, dtype, **MODES[mode])
    if mode == "hardest":
        check_hardest(q, k, pos, kwargs, impl="cuda")
    else:
        compare_with_reference(q, k, pos, kwargs, impl="cuda")


@pytest.mark.parametrize("mode", list(MODES))
def test_emulated_cuda_correspondence_loss_reads_nothing_before_its_buffers(emulator, mode):
    # pos and neg of -1 mark missing keys: a kernel gathering row -1 of k, or a scatter writing it,
    # would touch the bytes just before k (or grad_k). Those fault here, with buffer starts guarded.
    emulator.set_guarded_edge("start")
    for shape in CORRESPONDENCE_SHAPES:
        q, k, pos, kwargs = make_case(*shape, torch.bfloat16, **MODES[mode])
        if mode == "hardest":
            check_hardest(q, k, pos, kwargs, impl="cuda")
        else:
            compare_with_reference(q, k, pos, kwargs, impl="cuda")
    check_all_invalid(mode, "cuda", dtype=torch.bfloat16)


def test_emulated_cuda_nll_loss_on_each_path(path, emulator):
    # nll runs the attention forward (wgmma on 9.0) and the value-gradient GEMMs.
    q, k, pos, kwargs = make_case(2, None, 70, 130, (10, 13), 40, torch.bfloat16, **MODES["nll"])
    emulator.reset_stats()
    compare_with_reference(q, k, pos, kwargs, impl="cuda")
    check_family(emulator, path)


def test_emulated_cuda_nll_value_gradient_over_several_key_chunks(emulator):
    # M = 300 in chunks of 128: P^T q of each chunk goes to its own rows of grad_k.
    emulator.set_binding_options(key_chunk_limit=128)
    q, k, pos, kwargs = make_case(1, None, 97, 300, (15, 20), 24, torch.bfloat16, **MODES["nll"])
    compare_with_reference(q, k, pos, kwargs, impl="cuda")


def test_emulated_cuda_nll_without_gradient_matches_reference():
    # Under no_grad the binding computes lse with a 1-wide value slice (no attention output).
    q, k, pos, kwargs = make_case(2, None, 129, 300, (15, 20), 100, torch.bfloat16, **MODES["nll"])
    with torch.no_grad():
        fused = correspondence_loss(q, k, pos, impl="cuda", **kwargs)
        exact = reference.correspondence_loss(q.double(), k.double(), pos, **kwargs)
    assert fused.item() == pytest.approx(exact.item(), rel=1e-2)


@pytest.mark.parametrize("mode", list(MODES))
def test_emulated_cuda_small_margin_and_strided_inputs(mode):
    check_small_margin_and_strided_inputs(mode, "cuda", torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_cuda_hardest_ties_pick_the_lowest_index(dtype):
    check_hardest_ties(dtype, impl="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_cuda_nan_reaches_the_loss(dtype):
    check_nan_reaches_the_loss("cuda", dtype)


@pytest.mark.parametrize("mode", list(MODES))
def test_emulated_cuda_validity_all_invalid_and_empty(mode):
    check_all_invalid(mode, "cuda", dtype=torch.bfloat16)
    for batch, n in ((2, 0), (0, 5)):
        check_empty(mode, "cuda", batch, n, dtype=torch.bfloat16)


def test_emulated_cuda_queries_without_candidates_and_missing_negatives():
    check_hardest_without_candidates("cuda", torch.bfloat16, rel=1e-5)
    check_all_negatives_missing("cuda", torch.bfloat16)


@pytest.mark.parametrize("mode", list(MODES))
def test_emulated_cuda_correspondence_loss_is_deterministic(emulator, mode):
    # Many queries share one key: the key-gradient scatter (sort, then one ordered sum per key).
    # The second run has threads and blocks in reverse order and copies landing at issue.
    case = make_case(1, None, 300, 70, (7, 10), 32, torch.bfloat16, **MODES[mode])
    reorder = lambda: emulator.set_schedule(reverse_threads=True, reverse_blocks=True, copies_at_issue=True)  # noqa: E731
    check_deterministic(*case, impl="cuda", between=reorder)


def test_emulated_cuda_triplet_backward_ignores_missing_keys_given_any_terms():
    check_triplet_backward_ignores_missing_keys(torch.ops.sketchcolor_emulated.corr_triplet_bwd)


def test_emulated_cuda_opcheck_correspondence_ops():
    q, k, pos, kwargs = make_case(2, None, 9, 12, (3, 4), 8, torch.bfloat16, **MODES["triplet_t4"])
    neg, ops = kwargs["neg"], torch.ops.sketchcolor_emulated
    terms = ops.corr_triplet_fwd(q.detach(), k.detach(), pos, neg, 0.3, 2.0)
    qt, kt = (t.detach().mT.contiguous().mT for t in (q, k))
    cases = [
        (ops.corr_triplet_fwd.default, (q, k, pos, neg, 0.3, 2.0)),
        (ops.corr_hardest_fwd.default, (q, k, pos, 3, 4, 1, 0.3, 2.0)),
        (ops.corr_nll_loss.default, (q, k, pos, 0.3, True)),
        (ops.corr_nll_loss.default, (q.detach(), k.detach(), pos, 0.3, False)),
        (ops.corr_triplet_bwd.default, (torch.randn_like(terms), qt, kt, pos, neg, terms, 0.3)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_emulated_cuda_index_checks_on_the_host_and_under_graph_capture(emulator):
    # Outside a capture the binding copies the index range to the host and names it; while the
    # stream is captured it asserts on the device instead (on a CPU tensor: at once).
    q, k, pos, kwargs = make_case(2, None, 9, 12, (3, 4), 8, torch.bfloat16, **MODES["triplet_t4"])
    q, k, neg, ops = q.detach(), k.detach(), kwargs["neg"], torch.ops.sketchcolor_emulated
    with pytest.raises(RuntimeError, match=r"neg values must be in \[-1, M\) = \[-1, 12\), got values in \[19, "):
        ops.corr_triplet_fwd(q, k, pos, neg + 20, 0.3, 2.0)
    host = ops.corr_triplet_fwd(q, k, pos, neg, 0.3, 2.0)
    emulator.set_binding_options(capturing=True)
    assert torch.equal(ops.corr_triplet_fwd(q, k, pos, neg, 0.3, 2.0), host)
    with pytest.raises(RuntimeError, match=r"neg values must be in \[-1, M\) = \[-1, 12\)") as device_side:
        ops.corr_triplet_fwd(q, k, pos, neg + 20, 0.3, 2.0)
    assert "got values" not in str(device_side.value)   # no copy to the host: the values are not known
    with pytest.raises(RuntimeError, match=r"pos values must be in \[-1, M\)"):
        ops.corr_nll_loss(q, k, pos - 5, 0.3, True)
    with pytest.raises(RuntimeError, match="key_grid"):
        ops.corr_hardest_fwd(q, k, pos, 5, 3, 1, 0.3, 2.0)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        ops.corr_nll_loss(q.float(), k.float(), pos, 0.3, False)


def host_reads(run):
    """The values run() copies to the host (aten::_local_scalar_dense, what .item() runs), other than
    those of aten::_assert_async, which on a GPU stays on the device (on the CPU it reads at once)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    reads = []
    for event in profile.events():
        callers, parent = [], event.cpu_parent
        while parent is not None:
            callers.append(parent.name)
            parent = parent.cpu_parent
        if event.name == "aten::_local_scalar_dense" and "aten::_assert_async" not in callers:
            reads.append(callers)
    return reads


def test_emulated_cuda_ops_never_read_values_on_the_host_while_capturing(emulator):
    # A copy to the host would end a CUDA graph capture: while the stream is captured, no op of the
    # bindings may make one. Outside a capture the correspondence ops check their index range on
    # the host, which shows the profile sees reads made inside the ops.
    q, k, pos, kwargs = make_case(2, None, 9, 12, (3, 4), 8, torch.bfloat16, **MODES["triplet_t4"])
    q, k, neg, ops = q.detach(), k.detach(), kwargs["neg"], torch.ops.sketchcolor_emulated
    terms = ops.corr_triplet_fwd(q, k, pos, neg, 0.3, 2.0)
    correspondence_calls = [
        lambda: ops.corr_triplet_fwd(q, k, pos, neg, 0.3, 2.0),
        lambda: ops.corr_triplet_bwd(torch.ones_like(terms), q, k, pos, neg, terms, 0.3),
        lambda: ops.corr_hardest_fwd(q, k, pos, 3, 4, 1, 0.3, 2.0),
        lambda: ops.corr_nll_loss(q, k, pos, 0.3, True),
        lambda: ops.corr_nll_loss(q, k, pos, 0.3, False),
    ]
    qa, ka, va = (t.detach() for t in make_inputs(1, 2, 33, 40, 24, 16, torch.bfloat16))
    out, lse = ops.scft_attn_fwd(qa, ka, va, 0.3)
    attention_calls = [
        lambda: ops.scft_attn_fwd(qa, ka, va, 0.3),
        lambda: ops.scft_attn_bwd(torch.ones_like(out), qa, ka, va, out, lse, 0.3),
    ]
    for call in correspondence_calls:
        assert host_reads(call), "outside a capture the index range is read on the host"
    emulator.set_binding_options(capturing=True)
    for call in correspondence_calls + attention_calls:
        assert host_reads(call) == []


def test_emulated_cuda_memory_grows_linearly_with_n(emulator):
    # The bindings' allocations at the target size, the kernels not run (run_blocks = False): twice
    # the tokens must cost at most about twice the memory (O(N * D)), never the 4x of an N x M matrix.
    emulator.set_device(*DEVICES["H100"])
    emulator.set_schedule(run_blocks=False)
    peaks = {n: {name: binding_peak_bytes(emulator, call) for name, call in memory_cases(n).items()}
             for n in (8192, 16384)}
    for name, small in peaks[8192].items():
        assert peaks[16384][name] <= 2.2 * small, (name, peaks)


def test_emulated_cuda_inside_the_scft_module_under_bf16_autocast():
    # How training uses the op on a GPU: SCFT's projections under bf16 autocast hand the attention
    # bf16 q, k and v from transposed feature maps. Output and the gradients of the inputs and
    # projection weights against the float64 module, by the 2x rule, with the same module on the
    # materialized reference under the same autocast as the same-precision reference.
    import copy

    from sketchcolor.models.scft import SCFT

    dim = 40
    fused = SCFT(dim, attn_impl="cuda")
    same, exact = copy.deepcopy(fused), copy.deepcopy(fused).double()
    same.attn_impl = exact.attn_impl = "reference"
    sketch, reference_map = torch.randn(2, dim, 5, 7), torch.randn(2, dim, 6, 4)
    upstream = torch.randn(2, dim, 5, 7)

    def run(module, dtype, autocast):
        s, r = (t.to(dtype).requires_grad_() for t in (sketch, reference_map))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            features = module(s, r).features
        weights = (module.query.weight, module.key.weight, module.value.weight)
        return (features, *torch.autograd.grad(features, (s, r, *weights), upstream.to(features.dtype)))

    results = run(fused, torch.float32, True), run(exact, torch.float64, False), run(same, torch.float32, True)
    names = ("features", "grad_sketch", "grad_reference", "grad_query_weight", "grad_key_weight", "grad_value_weight")
    for name, a, e, s in zip(names, *results):
        assert_close_to_reference(name, a, e, s)


@pytest.mark.parametrize("device, dtype", [("A100", torch.float16), ("H100", torch.bfloat16)], ids=str)
def test_emulated_cuda_runs_the_gpu_smoke_script_cases(emulator, device, dtype):
    # benchmarks/cuda_smoke.py gives compute-sanitizer every cuda kernel once on a lent GPU. Its
    # cases run here first, through the benchmarks' own workload code on the emulated device, so
    # a GPU's few minutes are not lost to a broken script.
    import importlib.util
    import pathlib

    from sketchcolor.benchmarking.cases import make_inputs as make_case_inputs
    from sketchcolor.benchmarking.cases import workload

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_smoke.py"
    spec = importlib.util.spec_from_file_location("cuda_smoke", path)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    emulator.set_device(*DEVICES[device])
    for case in smoke.cases(dtype):
        case = dataclasses.replace(case, device="cpu")
        emulator.reset_stats()
        outputs = workload(case, make_case_inputs(case), "fwd+bwd")()
        assert emulator.stats()["blocks"] > 0, case
        assert all(torch.isfinite(t).all() for t in outputs if isinstance(t, torch.Tensor)), case


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_cuda_passes_sketchcolor_verify_quick(emulator, dtype):
    # The cuda rows of `sketchcolor verify --quick`, the user's check on a GPU (run_on_gpu.sh runs
    # it): verify's own cases, kink clearing and comparison rules, on the emulated device.
    from sketchcolor import verify

    rows = [verify.check_case(case, seed=0) for op in ("attention", "correspondence")
            for case in verify._sweep(op, "cuda", dtype, "cpu", quick=True)]
    failed = [(row.op, row.shape, row.note) for row in rows if row.result != "PASS"]
    assert len(rows) == 8 and not failed, failed

"""cuda backend of scft_attention (csrc/scft_attention/*_kernel.cu) against sketchcolor.reference.

GPU only: every test skips cleanly without a CUDA device or without a CUDA build of the extension.
Rule (sketchcolor/testing.py, through tests/conftest.py): max |cuda - float64 reference| <= 2 * max |reference in the same low
precision - float64 reference| + a small atol, for out, lse and the three gradients.

Every test runs with each tensor-core instruction family the device has (the mma_choice fixture,
SKETCHCOLOR_CUDA_MMA: mma.sync everywhere, wgmma on compute capability 9.0).

Outputs are poisoned before the kernels write them: the op allocates them itself, so the tests
first fill and free blocks of the CUDA caching allocator with NaN (the op's allocations of the
same sizes reuse those blocks), and every output is checked to be finite.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close_to_reference
from test_cuda_compile import expected_plan
from sketchcolor.ops import scft_attention
from sketchcolor.reference import scft_attention as ref_attention


def _cuda_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    from sketchcolor.ops import _backends

    return _backends.unavailable_reason("cuda", torch.device("cuda"), "scft_attn_fwd")


_REASON = _cuda_unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")]

DEVICE = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
# The tensor-core instruction families (SKETCHCOLOR_CUDA_MMA): mma.sync on every device, wgmma on
# compute capability 9.0, where it is also what "auto" picks.
MMA_CHOICES = ["mma_sync", "wgmma"]


@pytest.fixture(autouse=True, params=MMA_CHOICES)
def mma_choice(request, monkeypatch):
    """Every test runs once per tensor-core instruction family that the device has."""
    if request.param == "wgmma" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernels run on compute capability 9.0 only")
    monkeypatch.setenv("SKETCHCOLOR_CUDA_MMA", request.param)
    return request.param

# (B, H or None, N, M, D, Dv): N != M, N and M from {1, 7, 97, 256, 1025}, D from {16, 64, 100, 992},
# Dv != D except the paper's D = Dv = 992; Dv = 992 needs two 512-wide output slices in the forward;
# Dv = 200 runs the 256-wide slice configuration.
SHAPES = [
    (1, None, 1, 7, 16, 24),
    (3, None, 7, 1, 64, 16),
    (1, 2, 97, 256, 100, 64),
    (3, None, 256, 97, 64, 100),
    (1, None, 1025, 97, 992, 64),
    (1, None, 97, 1025, 64, 992),
    (3, 2, 7, 256, 992, 100),
    (1, 2, 1025, 7, 16, 992),
    (3, None, 256, 1025, 100, 16),
    (2, None, 256, 97, 992, 992),
    (2, 2, 130, 129, 48, 200),
]


def make_inputs(batch, heads, n, m, d, dv, dtype, transposed=False, device=DEVICE):
    lead = (batch,) if heads is None else (batch, heads)

    def make(rows, cols):
        if transposed:  # (.., cols, rows) storage viewed as (.., rows, cols): last-dim stride != 1
            return torch.randn(*lead, cols, rows, dtype=dtype, device=device).transpose(-1, -2).requires_grad_()
        return torch.randn(*lead, rows, cols, dtype=dtype, device=device).requires_grad_()

    return make(n, d), make(m, d), make(m, dv)


def poison_allocator(*shapes_and_dtypes):
    """Leaves NaN-filled free blocks of these sizes in the caching allocator for the op to reuse."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) for shape, dtype in shapes_and_dtypes]
    torch.cuda.synchronize()
    del blocks


def forward_backward(fn, q, k, v, grad_out):
    out, lse = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return (out, lse, *grads)


def check_against_reference(q, k, v, scale=None):
    """out, lse and the gradients of impl='cuda' vs the float64 reference (2x rule). On CPU tensors
    (the CUDA emulator's device, tests/test_cuda_emulated.py) fresh memory is NaN already."""
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse_shape = tuple(q.shape[:-1])
    if q.is_cuda:
        poison_allocator(
            (tuple(q.shape[:-1]) + (v.shape[-1],), q.dtype), (lse_shape, torch.float32),
            (tuple(q.shape), q.dtype), (tuple(k.shape), k.dtype), (tuple(v.shape), v.dtype),
        )
    fused = forward_backward(lambda *t: scft_attention(*t, scale=scale, impl="cuda", return_lse=True), q, k, v, grad_out)
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = forward_backward(lambda *t: ref_attention(*t, scale=scale, return_lse=True), *exact_inputs, grad_out.double())
    same = forward_backward(lambda *t: ref_attention(*t, scale=scale, return_lse=True), q, k, v, grad_out)
    for name, a, e, s in zip(("out", "lse", "grad_q", "grad_k", "grad_v"), fused, exact, same):
        assert a.dtype == s.dtype, f"{name}: dtype {a.dtype}, reference gives {s.dtype}"
        assert_close_to_reference(name, a, e, s)
    return fused


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cuda_matches_reference(shape, dtype):
    check_against_reference(*make_inputs(*shape, dtype))


# The compact configurations (2-stage copy rings) are what GPUs granting 99 KiB per block (8.6, 8.9)
# run; SKETCHCOLOR_CUDA_STAGES=compact runs them here too: Dv of one 128-wide slice, of one 256-wide
# slice, and two 512-wide slices, over several key tiles and key chunks.
@pytest.mark.parametrize("shape", [(2, 3, 97, 300, 100, 36), (1, None, 256, 1025, 64, 200), (1, None, 1025, 97, 992, 992)],
                         ids=str)
def test_cuda_compact_copy_ring_matches_reference(shape, monkeypatch):
    monkeypatch.setenv("SKETCHCOLOR_CUDA_STAGES", "compact")
    check_against_reference(*make_inputs(*shape, torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 97, 130, 100, 36), (1, None, 256, 97, 992, 992)], ids=str)
def test_cuda_non_contiguous_inputs(shape, dtype):
    q, k, v = make_inputs(*shape, dtype, transposed=True)
    assert q.stride(-1) != 1
    check_against_reference(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_heads_from_batch_seq_heads_layout(dtype):
    # (B, N, H, D) storage viewed as (B, H, N, D): rows stay contiguous, strides are used as they are.
    q, k, v = (
        torch.randn(2, n, 3, 40, dtype=dtype, device=DEVICE).transpose(1, 2).requires_grad_() for n in (33, 65, 65)
    )
    check_against_reference(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_misaligned_rows_and_offsets(dtype):
    # Row strides that are not multiples of 8 elements (D = 100 inside a 101-wide buffer) and a
    # data pointer 2 bytes past a 16-byte boundary: the binding copies these into padded rows.
    base = [torch.randn(2, n, 101, dtype=dtype, device=DEVICE) for n in (37, 70)]
    q = base[0][..., 1:].requires_grad_()
    k = base[1][..., 1:].requires_grad_()
    v = torch.randn(2, 70, 13, dtype=dtype, device=DEVICE).requires_grad_()
    assert q.data_ptr() % 16 != 0
    check_against_reference(q, k, v)


@pytest.mark.parametrize("scale", [0.05, 1.0, -0.3])
def test_cuda_custom_scale(scale):
    check_against_reference(*make_inputs(2, None, 37, 300, 24, 24, torch.bfloat16), scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_large_scores_do_not_overflow(dtype):
    q, k, v = make_inputs(1, None, 33, 300, 16, 8, dtype)
    with torch.no_grad():
        q.mul_(8.0)
    check_against_reference(q, k, v)


def _fewest_key_chunks(batch_heads, n, m, d, dv):
    """The fewest key chunks the backward splits M into: scft_bwd_workspace_plan's memory bound
    alone (no GPU occupancy), whose GEMM-wave choice may only take smaller chunks."""
    return expected_plan(batch_heads, n, m, d, dv, slots=0, block_n=0, value_only=False)[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, chunks", [((4, 4, 1024, 1100, 64, 48), 2), ((4, 4, 8192, 400, 64, 48), 4)], ids=str)
def test_cuda_backward_over_several_key_chunks(shape, chunks, dtype):
    # With 4 chunks or more the middle ones read and write the float32 dQ accumulator.
    batch, heads, n, m, d, dv = shape
    assert _fewest_key_chunks(batch * heads, n, m, d, dv) >= chunks, "the shape no longer gives the intended key chunks"
    check_against_reference(*make_inputs(*shape, dtype))


@pytest.mark.parametrize("m", [1, 127, 128, 129, 1100, 2500])
def test_cuda_uniform_attention_is_exact(m):
    # q = 0 makes every score 0: lse = log M and out = the mean of v's rows. A mask off by one key
    # moves lse by about 1 / M, which the 2x rule can miss in bf16 at large M; this cannot.
    q = torch.zeros(1, 2, 70, 24, dtype=torch.bfloat16, device=DEVICE)
    k = torch.randn(1, 2, m, 24, dtype=torch.bfloat16, device=DEVICE)
    v = torch.randn(1, 2, m, 40, dtype=torch.bfloat16, device=DEVICE)
    out, lse = scft_attention(q, k, v, impl="cuda", return_lse=True)
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(m)), atol=1e-5, rtol=0)
    expected = v.float().mean(-2, keepdim=True).expand_as(out)
    torch.testing.assert_close(out.float(), expected, atol=1e-3, rtol=1e-2)   # out rounds to bf16


def test_cuda_is_deterministic():
    q, k, v = make_inputs(1, 2, 300, 1100, 992, 128, torch.bfloat16)
    grad_out = torch.randn(1, 2, 300, 128, dtype=torch.bfloat16, device=DEVICE)
    fn = lambda *t: scft_attention(*t, impl="cuda", return_lse=True)  # noqa: E731
    first = forward_backward(fn, q, k, v, grad_out)
    second = forward_backward(fn, q, k, v, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_ops_called_directly_write_every_output(dtype):
    q, k, v = (t.detach() for t in make_inputs(3, 2, 97, 130, 992, 100, dtype))
    scale = 0.07
    poison_allocator(((3, 2, 97, 100), dtype), ((3, 2, 97), torch.float32))
    out, lse = torch.ops.sketchcolor.scft_attn_fwd(q, k, v, scale)
    assert out.is_contiguous() and lse.is_contiguous() and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    grad_out = torch.randn_like(out)
    poison_allocator((tuple(q.shape), dtype), (tuple(k.shape), dtype), (tuple(v.shape), dtype))
    grads = torch.ops.sketchcolor.scft_attn_bwd(grad_out, q, k, v, out, lse, scale)
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous()
        assert torch.isfinite(g).all()
    exact_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    exact_out, exact_lse = ref_attention(*exact_inputs, scale=scale, return_lse=True)
    exact_grads = torch.autograd.grad(exact_out, exact_inputs, grad_out.double())
    lowp_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    same_out, same_lse = ref_attention(*lowp_inputs, scale=scale, return_lse=True)
    same_grads = torch.autograd.grad(same_out, lowp_inputs, grad_out)
    assert_close_to_reference("out", out, exact_out, same_out)
    assert_close_to_reference("lse", lse, exact_lse, same_lse)
    for name, a, e, s in zip(("grad_q", "grad_k", "grad_v"), grads, exact_grads, same_grads):
        assert_close_to_reference(name, a, e, s)


def test_cuda_empty_queries():
    q, k, v = make_inputs(2, 3, 0, 7, 16, 5, torch.bfloat16)
    out, lse = scft_attention(q, k, v, impl="cuda", return_lse=True)
    assert out.shape == (2, 3, 0, 5) and lse.shape == (2, 3, 0)
    out.sum().backward()
    assert k.grad.abs().sum() == 0 and v.grad.abs().sum() == 0


def test_cuda_rejects_float32_with_a_pointer_to_other_backends():
    q, k, v = (t.detach() for t in make_inputs(1, 1, 5, 6, 16, 8, torch.float32))
    scft_attention(q.half(), k.half(), v.half(), impl="cuda")  # loads and registers the extension
    with pytest.raises(RuntimeError, match=r"float16 or bfloat16.*impl=\"triton\".*impl=\"cpp\""):
        torch.ops.sketchcolor.scft_attn_fwd(q, k, v, 0.25)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        scft_attention(q, k, v, impl="cuda")


def test_cuda_rejects_mismatched_devices_and_shapes():
    q, k, v = (t.detach() for t in make_inputs(2, 2, 5, 6, 16, 8, torch.bfloat16))
    scft_attention(q, k, v, impl="cuda")
    with pytest.raises(RuntimeError, match="k is on cpu"):
        torch.ops.sketchcolor.scft_attn_fwd(q, k.cpu(), v, 0.25)
    with pytest.raises(RuntimeError, match="k's head dim D"):
        torch.ops.sketchcolor.scft_attn_fwd(q, k[..., :8], v, 0.25)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        torch.ops.sketchcolor.scft_attn_fwd(q, k, v, float("nan"))
    out, lse = torch.ops.sketchcolor.scft_attn_fwd(q, k, v, 0.25)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        torch.ops.sketchcolor.scft_attn_bwd(out, q, k, v, out, lse, float("inf"))
    with pytest.raises(RuntimeError, match="lse must have shape"):
        torch.ops.sketchcolor.scft_attn_bwd(out, q, k, v, out, lse[:, :, :2], 0.25)


def test_cuda_mma_choice_is_checked(monkeypatch, mma_choice):
    if mma_choice != MMA_CHOICES[0]:
        pytest.skip("sets the choice itself: runs once")
    q, k, v = (t.detach() for t in make_inputs(1, 1, 5, 6, 16, 8, torch.bfloat16))
    out, lse = scft_attention(q, k, v, impl="cuda", return_lse=True)   # the fixture's valid choice
    calls = [lambda: scft_attention(q, k, v, impl="cuda"),
             lambda: torch.ops.sketchcolor.scft_attn_bwd(out, q, k, v, out, lse, 0.25)]
    monkeypatch.setenv("SKETCHCOLOR_CUDA_MMA", "hgmma")
    for call in calls:
        with pytest.raises(RuntimeError, match="SKETCHCOLOR_CUDA_MMA must be auto, mma_sync or wgmma, got 'hgmma'"):
            call()
    if torch.cuda.get_device_capability() != (9, 0):
        monkeypatch.setenv("SKETCHCOLOR_CUDA_MMA", "wgmma")
        for call in calls:
            with pytest.raises(RuntimeError, match="wgmma needs a compute capability 9.0 GPU"):
                call()


def test_cuda_mma_choices_agree(monkeypatch, mma_choice):
    """auto, mma_sync and wgmma (where it runs) give outputs and gradients within the low-precision
    rounding of each other."""
    if mma_choice != MMA_CHOICES[0]:
        pytest.skip("sets the choice itself: runs once")
    q, k, v = make_inputs(2, 3, 333, 517, 992, 992, torch.bfloat16)
    grad_out = torch.randn(2, 3, 333, 992, dtype=torch.bfloat16, device=DEVICE)
    fn = lambda *t: scft_attention(*t, impl="cuda", return_lse=True)  # noqa: E731
    results = {}
    for choice in ["auto", *MMA_CHOICES]:
        if choice == "wgmma" and torch.cuda.get_device_capability() != (9, 0):
            continue
        monkeypatch.setenv("SKETCHCOLOR_CUDA_MMA", choice)
        results[choice] = forward_backward(fn, q, k, v, grad_out)
    base_out, base_lse, *base_grads = results["mma_sync"]
    for choice, (out, lse, *grads) in results.items():
        # Both accumulate in fp32 and round P, dS, out and the gradients to bf16: differences are a
        # few bf16 ulps.
        torch.testing.assert_close(out.float(), base_out.float(), atol=2e-2, rtol=2e-2, msg=choice)
        torch.testing.assert_close(lse, base_lse, atol=1e-4, rtol=1e-5, msg=choice)
        for name, grad, base in zip("qkv", grads, base_grads):
            # Gradients are far from unit size (dK is ~0.03 here): the slack scales with the largest.
            atol = 1e-2 * base.float().abs().max().item()
            torch.testing.assert_close(grad.float(), base.float(), atol=atol, rtol=2e-2, msg=f"{choice} grad_{name}")


def test_cuda_opcheck():
    q, k, v = (t.detach() for t in make_inputs(2, 2, 9, 13, 16, 8, torch.bfloat16))
    scft_attention(q, k, v, impl="cuda")
    torch.library.opcheck(torch.ops.sketchcolor.scft_attn_fwd.default, (q, k, v, 0.3))
    out, lse = torch.ops.sketchcolor.scft_attn_fwd(q, k, v, 0.3)
    torch.library.opcheck(torch.ops.sketchcolor.scft_attn_bwd.default, (torch.randn_like(out), q, k, v, out, lse, 0.3))


@pytest.mark.slow
def test_cuda_offsets_beyond_2_to_the_31():
    # q spans 33 * 65536 * 1024 > 2^31 elements: the last head's offsets overflow 32 bits.
    batch, n, m, d, dv = 33, 65536, 7, 1024, 8
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with 40 GiB")
    q = torch.randn(batch, n, d, dtype=torch.bfloat16, device=DEVICE)
    k = torch.randn(batch, m, d, dtype=torch.bfloat16, device=DEVICE)
    v = torch.randn(batch, m, dv, dtype=torch.bfloat16, device=DEVICE)
    assert q.numel() > 2**31
    grad_out = torch.randn(batch, n, dv, dtype=torch.bfloat16, device=DEVICE)
    qg, kg, vg = (t.requires_grad_() for t in (q, k, v))
    out, lse = scft_attention(qg, kg, vg, impl="cuda", return_lse=True)
    grad_q, grad_k, grad_v = torch.autograd.grad(out, (qg, kg, vg), grad_out)
    # The last batch entry, checked on its own (rows and heads are independent).
    last = slice(batch - 1, batch)
    sub = [t[last].detach() for t in (q, k, v)]
    exact_inputs = [t.double().requires_grad_() for t in sub]
    exact_out, exact_lse = ref_attention(*exact_inputs, return_lse=True)
    exact_grads = torch.autograd.grad(exact_out, exact_inputs, grad_out[last].double())
    lowp_inputs = [t.clone().requires_grad_() for t in sub]
    same_out, same_lse = ref_attention(*lowp_inputs, return_lse=True)
    same_grads = torch.autograd.grad(same_out, lowp_inputs, grad_out[last])
    assert_close_to_reference("out", out[last], exact_out, same_out)
    assert_close_to_reference("lse", lse[last], exact_lse, same_lse)
    for name, a, e, s in zip(("grad_q", "grad_k", "grad_v"), (grad_q[last], grad_k[last], grad_v[last]), exact_grads,
                             same_grads):
        assert_close_to_reference(name, a, e, s)

"""cpp backend of scft_attention against sketchcolor.reference, plus registration and input checks."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close_to_reference
from sketchcolor import reference
from sketchcolor.ops import scft_attention

# (B, H or None, N, M, D, Dv): odd sizes, N != M, D = 992 and D not a multiple of 16, Dv != D.
SHAPES = [
    (1, None, 1, 7, 16, 16),
    (1, None, 7, 1, 1, 1),
    (3, None, 97, 256, 64, 64),
    (1, 2, 256, 97, 100, 100),
    (3, 2, 7, 1025, 16, 48),
    (1, None, 1025, 97, 992, 992),
    (1, 1, 97, 1025, 992, 992),
    (2, None, 256, 7, 100, 37),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def make_inputs(batch, heads, n, m, d, dv, dtype, transposed=False):
    lead = (batch,) if heads is None else (batch, heads)

    def make(rows, cols):
        if transposed:  # a (.., cols, rows) tensor viewed as (.., rows, cols): last-dim stride != 1
            return torch.randn(*lead, cols, rows, dtype=dtype).transpose(-1, -2).requires_grad_()
        return torch.randn(*lead, rows, cols, dtype=dtype).requires_grad_()

    return make(n, d), make(m, d), make(m, dv)


def forward_backward(fn, q, k, v, grad_out):
    out, lse = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return (out, lse, *grads)


def check_against_reference(q, k, v, scale=None):
    """Forward, LSE and the three gradients of impl='cpp' vs the float64 reference."""
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    fused = forward_backward(lambda *t: scft_attention(*t, scale=scale, impl="cpp", return_lse=True), q, k, v, grad_out)
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = forward_backward(
        lambda *t: reference.scft_attention(*t, scale=scale, return_lse=True), *exact_inputs, grad_out.double()
    )
    same = forward_backward(lambda *t: reference.scft_attention(*t, scale=scale, return_lse=True), q, k, v, grad_out)
    for name, a, e, s in zip(("out", "lse", "grad_q", "grad_k", "grad_v"), fused, exact, same):
        assert_close_to_reference(name, a, e, s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpp_matches_reference(shape, dtype):
    check_against_reference(*make_inputs(*shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_non_contiguous_inputs(dtype):
    q, k, v = make_inputs(2, 3, 97, 130, 100, 36, dtype, transposed=True)
    assert not q.is_contiguous()
    check_against_reference(q, k, v)


def test_cpp_head_axis_as_batch_of_heads_layout():
    # (B, N, H, D) storage viewed as (B, H, N, D): the usual multi-head layout.
    q, k, v = (torch.randn(2, n, 3, 40, dtype=torch.float64).transpose(1, 2).requires_grad_() for n in (33, 65, 65))
    check_against_reference(q, k, v)


@pytest.mark.parametrize("scale", [0.05, 1.0, -0.3])
def test_cpp_custom_scale(scale):
    check_against_reference(*make_inputs(2, None, 37, 300, 24, 24, torch.float32), scale=scale)


def test_default_scale_is_applied_before_softmax():
    q, k, v = make_inputs(1, None, 5, 9, 64, 8, torch.float64)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)
    torch.testing.assert_close(scft_attention(q, k, v, impl="cpp"), probs @ v)


def test_gradcheck_float64():
    q, k, v = make_inputs(2, 2, 5, 7, 6, 3, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: scft_attention(*t, impl="cpp"), (q, k, v))


def test_lse_is_detached_and_double_backward_errors():
    q, k, v = make_inputs(1, None, 5, 7, 6, 3, torch.float64)
    out, lse = scft_attention(q, k, v, impl="cpp", return_lse=True)
    assert not lse.requires_grad
    (grad_q,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_q.sum().backward()


def test_only_requested_gradients_are_returned():
    q, k, v = make_inputs(1, None, 5, 7, 6, 3, torch.float32)
    k.requires_grad_(False)
    scft_attention(q, k, v, impl="cpp").sum().backward()
    assert q.grad is not None and v.grad is not None and k.grad is None


def test_empty_queries_give_empty_outputs():
    q, k, v = make_inputs(2, 3, 0, 7, 16, 5, torch.float32)
    out, lse = scft_attention(q, k, v, impl="cpp", return_lse=True)
    assert out.shape == (2, 3, 0, 5) and lse.shape == (2, 3, 0)
    out.sum().backward()
    assert k.grad.abs().sum() == 0 and v.grad.abs().sum() == 0


def test_large_scores_do_not_overflow():
    q, k, v = make_inputs(1, None, 33, 300, 16, 8, torch.float32)
    with torch.no_grad():
        q.mul_(40.0)
    check_against_reference(q, k, v)


def test_deterministic_for_fixed_thread_count():
    q, k, v = make_inputs(1, None, 300, 1100, 64, 64, torch.float32)
    grad_out = torch.randn(1, 300, 64)
    first = forward_backward(lambda *t: scft_attention(*t, impl="cpp", return_lse=True), q, k, v, grad_out)
    second = forward_backward(lambda *t: scft_attention(*t, impl="cpp", return_lse=True), q, k, v, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(*make_inputs(1, None, 300, 1100, 32, 16, torch.float32))
    finally:
        torch.set_num_threads(previous)


def test_opcheck_registered_ops():
    from sketchcolor.ops import scft_attention as _  # noqa: F401  (registers fakes and autograd)

    scft_attention(*make_inputs(1, 1, 3, 4, 5, 6, torch.float32), impl="cpp")  # lazy registration
    q, k, v = make_inputs(2, 2, 9, 13, 8, 5, torch.float32)
    torch.library.opcheck(torch.ops.sketchcolor.scft_attn_fwd.default, (q, k, v, 0.3))
    out, lse = torch.ops.sketchcolor.scft_attn_fwd(q.detach(), k.detach(), v.detach(), 0.3)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.sketchcolor.scft_attn_bwd.default, (grad_out, q.detach(), k.detach(), v.detach(), out, lse, 0.3)
    )
    # Inputs in the (B, N, H, D) layout viewed as (B, H, N, D): the fakes must promise the strides
    # the kernels return (contiguous gradients), not the inputs'.
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    torch.library.opcheck(torch.ops.sketchcolor.scft_attn_fwd.default, (qt, kt, vt, 0.3))
    torch.library.opcheck(torch.ops.sketchcolor.scft_attn_bwd.default, (grad_out, qt, kt, vt, out, lse, 0.3))


def test_torch_compile():
    q, k, v = make_inputs(2, None, 17, 29, 16, 8, torch.float32)

    def layer(q, k, v):
        return scft_attention(q * 2.0, k, v, impl="cpp").relu().sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected_loss = layer(q, k, v)
    expected = torch.autograd.grad(expected_loss, (q, k, v))
    torch.testing.assert_close(loss, expected_loss)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_auto_picks_cpp_on_cpu(recwarn):
    q, k, v = make_inputs(1, None, 4, 5, 8, 8, torch.float32)
    torch.testing.assert_close(scft_attention(q, k, v), scft_attention(q, k, v, impl="cpp"), rtol=0, atol=0)
    assert not [w for w in recwarn if "reference" in str(w.message)]


@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_unavailable_backend_says_why(impl, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_inputs(1, None, 4, 5, 8, 8, torch.float32)
    with pytest.raises(RuntimeError, match=f"impl='{impl}' is not available: .*CUDA"):
        scft_attention(q, k, v, impl=impl)


BAD_INPUTS = [
    ("q must have rank", lambda q, k, v: (q[0], k, v)),
    ("k must have rank", lambda q, k, v: (q, k[0], v)),
    ("v must have rank", lambda q, k, v: (q, k, v.unsqueeze(0))),
    ("q must have dtype", lambda q, k, v: (q.long(), k, v)),
    ("k has dtype .* but q has", lambda q, k, v: (q, k.double(), v)),
    ("v has dtype .* but q has", lambda q, k, v: (q, k, v.double())),
    ("k: head dim D", lambda q, k, v: (q, k[..., :3], v)),
    ("v: number of keys M", lambda q, k, v: (q, k, v[:, :2])),
    ("k: leading dims", lambda q, k, v: (q, k[:1], v)),
    ("v: leading dims", lambda q, k, v: (q, k, v[:1])),
    ("k: M must be at least 1", lambda q, k, v: (q, k[:, :0], v[:, :0])),
    ("q: D must be at least 1", lambda q, k, v: (q[..., :0], k[..., :0], v)),
    ("v: Dv must be at least 1", lambda q, k, v: (q, k, v[..., :0])),
    ("q must be a torch.Tensor", lambda q, k, v: (q.tolist(), k, v)),
]


@pytest.mark.parametrize("message,corrupt", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_name_the_argument(message, corrupt):
    q, k, v = (t.detach() for t in make_inputs(2, None, 5, 6, 4, 3, torch.float32))
    with pytest.raises((ValueError, TypeError), match=message):
        scft_attention(*corrupt(q, k, v), impl="cpp")


def test_bad_impl_and_scale():
    q, k, v = (t.detach() for t in make_inputs(1, None, 5, 6, 4, 3, torch.float32))
    with pytest.raises(ValueError, match="impl must be one of"):
        scft_attention(q, k, v, impl="fast")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        scft_attention(q, k, v, scale=float("nan"), impl="cpp")


def test_device_mismatch_is_named():
    q, k, v = (t.detach() for t in make_inputs(1, None, 5, 6, 4, 3, torch.float32))
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        scft_attention(q, k.to("meta"), v, impl="cpp")


CPP_BAD_INPUTS = [
    ("q must have shape \\(B, H, N, D\\)", lambda q, k, v: (q[0], k, v)),
    ("k has dtype", lambda q, k, v: (q, k.double(), v)),
    ("k's head dim D", lambda q, k, v: (q, k[..., :2], v)),
    ("v's key count M", lambda q, k, v: (q, k, v[:, :, :2])),
    ("k's \\(B, H\\)", lambda q, k, v: (q, k[:, :1], v)),
    ("at least one key", lambda q, k, v: (q, k[:, :, :0], v[:, :, :0])),
]


@pytest.mark.parametrize("message,corrupt", CPP_BAD_INPUTS, ids=[b[0] for b in CPP_BAD_INPUTS])
def test_cpp_entry_points_check_inputs(message, corrupt):
    q, k, v = (t.detach() for t in make_inputs(2, 2, 5, 6, 4, 3, torch.float32))
    scft_attention(q, k, v, impl="cpp")  # loads the extension
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sketchcolor.scft_attn_fwd(*corrupt(q, k, v), 0.5)


def test_cpp_backward_checks_saved_tensors():
    q, k, v = (t.detach() for t in make_inputs(2, 2, 5, 6, 4, 3, torch.float32))
    out, lse = torch.ops.sketchcolor.scft_attn_fwd(q, k, v, 0.5)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        torch.ops.sketchcolor.scft_attn_bwd(out, q, k, v, out, lse[:, :, :2], 0.5)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        torch.ops.sketchcolor.scft_attn_bwd(out[:, :1], q, k, v, out, lse, 0.5)
    with pytest.raises(RuntimeError, match="lse must have dtype"):
        torch.ops.sketchcolor.scft_attn_bwd(out, q, k, v, out, lse.double(), 0.5)

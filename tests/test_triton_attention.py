"""Triton backend of SCFT attention (sketchcolor.kernels.scft_attention) against sketchcolor.reference.

The numerics tests run on CUDA tensors when this process has a GPU, and on CPU tensors in
Triton's interpreter when TRITON_INTERPRET=1 was set before triton was imported. In a normal
run on a machine without a GPU, ``test_numerics_under_the_interpreter`` reruns this file in
a subprocess with TRITON_INTERPRET=1 (a fresh process: triton reads the variable once, at
import, and another test may have imported it already). The other tests of that normal run
need neither a GPU nor the interpreter: argument checks, options, config pruning, and the
torch.library registration traced on fake CUDA tensors. tests/test_triton_compile.py
compiles every kernel config for every GPU generation of kernels/aot.py.

Tolerance: sketchcolor.testing's rule (flash-attention's): for every output and gradient,
max |backend - float64 reference| <= 2 max |reference in the input dtype - float64
reference| + a small absolute slack for the dtype (the error floor of one rounding). Both
references see the same inputs, rounded to the dtype first. Outputs the launchers write are
poisoned with NaN first, and given strided, so an element never written or written through
a wrong stride shows.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import zlib

import pytest
import torch

pytest.importorskip("triton")

from sketchcolor.kernels import scft_attention as kernels  # noqa: E402
from sketchcolor.ops import scft_attention  # noqa: E402
from sketchcolor.reference import scft_attention as ref  # noqa: E402
from sketchcolor.testing import assert_close_to_reference  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
assert kernels.INTERPRETING == INTERPRETING, "triton was imported before TRITON_INTERPRET was set"
DEVICE = "cpu" if INTERPRETING else "cuda"
needs_device = pytest.mark.skipif(
    not INTERPRETING and not torch.cuda.is_available(),
    reason="needs a GPU or TRITON_INTERPRET=1 (test_numerics_under_the_interpreter runs these in a subprocess)",
)


def _make(shape, dtype, layout, generator):
    """A (B, H, rows, dim) tensor of N(0, 1) values; layout "strided" gives a view with
    permuted strides and a non-unit stride on the last axis, as transposed features have."""
    if layout == "contiguous":
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).to(DEVICE)
    batch, heads, rows, dim = shape
    base = torch.randn((dim, batch, rows, heads), generator=generator, dtype=torch.float64).to(dtype).to(DEVICE)
    view = base.permute(1, 3, 2, 0)
    assert view.shape == shape and view.stride(-1) != 1
    return view


def _nan_out(shape, dtype, layout):
    """A NaN-poisoned output the kernels must overwrite completely (strided: a view into a wider buffer)."""
    if layout == "contiguous":
        return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    wide = torch.full((*shape[:-1], shape[-1] + 3), float("nan"), dtype=dtype, device=DEVICE)
    return wide[..., 1 : shape[-1] + 1]


def _reference(q, k, v, grad_out, scale, dtype):
    """(out, lse, dq, dk, dv) of the reference run on (q, k, v) converted to ``dtype``."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = ref(q, k, v, scale, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    return (out.detach(), lse, *grads)


def _assert_close(names, got, exact, low):
    for name, g, e, lo in zip(names, got, exact, low):
        assert_close_to_reference(name, g, e, lo)


# (B, H, N, M, D, Dv, dtype, layout): N != M, odd sizes (1, 7, 97, 130), D in {16, 100, 992},
# Dv != D both ways, several heads, strided views. Sizes beyond the interpreter config's
# blocks (32 rows, 64-wide D chunks, 128-wide slices) so that tails and multiple chunks and
# slices all run; D = 992 with few queries to keep the interpreter fast.
CASES = {
    "n1-fp32": (1, 1, 1, 7, 16, 16, torch.float32, "contiguous"),
    "heads-fp32": (2, 3, 33, 20, 100, 100, torch.float32, "contiguous"),
    "odd-fp32": (1, 2, 130, 97, 16, 40, torch.float32, "contiguous"),
    "dv-wider-fp32": (1, 1, 9, 20, 24, 300, torch.float32, "contiguous"),
    "d-wider-fp32": (1, 1, 9, 20, 300, 24, torch.float32, "contiguous"),
    "strided-fp32": (2, 1, 20, 33, 100, 40, torch.float32, "strided"),
    "d992-fp32": (1, 1, 7, 97, 992, 992, torch.float32, "contiguous"),
    "d992-bf16": (1, 1, 7, 97, 992, 992, torch.bfloat16, "contiguous"),
    "odd-bf16": (1, 2, 130, 97, 16, 160, torch.bfloat16, "contiguous"),
    "strided-bf16": (2, 2, 33, 45, 100, 72, torch.bfloat16, "strided"),
    "fp16": (1, 2, 40, 33, 64, 64, torch.float16, "contiguous"),
}
DETERMINISTIC_TOO = {"heads-fp32", "d-wider-fp32", "d992-fp32", "odd-bf16", "strided-bf16"}
PARAMS = [(name, False) for name in CASES] + [(name, True) for name in CASES if name in DETERMINISTIC_TOO]


@needs_device
@pytest.mark.parametrize("case,deterministic", PARAMS, ids=[f"{n}{'-deterministic' if d else ''}" for n, d in PARAMS])
def test_launchers_match_reference(case, deterministic):
    batch, heads, n, m, d, dv, dtype, layout = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q = _make((batch, heads, n, d), dtype, layout, gen)
    k = _make((batch, heads, m, d), dtype, layout, gen)
    v = _make((batch, heads, m, dv), dtype, layout, gen)
    grad_out = _make((batch, heads, n, dv), dtype, layout, gen)
    scale = d**-0.5

    out = _nan_out((batch, heads, n, dv), dtype, layout)
    lse = torch.full((batch, n, heads), float("nan"), device=DEVICE).transpose(1, 2)  # strided (B, H, N)
    out, lse = kernels.attention_forward(q, k, v, scale, out=out, lse=lse)
    grads = tuple(_nan_out(t.shape, dtype, layout) for t in (q, k, v))
    with kernels.options(deterministic=deterministic):
        grads = kernels.attention_backward(grad_out, q, k, v, out, lse, scale, grads=grads)

    exact = _reference(q, k, v, grad_out, scale, torch.float64)
    low = _reference(q, k, v, grad_out, scale, dtype)
    _assert_close(("out", "lse", "grad_q", "grad_k", "grad_v"), (out, lse, *grads), exact, low)


# Every config a GPU autotuner holds, with the launch handle that holds it. bf16 stands for
# both 16-bit types (they share configs and code paths).
AUTOTUNED = {"fwd": kernels.scft_attn_fwd, "bwd_dkdv": kernels.scft_attn_bwd_dkdv, "bwd_dq": kernels.scft_attn_bwd_dq}
PINNED = [
    (kernel, dtype, config)
    for kernel, (sixteen_bit, fp32) in ((name, kernels.GPU_CONFIGS[name]) for name in AUTOTUNED)
    for dtype, family in ((torch.bfloat16, sixteen_bit), (torch.float32, fp32))
    for config in family
]


def _config_id(kernel, dtype, config):
    blocks = "-".join(f"{name[6:].lower()}{value}" for name, value in config.kwargs.items())
    return f"{kernel}-{'bf16' if dtype == torch.bfloat16 else 'fp32'}-{blocks}-w{config.num_warps}s{config.num_stages}"


@needs_device
@pytest.mark.parametrize("kernel, dtype, config", PINNED, ids=[_config_id(*case) for case in PINNED])
def test_every_gpu_config_matches_reference(kernel, dtype, config, monkeypatch):
    # The autotuner runs only the config it picks for the shapes at hand, so a config that one
    # GPU generation or Triton version miscompiles stays unseen until a training shape picks
    # it (Triton 3.4 to 3.7.0 did so on sm_90 for a register transpose). Each runs pinned here; on
    # the interpreter this checks every config's tiling (masks, chunk and slice tails).
    if DEVICE == "cuda":
        limit = kernels._device_smem_limit(torch.cuda.current_device())
        if config not in kernels.configs_for(kernel, limit, dtype.itemsize):
            pytest.skip(f"needs more shared memory than this GPU's {limit} bytes per block")
    autotuner = AUTOTUNED[kernel]
    monkeypatch.setattr(autotuner, "configs", [config])
    monkeypatch.setattr(autotuner, "cache", {})
    # D = 992 in 4 slices of the widest configs; on the interpreter D and Dv off the blocks' multiples.
    batch, heads, n, m, d, dv = (1, 2, 200, 130, 992, 992) if DEVICE == "cuda" else (1, 2, 70, 66, 100, 72)
    gen = torch.Generator().manual_seed(zlib.crc32(_config_id(kernel, dtype, config).encode()))
    q, k, v, grad_out = (_make(shape, dtype, "contiguous", gen) for shape in ((batch, heads, n, d), (batch, heads, m, d), (batch, heads, m, dv), (batch, heads, n, dv)))
    scale = d**-0.5
    out, lse = kernels.attention_forward(q, k, v, scale)
    # bwd_dq runs in the deterministic backward only; otherwise bwd_dkdv adds dQ atomically.
    with kernels.options(deterministic=kernel == "bwd_dq"):
        grads = kernels.attention_backward(grad_out, q, k, v, out, lse, scale)
    exact = _reference(q, k, v, grad_out, scale, torch.float64)
    low = _reference(q, k, v, grad_out, scale, dtype)
    _assert_close(("out", "lse", "grad_q", "grad_k", "grad_v"), (out, lse, *grads), exact, low)
    assert autotuner.best_config is config  # the launch went through the pinned handle


@needs_device
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
def test_very_negative_scores_with_a_key_tail(deterministic):
    # Every score near -20, so lse is near -17 and exp(-lse) is past float16's range. The padded
    # keys of the last key block (k = 0, score 0) must get P = 0: otherwise their dS overflows to
    # inf in float16 and inf * 0 makes every dQ column NaN. M = 33 leaves a tail at every block size.
    gen = torch.Generator().manual_seed(11)
    n, m, d, dv = 16, 33, 16, 8
    q = (2.25 + 0.05 * torch.randn((1, 1, n, d), generator=gen, dtype=torch.float64)).half().to(DEVICE)
    k = (-2.25 + 0.05 * torch.randn((1, 1, m, d), generator=gen, dtype=torch.float64)).half().to(DEVICE)
    v, grad_out = (torch.randn(shape, generator=gen, dtype=torch.float64).half().to(DEVICE) for shape in ((1, 1, m, dv), (1, 1, n, dv)))
    scale = d**-0.5
    out, lse = kernels.attention_forward(q, k, v, scale)
    assert lse.max().item() < -11
    with kernels.options(deterministic=deterministic):
        grads = kernels.attention_backward(grad_out, q, k, v, out, lse, scale)
    exact = _reference(q, k, v, grad_out, scale, torch.float64)
    low = _reference(q, k, v, grad_out, scale, torch.float16)
    _assert_close(("out", "lse", "grad_q", "grad_k", "grad_v"), (out, lse, *grads), exact, low)


@needs_device
def test_deterministic_backward_is_bitwise_reproducible():
    gen = torch.Generator().manual_seed(3)
    q, k, v, grad_out = (_make(s, torch.bfloat16, "contiguous", gen) for s in [(1, 2, 40, 48)] * 4)
    out, lse = kernels.attention_forward(q, k, v, 0.2)
    with kernels.options(deterministic=True):
        first = kernels.attention_backward(grad_out, q, k, v, out, lse, 0.2)
        second = kernels.attention_backward(grad_out, q, k, v, out, lse, 0.2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_device
def test_no_queries_gives_empty_output_and_zero_key_gradients():
    gen = torch.Generator().manual_seed(4)
    q = _make((1, 2, 0, 16), torch.float32, "contiguous", gen)
    k, v = (_make((1, 2, 5, 16), torch.float32, "contiguous", gen) for _ in range(2))
    out, lse = kernels.attention_forward(q, k, v, 0.25)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    grad_q, grad_k, grad_v = kernels.attention_backward(torch.empty_like(out), q, k, v, out, lse, 0.25, grads=grads)
    assert grad_q.shape == q.shape and torch.equal(grad_k, torch.zeros_like(k)) and torch.equal(grad_v, torch.zeros_like(v))


@needs_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_public_op_forward_and_autograd(dtype):
    """sketchcolor.ops.scft_attention(impl="triton"): 3-D inputs (no head axis), default scale,
    return_lse, and gradients through the registered autograd."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn((2, 37, 100), generator=gen, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    k = torch.randn((2, 45, 100), generator=gen, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    v = torch.randn((2, 45, 72), generator=gen, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    grad_out = torch.randn((2, 37, 72), generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    out, lse = scft_attention(q, k, v, impl="triton", return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32 and not lse.requires_grad
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    exact, low = (_reference(q, k, v, grad_out, None, t) for t in (torch.float64, dtype))
    _assert_close(("out", "lse", "grad_q", "grad_k", "grad_v"), (out.detach(), lse, *grads), exact, low)


@needs_device
def test_tf32_option_runs_and_stays_close():
    """TF32 dots keep 10 mantissa bits: results within 1e-2 relative of float64 (on the
    interpreter, which computes every dot in fp32, they match as tightly as IEEE)."""
    gen = torch.Generator().manual_seed(6)
    q, k, v, grad_out = (_make(s, torch.float32, "contiguous", gen) for s in [(1, 2, 40, 64)] * 4)
    with kernels.options(tf32=True):
        out, lse = kernels.attention_forward(q, k, v, 0.125)
        grads = kernels.attention_backward(grad_out, q, k, v, out, lse, 0.125)
    exact = _reference(q, k, v, grad_out, 0.125, torch.float64)
    for name, got, want in zip(("out", "lse", "grad_q", "grad_k", "grad_v"), (out, lse, *grads), exact):
        scale = max(want.abs().max().item(), 1.0)
        assert (got.double() - want).abs().max().item() <= 1e-2 * scale, name


@needs_device
def test_opcheck_forward_and_backward_ops():
    from sketchcolor.ops import _triton_attention  # noqa: F401  (registers the ops)

    gen = torch.Generator().manual_seed(7)
    q, k = (_make((1, 2, s, 24), torch.float32, "contiguous", gen) for s in (9, 13))
    v = _make((1, 2, 13, 20), torch.float32, "contiguous", gen)
    fwd, bwd = torch.ops.sketchcolor.scft_attn_fwd_triton, torch.ops.sketchcolor.scft_attn_bwd_triton
    torch.library.opcheck(fwd, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.3))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), 0.3)
    grad_out = _make(out.shape, torch.float32, "contiguous", gen)
    torch.library.opcheck(bwd, (grad_out, q.detach(), k.detach(), v.detach(), out, lse, 0.3))


@needs_device
def test_torch_compile_forward_and_backward():
    """fullgraph torch.compile of a step through the op: Inductor on a GPU; on the
    interpreter aot_eager (AOTAutograd with the fake kernels, no C++ codegen)."""
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    gen = torch.Generator().manual_seed(8)
    q, k, v = (_make((2, 1, 19, 32), torch.float32, "contiguous", gen).squeeze(1).requires_grad_() for _ in range(3))

    def step(q, k, v):
        return (scft_attention(q, k, v, impl="triton") * 2).sum()

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    loss64 = (ref(q64, k64, v64) * 2).sum()
    grads64 = torch.autograd.grad(loss64, (q64, k64, v64))
    assert abs(loss.item() - loss64.item()) <= 1e-4 * max(abs(loss64.item()), 1.0)
    for g, g64 in zip(grads, grads64):
        assert (g.double() - g64).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------------------
# Without a GPU and without the interpreter (a normal CI run)
# --------------------------------------------------------------------------------------

if not INTERPRETING:
    from sketchcolor.kernels import aot

    @pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these numerics run compiled, in this process")
    def test_numerics_under_the_interpreter():
        """This file's numerics tests on CPU tensors, with TRITON_INTERPRET=1 in a fresh process."""
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            env={**os.environ, "TRITON_INTERPRET": "1"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        output = result.stdout[-8000:] + result.stderr[-4000:]
        assert result.returncode == 0, f"interpreted tests failed:\n{output}"
        passed = re.search(r"(\d+) passed", result.stdout)
        assert passed and int(passed.group(1)) >= len(PARAMS), output
        assert "skipped" not in result.stdout, output

    def _run_in_a_fresh_interpreted_process(script: str) -> str:
        """Runs ``script`` in a new Python process with TRITON_INTERPRET=1 (nothing imported or
        registered yet); returns what it printed."""
        result = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TRITON_INTERPRET": "1"},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        return result.stdout

    def test_compiled_call_before_any_eager_one():
        """sketchcolor.ops registers the triton ops when it is imported, wherever triton can run:
        torch.compile cannot trace a registration, so a fullgraph compile that comes before any
        eager call must find them registered. A fresh process, so no earlier call registered them."""
        pytest.importorskip("triton")
        script = (
            "import torch\n"
            "from sketchcolor.ops import correspondence_loss, scft_attention\n"
            "q, k = torch.randn(1, 5, 8), torch.randn(1, 6, 8)\n"
            "pos = torch.tensor([[0, 5, -1, 2, 3]])\n"
            "attention = torch.compile(lambda q: scft_attention(q, k, k, impl='triton'), fullgraph=True, backend='aot_eager')\n"
            "loss = torch.compile(lambda q: correspondence_loss(q, k, pos, mode='nll', impl='triton'), fullgraph=True, backend='aot_eager')\n"
            "torch.testing.assert_close(attention(q), scft_attention(q, k, k, impl='reference'))\n"
            "torch.testing.assert_close(loss(q), correspondence_loss(q, k, pos, mode='nll', impl='reference'))\n"
        )
        _run_in_a_fresh_interpreted_process(script)

    def test_a_broken_triton_install_leaves_the_other_backends_working():
        """The import-time registration must not make a broken triton fail `import sketchcolor.ops`:
        the triton backend is then unavailable with the reason, and cpp runs."""
        pytest.importorskip("triton")
        script = (
            "import importlib.abc, sys\n"
            "class Broken(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'sketchcolor.kernels.scft_attention':\n"
            "            raise ImportError('simulated broken triton')\n"
            "sys.meta_path.insert(0, Broken())\n"
            "import torch\n"
            "from sketchcolor.ops import scft_attention\n"
            "q = torch.randn(1, 4, 8)\n"
            "torch.testing.assert_close(scft_attention(q, q, q, impl='cpp'), scft_attention(q, q, q, impl='reference'))\n"
            "try:\n"
            "    scft_attention(q, q, q, impl='triton')\n"
            "except RuntimeError as error:\n"
            "    print(error)\n"
        )
        printed = _run_in_a_fresh_interpreted_process(script)
        assert "impl='triton' is not available: the Triton kernels do not import (ImportError: simulated broken triton)" in printed

    def test_layouts_past_int32_offsets_are_copied_or_refused():
        """The kernels multiply head-dim offsets by the stride in int32: a q whose last-axis
        offsets reach 2**31 elements reaches them as a contiguous copy, and an output buffer
        like that is refused (it cannot be swapped for a copy). Meta tensors: no memory."""
        q = torch.empty_strided((1, 2, 4, 3), (8, 4, 1, 2**30), dtype=torch.float16, device="meta")
        k, v = (torch.empty((1, 2, 5, 3), dtype=torch.float16, device="meta") for _ in range(2))
        recorder = aot.LaunchRecorder()
        out, lse = kernels.attention_forward(q, k, v, 0.5, launch=recorder)
        kernels.attention_backward(torch.empty_like(out), q, k, v, out, lse, 0.5, launch=recorder)
        assert {launch.args["stride_qd"] for launch in recorder.launches if "stride_qd" in launch.args} == {1}
        wide = torch.empty_strided((1, 2, 4, 3), (8, 4, 1, 2**30), dtype=torch.float16, device="meta")
        with pytest.raises(ValueError, match="out: its last axis's stride 1073741824 puts offsets past the kernels' int32 range"):
            kernels.attention_forward(k[:, :, :4], k, v, 0.5, out=wide, launch=recorder)

    def _qkv(dtype=torch.float32, n=5, m=6, d=8, dv=4, device="cpu"):
        return (torch.randn(1, 2, n, d, dtype=dtype, device=device), torch.randn(1, 2, m, d, dtype=dtype, device=device),
                torch.randn(1, 2, m, dv, dtype=dtype, device=device))

    @pytest.mark.parametrize(
        "make, error, words",
        [
            (lambda: _qkv(torch.float64), TypeError, "float64"),
            (lambda: _qkv(d=1025), ValueError, "head dim D"),
            (lambda: _qkv(dv=1025), ValueError, "head dim Dv"),
            (lambda: _qkv(m=0), ValueError, "at least one key"),
            (lambda: (*_qkv()[:2], _qkv()[2].to(torch.bfloat16)), ValueError, "v has dtype"),
            (lambda: (_qkv()[0], _qkv(m=7)[1], _qkv()[2]), ValueError, "number of keys M"),
            (lambda: (_qkv()[0][0], *_qkv()[1:]), ValueError, "4-D"),
        ],
        ids=["float64", "D>1024", "Dv>1024", "M=0", "mixed-dtypes", "M-mismatch", "rank"],
    )
    def test_launchers_reject_bad_inputs_with_the_argument_named(make, error, words):
        q, k, v = make()
        with pytest.raises(error, match=words):
            kernels.attention_forward(q, k, v, 0.5, launch=aot.LaunchRecorder())

    def test_launchers_reject_wrong_output_buffers():
        q, k, v = _qkv()
        with pytest.raises(ValueError, match="out must be"):
            kernels.attention_forward(q, k, v, 0.5, out=torch.empty(1, 2, 5, 5), launch=aot.LaunchRecorder())
        out, lse = torch.empty(1, 2, 5, 4), torch.empty(1, 2, 5)
        with pytest.raises(ValueError, match="lse must be"):
            kernels.attention_backward(out, q, k, v, out, lse.double(), 0.5, launch=aot.LaunchRecorder())
        with pytest.raises(ValueError, match="grad_k must be"):
            grads = (torch.empty_like(q), torch.empty_like(q), torch.empty_like(v))
            kernels.attention_backward(out, q, k, v, out, lse, 0.5, grads=grads, launch=aot.LaunchRecorder())

    def test_launchers_run_on_the_inputs_device(monkeypatch):
        """Triton launches on the current CUDA device: the launchers make it the tensors' (fake
        cuda:1 tensors, recorded launches, a recording device guard: no GPU needed)."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        from sketchcolor.kernels import _tiles as tiles
        from sketchcolor.kernels import correspondence_loss as loss_kernels

        current = []

        @contextlib.contextmanager
        def set_current(device):
            current.append(device)
            yield

        monkeypatch.setattr(torch.cuda, "device", set_current)
        monkeypatch.setattr(tiles, "_cuda_present", lambda: True)
        recorder = aot.LaunchRecorder()
        with FakeTensorMode():
            q, k, v = (torch.empty(1, 2, 5, 8, device="cuda:1") for _ in range(3))
            out, lse = kernels.attention_forward(q, k, v, 0.5, launch=recorder)
            kernels.attention_backward(out, q, k, v, out, lse, 0.5, launch=recorder)
        assert current == [torch.device("cuda", 1)] * 2
        assert [launch.name for launch in recorder.launches] == ["fwd", "bwd_preprocess", "bwd_dkdv"]
        # The loss's launchers check index ranges on the device first, which fake tensors cannot
        # run: that they take the same guard is checked by its wrapper.
        for name in ("triplet_forward", "triplet_backward", "hardest_forward", "nll_forward", "nll_loss", "nll_backward"):
            launcher = getattr(loss_kernels, name)
            assert launcher.__code__ is kernels.attention_forward.__code__ and launcher.__wrapped__.__name__ == name

    def test_options_select_precision_and_the_dq_path():
        """Which kernels a forward+backward launches, and with which constexprs, under each option."""
        default = aot.planned_launches(torch.float32, n=64, m=64, d=64, dv=64)
        assert [launch.variant for launch in default] == ["fwd", "bwd_preprocess", "bwd_dkdv[ATOMIC_DQ=True]"]
        assert {launch.args.get("DOT_PRECISION") for launch in default} == {"ieee", None}
        deterministic = aot.planned_launches(torch.float32, n=64, m=64, d=64, dv=64, deterministic=True)
        assert [launch.variant for launch in deterministic] == ["fwd", "bwd_preprocess", "bwd_dkdv[ATOMIC_DQ=False]", "bwd_dq"]
        # torch.use_deterministic_algorithms(True) asks for the same path.
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            switched = aot.planned_launches(torch.float32, n=64, m=64, d=64, dv=64)
            assert [launch.variant for launch in switched] == [launch.variant for launch in deterministic]
        finally:
            torch.use_deterministic_algorithms(previous)
        with kernels.options(tf32=True) as current:
            assert current == kernels.Options(tf32=True, deterministic=False)
            fp32 = aot.planned_launches(torch.float32, n=64, m=64, d=64, dv=64)
            bf16 = aot.planned_launches(torch.bfloat16, n=64, m=64, d=64, dv=64)
        assert kernels.get_options() == kernels.Options()
        assert {launch.args.get("DOT_PRECISION") for launch in fp32} == {"tf32", None}
        assert {launch.args.get("DOT_PRECISION") for launch in bf16} == {"ieee", None}  # tf32 is about float32 only
        with pytest.raises(TypeError):
            kernels.set_options(fast=True)

    def test_prune_respects_shared_memory_dtype_and_slice_width(monkeypatch):
        monkeypatch.setattr(kernels, "_device_smem_limit", lambda index: 232448)
        prune = kernels.scft_attn_fwd.early_config_prune
        configs = kernels.scft_attn_fwd.configs

        def fwd_args(dtype, dv):
            return {"Q": torch.empty(1, dtype=dtype, device="meta"), "D": 992, "DV": dv}

        wide = prune(configs, fwd_args(torch.bfloat16, 992))
        assert wide == kernels.FWD_CONFIGS  # every 16-bit config fits an H100
        assert prune(configs, fwd_args(torch.float32, 992)) == kernels.FWD_CONFIGS_FP32
        narrow = prune(configs, fwd_args(torch.bfloat16, 64))  # one 64-wide slice covers Dv
        assert narrow and all(c.kwargs["BLOCK_DV"] <= 64 for c in narrow)
        monkeypatch.setattr(kernels, "_device_smem_limit", lambda index: 65536)  # sm_75's 64 KiB
        small = prune(configs, fwd_args(torch.bfloat16, 992))
        assert small and all(kernels.smem_estimate("fwd", c, 2) <= 65536 for c in small) and len(small) < len(wide)
        monkeypatch.setattr(kernels, "_device_smem_limit", lambda index: 1024)
        with pytest.raises(RuntimeError, match="no fwd configuration fits"):
            prune(configs, fwd_args(torch.bfloat16, 992))

    def test_deterministic_mode_pins_every_kernel_to_its_first_pickable_config(monkeypatch):
        # The autotuner picks by timing, which can differ from one process to the next, and the
        # tiles set the order of the fp32 sums: deterministic mode takes the timing out.
        monkeypatch.setattr(kernels, "_device_smem_limit", lambda index: 232448)
        args = {"Q": torch.empty(1, dtype=torch.bfloat16, device="meta"), "D": 992, "DV": 992}

        def pruned(autotuned, **extra):
            return autotuned.early_config_prune(autotuned.configs, {**args, **extra})

        timed = pruned(kernels.scft_attn_fwd)
        assert len(timed) > 1 and pruned(kernels.scft_attn_fwd_pinned) == timed[:1]
        atomic = pruned(kernels.scft_attn_bwd_dkdv, ATOMIC_DQ=True)
        assert len(atomic) > 1 and pruned(kernels.scft_attn_bwd_dkdv, ATOMIC_DQ=False) == atomic[:1]
        assert pruned(kernels.scft_attn_bwd_dq) == kernels.BWD_DQ_CONFIGS[:1]  # only deterministic mode runs it
        # The forward takes the pinned handle under either switch.
        handles = []

        def record(autotuned):
            handles.append(autotuned)
            return aot.LaunchRecorder()(autotuned)

        q = torch.empty(1, 1, 8, 16, dtype=torch.bfloat16, device="meta")
        kernels.attention_forward(q, q, q, 0.25, launch=record)
        with kernels.options(deterministic=True):
            kernels.attention_forward(q, q, q, 0.25, launch=record)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            kernels.attention_forward(q, q, q, 0.25, launch=record)
        finally:
            torch.use_deterministic_algorithms(previous)
        assert handles == [kernels.scft_attn_fwd, kernels.scft_attn_fwd_pinned, kernels.scft_attn_fwd_pinned]

    @pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
    def test_triton_ops_trace_on_fake_cuda_tensors(deterministic, monkeypatch):
        """The torch.library.triton_op pair, as AOTAutograd / torch.compile trace it: on fake CUDA
        tensors (no GPU needed) the ops decompose into their Triton kernel launches with the
        right outputs; the fake kernels give torch.compile the output shapes and dtypes."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch._subclasses.functional_tensor import dispatch_functionalize
        from torch.fx.experimental.proxy_tensor import make_fx

        from sketchcolor.ops import _triton_attention  # noqa: F401  (registers the ops)

        if not torch.cuda.is_available():  # the prune asks the driver for the device's shared memory
            monkeypatch.setattr(kernels, "_device_smem_limit", lambda index: 232448)

        def step(q, k, v, grad_out):
            out, lse = torch.ops.sketchcolor.scft_attn_fwd_triton(q, k, v, 0.03)
            return (out, lse, *torch.ops.sketchcolor.scft_attn_bwd_triton(grad_out, q, k, v, out, lse, 0.03))

        with FakeTensorMode():
            q = torch.empty(2, 3, 100, 992, device="cuda", dtype=torch.bfloat16)
            # k laid out as a transposed view (the features axis outermost): strides need no copy
            k = torch.empty_strided((2, 3, 77, 992), (3 * 77 * 992, 77 * 992, 1, 77), device="cuda", dtype=torch.bfloat16)
            v = torch.empty(2, 3, 77, 160, device="cuda", dtype=torch.bfloat16)
            grad_out = torch.empty(2, 3, 100, 160, device="cuda", dtype=torch.bfloat16)
            with kernels.options(deterministic=deterministic):
                graph = make_fx(dispatch_functionalize(step), tracing_mode="fake")(q, k, v, grad_out)
                shapes = [(tuple(t.shape), t.dtype) for t in step(q, k, v, grad_out)]
        launched = re.findall(r"triton_kernel_wrapper_functional\(kernel_idx = \d+", graph.code)
        assert len(launched) == (4 if deterministic else 3), graph.code
        assert ("'ATOMIC_DQ': False" in graph.code) == deterministic
        assert shapes == [
            ((2, 3, 100, 160), torch.bfloat16), ((2, 3, 100), torch.float32),
            ((2, 3, 100, 992), torch.bfloat16), ((2, 3, 77, 992), torch.bfloat16), ((2, 3, 77, 160), torch.bfloat16),
        ]

    def test_ops_declare_the_kernels_they_launch():
        """torch keys its AOTAutograd cache on the source of the Triton kernels an op launches:
        both ops must list theirs, so a kernel edit invalidates compiled graphs."""
        from torch._library.triton import get_triton_kernels_for_op

        from sketchcolor.ops import _triton_attention  # noqa: F401  (registers the ops)

        assert get_triton_kernels_for_op("sketchcolor::scft_attn_fwd_triton") == [kernels.scft_attn_fwd, kernels.scft_attn_fwd_pinned]
        assert get_triton_kernels_for_op("sketchcolor::scft_attn_bwd_triton") == [
            kernels.scft_attn_bwd_preprocess, kernels.scft_attn_bwd_dkdv, kernels.scft_attn_bwd_dq,
        ]

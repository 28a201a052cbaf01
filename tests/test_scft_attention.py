"""cpp backend of scft_attention against sketchcolor.reference, plus registration and input checks.

The numerical tests run under both code paths of the CPU kernels' elementwise tile work (the
cpu_isa fixture): the fused AVX-512 loops and the generic ATen code.
"""
from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
import warnings

import pytest
import torch

from conftest import assert_close_to_reference
from sketchcolor import reference
from sketchcolor.ops import scft_attention
from sketchcolor.testing import compare_to_reference

CSRC = Path(__file__).resolve().parent.parent / "csrc"

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
    (1, None, 261, 531, 100, 992),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


# What csrc/common/cpu_isa.h requires of the CPU for the fused tile loops.
HAS_AVX512 = {"avx512f", "avx512bw", "avx512vl"} <= _cpu_flags()


@pytest.fixture(params=["avx512", "generic"])
def cpu_isa(request, monkeypatch):
    """Runs a test once per code path of the tile loops: SKETCHCOLOR_CPU_ISA is read at each call."""
    if request.param == "avx512" and not HAS_AVX512:
        pytest.skip("this CPU lacks AVX-512 F, BW or VL")
    monkeypatch.setenv("SKETCHCOLOR_CPU_ISA", request.param)
    return request.param


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
def test_cpp_matches_reference(shape, dtype, cpu_isa):
    check_against_reference(*make_inputs(*shape, dtype))


@pytest.mark.skipif(not HAS_AVX512, reason="this CPU lacks AVX-512 F, BW or VL")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 97, 1025, 100, 100), (1, None, 261, 531, 992, 37)], ids=str)
def test_fused_and_generic_tile_loops_agree(shape, dtype, monkeypatch):
    # The two paths differ only in exp (within 2 ulp) and the order of row sums, so they agree
    # within what the reference rule allows either of them.
    q, k, v = make_inputs(*shape, dtype)
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], dtype=dtype)
    results = {}
    for isa in ("avx512", "generic"):
        monkeypatch.setenv("SKETCHCOLOR_CPU_ISA", isa)
        results[isa] = forward_backward(lambda *t: scft_attention(*t, impl="cpp", return_lse=True), q, k, v, grad_out)
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = forward_backward(lambda *t: reference.scft_attention(*t, return_lse=True), *exact_inputs, grad_out.double())
    same = forward_backward(lambda *t: reference.scft_attention(*t, return_lse=True), q, k, v, grad_out)
    names = ("out", "lse", "grad_q", "grad_k", "grad_v")
    for name, fused, generic, e, s in zip(names, results["avx512"], results["generic"], exact, same):
        allowed = compare_to_reference(fused, e, s).allowed
        difference = (fused.double() - generic.double()).abs().max().item()
        assert difference <= allowed, f"{name}: |fused - generic| = {difference:.3e} > {allowed:.3e}"


def test_cpu_isa_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("SKETCHCOLOR_CPU_ISA", "avx2")
    q, k, v = (t.detach() for t in make_inputs(1, None, 5, 6, 4, 3, torch.float32))
    with pytest.raises(RuntimeError, match="SKETCHCOLOR_CPU_ISA must be auto, generic or avx512, got 'avx2'"):
        scft_attention(q, k, v, impl="cpp")


# The fused loops' exp and bf16 rounding (csrc/common/avx512.h, which needs no torch header),
# built into a small library next to std::exp: no op or binding exposes them.
AVX512_DRIVER = r"""
#include <cmath>
#include "common/avx512.h"

extern "C" int has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

extern "C" SKETCHCOLOR_AVX512_TARGET void exp_both(const float* x, float* fast, float* exact, long n) {
  for (long i = 0; i < n; i += 16) {
    const __mmask16 lanes = sketchcolor::avx512::first_lanes(n - i);
    sketchcolor::avx512::store(fast + i, lanes, sketchcolor::avx512::exp(sketchcolor::avx512::load(x + i, lanes)));
  }
  for (long i = 0; i < n; ++i) exact[i] = static_cast<float>(std::exp(static_cast<double>(x[i])));
}

extern "C" SKETCHCOLOR_AVX512_TARGET void to_bf16(const float* x, uint16_t* bits, long n) {
  for (long i = 0; i < n; i += 16) {
    const __mmask16 lanes = sketchcolor::avx512::first_lanes(n - i);
    sketchcolor::avx512::store(bits + i, lanes, sketchcolor::avx512::load(x + i, lanes));
  }
}
"""


@pytest.fixture(scope="module")
def avx512_driver(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the AVX-512 driver")
    build = tmp_path_factory.mktemp("avx512_driver")
    source, library = build / "driver.cpp", build / "driver.so"
    source.write_text(AVX512_DRIVER)
    command = [compiler, "-O2", "-std=c++20", "-shared", "-fPIC", f"-I{CSRC}", str(source), "-o", str(library)]
    subprocess.run(command, check=True, capture_output=True)
    driver = ctypes.CDLL(str(library))
    if not driver.has_avx512():
        pytest.skip("this CPU lacks AVX-512 F, BW or VL")
    return driver


def call(function, *tensors: torch.Tensor) -> None:
    function(*(ctypes.c_void_p(t.data_ptr()) for t in tensors), ctypes.c_long(tensors[0].numel()))


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Bit patterns mapped to integers that count representable floats upwards from -inf.
    def ordinal(t):
        bits = t.view(torch.int32).long()
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

    return (ordinal(a) - ordinal(b)).abs()


def any_floats(count: int, generator: torch.Generator) -> torch.Tensor:
    """Uniformly random float32 bit patterns: NaNs, infinities and denormals included."""
    bits = torch.randint(-(2**31), 2**31, (count,), generator=generator, dtype=torch.int64)
    return bits.to(torch.int32).view(torch.float32)


def test_avx512_exp_matches_std_exp(avx512_driver):
    generator = torch.Generator().manual_seed(0)
    finfo = torch.finfo(torch.float32)
    edges = torch.tensor([
        0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 0.34657359, -0.34657359, 0.6931472, -0.6931472,
        88.72283, 88.72284, 89.0, 89.1, 1e30, finfo.max, float("inf"),  # last finite result, then inf
        -87.33654, -87.33655, -103.27893, -103.97207, -103.97208, -104.0, -104.1, -1e30, -finfo.max,
        float("-inf"), float("nan"), finfo.tiny, -finfo.tiny, 1.4e-45, -1.4e-45,  # normal limit, denormal results, +0
    ])
    x = torch.cat([
        edges,
        torch.linspace(-110.0, 95.0, 2_000_001),  # every regime: +0, denormal, normal, inf
        torch.linspace(-1.0, 1.0, 1_000_001),  # across the range reduction's steps at +-ln(2)/2
        torch.randn(1_000_000, generator=generator) * 30,
        any_floats(1_000_000, generator),
        torch.arange(-150, 129, dtype=torch.float32) * 0.6931472,  # near n ln 2, where the reduced argument is ~0
    ])
    fast, exact = torch.empty_like(x), torch.empty_like(x)
    call(avx512_driver.exp_both, x, fast, exact)
    nan = exact.isnan()
    assert torch.equal(fast.isnan(), nan), "exp gives NaN exactly for NaN arguments"
    x, fast, exact = x[~nan], fast[~nan], exact[~nan]
    ulps = ulp_distance(fast, exact)
    worst = ulps.argmax()
    assert ulps.max() <= 2, f"exp({x[worst].item()!r}) = {fast[worst].item()!r}, std::exp: {exact[worst].item()!r}"
    assert torch.equal(fast[x < -104], torch.zeros_like(fast[x < -104])), "-inf and far below -103.97 give +0"
    assert not fast.signbit().any()
    assert torch.equal(fast[x > 89], torch.full_like(fast[x > 89], float("inf")))


def test_avx512_bf16_rounding_matches_torch(avx512_driver):
    # The fused loops write bf16 tiles themselves: bit for bit what the generic code's copy_ gives,
    # denormals and ties included (NaN payloads may differ: both are NaN).
    generator = torch.Generator().manual_seed(1)
    ties = (torch.arange(-(2**15), 2**15, dtype=torch.int64) * 2**16 + 2**15).to(torch.int32).view(torch.float32)
    x = torch.cat([any_floats(1_000_000, generator), torch.randn(1_000_000, generator=generator), ties])
    bits = torch.empty(x.shape, dtype=torch.int16)
    call(avx512_driver.to_bf16, x, bits)
    fused, expected = bits.view(torch.bfloat16), x.to(torch.bfloat16)
    nan = x.isnan()
    assert torch.equal(fused.isnan(), nan)
    assert torch.equal(fused[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_non_contiguous_inputs(dtype, cpu_isa):
    q, k, v = make_inputs(2, 3, 97, 130, 100, 36, dtype, transposed=True)
    assert not q.is_contiguous()
    check_against_reference(q, k, v)


def test_cpp_head_axis_as_batch_of_heads_layout():
    # (B, N, H, D) storage viewed as (B, H, N, D): the usual multi-head layout.
    q, k, v = (torch.randn(2, n, 3, 40, dtype=torch.float64).transpose(1, 2).requires_grad_() for n in (33, 65, 65))
    check_against_reference(q, k, v)


@pytest.mark.parametrize("scale", [0.05, 1.0, -0.3])
def test_cpp_custom_scale(scale, cpu_isa):
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


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_autocast_changes_no_backend_result(impl):
    # The fused backends are custom ops, which autocast passes by; the reference path runs outside
    # it too, so that every impl gives float32 inputs a float32 result under autocast.
    q, k, v = torch.randn(1, 9, 24), torch.randn(1, 11, 24), torch.randn(1, 11, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scft_attention(q, k, v, impl=impl)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, scft_attention(q, k, v, impl=impl))


def test_large_scores_do_not_overflow(cpu_isa):
    q, k, v = make_inputs(1, None, 33, 300, 16, 8, torch.float32)
    with torch.no_grad():
        q.mul_(40.0)
    check_against_reference(q, k, v)


def test_deterministic_for_fixed_thread_count(cpu_isa):
    q, k, v = make_inputs(1, None, 300, 1100, 64, 64, torch.float32)
    grad_out = torch.randn(1, 300, 64)
    first = forward_backward(lambda *t: scft_attention(*t, impl="cpp", return_lse=True), q, k, v, grad_out)
    second = forward_backward(lambda *t: scft_attention(*t, impl="cpp", return_lse=True), q, k, v, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts(threads, cpu_isa):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(*make_inputs(1, None, 300, 1100, 32, 16, torch.float32))
    finally:
        torch.set_num_threads(previous)


def test_inference_mode_with_several_threads(cpu_isa):
    # OpenMP's worker threads do not inherit inference mode; the kernels write into tensors the
    # caller allocated (inference tensors) from them.
    q, k, v = torch.randn(2, 300, 16), torch.randn(2, 70, 16), torch.randn(2, 70, 8)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with torch.inference_mode():
            out, lse = scft_attention(q, k, v, return_lse=True, impl="cpp")
    finally:
        torch.set_num_threads(previous)
    exact, exact_lse = reference.scft_attention(q.double(), k.double(), v.double(), return_lse=True)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), exact_lse, rtol=1e-5, atol=1e-6)


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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = compiled(q, k, v)
    # Backend choice reads cached facts (is the extension loaded, which ops it has): dynamo takes
    # them as constants instead of tracing through the caches and warning about each one.
    assert not [w for w in caught if "Dynamo" in str(w.message)], [str(w.message) for w in caught]
    grads = torch.autograd.grad(loss, (q, k, v))
    expected_loss = layer(q, k, v)
    expected = torch.autograd.grad(expected_loss, (q, k, v))
    torch.testing.assert_close(loss, expected_loss)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_torch_compile_with_a_scale_that_changes_between_calls(dynamic):
    # The second call's scale arrives as a symbolic float (the first one's with dynamic=True): the
    # op's checks must take it, and the graph must use each call's value.
    q, k, v = (t.detach() for t in make_inputs(1, None, 9, 11, 8, 5, torch.float32))
    torch._dynamo.reset()  # both parametrizations' graphs count against one code object's recompile limit
    compiled = torch.compile(lambda q, scale: scft_attention(q, k, v, scale, impl="cpp"), fullgraph=True,
                             backend="aot_eager", dynamic=dynamic)
    for scale in (0.5, 0.7, -1.25):
        torch.testing.assert_close(compiled(q, scale), scft_attention(q, k, v, scale, impl="reference"))
    # Raised while tracing: fullgraph torch.compile reports it wrapped, with the op's message (for
    # a symbolic scale, which the message cannot format, with the line that raises it).
    with pytest.raises(Exception, match="must be finite"):
        compiled(q, math.inf)


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


def test_triton_interpret_set_after_the_kernels_were_imported_says_so():
    # Triton decides interpreted or compiled when a kernel is imported: the compiled kernels would
    # fail on CPU tensors with a message about GPU drivers. A fresh process, whose imports this controls.
    pytest.importorskip("triton")
    script = (
        "import os, torch\n"
        "import sketchcolor.kernels.scft_attention\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from sketchcolor.ops import scft_attention\n"
        "q = torch.randn(1, 4, 8)\n"
        "try:\n"
        "    scft_attention(q, q, q, impl='triton')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (
        "impl='triton' is not available: TRITON_INTERPRET=1 was set after the Triton kernels were imported"
        in result.stdout
    ), result.stdout


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
    ("v must be a dense \\(strided\\) tensor, got layout torch.sparse_coo", lambda q, k, v: (q, k, v.to_sparse())),
    ("q must be a dense \\(strided\\) tensor, got a nested tensor", lambda q, k, v: (torch.nested.nested_tensor(list(q)), k, v)),
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
    with pytest.raises(ValueError, match="scale must be finite and within float32's range"):
        scft_attention(q, k, v, scale=float("nan"), impl="cpp")
    with pytest.raises(ValueError, match="scale must be finite and within float32's range"):
        scft_attention(q, k, v, scale=-1e39, impl="reference")
    for bad in ("0.5", True, torch.tensor(0.5)):
        with pytest.raises(TypeError, match="scale must be a real number"):
            scft_attention(q, k, v, scale=bad, impl="cpp")


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

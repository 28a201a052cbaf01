"""cuda backend of correspondence_loss (csrc/correspondence_loss/*_kernel.cu) against sketchcolor.reference.

GPU only: every test skips cleanly without a CUDA device or without a CUDA build of the extension.
The kernels take float16 and bfloat16 inputs (fp32 arithmetic), so the comparisons use the 2x rule
of tests/conftest.py against the float64 reference; the hardest-negative checks allow near ties to
be resolved either way by different roundings (see check_hardest).

Outputs are poisoned before the kernels write them: NaN-filled blocks of both pools of the caching
allocator are freed right before each call, so the op's allocations reuse them, and the
comparisons (which fail on NaN) then prove every output element was written.
"""
from __future__ import annotations

import pytest
import torch

from test_correspondence_loss import (
    MODES,
    assert_loss_close,
    check_all_invalid,
    check_all_negatives_missing,
    check_cuda_graph_replay,
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
from sketchcolor.ops import correspondence_loss
from sketchcolor.ops.correspondence_loss import FWD_OP


def _cuda_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    from sketchcolor.ops import _backends

    return _backends.unavailable_reason("cuda", torch.device("cuda"), FWD_OP)


_REASON = _cuda_unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")]

DEVICE = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
# (B, H or None, N, M, key_grid, D): one query; odd N != M; a head axis; several query tiles and
# key tiles with tails (N = 129, M = 300); D = 992 and D = 100 (not a multiple of 8: padded rows,
# element-wise tails); many key splits (N small, M = 1025); splits of several key tiles each (B = 8,
# N = 512, M = 2048: 32 query CTAs, so about 8 splits of 256 keys on a 132-SM GPU), where the
# running max crosses tile boundaries inside one CTA.
SHAPES = [
    (1, None, 1, 7, (1, 7), 16),
    (2, None, 37, 45, (5, 9), 24),
    (1, 2, 33, 63, (7, 9), 100),
    (1, None, 129, 300, (15, 20), 992),
    (3, None, 7, 1025, (25, 41), 64),
    (2, None, 200, 257, (1, 257), 64),
    (8, None, 512, 2048, (32, 64), 64),
]


def poison_allocator():
    """NaN in the free blocks of both pools of the caching allocator: requests of at most 1 MiB come
    from the small pool (2 MiB segments), larger ones from the large pool."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    small = [torch.full((1 << 16,), float("nan"), device=DEVICE) for _ in range(64)]   # 256 KiB each
    large = [torch.full((1 << 20,), float("nan"), device=DEVICE) for _ in range(8)]    # 4 MiB each
    torch.cuda.synchronize()
    del small, large


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cuda_matches_reference(shape, dtype, mode):
    q, k, pos, kwargs = make_case(*shape, dtype, **MODES[mode], device=DEVICE)
    poison_allocator()
    if mode == "hardest":
        check_hardest(q, k, pos, kwargs, impl="cuda")
    else:
        compare_with_reference(q, k, pos, kwargs, impl="cuda")


@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_small_margin_and_strided_inputs(mode):
    check_small_margin_and_strided_inputs(mode, "cuda", torch.bfloat16, DEVICE)


@pytest.mark.parametrize("mode", ["triplet_t4", "nll"])
@pytest.mark.parametrize("scale", [-0.4, 2.0])
def test_cuda_custom_scale(mode, scale):
    q, k, pos, kwargs = make_case(1, None, 40, 50, (5, 10), 32, torch.bfloat16, **MODES[mode], device=DEVICE)
    compare_with_reference(q, k, pos, {**kwargs, "scale": scale}, impl="cuda")


def test_cuda_nll_without_gradient_matches_reference():
    # Under no_grad the binding computes lse with a 1-wide value slice (no attention output).
    for dtype in DTYPES:
        q, k, pos, kwargs = make_case(2, None, 129, 300, (15, 20), 100, dtype, **MODES["nll"], device=DEVICE)
        with torch.no_grad():
            fused = correspondence_loss(q, k, pos, impl="cuda", **kwargs)
            exact = reference.correspondence_loss(q.double(), k.double(), pos, **kwargs)
        assert_loss_close(fused, exact, q, k, kwargs.get("scale"))


def test_cuda_hardest_with_exclusion_zero():
    q, k, pos, kwargs = make_case(2, None, 129, 300, (15, 20), 64, torch.bfloat16, **MODES["hardest"], device=DEVICE)
    check_hardest(q, k, pos, {**kwargs, "exclusion": 0}, impl="cuda")


def test_cuda_queries_without_candidates_and_missing_negatives():
    check_hardest_without_candidates("cuda", torch.bfloat16, DEVICE, rel=1e-5)
    check_all_negatives_missing("cuda", torch.bfloat16, DEVICE)


def test_cuda_triplet_backward_ignores_missing_keys_given_any_terms():
    check_triplet_backward_ignores_missing_keys(torch.ops.sketchcolor.corr_triplet_bwd, DEVICE)


def test_cuda_sliced_rows_are_read_in_place_or_copied():
    # Rows 20 elements apart (not a multiple of 8): the binding copies them into padded rows.
    base = torch.randn(2, 31, 20, dtype=torch.bfloat16, device=DEVICE)
    q = base[:, :, :12].requires_grad_()
    k = torch.randn(2, 40, 12, dtype=torch.bfloat16, device=DEVICE).requires_grad_()
    _, _, pos, kwargs = make_case(2, None, 31, 40, (5, 8), 12, torch.bfloat16, **MODES["nll"], device=DEVICE)
    compare_with_reference(q, k, pos, kwargs, impl="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_hardest_ties_pick_the_lowest_index(dtype):
    check_hardest_ties(dtype, impl="cuda", device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_nan_reaches_the_loss(dtype):
    check_nan_reaches_the_loss("cuda", dtype, device=DEVICE)


@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_all_invalid_gives_zero_loss_and_zero_grads(mode):
    check_all_invalid(mode, "cuda", dtype=torch.bfloat16, device=DEVICE)


@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_empty_queries(mode):
    check_empty(mode, "cuda", 2, 0, dtype=torch.bfloat16, device=DEVICE)


@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_deterministic(mode):
    check_deterministic(*make_case(1, None, 300, 70, (7, 10), 32, torch.bfloat16, **MODES[mode], device=DEVICE), impl="cuda")


@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_graph_capture_replays(mode):
    check_cuda_graph_replay(mode, "cuda", torch.bfloat16)


def test_cuda_rejects_float32_with_a_pointer_to_other_backends():
    q, k, pos, kwargs = make_case(1, None, 5, 6, (2, 3), 8, torch.float32, **MODES["nll"], device=DEVICE)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        correspondence_loss(q, k, pos, impl="cuda", **kwargs)
    correspondence_loss(q.detach().bfloat16(), k.detach().bfloat16(), pos, impl="cuda", **kwargs)   # registers
    with pytest.raises(RuntimeError, match=r"float16 or bfloat16.*impl=\"triton\""):
        torch.ops.sketchcolor.corr_nll_loss(q.detach(), k.detach(), pos, 0.3, False)


def test_cuda_entry_points_check_devices_and_indices():
    q, k, pos, kwargs = make_case(2, None, 9, 12, (3, 4), 8, torch.bfloat16, **MODES["triplet_t4"], device=DEVICE)
    q, k, neg, ops = q.detach(), k.detach(), kwargs["neg"], torch.ops.sketchcolor
    correspondence_loss(q, k, pos, impl="cuda", **kwargs)
    with pytest.raises(RuntimeError, match="k is on cpu"):
        ops.corr_triplet_fwd(q, k.cpu(), pos, neg, 0.3, 2.0)
    with pytest.raises(RuntimeError, match=r"neg values must be in \[-1, M\)"):
        ops.corr_triplet_fwd(q, k, pos, neg + 20, 0.3, 2.0)
    with pytest.raises(RuntimeError, match="key_grid"):
        ops.corr_hardest_fwd(q, k, pos, 5, 3, 1, 0.3, 2.0)


def test_cuda_opcheck_registered_ops():
    q, k, pos, kwargs = make_case(2, None, 9, 12, (3, 4), 8, torch.bfloat16, **MODES["triplet_t4"], device=DEVICE)
    correspondence_loss(q, k, pos, impl="cuda", **kwargs)
    neg, ops = kwargs["neg"], torch.ops.sketchcolor
    terms = ops.corr_triplet_fwd(q.detach(), k.detach(), pos, neg, 0.3, 2.0)
    cases = [
        (ops.corr_triplet_fwd.default, (q, k, pos, neg, 0.3, 2.0)),
        (ops.corr_hardest_fwd.default, (q, k, pos, 3, 4, 1, 0.3, 2.0)),
        (ops.corr_nll_loss.default, (q, k, pos, 0.3, True)),
        (ops.corr_nll_loss.default, (q.detach(), k.detach(), pos, 0.3, False)),
        (ops.corr_triplet_bwd.default, (torch.randn_like(terms), q.detach(), k.detach(), pos, neg, terms, 0.3)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_auto_picks_cuda_for_half_precision_and_triton_for_float32():
    from sketchcolor.ops import _backends

    device = torch.device(DEVICE)
    assert _backends.resolve("auto", device, FWD_OP, torch.bfloat16) == "cuda"
    assert _backends.resolve("auto", device, FWD_OP, torch.float32) == "triton"

"""Shared test helpers: seeded fresh inputs and flash-attention's tolerance rule."""
from __future__ import annotations

import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed(request):
    # A different but reproducible seed per test: fresh inputs, never shared zeros.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def low_precision_tolerance(dtype: torch.dtype) -> float:
    """Absolute slack added to the 2x rule: the error floor of one rounding in ``dtype``."""
    return {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float16: 4e-4}[dtype]


def assert_close_to_reference(name: str, actual: torch.Tensor, exact: torch.Tensor, same_precision_ref: torch.Tensor):
    """flash-attention's rule: |actual - exact| <= 2 |ref_lowp - exact| + atol, in max norm.

    ``exact`` is the reference in float64; ``same_precision_ref`` the reference computed in
    the backend's own dtype. For float64 backends the two references coincide and the rule
    reduces to a tight absolute tolerance.
    """
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual.double() - exact.double()).abs().max().item()
    ref_err = (same_precision_ref.double() - exact.double()).abs().max().item()
    allowed = 2 * ref_err + low_precision_tolerance(actual.dtype if actual.is_floating_point() else torch.float64)
    if actual.dtype == torch.float64:
        allowed = 1e-10 * max(1.0, exact.abs().max().item())
    assert err <= allowed, f"{name}: max error {err:.3e} > allowed {allowed:.3e} (reference in same dtype: {ref_err:.3e})"

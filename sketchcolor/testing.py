"""The accuracy rules every backend is held to, shared by the tests and ``sketchcolor verify``.

Tensors (outputs and gradients) follow flash-attention's rule: in max norm,
``|backend - exact| <= 2 |reference in the backend's dtype - exact| + atol(dtype)``, where
``exact`` is sketchcolor.reference in float64. A float64 backend must agree with the float64
reference to 1e-10 x max(1, max |exact|): relative to the largest entry, and an absolute 1e-10
when every entry is below 1 (where a relative bound would shrink below rounding noise).

A scalar mean (the correspondence loss) gets its own rule: rounding errors of a mean cancel
by chance, so the error of the reference's own mean is no yardstick. Every term moves by at
most twice the largest score error, and so does the mean; the allowed error is twice that
bound for the scores of the reference run in the inputs' dtype. A float64 mean is held to
1e-10 x max(1, |exact|), as float64 tensors are.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import reference


def low_precision_tolerance(dtype: torch.dtype) -> float:
    """Absolute slack added to the 2x rule: the error floor of one rounding in ``dtype``."""
    return {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float16: 4e-4}[dtype]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One tensor against the float64 reference. ``problem`` says why it cannot pass at all."""

    max_abs_error: float
    max_rel_error: float  # max_abs_error / max |exact|
    allowed: float  # the largest max_abs_error the rule accepts
    reference_error: float  # the same-precision reference's error (the rule's yardstick)
    problem: str | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None and self.max_abs_error <= self.allowed

    def describe(self, name: str) -> str:
        if self.problem is not None:
            return f"{name}: {self.problem}"
        return (
            f"{name}: max error {self.max_abs_error:.3e} > allowed {self.allowed:.3e} "
            f"(reference in same dtype: {self.reference_error:.3e})"
        )


def compare_to_reference(actual: torch.Tensor, exact: torch.Tensor, same_precision_ref: torch.Tensor) -> Comparison:
    """flash-attention's 2x rule for ``actual`` against ``exact`` (the float64 reference).

    ``same_precision_ref`` is the reference computed in the backend's own dtype. For float64
    backends the two references coincide and the rule is 1e-10 x max(1, max |exact|).
    """
    if actual.shape != exact.shape:
        return Comparison(math.inf, math.inf, 0.0, 0.0, f"shape {tuple(actual.shape)} != {tuple(exact.shape)}")
    ref_err = _max_abs_diff(same_precision_ref, exact)
    if actual.dtype == torch.float64:
        allowed = 1e-10 * max(1.0, _max_abs(exact))
    else:
        allowed = 2 * ref_err + low_precision_tolerance(actual.dtype if actual.is_floating_point() else torch.float64)
    return _comparison(actual, exact, allowed, ref_err)


def score_rounding_error(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> float:
    """max |S - S_exact| of the reference's scores in q's dtype against float64."""
    q, k = q.detach(), k.detach()
    exact = reference.attention_scores(q.double(), k.double(), scale)
    return _max_abs_diff(reference.attention_scores(q, k, scale), exact)


def compare_mean_loss(actual: torch.Tensor, exact: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> Comparison:
    """The scalar-mean rule (module docstring) for a loss on the scores of ``q`` and ``k``."""
    if actual.numel() != 1:
        return Comparison(math.inf, math.inf, 0.0, 0.0, f"expected a scalar loss, got shape {tuple(actual.shape)}")
    if q.dtype == torch.float64:
        score_err = 0.0
        allowed = 1e-10 * max(1.0, _max_abs(exact))
    else:
        score_err = score_rounding_error(q, k, scale)
        allowed = 2 * (2 * score_err) + low_precision_tolerance(q.dtype)
    return _comparison(actual, exact, allowed, 2 * score_err)


def assert_close_to_reference(name: str, actual: torch.Tensor, exact: torch.Tensor, same_precision_ref: torch.Tensor) -> None:
    """The 2x rule as a test assertion."""
    comparison = compare_to_reference(actual, exact, same_precision_ref)
    assert comparison.passed, comparison.describe(name)


def _comparison(actual: torch.Tensor, exact: torch.Tensor, allowed: float, ref_err: float) -> Comparison:
    if not torch.isfinite(actual).all():
        return Comparison(math.nan, math.nan, allowed, ref_err, "non-finite values")
    err = _max_abs_diff(actual, exact)
    scale = _max_abs(exact)
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    return Comparison(err, rel, allowed, ref_err)


def _max_abs(t: torch.Tensor) -> float:
    return t.detach().double().abs().max().item() if t.numel() else 0.0


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0

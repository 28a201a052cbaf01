"""Image scores of sketchcolor.evaluate."""

from __future__ import annotations

import math

import pytest
import torch
from kornia.metrics import psnr

from sketchcolor.evaluate import image_scores


def test_psnr_is_that_of_each_image_and_capped_at_100_db_for_an_exact_match():
    # One page equal to its target (a flat page filled with its mean colour) made its method's
    # mean PSNR infinite, and eval.json invalid JSON ("Infinity").
    torch.manual_seed(0)
    target = torch.rand(3, 3, 16, 20)
    output = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    output[1] = target[1]
    scores = image_scores(output, target)
    assert scores[1].tolist()[:2] == [0.0, pytest.approx(100.0)]
    for index in (0, 2):
        mse = (output[index] - target[index]).square().mean().item()
        assert scores[index, 1].item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
        assert scores[index, 1].item() == pytest.approx(psnr(output[index], target[index], max_val=1.0).item(), rel=1e-5)
    assert torch.isfinite(scores).all()

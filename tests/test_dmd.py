"""The losses of distribution-matching distillation (DMD2, #25), on cases computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from trainers.losses import (distribution_matching_gradient, distribution_matching_loss, gan_discriminator_loss,
                             gan_generator_loss)


def test_the_matching_gradient_is_its_definition_on_a_case_by_hand():
    x0 = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    real = torch.tensor([[0.0, 0.0], [0.5, -0.5]])
    fake = torch.tensor([[3.0, 0.0], [0.5, -0.5]])
    # sample 1: mean |x0 - real| = (1 + 2) / 2 = 1.5, (fake - real) / 1.5 = (2, 0); sample 2: the scores agree
    expected = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(distribution_matching_gradient(x0, real, fake), expected)
    x = x0.clone().requires_grad_(True)
    distribution_matching_loss(x, real, fake).backward()
    assert torch.allclose(x.grad, expected / x0.numel())  # the surrogate's gradient is the matching gradient
    assert torch.equal(distribution_matching_gradient(real, real, fake), torch.zeros_like(real))  # x0 = real: no step


def test_the_gan_losses_are_the_logistic_ones():
    logits = torch.tensor([0.0, 2.0])
    assert gan_generator_loss(logits).item() == pytest.approx((math.log(2) + math.log(1 + math.exp(-2))) / 2)
    assert gan_discriminator_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(2 * math.log(2))

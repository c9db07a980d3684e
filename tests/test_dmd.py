"""The losses of distribution-matching distillation (DMD2, #25), on cases computed by hand, and on a toy whose
score is exact: a 2-D Gaussian mixture.

The toy's teacher denoiser is the mixture's posterior mean E[x0 | x_t], in closed form; the student is a one-step
MLP generator trained by trainers.losses' matching gradient against a small learned fake score (five fake-score
updates per generator update, DMD2's two time-scale rule). It must recover every mode with its weight and mean;
a generator regressed onto one teacher sample per noise (the teacher's stochastic sampler from that noise)
learns the mean of what the sampler can reach from it, which lands between modes.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainers.losses import (distribution_matching_gradient, distribution_matching_loss, gan_discriminator_loss,
                             gan_generator_loss)

MEANS = torch.tensor([[-2.5, -2.5], [2.5, -2.5], [-2.5, 2.5], [2.5, 2.5]])
WEIGHTS = torch.tensor([0.4, 0.3, 0.2, 0.1])
STD = 0.6  # each mode's standard deviation: 8 of them apart
T_MIN, T_MAX = 0.1, 0.98  # the matching gradient's re-noising range


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A variance-preserving schedule on t in [0, 1] (cosine): x_t = alpha x0 + sigma eps."""
    return torch.cos(math.pi / 2 * t)[:, None], torch.sin(math.pi / 2 * t)[:, None]


def teacher_x0(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] of the mixture: each mode's Gaussian posterior mean, weighted by the mode's responsibility."""
    a, s = alpha_sigma(t)
    var = a ** 2 * STD ** 2 + s ** 2  # x_t's variance under each mode
    offset = x_t[:, None, :] - a[:, None] * MEANS[None]
    responsibility = (WEIGHTS.log()[None] - offset.pow(2).sum(-1) / (2 * var)).softmax(-1)
    per_mode = MEANS[None] + (a * STD ** 2 / var)[:, None] * offset
    return (responsibility[..., None] * per_mode).sum(1)


def mlp(inputs: int, width: int = 128) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))


class FakeScore(nn.Module):
    """x0 prediction of the generator's distribution, learnt by denoising its samples; it starts as the teacher
    (a correction initialised to zero), as DMD2's fake score starts as a copy of the teacher."""

    def __init__(self):
        super().__init__()
        self.net = mlp(3)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return teacher_x0(x_t, t) + self.net(torch.cat([x_t, t[:, None]], 1))


def noised(x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = T_MIN + (T_MAX - T_MIN) * torch.rand(len(x0), generator=generator)
    a, s = alpha_sigma(t)
    return a * x0 + s * torch.randn(x0.shape, generator=generator), t


def train_dmd(steps: int = 3000, batch: int = 512, fake_updates: int = 5, seed: int = 0) -> nn.Module:
    """The generator at lr 2e-3 and the fake score at 4e-3, both decayed (cosine; the fake score's to a tenth);
    Adam with beta1 = 0, as DMD2 trains both."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    student, fake = mlp(2), FakeScore()
    opt_g = torch.optim.Adam(student.parameters(), 2e-3, betas=(0.0, 0.99))
    opt_f = torch.optim.Adam(fake.parameters(), 4e-3, betas=(0.0, 0.99))
    cosine = lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))  # noqa: E731
    decay_g = torch.optim.lr_scheduler.LambdaLR(opt_g, cosine)
    decay_f = torch.optim.lr_scheduler.LambdaLR(opt_f, lambda i: max(cosine(i // fake_updates), 0.1))
    for _ in range(steps):
        for _ in range(fake_updates):  # the fake score tracks the generator's current distribution
            with torch.no_grad():
                x0 = student(torch.randn(batch, 2, generator=g))
            x_t, t = noised(x0, g)
            opt_f.zero_grad()
            (fake(x_t, t) - x0).pow(2).mean().backward()
            opt_f.step()
            decay_f.step()
        x0 = student(torch.randn(batch, 2, generator=g))
        x_t, t = noised(x0.detach(), g)
        with torch.no_grad():
            real, mine = teacher_x0(x_t, t), fake(x_t, t)
        opt_g.zero_grad()
        distribution_matching_loss(x0, real, mine).backward()
        opt_g.step()
        decay_g.step()
    return student


def teacher_sample(z: torch.Tensor, generator: torch.Generator, steps: int = 20) -> torch.Tensor:
    """The teacher's stochastic sampler (DDIM with eta = 1, i.e. ancestral) from z at T_MAX."""
    ts = torch.linspace(T_MAX, 0.0, steps + 1)
    x = z
    for t, s in zip(ts[:-1], ts[1:]):
        (a_t, s_t), (a_s, s_s) = alpha_sigma(t.expand(len(x))), alpha_sigma(s.expand(len(x)))
        x0 = teacher_x0(x, t.expand(len(x)))
        eps = (x - a_t * x0) / s_t
        noise_std = (s_s / s_t) * (1 - (a_t / a_s) ** 2).clamp_min(0).sqrt()
        x = a_s * x0 + (s_s ** 2 - noise_std ** 2).clamp_min(0).sqrt() * eps \
            + noise_std * torch.randn(x.shape, generator=generator)
    return x


def train_regression(steps: int = 3000, batch: int = 512, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    student = mlp(2)
    opt = torch.optim.Adam(student.parameters(), 1e-3)
    for _ in range(steps):
        z = torch.randn(batch, 2, generator=g)
        target = teacher_sample(z, g)
        opt.zero_grad()
        (student(z) - target).pow(2).mean().backward()
        opt.step()
    return student


def modes(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per mode: the share of samples within 3 std of its mean, and their mean; and the share near no mode."""
    distance = torch.cdist(samples, MEANS)
    nearest, near = distance.argmin(1), distance.min(1).values < 3 * STD
    weights = torch.stack([((nearest == k) & near).float().mean() for k in range(len(MEANS))])
    means = torch.stack([samples[(nearest == k) & near].mean(0) if ((nearest == k) & near).any()
                         else torch.full((2,), float("inf")) for k in range(len(MEANS))])
    return weights, means, 1 - near.float().mean().item()




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


def test_matching_recovers_every_mode_where_regression_blurs_them():
    dmd = train_dmd()
    with torch.no_grad():  # 400k samples: the smallest mode's mean to about 0.01 std
        weights, means, between = modes(dmd(torch.randn(400000, 2, generator=torch.Generator().manual_seed(9))))
    assert (weights > 0.05).all(), weights  # every mode hit
    assert (weights / weights.sum() - WEIGHTS).abs().max() < 0.1, weights
    error = (means - MEANS).norm(dim=1) / STD
    assert (error < 0.1).all(), error

    regressed = train_regression(steps=100)
    with torch.no_grad():
        r_weights, _, r_between = modes(regressed(torch.randn(20000, 2, generator=torch.Generator().manual_seed(9))))
    assert r_between > 0.3 or (r_weights / r_weights.sum().clamp_min(1e-9) - WEIGHTS).abs().max() > 0.1, \
        (r_weights, r_between)  # regression puts its samples between modes, or drops modes

"""One jump of a teacher's probability-flow ODE solver, and the classifier-free-guided teacher it integrates.

Distillation asks a frozen teacher where the ODE goes from timestep t to an earlier s (LCM's Psi, progressive
distillation's two DDIM steps). A teacher is a callable `denoise(z, t) -> (x0_hat, eps_hat)` on the schedule's
timesteps (B,) (what `Backbone.denoise` returns), so every solver serves epsilon, v and sample-predicting models
alike. Notation as in trainers/diffusion.py: z_t = alpha_t x0 + sigma_t eps; the Euler step reads the betas of a
discrete VP schedule.
"""
from __future__ import annotations

from typing import Callable

import torch

from trainers.diffusion import Schedule, _b, alpha_sigma, ddim_step

Denoise = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SOLVERS = ("ddim", "dpmpp_2m", "euler")


def guided(x_cond: torch.Tensor, x_uncond: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance in the LCM paper's convention: (1 + omega) x_c - omega x_u = x_c + omega (x_c - x_u).

    omega = 0 is the conditional model. diffusers pipelines call guidance_scale what is omega + 1 here.
    Linear in the model output, so it applies alike to eps, v and x0 predictions.
    """
    return x_cond + _b(omega, x_cond) * (x_cond - x_uncond)


def guided_teacher(denoise_pair: Callable, cond: dict, uncond: dict, omega: torch.Tensor) -> Denoise:
    """A classifier-free-guided teacher (z, t) -> guided (x0_hat, eps_hat): `denoise_pair(z, t, kwargs)` runs the
    conditional and unconditional inputs as one batch of twice the size."""
    both = cat_kwargs(cond, uncond)

    def denoise(z, t):
        x0, eps = denoise_pair(torch.cat([z, z]), torch.cat([t, t]), both)
        (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
        return guided(x0_c, x0_u, omega), guided(eps_c, eps_u, omega)
    return denoise


def cat_kwargs(a, b):
    """Two denoiser kwargs dicts as one batch (nested dicts recursed; non-tensors taken from a)."""
    if isinstance(a, dict):
        return {k: cat_kwargs(a[k], b[k]) for k in a}
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return a


def solve(denoise: Denoise, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, schedule: Schedule,
          solver: str = "ddim", substeps: int = 1) -> torch.Tensor:
    """z_s from z_t (t > s >= 0, per sample) with `substeps` teacher evaluations.

    ddim: z_s = alpha_s x0_hat + sigma_s eps_hat (Song et al. 2021; first-order DPM-Solver++).
    euler: an Euler step of the variance-preserving ODE in t, dz/dt = -beta_t / 2 * (z - eps_hat / sigma_t).
    dpmpp_2m: DPM-Solver++(2M) (Lu et al. 2022) in log-SNR; its first sub-step is first order, so with one
    sub-step it is DDIM, and it reaches second order from the second sub-step on.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
    acp = schedule.acp  # the solvers below integrate a discrete VP process
    times = [torch.round(t - (t - s) * (j / substeps)).long() for j in range(substeps + 1)]
    previous = None  # (x0_hat, h) of the last sub-step, for the multistep correction
    for a, b in zip(times, times[1:]):
        x0, eps = denoise(z, a)
        if solver == "ddim":
            z = ddim_step(x0, eps, *alpha_sigma(acp, b))
        elif solver == "euler":
            z = euler_step(z, eps, a, b, acp)
        else:
            z, previous = dpmpp_2m_step(z, x0, a, b, acp, previous)
    return z


def euler_step(z, eps, t, s, acp):
    """One Euler step of the VP probability-flow ODE, beta_t read off the discrete schedule."""
    acp = acp.to(t.device)
    beta = 1 - acp[t] / torch.where(t > 0, acp[(t - 1).clamp(min=0)], torch.ones_like(acp[t]))
    _, sigma_t = alpha_sigma(acp, t)
    dz_dt = -0.5 * _b(beta, z) * (z - eps / _b(sigma_t, z))
    return z + _b((s - t).to(z.dtype), z) * dz_dt


def dpmpp_2m_step(z, x0, t, s, acp, previous):
    """DPM-Solver++(2M) from t to s given this step's x0_hat and the last step's (x0_hat, h), if any.

    First order where there is no previous step, where it had no length, and into s = 0 (where log-SNR
    jumps; diffusers' lower_order_final). A sub-step of no length (t == s after rounding) leaves z as it is.
    """
    alpha_t, sigma_t = alpha_sigma(acp, t)
    alpha_s, sigma_s = alpha_sigma(acp, s)
    h = torch.log(alpha_s / sigma_s) - torch.log(alpha_t / sigma_t)  # step in log-SNR / 2
    moves = h != 0
    data = x0
    if previous is not None:
        prev_x0, prev_h = previous
        r = prev_h / torch.where(moves, h, torch.ones_like(h))
        coef = torch.where((prev_h != 0) & moves & (s > 0), 1 / (2 * r), torch.zeros_like(r))
        data = _b(1 + coef, x0) * x0 - _b(coef, x0) * prev_x0
    z_s = _b(sigma_s / sigma_t, z) * z - _b(alpha_s * torch.expm1(-h), z) * data
    return torch.where(moves.view(-1, *[1] * (z.dim() - 1)), z_s, z), (x0, h)

"""Diffusion math as pure functions of tensors: schedules, parameterisations, SNR weights, the DDIM step.

Notation follows Salimans & Ho (2022) and Kingma et al. (2021): z_t = alpha_t * x0 + sigma_t * eps with
alpha_t**2 + sigma_t**2 == 1 (variance preserving), SNR(t) = alpha_t**2 / sigma_t**2. Coefficients of shape
(B,) broadcast against (B, C, H, W) tensors through `_b`.
"""
from __future__ import annotations

import math

import torch


def make_betas(schedule: str, beta_start: float, beta_end: float, num_timesteps: int) -> torch.Tensor:
    """Beta schedules as diffusers names them (float64 for exact alphas_cumprod)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":  # Stable Diffusion's: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal (2021) cosine schedule
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        t = torch.arange(num_timesteps, dtype=torch.float64)
        return torch.tensor([min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999) for i in t.tolist()],
                            dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {schedule!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last step has SNR 0."""
    sqrt_acp = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_acp[0].clone(), sqrt_acp[-1].clone()
    sqrt_acp = (sqrt_acp - last) * first / (first - last)
    acp = sqrt_acp**2
    alphas = torch.cat([acp[:1], acp[1:] / acp[:-1]])
    return 1 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1 - betas, 0)


def alpha_sigma(acp: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t = sqrt(acp[t]), sigma_t = sqrt(1 - acp[t]) for integer timesteps t; t = -1 is clean data (1, 0),
    where a DDIM sampler with set_alpha_to_one ends."""
    acp = acp.to(t.device)
    a = torch.where(t >= 0, acp[t.clamp(min=0)], torch.ones((), dtype=acp.dtype, device=acp.device))
    return a.sqrt(), (1 - a).sqrt()


def _b(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample coefficient (B,) against x (B, ...), in x's dtype."""
    return coef.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """The forward process z_t = alpha_t x0 + sigma_t eps."""
    return _b(alpha_t, x0) * x0 + _b(sigma_t, x0) * eps


def v_from_x0_eps(x0, eps, alpha_t, sigma_t):
    """v-target of Salimans & Ho (2022); with alpha_t**2 + sigma_t**2 == 1 it inverts exactly."""
    return _b(alpha_t, x0) * eps - _b(sigma_t, x0) * x0


def x0_from_v(z_t, v, alpha_t, sigma_t):
    return _b(alpha_t, z_t) * z_t - _b(sigma_t, z_t) * v


def eps_from_v(z_t, v, alpha_t, sigma_t):
    return _b(sigma_t, z_t) * z_t + _b(alpha_t, z_t) * v


def x0_from_eps(z_t, eps, alpha_t, sigma_t):
    return (z_t - _b(sigma_t, z_t) * eps) / _b(alpha_t, z_t)


def eps_from_x0(z_t, x0, alpha_t, sigma_t):
    return (z_t - _b(alpha_t, z_t) * x0) / _b(sigma_t, z_t)


def target_for(prediction_type: str, x0, eps, alpha_t, sigma_t) -> torch.Tensor:
    """What a model of `prediction_type` should output for z_t made from (x0, eps)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return v_from_x0_eps(x0, eps, alpha_t, sigma_t)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def to_x0_eps(prediction_type: str, model_output, z_t, alpha_t, sigma_t):
    """Convert any parameterisation to (x0_hat, eps_hat), so samplers see one kind of model."""
    if prediction_type == "epsilon":
        return x0_from_eps(z_t, model_output, alpha_t, sigma_t), model_output
    if prediction_type == "v_prediction":
        return x0_from_v(z_t, model_output, alpha_t, sigma_t), eps_from_v(z_t, model_output, alpha_t, sigma_t)
    if prediction_type == "sample":
        return model_output, eps_from_x0(z_t, model_output, alpha_t, sigma_t)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def snr(alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    return alpha_t**2 / sigma_t**2


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for an MSE on the model's own target.

    On x0 the weight is min(SNR, gamma); an eps-MSE already carries a factor SNR, a v-MSE a factor SNR + 1,
    so those divide it out.
    """
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    return clipped


def ddim_step(x0_hat, eps_hat, alpha_s, sigma_s):
    """Deterministic DDIM step (Song et al. 2021, eta=0) to time s: z_s = alpha_s x0_hat + sigma_s eps_hat."""
    return add_noise(x0_hat, eps_hat, alpha_s, sigma_s)


def offset_noise(eps: torch.Tensor, offset: torch.Tensor, strength: float) -> torch.Tensor:
    """Offset noise (Guttenberg 2023): a per-sample, per-channel constant added to eps; offset is (B, C)."""
    return eps + strength * offset.to(eps.dtype)[..., None, None]


def consistency_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of a consistency function f = c_skip z + c_out x0_hat (Song et al. 2023, LCM).

    Timesteps are scaled first, as diffusers' LCMScheduler does; c_skip(0) = 1 and c_out(0) = 0, so f is
    the identity at t = 0 (the boundary condition) and close to x0_hat a few timesteps above it.
    """
    scaled = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """(B,) mean of sqrt((a - b)**2 + c**2) - c: L2-like for |a - b| >> c, quadratic and gentle below it."""
    return ((a.float() - b.float()).pow(2) + c * c).sqrt().sub(c).flatten(1).mean(1)


def guidance_embedding(omega: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, dim) sinusoidal features of the guidance scale omega (scaled by 1000, like a timestep).

    The same features diffusers' pipelines feed a U-Net with time_cond_proj_dim, from guidance_scale - 1.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=omega.device) * -(math.log(10000.0) / (half - 1)))
    args = omega.float()[:, None] * 1000.0 * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def progressive_target(z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """x_tilde such that one DDIM step from z_t with x0_hat = x_tilde lands on z_s (Salimans & Ho 2022, Alg. 2).

    Solves z_s = alpha_s x + (sigma_s / sigma_t) (z_t - alpha_t x) for x; at s = -1 (sigma_s = 0) it is z_s.
    """
    ratio = _b(sigma_s / sigma_t, z_t)
    return (z_s - ratio * z_t) / (_b(alpha_s, z_t) - ratio * _b(alpha_t, z_t))

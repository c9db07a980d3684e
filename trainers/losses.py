"""The denoising loss that fine-tuning and ControlNet share (Ho et al. 2020), on any Schedule.

Per sample: a seeded timestep and noise (with the recipe's offset), x_t from the schedule, and the MSE of the
model's output against the schedule's target (eps, v or velocity), weighted as the schedule says (min-SNR-gamma
for VP) and by the batch's per-source weights.
"""
from __future__ import annotations

from typing import Callable

import torch

from trainers import diffusion, seeding
from trainers.diffusion import Schedule


def denoising_loss(x0: torch.Tensor, batch: dict, schedule: Schedule, predict: Callable, snr_gamma: float | None = None,
                   noise_offset: float = 0.0) -> torch.Tensor:
    """The mean loss of `predict(x_t, t)` (t: the schedule's timestep; the model's own is
    `schedule.model_timestep(t)`) against the schedule's target on each sample's seeded noise and timestep."""
    seeds, device = batch["seeds"], x0.device
    eps = seeding.randn(seeds, seeding.NOISE, x0.shape[1:], device)
    if noise_offset:
        eps = diffusion.offset_noise(eps, seeding.randn(seeds, seeding.OFFSET, x0.shape[1:2], device), noise_offset)
    t = schedule.sample_timesteps(seeds, device)
    per_sample = denoising_error(schedule, predict, x0, eps, t)
    weight = schedule.loss_weight(t, snr_gamma)
    if weight is not None:
        per_sample = per_sample * weight
    if "loss_weight" in batch:  # per-source weights, e.g. prior preservation
        per_sample = per_sample * batch["loss_weight"].to(device, non_blocking=True)
    return per_sample.mean()


def denoising_error(schedule: Schedule, predict: Callable, x0: torch.Tensor, eps: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """(B,) unweighted MSE of `predict(x_t, model timestep)` against its target at given noise and timesteps."""
    pred = predict(schedule.add_noise(x0, eps, t), schedule.model_timestep(t))
    return (pred.float() - schedule.target(x0, eps, t)).pow(2).mean(dim=(1, 2, 3))

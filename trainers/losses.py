"""The denoising loss that fine-tuning and ControlNet share (Ho et al. 2020), on any Schedule.

Per sample: a seeded timestep and noise (with the recipe's offset), x_t from the schedule, and the MSE of the
model's output against the schedule's target (eps, v or velocity), weighted as the schedule says (min-SNR-gamma
for VP) and by the batch's per-source weights. With masks (a `mask` per image, 1 = the subject) each latent
element's error is weighted by the mask averaged over the pixels it covers, raised to `mask_floor` outside: as in
kohya's masked loss, the mean is over all elements, so a small subject also means a smaller loss.
"""
from __future__ import annotations

from typing import Callable

import torch

from trainers import diffusion, seeding
from trainers.diffusion import Schedule
from trainers.images import area_downsample


def denoising_loss(x0: torch.Tensor, batch: dict, schedule: Schedule, predict: Callable, snr_gamma: float | None = None,
                   noise_offset: float = 0.0, mask_floor: float = 0.0) -> torch.Tensor:
    """The mean loss of `predict(x_t, t)` (t: the schedule's timestep; the model's own is
    `schedule.model_timestep(t)`) against the schedule's target on each sample's seeded noise and timestep."""
    seeds, device = batch["seeds"], x0.device
    eps = seeding.randn(seeds, seeding.NOISE, x0.shape[1:], device)
    if noise_offset:
        eps = diffusion.offset_noise(eps, seeding.randn(seeds, seeding.OFFSET, x0.shape[1:2], device), noise_offset)
    t = schedule.sample_timesteps(seeds, device, x0.shape)
    mask = latent_mask(batch["mask"].to(device, non_blocking=True), x0.shape[-2:], mask_floor) \
        if "mask" in batch else None
    per_sample = denoising_error(schedule, predict, x0, eps, t, mask)
    weight = schedule.loss_weight(t, snr_gamma)
    if weight is not None:
        per_sample = per_sample * weight
    if "loss_weight" in batch:  # per-source weights, e.g. prior preservation
        per_sample = per_sample * batch["loss_weight"].to(device, non_blocking=True)
    return per_sample.mean()


def denoising_error(schedule: Schedule, predict: Callable, x0: torch.Tensor, eps: torch.Tensor,
                    t: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) MSE of `predict(x_t, model timestep)` against its target at given noise and timesteps; `weight`
    (B, 1, h, w), e.g. a latent mask, scales each element's squared error first."""
    pred = predict(schedule.add_noise(x0, eps, t), schedule.model_timestep(t))
    error = (pred.float() - schedule.target(x0, eps, t)).pow(2)
    return (error if weight is None else error * weight).mean(dim=(1, 2, 3))


def latent_mask(mask: torch.Tensor, size: tuple[int, int], floor: float = 0.0) -> torch.Tensor:
    """(B, 1, H, W) masks in [0, 1] at pixel (or latent) size -> (B, 1, h, w) loss weights at latent size: each
    latent element gets the mean of the pixels it covers (area averaging), mapped so that background (0) weighs
    `floor` and the subject (1) weighs 1."""
    return floor + (1.0 - floor) * area_downsample(mask, size)

"""The denoising loss that fine-tuning and ControlNet share (Ho et al. 2020), on any Schedule; and the losses of
distribution-matching distillation (DMD2): the matching gradient as a loss, and the GAN head's two losses.

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


def distribution_matching_gradient(x0: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """DMD's gradient on generated samples (Yin et al. 2024): the fake score's denoised estimate minus the real
    score's, at the same re-noised x_t, each sample divided by its mean |x0 - real_x0| so that the step size does
    not depend on how far off the sample is (the normaliser of DMD's public code). The gradient of KL(fake || real)
    with respect to x0, up to a positive weight per timestep; a sample the two scores agree on gets none, and so
    does one that already equals the real score's estimate (where the public code's nan_to_num gave 3e38)."""
    dims = tuple(range(1, x0.dim()))
    scale = (x0 - real_x0).abs().mean(dim=dims, keepdim=True)
    return torch.where(scale > 0, (fake_x0 - real_x0) / scale.clamp_min(torch.finfo(scale.dtype).tiny), 0.0)


def distribution_matching_loss(x0: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient with respect to x0 is the distribution-matching gradient divided by x0.numel():
    0.5 * mean((x0 - stop_grad(x0 - g))^2). The scores get no gradient through it."""
    x0 = x0.float()
    with torch.no_grad():
        target = x0 - distribution_matching_gradient(x0, real_x0.float(), fake_x0.float())
    return 0.5 * (x0 - target).pow(2).mean()


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the generator: -log sigmoid(D(fake))."""
    return torch.nn.functional.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's logistic loss: -log sigmoid(D(real)) - log(1 - sigmoid(D(fake)))."""
    return (torch.nn.functional.softplus(-real_logits.float()).mean()
            + torch.nn.functional.softplus(fake_logits.float()).mean())

"""The interface every backbone family presents to objectives and the engine."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LatentDist:
    """The VAE posterior per image, so a latent is drawn with per-sample seeded noise (or cached)."""

    mean: torch.Tensor  # (B, C, h, w)
    std: torch.Tensor   # (B, C, h, w)


class Backbone:
    """Components of one model family plus the two encoders training needs."""

    family: str = ""
    denoiser: torch.nn.Module      # U-Net or transformer: what LoRA or full fine-tuning trains
    text_encoders: dict[str, torch.nn.Module]
    vae: torch.nn.Module
    scheduler_config: dict         # the model's training noise schedule (diffusers scheduler config)
    lora_targets: tuple[str, ...]  # default LoRA target modules of the denoiser

    @classmethod
    def load(cls, source) -> "Backbone":
        raise NotImplementedError

    def encode_prompts(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Conditioning keyword arguments for the denoiser."""
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor) -> LatentDist:
        raise NotImplementedError

    def latents_from(self, dist: LatentDist, noise: torch.Tensor) -> torch.Tensor:
        """Draw z ~ q(z|x) with the given noise and apply the VAE's latent scaling."""
        z = dist.mean + dist.std * noise
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], denoiser=None):
        raise NotImplementedError

    def pipeline(self, denoiser, text_encoders, scheduler):
        """A diffusers pipeline around (possibly trained) components, for validation and export checks."""
        raise NotImplementedError

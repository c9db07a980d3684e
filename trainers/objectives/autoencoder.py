"""Autoencoder: train a pipeline's VAE (AutoencoderKL) from scratch or further, as a latent model's first stage.

Loss per image: a pixel reconstruction term (L1 or MSE) between x and decode(z), z ~ q(z|x), plus
kl_weight * KL(q(z|x) || N(0, I)) per latent element, as in Rombach et al. (2022) without the perceptual and
adversarial terms (flat synthetic images do not need them). The exported VAE carries
`scaling_factor = 1 / std(z)`, measured as a running average during training, so a diffusion model trained
on its latents sees unit variance, the convention SD's 0.18215 follows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from trainers import seeding
from trainers.config import ranged
from trainers.errors import ConfigError
from trainers.objectives.base import Objective


@dataclass(frozen=True)
class AutoencoderOptions:
    """objective.autoencoder: the options of this objective (recipe section objective.autoencoder)."""

    reconstruction: Literal["l1", "mse"] = "l1"  # pixel loss between an image and its decoded latent
    kl_weight: float = ranged(1e-6, min=0.0)  # weight of KL(q(z|x) || N(0, I)); SD's VAE used 1e-6
    latent_std_momentum: float = ranged(0.99, min=0.0, max=1.0)  # running latent std -> exported scaling_factor


class Reconstruction(torch.nn.Module):
    """encode -> sample -> decode in one forward, so DDP sees (and synchronises) the whole trained graph."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def enable_gradient_checkpointing(self):
        self.vae.enable_gradient_checkpointing()

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor):
        posterior = self.vae.encode(pixels).latent_dist
        z = posterior.mean + posterior.std * noise
        return self.vae.decode(z).sample, z, posterior.kl()


class Autoencoder(Objective):
    Options = AutoencoderOptions
    name = "autoencoder"
    card_tags = ("autoencoder", "vae")

    def __init__(self, recipe, backbone):
        super().__init__(recipe, backbone)
        if recipe.adapter.kind != "full":
            raise ConfigError("'adapter.kind': the autoencoder objective trains every VAE weight; set adapter.kind: full")
        if recipe.validation.prompts:
            raise ConfigError("'validation.prompts': the autoencoder objective does not sample from prompts; "
                              "leave validation.prompts empty")
        self.cfg = recipe.objective.autoencoder
        self.vae = backbone.vae.requires_grad_(True)
        self.model = Reconstruction(self.vae)
        self.moments = torch.tensor([0.0, 1.0])  # running E[z], E[z^2]; starts at unit variance

    def trained_modules(self):
        return {"vae": self.model}

    def trainable_named_parameters(self):
        return {f"vae.{n}": p for n, p in self.vae.named_parameters() if p.requires_grad}

    def to(self, device, frozen_dtype, inputs_cached: bool = False):
        if inputs_cached:
            raise ConfigError("data.use_cache: the autoencoder trains on pixels; set data.use_cache: false")
        self.device = torch.device(device)
        self.vae.to(self.device, torch.float32)  # the only module used; the denoiser and text encoders stay put
        self.moments = self.moments.to(self.device)

    def loss(self, batch, step):
        pixels = batch["pixel_values"].to(self.device, non_blocking=True)
        latent_shape = (self.vae.config.latent_channels, *self.latent_side(pixels.shape[-2:]))
        noise = seeding.randn(batch["seeds"], seeding.LATENT, latent_shape, self.device)
        decoded, z, kl = self.wrapped["vae"](pixels, noise)
        error = decoded.float() - pixels.float()
        reconstruction = error.abs().mean() if self.cfg.reconstruction == "l1" else error.pow(2).mean()
        kl = (kl / z[0].numel()).mean()  # per latent element, so kl_weight does not depend on resolution
        loss = reconstruction + self.cfg.kl_weight * kl
        with torch.no_grad():
            m = self.cfg.latent_std_momentum
            z = z.detach().float()
            self.moments.mul_(m).add_((1 - m) * torch.stack([z.mean(), z.pow(2).mean()]))
        return loss, {"loss": loss.detach(), "reconstruction": reconstruction.detach(), "kl": kl.detach()}

    def latent_side(self, pixel_side) -> tuple[int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return pixel_side[0] // factor, pixel_side[1] // factor

    def latent_std(self) -> float:
        mean, square = self.moments.tolist()
        return max(square - mean * mean, 1e-12) ** 0.5

    def state_for_checkpoint(self):
        return {"latent_moments": self.moments}

    def load_checkpoint_state(self, state):
        if "latent_moments" in state:
            self.moments.copy_(state["latent_moments"])

    def export(self, out_dir: Path) -> list[Path]:
        dtype = getattr(torch, self.recipe.export.dtype)
        self.vae.register_to_config(scaling_factor=round(1.0 / self.latent_std(), 5))
        self.vae.to(dtype).save_pretrained(out_dir / "vae", safe_serialization=True)
        self.vae.float()
        return [out_dir / "vae"]

    def validation_pipeline(self):
        raise ConfigError("the autoencoder objective has no sampling pipeline")

    def usage_snippet(self, where: str) -> str:
        return (f"from diffusers import AutoencoderKL\n\n"
                f"vae = AutoencoderKL.from_pretrained({where!r}, subfolder=\"vae\")\n"
                f"latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor\n")

"""The interface every backbone family presents to objectives and the engine."""
from __future__ import annotations

import abc
import functools

from dataclasses import dataclass

import torch

from trainers.devices import host_to_device
from trainers.diffusion import Schedule, schedule_from_config


@dataclass
class LatentDist:
    """The VAE posterior per image, so a latent is drawn with per-sample seeded noise (or cached)."""

    mean: torch.Tensor  # (B, C, h, w)
    std: torch.Tensor   # (B, C, h, w)


class Backbone(abc.ABC):
    """Components of one model family plus the two encoders training needs."""

    family: str = ""
    denoiser: torch.nn.Module      # U-Net or transformer: what LoRA or full fine-tuning trains
    text_encoders: dict[str, torch.nn.Module]
    vae: torch.nn.Module
    scheduler_config: dict         # the model's training noise schedule (diffusers scheduler config)
    lora_targets: tuple[str, ...]  # default LoRA target modules of the denoiser
    lora_text_encoders: tuple[str, ...] | None = None  # the encoders adapter.text_encoder trains; None: all
    card_tags: tuple[str, ...] = ()  # the hub tags of the family's models, on every model card
    license: str = "creativeml-openrail-m"  # the base's licence, which a fine-tune inherits (model card)
    text_groups: dict[str, tuple[str, ...]] | None = None  # encoder -> its text keys, where each can drop alone
    model_options: tuple[str, ...] = ()  # the family-specific ModelConfig keys it reads (t5, guidance, ...)
    patch_size: int = 1            # latent pixels per token side: a token count, which Flux's dynamic shift reads

    @classmethod
    @abc.abstractmethod
    def load(cls, source, model=None) -> "Backbone":
        """Every component from a ModelSource (folder, single file or hub id), frozen; `model` (the recipe's
        ModelConfig) carries the options some families read (model.t5, model.guidance, ...)."""

    @abc.abstractmethod
    def encode_text(self, captions: list[str], device, text_encoders=None) -> dict[str, torch.Tensor]:
        """Per-caption text tensors (B, ...): what a cache stores and `denoiser_kwargs` consumes."""

    def unconditional(self, device, text_encoders=None) -> dict[str, torch.Tensor]:
        """The (1, ...) text tensors a dropped caption trains on: the family's input for CFG's uncond pass."""
        return self.encode_text([""], device, text_encoders)

    @abc.abstractmethod
    def denoiser_kwargs(self, text: dict[str, torch.Tensor], batch: dict, device) -> dict:
        """Keyword arguments for the denoiser from text tensors and the batch's records."""

    def condition(self, captions: list[str], dropped: list[bool] | dict[str, list[bool]], batch: dict, device,
                  text_encoders=None, text: dict | None = None, uncond: dict | None = None) -> dict:
        """Denoiser kwargs with dropped captions replaced by the unconditional input.

        `dropped`: one flag per sample for every text tensor, or per text key (one encoder's input dropped alone).

        `text` (e.g. from a cache) skips the encoders; `uncond` reuses an unconditional input computed once.
        """
        text = text if text is not None else self.encode_text(captions, device, text_encoders)
        per_key = dropped if isinstance(dropped, dict) else dict.fromkeys(text, dropped)
        if any(any(d) for d in per_key.values()):
            uncond = uncond if uncond is not None else self.unconditional(device, text_encoders)
            masks = {k: host_to_device(d, device) for k, d in per_key.items() if any(d)}
            text = {k: torch.where(masks[k].view(-1, *[1] * (v.dim() - 1)), uncond[k].to(v.dtype), v)
                    if k in masks else v for k, v in text.items()}
        return self.denoiser_kwargs(text, batch, device)

    def encode_images(self, pixels: torch.Tensor) -> LatentDist:
        """The VAE posterior of (B, 3, H, W) pixels in [-1, 1]."""
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return LatentDist(dist.mean.float(), dist.std.float())

    def latents_from(self, dist: LatentDist, noise: torch.Tensor) -> torch.Tensor:
        """Draw z ~ q(z|x) with the given noise and apply the VAE's latent scaling."""
        z = dist.mean + dist.std * noise
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    @property
    def trainable_text_encoders(self) -> tuple[str, ...]:
        return self.lora_text_encoders if self.lora_text_encoders is not None else tuple(self.text_encoders)

    def check_resolution(self, resolution: int) -> None:
        """Images must make whole latents and whole patches: a multiple of the VAE's scale times the patch size."""
        from trainers.errors import ConfigError

        step = 2 ** (len(self.vae.config.block_out_channels) - 1) * self.patch_size
        if resolution % step:
            raise ConfigError(f"'data.resolution' {resolution} is not a multiple of {step} (the VAE's scale x the "
                              f"{self.family} transformer's {self.patch_size}x{self.patch_size} patches)"
                              if self.patch_size > 1 else
                              f"'data.resolution' {resolution} is not a multiple of the VAE's scale {step}")

    def sampling_kwargs(self) -> dict:
        """Pipeline arguments that sampling must pass to match training (e.g. T5's sequence length)."""
        return {}

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: dict, denoiser=None) -> torch.Tensor:
        return (denoiser or self.denoiser)(z_t, t, **cond).sample

    @functools.cached_property
    def schedule(self) -> Schedule:
        """The model's own noise process, read once from its scheduler config (an unknown kind is a UserError)."""
        return schedule_from_config(self.scheduler_config, self.patch_size)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, denoiser=None,
                schedule: Schedule | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) of a denoiser (default: the backbone's) read through `schedule` (default: its own):
        the one model boundary solvers and distillation losses call, whatever the parameterisation."""
        schedule = schedule or self.schedule
        out = self.predict(x_t, schedule.model_timestep(t), cond, denoiser=denoiser).float()
        return schedule.to_x0_eps(out, x_t, t)

    # What the registry (trainers.backbones.FAMILIES) reads of a family, without loading a model:
    pipeline_name: str = ""        # the `_class_name` of its folders' model_index.json (how `family: auto` finds it)
    controlnet_pipeline: str | None = None  # the diffusers pipeline that samples it with a ControlNet; None: no ControlNet

    @classmethod
    def pipeline_class(cls):
        """The pipeline class that samples (and loads LoRAs into) this family's folders."""
        import diffusers

        return getattr(diffusers, cls.pipeline_name)

    @abc.abstractmethod
    def pipeline(self, denoiser, text_encoders, scheduler):
        """A diffusers pipeline around (possibly trained) components, for validation and export checks."""

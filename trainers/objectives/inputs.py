"""What every denoising objective draws from a batch: latents z ~ q(z|x) and the frozen text conditioning."""
from __future__ import annotations

import torch

from trainers import seeding
from trainers.backbones.base import Backbone, LatentDist


@torch.no_grad()
def latents(backbone: Backbone, batch: dict, device) -> torch.Tensor:
    """z ~ q(z|x) with per-sample seeded noise, from the cached posterior when the batch carries one."""
    if "latent_mean" in batch:
        dist = LatentDist(batch["latent_mean"].to(device, non_blocking=True),
                          batch["latent_std"].to(device, non_blocking=True))
    else:
        dist = backbone.encode_images(batch["pixel_values"].to(device, non_blocking=True))
    return backbone.latents_from(dist, seeding.randn(batch["seeds"], seeding.LATENT, dist.mean.shape[1:], device))


def dropped_captions(seeds: list[int], p: float, groups: dict[str, tuple[str, ...]] | None = None):
    """Which captions train as the empty prompt (classifier-free guidance), each drawn from its sample's seed.

    groups (a family's text encoder -> its text keys): each encoder's input is dropped on its own, with its own
    draw, and the flags come per text key (the SD3 paper trains so, so that any subset of encoders can be left out).
    """
    def draw(purpose: int) -> list[bool]:
        return (seeding.rand(seeds, purpose, "cpu") < p).tolist() if p > 0 else [False] * len(seeds)

    if groups is None:
        return draw(seeding.DROPOUT)
    return {key: flags for i, keys in enumerate(groups.values())
            for flags in [draw(seeding.mix(seeding.DROPOUT, i + 1))] for key in keys}


def any_dropped(dropped: list[bool] | dict[str, list[bool]]) -> bool:
    return any(any(flags) for flags in dropped.values()) if isinstance(dropped, dict) else any(dropped)


def cached_text(batch: dict, device) -> dict | None:
    """The batch's cached text tensors on the device, or None (then the encoders run)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch["text"].items()} if "text" in batch else None


class FrozenText:
    """Denoiser kwargs of a batch from frozen text encoders (or the batch's cache); the unconditional input,
    which a dropped caption or a CFG pass uses, is encoded once, and a batch's captions once however many losses
    read them (a CFG pair; DMD2's fake-score and generator updates on the same micro-batch)."""

    def __init__(self, backbone: Backbone, device, encoders_on_cpu: bool):
        self.backbone, self.device, self.encoders_on_cpu = backbone, device, encoders_on_cpu
        self._uncond = None
        self._last = None  # (the batch, its encoded captions): holding the batch keeps its identity unique

    @torch.no_grad()
    def __call__(self, batch: dict, dropped: list[bool]) -> dict:
        if any(dropped) and self._uncond is None:
            where = "cpu" if self.encoders_on_cpu else self.device
            self._uncond = {k: v.to(self.device) for k, v in self.backbone.unconditional(where).items()}
        text = cached_text(batch, self.device)
        if text is None:
            if self._last is None or self._last[0] is not batch:
                self._last = (batch, self.backbone.encode_text(batch["captions"], self.device))
            text = self._last[1]
        return self.backbone.condition(batch["captions"], dropped, batch, self.device, text=text, uncond=self._uncond)

    def pair(self, batch: dict) -> tuple[dict, dict]:
        """(cond, uncond) kwargs, for a classifier-free-guided teacher."""
        n = len(batch["seeds"])
        return self(batch, [False] * n), self(batch, [True] * n)


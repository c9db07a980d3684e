"""Validation grids: sample the recipe's prompts with a fixed seed, so grids compare across steps."""
from __future__ import annotations

import contextlib

import torch
from PIL import Image

from trainers.config import ValidationConfig
from trainers.images import make_grid
from trainers.schedulers import seeded_sampling, set_scheduler


@torch.no_grad()
def sample_grid(pipeline, cfg: ValidationConfig, resolution: int, autocast=contextlib.nullcontext,
                **inputs) -> Image.Image:
    """One row per prompt, `images_per_prompt` columns; the global RNG is left untouched.

    inputs: further pipeline arguments, e.g. a ControlNet's conditioning `image`s (one per prompt).
    """
    set_scheduler(pipeline, cfg.scheduler)
    pipeline.set_progress_bar_config(disable=True)
    modules = [m for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in modules]
    with seeded_sampling(cfg.seed), autocast():
        for m in modules:
            m.eval()
        images = pipeline(list(cfg.prompts), num_images_per_prompt=cfg.images_per_prompt,
                          num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                          height=resolution, width=resolution,
                          generator=torch.Generator("cpu").manual_seed(cfg.seed), **inputs).images
    for m, mode in zip(modules, modes):
        m.train(mode)
    return make_grid(images, rows=len(cfg.prompts), cols=cfg.images_per_prompt)

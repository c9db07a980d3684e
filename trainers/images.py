"""Image helpers shared by training data, latent caching, sampling and the validation grids."""

import numpy as np
import torch
from PIL import Image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [-1, 1], the VAE's input range."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float().div(127.5).sub(1.0)


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """(1, H, W) float in [0, 1] from a greyscale mask: 1 where a masked loss counts fully."""
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None]


def area_downsample(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., 1, H, W) -> (..., 1, h, w): each output element the mean of the pixels it covers (a latent's share
    of the subject), as a masked loss weighs latents and as the cache stores masks."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.float()
    batched = mask.float() if mask.dim() == 4 else mask.float()[None]
    out = torch.nn.functional.interpolate(batched, size=tuple(size), mode="area")
    return out if mask.dim() == 4 else out[0]


def make_grid(images: list[Image.Image], rows: int, cols: int) -> Image.Image:
    """Tile same-size images row by row into one RGB picture, so samples can be compared at a glance."""
    if not images or len(images) != rows * cols:
        raise ValueError(f"make_grid needs rows*cols = {rows * cols} images, got {len(images)}")
    width, height = images[0].size
    if any(image.size != (width, height) for image in images):
        raise ValueError(f"make_grid needs images of one size; sizes: {sorted({i.size for i in images})}")
    grid = Image.new("RGB", (cols * width, rows * height))
    for k, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((k % cols) * width, (k // cols) * height))
    return grid

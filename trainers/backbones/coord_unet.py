"""SD's U-Net with two coordinate channels (x and y in [-1, 1]) appended to its input (Liu et al. 2018, CoordConv).

A convolutional U-Net knows where it is only through its zero padding; on small latents that is too weak a cue
for prompts that name positions ("in the top left"). The channels are appended inside `forward`, so the
model's config still says `in_channels: 4` and every stock pipeline, scheduler and LoRA loader treats it as the
U-Net it subclasses. Importing this module registers the class with diffusers, so a pipeline folder whose
model_index.json names it loads with `DiffusionPipeline.from_pretrained`. Its ControlNet (CoordControlNetModel)
appends the same channels.
"""
from __future__ import annotations

import torch
from diffusers import ControlNetModel, ModelMixin, UNet2DConditionModel  # noqa: F401  (ModelMixin: diffusers' loader looks
# for a known base class in the module model_index.json names)

COORD_CHANNELS = 2


class CoordinateInput:
    """Appends the coordinate channels to a diffusers model's input; `stock` is the class it extends."""

    stock: type

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # registers the stock config
        conv = self.conv_in
        self.conv_in = torch.nn.Conv2d(conv.in_channels + COORD_CHANNELS, conv.out_channels,
                                       conv.kernel_size, padding=conv.padding)

    @classmethod
    def _get_init_keys(cls, input_class):
        """The stock class's config keys: this adds no option, so its config loads anywhere the stock one does."""
        return cls.stock._get_init_keys(cls.stock)

    def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        return super().forward(with_coordinates(sample), timestep, encoder_hidden_states, *args, **kwargs)


class CoordUNet2DConditionModel(CoordinateInput, UNet2DConditionModel):
    stock = UNet2DConditionModel


class CoordControlNetModel(CoordinateInput, ControlNetModel):
    """The ControlNet of a CoordUNet: `ControlNetModel.from_unet` copies the U-Net's 6-channel conv_in, so the copy
    must see the same coordinates."""

    stock = ControlNetModel


def with_coordinates(sample: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C + 2, H, W): x then y of each latent pixel's centre, from -1 (left/top) to 1."""
    b, _, h, w = sample.shape
    ys = torch.linspace(-1, 1, h, device=sample.device, dtype=sample.dtype)
    xs = torch.linspace(-1, 1, w, device=sample.device, dtype=sample.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2, H, W): x varies along W, y along H
    return torch.cat([sample, grid.expand(b, -1, -1, -1)], dim=1)


def _register_with_diffusers() -> None:
    """model_index.json names component classes by library; ours resolve on the diffusers package."""
    import diffusers

    for cls in (CoordUNet2DConditionModel, CoordControlNetModel):
        setattr(diffusers, cls.__name__, cls)


_register_with_diffusers()

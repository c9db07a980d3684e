"""SD's U-Net with two coordinate channels (x and y in [-1, 1]) appended to its input (Liu et al. 2018, CoordConv).

A convolutional U-Net knows where it is only through its zero padding; on small latents that is too weak a cue
for prompts that name positions ("in the top left"). The channels are appended inside `forward`, so the
model's config still says `in_channels: 4` and every stock pipeline, scheduler and LoRA loader treats it as the
U-Net it subclasses. Importing this module registers the class with diffusers, so a pipeline folder whose
model_index.json names it loads with `DiffusionPipeline.from_pretrained`.
"""
from __future__ import annotations

import torch
from diffusers import ControlNetModel, ModelMixin, UNet2DConditionModel  # noqa: F401  (ModelMixin: diffusers' loader looks
# for a known base class in the module model_index.json names)

COORD_CHANNELS = 2


class CoordUNet2DConditionModel(UNet2DConditionModel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # registers the stock U-Net config
        stock = self.conv_in
        self.conv_in = torch.nn.Conv2d(stock.in_channels + COORD_CHANNELS, stock.out_channels,
                                       stock.kernel_size, padding=stock.padding)

    @staticmethod
    def _get_init_keys(input_class):
        """The stock U-Net's config keys: this class adds no option, so its config loads anywhere the stock one does."""
        return UNet2DConditionModel._get_init_keys(UNet2DConditionModel)

    def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        return super().forward(with_coordinates(sample), timestep, encoder_hidden_states, *args, **kwargs)


class CoordControlNetModel(ControlNetModel):
    """The ControlNet of a CoordUNet: `ControlNetModel.from_unet` copies the U-Net's 6-channel conv_in, so the copy
    must see the same coordinates."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        stock = self.conv_in
        self.conv_in = torch.nn.Conv2d(stock.in_channels + COORD_CHANNELS, stock.out_channels,
                                       stock.kernel_size, padding=stock.padding)

    @staticmethod
    def _get_init_keys(input_class):
        return ControlNetModel._get_init_keys(ControlNetModel)

    def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        return super().forward(with_coordinates(sample), timestep, encoder_hidden_states, *args, **kwargs)


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

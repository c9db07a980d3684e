"""ControlNet (Zhang et al. 2023): teach a frozen U-Net to follow a conditioning image (edges, depth, pose...).

A trainable copy of the U-Net's encoder (`ControlNetModel.from_unet`) reads the noisy latent, the timestep, the
text and the conditioning image; its outputs pass through zero-initialised convolutions and are added to the
frozen U-Net's skip connections and middle block, so at step 0 the pair samples exactly as the U-Net alone. The
loss is the U-Net's denoising loss (eps or v) as in fine-tuning. Captions drop out (to the empty prompt) for
classifier-free guidance; conditioning images drop out separately (to black), so the ControlNet also learns
what no control means.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from trainers import seeding
from trainers.backbones import FAMILIES, family_of_pipeline
from trainers.config import ranged
from trainers.errors import ConfigError
from trainers.losses import denoising_loss
from trainers.objectives import inputs
from trainers.objectives.base import Objective

SD_EMBEDDING_CHANNELS = (16, 32, 96, 256)  # SD's conditioning image encoder: 8x down to the latent


@dataclass(frozen=True)
class ControlNetOptions:
    """objective.controlnet: the options of this objective (recipe section objective.controlnet)."""
    # ControlNet (Zhang et al. 2023): a trained copy of the U-Net's encoder whose zero-initialised outputs are
    # added to the frozen U-Net's skip connections; conditioning images are read from data (conditioning_image)
    init_from: Optional[str] = None     # an existing ControlNet (folder or hub id) to go on from; None: from the U-Net
    conditioning_dropout: float = ranged(0.0, min=0.0, max=1.0)  # p of a black conditioning image (caption kept)
    # channels of the conditioning image encoder's convs; one stride-2 step between each pair, so their number
    # sets the downsampling: None is SD's (16, 32, 96, 256) for a VAE that downsamples 8x, shortened for a smaller one
    conditioning_embedding_channels: Optional[tuple[int, ...]] = None


class ControlNet(Objective):
    Options = ControlNetOptions
    name = "controlnet"
    card_tags = ("controlnet",)
    needs_conditioning_images = True

    def __init__(self, recipe, backbone):
        super().__init__(recipe, backbone)
        obj = recipe.objective
        if backbone.controlnet_pipeline is None:
            raise ConfigError(f"'objective.name': controlnet trains on {' and '.join(controlnet_families())} "
                              f"U-Nets, not {backbone.family}")
        if recipe.adapter.kind != "lora" or recipe.adapter.text_encoder:
            raise ConfigError("'adapter': a ControlNet recipe trains the ControlNet alone; remove adapter.kind "
                              "and adapter.text_encoder")
        self.schedule = self.training_schedule(obj.zero_terminal_snr)
        self.unet = backbone.denoiser
        self.controlnet = build_controlnet(self.unet, backbone.vae, obj.controlnet)
        self.controlnet.requires_grad_(True)
        self.validation_images = load_validation_images(recipe)

    def trained_modules(self):
        return {"controlnet": self.controlnet}

    def memory_modules(self):
        """Gradients flow back through the frozen U-Net too: checkpointing and attention apply to both."""
        return {self.backbone.denoiser_key: self.unet, "controlnet": self.controlnet}

    def to(self, device, frozen_dtype, inputs_cached: bool = False):
        super().to(device, frozen_dtype, inputs_cached)  # the U-Net frozen, the ControlNet float32
        self.text = inputs.FrozenText(self.backbone, self.device, encoders_on_cpu=bool(self.offloaded))
        self.schedule.to(self.device)

    def loss(self, batch, step):
        obj, seeds, device = self.recipe.objective, batch["seeds"], self.device
        x0 = inputs.latents(self.backbone, batch, device)
        cond = self.text(batch, inputs.dropped_captions(seeds, obj.caption_dropout))
        control = batch["conditioning_pixel_values"].to(device, non_blocking=True)
        if obj.controlnet.conditioning_dropout:
            kept = seeding.rand(seeds, seeding.CONTROL_DROPOUT, device) >= obj.controlnet.conditioning_dropout
            control = control * kept.view(-1, 1, 1, 1)
        controlnet = self.wrapped["controlnet"]
        loss = denoising_loss(x0, batch, self.schedule, lambda z_t, t: self.predict(z_t, t, cond, control, controlnet),
                              obj.snr_gamma, obj.noise_offset, obj.mask_floor)
        return loss, {"loss": loss.detach()}

    def predict(self, z_t, t, cond: dict, control: torch.Tensor, controlnet) -> torch.Tensor:
        """The frozen U-Net's output with the ControlNet's residuals added, as the diffusers pipelines combine them."""
        down, mid = controlnet(z_t, t, controlnet_cond=control, return_dict=False, **cond)
        dtype = next(self.unet.parameters()).dtype
        return self.unet(z_t, t, down_block_additional_residuals=[r.to(dtype) for r in down],
                         mid_block_additional_residual=mid.to(dtype), **cond).sample

    def validation_pipeline(self):
        return controlnet_pipeline(self.backbone, self.controlnet, self.schedule.sampling_scheduler())

    def validation_inputs(self) -> dict:
        return {"image": self.validation_images}

    def export(self, out_dir: Path) -> list[Path]:
        """A diffusers ControlNetModel folder: config.json and diffusion_pytorch_model.safetensors."""
        dtype = getattr(torch, self.recipe.export.dtype)
        if dtype != torch.float32:  # diffusers warns on every cast: only when needed
            self.controlnet.to(dtype)
        self.controlnet.save_pretrained(out_dir, safe_serialization=True)
        if dtype != torch.float32:
            self.controlnet.float()
        return sorted(p for p in Path(out_dir).iterdir() if p.name.startswith(("config", "diffusion_pytorch_model")))

    def card_trained(self) -> str:
        start = self.recipe.objective.controlnet.init_from
        return f"a ControlNet, from {f'`{start}`' if start else 'a copy of the U-Net encoder'}"

    def usage_snippet(self, where: str) -> str:
        cls, pipe = type(self.controlnet), self.backbone.controlnet_pipeline
        model = cls.__name__
        model_import = (f"from diffusers import {model}, {pipe}" if cls.__module__.startswith("diffusers") else
                        f"from diffusers import {pipe}\nfrom {cls.__module__} import {model}")
        return (f"import torch\n{model_import}\nfrom diffusers.utils import load_image\n\n"
                f"controlnet = {model}.from_pretrained({where!r}, torch_dtype=torch.float16)\n"
                f"pipe = {pipe}.from_pretrained({self.recipe.model.pretrained!r}, controlnet=controlnet, "
                f"torch_dtype=torch.float16).to(\"cuda\")\n"
                f"image = pipe(\"your prompt\", image=load_image(\"conditioning.png\"), "
                f"num_inference_steps=25).images[0]\n")


def build_controlnet(unet, vae, cfg):
    """The ControlNet to train: a copy of the U-Net's encoder, or `cfg.init_from`, of the class the U-Net needs."""
    from trainers.backbones.coord_unet import CoordControlNetModel, CoordUNet2DConditionModel
    from diffusers import ControlNetModel

    cls = CoordControlNetModel if isinstance(unet, CoordUNet2DConditionModel) else ControlNetModel
    if cfg.init_from:
        try:
            controlnet = cls.from_pretrained(cfg.init_from)
        except Exception as e:
            raise ConfigError(f"'objective.controlnet.init_from': cannot load a {cls.__name__} from "
                              f"{cfg.init_from!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        for key in ("block_out_channels", "cross_attention_dim", "in_channels"):
            if tuple(_listed(controlnet.config[key])) != tuple(_listed(unet.config[key])):
                raise ConfigError(f"'objective.controlnet.init_from': its {key} is {controlnet.config[key]}, the "
                                  f"U-Net's {unet.config[key]}: it belongs to another model")
        return controlnet
    return cls.from_unet(unet, conditioning_embedding_out_channels=embedding_channels(vae, cfg))


def embedding_channels(vae, cfg) -> tuple[int, ...]:
    """Channels of the conditioning image encoder: one stride-2 conv between each pair, as many as the VAE has."""
    downsamplings = len(vae.config.block_out_channels) - 1  # the latent is 2^this smaller than the image
    if cfg.conditioning_embedding_channels is not None:
        channels = tuple(cfg.conditioning_embedding_channels)
        if len(channels) != downsamplings + 1:
            raise ConfigError(f"'objective.controlnet.conditioning_embedding_channels': the VAE downsamples "
                              f"{2 ** downsamplings}x, which takes {downsamplings + 1} channel counts; got {len(channels)}")
        return channels
    if downsamplings + 1 > len(SD_EMBEDDING_CHANNELS):
        raise ConfigError(f"'objective.controlnet.conditioning_embedding_channels': set them for a VAE that "
                          f"downsamples {2 ** downsamplings}x ({downsamplings + 1} values)")
    return SD_EMBEDDING_CHANNELS[:downsamplings + 1]


def controlnet_families() -> list[str]:
    return [name for name, cls in FAMILIES.items() if cls.controlnet_pipeline]


def controlnet_pipeline(backbone, controlnet, scheduler):
    """The family's diffusers ControlNet pipeline around the backbone's components and `controlnet`."""
    return with_controlnet(backbone.pipeline(backbone.denoiser, backbone.text_encoders, scheduler), controlnet)


def with_controlnet(pipe, controlnet):
    """The ControlNet pipeline of a Stable Diffusion (XL) pipeline's components, sharing them."""
    import diffusers

    family = family_of_pipeline(type(pipe).__name__)
    name = FAMILIES[family].controlnet_pipeline if family else None
    if name is None:
        raise ConfigError(f"a ControlNet samples with the pipelines of {', '.join(controlnet_families())}, "
                          f"not {type(pipe).__name__}")
    cls = getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters
    extra = {"requires_safety_checker": False} if "requires_safety_checker" in accepted else {}
    return cls(**{k: v for k, v in pipe.components.items() if k in accepted}, controlnet=controlnet, **extra)


def load_controlnet(folder, **kwargs):
    """A ControlNet folder with the class its config names (ours, e.g. CoordControlNetModel, or diffusers')."""
    import json

    import diffusers
    import trainers.backbones.coord_unet  # noqa: F401  (registers our classes with diffusers)

    name = json.loads((Path(folder) / "config.json").read_text()).get("_class_name", "ControlNetModel")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ControlNetModel)):
        raise ConfigError(f"{folder}: config.json names {name!r}, not a ControlNet class")
    return cls.from_pretrained(folder, **kwargs)


def load_validation_images(recipe) -> list:
    """validation.conditioning_images as RGB images at the training resolution, one per prompt (or one for all);
    read when the recipe samples grids, so a missing file fails before training rather than at the first grid."""
    from PIL import Image

    cfg = recipe.validation
    if not (cfg.prompts and cfg.every_steps):  # no grids are sampled
        return []
    if not cfg.conditioning_images:
        raise ConfigError("'validation.conditioning_images': a ControlNet samples from a conditioning image; "
                          "give one per validation prompt (or one for all)")
    if len(cfg.conditioning_images) not in (1, len(cfg.prompts)):
        raise ConfigError(f"'validation.conditioning_images': {len(cfg.conditioning_images)} images for "
                          f"{len(cfg.prompts)} prompts; give one per prompt, or one for all")
    images = []
    for path in cfg.conditioning_images:
        try:
            image = Image.open(path)
            image.load()
        except Exception as e:
            raise ConfigError(f"'validation.conditioning_images': cannot read {path}: {e}") from None
        side = recipe.data.resolution
        images.append(image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC))
    return images * (len(cfg.prompts) if len(images) == 1 else 1)


def _listed(value):
    return value if isinstance(value, (list, tuple)) else [value]

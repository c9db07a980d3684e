"""Stable Diffusion 1.x/2.x: one CLIP text encoder, a U-Net conditioned on its last hidden states."""
from __future__ import annotations

from pathlib import Path

import torch

from trainers.backbones.base import Backbone
from trainers.backbones.loading import ModelSource, building_empty, empty_module
from trainers.errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class SDBackbone(Backbone):
    family = "sd15"
    denoiser_key = "unet"  # the denoiser's name in pipelines and LoRA files
    pipeline_name = "StableDiffusionPipeline"
    card_tags = ("stable-diffusion", "stable-diffusion-diffusers")
    controlnet_pipeline = "StableDiffusionControlNetPipeline"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict):
        self.denoiser, self.vae, self.tokenizer = unet, vae, tokenizer
        self.text_encoders = {"text_encoder": text_encoder}
        self.scheduler_config = dict(scheduler_config)

    @classmethod
    def load(cls, source: ModelSource, model=None) -> "SDBackbone":
        if source.kind == "single_file":
            parts = load_single_file(source, cls.pipeline_name, COMPONENTS)
        else:
            classes = _component_classes()
            parts = load_components(source, classes | {"unet": unet_class(source, classes["unet"])})
        return cls(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                   parts["scheduler"].config)

    @property
    def text_encoder(self):
        return self.text_encoders["text_encoder"]

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def encode_text(self, captions, device, text_encoders=None):
        """The last hidden states of CLIP; SD's unconditional input is the empty prompt's, as its pipeline uses."""
        encoder = (text_encoders or self.text_encoders)["text_encoder"]
        return {"hidden": encoder(self.tokenize(captions).to(device))[0]}  # (B, 77, D)

    def denoiser_kwargs(self, text, batch, device):
        return {"encoder_hidden_states": text["hidden"]}

    def pipeline(self, denoiser, text_encoders, scheduler):
        return self.pipeline_class()(
            vae=self.vae, text_encoder=text_encoders["text_encoder"], tokenizer=self.tokenizer, unet=denoiser,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _component_classes():
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
            "tokenizer": CLIPTokenizer, "scheduler": DDPMScheduler}


def unet_class(source: ModelSource, stock):
    """The U-Net class the folder's config names: the stock one, or a subclass of it registered by this project."""
    import trainers.backbones.coord_unet  # noqa: F401  (registers CoordUNet2DConditionModel with diffusers)
    import diffusers

    try:
        name = stock.load_config(source.ref, subfolder="unet", **source.from_pretrained_kwargs()).get("_class_name")
    except Exception:
        return stock  # load_components names what is missing
    cls = getattr(diffusers, name or "", None)
    return cls if isinstance(cls, type) and issubclass(cls, stock) else stock


def load_components(source: ModelSource, classes: dict) -> dict:
    """Each component from its subfolder, frozen; a missing one is named."""
    parts = {}
    for name, cls in classes.items():
        if source.kind == "folder" and not (Path(source.ref) / name).is_dir():
            raise UserError(f"model.pretrained: {source.ref} has no '{name}' component folder")
        kw = source.from_pretrained_kwargs() if name not in ("tokenizer", "scheduler") else (
            {"revision": source.revision} if source.revision else {})
        try:
            empty = building_empty() and isinstance(cls, type) and issubclass(cls, torch.nn.Module)
            parts[name] = empty_module(cls, source, name, kw) if empty else \
                cls.from_pretrained(source.ref, subfolder=name, **kw)
        except Exception as e:
            raise UserError(f"model.pretrained: cannot load '{name}' from {source.ref!r}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if isinstance(parts[name], torch.nn.Module):
            parts[name].requires_grad_(False)
    return parts


def load_single_file(source: ModelSource, pipeline_name: str, components: tuple[str, ...], ddpm: bool = True) -> dict:
    """A .safetensors checkpoint in the original layout, converted by diffusers (needs the hub for configs).

    ddpm: read the scheduler as DDPMScheduler (the VP families' training process); flow families keep theirs."""
    import diffusers

    try:
        pipe = getattr(diffusers, pipeline_name).from_single_file(source.ref)
    except Exception as e:
        raise UserError(f"model.pretrained: cannot load single file {source.ref}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    parts = {name: getattr(pipe, name, None) for name in components}
    if ddpm:
        parts["scheduler"] = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    for m in parts.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
    return parts

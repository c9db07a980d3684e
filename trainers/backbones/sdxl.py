"""SDXL (Podell et al. 2023): two CLIP text encoders and micro-conditioning on image size and crop.

The U-Net attends to the concatenated penultimate hidden states of both encoders and adds an embedding of
the second encoder's pooled, projected output and six time ids: original (h, w), crop top-left, target (h, w).
"""
from __future__ import annotations

import torch

from trainers.backbones.loading import ModelSource
from trainers.devices import host_to_device
from trainers.backbones.sd import SDBackbone, load_components, load_single_file

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class SDXLBackbone(SDBackbone):
    family = "sdxl"
    pipeline_name = "StableDiffusionXLPipeline"
    card_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")
    license = "openrail++"  # CreativeML Open RAIL++-M
    controlnet_pipeline = "StableDiffusionXLControlNetPipeline"

    def __init__(self, parts: dict):
        self.denoiser, self.vae = parts["unet"], parts["vae"]
        self.tokenizers = {"text_encoder": parts["tokenizer"], "text_encoder_2": parts["tokenizer_2"]}
        self.tokenizer = parts["tokenizer"]
        self.text_encoders = {"text_encoder": parts["text_encoder"], "text_encoder_2": parts["text_encoder_2"]}
        self.scheduler_config = dict(parts["scheduler"].config)

    @classmethod
    def load(cls, source: ModelSource, model=None) -> "SDXLBackbone":
        if source.kind == "single_file":
            return cls(load_single_file(source, cls.pipeline_name, COMPONENTS))
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        return cls(load_components(source, {
            "unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
            "text_encoder_2": CLIPTextModelWithProjection, "tokenizer": CLIPTokenizer,
            "tokenizer_2": CLIPTokenizer, "scheduler": DDPMScheduler}))

    def encode_text(self, captions, device, text_encoders=None):
        """Both encoders' penultimate hidden states, concatenated, and the second's projected pooled output."""
        encoders = text_encoders or self.text_encoders
        hidden, pooled = [], None
        for name, encoder in encoders.items():
            tok = self.tokenizers[name]
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer, (B, 77, D_i)
            pooled = out[0]  # the last encoder's projected pooled output, (B, D_pool)
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled}

    def unconditional(self, device, text_encoders=None):
        """Zeros, as SDXL's pipeline uses for guidance (force_zeros_for_empty_prompt)."""
        return {k: torch.zeros_like(v) for k, v in self.encode_text([""], device, text_encoders).items()}

    def denoiser_kwargs(self, text, batch, device):
        return {"encoder_hidden_states": text["hidden"],
                "added_cond_kwargs": {"text_embeds": text["pooled"], "time_ids": time_ids(batch, device)}}

    def pipeline(self, denoiser, text_encoders, scheduler):
        return self.pipeline_class()(
            vae=self.vae, text_encoder=text_encoders["text_encoder"], text_encoder_2=text_encoders["text_encoder_2"],
            tokenizer=self.tokenizers["text_encoder"], tokenizer_2=self.tokenizers["text_encoder_2"],
            unet=denoiser, scheduler=scheduler)


def time_ids(batch: dict, device) -> torch.Tensor:
    """(B, 6): original (h, w), crop top-left (top, left), target (h, w), from the data records."""
    rows = [[*orig, *crop, *target] for orig, crop, target in
            zip(batch["original_size"], batch["crop_top_left"], batch["target_size"])]
    return host_to_device(rows, device, torch.float32)

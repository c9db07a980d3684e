"""U-ViT (Bao et al. 2023) on SD's VAE and CLIP text encoder: the model is trainers.backbones.uvit_model.

Conditioning, latents and the unconditional input are SD-1.5's (CLIP last hidden states, the empty prompt for
dropped captions), so everything but the denoiser and its pipeline is inherited. The diffusers classes are
imported only when a U-ViT is loaded, so `import trainers.backbones` stays light.
"""
from __future__ import annotations

from trainers.backbones.loading import ModelSource
from trainers.backbones.sd import SDBackbone, load_components
from trainers.errors import UserError


class UViTBackbone(SDBackbone):
    family = "uvit"
    denoiser_key = "transformer"
    pipeline_name = "UViTPipeline"
    card_tags = ("uvit",)
    controlnet_pipeline = None  # a transformer: ControlNet trains on U-Nets
    lora_targets = ("to_q", "to_k", "to_v", "to_out", "fc1", "fc2")
    patch_size = 2

    @classmethod
    def load(cls, source: ModelSource, model=None) -> "UViTBackbone":
        if source.kind == "single_file":
            raise UserError(f"model.pretrained: {source.ref}: U-ViT loads from a diffusers folder or hub id "
                            "(launch/make_tiny_model.py --arch uvit writes one), not a single file")
        from diffusers import AutoencoderKL, DDPMScheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        from trainers.backbones.uvit_pipeline import UViT2DModel

        parts = load_components(source, {"transformer": UViT2DModel, "vae": AutoencoderKL,
                                         "text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer,
                                         "scheduler": DDPMScheduler})
        return cls(parts["transformer"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                   parts["scheduler"].config)

    @classmethod
    def pipeline_class(cls):
        from trainers.backbones.uvit_pipeline import UViTPipeline

        return UViTPipeline

    def pipeline(self, denoiser, text_encoders, scheduler):
        return self.pipeline_class()(vae=self.vae, text_encoder=text_encoders["text_encoder"],
                                   tokenizer=self.tokenizer, transformer=denoiser, scheduler=scheduler)

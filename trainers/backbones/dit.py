"""PixArt-alpha (Chen et al. 2023): a DiT with cross-attention to T5 text states, on SD's VAE.

Text is what PixArtAlphaPipeline feeds the transformer: the prompt lowercased (its `clean_caption=False` path),
padded to 120 T5 tokens, T5's last hidden states plus the attention mask that hides the padding. The unconditional
input is the empty prompt's, as the pipeline encodes its default negative prompt. The checkpoint predicts eps and a
variance (learned sigma, out_channels = 2 x latent channels); like the pipeline, training keeps only the eps half.
"""
from __future__ import annotations

import importlib.util

import torch

from trainers.backbones.base import Backbone
from trainers.backbones.loading import ModelSource
from trainers.backbones.sd import load_components
from trainers.devices import host_to_device
from trainers.errors import UserError

MAX_SEQUENCE_LENGTH = 120  # T5 tokens (PixArt-alpha Sec. 3.1); PixArtAlphaPipeline's default max_sequence_length


class DiTBackbone(Backbone):
    family = "dit"
    denoiser_key = "transformer"
    pipeline_name = "PixArtAlphaPipeline"
    card_tags = ("pixart-alpha",)
    license = "openrail++"  # CreativeML Open RAIL++-M
    # self- and cross-attention projections and the feed-forward of every block
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    patch_size = 2

    def __init__(self, parts: dict):
        self.denoiser, self.vae, self.tokenizer = parts["transformer"], parts["vae"], parts["tokenizer"]
        self.text_encoders = {"text_encoder": parts["text_encoder"]}
        self.scheduler_config = dict(parts["scheduler"].config)

    @classmethod
    def load(cls, source: ModelSource, model=None) -> "DiTBackbone":
        if source.kind == "single_file":
            raise UserError(f"model.pretrained: {source.ref}: PixArt loads from a diffusers folder or hub id "
                            "(e.g. PixArt-alpha/PixArt-XL-2-512x512), not a single file")
        from diffusers import AutoencoderKL, DDPMScheduler
        from transformers import T5EncoderModel, T5TokenizerFast

        from trainers.backbones.dit_pipeline import PixArtTransformer2DModel

        try:
            return cls(load_components(source, {
                "transformer": PixArtTransformer2DModel, "vae": AutoencoderKL, "text_encoder": T5EncoderModel,
                "tokenizer": T5TokenizerFast, "scheduler": DDPMScheduler}))
        except UserError as e:
            if "'tokenizer'" in str(e) and importlib.util.find_spec("sentencepiece") is None:
                raise UserError(f"{e} (PixArt's T5 tokenizer ships as spiece.model only, which needs "
                                "`pip install sentencepiece`)") from None
            raise

    @property
    def text_encoder(self):
        return self.text_encoders["text_encoder"]

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (B, 120), after the pipeline's preprocessing (lowercase, strip)."""
        return self.tokenizer([c.lower().strip() for c in captions], padding="max_length",
                              max_length=MAX_SEQUENCE_LENGTH, truncation=True, add_special_tokens=True,
                              return_tensors="pt")

    def encode_text(self, captions, device, text_encoders=None):
        """T5's last hidden states (B, 120, D) and the mask (B, 120) the transformer's cross-attention applies."""
        encoder = (text_encoders or self.text_encoders)["text_encoder"]
        tokens = self.tokenize(captions)
        mask = tokens.attention_mask.to(device)
        return {"hidden": encoder(tokens.input_ids.to(device), attention_mask=mask)[0], "mask": mask}

    def denoiser_kwargs(self, text, batch, device):
        return {"encoder_hidden_states": text["hidden"], "encoder_attention_mask": text["mask"],
                "added_cond_kwargs": self.micro_conditions(batch, device)}

    def micro_conditions(self, batch: dict, device) -> dict:
        """PixArt 1024's image size and aspect-ratio embedding inputs; the 512 and 256 models take None."""
        if not self.denoiser.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        sizes = host_to_device([list(hw) for hw in batch["target_size"]], device, torch.float32)  # (B, 2): h, w
        return {"resolution": sizes, "aspect_ratio": sizes[:, :1] / sizes[:, 1:]}

    def predict(self, z_t, t, cond, denoiser=None):
        """The eps half of a learned-sigma output, as PixArtAlphaPipeline takes it."""
        out = (denoiser or self.denoiser)(z_t, timestep=t, **cond).sample
        return out[:, :z_t.shape[1]] if out.shape[1] == 2 * z_t.shape[1] else out

    @classmethod
    def pipeline_class(cls):
        from trainers.backbones.dit_pipeline import PixArtAlphaLoraPipeline

        return PixArtAlphaLoraPipeline

    def pipeline(self, denoiser, text_encoders, scheduler):
        return self.pipeline_class()(tokenizer=self.tokenizer, text_encoder=text_encoders["text_encoder"],
                                   vae=self.vae, transformer=denoiser, scheduler=scheduler)

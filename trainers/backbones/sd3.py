"""Stable Diffusion 3 / 3.5 (Esser et al. 2024): an MMDiT on a 16-channel VAE, trained by rectified flow.

Text is what StableDiffusion3Pipeline feeds the transformer: the penultimate hidden states of CLIP-L and CLIP-G
side by side (77 tokens), zero-padded to T5's width and followed by T5-XXL's last hidden states (256 tokens), and
the two CLIPs' projected pooled outputs concatenated. Without T5 (`model.t5: false`, or a folder that has none)
the T5 tokens are zeros, as the pipeline makes them with text_encoder_3=None: a documented SD3 mode that saves
about 9 GB. SD3.5's dual-attention and qk-norm layers come with the transformer's config. The text tensors keep
encoders apart (`clip_l`, `clip_g`, `t5`, ...), so a cache without T5 holds no zeros and each encoder's input can
be dropped on its own (objective.caption_dropout_per_encoder, as the SD3 paper trains).
"""
from __future__ import annotations

import torch

from trainers.backbones.loading import ModelSource, has_component
from trainers.backbones.mmdit import MMDiTBackbone, load_t5
from trainers.backbones.sd import load_components, load_single_file


class SD3Backbone(MMDiTBackbone):
    family = "sd3"
    pipeline_name = "StableDiffusion3Pipeline"
    card_tags = ("sd3", "sd3-diffusers")
    lora_text_encoders = ("text_encoder", "text_encoder_2")  # the CLIPs; diffusers' SD3 loader has no T5 LoRA
    default_t5_tokens = 256  # StableDiffusion3Pipeline's max_sequence_length
    model_options = ("t5", "max_sequence_length")
    text_groups = {"text_encoder": ("clip_l", "pooled_l"), "text_encoder_2": ("clip_g", "pooled_g"),
                   "text_encoder_3": ("t5",)}

    def __init__(self, parts: dict, t5_tokens: int = default_t5_tokens):
        self.denoiser, self.vae = parts["transformer"], parts["vae"]
        self.tokenizers = {"text_encoder": parts["tokenizer"], "text_encoder_2": parts["tokenizer_2"]}
        self.text_encoders = {"text_encoder": parts["text_encoder"], "text_encoder_2": parts["text_encoder_2"]}
        if parts.get("text_encoder_3") is not None:
            self.tokenizers["text_encoder_3"] = parts["tokenizer_3"]
            self.text_encoders["text_encoder_3"] = parts["text_encoder_3"]
        self.tokenizer = parts["tokenizer"]
        self.scheduler_config = dict(parts["scheduler"].config)
        self.t5_tokens = t5_tokens

    @classmethod
    def load(cls, source: ModelSource, model=None) -> "SD3Backbone":
        want_t5 = model is None or model.t5
        tokens = cls.t5_tokens_of(model)
        if source.kind == "single_file":
            parts = load_single_file(source, cls.pipeline_name, (
                "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                "tokenizer_2", "tokenizer_3", "scheduler"), ddpm=False)
            if not want_t5:
                parts["text_encoder_3"] = None
            return cls(parts, tokens)
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        parts = load_components(source, {
            "transformer": SD3Transformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModelWithProjection,
            "text_encoder_2": CLIPTextModelWithProjection, "tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler})
        if want_t5 and has_component(source, "text_encoder_3"):
            parts |= load_t5(source, "text_encoder_3", "tokenizer_3")
        return cls(parts, tokens)

    @property
    def has_t5(self) -> bool:
        return "text_encoder_3" in self.text_encoders

    def encode_text(self, captions, device, text_encoders=None):
        """Per encoder: `clip_l` / `clip_g` (B, 77, D) penultimate states, `pooled_l` / `pooled_g` projected pooled
        outputs, and `t5` (B, 256, D_T5) last states (absent without T5)."""
        encoders = text_encoders or self.text_encoders
        text = {}
        for name, suffix in (("text_encoder", "l"), ("text_encoder_2", "g")):
            tok = self.tokenizers[name]
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            out = encoders[name](ids, output_hidden_states=True)
            text |= {f"clip_{suffix}": out.hidden_states[-2], f"pooled_{suffix}": out[0]}
        if self.has_t5:
            text["t5"] = self.encode_t5(captions, "text_encoder_3", encoders, device)
        return text

    def denoiser_kwargs(self, text, batch, device):
        """The pipeline's joint text sequence: both CLIPs' states side by side, zero-padded to the T5 width, then
        T5's (or zero) tokens; the pooled input is both CLIPs' pooled outputs."""
        clip = torch.cat([text["clip_l"], text["clip_g"]], dim=-1)
        width = self.denoiser.config.joint_attention_dim
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        t5 = text.get("t5")
        if t5 is None:
            t5 = clip.new_zeros(clip.shape[0], self.t5_tokens, width)
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                "pooled_projections": torch.cat([text["pooled_l"], text["pooled_g"]], dim=-1)}

    def predict(self, z_t, t, cond, denoiser=None):
        return (denoiser or self.denoiser)(hidden_states=z_t, timestep=t, **cond).sample

    def pipeline(self, denoiser, text_encoders, scheduler):
        return self.pipeline_class()(
            transformer=denoiser, scheduler=scheduler, vae=self.vae,
            text_encoder=text_encoders["text_encoder"], tokenizer=self.tokenizers["text_encoder"],
            text_encoder_2=text_encoders["text_encoder_2"], tokenizer_2=self.tokenizers["text_encoder_2"],
            text_encoder_3=text_encoders.get("text_encoder_3"), tokenizer_3=self.tokenizers.get("text_encoder_3"))

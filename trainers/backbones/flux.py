"""Flux.1 (Black Forest Labs 2024): an MMDiT with single-stream blocks on packed 16-channel latents, rectified flow.

What FluxPipeline feeds the transformer: CLIP-L's pooled output, T5-XXL's last hidden states (512 tokens), zero
text position ids, and the latents packed 2x2 into tokens of 64 channels with (0, row, column) position ids.
Flux.1-dev is guidance-distilled: its transformer embeds a guidance value, which training holds fixed at
`model.guidance` (1.0 unless set); Flux.1-schnell has no guidance embedding and takes none. Objectives see
unpacked (B, 16, h, w) latents: packing happens inside `predict`, so losses, masks and solvers need no Flux case.
"""
from __future__ import annotations

import torch

from trainers.backbones.loading import ModelSource
from trainers.backbones.mmdit import MMDiTBackbone, load_t5
from trainers.backbones.sd import load_components, load_single_file


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch one token, channels-major within it (FluxPipeline's)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for latents of size (h, w)."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of packed tokens: (0, row, column), made on the device (no host copy a step)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class FluxBackbone(MMDiTBackbone):
    family = "flux"
    pipeline_name = "FluxPipeline"
    card_tags = ("flux", "flux-diffusers")
    lora_text_encoders = ("text_encoder",)  # CLIP-L; diffusers' Flux loader has no T5 LoRA
    default_t5_tokens = 512  # FluxPipeline's max_sequence_length
    model_options = ("guidance", "max_sequence_length")
    text_groups = {"text_encoder": ("pooled",), "text_encoder_2": ("t5",)}
    # patch_size 2: latents are packed 2x2, so an image's token count, which dynamic shifting reads, is h*w/4

    def __init__(self, parts: dict, guidance: float = 1.0, t5_tokens: int = default_t5_tokens):
        self.denoiser, self.vae = parts["transformer"], parts["vae"]
        self.tokenizers = {"text_encoder": parts["tokenizer"], "text_encoder_2": parts["tokenizer_2"]}
        self.text_encoders = {"text_encoder": parts["text_encoder"], "text_encoder_2": parts["text_encoder_2"]}
        self.tokenizer = parts["tokenizer"]
        self.scheduler_config = dict(parts["scheduler"].config)
        self.guidance, self.t5_tokens = guidance, t5_tokens

    @classmethod
    def load(cls, source: ModelSource, model=None) -> "FluxBackbone":
        guidance = model.guidance if model is not None and model.guidance is not None else 1.0
        tokens = cls.t5_tokens_of(model)
        if source.kind == "single_file":
            return cls(load_single_file(source, cls.pipeline_name, (
                "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
                ddpm=False), guidance, tokens)
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer

        parts = load_components(source, {
            "transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
            "tokenizer": CLIPTokenizer, "scheduler": FlowMatchEulerDiscreteScheduler})
        return cls(parts | load_t5(source, "text_encoder_2", "tokenizer_2"), guidance, tokens)

    @property
    def guidance_distilled(self) -> bool:
        """Flux.1-dev (a guidance embedding) rather than schnell."""
        return bool(self.denoiser.config.guidance_embeds)

    def encode_text(self, captions, device, text_encoders=None):
        """`pooled` (B, 768): CLIP-L's pooled output; `t5` (B, 512, 4096): T5's last hidden states."""
        encoders = text_encoders or self.text_encoders
        tok = self.tokenizers["text_encoder"]
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        pooled = encoders["text_encoder"](ids, output_hidden_states=False).pooler_output
        return {"pooled": pooled, "t5": self.encode_t5(captions, "text_encoder_2", encoders, device)}

    def denoiser_kwargs(self, text, batch, device):
        t5 = text["t5"]
        kwargs = {"encoder_hidden_states": t5, "pooled_projections": text["pooled"],
                  "txt_ids": torch.zeros(t5.shape[1], 3, device=t5.device, dtype=t5.dtype)}
        if self.guidance_distilled:  # made on the device: no host copy each step
            kwargs["guidance"] = torch.full((t5.shape[0],), self.guidance, device=t5.device, dtype=torch.float32)
        return kwargs

    def predict(self, z_t, t, cond, denoiser=None):
        """Pack, call with the timestep in [0, 1] (the transformer scales it by 1000 itself), unpack."""
        h, w = z_t.shape[-2:]
        out = (denoiser or self.denoiser)(hidden_states=pack(z_t), timestep=t / 1000,
                                          img_ids=image_ids(h, w, z_t.device, z_t.dtype), **cond).sample
        return unpack(out, h, w)

    def pipeline(self, denoiser, text_encoders, scheduler):
        return self.pipeline_class()(
            scheduler=scheduler, vae=self.vae, transformer=denoiser,
            text_encoder=text_encoders["text_encoder"], tokenizer=self.tokenizers["text_encoder"],
            text_encoder_2=text_encoders["text_encoder_2"], tokenizer_2=self.tokenizers["text_encoder_2"])

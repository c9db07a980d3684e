"""What the MMDiT families (SD3, Flux) share: joint-attention LoRA targets, 2x2 latent patches, and a T5 encoder
whose sequence length the recipe may set (`model.max_sequence_length`) and sampling must repeat."""
from __future__ import annotations

from trainers.backbones.base import Backbone
from trainers.backbones.loading import ModelSource
from trainers.backbones.sd import load_components

# the image stream's attention projections and the text stream's (add_*); SD3.5's second attention (attn2) and
# Flux's single blocks (to_q/k/v) have the same names; MLPs and norms via adapter.target_modules
JOINT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def load_t5(source: ModelSource, encoder: str, tokenizer: str) -> dict:
    """T5's encoder and tokenizer components (a missing sentencepiece/tokenizer is named by load_components)."""
    from transformers import T5EncoderModel, T5TokenizerFast

    return load_components(source, {encoder: T5EncoderModel, tokenizer: T5TokenizerFast})


class MMDiTBackbone(Backbone):
    denoiser_key = "transformer"
    license = "other"  # the base's own licence (model.pretrained's card names it)
    lora_targets = JOINT_ATTENTION
    patch_size = 2
    default_t5_tokens: int  # the family pipeline's default max_sequence_length
    t5_tokens: int

    @classmethod
    def t5_tokens_of(cls, model) -> int:
        """T5 tokens per caption: the recipe's model.max_sequence_length, else the pipeline's default."""
        return model.max_sequence_length if model is not None and model.max_sequence_length else cls.default_t5_tokens

    def encode_t5(self, captions: list[str], name: str, encoders: dict, device):
        """T5's last hidden states (B, t5_tokens, D) of the captions, padded as the pipeline pads them."""
        ids = self.tokenizers[name](captions, padding="max_length", max_length=self.t5_tokens, truncation=True,
                                    add_special_tokens=True, return_tensors="pt").input_ids.to(device)
        return encoders[name](ids)[0]

    def sampling_kwargs(self) -> dict:
        return {"max_sequence_length": self.t5_tokens}

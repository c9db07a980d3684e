"""PixArt-alpha with LoRA loading: diffusers' PixArtAlphaPipeline plus the `load_lora_weights` it lacks.

Upstream diffusers has no LoRA loader for PixArt (huggingface/diffusers#9887, #11216): neither the pipeline nor
PixArtTransformer2DModel has the mixins. Here the transformer gains diffusers' PeftAdapterMixin under its own class
name, so its saved config still loads as the stock class, and the pipeline gains the transformer-plus-one-text-
encoder LoRA I/O that U-ViT uses (nothing in it is U-ViT-specific):

    from trainers.backbones.dit_pipeline import PixArtAlphaLoraPipeline
    pipe = PixArtAlphaLoraPipeline.from_pretrained("PixArt-alpha/PixArt-XL-2-512x512")
    pipe.load_lora_weights("runs/my_lora/final")
"""
from __future__ import annotations

import diffusers
from diffusers.loaders import PeftAdapterMixin

from trainers.backbones.uvit_pipeline import UViTLoraLoaderMixin

BINNED_SAMPLE_SIZES = (32, 64, 128)  # PixArt's aspect-ratio bins exist for 256, 512 and 1024 px models


class PixArtTransformer2DModel(diffusers.PixArtTransformer2DModel, PeftAdapterMixin):
    """PixArt's transformer with add_adapter / load_lora_adapter; same name, weights and forward as the stock one."""


def with_lora_methods(transformer: diffusers.PixArtTransformer2DModel) -> PixArtTransformer2DModel:
    """Give a stock transformer (e.g. loaded from a model_index.json) the LoRA methods, in place.

    The subclass adds methods only, no state, so swapping the class keeps weights, config and outputs.
    """
    if transformer is not None and not isinstance(transformer, PeftAdapterMixin):
        transformer.__class__ = PixArtTransformer2DModel
    return transformer


class PixArtLoraLoaderMixin(UViTLoraLoaderMixin):
    """LoRA files with `transformer.` and `text_encoder.` keys (peft spelling) and their LoraConfigs in metadata."""

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, hotswap: bool = False,
                          **kwargs):
        """The transformer's LoRA through diffusers, T5's through transformers' `load_adapter`.

        (diffusers' text-encoder loader converts CLIP's layer names only and rejects T5's q/k/v/o.)
        """
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        state_dict, metadata = self.read_lora(pretrained_model_name_or_path_or_dict, **kwargs)
        self.load_lora_into_transformer(state_dict, transformer=self.transformer, adapter_name=adapter_name,
                                        metadata=metadata, _pipeline=self, low_cpu_mem_usage=low_cpu_mem_usage,
                                        hotswap=hotswap)
        load_text_encoder_lora(self.text_encoder, state_dict, metadata, adapter_name)


def load_text_encoder_lora(encoder, state_dict: dict, metadata: dict | None, adapter_name: str | None) -> None:
    """Inject and load the `text_encoder.` part of a LoRA file, scaled by the LoraConfig it was saved with."""
    from diffusers.utils.peft_utils import get_adapter_name
    from peft import LoraConfig

    prefix = "text_encoder."
    weights = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    if not weights:
        return
    config = {k.removeprefix(prefix): v for k, v in (metadata or {}).items() if k.startswith(prefix)}
    if not config:
        raise ValueError("the LoRA file's text_encoder part has no LoraConfig in its metadata, so its alpha / r "
                         "is unknown; difftune writes it (`text_encoder_lora_adapter_metadata`)")
    encoder.load_adapter(adapter_name=adapter_name or get_adapter_name(encoder), adapter_state_dict=weights,
                         peft_config=LoraConfig(**config))


class PixArtAlphaLoraPipeline(diffusers.PixArtAlphaPipeline, PixArtLoraLoaderMixin):
    """PixArtAlphaPipeline that loads and saves LoRAs; its sampling is the stock one (two defaults differ)."""

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                         transformer=with_lora_methods(transformer), scheduler=scheduler)

    def __call__(self, *args, use_resolution_binning: bool | None = None, clean_caption: bool = False, **kwargs):
        """The stock call with two defaults changed (and a FlowMatch scheduler accepted).

        Resolution binning happens only where PixArt has bins, so tiny test models sample the size asked; and
        prompts are lowercased, not `clean_caption`-ed (which needs bs4 and ftfy), as difftune's training saw them.
        """
        from trainers.schedulers import for_vp_pipeline

        for_vp_pipeline(self.scheduler)  # a PixArt trained by rectified flow samples with a FlowMatch scheduler
        if use_resolution_binning is None:
            use_resolution_binning = self.transformer.config.sample_size in BINNED_SAMPLE_SIZES
        return super().__call__(*args, use_resolution_binning=use_resolution_binning, clean_caption=clean_caption,
                                **kwargs)

"""Write a randomly initialised diffusion pipeline in the real on-disk format.

Tests, demos and CI cannot download SD-1.5, yet the code they exercise must load a model exactly
the way it loads SD-1.5: `from_pretrained` on a directory holding unet/, vae/, text_encoder/,
tokenizer/ and scheduler/, with SD-1.5's module paths, block types and scheduler config. This
script writes such a directory with random weights, either tiny (fast on CPU, about 2 MB) or at
SD-1.5's full size (for GPU benchmarks). Nothing is downloaded: even the CLIP BPE and T5 Unigram
tokenizers are made here from a small built-in caption corpus.

    python launch/make_tiny_model.py --arch sd15|sdxl|uvit|dit|sd3|flux --out DIR [--size tiny|full] [--seed N]
        [--configs-only]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from launch.clip_bpe import BOS, EOS, MODEL_MAX_LENGTH, build_tokenizer, clip_bpe, write_bpe_files  # noqa: E402
from launch.t5_tokenizer import build_t5_tokenizer, unigram_vocab  # noqa: E402
from trainers.backbones import FAMILIES  # noqa: E402

SIZES = ("tiny", "full")


def sd15_unet_config(size: str) -> dict:
    """SD-1.5's U-Net block layout; tiny keeps every block and module path, only narrower and shallower."""
    config = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    if size == "tiny":
        config |= {
            "sample_size": 8,
            "block_out_channels": (16, 16, 32, 32),
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "cross_attention_dim": 32,
        }
    return config


def sd15_vae_config(size: str) -> dict:
    """SD-1.5's VAE: four encoder/decoder blocks, so latents are 8x smaller than images in both sizes."""
    config = {
        "sample_size": 512,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "latent_channels": 4,
        "act_fn": "silu",
        "scaling_factor": 0.18215,
    }
    if size == "tiny":
        config |= {
            "sample_size": 64,
            "block_out_channels": (8, 16, 16, 16),
            "layers_per_block": 1,
            "norm_num_groups": 8,
        }
    return config


def sd15_text_encoder_config(size: str) -> dict:
    """CLIP ViT-L/14's text tower; special-token ids are the local tokenizer's, not OpenAI's."""
    vocab, _ = clip_bpe()
    config = {
        "vocab_size": 49408,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[EOS],
    }
    if size == "tiny":
        config |= {
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "projection_dim": 32,
        }
    return config


def sd15_scheduler_config() -> dict:
    """SD-1.5's shipped scheduler_config.json, so noise schedules match the real checkpoint."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "timestep_spacing": "leading",
    }


def sd15_configs(size: str) -> dict:
    """All component configs for one size, as plain dicts, so they can be checked without allocating weights."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return {
        "unet": sd15_unet_config(size),
        "vae": sd15_vae_config(size),
        "text_encoder": sd15_text_encoder_config(size),
        "scheduler": sd15_scheduler_config(),
    }


def seeded(seed: int, factory, *args, **kwargs):
    """Build one component right after reseeding, so each one's weights depend only on the seed."""
    torch.manual_seed(seed)
    return factory(*args, **kwargs)


def build_sd15(size: str, seed: int) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with SD-1.5's structure and random weights."""
    configs = sd15_configs(size)
    return StableDiffusionPipeline(
        unet=seeded(seed, UNet2DConditionModel, **configs["unet"]),
        vae=seeded(seed, AutoencoderKL, **configs["vae"]),
        text_encoder=seeded(seed, CLIPTextModel, CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=build_tokenizer(),
        scheduler=PNDMScheduler.from_config(configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_unet_config(size: str) -> dict:
    """SDXL's U-Net: three levels, linear projections, and the text_time micro-conditioning embedding."""
    config = {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + the 1280-d pooled text embedding
        "norm_num_groups": 32,
    }
    if size == "tiny":
        config |= {
            "sample_size": 8,
            "block_out_channels": (16, 32, 32),
            "layers_per_block": 1,
            "transformer_layers_per_block": (1, 1, 1),
            "attention_head_dim": (2, 4, 4),
            "cross_attention_dim": 64,  # 32 + 32 from the two text encoders
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "norm_num_groups": 8,
        }
    return config


def sdxl_text_encoder_2_config(size: str) -> dict:
    """OpenCLIP ViT-bigG's text tower, whose projected pooled output SDXL also conditions on."""
    config = sd15_text_encoder_config(size) | {"hidden_act": "gelu"}
    if size == "full":
        config |= {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20,
                   "intermediate_size": 5120, "projection_dim": 1280}
    return config


def sdxl_configs(size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    vae = sd15_vae_config(size) | {"scaling_factor": 0.13025, "force_upcast": True}
    if size == "full":
        vae["sample_size"] = 1024
    scheduler = {k: v for k, v in sd15_scheduler_config().items() if k not in ("skip_prk_steps", "set_alpha_to_one")}
    return {"unet": sdxl_unet_config(size), "vae": vae, "text_encoder": sd15_text_encoder_config(size),
            "text_encoder_2": sdxl_text_encoder_2_config(size),
            "scheduler": scheduler | {"interpolation_type": "linear", "use_karras_sigmas": False}}


def build_sdxl(size: str, seed: int):
    """A StableDiffusionXLPipeline with SDXL's structure and random weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    configs = sdxl_configs(size)
    return StableDiffusionXLPipeline(
        unet=seeded(seed, UNet2DConditionModel, **configs["unet"]),
        vae=seeded(seed, AutoencoderKL, **configs["vae"]),
        text_encoder=seeded(seed, CLIPTextModel, CLIPTextConfig(**configs["text_encoder"])),
        text_encoder_2=seeded(seed + 1, CLIPTextModelWithProjection, CLIPTextConfig(**configs["text_encoder_2"])),
        tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(),
        scheduler=EulerDiscreteScheduler.from_config(configs["scheduler"]),
    )


def uvit_transformer_config(size: str) -> dict:
    """U-ViT-H/2 (Bao et al. 2023) on 32x32 latents of 256 px images; tiny keeps every kind of block."""
    config = {
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": 4,
        "hidden_size": 1152,
        "num_layers": 29,  # 14 in blocks, 1 mid block, 14 out blocks
        "num_attention_heads": 16,
        "mlp_ratio": 4.0,
        "qkv_bias": False,
        "cross_attention_dim": 768,  # CLIP ViT-L/14's last hidden states
        "num_text_tokens": MODEL_MAX_LENGTH,
        "use_conv_out": True,
    }
    if size == "tiny":
        config |= {"sample_size": 8, "hidden_size": 64, "num_layers": 5, "num_attention_heads": 4,
                   "cross_attention_dim": 32}
    return config


def uvit_configs(size: str) -> dict:
    """U-ViT on SD-1.5's VAE and CLIP text encoder, trained on SD-1.5's noise schedule."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    vae = sd15_vae_config(size) | ({"sample_size": 256} if size == "full" else {})
    scheduler = {k: v for k, v in sd15_scheduler_config().items() if k not in ("skip_prk_steps", "set_alpha_to_one")}
    return {"transformer": uvit_transformer_config(size), "vae": vae,
            "text_encoder": sd15_text_encoder_config(size), "scheduler": scheduler}


def build_uvit(size: str, seed: int):
    """A UViTPipeline (trainers.backbones.uvit_pipeline) with random weights."""
    from diffusers import DDPMScheduler

    from trainers.backbones.uvit_pipeline import UViT2DModel, UViTPipeline

    configs = uvit_configs(size)
    return UViTPipeline(
        vae=seeded(seed, AutoencoderKL, **configs["vae"]),
        text_encoder=seeded(seed, CLIPTextModel, CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=build_tokenizer(),
        transformer=seeded(seed, UViT2DModel, **configs["transformer"]),
        scheduler=DDPMScheduler.from_config(configs["scheduler"]),
    )


def dit_transformer_config(size: str) -> dict:
    """PixArt-alpha XL/2 at 512 px (Chen et al. 2023): 28 blocks of width 1152 on 64x64 latents, learned sigma.

    out_channels 8 = eps and the variance interpolation, as the checkpoint has; the pipeline keeps the first half.
    """
    config = {
        "sample_size": 64,
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 28,
        "num_attention_heads": 16,
        "attention_head_dim": 72,
        "cross_attention_dim": 1152,  # captions are projected to the width before cross-attention
        "caption_channels": 4096,     # T5-XXL's width
        "attention_bias": True,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
    }
    if size == "tiny":
        config |= {"sample_size": 8, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16,
                   "cross_attention_dim": 32, "caption_channels": 32}
    return config


def dit_text_encoder_config(size: str) -> dict:
    """T5 v1.1 XXL's encoder (gated GELU, relative position buckets); special-token ids are T5's."""
    config = {
        "vocab_size": 32128,
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.1,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }
    if size == "tiny":  # no dropout: tiny runs are compared step for step
        config |= {"vocab_size": len(unigram_vocab()), "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
                   "num_heads": 4, "dropout_rate": 0.0}
    return config


def dit_scheduler_config() -> dict:
    """PixArt-alpha's shipped DPMSolverMultistepScheduler: DDPM's linear betas, trained on epsilon."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }


def dit_configs(size: str) -> dict:
    """PixArt-alpha 512 on SD's VAE (sd-vae-ft-ema has SD-1.5's config) and a T5 encoder."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return {"transformer": dit_transformer_config(size), "vae": sd15_vae_config(size),
            "text_encoder": dit_text_encoder_config(size), "scheduler": dit_scheduler_config()}


def build_dit(size: str, seed: int):
    """A stock PixArtAlphaPipeline with PixArt-alpha's structure and random weights."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    configs = dit_configs(size)
    return PixArtAlphaPipeline(
        tokenizer=build_t5_tokenizer(),
        text_encoder=seeded(seed, T5EncoderModel, T5Config(**configs["text_encoder"])),
        vae=seeded(seed, AutoencoderKL, **configs["vae"]),
        transformer=seeded(seed, PixArtTransformer2DModel, **configs["transformer"]),
        scheduler=DPMSolverMultistepScheduler.from_config(configs["scheduler"]),
    )


def flow_vae_config(size: str, scaling_factor: float, shift_factor: float) -> dict:
    """SD3's and Flux's VAE: SD's layout with 16 latent channels, a latent shift, and no quant convs."""
    return sd15_vae_config(size) | {"latent_channels": 16, "scaling_factor": scaling_factor,
                                    "shift_factor": shift_factor, "use_quant_conv": False,
                                    "use_post_quant_conv": False, "force_upcast": True} \
        | ({"sample_size": 1024} if size == "full" else {})


def clip_with_projection_config(size: str, big: bool) -> dict:
    """CLIP-L (big=False) or OpenCLIP bigG's text tower, both with the projection SD3 pools through."""
    return sdxl_text_encoder_2_config(size) if big else sd15_text_encoder_config(size)


def sd3_transformer_config(size: str) -> dict:
    """SD3.5 Medium's MMDiT-X (dual attention in the first 13 blocks, RMS qk-norm); tiny keeps both features."""
    config = {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,      # T5-XXL's width; the CLIPs' 768 + 1280 are zero-padded to it
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,    # CLIP-L 768 + bigG 1280 projected pooled outputs
        "pos_embed_max_size": 384,
        "dual_attention_layers": tuple(range(13)),
        "qk_norm": "rms_norm",
    }
    if size == "tiny":
        config |= {"sample_size": 8, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 4,
                   "joint_attention_dim": 64, "caption_projection_dim": 32, "pooled_projection_dim": 64,
                   "pos_embed_max_size": 32, "dual_attention_layers": (0,)}
    return config


def sd3_configs(size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    t5 = dit_text_encoder_config(size) | ({"d_model": 64} if size == "tiny" else {})  # CLIP widths fit under it
    return {"transformer": sd3_transformer_config(size), "vae": flow_vae_config(size, 1.5305, 0.0609),
            "text_encoder": clip_with_projection_config(size, False),
            "text_encoder_2": clip_with_projection_config(size, True), "text_encoder_3": t5,
            "scheduler": {"num_train_timesteps": 1000, "shift": 3.0}}


def build_sd3(size: str, seed: int):
    """A stock StableDiffusion3Pipeline with SD3.5 Medium's structure and random weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    configs = sd3_configs(size)
    return StableDiffusion3Pipeline(
        transformer=seeded(seed, SD3Transformer2DModel, **configs["transformer"]),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]),
        vae=seeded(seed, AutoencoderKL, **configs["vae"]),
        text_encoder=seeded(seed, CLIPTextModelWithProjection, CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=build_tokenizer(),
        text_encoder_2=seeded(seed + 1, CLIPTextModelWithProjection, CLIPTextConfig(**configs["text_encoder_2"])),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=seeded(seed, T5EncoderModel, T5Config(**configs["text_encoder_3"])),
        tokenizer_3=build_t5_tokenizer(),
    )


def flux_transformer_config(size: str, guidance: bool = True) -> dict:
    """Flux.1-dev's transformer (19 double-stream, 38 single-stream blocks); guidance=False is schnell's."""
    config = {
        "patch_size": 1,
        "in_channels": 64,                # 16 latent channels packed 2x2
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": guidance,
        "axes_dims_rope": (16, 56, 56),   # rotary dims of the (0, row, column) ids; they sum to the head dim
    }
    if size == "tiny":
        config |= {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                   "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)}
    return config


def flux_configs(size: str, guidance: bool = True) -> dict:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    scheduler = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
    return {"transformer": flux_transformer_config(size, guidance), "vae": flow_vae_config(size, 0.3611, 0.1159),
            "text_encoder": sd15_text_encoder_config(size), "text_encoder_2": dit_text_encoder_config(size),
            "scheduler": scheduler if guidance else {"num_train_timesteps": 1000, "shift": 1.0}}


def build_flux(size: str, seed: int, guidance: bool = True):
    """A stock FluxPipeline with Flux.1-dev's structure (schnell's with guidance=False) and random weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    configs = flux_configs(size, guidance)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]),
        vae=seeded(seed, AutoencoderKL, **configs["vae"]),
        text_encoder=seeded(seed, CLIPTextModel, CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=build_tokenizer(),
        text_encoder_2=seeded(seed, T5EncoderModel, T5Config(**configs["text_encoder_2"])),
        tokenizer_2=build_t5_tokenizer(),
        transformer=seeded(seed, FluxTransformer2DModel, **configs["transformer"]),
    )


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "uvit": build_uvit, "dit": build_dit, "sd3": build_sd3,
            "flux": build_flux}
ARCHS = {name: BUILDERS[name] for name in FAMILIES if name in BUILDERS}  # the registry's families, in its order


def write_pipeline(pipe, out: str | Path) -> Path:
    """Save as safetensors, plus vocab.json/merges.txt, which transformers 5 no longer writes but 4 needs."""
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        if isinstance(getattr(pipe, name, None), CLIPTokenizer):  # T5's tokenizer.json serves both versions
            write_bpe_files(out / name)
    return out


def write_configs(pipe, out: str | Path) -> Path:
    """The folder without weights: model_index.json, each model's config, tokenizers and scheduler. Enough for
    `launch/train.py --dry-run` (which builds models from configs) at any size, in kilobytes."""
    from diffusers import ModelMixin

    out = Path(out)
    pipe.save_config(out)
    for name, component in pipe.components.items():
        if isinstance(component, ModelMixin):
            component.save_config(out / name)
        elif isinstance(component, torch.nn.Module):
            component.config.save_pretrained(out / name)
        elif component is not None:
            component.save_pretrained(out / name)
            if isinstance(component, CLIPTokenizer):
                write_bpe_files(out / name)
    return out


def make_tiny_model(arch: str, out: str | Path, size: str = "tiny", seed: int = 0, configs_only: bool = False) -> Path:
    """Build and write one model; the in-process entry point for tests and other code. configs_only: build on the
    meta device and write no weights."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if configs_only:
        with torch.device("meta"):
            return write_configs(ARCHS[arch](size, seed), out)
    return write_pipeline(ARCHS[arch](size, seed), out)


def summary(pipe, out: Path) -> str:
    """One line: parameter count per component and where it went."""
    modules = {k: m for k, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    counts = (f"{name} {sum(p.numel() for p in m.parameters()):,}" for name, m in modules.items())
    return f"wrote {', '.join(counts)} params, tokenizer {len(pipe.tokenizer)} tokens -> {out}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --arch choices come from ARCHS so new arches need no CLI change."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=sorted(ARCHS))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", default="tiny", choices=SIZES)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--configs-only", action="store_true",
                        help="no weights: the folder `launch/train.py --dry-run` needs, at any size, in kilobytes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build, write and report."""
    args = parse_args(argv)
    if args.configs_only:
        with torch.device("meta"):
            pipe = ARCHS[args.arch](args.size, args.seed)
            print(summary(pipe, write_configs(pipe, args.out)).replace("wrote", "wrote the configs of"))
        return
    pipe = ARCHS[args.arch](args.size, args.seed)
    print(summary(pipe, write_pipeline(pipe, args.out)))


if __name__ == "__main__":
    main()
